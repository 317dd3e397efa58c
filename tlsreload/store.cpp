#include "tlsreload/store.h"

#include <algorithm>
#include <bit>
#include <functional>
#include <unordered_set>
#include <utility>

namespace autotls::tlsreload {
namespace detail {

// NameHash is transparent so a lookup hashes a std::string_view over a stack buffer instead of
// building a std::string per handshake.
struct NameHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const noexcept {
    return std::hash<std::string_view>{}(s);
  }
};

// Shard is immutable once published; a writer copies the shards it changes.
struct Shard {
  std::unordered_map<std::string, CertPair, NameHash, std::equal_to<>> map;
};

}  // namespace detail

namespace {

static_assert(std::has_single_bit(kShardCount));
constexpr int kShardShift = 64 - std::countr_zero(kShardCount);
static_assert(sizeof(std::size_t) == 8);

// The high bits pick the shard; the shard's own map reduces the hash modulo a prime, so the
// two choices stay independent.
std::size_t shard_of(std::string_view key) {
  return detail::NameHash{}(key) >> kShardShift;
}

const std::shared_ptr<const detail::Shard>& empty_shard() {
  // Leaked: thread-local snapshot caches may outlive function-local statics at exit.
  static const auto* empty =
      new std::shared_ptr<const detail::Shard>(std::make_shared<detail::Shard>());
  return *empty;
}

// Lookup names are at most 253 characters (RFC 1035 §2.3.4) plus an optional trailing dot.
constexpr std::size_t kMaxName = 253;

// normalize_sni lower-cases sni into buf and drops one trailing dot. Returns the length, or 0
// for a name that cannot be a key (empty, too long, leading dot, a byte outside
// [A-Za-z0-9-_.:]), which then only gets the default certificate. A leading dot is refused so
// that a client cannot name a wildcard key (".example.com") directly.
std::size_t normalize_sni(std::string_view sni, char* buf) {
  if (!sni.empty() && sni.back() == '.') sni.remove_suffix(1);
  if (sni.empty() || sni.size() > kMaxName || sni.front() == '.') return 0;
  for (std::size_t i = 0; i < sni.size(); ++i) {
    char c = sni[i];
    if (c >= 'A' && c <= 'Z') {
      c = static_cast<char>(c - 'A' + 'a');
    } else if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '.' ||
                 c == '_' || c == ':')) {
      return 0;
    }
    buf[i] = c;
  }
  return sni.size();
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
// slot of a destroyed store simply never matches again.
struct CacheSlot {
  std::uint64_t store_id = 0;
  std::uint64_t version = 0;
  std::shared_ptr<const Snapshot> snapshot;
};
constexpr std::size_t kCacheSlots = 4;
thread_local std::array<CacheSlot, kCacheSlots> tl_cache;
thread_local std::size_t tl_next_victim = 0;

}  // namespace

namespace detail {

// SnapshotEditor builds the next snapshot from the current one, copying only the shards it
// touches (copy-on-write). Used by writers with CertStore::write_mu_ held.
struct SnapshotEditor {
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
    const Shard& shard = *s.shards_[shard_of(key)];
    auto it = shard.map.find(key);
    return it == shard.map.end() ? nullptr : &it->second;
  }

  CertPair* find(std::string_view key) {
    const Shard& shard = *next->shards_[shard_of(key)];
    auto it = shard.map.find(key);
    if (it == shard.map.end()) return nullptr;
    // The entry is about to change: move it into this snapshot's private copy of the shard.
    return &writable(shard_of(key)).map.find(key)->second;
  }

  CertPair& upsert(std::string_view key) {
    auto& map = writable(shard_of(key)).map;
    auto it = map.find(key);
    if (it == map.end()) {
      it = map.emplace(std::string(key), CertPair{}).first;
      ++next->name_count_;
    }
    return it->second;
  }

  void erase_if_empty(std::string_view key) {
    auto& map = writable(shard_of(key)).map;
    auto it = map.find(key);
    if (it != map.end() && it->second.empty()) {
      map.erase(it);
      --next->name_count_;
    }
  }

  CertPair& default_pair() { return next->default_; }

  std::shared_ptr<Snapshot> next;

