#include "acme/key.h"
#include "tests/support/test_keys.h"

#include <cstring>
#include <map>
#include <set>
#include <string>

#include <doctest/doctest.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>

#include "acme/util/base64.h"
#include "acme/util/ec_key.h"
#include "acme/util/openssl.h"

namespace {

using autotls::Errc;
using autotls::acme::KeyType;
using autotls::acme::PrivateKey;
namespace ossl = autotls::ossl;

std::string sha256_b64url(std::string_view data) {
  unsigned char md[32];
  unsigned int len = 0;
  REQUIRE(EVP_Digest(data.data(), data.size(), md, &len, EVP_sha256(), nullptr) == 1);
  // Standard base64 by OpenSSL, mapped to base64url by hand, so the expected value does not
  // come from the code under test.
  unsigned char b64[64];
  int n = EVP_EncodeBlock(b64, md, int(len));
  std::string out(reinterpret_cast<char*>(b64), size_t(n));
  while (!out.empty() && out.back() == '=') out.pop_back();
  for (char& c : out) {
    if (c == '+') c = '-';
    if (c == '/') c = '_';
  }
  return out;
}

std::string der_pubkey(EVP_PKEY* pkey) {
  unsigned char* der = nullptr;
  int len = i2d_PUBKEY(pkey, &der);
  REQUIRE(len > 0);
  std::string out(reinterpret_cast<char*>(der), size_t(len));
  OPENSSL_free(der);
  return out;
}

// public_key_from_jwk rebuilds a public key from the JWK members with OpenSSL, independently of
// PrivateKey::jwk's own encoding.
ossl::EvpPkeyPtr public_key_from_jwk(const nlohmann::json& jwk) {
  std::unique_ptr<OSSL_PARAM_BLD, ossl::Free<OSSL_PARAM_BLD_free>> bld(OSSL_PARAM_BLD_new());
  REQUIRE(bld);
  ossl::BignumPtr n, e;
  std::string point;
  const char* type = nullptr;
  if (jwk.at("kty") == "EC") {
    type = "EC";
    auto x = autotls::base64url_decode(jwk.at("x").get<std::string>());
    auto y = autotls::base64url_decode(jwk.at("y").get<std::string>());
    REQUIRE(x);
    REQUIRE(y);
    point = "\x04" + *x + *y;
    const char* group = jwk.at("crv") == "P-384" ? "P-384" : "P-256";
    REQUIRE(OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME, group, 0));
    REQUIRE(OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY, point.data(),
                                             point.size()));
  } else {
    type = "RSA";
    auto nb = autotls::base64url_decode(jwk.at("n").get<std::string>());
    auto eb = autotls::base64url_decode(jwk.at("e").get<std::string>());
    REQUIRE(nb);
    REQUIRE(eb);
    const auto* np = reinterpret_cast<const unsigned char*>(nb->data());
    const auto* ep = reinterpret_cast<const unsigned char*>(eb->data());
    n.reset(BN_bin2bn(np, int(nb->size()), nullptr));
    e.reset(BN_bin2bn(ep, int(eb->size()), nullptr));
    REQUIRE(OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_N, n.get()));
    REQUIRE(OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_E, e.get()));
  }
  std::unique_ptr<OSSL_PARAM, ossl::Free<OSSL_PARAM_free>> params(
      OSSL_PARAM_BLD_to_param(bld.get()));
  ossl::EvpPkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_name(nullptr, type, nullptr));
  REQUIRE(ctx);
  REQUIRE(EVP_PKEY_fromdata_init(ctx.get()) == 1);
  EVP_PKEY* pkey = nullptr;
  REQUIRE(EVP_PKEY_fromdata(ctx.get(), &pkey, EVP_PKEY_PUBLIC_KEY, params.get()) == 1);
  return ossl::EvpPkeyPtr(pkey);
}

