#pragma once

// Interning of intermediate certificates: a thousand leaves issued by one CA hold one parsed
// copy of its intermediate instead of a thousand.

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "acme/util/openssl.h"

namespace autotls::tlsreload::detail {

// Intermediate is one interned intermediate certificate. Immutable; shared between every
// Certificate whose chain contains the same DER.
class Intermediate {
 public:
  using Sha256 = std::array<std::uint8_t, 32>;
  Intermediate(ossl::X509Ptr x509, const Sha256& digest);
  X509* x509() const { return x509_.get(); }
  const Sha256& digest() const { return digest_; }
  // The DER of its subject and issuer names, for the loader's byte comparison of chain links.
  const std::string& subject_der() const { return subject_der_; }
  const std::string& issuer_der() const { return issuer_der_; }

 private:
  ossl::X509Ptr x509_;
  Sha256 digest_;
  std::string subject_der_;
  std::string issuer_der_;
};

// intern returns the shared Intermediate for parsed's DER. If one is alive, parsed is dropped
// and the existing one returned; otherwise parsed becomes the interned copy. The table holds
// only weak references, so an intermediate no certificate uses any more is freed (and its
// table entry erased). Thread-safe (one mutex, held for a hash lookup; never on a handshake).
// Fails only when the DER digest cannot be computed.
Result<std::shared_ptr<const Intermediate>> intern(ossl::X509Ptr parsed);

// intern_der is intern() for a DER certificate that may already be interned: it hashes the
// DER and parses it only when no live copy exists (parsing costs far more than hashing).
// Fails when der is not exactly one certificate.
Result<std::shared_ptr<const Intermediate>> intern_der(std::string_view der);

// interned_count_for_test returns how many entries the process-wide table holds.
std::size_t interned_count_for_test();

// name_der returns the DER encoding of a name ("" on failure): the key names are compared by.
std::string name_der(const X509_NAME* name);

}  // namespace autotls::tlsreload::detail
