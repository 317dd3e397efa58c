#include "tlsreload/loader.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <climits>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <system_error>
#include <thread>
#include <utility>

#include <dirent.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "tlsreload/store.h"

namespace autotls::tlsreload {
namespace {

namespace fs = std::filesystem;

constexpr std::size_t kMaxFileBytes = 1 << 20;

FileIdentity identity_of(const struct stat& st) {
  return FileIdentity{static_cast<std::uint64_t>(st.st_size),
                      static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec,
                      static_cast<std::uint64_t>(st.st_ino), static_cast<std::uint64_t>(st.st_dev)};
}

// FileBuffer reads whole files into one buffer that it reuses (each loading thread has one):
// openat (relative to a directory fd, so the kernel walks two path components, not the whole
// path), fstat, one read of st_size + 1 bytes (a short read of a regular file is its end, so no
// second read to see end of file), close. At 200,000 files per load, the system calls and path
// walks were half of the load's CPU time (docs/benchmarks.md). The view read() returns stays
// valid until the next read().
class FileBuffer {
 public:
  // read reads path, relative to dir_fd (AT_FDCWD: as given). shown() names the file in
  // errors (called only then). missing, when given, is set instead of failing when the file
  // does not exist.
  // opened, when not negative, is path already open (the cold-start prefetch opened it); read
  // then uses it and closes it.
  template <class Shown>
  Result<std::string_view> read(int dir_fd, const char* path, Shown&& shown, bool* missing = nullptr,
                                int opened = -1, FileIdentity* identity = nullptr,
                                std::uint32_t* mode = nullptr) {
    int fd = opened >= 0 ? opened : ::openat(dir_fd, path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      int err = errno;
      if (missing && err == ENOENT) {
        *missing = true;
        return std::string_view();
      }
      return fail(Errc::io, shown().string() + ": " + std::generic_category().message(err));
    }
    struct Closer {
      int fd;
      ~Closer() { ::close(fd); }
    } closer{fd};
    struct stat st{};
    if (::fstat(fd, &st) != 0) return fail(Errc::io, shown().string() + ": " + std::strerror(errno));
    if (S_ISDIR(st.st_mode)) return fail(Errc::io, shown().string() + ": Is a directory");
    if (identity) *identity = identity_of(st);
    if (mode) *mode = static_cast<std::uint32_t>(st.st_mode);
    const bool regular = S_ISREG(st.st_mode);
    if (regular && static_cast<std::uintmax_t>(st.st_size) > kMaxFileBytes) return fail(too_large(shown()));
    // st_size + 1: a regular file that has not grown fills all but the last byte, and that
    // short read is its end. Other files (a FIFO, /dev/stdin) are read until read() says 0.
    std::size_t want = regular ? static_cast<std::size_t>(st.st_size) + 1 : 4096;
    if (buf_.size() < want) buf_.resize(std::max(want, std::size_t{16384}));
    std::size_t got = 0;
    for (;;) {
      if (got == buf_.size()) {
        if (got > kMaxFileBytes) return fail(too_large(shown()));
        buf_.resize(std::min(2 * buf_.size(), kMaxFileBytes + 1));
      }
      ssize_t n = ::read(fd, buf_.data() + got, buf_.size() - got);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return fail(Errc::io, shown().string() + ": read error: " + std::strerror(errno));
      if (n == 0) break;
      std::size_t asked = buf_.size() - got;
      got += static_cast<std::size_t>(n);
      dirty_ = std::max(dirty_, got);
      if (got > kMaxFileBytes) return fail(too_large(shown()));
      if (regular && static_cast<std::size_t>(n) < asked) break;
    }
    return std::string_view(buf_.data(), got);
  }

  FileBuffer() = default;
  FileBuffer(const FileBuffer&) = delete;
  FileBuffer& operator=(const FileBuffer&) = delete;
  ~FileBuffer() { wipe(); }

  // wipe clears every byte read since the last wipe (a private key's text), whatever path the
  // read took (a failed or partial read included).
  void wipe() {
    OPENSSL_cleanse(buf_.data(), std::min(dirty_, buf_.size()));
    dirty_ = 0;
  }

