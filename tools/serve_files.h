#pragma once

// serve's certificate files (--cert/--key pairs, --cert-dir): checked at start, loaded into the
// store, watched and reloaded on change by a tlsreload::CertWatcher (docs/cli.md, serve).

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "acme/util/error.h"
#include "acme/util/logger.h"
#include "tlsreload/watcher.h"
#include "tools/cli.h"

namespace autotls::cli {

// CertDirSnapshot is what happened behind one --cert-dir's store snapshot, once the start is
// over: either the directory was verified behind the snapshot served at start (verified), or
// it was loaded in full at start and its snapshot written now (the first start, or an ignored
// snapshot).
struct CertDirSnapshot {
  std::string dir;
  std::string snapshot;  // the snapshot file
  bool verified = false;
  std::optional<Error> error;  // verified: the directory could not be read (the snapshot keeps serving)
  std::size_t loaded = 0;      // pairs loaded from the directory
  // verified: pairs whose certificate changed while the process was down (replaced now), new
  // pairs, snapshot certificates removed (their pair is gone), and kept (their pair failed to
  // load: still served from the snapshot; each failure is also a cert_file_failed event).
  std::size_t changed = 0, added = 0, removed = 0, kept = 0, failed = 0;
  std::vector<std::string> changed_paths;  // the first 20 changed pairs' chain files
  // verified: key files accessible by group or others (a start without snapshot refuses them;
  // here the pair keeps serving): how many, and the first message.
  std::size_t loose_keys = 0;
  std::string loose_key_error;
  Status written;         // the snapshot's rewrite
  double seconds = 0;     // from the start of the verification (or write) to its end
  // verified: the certificates whose names joined and left what the directory serves
  // (tlsreload::DirectoryCheck::fresh, gone and replaced): the watcher's events of the
  // verification are not passed on (load_cert_files' on_events), this says it in one batch.
  std::vector<std::shared_ptr<const tlsreload::Certificate>> fresh, gone, replaced;
  std::vector<std::string> fresh_chains;  // fresh's pairs' chain files, in fresh's order
};

// NameCounts maps each name a certificate file serves (Certificate::names(): lower-case, no
// trailing dot) to how many file certificates hold it: one node per name, the names' only copy
// (a --cert-dir may hold 100,000). A count may drop to zero or below for a moment when two
// threads' batches cross (a name counts only above zero).
using NameCounts = std::map<std::string, int, std::less<>>;

// count_names adds step (+1, -1) to the count of each name of cert, erasing names that reach 0.
void count_names(NameCounts& counts, const tlsreload::Certificate& cert, int step);

// FileCerts is what the certificate files serve: the watcher that keeps them current and the
// names of the certificates the snapshots and bulk loads published at start (those are not
// issued over ACME; the explicit pairs' names, and every change after, come as watcher events).
struct FileCerts {
  std::unique_ptr<tlsreload::CertWatcher> watcher;
  NameCounts names;
  // The snapshots of the --cert-dirs: those ignored at start (bad, corrupt, another user's:
  // the path and why; the directory was loaded in full instead), how many directories were
  // served from their snapshot, and what snapshot_work() still has to do.
  std::vector<std::pair<std::string, Error>> ignored;
  std::size_t from_snapshot = 0;
  struct Pending;
  std::vector<std::shared_ptr<Pending>> pending;
  // verifying is true while snapshot_work() runs (the watcher is busy with a full load then:
  // its failures() waits for it).
  std::shared_ptr<std::atomic<bool>> verifying = std::make_shared<std::atomic<bool>>(false);
  // rescan_wanted: a rescan() came while snapshot_work() ran; its thread rescans when done.
  std::shared_ptr<std::atomic<bool>> rescan_wanted = std::make_shared<std::atomic<bool>>(false);
  std::jthread worker;  // last: joined first

  // snapshot_work starts, on a thread of its own, the work the snapshots leave behind the
  // start: each directory served from its snapshot is loaded in full by the watcher (which
  // watches it from then on), what changed published, what is gone removed, and its snapshot
  // rewritten; each directory loaded at start gets its snapshot written. on_done is called
  // once per directory, from that thread. Does nothing when nothing is pending.
  void snapshot_work(std::function<void(const CertDirSnapshot&)> on_done);

