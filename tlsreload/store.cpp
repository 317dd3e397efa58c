#include "tlsreload/store.h"

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstring>
#include <deque>
#include <functional>
#include <unordered_set>
#include <new>
#include <utility>

#include <sys/mman.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace autotls::tlsreload {
namespace detail {

// TablePool holds what a lookup reads past the snapshot (the shards' slot arrays and the shard
// groups) in 2 MiB chunks marked for transparent huge pages. At 100,000 names the slot
// arrays are ~16 MiB and a lookup reads one slot at a random place in them: in 4 KiB pages
// that is ~4,000 pages, about the second-level TLB's reach, so most lookups paid a page walk
// (two-dimensional under a hypervisor) on top of the cache miss, and the cost moved with how
// the heap happened to lay the arrays out and with what else ran on the core (the 49 vs 56 ns
// medians of two builds with identical lookup code). In huge pages the whole index is ~9 TLB
// entries. Blocks are powers of two from 128 bytes to kMaxPooled, carved from the chunks and
// recycled through one free list per size; chunks are never returned (the pool's size is the
// peak of the tables, a few hundred bytes per name). Larger blocks (a shard of over 2,000
// names) come from operator new. Only writers and the code freeing a snapshot allocate or
// free here, never a lookup, so the mutex is no more than malloc's own arena lock.
class alignas(64) TablePool {  // its own cache lines: writers update it, lookups never read it
 public:
  static constexpr std::size_t kChunk = std::size_t{2} << 20;
  static constexpr std::size_t kMinBlock = 128;
  static constexpr std::size_t kMaxPooled = kChunk / 8;

  // The pool is leaked: a thread's cached snapshot may be freed after static destructors ran.
  static TablePool& instance() {
    static TablePool* pool = new TablePool;
    return *pool;
  }

  // block_size is what allocate(bytes) takes: a power of two of at least kMinBlock.
  static std::size_t block_size(std::size_t bytes) { return std::bit_ceil(std::max(bytes, kMinBlock)); }

  // allocate returns block_size(bytes) bytes aligned to 64 (throws std::bad_alloc like new).
  void* allocate(std::size_t bytes) {
    const std::size_t size = block_size(bytes);
    if (size > kMaxPooled) return ::operator new(size, std::align_val_t{64});
    const int c = std::countr_zero(size);
    std::lock_guard lock(mu_);
    if (FreeBlock* b = free_[c]) {
      free_[c] = b->next;
      return b;
    }
    if (static_cast<std::size_t>(end_ - next_) < size) {
      // Keep the chunk's tail: it splits into smaller blocks (next_ stays a multiple of
      // kMinBlock from a 2 MiB-aligned start).
      while (static_cast<std::size_t>(end_ - next_) >= kMinBlock) {
        const std::size_t piece = std::bit_floor(static_cast<std::size_t>(end_ - next_));
        push(next_, piece);
        next_ += piece;
      }
      next_ = new_chunk();
      end_ = next_ + kChunk;
    }
    void* p = next_;
    next_ += size;
    return p;
  }

  void deallocate(void* p, std::size_t bytes) {
    const std::size_t size = block_size(bytes);
    if (size > kMaxPooled) return ::operator delete(p, size, std::align_val_t{64});
    std::lock_guard lock(mu_);
    push(static_cast<char*>(p), size);
  }

 private:
  struct FreeBlock {
    FreeBlock* next;
  };

  void push(char* p, std::size_t size) {
    auto* b = new (p) FreeBlock{free_[std::countr_zero(size)]};
    free_[std::countr_zero(size)] = b;
  }

