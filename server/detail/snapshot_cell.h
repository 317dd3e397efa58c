#pragma once

// SnapshotCell publishes an immutable snapshot (the server's routing table) to request
// threads without a lock. Internal to server/.

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

namespace autotls::server::detail {

// SnapshotCell<T> holds a std::shared_ptr<const T> that many threads read (load(), once per
// request) and one thread at a time replaces (store(), a reload). GCC 12's
// std::atomic<std::shared_ptr> is not lock-free (it spins on a lock bit), and the mutex it
// replaces made every request of every thread take the same lock word.
//
// How: the current value lives in a heap slot whose address is published in an atomic. A
// reader announces itself in its stripe (one of kStripes counters, each on its own cache line;
// a thread always uses the same one), loads the slot address, copies the shared_ptr (one
// fetch_add on the snapshot's count) and leaves its stripe. A writer publishes a new slot, then
// frees the old slot only once it has seen every stripe at zero. Both sides use seq_cst, so for
// any reader either its load sees the new slot, or the writer's scan sees its announcement
// (store-load ordering on both sides); a zero read from a reader's release decrement orders
// the reader's copy before the writer's delete. Readers never wait (wait-free: three atomic
// instructions and the reference count). The writer waits for the readers inside their copy
// window, which lasts a few instructions; since reloads are rare it simply yields meanwhile.
// The snapshot itself is freed as before: by whoever drops its last reference.
template <class T>
class SnapshotCell {
 public:
  static constexpr std::size_t kStripes = 16;

  explicit SnapshotCell(std::shared_ptr<const T> v = {})
      : owned_(std::make_unique<const std::shared_ptr<const T>>(std::move(v))) {
    cur_.store(owned_.get(), std::memory_order_seq_cst);
  }
  SnapshotCell(const SnapshotCell&) = delete;
  SnapshotCell& operator=(const SnapshotCell&) = delete;

  std::shared_ptr<const T> load() const {
    auto& s = stripes_[stripe()].readers;
    s.fetch_add(1, std::memory_order_seq_cst);
    std::shared_ptr<const T> copy = *cur_.load(std::memory_order_seq_cst);
    s.fetch_sub(1, std::memory_order_release);
    return copy;
  }

  // store replaces the value. Callers serialize stores (one writer at a time).
  void store(std::shared_ptr<const T> v) {
    auto next = std::make_unique<const std::shared_ptr<const T>>(std::move(v));
    cur_.store(next.get(), std::memory_order_seq_cst);
    auto old = std::move(owned_);
    owned_ = std::move(next);
    for (auto& s : stripes_) {
      while (s.readers.load(std::memory_order_seq_cst) != 0) std::this_thread::yield();
    }
    // old (the previous slot and its reference) is released here: no reader can reach it.
  }

 private:
  struct alignas(64) Stripe {
    std::atomic<std::uint32_t> readers{0};
  };
  static std::size_t stripe() {
    static std::atomic<std::size_t> next{0};
    thread_local const std::size_t mine = next.fetch_add(1, std::memory_order_relaxed) % kStripes;
    return mine;
  }

  mutable std::array<Stripe, kStripes> stripes_;
  std::atomic<const std::shared_ptr<const T>*> cur_{nullptr};
  std::unique_ptr<const std::shared_ptr<const T>> owned_;  // the writer's: the published slot
};

}  // namespace autotls::server::detail
