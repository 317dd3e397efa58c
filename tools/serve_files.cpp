// serve's certificate files: --cert/--key pairs and --cert-dir, checked at start and watched.

#include "tools/serve_files.h"

#include <malloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <tuple>
#include <unordered_set>
#include <utility>

#include <openssl/evp.h>

#include "tlsreload/loader.h"
#include "tlsreload/snapshot.h"
#include "tlsreload/store.h"

namespace autotls::cli {

namespace {

std::string lower_name(std::string s) {
  while (!s.empty() && s.back() == '.') s.pop_back();
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// bad_load turns a loader error into one start-up line: the file and reason, then the flag.
Error bad_load(const std::string& flag, const Error& e) {
  return Error{Errc::invalid_input, flag + ": " + e.message};
}

// t_verifying is set on the thread that verifies a directory behind its snapshot: the
// watcher's first full check of it reports every pair as loaded, which says nothing (the
// verification's summary says what changed).
thread_local bool t_verifying = false;

// normal is an absolute directory path in one spelling: no "." or "..", no trailing slash.
std::filesystem::path normal(const std::string& dir) {
  std::string s = std::filesystem::path(dir).lexically_normal().string();
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  return s;
}

// inside tells whether path is dir or lies under it (lexically, as given).
bool inside(const std::string& path, const std::string& dir) {
  auto rel = normal(path).lexically_relative(normal(dir));
  return !rel.empty() && *rel.begin() != "..";
}

// ensure_snapshot_dir makes the snapshot directory (mode 0700), or checks the one there: ours,
// and closed to group and others (tightened if not: the snapshots hold private keys).
Status ensure_snapshot_dir(const std::filesystem::path& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir.parent_path(), ec);  // the storage directory, usually there
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    return fail(Errc::io, "snapshot directory " + dir.string() + ": " + std::strerror(errno));
  }
  struct stat st {};
  if (::lstat(dir.c_str(), &st) != 0) return fail(Errc::io, "snapshot directory " + dir.string() + ": " + std::strerror(errno));
  if (!S_ISDIR(st.st_mode)) return fail(Errc::invalid_input, "snapshot directory " + dir.string() + ": not a directory");
  if (st.st_uid != ::geteuid()) {
    return fail(Errc::invalid_input, "snapshot directory " + dir.string() + ": owned by uid " + std::to_string(st.st_uid) +
                                         ", not this process's (" + std::to_string(::geteuid()) + ")");
  }
  if ((st.st_mode & 077) != 0 && ::chmod(dir.c_str(), 0700) != 0) {
    return fail(Errc::io, "snapshot directory " + dir.string() + ": chmod 0700: " + std::strerror(errno));
  }
  return {};
}

}  // namespace

// Pending is one --cert-dir's snapshot work left for FileCerts::snapshot_work.
struct FileCerts::Pending {
  std::string dir;
  std::string snapshot;
  bool from_snapshot = false;
  tlsreload::SnapshotStart start;  // from_snapshot: what the snapshot published
  tlsreload::LoadReport report;    // otherwise: what the start loaded, with its sources
  std::shared_ptr<tlsreload::CertStore> store;
  Logger* logger = nullptr;
};

std::string snapshot_file(const std::string& snapshot_dir, const std::string& dir) {
  const std::string norm = normal(dir).string();
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  std::string hex;
  if (EVP_Digest(norm.data(), norm.size(), md, &n, EVP_sha256(), nullptr) == 1) {
    static const char* digits = "0123456789abcdef";
    for (unsigned int i = 0; i < 8 && i < n; ++i) {
      hex += digits[md[i] >> 4];
      hex += digits[md[i] & 15];
    }
  }
  // The last component, for people; the hash tells /a/letsencrypt from /b/letsencrypt.
  std::string base = std::filesystem::path(norm).filename().string();
  for (char& c : base) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') c = '_';
  }
  if (base.empty() || base[0] == '.') base = "dir" + base;
  if (base.size() > 40) base.resize(40);
  return (std::filesystem::path(snapshot_dir) / (base + "-" + hex + ".snap")).string();
}

