#include "tlsreload/loader.h"

#include <algorithm>
#include <fstream>
#include <iterator>
#include <system_error>

#include "tlsreload/store.h"

namespace autotls::tlsreload {
namespace {

namespace fs = std::filesystem;

constexpr std::uintmax_t kMaxFileBytes = 1 << 20;

Result<std::string> read_file(const fs::path& path) {
  std::error_code ec;
  std::uintmax_t size = fs::file_size(path, ec);
  if (ec) return fail(Errc::io, path.string() + ": " + ec.message());
  if (size > kMaxFileBytes) {
    return fail(Errc::invalid_input, path.string() + ": larger than 1 MiB, not a PEM file");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return fail(Errc::io, path.string() + ": cannot open");
  std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return fail(Errc::io, path.string() + ": read error");
  return data;
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

LoadReport load_pairs(const std::vector<CertKeyPaths>& pairs, const LoadOptions& options) {
  LoadReport report;
  for (const CertKeyPaths& p : pairs) {
    auto cert = load_pair(p, options);
    if (cert) {
      report.certificates.push_back(std::move(*cert));
      continue;
    }
    // Recover which file the message names (read_file and load_pair prefix the path).
    const fs::path& path = cert.error().message.starts_with(p.key.string() + ":") ? p.key : p.chain;
    report.failures.push_back({path, cert.error()});
  }
  return report;
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
  auto scan = find_certbot_pairs(dir);
  if (!scan) return fail(scan.error());
  LoadReport report = load_pairs(scan->pairs, options);
  report.failures.insert(report.failures.begin(), scan->failures.begin(), scan->failures.end());
  return report;
}

std::size_t publish_all(CertStore& store, LoadReport& report) {
  std::size_t ok = 0;
  std::vector<std::shared_ptr<const Certificate>> kept;
  for (auto& cert : report.certificates) {
    auto st = store.publish(cert);
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
