#include "acme/jws.h"

#include <map>
#include <set>
#include <string>

#include <doctest/doctest.h>

#include "tests/support/test_keys.h"
#include <openssl/core_names.h>
#include <openssl/ec.h>

#include "acme/util/base64.h"
#include "acme/util/openssl.h"

namespace {

using autotls::Errc;
using autotls::Result;
using autotls::acme::JwsHeader;
using autotls::acme::KeySigner;
using autotls::acme::KeyType;
using autotls::acme::PrivateKey;
using autotls::acme::Signer;
namespace ossl = autotls::ossl;

using autotls::testing::cached_key;

std::string b64d(const nlohmann::json& v) {
  REQUIRE(v.is_string());
  auto out = autotls::base64url_decode(v.get<std::string>());
  REQUIRE(out.has_value());
  return *out;
}

nlohmann::json decode_protected(const nlohmann::json& jws) {
  auto header = nlohmann::json::parse(b64d(jws.at("protected")), nullptr, false);
  REQUIRE_FALSE(header.is_discarded());
  return header;
}

std::set<std::string> member_names(const nlohmann::json& obj) {
  std::set<std::string> out;
  for (auto& [k, v] : obj.items()) out.insert(k);
  return out;
}

// verify_jws checks the signature of a flattened JWS with OpenSSL alone: r||s is turned back
// into DER for ECDSA (RFC 7518 §3.4), RS256 is checked as PKCS#1 v1.5 SHA-256.
bool verify_jws(const nlohmann::json& jws, const PrivateKey& key) {
  std::string input =
      jws.at("protected").get<std::string>() + "." + jws.at("payload").get<std::string>();
  std::string sig = b64d(jws.at("signature"));
  const EVP_MD* md = EVP_sha256();
  if (key.type() == KeyType::ec256 || key.type() == KeyType::ec384) {
    size_t half = key.type() == KeyType::ec256 ? 32 : 48;
    if (sig.size() != 2 * half) return false;
    if (key.type() == KeyType::ec384) md = EVP_sha384();
    const auto* p = reinterpret_cast<const unsigned char*>(sig.data());
    ossl::EcdsaSigPtr ecdsa(ECDSA_SIG_new());
    REQUIRE(ECDSA_SIG_set0(ecdsa.get(), BN_bin2bn(p, int(half), nullptr),
                           BN_bin2bn(p + half, int(half), nullptr)) == 1);
    unsigned char* der = nullptr;
    int len = i2d_ECDSA_SIG(ecdsa.get(), &der);
    REQUIRE(len > 0);
    sig.assign(reinterpret_cast<char*>(der), size_t(len));
    OPENSSL_free(der);
  }
  ossl::EvpMdCtxPtr ctx(EVP_MD_CTX_new());
  REQUIRE(EVP_DigestVerifyInit(ctx.get(), nullptr, md, nullptr, key.evp()) == 1);
  int rc = EVP_DigestVerify(ctx.get(), reinterpret_cast<const unsigned char*>(sig.data()),
                            sig.size(), reinterpret_cast<const unsigned char*>(input.data()),
                            input.size());
  ossl::drain_errors();
  return rc == 1;
}

// hmac computes the MAC through the EVP_MAC object API, a different path from the code under
// test.
std::string hmac(const char* digest, std::string_view key, std::string_view data) {
  std::unique_ptr<EVP_MAC, ossl::Free<EVP_MAC_free>> mac(EVP_MAC_fetch(nullptr, "HMAC", nullptr));
  REQUIRE(mac);
  std::unique_ptr<EVP_MAC_CTX, ossl::Free<EVP_MAC_CTX_free>> ctx(EVP_MAC_CTX_new(mac.get()));
  REQUIRE(ctx);
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, const_cast<char*>(digest), 0),
      OSSL_PARAM_construct_end()};
  REQUIRE(EVP_MAC_init(ctx.get(), reinterpret_cast<const unsigned char*>(key.data()),
                       key.size(), params) == 1);
  REQUIRE(EVP_MAC_update(ctx.get(), reinterpret_cast<const unsigned char*>(data.data()),
                         data.size()) == 1);
  unsigned char out[EVP_MAX_MD_SIZE];
  size_t len = 0;
  REQUIRE(EVP_MAC_final(ctx.get(), out, &len, sizeof out) == 1);
  return std::string(reinterpret_cast<char*>(out), len);
}

// RecordingSigner remembers what it was asked to sign and returns a fixed value or an error.
class RecordingSigner final : public Signer {
 public:
  explicit RecordingSigner(bool fail) : fail_(fail) {}
  std::string_view alg() const override { return "ES256"; }
  nlohmann::json jwk() const override {
    return {{"kty", "EC"}, {"crv", "P-256"}, {"x", "X"}, {"y", "Y"}};
  }
  std::string thumbprint() const override { return "thumb"; }
  Result<std::string> sign(std::string_view input) const override {
    last_input = std::string(input);
    if (fail_) return autotls::fail(Errc::crypto, "sign: no key");
    return std::string("\x01\x02\x03", 3);
  }
  mutable std::string last_input;

