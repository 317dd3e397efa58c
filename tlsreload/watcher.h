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
    reloaded,  // a changed pair was validated and published in place of the old one
    failed,    // a pair is bad (path names the bad file): the old certificate keeps serving
    removed,   // the pair's files are gone: the last good certificate keeps serving
  };
  Type type;
  std::filesystem::path path;  // the chain file (fullchain.pem); for failed, the bad file
  std::string cert_id;         // the certificate served for this pair now ("" if none)
  std::optional<Error> error;  // for failed
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
  LoadOptions initial_options = bulk_load_options();
  LoadOptions reload_options{};
  Logger* logger = nullptr;  // nullptr: null_logger()
  // on_event is called for each event from the thread that found it (the watcher's thread,
  // or the caller of add_*/rescan), with no watcher lock held; it must not call back into the
  // watcher.
  std::function<void(const WatchEvent&)> on_event;
};

// CertWatcher loads certificate files into a CertStore and keeps them current.
//
// Sources are directories in certbot's layout (<dir>/<name>/{fullchain,privkey}.pem and
// <dir>/live/<name>/..., symlinks followed) and explicit pairs. The watcher watches the
// directories that hold the files, not the files: writers (certbot, Kubernetes secret mounts,
// our FileStorage) replace files by rename and swap symlinks, which a watch on the old inode
// would miss. It also watches the directories symlink targets live in, and re-points its
// watches after each change.
//
// A change to a pair is handled after `debounce` of quiet: the files are stat()ed, and if
// either changed (inode, size, times) the pair is loaded and validated (Certificate::from_pem)
// and published; the certificate it replaces leaves the store when no other pair holds it.
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
    std::uint64_t reloaded = 0;  // changed pairs published
    std::uint64_t failed = 0;    // bad pairs reported
    std::uint64_t removed = 0;   // pairs whose files disappeared
    std::uint64_t checks = 0;    // sources checked after a change
  };

  explicit CertWatcher(std::shared_ptr<CertStore> store, WatcherOptions options = {});
  ~CertWatcher();
  CertWatcher(const CertWatcher&) = delete;
  CertWatcher& operator=(const CertWatcher&) = delete;

  // add_directory loads every pair of a certbot-style directory into the store now, and
  // watches it from then on. The report lists what was published and each bad file. Fails
  // when dir is not a readable directory or inotify is unavailable.
  [[nodiscard]] Result<LoadReport> add_directory(const std::filesystem::path& dir);
  // add_pair does the same for one explicit pair. A pair that cannot be loaded yet (missing or
  // bad files) is reported and watched; it fails only when its directories do not exist.
  [[nodiscard]] Result<LoadReport> add_pair(const CertKeyPaths& pair);

  // start runs the background thread that waits for changes; stop ends it. Idempotent.
  [[nodiscard]] Status start();
  void stop();

  // rescan checks every source now, as if each had changed (for SIGHUP).
  void rescan();

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
  struct Entry {
    CertKeyPaths paths;
    std::size_t source = 0;
    std::optional<PairSig> sig;  // files as last loaded or reported; nullopt: never checked
    std::shared_ptr<const Certificate> cert;  // the last good certificate, still served
    std::optional<LoadFailure> failure;       // reported and not fixed since
    bool present = true;                      // false once reported removed
    // A half-written-looking failure seen at held_since with these files, not yet reported.
    std::optional<std::chrono::steady_clock::time_point> held_since;
  };
  struct Source {
    bool directory = false;
    std::filesystem::path path;  // the directory, or the pair's chain file
    CertKeyPaths pair;           // for a pair source
    std::set<std::string> watched;  // directories it wants watched
    bool unwatched = false;         // some directory could not be watched: poll it
    // Debounce state: first and last change seen since the last check.
    std::optional<std::chrono::steady_clock::time_point> first_change, last_change;
    std::optional<std::chrono::steady_clock::time_point> retry_at;  // pending grace re-check
    std::chrono::steady_clock::time_point last_check{};
  };

  static PairSig signature(const CertKeyPaths& paths);
  Status ensure_inotify();
  std::size_t add_source(Source s);
  void check_source(std::size_t index, bool initial, std::vector<WatchEvent>& events, LoadReport* report);
  void report_failure(Entry& e, const std::filesystem::path& path, Error error,
                      std::vector<WatchEvent>& events, LoadReport* report);
  void drop_cert(const std::string& id);
  bool sync_watches(std::size_t index);
  void add_watch(const std::string& dir, std::size_t index);
  void release_watch(const std::string& dir, std::size_t index);
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
  std::map<std::string, int> held_;       // certificate id -> entries serving it
  std::map<int, std::set<std::string>> wd_dirs_;
  struct DirWatch {
    int wd = -1;
    std::set<std::size_t> sources;
  };
  std::map<std::string, DirWatch> dirs_;
  bool warned_limit_ = false;

  std::atomic<std::uint64_t> loaded_{0}, reloaded_{0}, failed_{0}, removed_{0}, checks_{0};

  std::mutex thread_mu_;
  std::thread thread_;
  std::atomic<bool> stopping_{false};
};

}  // namespace autotls::tlsreload