  // new_chunk maps kChunk bytes aligned to kChunk (a huge page can only back an aligned 2 MiB
  // range) and asks for huge pages; where THP is off it still works, with 4 KiB pages.
  static char* new_chunk() {
    void* m = mmap(nullptr, 2 * kChunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw std::bad_alloc();
    char* raw = static_cast<char*>(m);
    char* start = reinterpret_cast<char*>((reinterpret_cast<std::uintptr_t>(raw) + kChunk - 1) & ~(kChunk - 1));
    if (start != raw) munmap(raw, static_cast<std::size_t>(start - raw));
    if (std::size_t tail = static_cast<std::size_t>(raw + 2 * kChunk - (start + kChunk))) {
      munmap(start + kChunk, tail);
    }
    (void)madvise(start, kChunk, MADV_HUGEPAGE);
    return start;
  }

  std::mutex mu_;
  std::array<FreeBlock*, 64> free_{};  // by log2 of the block size
  char* next_ = nullptr;
  char* end_ = nullptr;
};

// name_hash is a wyhash-style hash (multiply-fold of 64-bit words, written for this file):
// SNI names are short, and std::hash<string_view> (murmur over bytes) was a fifth of a lookup.
// Only our own certificate names are inserted, so a peer cannot choose colliding keys; its
// names only probe.
inline std::uint64_t mix(std::uint64_t a, std::uint64_t b) {
  __uint128_t r = static_cast<__uint128_t>(a) * b;
  return static_cast<std::uint64_t>(r) ^ static_cast<std::uint64_t>(r >> 64);
}
// Padded: the caller guarantees that the 7 bytes after the key are readable (a lookup's
// normalized copy), so the tail is one masked load instead of a variable-length copy. Both
// variants give the same hash.
template <bool Padded = false>
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
  if constexpr (Padded) {
    std::memcpy(&w, p, 8);
    w &= n == 0 ? 0 : ~std::uint64_t{0} >> (64 - 8 * n);
  } else {
    std::memcpy(&w, p, n);  // n < 8
  }
  return mix(mix(h ^ w, k2), k1 ^ s.size());
}

// Slot is one entry of a shard's open-addressing table, one cache line: a lookup that hits at
// the first probe reads this line and nothing else of the store (the key is inline when it
// fits, which covers most names; longer keys live in Shard::long_keys). The certificate
// pointers are raw copies of the shared_ptrs in Shard::entries, which own them.
inline constexpr std::size_t kInlineKey = 31;
struct alignas(64) Slot {
  std::uint64_t hash = 0;
  const Certificate* ecdsa = nullptr;
  const Certificate* rsa = nullptr;
  const CertPair* pair = nullptr;  // in Shard::entries
  char key[kInlineKey] = {};       // the key, or (length > kInlineKey) a pointer to it
  std::uint8_t length = 0;         // key length, 0: empty slot (keys are never empty)

  const char* key_data() const {
    if (length <= kInlineKey) return key;
    const char* p;
    std::memcpy(&p, key, sizeof p);
    return p;
  }

  // same_key compares the slot's key with key, of the same length. Padded as in name_hash:
  // an inline key is then compared 8 bytes at a time (key[] is followed by length, so the
  // last word stays inside the slot), masking the bytes past the end.
  template <bool Padded>
  bool same_key(std::string_view k) const {
    if (!Padded || length > kInlineKey) return std::memcmp(key_data(), k.data(), k.size()) == 0;
    std::uint64_t diff = 0;
    std::size_t i = 0;
    for (; i + 8 <= k.size(); i += 8) {
      std::uint64_t a, b;
      std::memcpy(&a, key + i, 8);
      std::memcpy(&b, k.data() + i, 8);
      diff |= a ^ b;
    }
    if (std::size_t rest = k.size() - i) {
      std::uint64_t a, b;
      std::memcpy(&a, key + i, 8);
      std::memcpy(&b, k.data() + i, 8);
      diff |= (a ^ b) & (~std::uint64_t{0} >> (64 - 8 * rest));
    }
    return diff == 0;
  }

  // probe finds key (whose name_hash is h) in a table of mask + 1 slots, linear probing.
  template <bool Padded = false>
  static const Slot* probe(const Slot* slots, std::uint64_t mask, std::string_view key,
                           std::uint64_t h) {
    for (std::uint64_t i = h & mask;; i = (i + 1) & mask) {
      const Slot& s = slots[i];
      if (s.length == 0) return nullptr;
      if (s.hash == h && s.length == key.size() && s.same_key<Padded>(key)) return &s;
    }
  }
};
static_assert(offsetof(Slot, length) == 63);
static_assert(sizeof(Slot) == 64);

// Shard is a flat open-addressing table (linear probing, at most half full), immutable once
// published; a writer edits a copy (SnapshotEditor) and freezes it into a new Shard.
struct Shard {
  Slot* slots = nullptr;  // mask + 1 of them, a power of two, in TablePool
  std::uint64_t mask = 0;
  std::vector<CertPair> entries;  // owns the certificates; slots point here
  std::string long_keys;          // keys longer than kInlineKey, back to back

