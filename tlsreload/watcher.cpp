#include "tlsreload/watcher.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <system_error>
#include <type_traits>

#include "tlsreload/store.h"

namespace autotls::tlsreload {

namespace {

namespace fs = std::filesystem;
using steady = std::chrono::steady_clock;
constexpr std::string_view kLog = "tlsreload.watcher";

// Every way a writer replaces a file or a symlink in a watched directory, plus in-place writes
// (IN_MODIFY keeps the debounce waiting while a slow writer is still writing).
constexpr uint32_t kDirMask = IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE | IN_DELETE |
                              IN_MODIFY | IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR;

int64_t ns(const struct timespec& t) { return int64_t{t.tv_sec} * 1000000000 + t.tv_nsec; }

// half_written tells whether a failed pair looks like a writer caught between its two files:
// exactly one file missing, or a key that does not match the certificate.
bool half_written(int chain_err, int key_err, const Error& e) {
  if ((chain_err == ENOENT) != (key_err == ENOENT)) return true;
  return e.message.find("private key does not match the leaf certificate") != std::string::npos;
}

}  // namespace

std::string_view to_string(WatchEvent::Type type) {
  switch (type) {
    case WatchEvent::Type::loaded: return "loaded";
    case WatchEvent::Type::reloaded: return "reloaded";
    case WatchEvent::Type::failed: return "failed";
    case WatchEvent::Type::removed: return "removed";
  }
  return "unknown";
}

CertWatcher::CertWatcher(std::shared_ptr<CertStore> store, WatcherOptions options)
    : store_(std::move(store)),
      options_(std::move(options)),
      logger_(options_.logger ? options_.logger : &null_logger()) {}

CertWatcher::~CertWatcher() {
  stop();
  if (inotify_fd_ >= 0) ::close(inotify_fd_);
  if (stop_fd_ >= 0) ::close(stop_fd_);
}

CertWatcher::PairSig CertWatcher::signature(const CertKeyPaths& paths) {
  auto one = [](const fs::path& p) {
    FileSig s;
    struct stat sb {};
    if (::stat(p.c_str(), &sb) != 0) {  // follows symlinks: the file served, not the link
      s.err = errno;
      return s;
    }
    s.dev = sb.st_dev;
    s.ino = sb.st_ino;
    s.size = static_cast<uint64_t>(sb.st_size);
    s.mtime_ns = ns(sb.st_mtim);
    s.ctime_ns = ns(sb.st_ctim);
    return s;
  };
  return {one(paths.chain), one(paths.key)};
}

CertKeyPaths CertWatcher::paths_of(const Entry& e) const {
  const Source& s = sources_[e.source];
  if (!s.directory) return s.pair;
  fs::path chain(*e.chain);
  fs::path key = chain.parent_path() / "privkey.pem";
  return {std::move(chain), std::move(key)};
}

CertWatcher::Entry& CertWatcher::entry(const std::string& chain, bool* fresh) {
  auto [it, added] = entries_.try_emplace(chain);
  if (added) it->second.chain = &it->first;
  if (fresh) *fresh = added;
  return it->second;
}

Status CertWatcher::ensure_inotify() {
  if (inotify_fd_ >= 0) return {};
  inotify_fd_ = ::inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  if (inotify_fd_ < 0) {
    return fail(Errc::io, std::string("inotify_init1: ") + std::strerror(errno) +
                              " (raise fs.inotify.max_user_instances, or load certificates without watching)");
  }
  stop_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (stop_fd_ < 0) return fail(Errc::io, std::string("eventfd: ") + std::strerror(errno));
  return {};
}

std::size_t CertWatcher::add_source(Source s) {
  // DirWatch::cands point at keys of the sources' cands maps: the list may grow only by moving
  // its sources (a moved std::map keeps its nodes, and their addresses), never by copying them.
  static_assert(std::is_nothrow_move_constructible_v<Source>);
  sources_.push_back(std::move(s));
  return sources_.size() - 1;
}

Result<LoadReport> CertWatcher::add_directory(const fs::path& dir) { return watch_directory(dir, nullptr); }

Result<LoadReport> CertWatcher::adopt_directory(const fs::path& dir, const LoadReport& loaded) {
  return watch_directory(dir, &loaded);
}

Result<LoadReport> CertWatcher::watch_directory(const fs::path& dir, const LoadReport* loaded) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return fail(Errc::io, dir.string() + ": not a directory" + (ec ? " (" + ec.message() + ")" : ""));
  }
  LoadReport report;
  std::vector<WatchEvent> events;
  {
    std::lock_guard lock(mu_);
    if (auto st = ensure_inotify(); !st) return fail(st.error());
    Source s;
    s.directory = true;
    s.path = dir;
    std::size_t i = add_source(std::move(s));
    if (loaded && loaded->sources.size() == loaded->certificates.size()) {
      for (std::size_t k = 0; k < loaded->certificates.size(); ++k) {
        const PairSource& src = loaded->sources[k];
        // Only pairs as this source spells them (paths_of): <cand>/{fullchain,privkey}.pem.
        if (src.paths.chain.filename() != "fullchain.pem" ||
            src.paths.key != src.paths.chain.parent_path() / "privkey.pem") {
          continue;  // left to the first check, which loads it
        }
        bool fresh = false;
        Entry& e = entry(src.paths.chain.string(), &fresh);
        if (!fresh) continue;  // another source's pair: its own checks own it
        e.source = i;
        e.cert = loaded->certificates[k];
        auto sig_of = [](const FileIdentity& id) {
          FileSig f;
          f.dev = id.device;
          f.ino = id.inode;
          f.size = id.size;
          f.mtime_ns = id.mtime_ns;
          return f;
        };
        e.sig = PairSig{sig_of(src.chain), sig_of(src.key)};
        e.adopted = true;
        held_[e.cert->fingerprint()] += 1;
        loaded_.fetch_add(1);
        // A candidate from the start, so that the first check reports it removed if its
        // directory went away since the load.
        sources_[i].cands.try_emplace(src.paths.chain.parent_path().string());
      }
    }
    check_source(i, true, true, events, &report);
  }
  emit(events);
  return report;
}