 private:
  static Error too_large(const fs::path& shown) {
    return Error(Errc::invalid_input, shown.string() + ": larger than 1 MiB, not a PEM file");
  }
  std::string buf_;
  std::size_t dirty_ = 0;  // bytes of buf_ that may hold file contents
};

// Each thread's buffers for a chain and a key.
struct PairBuffers {
  FileBuffer chain, key;
};
PairBuffers& thread_buffers() {
  thread_local PairBuffers b;
  return b;
}

// KeyWiper wipes the key buffer when the parse is done, whatever happened.
struct KeyWiper {
  FileBuffer& buf;
  ~KeyWiper() { buf.wipe(); }
};

constexpr std::size_t kChunk = 32;

std::size_t io_threads() { return std::max(1u, std::thread::hardware_concurrency()) * 4; }

// LoaderThreads: the threads parallel_chunks lends work to, made on first use and kept, parked,
// for the life of the process. Kept, because glibc gives each thread a malloc arena and hands
// the arena of a thread that exits to the next thread made: threads made per load left their
// arenas, full of the certificates just loaded and of the holes their parsing left, to the
// server's reactors started next, whose every handshake then allocated among them (with the
// benchmark's warm-up threads kept too, a process holding 100,000 built certificates went from
// +10-12 % CPU per handshake over a one-certificate process to +6.9 %: docs/benchmarks.md,
// session 26). One job at a time: a caller that finds the threads busy (another load, on
// another thread), or that is itself running a job, makes threads of its own, as before. What
// a kept thread holds between loads: its thread-locals (file buffers, wiped; a Prefetch's AIO
// context of 64 events) and its arena's free space.
class LoaderThreads {
 public:
  static LoaderThreads& get() {
    static auto* threads = new LoaderThreads;  // never destroyed: parked threads hold nothing
    return *threads;
  }

  // try_run runs work on the caller and on up to extra of these threads at once, and returns
  // when every one has returned; false, having run nothing, when another caller's job is
  // running. Fewer threads when no more can be made.
  bool try_run(std::size_t extra, const std::function<void()>& work) {
    if (in_job) return false;  // a job's own nested load: run_mu_ may be this thread's
    std::unique_lock running(run_mu_, std::try_to_lock);
    if (!running) return false;
    {
      std::lock_guard lock(mu_);
      while (threads_.size() < extra) {
        try {
          threads_.emplace_back([this, index = threads_.size(), seen = generation_] { loop(index, seen); });
        } catch (const std::system_error&) {
          break;
        }
      }
      job_ = &work;
      wanted_ = std::min(extra, threads_.size());
      pending_ = wanted_;
      ++generation_;
    }
    cv_.notify_all();
    in_job = true;
    work();
    in_job = false;
    std::unique_lock lock(mu_);
    done_.wait(lock, [&] { return pending_ == 0; });
    job_ = nullptr;
    return true;
  }

