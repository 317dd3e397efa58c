#include "acme/types.h"

#include <arpa/inet.h>

#include <string>

namespace autotls::acme {

Identifier identifier_for(std::string_view name) {
  std::string s(name);
  unsigned char buf[16];
  if (inet_pton(AF_INET, s.c_str(), buf) == 1 || inet_pton(AF_INET6, s.c_str(), buf) == 1) {
    return Identifier::ip(std::move(s));
  }
  return Identifier::dns(std::move(s));
}

std::optional<std::string> canonical_ip(std::string_view name) {
  std::string s(name);
  unsigned char buf[16];
  char text[INET6_ADDRSTRLEN] = {};
  for (int family : {AF_INET, AF_INET6}) {
    if (inet_pton(family, s.c_str(), buf) == 1 && inet_ntop(family, buf, text, sizeof text)) return std::string(text);
  }
  return std::nullopt;
}

}  // namespace autotls::acme