Result<LoadReport> CertWatcher::add_pair(const CertKeyPaths& pair) {
  for (const auto& p : {pair.chain, pair.key}) {
    std::error_code ec;
    if (!fs::is_directory(p.parent_path(), ec)) {
      return fail(Errc::io, p.parent_path().string() + ": not a directory (the directory of " + p.string() +
                                " must exist to be watched)");
    }
  }
  LoadReport report;
  std::vector<WatchEvent> events;
  {
    std::lock_guard lock(mu_);
    if (auto st = ensure_inotify(); !st) return fail(st.error());
    Source s;
    s.path = pair.chain;
    s.pair = pair;
    std::size_t i = add_source(std::move(s));
    check_source(i, true, true, events, &report);
  }
  emit(events);
  return report;
}

// check_source checks what changed in a source since the last check: the candidates the
// events named and those waiting for a second file, or every candidate when full (or when an
// event asked for it). Watches are added before the files are read, so a change after the
// read is an event; a directory first watched after the read (a symlink target) gets its
// candidate checked once more, for a change made before its watch existed.
void CertWatcher::check_source(std::size_t index, bool initial, bool full, std::vector<WatchEvent>& events,
                               LoadReport* report) {
  Source& s = sources_[index];
  s.last_check = steady::now();
  s.first_change.reset();
  s.last_change.reset();
  s.retry_at.reset();
  full = full || s.full;
  s.full = false;
  std::set<std::string> cands = std::move(s.dirty);
  s.dirty.clear();
  cands.merge(s.held);
  s.held.clear();
  checks_.fetch_add(1);
  if (full) full_checks_.fetch_add(1);

  if (!s.directory) {
    cands = {std::string()};
    if (full) s.unwatched = false;
  } else if (full) {
    // Everything: the subdirectories there are now, and the candidates known from before
    // (gone ones are reported removed).
    s.unwatched = false;
    sync_root_watches(index);
    auto list = [&](const fs::path& d, bool descend_into_live) {
      std::error_code ec;
      fs::directory_iterator it(d, ec), end;
      if (ec) return ec;
      for (; !ec && it != end; it.increment(ec)) {
        std::error_code se;
        if (!it->is_directory(se)) continue;
        if (descend_into_live && it->path().filename() == "live") continue;  // listed below
        cands.insert(it->path().string());
      }
      return std::error_code();
    };
    if (auto ec = list(s.path, true)) {
      logger_->log(LogLevel::warn, kLog, "watched directory unreadable; its certificates keep serving",
                   {{"dir", s.path.string()}, {"error", s.path.string() + ": " + ec.message()}});
    }
    std::error_code ec;
    if (fs::is_directory(s.path / "live", ec)) (void)list(s.path / "live", false);
    for (const auto& [c, dirs] : s.cands) cands.insert(c);
  }
  // Only the very first check of a source may skip re-adding watches it already has.
  const bool refresh = !initial;
  std::set<std::string> again = check_cands(index, cands, initial, refresh, events, report);
  if (!again.empty()) (void)check_cands(index, again, false, true, events, report);
}