 private:
  void loop(std::size_t index, std::uint64_t seen) {
    for (;;) {
      const std::function<void()>* job = nullptr;
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (index >= wanted_) continue;
        job = job_;
      }
      in_job = true;
      (*job)();
      in_job = false;
      std::lock_guard lock(mu_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  static inline thread_local bool in_job = false;  // running a job's work on this thread

  std::mutex run_mu_;  // held by the caller whose job runs
  std::mutex mu_;
  std::condition_variable cv_, done_;
  std::vector<std::thread> threads_;
  const std::function<void()>* job_ = nullptr;
  std::uint64_t generation_ = 0;
  std::size_t wanted_ = 0, pending_ = 0;
};

// parallel_for runs body(i) for i in [0, n) on up to hardware_concurrency threads, in chunks
// (an atomic counter hands them out, so a slow file does not idle the other threads).
// io_bound multiplies the thread count: a cold start reads 200,000 small files, and the disk
// serves many outstanding reads better than two. parallel_chunks is the same with the chunk
// as the unit: body(begin, end).
template <class Body>
void parallel_chunks(std::size_t n, std::size_t chunk, Body&& body, bool io_bound = false) {
  std::size_t threads = io_bound ? io_threads() : std::max(1u, std::thread::hardware_concurrency());
  threads = std::min(threads, (n + chunk - 1) / chunk);
  std::atomic<std::size_t> next{0};
  auto work = [&] {
    for (;;) {
      std::size_t begin = next.fetch_add(chunk, std::memory_order_relaxed);
      if (begin >= n) return;
      body(begin, std::min(n, begin + chunk));
    }
  };
  if (threads > 1 && LoaderThreads::get().try_run(threads - 1, work)) return;
  std::vector<std::thread> pool;
  for (std::size_t t = 1; t < threads; ++t) {
    try {
      pool.emplace_back(work);
    } catch (const std::system_error&) {
      break;  // no more threads: the ones we have (and this one) do the work
    }
  }
  work();
  for (auto& t : pool) t.join();
}

template <class Body>
void parallel_for(std::size_t n, Body&& body, bool io_bound = false) {
  parallel_chunks(
      n, kChunk,
      [&](std::size_t begin, std::size_t end) {
        for (std::size_t i = begin; i < end; ++i) body(i);
      },
      io_bound);
}

// Which file an error concerns: an unreadable key names the key file; everything else,
// including a key that does not match, names the chain (usually the file that changed).
const fs::path& blame(const CertKeyPaths& paths, const Error& e) {
  return e.message.starts_with("private key:") ? paths.key : paths.chain;
}

void scan_level(const fs::path& dir, DirectoryScan& scan, bool descend_into_live) {
  std::error_code ec;
  std::vector<fs::path> subdirs;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::error_code sec;
    if (it->is_directory(sec)) subdirs.push_back(it->path());
  }
  std::sort(subdirs.begin(), subdirs.end());
  for (const fs::path& sub : subdirs) {
    if (descend_into_live && sub.filename() == "live") {
      scan_level(sub, scan, false);
      continue;
    }
    CertKeyPaths pair{sub / "fullchain.pem", sub / "privkey.pem"};
    std::error_code e1, e2;
    bool has_chain = fs::exists(pair.chain, e1);
    bool has_key = fs::exists(pair.key, e2);
    if (!has_chain && !has_key) continue;
    if (!has_chain) {
      scan.failures.push_back({pair.chain, Error(Errc::io, pair.chain.string() + ": missing")});
    } else if (!has_key) {
      scan.failures.push_back({pair.key, Error(Errc::io, pair.key.string() + ": missing")});
    } else {
      scan.pairs.push_back(std::move(pair));
    }
  }
}

}  // namespace

Result<std::shared_ptr<const Certificate>> load_pair(const CertKeyPaths& paths,
                                                     const LoadOptions& options) {
  PairBuffers& bufs = thread_buffers();
  auto chain = bufs.chain.read(AT_FDCWD, paths.chain.c_str(), [&] { return paths.chain; });
  if (!chain) return fail(chain.error());
  KeyWiper wiper{bufs.key};  // before the read: a failed or partial read is wiped too
  auto key = bufs.key.read(AT_FDCWD, paths.key.c_str(), [&] { return paths.key; });
  if (!key) return fail(key.error());
  auto cert = Certificate::from_pem(*chain, *key, options);
  if (!cert) {
    Error e = cert.error();
    e.message = blame(paths, e).string() + ": " + e.message;
    return fail(std::move(e));
  }
  return cert;
}

namespace {

// Outcome is what loading one pair produced, kept per index so the report keeps input order.
struct Outcome {
  enum Kind { skipped, scan_failure, load_failure, loaded } kind = skipped;
  std::shared_ptr<const Certificate> cert;
  std::optional<LoadFailure> failure;
  PairSource source;  // when loaded
};

// PairRef says where one pair's files are: paths relative to dir_fd (AT_FDCWD for paths as
// given), and how to name them in a report (built only when something failed).
struct PairRef {
  int dir_fd = AT_FDCWD;
  const char* chain = nullptr;
  const char* key = nullptr;
  int chain_fd = -1;  // the chain already open (Prefetch's probe), or -1; its read closes it
};

template <class Paths>
Outcome load_one(const PairRef& ref, Paths&& paths, const LoadOptions& options, bool scanning) {
  Outcome out;
  auto record = [&](Outcome::Kind kind, const fs::path& path, Error e) {
    out.kind = kind;
    out.failure = LoadFailure{path, std::move(e)};
    return std::move(out);
  };
  PairBuffers& bufs = thread_buffers();
  bool chain_missing = false, key_missing = false;
  FileIdentity chain_id, key_id;
  std::uint32_t key_mode = 0;
  auto chain = bufs.chain.read(ref.dir_fd, ref.chain, [&] { return paths().chain; },
                               scanning ? &chain_missing : nullptr, ref.chain_fd, &chain_id);
  if (!chain) return record(Outcome::load_failure, paths().chain, chain.error());
  KeyWiper wiper{bufs.key};  // before the read: a failed or partial read is wiped too
  auto key = bufs.key.read(ref.dir_fd, ref.key, [&] { return paths().key; },
                           scanning ? &key_missing : nullptr, -1, &key_id, &key_mode);
  if (chain_missing && key_missing) return out;  // not a certificate directory
  if (chain_missing) {
    fs::path p = paths().chain;
    return record(Outcome::scan_failure, p, Error(Errc::io, p.string() + ": missing"));
  }
  if (key_missing) {
    fs::path p = paths().key;
    return record(Outcome::scan_failure, p, Error(Errc::io, p.string() + ": missing"));
  }
  if (!key) return record(Outcome::load_failure, paths().key, key.error());
  auto cert = Certificate::from_pem(*chain, *key, options);
  if (!cert) {
    Error e = cert.error();
    CertKeyPaths p = paths();
    const fs::path& path = blame(p, e);
    e.message = path.string() + ": " + e.message;
    return record(Outcome::load_failure, path, std::move(e));
  }
  out.kind = Outcome::loaded;
  out.cert = std::move(*cert);
  // The source's paths are made by assemble(), on the calling thread: made here, on the
  // loading threads, their ~1 KiB per pair (two std::filesystem::paths) sat between the
  // certificates in the threads' arenas, and once freed (serve frees them after the start)
  // left the certificates' pages partly empty (serve's RSS +25 MB at 100,000 pairs).
  if (options.record_sources) out.source = PairSource{{}, chain_id, key_id, key_mode};
  return out;
}

// assemble makes the report of outcomes in their order; with_sources, each loaded pair's source
// gets its paths from paths_of(index).
// With options.defer_source_paths, add_paths_of(index, report.source_paths) adds the pair's
// paths as strings instead.
template <class PathsOf, class AddPathsOf>
LoadReport assemble(std::vector<Outcome>& outcomes, const LoadOptions& options, PathsOf&& paths_of,
                    AddPathsOf&& add_paths_of) {
  const bool with_sources = options.record_sources;
  const bool deferred = with_sources && options.defer_source_paths;
  LoadReport report;
  for (auto& o : outcomes) {
    if (o.kind == Outcome::scan_failure) report.failures.push_back(std::move(*o.failure));
  }
  report.scan_failures = report.failures.size();
  for (std::size_t i = 0; i < outcomes.size(); ++i) {
    Outcome& o = outcomes[i];
    if (o.kind == Outcome::load_failure) report.failures.push_back(std::move(*o.failure));
    if (o.kind == Outcome::loaded) {
      report.certificates.push_back(std::move(o.cert));
      if (with_sources) {
        if (deferred) {
          add_paths_of(i, report.source_paths);
        } else {
          o.source.paths = paths_of(i);
        }
        report.sources.push_back(std::move(o.source));
      }
    }
  }
  return report;
}

LoadReport load_all(const std::vector<CertKeyPaths>& pairs, const LoadOptions& options) {
  std::vector<Outcome> outcomes(pairs.size());
  parallel_for(
      pairs.size(),
      [&](std::size_t i) {
        const CertKeyPaths& p = pairs[i];
        outcomes[i] = load_one(PairRef{AT_FDCWD, p.chain.c_str(), p.key.c_str()},
                               [&]() -> const CertKeyPaths& { return p; }, options, false);
      },
      true);
  return assemble(
      outcomes, options, [&](std::size_t i) { return pairs[i]; },
      [&](std::size_t i, SourcePaths& out) { out.add(pairs[i].chain.native(), pairs[i].key.native()); });
}

}  // namespace

LoadReport load_pairs(const std::vector<CertKeyPaths>& pairs, const LoadOptions& options) {
  return load_all(pairs, options);
}

std::vector<Result<std::shared_ptr<const Certificate>>> load_each(const std::vector<CertKeyPaths>& pairs,
                                                                 const LoadOptions& options) {
  std::vector<Result<std::shared_ptr<const Certificate>>> out(pairs.size());
  parallel_for(pairs.size(), [&](std::size_t i) { out[i] = load_pair(pairs[i], options); }, true);
  return out;
}

std::vector<LoadFailure> verify_pending(const std::vector<std::shared_ptr<const Certificate>>& certs) {
  std::vector<std::optional<Error>> errors(certs.size());
  parallel_for(certs.size(), [&](std::size_t i) {
    if (!certs[i] || certs[i]->verification() == Verification::verified) return;
    if (auto st = certs[i]->verify(); !st) errors[i] = st.error();
  });
  std::vector<LoadFailure> out;
  for (auto& e : errors) {
    if (e) out.push_back({{}, std::move(*e)});
  }
  return out;
}

Result<DirectoryScan> find_certbot_pairs(const fs::path& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return fail(Errc::io, dir.string() + ": not a directory" + (ec ? " (" + ec.message() + ")" : ""));
  }
  fs::directory_iterator probe(dir, ec);
  if (ec) return fail(Errc::io, dir.string() + ": " + ec.message());
  DirectoryScan scan;
  scan_level(dir, scan, true);
  return scan;
}

namespace {

// Fd closes a file descriptor.
struct Fd {
  int fd = -1;
  Fd() = default;
  explicit Fd(int f) : fd(f) {}
  Fd(Fd&& o) noexcept : fd(std::exchange(o.fd, -1)) {}
  Fd& operator=(Fd&&) = delete;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

struct Subdirectory {
  std::string name;
  ino_t ino = 0;  // d_ino: the order Prefetch reads in
};

// subdirectories lists the directories in the directory open as fd (following symbolic links,
// as std::filesystem::is_directory does), sorted by name. Without a stat() per entry when the
// file system reports the type (d_type).
std::vector<Subdirectory> subdirectories(int fd) {
  std::vector<Subdirectory> out;
  int dup = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (dup < 0) return out;
  DIR* d = ::fdopendir(dup);
  if (!d) {
    ::close(dup);
    return out;
  }
  while (const dirent* e = ::readdir(d)) {
    std::string_view name = e->d_name;
    if (name == "." || name == "..") continue;
    bool is_dir = e->d_type == DT_DIR;
    if (e->d_type == DT_LNK || e->d_type == DT_UNKNOWN) {
      struct stat st{};
      is_dir = ::fstatat(fd, e->d_name, &st, 0) == 0 && S_ISDIR(st.st_mode);
    }
    if (is_dir) out.push_back({std::string(name), e->d_ino});
  }
  ::closedir(d);
  std::sort(out.begin(), out.end(), [](const Subdirectory& a, const Subdirectory& b) { return a.name < b.name; });
  return out;
}

// Prefetch starts the disk reads of a chunk of pairs at once, so that a cold start costs fewer
// block requests. Why (docs/benchmarks.md, "Cold load"): on this project's VM a cold load
// spends its time in the kernel, ~30 µs of system CPU per block request (the virtio notify and
// its interrupt), and each file read on its own is one request of 4 KiB: 3 per pair (the
// pair's directory block, then each file's data), 303,000 for 100,000 pairs. The data of files
// written one after another sits in adjacent blocks, but the block layer merges adjacent reads
// only when they are submitted under one plug, i.e. by one system call: read(),
// posix_fadvise() and readahead() are one file per call (measured: no fewer requests).
// io_submit() of a batch of RWF_NOWAIT reads is one call for many files: each read that
// misses the page cache starts the file's readahead and fails with EAGAIN at once, and the
// batch's reads leave as merged requests. The loading threads then read the files as before,
// from the page cache or waiting on the read in flight. Measured (store_bench load, 100,000
// pairs, cold, load average 12-17): block requests 306,000 -> 156,000-170,000, system CPU
// 9.8-10.7 -> 8.0-8.7 s; wall time unchanged on that loaded machine (14-15 s). The directory
// blocks, one request per pair, remain: openat() looks them up one at a time.
// A chunk whose first file is already in the page cache (a warm start) is not prefetched: one
// probe per chunk, so a warm load is not slower.
class Prefetch {
 public:
  Prefetch() = default;
  Prefetch(const Prefetch&) = delete;
  Prefetch& operator=(const Prefetch&) = delete;
  ~Prefetch() {
    if (ctx_) ::syscall(SYS_io_destroy, ctx_);
  }

