#include <doctest/doctest.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include "tlsreload/heap_pages.h"

#if defined(__linux__)
#include <sys/mman.h>

#include <cerrno>
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
#endif

using namespace autotls::tlsreload;

namespace {

bool has(const std::vector<HeapRange>& rs, std::uintptr_t b, std::uintptr_t e, bool reserved) {
  for (const auto& r : rs) {
    if (r.begin == b && r.end == e && r.reserved == reserved) return true;
  }
  return false;
}

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kOwnMalloc = true;  // the sanitizer's allocator, not glibc's heaps
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
constexpr bool kOwnMalloc = true;
#else
constexpr bool kOwnMalloc = false;
#endif
#else
constexpr bool kOwnMalloc = false;
#endif

#if defined(__linux__)
// A stand-in for madvise: refuses the ranges and advices a test names, records every call.
struct FakeMadvise {
  struct Call {
    std::uintptr_t begin;
    std::size_t length;
    int advice;
  };
  static inline std::vector<Call> calls;
  // (range begin, advice) -> errno; not listed: success
  static inline std::vector<std::pair<std::pair<std::uintptr_t, int>, int>> refusals;
  static int call(void* addr, std::size_t length, int advice) {
    auto b = reinterpret_cast<std::uintptr_t>(addr);
    calls.push_back({b, length, advice});
    for (const auto& [key, err] : refusals) {
      if (key.first == b && key.second == advice) {
        errno = err;
        return -1;
      }
    }
    return 0;
  }
  static void reset() {
    calls.clear();
    refusals.clear();
  }
};
#endif

}  // namespace

#if defined(__linux__)
TEST_CASE("advise_ranges: an error only when nothing could be done") {
  constexpr std::uintptr_t MiB = 1 << 20;
  const std::vector<HeapRange> ranges = {
      {0x10000000, 0x10000000 + 8 * MiB, false},   // a heap in use
      {0x20000000, 0x20000000 + 4 * MiB, false},   // another
      {0x20000000 + 4 * MiB, 0x24000000, true},    // its reserved rest: advised, never merged
      {0x30000000, 0x30000000 + MiB, false},       // under 2 MiB: advised, never merged
  };
  const std::size_t all = 8 * MiB + 4 * MiB + (0x24000000 - 0x20000000 - 4 * MiB) + MiB;

  SUBCASE("everything taken") {
    FakeMadvise::reset();
    auto a = advise_ranges(ranges, true, &FakeMadvise::call);
    CHECK(a.error.empty());
    CHECK(a.ranges == 4);
    CHECK(a.advised_bytes == all);
    CHECK(a.collapsed_bytes == 12 * MiB);
    CHECK(a.not_collapsed_bytes == 0);
    CHECK(FakeMadvise::calls.size() == 6);  // four advices, two merges
    FakeMadvise::reset();
    a = advise_ranges(ranges, false, &FakeMadvise::call);  // no collapse: no merge asked
    CHECK(a.collapsed_bytes == 0);
    CHECK(FakeMadvise::calls.size() == 4);
  }
  SUBCASE("the advice refused for one range only is no error") {
    FakeMadvise::reset();
    FakeMadvise::refusals = {{{0x10000000, MADV_HUGEPAGE}, EINVAL}};
    auto a = advise_ranges(ranges, true, &FakeMadvise::call);
    CHECK(a.error.empty());
    CHECK(a.advised_bytes == all - 8 * MiB);
    CHECK(a.collapsed_bytes == 4 * MiB);  // the refused range is not merged either
    CHECK(FakeMadvise::calls.size() == 5);
  }
  SUBCASE("the advice refused for every range is the error") {
    FakeMadvise::reset();
    for (const auto& r : ranges) FakeMadvise::refusals.push_back({{r.begin, MADV_HUGEPAGE}, EINVAL});
    auto a = advise_ranges(ranges, true, &FakeMadvise::call);
    CHECK(a.advised_bytes == 0);
    CHECK(a.collapsed_bytes == 0);
    CHECK(a.error.find("MADV_HUGEPAGE") != std::string::npos);
    CHECK(FakeMadvise::calls.size() == 4);
  }
  SUBCASE("ranges gone since the maps were read are skipped, not refused") {
    FakeMadvise::reset();
    FakeMadvise::refusals = {{{0x10000000, MADV_HUGEPAGE}, ENOMEM},
                             {{0x20000000, MADV_HUGEPAGE}, ENOMEM},
                             {{0x20000000 + 4 * MiB, MADV_HUGEPAGE}, ENOMEM},
                             {{0x30000000, MADV_HUGEPAGE}, ENOMEM}};
    auto a = advise_ranges(ranges, true, &FakeMadvise::call);
    CHECK(a.advised_bytes == 0);
    CHECK(a.error.empty());
  }
  SUBCASE("a merge refused for some ranges is no error, for all it is") {
    FakeMadvise::reset();
    FakeMadvise::refusals = {{{0x10000000, MADV_COLLAPSE}, EAGAIN}};
    auto a = advise_ranges(ranges, true, &FakeMadvise::call);
    CHECK(a.error.empty());
    CHECK(a.collapsed_bytes == 4 * MiB);
    CHECK(a.not_collapsed_bytes == 8 * MiB);
    FakeMadvise::reset();
    FakeMadvise::refusals = {{{0x10000000, MADV_COLLAPSE}, EINVAL}, {{0x20000000, MADV_COLLAPSE}, EINVAL}};
    a = advise_ranges(ranges, true, &FakeMadvise::call);
    CHECK(a.advised_bytes == all);
    CHECK(a.collapsed_bytes == 0);
    CHECK(a.not_collapsed_bytes == 12 * MiB);
    CHECK(a.error.find("MADV_COLLAPSE") != std::string::npos);
  }
}
#endif