// mark_removed handles a candidate of a directory source that no longer holds a pair (its
// directory or both files gone): its last good certificate keeps serving.
void CertWatcher::mark_removed(std::size_t index, const std::string& cand, std::vector<WatchEvent>& events) {
  auto it = entries_.find((fs::path(cand) / "fullchain.pem").string());
  if (it == entries_.end()) return;
  Entry& e = it->second;
  if (e.source != index || !e.present) return;
  e.present = false;
  e.sig.reset();
  e.adopted = false;
  e.held_since.reset();
  e.failure.reset();
  if (!e.cert) return;
  removed_.fetch_add(1);
  logger_->log(LogLevel::warn, kLog, "certificate files removed; the last certificate keeps serving",
               {{"file", *e.chain}});
  events.push_back({WatchEvent::Type::removed, fs::path(*e.chain), e.cert->id(), std::nullopt, nullptr, nullptr});
}

// check_cands looks at the given candidates of a source: pairs whose files changed since last
// time are loaded (in parallel) and published together; pairs gone are reported as removed
// and keep serving. Returns the candidates that got a new directory watch after their files
// were read (to be checked again).
std::set<std::string> CertWatcher::check_cands(std::size_t index, const std::set<std::string>& cands,
                                               bool initial, bool refresh, std::vector<WatchEvent>& events,
                                               LoadReport* report) {
  const auto now = steady::now();
  std::vector<std::string> looked;  // candidates whose watches are synced after the loads
  std::vector<Entry*> todo;
  std::vector<PairSig> sigs;
  std::vector<CertKeyPaths> to_load;
  std::vector<std::string> todo_cands;
  // back: the pair had been reported removed (its last good certificate kept).
  std::vector<bool> back;
  for (const auto& c : cands) {
    Source& s = sources_[index];
    CertKeyPaths paths;
    if (s.directory) {
      struct stat sb {};
      if (::stat(c.c_str(), &sb) != 0 || !S_ISDIR(sb.st_mode)) {
        // Gone (or never a directory: a file event in the source directory).
        forget_cand(index, c);
        mark_removed(index, c, events);
        continue;
      }
      paths = {fs::path(c) / "fullchain.pem", fs::path(c) / "privkey.pem"};
    } else {
      paths = s.pair;
    }
    (void)sync_cand(index, c, false, refresh);  // watch first, then read
    looked.push_back(c);
    pairs_checked_.fetch_add(1);
    PairSig sig = signature(paths);
    if (s.directory && sig.chain.err != 0 && sig.key.err != 0) {
      // A directory with neither file is not (or no longer) a pair; it stays watched, so that
      // files written into it later are seen.
      mark_removed(index, c, events);
      continue;
    }
    bool fresh = false;
    Entry& e = entry(paths.chain.string(), &fresh);
    if (fresh) e.source = index;
    if (e.adopted) {
      // Loaded by the caller (adopt_directory): unchanged if the files are those it read.
      auto same = [](const FileSig& f, const FileSig& id) {
        return f.err == 0 && f.size == id.size && f.mtime_ns == id.mtime_ns && f.ino == id.ino && f.dev == id.dev;
      };
      const bool unchanged = e.sig && same(sig.chain, e.sig->chain) && same(sig.key, e.sig->key);
      e.adopted = false;
      if (unchanged) {
        e.sig = sig;
        continue;
      }
      e.sig.reset();  // the caller's identities: never "unchanged since last look" below
    }
    if (e.sig && *e.sig == sig && !e.held_since) continue;  // unchanged since last look
    if (!initial && !s.directory && sig.chain.err == ENOENT && sig.key.err == ENOENT) {
      // An explicit pair whose files are gone: as for a directory removed above.
      if (e.present && (e.cert || e.failure)) {
        e.present = false;
        e.failure.reset();
        removed_.fetch_add(1);
        logger_->log(LogLevel::warn, kLog, "certificate files removed; the last certificate keeps serving",
                     {{"file", *e.chain}});
        events.push_back(
            {WatchEvent::Type::removed, fs::path(*e.chain), e.cert ? e.cert->id() : "", std::nullopt, nullptr, nullptr});
      }
      e.sig = sig;
      continue;
    }
    back.push_back(!e.present && e.cert != nullptr);
    e.present = true;
    todo.push_back(&e);
    sigs.push_back(sig);
    to_load.push_back(paths_of(e));
    todo_cands.push_back(c);
  }

  if (!todo.empty()) {
    pairs_parsed_.fetch_add(to_load.size());
    auto results = load_each(to_load, initial ? options_.initial_options : options_.reload_options);
    std::vector<Entry*> good;
    std::vector<PairSig> good_sigs;
    std::vector<std::shared_ptr<const Certificate>> certs;
    for (std::size_t k = 0; k < todo.size(); ++k) {
      Entry& e = *todo[k];
      const PairSig& sig = sigs[k];
      if (results[k]) {
        if (e.cert && e.cert->id() == (*results[k])->id()) {
          // Same certificate (touched, or rewritten identically): nothing to publish.
          e.sig = sig;
          e.held_since.reset();
          if (e.failure) {
            logger_->log(LogLevel::info, kLog, "certificate files fixed", {{"file", *e.chain}});
          }
          e.failure.reset();
          if (back[k]) {
            // A removed pair put back as it was. Its certificate kept serving, unless someone
            // took it out of the store meanwhile (the verification behind a snapshot removes a
            // pair gone while the process was down): published again (a no-op when it is
            // there) and reported, so that a listener following the names sees it back.
            if (auto st = store_->publish(e.cert); !st) {
              report_failure(e, fs::path(*e.chain), st.error(), events, report);
              continue;
            }
            reloaded_.fetch_add(1);
            logger_->log(LogLevel::info, kLog, "certificate files back", {{"file", *e.chain}, {"id", e.cert->id()}});
            events.push_back(
                {WatchEvent::Type::reloaded, fs::path(*e.chain), e.cert->id(), std::nullopt, e.cert, e.cert});
          }
          continue;
        }
        good.push_back(&e);
        good_sigs.push_back(sig);
        certs.push_back(std::move(*results[k]));
        continue;
      }
      Error err = results[k].error();
      if (!initial && half_written(sig.chain.err, sig.key.err, err)) {
        if (!e.held_since) e.held_since = now;
        auto until = *e.held_since + options_.pair_grace;
        if (now < until) {
          // Probably a writer between the two files: look again when the other file arrives
          // (an event) or when the grace ends, and say nothing yet.
          Source& s = sources_[index];
          s.held.insert(todo_cands[k]);
          s.retry_at = s.retry_at ? std::min(*s.retry_at, until) : until;
          continue;
        }
      }
      const CertKeyPaths& ep = to_load[k];
      fs::path bad = ep.chain;
      if (sig.chain.err == 0 && (sig.key.err != 0 || err.message.starts_with(ep.key.string() + ":"))) {
        bad = ep.key;
      }
      e.sig = sig;
      report_failure(e, bad, std::move(err), events, report);
    }

    if (!certs.empty()) {
      // One snapshot for all the good pairs; the certificates they replace leave afterwards,
      // so a name is never without a certificate in between.
      auto statuses = store_->publish_batch(certs);
      for (std::size_t k = 0; k < good.size(); ++k) {
        Entry& e = *good[k];
        e.sig = good_sigs[k];
        e.held_since.reset();
        if (!statuses[k]) {
          report_failure(e, fs::path(*e.chain), statuses[k].error(), events, report);
          continue;
        }
        const bool first = !e.cert;
        held_[certs[k]->fingerprint()] += 1;
        if (e.cert) drop_cert(*e.cert);
        std::shared_ptr<const Certificate> previous = std::move(e.cert);
        e.cert = certs[k];
        e.failure.reset();
        if (report) {
          report->certificates.push_back(e.cert);
          // The identities are the stat() before the read (a pair changed in between is an
          // event, and checked again).
          if ((initial ? options_.initial_options : options_.reload_options).record_sources) {
            auto id = [](const FileSig& f) { return FileIdentity{f.size, f.mtime_ns, f.ino, f.dev}; };
            report->sources.push_back(PairSource{paths_of(e), id(e.sig->chain), id(e.sig->key)});
          }
        }
        if (first) {
          loaded_.fetch_add(1);
          if (!initial) {
            logger_->log(LogLevel::info, kLog, "certificate loaded",
                         {{"file", *e.chain}, {"id", e.cert->id()}});
          }
        } else {
          reloaded_.fetch_add(1);
          logger_->log(LogLevel::info, kLog, "certificate reloaded",
                       {{"file", *e.chain}, {"id", e.cert->id()}});
        }
        events.push_back({first ? WatchEvent::Type::loaded : WatchEvent::Type::reloaded, fs::path(*e.chain),
                          e.cert->id(), std::nullopt, e.cert, std::move(previous)});
      }
    }
  }

  // Now that the files were read: watch where their symlinks point (and stop watching where
  // they used to).
  std::set<std::string> again;
  for (const auto& c : looked) {
    if (sync_cand(index, c, true, refresh)) again.insert(c);
  }
  return again;
}

