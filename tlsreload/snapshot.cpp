#include "tlsreload/snapshot.h"

#include <algorithm>
#include <atomic>
#include <optional>
#include <system_error>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <unordered_map>
#include <unordered_set>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "tlsreload/detail/compact.h"
#include "tlsreload/detail/intern.h"
#include "tlsreload/storage.h"
#include "tlsreload/store.h"

namespace autotls::tlsreload {
namespace {

namespace fs = std::filesystem;

// The file: a fixed header, then the body.
//   header: magic (8 bytes), format version (u32), header size (u32), entry count (u64),
//           intermediate count (u64), body size (u64), SHA-256 of the header's first 40
//           bytes followed by the body (32 bytes).
//   body:   each intermediate's DER (str), then each entry: the chain file (str path, u64
//           size, i64 mtime ns, u64 inode, u64 device), the key file (same), then the
//           certificate's compact fields (detail::CompactCertificate, in the order below).
// Integers are little-endian (the host's, checked at compile time); str is a u32 length and
// the bytes. The checksum is for torn writes, a full disk and foreign files, not for an
// attacker: one who can write the file can write a key file just as well (both 0600, ours).
constexpr char kMagic[8] = {'A', 'T', 'L', 'S', 'S', 'N', 'A', 'P'};
constexpr std::size_t kHeaderSize = 72;
constexpr std::size_t kSummed = 40;  // header bytes covered by the checksum
static_assert(std::endian::native == std::endian::little, "the snapshot format is little-endian");

using Digest = std::array<unsigned char, 32>;

bool sha256(std::string_view a, std::string_view b, Digest& out) {
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  unsigned int len = 0;
  bool ok = ctx && EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr) == 1 &&
            EVP_DigestUpdate(ctx, a.data(), a.size()) == 1 && EVP_DigestUpdate(ctx, b.data(), b.size()) == 1 &&
            EVP_DigestFinal_ex(ctx, out.data(), &len) == 1 && len == out.size();
  EVP_MD_CTX_free(ctx);
  return ok;
}

class Writer {
 public:
  std::string& out;
  template <class T>
  void num(T v) {
    out.append(reinterpret_cast<const char*>(&v), sizeof v);
  }
  void str(std::string_view s) {
    num(static_cast<std::uint32_t>(s.size()));
    out.append(s);
  }
  void file(const fs::path& p, const FileIdentity& id) {
    str(p.native());
    num(id.size);
    num(id.mtime_ns);
    num(id.inode);
    num(id.device);
  }
};

// Reader reads the body; any read past the end sets bad and returns zeros, so a corrupt file
// is found at the end of an entry, never by reading outside the buffer.
class Reader {
 public:
  explicit Reader(std::string_view in, std::size_t pos = 0) : in_(in), pos_(pos) {}
  bool bad() const { return bad_; }
  std::size_t pos() const { return pos_; }
  bool done() const { return pos_ == in_.size(); }
  template <class T>
  T num() {
    T v{};
    if (in_.size() - pos_ < sizeof v) {
      bad_ = true;
      return v;
    }
    std::memcpy(&v, in_.data() + pos_, sizeof v);
    pos_ += sizeof v;
    return v;
  }
  std::string_view str() {
    auto n = num<std::uint32_t>();
    if (bad_ || in_.size() - pos_ < n) {
      bad_ = true;
      return {};
    }
    std::string_view s = in_.substr(pos_, n);
    pos_ += n;
    return s;
  }

 private:
  std::string_view in_;
  std::size_t pos_ = 0;
  bool bad_ = false;
};

// Secret is a buffer that held key bytes: wiped before it is freed (the writer's; the reader
// maps the file, whose bytes are the file's own).
struct Secret {
  std::string s;
  ~Secret() { OPENSSL_cleanse(s.data(), s.size()); }
};

Error bad_file(const fs::path& path, std::string_view why) {
  return Error(Errc::invalid_input, "store snapshot " + path.string() + ": " + std::string(why));
}

void warn(const DirectoryLoadOptions& options, std::string_view message, const fs::path& path,
          const std::string& error) {
  if (options.logger && options.logger->enabled(LogLevel::warn)) {
    options.logger->log(LogLevel::warn, "tlsreload", message, {{"path", path.string()}, {"error", error}});
  }
}

}  // namespace