  // rescan re-checks every file (SIGHUP): at once, or, while snapshot_work() runs (its full
  // checks hold the watcher), by that thread once it is done, so the caller never waits for a
  // verification. Changes during the verification are not lost meanwhile: the watches of a
  // pair are in place before its files are read, so a later change is an event.
  void rescan();
};

// Huge pages for a large --cert-dir. A start of 100,000 pairs makes ~300 MB of small heap
// objects; on this VM each first touch of a 4 KiB page costs ~9 us in the kernel (a third of
// the start's CPU time, docs/benchmarks.md "Session 12"). glibc backs its heap with
// transparent huge pages when the tunable glibc.malloc.hugetlb=1 is set (THP "madvise" mode
// suffices), which it reads only at exec. So serve, given --cert-dir directories that hold at
// least kHugePagePairs pair directories (counted from the directories' link counts: one stat
// each) re-executes itself (/proc/self/exe, same pid, arguments and descriptors) with the
// tunable added to GLIBC_TUNABLES, once. A GLIBC_TUNABLES that names glibc.malloc.hugetlb
// already (=0 to opt out) is left alone. The child processes serve runs (hooks) see the
// environment as it was given: restore_env_after_reexec() puts it back first thing in main.
// The new image runs main again from the start, so nothing may be printed before: a process
// that has printed a line (printed_anything(), tools/cli.h) is not re-executed (its lines would
// appear twice). With --verbose, logger hears one line just before the exec.
inline constexpr std::size_t kHugePagePairs = 1000;
void reexec_for_huge_pages(const Options& o, char** argv, Logger& logger);
void restore_env_after_reexec();

// snapshot_file is the snapshot of the certificate directory dir (absolute) in snapshot_dir:
// named by the directory's last component and a hash of its absolute path, so that it is
// stable across starts and two directories never share one.
std::string snapshot_file(const std::string& snapshot_dir, const std::string& dir);

// check_key_permissions refuses a private key file readable or writable by group or others
// (like ssh): Errc::invalid_input naming the file, its mode and `chmod 600`.
Status check_key_permissions(const std::string& path, const std::string& flag);

// load_cert_files checks every --cert/--key pair and --cert-dir of o (files readable, key mode,
// pair matching, chain, validity), publishes them into store and starts the watcher. Any bad
// file fails the start with one Errc::invalid_input line naming the file and the fix. Returns
// an empty FileCerts (no watcher) when no file source is configured.
//
// snapshot_dir (absolute; empty: no snapshots) holds a store snapshot per --cert-dir. A
// --cert-dir with a usable snapshot is not checked pair by pair at start: only that it is a
// directory; its snapshot's certificates are published at once, and the checks (load, key
// permissions) run in FileCerts::snapshot_work(), which the caller starts once it listens.
// A snapshot that cannot be used is listed in FileCerts::ignored and the directory loaded as
// without one.
//
// on_event hears each watcher event; on_events each burst of them (WatcherOptions), except
// those of the verification behind a snapshot (CertDirSnapshot says what it changed). Both
// may be called before load_cert_files returns (the explicit pairs' first loads).
Result<FileCerts> load_cert_files(const Options& o, const std::string& snapshot_dir,
                                  std::shared_ptr<tlsreload::CertStore> store, Logger* logger,
                                  std::function<void(const tlsreload::WatchEvent&)> on_event,
                                  std::function<void(const std::vector<tlsreload::WatchEvent>&)> on_events = {});

// covered_by tells whether a certificate for one of covered (names counted above zero) serves
// name: exact, or a wildcard for exactly one label; case-insensitive, trailing dot ignored.
bool covered_by(const NameCounts& covered, const std::string& name);

// prometheus_counter renders one unlabelled counter: its # HELP and # TYPE lines and sample.
std::string prometheus_counter(const std::string& name, const std::string& help, std::uint64_t value);

// watcher_metrics renders the watcher's counters in Prometheus text format; verifying: a
// --cert-dir is being verified behind its snapshot (autotls_cert_dir_snapshot_verifying 1, and
// autotls_cert_files_failing is left out: the watcher's failures() waits for the verification).
std::string watcher_metrics(const tlsreload::CertWatcher& w, bool verifying = false);

}  // namespace autotls::cli
