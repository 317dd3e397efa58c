#include "tlsreload/store.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <functional>
#include <unordered_set>
#include <utility>

namespace autotls::tlsreload {
namespace detail {

// name_hash is a wyhash-style hash (multiply-fold of 64-bit words, written for this file):
// SNI names are short, and std::hash<string_view> (murmur over bytes) was a fifth of a lookup.
// Only our own certificate names are inserted, so a peer cannot choose colliding keys; its
// names only probe.
inline std::uint64_t mix(std::uint64_t a, std::uint64_t b) {
  __uint128_t r = static_cast<__uint128_t>(a) * b;
  return static_cast<std::uint64_t>(r) ^ static_cast<std::uint64_t>(r >> 64);
}
inline std::uint64_t name_hash(std::string_view s) {
  constexpr std::uint64_t k0 = 0xa0761d6478bd642full, k1 = 0xe7037ed1a0b428dbull,
                          k2 = 0x8ebc6af09c88c6e3ull;
  const char* p = s.data();
  std::size_t n = s.size();
  std::uint64_t h = k0 ^ (n * k1);
  while (n >= 8) {
    std::uint64_t w;
    std::memcpy(&w, p, 8);
    h = mix(h ^ w, k1);
    p += 8;
    n -= 8;
  }
  std::uint64_t w = 0;
  std::memcpy(&w, p, n);  // n < 8
  return mix(mix(h ^ w, k2), k1 ^ s.size());
}

// Shard is a flat open-addressing table (linear probing, at most half full), immutable once
// published; a writer edits a copy (SnapshotEditor) and freezes it into a new Shard. Keys live
// back to back in one string, so a probe touches the slot and the shard's key bytes only.
struct Shard {
  struct Slot {
    std::uint64_t hash = 0;
    std::uint32_t key_offset = 0;
    std::uint32_t key_length = 0;  // 0: empty slot (keys are never empty)
    CertPair pair;
  };
  std::vector<Slot> slots;  // size is a power of two
  std::string keys;
  std::uint64_t mask = 0;
  std::size_t count = 0;

  const CertPair* find(std::string_view key, std::uint64_t h) const {
    for (std::uint64_t i = h & mask;; i = (i + 1) & mask) {
      const Slot& s = slots[i];
      if (s.key_length == 0) return nullptr;
      if (s.hash == h && s.key_length == key.size() &&
          std::memcmp(keys.data() + s.key_offset, key.data(), key.size()) == 0) {
        return &s.pair;
      }
    }
  }

