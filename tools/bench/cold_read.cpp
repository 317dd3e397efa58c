// cold_read: the file I/O of a certbot-directory load and nothing else, for measuring a cold
// start's kernel cost (docs/benchmarks.md, "Cold start"). Built with the benchmarks
// (-DAUTOTLS_BENCH=ON), run by hand:
//   sync; echo 3 > /proc/sys/vm/drop_caches
//   build-bench/tools/bench/cold_read build-bench/fixtures/store-20000/live 8 inode,aio
// Arguments: the live directory, threads, and flags (any of, comma separated): inode (order
// by the pair directory's d_ino, else by name), noatime, nofstat, fadvise or readahead (a
// first pass over all files), getdents (a first pass reading each pair directory), aio (a
// first pass of io_submit'ed RWF_NOWAIT 1-byte reads, 64 files per call), opendirs,
// statfirst. Prints one JSON line; the block requests are in /proc/diskstats.
// flags: inode (sort by subdir d_ino), noatime, nofstat, fadvise (first pass WILLNEED), readahead, bigbuf
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>
#include <dirent.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/aio_abi.h>
struct Ent { std::string name; ino_t ino; };
struct linux_dirent64 { ino64_t d_ino; off64_t d_off; unsigned short d_reclen; unsigned char d_type; char d_name[]; };
int main(int argc, char** argv) {
  const char* dir = argv[1];
  int threads = atoi(argv[2]);
  std::string flags = argc > 3 ? argv[3] : "";
  bool inode = flags.find("inode") != std::string::npos;
  bool noatime = flags.find("noatime") != std::string::npos;
  bool nofstat = flags.find("nofstat") != std::string::npos;
  bool fadv = flags.find("fadvise") != std::string::npos;
  bool ra = flags.find("readahead") != std::string::npos;
  bool opendirs = flags.find("opendirs") != std::string::npos; // open each subdir first pass
  bool statfirst = flags.find("statfirst") != std::string::npos; // first pass: fstatat both files (inode only)
  auto t0 = std::chrono::steady_clock::now();
  rusage r0; getrusage(RUSAGE_SELF, &r0);
  int root = open(dir, O_RDONLY | O_DIRECTORY);
  std::vector<Ent> ents;
  std::vector<char> buf(1 << 20);
  for (;;) {
    long n = syscall(SYS_getdents64, root, buf.data(), buf.size());
    if (n <= 0) break;
    for (long off = 0; off < n;) {
      auto* d = (linux_dirent64*)(buf.data() + off);
      off += d->d_reclen;
      if (d->d_name[0] == '.') continue;
      ents.push_back({d->d_name, d->d_ino});
    }
  }
  if (inode) std::sort(ents.begin(), ents.end(), [](auto& a, auto& b) { return a.ino < b.ino; });
  else std::sort(ents.begin(), ents.end(), [](auto& a, auto& b) { return a.name < b.name; });
  auto t1 = std::chrono::steady_clock::now();
  size_t n = ents.size();
  std::atomic<size_t> bytes{0};
  auto run = [&](auto body) {
    std::atomic<size_t> next{0};
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) pool.emplace_back([&] {
      for (;;) { size_t b = next.fetch_add(32); if (b >= n) return;
        for (size_t i = b; i < std::min(n, b + 32); ++i) body(i); } });
    for (auto& t : pool) t.join();
  };
  int oflags = O_RDONLY | O_CLOEXEC | (noatime ? O_NOATIME : 0);
  if (opendirs) run([&](size_t i) { struct stat st; fstatat(root, ents[i].name.c_str(), &st, 0); });
  bool getd = flags.find("getdents") != std::string::npos;
  if (getd) run([&](size_t i) { int fd = openat(root, ents[i].name.c_str(), O_RDONLY|O_DIRECTORY|O_CLOEXEC);
      if (fd < 0) return;
      thread_local std::vector<char> b(4096);
      syscall(SYS_getdents64, fd, b.data(), b.size());
      close(fd); });
  if (statfirst) run([&](size_t i) { struct stat st; std::string p = ents[i].name + "/fullchain.pem";
      fstatat(root, p.c_str(), &st, 0); p = ents[i].name + "/privkey.pem"; fstatat(root, p.c_str(), &st, 0); });
  if (fadv || ra) run([&](size_t i) {
    for (const char* f : {"/fullchain.pem", "/privkey.pem"}) {
      std::string p = ents[i].name + f;
      int fd = openat(root, p.c_str(), oflags);
      if (fd < 0) continue;
      if (fadv) posix_fadvise(fd, 0, 0, POSIX_FADV_WILLNEED); else readahead(fd, 0, 16384);
      close(fd);
    } });
  bool aio = flags.find("aio") != std::string::npos;
  if (aio) {
    std::atomic<size_t> next{0};
    std::vector<std::thread> pool;
    std::atomic<long> eagain{0}, okc{0}, other{0};
    for (int t = 0; t < threads; ++t) pool.emplace_back([&] {
      aio_context_t ctx = 0;
      if (syscall(SYS_io_setup, 128, &ctx) != 0) { perror("io_setup"); return; }
      std::vector<char> b(64 * 4096);
      for (;;) { size_t beg = next.fetch_add(32); if (beg >= n) break;
        std::vector<iocb> cbs; std::vector<int> fds;
        for (size_t i = beg; i < std::min(n, beg + 32); ++i)
          for (const char* f : {"/fullchain.pem", "/privkey.pem"}) {
            std::string p = ents[i].name + f;
            int fd = openat(root, p.c_str(), oflags);
            if (fd < 0) continue;
            fds.push_back(fd);
          }
        cbs.resize(fds.size());
        std::vector<iocb*> ptrs;
        for (size_t k = 0; k < fds.size(); ++k) {
          iocb& c = cbs[k]; memset(&c, 0, sizeof c);
          c.aio_lio_opcode = IOCB_CMD_PREAD; c.aio_fildes = fds[k];
          c.aio_buf = (uint64_t)(b.data() + 4096 * k); c.aio_nbytes = 4096; c.aio_rw_flags = RWF_NOWAIT;
          ptrs.push_back(&c);
        }
        long sub = syscall(SYS_io_submit, ctx, (long)ptrs.size(), ptrs.data());
        if (sub < 0) { perror("io_submit"); }
        std::vector<io_event> ev(ptrs.size());
        long got = 0;
        while (sub > 0 && got < sub) { long r = syscall(SYS_io_getevents, ctx, 1, sub - got, ev.data(), nullptr); if (r <= 0) break;
          for (long e = 0; e < r; ++e) { if (ev[e].res == -EAGAIN) eagain++; else if (ev[e].res >= 0) okc++; else other++; } got += r; }
        for (int fd : fds) close(fd);
      }
      syscall(SYS_io_destroy, ctx);
    });
    for (auto& t : pool) t.join();
    fprintf(stderr, "aio: eagain=%ld ok=%ld other=%ld\n", eagain.load(), okc.load(), other.load());
  }
  auto t2 = std::chrono::steady_clock::now();
  run([&](size_t i) {
    thread_local std::vector<char> b(16384);
    for (const char* f : {"/fullchain.pem", "/privkey.pem"}) {
      std::string p = ents[i].name + f;
      int fd = openat(root, p.c_str(), oflags);
      if (fd < 0) { perror(p.c_str()); continue; }
      if (!nofstat) { struct stat st; fstat(fd, &st); }
      ssize_t r = read(fd, b.data(), b.size());
      if (r > 0) bytes += r;
      close(fd);
    } });
  auto t3 = std::chrono::steady_clock::now();
  rusage r1; getrusage(RUSAGE_SELF, &r1);
  auto s = [](timeval t) { return t.tv_sec + t.tv_usec / 1e6; };
  auto d = [](auto a, auto b) { return std::chrono::duration<double>(b - a).count(); };
  double la[3]; getloadavg(la, 3);
  printf("{\"mode\":\"%s\",\"threads\":%d,\"pairs\":%zu,\"bytes\":%zu,\"wall_s\":%.3f,\"list_s\":%.3f,\"pass1_s\":%.3f,\"pass2_s\":%.3f,\"user_s\":%.2f,\"sys_s\":%.2f,\"load\":%.2f}\n",
         flags.c_str(), threads, n, bytes.load(), d(t0, t3), d(t0, t1), d(t1, t2), d(t2, t3),
         s(r1.ru_utime) - s(r0.ru_utime), s(r1.ru_stime) - s(r0.ru_stime), la[0]);
}