Status write_snapshot(const fs::path& path, const std::vector<std::shared_ptr<const Certificate>>& certificates,
                      const std::vector<PairSource>& sources) {
  if (!sources.empty() && sources.size() != certificates.size()) {
    return fail(Errc::invalid_input, "store snapshot: sources do not match the certificates");
  }
  // Intermediates once each (100,000 leaves from one CA share one).
  std::unordered_map<const detail::Intermediate*, std::uint32_t> index;
  std::vector<std::string> inter_der;
  std::vector<detail::CompactCertificate> compact;
  compact.reserve(certificates.size());
  for (const auto& cert : certificates) {
    if (!cert) return fail(Errc::invalid_input, "store snapshot: null certificate");
    compact.push_back(detail::to_compact(*cert));
    for (const auto& inter : compact.back().chain) {
      if (index.try_emplace(inter.get(), static_cast<std::uint32_t>(index.size())).second) {
        std::string der = detail::intermediate_der(*inter);
        if (der.empty()) return fail(Errc::crypto, "store snapshot: DER of an intermediate");
        inter_der.push_back(std::move(der));
      }
    }
  }
  static const PairSource kNoSource;
  // The exact size, computed before anything is written: out holds key bytes and must never
  // reallocate (a reallocation frees a block with key bytes in it, which Secret cannot wipe).
  constexpr std::size_t kStr = sizeof(std::uint32_t);
  constexpr std::size_t kFileId = 3 * sizeof(std::uint64_t) + sizeof(std::int64_t);
  std::size_t size = kHeaderSize;
  for (const auto& der : inter_der) size += kStr + der.size();
  for (std::size_t i = 0; i < compact.size(); ++i) {
    const detail::CompactCertificate& c = compact[i];
    const PairSource& src = sources.empty() ? kNoSource : sources[i];
    size += kStr + src.paths.chain.native().size() + kFileId + kStr + src.paths.key.native().size() + kFileId;
    size += 1 + sizeof c.key_format + sizeof c.not_before_ns + sizeof c.not_after_ns + c.fingerprint.size();
    size += 4 * kStr + c.serial_hex.size() + c.issuer_cn.size() + c.issuer_dn.size() + c.key_type.size();
    size += sizeof(std::uint32_t);
    for (std::string_view n : c.names) size += kStr + n.size();
    size += kStr + c.leaf_der.size() + kStr + c.key_der.size();
    size += sizeof(std::uint32_t) + c.chain.size() * sizeof(std::uint32_t);
  }
  Secret buf;
  std::string& out = buf.s;
  out.reserve(size);
  const char* const block = out.data();
  out.resize(kHeaderSize);
  Writer w{out};
  for (const auto& der : inter_der) w.str(der);
  for (std::size_t i = 0; i < compact.size(); ++i) {
    detail::CompactCertificate& c = compact[i];
    const PairSource& src = sources.empty() ? kNoSource : sources[i];
    w.file(src.paths.chain, src.chain);
    w.file(src.paths.key, src.key);
    w.num(static_cast<std::uint8_t>(c.key_kind == KeyKind::ecdsa ? 0 : 1));
    w.num(c.key_format);
    w.num(c.not_before_ns);
    w.num(c.not_after_ns);
    out.append(reinterpret_cast<const char*>(c.fingerprint.data()), c.fingerprint.size());
    w.str(c.serial_hex);
    w.str(c.issuer_cn);
    w.str(c.issuer_dn);
    w.str(c.key_type);
    w.num(static_cast<std::uint32_t>(c.names.size()));
    for (std::string_view n : c.names) w.str(n);
    w.str(c.leaf_der);
    w.str(c.key_der);
    w.num(static_cast<std::uint32_t>(c.chain.size()));
    for (const auto& inter : c.chain) w.num(index.at(inter.get()));
  }
  // Computed and written must agree, or the buffer moved and left key bytes behind.
  if (out.size() != size || out.data() != block) {
    return fail(Errc::invalid_input, "store snapshot: size " + std::to_string(out.size()) + " bytes, computed " +
                                    std::to_string(size));
  }
  // The header, then the checksum over its first kSummed bytes and the body.
  std::string header;
  Writer h{header};
  header.append(kMagic, sizeof kMagic);
  h.num(kSnapshotFormatVersion);
  h.num(static_cast<std::uint32_t>(kHeaderSize));
  h.num(static_cast<std::uint64_t>(certificates.size()));
  h.num(static_cast<std::uint64_t>(index.size()));
  h.num(static_cast<std::uint64_t>(out.size() - kHeaderSize));
  Digest digest{};
  if (!sha256(header, std::string_view(out).substr(kHeaderSize), digest)) {
    return fail(Errc::crypto, "store snapshot: SHA-256");
  }
  header.append(reinterpret_cast<const char*>(digest.data()), digest.size());
  std::memcpy(out.data(), header.data(), kHeaderSize);
  return write_file_atomic(path, out, 0600);
}