  template <class It>
  static std::shared_ptr<const Shard> freeze(It begin, It end, std::size_t count) {
    // Not make_shared: the reference count would share a cache line with the fields every
    // lookup reads, and each publish increments the counts of all kShardCount shards, so
    // readers would miss on every shard after every swap.
    std::shared_ptr<Shard> shard(new Shard);
    std::size_t size = 2;
    while (size < 2 * count) size *= 2;
    shard->slots.resize(size);
    shard->mask = size - 1;
    shard->count = count;
    for (It it = begin; it != end; ++it) {
      const std::string& key = it->first;
      std::uint64_t h = name_hash(key);
      std::uint64_t i = h & shard->mask;
      while (shard->slots[i].key_length != 0) i = (i + 1) & shard->mask;
      Slot& slot = shard->slots[i];
      slot.hash = h;
      slot.key_offset = static_cast<std::uint32_t>(shard->keys.size());
      slot.key_length = static_cast<std::uint32_t>(key.size());
      slot.pair = it->second;
      shard->keys += key;
    }
    return shard;
  }
};

}  // namespace detail

namespace {

static_assert(std::has_single_bit(kShardCount));
constexpr int kShardShift = 64 - std::countr_zero(kShardCount);

// The high bits pick the shard and the low bits the slot, so the two choices stay independent.
std::size_t shard_of(std::uint64_t h) { return static_cast<std::size_t>(h >> kShardShift); }

const std::shared_ptr<const detail::Shard>& empty_shard() {
  // Leaked: thread-local snapshot caches may outlive function-local statics at exit.
  static const auto* empty = new std::shared_ptr<const detail::Shard>([] {
    std::vector<std::pair<std::string, CertPair>> none;
    return detail::Shard::freeze(none.begin(), none.end(), 0);
  }());
  return *empty;
}

// Lookup names are at most 253 characters (RFC 1035 §2.3.4) plus an optional trailing dot.
constexpr std::size_t kMaxName = 253;

// kSniByte maps a byte of an SNI name to its lower-case key byte, or 0 when it cannot occur in
// a key: one table load per byte instead of a chain of range tests.
constexpr std::array<char, 256> make_sni_table() {
  std::array<char, 256> t{};
  for (int c = 'a'; c <= 'z'; ++c) t[static_cast<std::size_t>(c)] = static_cast<char>(c);
  for (int c = 'A'; c <= 'Z'; ++c) t[static_cast<std::size_t>(c)] = static_cast<char>(c - 'A' + 'a');
  for (int c = '0'; c <= '9'; ++c) t[static_cast<std::size_t>(c)] = static_cast<char>(c);
  for (char c : {'-', '.', '_', ':'}) t[static_cast<unsigned char>(c)] = c;
  return t;
}
constexpr auto kSniByte = make_sni_table();

// normalize_sni lower-cases sni into buf and drops one trailing dot. Returns the length, or 0
// for a name that cannot be a key (empty, too long, leading dot, a byte outside
// [A-Za-z0-9-_.:]), which then only gets the default certificate. A leading dot is refused so
// that a client cannot name a wildcard key (".example.com") directly.
std::size_t normalize_sni(std::string_view sni, char* buf) {
  if (!sni.empty() && sni.back() == '.') sni.remove_suffix(1);
  if (sni.empty() || sni.size() > kMaxName || sni.front() == '.') return 0;
  unsigned char bad = 0;
  for (std::size_t i = 0; i < sni.size(); ++i) {
    char c = kSniByte[static_cast<unsigned char>(sni[i])];
    bad |= static_cast<unsigned char>(c == 0);
    buf[i] = c;
  }
  return bad ? 0 : sni.size();
}

// key_of turns a certificate name into its map key: wildcards are stored as ".example.com"
// (the suffix after the first label), which no exact name can equal.
std::string_view key_of(std::string_view name) {
  return name.starts_with("*.") ? name.substr(1) : name;
}

std::shared_ptr<const Certificate>& slot_of(CertPair& p, KeyKind kind) {
  return kind == KeyKind::ecdsa ? p.ecdsa : p.rsa;
}

std::atomic<std::uint64_t> g_next_store_id{1};

// The per-thread snapshot cache (see CertStore's class comment). A few slots so a thread that
// serves several stores does not refresh on every switch; store ids are never reused, so a
// slot of a destroyed store simply never matches again. Slot 0 is the most recently used
// store, so the common case (one store per process) checks one slot.
struct CacheSlot {
  std::uint64_t store_id = 0;
  std::uint64_t version = 0;
  const Snapshot* raw = nullptr;  // == snapshot.get(), read without touching the shared_ptr
  std::shared_ptr<const Snapshot> snapshot;
};
constexpr std::size_t kCacheSlots = 4;
thread_local std::array<CacheSlot, kCacheSlots> tl_cache;

}  // namespace

namespace detail {

// SnapshotEditor builds the next snapshot from the current one, copying only the shards it
// touches (copy-on-write): a touched shard is thawed into a hash map, edited, and frozen into
// a new flat Shard by finish(). Used by writers with CertStore::write_mu_ held.
struct SnapshotEditor {
  using Map = std::unordered_map<std::string, CertPair>;

  explicit SnapshotEditor(const Snapshot& base) : next(new Snapshot(base)) {
    next->version_ = base.version_ + 1;
  }

  static std::shared_ptr<const Snapshot> empty() {
    std::shared_ptr<Snapshot> s(new Snapshot());
    s->version_ = 1;
    s->shards_.fill(empty_shard());
    return s;
  }

