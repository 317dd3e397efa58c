#include "acme/challenge.h"

#include <arpa/inet.h>

#include <algorithm>
#include <string>

#include <openssl/objects.h>
#include <openssl/pem.h>
#include <openssl/rand.h>

#include "acme/key.h"
#include "acme/util/base64.h"
#include "acme/util/openssl.h"

namespace autotls::acme {
namespace {

// RFC 8737 §6.1: id-pe-acmeIdentifier OBJECT IDENTIFIER ::= { id-pe 31 }.
constexpr char kAcmeIdentifierOid[] = "1.3.6.1.5.5.7.1.31";

// Validators check only the SAN and acmeIdentifier of the challenge certificate (RFC 8737 §3),
// so its validity is fixed instead of read from a clock nobody injected. It is wide enough for
// any wall or test clock, yet ends before 2262 so that it still fits a nanosecond
// std::chrono::system_clock (RFC 5280's 99991231235959Z would overflow it in callers that
// convert notAfter to a time_point).
constexpr char kNotBefore[] = "20000101000000Z";
constexpr char kNotAfter[] = "22000101000000Z";

std::optional<std::string> sha256(std::string_view data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(data.data(), data.size(), md, &len, EVP_sha256(), nullptr) != 1) {
    ossl::drain_errors();
    return std::nullopt;
  }
  return std::string(reinterpret_cast<const char*>(md), len);
}

struct IpAddress {
  int family = 0;  // AF_INET or AF_INET6
  unsigned char octets[16] = {};
  size_t size() const { return family == AF_INET ? 4 : 16; }
};

std::optional<IpAddress> parse_ip(const std::string& text) {
  IpAddress ip;
  if (inet_pton(AF_INET, text.c_str(), ip.octets) == 1) {
    ip.family = AF_INET;
    return ip;
  }
  if (inet_pton(AF_INET6, text.c_str(), ip.octets) == 1) {
    ip.family = AF_INET6;
    return ip;
  }
  return std::nullopt;
}

// san_extension builds the subjectAltName holding exactly the one identifier (RFC 8737 §3:
// "a subjectAltName extension containing the dNSName being validated and no other entries";
// RFC 8738 §6: an iPAddress for an IP identifier).
Result<ossl::X509ExtPtr> san_extension(const Identifier& id) {
  ossl::GeneralNamesPtr names(sk_GENERAL_NAME_new_null());
  GENERAL_NAME* gn = GENERAL_NAME_new();
  if (!names || !gn) {
    GENERAL_NAME_free(gn);
    return fail(ossl::error("tls-alpn-01 certificate"));
  }
  if (sk_GENERAL_NAME_push(names.get(), gn) == 0) {
    GENERAL_NAME_free(gn);
    return fail(ossl::error("tls-alpn-01 certificate"));
  }
  if (id.type == "dns") {
    ASN1_IA5STRING* s = ASN1_IA5STRING_new();
    if (!s || ASN1_STRING_set(s, id.value.data(), int(id.value.size())) != 1) {
      ASN1_IA5STRING_free(s);
      return fail(ossl::error("tls-alpn-01 certificate"));
    }
    GENERAL_NAME_set0_value(gn, GEN_DNS, s);
  } else {
    auto ip = parse_ip(id.value);
    if (!ip) {
      return fail(Errc::invalid_input,
                  "tls-alpn-01 certificate: invalid IP address \"" + id.value + "\"");
    }
    ASN1_OCTET_STRING* s = ASN1_OCTET_STRING_new();
    if (!s || ASN1_OCTET_STRING_set(s, ip->octets, int(ip->size())) != 1) {
      ASN1_OCTET_STRING_free(s);
      return fail(ossl::error("tls-alpn-01 certificate"));
    }
    GENERAL_NAME_set0_value(gn, GEN_IPADD, s);
  }
  // The subject has a CN, so the SAN need not be critical (RFC 5280 §4.2.1.6).
  ossl::X509ExtPtr ext(X509V3_EXT_i2d(NID_subject_alt_name, 0, names.get()));
  if (!ext) return fail(ossl::error("tls-alpn-01 certificate: subjectAltName"));
  return ext;
}

// acme_identifier_extension builds the critical id-pe-acmeIdentifier extension. RFC 8737 §3:
// "The extension MUST contain the SHA-256 digest [...] of the key authorization" and §6.1:
// "Authorization ::= OCTET STRING (SIZE (32))"; "The acmeIdentifier extension MUST be marked
// critical". The extnValue OCTET STRING thus wraps the DER of another OCTET STRING: 04 20 <hash>.
Result<ossl::X509ExtPtr> acme_identifier_extension(std::string_view key_authorization) {
  auto digest = sha256(key_authorization);
  if (!digest) return fail(Errc::crypto, "tls-alpn-01 certificate: SHA-256 failed");
  ossl::Asn1OctetStringPtr inner(ASN1_OCTET_STRING_new());
  if (!inner || ASN1_OCTET_STRING_set(inner.get(),
                                      reinterpret_cast<const unsigned char*>(digest->data()),
                                      int(digest->size())) != 1) {
    return fail(ossl::error("tls-alpn-01 certificate: acmeIdentifier"));
  }
  unsigned char* der = nullptr;
  int der_len = i2d_ASN1_OCTET_STRING(inner.get(), &der);
  if (der_len <= 0) return fail(ossl::error("tls-alpn-01 certificate: acmeIdentifier"));
  ossl::Asn1OctetStringPtr value(ASN1_OCTET_STRING_new());
  bool ok = value && ASN1_OCTET_STRING_set(value.get(), der, der_len) == 1;
  OPENSSL_free(der);
  if (!ok) return fail(ossl::error("tls-alpn-01 certificate: acmeIdentifier"));

  std::unique_ptr<ASN1_OBJECT, ossl::Free<ASN1_OBJECT_free>> oid(
      OBJ_txt2obj(kAcmeIdentifierOid, 1));
  if (!oid) return fail(ossl::error("tls-alpn-01 certificate: acmeIdentifier OID"));
  ossl::X509ExtPtr ext(X509_EXTENSION_create_by_OBJ(nullptr, oid.get(), 1, value.get()));
  if (!ext) return fail(ossl::error("tls-alpn-01 certificate: acmeIdentifier"));
  return ext;
}

Result<std::string> cert_to_pem(X509* cert) {
  ossl::BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_X509(bio.get(), cert) != 1) {
    return fail(ossl::error("tls-alpn-01 certificate: PEM"));
  }
  char* data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, size_t(len));
}

}  // namespace

