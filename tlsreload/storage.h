#pragma once

// Storage: where certificates, keys, ACME accounts and renewal state live, and the locks that
// let several processes (or hosts) share them. FileStorage is the embedded default; the
// interface assumes no local disk, so a distributed backend can replace it (see docs/storage.md).

#include <chrono>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "acme/util/clock.h"
#include "acme/util/error.h"

namespace autotls::tlsreload {

// StorageFile is one key of a set written together by Storage::put_set.
struct StorageFile {
  std::string name;  // one key component: the key is "<prefix>/<name>"
  std::string value;
  bool secret = false;
};

// LockToken names one acquisition of a storage lock. Its owner is unique per acquisition (not
// per process), so two holders in one process are told apart as well as two processes.
struct LockToken {
  std::string name;
  std::string owner;
};

// Storage is a key-value store of small blobs with expiring locks.
//
// Keys are relative paths of '/'-separated components; each component is non-empty, is not
// "." or "..", does not start with '.', and uses only [A-Za-z0-9._@+:=-] ('*' is refused:
// wildcard names are stored as "_wildcard_.example.com"). A bad key is Errc::invalid_input.
//
// Implementations MUST be safe to call from several threads, and put() MUST be atomic: a get()
// (from any process sharing the storage) sees the old value or the new one, never a mix.
class Storage {
 public:
  virtual ~Storage() = default;

  // get returns the value, std::nullopt when the key does not exist, or an Error.
  [[nodiscard]] virtual Result<std::optional<std::string>> get(std::string_view key) = 0;
  // put stores the value atomically and durably (it has reached stable storage on success).
  // secret marks private keys: readable by the owner only.
  [[nodiscard]] virtual Status put(std::string_view key, std::string_view value,
                                   bool secret = false) = 0;
  // put_set writes the keys "<prefix>/<name>" of files as one change where the backend can;
  // other keys directly under prefix are kept (carried over). FileStorage switches the whole
  // set at once (a reader of the files sees the old set or the new one, never a new
  // certificate with an old key). This default writes each file with put() in the order
  // given: a crash can leave a mix, which the caller must detect (the manager validates the
  // pair it reads back).
  [[nodiscard]] virtual Status put_set(std::string_view prefix, const std::vector<StorageFile>& files);
  // list returns every key under prefix (a key prefix on component boundaries, "" = all),
  // recursively, sorted. A prefix that does not exist gives an empty list.
  [[nodiscard]] virtual Result<std::vector<std::string>> list(std::string_view prefix) = 0;
  // remove deletes a key; removing a missing key succeeds.
  [[nodiscard]] virtual Status remove(std::string_view key) = 0;
  // remove_set deletes every key under prefix (a set written by put_set, such as a stored
  // certificate's live/<name>); removing a missing prefix succeeds. FileStorage makes the whole
  // set disappear at once for readers, then deletes its versions. This default removes the keys
  // one by one: a crash can leave some, which a caller reading the set must tolerate.
  [[nodiscard]] virtual Status remove_set(std::string_view prefix);
  // generation returns an opaque token that changes whenever the key's value changes ("" when
  // the key does not exist). Poll it to learn of changes made by other processes.
  [[nodiscard]] virtual Result<std::string> generation(std::string_view key) = 0;

  // try_lock takes the lock `name` (same syntax as a key) for ttl, or returns std::nullopt when
  // someone else holds it and it has not expired. A lock whose expiry has passed is stale and
  // is taken over. The holder MUST refresh() before ttl elapses if its work takes longer.
  [[nodiscard]] virtual Result<std::optional<LockToken>> try_lock(std::string_view name,
                                                                  std::chrono::seconds ttl) = 0;
  // refresh extends a held lock to now + ttl. Errc::invalid_input when the token no longer
  // holds the lock (it expired and was taken over).
  [[nodiscard]] virtual Status refresh(const LockToken& token, std::chrono::seconds ttl) = 0;
  // unlock releases a held lock; releasing a lock that was taken over is a no-op success.
  [[nodiscard]] virtual Status unlock(const LockToken& token) = 0;