  static const CertPair* peek(const Snapshot& s, std::string_view key) {
    std::uint64_t h = name_hash(key);
    return s.shards_[shard_of(h)]->find(key, h);
  }

  // current returns the entry as edited so far (nullptr if absent), without copying.
  const CertPair* current(std::string_view key) const {
    std::uint64_t h = name_hash(key);
    if (const Map* m = thawed(shard_of(h))) {
      auto it = m->find(std::string(key));
      return it == m->end() ? nullptr : &it->second;
    }
    return next->shards_[shard_of(h)]->find(key, h);
  }

  CertPair* find(std::string_view key) {
    if (!current(key)) return nullptr;
    Map& m = writable(shard_of(name_hash(key)));
    return &m.find(std::string(key))->second;
  }

  CertPair& upsert(std::string_view key) {
    Map& m = writable(shard_of(name_hash(key)));
    auto [it, inserted] = m.try_emplace(std::string(key));
    if (inserted) ++next->name_count_;
    return it->second;
  }

  void erase_if_empty(std::string_view key) {
    Map& m = writable(shard_of(name_hash(key)));
    auto it = m.find(std::string(key));
    if (it != m.end() && it->second.empty()) {
      m.erase(it);
      --next->name_count_;
    }
  }

  CertPair& default_pair() { return next->default_; }

  // finish freezes the edited shards and returns the snapshot to commit.
  std::shared_ptr<const Snapshot> finish() {
    for (auto& [index, map] : thawed_) {
      next->shards_[index] = map.empty() ? empty_shard() : Shard::freeze(map.begin(), map.end(), map.size());
    }
    thawed_.clear();
    return std::move(next);
  }

  std::shared_ptr<Snapshot> next;

 private:
  const Map* thawed(std::size_t index) const {
    auto it = thawed_.find(index);
    return it == thawed_.end() ? nullptr : &it->second;
  }

  Map& writable(std::size_t index) {
    auto [it, inserted] = thawed_.try_emplace(index);
    if (inserted) {
      const Shard& shard = *next->shards_[index];
      it->second.reserve(shard.count + 1);
      for (const Shard::Slot& s : shard.slots) {
        if (s.key_length != 0) it->second.emplace(shard.keys.substr(s.key_offset, s.key_length), s.pair);
      }
    }
    return it->second;
  }

  std::unordered_map<std::size_t, Map> thawed_;
};

}  // namespace detail

// ---- Snapshot ----

const std::shared_ptr<const Certificate>* Snapshot::find(std::string_view sni,
                                                        bool client_supports_ecdsa) const {
  const std::shared_ptr<const Certificate>* fallback = nullptr;
  // A certificate whose deferred verification failed is never served: as if absent. Reading
  // its state costs a cache miss per lookup at 100,000 certificates, so it is skipped while no
  // certificate in the process has ever failed (the usual case).
  const bool check_failed = detail::g_any_verify_failed.load(std::memory_order_relaxed);
  auto usable = [check_failed](const std::shared_ptr<const Certificate>& c) {
    return c && (!check_failed || c->verification() != Verification::failed);
  };
  auto pick = [&](const CertPair& p) -> const std::shared_ptr<const Certificate>* {
    const auto& wanted = client_supports_ecdsa ? p.ecdsa : p.rsa;
    if (usable(wanted)) return &wanted;
    const auto& other = client_supports_ecdsa ? p.rsa : p.ecdsa;
    if (usable(other) && !fallback) fallback = &other;
    return nullptr;
  };
  auto entry = [&](std::string_view key) -> const CertPair* {
    std::uint64_t h = detail::name_hash(key);
    return shards_[shard_of(h)]->find(key, h);
  };

  char buf[kMaxName];
  std::size_t n = normalize_sni(sni, buf);
  if (n != 0) {
    std::string_view name(buf, n);
    if (const CertPair* p = entry(name)) {
      if (auto r = pick(*p)) return r;
    }
    // RFC 6125 §6.4.3: the wildcard stands for exactly one whole left-most label, so the only
    // candidate key is the suffix after the first label.
    std::size_t dot = name.find('.');
    if (dot != std::string_view::npos && dot + 1 < n) {
      if (const CertPair* p = entry(name.substr(dot))) {
        if (auto r = pick(*p)) return r;
      }
    }
  }
  if (auto r = pick(default_)) return r;
  return fallback;
}

std::vector<std::shared_ptr<const Certificate>> Snapshot::certificates() const {
  std::unordered_set<const Certificate*> seen;
  std::vector<std::shared_ptr<const Certificate>> out;
  auto add = [&](const std::shared_ptr<const Certificate>& c) {
    if (c && seen.insert(c.get()).second) out.push_back(c);
  };
  for (const auto& shard : shards_) {
    for (const auto& slot : shard->slots) {
      if (slot.key_length == 0) continue;
      add(slot.pair.ecdsa);
      add(slot.pair.rsa);
    }
  }
  add(default_.ecdsa);
  add(default_.rsa);
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a->id() < b->id(); });
  return out;
}

