#pragma once

#include <doctest/doctest.h>

#include <cstddef>
#include <map>
#include <mutex>

#include <openssl/err.h>
#include <openssl/evp.h>

#include "acme/key.h"
#include "acme/util/openssl.h"

namespace autotls::testing {

// cached_key returns one key per type for the whole test binary: RSA generation takes tens of
// milliseconds, and most tests only need a valid key, not a fresh one.
inline const acme::PrivateKey& cached_key(acme::KeyType type) {
  static std::mutex mu;
  static std::map<acme::KeyType, acme::PrivateKey> keys;
  std::lock_guard lock(mu);
  auto it = keys.find(type);
  if (it == keys.end()) {
    auto key = acme::PrivateKey::generate(type);
    REQUIRE(key.has_value());
    it = keys.emplace(type, *key).first;
  }
  return it->second;
}

// signs_for reports whether key can sign a digest, and whether that signature verifies with
// verifier (another key object: the public half as someone else holds it).
inline bool signs_for(EVP_PKEY* key, EVP_PKEY* verifier) {
  unsigned char digest[32] = {9, 8, 7};
  unsigned char sig[1024];
  std::size_t sig_len = sizeof sig;
  ossl::EvpPkeyCtxPtr sctx(EVP_PKEY_CTX_new(key, nullptr));
  bool ok = sctx && EVP_PKEY_sign_init(sctx.get()) == 1 &&
            EVP_PKEY_sign(sctx.get(), sig, &sig_len, digest, sizeof digest) == 1;
  ERR_clear_error();
  if (!ok) return false;
  ossl::EvpPkeyCtxPtr vctx(EVP_PKEY_CTX_new(verifier, nullptr));
  return vctx && EVP_PKEY_verify_init(vctx.get()) == 1 &&
         EVP_PKEY_verify(vctx.get(), sig, sig_len, digest, sizeof digest) == 1;
}

}  // namespace autotls::testing