// raw_ecdsa_to_der turns a JWS r||s signature back into the DER form OpenSSL verifies.
std::string raw_ecdsa_to_der(std::string_view rs) {
  REQUIRE(rs.size() % 2 == 0);
  size_t half = rs.size() / 2;
  const auto* p = reinterpret_cast<const unsigned char*>(rs.data());
  BIGNUM* r = BN_bin2bn(p, int(half), nullptr);
  BIGNUM* s = BN_bin2bn(p + half, int(half), nullptr);
  ossl::EcdsaSigPtr sig(ECDSA_SIG_new());
  REQUIRE(ECDSA_SIG_set0(sig.get(), r, s) == 1);
  unsigned char* der = nullptr;
  int len = i2d_ECDSA_SIG(sig.get(), &der);
  REQUIRE(len > 0);
  std::string out(reinterpret_cast<char*>(der), size_t(len));
  OPENSSL_free(der);
  return out;
}

bool verify(EVP_PKEY* pkey, const EVP_MD* md, std::string_view data, std::string_view sig) {
  ossl::EvpMdCtxPtr ctx(EVP_MD_CTX_new());
  REQUIRE(EVP_DigestVerifyInit(ctx.get(), nullptr, md, nullptr, pkey) == 1);
  int rc = EVP_DigestVerify(ctx.get(), reinterpret_cast<const unsigned char*>(sig.data()),
                            sig.size(), reinterpret_cast<const unsigned char*>(data.data()),
                            data.size());
  ossl::drain_errors();
  return rc == 1;
}

std::string write_pem(EVP_PKEY* pkey, int (*writer)(BIO*, const EVP_PKEY*, const EVP_CIPHER*,
                                                    const unsigned char*, int, pem_password_cb*,
                                                    void*),
                      const EVP_CIPHER* cipher = nullptr, const char* pass = nullptr) {
  ossl::BioPtr bio(BIO_new(BIO_s_mem()));
  REQUIRE(writer(bio.get(), pkey, cipher,
                 reinterpret_cast<const unsigned char*>(pass), pass ? int(strlen(pass)) : 0,
                 nullptr, nullptr) == 1);
  char* data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, size_t(len));
}

std::string write_pkcs8_encrypted(EVP_PKEY* pkey) {
  ossl::BioPtr bio(BIO_new(BIO_s_mem()));
  char pass[] = "secret";
  REQUIRE(PEM_write_bio_PKCS8PrivateKey(bio.get(), pkey, EVP_aes_256_cbc(), pass, 6, nullptr,
                                        nullptr) == 1);
  char* data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, size_t(len));
}

ossl::EvpPkeyPtr keygen(const char* type, const char* group, int bits = 0) {
  ossl::EvpPkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_name(nullptr, type, nullptr));
  REQUIRE(ctx);
  REQUIRE(EVP_PKEY_keygen_init(ctx.get()) == 1);
  if (group) REQUIRE(EVP_PKEY_CTX_set_group_name(ctx.get(), group) == 1);
  if (bits) REQUIRE(EVP_PKEY_CTX_set_rsa_keygen_bits(ctx.get(), bits) == 1);
  EVP_PKEY* pkey = nullptr;
  REQUIRE(EVP_PKEY_generate(ctx.get(), &pkey) == 1);
  return ossl::EvpPkeyPtr(pkey);
}

// wrap64 splits base64 text into PEM's 64-character lines, each ending in a newline.
std::string wrap64(const std::string& b64) {
  std::string out;
  for (size_t i = 0; i < b64.size(); i += 64) out += b64.substr(i, 64) + "\n";
  return out;
}

// unwrap_pem returns the base64 text of a one-block PEM, without its lines' newlines.
std::string unwrap_pem(const std::string& pem) {
  std::string out;
  size_t begin = pem.find('\n') + 1, end = pem.find("-----END");
  for (size_t i = begin; i < end; ++i) {
    if (pem[i] != '\n') out += pem[i];
  }
  return out;
}

PrivateKey must_generate(KeyType type) {
  auto key = PrivateKey::generate(type);
  REQUIRE_MESSAGE(key.has_value(), (key ? "" : key.error().message));
  return *key;
}

// A key of each type, generated once: RSA generation is slow.
using autotls::testing::cached_key;
using autotls::testing::signs_for;

// RFC 7638 §3.1 example JWK, including the optional members the thumbprint must ignore.
constexpr const char* kRfc7638N =
    "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_"
    "BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_"
    "FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-"
    "bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";

}  // namespace

