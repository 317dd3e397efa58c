// OnDemand with a fake backend, a fake clock and a fake ask transport: name validation,
// policy (patterns, ask), negative cache, throttles, concurrency cap, lazy load, LRU eviction.

#include <doctest/doctest.h>

#include <atomic>
#include <barrier>
#include <condition_variable>
#include <future>
#include <mutex>
#include <set>
#include <thread>

#include "tests/support/fake_clock.h"
#include "tests/support/fake_transport.h"
#include "tlsreload/detail/hazard.h"
#include "tlsreload/on_demand.h"

using namespace autotls;
using namespace autotls::tlsreload;
using autotls::testing::FakeClock;
using autotls::testing::FakeTransport;
using namespace std::chrono_literals;

namespace {

// FakeBackend records every call; `stored` names load, obtain succeeds unless in `failing`.
struct FakeBackend {
  std::mutex mu;
  std::set<std::string> stored, failing;
  std::vector<std::string> loads, obtains, evictions;
  std::function<void()> during_obtain;  // runs inside obtain (concurrency tests)

  OnDemandBackend backend() {
    OnDemandBackend b;
    b.load = [this](const std::string& n) -> Result<bool> {
      std::lock_guard lock(mu);
      loads.push_back(n);
      return stored.count(n) > 0;
    };
    b.obtain = [this](const std::string& n) -> Status {
      if (during_obtain) during_obtain();
      std::lock_guard lock(mu);
      obtains.push_back(n);
      if (failing.count(n)) return fail(Errc::protocol, "CA refused (fake)");
      stored.insert(n);
      return {};
    };
    b.evict = [this](const std::string& n) {
      std::lock_guard lock(mu);
      evictions.push_back(n);
    };
    return b;
  }
  size_t count(const std::vector<std::string>& v) {
    std::lock_guard lock(mu);
    return v.size();
  }
};

OnDemandOptions base_options(FakeClock& clock) {
  OnDemandOptions o;
  o.enabled = true;
  o.allowed = {"*.allowed.test"};
  o.clock = &clock;
  return o;
}

// run decides sni and, when told to retry, waits for the job: fail if the handshake would
// fail (refused at once, or the job ended in the negative cache), retry if the name was
// served (a real handshake would find the certificate in the store on its next try).
UnknownName run(OnDemand& od, std::string_view sni) {
  auto a = od.decide(sni);
  if (a != UnknownName::retry) return a;
  REQUIRE(od.wait_idle(5s));
  return od.denied(sni) ? UnknownName::fail : UnknownName::retry;
}

// pause_hook stops the thread named by g_pause_thread inside HazardPublished::acquire, after
// its hazard pointer is validated and before it copies the reference (see the hook's comment).
std::atomic<std::thread::id> g_pause_thread{};
std::promise<void>* g_paused = nullptr;
std::shared_future<void>* g_resume = nullptr;
void pause_hook() {
  if (std::this_thread::get_id() != g_pause_thread.load()) return;
  g_pause_thread.store(std::thread::id{});  // once
  g_paused->set_value();
  (void)g_resume->wait_for(30s);
}

}  // namespace

