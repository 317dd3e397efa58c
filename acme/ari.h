#pragma once

#include <chrono>
#include <optional>
#include <random>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "acme/util/error.h"

namespace autotls::acme {

// ari_cert_id computes the RFC 9773 §4.1 certificate identifier of a certificate given in PEM
// (the first certificate of the text is used) or DER: base64url(AKI keyIdentifier) "."
// base64url(serial number DER content octets). Errc::invalid_input when the certificate has no
// Authority Key Identifier with a keyIdentifier.
Result<std::string> ari_cert_id(std::string_view certificate);

// RenewalInfo is a renewalInfo resource (RFC 9773 §4.2).
struct RenewalInfo {
  std::chrono::system_clock::time_point window_start;
  std::chrono::system_clock::time_point window_end;
  std::string explanation_url;                       // empty when absent
  std::optional<std::chrono::seconds> retry_after;   // from the Retry-After header
};

// parse_renewal_info reads the JSON body; the window must have start < end
// (RFC 9773 §4.2: "a client MUST consider it invalid" otherwise).
Result<RenewalInfo> parse_renewal_info(std::string_view body);

// pick_renewal_time draws a uniform random time inside the window (RFC 9773 §4.3.2).
std::chrono::system_clock::time_point pick_renewal_time(const RenewalInfo& info, std::mt19937_64& rng);

// parse_rfc3339 reads "2025-01-02T04:05:06Z" style timestamps (fractional seconds and numeric
// offsets accepted).
std::optional<std::chrono::system_clock::time_point> parse_rfc3339(std::string_view text);
std::string format_rfc3339(std::chrono::system_clock::time_point t);

}  // namespace autotls::acme