  Shard() = default;
  Shard(const Shard&) = delete;
  Shard& operator=(const Shard&) = delete;
  ~Shard() {
    if (slots != nullptr) TablePool::instance().deallocate(slots, (mask + 1) * sizeof(Slot));
  }

  std::size_t count() const { return entries.size(); }

  // An entry being edited: its key points into the shard it was thawed from (kept alive by
  // the editor) or into SnapshotEditor::arena_.
  struct Draft {
    std::uint64_t hash;
    std::string_view key;
    CertPair pair;
  };

  static std::shared_ptr<const Shard> freeze(std::vector<Draft>& drafts) {
    std::shared_ptr<Shard> shard(new Shard);
    const std::size_t count = drafts.size();
    std::size_t size = 2;
    while (size < 2 * count) size *= 2;
    void* block = TablePool::instance().allocate(size * sizeof(Slot));
    Slot* slots = static_cast<Slot*>(block);
    for (std::size_t i = 0; i < size; ++i) new (slots + i) Slot;  // empty (zeroed) slots
    shard->slots = slots;
    shard->mask = size - 1;
    shard->entries.reserve(count);  // never reallocated: slots point into it
    std::size_t long_bytes = 0;
    for (const Draft& d : drafts) {
      if (d.key.size() > kInlineKey) long_bytes += d.key.size();
    }
    shard->long_keys.reserve(long_bytes);  // never reallocated: slots point into it
    for (Draft& d : drafts) {
      std::uint64_t i = d.hash & shard->mask;
      while (shard->slots[i].length != 0) i = (i + 1) & shard->mask;
      Slot& slot = shard->slots[i];
      slot.hash = d.hash;
      slot.length = static_cast<std::uint8_t>(d.key.size());
      if (d.key.size() <= kInlineKey) {
        std::memcpy(slot.key, d.key.data(), d.key.size());
      } else {
        const char* p = shard->long_keys.data() + shard->long_keys.size();
        shard->long_keys += d.key;
        std::memcpy(slot.key, &p, sizeof p);
      }
      const CertPair& pair = shard->entries.emplace_back(std::move(d.pair));
      slot.pair = &pair;
      slot.ecdsa = pair.ecdsa.get();
      slot.rsa = pair.rsa.get();
    }
    return shard;
  }
};

inline constexpr std::size_t kGroupSize = kShardCount / kShardGroups;
static_assert(kShardCount % kShardGroups == 0);

// ShardGroup: tables first (what lookups read), on their own cache lines; allocated with
// new, not make_shared, so the reference count that every publish bumps is elsewhere.
// Groups live in TablePool with the slot arrays, so the lookup path's two reads past the
// snapshot share the same few huge-page TLB entries.
struct alignas(64) ShardGroup {
  std::array<ShardTable, kGroupSize> tables;
  std::array<std::shared_ptr<const Shard>, kGroupSize> shards;

  static void* operator new(std::size_t n, std::align_val_t) { return TablePool::instance().allocate(n); }
  static void operator delete(void* p, std::size_t n, std::align_val_t) {
    TablePool::instance().deallocate(p, n);
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
    std::vector<detail::Shard::Draft> none;
    return detail::Shard::freeze(none);
  }());
  return *empty;
}

const std::shared_ptr<const detail::ShardGroup>& empty_group() {
  static const auto* empty = new std::shared_ptr<const detail::ShardGroup>([] {
    std::shared_ptr<detail::ShardGroup> g(new detail::ShardGroup);
    g->shards.fill(empty_shard());
    g->tables.fill({empty_shard()->slots, empty_shard()->mask});
    return g;
  }());
  return *empty;
}

}  // namespace

