#pragma once

// CertStore: the set of certificates a TLS server can present, looked up by SNI on every
// handshake without locks, and replaced piecemeal by renewals and reloads.

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "acme/util/error.h"
#include "tlsreload/certificate.h"
#include "tlsreload/detail/hazard.h"

namespace autotls::tlsreload {

namespace detail {
struct Shard;
struct ShardGroup;
struct Slot;
struct SnapshotEditor;
// What a lookup reads of a shard: its slot array and mask (copies of the Shard's fields, so a
// lookup never reads the Shard object or a reference count).
struct ShardTable {
  const Slot* slots = nullptr;
  std::uint64_t mask = 0;
};
}  // namespace detail

// kMaxSniName: lookup names are at most 253 characters (RFC 1035 §2.3.4), plus an optional
// trailing dot.
inline constexpr std::size_t kMaxSniName = 253;

namespace detail {
// normalize_sni turns an SNI name into its lookup key in buf (at least kMaxSniName + 16
// bytes): A-Z lower-cased, one trailing dot dropped, and the bytes after the key zeroed up to
// the next multiple of 8 (the lookup hashes and compares 8 bytes at a time, reading up to 8
// bytes past the key and masking what lies beyond it). Returns the key's length, or 0 for a
// name that cannot be a key (empty, too long, a leading dot, a byte outside
// [A-Za-z0-9-_.:]), which then only gets the default certificate. A leading dot is refused so
// that a client cannot name a wildcard key (".example.com") directly. Never reads past sni.
std::size_t normalize_sni(std::string_view sni, char* buf);
// normalize_sni_swar is the same without SSE2 (8 bytes at a time in general registers): what
// normalize_sni does where SSE2 is missing, and a second implementation for the tests.
std::size_t normalize_sni_swar(std::string_view sni, char* buf);
}  // namespace detail

// kShardCount splits the name map so that a publish copies 1/kShardCount of it (about 100
// entries at 100,000 names) plus kShardGroups group pointers and one group, never the whole
// map. Each shard is a flat open-addressing table of 64-byte slots
// (detail::Slot in store.cpp) holding the hash, the key (inline up to 31 bytes) and the
// certificate pointers: a lookup reads the snapshot's table entry and usually one slot.
inline constexpr std::size_t kShardCount = 1024;
// Shards are owned in groups of kShardCount / kShardGroups, so that a publish copies
// kShardGroups + one group of reference-counted pointers, not kShardCount of them.
inline constexpr std::size_t kShardGroups = 32;

// CertPair is what one name (or one wildcard) maps to: at most one certificate per key family.
struct CertPair {
  std::shared_ptr<const Certificate> ecdsa;
  std::shared_ptr<const Certificate> rsa;
  bool empty() const { return !ecdsa && !rsa; }
};

// Snapshot is one immutable version of the store's contents. Any number of threads may read
// it; holding a std::shared_ptr<const Snapshot> keeps every certificate in it alive.
class Snapshot {
 public:
  // version increases by one with each change to the store.
  std::uint64_t version() const { return version_; }

  // find picks the certificate for a ClientHello:
  //   1. the exact name;
  //   2. the wildcard covering exactly the first label (RFC 6125 §6.4.3: "*.example.com"
  //      matches "a.example.com", not "a.b.example.com" nor "example.com");
  //   3. the default certificate.
  // A certificate whose deferred verification failed (Certificate::verification()) is treated
  // as absent at every step. At each step the ECDSA certificate is taken when the client supports ECDSA and the RSA one
  // otherwise. When a step has only the other family, later steps are tried for a certificate
  // the client can use; if none has one, the first match found is returned anyway (the client
  // may still cope; failing here would be certain). sni is compared case-insensitively and a
  // trailing dot is ignored (RFC 4343; RFC 6066 §3 forbids the dot but clients send it);
  // a malformed name goes straight to the default. Returns nullptr when nothing matches.
  // The pointer lives as long as this Snapshot. Does not allocate.
  const std::shared_ptr<const Certificate>* find(std::string_view sni,
                                                 bool client_supports_ecdsa) const;

  // find_borrowed is find() returning the raw pointer (no reference count touched, and it
  // reads only the table slot, not the CertPair): the hot path of a handshake. When missed is
  // not null, *missed is set to true (and left untouched otherwise) if no name entry answered:
  // the result is the default certificate or nullptr (an SNI miss, or no SNI). Only the miss
  // path writes it, so a hit costs nothing more.
  const Certificate* find_borrowed(std::string_view sni, bool client_supports_ecdsa,
                                   bool* missed = nullptr) const;

