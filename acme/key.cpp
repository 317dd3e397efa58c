#include "acme/key.h"

#include <array>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/objects.h>
#include <openssl/pem.h>

#include "acme/util/base64.h"
#include "acme/util/der.h"
#include "acme/util/ec_key.h"
#include "acme/util/openssl.h"

namespace autotls::acme {
namespace {

// RFC 7518 §7.6.1 / §3.4: JWK coordinates and JWS r||s halves have the curve's field size.
constexpr size_t kP256Bytes = 32;
constexpr size_t kP384Bytes = 48;

// No passphrase is ever asked for: a library must not read the terminal, and an encrypted key
// is refused before OpenSSL would need one. Returning 0 makes any decrypt attempt fail.
int no_passphrase(char*, int, int, void*) { return 0; }

std::shared_ptr<EVP_PKEY> share(EVP_PKEY* pkey) {
  return std::shared_ptr<EVP_PKEY>(pkey, EVP_PKEY_free);
}

// bn_param returns a BIGNUM parameter of pkey, or null if it is absent.
ossl::BignumPtr bn_param(const EVP_PKEY* pkey, const char* name) {
  BIGNUM* bn = nullptr;
  if (EVP_PKEY_get_bn_param(pkey, name, &bn) != 1) {
    ossl::drain_errors();
    return nullptr;
  }
  return ossl::BignumPtr(bn);
}

// bn_bytes writes bn big-endian: minimal when width is 0 (RFC 7518 §6.3.1: "the minimum
// number of octets"), otherwise left-padded to width (RFC 7518 §6.2.1.2: "the full
// coordinate size").
std::optional<std::string> bn_bytes(const BIGNUM* bn, size_t width) {
  if (width == 0) {
    std::string out(size_t(BN_num_bytes(bn)), '\0');
    BN_bn2bin(bn, reinterpret_cast<unsigned char*>(out.data()));
    return out;
  }
  std::string out(width, '\0');
  if (BN_bn2binpad(bn, reinterpret_cast<unsigned char*>(out.data()), int(width)) < 0) {
    return std::nullopt;
  }
  return out;
}

size_t ec_size(KeyType type) { return type == KeyType::ec384 ? kP384Bytes : kP256Bytes; }
bool is_ec(KeyType type) { return type == KeyType::ec256 || type == KeyType::ec384; }

// make_jwk builds the public JWK with only the required members (RFC 7638 §3.2).
std::optional<nlohmann::json> make_jwk(const EVP_PKEY* pkey, KeyType type) {
  if (is_ec(type)) {
    auto x = bn_param(pkey, OSSL_PKEY_PARAM_EC_PUB_X);
    auto y = bn_param(pkey, OSSL_PKEY_PARAM_EC_PUB_Y);
    if (!x || !y) return std::nullopt;
    auto xb = bn_bytes(x.get(), ec_size(type));
    auto yb = bn_bytes(y.get(), ec_size(type));
    if (!xb || !yb) return std::nullopt;
    return nlohmann::json{{"kty", "EC"},
                          {"crv", type == KeyType::ec384 ? "P-384" : "P-256"},
                          {"x", base64url_encode(*xb)},
                          {"y", base64url_encode(*yb)}};
  }
  auto n = bn_param(pkey, OSSL_PKEY_PARAM_RSA_N);
  auto e = bn_param(pkey, OSSL_PKEY_PARAM_RSA_E);
  if (!n || !e) return std::nullopt;
  return nlohmann::json{{"kty", "RSA"},
                        {"n", base64url_encode(*bn_bytes(n.get(), 0))},
                        {"e", base64url_encode(*bn_bytes(e.get(), 0))}};
}

// classify checks that pkey is a private key this library can use and returns its type.
Result<KeyType> classify(const EVP_PKEY* pkey) {
  KeyType type;
  if (EVP_PKEY_is_a(pkey, "EC")) {
    char group[64] = {};
    size_t len = 0;
    if (EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group,
                                       &len) != 1) {
      ossl::drain_errors();
      return fail(Errc::invalid_input, "EC key without a named curve is not supported");
    }
    int nid = OBJ_txt2nid(group);
    if (nid == NID_undef) nid = EC_curve_nist2nid(group);
    // RFC 7518 §3.1 defines ES256/ES384/ES512; ACME CAs accept P-256 and P-384 only.
    if (nid == NID_X9_62_prime256v1) {
      type = KeyType::ec256;
    } else if (nid == NID_secp384r1) {
      type = KeyType::ec384;
    } else {
      return fail(Errc::invalid_input,
                  "EC curve " + std::string(group) + " is not supported (use P-256 or P-384)");
    }
    if (!bn_param(pkey, OSSL_PKEY_PARAM_PRIV_KEY)) {
      return fail(Errc::invalid_input, "EC key has no private part");
    }
  } else if (EVP_PKEY_is_a(pkey, "RSA")) {
    int bits = EVP_PKEY_get_bits(pkey);
    // RFC 7518 §3.3: "A key of size 2048 bits or larger MUST be used with these algorithms."
    if (bits < 2048) {
      return fail(Errc::invalid_input,
                  "RSA key of " + std::to_string(bits) + " bits is too small (minimum 2048)");
    }
    // KeyType only names the usual sizes; an odd size maps to the largest one not above it.
    type = bits >= 4096 ? KeyType::rsa4096 : bits >= 3072 ? KeyType::rsa3072 : KeyType::rsa2048;
    if (!bn_param(pkey, OSSL_PKEY_PARAM_RSA_D)) {
      return fail(Errc::invalid_input, "RSA key has no private part");
    }
  } else {
    const char* name = EVP_PKEY_get0_type_name(pkey);
    return fail(Errc::invalid_input, "key algorithm " + std::string(name ? name : "unknown") +
                                         " is not supported (use EC P-256/P-384 or RSA)");
  }
  if (!make_jwk(pkey, type)) {
    return fail(Errc::invalid_input, "cannot read the public key parameters");
  }
  return type;
}

char lower(char c) { return char(std::tolower(static_cast<unsigned char>(c))); }

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (lower(a[i]) != lower(b[i])) return false;
  }
  return true;
}

}  // namespace

