#include "acme/util/openssl.h"

#include <openssl/err.h>

namespace autotls::ossl {

std::string drain_errors() {
  std::string last;
  unsigned long e;
  while ((e = ERR_get_error()) != 0) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    last = buf;
  }
  return last;
}

Error error(std::string_view op) {
  std::string reason = drain_errors();
  if (reason.empty()) reason = "unknown OpenSSL error";
  return Error(Errc::crypto, std::string(op) + ": " + reason);
}

}  // namespace autotls::ossl
