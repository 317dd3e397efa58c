#include "tlsreload/detail/intern.h"

#include <cstring>
#include <mutex>
#include <string_view>
#include <unordered_map>

namespace autotls::tlsreload::detail {
namespace {

struct DigestHash {
  std::size_t operator()(const Intermediate::Sha256& d) const {
    // The key already is a cryptographic digest: its first bytes are as good as any hash.
    std::size_t h;
    std::memcpy(&h, d.data(), sizeof h);
    return h;
  }
};

struct InternTable {
  std::mutex mu;
  std::unordered_map<Intermediate::Sha256, std::weak_ptr<const Intermediate>, DigestHash> map;
};

// Leaked on purpose: Intermediates held by static objects (or thread-local snapshot caches) may
// be destroyed after function-local statics are, and their deleter touches the table.
InternTable& table() {
  static InternTable* t = new InternTable;
  return *t;
}

// Erases the table entry when the last Certificate lets go of an intermediate. The entry may
// already hold a newer live copy of the same DER (interned after this one expired); only an
// expired entry is erased.
struct EraseOnRelease {
  void operator()(Intermediate* p) const {
    auto digest = p->digest();
    delete p;
    InternTable& t = table();
    std::lock_guard lock(t.mu);
    auto it = t.map.find(digest);
    if (it != t.map.end() && it->second.expired()) t.map.erase(it);
  }
};

}  // namespace

Result<std::shared_ptr<const Intermediate>> intern(ossl::X509Ptr parsed) {
  Intermediate::Sha256 digest{};
  unsigned int len = 0;
  if (X509_digest(parsed.get(), EVP_sha256(), digest.data(), &len) != 1 || len != digest.size()) {
    return fail(ossl::error("intern intermediate: SHA-256 of DER"));
  }
  InternTable& t = table();
  {
    std::lock_guard lock(t.mu);
    auto it = t.map.find(digest);
    if (it != t.map.end()) {
      if (auto live = it->second.lock()) return live;
    }
  }
  // Build outside the lock: EraseOnRelease of another entry must be able to take it.
  std::shared_ptr<const Intermediate> fresh(new Intermediate(std::move(parsed), digest),
                                            EraseOnRelease{});
  std::shared_ptr<const Intermediate> result;
  {
    std::lock_guard lock(t.mu);
    auto [it, inserted] = t.map.try_emplace(digest, fresh);
    if (inserted) return fresh;
    // Raced with another thread interning the same DER: keep whichever is alive.
    result = it->second.lock();
    if (!result) {
      it->second = fresh;
      return fresh;
    }
  }
  // fresh is released here, after the lock: its deleter takes the table mutex.
  return result;
}

std::size_t interned_count_for_test() {
  InternTable& t = table();
  std::lock_guard lock(t.mu);
  return t.map.size();
}

}  // namespace autotls::tlsreload::detail
