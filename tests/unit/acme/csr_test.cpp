#include "acme/csr.h"

#include <map>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "tests/support/test_keys.h"
#include <openssl/objects.h>

#include "acme/util/openssl.h"

namespace {

using autotls::Errc;
using autotls::acme::Identifier;
using autotls::acme::KeyType;
using autotls::acme::PrivateKey;
namespace ossl = autotls::ossl;

using autotls::testing::cached_key;

ossl::X509ReqPtr parse(const std::string& der) {
  const auto* p = reinterpret_cast<const unsigned char*>(der.data());
  ossl::X509ReqPtr req(d2i_X509_REQ(nullptr, &p, long(der.size())));
  REQUIRE(req);
  // The whole buffer is one request.
  CHECK(p == reinterpret_cast<const unsigned char*>(der.data()) + der.size());
  return req;
}

bool signature_ok(X509_REQ* req) {
  EVP_PKEY* pub = X509_REQ_get0_pubkey(req);
  REQUIRE(pub);
  int rc = X509_REQ_verify(req, pub);
  ossl::drain_errors();
  return rc == 1;
}

struct San {
  std::string type;   // "dns" or "ip"
  std::string value;  // the name, or the raw address octets
  bool operator==(const San&) const = default;
};

struct SanExtension {
  std::vector<San> names;
  bool critical = false;
  bool present = false;
};

SanExtension read_san(X509_REQ* req) {
  SanExtension out;
  STACK_OF(X509_EXTENSION)* exts = X509_REQ_get_extensions(req);
  if (!exts) return out;
  for (int i = 0; i < sk_X509_EXTENSION_num(exts); ++i) {
    X509_EXTENSION* ext = sk_X509_EXTENSION_value(exts, i);
    if (OBJ_obj2nid(X509_EXTENSION_get_object(ext)) != NID_subject_alt_name) continue;
    out.present = true;
    out.critical = X509_EXTENSION_get_critical(ext) == 1;
    ossl::GeneralNamesPtr names(static_cast<GENERAL_NAMES*>(X509V3_EXT_d2i(ext)));
    REQUIRE(names);
    for (int j = 0; j < sk_GENERAL_NAME_num(names.get()); ++j) {
      const GENERAL_NAME* gn = sk_GENERAL_NAME_value(names.get(), j);
      int type = 0;
      const auto* value = static_cast<const ASN1_STRING*>(GENERAL_NAME_get0_value(gn, &type));
      std::string text(reinterpret_cast<const char*>(ASN1_STRING_get0_data(value)),
                       size_t(ASN1_STRING_length(value)));
      if (type == GEN_DNS) {
        out.names.push_back({"dns", text});
      } else if (type == GEN_IPADD) {
        out.names.push_back({"ip", text});
      } else {
        out.names.push_back({"other", text});
      }
    }
  }
  sk_X509_EXTENSION_pop_free(exts, X509_EXTENSION_free);
  return out;
}

// common_names lists the subject's CN values.
std::vector<std::string> common_names(X509_REQ* req) {
  std::vector<std::string> out;
  X509_NAME* name = X509_REQ_get_subject_name(req);
  for (int i = X509_NAME_get_index_by_NID(name, NID_commonName, -1); i >= 0;
       i = X509_NAME_get_index_by_NID(name, NID_commonName, i)) {
    ASN1_STRING* s = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, i));
    out.emplace_back(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                     size_t(ASN1_STRING_length(s)));
  }
  return out;
}

std::string must_csr(const PrivateKey& key, const std::vector<Identifier>& ids) {
  auto der = autotls::acme::make_csr(key, ids);
  REQUIRE_MESSAGE(der.has_value(), (der ? "" : der.error().message));
  return *der;
}

}  // namespace