namespace detail {

namespace {

// sni_key_length strips one trailing dot from sni and returns its length, or 0 when it cannot
// be a key for its length or its first byte (the rest is the alphabet test).
std::size_t sni_key_length(std::string_view& sni) {
  if (!sni.empty() && sni.back() == '.') sni.remove_suffix(1);
  const std::size_t n = sni.size();
  return n == 0 || n > kMaxSniName || sni.front() == '.' ? 0 : n;
}

}  // namespace

// normalize_sni_swar works on 8 bytes at a time with SWAR range tests on each byte: the
// lookup's normalization where SSE2 is missing, and the reference the tests hold the SSE2
// version to.
std::size_t normalize_sni_swar(std::string_view sni, char* buf) {
  const std::size_t n = sni_key_length(sni);
  if (n == 0) return 0;
  const char* p = sni.data();
  constexpr std::uint64_t ones = 0x0101010101010101ull, high = 0x8080808080808080ull;
  // in(x, lo, hi): 0x80 in each byte of x (all below 0x80) that lies in [lo, hi]; no carry
  // crosses bytes because every byte sum stays below 0x100.
  auto in = [](std::uint64_t x, std::uint64_t lo, std::uint64_t hi) {
    return (x + ones * (0x80 - lo)) & ~(x + ones * (0x7f - hi)) & high;
  };
  std::uint64_t bad = 0;
  // Words are read straight from sni and written to buf whole (8-byte loads of buf later then
  // forward from one store each; copying first with memcpy stalled store forwarding).
  auto one = [&](std::uint64_t x, std::size_t i, std::uint64_t live) {
    std::uint64_t ascii = ~x & high;
    std::uint64_t y = x & ~high;  // in() needs bytes below 0x80; ascii covers the rest
    std::uint64_t letter = in(y | ones * 0x20, 'a', 'z');
    std::uint64_t ok = letter | in(y, '0', '9') | in(y, '-', '.') | in(y, ':', ':') | in(y, '_', '_');
    bad |= ~(ok & ascii) & high & live;
    x = (x | letter >> 2) & live;  // 0x80 >> 2 == 0x20: lower case
    std::memcpy(buf + i, &x, 8);
  };
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    std::uint64_t x;
    std::memcpy(&x, p + i, 8);
    one(x, i, ~std::uint64_t{0});
  }
  const std::size_t rest = n - i;
  std::uint64_t tail = 0;
  if (rest != 0) {
    if (n >= 8) {
      std::memcpy(&tail, p + n - 8, 8);  // the last 8 bytes; keep the top `rest` of them
      tail >>= 8 * (8 - rest);
    } else {
      for (std::size_t k = 0; k < rest; ++k) {
        tail |= std::uint64_t{static_cast<unsigned char>(p[k])} << (8 * k);
      }
    }
    one(tail, i, ~std::uint64_t{0} >> (64 - 8 * rest));
  }
  if (rest == 0) std::memset(buf + n, 0, 8);
  return bad ? 0 : n;
}

