#include "tlsreload/storage.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <system_error>

#include <nlohmann/json.hpp>
#include <openssl/rand.h>

namespace autotls::tlsreload {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// The first key component reserved for FileStorage's lock files.
constexpr std::string_view kLockDir = "locks";
// The first key component reserved for FileStorage's versions of put_set prefixes.
constexpr std::string_view kArchiveDir = "archive";

Error errno_error(std::string_view op, const fs::path& path, int err = errno) {
  return Error(Errc::io, std::string(op) + " " + path.string() + ": " + std::strerror(err));
}

bool valid_component(std::string_view c) {
  if (c.empty() || c == "." || c == ".." || c.front() == '.') return false;
  return std::all_of(c.begin(), c.end(), [](char ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           ch == '.' || ch == '_' || ch == '-' || ch == '@' || ch == '+' || ch == ':' || ch == '=';
  });
}

Status check_key(std::string_view key) {
  if (!valid_storage_key(key)) {
    return fail(Errc::invalid_input, "storage: invalid key \"" + std::string(key) + "\"");
  }
  return {};
}

// fsync_dir makes a rename or create in dir durable: POSIX does not promise the directory
// entry reaches the disk with the file's own fsync.
Status fsync_dir(const fs::path& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return fail(errno_error("open directory", dir));
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0) return fail(errno_error("fsync directory", dir, err));
  return {};
}

// make_dirs creates root/rel and each missing parent with mode 0700, fsync'ing the parent of
// each directory it creates so the new entry survives a crash (unless sync is false: the
// caller then makes them durable itself, before anything depends on them).
Status make_dirs(const fs::path& root, const fs::path& rel, bool sync = true) {
  fs::path cur = root;
  std::vector<fs::path> todo{root};
  for (const auto& part : rel) todo.push_back(cur /= part);
  fs::path parent;
  for (const auto& dir : todo) {
    if (::mkdir(dir.c_str(), 0700) == 0) {
      if (sync && !parent.empty()) {
        if (auto st = fsync_dir(parent); !st) return st;
      }
    } else if (errno != EEXIST) {
      return fail(errno_error("mkdir", dir));
    }
    parent = dir;
  }
  return {};
}

Status write_all(int fd, std::string_view data, const fs::path& path) {
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail(errno_error("write", path));
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
  return {};
}

// write_temp writes data to a new, fsync'ed (unless sync is false) temporary file in dir and
// returns its path. The leading '.' keeps it out of list() and out of the key space.
Result<fs::path> write_temp(const fs::path& dir, std::string_view data, mode_t mode, bool sync = true) {
  std::string tmpl = (dir / ".tmp-XXXXXX").string();
  int fd = ::mkostemp(tmpl.data(), O_CLOEXEC);  // created 0600: a secret is never exposed
  if (fd < 0) return fail(errno_error("create temporary file in", dir));
  fs::path tmp(tmpl);
  Status st = write_all(fd, data, tmp);
  if (st && ::fchmod(fd, mode) != 0) st = fail(errno_error("chmod", tmp));
  if (st && sync && ::fsync(fd) != 0) st = fail(errno_error("fsync", tmp));
  if (::close(fd) != 0 && st) st = fail(errno_error("close", tmp));
  if (!st) {
    ::unlink(tmp.c_str());
    return fail(st.error());
  }
  return tmp;
}

// OpenFiles holds the descriptors of the files of a version being written, so that their data
// is made durable together after the last one is written, not one by one.
class OpenFiles {
 public:
  OpenFiles() = default;
  OpenFiles(const OpenFiles&) = delete;
  OpenFiles& operator=(const OpenFiles&) = delete;
  ~OpenFiles() { close_all(); }

  void add(int fd, fs::path path) { files_.push_back({fd, std::move(path)}); }

  // sync_each fsyncs every file. Writeback of all of them is started first
  // (sync_file_range), so their block allocations land in one journal commit on ext4 and the
  // later fsyncs mostly find their change committed already.
  Status sync_each() {
    for (const auto& f : files_) ::sync_file_range(f.fd, 0, 0, SYNC_FILE_RANGE_WRITE);  // a hint only
    for (const auto& f : files_) {
      if (::fsync(f.fd) != 0) return fail(errno_error("fsync", f.path));
    }
    return {};
  }

