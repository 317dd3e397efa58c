#pragma once

// CertWatcher: certificate files on disk (certbot's layout, explicit cert/key pairs) loaded
// into a CertStore and reloaded when they change (inotify, debounced).

#include <atomic>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "acme/util/error.h"
#include "acme/util/logger.h"
#include "tlsreload/loader.h"

namespace autotls::tlsreload {

class CertStore;

// WatchEvent reports what happened to one watched pair.
struct WatchEvent {
  enum class Type {
    loaded,    // first good load of a pair
    reloaded,  // a changed pair was validated and published in place of the old one (or a
               // removed pair came back: its certificate published again, cert == previous)
    failed,    // a pair is bad (path names the bad file): the old certificate keeps serving
    removed,   // the pair's files are gone: the last good certificate keeps serving
  };
  Type type;
  std::filesystem::path path;  // the chain file (fullchain.pem); for failed, the bad file
  std::string cert_id;         // the certificate served for this pair now ("" if none)
  std::optional<Error> error;  // for failed
  // For loaded and reloaded: the certificate published for the pair now, and (reloaded) the one
  // it replaced, which left the store unless another pair holds it. References, not copies: a
  // listener that follows the names served reads them here.
  std::shared_ptr<const Certificate> cert;
  std::shared_ptr<const Certificate> previous;
};
std::string_view to_string(WatchEvent::Type type);

struct WatcherOptions {
  // debounce: a pair is checked once its files have been quiet this long (writers replace a
  // pair as several renames and writes); max_delay bounds the wait under a steady stream of
  // changes.
  std::chrono::milliseconds debounce{1000};
  std::chrono::milliseconds max_delay{10000};
  // pair_grace: how long a pair whose key does not match its certificate, or whose second file
  // is missing, may stay so before it is reported: the writer is usually still between the two
  // files (cert replaced, key not yet). It is re-checked when the other file arrives.
  std::chrono::milliseconds pair_grace{5000};
  // fallback_poll: how often sources that cannot be watched (inotify watch limit reached,
  // watched directory deleted) are re-checked by polling.
  std::chrono::milliseconds fallback_poll{30000};
  // initial_options load a directory when it is added (bulk: deferred chain check, see
  // bulk_load_options); reload_options load a changed pair (everything checked before publish).
  // With record_sources, the reports of add_directory/add_pair list each certificate's
  // PairSource (its paths and the identities stat() found before the read).
  LoadOptions initial_options = bulk_load_options();
  LoadOptions reload_options{};
  Logger* logger = nullptr;  // nullptr: null_logger()
  // on_event is called for each event from the thread that found it (the watcher's thread,
  // or the caller of add_*/rescan), with no watcher lock held; it must not call back into the
  // watcher.
  std::function<void(const WatchEvent&)> on_event;
  // on_events is called after on_event, once per check with every event it found (one burst:
  // a full check of a directory of 100,000 pairs is one call), under the same terms.
  std::function<void(const std::vector<WatchEvent>&)> on_events;
};

// CertWatcher loads certificate files into a CertStore and keeps them current.
//
// Sources are directories in certbot's layout (<dir>/<name>/{fullchain,privkey}.pem and
// <dir>/live/<name>/..., symlinks followed) and explicit pairs. The watcher watches the
// directories that hold the files, not the files: writers (certbot, Kubernetes secret mounts,
// our FileStorage) replace files by rename and swap symlinks, which a watch on the old inode
// would miss. It also watches the directories symlink targets live in, and re-points the
// watches of each pair it checks.
//
// A change is handled after `debounce` of quiet, and only where it happened: an inotify event
// names the watched directory (and, in a source directory or its live/, the subdirectory), so
// only the pairs those directories concern are checked; a new subdirectory is watched and
// loaded, and a directory source with 100,000 pairs costs the same per change as one with
// one. A check stat()s the pair's files, and if either changed (inode, size, times) loads and
// validates the pair (Certificate::from_pem) and publishes it; the certificate it replaces
// leaves the store when no other pair holds it. Every pair of a source is checked (a full
// check) when it is added, by rescan(), when the inotify queue overflowed (events were lost),
// when the source directory itself changed (deleted, moved, live/ replaced), and every
// `fallback_poll` while some directory of the source cannot be watched.
// A bad pair is reported once per state of its files (log, counter, on_event) and changes
// nothing: the old certificate keeps serving. A pair whose files disappear keeps serving its
// last good certificate (a deleted directory is more often a mistake or a half-finished
// move than a wish to stop serving a name; restart to drop it) and is reported as removed.
//
// Thread-safe. The background thread is started by start() and stopped by stop() or the
// destructor; stop() returns promptly (it interrupts the wait, not a load in progress).
class CertWatcher {
 public:
  struct Counters {
    std::uint64_t loaded = 0;    // pairs loaded for the first time
    std::uint64_t reloaded = 0;  // changed pairs published (and removed pairs put back)
    std::uint64_t failed = 0;    // bad pairs reported
    std::uint64_t removed = 0;   // pairs whose files disappeared
    std::uint64_t checks = 0;    // sources checked after a change (full or not)
    // full_checks: checks that looked at every pair of a source (add, rescan(), queue
    // overflow, a change of the source directory itself, polling); the others looked only at
    // the pairs the events named.
    std::uint64_t full_checks = 0;
    std::uint64_t pairs_checked = 0;  // pair directories (or pairs) whose files were stat()ed
    std::uint64_t pairs_parsed = 0;   // pairs read and parsed (their files had changed)
  };