void CertWatcher::report_failure(Entry& e, const fs::path& path, Error error, std::vector<WatchEvent>& events,
                                 LoadReport* report) {
  e.held_since.reset();
  if (!error.message.starts_with(path.string())) error.message = path.string() + ": " + error.message;
  e.failure = std::make_unique<LoadFailure>(LoadFailure{path, error});
  failed_.fetch_add(1);
  logger_->log(LogLevel::error, kLog,
               e.cert ? "certificate file refused; the previous certificate keeps serving"
                      : "certificate file refused",
               {{"file", path.string()}, {"error", error.message}});
  if (report) report->failures.push_back(*e.failure);
  events.push_back({WatchEvent::Type::failed, path, e.cert ? e.cert->id() : "", std::move(error), nullptr, nullptr});
}

void CertWatcher::drop_cert(const Certificate& cert) {
  auto it = held_.find(cert.fingerprint());
  if (it == held_.end()) return;
  if (--it->second > 0) return;
  held_.erase(it);
  (void)store_->remove(cert.id());  // fails only if it already left (replaced on all its names)
}

// sync_root_watches watches a directory source's directory and its live/: their events name
// the candidates that changed.
void CertWatcher::sync_root_watches(std::size_t index) {
  Source& s = sources_[index];
  std::set<std::string> want{s.path.string()};
  std::error_code ec;
  if (fs::is_directory(s.path / "live", ec)) want.insert((s.path / "live").string());
  for (const auto& d : want) {
    if (watch_dir(d, index, nullptr) != 0) s.root_watched.insert(d);
  }
  std::vector<std::string> stale;
  for (const auto& d : s.root_watched) {
    if (!want.count(d)) stale.push_back(d);
  }
  for (const auto& d : stale) {
    unwatch_dir(d, index, nullptr);
    sources_[index].root_watched.erase(d);
  }
}