std::string key_authorization(std::string_view token, std::string_view thumbprint) {
  // RFC 8555 §8.1: keyAuthorization = token || '.' || base64url(Thumbprint(accountKey)).
  std::string out;
  out.reserve(token.size() + 1 + thumbprint.size());
  out.append(token).append(".").append(thumbprint);
  return out;
}

std::string http01_path(std::string_view token) {
  // RFC 8555 §8.3: "http://{domain}/.well-known/acme-challenge/{token}".
  return "/.well-known/acme-challenge/" + std::string(token);
}

std::string dns01_txt_value(std::string_view key_authorization) {
  // RFC 8555 §8.4: "the base64url encoding of the SHA-256 digest [FIPS180-4] of the key
  // authorization".
  auto digest = sha256(key_authorization);
  // SHA-256 of memory cannot fail short of a broken OpenSSL build.
  return digest ? base64url_encode(*digest) : std::string();
}

std::string dns01_record_name(std::string_view domain) {
  // RFC 8555 §8.4: the record is "_acme-challenge" prepended to the domain; §7.1.3: a
  // wildcard's authorization is for the base domain, "without the "*." prefix".
  if (domain.starts_with("*.")) domain.remove_prefix(2);
  return "_acme-challenge." + std::string(domain);
}

Result<TlsAlpnCertificate> tls_alpn01_certificate(const Identifier& identifier,
                                                  std::string_view key_authorization) {
  if (identifier.type != "dns" && identifier.type != "ip") {
    return fail(Errc::invalid_input, "tls-alpn-01 certificate: unsupported identifier type \"" +
                                         identifier.type + "\"");
  }
  bool printable = std::all_of(identifier.value.begin(), identifier.value.end(), [](char c) {
    return static_cast<unsigned char>(c) > 0x20 && static_cast<unsigned char>(c) < 0x7f;
  });
  if (identifier.value.empty() || !printable || identifier.value.starts_with("*.")) {
    // A wildcard is never a TLS SNI, so tls-alpn-01 cannot validate one (RFC 8737 §3 checks
    // "the dNSName being validated" against the SNI the validator sent).
    return fail(Errc::invalid_input,
                "tls-alpn-01 certificate: invalid identifier \"" + identifier.value + "\"");
  }
  auto key = PrivateKey::generate(KeyType::ec256);
  if (!key) return fail(key.error().with_context("tls-alpn-01 certificate"));
  auto san = san_extension(identifier);
  if (!san) return fail(san.error());
  auto acme_id = acme_identifier_extension(key_authorization);
  if (!acme_id) return fail(acme_id.error());

  ossl::X509Ptr cert(X509_new());
  if (!cert || X509_set_version(cert.get(), X509_VERSION_3) != 1) {
    return fail(ossl::error("tls-alpn-01 certificate"));
  }
  // RFC 5280 §4.1.2.2: a positive serial of up to 20 octets; 16 random bytes with the top bit
  // cleared.
  unsigned char serial[16];
  if (RAND_bytes(serial, sizeof serial) != 1) return fail(ossl::error("tls-alpn-01 serial"));
  serial[0] &= 0x7f;
  serial[0] |= 0x01 << 6;  // keep it 16 octets long
  ossl::BignumPtr serial_bn(BN_bin2bn(serial, sizeof serial, nullptr));
  if (!serial_bn ||
      !BN_to_ASN1_INTEGER(serial_bn.get(), X509_get_serialNumber(cert.get()))) {
    return fail(ossl::error("tls-alpn-01 serial"));
  }

  // Self-signed: the same name as subject and issuer. The CN is informational only.
  ossl::X509NamePtr name(X509_NAME_new());
  static constexpr char kCommonName[] = "ACME tls-alpn-01 challenge";
  if (!name ||
      X509_NAME_add_entry_by_NID(name.get(), NID_commonName, MBSTRING_ASC,
                                 reinterpret_cast<const unsigned char*>(kCommonName), -1, -1,
                                 0) != 1 ||
      X509_set_subject_name(cert.get(), name.get()) != 1 ||
      X509_set_issuer_name(cert.get(), name.get()) != 1) {
    return fail(ossl::error("tls-alpn-01 certificate: name"));
  }
  if (ASN1_TIME_set_string_X509(X509_getm_notBefore(cert.get()), kNotBefore) != 1 ||
      ASN1_TIME_set_string_X509(X509_getm_notAfter(cert.get()), kNotAfter) != 1) {
    return fail(ossl::error("tls-alpn-01 certificate: validity"));
  }
  if (X509_set_pubkey(cert.get(), key->evp()) != 1 ||
      X509_add_ext(cert.get(), san->get(), -1) != 1 ||
      X509_add_ext(cert.get(), acme_id->get(), -1) != 1) {
    return fail(ossl::error("tls-alpn-01 certificate"));
  }
  if (X509_sign(cert.get(), key->evp(), EVP_sha256()) <= 0) {
    return fail(ossl::error("tls-alpn-01 certificate: sign"));
  }

  auto cert_pem = cert_to_pem(cert.get());
  if (!cert_pem) return fail(cert_pem.error());
  auto key_pem = key->to_pem();
  if (!key_pem) return fail(key_pem.error().with_context("tls-alpn-01 certificate"));
  return TlsAlpnCertificate{std::move(*cert_pem), std::move(*key_pem)};
}