std::optional<KeyType> parse_key_type(std::string_view name) {
  struct Entry {
    std::string_view name;
    KeyType type;
  };
  static constexpr std::array<Entry, 9> kNames = {{
      {"ec256", KeyType::ec256},
      {"p256", KeyType::ec256},
      {"ecdsa", KeyType::ec256},
      {"ec384", KeyType::ec384},
      {"p384", KeyType::ec384},
      {"rsa2048", KeyType::rsa2048},
      {"rsa", KeyType::rsa2048},
      {"rsa3072", KeyType::rsa3072},
      {"rsa4096", KeyType::rsa4096},
  }};
  for (const auto& e : kNames) {
    if (iequals(name, e.name)) return e.type;
  }
  return std::nullopt;
}

std::string_view to_string(KeyType type) {
  switch (type) {
    case KeyType::ec256: return "ec256";
    case KeyType::ec384: return "ec384";
    case KeyType::rsa2048: return "rsa2048";
    case KeyType::rsa3072: return "rsa3072";
    case KeyType::rsa4096: return "rsa4096";
  }
  return "unknown";
}

std::string jwk_thumbprint(const nlohmann::json& jwk) {
  if (!jwk.is_object()) return {};
  auto kty = jwk.find("kty");
  if (kty == jwk.end() || !kty->is_string()) return {};
  // RFC 7638 §3.2: "The required members for an elliptic curve public key are: crv, kty, x, y
  // [...] for an RSA public key are: e, kty, n [...] for a symmetric key are: k, kty". OKP from
  // RFC 8037 §2: crv, kty, x.
  std::vector<const char*> members;
  const std::string& k = kty->get_ref<const std::string&>();
  if (k == "EC") {
    members = {"crv", "kty", "x", "y"};
  } else if (k == "RSA") {
    members = {"e", "kty", "n"};
  } else if (k == "OKP") {
    members = {"crv", "kty", "x"};
  } else if (k == "oct") {
    members = {"k", "kty"};
  } else {
    return {};
  }
  nlohmann::json canonical = nlohmann::json::object();
  for (const char* m : members) {
    auto it = jwk.find(m);
    if (it == jwk.end() || !it->is_string()) return {};
    canonical[m] = *it;
  }
  // RFC 7638 §3.3: members in lexicographic order, no whitespace, UTF-8. nlohmann's object
  // is a std::map (sorted) and dump() without indent emits no whitespace. The members are
  // base64url or fixed names, so no escaping differences can arise; a non-UTF-8 value would
  // make dump() throw, which replace avoids (such a JWK is invalid anyway).
  std::string text = canonical.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int md_len = 0;
  if (EVP_Digest(text.data(), text.size(), md, &md_len, EVP_sha256(), nullptr) != 1) {
    ossl::drain_errors();
    return {};
  }
  return base64url_encode(std::string_view(reinterpret_cast<const char*>(md), md_len));
}