// wanted_dirs lists the directories a candidate needs watched: before its files are read, the
// directories that hold them; after, also the directories its symlinked files resolve to (a
// pair in a directory source that no longer holds files needs only its own directory).
std::set<std::string> CertWatcher::wanted_dirs(std::size_t index, const std::string& cand, bool after_read) const {
  const Source& s = sources_[index];
  std::set<std::string> want;
  CertKeyPaths paths = s.pair;
  if (s.directory) {
    want.insert(cand);
    if (!after_read) return want;
    auto it = entries_.find((fs::path(cand) / "fullchain.pem").string());
    if (it == entries_.end() || it->second.source != index || !it->second.present) return want;
    paths = paths_of(it->second);
  }
  for (const fs::path& f : {paths.chain, paths.key}) {
    want.insert(f.parent_path().string());
    if (!after_read) continue;
    std::error_code e;
    if (fs::is_symlink(f, e)) {
      auto target = fs::canonical(f, e);
      if (!e) want.insert(target.parent_path().string());
    }
  }
  return want;
}

// sync_cand points a candidate's watches at the directories it needs now. With refresh, the
// watches it already has are added again, so that a path that names another directory since
// (a swapped directory symlink: live/<name>, ..data) gets the new directory's watch. After
// the read, directories no longer wanted are released. Returns true when a directory was
// watched for the first time (or re-pointed) after the read.
bool CertWatcher::sync_cand(std::size_t index, const std::string& cand, bool after_read, bool refresh) {
  std::set<std::string> want = wanted_dirs(index, cand, after_read);
  // Those were (re-)added before the read already.
  std::set<std::string> before = after_read ? wanted_dirs(index, cand, false) : std::set<std::string>{};
  bool added = false;
  for (const auto& d : want) {
    auto& watched = sources_[index].cands[cand];
    bool had = watched.has(cand, d);
    if (had && (!refresh || before.count(d))) continue;
    int r = watch_dir(d, index, &cand);
    if (r == 0) continue;
    sources_[index].cands[cand].add(cand, d);
    if (r == 2 && after_read && !before.count(d)) added = true;
  }
  if (after_read) {
    auto& watched = sources_[index].cands[cand];
    std::vector<std::string> stale;
    for (const auto& d : watched.list(cand)) {
      if (!want.count(d)) stale.push_back(d);
    }
    for (const auto& d : stale) {
      unwatch_dir(d, index, &cand);
      sources_[index].cands[cand].remove(cand, d);
    }
  }
  return added;
}

