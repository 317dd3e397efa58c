#include "tlsreload/loader.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <deque>
#include <optional>
#include <system_error>
#include <thread>
#include <utility>

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "tlsreload/store.h"

namespace autotls::tlsreload {
namespace {

namespace fs = std::filesystem;

constexpr std::size_t kMaxFileBytes = 1 << 20;

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
  template <class Shown>
  Result<std::string_view> read(int dir_fd, const char* path, Shown&& shown, bool* missing = nullptr) {
    int fd = ::openat(dir_fd, path, O_RDONLY | O_CLOEXEC);
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

// parallel_for runs body(i) for i in [0, n) on up to hardware_concurrency threads, in chunks
// (an atomic counter hands them out, so a slow file does not idle the other threads).
// io_bound multiplies the thread count: a cold start reads 200,000 small files, and the disk
// serves many outstanding reads better than two.
template <class Body>
void parallel_for(std::size_t n, Body&& body, bool io_bound = false) {
  constexpr std::size_t kChunk = 32;
  std::size_t threads = std::max(1u, std::thread::hardware_concurrency()) * (io_bound ? 4 : 1);
  threads = std::min(threads, (n + kChunk - 1) / kChunk);
  std::atomic<std::size_t> next{0};
  auto work = [&] {
    for (;;) {
      std::size_t begin = next.fetch_add(kChunk, std::memory_order_relaxed);
      if (begin >= n) return;
      for (std::size_t i = begin; i < std::min(n, begin + kChunk); ++i) body(i);
    }
  };
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
};

// PairRef says where one pair's files are: paths relative to dir_fd (AT_FDCWD for paths as
// given), and how to name them in a report (built only when something failed).
struct PairRef {
  int dir_fd = AT_FDCWD;
  const char* chain = nullptr;
  const char* key = nullptr;
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
  auto chain = bufs.chain.read(ref.dir_fd, ref.chain, [&] { return paths().chain; },
                               scanning ? &chain_missing : nullptr);
  if (!chain) return record(Outcome::load_failure, paths().chain, chain.error());
  KeyWiper wiper{bufs.key};  // before the read: a failed or partial read is wiped too
  auto key = bufs.key.read(ref.dir_fd, ref.key, [&] { return paths().key; },
                           scanning ? &key_missing : nullptr);
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
  return out;
}

LoadReport assemble(std::vector<Outcome>& outcomes) {
  LoadReport report;
  for (auto& o : outcomes) {
    if (o.kind == Outcome::scan_failure) report.failures.push_back(std::move(*o.failure));
  }
  for (auto& o : outcomes) {
    if (o.kind == Outcome::load_failure) report.failures.push_back(std::move(*o.failure));
    if (o.kind == Outcome::loaded) report.certificates.push_back(std::move(o.cert));
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
  return assemble(outcomes);
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

// subdirectories lists the names of the directories in the directory open as fd (following
// symbolic links, as std::filesystem::is_directory does), sorted. Without a stat() per entry
// when the file system reports the type (d_type).
std::vector<std::string> subdirectories(int fd) {
  std::vector<std::string> out;
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
    if (is_dir) out.emplace_back(name);
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
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
  };
  std::vector<Candidate> candidates;
  const Level& top = levels.emplace_back(Level{std::move(root), dir});
  for (std::string& sub : subdirectories(top.fd.fd)) {
    if (sub == "live") {
      Fd live(::openat(top.fd.fd, "live", O_RDONLY | O_DIRECTORY | O_CLOEXEC));
      if (live.fd < 0) continue;  // as an unlistable directory: nothing in it
      const Level& l = levels.emplace_back(Level{std::move(live), dir / "live"});
      for (std::string& name : subdirectories(l.fd.fd)) candidates.push_back({&l, std::move(name)});
      continue;
    }
    candidates.push_back({&top, std::move(sub)});
  }
  std::vector<Outcome> outcomes(candidates.size());
  parallel_for(
      candidates.size(),
      [&](std::size_t i) {
        const Candidate& c = candidates[i];
        // "<name>/fullchain.pem" and "<name>/privkey.pem" relative to the level's fd.
        char chain[NAME_MAX + 32], key[NAME_MAX + 32];
        std::snprintf(chain, sizeof chain, "%s/fullchain.pem", c.name.c_str());
        std::snprintf(key, sizeof key, "%s/privkey.pem", c.name.c_str());
        auto paths = [&] {
          fs::path d = c.level->path / c.name;
          return CertKeyPaths{d / "fullchain.pem", d / "privkey.pem"};
        };
        outcomes[i] = load_one(PairRef{c.level->fd.fd, chain, key}, paths, options, true);
      },
      true);
  return assemble(outcomes);
}

std::size_t publish_all(CertStore& store, LoadReport& report) {
  std::size_t ok = 0;
  std::vector<std::shared_ptr<const Certificate>> kept;
  std::vector<Status> results = store.publish_batch(report.certificates);
  for (std::size_t i = 0; i < report.certificates.size(); ++i) {
    auto& cert = report.certificates[i];
    const Status& st = results[i];
    if (st) {
      ++ok;
      kept.push_back(std::move(cert));
    } else {
      report.failures.push_back({{}, st.error()});
    }
  }
  report.certificates = std::move(kept);
  return ok;
}

}  // namespace autotls::tlsreload