  // entry returns what the snapshot holds for the name itself: the exact name's entry, or for
  // a wildcard name ("*.example.com") the wildcard's entry, which find() never reaches (a
  // wildcard entry answers "a.example.com", not the literal "*.example.com"). No wildcard
  // matching, no default. Case-insensitive, one trailing dot ignored; nullptr when nothing is
  // held. For status pages (readiness, metrics), not for handshakes.
  const CertPair* entry(std::string_view name) const;

  // certificates lists each distinct certificate once (including the defaults), ordered by id.
  // O(n): for listing and status pages, not for handshakes.
  std::vector<std::shared_ptr<const Certificate>> certificates() const;

  // name_count counts the names (exact and wildcard keys) that map to something.
  std::size_t name_count() const { return name_count_; }

  // default_pair returns the default certificates (served when no name matches).
  const CertPair& default_pair() const { return default_; }

 private:
  friend struct detail::SnapshotEditor;
  Snapshot() = default;

  template <bool Borrowed>
  auto find_impl(std::string_view sni, bool client_supports_ecdsa, bool* missed) const;

  std::uint64_t version_ = 0;
  std::size_t name_count_ = 0;
  CertPair default_;
  // Each group owns kShardCount / kShardGroups shards and their ShardTables. A lookup reads
  // group->tables[i] through the stored pointer (never the reference count), so a publish,
  // which copies one group, changes 8 cache lines that readers see, not a 16 KiB table.
  std::array<std::shared_ptr<const detail::ShardGroup>, kShardGroups> groups_;
};


// CertStore maps SNI names to certificates.
//
// Concurrency contract: lookups and snapshot() (readers) never lock and never wait for a
// writer; writers (publish, remove, set_default) are serialized by a mutex and never block
// readers. Every reader sees either the old or the new snapshot, never a mix.
//
// How readers avoid locks (GCC 12's std::atomic<std::shared_ptr> is not lock-free: it spins on
// a lock bit): each thread caches a std::shared_ptr<const Snapshot> per store and revalidates
// it against the store's atomic version counter, one acquire load per lookup (the h2o
// "generation" scheme). Only when the version changed does the thread refresh its copy, and
// that takes no lock either: writers publish a raw pointer to a holder of the snapshot's
// reference, and the refreshing thread protects it with a hazard pointer (one slot per thread
// in a process-wide registry), checks it is still the published one, copies the reference and
// clears its hazard (detail::HazardPublished, shared with OnDemand's LRU index). snapshot()
// does the same. Every step is one atomic
// instruction (libstdc++'s shared_ptr copy and release are a fetch_add on the count, its
// use_count() a relaxed load); the only loop retries when a writer published in between, so
// a reader always makes progress unless writers keep publishing. Writers free a replaced
// snapshot only when no hazard slot names it and then no thread holds a reference to it
// (use_count() == 1); the ordering argument is at HazardPublished::publish (detail/hazard.h).
// Consequences: a thread keeps its last snapshot (and the certificates in it) alive until its
// next lookup on any store or its exit; the snapshot is then freed by the store's next change
// (writers free replaced snapshots, so a reader never pays for it). A thread's first refresh
// ever takes a registry slot, allocating one if none is free (never freed; reused after the
// thread exits): the reader path's only allocation, once per thread, like the registration of
// the thread_local cache's destructor at its first use.
class CertStore {
 public:
  struct Counters {
    std::uint64_t publish_ok = 0;      // publish()/publish_pem() calls that took effect
    std::uint64_t publish_failed = 0;  // refused: invalid PEM, failed validation, bad names
    std::uint64_t remove_ok = 0;
    std::uint64_t remove_failed = 0;   // nothing to remove
    std::uint64_t version = 0;         // snapshot_version
  };

  CertStore();
  ~CertStore();
  CertStore(const CertStore&) = delete;
  CertStore& operator=(const CertStore&) = delete;

  // publish makes cert the certificate of each of its names for its key family, replacing
  // whatever held those slots (a certificate replaced on all its names leaves the store).
  // Other names and the other key family are untouched. Publishing a certificate that already
  // holds all its slots is a no-op that succeeds without a new version.
  // Fails (and counts publish_failed, store unchanged) on nullptr or an unusable name.
  [[nodiscard]] Status publish(std::shared_ptr<const Certificate> cert);

