// SnapshotCell: readers always get a whole, live snapshot while a writer keeps replacing it,
// and replaced snapshots are freed once their last reader drops them. Meant to run under TSan
// too (AUTOTLS_TSAN=ON): a writer that freed a slot a reader could still copy from is a race.

#include <doctest/doctest.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "server/detail/snapshot_cell.h"

using autotls::server::detail::SnapshotCell;

namespace {
std::atomic<int> g_live{0};

// Snap is a routing table stand-in: a and b are always equal in a published snapshot.
struct Snap {
  std::uint64_t a, b;
  explicit Snap(std::uint64_t v) : a(v), b(v) { ++g_live; }
  ~Snap() { --g_live; }
  Snap(const Snap&) = delete;
  Snap& operator=(const Snap&) = delete;
};
}  // namespace

TEST_SUITE("server") {
  TEST_CASE("SnapshotCell: readers see whole snapshots, in order, while reloads replace them") {
    constexpr std::uint64_t kStores = 3'000;
    constexpr int kReaders = 4;
    {
      SnapshotCell<Snap> cell(std::make_shared<const Snap>(0));
      std::atomic<bool> stop{false};
      std::atomic<int> torn{0}, backwards{0};
      std::atomic<std::uint64_t> loads{0};
      std::vector<std::thread> readers;
      for (int i = 0; i < kReaders; ++i) {
        readers.emplace_back([&] {
          std::uint64_t last = 0, n = 0;
          // Bounded: the writer stops after kStores stores; each reader then makes one more pass.
          while (!stop.load(std::memory_order_acquire)) {
            auto s = cell.load();
            if (!s || s->a != s->b) ++torn;
            if (s && s->a < last) ++backwards;
            if (s) last = s->a;
            ++n;
          }
          loads += n;
        });
      }
      for (std::uint64_t v = 1; v <= kStores; ++v) {
        cell.store(std::make_shared<const Snap>(v));
        if (v % 100 == 0) std::this_thread::yield();
      }
      stop.store(true, std::memory_order_release);
      for (auto& t : readers) t.join();
      MESSAGE(loads.load() << " loads during " << kStores << " stores");
      CHECK(torn.load() == 0);
      CHECK(backwards.load() == 0);
      CHECK(cell.load()->a == kStores);
      // Every replaced snapshot is gone once no reader holds it: only the current one is left.
      CHECK(g_live.load() == 1);
      auto held = cell.load();
      cell.store(std::make_shared<const Snap>(kStores + 1));
      CHECK(g_live.load() == 2);  // a reader's reference keeps a replaced snapshot alive
      held.reset();
      CHECK(g_live.load() == 1);
    }
    CHECK(g_live.load() == 0);
  }
}