 private:
  bool fail_;
};

// A CA-issued EAB key as handed out: 48 random octets in base64url without padding.
constexpr const char* kEabKey = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";

}  // namespace

TEST_SUITE("acme.jws") {

TEST_CASE("sign_jws with kid has the RFC 8555 protected header and a valid signature") {
  for (KeyType t : {KeyType::ec256, KeyType::ec384, KeyType::rsa2048}) {
    CAPTURE(autotls::acme::to_string(t));
    KeySigner signer(cached_key(t));
    JwsHeader h{"https://ca.example/acme/new-order", "nonce-123", "https://ca.example/acct/1"};
    std::string payload = R"({"identifiers":[{"type":"dns","value":"example.com"}]})";
    auto jws = autotls::acme::sign_jws(signer, h, payload);
    REQUIRE(jws.has_value());
    CHECK(member_names(*jws) == std::set<std::string>{"payload", "protected", "signature"});
    auto header = decode_protected(*jws);
    CHECK(member_names(header) == std::set<std::string>{"alg", "kid", "nonce", "url"});
    CHECK(header["alg"] == std::string(signer.alg()));
    CHECK(header["nonce"] == "nonce-123");
    CHECK(header["url"] == "https://ca.example/acme/new-order");
    CHECK(header["kid"] == "https://ca.example/acct/1");
    CHECK(b64d((*jws)["payload"]) == payload);
    CHECK(verify_jws(*jws, cached_key(t)));
  }
}

TEST_CASE("sign_jws without kid embeds the public jwk") {
  KeySigner signer(cached_key(KeyType::ec256));
  JwsHeader h{"https://ca.example/acme/new-account", "n0nce", ""};
  auto jws = autotls::acme::sign_jws(signer, h, R"({"termsOfServiceAgreed":true})");
  REQUIRE(jws.has_value());
  auto header = decode_protected(*jws);
  CHECK(member_names(header) == std::set<std::string>{"alg", "jwk", "nonce", "url"});
  CHECK(header["jwk"] == signer.jwk());
  CHECK(verify_jws(*jws, cached_key(KeyType::ec256)));
}

TEST_CASE("sign_jws omits nonce when it is empty") {
  // RFC 8555 §7.3.5: the inner JWS of keyChange has no nonce.
  KeySigner signer(cached_key(KeyType::ec256));
  auto jws = autotls::acme::sign_jws(signer, {"https://ca.example/acme/key-change", "", ""}, "{}");
  REQUIRE(jws.has_value());
  auto header = decode_protected(*jws);
  CHECK_FALSE(header.contains("nonce"));
  CHECK(header.contains("jwk"));
  CHECK(verify_jws(*jws, cached_key(KeyType::ec256)));
}

TEST_CASE("sign_jws with an empty payload is a POST-as-GET") {
  // RFC 8555 §6.3: the payload field is the empty string.
  KeySigner signer(cached_key(KeyType::rsa2048));
  JwsHeader h{"https://ca.example/order/1", "n", "https://ca.example/acct/1"};
  auto jws = autotls::acme::sign_jws(signer, h, "");
  REQUIRE(jws.has_value());
  CHECK((*jws)["payload"] == "");
  CHECK(verify_jws(*jws, cached_key(KeyType::rsa2048)));
}

TEST_CASE("sign_jws signs exactly protected dot payload") {
  RecordingSigner signer(false);
  auto jws = autotls::acme::sign_jws(signer, {"https://ca.example/x", "n", "k"}, "hello");
  REQUIRE(jws.has_value());
  CHECK(signer.last_input ==
        (*jws)["protected"].get<std::string>() + "." + autotls::base64url_encode("hello"));
  CHECK((*jws)["payload"] == "aGVsbG8");
  CHECK((*jws)["signature"] == "AQID");
}

TEST_CASE("sign_jws detects tampering") {
  KeySigner signer(cached_key(KeyType::ec256));
  auto jws = autotls::acme::sign_jws(signer, {"https://ca.example/x", "n", "k"}, R"({"a":1})");
  REQUIRE(jws.has_value());
  REQUIRE(verify_jws(*jws, cached_key(KeyType::ec256)));
  auto tampered = *jws;
  tampered["payload"] = autotls::base64url_encode(R"({"a":2})");
  CHECK_FALSE(verify_jws(tampered, cached_key(KeyType::ec256)));
  // A different key does not verify it either.
  CHECK_FALSE(verify_jws(*jws, cached_key(KeyType::ec384)));
}

TEST_CASE("sign_jws reports signer failures and bad input") {
  RecordingSigner failing(true);
  auto r = autotls::acme::sign_jws(failing, {"https://ca.example/x", "n", "k"}, "{}");
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == Errc::crypto);
  CHECK(r.error().message.find("no key") != std::string::npos);

  KeySigner signer(cached_key(KeyType::ec256));
  r = autotls::acme::sign_jws(signer, {"", "n", "k"}, "{}");
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == Errc::invalid_input);

  // Not UTF-8: nlohmann would throw while serializing the header.
  r = autotls::acme::sign_jws(signer, {"https://ca.example/\xff", "n", "k"}, "{}");
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == Errc::invalid_input);
}