// ---- CertStore ----

CertStore::CertStore()
    : id_(g_next_store_id.fetch_add(1, std::memory_order_relaxed)),
      current_(detail::SnapshotEditor::empty()) {
  version_.store(current_->version(), std::memory_order_release);
}

CertStore::~CertStore() = default;

void CertStore::commit(std::shared_ptr<const Snapshot> next) {
  std::uint64_t v = next->version();
  {
    std::lock_guard lock(current_mu_);
    current_.swap(next);
    version_.store(v, std::memory_order_release);
  }
  // next now holds the previous snapshot. Park it; free every parked snapshot that no thread
  // cache holds any more. use_count() == 1 is final: current_ no longer points to it, and a
  // thread can only get a snapshot from current_ or from its own cache slot.
  retired_.push_back(std::move(next));
  std::erase_if(retired_, [](const auto& s) { return s.use_count() == 1; });
}

const Snapshot& CertStore::pinned() const {
  std::uint64_t v = version_.load(std::memory_order_acquire);
  const CacheSlot& first = tl_cache[0];
  // The common path: no lock, no read-modify-write, no shared_ptr copy.
  if (first.store_id == id_ && first.version == v) [[likely]] return *first.raw;
  return refresh();
}

const Snapshot& CertStore::refresh() const {
  std::size_t i = 0;
  while (i < kCacheSlots && tl_cache[i].store_id != id_) ++i;
  if (i == kCacheSlots) i = kCacheSlots - 1;  // reuse the least recently used slot
  // Move this store's slot to the front (most recently used first).
  std::rotate(tl_cache.begin(), tl_cache.begin() + static_cast<std::ptrdiff_t>(i),
              tl_cache.begin() + static_cast<std::ptrdiff_t>(i) + 1);
  CacheSlot& slot = tl_cache[0];
  if (slot.store_id == id_ && slot.version == version_.load(std::memory_order_acquire)) {
    return *slot.raw;
  }
  slot.store_id = id_;
  std::shared_ptr<const Snapshot> fresh;
  {
    std::lock_guard lock(current_mu_);
    fresh = current_;
  }
  slot.version = fresh->version();
  slot.raw = fresh.get();
  // The previous snapshot is parked in retired_ by the writer, so dropping it here is one
  // atomic decrement, never the free.
  slot.snapshot.swap(fresh);
  return *slot.raw;
}

std::shared_ptr<const Certificate> CertStore::lookup(std::string_view sni,
                                                     bool client_supports_ecdsa) const {
  const auto* found = pinned().find(sni, client_supports_ecdsa);
  return found ? *found : nullptr;
}

const Certificate* CertStore::lookup_for_handshake(std::string_view sni,
                                                   bool client_supports_ecdsa) const {
  const auto* found = pinned().find(sni, client_supports_ecdsa);
  return found ? found->get() : nullptr;
}

