#include "acme/util/http_date.h"

#include <doctest/doctest.h>

#include <string>
#include <vector>

using autotls::format_http_date;
using autotls::parse_http_date;

TEST_SUITE("acme.http_date") {
  TEST_CASE("format_http_date writes IMF-fixdate") {
    CHECK(format_http_date(784111777) == "Sun, 06 Nov 1994 08:49:37 GMT");
    CHECK(format_http_date(0) == "Thu, 01 Jan 1970 00:00:00 GMT");
    CHECK(format_http_date(951782400) == "Tue, 29 Feb 2000 00:00:00 GMT");
    // Found by fuzz_text_parsers: a year before 1000 was written with fewer digits, and did
    // not read back.
    CHECK(format_http_date(-50'000'000'000) == "Thu, 25 Jul 0385 07:06:40 GMT");
    CHECK(parse_http_date("Sun, 06 Nov 0380 08:49:37 GMT") ==
          parse_http_date(format_http_date(*parse_http_date("Sun, 06 Nov 0380 08:49:37 GMT"))));
  }

  TEST_CASE("parse_http_date reads the three forms of RFC 9110 5.6.7") {
    CHECK(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT") == 784111777);
    CHECK(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT") == 784111777);
    CHECK(parse_http_date("Sun Nov  6 08:49:37 1994") == 784111777);
    CHECK(parse_http_date("Sun Nov 16 08:49:37 1994") == 784111777 + 10 * 86400);
    CHECK(parse_http_date("Tue, 29 Feb 2000 00:00:00 GMT") == 951782400);
    for (std::time_t t : {0L, 1L, 784111777L, 1764979200L, 4102444799L}) {
      CAPTURE(t);
      CHECK(parse_http_date(format_http_date(t)) == t);
    }
  }

  TEST_CASE("parse_http_date refuses anything else") {
    for (const std::string& bad : std::vector<std::string>{
             "",
             "Sun, 06 Nov 1994 08:49:37 UTC",     // GMT only
             "Sun, 06 nov 1994 08:49:37 GMT",     // case matters
             "Sun, 6 Nov 1994 08:49:37 GMT",      // two-digit day
             "Sun, 06 Nov 94 08:49:37 GMT",       // four-digit year
             "Sun, 31 Nov 1994 08:49:37 GMT",     // no 31 November
             "Tue, 29 Feb 2100 00:00:00 GMT",     // 2100 is no leap year
             "Sun, 06 Nov 1994 24:00:00 GMT",
             "Sun, 06 Nov 1994 08:60:00 GMT",
             "Sun, 06 Nov 1994 08:49:62 GMT",
             "Sun, 06 Nov 1994 08:49:37 GMT ",    // trailing bytes
             " Sun, 06 Nov 1994 08:49:37 GMT",
             "Sunday, 06-Nov-1994 08:49:37 GMT",  // rfc850 has two digits
             "Sun Nov 6 08:49:37 1994",           // asctime pads the day with a space
             "Sun Nov  6 08:49:37 1994 GMT",
             "1994-11-06T08:49:37Z",
             "784111777",
         }) {
      CAPTURE(bad);
      CHECK_FALSE(parse_http_date(bad));
    }
  }
}
