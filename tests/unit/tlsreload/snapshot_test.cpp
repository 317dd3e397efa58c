#include <doctest/doctest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>

#include <sys/stat.h>

#include "tests/support/fake_clock.h"
#include "tests/support/temp_dir.h"
#include "tests/unit/tlsreload/test_ca.h"
#include "tlsreload/loader.h"
#include "tlsreload/snapshot.h"
#include "tlsreload/store.h"

using namespace autotls;
using namespace autotls::tlsreload;
namespace fs = std::filesystem;

namespace {

struct TempDir : testing::TempDir {
  TempDir() : testing::TempDir("tlsreload-snapshot") {}
};

void write(const fs::path& p, const std::string& data) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary | std::ios::trunc) << data;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// WarnLog keeps the warnings it is given.
class WarnLog : public Logger {
 public:
  bool enabled(LogLevel) const override { return true; }
  void log(LogLevel level, std::string_view, std::string_view message, std::initializer_list<LogField> fields) override {
    if (level != LogLevel::warn) return;
    std::lock_guard lock(mu_);
    std::string line(message);
    for (const auto& f : fields) line += " " + std::string(f.key) + "=" + f.value;
    lines_.push_back(line);
  }
  std::vector<std::string> lines() const {
    std::lock_guard lock(mu_);
    return lines_;
  }

 private:
  mutable std::mutex mu_;
  std::vector<std::string> lines_;
};

// A certbot-style directory (live/<name>/) and a snapshot path outside it.
struct Fixture {
  testing::FakeClock clock;
  testing::TestCa ca{"Snapshot", clock.now()};
  TempDir tmp;
  fs::path certs = tmp.path / "letsencrypt";
  fs::path snap = tmp.path / "state" / "store.snapshot";
  WarnLog log;

  Fixture() { fs::create_directories(snap.parent_path()); }

  void put(const std::string& name, const testing::Issued& leaf) {
    write(certs / "live" / name / "fullchain.pem", ca.chain_pem(leaf));
    write(certs / "live" / name / "privkey.pem", leaf.key_pem);
  }
  testing::Issued put(const std::string& name, std::vector<std::string> dns,
                      testing::TestKeyType key = testing::TestKeyType::ec256) {
    auto leaf = ca.issue(std::move(dns), key);
    put(name, leaf);
    return leaf;
  }
  DirectoryLoadOptions options() {
    DirectoryLoadOptions o;
    o.load.clock = &clock;
    o.snapshot_path = snap;
    o.logger = &log;
    return o;
  }
  // first_start runs a start without a snapshot, which writes one.
  void first_start() {
    auto store = std::make_shared<CertStore>();
    SnapshotLoader loader(store, certs, options());
    REQUIRE_FALSE(loader.start().used);
    auto done = loader.wait();
    REQUIRE(done);
    REQUIRE(done->snapshot_written);
    REQUIRE(fs::exists(snap));
  }
};

std::string id_for(const CertStore& store, std::string_view name, bool ecdsa = true) {
  auto c = store.lookup(name, ecdsa);
  return c ? c->id() : std::string();
}

std::string fingerprint_id(const testing::Issued& leaf) {
  LoadOptions o;
  o.allow_not_yet_valid = true;  // the test CA's clock is in the future
  auto c = Certificate::from_pem(leaf.cert_pem, leaf.key_pem, o);
  return c ? (*c)->id() : std::string();
}

}  // namespace