 private:
  Shard& writable(std::size_t index) {
    for (auto& [i, s] : copied_) {
      if (i == index) return *s;
    }
    auto copy = std::make_shared<Shard>(*next->shards_[index]);
    Shard* raw = copy.get();
    next->shards_[index] = std::move(copy);
    copied_.emplace_back(index, raw);
    return *raw;
  }

  // A certificate has few names, so a linear list beats a set here.
  std::vector<std::pair<std::size_t, Shard*>> copied_;
};

}  // namespace detail

// ---- Snapshot ----

const std::shared_ptr<const Certificate>* Snapshot::find(std::string_view sni,
                                                        bool client_supports_ecdsa) const {
  const std::shared_ptr<const Certificate>* fallback = nullptr;
  auto pick = [&](const CertPair& p) -> const std::shared_ptr<const Certificate>* {
    const auto& wanted = client_supports_ecdsa ? p.ecdsa : p.rsa;
    if (wanted) return &wanted;
    const auto& other = client_supports_ecdsa ? p.rsa : p.ecdsa;
    if (other && !fallback) fallback = &other;
    return nullptr;
  };
  auto entry = [&](std::string_view key) -> const CertPair* {
    const detail::Shard& shard = *shards_[shard_of(key)];
    auto it = shard.map.find(key);
    return it == shard.map.end() ? nullptr : &it->second;
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
    for (const auto& [key, pair] : shard->map) {
      add(pair.ecdsa);
      add(pair.rsa);
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
  // next now holds the previous snapshot; it is released here, outside current_mu_, so a
  // reader refreshing its cache never waits for memory to be freed.
}

const Snapshot& CertStore::pinned() const {
  std::uint64_t v = version_.load(std::memory_order_acquire);
  CacheSlot* slot = nullptr;
  for (CacheSlot& s : tl_cache) {
    if (s.store_id == id_) {
      if (s.version == v) return *s.snapshot;  // the common path: no lock, no RMW
      slot = &s;
      break;
    }
  }
  if (!slot) {
    slot = &tl_cache[tl_next_victim];
    tl_next_victim = (tl_next_victim + 1) % kCacheSlots;
    slot->store_id = id_;
  }
  std::shared_ptr<const Snapshot> fresh;
  {
    std::lock_guard lock(current_mu_);
    fresh = current_;
  }
  slot->version = fresh->version();
  slot->snapshot.swap(fresh);  // the old snapshot (if last) is freed here, outside the lock
  return *slot->snapshot;
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

Status CertStore::publish(std::shared_ptr<const Certificate> cert) {
  auto refuse = [&](std::string msg) {
    publish_failed_.fetch_add(1, std::memory_order_relaxed);
    return fail(Errc::invalid_input, "publish: " + std::move(msg));
  };
  if (!cert) return refuse("null certificate");
  for (const std::string& name : cert->names()) {
    if (!is_valid_lookup_name(name)) return refuse("unusable name \"" + name + "\"");
  }

  std::lock_guard lock(write_mu_);
  const Snapshot& base = *current_;  // only writers replace current_, and we hold write_mu_
  KeyKind kind = cert->key_kind();

  // A reload of unchanged files re-publishes the same certificate: skip the new version.
  bool already = std::all_of(cert->names().begin(), cert->names().end(), [&](const std::string& n) {
    const CertPair* p = detail::SnapshotEditor::peek(base, key_of(n));
    const std::shared_ptr<const Certificate>* held = p ? &(kind == KeyKind::ecdsa ? p->ecdsa : p->rsa) : nullptr;
    return held && *held && (*held)->id() == cert->id();
  });
  if (already) {
    publish_ok_.fetch_add(1, std::memory_order_relaxed);
    return {};
  }

  detail::SnapshotEditor ed(base);
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
  commit(std::move(ed.next));
  publish_ok_.fetch_add(1, std::memory_order_relaxed);
  return {};
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
  commit(std::move(ed.next));
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
  commit(std::move(ed.next));
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
  commit(std::move(ed.next));
  publish_ok_.fetch_add(1, std::memory_order_relaxed);
  return {};
}

void CertStore::clear_default() {
  std::lock_guard lock(write_mu_);
  if (current_->default_pair().empty()) return;
  detail::SnapshotEditor ed(*current_);
  ed.default_pair() = CertPair{};
  commit(std::move(ed.next));
}

}  // namespace autotls::tlsreload
