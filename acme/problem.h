#pragma once

#include <chrono>
#include <optional>
#include <string_view>

#include "acme/transport.h"
#include "acme/util/error.h"

namespace autotls::acme {

// RFC 8555 §6.7 error types (the part after "urn:ietf:params:acme:error:").
namespace problem_type {
inline constexpr std::string_view kAccountDoesNotExist = "accountDoesNotExist";
inline constexpr std::string_view kAlreadyReplaced = "alreadyReplaced";  // RFC 9773 §5
inline constexpr std::string_view kAlreadyRevoked = "alreadyRevoked";
inline constexpr std::string_view kBadCsr = "badCSR";
inline constexpr std::string_view kBadNonce = "badNonce";
inline constexpr std::string_view kBadPublicKey = "badPublicKey";
inline constexpr std::string_view kBadRevocationReason = "badRevocationReason";
inline constexpr std::string_view kBadSignatureAlgorithm = "badSignatureAlgorithm";
inline constexpr std::string_view kCaa = "caa";
inline constexpr std::string_view kConnection = "connection";
inline constexpr std::string_view kDns = "dns";
inline constexpr std::string_view kExternalAccountRequired = "externalAccountRequired";
inline constexpr std::string_view kIncorrectResponse = "incorrectResponse";
inline constexpr std::string_view kInvalidContact = "invalidContact";
inline constexpr std::string_view kMalformed = "malformed";
inline constexpr std::string_view kOrderNotReady = "orderNotReady";
inline constexpr std::string_view kRateLimited = "rateLimited";
inline constexpr std::string_view kRejectedIdentifier = "rejectedIdentifier";
inline constexpr std::string_view kServerInternal = "serverInternal";
inline constexpr std::string_view kTls = "tls";
inline constexpr std::string_view kUnauthorized = "unauthorized";
inline constexpr std::string_view kUnsupportedContact = "unsupportedContact";
inline constexpr std::string_view kUnsupportedIdentifier = "unsupportedIdentifier";
inline constexpr std::string_view kUserActionRequired = "userActionRequired";
}  // namespace problem_type

// parse_problem reads a problem document (RFC 7807) from a JSON text. Unknown members are
// ignored; a body that is not a JSON object with a string "type" gives nullopt.
std::optional<Problem> parse_problem(std::string_view body, int status);

// kMaxRetryAfter bounds what parse_retry_after returns: a CA's Retry-After is seconds to days,
// and a longer one is read as this (one year), so that adding it to a time never overflows.
inline constexpr std::chrono::seconds kMaxRetryAfter{366L * 24 * 3600};

// parse_retry_after reads a Retry-After value: delay-seconds or an HTTP-date (RFC 9110
// §10.2.3), relative to now. Past dates give 0 s, a delay or date beyond kMaxRetryAfter gives
// kMaxRetryAfter; garbage gives nullopt.
std::optional<std::chrono::seconds> parse_retry_after(std::string_view value,
                                                      std::chrono::system_clock::time_point now);

// error_from_response turns a non-success response into an Error{protocol} carrying the
// problem document (when there is one) and Retry-After. The message reads
// "<op>: HTTP <status>: <type>: <detail>" followed by subproblems.
Error error_from_response(std::string_view op, const HttpResponse& response,
                          std::chrono::system_clock::time_point now);

// describe renders a problem for people: type without URN prefix, detail, subproblems.
std::string describe(const Problem& problem);

}  // namespace autotls::acme