  // syncfs makes every file, and every directory change made so far on the same filesystem
  // (dir's), durable with one syncfs(2): one journal commit instead of one per file and per
  // directory. Linux (5.8+) reports through syncfs the filesystem's writeback errors since the
  // descriptor passed was opened, so it gets the first file's descriptor, opened before any of
  // the data was written: an error in background writeback between the writes and this call is
  // then reported, never a silent success.
  Status syncfs(const fs::path& dir) {
    const bool own = files_.empty();
    int fd = own ? ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC) : files_.front().fd;
    if (fd < 0) return fail(errno_error("open directory", dir));
    int rc = ::syncfs(fd);
    int err = errno;
    if (own) ::close(fd);
    if (rc != 0) return fail(errno_error("syncfs of the filesystem of", dir, err));
    return {};
  }

  void close_all() {
    for (const auto& f : files_) ::close(f.fd);
    files_.clear();
  }

 private:
  struct File {
    int fd;
    fs::path path;
  };
  std::vector<File> files_;
};

// write_new creates path (which must not exist; it is in a staging directory nobody reads),
// writes data, sets mode and keeps the descriptor open in files for the later sync. The file
// is created 0600, so a secret is never readable by others, even for a moment.
Status write_new(const fs::path& path, std::string_view data, mode_t mode, OpenFiles& files) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) return fail(errno_error("create", path));
  Status st = write_all(fd, data, path);
  if (st && ::fchmod(fd, mode) != 0) st = fail(errno_error("chmod", path));
  if (!st) {
    ::close(fd);
    return st;
  }
  files.add(fd, path);
  return {};
}

Result<std::optional<std::string>> read_file(const fs::path& path, struct stat* info = nullptr) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    if (errno == ENOENT) return std::optional<std::string>();
    return fail(errno_error("open", path));
  }
  struct stat sb {};
  if (::fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
    ::close(fd);
    return fail(Errc::io, "read " + path.string() + ": not a regular file");
  }
  if (info) *info = sb;
  std::string out;
  char buf[16384];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      return fail(errno_error("read", path, err));
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return std::optional<std::string>(std::move(out));
}

std::string random_hex(size_t bytes) {
  std::vector<unsigned char> b(bytes);
  if (RAND_bytes(b.data(), static_cast<int>(b.size())) != 1) {
    // Uniqueness, not secrecy, is what matters here; fall back to address and time.
    auto v = std::chrono::steady_clock::now().time_since_epoch().count() ^ reinterpret_cast<intptr_t>(&b);
    std::memcpy(b.data(), &v, std::min(sizeof v, b.size()));
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : b) {
    out += kHex[c >> 4];
    out += kHex[c & 15];
  }
  return out;
}

std::string new_owner_id() {
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  return std::string(host) + ":" + std::to_string(::getpid()) + ":" + random_hex(8);
}

int64_t unix_seconds(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::seconds>(t.time_since_epoch()).count();
}

struct LockFile {
  std::string owner;
  int64_t expires = 0;  // unix seconds
};

std::optional<LockFile> parse_lock(const std::string& text) {
  auto j = json::parse(text, nullptr, false);
  if (!j.is_object()) return std::nullopt;
  auto o = j.find("owner");
  auto e = j.find("expires");
  if (o == j.end() || !o->is_string() || e == j.end() || !e->is_number_integer()) return std::nullopt;
  return LockFile{o->get<std::string>(), e->get<int64_t>()};
}

std::string lock_json(const std::string& owner, Clock::time_point expires) {
  return json{{"owner", owner}, {"expires", unix_seconds(expires)}}.dump() + "\n";
}

}  // namespace

bool valid_storage_key(std::string_view key) {
  if (key.empty() || key.size() > 1024) return false;
  size_t start = 0;
  for (;;) {
    size_t slash = key.find('/', start);
    std::string_view part = key.substr(start, slash == std::string_view::npos ? std::string_view::npos : slash - start);
    if (!valid_component(part)) return false;
    if (slash == std::string_view::npos) return true;
    start = slash + 1;
  }
}

