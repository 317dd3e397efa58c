#pragma once

// Interning of intermediate certificates: a thousand leaves issued by one CA hold one parsed
// copy of its intermediate instead of a thousand.

#include <array>
#include <cstdint>
#include <memory>

#include "acme/util/openssl.h"

namespace autotls::tlsreload::detail {

// Intermediate is one interned intermediate certificate. Immutable; shared between every
// Certificate whose chain contains the same DER.
class Intermediate {
 public:
  using Sha256 = std::array<std::uint8_t, 32>;
  Intermediate(ossl::X509Ptr x509, const Sha256& digest) : x509_(std::move(x509)), digest_(digest) {}
  X509* x509() const { return x509_.get(); }
  const Sha256& digest() const { return digest_; }

 private:
  ossl::X509Ptr x509_;
  Sha256 digest_;
};

// intern returns the shared Intermediate for parsed's DER. If one is alive, parsed is dropped
// and the existing one returned; otherwise parsed becomes the interned copy. The table holds
// only weak references, so an intermediate no certificate uses any more is freed (and its
// table entry erased). Thread-safe (one mutex, held for a hash lookup; never on a handshake).
// Fails only when the DER digest cannot be computed.
Result<std::shared_ptr<const Intermediate>> intern(ossl::X509Ptr parsed);

// interned_count_for_test returns how many entries the process-wide table holds.
std::size_t interned_count_for_test();

}  // namespace autotls::tlsreload::detail