TEST_SUITE("acme.key") {

TEST_CASE("parse_key_type accepts the documented names and aliases") {
  using autotls::acme::parse_key_type;
  CHECK(parse_key_type("ec256") == KeyType::ec256);
  CHECK(parse_key_type("p256") == KeyType::ec256);
  CHECK(parse_key_type("ecdsa") == KeyType::ec256);
  CHECK(parse_key_type("ec384") == KeyType::ec384);
  CHECK(parse_key_type("p384") == KeyType::ec384);
  CHECK(parse_key_type("rsa") == KeyType::rsa2048);
  CHECK(parse_key_type("rsa2048") == KeyType::rsa2048);
  CHECK(parse_key_type("rsa3072") == KeyType::rsa3072);
  CHECK(parse_key_type("rsa4096") == KeyType::rsa4096);
  CHECK(parse_key_type("EC256") == KeyType::ec256);
  CHECK_FALSE(parse_key_type("").has_value());
  CHECK_FALSE(parse_key_type("ec521").has_value());
  CHECK_FALSE(parse_key_type("rsa1024").has_value());
  CHECK_FALSE(parse_key_type("ec256 ").has_value());
  CHECK_FALSE(parse_key_type("ed25519").has_value());
}

TEST_CASE("to_string round-trips through parse_key_type") {
  for (KeyType t : {KeyType::ec256, KeyType::ec384, KeyType::rsa2048, KeyType::rsa3072,
                    KeyType::rsa4096}) {
    CHECK(autotls::acme::parse_key_type(autotls::acme::to_string(t)) == t);
  }
  CHECK(autotls::acme::to_string(KeyType::ec384) == "ec384");
}

TEST_CASE("generate makes keys of the requested algorithm and size") {
  struct Case {
    KeyType type;
    const char* algorithm;
    int bits;
    std::string_view alg;
  };
  const Case cases[] = {
      {KeyType::ec256, "EC", 256, "ES256"},     {KeyType::ec384, "EC", 384, "ES384"},
      {KeyType::rsa2048, "RSA", 2048, "RS256"}, {KeyType::rsa3072, "RSA", 3072, "RS256"},
      {KeyType::rsa4096, "RSA", 4096, "RS256"},
  };
  for (const auto& c : cases) {
    CAPTURE(autotls::acme::to_string(c.type));
    const PrivateKey& key = cached_key(c.type);
    CHECK(key.type() == c.type);
    CHECK(EVP_PKEY_is_a(key.evp(), c.algorithm));
    CHECK(EVP_PKEY_get_bits(key.evp()) == c.bits);
    CHECK(key.jws_alg() == c.alg);
  }
}

TEST_CASE("generate makes a different key each time") {
  auto a = must_generate(KeyType::ec256);
  auto b = must_generate(KeyType::ec256);
  CHECK(a.public_der() != b.public_der());
  CHECK(a.thumbprint() != b.thumbprint());
}

TEST_CASE("EC jwk has exactly the required members and describes the public key") {
  for (KeyType t : {KeyType::ec256, KeyType::ec384}) {
    CAPTURE(autotls::acme::to_string(t));
    const PrivateKey& key = cached_key(t);
    nlohmann::json jwk = key.jwk();
    REQUIRE(jwk.is_object());
    std::set<std::string> members;
    for (auto& [k, v] : jwk.items()) members.insert(k);
    CHECK(members == std::set<std::string>{"crv", "kty", "x", "y"});
    CHECK(jwk["kty"] == "EC");
    CHECK(jwk["crv"] == (t == KeyType::ec256 ? "P-256" : "P-384"));
    size_t width = t == KeyType::ec256 ? 32 : 48;
    CHECK(autotls::base64url_decode(jwk["x"].get<std::string>())->size() == width);
    CHECK(autotls::base64url_decode(jwk["y"].get<std::string>())->size() == width);
    // Rebuilding the key from the JWK gives the same SubjectPublicKeyInfo.
    auto rebuilt = public_key_from_jwk(jwk);
    CHECK(der_pubkey(rebuilt.get()) == key.public_der());
  }
}

TEST_CASE("EC jwk pads coordinates with leading zero octets to the field size") {
  // RFC 7518 §6.2.1.2: "The length of this octet string MUST be the full size of a coordinate
  // for the curve". About 1 key in 256 has an x (or y) below 2^248; find one of each.
  bool short_x = false;
  bool short_y = false;
  for (int i = 0; i < 20000 && !(short_x && short_y); ++i) {
    auto key = must_generate(KeyType::ec256);
    BIGNUM* x = nullptr;
    BIGNUM* y = nullptr;
    REQUIRE(EVP_PKEY_get_bn_param(key.evp(), OSSL_PKEY_PARAM_EC_PUB_X, &x) == 1);
    REQUIRE(EVP_PKEY_get_bn_param(key.evp(), OSSL_PKEY_PARAM_EC_PUB_Y, &y) == 1);
    ossl::BignumPtr xp(x), yp(y);
    bool x_is_short = BN_num_bytes(x) < 32;
    bool y_is_short = BN_num_bytes(y) < 32;
    if ((!x_is_short || short_x) && (!y_is_short || short_y)) continue;
    short_x = short_x || x_is_short;
    short_y = short_y || y_is_short;
    auto jwk = key.jwk();
    auto xb = autotls::base64url_decode(jwk["x"].get<std::string>());
    auto yb = autotls::base64url_decode(jwk["y"].get<std::string>());
    REQUIRE(xb);
    REQUIRE(yb);
    CHECK(xb->size() == 32);
    CHECK(yb->size() == 32);
    if (x_is_short) CHECK((*xb)[0] == '\0');
    if (y_is_short) CHECK((*yb)[0] == '\0');
    CHECK(der_pubkey(public_key_from_jwk(jwk).get()) == key.public_der());
  }
  CHECK(short_x);
  CHECK(short_y);
}

TEST_CASE("RSA jwk has exactly the required members with minimal encodings") {
  const PrivateKey& key = cached_key(KeyType::rsa2048);
  nlohmann::json jwk = key.jwk();
  std::set<std::string> members;
  for (auto& [k, v] : jwk.items()) members.insert(k);
  CHECK(members == std::set<std::string>{"e", "kty", "n"});
  CHECK(jwk["kty"] == "RSA");
  // RFC 7518 §6.3.1.2: 65537 is "AQAB", with no leading zero octets.
  CHECK(jwk["e"] == "AQAB");
  auto n = autotls::base64url_decode(jwk["n"].get<std::string>());
  REQUIRE(n);
  CHECK(n->size() == 256);
  CHECK((*n)[0] != '\0');
  CHECK(der_pubkey(public_key_from_jwk(jwk).get()) == key.public_der());
}

TEST_CASE("jwk_thumbprint reproduces the RFC 7638 section 3.1 example") {
  nlohmann::json jwk = {
      {"kty", "RSA"}, {"n", kRfc7638N}, {"e", "AQAB"}, {"alg", "RS256"}, {"kid", "2011-04-29"}};
  CHECK(autotls::acme::jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
  // Only the required members count (RFC 7638 §3.2).
  jwk.erase("alg");
  jwk.erase("kid");
  CHECK(autotls::acme::jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
  // Independent check of the canonical form quoted in RFC 7638 §3.1.
  CHECK(sha256_b64url(std::string(R"({"e":"AQAB","kty":"RSA","n":")") + kRfc7638N + "\"}") ==
        "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
}

TEST_CASE("jwk_thumbprint returns empty for unusable JWKs") {
  using autotls::acme::jwk_thumbprint;
  CHECK(jwk_thumbprint(nlohmann::json::array()).empty());
  CHECK(jwk_thumbprint({{"n", kRfc7638N}, {"e", "AQAB"}}).empty());
  CHECK(jwk_thumbprint({{"kty", "RSA"}, {"n", kRfc7638N}}).empty());
  CHECK(jwk_thumbprint({{"kty", "RSA"}, {"n", kRfc7638N}, {"e", 65537}}).empty());
  CHECK(jwk_thumbprint({{"kty", "XYZ"}, {"k", "AA"}}).empty());
  CHECK_FALSE(jwk_thumbprint({{"kty", "oct"}, {"k", "AA"}}).empty());
}

TEST_CASE("thumbprint hashes the canonical JSON of the key") {
  for (KeyType t : {KeyType::ec256, KeyType::ec384, KeyType::rsa2048}) {
    CAPTURE(autotls::acme::to_string(t));
    const PrivateKey& key = cached_key(t);
    auto jwk = key.jwk();
    std::string canonical;
    if (t == KeyType::rsa2048) {
      canonical = R"({"e":")" + jwk["e"].get<std::string>() + R"(","kty":"RSA","n":")" +
                  jwk["n"].get<std::string>() + "\"}";
    } else {
      canonical = R"({"crv":")" + jwk["crv"].get<std::string>() + R"(","kty":"EC","x":")" +
                  jwk["x"].get<std::string>() + R"(","y":")" + jwk["y"].get<std::string>() +
                  "\"}";
    }
    CHECK(key.thumbprint() == sha256_b64url(canonical));
    CHECK(key.thumbprint().size() == 43);
  }
}

TEST_CASE("EC sign returns fixed width r and s that OpenSSL verifies") {
  for (KeyType t : {KeyType::ec256, KeyType::ec384}) {
    CAPTURE(autotls::acme::to_string(t));
    const PrivateKey& key = cached_key(t);
    const EVP_MD* md = t == KeyType::ec256 ? EVP_sha256() : EVP_sha384();
    // Many signatures, so some have r or s with leading zero octets.
    for (int i = 0; i < 64; ++i) {
      std::string data = "eyJhbGciOiJFUzI1NiJ9.payload-" + std::to_string(i);
      auto sig = key.sign(data);
      REQUIRE(sig.has_value());
      CHECK(sig->size() == (t == KeyType::ec256 ? 64u : 96u));
      std::string der = raw_ecdsa_to_der(*sig);
      CHECK(verify(key.evp(), md, data, der));
      CHECK_FALSE(verify(key.evp(), md, data + "x", der));
    }
  }
}

TEST_CASE("RSA sign is PKCS1 v1.5 with SHA-256") {
  const PrivateKey& key = cached_key(KeyType::rsa2048);
  auto sig = key.sign("header.payload");
  REQUIRE(sig.has_value());
  CHECK(sig->size() == 256);
  CHECK(verify(key.evp(), EVP_sha256(), "header.payload", *sig));
  CHECK_FALSE(verify(key.evp(), EVP_sha256(), "header.payloaD", *sig));
  CHECK_FALSE(verify(key.evp(), EVP_sha384(), "header.payload", *sig));
  // PKCS#1 v1.5 is deterministic, unlike PSS.
  CHECK(key.sign("header.payload").value() == *sig);
}

TEST_CASE("sign of empty input works") {
  const PrivateKey& key = cached_key(KeyType::ec256);
  auto sig = key.sign("");
  REQUIRE(sig.has_value());
  CHECK(verify(key.evp(), EVP_sha256(), "", raw_ecdsa_to_der(*sig)));
}

TEST_CASE("to_pem writes unencrypted PKCS8 that from_pem reads back") {
  for (KeyType t : {KeyType::ec256, KeyType::ec384, KeyType::rsa2048}) {
    CAPTURE(autotls::acme::to_string(t));
    const PrivateKey& key = cached_key(t);
    auto pem = key.to_pem();
    REQUIRE(pem.has_value());
    CHECK(pem->starts_with("-----BEGIN PRIVATE KEY-----\n"));
    CHECK(pem->find("ENCRYPTED") == std::string::npos);
    auto back = PrivateKey::from_pem(*pem);
    REQUIRE(back.has_value());
    CHECK(back->type() == t);
    CHECK(back->public_der() == key.public_der());
    CHECK(back->thumbprint() == key.thumbprint());
    CHECK(EVP_PKEY_eq(back->evp(), key.evp()) == 1);
  }
}

TEST_CASE("EC keys are written byte for byte as OpenSSL writes them and read back the same") {
  // to_pem and from_pem take EC keys apart without OpenSSL's encoders and decoders
  // (acme/util/ec_key.h); the PEM must be exactly OpenSSL's, for P-256, P-384 and P-521, over
  // many keys (a scalar with leading zero octets must keep its full width).
  for (const char* curve : {"P-256", "P-384", "P-521"}) {
    CAPTURE(curve);
    for (int i = 0; i < 40; ++i) {
      auto pkey = keygen("EC", curve);
      std::string openssl = write_pem(pkey.get(), PEM_write_bio_PrivateKey);
      std::string der = autotls::ossl::ec_key_to_pkcs8(pkey.get());
      REQUIRE_FALSE(der.empty());
      CHECK(openssl == "-----BEGIN PRIVATE KEY-----\n" + wrap64(autotls::base64_encode(der)) +
                           "-----END PRIVATE KEY-----\n");
      // Read back through the fast path: the same key, public and private halves.
      auto block = autotls::base64_decode(unwrap_pem(openssl));
      REQUIRE(block.has_value());
      auto back = autotls::ossl::ec_key_from_der("PRIVATE KEY", *block);
      REQUIRE(back);
      CHECK(EVP_PKEY_eq(back.get(), pkey.get()) == 1);
      CHECK(autotls::ossl::ec_key_to_pkcs8(back.get()) == der);
    }
  }
  // PrivateKey uses them: its PEM is OpenSSL's, and SEC1 input gives the same key.
  const PrivateKey& key = cached_key(KeyType::ec256);
  CHECK(*key.to_pem() == write_pem(key.evp(), PEM_write_bio_PrivateKey));
  auto sec1 = PrivateKey::from_pem(write_pem(key.evp(), PEM_write_bio_PrivateKey_traditional));
  REQUIRE(sec1.has_value());
  CHECK(EVP_PKEY_eq(sec1->evp(), key.evp()) == 1);
  // Not EC: nothing (the callers then use OpenSSL).
  CHECK(autotls::ossl::ec_key_to_pkcs8(cached_key(KeyType::rsa2048).evp()).empty());
  CHECK_FALSE(autotls::ossl::ec_key_from_der("RSA PRIVATE KEY", "\x30\x00"));
}

namespace {

// public_only returns a new, public-only copy of key (as a certificate's key object is).
ossl::EvpPkeyPtr public_only(EVP_PKEY* key) {
  unsigned char* der = nullptr;
  int len = i2d_PUBKEY(key, &der);
  REQUIRE(len > 0);
  const unsigned char* p = der;
  ossl::EvpPkeyPtr pub(d2i_PUBKEY(nullptr, &p, len));
  OPENSSL_free(der);
  REQUIRE(pub);
  return pub;
}

}  // namespace

TEST_CASE("ec_key_add_private turns the matching public key object into the key pair, and no other") {
  // tlsreload gives a certificate's own public-key object the private half of its key, so that
  // SSL_use_cert_and_key compares one object with itself. It must add only the key whose curve
  // and point are that object's, and leave the object as it was otherwise.
  for (const char* curve : {"P-256", "P-384"}) {
    CAPTURE(curve);
    auto key = keygen("EC", curve);
    std::string pkcs8 = ossl::ec_key_to_pkcs8(key.get());
    REQUIRE_FALSE(pkcs8.empty());
    auto sec1 = autotls::base64_decode(unwrap_pem(write_pem(key.get(), PEM_write_bio_PrivateKey_traditional)));
    REQUIRE(sec1.has_value());
    for (auto [name, der] : {std::pair<const char*, std::string>{"PRIVATE KEY", pkcs8}, {"EC PRIVATE KEY", *sec1}}) {
      CAPTURE(name);
      auto pub = public_only(key.get());
      REQUIRE_FALSE(signs_for(pub.get(), key.get()));
      REQUIRE(ossl::ec_key_add_private(pub.get(), name, der));
      CHECK(signs_for(pub.get(), key.get()));
      CHECK(EVP_PKEY_eq(pub.get(), key.get()) == 1);
    }
    // Another key on the same curve, a key on another curve, or not a key: refused, and the
    // object is unchanged (still the same public key, still unable to sign).
    auto pub = public_only(key.get());
    auto other = keygen("EC", curve);
    auto other_curve = keygen("EC", std::string_view(curve) == "P-256" ? "P-384" : "P-256");
    CHECK_FALSE(ossl::ec_key_add_private(pub.get(), "PRIVATE KEY", ossl::ec_key_to_pkcs8(other.get())));
    CHECK_FALSE(ossl::ec_key_add_private(pub.get(), "PRIVATE KEY", ossl::ec_key_to_pkcs8(other_curve.get())));
    CHECK_FALSE(ossl::ec_key_add_private(pub.get(), "PRIVATE KEY", std::string("\x30\x00", 2)));
    CHECK_FALSE(ossl::ec_key_add_private(pub.get(), "RSA PRIVATE KEY", pkcs8));
    CHECK(EVP_PKEY_eq(pub.get(), key.get()) == 1);
    CHECK_FALSE(signs_for(pub.get(), key.get()));
  }
  // An RSA public key is never touched.
  const PrivateKey& rsa = cached_key(KeyType::rsa2048);
  auto rsa_pub = public_only(rsa.evp());
  CHECK_FALSE(ossl::ec_key_add_private(rsa_pub.get(), "PRIVATE KEY",
                                       ossl::ec_key_to_pkcs8(keygen("EC", "P-256").get())));
  CHECK_FALSE(ossl::ec_key_add_private(nullptr, "PRIVATE KEY", ""));
}

TEST_CASE("from_pem reads SEC1 EC and PKCS1 RSA keys") {
  for (KeyType t : {KeyType::ec256, KeyType::ec384, KeyType::rsa2048}) {
    CAPTURE(autotls::acme::to_string(t));
    const PrivateKey& key = cached_key(t);
    std::string pem = write_pem(key.evp(), PEM_write_bio_PrivateKey_traditional);
    CHECK(pem.starts_with(t == KeyType::rsa2048 ? "-----BEGIN RSA PRIVATE KEY-----"
                                                : "-----BEGIN EC PRIVATE KEY-----"));
    auto back = PrivateKey::from_pem(pem);
    REQUIRE_MESSAGE(back.has_value(), (back ? "" : back.error().message));
    CHECK(back->type() == t);
    CHECK(back->public_der() == key.public_der());
  }
}

TEST_CASE("from_pem maps RSA 3072 and 4096 to their types") {
  for (KeyType t : {KeyType::rsa3072, KeyType::rsa4096}) {
    auto pem = cached_key(t).to_pem();
    REQUIRE(pem.has_value());
    auto back = PrivateKey::from_pem(*pem);
    REQUIRE(back.has_value());
    CHECK(back->type() == t);
  }
}

TEST_CASE("from_pem skips text and other PEM blocks before the key") {
  const PrivateKey& key = cached_key(KeyType::ec256);
  std::string pem = "# my account key\n" + *key.to_pem();
  auto back = PrivateKey::from_pem(pem);
  REQUIRE(back.has_value());
  CHECK(back->public_der() == key.public_der());
}

TEST_CASE("from_pem refuses encrypted keys without asking for a passphrase") {
  const PrivateKey& key = cached_key(KeyType::ec256);
  SUBCASE("PKCS8 ENCRYPTED PRIVATE KEY") {
    std::string pem = write_pkcs8_encrypted(key.evp());
    REQUIRE(pem.find("ENCRYPTED PRIVATE KEY") != std::string::npos);
    auto r = PrivateKey::from_pem(pem);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == Errc::invalid_input);
    CHECK(r.error().message.find("encrypted") != std::string::npos);
  }
  SUBCASE("legacy Proc-Type 4 ENCRYPTED") {
    std::string pem = write_pem(key.evp(), PEM_write_bio_PrivateKey_traditional,
                                EVP_aes_128_cbc(), "secret");
    REQUIRE(pem.find("Proc-Type: 4,ENCRYPTED") != std::string::npos);
    auto r = PrivateKey::from_pem(pem);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == Errc::invalid_input);
    CHECK(r.error().message.find("encrypted") != std::string::npos);
  }
  SUBCASE("encrypted body under a plain label") {
    // Bypasses the marker check: OpenSSL must fail, not prompt on the terminal.
    std::string pem = write_pkcs8_encrypted(key.evp());
    for (auto pos = pem.find("ENCRYPTED "); pos != std::string::npos;
         pos = pem.find("ENCRYPTED ")) {
      pem.erase(pos, 10);
    }
    auto r = PrivateKey::from_pem(pem);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == Errc::invalid_input);
  }
}

