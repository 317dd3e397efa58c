// FileStorage: keys, crash-safe writes, permissions, listing, change detection and locks.

#include <doctest/doctest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <thread>

#include "tests/support/fake_clock.h"
#include "tlsreload/storage.h"

using namespace autotls;
using namespace autotls::tlsreload;
using autotls::testing::FakeClock;
namespace fs = std::filesystem;

namespace {

struct StorageDir {
  fs::path path;
  StorageDir() {
    std::string tmpl = (fs::temp_directory_path() / "autotls-storage-XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
  }
  ~StorageDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

mode_t mode_of(const fs::path& p) {
  struct stat sb {};
  REQUIRE(::stat(p.c_str(), &sb) == 0);
  return sb.st_mode & 0777;
}

// leftovers lists the dot-files (temporary files) anywhere under root.
std::vector<std::string> leftovers(const fs::path& root) {
  std::vector<std::string> out;
  for (auto& e : fs::recursive_directory_iterator(root)) {
    if (e.path().filename().string().starts_with('.')) out.push_back(e.path().string());
  }
  return out;
}

}  // namespace

TEST_SUITE("tlsreload.storage") {

TEST_CASE("put get overwrite and missing keys") {
  StorageDir dir;
  FileStorage s(dir.path);
  auto missing = s.get("live/example.com/cert.pem");
  REQUIRE(missing.has_value());
  CHECK_FALSE(missing->has_value());

  REQUIRE(s.put("live/example.com/cert.pem", "one").has_value());
  auto got = s.get("live/example.com/cert.pem");
  REQUIRE(got.has_value());
  REQUIRE(got->has_value());
  CHECK(**got == "one");

  REQUIRE(s.put("live/example.com/cert.pem", std::string(100000, 'x')).has_value());
  CHECK(s.get("live/example.com/cert.pem")->value() == std::string(100000, 'x'));
  CHECK(leftovers(dir.path).empty());
}

TEST_CASE("secret files are 0600 and directories 0700") {
  StorageDir dir;
  FileStorage s(dir.path / "root");
  REQUIRE(s.put("live/example.com/privkey.pem", "key", true).has_value());
  REQUIRE(s.put("live/example.com/fullchain.pem", "chain").has_value());
  CHECK(mode_of(dir.path / "root/live/example.com/privkey.pem") == 0600);
  CHECK(mode_of(dir.path / "root/live/example.com/fullchain.pem") == 0644);
  CHECK(mode_of(dir.path / "root") == 0700);
  CHECK(mode_of(dir.path / "root/live") == 0700);
  CHECK(mode_of(dir.path / "root/live/example.com") == 0700);
  // Overwriting a public file with a secret tightens it.
  REQUIRE(s.put("live/example.com/fullchain.pem", "secret now", true).has_value());
  CHECK(mode_of(dir.path / "root/live/example.com/fullchain.pem") == 0600);
}

TEST_CASE("invalid keys are refused") {
  StorageDir dir;
  FileStorage s(dir.path);
  for (std::string key : {"", "/etc/passwd", "../escape", "a/../../b", "a//b", "a/", "./a", ".hidden",
                          "live/.tmp-x", "live/*.example.com/cert.pem", "a b", "a\\b", "locks/x"}) {
    CAPTURE(key);
    auto st = s.put(key, "x");
    REQUIRE_FALSE(st.has_value());
    CHECK(st.error().code == Errc::invalid_input);
  }
  CHECK_FALSE(s.get("../x").has_value());
  CHECK_FALSE(s.remove("/x").has_value());
  CHECK_FALSE(s.list("..").has_value());
  CHECK(valid_storage_key("live/_wildcard_.example.com/fullchain.pem"));
  CHECK(valid_storage_key("accounts/127.0.0.1_14000-dir/account.key"));
  CHECK(fs::is_empty(dir.path));
}

TEST_CASE("storage names for wildcards and CA URLs") {
  CHECK(storage_name("*.Example.COM") == "_wildcard_.example.com");
  CHECK(storage_name("www.example.com") == "www.example.com");
  CHECK(valid_storage_key(storage_name("*.example.com")));
  CHECK(ca_storage_name("https://acme-v02.api.letsencrypt.org/directory") ==
        "acme-v02.api.letsencrypt.org-directory");
  CHECK(ca_storage_name("https://127.0.0.1:14000/dir") == "127.0.0.1_14000-dir");
  CHECK(ca_storage_name("https://ca.test/") == "ca.test");
  CHECK(valid_storage_key("accounts/" + ca_storage_name("https://[::1]:443/acme/dir?x=1")));
}

TEST_CASE("list is recursive sorted and skips temporary files and locks") {
  StorageDir dir;
  FileStorage s(dir.path);
  REQUIRE(s.put("live/b.example/cert.pem", "1").has_value());
  REQUIRE(s.put("live/a.example/cert.pem", "2").has_value());
  REQUIRE(s.put("live/a.example/meta.json", "3").has_value());
  REQUIRE(s.put("accounts/ca/account.json", "4").has_value());
  std::ofstream(dir.path / "live/a.example/.tmp-abandoned") << "half";
  auto lock = s.try_lock("cert/a.example", std::chrono::seconds(60));
  REQUIRE(lock.has_value());

  auto live = s.list("live");
  REQUIRE(live.has_value());
  CHECK(*live == std::vector<std::string>{"live/a.example/cert.pem", "live/a.example/meta.json",
                                          "live/b.example/cert.pem"});
  auto all = s.list("");
  REQUIRE(all.has_value());
  CHECK(all->size() == 4);
  CHECK(s.list("live/a.example")->size() == 2);
  CHECK(s.list("nothing/here")->empty());
}

TEST_CASE("remove is idempotent") {
  StorageDir dir;
  FileStorage s(dir.path);
  REQUIRE(s.put("a/b", "x").has_value());
  REQUIRE(s.remove("a/b").has_value());
  CHECK_FALSE(s.get("a/b")->has_value());
  CHECK(s.remove("a/b").has_value());
}

TEST_CASE("generation changes with every put") {
  StorageDir dir;
  FileStorage s(dir.path);
  CHECK(s.generation("live/x/meta.json").value() == "");
  REQUIRE(s.put("live/x/meta.json", "1").has_value());
  auto g1 = s.generation("live/x/meta.json").value();
  CHECK_FALSE(g1.empty());
  CHECK(s.generation("live/x/meta.json").value() == g1);
  REQUIRE(s.put("live/x/meta.json", "1").has_value());  // same content, new file
  auto g2 = s.generation("live/x/meta.json").value();
  CHECK(g2 != g1);
  REQUIRE(s.remove("live/x/meta.json").has_value());
  CHECK(s.generation("live/x/meta.json").value() == "");
}

TEST_CASE("a lock is exclusive until unlocked") {
  StorageDir dir;
  FakeClock clock;
  FileStorage a(dir.path, &clock), b(dir.path, &clock);
  auto t1 = a.try_lock("cert/example.com", std::chrono::seconds(60));
  REQUIRE(t1.has_value());
  REQUIRE(t1->has_value());
  auto t2 = b.try_lock("cert/example.com", std::chrono::seconds(60));
  REQUIRE(t2.has_value());
  CHECK_FALSE(t2->has_value());
  // The same storage object is no exception: each acquisition has its own owner.
  CHECK_FALSE(a.try_lock("cert/example.com", std::chrono::seconds(60))->has_value());
  // Another name is independent.
  CHECK(b.try_lock("cert/other.example", std::chrono::seconds(60))->has_value());

  REQUIRE(a.unlock(**t1).has_value());
  auto t3 = b.try_lock("cert/example.com", std::chrono::seconds(60));
  REQUIRE(t3.has_value());
  CHECK(t3->has_value());
  CHECK(mode_of(dir.path / "locks") == 0700);
}

TEST_CASE("a stale lock is taken over and a refreshed one is not") {
  StorageDir dir;
  FakeClock clock;
  FileStorage a(dir.path, &clock), b(dir.path, &clock);
  auto held = a.try_lock("cert/example.com", std::chrono::seconds(60));
  REQUIRE(held.has_value());
  REQUIRE(held->has_value());

  clock.advance(std::chrono::seconds(50));
  REQUIRE(a.refresh(**held, std::chrono::seconds(60)).has_value());
  clock.advance(std::chrono::seconds(50));  // 100 s after taking, 50 s after refreshing
  CHECK_FALSE(b.try_lock("cert/example.com", std::chrono::seconds(60))->has_value());

  clock.advance(std::chrono::seconds(11));  // now past the refreshed expiry
  auto stolen = b.try_lock("cert/example.com", std::chrono::seconds(60));
  REQUIRE(stolen.has_value());
  REQUIRE(stolen->has_value());

  // The old holder learns it lost the lock, and its unlock leaves the new holder's lock alone.
  auto refreshed = a.refresh(**held, std::chrono::seconds(60));
  REQUIRE_FALSE(refreshed.has_value());
  CHECK(refreshed.error().code == Errc::invalid_input);
  CHECK(a.unlock(**held).has_value());
  CHECK_FALSE(a.try_lock("cert/example.com", std::chrono::seconds(60))->has_value());
  CHECK(leftovers(dir.path).empty());
}

TEST_CASE("a corrupt lock file counts as stale") {
  StorageDir dir;
  FileStorage s(dir.path);
  fs::create_directories(dir.path / "locks");
  std::ofstream(dir.path / "locks" / "cert%example.com.lock") << "{not json";
  auto t = s.try_lock("cert/example.com", std::chrono::seconds(60));
  REQUIRE(t.has_value());
  CHECK(t->has_value());
}

TEST_CASE("a lock file left empty or cut short, as a power failure can, counts as stale") {
  // Lock files are not fsync'd (docs/storage.md): what a power failure leaves of one must not
  // keep the lock held.
  for (const std::string& content : {std::string(), std::string("{\"expires\":17963"), std::string(4, '\0')}) {
    CAPTURE(content.size());
    StorageDir dir;
    FileStorage s(dir.path);
    fs::create_directories(dir.path / "locks");
    std::ofstream(dir.path / "locks" / "cert%example.com.lock").write(content.data(), static_cast<std::streamsize>(content.size()));
    auto t = s.try_lock("cert/example.com", std::chrono::seconds(60));
    REQUIRE(t.has_value());
    CHECK(t->has_value());
  }
}

TEST_CASE("lock waits until its deadline") {
  StorageDir dir;
  FakeClock clock;
  FileStorage s(dir.path, &clock);
  auto held = s.try_lock("cert/example.com", std::chrono::seconds(600));
  REQUIRE(held->has_value());
  auto start = clock.now();
  auto waited = s.lock("cert/example.com", std::chrono::seconds(60), start + std::chrono::seconds(5), clock);
  REQUIRE_FALSE(waited.has_value());
  CHECK(waited.error().code == Errc::timeout);
  CHECK(clock.now() >= start + std::chrono::seconds(5));
  CHECK(clock.now() < start + std::chrono::seconds(6));

  // Once the holder's lock goes stale, lock() takes it over.
  auto got = s.lock("cert/example.com", std::chrono::seconds(60), start + std::chrono::seconds(3600), clock);
  REQUIRE(got.has_value());
  CHECK(clock.now() >= start + std::chrono::seconds(600));
}

TEST_CASE("concurrent try_lock has exactly one winner") {
  for (int round = 0; round < 20; ++round) {
    StorageDir dir;
    FakeClock clock;
    bool stale = round % 2 == 1;
    if (stale) {
      // Start from a lock that expired long ago, so every thread races to take it over.
      FileStorage old(dir.path, &clock);
      REQUIRE(old.try_lock("cert/race", std::chrono::seconds(1))->has_value());
      clock.advance(std::chrono::seconds(10));
    }
    std::atomic<int> winners{0}, errors{0};
    std::atomic<bool> go{false};
    std::vector<std::thread> threads;
    for (int i = 0; i < 8; ++i) {
      threads.emplace_back([&] {
        FileStorage s(dir.path, &clock);
        while (!go.load()) std::this_thread::yield();
        auto t = s.try_lock("cert/race", std::chrono::seconds(60));
        if (!t) ++errors;
        else if (*t) ++winners;
      });
    }
    go = true;
    for (auto& t : threads) t.join();
    CAPTURE(round);
    CHECK(errors.load() == 0);
    CHECK(winners.load() == 1);
    CHECK(leftovers(dir.path).empty());
  }
}

TEST_CASE("put_set switches a live directory symlink to a new archive version") {
  StorageDir dir;
  FileStorage s(dir.path / "root");
  fs::path root = dir.path / "root";
  // The same outcome whichever way the version is made durable before the switch.
  SUBCASE("one syncfs per version (the default)") { CHECK(s.sync() == FileStorage::Sync::filesystem); }
  SUBCASE("an fsync per file and directory") { s.set_sync(FileStorage::Sync::per_file); }
  REQUIRE(s.put_set("live/example.com", {{"privkey.pem", "key1", true}, {"fullchain.pem", "chain1"}}).has_value());
  CHECK(fs::is_symlink(root / "live/example.com"));
  CHECK(fs::read_symlink(root / "live/example.com") == fs::path("../archive/example.com/1"));
  CHECK(s.get("live/example.com/fullchain.pem")->value() == "chain1");
  CHECK(mode_of(root / "archive/example.com/1/privkey.pem") == 0600);
  CHECK(mode_of(root / "archive/example.com/1/fullchain.pem") == 0644);
  CHECK(mode_of(root / "archive/example.com/1") == 0700);
  CHECK(mode_of(root / "archive/example.com") == 0700);
  CHECK(mode_of(root / "archive") == 0700);

  auto gen1 = s.generation("live/example.com/fullchain.pem");
  REQUIRE(s.put_set("live/example.com", {{"privkey.pem", "key2", true}, {"fullchain.pem", "chain2"}}).has_value());
  CHECK(fs::read_symlink(root / "live/example.com") == fs::path("../archive/example.com/2"));
  CHECK(s.get("live/example.com/privkey.pem")->value() == "key2");
  CHECK(*s.generation("live/example.com/fullchain.pem") != *gen1);
  // A single put goes into the current version.
  REQUIRE(s.put("live/example.com/meta.json", "{}").has_value());
  CHECK(fs::exists(root / "archive/example.com/2/meta.json"));
  // Keys are listed through the symlink; archive/ is not part of the key space.
  auto keys = s.list("live");
  REQUIRE(keys.has_value());
  CHECK(*keys == std::vector<std::string>{"live/example.com/fullchain.pem", "live/example.com/meta.json",
                                          "live/example.com/privkey.pem"});
  auto all = s.list("");
  REQUIRE(all.has_value());
  CHECK(*all == *keys);
  CHECK_FALSE(s.put("archive/example.com/1/x", "no").has_value());
  CHECK_FALSE(s.put_set("archive/example.com", {{"x", "no"}}).has_value());
  CHECK_FALSE(s.put_set("live/example.com", {{"../x", "no"}}).has_value());
  CHECK_FALSE(s.put_set("live/example.com", {}).has_value());

  // Old versions are pruned: the newest kKeepVersions stay.
  for (int i = 3; i <= 6; ++i) {
    REQUIRE(s.put_set("live/example.com", {{"fullchain.pem", "chain" + std::to_string(i)}}).has_value());
  }
  std::vector<std::string> versions;
  for (auto& e : fs::directory_iterator(root / "archive/example.com")) versions.push_back(e.path().filename().string());
  std::sort(versions.begin(), versions.end());
  CHECK(versions == std::vector<std::string>{"4", "5", "6"});
  CHECK(s.get("live/example.com/fullchain.pem")->value() == "chain6");
  // Files not in a set are carried over from the version before, with their mode.
  CHECK(s.get("live/example.com/privkey.pem")->value() == "key2");
  CHECK(s.get("live/example.com/meta.json")->value() == "{}");
  CHECK(mode_of(root / "archive/example.com/6/privkey.pem") == 0600);
  CHECK(mode_of(root / "archive/example.com/6/meta.json") == 0644);
  CHECK(leftovers(root / "archive").empty());
}

TEST_CASE("put_set replaces an old layout plain directory atomically") {
  StorageDir dir;
  FileStorage s(dir.path);
  REQUIRE(s.put("live/old.example/fullchain.pem", "old chain").has_value());
  REQUIRE(s.put("live/old.example/privkey.pem", "old key", true).has_value());
  CHECK_FALSE(fs::is_symlink(dir.path / "live/old.example"));
  REQUIRE(s.put_set("live/old.example", {{"privkey.pem", "new key", true}, {"fullchain.pem", "new chain"}}).has_value());
  CHECK(fs::is_symlink(dir.path / "live/old.example"));
  CHECK(s.get("live/old.example/fullchain.pem")->value() == "new chain");
  CHECK(s.get("live/old.example/privkey.pem")->value() == "new key");
  REQUIRE(s.put("live/old.example/renewal.json", "settings").has_value());
  REQUIRE(s.put_set("live/old.example", {{"fullchain.pem", "newer chain"}}).has_value());
  CHECK(s.get("live/old.example/renewal.json")->value() == "settings");
  CHECK(leftovers(dir.path / "live").empty());  // the exchanged old directory is gone
}

TEST_CASE("remove_set deletes a stored set with every version, and only it") {
  StorageDir dir;
  FileStorage s(dir.path);
  for (int i = 1; i <= 3; ++i) {
    REQUIRE(s.put_set("live/gone.example", {{"privkey.pem", "k" + std::to_string(i), true},
                                            {"fullchain.pem", "c" + std::to_string(i)}}).has_value());
  }
  REQUIRE(s.put_set("live/kept.example", {{"privkey.pem", "k", true}, {"fullchain.pem", "c"}}).has_value());
  REQUIRE(s.put_set("live/gone.example.org", {{"fullchain.pem", "other"}}).has_value());  // a name that shares a prefix
  REQUIRE(s.put("accounts/ca/account.json", "{}").has_value());

  REQUIRE(s.remove_set("live/gone.example").has_value());
    CHECK_FALSE(fs::is_symlink(dir.path / "live/gone.example"));
  CHECK_FALSE(fs::exists(dir.path / "archive/gone.example"));
  CHECK_FALSE(s.get("live/gone.example/privkey.pem")->has_value());
  auto keys = s.list("");
  REQUIRE(keys.has_value());
  CHECK(*keys == std::vector<std::string>{"accounts/ca/account.json", "live/gone.example.org/fullchain.pem",
                                          "live/kept.example/fullchain.pem", "live/kept.example/privkey.pem"});
  // Removing what is not there succeeds; the name can be stored again.
  CHECK(s.remove_set("live/gone.example").has_value());
  CHECK(s.remove_set("live/never.example").has_value());
  REQUIRE(s.put_set("live/gone.example", {{"fullchain.pem", "again"}}).has_value());
  CHECK(s.get("live/gone.example/fullchain.pem")->value() == "again");
  // Reserved directories and bad keys are refused.
  CHECK_FALSE(s.remove_set("archive/kept.example").has_value());
  CHECK_FALSE(s.remove_set("locks").has_value());
  CHECK_FALSE(s.remove_set("live/../accounts").has_value());
  CHECK_FALSE(s.remove_set("").has_value());
  // A file is not a set.
  CHECK_FALSE(s.remove_set("accounts/ca/account.json").has_value());
  CHECK(s.get("accounts/ca/account.json")->has_value());
  CHECK(leftovers(dir.path).empty());
}

TEST_CASE("remove_set deletes an old layout plain directory") {
  StorageDir dir;
  FileStorage s(dir.path);
  REQUIRE(s.put("live/old.example/fullchain.pem", "old chain").has_value());
  REQUIRE(s.put("live/old.example/privkey.pem", "old key", true).has_value());
  REQUIRE(s.remove_set("live/old.example").has_value());
  CHECK_FALSE(fs::exists(dir.path / "live/old.example"));
  CHECK(s.list("live")->empty());
  CHECK(leftovers(dir.path).empty());
}

TEST_CASE("put_set readers never see a new chain with an old key") {
  // A reader opening the two files through live/<name>/ while a writer switches versions sees
  // a matching pair whenever both opens resolve the same version; readers that re-open after
  // a switch see the new pair. Here: every pair read whole from one resolved directory matches.
  StorageDir dir;
  FileStorage s(dir.path);
  REQUIRE(s.put_set("live/a.example", {{"privkey.pem", "k0", true}, {"fullchain.pem", "c0"}}).has_value());
  std::atomic<bool> stop{false};
  std::atomic<int> mismatches{0}, reads{0};
  std::thread reader([&] {
    while (!stop) {
      std::error_code ec;
      fs::path version = fs::canonical(dir.path / "live/a.example", ec);  // one resolution
      if (ec) continue;
      std::ifstream c(version / "fullchain.pem"), k(version / "privkey.pem");
      std::string cs, ks;
      std::getline(c, cs);
      std::getline(k, ks);
      if (cs.empty() || ks.empty()) continue;  // pruned under us: an old version, skip
      ++reads;
      if (cs.substr(1) != ks.substr(1)) ++mismatches;
    }
  });
  for (int i = 1; i <= 200; ++i) {
    REQUIRE(s.put_set("live/a.example", {{"privkey.pem", "k" + std::to_string(i), true},
                                         {"fullchain.pem", "c" + std::to_string(i)}}).has_value());
  }
  stop = true;
  reader.join();
  CHECK(mismatches == 0);
  CHECK(reads > 0);
}

}  // TEST_SUITE
