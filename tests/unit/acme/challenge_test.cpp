#include "acme/challenge.h"

#include <cstdint>
#include <ctime>
#include <limits>
#include <string>
#include <vector>

#include <doctest/doctest.h>
#include <openssl/objects.h>
#include <openssl/pem.h>

#include "acme/util/openssl.h"

namespace {

using autotls::Errc;
using autotls::acme::Identifier;
namespace ossl = autotls::ossl;

std::string sha256(std::string_view data) {
  unsigned char md[32];
  unsigned int len = 0;
  REQUIRE(EVP_Digest(data.data(), data.size(), md, &len, EVP_sha256(), nullptr) == 1);
  return std::string(reinterpret_cast<char*>(md), len);
}

// to_base64url uses OpenSSL's standard base64 and maps it by hand, so the expected value is not
// produced by the code under test.
std::string to_base64url(std::string_view data) {
  std::string b64(4 * ((data.size() + 2) / 3) + 1, '\0');
  int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(b64.data()),
                          reinterpret_cast<const unsigned char*>(data.data()), int(data.size()));
  b64.resize(size_t(n));
  while (!b64.empty() && b64.back() == '=') b64.pop_back();
  for (char& c : b64) {
    if (c == '+') c = '-';
    if (c == '/') c = '_';
  }
  return b64;
}

ossl::X509Ptr read_cert(const std::string& pem) {
  ossl::BioPtr bio(BIO_new_mem_buf(pem.data(), int(pem.size())));
  ossl::X509Ptr cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  REQUIRE(cert);
  return cert;
}

ossl::EvpPkeyPtr read_key(const std::string& pem) {
  ossl::BioPtr bio(BIO_new_mem_buf(pem.data(), int(pem.size())));
  ossl::EvpPkeyPtr key(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  REQUIRE(key);
  return key;
}

struct Name {
  int type;
  std::string value;
};

std::vector<Name> san_names(X509* cert, bool* critical) {
  std::vector<Name> out;
  int crit = -1;
  ossl::GeneralNamesPtr names(
      static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, &crit, nullptr)));
  REQUIRE(names);
  *critical = crit == 1;
  for (int i = 0; i < sk_GENERAL_NAME_num(names.get()); ++i) {
    int type = 0;
    const auto* v = static_cast<const ASN1_STRING*>(
        GENERAL_NAME_get0_value(sk_GENERAL_NAME_value(names.get(), i), &type));
    out.push_back({type, std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(v)),
                                     size_t(ASN1_STRING_length(v)))});
  }
  return out;
}

// acme_identifier finds the id-pe-acmeIdentifier extension (RFC 8737 §6.1).
X509_EXTENSION* acme_identifier(X509* cert) {
  std::unique_ptr<ASN1_OBJECT, ossl::Free<ASN1_OBJECT_free>> oid(
      OBJ_txt2obj("1.3.6.1.5.5.7.1.31", 1));
  REQUIRE(oid);
  int idx = X509_get_ext_by_OBJ(cert, oid.get(), -1);
  if (idx < 0) return nullptr;
  // Exactly one such extension.
  CHECK(X509_get_ext_by_OBJ(cert, oid.get(), idx) < 0);
  return X509_get_ext(cert, idx);
}

autotls::acme::TlsAlpnCertificate must_cert(const Identifier& id, std::string_view key_authz) {
  auto r = autotls::acme::tls_alpn01_certificate(id, key_authz);
  REQUIRE_MESSAGE(r.has_value(), (r ? "" : r.error().message));
  return *r;
}

constexpr const char* kKeyAuthz =
    "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA.nP1qzpXGymHBrUEepNY9HCsQk7K8KhOypzEt62jcerQ";

}  // namespace