Result<PrivateKey> PrivateKey::generate(KeyType type) {
  ossl::EvpPkeyCtxPtr ctx(
      EVP_PKEY_CTX_new_from_name(nullptr, is_ec(type) ? "EC" : "RSA", nullptr));
  if (!ctx || EVP_PKEY_keygen_init(ctx.get()) != 1) return fail(ossl::error("generate key"));
  int ok = 1;
  switch (type) {
    case KeyType::ec256: ok = EVP_PKEY_CTX_set_group_name(ctx.get(), "P-256"); break;
    case KeyType::ec384: ok = EVP_PKEY_CTX_set_group_name(ctx.get(), "P-384"); break;
    case KeyType::rsa2048: ok = EVP_PKEY_CTX_set_rsa_keygen_bits(ctx.get(), 2048); break;
    case KeyType::rsa3072: ok = EVP_PKEY_CTX_set_rsa_keygen_bits(ctx.get(), 3072); break;
    case KeyType::rsa4096: ok = EVP_PKEY_CTX_set_rsa_keygen_bits(ctx.get(), 4096); break;
  }
  if (ok <= 0) return fail(ossl::error("generate key"));
  EVP_PKEY* raw = nullptr;
  if (EVP_PKEY_generate(ctx.get(), &raw) != 1) return fail(ossl::error("generate key"));
  return PrivateKey(share(raw), type);
}

Result<PrivateKey> PrivateKey::from_pem(std::string_view pem) {
  // Refuse encrypted keys by their PEM markers so the message is clear (OpenSSL would only
  // report a failed decryption): PKCS#8 "ENCRYPTED PRIVATE KEY" (RFC 7468 §11) and the legacy
  // RFC 1421 "Proc-Type: 4,ENCRYPTED" header of SEC1/PKCS#1 PEM.
  if (pem.find("-----BEGIN ENCRYPTED PRIVATE KEY-----") != std::string_view::npos ||
      pem.find("Proc-Type: 4,ENCRYPTED") != std::string_view::npos) {
    return fail(Errc::invalid_input,
                "private key: encrypted keys are not supported; decrypt it first "
                "(openssl pkey -in key.pem -out plain.pem)");
  }
  if (pem.size() > size_t(std::numeric_limits<int>::max())) {
    return fail(Errc::invalid_input, "private key: PEM text too large");
  }
  // An EC key in the first key block is read without OpenSSL's decoders (acme/util/ec_key.h);
  // anything else (RSA, a block the fast path declines) through PEM_read_bio_PrivateKey.
  if (auto blocks = der::fast_pem_blocks(pem)) {
    for (const auto& b : *blocks) {
      if (b.name != "PRIVATE KEY" && b.name != "EC PRIVATE KEY" && b.name != "RSA PRIVATE KEY") continue;
      if (auto key = ossl::ec_key_from_der(b.name, b.der)) {
        auto type = classify(key.get());
        if (type) return PrivateKey(share(key.release()), *type);
      }
      break;  // the first key block decides, as for PEM_read_bio_PrivateKey
    }
  }
  ossl::BioPtr bio(BIO_new_mem_buf(pem.data(), int(pem.size())));
  if (!bio) return fail(ossl::error("private key"));
  // PEM_read_bio_PrivateKey reads "PRIVATE KEY" (PKCS#8), "EC PRIVATE KEY" (SEC1) and
  // "RSA PRIVATE KEY" (PKCS#1), skipping unrelated blocks before the first key.
  EVP_PKEY* raw = PEM_read_bio_PrivateKey(bio.get(), nullptr, no_passphrase, nullptr);
  if (!raw) {
    std::string reason = ossl::drain_errors();
    return fail(Errc::invalid_input,
                "private key: no usable PEM private key found" +
                    (reason.empty() ? std::string() : " (" + reason + ")"));
  }
  auto pkey = share(raw);
  auto type = classify(raw);
  if (!type) return fail(type.error().with_context("private key"));
  return PrivateKey(std::move(pkey), *type);
}

Result<PrivateKey> PrivateKey::adopt(EVP_PKEY* pkey) {
  if (!pkey) return fail(Errc::invalid_input, "adopt key: null key");
  auto type = classify(pkey);
  if (!type) return fail(type.error().with_context("adopt key"));
  if (EVP_PKEY_up_ref(pkey) != 1) return fail(ossl::error("adopt key"));
  return PrivateKey(share(pkey), *type);
}