  // retry_for forgets an earlier failure once per load (load: a number new for each load).
  // Threads keep their Prefetch from load to load (the caller of load_directory, and the
  // loader's threads, which are kept: LoaderThreads), so one failed io_getevents or io_setup
  // (EAGAIN at fs.aio-max-nr) would otherwise turn prefetching off for their every later load.
  void retry_for(std::uint64_t load) {
    if (load == load_) return;
    load_ = load;
    unavailable_ = false;
  }

  // probe opens path (relative to dir_fd) and tells whether its first page is in the page
  // cache (a cold one is read ahead by the probe itself). It returns the descriptor of a
  // regular file (O_NONBLOCK cleared) for the caller to read, or -1: not a regular file, not
  // openable (the caller's own open reports why), or not to be probed.
  int probe(int dir_fd, const char* path, bool& cold) {
    cold = false;
    struct stat st{};
    int fd = open_regular(dir_fd, path, st);
    if (fd < 0) return -1;
    if (st.st_size > 0 && !unavailable_) {
      char byte = 0;
      iovec v{&byte, 1};
      ssize_t n = ::preadv2(fd, &v, 1, 0, RWF_NOWAIT);
      if (n < 0 && errno == EAGAIN) cold = true;
      if (n < 0 && errno != EAGAIN) unavailable_ = true;  // no RWF_NOWAIT here: no prefetch
      OPENSSL_cleanse(&byte, 1);
    }
    return fd;
  }