namespace {

// adoptable tells whether the watcher can adopt the snapshot's certificates of a directory
// served from its snapshot, with their recorded sources: when every one of them has a source in
// the directory as the watcher spells its pairs (<dir>/<name>/fullchain.pem or
// <dir>/live/<name>/...). Otherwise (a snapshot without identities, or written for another
// spelling of the directory) the watcher loads every pair.
bool adoptable(const FileCerts::Pending& p) {
  const auto& start = p.start;
  if (start.sources.size() != start.certificates.size() || start.certificates.empty()) return false;
  const std::filesystem::path dir(p.dir);
  const std::filesystem::path live = dir / "live";
  for (const auto& src : start.sources) {
    const auto& chain = src.paths.chain;
    if (chain.filename() != "fullchain.pem" || src.paths.key != chain.parent_path() / "privkey.pem") return false;
    auto parent = chain.parent_path().parent_path();
    if (parent != dir && parent != live) return false;
  }
  return true;
}

// with_unchanged completes the report of a verification that adopted the snapshot (which
// lists only what it loaded: changed and new pairs, and the failures) into the report of a
// full load, as finish_check expects: the adopted certificates whose pairs were neither
// reloaded, nor failed, nor gone are still their pairs' certificates.
void with_unchanged(tlsreload::LoadReport& report, const tlsreload::SnapshotStart& start) {
  std::unordered_set<std::string> touched;  // chain files
  touched.reserve(report.sources.size() + report.failures.size());
  for (const auto& src : report.sources) touched.insert(src.paths.chain.native());
  for (const auto& f : report.failures) touched.insert((f.path.parent_path() / "fullchain.pem").native());
  const bool sourced = report.sources.size() == report.certificates.size();
  for (std::size_t i = 0; i < start.certificates.size(); ++i) {
    const auto& src = start.sources[i];
    if (touched.contains(src.paths.chain.native())) continue;
    struct stat st {};
    // Gone (the watcher reported it removed): left to finish_check, which takes it away.
    if (::lstat(src.paths.chain.c_str(), &st) != 0 || ::lstat(src.paths.key.c_str(), &st) != 0) continue;
    report.certificates.push_back(start.certificates[i]);
    if (sourced) report.sources.push_back(src);
  }
}

}  // namespace

