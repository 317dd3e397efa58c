#include "tlsreload/detail/hazard.h"

namespace autotls::tlsreload::detail {

static_assert(std::atomic<const void*>::is_always_lock_free);
static_assert(std::atomic<bool>::is_always_lock_free);

std::atomic<void (*)()> g_hazard_acquire_hook{nullptr};

namespace {

std::atomic<HazardRecord*> g_hazards{nullptr};

// take_record returns a free record, or a new one pushed onto the list. The walk is bounded
// by the number of records (the most threads ever alive at once); the push retries only when
// another thread pushed meanwhile.
HazardRecord* take_record() {
  for (HazardRecord* r = g_hazards.load(std::memory_order_acquire); r != nullptr; r = r->next) {
    bool free = false;
    if (!r->in_use.load(std::memory_order_relaxed) &&
        r->in_use.compare_exchange_strong(free, true, std::memory_order_acquire)) {
      return r;
    }
  }
  auto* r = new HazardRecord;  // never freed: writers may be reading it
  r->in_use.store(true, std::memory_order_relaxed);
  HazardRecord* head = g_hazards.load(std::memory_order_relaxed);
  do {
    r->next = head;
  } while (!g_hazards.compare_exchange_weak(head, r, std::memory_order_release,
                                            std::memory_order_relaxed));
  return r;
}

// The calling thread's record, given back by the thread_local's destructor at thread exit.
// An acquire() made by another thread_local's destructor after the owner's has run (thread
// exit) must not use the record given back: another thread may hold it by then, and two
// threads sharing a hazard slot could let a writer free what one of them is copying. Such a
// late caller takes a record of its own that it never gives back (a leaked pool slot, for a
// pathological case). Both are trivially destructible, so they stay usable during thread exit.
thread_local bool tl_hazard_released = false;
thread_local HazardRecord* tl_late_record = nullptr;

struct HazardOwner {
  HazardRecord* record;
  ~HazardOwner() {
    tl_hazard_released = true;
    record->hazard.store(nullptr, std::memory_order_release);
    record->in_use.store(false, std::memory_order_release);
  }
};

}  // namespace

HazardRecord& my_hazard_record() {
  if (tl_hazard_released) [[unlikely]] {
    if (tl_late_record == nullptr) tl_late_record = take_record();
    return *tl_late_record;
  }
  // Block scope: registered (its destructor) on this function's first call on a thread only.
  thread_local HazardOwner owner{take_record()};
  return *owner.record;
}

std::vector<const void*> hazards_now() {
  std::vector<const void*> out;
  for (HazardRecord* r = g_hazards.load(std::memory_order_acquire); r != nullptr; r = r->next) {
    if (const void* p = r->hazard.load(std::memory_order_seq_cst)) out.push_back(p);
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace autotls::tlsreload::detail