  // start starts reading the first page of each path (relative to dir_fd) that is a regular
  // file, in batches of at most `batch` open files, and returns when the reads are in flight.
  // Only a hint: a file it cannot open or read is left to the loading thread to report.
  void start(int dir_fd, const std::vector<const char*>& paths, std::size_t batch) {
    if (unavailable_ || !context()) return;
    for (std::size_t at = 0; at < paths.size(); at += batch) {
      std::size_t n = 0;
      for (std::size_t i = at; i < std::min(paths.size(), at + batch); ++i) {
        struct stat st{};
        int fd = open_regular(dir_fd, paths[i], st);
        if (fd < 0) continue;
        if (st.st_size == 0) {
          ::close(fd);
          continue;
        }
        fds_[n] = fd;
        iocb& c = cbs_[n];
        c = iocb{};
        c.aio_lio_opcode = IOCB_CMD_PREAD;
        c.aio_fildes = static_cast<std::uint32_t>(fd);
        c.aio_buf = reinterpret_cast<std::uint64_t>(&bytes_[n]);
        c.aio_nbytes = 1;
        c.aio_rw_flags = RWF_NOWAIT;
        ptrs_[n] = &c;
        ++n;
      }
      submit(n);
      for (std::size_t i = 0; i < n; ++i) ::close(fds_[i]);
    }
  }

