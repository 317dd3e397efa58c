#pragma once

// HazardPublished: one std::shared_ptr<const T> that writers replace (serialized by the
// caller's mutex) and readers copy without a lock and without waiting for a writer. Shared by
// CertStore (its snapshots) and OnDemand (its LRU index): both keep a per-thread copy of the
// published object, revalidated against an atomic version, and refresh that copy through
// acquire() only after a change.
//
// Why not std::atomic<std::shared_ptr>: GCC 12's is not lock-free (it spins on a lock bit, so
// a reader can wait for a writer); a std::mutex around a plain shared_ptr makes a reader wait
// for whatever the writer does while holding it.
//
// How: the writer publishes a raw pointer to a Holder that owns the reference; a reader
// protects that pointer with a hazard pointer (one slot per thread in a process-wide
// registry), checks that it is still the published one, copies the reference (one atomic
// increment) and clears the hazard. The writer frees a replaced Holder only when no hazard
// names it and then no thread holds a reference but the Holder's own (use_count() == 1); the
// ordering argument is at HazardPublished::publish. So a reader never pays for a free either:
// a replaced object is freed by a later publish.

#include <algorithm>
#include <atomic>
#include <memory>
#include <utility>
#include <vector>

namespace autotls::tlsreload::detail {

// HazardRecord is one thread's hazard slot, in a list that only grows (pushed by CAS, never
// unlinked or freed, so a writer can walk it while threads come and go). A thread takes a free
// record on its first acquire() and gives it back when it exits; hazard is non-null only inside
// acquire().
struct HazardRecord {
  std::atomic<const void*> hazard{nullptr};
  std::atomic<bool> in_use{false};
  HazardRecord* next = nullptr;  // set before the record is pushed, never changed after
};

// my_hazard_record returns the calling thread's record. Its first call on a thread takes a
// free record or allocates one (never freed; reused after the thread exits): the reader path's
// only allocation, once per thread.
HazardRecord& my_hazard_record();

// hazards_now returns every hazard pointer set at the time of the loads (seq_cst: see
// HazardPublished::publish), sorted.
std::vector<const void*> hazards_now();

// For tests only: when set, called by a thread taking a reference in acquire(), after its
// hazard pointer is validated and before the reference is copied (the window in which only the
// hazard keeps the object alive).
extern std::atomic<void (*)()> g_hazard_acquire_hook;

template <class T>
class HazardPublished {
 public:
  // Holder owns the reference of one published object at an address that stays fixed until a
  // writer frees it: readers protect this address and copy the reference, which nobody
  // modifies meanwhile.
  struct Holder {
    std::shared_ptr<const T> value;
  };

  explicit HazardPublished(std::shared_ptr<const T> initial)
      : current_(std::make_unique<const Holder>(Holder{std::move(initial)})) {
    published_.store(current_.get(), std::memory_order_seq_cst);
  }
  HazardPublished(const HazardPublished&) = delete;
  HazardPublished& operator=(const HazardPublished&) = delete;

  // acquire returns the published object: R1 to R4 of the protocol at publish(). No lock, and
  // no step waits for another thread; the loop repeats only when a writer published meanwhile.
  std::shared_ptr<const T> acquire() const {
    HazardRecord& record = my_hazard_record();
    const Holder* p = published_.load(std::memory_order_acquire);
    for (;;) {
      record.hazard.store(p, std::memory_order_seq_cst);              // R1
      const Holder* q = published_.load(std::memory_order_seq_cst);  // R2
      if (q == p) break;
      p = q;
    }
    if (auto hook = g_hazard_acquire_hook.load(std::memory_order_relaxed)) [[unlikely]] hook();
    std::shared_ptr<const T> s = p->value;                   // R3
    record.hazard.store(nullptr, std::memory_order_release);  // R4
    return s;
  }

  // current is the published object, for writers (with the caller's writer mutex held).
  const std::shared_ptr<const T>& current() const { return current_->value; }

  // publish makes next the published object (with the caller's writer mutex held) and frees
  // the replaced objects that nothing holds any more. A caller that also publishes a version
  // number for readers stores it after this returns, so a reader that sees the new version
  // acquires the new object (or a later one).
  //
  // Why a freed object is never in use (a Dekker pattern; S is the single total order of
  // seq_cst operations). A reader R taking a reference (acquire) does
  //   R1 hazard = p (seq_cst);  R2 load published_ == p (seq_cst), else retry;
  //   R3 copy p->value (atomic increment);  R4 hazard = nullptr (release).
  // The writer W that replaces p and later frees it does
  //   W1 published_ = q (seq_cst);  ...  W2 load every hazard (seq_cst);
  //   W3 free p if no hazard was p and p->value.use_count() == 1.
  // R2 read p, so R2 precedes W1 in S (a seq_cst load after W1 in S reads W1's value or a later
  // one, none of which is p while p is not freed), and R1 is sequenced before R2: R1 <S W2.
  // So W2 reads R's hazard as p (W keeps p), or a later value: R4's nullptr or a hazard R set
  // afterwards, both released after R3, so R3 happens before W3 and W3's use_count() sees R's
  // reference (W keeps p) or its later release (R no longer holds p). Hence W2 before W3, and
  // both seq_cst operations on each side, are required. If instead R1 follows W2 in S, R2
  // follows W1 and reads q or later: R retries (a new Holder at p's old address after p was
  // freed is a live, published object, so that is also safe). Once W3 found no reference and
  // no hazard, nothing can make a new one: references come from acquire (just shown) or from
  // copying a held reference. The reader's side costs one locked instruction (R1) per acquire;
  // W pays the walk over the registry, once per change.
  void publish(std::shared_ptr<const T> next) {
    auto fresh = std::make_unique<const Holder>(Holder{std::move(next)});
    published_.store(fresh.get(), std::memory_order_seq_cst);  // W1
    current_.swap(fresh);
    // fresh now holds the previous object. Park it; free every parked object that no thread
    // holds any more and no reader is taking (see above).
    retired_.push_back(std::move(fresh));
    const auto hazards = hazards_now();  // W2, before any use_count() (W3)
    std::erase_if(retired_, [&hazards](const auto& r) {
      return !std::binary_search(hazards.begin(), hazards.end(), static_cast<const void*>(r.get())) &&
             r->value.use_count() == 1;
    });
  }

 private:
  // published_ is current_.get() for readers; current_ and retired_ are the writers' (guarded
  // by the caller's mutex). retired_ keeps replaced objects until no thread holds them and no
  // hazard names them, so that a writer, not a reader dropping its copy, pays for freeing them.
  std::atomic<const Holder*> published_{nullptr};
  std::unique_ptr<const Holder> current_;
  std::vector<std::unique_ptr<const Holder>> retired_;
};

}  // namespace autotls::tlsreload::detail
