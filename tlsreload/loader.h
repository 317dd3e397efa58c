#pragma once

// Loading certificates from disk: certbot's layout and explicit cert/key pairs.

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "acme/util/error.h"
#include "tlsreload/certificate.h"

namespace autotls::tlsreload {

class CertStore;

// CertKeyPaths names one certificate chain file and its private key file.
struct CertKeyPaths {
  std::filesystem::path chain;  // leaf first, then intermediates (fullchain.pem)
  std::filesystem::path key;    // privkey.pem
};

// LoadFailure is one file that could not be used: its path and why.
struct LoadFailure {
  std::filesystem::path path;
  Error error;
};

// FileIdentity tells whether a file changed without reading it: what fstat() said of the file
// a certificate was read from (of a symlink's target: certbot's renewals point live/ at new
// files). The store snapshot (snapshot.h) records it per file.
struct FileIdentity {
  std::uint64_t size = 0;
  std::int64_t mtime_ns = 0;
  std::uint64_t inode = 0;
  std::uint64_t device = 0;
  bool operator==(const FileIdentity&) const = default;
};

// PairSource is where one loaded certificate came from.
struct PairSource {
  CertKeyPaths paths;
  FileIdentity chain, key;
  // key_mode is the key file's st_mode as read (0: not known). load_directory and load_pairs
  // record it, so a caller can check the key's permissions without another stat() per pair.
  std::uint32_t key_mode = 0;
};

// SourcePaths holds the chain and key paths of many pairs as plain strings in one buffer (a
// deferred load's, LoadOptions::defer_source_paths): pair i is chain(i), key(i). apply() makes
// them into PairSource::paths.
class SourcePaths {
 public:
  void reserve(std::size_t pairs, std::size_t bytes) {
    buf_.reserve(bytes);
    ends_.reserve(2 * pairs);
  }
  void add(std::string_view chain, std::string_view key) {
    buf_.append(chain);
    ends_.push_back(buf_.size());
    buf_.append(key);
    ends_.push_back(buf_.size());
  }
  std::size_t size() const { return ends_.size() / 2; }
  bool empty() const { return ends_.empty(); }
  std::string_view chain(std::size_t i) const { return part(2 * i); }
  std::string_view key(std::size_t i) const { return part(2 * i + 1); }
  // keep_only keeps the pairs whose keep[i] is true, in order.
  void keep_only(const std::vector<bool>& keep);
  // apply sets sources[i].paths from pair i (for each i < min(size, sources.size())), then
  // empties this.
  void apply(std::vector<PairSource>& sources);
  void clear() {
    buf_ = {};
    ends_ = {};
  }

 private:
  std::string_view part(std::size_t k) const {
    std::size_t begin = k == 0 ? 0 : ends_[k - 1];
    return std::string_view(buf_).substr(begin, ends_[k] - begin);
  }
  std::string buf_;
  std::vector<std::size_t> ends_;
};

// LoadReport is what a bulk load produced: the good certificates and each bad file. One bad
// file never stops the others from loading.
struct LoadReport {
  std::vector<std::shared_ptr<const Certificate>> certificates;
  std::vector<LoadFailure> failures;
  // sources[i] is where certificates[i] was read from (load_pairs, load_directory with
  // LoadOptions::record_sources; kept parallel by publish_all); empty otherwise.
  std::vector<PairSource> sources;
  // source_paths: with LoadOptions::defer_source_paths, the sources' paths (sources[i]'s are
  // pair i), until make_source_paths() puts them in sources. Kept parallel by publish_all.
  SourcePaths source_paths;
  void make_source_paths() { source_paths.apply(sources); }
  // scan_failures: the first scan_failures entries of failures are pairs with one of their two
  // files missing (load_directory; find_certbot_pairs' failures); the others did not load.
  std::size_t scan_failures = 0;
};

// bulk_load_options are the defaults of the bulk loaders below: the chain signatures are
// verified on first use instead of at load (LoadOptions::ChainCheck::deferred), because the
// files are our own (or certbot's), already validated when they were written, and verifying
// 100,000 signatures would take most of a minute on two cores with OpenSSL 3.0. A certificate
// that fails later is never served (CertStore treats it as absent); verify_pending() finds
// such certificates ahead of time. Pass LoadOptions{} to verify everything at load.
inline LoadOptions bulk_load_options() {
  LoadOptions o;
  o.chain_check = LoadOptions::ChainCheck::deferred;
  return o;
}

// load_pair reads and validates one chain + key pair (Certificate::from_pem). Files larger
// than 1 MiB are refused. Errors are prefixed with the path they concern.
[[nodiscard]] Result<std::shared_ptr<const Certificate>> load_pair(
    const CertKeyPaths& paths, const LoadOptions& options = bulk_load_options());

// load_pairs loads each pair on all cores (std::thread::hardware_concurrency threads);
// failures are collected, not fatal. The report lists certificates and failures in the
// order of pairs, whatever the threads did.
LoadReport load_pairs(const std::vector<CertKeyPaths>& pairs,
                      const LoadOptions& options = bulk_load_options());

// load_each loads each pair on all cores like load_pairs, but returns one result per pair, in
// the order of pairs (for callers that must know which pair produced which certificate).
std::vector<Result<std::shared_ptr<const Certificate>>> load_each(
    const std::vector<CertKeyPaths>& pairs, const LoadOptions& options = bulk_load_options());

// verify_pending runs the deferred checks (Certificate::verify) of every certificate whose
// verification is pending, on all cores, and returns one failure (with an empty path) per
// certificate that failed them. Such certificates are already treated as absent by CertStore;
// this reports them before a client meets them.
std::vector<LoadFailure> verify_pending(const std::vector<std::shared_ptr<const Certificate>>& certs);

// find_certbot_pairs lists the pairs of a certbot-style directory, in name order:
// <dir>/<name>/{fullchain.pem,privkey.pem} and <dir>/live/<name>/{fullchain.pem,privkey.pem}
// (certbot's live/ files are symlinks into archive/; they are followed). A subdirectory with
// neither file is not a certificate directory and is skipped silently (archive/, renewal/...);
// one with only one of the two is reported in failures. Fails only when dir itself cannot be
// listed.
struct DirectoryScan {
  std::vector<CertKeyPaths> pairs;
  std::vector<LoadFailure> failures;
};
[[nodiscard]] Result<DirectoryScan> find_certbot_pairs(const std::filesystem::path& dir);

// load_directory is find_certbot_pairs followed by load_pairs (with the existence checks of
// the scan done by the loading threads, one openat() per file relative to the directory's
// descriptor). Each file is read with fstat and one read() when it is a regular file; other
// files (a FIFO) are read until end of file. Same results and messages as the two calls.
// To reload on change, see CertWatcher (tlsreload/watcher.h).
[[nodiscard]] Result<LoadReport> load_directory(const std::filesystem::path& dir,
                                                const LoadOptions& options = bulk_load_options());

// publish_all publishes every certificate of report into store, in one snapshot
// (CertStore::publish_batch). A certificate the store refuses is moved to report.failures
// (with an empty path; its source, if any, is dropped with it). Returns how many were
// published.
std::size_t publish_all(CertStore& store, LoadReport& report);

}  // namespace autotls::tlsreload
