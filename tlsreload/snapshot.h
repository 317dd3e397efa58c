#pragma once

// The store snapshot: serve first, verify behind (issue #3, docs/architecture.md).
//
// A cold start of 100,000 certbot pairs reads 200,000 files in 100,000 directories, ~300,000
// scattered 4 KiB block reads; on a VM that costs 10-17 s whatever the loader does
// (docs/benchmarks.md, "Cold start"). A snapshot is one file holding, for every loaded pair,
// what the store serves (the Certificate's compact fields: names, validity, leaf and key DER,
// the chain's intermediates once per file) and the identity of the two source files. At start
// it is read in one sequential read and published at once; the directory is then loaded as
// usual in the background, and what differs is published (changed, new pairs) or removed
// (gone), and the snapshot rewritten.
//
// The trade-off: a pair changed or removed while the process was down is served from the
// snapshot until the background load reaches it (a full cold load: seconds to tens of seconds
// with 100,000 pairs). The snapshot holds private keys: it is written 0600, crash-safely, and
// must live in a directory the process owns, never in the certificate directory it mirrors.

#include <filesystem>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "acme/util/error.h"
#include "acme/util/logger.h"
#include "tlsreload/certificate.h"
#include "tlsreload/loader.h"

namespace autotls::tlsreload {

class CertStore;

// kSnapshotFormatVersion is the format this build writes and the only one it reads.
inline constexpr std::uint32_t kSnapshotFormatVersion = 1;

// write_snapshot writes certificates (and sources, parallel to them) to path, replacing it
// crash-safely (write_file_atomic), mode 0600. sources may be empty (no identities recorded).
[[nodiscard]] Status write_snapshot(const std::filesystem::path& path,
                                    const std::vector<std::shared_ptr<const Certificate>>& certificates,
                                    const std::vector<PairSource>& sources);

// SnapshotContents is what read_snapshot restored.
struct SnapshotContents {
  std::vector<std::shared_ptr<const Certificate>> certificates;
  std::vector<PairSource> sources;   // parallel to certificates
  std::vector<LoadFailure> refused;  // entries that failed a recheck (expired...), by chain path
  // With LoadOptions::defer_source_paths: the sources' paths, until make_source_paths().
  SourcePaths source_paths;
  void make_source_paths() { source_paths.apply(sources); }
};

// read_snapshot reads path and rebuilds its certificates without parsing them (detail/compact.h):
// each is rechecked for what is cheap (validity window against options.clock, names, key
// fields) and left with its chain verification pending, as a deferred bulk load leaves it.
// Fails with Errc::invalid_input when the file is not owned by the process's effective uid or
// has any group or other permission bit, is not a snapshot (magic), has another format
// version, is truncated, fails its checksum or does not parse; Errc::io when it does not exist
// or cannot be read. A failure means: do not trust any of it.
// The file is mapped (not copied) and the certificates rebuilt on all cores. with_sources
// false leaves SnapshotContents::sources empty (a start does not need them).
[[nodiscard]] Result<SnapshotContents> read_snapshot(const std::filesystem::path& path,
                                                     const LoadOptions& options = bulk_load_options());
[[nodiscard]] Result<SnapshotContents> read_snapshot(const std::filesystem::path& path, const LoadOptions& options,
                                                     bool with_sources);

// DirectoryLoadOptions: how load_directory's serve-first variant runs.
struct DirectoryLoadOptions {
  LoadOptions load = bulk_load_options();
  // snapshot_path is the snapshot file; empty: no snapshot (a plain load). Put it in a
  // directory the process owns (autotls serve: under its storage directory), not in the
  // certificate directory.
  std::filesystem::path snapshot_path;
  // logger receives the warning when a snapshot is ignored, and failures to write one.
  Logger* logger = nullptr;
};

// SnapshotStart is what publish_snapshot did.
struct SnapshotStart {
  bool used = false;             // the snapshot was valid and its certificates published
  std::optional<Error> ignored;  // why an existing snapshot was not used (also logged)
  std::size_t published = 0;
  // What the snapshot published: the verification removes those the directory no longer has.
  std::vector<std::shared_ptr<const Certificate>> certificates;
  // sources[i] is where certificates[i] was read from when the snapshot was written (its
  // paths tell the verification which pair it is; empty paths if none were recorded).
  std::vector<PairSource> sources;
  std::vector<LoadFailure> refused;  // entries not published (expired, refused by the store)
  // With DirectoryLoadOptions::load.defer_source_paths: the sources' paths are here, not in
  // sources, until make_source_paths() (call it before anything reads sources[i].paths).
  SourcePaths source_paths;
  void make_source_paths() { source_paths.apply(sources); }
};

// publish_snapshot publishes options.snapshot_path's certificates into store in one snapshot
// (publish_batch). A missing file is not an error (used == false, nothing logged); a file that
// fails read_snapshot is ignored with a warning (used == false, ignored set).
SnapshotStart publish_snapshot(CertStore& store, const DirectoryLoadOptions& options);

// DirectoryCheck is what the verification behind the snapshot did.
struct DirectoryCheck {
  LoadReport report;            // the directory load (report.certificates are published)
  std::size_t removed = 0;      // snapshot certificates no longer in the directory, removed
  // Snapshot certificates whose pair is still there but failed to load (a key mismatch while
  // certbot switches live/, EMFILE, an unreadable file): kept in the store and in the
  // rewritten snapshot with their old source identity, so that the next start verifies again.
  std::size_t kept = 0;
  // Directory certificates not published because one of their names is held by a certificate
  // the snapshot did not publish (another writer replaced it meanwhile); still in report and
  // in the rewritten snapshot.
  std::size_t superseded = 0;
  Status snapshot_written;      // the rewrite of the snapshot (ok when there is no snapshot_path)
  // Directory pairs the snapshot held (by chain path) whose certificate is another now
  // (changed while the process was down), and pairs the snapshot did not hold (new).
  std::size_t changed = 0;
  std::size_t added = 0;
  std::vector<std::filesystem::path> changed_paths;  // the chain files of the changed pairs
  // The certificates behind those counts, for a caller that follows the names served: the
  // ones published for changed and new pairs (fresh), the snapshot certificates taken out of
  // the store because their pair is gone (gone), and those of changed pairs, replaced by their
  // pair's new certificate (replaced; taken out of the store too, so that a name the new one
  // dropped is not left to the old one). References, not copies; a default left in place
  // (remove_published) is in neither.
  std::vector<std::shared_ptr<const Certificate>> fresh, gone, replaced;
  std::vector<std::string> fresh_chains;  // fresh's pairs' chain files, in fresh's order
};

// check_directory loads dir (load_directory), publishes the result (as publish_all: a pair whose
// certificate did not change is a no-op, a changed or new one replaces or adds, each reader
// seeing the old or the new set; but a certificate one of whose names another writer has
// published since the snapshot is left alone: see DirectoryCheck::superseded; the store has no
// compare-and-swap, so a publish during the batch build itself can still be overwritten),
// removes from store each certificate of start whose pair's
// files are gone (ENOENT/ENOTDIR on the chain or key file) and that is not a default (the
// snapshot never sets one; remove() would clear it), then rewrites the snapshot from
// the load. "Failed to load now" is not "gone": a snapshot certificate whose pair exists but
// did not load is kept (served, and written back with its old source identity) and the
// failure logged. Fails only when dir cannot be listed (the store keeps what the snapshot
// published).
[[nodiscard]] Result<DirectoryCheck> check_directory(CertStore& store, const std::filesystem::path& dir,
                                                     const SnapshotStart& start,
                                                     const DirectoryLoadOptions& options);

// finish_check is the part of check_directory after the load and publish, for a caller that
// loaded and published the directory itself (autotls serve: its CertWatcher's first full
// check does both, and watches the pairs from then on): check.report must hold what was
// published, with its sources (LoadOptions::record_sources). It counts the changed and new
// pairs, removes the snapshot certificates whose pairs are gone, keeps (and logs) those whose
// pairs failed to load, and rewrites the snapshot, as check_directory does.
void finish_check(CertStore& store, DirectoryCheck& check, const SnapshotStart& start,
                  const DirectoryLoadOptions& options);

// SnapshotLoader is the whole start: its constructor publishes the snapshot if it is usable
// and returns (every certificate servable), and verifies it (check_directory) on a thread of
// its own. Without a usable snapshot, the constructor loads and publishes the directory as
// load_directory + publish_all would, and the thread only writes the snapshot.
class SnapshotLoader {
 public:
  SnapshotLoader(std::shared_ptr<CertStore> store, std::filesystem::path dir, DirectoryLoadOptions options);
  ~SnapshotLoader();  // waits for the thread
  SnapshotLoader(const SnapshotLoader&) = delete;
  SnapshotLoader& operator=(const SnapshotLoader&) = delete;

  const SnapshotStart& start() const { return start_; }
  // initial is the synchronous load's result when no snapshot was used (else empty).
  const std::optional<Result<LoadReport>>& initial() const { return initial_; }
  // wait blocks until the verification (or the snapshot write) finished, and returns it. Each
  // call returns the same result (a copy).
  Result<DirectoryCheck> wait();

 private:
  std::shared_ptr<CertStore> store_;
  std::filesystem::path dir_;
  DirectoryLoadOptions options_;
  SnapshotStart start_;
  std::optional<Result<LoadReport>> initial_;
  std::optional<Result<DirectoryCheck>> result_;
  std::thread thread_;
};

}  // namespace autotls::tlsreload
