#include "tlsreload/loader.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <optional>
#include <system_error>
#include <thread>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tlsreload/store.h"

namespace autotls::tlsreload {
namespace {

namespace fs = std::filesystem;

constexpr std::uintmax_t kMaxFileBytes = 1 << 20;

// read_file reads a whole file with open, fstat and (usually) one read: at 200,000 files per
// load, ifstream's buffering and locale machinery cost more than the system calls.
// missing, when given, is set instead of failing when the file does not exist.
Result<std::string> read_file(const fs::path& path, bool* missing = nullptr) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    if (missing && err == ENOENT) {
      *missing = true;
      return std::string();
    }
    return fail(Errc::io, path.string() + ": " + std::generic_category().message(err));
  }
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st{};
  if (::fstat(fd, &st) != 0) return fail(Errc::io, path.string() + ": " + std::strerror(errno));
  if (S_ISDIR(st.st_mode)) return fail(Errc::io, path.string() + ": Is a directory");
  if (static_cast<std::uintmax_t>(st.st_size) > kMaxFileBytes) {
    return fail(Errc::invalid_input, path.string() + ": larger than 1 MiB, not a PEM file");
  }
  std::string data(static_cast<std::size_t>(st.st_size), '\0');
  std::size_t got = 0;
  for (;;) {
    if (got == data.size()) data.resize(got + 4096 > kMaxFileBytes + 1 ? kMaxFileBytes + 1 : got + 4096);
    ssize_t n = ::read(fd, data.data() + got, data.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail(Errc::io, path.string() + ": read error: " + std::strerror(errno));
    if (n == 0) break;
    got += static_cast<std::size_t>(n);
    if (got > kMaxFileBytes) {
      return fail(Errc::invalid_input, path.string() + ": larger than 1 MiB, not a PEM file");
    }
  }
  data.resize(got);
  return data;
}

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
  auto chain = read_file(paths.chain);
  if (!chain) return fail(chain.error());
  auto key = read_file(paths.key);
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

Outcome load_one(const CertKeyPaths& p, const LoadOptions& options, bool scanning) {
  Outcome out;
  auto record = [&](Outcome::Kind kind, const fs::path& path, Error e) {
    out.kind = kind;
    out.failure = LoadFailure{path, std::move(e)};
    return std::move(out);
  };
  bool chain_missing = false, key_missing = false;
  auto chain = read_file(p.chain, scanning ? &chain_missing : nullptr);
  if (!chain) return record(Outcome::load_failure, p.chain, chain.error());
  auto key = read_file(p.key, scanning ? &key_missing : nullptr);
  if (chain_missing && key_missing) return out;  // not a certificate directory
  if (chain_missing) {
    return record(Outcome::scan_failure, p.chain, Error(Errc::io, p.chain.string() + ": missing"));
  }
  if (key_missing) {
    return record(Outcome::scan_failure, p.key, Error(Errc::io, p.key.string() + ": missing"));
  }
  if (!key) return record(Outcome::load_failure, p.key, key.error());
  auto cert = Certificate::from_pem(*chain, *key, options);
  if (!cert) {
    Error e = cert.error();
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

LoadReport load_all(const std::vector<CertKeyPaths>& pairs, const LoadOptions& options,
                    bool scanning) {
  std::vector<Outcome> outcomes(pairs.size());
  parallel_for(
      pairs.size(), [&](std::size_t i) { outcomes[i] = load_one(pairs[i], options, scanning); }, true);
  return assemble(outcomes);
}

}  // namespace

LoadReport load_pairs(const std::vector<CertKeyPaths>& pairs, const LoadOptions& options) {
  return load_all(pairs, options, false);
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

Result<LoadReport> load_directory(const fs::path& dir, const LoadOptions& options) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return fail(Errc::io, dir.string() + ": not a directory" + (ec ? " (" + ec.message() + ")" : ""));
  }
  fs::directory_iterator probe(dir, ec);
  if (ec) return fail(Errc::io, dir.string() + ": " + ec.message());
  // The same walk as find_certbot_pairs, minus its two stat() calls per directory: the loading
  // threads learn whether the files exist from open().
  std::vector<CertKeyPaths> candidates;
  auto level = [&](const fs::path& d, bool descend_into_live, auto& self) -> void {
    std::error_code e;
    std::vector<fs::path> subdirs;
    for (fs::directory_iterator it(d, e), end; !e && it != end; it.increment(e)) {
      std::error_code se;
      if (it->is_directory(se)) subdirs.push_back(it->path());
    }
    std::sort(subdirs.begin(), subdirs.end());
    for (const fs::path& sub : subdirs) {
      if (descend_into_live && sub.filename() == "live") {
        self(sub, false, self);
        continue;
      }
      candidates.push_back({sub / "fullchain.pem", sub / "privkey.pem"});
    }
  };
  level(dir, true, level);
  return load_all(candidates, options, true);
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
