#include "acme/jws.h"

#include <string>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "acme/util/base64.h"
#include "acme/util/openssl.h"

namespace autotls::acme {
namespace {

// dump serializes without throwing: nlohmann throws on strings that are not UTF-8 (RFC 7515
// §4: the header is UTF-8 JSON), which here can only come from the caller.
Result<std::string> dump(const nlohmann::json& j, std::string_view what) {
  try {
    return j.dump();
  } catch (const nlohmann::json::exception& e) {
    return fail(Errc::invalid_input, std::string(what) + ": " + e.what());
  }
}

// flattened returns the RFC 7515 §7.2.2 flattened JSON serialization.
nlohmann::json flattened(std::string protected_b64, std::string payload_b64,
                         std::string_view signature) {
  return nlohmann::json{{"protected", std::move(protected_b64)},
                        {"payload", std::move(payload_b64)},
                        {"signature", base64url_encode(signature)}};
}

}  // namespace

Result<nlohmann::json> sign_jws(const Signer& signer, const JwsHeader& header,
                                std::string_view payload) {
  // RFC 8555 §6.4: "The JWS Protected Header MUST include [...] url".
  if (header.url.empty()) return fail(Errc::invalid_input, "sign JWS: empty url");
  // RFC 8555 §6.2: the header MUST include "alg", "nonce" and "url", and exactly one of
  // "jwk" (newAccount, revokeCert by certificate key) or "kid" (everything else). The inner
  // JWS of keyChange (§7.3.5) has no nonce, hence an empty nonce omits the member.
  nlohmann::json protected_header = {{"alg", signer.alg()}, {"url", header.url}};
  if (!header.nonce.empty()) protected_header["nonce"] = header.nonce;
  if (!header.kid.empty()) {
    protected_header["kid"] = header.kid;
  } else {
    protected_header["jwk"] = signer.jwk();
  }
  auto header_text = dump(protected_header, "sign JWS: protected header");
  if (!header_text) return fail(header_text.error());

  std::string protected_b64 = base64url_encode(*header_text);
  // RFC 8555 §6.3: a POST-as-GET has "the payload field of the JWS object [set] to the empty
  // string ("")", which is what encoding an empty payload yields.
  std::string payload_b64 = base64url_encode(payload);
  // RFC 7515 §5.1: the signing input is ASCII(BASE64URL(header) || '.' || BASE64URL(payload)).
  auto signature = signer.sign(protected_b64 + "." + payload_b64);
  if (!signature) return fail(signature.error().with_context("sign JWS"));
  return flattened(std::move(protected_b64), std::move(payload_b64), *signature);
}

Result<nlohmann::json> eab_jws(std::string_view kid, std::string_view hmac_key_b64url,
                               const nlohmann::json& account_jwk, std::string_view url,
                               std::string_view alg) {
  // RFC 7518 §3.2: HS256/HS384/HS512 are HMAC with SHA-256/384/512.
  const char* digest = nullptr;
  if (alg == "HS256") {
    digest = "SHA256";
  } else if (alg == "HS384") {
    digest = "SHA384";
  } else if (alg == "HS512") {
    digest = "SHA512";
  } else {
    return fail(Errc::invalid_input,
                "external account binding: unsupported MAC algorithm \"" + std::string(alg) +
                    "\" (use HS256, HS384 or HS512)");
  }
  if (kid.empty()) return fail(Errc::invalid_input, "external account binding: empty key id");
  if (url.empty()) return fail(Errc::invalid_input, "external account binding: empty url");
  auto key = base64url_decode(hmac_key_b64url);
  if (!key || key->empty()) {
    return fail(Errc::invalid_input,
                "external account binding: the HMAC key is not valid base64url");
  }
  if (!account_jwk.is_object() || account_jwk.empty()) {
    return fail(Errc::invalid_input, "external account binding: account JWK is not an object");
  }

  // RFC 8555 §7.3.4: "The "alg" field MUST indicate a MAC-based algorithm", "The "kid" field
  // MUST contain the key identifier provided by the CA", "The "nonce" field MUST NOT be
  // present", "The "url" field MUST be set to the same value as the outer JWS".
  nlohmann::json protected_header = {
      {"alg", std::string(alg)}, {"kid", std::string(kid)}, {"url", std::string(url)}};
  auto header_text = dump(protected_header, "external account binding: protected header");
  if (!header_text) return fail(header_text.error());
  // RFC 8555 §7.3.4: "The "payload" field MUST contain the public key of the account [...]
  // JWK".
  auto payload_text = dump(account_jwk, "external account binding: account JWK");
  if (!payload_text) return fail(payload_text.error());

  std::string protected_b64 = base64url_encode(*header_text);
  std::string payload_b64 = base64url_encode(*payload_text);
  std::string input = protected_b64 + "." + payload_b64;

  unsigned char mac[EVP_MAX_MD_SIZE];
  size_t mac_len = 0;
  bool ok = EVP_Q_mac(nullptr, "HMAC", nullptr, digest, nullptr, key->data(), key->size(),
                      reinterpret_cast<const unsigned char*>(input.data()), input.size(), mac,
                      sizeof mac, &mac_len) != nullptr;
  // The decoded key is the CA-issued secret; do not leave it in freed heap memory.
  OPENSSL_cleanse(key->data(), key->size());
  if (!ok) return fail(ossl::error("external account binding: HMAC"));
  return flattened(std::move(protected_b64), std::move(payload_b64),
                   std::string_view(reinterpret_cast<const char*>(mac), mac_len));
}

}  // namespace autotls::acme