TEST_SUITE("acme.challenge") {

TEST_CASE("key_authorization joins token and thumbprint with a dot") {
  CHECK(autotls::acme::key_authorization("evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA",
                                         "nP1qzpXGymHBrUEepNY9HCsQk7K8KhOypzEt62jcerQ") ==
        kKeyAuthz);
  CHECK(autotls::acme::key_authorization("", "") == ".");
}

TEST_CASE("http01_path is under the well-known acme-challenge directory") {
  CHECK(autotls::acme::http01_path("LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0") ==
        "/.well-known/acme-challenge/LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0");
}

TEST_CASE("dns01_txt_value is base64url of SHA-256 of the key authorization") {
  // Known answer: SHA-256("abc") from FIPS 180-2 is ba7816bf...f20015ad.
  CHECK(autotls::acme::dns01_txt_value("abc") == "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0");
  CHECK(autotls::acme::dns01_txt_value(kKeyAuthz) ==
        "NGwKoXBgCT8JhEa0bK7AwfSqHyu_ZWeugV07fLGIVq0");
  // And against an independent computation for a few more inputs.
  for (const char* ka : {"", "a.b", "token.thumbprint-with_url+safe/chars"}) {
    CAPTURE(ka);
    std::string value = autotls::acme::dns01_txt_value(ka);
    CHECK(value == to_base64url(sha256(ka)));
    CHECK(value.size() == 43);
  }
}

TEST_CASE("dns01_record_name prefixes _acme-challenge and drops a wildcard label") {
  CHECK(autotls::acme::dns01_record_name("example.com") == "_acme-challenge.example.com");
  CHECK(autotls::acme::dns01_record_name("*.example.com") == "_acme-challenge.example.com");
  CHECK(autotls::acme::dns01_record_name("www.example.com") ==
        "_acme-challenge.www.example.com");
  // Only a leading "*." is a wildcard.
  CHECK(autotls::acme::dns01_record_name("a.*.example.com") ==
        "_acme-challenge.a.*.example.com");
}

TEST_CASE("tls_alpn01_certificate for a DNS name follows RFC 8737") {
  auto out = must_cert(Identifier::dns("example.com"), kKeyAuthz);
  auto cert = read_cert(out.cert_pem);
  CHECK(X509_get_version(cert.get()) == X509_VERSION_3);

  bool san_critical = true;
  auto names = san_names(cert.get(), &san_critical);
  REQUIRE(names.size() == 1);
  CHECK(names[0].type == GEN_DNS);
  CHECK(names[0].value == "example.com");

  X509_EXTENSION* ext = acme_identifier(cert.get());
  REQUIRE(ext != nullptr);
  // RFC 8737 §3: "The acmeIdentifier extension MUST be critical".
  CHECK(X509_EXTENSION_get_critical(ext) == 1);
  const ASN1_OCTET_STRING* data = X509_EXTENSION_get_data(ext);
  std::string value(reinterpret_cast<const char*>(ASN1_STRING_get0_data(data)),
                    size_t(ASN1_STRING_length(data)));
  // extnValue holds the DER of OCTET STRING (SIZE (32)): tag 04, length 0x20, digest.
  CHECK(value == std::string("\x04\x20", 2) + sha256(kKeyAuthz));

  // The key is a P-256 key matching the certificate, and the certificate is self-signed.
  auto key = read_key(out.key_pem);
  CHECK(EVP_PKEY_is_a(key.get(), "EC"));
  CHECK(EVP_PKEY_get_bits(key.get()) == 256);
  CHECK(X509_check_private_key(cert.get(), key.get()) == 1);
  CHECK(X509_verify(cert.get(), key.get()) == 1);
  CHECK(X509_NAME_cmp(X509_get_subject_name(cert.get()), X509_get_issuer_name(cert.get())) == 0);
  CHECK(out.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
  // A positive serial number.
  ossl::BignumPtr serial(ASN1_INTEGER_to_BN(X509_get0_serialNumber(cert.get()), nullptr));
  CHECK_FALSE(BN_is_negative(serial.get()));
  CHECK_FALSE(BN_is_zero(serial.get()));
}

TEST_CASE("tls_alpn01_certificate digest changes with the key authorization") {
  auto a = must_cert(Identifier::dns("example.com"), "token.one");
  auto b = must_cert(Identifier::dns("example.com"), "token.two");
  auto ca = read_cert(a.cert_pem);
  auto cb = read_cert(b.cert_pem);
  const ASN1_OCTET_STRING* da = X509_EXTENSION_get_data(acme_identifier(ca.get()));
  const ASN1_OCTET_STRING* db = X509_EXTENSION_get_data(acme_identifier(cb.get()));
  CHECK(ASN1_OCTET_STRING_cmp(da, db) != 0);
  // Each certificate has a fresh key.
  CHECK(a.key_pem != b.key_pem);
}

TEST_CASE("tls_alpn01_certificate validity is clock-free and fits a nanosecond system_clock") {
  auto cert = read_cert(must_cert(Identifier::dns("example.com"), kKeyAuthz).cert_pem);
  auto seconds_of = [](const ASN1_TIME* t) {
    struct tm tm {};
    REQUIRE(ASN1_TIME_to_tm(t, &tm) == 1);
    return int64_t(timegm(&tm));
  };
  int64_t not_before = seconds_of(X509_get0_notBefore(cert.get()));
  int64_t not_after = seconds_of(X509_get0_notAfter(cert.get()));
  // Valid for any plausible wall or test clock: from 2000-01-01 to well past 2100.
  CHECK(not_before == 946684800);
  CHECK(not_after > 4102444800);
  // Converting notAfter to std::chrono::system_clock (nanoseconds) must not overflow.
  CHECK(not_after < std::numeric_limits<int64_t>::max() / 1000000000);
}

TEST_CASE("tls_alpn01_certificate for IP addresses uses an iPAddress SAN") {
  struct Case {
    const char* ip;
    std::string octets;
  };
  for (const Case& c : {Case{"192.0.2.10", std::string("\xc0\x00\x02\x0a", 4)},
                        Case{"2001:db8::2",
                             std::string("\x20\x01\x0d\xb8\0\0\0\0\0\0\0\0\0\0\0\x02", 16)}}) {
    CAPTURE(c.ip);
    auto out = must_cert(Identifier::ip(c.ip), kKeyAuthz);
    auto cert = read_cert(out.cert_pem);
    bool critical = true;
    auto names = san_names(cert.get(), &critical);
    REQUIRE(names.size() == 1);
    CHECK(names[0].type == GEN_IPADD);
    CHECK(names[0].value == c.octets);
    X509_EXTENSION* ext = acme_identifier(cert.get());
    REQUIRE(ext != nullptr);
    CHECK(X509_EXTENSION_get_critical(ext) == 1);
  }
}

TEST_CASE("tls_alpn01_certificate refuses unusable identifiers") {
  for (const Identifier& id : {Identifier::ip("999.1.1.1"), Identifier::ip("example.com"),
                               Identifier{"email", "a@example.com"}, Identifier::dns(""),
                               Identifier::dns("*.example.com"), Identifier::dns("a b.example"),
                               Identifier::dns("caf\xc3\xa9.example")}) {
    CAPTURE(id.value);
    auto r = autotls::acme::tls_alpn01_certificate(id, kKeyAuthz);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == Errc::invalid_input);
  }
}

TEST_CASE("tls_alpn01_sni is the name or the reverse DNS name of an IP") {
  using autotls::acme::tls_alpn01_sni;
  CHECK(tls_alpn01_sni(Identifier::dns("example.com")) == "example.com");
  // RFC 1034 §5.2 style.
  CHECK(tls_alpn01_sni(Identifier::ip("192.0.2.1")) == "1.2.0.192.in-addr.arpa");
  CHECK(tls_alpn01_sni(Identifier::ip("10.0.0.255")) == "255.0.0.10.in-addr.arpa");
  // RFC 3596 §2.5's example address 4321:0:1:2:3:4:567:89ab.
  CHECK(tls_alpn01_sni(Identifier::ip("4321:0:1:2:3:4:567:89ab")) ==
        "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.0.0.0.0.1.2.3.4.ip6.arpa");
  CHECK(tls_alpn01_sni(Identifier::ip("::1")) ==
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa");
  CHECK(autotls::acme::kAcmeTlsAlpnProtocol == "acme-tls/1");
}

TEST_CASE("tls_alpn01_sni refuses bad identifiers") {
  using autotls::acme::tls_alpn01_sni;
  for (const Identifier& id :
       {Identifier::ip("1.2.3"), Identifier::ip("fe80::1%eth0"), Identifier{"email", "x"},
        Identifier::dns("")}) {
    CAPTURE(id.value);
    auto r = tls_alpn01_sni(id);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == Errc::invalid_input);
  }
}

}  // TEST_SUITE