// forget_cand releases the watches of a candidate that is gone.
void CertWatcher::forget_cand(std::size_t index, const std::string& cand) {
  auto it = sources_[index].cands.find(cand);
  if (it == sources_[index].cands.end()) return;
  for (const auto& d : it->second.list(it->first)) unwatch_dir(d, index, &it->first);
  sources_[index].cands.erase(it);
}

int CertWatcher::watch_dir(const std::string& dir, std::size_t index, const std::string* cand) {
  int wd = ::inotify_add_watch(inotify_fd_, dir.c_str(), kDirMask);
  if (wd < 0) {
    int err = errno;
    sources_[index].unwatched = true;  // polled every fallback_poll instead
    if (err == ENOSPC && !warned_limit_) {
      warned_limit_ = true;
      logger_->log(LogLevel::warn, kLog,
                   "inotify watch limit reached; polling instead (raise fs.inotify.max_user_watches)",
                   {{"dir", dir}});
    }
    return 0;
  }
  auto [slot, added] = dirs_.try_emplace(dir);
  const std::string* key = &slot->first;
  auto& dw = slot->second;
  bool changed = false;
  if (dw.wd != wd) {
    changed = true;
    if (dw.wd >= 0) {
      auto it = wd_dirs_.find(dw.wd);
      if (it != wd_dirs_.end()) {
        it->second.erase(key);
        if (it->second.empty()) {
          ::inotify_rm_watch(inotify_fd_, dw.wd);
          wd_dirs_.erase(it);
        }
      }
    }
    dw.wd = wd;
    wd_dirs_[wd].insert(key);
  }
  bool fresh = false;
  if (cand) {
    // By the candidate's key in its source (sync_cand made it before watching).
    auto c = sources_[index].cands.try_emplace(*cand).first;
    fresh = dw.cands.emplace(index, &c->first).second;
  } else {
    fresh = dw.roots.insert(index).second;
  }
  return changed || fresh ? 2 : 1;
}

