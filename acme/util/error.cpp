#include "acme/util/error.h"

namespace autotls {

std::string_view to_string(Errc code) {
  switch (code) {
    case Errc::transport: return "transport";
    case Errc::timeout: return "timeout";
    case Errc::protocol: return "protocol";
    case Errc::bad_response: return "bad_response";
    case Errc::crypto: return "crypto";
    case Errc::io: return "io";
    case Errc::invalid_input: return "invalid_input";
    case Errc::cancelled: return "cancelled";
  }
  return "unknown";
}

namespace acme {
bool Problem::is(std::string_view name) const {
  constexpr std::string_view kPrefix = "urn:ietf:params:acme:error:";
  return type.size() == kPrefix.size() + name.size() && type.starts_with(kPrefix) &&
         std::string_view(type).substr(kPrefix.size()) == name;
}
}  // namespace acme

bool Error::retryable() const {
  switch (code) {
    case Errc::transport:
    case Errc::timeout:
      return true;
    case Errc::protocol:
      if (problem && (problem->is("rateLimited") || problem->is("badNonce"))) return true;
      return http_status >= 500 || (problem && problem->status >= 500);
    default:
      return false;
  }
}

Error Error::with_context(std::string_view op) const {
  Error e = *this;
  e.message = std::string(op) + ": " + message;
  return e;
}

}  // namespace autotls
