#pragma once

#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "acme/key.h"
#include "acme/util/error.h"

namespace autotls::acme {

// Signer holds an account key and signs with it. Code that parses server replies gets a
// Signer, never the key itself.
class Signer {
 public:
  virtual ~Signer() = default;
  virtual std::string_view alg() const = 0;
  virtual nlohmann::json jwk() const = 0;
  virtual std::string thumbprint() const = 0;
  virtual Result<std::string> sign(std::string_view signing_input) const = 0;
};

// KeySigner signs with a PrivateKey.
class KeySigner final : public Signer {
 public:
  explicit KeySigner(PrivateKey key) : key_(std::move(key)) {}
  std::string_view alg() const override { return key_.jws_alg(); }
  nlohmann::json jwk() const override { return key_.jwk(); }
  std::string thumbprint() const override { return key_.thumbprint(); }
  Result<std::string> sign(std::string_view input) const override { return key_.sign(input); }
  const PrivateKey& key() const { return key_; }

 private:
  PrivateKey key_;
};

// JwsHeader holds the protected header fields ACME uses (RFC 8555 §6.2).
struct JwsHeader {
  std::string url;
  std::string nonce;  // empty: no "nonce" member (only for keyChange's inner JWS)
  std::string kid;    // empty: send "jwk" instead (newAccount, revocation by certificate key)
};

// sign_jws returns the flattened JSON serialization (RFC 7515 §7.2.2) as a JSON object.
// payload is the exact payload text; an empty string makes a POST-as-GET (RFC 8555 §6.3).
Result<nlohmann::json> sign_jws(const Signer& signer, const JwsHeader& header,
                                std::string_view payload);

// eab_jws builds the externalAccountBinding object of newAccount (RFC 8555 §7.3.4): a JWS
// whose protected header is {alg, kid, url}, whose payload is the account's public JWK, and
// which is MACed with the CA-issued key. hmac_key_b64url is the key as CAs hand it out
// (base64url, padding optional). alg is "HS256" (default), "HS384" or "HS512".
Result<nlohmann::json> eab_jws(std::string_view kid, std::string_view hmac_key_b64url,
                               const nlohmann::json& account_jwk, std::string_view url,
                               std::string_view alg = "HS256");

}  // namespace autotls::acme
