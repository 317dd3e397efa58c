#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "tests/support/fake_clock.h"
#include "tests/unit/tlsreload/test_ca.h"
#include "tlsreload/store.h"

#include <openssl/x509.h>

using namespace autotls;
using namespace autotls::tlsreload;

TEST_SUITE("tlsreload.concurrency") {

// Readers loop on lookups while writers publish, replace and remove for a bounded time. Every
// lookup must return either nothing (only for the names that get removed) or a complete
// certificate that covers the name asked for.
TEST_CASE("concurrency readers see complete certificates while writers publish and remove") {
  testing::FakeClock clock;
  testing::TestCa ca("Conc", clock.now());
  LoadOptions o;
  o.clock = &clock;
  constexpr int kStable = 16;   // always present, replaced over and over
  constexpr int kToggled = 4;   // removed and re-published
  constexpr int kVersions = 3;  // pre-made certificates per name (no keygen inside the loop)
  auto make = [&](const std::string& name) {
    auto leaf = ca.issue({name, "*." + name});
    auto c = Certificate::from_pem(ca.chain_pem(leaf), leaf.key_pem, o);
    REQUIRE(c);
    return *c;
  };
  std::vector<std::string> names;
  std::vector<std::vector<std::shared_ptr<const Certificate>>> pool;
  for (int i = 0; i < kStable + kToggled; ++i) {
    names.push_back((i < kStable ? "stable" : "toggled") + std::to_string(i) + ".test");
    pool.emplace_back();
    for (int v = 0; v < kVersions; ++v) pool.back().push_back(make(names.back()));
  }

  auto store = std::make_shared<CertStore>();
  for (int i = 0; i < kStable + kToggled; ++i) REQUIRE(store->publish(pool[i][0]));

  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> lookups{0}, bad{0}, publishes{0};
  auto reader = [&](unsigned seed) {
    std::uint64_t n = 0;
    unsigned i = seed;
    while (!stop.load(std::memory_order_relaxed)) {
      i = i * 1103515245u + 12345u;
      int k = static_cast<int>((i >> 8) % names.size());
      bool wildcard = (i >> 20) & 1;
      std::string sni = wildcard ? "x." + names[k] : names[k];
      auto c = store->lookup(sni, true);
      ++n;
      if (!c) {
        if (k < kStable) bad.fetch_add(1);
        continue;
      }
      auto v = c->openssl();
      bool complete = v.leaf && v.key && v.chain && sk_X509_num(v.chain) == 1 &&
                      c->names().size() == 2 && c->names()[0] == names[k];
      if (!complete) bad.fetch_add(1);
    }
    lookups.fetch_add(n);
  };
  auto writer = [&](int first, int step) {
    std::uint64_t n = 0;
    int round = 0;
    while (!stop.load(std::memory_order_relaxed)) {
      ++round;
      for (int i = first; i < kStable + kToggled; i += step) {
        if (i >= kStable && round % 2 == 0) {
          (void)store->remove_name(names[i]);
          (void)store->remove_name("*." + names[i]);
        } else {
          CHECK(store->publish(pool[i][round % kVersions]));
          ++n;
        }
      }
    }
    publishes.fetch_add(n);
  };

  std::vector<std::thread> threads;
  for (unsigned r = 0; r < 4; ++r) threads.emplace_back(reader, r + 1);
  threads.emplace_back(writer, 0, 2);
  threads.emplace_back(writer, 1, 2);
  std::this_thread::sleep_for(std::chrono::seconds(1));
  stop = true;
  for (auto& t : threads) t.join();

  MESSAGE("lookups: " << lookups.load() << ", publishes: " << publishes.load()
                      << ", final version: " << store->version());
  CHECK(bad.load() == 0);
  CHECK(lookups.load() > 1000);
  CHECK(publishes.load() > 100);
  CHECK(store->counters().publish_failed == 0);
}

}  // TEST_SUITE