std::shared_ptr<const Snapshot> CertStore::snapshot() const {
  std::lock_guard lock(current_mu_);
  return current_;
}

CertStore::Counters CertStore::counters() const {
  Counters c;
  c.publish_ok = publish_ok_.load(std::memory_order_relaxed);
  c.publish_failed = publish_failed_.load(std::memory_order_relaxed);
  c.remove_ok = remove_ok_.load(std::memory_order_relaxed);
  c.remove_failed = remove_failed_.load(std::memory_order_relaxed);
  c.version = version();
  return c;
}

namespace {

Status check_publishable(const std::shared_ptr<const Certificate>& cert) {
  if (!cert) return fail(Errc::invalid_input, "publish: null certificate");
  for (const std::string& name : cert->names()) {
    if (!is_valid_lookup_name(name)) {
      return fail(Errc::invalid_input, "publish: unusable name \"" + name + "\"");
    }
  }
  return {};
}

// holds_all reports whether cert already fills its slot for every one of its names; find maps
// a key to its CertPair (or nullptr).
template <class Find>
bool holds_all(const Certificate& cert, Find&& find) {
  KeyKind kind = cert.key_kind();
  return std::all_of(cert.names().begin(), cert.names().end(), [&](const std::string& n) {
    const CertPair* p = find(key_of(n));
    const std::shared_ptr<const Certificate>* held =
        p ? &(kind == KeyKind::ecdsa ? p->ecdsa : p->rsa) : nullptr;
    return held && *held && (*held)->id() == cert.id();
  });
}

}  // namespace

bool CertStore::apply_publish(detail::SnapshotEditor& ed,
                              const std::shared_ptr<const Certificate>& cert) {
  // A reload of unchanged files re-publishes the same certificate: no change.
  if (holds_all(*cert, [&](std::string_view k) { return ed.current(k); })) return false;
  KeyKind kind = cert->key_kind();
  // The same certificate parsed twice is two objects with one id: drop the older object from
  // whatever slots it still holds so by_id_ stays exact.
  if (auto it = by_id_.find(cert->id()); it != by_id_.end() && it->second.cert != cert) {
    auto old = it->second.cert;
    for (const std::string& n : old->names()) {
      if (CertPair* p = ed.find(key_of(n))) {
        auto& s = slot_of(*p, old->key_kind());
        if (s == old) s.reset();
        ed.erase_if_empty(key_of(n));
      }
    }
    by_id_.erase(it);
  }

  Held& held = by_id_[cert->id()];
  held.cert = cert;
  for (const std::string& n : cert->names()) {
    auto& slot = slot_of(ed.upsert(key_of(n)), kind);
    if (slot == cert) continue;
    if (slot) {
      auto it = by_id_.find(slot->id());
      if (it != by_id_.end() && --it->second.slots == 0) by_id_.erase(it);
    }
    slot = cert;
    ++held.slots;
  }
  return true;
}

Status CertStore::publish(std::shared_ptr<const Certificate> cert) {
  if (auto st = check_publishable(cert); !st) {
    publish_failed_.fetch_add(1, std::memory_order_relaxed);
    return st;
  }
  std::lock_guard lock(write_mu_);
  const Snapshot& base = *current_;  // only writers replace current_, and we hold write_mu_
  // Checked before copying the snapshot, so a no-op reload costs a few hash lookups.
  if (holds_all(*cert, [&](std::string_view k) { return detail::SnapshotEditor::peek(base, k); })) {
    publish_ok_.fetch_add(1, std::memory_order_relaxed);
    return {};
  }
  detail::SnapshotEditor ed(base);
  if (apply_publish(ed, cert)) commit(ed.finish());
  publish_ok_.fetch_add(1, std::memory_order_relaxed);
  return {};
}

