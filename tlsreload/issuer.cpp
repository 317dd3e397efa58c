#include "tlsreload/issuer.h"

namespace autotls::tlsreload {

std::string IssuerConfig::label() const {
  if (!name.empty()) return name;
  if (internal) return std::string(kInternalIssuer);
  return directory_url;
}

std::string IssuerConfig::account_id() const { return internal ? std::string(kInternalIssuer) : directory_url; }

bool falls_through(const Error& e) {
  switch (e.code) {
    case Errc::cancelled:  // shutdown: stop, do not start over elsewhere
    case Errc::io:         // our storage or files
    case Errc::crypto:     // our keys
      return false;
    case Errc::invalid_input:
      // A request we cannot make anywhere, except a challenge type this CA does not offer
      // (ZeroSSL has no tls-alpn-01, for one): the next CA may offer it.
      return e.message.find("the CA offers no ") != std::string::npos;
    case Errc::transport:
    case Errc::timeout:
    case Errc::bad_response:
      return true;
    case Errc::protocol:
      break;
  }
  // acme::obtain words a failed challenge "validation of <name> by <type> failed: ...". The
  // name does not point at us (or our DNS hook is broken): another CA would see the same.
  // A CAA refusal is the exception: the domain's CAA records may allow the next CA, which
  // checks them itself.
  if (e.message.find("validation of ") != std::string::npos &&
      e.message.find(" failed: authorization is ") != std::string::npos) {
    return e.problem && e.problem->is("caa");
  }
  return true;
}

}  // namespace autotls::tlsreload
