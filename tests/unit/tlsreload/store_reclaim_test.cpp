// When CertStore frees replaced snapshots: never while a thread's cache holds one or a thread
// is taking one (only its hazard pointer protects it then), and always at the next change
// once nothing does. And readers that refresh all the time under a stream of changes only
// ever see complete certificates.

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <future>
#include <mutex>
#include <thread>

#include "tests/support/fake_clock.h"
#include "tests/unit/tlsreload/test_ca.h"
#include "tlsreload/store.h"

#include <openssl/x509.h>

using namespace autotls;
using namespace autotls::tlsreload;
using autotls::testing::FakeClock;
using autotls::testing::TestCa;

namespace {

// A generous bound on every wait, so that a broken store fails the test instead of hanging
// it. Never reached when the store works; nothing is timed.
constexpr auto kHang = std::chrono::seconds(60);

// Worker is a thread that runs the functions given to run(), one at a time, so a test can
// choose when that thread looks up (and so what its snapshot cache holds).
class Worker {
 public:
  Worker() : thread_([this] { loop(); }) {}
  ~Worker() { stop(); }

  // start hands f to the thread; the future is ready when f returned.
  std::future<void> start(std::function<void()> f) {
    std::packaged_task<void()> task(std::move(f));
    auto done = task.get_future();
    {
      std::lock_guard lock(mu_);
      task_ = std::move(task);
    }
    cv_.notify_all();
    return done;
  }
  void run(std::function<void()> f) {
    auto done = start(std::move(f));
    REQUIRE(done.wait_for(kHang) == std::future_status::ready);
    done.get();
  }
  // stop ends the thread, which destroys its snapshot cache.
  void stop() {
    if (!thread_.joinable()) return;
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  std::thread::id id() const { return thread_.get_id(); }

 private:
  void loop() {
    std::unique_lock lock(mu_);
    for (;;) {
      cv_.wait(lock, [this] { return stopping_ || task_.valid(); });
      if (task_.valid()) {
        auto task = std::move(task_);
        lock.unlock();
        task();
        lock.lock();
        continue;
      }
      return;
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::packaged_task<void()> task_;
  bool stopping_ = false;
  std::thread thread_;
};

struct Fixture {
  FakeClock clock;
  TestCa ca{"Reclaim", clock.now()};
  CertStore store;

  std::shared_ptr<const Certificate> make(std::vector<std::string> names) {
    auto leaf = ca.issue(std::move(names));
    LoadOptions o;
    o.clock = &clock;
    auto c = Certificate::from_pem(ca.chain_pem(leaf), leaf.key_pem, o);
    REQUIRE_MESSAGE(c, c.error().message);
    return *c;
  }
  // current is a weak reference to the published snapshot: it does not count in use_count(),
  // so it does not keep the snapshot from being freed, and expired() tells when it was.
  std::weak_ptr<const Snapshot> current() { return store.snapshot(); }
};

// The acquire hook (detail::g_hazard_acquire_hook) stops one chosen thread inside
// CertStore::acquire, after its hazard pointer is validated and before it copies the reference.
std::atomic<std::thread::id> g_pause_thread{};
std::promise<void>* g_paused = nullptr;        // set by the paused thread
std::shared_future<void>* g_resume = nullptr;  // awaited by the paused thread
void pause_hook() {
  if (std::this_thread::get_id() != g_pause_thread.load()) return;
  g_pause_thread.store(std::thread::id{});  // once
  g_paused->set_value();
  (void)g_resume->wait_for(kHang);
}

}  // namespace

TEST_SUITE("tlsreload.store") {

TEST_CASE_FIXTURE(Fixture, "store frees a replaced snapshot at the next change once no thread cache holds it") {
  auto a = make({"a.test"});
  REQUIRE(store.publish(a));
  Worker t;
  auto v1 = current();
  t.run([&] { CHECK(store.lookup("a.test") == a); });  // t's cache now holds v1

  REQUIRE(store.publish(make({"b.test"})));
  REQUIRE(store.publish(make({"c.test"})));
  CHECK_FALSE(v1.expired());  // two changes later, still in t's cache

  auto v3 = current();
  t.run([&] { CHECK(store.lookup("c.test")); });  // t drops v1 for v3...
  CHECK_FALSE(v1.expired());  // ...but a reader never frees: the writer does,
  REQUIRE(store.publish(make({"d.test"})));
  CHECK(v1.expired());  // at the next change
  CHECK_FALSE(v3.expired());

  t.stop();  // a thread's exit lets go of its cache
  CHECK_FALSE(v3.expired());
  REQUIRE(store.publish(make({"e.test"})));
  CHECK(v3.expired());
}

TEST_CASE_FIXTURE(Fixture, "store keeps a snapshot a thread is taking alive on its hazard pointer alone") {
  auto a = make({"a.test"});
  REQUIRE(store.publish(a));
  auto v1 = current();
  Worker t;
  std::promise<void> paused, resume;
  std::shared_future<void> resumed = resume.get_future().share();
  g_paused = &paused;
  g_resume = &resumed;
  g_pause_thread = t.id();
  detail::g_hazard_acquire_hook = &pause_hook;
  std::shared_ptr<const Certificate> seen;
  auto looked_up = t.start([&] { seen = store.lookup("a.test"); });
  REQUIRE(paused.get_future().wait_for(kHang) == std::future_status::ready);

  // t has validated v1 but holds no reference yet: v1's only owner is the writer's retired
  // list, and only t's hazard pointer says it is about to be used.
  REQUIRE(store.remove(a->id()));
  REQUIRE(store.publish(make({"b.test"})));
  CHECK_FALSE(v1.expired());

  resume.set_value();
  REQUIRE(looked_up.wait_for(kHang) == std::future_status::ready);
  detail::g_hazard_acquire_hook = nullptr;
  looked_up.get();
  CHECK(seen == a);  // served from v1, taken before the remove: complete and valid
  seen.reset();

  REQUIRE(store.publish(make({"c.test"})));
  CHECK_FALSE(v1.expired());  // now in t's cache
  t.run([&] { CHECK_FALSE(store.lookup("a.test")); });
  REQUIRE(store.publish(make({"d.test"})));
  CHECK(v1.expired());
}

// Readers look up round-robin in more stores than a thread caches (4), so that every lookup
// refreshes: takes the published snapshot through the hazard pointer protocol. Meanwhile a
// writer makes a bounded number of changes across the stores. Every answer must be a complete
// certificate for the name (or nothing, only for a name that gets removed), and once the
// readers are gone every replaced snapshot must have been freed.
TEST_CASE_FIXTURE(Fixture, "store readers refreshing under a bounded stream of changes see complete certificates and nothing leaks") {
  constexpr int kStable = 8, kToggled = 4, kVersions = 3;
  constexpr int kStores = 5;
  constexpr int kChanges = 1500;
  constexpr unsigned kReaders = 6;
  constexpr std::uint64_t kMinLookups = 2000;  // per reader, even if the writer finishes first
  std::vector<std::string> names;
  std::vector<std::vector<std::shared_ptr<const Certificate>>> pool;
  for (int i = 0; i < kStable + kToggled; ++i) {
    names.push_back((i < kStable ? "stable" : "toggled") + std::to_string(i) + ".test");
    pool.emplace_back();
    for (int v = 0; v < kVersions; ++v) pool.back().push_back(make({names.back(), "*." + names.back()}));
  }
  std::vector<std::unique_ptr<CertStore>> stores;
  for (int s = 0; s < kStores; ++s) {
    stores.push_back(std::make_unique<CertStore>());
    for (int i = 0; i < kStable + kToggled; ++i) REQUIRE(stores.back()->publish(pool[i][0]));
  }

  std::atomic<bool> done{false};
  std::atomic<std::uint64_t> lookups{0}, bad{0};
  auto reader = [&](unsigned seed) {
    std::uint64_t n = 0;
    unsigned x = seed;
    while (!done.load(std::memory_order_relaxed) || n < kMinLookups) {
      x = x * 1103515245u + 12345u;
      const CertStore& store = *stores[n % kStores];
      int k = static_cast<int>((x >> 8) % names.size());
      bool wildcard = (x >> 20) & 1;
      std::string sni = wildcard ? "x." + names[k] : names[k];
      // Alternately the three ways to read a store. A borrowed pointer is checked before the
      // next lookup (which may refresh and so end its validity).
      std::shared_ptr<const Certificate> held;
      const Certificate* c = nullptr;
      if (n % 8 == 7) {
        auto snap = store.snapshot();
        const auto* found = snap->find(sni, true);
        held = found ? *found : nullptr;
        c = held.get();
      } else if (n % 2 == 0) {
        held = store.lookup(sni, true);
        c = held.get();
      } else {
        c = store.lookup_for_handshake(sni, true);
      }
      ++n;
      if (!c) {
        if (k < kStable) bad.fetch_add(1);
        continue;
      }
      auto o = c->openssl();
      bool complete = o.leaf && o.key && o.chain && sk_X509_num(o.chain) == 1 &&
                      c->names().size() == 2 && c->names()[0] == names[k];
      if (!complete) bad.fetch_add(1);
    }
    lookups.fetch_add(n);
  };

  std::vector<std::weak_ptr<const Snapshot>> replaced;
  replaced.reserve(kChanges + kStores);
  std::vector<std::thread> threads;
  for (unsigned r = 0; r < kReaders; ++r) threads.emplace_back(reader, r + 1);
  for (int change = 0; change < kChanges; ++change) {
    CertStore& store = *stores[change % kStores];
    replaced.push_back(store.snapshot());
    int i = (change / kStores) % (kStable + kToggled);
    int round = change / kStores / (kStable + kToggled);
    if (i >= kStable && round % 2 == 0) {
      CHECK(store.remove_name(names[i]));
    } else {
      CHECK(store.publish(pool[i][(round + 1) % kVersions]));
    }
  }
  done = true;
  for (auto& t : threads) t.join();

  MESSAGE("lookups (each one a refresh): " << lookups.load());
  CHECK(bad.load() == 0);
  CHECK(lookups.load() >= kReaders * kMinLookups);

  // The readers have exited (their caches are gone) and this thread never looked up, so the
  // next change of each store frees every snapshot it replaced.
  for (auto& store : stores) {
    replaced.push_back(store->snapshot());
    REQUIRE(store->publish(make({"last.test"})));
  }
  std::size_t alive = 0;
  for (const auto& w : replaced) alive += w.expired() ? 0 : 1;
  CHECK(alive == 0);
}

}  // TEST_SUITE