std::vector<Status> CertStore::publish_batch(
    const std::vector<std::shared_ptr<const Certificate>>& certs) {
  std::vector<Status> out;
  out.reserve(certs.size());
  for (const auto& cert : certs) out.push_back(check_publishable(cert));
  std::lock_guard lock(write_mu_);
  detail::SnapshotEditor ed(*current_);
  bool changed = false;
  for (std::size_t i = 0; i < certs.size(); ++i) {
    if (!out[i]) {
      publish_failed_.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    changed |= apply_publish(ed, certs[i]);
    publish_ok_.fetch_add(1, std::memory_order_relaxed);
  }
  if (changed) commit(ed.finish());
  return out;
}

Result<std::shared_ptr<const Certificate>> CertStore::publish_pem(std::string_view chain_pem,
                                                                  std::string_view key_pem,
                                                                  const LoadOptions& options) {
  auto cert = Certificate::from_pem(chain_pem, key_pem, options);
  if (!cert) {
    publish_failed_.fetch_add(1, std::memory_order_relaxed);
    return fail(cert.error().with_context("publish"));
  }
  auto st = publish(*cert);
  if (!st) return fail(st.error());
  return *cert;
}

Status CertStore::remove(std::string_view cert_id) {
  std::lock_guard lock(write_mu_);
  const Snapshot& base = *current_;
  detail::SnapshotEditor ed(base);
  bool changed = false;
  if (auto it = by_id_.find(std::string(cert_id)); it != by_id_.end()) {
    auto cert = it->second.cert;
    for (const std::string& n : cert->names()) {
      if (CertPair* p = ed.find(key_of(n))) {
        auto& s = slot_of(*p, cert->key_kind());
        if (s == cert) s.reset();
        ed.erase_if_empty(key_of(n));
      }
    }
    by_id_.erase(it);
    changed = true;
  }
  for (auto* s : {&ed.default_pair().ecdsa, &ed.default_pair().rsa}) {
    if (*s && (*s)->id() == cert_id) {
      s->reset();
      changed = true;
    }
  }
  if (!changed) {
    remove_failed_.fetch_add(1, std::memory_order_relaxed);
    return fail(Errc::invalid_input, "remove: no certificate with id " + std::string(cert_id));
  }
  commit(ed.finish());
  remove_ok_.fetch_add(1, std::memory_order_relaxed);
  return {};
}

Status CertStore::remove_name(std::string_view name) {
  std::string lower(name);
  for (char& c : lower) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  if (!lower.empty() && lower.back() == '.') lower.pop_back();
  std::string_view key = key_of(lower);

  std::lock_guard lock(write_mu_);
  detail::SnapshotEditor ed(*current_);
  CertPair* p = key.empty() ? nullptr : ed.find(key);
  if (!p) {
    remove_failed_.fetch_add(1, std::memory_order_relaxed);
    return fail(Errc::invalid_input, "remove: no certificate for name " + std::string(name));
  }
  for (auto* s : {&p->ecdsa, &p->rsa}) {
    if (!*s) continue;
    auto it = by_id_.find((*s)->id());
    if (it != by_id_.end() && --it->second.slots == 0) by_id_.erase(it);
    s->reset();
  }
  ed.erase_if_empty(key);
  commit(ed.finish());
  remove_ok_.fetch_add(1, std::memory_order_relaxed);
  return {};
}

Status CertStore::set_default(std::shared_ptr<const Certificate> cert) {
  if (!cert) {
    publish_failed_.fetch_add(1, std::memory_order_relaxed);
    return fail(Errc::invalid_input, "set_default: null certificate");
  }
  std::lock_guard lock(write_mu_);
  detail::SnapshotEditor ed(*current_);
  slot_of(ed.default_pair(), cert->key_kind()) = std::move(cert);
  commit(ed.finish());
  publish_ok_.fetch_add(1, std::memory_order_relaxed);
  return {};
}

void CertStore::clear_default() {
  std::lock_guard lock(write_mu_);
  if (current_->default_pair().empty()) return;
  detail::SnapshotEditor ed(*current_);
  ed.default_pair() = CertPair{};
  commit(ed.finish());
}

}  // namespace autotls::tlsreload