  explicit CertWatcher(std::shared_ptr<CertStore> store, WatcherOptions options = {});
  ~CertWatcher();
  CertWatcher(const CertWatcher&) = delete;
  CertWatcher& operator=(const CertWatcher&) = delete;

  // add_directory loads every pair of a certbot-style directory into the store now, and
  // watches it from then on. The report lists what was published and each bad file. Fails
  // when dir is not a readable directory or inotify is unavailable.
  [[nodiscard]] Result<LoadReport> add_directory(const std::filesystem::path& dir);
  // adopt_directory is add_directory for a directory the caller has loaded and published
  // already (load_directory with LoadOptions::record_sources, then publish_all: the bulk
  // loader reads the pairs on all cores, where the watcher's first check goes pair by pair):
  // loaded's certificates become their pairs' current certificates (counted as loaded, no
  // event), and the first full check, which watches the directory, stat()s every pair as
  // usual but parses only those whose files are not the ones loaded (identities in
  // loaded.sources: size, mtime, inode, device) and those loaded did not list (new since, or
  // failed). So a pair changed between the load and the watch is still seen. The report lists
  // what that check published and each bad file.
  [[nodiscard]] Result<LoadReport> adopt_directory(const std::filesystem::path& dir, const LoadReport& loaded);
  // add_pair does the same for one explicit pair. A pair that cannot be loaded yet (missing or
  // bad files) is reported and watched; it fails only when its directories do not exist.
  [[nodiscard]] Result<LoadReport> add_pair(const CertKeyPaths& pair);

  // start runs the background thread that waits for changes; stop ends it. Idempotent.
  [[nodiscard]] Status start();
  void stop();

  // rescan checks every pair of every source now, as if each had changed (for SIGHUP), and
  // re-points every watch.
  void rescan();

  // republish publishes again the certificate the watcher serves now for the pair whose chain
  // file is chain (as its events name it: WatchEvent::path), and returns it; nullptr when the
  // watcher holds no certificate for that pair (or the store refused it), the store unchanged.
  // For a caller that took a name away from a pair's certificate and puts the file's back
  // (serve, handing a configured name over to a file certificate, removes a renewal that had
  // taken the file's place): it runs under the lock the watcher loads and publishes under, so
  // what goes back is the pair's newest certificate, never an older one that a newer load
  // (another thread's rescan, the verification behind a snapshot) has replaced meanwhile.
  std::shared_ptr<const Certificate> republish(const std::filesystem::path& chain);

  Counters counters() const;
  // failures lists the pairs that are bad now (the last error of each), for status pages.
  std::vector<LoadFailure> failures() const;