// normalize_sni (store.h) works on 16 bytes at a time with SSE2, which every x86-64 has: 85
// instructions against the SWAR version's 195 for a 17-byte name (callgrind), where the
// normalization was 47 % of a lookup's instructions (195 of 413).
std::size_t normalize_sni(std::string_view sni, char* buf) {
#if !defined(__SSE2__)
  return normalize_sni_swar(sni, buf);
#else
  const std::size_t n = sni_key_length(sni);
  if (n == 0) return 0;
  const char* p = sni.data();
  // lower lower-cases the 16 bytes of x into out and returns a 16-bit mask of the bytes outside
  // the name alphabet.
  auto lower = [](__m128i x, __m128i& out) -> unsigned {
    // range: 0xff in each byte of v in [lo, hi]. SSE2 compares only signed bytes, so the
    // unsigned test (v - lo) mod 256 <= hi - lo is made signed by adding 0x80 to both sides:
    // (v + 0x80 - lo) as a signed byte < hi - lo - 127. A byte of 0x80 or above is then in no
    // range (the lowest range starts at '-', and the widest spans 26 values).
    auto range = [](__m128i v, char lo, char hi) {
      return _mm_cmpgt_epi8(_mm_set1_epi8(static_cast<char>(hi - lo - 127)),
                            _mm_add_epi8(v, _mm_set1_epi8(static_cast<char>(0x80 - lo))));
    };
    x = _mm_or_si128(x, _mm_and_si128(range(x, 'A', 'Z'), _mm_set1_epi8(0x20)));
    // After lower-casing: a-z, 0-9 and ':' (0x30-0x3a), '-' and '.' (0x2d-0x2e), '_'.
    __m128i ok = _mm_or_si128(_mm_or_si128(range(x, 'a', 'z'), range(x, '0', ':')),
                              _mm_or_si128(range(x, '-', '.'), _mm_cmpeq_epi8(x, _mm_set1_epi8('_'))));
    out = x;
    return ~static_cast<unsigned>(_mm_movemask_epi8(ok)) & 0xffffu;
  };
  // Every store to buf is 16 bytes at a multiple of 16, and the key's zero padding is part of
  // the last one: the lookup then reads buf 8 bytes at a time, and each of those loads is
  // forwarded from one store (a load spanning two stores stalls: an earlier version that
  // wrote the tail overlapping the chunk before was slower than the SWAR path).
  unsigned bad = 0;
  __m128i out;
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    bad |= lower(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i)), out);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(buf + i), out);
  }
  const std::size_t r = n - i;
  if (r == 0) {
    std::memset(buf + n, 0, 8);
    return bad ? 0 : n;
  }
  // The last r (< 16) bytes, gathered in registers with loads inside sni only (overlapping
  // loads of the same bytes, so OR-ing them is exact); the bytes past r are zero.
  auto load8 = [](const char* q) {
    std::uint64_t w;
    std::memcpy(&w, q, 8);
    return w;
  };
  std::uint64_t w0, w1 = 0;
  if (r >= 8) {
    w0 = load8(p + i);
    if (r > 8) w1 = load8(p + n - 8) >> (8 * (16 - r));
  } else if (n >= 8) {
    w0 = load8(p + n - 8) >> (8 * (8 - r));
  } else if (r >= 4) {
    std::uint32_t a, b;
    std::memcpy(&a, p, 4);
    std::memcpy(&b, p + r - 4, 4);
    w0 = a | std::uint64_t{b} << (8 * (r - 4));
  } else {
    auto byte = [&](std::size_t k) { return std::uint64_t{static_cast<unsigned char>(p[k])}; };
    w0 = byte(0) | byte(r / 2) << (8 * (r / 2)) | byte(r - 1) << (8 * (r - 1));
  }
  // The zero bytes past r are outside the alphabet: only the first r bits of the mask count.
  bad |= lower(_mm_set_epi64x(static_cast<long long>(w1), static_cast<long long>(w0)), out) & ((1u << r) - 1);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(buf + i), out);  // buf[n, i + 16) = 0
  return bad ? 0 : n;
#endif
}

}  // namespace detail

namespace {

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
// touches (copy-on-write): a touched shard is thawed into a small vector of drafts (about 100
// at 100,000 names; found by hash with a linear scan, no allocation per key), edited, and
// frozen into a new flat Shard by finish(), which also copies the touched shard groups (32
// tables and 32 shard pointers each).
// Used by writers with CertStore::write_mu_ held. A CertPair pointer or reference it returns
// is valid until the next call that edits.
struct SnapshotEditor {
  using Draft = Shard::Draft;
  struct Thawed {
    std::shared_ptr<const Shard> from;  // keeps the drafts' keys alive
    std::vector<Draft> drafts;

    Draft* find(std::string_view key, std::uint64_t h) {
      for (Draft& d : drafts) {
        if (d.hash == h && d.key == key) return &d;
      }
      return nullptr;
    }
  };

  explicit SnapshotEditor(const Snapshot& base) : next(new Snapshot(base)) {
    next->version_ = base.version_ + 1;
  }

  static std::shared_ptr<const Snapshot> empty() {
    std::shared_ptr<Snapshot> s(new Snapshot());
    s->version_ = 1;
    s->groups_.fill(empty_group());
    return s;
  }

  static const Slot* probe(const Snapshot& s, std::string_view key, std::uint64_t h) {
    std::size_t i = shard_of(h);
    const ShardTable& t = s.groups_[i / kGroupSize]->tables[i % kGroupSize];
    return Slot::probe(t.slots, t.mask, key, h);
  }

  static const CertPair* peek(const Snapshot& s, std::string_view key) {
    const Slot* slot = probe(s, key, name_hash(key));
    return slot ? slot->pair : nullptr;
  }

  static const std::shared_ptr<const Shard>& shard(const Snapshot& s, std::size_t index) {
    return s.groups_[index / kGroupSize]->shards[index % kGroupSize];
  }

  // current returns the entry as edited so far (nullptr if absent), without copying.
  const CertPair* current(std::string_view key) {
    std::uint64_t h = name_hash(key);
    if (Thawed* t = thawed(shard_of(h))) {
      Draft* d = t->find(key, h);
      return d ? &d->pair : nullptr;
    }
    const Slot* slot = probe(*next, key, h);
    return slot ? slot->pair : nullptr;
  }

