#include "tlsreload/detail/intern.h"

#include <cstring>
#include <mutex>
#include <string_view>
#include <unordered_map>

#include <openssl/err.h>

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


Result<std::shared_ptr<const Intermediate>> intern_with_digest(ossl::X509Ptr parsed,
                                                               const Intermediate::Sha256& digest);

std::shared_ptr<const Intermediate> find_live(const Intermediate::Sha256& digest) {
  InternTable& t = table();
  std::lock_guard lock(t.mu);
  auto it = t.map.find(digest);
  return it == t.map.end() ? nullptr : it->second.lock();
}

}  // namespace

std::string name_der(const X509_NAME* name) {
  unsigned char* buf = nullptr;
  int n = i2d_X509_NAME(name, &buf);
  if (n <= 0) return {};
  std::string out(reinterpret_cast<const char*>(buf), static_cast<std::size_t>(n));
  OPENSSL_free(buf);
  return out;
}

Result<std::shared_ptr<const Intermediate>> intern_der_slow(std::string_view der);

Intermediate::Intermediate(ossl::X509Ptr x509, const Sha256& digest)
    : x509_(std::move(x509)),
      digest_(digest),
      subject_der_(name_der(X509_get_subject_name(x509_.get()))),
      issuer_der_(name_der(X509_get_issuer_name(x509_.get()))) {}

Result<std::shared_ptr<const Intermediate>> intern_der(std::string_view der) {
  // A bulk load sees one intermediate over and over: comparing its bytes with the last one
  // this thread interned is cheaper than hashing it and taking the table mutex.
  thread_local std::string last_der;
  thread_local std::weak_ptr<const Intermediate> last;
  if (der == last_der) {
    if (auto live = last.lock()) return live;
  }
  auto result = intern_der_slow(der);
  if (result) {
    last_der.assign(der);
    last = *result;
  }
  return result;
}

Result<std::shared_ptr<const Intermediate>> intern_der_slow(std::string_view der) {
  Intermediate::Sha256 digest{};
  unsigned int len = 0;
  if (EVP_Digest(der.data(), der.size(), digest.data(), &len, EVP_sha256(), nullptr) != 1 ||
      len != digest.size()) {
    return fail(ossl::error("intern intermediate: SHA-256 of DER"));
  }
  if (auto live = find_live(digest)) return live;
  const auto* p = reinterpret_cast<const unsigned char*>(der.data());
  ERR_clear_error();
  ossl::X509Ptr x(d2i_X509(nullptr, &p, static_cast<long>(der.size())));
  if (!x || p != reinterpret_cast<const unsigned char*>(der.data()) + der.size()) {
    return fail(Errc::invalid_input, "intermediate certificate: not one DER certificate (" +
                                         ossl::drain_errors() + ")");
  }
  return intern_with_digest(std::move(x), digest);
}

Result<std::shared_ptr<const Intermediate>> intern(ossl::X509Ptr parsed) {
  Intermediate::Sha256 digest{};
  unsigned int len = 0;
  if (X509_digest(parsed.get(), EVP_sha256(), digest.data(), &len) != 1 || len != digest.size()) {
    return fail(ossl::error("intern intermediate: SHA-256 of DER"));
  }
  return intern_with_digest(std::move(parsed), digest);
}

namespace {
Result<std::shared_ptr<const Intermediate>> intern_with_digest(ossl::X509Ptr parsed,
                                                               const Intermediate::Sha256& digest) {
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
}  // namespace

std::size_t interned_count_for_test() {
  InternTable& t = table();
  std::lock_guard lock(t.mu);
  return t.map.size();
}

}  // namespace autotls::tlsreload::detail
