#pragma once

// Certificate: one validated leaf + chain + private key, immutable once built.
//
// This header forward-declares the few OpenSSL types it mentions (<openssl/types.h> holds only
// typedefs), so including it does not pull the OpenSSL API into callers.

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <openssl/types.h>

#include "acme/util/clock.h"
#include "acme/util/error.h"

struct stack_st_X509;  // STACK_OF(X509)

namespace autotls::tlsreload {

namespace detail {
class Intermediate;     // an interned, shared intermediate certificate (detail/intern.h)
struct IssuerNames;     // an interned issuer commonName + DN
struct OpenSslObjects;  // the built X509 / EVP_PKEY / chain stack of one certificate
// g_any_verify_failed turns true (for good) when any certificate fails its deferred
// verification; until then lookups need not read each certificate's state.
extern std::atomic<bool> g_any_verify_failed;
}

// KeyKind is the family of the leaf key; it decides which slot of a name the certificate fills
// (a name may hold one ECDSA and one RSA certificate at once).
enum class KeyKind { ecdsa, rsa };

// LoadOptions controls Certificate::from_pem.
struct LoadOptions {
  // clock supplies "now" for the validity check. nullptr means system_clock(). The clock MUST
  // outlive the from_pem call only (it is not retained).
  const Clock* clock = nullptr;
  // allow_not_yet_valid accepts a leaf whose notBefore is in the future (pre-staging a renewal).
  // An expired leaf is always refused.
  bool allow_not_yet_valid = false;
  // chain_check decides when the expensive half of validation runs (see ChainCheck).
  enum class ChainCheck {
    // at_load: everything before from_pem returns. The default, and what a new certificate
    // from the CA or an operator gets.
    at_load,
    // deferred: for bulk loads of files we wrote ourselves (loader.h). from_pem still checks
    // the syntax of everything it reads, the names, the validity window, that the key's public
    // half equals the leaf's (byte comparison, no signing) and that each certificate's issuer
    // name is the next one's subject; what it defers is parsing the DER with OpenSSL and
    // verifying the chain signatures (hundreds of microseconds per certificate in OpenSSL 3.0,
    // see docs/benchmarks.md). Those run on first use (openssl()) or in verify(). A
    // certificate that then fails is never served: CertStore treats it as absent.
    deferred,
  };
  ChainCheck chain_check = ChainCheck::at_load;
  // record_sources (bulk loaders of loader.h only) fills LoadReport::sources: each pair's
  // paths and file identities, which the store snapshot (snapshot.h) records. Off by default:
  // two paths per certificate cost ~1 KiB of heap each during a load of 100,000 and fragment
  // it (RSS per certificate 1.8 -> 2.9 KiB in store_bench load when always on). The loaders
  // make the paths on the calling thread once the loading threads are done, so that freeing
  // them leaves no holes between the certificates.
  bool record_sources = false;
  // defer_source_paths (with record_sources; load_directory, load_pairs and read_snapshot)
  // leaves each source's paths empty and keeps them as plain strings in one buffer
  // (LoadReport::source_paths, SnapshotContents::source_paths) until the caller asks for them
  // (make_source_paths()): two std::filesystem::paths per pair cost ~5 mallocs and ~0.5 us,
  // a fifth of `autotls serve`'s start from a snapshot of 100,000 pairs, on the one thread
  // the start waits for. serve makes them behind the start, on the thread that needs them.
  bool defer_source_paths = false;
};

// Verification is where a Certificate stands with respect to LoadOptions::ChainCheck.
enum class Verification : std::uint8_t { verified, pending, failed };

// OpenSslView is the OpenSSL form of a Certificate. The pointers are borrowed: they stay valid
// as long as `hold` (or the Certificate's cache entry) keeps them alive, so keep the view, not
// just a pointer, while using them. SSL_use_cert_and_key() takes its own references, so a
// handshake may keep using them after it let go of the view. All three are null when the
// certificate failed its deferred verification (or, on a cache miss, could not be rebuilt).
struct OpenSslView {
  X509* leaf = nullptr;
  EVP_PKEY* key = nullptr;
  stack_st_X509* chain = nullptr;  // intermediates in order, never null (may be empty)
  std::shared_ptr<const void> hold;
  explicit operator bool() const { return leaf != nullptr; }
};

// OpenSslCacheStats describes the process-wide cache of built OpenSSL objects.
struct OpenSslCacheStats {
  std::size_t size = 0;          // certificates whose objects are built right now
  std::size_t capacity = 0;
  std::uint64_t builds = 0;      // cache misses that built objects from DER
  std::uint64_t evictions = 0;
  std::uint64_t verify_failed = 0;  // certificates whose deferred verification failed
  std::size_t signing_contexts = 1;  // as noted (note_openssl_signing_contexts)
};

// The cache bounds how many certificates keep their OpenSSL objects built at once (about
// 4.7–5.3 KiB of RSS each for ECDSA P-256, measured at 100,000, and ~2.1 KiB more for each
// further OpenSSL library context that signs with the key: it exports a copy, which the key
// keeps). By default the bound follows the number of Certificates alive and of library
// contexts that sign (note_openssl_signing_contexts): openssl_cache_capacity_for(alive,
// contexts), the larger of kDefaultOpenSslCacheCapacity and alive × 5 / (25 + 7 × (contexts −
// 1)): a fifth with one context, a 6.4th with two, and so on, which keeps the built objects,
// copies included, at about the memory a fifth takes with one. That keeps `autotls serve`
// inside the memory target of 4 KiB per certificate with the cache full (one context, a fifth:
// 3.94 KiB, session 17; two contexts, a 6.4th: 3.82 KiB, where a fifth measured 4.14 KiB,
// session 18), while a random SNI over all of them hits that fraction of the time
// (docs/benchmarks.md).
inline constexpr std::size_t kDefaultOpenSslCacheCapacity = 10000;
std::size_t openssl_cache_capacity_for(std::size_t certificates, std::size_t contexts = 1);

// note_openssl_signing_contexts tells the cache that built keys may sign in up to `contexts`
// OpenSSL library contexts, the default one included (server/detail/lib_contexts.h: one per
// reactor). The automatic bound uses the largest number noted: it never goes back down,
// since those contexts, and the copies keys hold, are never freed. Thread-safe.
void note_openssl_signing_contexts(std::size_t contexts);

// set_openssl_cache_capacity fixes that bound (0: build on every use, keep nothing);
// set_openssl_cache_capacity_automatic returns to the default. Thread-safe; evicts at once
// when shrinking.
void set_openssl_cache_capacity(std::size_t capacity);
void set_openssl_cache_capacity_automatic();
OpenSslCacheStats openssl_cache_stats();

// Certificate is immutable after from_pem() returns it, so any number of threads may read it
// without synchronization. It is always handled through std::shared_ptr<const Certificate>.
//
// Intermediates are interned process-wide by the SHA-256 of their DER: a thousand leaves from
// one CA share one parsed X509 of its intermediate (detail/intern.h).
//
// Memory: a Certificate keeps only compact data (leaf DER, key DER, names, metadata, shared
// intermediates and issuer names, about 1.5 KiB for ECDSA P-256). The OpenSSL objects of a
// handshake are built from the DER on first use into a bounded process-wide cache of hot
// certificates (CLOCK eviction, set_openssl_cache_capacity). A hit is one atomic shared_ptr
// load and takes no mutex; a miss builds the objects (tens of microseconds) and then takes the
// cache mutex for a few pointer moves.
class Certificate {
 public:
  using Sha256 = std::array<std::uint8_t, 32>;

