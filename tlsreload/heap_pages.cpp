#include "tlsreload/heap_pages.h"

#include <cerrno>
#include <charconv>
#include <cstring>
#include <fstream>
#include <iterator>

#if defined(__linux__)
#include <sys/mman.h>
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25  // Linux 6.1; glibc 2.36's headers predate it
#endif
#endif

namespace autotls::tlsreload {
namespace {

// glibc reserves each arena heap as HEAP_MAX_SIZE bytes aligned to HEAP_MAX_SIZE: 64 MiB on
// 64-bit targets (2 * DEFAULT_MMAP_THRESHOLD_MAX).
constexpr std::uintptr_t kArenaHeap = std::uintptr_t{64} << 20;

struct Mapping {
  std::uintptr_t begin = 0, end = 0;
  std::string_view perms, path;
  bool anonymous = false;  // no file: inode 0, no path (or "[heap]")
};

bool parse_hex(std::string_view s, std::uintptr_t& out) {
  auto r = std::from_chars(s.data(), s.data() + s.size(), out, 16);
  return r.ec == std::errc() && r.ptr == s.data() + s.size();
}

std::string_view next_field(std::string_view& line) {
  std::size_t b = line.find_first_not_of(' ');
  if (b == std::string_view::npos) {
    line = {};
    return {};
  }
  line.remove_prefix(b);
  std::size_t e = line.find(' ');
  std::string_view f = line.substr(0, e);
  line.remove_prefix(e == std::string_view::npos ? line.size() : e);
  return f;
}

// "start-end perms offset dev inode [path]"; false for anything else.
bool parse_line(std::string_view line, Mapping& m) {
  std::string_view range = next_field(line), perms = next_field(line), offset = next_field(line),
                   dev = next_field(line), inode = next_field(line);
  std::size_t p = line.find_first_not_of(' ');
  m.path = p == std::string_view::npos ? std::string_view{} : line.substr(p);
  std::size_t dash = range.find('-');
  if (dash == std::string_view::npos || perms.size() != 4 || dev.empty()) return false;
  if (!parse_hex(range.substr(0, dash), m.begin) || !parse_hex(range.substr(dash + 1), m.end) ||
      m.end <= m.begin) {
    return false;
  }
  m.perms = perms;
  m.anonymous = inode == "0" && offset.find_first_not_of('0') == std::string_view::npos &&
                (m.path.empty() || m.path == "[heap]");
  return true;
}

}  // namespace

std::vector<HeapRange> malloc_heap_ranges(std::string_view maps) {
  std::vector<Mapping> all;
  while (!maps.empty()) {
    std::size_t nl = maps.find('\n');
    std::string_view line = maps.substr(0, nl);
    maps.remove_prefix(nl == std::string_view::npos ? maps.size() : nl + 1);
    if (Mapping m; parse_line(line, m)) all.push_back(m);
  }
  std::vector<HeapRange> out;
  std::uintptr_t arena = 0;  // the 64 MiB block whose aligned start holds an arena heap, or 0
  for (const Mapping& m : all) {
    bool writable = m.perms == "rw-p";
    if (m.path == "[heap]") {
      if (writable) out.push_back({m.begin, m.end});
      continue;
    }
    if (!m.anonymous || !(writable || m.perms == "---p")) continue;
    std::uintptr_t block = m.begin & ~(kArenaHeap - 1);
    if (m.begin == block && writable) arena = block;  // an arena heap starts here
    if (arena != 0 && block == arena && m.end <= arena + kArenaHeap) out.push_back({m.begin, m.end, !writable});
  }
  return out;
}

HeapAdvice advise_ranges(const std::vector<HeapRange>& ranges, bool collapse, MadviseFn call) {
  HeapAdvice advice;
#if defined(__linux__)
  int advise_errno = 0, collapse_errno = 0;  // the first of each
  for (const HeapRange& r : ranges) {
    void* p = reinterpret_cast<void*>(r.begin);
    std::size_t n = r.end - r.begin;
    ++advice.ranges;
    if (call(p, n, MADV_HUGEPAGE) != 0) {
      // ENOMEM: the range went away since the maps were read (glibc unmapped an emptied arena
      // heap); anything else (EINVAL: a kernel without THP) is a refusal of the advice itself.
      if (errno != ENOMEM && advise_errno == 0) advise_errno = errno;
      continue;
    }
    advice.advised_bytes += n;
    // A PROT_NONE reservation has nothing to merge yet, and a range under 2 MiB holds no whole
    // huge page.
    if (collapse && !r.reserved && n >= (std::size_t{2} << 20)) {
      if (call(p, n, MADV_COLLAPSE) == 0) {
        advice.collapsed_bytes += n;
      } else {
        if (collapse_errno == 0) collapse_errno = errno;
        advice.not_collapsed_bytes += n;
      }
    }
  }
  if (advise_errno != 0 && advice.advised_bytes == 0) {
    advice.error = std::string("madvise(MADV_HUGEPAGE): ") + std::strerror(advise_errno);
  } else if (collapse_errno != 0 && advice.collapsed_bytes == 0) {
    advice.error = std::string("madvise(MADV_COLLAPSE): ") + std::strerror(collapse_errno);
  }
#else
  (void)ranges;
  (void)collapse;
  (void)call;
#endif
  return advice;
}

HeapAdvice advise_heap_huge_pages(bool collapse) {
#if defined(__linux__)
  std::ifstream in("/proc/self/maps");
  if (!in) {
    HeapAdvice advice;
    advice.error = "cannot read /proc/self/maps";
    return advice;
  }
  std::string maps((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return advise_ranges(malloc_heap_ranges(maps), collapse, [](void* a, std::size_t n, int adv) {
    return ::madvise(a, n, adv);
  });
#else
  (void)collapse;
  return {};
#endif
}

}  // namespace autotls::tlsreload