  static constexpr std::size_t kMaxBatch = 64;

 private:
  // open_regular opens path only if it is a regular file (st: its status), else -1. A FIFO
  // is never opened here: opening and closing its read end would let a writer write into a
  // pipe that then loses the data; the loading thread's own open does what it always did.
  static int open_regular(int dir_fd, const char* path, struct stat& st) {
    if (::fstatat(dir_fd, path, &st, 0) != 0 || !S_ISREG(st.st_mode)) return -1;
    int fd = ::openat(dir_fd, path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);  // never blocks
    if (fd < 0) return -1;
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || ::fcntl(fd, F_SETFL, 0) != 0) {
      ::close(fd);
      return -1;
    }
    return fd;
  }

  bool context() {
    if (ctx_) return true;
    if (::syscall(SYS_io_setup, static_cast<long>(kMaxBatch), &ctx_) != 0) {
      ctx_ = 0;
      unavailable_ = true;  // no AIO (ENOSYS) or fs.aio-max-nr reached: load as before
    }
    return ctx_ != 0;
  }

  void submit(std::size_t n) {
    if (n == 0) return;
    long sent = ::syscall(SYS_io_submit, ctx_, static_cast<long>(n), ptrs_.data());
    if (sent <= 0) {
      unavailable_ = true;
      return;
    }
    // RWF_NOWAIT reads complete in io_submit itself (data or EAGAIN); the wait is bounded
    // anyway, and a context whose reads did not all come back is dropped (io_destroy waits).
    long got = 0;
    while (got < sent) {
      timespec limit{1, 0};
      long r = ::syscall(SYS_io_getevents, ctx_, sent - got, sent - got, events_.data(), &limit);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) {
        ::syscall(SYS_io_destroy, ctx_);
        ctx_ = 0;
        unavailable_ = true;
        break;
      }
      got += r;
    }
    OPENSSL_cleanse(bytes_.data(), bytes_.size());  // a byte of a key file, perhaps
  }