 private:
  struct FileSig {
    int err = 0;  // stat errno, 0 when it exists
    std::uint64_t dev = 0, ino = 0, size = 0;
    std::int64_t mtime_ns = 0, ctime_ns = 0;
    bool operator==(const FileSig&) const = default;
  };
  struct PairSig {
    FileSig chain, key;
    bool operator==(const PairSig&) const = default;
  };
  // Entry is one pair, in entries_ by its chain path. Kept small: a --cert-dir of 100,000
  // pairs has 100,000 of them (std::filesystem::path members cost ~0.4 KiB each, a parsed
  // list of components; the paths are made from the chain path when needed, paths_of()).
  struct Entry {
    const std::string* chain = nullptr;  // the key of this entry in entries_ (the chain path)
    std::size_t source = 0;
    std::optional<PairSig> sig;  // files as last loaded or reported; nullopt: never checked
    // adopted: cert was loaded by the caller (adopt_directory) from the files whose identities
    // sig holds (size, mtime, inode, device; no ctime); the first check compares those with
    // its stat() instead of the whole signature.
    bool adopted = false;
    std::shared_ptr<const Certificate> cert;  // the last good certificate, still served
    std::unique_ptr<LoadFailure> failure;     // reported and not fixed since
    bool present = true;                      // false once reported removed
    // A half-written-looking failure seen at held_since with these files, not yet reported.
    std::optional<std::chrono::steady_clock::time_point> held_since;
  };
  // WatchedDirs is the directories watched for one candidate: in a directory source usually
  // only the candidate's own directory, a flag rather than a second copy of its path (a
  // --cert-dir of 100,000 pairs has 100,000 candidates).
  struct WatchedDirs {
    bool self = false;  // the candidate's own directory
    std::unique_ptr<std::set<std::string>> other;  // the others (symlink targets, an explicit pair's)
    bool has(const std::string& cand, const std::string& d) const {
      return d == cand ? self : other && other->count(d) > 0;
    }
    void add(const std::string& cand, const std::string& d) {
      if (d == cand) {
        self = true;
        return;
      }
      if (!other) other = std::make_unique<std::set<std::string>>();
      other->insert(d);
    }
    void remove(const std::string& cand, const std::string& d) {
      if (d == cand) {
        self = false;
      } else if (other) {
        other->erase(d);
        if (other->empty()) other.reset();
      }
    }
    std::vector<std::string> list(const std::string& cand) const {
      std::vector<std::string> out;
      if (other) out.assign(other->begin(), other->end());
      if (self) out.push_back(cand);
      return out;
    }
  };
  // A candidate is what one check looks at: in a directory source, a subdirectory of it (or
  // of its live/) by path, which holds a pair or may come to; in a pair source, "" (its pair).
  struct Source {
    bool directory = false;
    std::filesystem::path path;  // the directory, or the pair's chain file
    CertKeyPaths pair;           // for a pair source
    std::set<std::string> root_watched;  // directory source: the directory and its live/
    // Every candidate known to exist (or to hold an entry), with the directories watched for
    // it: its own directory, the pair's directories and those its symlinks resolve to.
    std::map<std::string, WatchedDirs> cands;
    bool unwatched = false;  // some directory could not be watched: poll (full check)
    // Debounce state: first and last change seen since the last check, and what changed.
    std::optional<std::chrono::steady_clock::time_point> first_change, last_change;
    bool full = false;             // the next check looks at every candidate
    std::set<std::string> dirty;   // candidates named by events since the last check
    std::set<std::string> held;    // candidates waiting for their second file
    std::optional<std::chrono::steady_clock::time_point> retry_at;  // pending grace re-check
    std::chrono::steady_clock::time_point last_check{};
  };
  // DirWatch is one watched directory (by the path string it was added under) and whom its
  // events concern.
  struct DirWatch {
    int wd = -1;
    std::set<std::size_t> roots;  // sources it is the directory (or live/) of: names are candidates
    // (source, candidate) it was watched for; the candidate is its key in Source::cands, which
    // outlives the pair (forget_cand releases the watches before it erases the candidate).
    std::set<std::pair<std::size_t, const std::string*>> cands;
  };

  static PairSig signature(const CertKeyPaths& paths);
  // paths_of is the pair's files: a directory source's <cand>/fullchain.pem and
  // <cand>/privkey.pem, an explicit pair's own.
  CertKeyPaths paths_of(const Entry& e) const;
  Entry& entry(const std::string& chain, bool* fresh = nullptr);
  Result<LoadReport> watch_directory(const std::filesystem::path& dir, const LoadReport* loaded);
  Status ensure_inotify();
  std::size_t add_source(Source s);
  void check_source(std::size_t index, bool initial, bool full, std::vector<WatchEvent>& events,
                    LoadReport* report);
  std::set<std::string> check_cands(std::size_t index, const std::set<std::string>& cands, bool initial,
                                    bool refresh, std::vector<WatchEvent>& events, LoadReport* report);
  void mark_removed(std::size_t index, const std::string& cand, std::vector<WatchEvent>& events);
  void report_failure(Entry& e, const std::filesystem::path& path, Error error,
                      std::vector<WatchEvent>& events, LoadReport* report);
  void drop_cert(const Certificate& cert);
  void sync_root_watches(std::size_t index);
  std::set<std::string> wanted_dirs(std::size_t index, const std::string& cand, bool after_read) const;
  bool sync_cand(std::size_t index, const std::string& cand, bool after_read, bool refresh);
  void forget_cand(std::size_t index, const std::string& cand);
  // watch_dir adds (or re-points) the watch on dir for a role: a source's root when cand is
  // null, else (index, *cand). Returns 0 if it failed, 1 if unchanged, 2 if new or re-pointed.
  int watch_dir(const std::string& dir, std::size_t index, const std::string* cand);
  void unwatch_dir(const std::string& dir, std::size_t index, const std::string* cand);
  void emit(std::vector<WatchEvent>& events);
  void run();
  bool read_events();

  std::shared_ptr<CertStore> store_;
  WatcherOptions options_;
  Logger* logger_;

  mutable std::mutex mu_;  // everything below; held while checking (never while emitting)
  int inotify_fd_ = -1;
  int stop_fd_ = -1;  // eventfd: stop() wakes the thread
  std::vector<Source> sources_;
  std::map<std::string, Entry> entries_;  // by chain path
  std::map<Certificate::Sha256, int> held_;  // certificate fingerprint -> entries serving it
  // wd -> the path strings it was added under (keys of dirs_, which outlive them here).
  std::map<int, std::set<const std::string*>> wd_dirs_;
  std::map<std::string, DirWatch> dirs_;
  bool warned_limit_ = false;

  std::atomic<std::uint64_t> loaded_{0}, reloaded_{0}, failed_{0}, removed_{0}, checks_{0};
  std::atomic<std::uint64_t> full_checks_{0}, pairs_checked_{0}, pairs_parsed_{0};

  std::mutex thread_mu_;
  std::thread thread_;
  std::atomic<bool> stopping_{false};
};

}  // namespace autotls::tlsreload