void CertWatcher::unwatch_dir(const std::string& dir, std::size_t index, const std::string* cand) {
  auto it = dirs_.find(dir);
  if (it == dirs_.end()) return;
  if (cand) {
    // The entry holds the candidate's key in its source (watch_dir): found by that address in
    // O(log n), not by comparing every candidate of the source watching this directory (many
    // pairs symlinked into one shared directory).
    auto& cs = it->second.cands;
    const auto& source_cands = sources_[index].cands;
    if (auto k = source_cands.find(*cand); k != source_cands.end()) cs.erase({index, &k->first});
  } else {
    it->second.roots.erase(index);
  }
  if (!it->second.cands.empty() || !it->second.roots.empty()) return;
  if (it->second.wd >= 0) {
    auto w = wd_dirs_.find(it->second.wd);
    if (w != wd_dirs_.end()) {
      w->second.erase(&it->first);
      if (w->second.empty()) {
        ::inotify_rm_watch(inotify_fd_, it->second.wd);
        wd_dirs_.erase(w);
      }
    }
  }
  dirs_.erase(it);
}

// read_events drains the inotify queue and marks what changed: in a source's directory (or its
// live/), the subdirectory the event names; anywhere else, the candidates the directory was
// watched for. Returns false when the queue overflowed: events were lost, so every source is
// marked for a full check.
bool CertWatcher::read_events() {
  alignas(struct inotify_event) char buf[16384];
  const auto now = steady::now();
  auto mark = [&](std::size_t i) {
    Source& s = sources_[i];
    if (!s.first_change) s.first_change = now;
    s.last_change = now;
  };
  bool ok = true;
  for (;;) {
    ssize_t n = ::read(inotify_fd_, buf, sizeof buf);
    if (n <= 0) break;  // EAGAIN: drained
    for (char* p = buf; p < buf + n;) {
      auto* ev = reinterpret_cast<struct inotify_event*>(p);
      p += sizeof(struct inotify_event) + ev->len;
      if (ev->mask & IN_Q_OVERFLOW) {
        ok = false;
        for (std::size_t i = 0; i < sources_.size(); ++i) {
          sources_[i].full = true;
          mark(i);
        }
        continue;
      }
      auto it = wd_dirs_.find(ev->wd);
      if (it == wd_dirs_.end()) continue;
      // The name is NUL-padded to len; empty for events on the watched directory itself.
      const std::string name = ev->len > 0 ? std::string(ev->name) : std::string();
      for (const std::string* dp : it->second) {
        const std::string& d = *dp;
        auto dw = dirs_.find(d);
        if (dw == dirs_.end()) continue;
        for (std::size_t i : dw->second.roots) {
          Source& s = sources_[i];
          if (name.empty() || (name == "live" && d == s.path.string())) {
            // The source directory itself (deleted, moved, its attributes) or its live/
            // changed: look at everything.
            s.full = true;
          } else {
            s.dirty.insert((fs::path(d) / name).string());
          }
          mark(i);
        }
        for (const auto& [i, cand] : dw->second.cands) {
          sources_[i].dirty.insert(*cand);
          mark(i);
        }
        // The directory went away (deleted, or its watch removed): forget the watch so that
        // the next sync adds one on whatever the path names then.
        if (ev->mask & IN_IGNORED) dw->second.wd = -1;
      }
      if (ev->mask & IN_IGNORED) wd_dirs_.erase(it);
    }
  }
  return ok;
}

void CertWatcher::emit(std::vector<WatchEvent>& events) {
  if (options_.on_event) {
    for (const auto& e : events) options_.on_event(e);
  }
  if (options_.on_events && !events.empty()) options_.on_events(events);
  events.clear();
}