TEST_SUITE("tlsreload.snapshot") {

TEST_CASE("snapshot: a snapshot restores what a full load serves, with the same ids for every name") {
  Fixture f;
  f.put("a.test", {"a.test", "www.a.test"});
  f.put("b.test", {"b.test"}, testing::TestKeyType::rsa2048);
  f.put("wild.test", {"*.wild.test", "wild.test"});
  f.put("ip", {"c.test"});
  LoadOptions recording = f.options().load;
  recording.record_sources = true;
  auto full = load_directory(f.certs, recording);
  REQUIRE(full);
  REQUIRE(full->failures.empty());
  REQUIRE(full->certificates.size() == 4);
  REQUIRE(full->sources.size() == 4);
  // Without record_sources a load keeps no sources (they cost ~1 KiB per certificate).
  auto plain = load_directory(f.certs, f.options().load);
  REQUIRE(plain);
  CHECK(plain->certificates.size() == 4);
  CHECK(plain->sources.empty());
  CertStore loaded;
  REQUIRE(publish_all(loaded, *full) == 4);
  REQUIRE(write_snapshot(f.snap, full->certificates, full->sources));

  CertStore restored;
  SnapshotStart start = publish_snapshot(restored, f.options());
  CHECK(start.used);
  CHECK_FALSE(start.ignored);
  CHECK(start.published == 4);
  CHECK(f.log.lines().empty());
  for (const char* name : {"a.test", "www.a.test", "b.test", "wild.test", "x.wild.test", "c.test", "none.test"}) {
    for (bool ecdsa : {true, false}) {
      CAPTURE(name);
      CHECK(id_for(restored, name, ecdsa) == id_for(loaded, name, ecdsa));
    }
  }
  CHECK(restored.snapshot()->name_count() == loaded.snapshot()->name_count());
  // The restored certificates carry everything a handshake needs: the deferred checks (the
  // DER parses, the key matches the leaf, the chain links) pass and OpenSSL objects build.
  for (const auto& c : restored.snapshot()->certificates()) {
    CAPTURE(c->names().front());
    CHECK(c->verification() == Verification::pending);
    CHECK(c->verify());
    CHECK(c->openssl());
    CHECK(c->chain_length() == 1);
  }
  // The sources are what the loader saw.
  auto contents = read_snapshot(f.snap, f.options().load);
  REQUIRE(contents);
  REQUIRE(contents->sources.size() == 4);
  struct stat st{};
  REQUIRE(::stat(contents->sources[0].paths.chain.c_str(), &st) == 0);
  CHECK(contents->sources[0].chain.inode == st.st_ino);
  CHECK(contents->sources[0].chain.size == static_cast<std::uint64_t>(st.st_size));
}

TEST_CASE("snapshot: deferred source paths are the paths a plain load and read make, once asked for") {
  Fixture f;
  f.put("a.test", {"a.test"});
  f.put("b.test", {"b.test"});
  f.put("c.test", {"c.test"});
  LoadOptions recording = f.options().load;
  recording.record_sources = true;
  LoadOptions deferring = recording;
  deferring.defer_source_paths = true;
  auto plain = load_directory(f.certs, recording);
  auto deferred = load_directory(f.certs, deferring);
  REQUIRE(plain);
  REQUIRE(deferred);
  REQUIRE(plain->sources.size() == 3);
  REQUIRE(deferred->sources.size() == 3);
  // Until asked for, the paths are strings in source_paths, and the sources' paths empty.
  REQUIRE(deferred->source_paths.size() == 3);
  for (std::size_t i = 0; i < 3; ++i) {
    CHECK(deferred->sources[i].paths.chain.empty());
    CHECK(deferred->source_paths.chain(i) == plain->sources[i].paths.chain.native());
    CHECK(deferred->source_paths.key(i) == plain->sources[i].paths.key.native());
  }
  // publish_all keeps them parallel to the certificates it keeps.
  CertStore store;
  REQUIRE(publish_all(store, *deferred) == 3);
  deferred->make_source_paths();
  CHECK(deferred->source_paths.empty());
  for (std::size_t i = 0; i < 3; ++i) {
    CHECK(deferred->sources[i].paths.chain == plain->sources[i].paths.chain);
    CHECK(deferred->sources[i].paths.key == plain->sources[i].paths.key);
    CHECK(deferred->sources[i].chain == plain->sources[i].chain);
    CHECK(deferred->sources[i].key_mode == plain->sources[i].key_mode);
  }
  REQUIRE(write_snapshot(f.snap, plain->certificates, plain->sources));
  // The snapshot start, deferred: the same sources once made.
  DirectoryLoadOptions dlo = f.options();
  dlo.load.defer_source_paths = true;
  CertStore restored;
  SnapshotStart start = publish_snapshot(restored, dlo);
  REQUIRE(start.used);
  REQUIRE(start.sources.size() == 3);
  REQUIRE(start.source_paths.size() == 3);
  CHECK(start.sources[0].paths.chain.empty());
  start.make_source_paths();
  auto full = read_snapshot(f.snap, f.options().load);
  REQUIRE(full);
  REQUIRE(full->sources.size() == 3);
  for (std::size_t i = 0; i < 3; ++i) {
    CHECK(start.sources[i].paths.chain == full->sources[i].paths.chain);
    CHECK(start.sources[i].paths.key == full->sources[i].paths.key);
    CHECK(start.sources[i].chain == full->sources[i].chain);
    CHECK(start.sources[i].key == full->sources[i].key);
  }
}

TEST_CASE("snapshot: the snapshot file is 0600 and not in the certificate directory") {
  Fixture f;
  f.put("a.test", {"a.test"});
  ::umask(022);
  f.first_start();
  struct stat st{};
  REQUIRE(::stat(f.snap.c_str(), &st) == 0);
  CHECK((st.st_mode & 07777) == 0600);
  // Nothing was written into the certificate directory.
  std::set<std::string> files;
  for (const auto& e : fs::recursive_directory_iterator(f.certs)) files.insert(e.path().filename().string());
  CHECK(files == std::set<std::string>{"live", "a.test", "fullchain.pem", "privkey.pem"});
}

TEST_CASE("snapshot: a pair changed, removed or added while down is served from the snapshot until verification") {
  Fixture f;
  auto old_a = f.put("a.test", {"a.test"});
  auto b = f.put("b.test", {"b.test"});
  f.put("c.test", {"c.test"});
  f.first_start();

  // While the process is down: a.test renewed, b.test deleted, d.test added.
  auto new_a = f.put("a.test", {"a.test"});
  fs::remove_all(f.certs / "live" / "b.test");
  auto d = f.put("d.test", {"d.test"});

  CertStore store;
  SnapshotStart start = publish_snapshot(store, f.options());
  REQUIRE(start.used);
  CHECK(start.published == 3);
  CHECK(id_for(store, "a.test") == fingerprint_id(old_a));  // stale, from the snapshot
  CHECK(id_for(store, "b.test") == fingerprint_id(b));      // gone from disk, still served
  CHECK(id_for(store, "d.test").empty());                   // not in the snapshot
  CHECK(!id_for(store, "c.test").empty());

  auto check = check_directory(store, f.certs, start, f.options());
  REQUIRE(check);
  CHECK(check->snapshot_written);
  CHECK(id_for(store, "a.test") == fingerprint_id(new_a));
  CHECK(id_for(store, "b.test").empty());
  CHECK(check->removed == 1);
  CHECK(id_for(store, "d.test") == fingerprint_id(d));
  CHECK(!id_for(store, "c.test").empty());
  CHECK(store.snapshot()->certificates().size() == 3);
  // The changed and the new pair's certificates, each with its chain file (serve follows a
  // pair by it).
  REQUIRE(check->fresh.size() == 2);
  REQUIRE(check->fresh_chains.size() == check->fresh.size());
  for (std::size_t i = 0; i < check->fresh.size(); ++i) {
    const bool is_a = check->fresh[i]->id() == fingerprint_id(new_a);
    CHECK(check->fresh[i]->id() == fingerprint_id(is_a ? new_a : d));
    CHECK(check->fresh_chains[i] == (f.certs / "live" / (is_a ? "a.test" : "d.test") / "fullchain.pem").string());
  }

  // The snapshot was rewritten: the next start serves the new state at once.
  CertStore next;
  SnapshotStart again = publish_snapshot(next, f.options());
  REQUIRE(again.used);
  CHECK(id_for(next, "a.test") == fingerprint_id(new_a));
  CHECK(id_for(next, "b.test").empty());
  CHECK(id_for(next, "d.test") == fingerprint_id(d));
}

TEST_CASE("snapshot: a pair that fails to load at verification keeps its snapshot certificate, a deleted one goes") {
  Fixture f;
  auto a = f.put("a.test", {"a.test"});
  auto b = f.put("b.test", {"b.test"});
  auto c = f.put("c.test", {"c.test"});
  f.put("d.test", {"d.test"});
  f.first_start();

  // While the process is down (or while it restarts): certbot has switched a.test's key but
  // not yet its chain (the key no longer matches), c.test's key is garbage for a moment, and
  // b.test was deleted.
  auto other = f.ca.issue({"a.test"});
  write(f.certs / "live" / "a.test" / "privkey.pem", other.key_pem);
  write(f.certs / "live" / "c.test" / "privkey.pem", "-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n");
  fs::remove_all(f.certs / "live" / "b.test");

  CertStore store;
  SnapshotStart start = publish_snapshot(store, f.options());
  REQUIRE(start.used);
  REQUIRE(start.published == 4);
  auto check = check_directory(store, f.certs, start, f.options());
  REQUIRE(check);
  CHECK(check->report.failures.size() >= 2);
  CHECK(check->snapshot_written);
  CHECK(id_for(store, "a.test") == fingerprint_id(a));  // still served
  CHECK(id_for(store, "c.test") == fingerprint_id(c));
  CHECK(id_for(store, "b.test").empty());               // gone from the directory: removed
  CHECK(!id_for(store, "d.test").empty());
  CHECK(check->removed == 1);
  CHECK(check->kept == 2);
  // Each failure is logged with its file and reason.
  auto lines = f.log.lines();
  auto logged = [&](const std::string& pair) {
    return std::any_of(lines.begin(), lines.end(), [&](const std::string& l) {
      return l.find("still serving") != std::string::npos && l.find("live/" + pair + "/") != std::string::npos &&
             l.find("error=") != std::string::npos;
    });
  };
  CHECK(logged("a.test"));
  CHECK(logged("c.test"));

  // The rewritten snapshot still holds them, with their old source identities.
  auto contents = read_snapshot(f.snap, f.options().load);
  REQUIRE(contents);
  std::set<std::string> ids;
  for (const auto& cert : contents->certificates) ids.insert(cert->id());
  CHECK(ids.contains(fingerprint_id(a)));
  CHECK(ids.contains(fingerprint_id(c)));
  CHECK_FALSE(ids.contains(fingerprint_id(b)));
  CHECK(ids.size() == 3);
  REQUIRE(contents->sources.size() == contents->certificates.size());
  for (std::size_t i = 0; i < contents->certificates.size(); ++i) {
    if (contents->certificates[i]->id() != fingerprint_id(a)) continue;
    CHECK(contents->sources[i].paths.chain == f.certs / "live" / "a.test" / "fullchain.pem");
    struct stat st{};
    REQUIRE(::stat(contents->sources[i].paths.key.c_str(), &st) == 0);
    CHECK(contents->sources[i].key.size != 0);
  }

  // The next start serves it again, and once the pair loads, its new state replaces it.
  write(f.certs / "live" / "a.test" / "fullchain.pem", f.ca.chain_pem(other));
  CertStore next;
  SnapshotStart again = publish_snapshot(next, f.options());
  REQUIRE(again.used);
  CHECK(id_for(next, "a.test") == fingerprint_id(a));
  auto recheck = check_directory(next, f.certs, again, f.options());
  REQUIRE(recheck);
  CHECK(id_for(next, "a.test") == fingerprint_id(other));
  CHECK(id_for(next, "c.test") == fingerprint_id(c));
}

TEST_CASE("snapshot: the verification does not overwrite another writer's publish nor clear its default") {
  Fixture f;
  f.put("a.test", {"a.test"});
  auto b = f.put("b.test", {"b.test"});
  f.put("c.test", {"c.test"});
  f.put("wild.test", {"*.wild.test"});
  f.first_start();
  // While down: a.test and wild.test renewed on disk, c.test renewed, b.test deleted.
  f.put("a.test", {"a.test"});
  f.put("wild.test", {"*.wild.test"});
  auto new_c = f.put("c.test", {"c.test"});
  fs::remove_all(f.certs / "live" / "b.test");

  CertStore store;
  SnapshotStart start = publish_snapshot(store, f.options());
  REQUIRE(start.used);
  // After the snapshot is served and before the verification publishes, other writers act:
  // the manager publishes a newer a.test and *.wild.test, and b.test's certificate is made the
  // default.
  LoadOptions lo;
  lo.allow_not_yet_valid = true;
  auto mine = f.ca.issue({"a.test"});
  auto published = store.publish_pem(f.ca.chain_pem(mine), mine.key_pem, lo);
  REQUIRE(published);
  auto mine_wild = f.ca.issue({"*.wild.test"});
  REQUIRE(store.publish_pem(f.ca.chain_pem(mine_wild), mine_wild.key_pem, lo));
  auto b_cert = store.lookup("b.test");
  REQUIRE(b_cert);
  REQUIRE(store.set_default(b_cert));

  auto check = check_directory(store, f.certs, start, f.options());
  REQUIRE(check);
  CHECK(check->superseded == 2);
  CHECK(id_for(store, "a.test") == fingerprint_id(mine));           // survived
  CHECK(id_for(store, "x.wild.test") == fingerprint_id(mine_wild));  // survived
  CHECK(id_for(store, "c.test") == fingerprint_id(new_c));          // the snapshot's: replaced
  CHECK(id_for(store, "none.test") == fingerprint_id(b));           // the default stays
}

TEST_CASE("snapshot: SnapshotLoader serves the snapshot at once and verifies behind") {
  Fixture f;
  auto old_a = f.put("a.test", {"a.test"});
  f.first_start();
  auto new_a = f.put("a.test", {"a.test"});
  auto store = std::make_shared<CertStore>();
  SnapshotLoader loader(store, f.certs, f.options());
  CHECK(loader.start().used);
  CHECK_FALSE(loader.initial());
  auto done = loader.wait();
  REQUIRE(done);
  CHECK(done->report.certificates.size() == 1);
  CHECK(id_for(*store, "a.test") == fingerprint_id(new_a));
  // A second wait returns the same result, not a moved-from one.
  auto again = loader.wait();
  REQUIRE(again);
  CHECK(again->report.certificates.size() == 1);
  CHECK(again->report.sources.size() == 1);
  CHECK(again->snapshot_written);
}

TEST_CASE("snapshot: a corrupt, truncated, foreign or other-version snapshot is ignored with a warning") {
  Fixture f;
  f.put("a.test", {"a.test"});
  f.put("b.test", {"b.test"});
  f.first_start();
  std::string good = slurp(f.snap);
  REQUIRE(good.size() > 200);
  std::string bad = good, expect;
  SUBCASE("corrupt") {
    bad[bad.size() / 2] ^= 0x40;
    expect = "checksum mismatch";
  }
  SUBCASE("truncated") {
    bad.resize(bad.size() - 37);
    expect = "truncated or torn";
  }
  SUBCASE("truncated header") {
    bad.resize(20);
    expect = "truncated header";
  }
  SUBCASE("empty") {
    bad.clear();
    expect = "bad magic";
  }
  SUBCASE("foreign") {
    bad = "-----BEGIN CERTIFICATE-----\nnot a snapshot at all, but long enough to have a header\n";
    expect = "bad magic";
  }
  SUBCASE("other format version") {
    bad[8] = 2;
    expect = "format version 2";
  }
  mode_t mode = 0;
  bool other_owner = false;
  SUBCASE("group or other permission bits") {
    mode = 0640;
    expect = "mode 0640";
  }
  SUBCASE("world-readable") {
    mode = 0604;
    expect = "mode 0604";
  }
  SUBCASE("owned by another user") {
    other_owner = true;
    expect = "owned by uid 65534";
  }
  write(f.snap, bad);
  if (mode != 0) REQUIRE(::chmod(f.snap.c_str(), mode) == 0);
  if (other_owner && ::chown(f.snap.c_str(), 65534, 65534) != 0) {
    // Not root: a file owned by someone else cannot be made; the other subcases cover the check.
    MESSAGE("chown needs root; skipped");
    return;
  }
  auto store = std::make_shared<CertStore>();
  SnapshotLoader loader(store, f.certs, f.options());
  CHECK_FALSE(loader.start().used);
  REQUIRE(loader.start().ignored);
  CHECK(loader.start().ignored->message.find(expect) != std::string::npos);
  auto lines = f.log.lines();
  REQUIRE(lines.size() == 1);
  CHECK(lines[0].find("store snapshot ignored") != std::string::npos);
  CHECK(lines[0].find(expect) != std::string::npos);
  // The normal load happened before the constructor returned.
  REQUIRE(loader.initial());
  REQUIRE(*loader.initial());
  CHECK(!id_for(*store, "a.test").empty());
  CHECK(!id_for(*store, "b.test").empty());
  // ...and a good snapshot replaced the bad one.
  auto done = loader.wait();
  REQUIRE(done);
  CHECK(done->snapshot_written);
  CHECK(read_snapshot(f.snap, f.options().load));
}

TEST_CASE("snapshot: a missing snapshot is a first start: a normal load, no warning, a snapshot written") {
  Fixture f;
  f.put("a.test", {"a.test"});
  auto store = std::make_shared<CertStore>();
  SnapshotLoader loader(store, f.certs, f.options());
  CHECK_FALSE(loader.start().used);
  CHECK_FALSE(loader.start().ignored);
  CHECK(f.log.lines().empty());
  CHECK(!id_for(*store, "a.test").empty());
  REQUIRE(loader.wait());
  CHECK(fs::exists(f.snap));
}

TEST_CASE("snapshot: an entry expired since the snapshot was written is not published") {
  Fixture f;
  auto spec = f.ca.spec({"short.test"});
  spec.not_after = f.clock.now() + std::chrono::hours(24);
  auto short_lived = f.ca.issue(spec);
  f.put("short.test", short_lived);
  f.put("long.test", {"long.test"});
  f.first_start();

  f.clock.advance(std::chrono::hours(48));
  CertStore store;
  SnapshotStart start = publish_snapshot(store, f.options());
  REQUIRE(start.used);
  CHECK(start.published == 1);
  REQUIRE(start.refused.size() == 1);
  CHECK(start.refused[0].error.message.find("expired") != std::string::npos);
  CHECK(start.refused[0].path.filename() == "fullchain.pem");
  CHECK(id_for(store, "short.test").empty());
  CHECK(!id_for(store, "long.test").empty());
}

}  // TEST_SUITE