  CertPair* find(std::string_view key) {
    std::uint64_t h = name_hash(key);
    if (!thawed(shard_of(h)) && !probe(*next, key, h)) return nullptr;
    Draft* d = writable(shard_of(h)).find(key, h);
    return d ? &d->pair : nullptr;
  }

  CertPair& upsert(std::string_view key) {
    std::uint64_t h = name_hash(key);
    Thawed& t = writable(shard_of(h));
    if (Draft* d = t.find(key, h)) return d->pair;
    ++next->name_count_;
    return t.drafts.emplace_back(Draft{h, keep(key), {}}).pair;
  }

  void erase_if_empty(std::string_view key) {
    std::uint64_t h = name_hash(key);
    Thawed& t = writable(shard_of(h));
    Draft* d = t.find(key, h);
    if (d && d->pair.empty()) {
      if (d != &t.drafts.back()) *d = std::move(t.drafts.back());
      t.drafts.pop_back();
      --next->name_count_;
    }
  }

  CertPair& default_pair() { return next->default_; }

  // finish freezes the edited shards and returns the snapshot to commit.
  std::shared_ptr<const Snapshot> finish() {
    std::array<std::shared_ptr<ShardGroup>, kShardGroups> copied;
    for (auto& [index, t] : thawed_) {
      auto frozen = t.drafts.empty() ? empty_shard() : Shard::freeze(t.drafts);
      auto& group = copied[index / kGroupSize];
      if (!group) {
        group.reset(new ShardGroup(*next->groups_[index / kGroupSize]));
        next->groups_[index / kGroupSize] = group;
      }
      group->tables[index % kGroupSize] = {frozen->slots, frozen->mask};
      group->shards[index % kGroupSize] = std::move(frozen);
    }
    thawed_.clear();
    where_ = make_where();
    return std::move(next);
  }

  std::shared_ptr<Snapshot> next;

 private:
  Thawed* thawed(std::size_t index) {
    return where_[index] < 0 ? nullptr : &thawed_[static_cast<std::size_t>(where_[index])].second;
  }

  Thawed& writable(std::size_t index) {
    if (Thawed* t = thawed(index)) return *t;
    where_[index] = static_cast<std::int16_t>(thawed_.size());
    Thawed& t = thawed_.emplace_back(index, Thawed{}).second;
    t.from = shard(*next, index);
    t.drafts.reserve(t.from->count() + 1);
    // Copying a CertPair increments two reference counts spread over the heap; locked
    // increments do not overlap their cache misses, so fetch those lines first, all at once
    // (~10 us less per edit of a cold shard at 100,000 names). Certificates are allocated
    // with make_shared: the count sits just before the object.
    for (std::size_t i = 0; i <= t.from->mask; ++i) {
      const Slot& s = t.from->slots[i];
      for (const Certificate* c : {s.ecdsa, s.rsa}) {
        if (c) __builtin_prefetch(reinterpret_cast<const char*>(c) - 16, 1);
      }
    }
    for (std::size_t i = 0; i <= t.from->mask; ++i) {
      const Slot& s = t.from->slots[i];
      if (s.length != 0) t.drafts.push_back(Draft{s.hash, {s.key_data(), s.length}, *s.pair});
    }
    return t;
  }

  // The thawed shards, and where_[shard index] = position in thawed_ or -1.
  std::deque<std::pair<std::size_t, Thawed>> thawed_;
  std::array<std::int16_t, kShardCount> where_ = make_where();
  static constexpr std::array<std::int16_t, kShardCount> make_where() {
    std::array<std::int16_t, kShardCount> w{};
    w.fill(-1);
    return w;
  }
  // keep copies a new key into arena_ (64 KiB chunks: a bulk load adds 100,000 keys, and one
  // allocation each was a fifth of publish_batch).
  std::string_view keep(std::string_view key) {
    constexpr std::size_t kChunk = 64 * 1024;  // > kMaxSniName
    if (arena_.empty() || arena_used_ + key.size() > kChunk) {
      arena_.push_back(std::make_unique_for_overwrite<char[]>(kChunk));
      arena_used_ = 0;
    }
    char* p = arena_.back().get() + arena_used_;
    std::memcpy(p, key.data(), key.size());
    arena_used_ += key.size();
    return {p, key.size()};
  }
  std::vector<std::unique_ptr<char[]>> arena_;
  std::size_t arena_used_ = 0;
};

}  // namespace detail

