#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace autotls::acme {

// Identifier is an ACME identifier (RFC 8555 §9.7.7): type "dns" (RFC 8555) or "ip" (RFC 8738).
struct Identifier {
  std::string type;
  std::string value;

  static Identifier dns(std::string name) { return {"dns", std::move(name)}; }
  static Identifier ip(std::string address) { return {"ip", std::move(address)}; }
  bool operator==(const Identifier&) const = default;
};

// identifier_for picks "ip" for an IPv4/IPv6 literal and "dns" for anything else.
Identifier identifier_for(std::string_view name);

// canonical_ip is an IPv4 or IPv6 address's canonical text (RFC 8738 §3: RFC 1123 dotted
// decimal, RFC 5952 for IPv6: lower case, the longest run of zero groups as "::"), the form
// certificates' names are read in (tlsreload::Certificate::names); nullopt when name is no
// address. "0:0::ABCD" -> "::abcd".
std::optional<std::string> canonical_ip(std::string_view name);

}  // namespace autotls::acme
