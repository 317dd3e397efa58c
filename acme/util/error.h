#pragma once

#include <chrono>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <tl/expected.hpp>

namespace autotls {

// Errc classifies an Error so callers can decide: retry now, retry later, or give up.
enum class Errc {
  transport,      // connection refused, reset, DNS failure, TLS failure to the server
  timeout,        // a deadline passed (connect, total, polling)
  protocol,       // the peer answered with a problem document or an unexpected status
  bad_response,   // the peer's reply could not be understood (bad JSON, missing header, too big)
  crypto,         // an OpenSSL operation failed
  io,             // a local file or socket operation failed
  invalid_input,  // the caller passed something unusable
  cancelled,      // the operation was abandoned on request (shutdown)
};

std::string_view to_string(Errc code);

namespace acme {

// Subproblem is one entry of a problem document's "subproblems" (RFC 8555 §6.7.1).
struct Subproblem {
  std::string type;
  std::string detail;
  std::string identifier_type;   // "dns" or "ip", empty when absent
  std::string identifier_value;
};

// Problem is an RFC 7807 problem document as ACME servers send them (RFC 8555 §6.7).
struct Problem {
  std::string type;      // full URN, e.g. "urn:ietf:params:acme:error:badNonce"
  std::string detail;
  std::string instance;  // for userActionRequired: the page the user must visit
  int status = 0;        // HTTP status of the response that carried it
  std::vector<Subproblem> subproblems;

  // is reports whether the type is "urn:ietf:params:acme:error:<name>".
  bool is(std::string_view name) const;
};

}  // namespace acme

// Error is what every fallible call returns instead of throwing. The message names the
// operation first ("newOrder: HTTP 400: ..."), so it can be shown to a user as it is.
struct Error {
  Errc code = Errc::invalid_input;
  std::string message;
  std::optional<acme::Problem> problem;
  std::optional<std::chrono::seconds> retry_after;
  int http_status = 0;  // status of the HTTP reply that caused it; 0 when there was none
  // validation_failed marks the CA's verdict that a challenge failed (set by acme::obtain when
  // an authorization ends other than valid), as opposed to the CA refusing a request.
  bool validation_failed = false;

  Error() = default;
  Error(Errc c, std::string m) : code(c), message(std::move(m)) {}

  // retryable reports whether the same request may succeed later without any change:
  // transport faults, timeouts, HTTP 5xx, rateLimited and badNonce.
  bool retryable() const;

  // with_context prefixes the message with the operation: "finalize: " + message.
  Error with_context(std::string_view op) const;
};

template <class T>
using Result = tl::expected<T, Error>;

// Status is a Result with no value.
using Status = tl::expected<void, Error>;

inline tl::unexpected<Error> fail(Errc code, std::string message) {
  return tl::unexpected<Error>(Error(code, std::move(message)));
}
inline tl::unexpected<Error> fail(Error e) { return tl::unexpected<Error>(std::move(e)); }

}  // namespace autotls
