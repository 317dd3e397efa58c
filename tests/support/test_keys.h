#pragma once

#include <doctest/doctest.h>

#include <map>
#include <mutex>

#include "acme/key.h"

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

}  // namespace autotls::testing
