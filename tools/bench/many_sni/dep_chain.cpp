// dep_chain: what one load costs on this machine, by working set. A dependent chain (each load
// gives the next address) through W random 64-byte lines of a 16 MiB region on huge pages,
// W from 16 lines to the whole region; prints the median ns per load over 300 batches of 1,000.
// docs/benchmarks.md, session 27: the store's lookup reads one random slot line among the
// 4,096 its benchmark cycles through, so this says where that line comes from.
//   g++ -O2 tools/bench/many_sni/dep_chain.cpp -o /tmp/dep_chain && /tmp/dep_chain
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

volatile std::uint64_t sink;

int main() {
  const std::size_t region = std::size_t{16} << 20;
  char* m = static_cast<char*>(std::aligned_alloc(std::size_t{2} << 20, region));
  if (m == nullptr) return 1;
  madvise(m, region, MADV_HUGEPAGE);
  for (std::size_t i = 0; i < region; i += 64) m[i] = 1;
  std::mt19937_64 rng(1);
  std::vector<std::size_t> all(region / 64);
  for (std::size_t ws : {16ul, 256ul, 512ul, 1024ul, 4096ul, 16384ul, 65536ul, 262144ul}) {
    for (std::size_t i = 0; i < all.size(); ++i) all[i] = i;
    std::shuffle(all.begin(), all.end(), rng);
    // Lines all[0..ws) in a cycle: each holds the offset of the next.
    for (std::size_t i = 0; i < ws; ++i) {
      *reinterpret_cast<std::uint64_t*>(m + all[i] * 64) = all[(i + 1) % ws] * 64;
    }
    std::uint64_t p = all[0] * 64;
    std::vector<double> ns;
    for (int b = 0; b < 300; ++b) {
      auto t0 = std::chrono::steady_clock::now();
      for (int k = 0; k < 1000; ++k) p = *reinterpret_cast<const std::uint64_t*>(m + p);
      ns.push_back(std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() / 1000);
    }
    std::sort(ns.begin(), ns.end());
    sink = p;  // the chain's result is used, so it is not optimized away
    std::printf("%7zu lines (%6zu KiB): %.2f ns per dependent load\n", ws, ws * 64 / 1024, ns[150]);
  }
  std::free(m);
}
