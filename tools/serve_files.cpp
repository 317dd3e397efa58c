// serve's certificate files: --cert/--key pairs and --cert-dir, checked at start and watched.

#include "tools/serve_files.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cctype>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <tuple>
#include <utility>

#include "tlsreload/loader.h"
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

}  // namespace

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

bool covered_by(const std::set<std::string>& covered, const std::string& name) {
  if (covered.empty()) return false;
  std::string n = lower_name(name);
  if (covered.count(n)) return true;
  auto dot = n.find('.');
  return dot != std::string::npos && dot > 0 && covered.count("*" + n.substr(dot));
}

Result<FileCerts> load_cert_files(const Options& o, std::shared_ptr<tlsreload::CertStore> store, Logger* logger,
                                  std::function<void(const tlsreload::WatchEvent&)> on_event) {
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
  for (const auto& dir : dirs) {
    auto scan = tlsreload::find_certbot_pairs(dir);
    if (!scan) return fail(bad_load("--cert-dir " + dir, scan.error()));
    if (!scan->failures.empty()) return fail(bad_load("--cert-dir " + dir, scan->failures.front().error));
    if (scan->pairs.empty()) {
      return fail(Errc::invalid_input, "--cert-dir " + dir + ": no certificates found (expected <dir>/<name>/fullchain.pem "
                                       "and privkey.pem, or <dir>/live/<name>/...)");
    }
    for (const auto& p : scan->pairs) {
      if (auto st = check_key_permissions(p.key.string(), "--cert-dir " + dir); !st) return fail(st.error());
    }
  }

  tlsreload::WatcherOptions wo;
  wo.logger = logger;
  wo.on_event = std::move(on_event);
  out.watcher = std::make_unique<tlsreload::CertWatcher>(store, wo);
  auto take = [&](const std::string& what, Result<tlsreload::LoadReport>& r) -> Status {
    if (!r) return fail(bad_load(what, r.error()));
    if (!r->failures.empty()) {
      const auto& f = r->failures.front();
      std::string more = r->failures.size() > 1 ? " (and " + std::to_string(r->failures.size() - 1) + " more)" : "";
      std::string msg = f.error.message;
      if (!f.path.empty() && msg.find(f.path.string()) == std::string::npos) msg = f.path.string() + ": " + msg;
      return fail(Errc::invalid_input, what + ": " + msg + more);
    }
    for (const auto& c : r->certificates) out.names.insert(out.names.end(), c->names().begin(), c->names().end());
    return {};
  };
  for (const auto& p : pairs) {
    auto r = out.watcher->add_pair(p);
    if (auto st = take("--cert " + p.chain.string(), r); !st) return fail(st.error());
  }
  for (const auto& dir : dirs) {
    auto r = out.watcher->add_directory(dir);
    if (auto st = take("--cert-dir " + dir, r); !st) return fail(st.error());
  }
  if (auto st = out.watcher->start(); !st) return fail(st.error());
  std::sort(out.names.begin(), out.names.end());
  out.names.erase(std::unique(out.names.begin(), out.names.end()), out.names.end());
  for (const auto& n : out.names) out.covered.insert(lower_name(n));
  return out;
}

std::string prometheus_counter(const std::string& name, const std::string& help, std::uint64_t value) {
  return "# HELP " + name + " " + help + "\n# TYPE " + name + " counter\n" + name + " " + std::to_string(value) + "\n";
}

std::string watcher_metrics(const tlsreload::CertWatcher& w) {
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
  out += "# HELP autotls_cert_files_failing Certificate file pairs that are bad now (the last good certificate keeps serving).\n"
         "# TYPE autotls_cert_files_failing gauge\n"
         "autotls_cert_files_failing " + std::to_string(w.failures().size()) + "\n";
  return out;
}

}  // namespace autotls::cli