namespace {

// Mapping maps a file read-only, its pages read ahead at once (MAP_POPULATE: a cold file comes
// in as large sequential requests, and nothing is copied into a buffer).
struct Mapping {
  void* p = MAP_FAILED;
  std::size_t n = 0;
  ~Mapping() {
    if (p != MAP_FAILED) ::munmap(p, n);
  }
  std::string_view view() const { return p == MAP_FAILED ? std::string_view() : std::string_view(static_cast<const char*>(p), n); }
};

// parse_entry reads one entry at r into c; with src, its identities (not its paths: chain_path and
// *key_out, views into the file, are the paths).
void parse_entry(Reader& r, detail::CompactCertificate& c, std::string_view& chain_path, PairSource* src,
                 const std::vector<std::shared_ptr<const detail::Intermediate>>& inters, bool& bad,
                 std::string_view* key_out = nullptr) {
  FileIdentity skip;
  chain_path = r.str();
  FileIdentity& chain_id = src ? src->chain : skip;
  chain_id.size = r.num<std::uint64_t>();
  chain_id.mtime_ns = r.num<std::int64_t>();
  chain_id.inode = r.num<std::uint64_t>();
  chain_id.device = r.num<std::uint64_t>();
  std::string_view key_path = r.str();
  if (key_out) *key_out = key_path;
  FileIdentity& key_id = src ? src->key : skip;
  key_id.size = r.num<std::uint64_t>();
  key_id.mtime_ns = r.num<std::int64_t>();
  key_id.inode = r.num<std::uint64_t>();
  key_id.device = r.num<std::uint64_t>();
  auto kind = r.num<std::uint8_t>();
  c.key_kind = kind == 0 ? KeyKind::ecdsa : KeyKind::rsa;
  c.key_format = r.num<std::uint8_t>();
  c.not_before_ns = r.num<std::int64_t>();
  c.not_after_ns = r.num<std::int64_t>();
  for (auto& b : c.fingerprint) b = r.num<std::uint8_t>();
  c.serial_hex = r.str();
  c.issuer_cn = r.str();
  c.issuer_dn = r.str();
  c.key_type = r.str();
  auto names = r.num<std::uint32_t>();
  c.names.clear();
  for (std::uint32_t k = 0; k < names && !r.bad(); ++k) c.names.push_back(r.str());
  c.leaf_der = r.str();
  c.key_der = r.str();
  auto chain = r.num<std::uint32_t>();
  c.chain.clear();
  for (std::uint32_t k = 0; k < chain && !r.bad(); ++k) {
    auto at = r.num<std::uint32_t>();
    if (at >= inters.size()) {
      bad = true;
      return;
    }
    c.chain.push_back(inters[at]);
  }
  if (r.bad() || kind > 1) bad = true;
}

// on_threads runs body(begin, end) over [0, n) in chunks on all cores.
template <class Body>
void on_threads(std::size_t n, Body&& body) {
  constexpr std::size_t kChunk = 256;
  std::atomic<std::size_t> next{0};
  auto work = [&] {
    for (;;) {
      std::size_t begin = next.fetch_add(kChunk, std::memory_order_relaxed);
      if (begin >= n) return;
      body(begin, std::min(n, begin + kChunk));
    }
  };
  std::vector<std::thread> pool;
  std::size_t threads = std::min<std::size_t>(std::max(1u, std::thread::hardware_concurrency()), (n + kChunk - 1) / kChunk);
  for (std::size_t t = 1; t < threads; ++t) {
    try {
      pool.emplace_back(work);
    } catch (const std::system_error&) {
      break;
    }
  }
  work();
  for (auto& t : pool) t.join();
}

// pair_gone tells whether a pair's files are gone from the directory (its directory deleted,
// or a file of it): only then does the verification take a snapshot certificate away. Any
// other error (EACCES, EMFILE, EIO...) says nothing about the pair, which is kept. lstat: a
// live/ symlink whose target is missing for a moment is still the pair's entry.
bool pair_gone(const CertKeyPaths& paths) {
  for (const fs::path* p : {&paths.chain, &paths.key}) {
    struct stat st{};
    if (::lstat(p->c_str(), &st) != 0 && (errno == ENOENT || errno == ENOTDIR)) return true;
  }
  return false;
}

// exact_holder returns what holds name's slot for family in snap, or nullptr when that slot is
// empty (find() then answers from a wildcard, the default or the other family: not a holder).
const Certificate* exact_holder(const Snapshot& snap, const std::string& name, KeyKind family) {
  // find() takes a host name: a wildcard's slot is what a name under it finds first, unless an
  // exact name answers (then its certificate does not hold the wildcard: checked below).
  std::string host = name.starts_with("*.") ? "0--autotls-probe" + name.substr(1) : name;
  const auto* found = snap.find(host, family == KeyKind::ecdsa);
  if (!found || !*found) return nullptr;
  const Certificate* c = found->get();
  if (c->key_kind() != family) return nullptr;
  if (std::find(c->names().begin(), c->names().end(), name) == c->names().end()) return nullptr;
  return c;
}

// publish_verified publishes what the directory load found, as publish_all would, except a
// certificate one of whose names is now held by a certificate the snapshot did not publish:
// another publisher (the manager, an on-demand issue, a reload) replaced it after the load
// read the files, and its certificate is newer than what this load read. Such a certificate
// stays in check.report (and in the rewritten snapshot: it is what the directory holds) but
// is not published (check.superseded). The store has no compare-and-swap: a publish between
// this check and publish_batch is still overwritten (a window of one batch build, not of a
// whole directory load).
void publish_verified(CertStore& store, DirectoryCheck& check, const std::unordered_set<std::string_view>& snapshot_ids,
                      const DirectoryLoadOptions& options) {
  LoadReport& report = check.report;
  const bool with_sources = report.sources.size() == report.certificates.size();
  std::vector<std::size_t> chosen;
  std::vector<std::shared_ptr<const Certificate>> batch;
  chosen.reserve(report.certificates.size());
  batch.reserve(report.certificates.size());
  auto snap = store.snapshot();
  for (std::size_t i = 0; i < report.certificates.size(); ++i) {
    const Certificate& d = *report.certificates[i];
    const Certificate* other = nullptr;
    for (const std::string& name : d.names()) {
      const Certificate* holder = exact_holder(*snap, name, d.key_kind());
      if (holder && holder->id() != d.id() && !snapshot_ids.contains(holder->id())) {
        other = holder;
        break;
      }
    }
    if (other) {
      ++check.superseded;
      if (options.logger && options.logger->enabled(LogLevel::info)) {
        options.logger->log(LogLevel::info, "tlsreload",
                            "certificate published by another writer since the snapshot; not replaced by the directory's",
                            {{"path", with_sources ? report.sources[i].paths.chain.string() : std::string()},
                             {"name", d.names().front()},
                             {"id", other->id()}});
      }
      continue;
    }
    chosen.push_back(i);
    batch.push_back(report.certificates[i]);
  }
  std::vector<Status> results = store.publish_batch(batch);
  // A refused certificate leaves the report, as publish_all does.
  std::vector<bool> refused(report.certificates.size(), false);
  bool any = false;
  for (std::size_t k = 0; k < results.size(); ++k) {
    if (results[k]) continue;
    refused[chosen[k]] = true;
    any = true;
    report.failures.push_back({{}, results[k].error()});
  }
  if (!any) return;
  std::size_t w = 0;
  for (std::size_t i = 0; i < report.certificates.size(); ++i) {
    if (refused[i]) continue;
    report.certificates[w] = std::move(report.certificates[i]);
    if (with_sources) report.sources[w] = std::move(report.sources[i]);
    ++w;
  }
  report.certificates.resize(w);
  if (with_sources) report.sources.resize(w);
}

// remove_published takes c (a snapshot certificate whose pair is gone, or replaced) out of the
// store, unless it is a default: the snapshot never sets one, so another writer made it the
// default, and CertStore::remove would clear that slot too. Returns false when it was left in
// place; counts check.removed when count and it was in the store.
bool remove_published(CertStore& store, const Certificate& c, DirectoryCheck& check, const DirectoryLoadOptions& options,
                      bool count = true) {
  auto snap = store.snapshot();
  const CertPair& def = snap->default_pair();
  if ((def.ecdsa && def.ecdsa->id() == c.id()) || (def.rsa && def.rsa->id() == c.id())) {
    if (options.logger && options.logger->enabled(LogLevel::info)) {
      options.logger->log(LogLevel::info, "tlsreload",
                          "pair gone from the directory, but its certificate is the default; left in place",
                          {{"id", c.id()}});
    }
    return false;
  }
  if (store.remove(c.id()) && count) ++check.removed;
  return true;
}

}  // namespace

