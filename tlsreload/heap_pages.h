#pragma once
// Transparent huge pages for the malloc heaps that hold built OpenSSL objects.
//
// A built certificate's OpenSSL objects (leaf X509, key, about 5 KiB) live in the C library's
// malloc heaps: OpenSSL allocates them, not us, so the store's own huge-page pool
// (store.cpp, TablePool) cannot hold them. With 100,000 certificates built they span ~170,000
// 4 KiB pages, and a handshake for a random name touches a few of those pages: far past the
// TLB's reach, so each is a page walk (two-dimensional under a hypervisor). On 2 MiB pages the
// same heap is ~340 TLB entries. docs/benchmarks.md ("Session 16") has the measurements.
//
// Linux only; elsewhere the functions find nothing and change nothing.

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace autotls::tlsreload {

struct HeapRange {
  std::uintptr_t begin = 0;
  std::uintptr_t end = 0;  // one past the last byte
  bool reserved = false;   // PROT_NONE: an arena heap's part not yet grown into
};

// malloc_heap_ranges picks, from the text of /proc/self/maps, the mappings glibc's malloc
// grows into: the main "[heap]", and the arena heaps (private anonymous mappings inside a
// 64 MiB block that begins with one of them at its aligned start, which is how glibc reserves
// an arena heap: 64 MiB aligned, the used part read-write and the rest PROT_NONE until the
// arena grows into it; both parts are returned, so the advice covers later growth too).
// File mappings, read-only or executable mappings, and anonymous mappings elsewhere (thread
// stacks, large blocks malloc maps on their own) are left out.
std::vector<HeapRange> malloc_heap_ranges(std::string_view maps);

struct HeapAdvice {
  std::size_t ranges = 0;
  std::size_t advised_bytes = 0;        // marked MADV_HUGEPAGE
  std::size_t collapsed_bytes = 0;      // ranges merged into huge pages whole (MADV_COLLAPSE)
  std::size_t not_collapsed_bytes = 0;  // ranges the kernel declined to merge (see below)
  // Set when nothing could be done: the advice refused for every range (a kernel without
  // THP), or, with collapse, every merge refused (THP "never", a kernel before 6.1). A refusal
  // for some ranges only is not an error: a range part of whose pages are already huge, or in
  // use, can be refused (EINVAL, EAGAIN) while the rest merge; khugepaged gets it later. A range
  // gone since /proc/self/maps was read (ENOMEM: glibc unmapped an emptied arena heap) is
  // skipped and is no refusal.
  std::string error;
};

// advise_heap_huge_pages marks the malloc heaps MADV_HUGEPAGE: where the system's THP mode is
// "madvise" (Debian's default) or "always", pages that fault in there later are huge pages,
// and the kernel's khugepaged merges the existing ones in the background (slowly: 16 MiB
// every 10 s by default). With collapse it also merges them now with MADV_COLLAPSE (Linux
// 6.1+), synchronously on the calling thread: about 1.3 s for 650 MiB on the benchmark
// machine, so call it off the serving threads. Idempotent; memory already on huge pages is
// skipped by the kernel. A refusal (THP "never", an older kernel) changes nothing and is
// reported in error.
HeapAdvice advise_heap_huge_pages(bool collapse);

// The same over given ranges with a given madvise (0 or -1 and errno, as the system call):
// what advise_heap_huge_pages does once it has read the ranges. For tests.
using MadviseFn = int (*)(void* addr, std::size_t length, int advice);
HeapAdvice advise_ranges(const std::vector<HeapRange>& ranges, bool collapse, MadviseFn call);

}  // namespace autotls::tlsreload
