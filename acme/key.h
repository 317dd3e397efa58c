#pragma once

#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "acme/util/error.h"

// Forward declaration as OpenSSL spells it, so this header does not include OpenSSL.
typedef struct evp_pkey_st EVP_PKEY;

namespace autotls::acme {

enum class KeyType { ec256, ec384, rsa2048, rsa3072, rsa4096 };

// parse_key_type accepts "ec256", "ec384", "rsa2048", "rsa3072", "rsa4096" (also "p256",
// "p384", "ecdsa" = ec256, "rsa" = rsa2048).
std::optional<KeyType> parse_key_type(std::string_view name);
std::string_view to_string(KeyType type);

// jwk_thumbprint is base64url(SHA-256(canonical JSON of the required members)) of a public JWK
// (RFC 7638 §3): "crv", "kty", "x", "y" for EC; "e", "kty", "n" for RSA; "crv", "kty", "x" for
// OKP; "k", "kty" for oct. Other members (alg, kid, use) are ignored. Returns an empty string
// when kty is missing or unknown or a required member is missing or not a string.
std::string jwk_thumbprint(const nlohmann::json& jwk);

// PrivateKey is an owned EC (P-256/P-384) or RSA private key. Copies share the key.
class PrivateKey {
 public:
  // generate makes a fresh key of the given type.
  static Result<PrivateKey> generate(KeyType type);
  // from_pem reads PKCS#8, SEC1 EC or PKCS#1 RSA PEM. An encrypted key, another algorithm or
  // curve, or an RSA key under 2048 bits is refused with Errc::invalid_input.
  static Result<PrivateKey> from_pem(std::string_view pem);
  // adopt takes a reference on an existing EVP_PKEY (the caller keeps its own).
  static Result<PrivateKey> adopt(EVP_PKEY* pkey);

  // to_pem writes unencrypted PKCS#8 PEM.
  Result<std::string> to_pem() const;
  KeyType type() const { return type_; }
  // jws_alg is "ES256", "ES384" or "RS256" (RFC 7518 §3.1).
  std::string_view jws_alg() const;
  // jwk returns the public JWK with only its required members (RFC 7638 §3.2).
  nlohmann::json jwk() const;
  // thumbprint is base64url(SHA-256(canonical JWK)) (RFC 7638 §3).
  std::string thumbprint() const;
  // sign returns the raw JWS signature of data: r||s of fixed width for EC (RFC 7518 §3.4),
  // PKCS#1 v1.5 with SHA-256 for RSA.
  Result<std::string> sign(std::string_view data) const;
  // public_der returns the SubjectPublicKeyInfo DER.
  std::string public_der() const;

  EVP_PKEY* evp() const { return pkey_.get(); }

 private:
  PrivateKey(std::shared_ptr<EVP_PKEY> pkey, KeyType type) : pkey_(std::move(pkey)), type_(type) {}
  std::shared_ptr<EVP_PKEY> pkey_;
  KeyType type_;
};

}  // namespace autotls::acme