Result<SnapshotContents> read_snapshot(const fs::path& path, const LoadOptions& options) {
  return read_snapshot(path, options, true);
}

Result<SnapshotContents> read_snapshot(const fs::path& path, const LoadOptions& options, bool with_sources) {
  Mapping map;
  {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return fail(Errc::io, "store snapshot " + path.string() + ": " + std::strerror(errno));
    struct Closer {
      int fd;
      ~Closer() { ::close(fd); }
    } closer{fd};
    struct stat st{};
    if (::fstat(fd, &st) != 0) return fail(Errc::io, "store snapshot " + path.string() + ": " + std::strerror(errno));
    if (!S_ISREG(st.st_mode)) return fail(bad_file(path, "not a regular file"));
    // The file holds private keys and is served without a recheck of its chains: one another
    // user wrote, or could read or change, is not ours to trust (write_snapshot makes it 0600).
    if (st.st_uid != ::geteuid()) {
      return fail(bad_file(path, "owned by uid " + std::to_string(st.st_uid) + ", not this process's (" +
                                     std::to_string(::geteuid()) + ")"));
    }
    if ((st.st_mode & 077) != 0) {
      char mode[8];
      std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
      return fail(bad_file(path, std::string("mode ") + mode + ": group or other permission bits set (expected 0600)"));
    }
    map.n = static_cast<std::size_t>(st.st_size);
    if (map.n > 0) {
      map.p = ::mmap(nullptr, map.n, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
      if (map.p == MAP_FAILED) {
        return fail(Errc::io, "store snapshot " + path.string() + ": mmap: " + std::strerror(errno));
      }
    }
  }
  std::string_view file = map.view();
  if (file.size() < sizeof kMagic || std::memcmp(file.data(), kMagic, sizeof kMagic) != 0) {
    return fail(bad_file(path, "not a store snapshot (bad magic)"));
  }
  if (file.size() < kHeaderSize) return fail(bad_file(path, "truncated header"));
  std::uint32_t version = 0, header_size = 0;
  std::uint64_t entries = 0, intermediates = 0, body_size = 0;
  std::memcpy(&version, file.data() + 8, 4);
  std::memcpy(&header_size, file.data() + 12, 4);
  std::memcpy(&entries, file.data() + 16, 8);
  std::memcpy(&intermediates, file.data() + 24, 8);
  std::memcpy(&body_size, file.data() + 32, 8);
  if (version != kSnapshotFormatVersion) {
    return fail(bad_file(path, "format version " + std::to_string(version) + ", this build reads " +
                                   std::to_string(kSnapshotFormatVersion)));
  }
  if (header_size != kHeaderSize) return fail(bad_file(path, "bad header size"));
  if (body_size != file.size() - kHeaderSize) {
    return fail(bad_file(path, "size " + std::to_string(file.size()) + " bytes, header says " +
                                   std::to_string(body_size + kHeaderSize) + " (truncated or torn write)"));
  }
  std::string_view body = file.substr(kHeaderSize);
  Digest digest{};
  if (!sha256(file.substr(0, kSummed), body, digest)) return fail(Errc::crypto, "store snapshot: SHA-256");
  if (std::memcmp(digest.data(), file.data() + kSummed, digest.size()) != 0) {
    return fail(bad_file(path, "checksum mismatch (corrupt or torn write)"));
  }
  // A valid checksum bounds the counts by the body's size (each entry takes > 100 bytes).
  if (intermediates > body.size() / 4 || entries > body.size() / 64) return fail(bad_file(path, "bad counts"));

  Reader r(body);
  std::vector<std::shared_ptr<const detail::Intermediate>> inters;
  for (std::uint64_t i = 0; i < intermediates; ++i) {
    std::string_view der = r.str();
    if (r.bad()) return fail(bad_file(path, "truncated intermediate"));
    auto inter = detail::intern_der(der);
    if (!inter) return fail(bad_file(path, "intermediate: " + inter.error().message));
    inters.push_back(std::move(*inter));
  }
  // First pass: where each entry starts (a walk over the lengths), so that the entries can
  // then be rebuilt on all cores.
  std::vector<std::size_t> starts;
  starts.reserve(entries + 1);
  {
    detail::CompactCertificate c;
    std::string_view chain_path;
    for (std::uint64_t i = 0; i < entries; ++i) {
      starts.push_back(r.pos());
      bool bad = false;
      parse_entry(r, c, chain_path, nullptr, inters, bad);
      if (bad) return fail(bad_file(path, "corrupt entry " + std::to_string(i)));
    }
    if (!r.done()) return fail(bad_file(path, "trailing bytes after the last entry"));
  }
  std::vector<std::shared_ptr<const Certificate>> certs(entries);
  std::vector<PairSource> sources(with_sources ? entries : 0);
  // The sources' paths, as views into the mapped file: made into paths below, on this thread
  // (made on the rebuilding threads, their ~1 KiB per entry sat between the certificates in the
  // threads' arenas and, once the verification freed them, left those pages partly empty).
  std::vector<std::pair<std::string_view, std::string_view>> source_paths(with_sources ? entries : 0);
  std::vector<std::optional<LoadFailure>> refused(entries);
  on_threads(entries, [&](std::size_t begin, std::size_t end) {
    detail::CompactCertificate c;
    std::string_view chain_path;
    for (std::size_t i = begin; i < end; ++i) {
      Reader er(body, starts[i]);
      bool bad = false;
      parse_entry(er, c, chain_path, with_sources ? &sources[i] : nullptr, inters, bad,
                  with_sources ? &source_paths[i].second : nullptr);
      if (with_sources) source_paths[i].first = chain_path;
      auto cert = detail::from_compact(c, options);
      if (!cert) {
        Error e = cert.error();
        e.message = std::string(chain_path) + " (from the store snapshot): " + e.message;
        refused[i] = LoadFailure{fs::path(std::string(chain_path)), std::move(e)};
        continue;
      }
      certs[i] = std::move(*cert);
    }
  });
  SnapshotContents out;
  out.certificates.reserve(entries);
  if (with_sources) out.sources.reserve(entries);
  // Deferred: the paths copied as they are in the file into one buffer (a copy of ~120 bytes
  // per entry), made into paths by make_source_paths() when they are needed.
  const bool deferred = with_sources && options.defer_source_paths;
  if (deferred) {
    std::size_t bytes = 0;
    for (const auto& [chain, key] : source_paths) bytes += chain.size() + key.size();
    out.source_paths.reserve(entries, bytes);
  }
  for (std::size_t i = 0; i < entries; ++i) {
    if (refused[i]) {
      out.refused.push_back(std::move(*refused[i]));
      continue;
    }
    out.certificates.push_back(std::move(certs[i]));
    if (with_sources) {
      if (deferred) {
        out.source_paths.add(source_paths[i].first, source_paths[i].second);
      } else {
        sources[i].paths = CertKeyPaths{std::string(source_paths[i].first), std::string(source_paths[i].second)};
      }
      out.sources.push_back(std::move(sources[i]));
    }
  }
  return out;
}

SnapshotStart publish_snapshot(CertStore& store, const DirectoryLoadOptions& options) {
  SnapshotStart start;
  if (options.snapshot_path.empty()) return start;
  struct stat st{};
  if (::stat(options.snapshot_path.c_str(), &st) != 0 && errno == ENOENT) return start;  // first start
  // With the sources: the verification matches the snapshot's certificates to their pairs by path.
  auto contents = read_snapshot(options.snapshot_path, options.load, true);
  if (!contents) {
    start.ignored = contents.error();
    warn(options, "store snapshot ignored; loading the certificate directory instead", options.snapshot_path,
         contents.error().message);
    return start;
  }
  start.used = true;
  start.refused = std::move(contents->refused);
  std::vector<Status> results = store.publish_batch(contents->certificates);
  // Reserved: grown, the 100,000 PairSources (two paths each) went through ~17 reallocations
  // (perf of `autotls serve` from a snapshot: 2.7 % of the start's samples).
  start.certificates.reserve(results.size());
  start.sources.reserve(results.size());
  std::vector<bool> keep(results.size());
  for (std::size_t i = 0; i < results.size(); ++i) {
    if (results[i]) {
      ++start.published;
      keep[i] = true;
      start.certificates.push_back(std::move(contents->certificates[i]));
      start.sources.push_back(std::move(contents->sources[i]));
    } else {
      start.refused.push_back({{}, results[i].error()});
    }
  }
  if (start.published != results.size()) contents->source_paths.keep_only(keep);
  start.source_paths = std::move(contents->source_paths);
  return start;
}

Result<DirectoryCheck> check_directory(CertStore& store, const fs::path& dir, const SnapshotStart& start,
                                       const DirectoryLoadOptions& options) {
  LoadOptions load = options.load;
  load.record_sources = true;  // compared with the snapshot's and written to the new one
  auto report = load_directory(dir, load);
  if (!report) return fail(report.error());
  DirectoryCheck check;
  check.report = std::move(*report);
  std::unordered_set<std::string_view> snapshot_ids;
  snapshot_ids.reserve(start.certificates.size());
  for (const auto& c : start.certificates) snapshot_ids.insert(c->id());
  publish_verified(store, check, snapshot_ids, options);
  finish_check(store, check, start, options);
  return check;
}

void finish_check(CertStore& store, DirectoryCheck& check, const SnapshotStart& start,
                  const DirectoryLoadOptions& options) {
  // Changed and new pairs, by the chain path the snapshot recorded (for the log).
  {
    std::unordered_map<std::string_view, std::string_view> snapshot_by_chain;
    snapshot_by_chain.reserve(start.sources.size());
    for (std::size_t i = 0; i < start.sources.size() && i < start.certificates.size(); ++i) {
      if (!start.sources[i].paths.chain.empty()) {
        snapshot_by_chain.emplace(start.sources[i].paths.chain.native(), start.certificates[i]->id());
      }
    }
    if (check.report.sources.size() == check.report.certificates.size()) {
      for (std::size_t i = 0; i < check.report.sources.size(); ++i) {
        auto it = snapshot_by_chain.find(check.report.sources[i].paths.chain.native());
        if (it == snapshot_by_chain.end()) {
          ++check.added;
          check.fresh.push_back(check.report.certificates[i]);
          check.fresh_chains.push_back(check.report.sources[i].paths.chain.native());
        } else if (it->second != check.report.certificates[i]->id()) {
          ++check.changed;
          check.changed_paths.push_back(check.report.sources[i].paths.chain);
          check.fresh.push_back(check.report.certificates[i]);
          check.fresh_chains.push_back(check.report.sources[i].paths.chain.native());
        }
      }
    }
  }
  // What the snapshot served and the directory did not load. Only a pair whose files are gone
  // is removed: a pair that exists but failed to load now (certbot switching live/ between a
  // new chain and an old key, EMFILE, a briefly unreadable file) keeps its snapshot
  // certificate, which nothing else would republish. A changed pair's old certificate has
  // left the store already when its replacement took all its names; remove() then finds
  // nothing, which is fine.
  std::unordered_set<std::string_view> loaded_ids, loaded_chains;
  loaded_ids.reserve(check.report.certificates.size());
  loaded_chains.reserve(check.report.sources.size());
  for (const auto& c : check.report.certificates) loaded_ids.insert(c->id());
  for (const auto& src : check.report.sources) loaded_chains.insert(src.paths.chain.native());
  std::unordered_map<std::string_view, const LoadFailure*> failures;
  for (const auto& f : check.report.failures) {
    if (!f.path.empty()) failures.emplace(f.path.native(), &f);
  }
  std::vector<std::shared_ptr<const Certificate>> keep;
  std::vector<PairSource> keep_sources;
  static const PairSource kNoSource;
  for (std::size_t i = 0; i < start.certificates.size(); ++i) {
    const auto& c = start.certificates[i];
    const PairSource& src = i < start.sources.size() ? start.sources[i] : kNoSource;
    if (loaded_ids.contains(c->id())) continue;
    if (src.paths.chain.empty()) {  // no source recorded: the directory load is all we know
      if (remove_published(store, *c, check, options)) check.gone.push_back(c);
      continue;
    }
    if (loaded_chains.contains(src.paths.chain.native())) {
      // Replaced by its pair's load. Usually it left the store when its replacement took all
      // its names (or the watcher dropped it); a name the new certificate no longer has would
      // otherwise stay with it.
      if (remove_published(store, *c, check, options, false)) check.replaced.push_back(c);
      continue;
    }
    if (pair_gone(src.paths)) {
      if (remove_published(store, *c, check, options)) check.gone.push_back(c);
      continue;
    }
    ++check.kept;
    keep.push_back(c);
    keep_sources.push_back(src);
    const LoadFailure* f = nullptr;
    for (const fs::path* p : {&src.paths.chain, &src.paths.key}) {
      if (auto it = failures.find(p->native()); it != failures.end()) f = it->second;
      if (f) break;
    }
    warn(options, "certificate pair failed to load; still serving it from the store snapshot",
         f ? f->path : src.paths.chain, f ? f->error.message : std::string("not loaded"));
  }
  if (!options.snapshot_path.empty()) {
    if (check.kept == 0) {
      check.snapshot_written = write_snapshot(options.snapshot_path, check.report.certificates, check.report.sources);
    } else {
      // The kept ones first: a start publishes in file order, so a name a kept certificate
      // shares with a loaded one (moved to another pair) goes to the loaded, newer one.
      std::vector<std::shared_ptr<const Certificate>> certs = std::move(keep);
      std::vector<PairSource> sources = std::move(keep_sources);
      certs.insert(certs.end(), check.report.certificates.begin(), check.report.certificates.end());
      sources.insert(sources.end(), check.report.sources.begin(), check.report.sources.end());
      // A report without sources would not match the kept ones: write no identities then.
      if (check.report.sources.size() != check.report.certificates.size()) sources.clear();
      check.snapshot_written = write_snapshot(options.snapshot_path, certs, sources);
    }
    if (!check.snapshot_written) {
      warn(options, "store snapshot not written", options.snapshot_path, check.snapshot_written.error().message);
    }
  }
}

SnapshotLoader::SnapshotLoader(std::shared_ptr<CertStore> store, fs::path dir, DirectoryLoadOptions options)
    : store_(std::move(store)), dir_(std::move(dir)), options_(std::move(options)) {
  start_ = publish_snapshot(*store_, options_);
  if (start_.used) {
    thread_ = std::thread([this] { result_ = check_directory(*store_, dir_, start_, options_); });
    return;
  }
  LoadOptions load = options_.load;
  load.record_sources = !options_.snapshot_path.empty();  // the snapshot written below records them
  initial_ = load_directory(dir_, load);
  if (!*initial_) return;
  publish_all(*store_, **initial_);
  if (options_.snapshot_path.empty()) return;
  thread_ = std::thread([this] {
    const LoadReport& report = **initial_;
    DirectoryCheck check;
    check.snapshot_written = write_snapshot(options_.snapshot_path, report.certificates, report.sources);
    if (!check.snapshot_written) {
      warn(options_, "store snapshot not written", options_.snapshot_path, check.snapshot_written.error().message);
    }
    result_ = std::move(check);
  });
}

SnapshotLoader::~SnapshotLoader() {
  if (thread_.joinable()) thread_.join();
}

Result<DirectoryCheck> SnapshotLoader::wait() {
  if (thread_.joinable()) thread_.join();
  // A copy: a second call returns the same result, not a moved-from one.
  if (result_) return *result_;
  if (initial_ && !*initial_) return fail(initial_->error());
  return DirectoryCheck{};
}

}  // namespace autotls::tlsreload
