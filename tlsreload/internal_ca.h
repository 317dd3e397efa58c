#pragma once

// InternalCA: a local certificate authority for localhost, private names and tests (like
// Caddy's `tls internal`). Its root is created once and kept in storage; leaves are signed at
// once, without any network, and renewed by the Manager like any other certificate.

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "acme/key.h"
#include "acme/util/clock.h"
#include "acme/util/error.h"
#include "acme/util/logger.h"
#include "tlsreload/storage.h"

namespace autotls::tlsreload {

class InternalCA {
 public:
  // Storage keys of the root (docs/storage.md). The key is written 0600 (secret).
  static constexpr std::string_view kRootCertKey = "internal/root.pem";
  static constexpr std::string_view kRootKeyKey = "internal/root.key";

  struct Options {
    std::chrono::hours root_lifetime{24 * 365 * 10};
    std::chrono::hours leaf_lifetime{24 * 7};
    std::chrono::seconds lock_ttl{60};
    std::chrono::seconds lock_wait{600};
  };

  // load_or_create reads the root from storage, or creates and stores it under the storage
  // lock "internal-ca" (so processes sharing storage make one root, not several). A stored
  // root that cannot be read, whose key does not match, or that has expired is an error
  // naming the files: it is never silently replaced, since users have trusted it.
  static Result<std::shared_ptr<InternalCA>> load_or_create(Storage& storage, Clock& clock, Logger& logger,
                                                            const Options& options);
  static Result<std::shared_ptr<InternalCA>> load_or_create(Storage& storage, Clock& clock, Logger& logger) {
    return load_or_create(storage, clock, logger, Options{});
  }

  struct Issued {
    std::string chain_pem;  // leaf, then the root
    std::string key_pem;    // PKCS#8
  };
  // issue signs a leaf for names (DNS names, wildcards, IP addresses) with a fresh key of
  // key_type, valid from a few minutes ago for leaf_lifetime (never beyond the root's expiry).
  Result<Issued> issue(const std::vector<std::string>& names, acme::KeyType key_type) const;

  const std::string& root_pem() const { return root_pem_; }

  ~InternalCA();

 private:
  struct Impl;
  InternalCA(std::unique_ptr<Impl> impl, std::string root_pem, Clock& clock, Options options);
  std::unique_ptr<Impl> impl_;
  std::string root_pem_;
  Clock& clock_;
  Options options_;
};

}  // namespace autotls::tlsreload
