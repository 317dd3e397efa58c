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

}  // namespace

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
