#pragma once

// The compact form of a Certificate, as the store snapshot (tlsreload/snapshot.h) writes and
// reads it: every field a Certificate keeps, so that restoring one parses nothing (no PEM, no
// DER walk, no OpenSSL object). Only certificate.cpp may build a Certificate, so the two
// conversions live there.

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "acme/util/error.h"
#include "tlsreload/certificate.h"

namespace autotls::tlsreload::detail {

class Intermediate;

// Views: into the Certificate (to_compact) or into the snapshot file's bytes (the reader), so
// that neither direction copies a field more than once. Valid while what they view lives.
struct CompactCertificate {
  std::vector<std::string_view> names;
  std::int64_t not_before_ns = 0;  // system_clock, since the epoch
  std::int64_t not_after_ns = 0;
  std::string_view serial_hex;
  std::string_view issuer_cn;
  std::string_view issuer_dn;
  std::string_view key_type;
  KeyKind key_kind = KeyKind::ecdsa;
  std::uint8_t key_format = 0;
  Certificate::Sha256 fingerprint{};
  std::string_view leaf_der;
  std::string_view key_der;  // secret
  std::vector<std::shared_ptr<const Intermediate>> chain;
};

// to_compact views c's fields (the key DER included); c must outlive the result.
CompactCertificate to_compact(const Certificate& c);

// from_compact rebuilds a certificate from fields written by to_compact, rechecking what is
// cheap: the validity window against options.clock (an expired leaf is refused, as from_pem
// does), that there is at least one name and each is a usable lookup key, and the key's
// family and format. The expensive checks (the DER parses, the key matching the leaf, the
// chain links) are left pending, exactly as a deferred bulk load leaves them: they run on
// first use or in verify(), and a certificate failing them is never served.
Result<std::shared_ptr<const Certificate>> from_compact(const CompactCertificate& c, const LoadOptions& options);

// intermediate_der returns the DER of an interned intermediate ("" on failure).
std::string intermediate_der(const Intermediate& inter);

}  // namespace autotls::tlsreload::detail