std::string storage_name(std::string_view name) {
  std::string out;
  if (name.starts_with("*.")) {
    out = "_wildcard_.";
    name.remove_prefix(2);
  }
  for (char c : name) out += static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
  return out;
}

std::string ca_storage_name(std::string_view url) {
  if (auto p = url.find("://"); p != std::string_view::npos) url.remove_prefix(p + 3);
  while (url.ends_with('/')) url.remove_suffix(1);
  std::string out;
  for (char c : url) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '-';
    out += ok ? c : (c == '/' ? '-' : '_');
  }
  if (out.empty() || out.front() == '.') out.insert(out.begin(), '_');
  return out;
}

Result<LockToken> Storage::lock(std::string_view name, std::chrono::seconds ttl,
                                Clock::time_point deadline, Clock& clock) {
  for (;;) {
    auto got = try_lock(name, ttl);
    if (!got) return fail(got.error());
    if (*got) return std::move(**got);
    auto now = clock.now();
    if (now >= deadline) {
      return fail(Errc::timeout, "storage lock " + std::string(name) + ": still held by another owner");
    }
    // Polling: a lock file cannot be waited on portably (nor can most distributed stores).
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now);
    if (!clock.sleep_for(std::min(left, std::chrono::milliseconds(200)))) {
      return fail(Errc::cancelled, "storage lock " + std::string(name) + ": cancelled");
    }
  }
}

Status write_file_atomic(const fs::path& path, std::string_view data, unsigned mode) {
  fs::path dir = path.parent_path().empty() ? fs::path(".") : path.parent_path();
  auto tmp = write_temp(dir, data, static_cast<mode_t>(mode));
  if (!tmp) return fail(tmp.error());
  if (::rename(tmp->c_str(), path.c_str()) != 0) {
    Error e = errno_error("rename to", path);
    ::unlink(tmp->c_str());
    return fail(e);
  }
  return fsync_dir(dir);
}

FileStorage::FileStorage(std::filesystem::path root, Clock* clock)
    : root_(std::move(root)), clock_(clock ? clock : &system_clock()) {}

Result<std::optional<std::string>> FileStorage::get(std::string_view key) {
  if (auto st = check_key(key); !st) return fail(st.error());
  return read_file(root_ / std::string(key));
}

Status FileStorage::put(std::string_view key, std::string_view value, bool secret) {
  if (auto st = check_key(key); !st) return st;
  fs::path rel(std::string{key});
  if (*rel.begin() == kLockDir || *rel.begin() == kArchiveDir) {
    return fail(Errc::invalid_input, "storage: key \"" + std::string(key) + "\" is in a reserved directory (" +
                                         std::string(kLockDir) + "/, " + std::string(kArchiveDir) + "/)");
  }
  fs::path dir = (root_ / rel).parent_path();
  if (auto st = make_dirs(root_, rel.parent_path()); !st) return st;
  auto tmp = write_temp(dir, value, secret ? 0600 : 0644);
  if (!tmp) return fail(tmp.error());
  fs::path target = root_ / rel;
  if (::rename(tmp->c_str(), target.c_str()) != 0) {
    Error e = errno_error("rename to", target);
    ::unlink(tmp->c_str());
    return fail(e);
  }
  return fsync_dir(dir);
}

Status Storage::put_set(std::string_view prefix, const std::vector<StorageFile>& files) {
  std::string p(prefix);
  while (p.ends_with('/')) p.pop_back();
  for (const auto& f : files) {
    if (auto st = put(p + "/" + f.name, f.value, f.secret); !st) return st;
  }
  return {};
}

namespace {

// version_numbers lists the numeric entries of an archive directory, ascending.
std::vector<long> version_numbers(const fs::path& dir) {
  std::vector<long> out;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::string n = it->path().filename().string();
    if (n.empty() || n.size() > 15 || !std::all_of(n.begin(), n.end(), [](char c) { return c >= '0' && c <= '9'; })) {
      continue;
    }
    out.push_back(std::stol(n));
  }
  std::sort(out.begin(), out.end());
  return out;
}