  // lock waits (polling try_lock through clock) until the lock is taken or deadline passes
  // (Errc::timeout), or the clock's sleep is cancelled (Errc::cancelled).
  [[nodiscard]] Result<LockToken> lock(std::string_view name, std::chrono::seconds ttl,
                                       Clock::time_point deadline, Clock& clock);
};

// valid_storage_key reports whether key follows the syntax above.
bool valid_storage_key(std::string_view key);

// storage_name turns a certificate name into a key component: lower-cased, "*." as
// "_wildcard_." ("*.example.com" -> "_wildcard_.example.com").
std::string storage_name(std::string_view name);

// ca_storage_name turns a CA directory URL into a key component: scheme dropped, host and path
// kept, other characters replaced ("https://acme.test:14000/dir" -> "acme.test_14000-dir").
std::string ca_storage_name(std::string_view directory_url);

// write_file_atomic replaces path with data crash-safely, as FileStorage::put writes a key: a
// temporary file in the same directory (created 0600, then given mode), fsync'ed, renamed over
// path, and the directory fsync'ed. A reader sees the old file or the new one, never a part.
[[nodiscard]] Status write_file_atomic(const std::filesystem::path& path, std::string_view data,
                                       unsigned mode);

// FileStorage keeps each key as a file under root (docs/storage.md).
//
// Writes are crash-safe: a temporary file in the same directory is written, fsync'ed, renamed
// over the key and the directory is fsync'ed, so a reader never sees a partial file (the
// atomicfile technique of certmagic); put_set writes a whole hidden version, makes it durable
// with one sync (Sync) and switches to it with one rename. Directories are 0700, secret files
// 0600, others 0644.
// Locks are files under <root>/locks/ holding the owner and expiry (JSON); see try_lock.
class FileStorage : public Storage {
 public:
  // clock gives lock expiry times; nullptr means system_clock(). It MUST outlive the storage.
  explicit FileStorage(std::filesystem::path root, Clock* clock = nullptr);

  Result<std::optional<std::string>> get(std::string_view key) override;
  Status put(std::string_view key, std::string_view value, bool secret = false) override;
  // put_set writes the files, and copies of the other files of the current version, into a
  // new version directory archive/<name>/<N>/ (for a prefix live/<name>;
  // archive/<prefix>/<N>/ otherwise) and points the directory symlink
  // <prefix> -> ../archive/<name>/<N> at it with one rename, so the set changes at once for
  // every reader. The newest kKeepVersions versions are kept, older ones deleted. A prefix that
  // is still a plain directory (older layout) is swapped for the symlink atomically
  // (renameat2 RENAME_EXCHANGE) and its old contents deleted. See docs/storage.md.
  Status put_set(std::string_view prefix, const std::vector<StorageFile>& files) override;
  static constexpr int kKeepVersions = 3;

  // Sync is how put_set makes a new version durable before it switches live/<name> to it.
  enum class Sync {
    // One syncfs(2) of the storage's filesystem after the last file is written: one journal
    // commit for every file and directory of the version (the default; docs/storage.md).
    filesystem,
    // fsync of each file, then of the version directory and archive/<name>/: for a storage
    // on a filesystem where others keep much unwritten data, which syncfs would wait for too.
    per_file,
  };
  // set_sync chooses the Sync; call it before the storage is used.
  void set_sync(Sync sync) { sync_ = sync; }
  Sync sync() const { return sync_; }
  Result<std::vector<std::string>> list(std::string_view prefix) override;
  Status remove(std::string_view key) override;
  // remove_set of live/<name>: the symlink is removed first (one unlink: readers see the whole
  // set or nothing), then archive/<name>/ with every kept version. An old-layout plain
  // directory is first renamed to a hidden name, then deleted. A crash between the steps
  // leaves only hidden or unreferenced files, which no reader sees; the next put_set of the
  // name continues the version numbers.
  Status remove_set(std::string_view prefix) override;
  Result<std::string> generation(std::string_view key) override;

  Result<std::optional<LockToken>> try_lock(std::string_view name, std::chrono::seconds ttl) override;
  Status refresh(const LockToken& token, std::chrono::seconds ttl) override;
  Status unlock(const LockToken& token) override;

  const std::filesystem::path& root() const { return root_; }

 private:
  std::filesystem::path lock_path(std::string_view name) const;

  std::filesystem::path root_;
  Clock* clock_;
  Sync sync_ = Sync::filesystem;
};

}  // namespace autotls::tlsreload
