/* ballast.c: an LD_PRELOAD library that gives a process resident memory it never uses again,
 * to tell what a large heap costs a handshake from what the certificates in it cost
 * (proc_multi.sh, docs/benchmarks.md session 16).
 *   gcc -O2 -shared -fPIC -o ballast.so ballast.c
 *   BALLAST_MB=N        N MiB, one anonymous mapping, every page touched at start
 *   BALLAST_SMALL=1     instead N MiB of 4,000-byte malloc blocks (like built objects)
 *   BALLAST_HUGE=1      the mapping marked MADV_HUGEPAGE before it is touched */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
static void* keep;
__attribute__((constructor)) static void ballast(void) {
  const char* mb = getenv("BALLAST_MB");
  if (!mb) return;
  size_t n = (size_t)atol(mb) << 20;
  if (getenv("BALLAST_SMALL")) {
    void** v = malloc(sizeof(void*) * (n / 4096 + 1));
    for (size_t i = 0; i < n / 4096; ++i) {
      v[i] = malloc(4000);
      memset(v[i], 1, 4000);
    }
    keep = v;
  } else {
    char* m = mmap(0, n + (2 << 20), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return;
    char* p = (char*)(((unsigned long)m + (2 << 20) - 1) & ~((2UL << 20) - 1));
    if (getenv("BALLAST_HUGE")) madvise(p, n, MADV_HUGEPAGE);
    for (size_t i = 0; i < n; i += 4096) p[i] = 1;
    keep = p;
  }
}