// archive_rel is where put_set keeps the versions of prefix rel: live/<name> in
// archive/<name>/ (certbot's names), other prefixes in archive/<prefix>/.
fs::path archive_rel(const fs::path& rel) {
  fs::path arel = fs::path(std::string(kArchiveDir));
  auto it = rel.begin();
  if (*it == "live" && std::next(it) != rel.end()) ++it;
  for (; it != rel.end(); ++it) arel /= *it;
  return arel;
}

// set_prefix is prefix without trailing slashes, checked as a key outside the reserved
// directories (locks/, archive/): what put_set and remove_set accept.
Result<std::string> set_prefix(std::string_view prefix_in) {
  std::string prefix(prefix_in);
  while (prefix.ends_with('/')) prefix.pop_back();
  if (auto st = check_key(prefix); !st) return fail(st.error());
  fs::path rel(prefix);
  if (*rel.begin() == kLockDir || *rel.begin() == kArchiveDir) {
    return fail(Errc::invalid_input, "storage: prefix \"" + prefix + "\" is in a reserved directory");
  }
  return prefix;
}

}  // namespace

Status FileStorage::put_set(std::string_view prefix_in, const std::vector<StorageFile>& files) {
  auto checked = set_prefix(prefix_in);
  if (!checked) return fail(checked.error());
  const std::string prefix = std::move(*checked);
  const fs::path rel(prefix);
  if (files.empty()) return fail(Errc::invalid_input, "storage: put_set of " + prefix + " with no files");
  for (const auto& f : files) {
    if (!valid_component(f.name)) return fail(Errc::invalid_input, "storage: invalid file name \"" + f.name + "\"");
  }
  const fs::path arel = archive_rel(rel);
  // New directories are made durable by the one sync of step 2, not one fsync each: nothing
  // points into them before the switch of step 3.
  const bool per_file = sync_ == Sync::per_file;
  if (auto st = make_dirs(root_, arel, per_file); !st) return st;
  if (auto st = make_dirs(root_, rel.parent_path(), per_file); !st) return st;
  const fs::path archive = root_ / arel;
  const fs::path link = root_ / rel;
  const fs::path parent = link.parent_path();

  // 1. The new version under a hidden name: every file written straight into a fresh staging
  // directory that no reader looks at, so no temporary name and rename per file.
  std::string tmpl = (archive / ".tmp-XXXXXX").string();
  if (::mkdtemp(tmpl.data()) == nullptr) return fail(errno_error("create temporary directory in", archive));
  fs::path staging(tmpl);
  OpenFiles written;
  auto cleanup = [&] {
    written.close_all();
    std::error_code ec;
    fs::remove_all(staging, ec);
  };
  for (const auto& f : files) {
    if (auto st = write_new(staging / f.name, f.value, f.secret ? 0600 : 0644, written); !st) {
      cleanup();
      return st;
    }
  }
  // Other files of the current version (the CLI's renewal.json, say) are carried over with
  // their mode. A put() into the current version racing with this switch can be lost; the
  // manager's own puts are serialized with its put_set.
  {
    std::error_code ec;
    for (fs::directory_iterator d(link, ec), end; !ec && d != end; d.increment(ec)) {
      std::string name = d->path().filename().string();
      if (name.starts_with('.') || !valid_component(name)) continue;
      if (std::any_of(files.begin(), files.end(), [&](const StorageFile& f) { return f.name == name; })) continue;
      struct stat info {};
      auto data = read_file(d->path(), &info);
      if (!data || !*data) continue;  // not a regular file, or gone meanwhile
      if (auto st = write_new(staging / name, **data, info.st_mode & 0777, written); !st) {
        cleanup();
        return st;
      }
    }
  }

  // 2. Named as the next version number (rename fails if another writer took it: try the
  // next), then made durable, files and directory entries, before anything points at it.
  fs::path version;
  long n = 0;
  {
    auto have = version_numbers(archive);
    n = have.empty() ? 1 : have.back() + 1;
  }
  for (int attempt = 0;; ++attempt, ++n) {
    version = archive / std::to_string(n);
    if (::rename(staging.c_str(), version.c_str()) == 0) break;
    if ((errno != EEXIST && errno != ENOTEMPTY) || attempt > 100) {
      Error e = errno_error("rename to", version);
      cleanup();
      return fail(e);
    }
  }
  auto remove_version = [&] {
    written.close_all();
    std::error_code ec;
    fs::remove_all(version, ec);
  };
  if (per_file) {
    // Writeback of every file is started before the first fsync, so that one journal commit
    // carries all of them; then each file, the version directory and archive/<name>/.
    if (auto st = written.sync_each(); !st) {
      remove_version();
      return st;
    }
    for (const fs::path& dir : {version, archive}) {
      if (auto st = fsync_dir(dir); !st) {
        remove_version();
        return st;
      }
    }
  } else if (auto st = written.syncfs(version); !st) {
    remove_version();
    return st;
  }
  written.close_all();

  // 3. The switch: a new symlink renamed over the old one (or exchanged with an old-layout
  // directory). Readers resolve the path once per open, so each sees one version.
  fs::path target = version.lexically_relative(parent);
  std::string link_tmp = (parent / (".tmp-link-" + random_hex(8))).string();
  if (::symlink(target.c_str(), link_tmp.c_str()) != 0) return fail(errno_error("symlink", link_tmp));
  struct stat sb {};
  bool old_dir = ::lstat(link.c_str(), &sb) == 0 && S_ISDIR(sb.st_mode);
  int rc = old_dir ? ::renameat2(AT_FDCWD, link_tmp.c_str(), AT_FDCWD, link.c_str(), RENAME_EXCHANGE)
                   : ::rename(link_tmp.c_str(), link.c_str());
  if (rc != 0) {
    Error e = errno_error(old_dir ? "exchange with" : "rename to", link);
    ::unlink(link_tmp.c_str());
    return fail(e);
  }
  if (auto st = fsync_dir(parent); !st) return st;
  if (old_dir) {
    // link_tmp now names the old plain directory: its files are superseded.
    std::error_code ec;
    fs::remove_all(link_tmp, ec);
  }

  // 4. Prune: keep the newest versions (a reader that opened an older file keeps reading it).
  auto have = version_numbers(archive);
  for (size_t i = 0; i + kKeepVersions < have.size(); ++i) {
    if (have[i] == n) continue;
    std::error_code ec;
    fs::remove_all(archive / std::to_string(have[i]), ec);
  }
  // Staging directories and symlinks left by a crash (never read: hidden names), once surely
  // abandoned.
  for (const fs::path& where : {archive, parent}) {
    std::error_code ec;
    for (fs::directory_iterator d(where, ec), end; !ec && d != end; d.increment(ec)) {
      struct stat ds {};
      if (d->path().filename().string().starts_with(".tmp-") && ::lstat(d->path().c_str(), &ds) == 0 &&
          ds.st_mtime + 600 < ::time(nullptr)) {
        std::error_code rec;
        fs::remove_all(d->path(), rec);
      }
    }
  }
  return {};
}

