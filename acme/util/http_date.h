#pragma once

// HTTP-date (RFC 9110 §5.6.7): the IMF-fixdate every sender uses, and the two obsolete forms
// every recipient must still accept. Locale-independent (no strptime / strftime).

#include <ctime>
#include <optional>
#include <string>
#include <string_view>

namespace autotls {

// format_http_date renders t as IMF-fixdate: "Sun, 06 Nov 1994 08:49:37 GMT".
std::string format_http_date(std::time_t t);

// parse_http_date reads an HTTP-date in any of its three forms:
//   IMF-fixdate  "Sun, 06 Nov 1994 08:49:37 GMT"
//   rfc850-date  "Sunday, 06-Nov-94 08:49:37 GMT" (a two-digit year more than 50 years ahead
//                of now is read as the past century, RFC 9110 §5.6.7)
//   asctime      "Sun Nov  6 08:49:37 1994"
// The day name is checked for form, not against the date. nullopt for anything else, a field
// out of range (month 13, hour 24, second 61, day 31 of a 30-day month) included.
std::optional<std::time_t> parse_http_date(std::string_view s);

}  // namespace autotls