TEST_CASE("from_pem refuses other curves and algorithms") {
  SUBCASE("P-521") {
    auto pkey = keygen("EC", "P-521");
    auto r = PrivateKey::from_pem(write_pem(pkey.get(), PEM_write_bio_PrivateKey));
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == Errc::invalid_input);
    CHECK(r.error().message.find("curve") != std::string::npos);
  }
  SUBCASE("secp256k1") {
    auto pkey = keygen("EC", "secp256k1");
    auto r = PrivateKey::from_pem(write_pem(pkey.get(), PEM_write_bio_PrivateKey));
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == Errc::invalid_input);
  }
  SUBCASE("Ed25519") {
    auto pkey = keygen("ED25519", nullptr);
    auto r = PrivateKey::from_pem(write_pem(pkey.get(), PEM_write_bio_PrivateKey));
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == Errc::invalid_input);
  }
  SUBCASE("RSA 1024") {
    auto pkey = keygen("RSA", nullptr, 1024);
    auto r = PrivateKey::from_pem(write_pem(pkey.get(), PEM_write_bio_PrivateKey));
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == Errc::invalid_input);
    CHECK(r.error().message.find("2048") != std::string::npos);
  }
}

TEST_CASE("from_pem refuses text without a private key") {
  for (const char* text :
       {"", "hello", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n"}) {
    CAPTURE(text);
    auto r = PrivateKey::from_pem(text);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == Errc::invalid_input);
  }
  // A public key is not a private key.
  std::string spki_pem;
  {
    ossl::BioPtr bio(BIO_new(BIO_s_mem()));
    REQUIRE(PEM_write_bio_PUBKEY(bio.get(), cached_key(KeyType::ec256).evp()) == 1);
    char* data = nullptr;
    long len = BIO_get_mem_data(bio.get(), &data);
    spki_pem.assign(data, size_t(len));
  }
  auto r = PrivateKey::from_pem(spki_pem);
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == Errc::invalid_input);
}