Result<std::vector<std::string>> FileStorage::list(std::string_view prefix) {
  while (prefix.ends_with('/')) prefix.remove_suffix(1);
  if (!prefix.empty()) {
    if (auto st = check_key(prefix); !st) return fail(st.error());
  }
  fs::path base = prefix.empty() ? root_ : root_ / std::string(prefix);
  std::vector<std::string> out;
  std::error_code ec;
  struct stat sb {};
  if (::lstat(base.c_str(), &sb) != 0) {
    if (errno == ENOENT) return out;
    return fail(errno_error("stat", base));
  }
  if (S_ISREG(sb.st_mode)) {
    out.emplace_back(prefix);
    return out;
  }
  // Followed: live/<name> is a symlink to its current version (put_set).
  fs::recursive_directory_iterator it(base, fs::directory_options::follow_directory_symlink, ec), end;
  if (ec) return fail(Errc::io, "list " + base.string() + ": " + ec.message());
  for (; it != end; it.increment(ec)) {
    if (ec) return fail(Errc::io, "list " + base.string() + ": " + ec.message());
    const auto& entry = *it;
    std::string fname = entry.path().filename().string();
    fs::path rel = entry.path().lexically_relative(root_);
    bool is_lock_dir = rel == fs::path(kLockDir) || rel == fs::path(kArchiveDir);
    if (fname.starts_with('.') || is_lock_dir) {
      if (entry.is_directory(ec)) it.disable_recursion_pending();
      continue;
    }
    if (entry.is_regular_file(ec)) out.push_back(rel.generic_string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

Status FileStorage::remove(std::string_view key) {
  if (auto st = check_key(key); !st) return st;
  fs::path path = root_ / std::string(key);
  if (::unlink(path.c_str()) != 0) {
    if (errno == ENOENT) return {};
    return fail(errno_error("unlink", path));
  }
  return fsync_dir(path.parent_path());
}

Status Storage::remove_set(std::string_view prefix) {
  auto keys = list(prefix);
  if (!keys) return fail(keys.error());
  for (const auto& k : *keys) {
    if (auto st = remove(k); !st) return st;
  }
  return {};
}

Status FileStorage::remove_set(std::string_view prefix_in) {
  auto checked = set_prefix(prefix_in);
  if (!checked) return fail(checked.error());
  const std::string prefix = std::move(*checked);
  const fs::path rel(prefix);
  const fs::path link = root_ / rel;
  const fs::path parent = link.parent_path();
  struct stat sb {};
  bool exists = true;
  if (::lstat(link.c_str(), &sb) != 0) {
    if (errno != ENOENT) return fail(errno_error("stat", link));
    exists = false;
  }
  if (exists && S_ISLNK(sb.st_mode)) {
    // 1. The set disappears for readers at once: the symlink goes, durably.
    if (::unlink(link.c_str()) != 0 && errno != ENOENT) return fail(errno_error("unlink", link));
    if (auto st = fsync_dir(parent); !st) return st;
  } else if (exists && S_ISDIR(sb.st_mode)) {
    // An old-layout plain directory: out of sight under a hidden name first (put_set's crash
    // sweep deletes a leftover one later), then deleted.
    fs::path hidden = parent / (".tmp-removed-" + random_hex(8));
    if (::rename(link.c_str(), hidden.c_str()) != 0) return fail(errno_error("rename", link));
    if (auto st = fsync_dir(parent); !st) return st;
    std::error_code ec;
    fs::remove_all(hidden, ec);
    if (ec) return fail(Errc::io, "remove " + hidden.string() + ": " + ec.message());
  } else if (exists) {
    return fail(Errc::invalid_input, "storage: " + prefix + " is not a set (a directory or its symlink)");
  }
  // 2. Its versions, with every kept key: nothing points at them any more.
  const fs::path archive = root_ / archive_rel(rel);
  std::error_code ec;
  fs::remove_all(archive, ec);
  if (ec) return fail(Errc::io, "remove " + archive.string() + ": " + ec.message());
  if (fs::exists(archive.parent_path(), ec)) return fsync_dir(archive.parent_path());
  return {};
}

Result<std::string> FileStorage::generation(std::string_view key) {
  if (auto st = check_key(key); !st) return fail(st.error());
  fs::path path = root_ / std::string(key);
  struct stat sb {};
  if (::stat(path.c_str(), &sb) != 0) {
    if (errno == ENOENT) return std::string();
    return fail(errno_error("stat", path));
  }
  // put() renames a new file over the key, so the inode alone changes with every put; size
  // and mtime also catch an outside editor writing in place.
  return std::to_string(sb.st_ino) + "-" + std::to_string(sb.st_size) + "-" +
         std::to_string(sb.st_mtim.tv_sec) + "." + std::to_string(sb.st_mtim.tv_nsec);
}

fs::path FileStorage::lock_path(std::string_view name) const {
  std::string flat(name);
  std::replace(flat.begin(), flat.end(), '/', '%');
  return root_ / std::string(kLockDir) / (flat + ".lock");
}

// try_lock creates the lock file exclusively. The content is written to a temporary file first
// and link()ed into place: link, like open(O_CREAT|O_EXCL), fails with EEXIST when the lock
// exists, and unlike it never shows other processes an empty, half-written lock.
//
// A stale lock (expiry passed) is broken under a second, short-lived lock, "<lock>.break",
// created with O_EXCL: only one process at a time may decide a lock is stale and delete it, so
// two processes that both saw it stale cannot delete each other's fresh replacement. The
// breaker then competes for the lock with link() like everyone else: exactly one wins.
Result<std::optional<LockToken>> FileStorage::try_lock(std::string_view name, std::chrono::seconds ttl) {
  if (auto st = check_key(name); !st) return fail(st.error());
  if (auto st = make_dirs(root_, fs::path(std::string(kLockDir))); !st) return fail(st.error());
  fs::path path = lock_path(name);
  fs::path dir = path.parent_path();
  fs::path breaker = path;
  breaker += ".break";
  LockToken token{std::string(name), new_owner_id()};

  for (int attempt = 0; attempt < 4; ++attempt) {
    // Neither the content nor the directory is fsync'd: other processes see the link at once,
    // and a lock lost in a power failure belonged to a process that is gone too. One that
    // survives it empty or cut short does not parse, and an unreadable lock counts as stale.
    auto tmp = write_temp(dir, lock_json(token.owner, clock_->now() + ttl), 0644, /*sync=*/false);
    if (!tmp) return fail(tmp.error());
    int rc = ::link(tmp->c_str(), path.c_str());
    int err = errno;
    ::unlink(tmp->c_str());
    if (rc == 0) {
      return std::optional<LockToken>(std::move(token));
    }
    if (err != EEXIST) return fail(errno_error("link", path, err));

    auto text = read_file(path);
    if (!text) return fail(text.error());
    if (!*text) continue;  // released in between: try again
    auto info = parse_lock(**text);
    // An unreadable lock cannot belong to a live holder (it is link()ed whole): stale.
    if (info && info->expires > unix_seconds(clock_->now())) return std::optional<LockToken>();

    int bfd = ::open(breaker.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (bfd < 0) {
      if (errno != EEXIST) return fail(errno_error("create", breaker));
      // Someone is breaking it now (for microseconds). A breaker file older than that was left
      // by a crash: remove it so the lock does not stay stuck. File times are real time.
      struct stat sb {};
      if (::stat(breaker.c_str(), &sb) == 0 && sb.st_mtime + 30 < ::time(nullptr)) {
        ::unlink(breaker.c_str());
        continue;
      }
      return std::optional<LockToken>();
    }
    ::close(bfd);
    // Under the breaker, look again: the lock may have been released, or broken and taken by
    // someone who held the breaker before us.
    auto again = read_file(path);
    bool still_stale = false;
    if (again && *again) {
      auto now_info = parse_lock(**again);
      still_stale = !now_info || now_info->expires <= unix_seconds(clock_->now());
    }
    if (still_stale && ::unlink(path.c_str()) != 0 && errno != ENOENT) {
      Error e = errno_error("unlink stale lock", path);
      ::unlink(breaker.c_str());
      return fail(e);
    }
    ::unlink(breaker.c_str());
    if (!again) return fail(again.error());
    if (*again && !still_stale) return std::optional<LockToken>();
  }
  return std::optional<LockToken>();
}

Status FileStorage::refresh(const LockToken& token, std::chrono::seconds ttl) {
  if (auto st = check_key(token.name); !st) return st;
  fs::path path = lock_path(token.name);
  auto text = read_file(path);
  if (!text) return fail(text.error());
  auto info = *text ? parse_lock(**text) : std::nullopt;
  if (!info || info->owner != token.owner) {
    return fail(Errc::invalid_input, "storage lock " + token.name + ": no longer held by this owner");
  }
  auto tmp = write_temp(path.parent_path(), lock_json(token.owner, clock_->now() + ttl), 0644);
  if (!tmp) return fail(tmp.error());
  if (::rename(tmp->c_str(), path.c_str()) != 0) {
    Error e = errno_error("rename to", path);
    ::unlink(tmp->c_str());
    return fail(e);
  }
  return fsync_dir(path.parent_path());
}

Status FileStorage::unlock(const LockToken& token) {
  if (auto st = check_key(token.name); !st) return st;
  fs::path path = lock_path(token.name);
  auto text = read_file(path);
  if (!text) return fail(text.error());
  auto info = *text ? parse_lock(**text) : std::nullopt;
  if (!info || info->owner != token.owner) return {};  // taken over: not ours to delete
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return fail(errno_error("unlink", path));
  // No fsync of the directory: a release undone by a power failure leaves a lock whose lease
  // expires (the next taker waits out its ttl), never a wrong one.
  return {};
}

}  // namespace autotls::tlsreload