  aio_context_t ctx_ = 0;
  bool unavailable_ = false;
  std::uint64_t load_ = 0;  // the load retry_for last saw
  std::array<int, kMaxBatch> fds_{};
  std::array<iocb, kMaxBatch> cbs_{};
  std::array<iocb*, kMaxBatch> ptrs_{};
  std::array<io_event, kMaxBatch> events_{};
  std::array<char, kMaxBatch> bytes_{};
};

Prefetch& thread_prefetch() {
  thread_local Prefetch p;
  return p;
}

}  // namespace

Result<LoadReport> load_directory(const fs::path& dir, const LoadOptions& options) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return fail(Errc::io, dir.string() + ": not a directory" + (ec ? " (" + ec.message() + ")" : ""));
  }
  Fd root(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (root.fd < 0) return fail(Errc::io, dir.string() + ": " + std::generic_category().message(errno));
  // The same walk as find_certbot_pairs, minus its two stat() calls per directory: the loading
  // threads learn whether the files exist from openat(), relative to the directory's fd.
  struct Level {
    Fd fd;
    fs::path path;
  };
  std::deque<Level> levels;  // stable addresses
  struct Candidate {
    const Level* level;
    std::string name;  // the pair's directory, in level
    ino_t ino;
    // "<name>/fullchain.pem" and "<name>/privkey.pem", relative to the level's fd.
    std::string chain() const { return name + "/fullchain.pem"; }
    std::string key() const { return name + "/privkey.pem"; }
  };
  std::vector<Candidate> candidates;  // in name order: the report's order
  const Level& top = levels.emplace_back(Level{std::move(root), dir});
  for (Subdirectory& sub : subdirectories(top.fd.fd)) {
    if (sub.name == "live") {
      Fd live(::openat(top.fd.fd, "live", O_RDONLY | O_DIRECTORY | O_CLOEXEC));
      if (live.fd < 0) continue;  // as an unlistable directory: nothing in it
      const Level& l = levels.emplace_back(Level{std::move(live), dir / "live"});
      for (Subdirectory& s : subdirectories(l.fd.fd)) candidates.push_back({&l, std::move(s.name), s.ino});
      continue;
    }
    candidates.push_back({&top, std::move(sub.name), sub.ino});
  }
  // On a cold start, read in inode order (of the pairs' directories): files created one after
  // another have neighbouring inodes and data blocks, so each Prefetch batch covers adjacent
  // blocks and leaves as fewer, larger requests (store_bench load, 100,000 pairs cold: 181,000
  // requests in name order, 142,000 in inode order). Warm, name order: inode order cost
  // 0.2-0.3 s more user time there (1.79-1.91 -> 2.06-2.14 s; the certificates are then made
  // in one order and assembled in another). The first pair's chain tells which start this is.
  // Outcomes stay at their name-order index either way.
  std::vector<std::size_t> order(candidates.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  bool cold_start = false;
  static std::atomic<std::uint64_t> loads{0};
  const std::uint64_t load = ++loads;
  if (!candidates.empty()) {
    const Candidate& c = candidates.front();
    thread_prefetch().retry_for(load);
    int fd = thread_prefetch().probe(c.level->fd.fd, c.chain().c_str(), cold_start);
    if (fd >= 0) ::close(fd);
  }
  if (cold_start) {
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      if (candidates[a].level != candidates[b].level) return candidates[a].level < candidates[b].level;
      return candidates[a].ino < candidates[b].ino;
    });
  }
  // Files a thread's Prefetch holds open at once: at most 128 in all, so the prefetch does not
  // take the descriptors the loading threads (or a running server) need.
  const std::size_t batch = std::clamp<std::size_t>(128 / io_threads(), 2, Prefetch::kMaxBatch);
  std::vector<Outcome> outcomes(candidates.size());
  parallel_chunks(
      order.size(), kChunk,
      [&](std::size_t begin, std::size_t end) {
        Prefetch& prefetch = thread_prefetch();
        prefetch.retry_for(load);
        const Candidate& first = candidates[order[begin]];
        bool cold = false;
        int first_chain = prefetch.probe(first.level->fd.fd, first.chain().c_str(), cold);
        if (cold) {
          std::vector<std::string> names;
          std::vector<const char*> paths;
          names.reserve(2 * (end - begin));
          for (std::size_t k = begin; k < end; ++k) {
            const Candidate& c = candidates[order[k]];
            if (c.level != first.level) break;  // one directory fd per batch
            if (k != begin) names.push_back(c.chain());
            names.push_back(c.key());
          }
          for (const std::string& n : names) paths.push_back(n.c_str());
          prefetch.start(first.level->fd.fd, paths, batch);
        }
        for (std::size_t k = begin; k < end; ++k) {
          std::size_t i = order[k];
          const Candidate& c = candidates[i];
          char chain[NAME_MAX + 32], key[NAME_MAX + 32];
          std::snprintf(chain, sizeof chain, "%s/fullchain.pem", c.name.c_str());
          std::snprintf(key, sizeof key, "%s/privkey.pem", c.name.c_str());
          auto paths = [&] {
            fs::path d = c.level->path / c.name;
            return CertKeyPaths{d / "fullchain.pem", d / "privkey.pem"};
          };
          int opened = k == begin ? std::exchange(first_chain, -1) : -1;
          outcomes[i] = load_one(PairRef{c.level->fd.fd, chain, key, opened}, paths, options, true);
        }
      },
      true);
  // Deferred: "<level>/<name>/fullchain.pem" as a string, spelled as the paths below are.
  std::string chain_s, key_s;
  return assemble(
      outcomes, options,
      [&](std::size_t i) {
        fs::path d = candidates[i].level->path / candidates[i].name;
        return CertKeyPaths{d / "fullchain.pem", d / "privkey.pem"};
      },
      [&](std::size_t i, SourcePaths& out) {
        if (out.empty()) out.reserve(candidates.size(), candidates.size() * 2 * (dir.native().size() + 40));
        chain_s = candidates[i].level->path.native();
        if (!chain_s.empty() && chain_s.back() != '/') chain_s += '/';
        chain_s += candidates[i].name;
        key_s = chain_s;
        chain_s += "/fullchain.pem";
        key_s += "/privkey.pem";
        out.add(chain_s, key_s);
      });
}