TEST_CASE("eab_jws follows RFC 8555 section 7.3.4 and its HMAC verifies") {
  const nlohmann::json account_jwk = cached_key(KeyType::ec256).jwk();
  const std::string url = "https://ca.example/acme/new-account";
  auto key = autotls::base64url_decode(kEabKey);
  REQUIRE(key.has_value());
  struct Case {
    const char* alg;
    const char* digest;
    size_t mac_len;
  };
  for (const Case& c : {Case{"HS256", "SHA256", 32}, Case{"HS384", "SHA384", 48},
                        Case{"HS512", "SHA512", 64}}) {
    CAPTURE(c.alg);
    auto eab = autotls::acme::eab_jws("kid-1", kEabKey, account_jwk, url, c.alg);
    REQUIRE_MESSAGE(eab.has_value(), (eab ? "" : eab.error().message));
    CHECK(member_names(*eab) == std::set<std::string>{"payload", "protected", "signature"});
    auto header = decode_protected(*eab);
    // "The "nonce" field MUST NOT be present".
    CHECK(member_names(header) == std::set<std::string>{"alg", "kid", "url"});
    CHECK(header["alg"] == c.alg);
    CHECK(header["kid"] == "kid-1");
    CHECK(header["url"] == url);
    auto payload = nlohmann::json::parse(b64d((*eab)["payload"]), nullptr, false);
    CHECK(payload == account_jwk);
    std::string input =
        (*eab)["protected"].get<std::string>() + "." + (*eab)["payload"].get<std::string>();
    std::string mac = b64d((*eab)["signature"]);
    CHECK(mac.size() == c.mac_len);
    CHECK(mac == hmac(c.digest, *key, input));
    CHECK(mac != hmac(c.digest, *key + "x", input));
  }
}

TEST_CASE("eab_jws defaults to HS256 and accepts a padded key") {
  const nlohmann::json jwk = cached_key(KeyType::ec256).jwk();
  auto a = autotls::acme::eab_jws("kid", "AAECAwQFBgcICQ", jwk, "https://ca.example/na");
  auto b = autotls::acme::eab_jws("kid", "AAECAwQFBgcICQ==", jwk, "https://ca.example/na");
  REQUIRE(a.has_value());
  REQUIRE(b.has_value());
  CHECK(decode_protected(*a)["alg"] == "HS256");
  CHECK(*a == *b);
  std::string key("\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09", 10);
  std::string input =
      (*a)["protected"].get<std::string>() + "." + (*a)["payload"].get<std::string>();
  CHECK(b64d((*a)["signature"]) == hmac("SHA256", key, input));
}

TEST_CASE("eab_jws refuses bad keys and algorithms") {
  const nlohmann::json jwk = cached_key(KeyType::ec256).jwk();
  const std::string url = "https://ca.example/na";
  for (const char* bad_key : {"not base64!", "a+b/", "A", ""}) {
    CAPTURE(bad_key);
    auto r = autotls::acme::eab_jws("kid", bad_key, jwk, url);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == Errc::invalid_input);
  }
  for (const char* bad_alg : {"HS1", "hs256", "RS256", "none", ""}) {
    CAPTURE(bad_alg);
    auto r = autotls::acme::eab_jws("kid", kEabKey, jwk, url, bad_alg);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == Errc::invalid_input);
  }
  CHECK(autotls::acme::eab_jws("", kEabKey, jwk, url).error().code == Errc::invalid_input);
  CHECK(autotls::acme::eab_jws("kid", kEabKey, jwk, "").error().code == Errc::invalid_input);
  CHECK(autotls::acme::eab_jws("kid", kEabKey, nlohmann::json(), url).error().code ==
        Errc::invalid_input);
}

TEST_CASE("eab_jws nests in a newAccount JWS") {
  // RFC 8555 §7.3.4: the EAB object is the externalAccountBinding member of the outer payload,
  // whose url it repeats.
  const PrivateKey& key = cached_key(KeyType::ec256);
  KeySigner signer(key);
  const std::string url = "https://ca.example/acme/new-account";
  auto eab = autotls::acme::eab_jws("kid-7", kEabKey, signer.jwk(), url);
  REQUIRE(eab.has_value());
  nlohmann::json payload = {{"termsOfServiceAgreed", true}, {"externalAccountBinding", *eab}};
  auto outer = autotls::acme::sign_jws(signer, {url, "nonce", ""}, payload.dump());
  REQUIRE(outer.has_value());
  CHECK(verify_jws(*outer, key));
  auto inner = nlohmann::json::parse(b64d((*outer)["payload"]))["externalAccountBinding"];
  CHECK(decode_protected(inner)["url"] == decode_protected(*outer)["url"]);
  CHECK(nlohmann::json::parse(b64d(inner["payload"])) == decode_protected(*outer)["jwk"]);
}

}  // TEST_SUITE