  // from_pem parses and validates a certificate chain (leaf first, then intermediates, as in
  // certbot's fullchain.pem) and its private key (PKCS#8 "PRIVATE KEY", SEC1 "EC PRIVATE KEY" or
  // PKCS#1 "RSA PRIVATE KEY"). It never prompts for a password: an encrypted key is refused.
  //
  // Validation, every step of which must pass before the certificate can be published:
  //   - the key matches the leaf;
  //   - each certificate of the chain is issued by the next one (issuer name == next subject,
  //     signature verifies with the next public key);
  //   - now (from options.clock) is inside the leaf's validity window;
  //   - the leaf has at least one dNSName or iPAddress subjectAltName, each of them usable as a
  //     lookup key (wildcards only as a whole left-most label);
  //   - the key is ECDSA (P-256, P-384, P-521) or RSA.
  // Errors are Errc::invalid_input (bad input) or Errc::crypto, with a message that says what
  // was wrong ("certificate chain: certificate #2 did not issue certificate #1: ...").
  [[nodiscard]] static Result<std::shared_ptr<const Certificate>> from_pem(
      std::string_view chain_pem, std::string_view key_pem, const LoadOptions& options = {});

  ~Certificate();
  Certificate(const Certificate&) = delete;
  Certificate& operator=(const Certificate&) = delete;