void FileCerts::snapshot_work(std::function<void(const CertDirSnapshot&)> on_done) {
  if (pending.empty() || !watcher) return;
  verifying->store(true);
  // The writes first: they are quick, and the watcher's first checks and the verifications run
  // for as long as a stat (and, for a verification, a load) of every pair.
  std::stable_partition(pending.begin(), pending.end(), [](const auto& p) { return !p->from_snapshot; });
  worker = std::jthread([work = std::move(pending), w = watcher.get(), verifying = verifying,
                         rescan_wanted = rescan_wanted, on_done = std::move(on_done)] {
    // The sources' paths, left as strings by the start (LoadOptions::defer_source_paths: made
    // there, they were a fifth of the start from a snapshot, before the first handshake).
    for (const auto& p : work) {
      if (p->from_snapshot) {
        p->start.make_source_paths();
      } else {
        p->report.make_source_paths();
      }
    }
    // Directories loaded at start: their snapshots written.
    for (const auto& p : work) {
      if (p->from_snapshot || p->snapshot.empty()) continue;
      const auto t0 = std::chrono::steady_clock::now();
      CertDirSnapshot r;
      r.dir = p->dir;
      r.snapshot = p->snapshot;
      Status dir_ok = ensure_snapshot_dir(std::filesystem::path(p->snapshot).parent_path());
      r.loaded = p->report.certificates.size();
      r.written = dir_ok ? tlsreload::write_snapshot(p->snapshot, p->report.certificates, p->report.sources) : dir_ok;
      r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (on_done) on_done(r);
    }
    // ... then adopted by the watcher: its first full check stat()s every pair and watches
    // it, and parses only the pairs whose files are not those the start loaded (changed since,
    // new, or gone: reported as watcher events).
    for (const auto& p : work) {
      if (p->from_snapshot) continue;
      const auto t0 = std::chrono::steady_clock::now();
      auto before = w->counters();
      auto rep = w->adopt_directory(p->dir, p->report);
      p->report = {};
      auto after = w->counters();
      if (p->logger) {
        char secs[32];
        std::snprintf(secs, sizeof secs, "%.3f", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        if (rep) {
          p->logger->log(LogLevel::info, "serve.files", "certificate directory watched",
                         {{"dir", p->dir},
                          {"pairs_checked", std::to_string(after.pairs_checked - before.pairs_checked)},
                          {"pairs_parsed", std::to_string(after.pairs_parsed - before.pairs_parsed)},
                          {"seconds", secs}});
        } else {
          p->logger->log(LogLevel::error, "serve.files", "certificate directory not watched; its certificates keep serving",
                         {{"dir", p->dir}, {"error", rep.error().message}});
        }
      }
    }
    // Directories served from their snapshots: verified.
    for (const auto& p : work) {
      if (!p->from_snapshot) continue;
      const auto t0 = std::chrono::steady_clock::now();
      CertDirSnapshot r;
      r.dir = p->dir;
      r.snapshot = p->snapshot;
      r.verified = true;
      tlsreload::DirectoryLoadOptions dlo;
      dlo.snapshot_path = p->snapshot;
      dlo.logger = p->logger;
      Status dir_ok = ensure_snapshot_dir(std::filesystem::path(p->snapshot).parent_path());
      // The verification: the watcher adopts the snapshot's certificates with the file
      // identities the snapshot recorded (as it adopts a bulk load), and its first full check of
      // the directory stat()s every pair and watches it from then on, parsing only the pairs
      // whose files are not those the snapshot was made from (changed while the process was
      // down: they replace the snapshot's certificate in the store), new pairs and those the
      // snapshot has no identities for. Parsing all 100,000 pairs again made a second
      // certificate object per pair and left the heap fragmented (serve's RSS 12.4 KiB per
      // certificate after it, docs/benchmarks.md, "Memory of serve, session 8").
      // The key permissions a start checks are checked here, on the warm files.
      const bool adopt = adoptable(*p);
      tlsreload::LoadReport adopted;  // the snapshot's certificates and sources, moved (not copied)
      if (adopt) {
        adopted.certificates = std::move(p->start.certificates);
        adopted.sources = std::move(p->start.sources);
      }
      const auto removed_before = w->counters().removed;
      t_verifying = true;
      auto rep = adopt ? w->adopt_directory(p->dir, adopted) : w->add_directory(p->dir);
      t_verifying = false;
      if (adopt) {
        p->start.certificates = std::move(adopted.certificates);
        p->start.sources = std::move(adopted.sources);
      }
      auto check_keys = [&](const std::vector<tlsreload::PairSource>& sources) {
        for (const auto& src : sources) {
          if (auto st = check_key_permissions(src.paths.key.string(), "--cert-dir " + p->dir); !st) {
            if (r.loose_keys++ == 0) r.loose_key_error = st.error().message;
          }
        }
      };
      if (!rep) {
        r.error = rep.error();
        r.written = fail(rep.error());
      } else if (adopt && rep->certificates.empty() && rep->failures.empty() &&
                 w->counters().removed == removed_before) {
        // Every pair is the one the snapshot was made from (no pair loaded, failed or gone, and
        // none new): the snapshot is the directory's, nothing to publish, remove or rewrite.
        r.loaded = p->start.certificates.size();
        check_keys(p->start.sources);
        r.written = dir_ok;
      } else {
        tlsreload::DirectoryCheck check;
        check.report = std::move(*rep);
        if (adopt) with_unchanged(check.report, p->start);
        r.loaded = check.report.certificates.size();
        r.failed = check.report.failures.size();
        check_keys(check.report.sources);
        if (!dir_ok) dlo.snapshot_path.clear();  // finish_check then writes nothing
        tlsreload::finish_check(*p->store, check, p->start, dlo);
        r.changed = check.changed;
        r.added = check.added;
        r.removed = check.removed;
        r.kept = check.kept;
        for (std::size_t i = 0; i < check.changed_paths.size() && i < 20; ++i) {
          r.changed_paths.push_back(check.changed_paths[i].string());
        }
        r.written = dir_ok ? check.snapshot_written : dir_ok;
        r.fresh = std::move(check.fresh);
        r.fresh_chains = std::move(check.fresh_chains);
        r.gone = std::move(check.gone);
        r.replaced = std::move(check.replaced);
      }
      p->start = {};
      r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (on_done) on_done(r);
    }
    // The start's transient memory (the bulk load's buffers and sources, the snapshot's
    // sources, the loading threads' arenas) is free now: give what glibc can of it back.
    ::malloc_trim(0);
    verifying->store(false);
    if (rescan_wanted->exchange(false)) w->rescan();  // a SIGHUP came meanwhile (rescan())
  });
}

void FileCerts::rescan() {
  if (!watcher) return;
  if (verifying->load()) {
    rescan_wanted->store(true);
    if (verifying->load()) return;  // the worker sees the flag after it clears verifying
    if (!rescan_wanted->exchange(false)) return;  // it finished in between, and took the flag
  }
  watcher->rescan();
}

namespace {

// kReexecVar marks the re-executed process: "-" (GLIBC_TUNABLES was not set) or "=" followed by
// GLIBC_TUNABLES as it was given.
constexpr const char* kReexecVar = "AUTOTLS_REEXEC_TUNABLES";
bool g_reexecuted = false;

// pair_dirs_at_least tells whether the --cert-dirs hold at least n pair directories, from the
// link counts of each directory and its live/ (a directory's count is 2 plus its
// subdirectories on ext4, xfs and tmpfs; a filesystem that does not count, btrfs, says 1:
// counted as large).
bool pair_dirs_at_least(const std::vector<std::string>& dirs, std::size_t n) {
  std::size_t total = 0;
  for (const auto& d : dirs) {
    for (const std::string& p : {d, d + "/live"}) {
      struct stat st {};
      if (::stat(p.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) continue;
      if (st.st_nlink < 2) return true;
      total += st.st_nlink - 2;
    }
  }
  return total >= n;
}

}  // namespace

void restore_env_after_reexec() {
  const char* v = std::getenv(kReexecVar);
  if (!v) return;
  g_reexecuted = true;
  if (v[0] == '=') {
    ::setenv("GLIBC_TUNABLES", v + 1, 1);
  } else {
    ::unsetenv("GLIBC_TUNABLES");
  }
  ::unsetenv(kReexecVar);
}

void reexec_for_huge_pages(const Options& o, char** argv, Logger& logger) {
  if (g_reexecuted || o.cert_dirs.empty()) return;
  const char* given = std::getenv("GLIBC_TUNABLES");
  if (given && std::strstr(given, "glibc.malloc.hugetlb")) return;
  if (!pair_dirs_at_least(o.cert_dirs, kHugePagePairs)) return;
  // The new image runs main from the start: a line this one printed already (a warning of the
  // options, say) would be printed again. So a start that printed anything keeps its image and
  // goes without the huge pages; main prints nothing on the way here today.
  if (printed_anything()) return;
  std::string tunables = given && *given ? std::string(given) + ":glibc.malloc.hugetlb=1" : "glibc.malloc.hugetlb=1";
  std::string saved = given ? "=" + std::string(given) : "-";
  if (::setenv(kReexecVar, saved.c_str(), 1) != 0) return;
  if (::setenv("GLIBC_TUNABLES", tunables.c_str(), 1) != 0) {
    restore_env_after_reexec();
    g_reexecuted = false;
    return;
  }
  // The last line of this image (--verbose), printed once: the new one does not come here.
  logger.log(LogLevel::info, "serve", "re-executing with the heap on huge pages",
             {{"cert_dir_pairs_at_least", std::to_string(kHugePagePairs)}, {"GLIBC_TUNABLES", tunables}});
  ::execv("/proc/self/exe", argv);
  // exec failed (no /proc): start as we are, with the environment as it was.
  restore_env_after_reexec();
  g_reexecuted = false;
}

Status check_key_permissions(const std::string& path, const std::string& flag) {
  struct stat st {};
  // Missing or unreadable files are reported by the loader with its own precise reason.
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return {};
  if ((st.st_mode & 077) == 0) return {};
  char mode[8];
  std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
  return fail(Errc::invalid_input, flag + ": private key " + path + " is accessible by group or others (mode " + mode +
                                       "): run `chmod 600 " + path + "` (a private key must be readable by its owner only)");
}

void count_names(NameCounts& counts, const tlsreload::Certificate& cert, int step) {
  for (const auto& n : cert.names()) {
    auto it = counts.try_emplace(n, 0).first;
    if ((it->second += step) == 0) counts.erase(it);
  }
}

bool covered_by(const NameCounts& covered, const std::string& name) {
  if (covered.empty()) return false;
  auto held = [&](const std::string& k) {
    auto it = covered.find(k);
    return it != covered.end() && it->second > 0;
  };
  std::string n = lower_name(name);
  if (held(n)) return true;
  auto dot = n.find('.');
  return dot != std::string::npos && dot > 0 && held("*" + n.substr(dot));
}

Result<FileCerts> load_cert_files(const Options& o, const std::string& snapshot_dir,
                                  std::shared_ptr<tlsreload::CertStore> store, Logger* logger,
                                  std::function<void(const tlsreload::WatchEvent&)> on_event,
                                  std::function<void(const std::vector<tlsreload::WatchEvent>&)> on_events) {
  FileCerts out;
  if (o.serve_certs.empty() && o.serve_keys.empty() && o.cert_dirs.empty()) return out;
  if (o.serve_certs.size() != o.serve_keys.size()) {
    return fail(Errc::invalid_input, "serve: give --cert and --key in pairs (" + std::to_string(o.serve_certs.size()) +
                                         " --cert, " + std::to_string(o.serve_keys.size()) + " --key)");
  }
  // Every explicit pair is checked whole (key permissions, chain, validity, key match) before
  // anything is published.
  std::vector<tlsreload::CertKeyPaths> pairs;
  for (size_t i = 0; i < o.serve_certs.size(); ++i) {
    // Absolute: the watcher watches the directories that hold the files.
    std::error_code ec;
    tlsreload::CertKeyPaths p{std::filesystem::absolute(o.serve_certs[i], ec), std::filesystem::absolute(o.serve_keys[i], ec)};
    if (auto st = check_key_permissions(o.serve_keys[i], "--key"); !st) return fail(st.error());
    auto cert = tlsreload::load_pair(p, tlsreload::LoadOptions{});
    if (!cert) return fail(bad_load("--cert " + o.serve_certs[i] + " --key " + o.serve_keys[i], cert.error()));
    pairs.push_back(p);
  }
  std::vector<std::string> dirs;
  for (const auto& d : o.cert_dirs) {
    std::error_code ec;
    dirs.push_back(std::filesystem::absolute(d, ec).string());
  }
  // A directory with a usable snapshot is published from it now and checked in
  // snapshot_work(): the scan and the key checks below touch every pair directory, the cold
  // cost the snapshot avoids. Only that it is a directory is checked here (one stat).
  std::vector<std::string> plain;
  for (const auto& dir : dirs) {
    if (snapshot_dir.empty()) {
      plain.push_back(dir);
      continue;
    }
    if (inside(snapshot_dir, dir)) {
      return fail(Errc::invalid_input, "--cert-dir-snapshots " + snapshot_dir + " is inside --cert-dir " + dir +
                                           ": the snapshots hold private keys and must not live in the directory "
                                           "they mirror (give another directory, or \"off\")");
    }
    std::error_code ec;
    if (!std::filesystem::is_directory(dir, ec)) {
      plain.push_back(dir);  // the scan below names the error
      continue;
    }
    tlsreload::DirectoryLoadOptions dlo;
    dlo.snapshot_path = snapshot_file(snapshot_dir, dir);
    dlo.load.defer_source_paths = true;  // made behind the start, in snapshot_work()
    auto start = tlsreload::publish_snapshot(*store, dlo);
    if (start.ignored) out.ignored.emplace_back(dlo.snapshot_path.string(), *start.ignored);
    if (!start.used) {
      plain.push_back(dir);
      continue;
    }
    for (const auto& c : start.certificates) count_names(out.names, *c, 1);
    auto p = std::make_shared<FileCerts::Pending>();
    p->dir = dir;
    p->snapshot = dlo.snapshot_path.string();
    p->from_snapshot = true;
    p->start = std::move(start);
    p->store = store;
    p->logger = logger;
    out.pending.push_back(std::move(p));
    ++out.from_snapshot;
  }
  // A directory without a usable snapshot is loaded here by the bulk loader (all cores, one
  // openat per file; the watcher's own first check goes pair by pair and took 4-5 times as
  // long at 100,000 pairs, docs/benchmarks.md) and published below in one batch; the watcher
  // adopts it in snapshot_work(), once serving started. Checked as before: a pair with one
  // file missing first, then keys open to group or others (the mode the load's fstat saw; a
  // pair that failed to load gets a stat), then pairs that did not load.
  std::vector<tlsreload::LoadReport> plain_loads;
  tlsreload::LoadOptions bulk = tlsreload::bulk_load_options();
  bulk.record_sources = true;
  bulk.defer_source_paths = true;  // made behind the start, in snapshot_work()
  for (const auto& dir : plain) {
    const std::string what = "--cert-dir " + dir;
    auto r = tlsreload::load_directory(dir, bulk);
    if (!r) return fail(bad_load(what, r.error()));
    if (r->scan_failures > 0) return fail(bad_load(what, r->failures.front().error));
    if (r->certificates.empty() && r->failures.empty()) {
      return fail(Errc::invalid_input, what + ": no certificates found (expected <dir>/<name>/fullchain.pem "
                                       "and privkey.pem, or <dir>/live/<name>/...)");
    }
    // In name order over loaded and failed pairs alike, as the pair-by-pair check was.
    std::vector<std::string> keys;
    keys.reserve(r->sources.size() + r->failures.size());
    for (std::size_t i = 0; i < r->sources.size(); ++i) {
      const auto& src = r->sources[i];
      if (src.key_mode != 0 && (src.key_mode & 077) == 0) continue;
      keys.push_back(i < r->source_paths.size() ? std::string(r->source_paths.key(i)) : src.paths.key.string());
    }
    for (const auto& f : r->failures) keys.push_back((f.path.parent_path() / "privkey.pem").string());
    std::sort(keys.begin(), keys.end());
    for (const auto& k : keys) {
      if (auto st = check_key_permissions(k, what); !st) return fail(st.error());
    }
    plain_loads.push_back(std::move(*r));
  }

  tlsreload::WatcherOptions wo;
  wo.logger = logger;
  wo.on_event = [cb = std::move(on_event)](const tlsreload::WatchEvent& e) {
    if (t_verifying && e.type == tlsreload::WatchEvent::Type::loaded) return;
    if (cb) cb(e);
  };
  wo.on_events = [cb = std::move(on_events)](const std::vector<tlsreload::WatchEvent>& events) {
    if (t_verifying) return;  // said in one batch by CertDirSnapshot
    if (cb) cb(events);
  };
  // The snapshots record where each certificate came from (the next verification matches
  // pairs by path).
  wo.initial_options.record_sources = !snapshot_dir.empty();
  out.watcher = std::make_unique<tlsreload::CertWatcher>(store, wo);
  // count: the certificates' names go to out.names (the bulk loads'; the explicit pairs' come
  // as watcher events).
  auto take = [&](const std::string& what, Result<tlsreload::LoadReport>& r, bool count) -> Status {
    if (!r) return fail(bad_load(what, r.error()));
    if (!r->failures.empty()) {
      const auto& f = r->failures.front();
      std::string more = r->failures.size() > 1 ? " (and " + std::to_string(r->failures.size() - 1) + " more)" : "";
      std::string msg = f.error.message;
      if (!f.path.empty() && msg.find(f.path.string()) == std::string::npos) msg = f.path.string() + ": " + msg;
      return fail(Errc::invalid_input, what + ": " + msg + more);
    }
    if (count) {
      for (const auto& c : r->certificates) count_names(out.names, *c, 1);
    }
    return {};
  };
  for (const auto& p : pairs) {
    auto r = out.watcher->add_pair(p);
    if (auto st = take("--cert " + p.chain.string(), r, false); !st) return fail(st.error());
  }
  for (std::size_t i = 0; i < plain.size(); ++i) {
    const std::string& dir = plain[i];
    Result<tlsreload::LoadReport> r = std::move(plain_loads[i]);
    if (!r->failures.empty()) return fail(take("--cert-dir " + dir, r, false).error());
    tlsreload::publish_all(*store, *r);  // one snapshot for the directory
    if (auto st = take("--cert-dir " + dir, r, true); !st) return fail(st.error());  // refused by the store
    // The watcher adopts it (and the snapshot is written) once serving started.
    auto p = std::make_shared<FileCerts::Pending>();
    p->dir = dir;
    if (!snapshot_dir.empty()) p->snapshot = snapshot_file(snapshot_dir, dir);
    p->report = std::move(*r);
    p->store = store;
    p->logger = logger;
    out.pending.push_back(std::move(p));
  }
  if (auto st = out.watcher->start(); !st) return fail(st.error());
  return out;
}

std::string prometheus_counter(const std::string& name, const std::string& help, std::uint64_t value) {
  return "# HELP " + name + " " + help + "\n# TYPE " + name + " counter\n" + name + " " + std::to_string(value) + "\n";
}

std::string watcher_metrics(const tlsreload::CertWatcher& w, bool verifying) {
  auto c = w.counters();
  std::string out =
      "# HELP autotls_cert_files_total Certificate file pairs (--cert/--key, --cert-dir) by what the watcher did.\n"
      "# TYPE autotls_cert_files_total counter\n";
  const std::pair<const char*, std::uint64_t> rows[] = {
      {"loaded", c.loaded}, {"reloaded", c.reloaded}, {"failed", c.failed}, {"removed", c.removed}, {"checks", c.checks}};
  for (const auto& [what, value] : rows) {
    out += std::string("autotls_cert_files_total{event=\"") + what + "\"} " + std::to_string(value) + "\n";
  }
  // What the checks cost, apart from the event rows (which count pairs by outcome): full checks
  // are a subset of checks, and pairs checked and parsed count per pair, not per source.
  const std::tuple<const char*, std::uint64_t, const char*> work[] = {
      {"full_checks", c.full_checks,
       "Watcher checks that looked at every pair of a source (start, SIGHUP, lost events, a "
       "changed source directory, polling an unwatchable one)."},
      {"pairs_checked", c.pairs_checked, "Certificate file pairs whose files the watcher stat()ed."},
      {"pairs_parsed", c.pairs_parsed, "Certificate file pairs the watcher read and parsed (their files had changed)."}};
  for (const auto& [what, value, help] : work) {
    out += prometheus_counter(std::string("autotls_cert_files_") + what + "_total", help, value);
  }
  out += "# HELP autotls_cert_dir_snapshot_verifying 1 while a --cert-dir served from its store snapshot is verified.\n"
         "# TYPE autotls_cert_dir_snapshot_verifying gauge\n"
         "autotls_cert_dir_snapshot_verifying " + std::string(verifying ? "1" : "0") + "\n";
  if (verifying) return out;
  out += "# HELP autotls_cert_files_failing Certificate file pairs that are bad now (the last good certificate keeps serving).\n"
         "# TYPE autotls_cert_files_failing gauge\n"
         "autotls_cert_files_failing " + std::to_string(w.failures().size()) + "\n";
  return out;
}

}  // namespace autotls::cli