// ---- Snapshot ----

template <bool Borrowed>
auto Snapshot::find_impl(std::string_view sni, bool client_supports_ecdsa, bool* missed) const {
  using R = std::conditional_t<Borrowed, const Certificate*, const std::shared_ptr<const Certificate>*>;
  R fallback = nullptr;
  // A certificate whose deferred verification failed is never served: as if absent. Reading
  // its state costs a cache miss per lookup at 100,000 certificates, so it is skipped while no
  // certificate in the process has ever failed (the usual case).
  const bool check_failed = detail::g_any_verify_failed.load(std::memory_order_relaxed);
  auto usable = [check_failed](const Certificate* c) {
    return c && (!check_failed || c->verification() != Verification::failed);
  };
  // pick chooses from one entry; ecdsa/rsa are the raw pointers of *pair (read from the slot,
  // so the borrowed path never reads the CertPair).
  auto pick = [&](const Certificate* ecdsa, const Certificate* rsa, const CertPair* pair) -> R {
    const Certificate* wanted = client_supports_ecdsa ? ecdsa : rsa;
    const Certificate* other = client_supports_ecdsa ? rsa : ecdsa;
    if (usable(wanted)) {
      if constexpr (Borrowed) {
        return wanted;
      } else {
        return client_supports_ecdsa ? &pair->ecdsa : &pair->rsa;
      }
    }
    if (!fallback && usable(other)) {
      if constexpr (Borrowed) {
        fallback = other;
      } else {
        fallback = client_supports_ecdsa ? &pair->rsa : &pair->ecdsa;
      }
    }
    return nullptr;
  };
  auto entry = [&](std::string_view key) -> const detail::Slot* {
    std::uint64_t h = detail::name_hash<true>(key);
    std::size_t i = shard_of(h);
    const detail::ShardTable& t = groups_[i / detail::kGroupSize]->tables[i % detail::kGroupSize];
    return detail::Slot::probe<true>(t.slots, t.mask, key, h);
  };

  char buf[kMaxSniName + 16];
  std::size_t n = detail::normalize_sni(sni, buf);
  if (n != 0) {
    std::string_view name(buf, n);
    if (const detail::Slot* s = entry(name)) {
      if (R r = pick(s->ecdsa, s->rsa, s->pair)) return r;
    }
    // RFC 6125 §6.4.3: the wildcard stands for exactly one whole left-most label, so the only
    // candidate key is the suffix after the first label.
    std::size_t dot = name.find('.');
    if (dot != std::string_view::npos && dot + 1 < n) {
      if (const detail::Slot* s = entry(name.substr(dot))) {
        if (R r = pick(s->ecdsa, s->rsa, s->pair)) return r;
      }
    }
  }
  // From here on no name answered in the wanted family: the miss path. A fallback set above
  // is a named certificate of the other family; one set by the default step is not.
  const bool named_fallback = fallback != nullptr;
  if (R r = pick(default_.ecdsa.get(), default_.rsa.get(), &default_)) {
    if (missed) *missed = true;
    return r;
  }
  if (missed && !named_fallback) *missed = true;
  return fallback;
}

const std::shared_ptr<const Certificate>* Snapshot::find(std::string_view sni,
                                                        bool client_supports_ecdsa) const {
  return find_impl<false>(sni, client_supports_ecdsa, nullptr);
}

const Certificate* Snapshot::find_borrowed(std::string_view sni, bool client_supports_ecdsa,
                                           bool* missed) const {
  return find_impl<true>(sni, client_supports_ecdsa, missed);
}

const CertPair* Snapshot::entry(std::string_view name) const {
  std::string lower(name);
  for (char& c : lower) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  if (!lower.empty() && lower.back() == '.') lower.pop_back();
  std::string_view key = key_of(lower);
  return key.empty() ? nullptr : detail::SnapshotEditor::peek(*this, key);
}