  // names returns the subjectAltNames: dNSNames lower-cased ("*.example.com" kept as is), then
  // iPAddresses in text form ("192.0.2.1", "2001:db8::1"). Duplicates removed, never empty.
  const std::vector<std::string>& names() const { return names_; }
  std::chrono::system_clock::time_point not_before() const { return not_before_; }
  std::chrono::system_clock::time_point not_after() const { return not_after_; }
  // serial_hex is the leaf serial number, lower-case hex without separators.
  const std::string& serial_hex() const { return serial_hex_; }
  // issuer_cn is the issuer's commonName ("" when it has none); issuer_dn its RFC 2253 form.
  const std::string& issuer_cn() const;
  const std::string& issuer_dn() const;
  KeyKind key_kind() const { return key_kind_; }
  // key_type names the key as the configuration does: "ec256", "ec384", "ec521", "rsa2048"...
  const std::string& key_type() const { return key_type_; }
  // fingerprint is the SHA-256 of the leaf DER; id() is its lower-case hex, the certificate's
  // identity in CertStore::remove().
  const Sha256& fingerprint() const { return fingerprint_; }
  const std::string& id() const { return id_; }
  // chain_length counts the intermediates (the leaf excluded).
  std::size_t chain_length() const { return chain_.size(); }

  // openssl returns the OpenSSL objects for a handshake: from the cache when hot, otherwise
  // built from the DER (and, for a deferred certificate, verified first: a failure marks it
  // failed and returns an empty view). Thread-safe; no mutex on a hit.
  OpenSslView openssl() const;

  // verification tells whether the deferred checks passed, are pending or failed.
  Verification verification() const { return verification_.load(std::memory_order_acquire); }
  // verify runs the deferred checks now if they are pending (without filling the cache) and
  // returns their result; cheap once they have run. Thread-safe.
  [[nodiscard]] Status verify() const;

 private:
  Certificate() = default;
  friend struct CertificateBuilder;

  std::vector<std::string> names_;
  std::chrono::system_clock::time_point not_before_{};
  std::chrono::system_clock::time_point not_after_{};
  std::string serial_hex_;
  std::shared_ptr<const detail::IssuerNames> issuer_;
  std::string key_type_;
  std::string id_;
  Sha256 fingerprint_{};
  KeyKind key_kind_ = KeyKind::ecdsa;
  std::uint8_t key_format_ = 0;  // which DER structure key_der_ is (certificate.cpp)

  std::string leaf_der_;
  std::string key_der_;  // secret: wiped in the destructor
  std::vector<std::shared_ptr<const detail::Intermediate>> chain_;

  mutable std::atomic<Verification> verification_{Verification::verified};
  mutable std::unique_ptr<const std::string> verify_error_;  // set once, before failed
  // The cache entry (see the class comment). hot_ is set only for a verified certificate;
  // referenced_ is the CLOCK bit; cache_slot_ is guarded by the cache mutex.
  mutable std::atomic<std::shared_ptr<const detail::OpenSslObjects>> hot_;
  mutable std::atomic<bool> referenced_{false};
  mutable std::size_t cache_slot_ = static_cast<std::size_t>(-1);
  bool counted_ = false;  // counted in the live certificates (set by the builder)
};

// is_valid_lookup_name reports whether name (already lower-case) can be a CertStore key: a DNS
// name of LDH/underscore labels, optionally with "*." as the whole first label, or an IP
// address in the text form Certificate::names() produces.
bool is_valid_lookup_name(std::string_view name);

}  // namespace autotls::tlsreload
