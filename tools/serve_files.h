#pragma once

// serve's certificate files (--cert/--key pairs, --cert-dir): checked at start, loaded into the
// store, watched and reloaded on change by a tlsreload::CertWatcher (docs/cli.md, serve).

#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "acme/util/error.h"
#include "acme/util/logger.h"
#include "tlsreload/watcher.h"
#include "tools/cli.h"

namespace autotls::cli {

// FileCerts is what the certificate files serve: the watcher that keeps them current and the
// names their certificates cover at start (those are not issued over ACME).
struct FileCerts {
  std::unique_ptr<tlsreload::CertWatcher> watcher;
  std::vector<std::string> names;
  std::set<std::string> covered;  // the same, lower-case without a trailing dot, for covered_by
};

// check_key_permissions refuses a private key file readable or writable by group or others
// (like ssh): Errc::invalid_input naming the file, its mode and `chmod 600`.
Status check_key_permissions(const std::string& path, const std::string& flag);

// load_cert_files checks every --cert/--key pair and --cert-dir of o (files readable, key mode,
// pair matching, chain, validity), publishes them into store and starts the watcher. Any bad
// file fails the start with one Errc::invalid_input line naming the file and the fix. Returns
// an empty FileCerts (no watcher) when no file source is configured.
Result<FileCerts> load_cert_files(const Options& o, std::shared_ptr<tlsreload::CertStore> store, Logger* logger,
                                  std::function<void(const tlsreload::WatchEvent&)> on_event);

// covered_by tells whether a certificate for one of covered (FileCerts::covered) serves name:
// exact, or a wildcard for exactly one label; case-insensitive, trailing dot ignored.
bool covered_by(const std::set<std::string>& covered, const std::string& name);

// prometheus_counter renders one unlabelled counter: its # HELP and # TYPE lines and sample.
std::string prometheus_counter(const std::string& name, const std::string& help, std::uint64_t value);

// watcher_metrics renders the watcher's counters in Prometheus text format.
std::string watcher_metrics(const tlsreload::CertWatcher& w);

}  // namespace autotls::cli