  // publish_batch publishes each certificate as publish() would, in order, but builds one
  // snapshot for all of them (one new version, each touched shard copied once): a bulk load
  // of 100,000 certificates costs one publish, not 100,000. Returns one Status per
  // certificate; a refused one changes nothing and counts publish_failed.
  std::vector<Status> publish_batch(const std::vector<std::shared_ptr<const Certificate>>& certs);

  // publish_pem validates (Certificate::from_pem) and then publishes. On failure the store is
  // unchanged, publish_failed is counted and the validation Error is returned.
  [[nodiscard]] Result<std::shared_ptr<const Certificate>> publish_pem(
      std::string_view chain_pem, std::string_view key_pem, const LoadOptions& options = {});

  // remove takes the certificate with this id (Certificate::id()) off every name it holds and
  // off the default slot. Fails with Errc::invalid_input if the store does not hold it.
  [[nodiscard]] Status remove(std::string_view cert_id);

  // remove_name forgets a name (both key families). "*.example.com" removes the wildcard.
  [[nodiscard]] Status remove_name(std::string_view name);

  // set_default makes cert the default for its key family: served when no name matches (and
  // to clients that send no SNI). It is not published under its names by this call.
  [[nodiscard]] Status set_default(std::shared_ptr<const Certificate> cert);
  // clear_default removes both default certificates.
  void clear_default();

  // lookup returns the certificate a handshake for sni should present (see Snapshot::find), or
  // nullptr. Lock-free on the common path; the result stays valid however the store changes.
  std::shared_ptr<const Certificate> lookup(std::string_view sni,
                                            bool client_supports_ecdsa = true) const;

  // lookup_name returns the certificate the store serves for a configured or certificate name,
  // never the default: the exact entry, else (for a name that is not a wildcard) the wildcard
  // entry covering it, as lookup() does; a wildcard name ("*.example.com") is its own entry
  // (Snapshot::entry), which lookup() cannot find. Key families and failed verifications as in
  // Snapshot::find. nullptr when no entry answers. For status pages, not for handshakes.
  std::shared_ptr<const Certificate> lookup_name(std::string_view name,
                                                 bool client_supports_ecdsa = true) const;

  // lookup_for_handshake is lookup() without the reference count: the pointer is borrowed
  // from this thread's cached snapshot and is valid only until this thread next calls any
  // lookup function on any CertStore. For the OpenSSL client-hello callback, which copies what
  // it needs (SSL_use_cert_and_key takes references) before returning. missed: as in
  // Snapshot::find_borrowed (set to true only when no name answered).
  const Certificate* lookup_for_handshake(std::string_view sni, bool client_supports_ecdsa,
                                          bool* missed = nullptr) const;

  // snapshot returns the current snapshot (for listing; a handshake should use lookup).
  std::shared_ptr<const Snapshot> snapshot() const;

  // version returns the current snapshot's version (starts at 1, +1 per change).
  std::uint64_t version() const { return version_.load(std::memory_order_acquire); }

  Counters counters() const;

 private:
  const Snapshot& pinned() const;
  const Snapshot& refresh() const;                    // pinned()'s slow path
  void commit(std::shared_ptr<const Snapshot> next);  // with write_mu_ held
  bool apply_publish(detail::SnapshotEditor& ed, const std::shared_ptr<const Certificate>& cert);

  const std::uint64_t id_;  // unique per store in the process, keys the thread-local caches

  // Read by every lookup: alone on its cache line, so writers bumping counters or taking
  // mutexes next to it do not make readers miss.
  alignas(64) std::atomic<std::uint64_t> version_{0};
  // The published snapshot: lock-free acquire() for readers; current() and publish() for
  // writers (guarded by write_mu_). Its reader-side pointer shares version_'s line, as both
  // change together: a refresh after a change costs readers no extra miss.
  detail::HazardPublished<Snapshot> published_;

  // Writers. by_id_ maps a certificate id to the certificate and how many slots it holds.
  std::mutex write_mu_;
  struct Held {
    std::shared_ptr<const Certificate> cert;
    std::size_t slots = 0;
  };
  // The key views Held::cert->id() (no copy of 64 hex characters per certificate).
  std::unordered_map<std::string_view, Held> by_id_;

  alignas(64) std::atomic<std::uint64_t> publish_ok_{0};
  std::atomic<std::uint64_t> publish_failed_{0};
  std::atomic<std::uint64_t> remove_ok_{0};
  std::atomic<std::uint64_t> remove_failed_{0};

  friend struct detail::SnapshotEditor;
};

}  // namespace autotls::tlsreload