std::size_t publish_all(CertStore& store, LoadReport& report) {
  std::size_t ok = 0;
  std::vector<std::shared_ptr<const Certificate>> kept;
  std::vector<PairSource> kept_sources;
  const bool sourced = report.sources.size() == report.certificates.size();
  std::vector<Status> results = store.publish_batch(report.certificates);
  std::vector<bool> keep(report.certificates.size());
  kept.reserve(report.certificates.size());
  if (sourced) kept_sources.reserve(report.certificates.size());
  for (std::size_t i = 0; i < report.certificates.size(); ++i) {
    auto& cert = report.certificates[i];
    const Status& st = results[i];
    if (st) {
      ++ok;
      keep[i] = true;
      kept.push_back(std::move(cert));
      if (sourced) kept_sources.push_back(std::move(report.sources[i]));
    } else {
      report.failures.push_back({{}, st.error()});
    }
  }
  if (ok != keep.size() && report.source_paths.size() == keep.size()) report.source_paths.keep_only(keep);
  report.certificates = std::move(kept);
  report.sources = std::move(kept_sources);
  return ok;
}

void SourcePaths::keep_only(const std::vector<bool>& keep) {
  SourcePaths out;
  for (std::size_t i = 0; i < size() && i < keep.size(); ++i) {
    if (keep[i]) out.add(chain(i), key(i));
  }
  *this = std::move(out);
}

void SourcePaths::apply(std::vector<PairSource>& sources) {
  for (std::size_t i = 0; i < size() && i < sources.size(); ++i) {
    sources[i].paths = CertKeyPaths{fs::path(std::string(chain(i))), fs::path(std::string(key(i)))};
  }
  clear();
}

}  // namespace autotls::tlsreload