TEST_CASE("malloc_heap_ranges keeps [heap] and glibc arena heaps, and nothing else") {
  // A /proc/self/maps as a threaded glibc process shows it (addresses shortened).
  const char* maps =
      "55a949400000-55a949411000 r--p 00000000 fd:01 1234   /usr/bin/prog\n"
      "55a949411000-55a94b89f000 rw-p 00000000 00:00 0      [heap]\n"
      // an arena heap: 64 MiB aligned, the used part read-write, the rest reserved
      "7f1968000000-7f19689e7000 rw-p 00000000 00:00 0 \n"
      "7f19689e7000-7f196c000000 ---p 00000000 00:00 0 \n"
      // a second heap of an arena, all of it in use
      "7f1970000000-7f1974000000 rw-p 00000000 00:00 0\n"
      // a thread stack and its guard page, not aligned to 64 MiB
      "7f19ae104000-7f19ae105000 ---p 00000000 00:00 0 \n"
      "7f19ae105000-7f19ae905000 rw-p 00000000 00:00 0 \n"
      // 64 MiB aligned, but larger than an arena heap: a block malloc mapped on its own
      "7f19b0000000-7f19b8000000 rw-p 00000000 00:00 0 \n"
      // a file mapping at an aligned address
      "7f19bc000000-7f19bc100000 rw-p 00000000 fd:01 99     /tmp/data\n"
      // a read-only anonymous mapping at an aligned address
      "7f19c0000000-7f19c0100000 r--p 00000000 00:00 0 \n"
      "7f19ffe00000-7f19ffe21000 rw-p 00000000 00:00 0      [stack]\n"
      "not a mapping line\n"
      "ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0  [vsyscall]";
  auto rs = malloc_heap_ranges(maps);
  CHECK(rs.size() == 4);
  CHECK(has(rs, 0x55a949411000, 0x55a94b89f000, false));
  CHECK(has(rs, 0x7f1968000000, 0x7f19689e7000, false));
  CHECK(has(rs, 0x7f19689e7000, 0x7f196c000000, true));
  CHECK(has(rs, 0x7f1970000000, 0x7f1974000000, false));

  CHECK(malloc_heap_ranges("").empty());
  // a reserved part alone (its arena's first mapping not seen) is not taken for a heap
  CHECK(malloc_heap_ranges("7f19689e7000-7f196c000000 ---p 00000000 00:00 0\n").empty());
}

TEST_CASE("malloc_heap_ranges finds the heap holding another thread's allocations") {
  if (kOwnMalloc) return;  // under ASan/TSan malloc is the sanitizer's, in none of glibc's heaps
  // Many small blocks from a new thread: glibc serves them from that thread's arena heap (or
  // the main heap when the arenas are all taken), never from a mapping of their own.
  std::vector<void*> blocks;
  std::thread([&] {
    for (int i = 0; i < 2000; ++i) blocks.push_back(std::malloc(4000));
  }).join();
  std::ifstream in("/proc/self/maps");
  std::string maps((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto rs = malloc_heap_ranges(maps);
  std::size_t inside = 0;
  for (void* b : blocks) {
    auto p = reinterpret_cast<std::uintptr_t>(b);
    for (const auto& r : rs) {
      if (p >= r.begin && p < r.end && !r.reserved) {
        ++inside;
        break;
      }
    }
  }
  CHECK(inside == blocks.size());

  auto advice = advise_heap_huge_pages(false);
  CHECK(advice.ranges >= 1);
  CHECK(advice.collapsed_bytes == 0);
  if (advice.error.empty()) {  // a kernel without THP refuses the advice; nothing to check
    CHECK(advice.advised_bytes > 0);
    // The kernel took it: the mapping holding the thread's blocks is flagged "hg" (MADV_HUGEPAGE).
    auto p = reinterpret_cast<std::uintptr_t>(blocks.front());
    std::ifstream smaps("/proc/self/smaps");
    bool in_it = false, flagged = false;
    for (std::string line; std::getline(smaps, line);) {
      std::uintptr_t b = 0, e = 0;
      if (std::sscanf(line.c_str(), "%lx-%lx ", &b, &e) == 2 && line.find(' ') > line.find('-')) {
        in_it = p >= b && p < e;
      } else if (in_it && line.rfind("VmFlags:", 0) == 0) {
        flagged = (line + " ").find(" hg ") != std::string::npos;
        break;
      }
    }
    CHECK(flagged);
  }
  for (void* b : blocks) std::free(b);
}
