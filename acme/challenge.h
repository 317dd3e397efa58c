#pragma once

#include <string>
#include <string_view>

#include "acme/types.h"
#include "acme/util/error.h"

namespace autotls::acme {

// key_authorization is token || '.' || thumbprint (RFC 8555 §8.1).
std::string key_authorization(std::string_view token, std::string_view thumbprint);

// http01_path is "/.well-known/acme-challenge/<token>" (RFC 8555 §8.3).
std::string http01_path(std::string_view token);

// dns01_txt_value is base64url(SHA-256(key authorization)) (RFC 8555 §8.4).
std::string dns01_txt_value(std::string_view key_authorization);

// dns01_record_name is "_acme-challenge.<domain>" with a leading "*." removed (RFC 8555 §8.4:
// a wildcard's authorization is for the base domain).
std::string dns01_record_name(std::string_view domain);

// TlsAlpnCertificate is a self-signed certificate for tls-alpn-01 (RFC 8737 §3): one SAN for
// the identifier and a critical id-pe-acmeIdentifier extension holding SHA-256 of the key
// authorization as an ASN.1 OCTET STRING.
struct TlsAlpnCertificate {
  std::string cert_pem;
  std::string key_pem;  // a fresh P-256 key
};
Result<TlsAlpnCertificate> tls_alpn01_certificate(const Identifier& identifier,
                                                  std::string_view key_authorization);

// kAcmeTlsAlpnProtocol is the ALPN protocol a tls-alpn-01 validation offers.
inline constexpr std::string_view kAcmeTlsAlpnProtocol = "acme-tls/1";

// tls_alpn01_reverse_name is the SNI a validator sends for an IP identifier (RFC 8738 §6):
// the in-addr.arpa / ip6.arpa name. For a DNS identifier it is the name itself.
Result<std::string> tls_alpn01_sni(const Identifier& identifier);

}  // namespace autotls::acme