Status CertWatcher::start() {
  std::lock_guard tl(thread_mu_);
  if (thread_.joinable()) return {};
  {
    std::lock_guard lock(mu_);
    if (auto st = ensure_inotify(); !st) return st;
    uint64_t v;
    while (::read(stop_fd_, &v, sizeof v) > 0) {
    }
  }
  stopping_ = false;
  thread_ = std::thread([this] { run(); });
  return {};
}

void CertWatcher::stop() {
  std::lock_guard tl(thread_mu_);
  if (!thread_.joinable()) return;
  stopping_ = true;
  uint64_t one = 1;
  (void)!::write(stop_fd_, &one, sizeof one);
  thread_.join();
}

void CertWatcher::rescan() {
  std::vector<WatchEvent> events;
  {
    std::lock_guard lock(mu_);
    for (std::size_t i = 0; i < sources_.size(); ++i) check_source(i, false, true, events, nullptr);
  }
  emit(events);
}

void CertWatcher::run() {
  std::vector<WatchEvent> events;
  while (!stopping_) {
    int timeout_ms = -1;
    {
      std::lock_guard lock(mu_);
      const auto now = steady::now();
      std::optional<steady::time_point> next;
      auto consider = [&](steady::time_point t) { next = next ? std::min(*next, t) : t; };
      for (const auto& s : sources_) {
        if (s.last_change) consider(std::min(*s.last_change + options_.debounce, *s.first_change + options_.max_delay));
        if (s.retry_at) consider(*s.retry_at);
        if (s.unwatched) consider(s.last_check + options_.fallback_poll);
      }
      if (next) {
        auto ms = std::chrono::ceil<std::chrono::milliseconds>(*next - now).count();
        timeout_ms = static_cast<int>(std::clamp<int64_t>(ms, 0, 60000));
      }
    }
    struct pollfd fds[2] = {{stop_fd_, POLLIN, 0}, {inotify_fd_, POLLIN, 0}};
    int rc = ::poll(fds, 2, timeout_ms);
    if (stopping_) break;
    if (rc < 0 && errno != EINTR) {
      logger_->log(LogLevel::error, kLog, "poll failed; watcher stopped", {{"error", std::strerror(errno)}});
      break;
    }
    {
      std::lock_guard lock(mu_);
      if (rc > 0 && (fds[1].revents & POLLIN)) {
        if (!read_events()) {
          logger_->log(LogLevel::warn, kLog, "inotify queue overflowed; checking every pair of every source", {});
        }
      }
      const auto now = steady::now();
      for (std::size_t i = 0; i < sources_.size(); ++i) {
        const Source& s = sources_[i];
        bool due = (s.last_change && (now >= *s.last_change + options_.debounce ||
                                      now >= *s.first_change + options_.max_delay)) ||
                   (s.retry_at && now >= *s.retry_at) ||
                   (s.unwatched && now >= s.last_check + options_.fallback_poll);
        if (!due) continue;
        // Polling an unwatched source looks at everything: what changed there is unknown.
        const bool poll = s.unwatched && now >= s.last_check + options_.fallback_poll;
        check_source(i, false, poll, events, nullptr);
      }
    }
    emit(events);
  }
}

std::shared_ptr<const Certificate> CertWatcher::republish(const fs::path& chain) {
  std::lock_guard lock(mu_);
  auto it = entries_.find(chain.native());
  if (it == entries_.end() || !it->second.cert) return nullptr;
  if (!store_->publish(it->second.cert)) return nullptr;
  return it->second.cert;
}

CertWatcher::Counters CertWatcher::counters() const {
  return {loaded_.load(),      reloaded_.load(),      failed_.load(),       removed_.load(),
          checks_.load(),      full_checks_.load(),   pairs_checked_.load(), pairs_parsed_.load()};
}

std::vector<LoadFailure> CertWatcher::failures() const {
  std::lock_guard lock(mu_);
  std::vector<LoadFailure> out;
  for (const auto& [k, e] : entries_) {
    if (e.failure) out.push_back(*e.failure);
  }
  return out;
}

}  // namespace autotls::tlsreload