TEST_CASE("adopt takes its own reference") {
  auto pkey = keygen("EC", "P-384");
  std::string der = der_pubkey(pkey.get());
  auto key = PrivateKey::adopt(pkey.get());
  REQUIRE(key.has_value());
  CHECK(key->evp() == pkey.get());
  pkey.reset();  // the caller drops its reference; the key must stay usable
  CHECK(key->type() == KeyType::ec384);
  CHECK(key->public_der() == der);
  CHECK(key->sign("data").has_value());
}

TEST_CASE("adopt refuses null public-only and unsupported keys") {
  auto r = PrivateKey::adopt(nullptr);
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == Errc::invalid_input);

  auto pub = public_key_from_jwk(cached_key(KeyType::ec256).jwk());
  r = PrivateKey::adopt(pub.get());
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == Errc::invalid_input);

  auto rsa_pub = public_key_from_jwk(cached_key(KeyType::rsa2048).jwk());
  r = PrivateKey::adopt(rsa_pub.get());
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == Errc::invalid_input);

  auto p521 = keygen("EC", "P-521");
  r = PrivateKey::adopt(p521.get());
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == Errc::invalid_input);
}

TEST_CASE("copies of a PrivateKey share the key") {
  PrivateKey a = must_generate(KeyType::ec256);
  PrivateKey b = a;
  CHECK(a.evp() == b.evp());
  CHECK(a.thumbprint() == b.thumbprint());
}

TEST_CASE("public_der is the SubjectPublicKeyInfo of the key") {
  for (KeyType t : {KeyType::ec256, KeyType::rsa2048}) {
    const PrivateKey& key = cached_key(t);
    std::string der = key.public_der();
    const auto* p = reinterpret_cast<const unsigned char*>(der.data());
    ossl::EvpPkeyPtr pub(d2i_PUBKEY(nullptr, &p, long(der.size())));
    REQUIRE(pub);
    CHECK(p == reinterpret_cast<const unsigned char*>(der.data()) + der.size());
    CHECK(EVP_PKEY_eq(pub.get(), key.evp()) == 1);
  }
}

}  // TEST_SUITE