TEST_SUITE("acme.csr") {

TEST_CASE("make_csr puts every identifier in the SAN and the first DNS name in the CN") {
  const PrivateKey& key = cached_key(KeyType::ec256);
  std::vector<Identifier> ids = {Identifier::dns("example.com"), Identifier::dns("www.example.com"),
                                 Identifier::ip("192.0.2.1"), Identifier::ip("2001:db8::1"),
                                 Identifier::dns("*.example.org")};
  auto req = parse(must_csr(key, ids));
  CHECK(signature_ok(req.get()));
  CHECK(X509_REQ_get_version(req.get()) == 0);
  CHECK(EVP_PKEY_eq(X509_REQ_get0_pubkey(req.get()), key.evp()) == 1);
  CHECK(common_names(req.get()) == std::vector<std::string>{"example.com"});
  CHECK(X509_NAME_entry_count(X509_REQ_get_subject_name(req.get())) == 1);

  auto san = read_san(req.get());
  REQUIRE(san.present);
  CHECK_FALSE(san.critical);
  std::vector<San> expected = {
      {"dns", "example.com"},
      {"dns", "www.example.com"},
      {"ip", std::string("\xc0\x00\x02\x01", 4)},
      {"ip", std::string("\x20\x01\x0d\xb8\0\0\0\0\0\0\0\0\0\0\0\x01", 16)},
      {"dns", "*.example.org"},
  };
  CHECK(san.names == expected);
}

TEST_CASE("make_csr signs with an algorithm matching the key") {
  struct Case {
    KeyType type;
    int sig_nid;
  };
  for (const Case& c : {Case{KeyType::ec256, NID_ecdsa_with_SHA256},
                        Case{KeyType::ec384, NID_ecdsa_with_SHA384},
                        Case{KeyType::rsa2048, NID_sha256WithRSAEncryption}}) {
    CAPTURE(autotls::acme::to_string(c.type));
    const PrivateKey& key = cached_key(c.type);
    auto req = parse(must_csr(key, {Identifier::dns("example.com")}));
    CHECK(signature_ok(req.get()));
    CHECK(X509_REQ_get_signature_nid(req.get()) == c.sig_nid);
    CHECK(EVP_PKEY_eq(X509_REQ_get0_pubkey(req.get()), key.evp()) == 1);
  }
}

TEST_CASE("make_csr signature check fails on a tampered request") {
  std::string der = must_csr(cached_key(KeyType::ec256), {Identifier::dns("example.com")});
  // Change one letter of the name inside the signed part.
  auto pos = der.find("example.com");
  REQUIRE(pos != std::string::npos);
  der[pos] = 'E';
  auto req = parse(der);
  CHECK_FALSE(signature_ok(req.get()));
}

TEST_CASE("make_csr picks the first DNS name as CN even after an IP") {
  auto req = parse(must_csr(cached_key(KeyType::ec256),
                            {Identifier::ip("198.51.100.7"), Identifier::dns("b.example"),
                             Identifier::dns("a.example")}));
  CHECK(common_names(req.get()) == std::vector<std::string>{"b.example"});
  CHECK(read_san(req.get()).names.size() == 3);
}

TEST_CASE("make_csr leaves the CN out when the first DNS name exceeds 64 octets") {
  std::string label63(63, 'a');
  std::string long_name = label63 + ".example.com";  // 75 octets
  std::string name64 = std::string(52, 'b') + ".example.com";  // exactly 64
  REQUIRE(name64.size() == 64);
  SUBCASE("too long") {
    auto req = parse(must_csr(cached_key(KeyType::ec256),
                              {Identifier::dns(long_name), Identifier::dns("short.example")}));
    CHECK(common_names(req.get()).empty());
    CHECK(X509_NAME_entry_count(X509_REQ_get_subject_name(req.get())) == 0);
    auto san = read_san(req.get());
    // RFC 5280 §4.2.1.6: with an empty subject the SAN is critical.
    CHECK(san.critical);
    CHECK(san.names == std::vector<San>{{"dns", long_name}, {"dns", "short.example"}});
    CHECK(signature_ok(req.get()));
  }
  SUBCASE("exactly 64") {
    auto req = parse(must_csr(cached_key(KeyType::ec256), {Identifier::dns(name64)}));
    CHECK(common_names(req.get()) == std::vector<std::string>{name64});
  }
}

TEST_CASE("make_csr with only IP identifiers has an empty subject") {
  auto req = parse(must_csr(cached_key(KeyType::rsa2048),
                            {Identifier::ip("203.0.113.9"), Identifier::ip("::1")}));
  CHECK(X509_NAME_entry_count(X509_REQ_get_subject_name(req.get())) == 0);
  auto san = read_san(req.get());
  CHECK(san.critical);
  REQUIRE(san.names.size() == 2);
  CHECK(san.names[0] == San{"ip", std::string("\xcb\x00\x71\x09", 4)});
  CHECK(san.names[1].value.size() == 16);
  CHECK(signature_ok(req.get()));
}

TEST_CASE("make_csr refuses unusable input") {
  const PrivateKey& key = cached_key(KeyType::ec256);
  auto expect_invalid = [&](const std::vector<Identifier>& ids) {
    auto r = autotls::acme::make_csr(key, ids);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == Errc::invalid_input);
  };
  expect_invalid({});
  expect_invalid({Identifier::ip("300.1.2.3")});
  expect_invalid({Identifier::ip("example.com")});
  expect_invalid({Identifier::ip("")});
  expect_invalid({Identifier::dns("example.com"), Identifier::ip("1.2.3")});
  expect_invalid({Identifier{"email", "a@example.com"}});
  expect_invalid({Identifier::dns("")});
  expect_invalid({Identifier::dns("bad name.example")});
  expect_invalid({Identifier::dns("caf\xc3\xa9.example")});
}

}  // TEST_SUITE