TEST_SUITE("on_demand") {
  TEST_CASE("on-demand names must be valid DNS names") {
    for (const char* ok : {"a.example.com", "A.Example.COM.", "xn--bcher-kva.example", "a-b.c1.test",
                           "1.example.com"}) {
      CAPTURE(ok);
      CHECK(on_demand_name(ok));
    }
    CHECK(*on_demand_name("A.Example.COM.") == "a.example.com");
    std::string long_label(64, 'a');
    std::string long_name;
    while (long_name.size() < 250) long_name += "abcdefghi.";
    long_name += "commm";
    for (std::string bad : {std::string(""), std::string("."), std::string("localhost"), std::string("a..b.com"),
                            std::string(".a.com"), std::string("a.com.."), std::string("a_b.example.com"),
                            std::string("*.example.com"), std::string("a/b.example.com"),
                            std::string("..%2f..%2fetc.example.com"), std::string("a\\b.example.com"),
                            std::string("a b.example.com"), std::string("-a.example.com"),
                            std::string("a-.example.com"), std::string("127.0.0.1"), std::string("10.1.2.3."),
                            std::string("::1"), std::string("[::1]"), std::string("fe80::1.example.com"),
                            long_label + ".example.com", long_name, std::string("a.example.com\x01", 14),
                            std::string("a.exa\0mple.com", 14), std::string("\xc3\xa9.example.com")}) {
      CAPTURE(bad);
      CHECK_FALSE(on_demand_name(bad));
    }
    CHECK(long_name.size() > 253);
  }

  TEST_CASE("on-demand patterns match exact names and one or more labels") {
    CHECK(matches_pattern("a.test", "a.test"));
    CHECK_FALSE(matches_pattern("a.test", "b.a.test"));
    CHECK(matches_pattern("*.a.test", "b.a.test"));
    CHECK_FALSE(matches_pattern("*.a.test", "c.b.a.test"));
    CHECK_FALSE(matches_pattern("*.a.test", "a.test"));
    CHECK_FALSE(matches_pattern("*.a.test", "ba.test"));
    CHECK(matches_pattern("**.a.test", "c.b.a.test"));
    CHECK(matches_pattern("**.a.test", "b.a.test"));
    CHECK_FALSE(matches_pattern("**.a.test", "a.test"));
    CHECK_FALSE(matches_pattern("**.a.test", "xa.test"));
  }

  TEST_CASE("on-demand enabled without a policy is a configuration error") {
    OnDemandOptions o;
    CHECK(validate_on_demand(o));  // disabled: nothing to check
    o.enabled = true;
    auto st = validate_on_demand(o);
    REQUIRE_FALSE(st);
    CHECK(st.error().message.find("without a policy") != std::string::npos);
    FakeBackend fb;
    CHECK_FALSE(OnDemand::create(o, fb.backend()));
    o.allowed = {"Bad_Pattern.test"};
    CHECK_FALSE(validate_on_demand(o));
    o.allowed = {"*.ok.test", "**.deep.test", "exact.test"};
    CHECK(validate_on_demand(o));
    o.allowed.clear();
    o.ask_url = "ftp://x";
    CHECK_FALSE(validate_on_demand(o));
    o.ask_url = "http://127.0.0.1:9/ask";
    CHECK(validate_on_demand(o));
    o.max_concurrent = 0;
    CHECK_FALSE(validate_on_demand(o));
  }

  TEST_CASE("on-demand pattern policy allows and denies without touching the backend for denied names") {
    FakeClock clock;
    FakeBackend fb;
    auto od = OnDemand::create(base_options(clock), fb.backend());
    REQUIRE(od);
    CHECK((*od)->decide("a.allowed.test") == UnknownName::retry);
    REQUIRE((*od)->wait_idle(5s));
    CHECK(fb.count(fb.obtains) == 1);
    CHECK((*od)->decide("evil.example.com") == UnknownName::fail);
    CHECK((*od)->decide("b.a.allowed.test") == UnknownName::fail);  // one label only
    CHECK((*od)->decide("bad_name.allowed.test") == UnknownName::fail);
    CHECK((*od)->decide("10.0.0.1") == UnknownName::fail);
    REQUIRE((*od)->wait_idle(5s));
    CHECK(fb.count(fb.loads) == 1);  // only a.allowed.test
    CHECK(fb.count(fb.obtains) == 1);
    auto c = (*od)->counters();
    CHECK(c.denied == 2);
    CHECK(c.invalid == 2);
    CHECK(c.obtained == 1);
  }

  TEST_CASE("on-demand negative cache refuses denied names until their ttl passes") {
    FakeClock clock;
    FakeBackend fb;
    auto o = base_options(clock);
    o.deny_ttl = 600s;
    auto od = OnDemand::create(o, fb.backend());
    REQUIRE(od);
    CHECK((*od)->decide("x.example.com") == UnknownName::fail);
    CHECK((*od)->decide("X.Example.com.") == UnknownName::fail);
    auto c = (*od)->counters();
    CHECK(c.denied == 1);
    CHECK(c.negative_hits == 1);
    clock.advance(599s);
    CHECK((*od)->decide("x.example.com") == UnknownName::fail);
    CHECK((*od)->counters().negative_hits == 2);
    clock.advance(2s);
    CHECK((*od)->decide("x.example.com") == UnknownName::fail);
    CHECK((*od)->counters().denied == 2);  // checked again after the ttl
  }

  TEST_CASE("on-demand ask URL allows on 200 and denies on anything else or an error") {
    FakeClock clock;
    FakeBackend fb;
    auto ask = std::make_shared<FakeTransport>();
    const std::string base = "http://ask.test/check";
    ask->on_reply(base + "?domain=ok.example.com", 200, "");
    ask->on_reply(base + "?domain=no.example.com", 403, "");
    ask->on(base + "?domain=down.example.com",
            [](const acme::HttpRequest&) -> Result<acme::HttpResponse> { return fail(Errc::timeout, "timed out"); });
    auto o = base_options(clock);
    o.allowed.clear();
    o.ask_url = base;
    o.ask_transport = ask;
    o.deny_ttl = 600s;
    o.failure_ttl = 60s;
    auto od = OnDemand::create(o, fb.backend());
    REQUIRE(od);
    CHECK(run(**od, "ok.example.com") != UnknownName::fail);  // retry: the name is being issued
    CHECK(fb.count(fb.obtains) == 1);
    CHECK(run(**od, "no.example.com") == UnknownName::fail);
    CHECK(run(**od, "down.example.com") == UnknownName::fail);
    CHECK(run(**od, "other.example.com") == UnknownName::fail);  // 599 from the fake
    CHECK(fb.count(fb.obtains) == 1);
    CHECK(fb.count(fb.loads) == 1);
    CHECK(ask->requests().size() == 4);
    CHECK(ask->requests()[0].method == "GET");
    // A failed ask is remembered for failure_ttl only, a 403 for deny_ttl.
    clock.advance(61s);
    CHECK((*od)->decide("no.example.com") == UnknownName::fail);
    CHECK((*od)->decide("down.example.com") == UnknownName::retry);
    REQUIRE((*od)->wait_idle(5s));
    CHECK(ask->requests().size() == 5);
  }

  TEST_CASE("on-demand patterns and ask URL must both allow") {
    FakeClock clock;
    FakeBackend fb;
    auto ask = std::make_shared<FakeTransport>();
    ask->on_reply("http://ask.test/?x=1&domain=a.allowed.test", 200, "");
    auto o = base_options(clock);
    o.ask_url = "http://ask.test/?x=1";
    o.ask_transport = ask;
    auto od = OnDemand::create(o, fb.backend());
    REQUIRE(od);
    CHECK(run(**od, "elsewhere.test") == UnknownName::fail);
    CHECK(ask->requests().empty());  // the pattern refused it first
    run(**od, "a.allowed.test");
    CHECK(fb.count(fb.obtains) == 1);
  }

  TEST_CASE("on-demand loads stored certificates instead of issuing") {
    FakeClock clock;
    FakeBackend fb;
    fb.stored = {"old.allowed.test"};
    auto od = OnDemand::create(base_options(clock), fb.backend());
    REQUIRE(od);
    run(**od, "old.allowed.test");
    CHECK(fb.count(fb.loads) == 1);
    CHECK(fb.count(fb.obtains) == 0);
    CHECK((*od)->counters().loaded == 1);
    CHECK((*od)->cached() == std::vector<std::string>{"old.allowed.test"});
  }

  TEST_CASE("on-demand global rate throttles issuance") {
    FakeClock clock;
    FakeBackend fb;
    auto o = base_options(clock);
    o.global_rate = {2, 60s};
    o.per_name_rate = {0, 0s};
    o.failure_ttl = 30s;
    auto od = OnDemand::create(o, fb.backend());
    REQUIRE(od);
    run(**od, "a.allowed.test");
    run(**od, "b.allowed.test");
    CHECK(run(**od, "c.allowed.test") == UnknownName::fail);
    CHECK(fb.count(fb.obtains) == 2);
    CHECK((*od)->counters().throttled == 1);
    // A stored certificate is not an issuance: loads are never throttled.
    fb.stored.insert("d.allowed.test");
    run(**od, "d.allowed.test");
    CHECK((*od)->counters().loaded == 1);
    clock.advance(61s);
    run(**od, "c.allowed.test");
    CHECK(fb.count(fb.obtains) == 3);
  }

  TEST_CASE("on-demand per-name rate throttles repeated issuance of one name") {
    FakeClock clock;
    FakeBackend fb;
    fb.failing = {"flaky.allowed.test"};
    auto o = base_options(clock);
    o.global_rate = {0, 0s};
    o.per_name_rate = {1, 3600s};
    o.failure_ttl = 60s;
    auto od = OnDemand::create(o, fb.backend());
    REQUIRE(od);
    CHECK(run(**od, "flaky.allowed.test") == UnknownName::fail);
    CHECK((*od)->counters().failed == 1);
    clock.advance(61s);  // out of the negative cache, but not out of the per-name window
    CHECK(run(**od, "flaky.allowed.test") == UnknownName::fail);
    CHECK(fb.count(fb.obtains) == 1);
    CHECK((*od)->counters().throttled == 1);
    run(**od, "other.allowed.test");  // other names are not affected
    CHECK(fb.count(fb.obtains) == 2);
    clock.advance(3600s);
    fb.failing.clear();
    run(**od, "flaky.allowed.test");
    CHECK(fb.count(fb.obtains) == 3);
  }

  TEST_CASE("on-demand caps concurrent jobs and joins a name already in flight") {
    FakeClock clock;
    FakeBackend fb;
    std::mutex mu;
    std::condition_variable cv;
    int running = 0, max_running = 0;
    bool release = false;
    fb.during_obtain = [&] {
      std::unique_lock lock(mu);
      max_running = std::max(max_running, ++running);
      cv.notify_all();
      cv.wait_for(lock, 5s, [&] { return release; });
      --running;
    };
    auto o = base_options(clock);
    o.max_concurrent = 2;
    o.max_queued = 3;
    o.global_rate = {0, 0s};
    auto od = OnDemand::create(o, fb.backend());
    REQUIRE(od);
    for (int i = 0; i < 2; ++i) CHECK((*od)->decide("n" + std::to_string(i) + ".allowed.test") == UnknownName::retry);
    {
      std::unique_lock lock(mu);
      CHECK(cv.wait_for(lock, 5s, [&] { return running == 2; }));
    }
    for (int i = 2; i < 5; ++i) CHECK((*od)->decide("n" + std::to_string(i) + ".allowed.test") == UnknownName::retry);
    // Two running, three queued: the queue is full, a sixth name fails at once; a name
    // already queued is joined, not queued twice.
    CHECK((*od)->decide("n5.allowed.test") == UnknownName::fail);
    CHECK((*od)->decide("n4.allowed.test") == UnknownName::retry);
    {
      std::lock_guard lock(mu);
      release = true;
    }
    cv.notify_all();
    REQUIRE((*od)->wait_idle(5s));
    CHECK(max_running == 2);
    CHECK(fb.count(fb.obtains) == 5);
    CHECK((*od)->counters().throttled == 1);
  }

  TEST_CASE("on-demand evicts the least recently used certificate beyond max_cached") {
    FakeClock clock;
    FakeBackend fb;
    auto o = base_options(clock);
    o.max_cached = 2;
    o.global_rate = {0, 0s};
    auto od = OnDemand::create(o, fb.backend());
    REQUIRE(od);
    run(**od, "a.allowed.test");
    run(**od, "b.allowed.test");
    (*od)->touch("A.allowed.test.");  // a handshake used a: b is now the least recent
    (*od)->touch("configured.example.com");  // not on-demand: ignored
    run(**od, "c.allowed.test");
    CHECK(fb.evictions == std::vector<std::string>{"b.allowed.test"});
    CHECK((*od)->cached() == std::vector<std::string>{"c.allowed.test", "a.allowed.test"});
    // b comes back from storage, not from the CA, and evicts a.
    run(**od, "b.allowed.test");
    CHECK(fb.count(fb.obtains) == 3);
    CHECK((*od)->counters().loaded == 1);
    CHECK(fb.evictions.back() == "a.allowed.test");
    CHECK((*od)->counters().evicted == 2);
  }

  TEST_CASE("on-demand release takes names out of the LRU without evicting them, and they are never evicted") {
    FakeClock clock;
    FakeBackend fb;
    auto o = base_options(clock);
    o.max_cached = 2;
    o.global_rate = {0, 0s};
    auto od = OnDemand::create(o, fb.backend());
    REQUIRE(od);
    run(**od, "a.allowed.test");
    run(**od, "b.allowed.test");
    // a became a configured name (a site): released, not evicted.
    (*od)->release({"A.allowed.test", "not-cached.allowed.test"});
    CHECK(fb.count(fb.evictions) == 0);
    CHECK((*od)->cached() == std::vector<std::string>{"b.allowed.test"});
    (*od)->touch("a.allowed.test");  // no longer on-demand: ignored
    CHECK((*od)->counters().touched == 0);
    // a is the least recent, but no longer the LRU's: c and d push out b only.
    run(**od, "c.allowed.test");
    CHECK(fb.count(fb.evictions) == 0);
    run(**od, "d.allowed.test");
    CHECK(fb.evictions == std::vector<std::string>{"b.allowed.test"});
    CHECK((*od)->cached() == std::vector<std::string>{"d.allowed.test", "c.allowed.test"});
    (*od)->release({});
    (*od)->release({"a.allowed.test"});  // twice: nothing
    CHECK((*od)->cached().size() == 2);
  }

  TEST_CASE("on-demand leaves out of the LRU a name that became configured while its job ran") {
    FakeClock clock;
    FakeBackend fb;
    std::mutex mu;
    std::condition_variable cv;
    bool in_obtain = false, go = false;
    std::set<std::string> configured;  // the names a "SIGHUP" made sites (guarded by mu)
    fb.during_obtain = [&] {
      std::unique_lock lock(mu);
      if (go) return;
      in_obtain = true;
      cv.notify_all();
      cv.wait_for(lock, 5s, [&] { return go; });
    };
    auto backend = fb.backend();
    backend.configured = [&](const std::string& n) {
      std::lock_guard lock(mu);
      return configured.count(n) > 0;
    };
    auto o = base_options(clock);
    o.max_cached = 1;
    o.global_rate = {0, 0s};
    auto od = OnDemand::create(o, backend);
    REQUIRE(od);
    CHECK((*od)->decide("site.allowed.test") == UnknownName::retry);
    {
      std::unique_lock lock(mu);
      REQUIRE(cv.wait_for(lock, 5s, [&] { return in_obtain; }));
      // While the job is inside obtain, a reload makes the name a site, then releases it (it is
      // not in the LRU yet, so release finds nothing).
      configured.insert("site.allowed.test");
    }
    (*od)->release({"site.allowed.test"});
    {
      std::lock_guard lock(mu);
      go = true;
    }
    cv.notify_all();
    REQUIRE((*od)->wait_idle(5s));
    CHECK(fb.count(fb.obtains) == 1);
    CHECK((*od)->counters().obtained == 1);
    // Issued and served, but not on-demand's: not cached, so the next names never evict it.
    CHECK((*od)->cached().empty());
    run(**od, "other.allowed.test");
    run(**od, "third.allowed.test");
    CHECK(fb.evictions == std::vector<std::string>{"other.allowed.test"});
    CHECK((*od)->cached() == std::vector<std::string>{"third.allowed.test"});
  }

  TEST_CASE("on-demand touch refreshes only on-demand names and keeps the LRU order across threads") {
    FakeClock clock;
    FakeBackend fb;
    auto o = base_options(clock);
    o.max_cached = 3;
    o.global_rate = {0, 0s};
    auto od = OnDemand::create(o, fb.backend());
    REQUIRE(od);
    // Nothing on demand in memory yet: a handshake for any name touches nothing.
    (*od)->touch("configured.example.com");
    (*od)->touch("a.allowed.test");
    CHECK((*od)->counters().touched == 0);
    run(**od, "a.allowed.test");
    run(**od, "b.allowed.test");
    run(**od, "c.allowed.test");
    CHECK((*od)->counters().touched == 0);  // obtaining is not a handshake's touch
    for (int i = 0; i < 100; ++i) (*od)->touch("configured.example.com");  // a configured name
    (*od)->touch("");
    (*od)->touch(std::string(300, 'a'));
    CHECK((*od)->counters().touched == 0);
    CHECK((*od)->cached() == std::vector<std::string>{"c.allowed.test", "b.allowed.test", "a.allowed.test"});
    // Touches from other threads (each with its own copy of the index) reorder the LRU.
    std::thread t1([&] { (*od)->touch("B.allowed.test"); });
    t1.join();
    std::thread t2([&] { (*od)->touch("a.allowed.test."); });
    t2.join();
    CHECK((*od)->counters().touched == 2);
    CHECK((*od)->cached() == std::vector<std::string>{"a.allowed.test", "b.allowed.test", "c.allowed.test"});
    run(**od, "d.allowed.test");  // evicts c, the least recent
    CHECK(fb.evictions == std::vector<std::string>{"c.allowed.test"});
    (*od)->touch("c.allowed.test");  // evicted: no longer on demand in memory
    CHECK((*od)->counters().touched == 2);
    CHECK((*od)->cached() == std::vector<std::string>{"d.allowed.test", "a.allowed.test", "b.allowed.test"});
  }

  TEST_CASE("on-demand eviction beyond a large max_cached evicts exactly the least recent names") {
    FakeClock clock;
    FakeBackend fb;
    auto o = base_options(clock);
    o.max_cached = 500;
    o.global_rate = {0, 0s};
    o.per_name_rate = {0, 0s};
    auto od = OnDemand::create(o, fb.backend());
    REQUIRE(od);
    for (int i = 0; i < 500; ++i) run(**od, "n" + std::to_string(i) + ".allowed.test");
    // Keep the even ones warm: the odd ones are the least recent, oldest first.
    for (int i = 0; i < 500; i += 2) (*od)->touch("n" + std::to_string(i) + ".allowed.test");
    for (int i = 500; i < 510; ++i) run(**od, "n" + std::to_string(i) + ".allowed.test");
    std::vector<std::string> want;
    for (int i = 1; i < 20; i += 2) want.push_back("n" + std::to_string(i) + ".allowed.test");
    CHECK(fb.evictions == want);
    CHECK((*od)->cached().size() == 500);
    CHECK((*od)->counters().evicted == 10);
  }

  TEST_CASE("on-demand touch refreshes its index without a lock while writers remember and evict") {
    // Handshake-like readers touch names while workers add names and evict beyond max_cached
    // (every add publishes a new index). Bounded by counts, not time. Under TSan this checks
    // that the lock-free refresh races with nothing; everywhere it checks that a reader's
    // index is complete (each touch of a name no writer can remove finds it) and, after the
    // writers stop, that every reader thread moves to the final index.
    FakeClock clock;
    FakeBackend fb;
    auto o = base_options(clock);
    o.max_cached = 8;
    o.global_rate = {0, 0s};
    o.per_name_rate = {0, 0s};
    o.max_concurrent = 2;
    auto od = OnDemand::create(o, fb.backend());
    REQUIRE(od);
    constexpr int kReaders = 4, kWriters = 2, kNamesPerWriter = 150;
    std::atomic<int> writers_left{kWriters};
    std::atomic<uint64_t> touches{0};
    std::vector<std::thread> threads;
    for (int w = 0; w < kWriters; ++w) {
      threads.emplace_back([&, w] {
        for (int i = 0; i < kNamesPerWriter; ++i) {
          run(**od, "w" + std::to_string(w) + "-" + std::to_string(i) + ".allowed.test");
        }
        writers_left.fetch_sub(1);
      });
    }
    // Readers and this thread meet twice after the writers stop: once for this thread to
    // read the final state, then for the readers (the same threads, still holding the copy of
    // the index they last refreshed) to touch what is cached now.
    std::barrier meet(kReaders + 1);
    std::vector<std::string> cached;
    for (int r = 0; r < kReaders; ++r) {
      threads.emplace_back([&, r] {
        // Bounded: at most this many rounds even if the writers were slow to finish.
        for (int round = 0; round < 200'000 && writers_left.load() > 0; ++round) {
          (*od)->touch("w" + std::to_string(round % kWriters) + "-" + std::to_string((round / 7 + r) % kNamesPerWriter) +
                       ".allowed.test");
          (*od)->touch("configured.example.com");  // never on demand
          touches.fetch_add(1);
        }
        meet.arrive_and_wait();
        meet.arrive_and_wait();
        for (const auto& n : cached) (*od)->touch(n);
        (*od)->touch("w0-0.allowed.test");  // evicted long ago
      });
    }
    for (int w = 0; w < kWriters; ++w) threads[static_cast<std::size_t>(w)].join();
    REQUIRE((*od)->wait_idle(5s));
    cached = (*od)->cached();
    meet.arrive_and_wait();
    const uint64_t before = (*od)->counters().touched;
    meet.arrive_and_wait();
    for (std::size_t i = kWriters; i < threads.size(); ++i) threads[i].join();
    CHECK(cached.size() == 8);
    CHECK(fb.count(fb.evictions) == kWriters * kNamesPerWriter - 8);
    CHECK((*od)->counters().evicted == kWriters * kNamesPerWriter - 8);
    CHECK(before <= touches.load());  // configured names never stamp
    // The writers have stopped: each reader thread (whose copy may be an old index) must move
    // to the final one, in which every cached name is found (stamped) and no evicted one is.
    CHECK((*od)->counters().touched == before + kReaders * cached.size());
  }

  TEST_CASE("on-demand keeps an LRU index a handshake is taking alive on its hazard pointer alone") {
    FakeClock clock;
    FakeBackend fb;
    auto o = base_options(clock);
    o.max_cached = 1;
    o.global_rate = {0, 0s};
    o.per_name_rate = {0, 0s};
    auto od = OnDemand::create(o, fb.backend());
    REQUIRE(od);
    run(**od, "a.allowed.test");
    std::promise<void> paused, resume;
    std::shared_future<void> resumed = resume.get_future().share();
    g_paused = &paused;
    g_resume = &resumed;
    detail::g_hazard_acquire_hook = &pause_hook;
    auto reader = std::async(std::launch::async, [&] {
      g_pause_thread = std::this_thread::get_id();
      (*od)->touch("a.allowed.test");  // pauses inside the refresh of its (empty) copy
    });
    REQUIRE(paused.get_future().wait_for(30s) == std::future_status::ready);
    // The reader validated the index holding a but has no reference yet. Writers go on (they
    // never wait for it, nor it for them): b evicts a, c evicts b, each publishing an index.
    run(**od, "b.allowed.test");
    run(**od, "c.allowed.test");
    CHECK(fb.evictions == std::vector<std::string>{"a.allowed.test", "b.allowed.test"});
    resume.set_value();
    REQUIRE(reader.wait_for(30s) == std::future_status::ready);
    detail::g_hazard_acquire_hook = nullptr;
    reader.get();
    // The index it took (a in it) was complete and valid: a's entry got the stamp.
    CHECK((*od)->counters().touched == 1);
    CHECK((*od)->cached() == std::vector<std::string>{"c.allowed.test"});
  }
}