Result<std::string> PrivateKey::to_pem() const {
  // EC keys are written without OpenSSL's encoders (acme/util/ec_key.h), the same bytes.
  if (std::string der = ossl::ec_key_to_pkcs8(pkey_.get()); !der.empty()) {
    std::string b64 = base64_encode(der);
    OPENSSL_cleanse(der.data(), der.size());
    std::string pem;
    pem.reserve(b64.size() + b64.size() / 64 + 64);  // no reallocation leaves a copy behind
    pem = "-----BEGIN PRIVATE KEY-----\n";
    for (std::size_t i = 0; i < b64.size(); i += 64) {
      pem.append(b64, i, 64);
      pem += '\n';
    }
    OPENSSL_cleanse(b64.data(), b64.size());
    pem += "-----END PRIVATE KEY-----\n";
    return pem;
  }
  ossl::BioPtr bio(BIO_new(BIO_s_mem()));
  // OpenSSL 3 writes PKCS#8 ("BEGIN PRIVATE KEY") here; no cipher means no encryption.
  if (!bio || PEM_write_bio_PrivateKey(bio.get(), pkey_.get(), nullptr, nullptr, 0, nullptr,
                                       nullptr) != 1) {
    return fail(ossl::error("write private key"));
  }
  char* data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, size_t(len));
}

std::string_view PrivateKey::jws_alg() const {
  // RFC 7518 §3.1.
  switch (type_) {
    case KeyType::ec256: return "ES256";
    case KeyType::ec384: return "ES384";
    case KeyType::rsa2048:
    case KeyType::rsa3072:
    case KeyType::rsa4096: return "RS256";
  }
  return "RS256";
}

nlohmann::json PrivateKey::jwk() const {
  auto jwk = make_jwk(pkey_.get(), type_);
  if (!jwk) {
    // classify() read these parameters when the key was accepted, so this cannot happen short
    // of memory exhaustion; a wrong JWK would silently break every request, so stop here.
    std::fprintf(stderr, "autotls: cannot read the public parameters of an accepted key\n");
    std::abort();
  }
  return *std::move(jwk);
}

std::string PrivateKey::thumbprint() const { return jwk_thumbprint(jwk()); }

Result<std::string> PrivateKey::sign(std::string_view data) const {
  // RFC 7518 §3.4: ES256 uses SHA-256, ES384 SHA-384; §3.3: RS256 is RSASSA-PKCS1-v1_5 with
  // SHA-256 (OpenSSL's default RSA padding for signing).
  const EVP_MD* md = type_ == KeyType::ec384 ? EVP_sha384() : EVP_sha256();
  ossl::EvpMdCtxPtr ctx(EVP_MD_CTX_new());
  if (!ctx || EVP_DigestSignInit(ctx.get(), nullptr, md, nullptr, pkey_.get()) != 1) {
    return fail(ossl::error("sign"));
  }
  const auto* in = reinterpret_cast<const unsigned char*>(data.data());
  size_t sig_len = 0;
  if (EVP_DigestSign(ctx.get(), nullptr, &sig_len, in, data.size()) != 1) {
    return fail(ossl::error("sign"));
  }
  std::string sig(sig_len, '\0');
  if (EVP_DigestSign(ctx.get(), reinterpret_cast<unsigned char*>(sig.data()), &sig_len, in,
                     data.size()) != 1) {
    return fail(ossl::error("sign"));
  }
  sig.resize(sig_len);
  if (!is_ec(type_)) return sig;

  // RFC 7518 §3.4: "the JWS Signature value [is] the concatenation of the two integers R and
  // S [...] as an octet sequence" of fixed size, not the DER SEQUENCE OpenSSL produces.
  const auto* p = reinterpret_cast<const unsigned char*>(sig.data());
  ossl::EcdsaSigPtr ecdsa(d2i_ECDSA_SIG(nullptr, &p, long(sig.size())));
  if (!ecdsa) return fail(ossl::error("sign: decode ECDSA signature"));
  const BIGNUM* r = nullptr;
  const BIGNUM* s = nullptr;
  ECDSA_SIG_get0(ecdsa.get(), &r, &s);
  auto rb = bn_bytes(r, ec_size(type_));
  auto sb = bn_bytes(s, ec_size(type_));
  if (!rb || !sb) return fail(Errc::crypto, "sign: ECDSA signature wider than the curve");
  return *rb + *sb;
}

std::string PrivateKey::public_der() const {
  unsigned char* der = nullptr;
  int len = i2d_PUBKEY(pkey_.get(), &der);
  if (len <= 0) {
    ossl::drain_errors();
    return {};
  }
  std::string out(reinterpret_cast<const char*>(der), size_t(len));
  OPENSSL_free(der);
  return out;
}

}  // namespace autotls::acme