Result<std::string> tls_alpn01_sni(const Identifier& identifier) {
  if (identifier.type == "dns") {
    if (identifier.value.empty()) return fail(Errc::invalid_input, "tls-alpn-01 SNI: empty name");
    return identifier.value;
  }
  if (identifier.type != "ip") {
    return fail(Errc::invalid_input,
                "tls-alpn-01 SNI: unsupported identifier type \"" + identifier.type + "\"");
  }
  auto ip = parse_ip(identifier.value);
  if (!ip) {
    return fail(Errc::invalid_input,
                "tls-alpn-01 SNI: invalid IP address \"" + identifier.value + "\"");
  }
  // RFC 8738 §6: the validator uses "the reverse mapping of the IP address [...] as defined in
  // [RFC1034] Section 5.2 or [RFC3596] Section 2.5" as the SNI.
  std::string out;
  if (ip->family == AF_INET) {
    for (int i = 3; i >= 0; --i) out += std::to_string(ip->octets[i]) + ".";
    return out + "in-addr.arpa";
  }
  static constexpr char kHex[] = "0123456789abcdef";
  for (int i = 15; i >= 0; --i) {
    out += kHex[ip->octets[i] & 0x0f];
    out += '.';
    out += kHex[ip->octets[i] >> 4];
    out += '.';
  }
  return out + "ip6.arpa";
}

}  // namespace autotls::acme