std::vector<std::shared_ptr<const Certificate>> Snapshot::certificates() const {
  std::unordered_set<const Certificate*> seen;
  std::vector<std::shared_ptr<const Certificate>> out;
  auto add = [&](const std::shared_ptr<const Certificate>& c) {
    if (c && seen.insert(c.get()).second) out.push_back(c);
  };
  for (const auto& group : groups_) {
    for (const auto& shard : group->shards) {
      for (const CertPair& pair : shard->entries) {
        add(pair.ecdsa);
        add(pair.rsa);
      }
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
      published_(detail::SnapshotEditor::empty()) {
  version_.store(published_.current()->version(), std::memory_order_release);
}

CertStore::~CertStore() = default;

// commit publishes next (see detail::HazardPublished::publish for why a replaced snapshot is
// freed only once no reader holds or is taking it), then its version for the readers'
// revalidation: a reader that sees the new version acquires the new snapshot or a later one.
void CertStore::commit(std::shared_ptr<const Snapshot> next) {
  std::uint64_t v = next->version();
  published_.publish(std::move(next));
  version_.store(v, std::memory_order_release);
}

// Inlined into the lookups: a call here made lookup_for_handshake save and restore its
// `missed` pointer around it (6 instructions a lookup, measured with callgrind); inline, the
// hit path takes fewer instructions than before the flag existed.
[[gnu::always_inline]] inline const Snapshot& CertStore::pinned() const {
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
  std::shared_ptr<const Snapshot> fresh = published_.acquire();
  slot.version = fresh->version();
  slot.raw = fresh.get();
  // The previous snapshot is parked by the writer (HazardPublished::publish), so dropping it here is one
  // atomic decrement, never the free.
  slot.snapshot.swap(fresh);
  return *slot.raw;
}

std::shared_ptr<const Certificate> CertStore::lookup(std::string_view sni,
                                                     bool client_supports_ecdsa) const {
  const auto* found = pinned().find(sni, client_supports_ecdsa);
  return found ? *found : nullptr;
}

std::shared_ptr<const Certificate> CertStore::lookup_name(std::string_view name,
                                                          bool client_supports_ecdsa) const {
  const Snapshot& s = pinned();
  std::shared_ptr<const Certificate> fallback;
  auto usable = [](const std::shared_ptr<const Certificate>& c) {
    return c && c->verification() != Verification::failed;
  };
  // pick as in Snapshot::find: the wanted family, else remember the other for the end.
  auto pick = [&](const CertPair* p) -> std::shared_ptr<const Certificate> {
    if (!p) return nullptr;
    const auto& wanted = client_supports_ecdsa ? p->ecdsa : p->rsa;
    const auto& other = client_supports_ecdsa ? p->rsa : p->ecdsa;
    if (usable(wanted)) return wanted;
    if (!fallback && usable(other)) fallback = other;
    return nullptr;
  };
  if (auto c = pick(s.entry(name))) return c;
  if (!name.starts_with("*.")) {
    std::size_t dot = name.find('.');
    if (dot != std::string_view::npos && dot > 0 && dot + 1 < name.size()) {
      if (auto c = pick(s.entry("*" + std::string(name.substr(dot))))) return c;
    }
  }
  return fallback;
}

const Certificate* CertStore::lookup_for_handshake(std::string_view sni,
                                                   bool client_supports_ecdsa,
                                                   bool* missed) const {
  return pinned().find_borrowed(sni, client_supports_ecdsa, missed);
}

std::shared_ptr<const Snapshot> CertStore::snapshot() const { return published_.acquire(); }

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
  // Only writers replace the published snapshot, and we hold write_mu_.
  const Snapshot& base = *published_.current();
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
  by_id_.reserve(by_id_.size() + certs.size());
  detail::SnapshotEditor ed(*published_.current());
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
  const Snapshot& base = *published_.current();
  detail::SnapshotEditor ed(base);
  bool changed = false;
  if (auto it = by_id_.find(cert_id); it != by_id_.end()) {
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
  detail::SnapshotEditor ed(*published_.current());
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
  detail::SnapshotEditor ed(*published_.current());
  slot_of(ed.default_pair(), cert->key_kind()) = std::move(cert);
  commit(ed.finish());
  publish_ok_.fetch_add(1, std::memory_order_relaxed);
  return {};
}

void CertStore::clear_default() {
  std::lock_guard lock(write_mu_);
  if (published_.current()->default_pair().empty()) return;
  detail::SnapshotEditor ed(*published_.current());
  ed.default_pair() = CertPair{};
  commit(ed.finish());
}

}  // namespace autotls::tlsreload
