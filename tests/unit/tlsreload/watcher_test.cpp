// CertWatcher over real files and inotify: replaced pairs reload, bad files are reported once
// and change nothing, half-written pairs wait, new directories load, removed ones keep serving.

#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <thread>

#include "tests/support/recording_logger.h"
#include "tests/support/temp_dir.h"
#include "tests/unit/tlsreload/test_ca.h"
#include "tlsreload/store.h"
#include "tlsreload/watcher.h"

using namespace autotls;
using namespace autotls::tlsreload;
namespace fs = std::filesystem;
using namespace std::chrono_literals;
using autotls::testing::RecordingLogger;

namespace {

// put writes a file the way careful writers do: a temporary file renamed over the target.
void put(const fs::path& p, const std::string& data) {
  fs::create_directories(p.parent_path());
  fs::path tmp = p.parent_path() / (".tmp-" + p.filename().string());
  std::ofstream(tmp, std::ios::binary) << data;
  fs::rename(tmp, p);
}

// relink points link at target by renaming a new symlink over it (atomic, as certbot does).
void relink(const fs::path& link, const fs::path& target) {
  fs::path tmp = link.parent_path() / (".new-" + link.filename().string());
  std::error_code ec;
  fs::remove(tmp, ec);
  fs::create_symlink(target, tmp);
  fs::rename(tmp, link);
}

template <class Pred>
bool wait_for(Pred pred, std::chrono::milliseconds limit = 10s) {
  auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(10ms);
  }
  return pred();
}

std::string id_of(const testing::Issued& i) {
  auto c = Certificate::from_pem(i.cert_pem, i.key_pem, LoadOptions{});
  REQUIRE(c.has_value());
  return (*c)->id();
}

struct Fixture {
  testing::TestCa ca{"Watch"};
  testing::TempDir dir{"tlsreload-watch"};
  std::shared_ptr<CertStore> store = std::make_shared<CertStore>();
  std::mutex mu;
  std::vector<WatchEvent> events;
  WatcherOptions options;
  RecordingLogger logger;

  Fixture() {
    options.logger = &logger;
    options.debounce = 50ms;
    options.pair_grace = 1500ms;
    options.on_event = [this](const WatchEvent& e) {
      std::lock_guard lock(mu);
      events.push_back(e);
    };
  }
  std::string served(const std::string& name) {
    auto c = store->lookup(name);
    return c ? c->id() : std::string();
  }
  int count(WatchEvent::Type t) {
    std::lock_guard lock(mu);
    int n = 0;
    for (auto& e : events) n += e.type == t;
    return n;
  }
  std::vector<WatchEvent> of(WatchEvent::Type t) {
    std::lock_guard lock(mu);
    std::vector<WatchEvent> out;
    for (auto& e : events) {
      if (e.type == t) out.push_back(e);
    }
    return out;
  }
  void write_pair(const fs::path& d, const testing::Issued& i) {
    put(d / "privkey.pem", i.key_pem);
    put(d / "fullchain.pem", ca.chain_pem(i));
  }
};

}  // namespace

TEST_SUITE("tlsreload.watcher") {

TEST_CASE("watcher reloads a replaced pair and serves the new certificate") {
  Fixture f;
  auto v1 = f.ca.issue({"a.test"});
  auto b = f.ca.issue({"b.test"});
  f.write_pair(f.dir.path / "a.test", v1);
  f.write_pair(f.dir.path / "b.test", b);
  CertWatcher w(f.store, f.options);
  auto report = w.add_directory(f.dir.path);
  REQUIRE(report.has_value());
  CHECK(report->certificates.size() == 2);
  CHECK(report->failures.empty());
  CHECK(f.served("a.test") == id_of(v1));
  REQUIRE(w.start());

  auto v2 = f.ca.issue({"a.test"});
  f.write_pair(f.dir.path / "a.test", v2);
  CHECK(wait_for([&] { return f.served("a.test") == id_of(v2); }));
  // The watcher counts a reload after publishing it: the count may trail what is served.
  CHECK(wait_for([&] { return w.counters().reloaded >= 1; }));
  CHECK(w.counters().reloaded == 1);
  CHECK(w.counters().failed == 0);
  CHECK(f.served("b.test") == id_of(b));  // the other pair is untouched
  // The old certificate left the store: it is no longer held by any name.
  auto listed = f.store->snapshot()->certificates();
  CHECK(listed.size() == 2);

  // A second replacement in the same directory works as well (watches survive renames).
  auto v3 = f.ca.issue({"a.test"});
  f.write_pair(f.dir.path / "a.test", v3);
  CHECK(wait_for([&] { return f.served("a.test") == id_of(v3); }));
  CHECK(w.failures().empty());

  // Reading the files does not wake the watcher again: with nothing changing it stays idle.
  std::this_thread::sleep_for(200ms);
  auto checks = w.counters().checks;
  std::this_thread::sleep_for(300ms);
  CHECK(w.counters().checks == checks);
}

TEST_CASE("watcher follows certbot symlink swaps in live and archive") {
  Fixture f;
  fs::path live = f.dir.path / "live" / "c.test", archive = f.dir.path / "archive" / "c.test";
  auto v1 = f.ca.issue({"c.test"});
  put(archive / "fullchain1.pem", f.ca.chain_pem(v1));
  put(archive / "privkey1.pem", v1.key_pem);
  fs::create_directories(live);
  fs::create_symlink("../../archive/c.test/fullchain1.pem", live / "fullchain.pem");
  fs::create_symlink("../../archive/c.test/privkey1.pem", live / "privkey.pem");
  CertWatcher w(f.store, f.options);
  REQUIRE(w.add_directory(f.dir.path).has_value());
  CHECK(f.served("c.test") == id_of(v1));
  REQUIRE(w.start());

  // certbot's renewal: new archive files, then each live symlink replaced by rename.
  auto v2 = f.ca.issue({"c.test"});
  put(archive / "fullchain2.pem", f.ca.chain_pem(v2));
  put(archive / "privkey2.pem", v2.key_pem);
  relink(live / "privkey.pem", "../../archive/c.test/privkey2.pem");
  relink(live / "fullchain.pem", "../../archive/c.test/fullchain2.pem");
  CHECK(wait_for([&] { return f.served("c.test") == id_of(v2); }));
  CHECK(w.counters().failed == 0);
  CHECK(w.counters().full_checks == 1);  // the add only: the swap was found from its events

  // An archive file rewritten in place (no symlink change) is seen through the target's
  // directory watch.
  auto v3 = f.ca.issue({"c.test"});
  put(archive / "privkey2.pem", v3.key_pem);
  put(archive / "fullchain2.pem", f.ca.chain_pem(v3));
  CHECK(wait_for([&] { return f.served("c.test") == id_of(v3); }));
}

TEST_CASE("watcher swaps a directory symlink pair at once") {
  // The layout FileStorage writes: live/<name> is a symlink to archive/<name>/<N>/.
  Fixture f;
  auto v1 = f.ca.issue({"d.test"});
  f.write_pair(f.dir.path / "archive" / "d.test" / "1", v1);
  fs::create_directories(f.dir.path / "live");
  fs::create_symlink("../archive/d.test/1", f.dir.path / "live" / "d.test");
  CertWatcher w(f.store, f.options);
  REQUIRE(w.add_directory(f.dir.path / "live").has_value());
  CHECK(f.served("d.test") == id_of(v1));
  REQUIRE(w.start());
  auto v2 = f.ca.issue({"d.test"});
  f.write_pair(f.dir.path / "archive" / "d.test" / "2", v2);
  relink(f.dir.path / "live" / "d.test", "../archive/d.test/2");
  CHECK(wait_for([&] { return f.served("d.test") == id_of(v2); }));
  // And again: the watch follows the new target, not the first one.
  auto v3 = f.ca.issue({"d.test"});
  f.write_pair(f.dir.path / "archive" / "d.test" / "3", v3);
  relink(f.dir.path / "live" / "d.test", "../archive/d.test/3");
  fs::remove_all(f.dir.path / "archive" / "d.test" / "1");
  CHECK(wait_for([&] { return f.served("d.test") == id_of(v3); }));
  CHECK(w.counters().failed == 0);
  CHECK(w.counters().full_checks == 1);
  // The third target is watched through the swapped link: a rewrite there is seen.
  auto v4 = f.ca.issue({"d.test"});
  f.write_pair(f.dir.path / "archive" / "d.test" / "3", v4);
  CHECK(wait_for([&] { return f.served("d.test") == id_of(v4); }));
}

TEST_CASE("watcher reports a bad replacement naming the file and keeps the old certificate") {
  Fixture f;
  f.options.pair_grace = 200ms;
  auto v1 = f.ca.issue({"a.test"});
  f.write_pair(f.dir.path / "a.test", v1);
  CertWatcher w(f.store, f.options);
  REQUIRE(w.add_directory(f.dir.path).has_value());
  REQUIRE(w.start());

  fs::path chain = f.dir.path / "a.test" / "fullchain.pem";
  put(chain, "-----BEGIN CERTIFICATE-----\ngarbage\n");
  REQUIRE(wait_for([&] { return f.count(WatchEvent::Type::failed) == 1; }));
  auto failed = f.of(WatchEvent::Type::failed);
  CHECK(failed[0].path == chain);
  REQUIRE(failed[0].error.has_value());
  CHECK(failed[0].error->message.find(chain.string()) != std::string::npos);
  CHECK(f.served("a.test") == id_of(v1));
  REQUIRE(w.failures().size() == 1);
  CHECK(w.failures()[0].path == chain);
  // The log names the file and the reason too.
  int logged = 0;
  for (const auto& l : f.logger.lines()) {
    if (l.starts_with("error ") && l.find("file=" + chain.string()) != std::string::npos &&
        l.find("error=") != std::string::npos) {
      ++logged;
    }
  }
  CHECK(logged == 1);

  // The same bad file is reported once, not on every look.
  w.rescan();
  std::this_thread::sleep_for(300ms);
  CHECK(w.counters().failed == 1);

  // An expired certificate with its key names the chain file too.
  auto spec = f.ca.spec({"a.test"});
  spec.not_before = f.ca.now() - 48h;
  spec.not_after = f.ca.now() - 24h;
  auto expired = f.ca.issue(spec);
  f.write_pair(f.dir.path / "a.test", expired);
  REQUIRE(wait_for([&] { return f.count(WatchEvent::Type::failed) == 2; }));
  CHECK(f.of(WatchEvent::Type::failed)[1].error->message.find("expired") != std::string::npos);
  CHECK(f.served("a.test") == id_of(v1));

  // A key file that is not a key names the key file.
  auto v2 = f.ca.issue({"a.test"});
  put(chain, f.ca.chain_pem(v2));
  put(f.dir.path / "a.test" / "privkey.pem", "not a key\n");
  REQUIRE(wait_for([&] { return f.count(WatchEvent::Type::failed) == 3; }));
  CHECK(f.of(WatchEvent::Type::failed)[2].path == f.dir.path / "a.test" / "privkey.pem");
  CHECK(f.served("a.test") == id_of(v1));

  // Fixed: the good pair is published and the failure is gone.
  put(f.dir.path / "a.test" / "privkey.pem", v2.key_pem);
  CHECK(wait_for([&] { return f.served("a.test") == id_of(v2); }));
  CHECK(w.failures().empty());
}

TEST_CASE("watcher waits for the second file of a half written pair") {
  Fixture f;
  f.options.pair_grace = 3s;
  auto v1 = f.ca.issue({"a.test"});
  f.write_pair(f.dir.path / "a.test", v1);
  CertWatcher w(f.store, f.options);
  REQUIRE(w.add_directory(f.dir.path).has_value());
  REQUIRE(w.start());

  // The certificate first; the key well after the debounce (a slow writer).
  auto v2 = f.ca.issue({"a.test"});
  put(f.dir.path / "a.test" / "fullchain.pem", f.ca.chain_pem(v2));
  std::this_thread::sleep_for(400ms);
  CHECK(w.counters().failed == 0);
  CHECK(f.served("a.test") == id_of(v1));
  put(f.dir.path / "a.test" / "privkey.pem", v2.key_pem);
  CHECK(wait_for([&] { return f.served("a.test") == id_of(v2); }));
  CHECK(w.counters().failed == 0);

  // A mismatch that stays is reported once the grace is over, once.
  auto v3 = f.ca.issue({"a.test"});
  put(f.dir.path / "a.test" / "fullchain.pem", f.ca.chain_pem(v3));
  // The counter moves before the event reaches the callback: wait for both.
  REQUIRE(wait_for([&] { return w.counters().failed == 1 && f.count(WatchEvent::Type::failed) == 1; }));
  CHECK(f.of(WatchEvent::Type::failed)[0].error->message.find("does not match") != std::string::npos);
  CHECK(f.served("a.test") == id_of(v2));
  std::this_thread::sleep_for(300ms);
  CHECK(w.counters().failed == 1);
}

TEST_CASE("watcher serves a new directory and keeps serving a removed one") {
  Fixture f;
  auto a = f.ca.issue({"a.test"});
  f.write_pair(f.dir.path / "a.test", a);
  CertWatcher w(f.store, f.options);
  REQUIRE(w.add_directory(f.dir.path).has_value());
  REQUIRE(w.start());

  // A new directory, created the way a copy creates it: directory, then files.
  auto n = f.ca.issue({"new.test", "www.new.test"});
  f.write_pair(f.dir.path / "new.test", n);
  CHECK(wait_for([&] { return f.served("www.new.test") == id_of(n); }));
  CHECK(wait_for([&] { return w.counters().loaded == 2; }));  // counted after it is served

  // Removing a directory keeps its last good certificate serving, and says so.
  fs::remove_all(f.dir.path / "a.test");
  REQUIRE(wait_for([&] { return f.count(WatchEvent::Type::removed) == 1; }));
  CHECK(f.of(WatchEvent::Type::removed)[0].path == f.dir.path / "a.test" / "fullchain.pem");
  CHECK(f.served("a.test") == id_of(a));
  CHECK(w.counters().failed == 0);

  // Put back with a new certificate: served.
  auto a2 = f.ca.issue({"a.test"});
  f.write_pair(f.dir.path / "a.test", a2);
  CHECK(wait_for([&] { return f.served("a.test") == id_of(a2); }));
}

TEST_CASE("watcher publishes a removed pair put back as it was, and reports it with its certificate") {
  Fixture f;
  auto a = f.ca.issue({"a.test"});
  f.write_pair(f.dir.path / "a.test", a);
  CertWatcher w(f.store, f.options);
  REQUIRE(w.add_directory(f.dir.path).has_value());
  REQUIRE(w.start());
  fs::remove_all(f.dir.path / "a.test");
  REQUIRE(wait_for([&] { return f.count(WatchEvent::Type::removed) == 1; }));
  CHECK(f.served("a.test") == id_of(a));
  // Taken out of the store by someone else meanwhile (serve's verification behind a snapshot
  // removes a pair gone while it was down).
  REQUIRE(f.store->remove(id_of(a)));
  CHECK(f.served("a.test").empty());
  // Put back with the same files: served again, and reported with its certificate.
  f.write_pair(f.dir.path / "a.test", a);
  REQUIRE(wait_for([&] { return f.served("a.test") == id_of(a); }));
  REQUIRE(wait_for([&] { return f.count(WatchEvent::Type::reloaded) == 1; }));
  auto ev = f.of(WatchEvent::Type::reloaded)[0];
  REQUIRE(ev.cert);
  CHECK(ev.cert->id() == id_of(a));
  CHECK(ev.previous == ev.cert);
  CHECK(w.counters().reloaded == 1);
  CHECK(w.counters().failed == 0);
}

// serve hands a configured name over to a file certificate: it removes the ACME renewal that
// took the name in that instant and puts the file's certificate back. Another thread may have
// reloaded the same pair meanwhile; what goes back must be the pair's newest certificate, not
// the one the handing-over burst carried. No watcher thread: every step is a call here.
TEST_CASE("watcher republish puts back a pair's newest certificate, not an older one") {
  Fixture f;
  auto v1 = f.ca.issue({"a.test"});
  f.write_pair(f.dir.path / "a.test", v1);
  CertWatcher w(f.store, f.options);
  REQUIRE(w.add_directory(f.dir.path).has_value());
  REQUIRE(f.count(WatchEvent::Type::loaded) == 1);
  // The burst that hands a.test over carries v1 and its pair.
  const auto burst = f.of(WatchEvent::Type::loaded)[0];
  REQUIRE(burst.cert);
  CHECK(burst.cert->id() == id_of(v1));
  CHECK(burst.path == f.dir.path / "a.test" / "fullchain.pem");

  // Another thread (a SIGHUP rescan) reloads the pair: v2 is its certificate now.
  auto v2 = f.ca.issue({"a.test"});
  f.write_pair(f.dir.path / "a.test", v2);
  w.rescan();
  REQUIRE(f.served("a.test") == id_of(v2));
  // An ACME renewal for a.test takes the name (v2 leaves the store: replaced on all its
  // names), and the hand-over removes it: a.test has no certificate for a moment.
  auto r = f.ca.issue({"a.test"});
  auto rc = Certificate::from_pem(f.ca.chain_pem(r), r.key_pem, LoadOptions{});
  REQUIRE(rc.has_value());
  REQUIRE(f.store->publish(*rc));
  REQUIRE(f.served("a.test") == id_of(r));
  REQUIRE(f.store->remove(id_of(r)));
  REQUIRE(f.served("a.test").empty());

  // The file's certificate goes back: the pair's newest (v2), not the burst's v1.
  auto back = w.republish(burst.path);
  REQUIRE(back);
  CHECK(back->id() == id_of(v2));
  CHECK(f.served("a.test") == id_of(v2));
  CHECK(f.served("a.test") != id_of(v1));
  // Again: a no-op (v2 holds its names already).
  const auto version = f.store->version();
  CHECK(w.republish(burst.path) == back);
  CHECK(f.store->version() == version);
  // A pair the watcher does not know: nothing.
  CHECK_FALSE(w.republish(f.dir.path / "b.test" / "fullchain.pem"));
  CHECK(f.store->version() == version);
}

// The watcher's indexes point at map keys (a watched directory's candidates, an inotify
// watch's directories). Pairs whose symlinks share one target directory, sources added after
// (the source list grows), a candidate removed and made again: every event still finds live
// keys (run under AUTOTLS_ASAN, a dangling one is a use after free).
TEST_CASE("watcher follows pairs sharing a symlink target directory as candidates come and go") {
  Fixture f;
  const fs::path src = f.dir.path / "src", shared = f.dir.path / "shared";
  auto link_pair = [&](const std::string& name) {
    fs::create_directories(src / name);
    fs::create_symlink("../../shared/" + name + ".crt", src / name / "fullchain.pem");
    fs::create_symlink("../../shared/" + name + ".key", src / name / "privkey.pem");
  };
  auto put_shared = [&](const std::string& name, const testing::Issued& i) {
    put(shared / (name + ".key"), i.key_pem);
    put(shared / (name + ".crt"), f.ca.chain_pem(i));
  };
  std::map<std::string, testing::Issued> certs;
  for (const char* n : {"a1.test", "a2.test", "a3.test"}) {
    certs.emplace(n, f.ca.issue({n}));
    put_shared(n, certs.at(n));
    link_pair(n);
  }
  CertWatcher w(f.store, f.options);
  REQUIRE(w.add_directory(src).has_value());
  // More sources after the first: the list of sources grows (and moves) behind its keys.
  std::vector<testing::Issued> explicit_pairs;
  for (int k = 0; k < 4; ++k) {
    const std::string n = "p" + std::to_string(k) + ".test";
    explicit_pairs.push_back(f.ca.issue({n}));
    f.write_pair(f.dir.path / "explicit" / n, explicit_pairs.back());
    REQUIRE(w.add_pair({f.dir.path / "explicit" / n / "fullchain.pem", f.dir.path / "explicit" / n / "privkey.pem"})
                .has_value());
  }
  for (const auto& [n, i] : certs) CHECK(f.served(n) == id_of(i));
  REQUIRE(w.start());

  // a2's directory goes: its candidate is forgotten (its watch on shared/ released).
  fs::remove_all(src / "a2.test");
  REQUIRE(wait_for([&] { return f.count(WatchEvent::Type::removed) == 1; }));
  // A change in shared/ concerns a1 and a3 only now.
  auto a1v2 = f.ca.issue({"a1.test"});
  put_shared("a1.test", a1v2);
  CHECK(wait_for([&] { return f.served("a1.test") == id_of(a1v2); }));
  // a2 comes back with a new certificate: a new candidate, watched on shared/ again.
  auto a2v2 = f.ca.issue({"a2.test"});
  put_shared("a2.test", a2v2);
  link_pair("a2.test");
  CHECK(wait_for([&] { return f.served("a2.test") == id_of(a2v2); }));
  auto a2v3 = f.ca.issue({"a2.test"});
  put_shared("a2.test", a2v3);
  CHECK(wait_for([&] { return f.served("a2.test") == id_of(a2v3); }));
  // The last source added is still followed.
  auto p3v2 = f.ca.issue({"p3.test"});
  f.write_pair(f.dir.path / "explicit" / "p3.test", p3v2);
  CHECK(wait_for([&] { return f.served("p3.test") == id_of(p3v2); }));
  w.rescan();
  CHECK(f.served("a3.test") == id_of(certs.at("a3.test")));
  CHECK(w.counters().failed == 0);
}

TEST_CASE("watcher reloads an explicit pair behind a swapped data symlink") {
  // A Kubernetes secret mount: tls.crt -> ..data/tls.crt, ..data -> ..<timestamp>/.
  Fixture f;
  fs::path mount = f.dir.path / "secret";
  auto v1 = f.ca.issue({"k.test"});
  put(mount / "..v1" / "tls.crt", f.ca.chain_pem(v1));
  put(mount / "..v1" / "tls.key", v1.key_pem);
  fs::create_symlink("..v1", mount / "..data");
  fs::create_symlink("..data/tls.crt", mount / "tls.crt");
  fs::create_symlink("..data/tls.key", mount / "tls.key");
  CertWatcher w(f.store, f.options);
  auto report = w.add_pair({mount / "tls.crt", mount / "tls.key"});
  REQUIRE(report.has_value());
  CHECK(report->certificates.size() == 1);
  CHECK(f.served("k.test") == id_of(v1));
  REQUIRE(w.start());
  auto v2 = f.ca.issue({"k.test"});
  put(mount / "..v2" / "tls.crt", f.ca.chain_pem(v2));
  put(mount / "..v2" / "tls.key", v2.key_pem);
  relink(mount / "..data", "..v2");
  fs::remove_all(mount / "..v1");
  CHECK(wait_for([&] { return f.served("k.test") == id_of(v2); }));
  CHECK(w.counters().failed == 0);
  CHECK(w.counters().full_checks == 1);
  // Swapped again: the watch moved to ..v2 and on to ..v3.
  auto v3 = f.ca.issue({"k.test"});
  put(mount / "..v3" / "tls.crt", f.ca.chain_pem(v3));
  put(mount / "..v3" / "tls.key", v3.key_pem);
  relink(mount / "..data", "..v3");
  fs::remove_all(mount / "..v2");
  CHECK(wait_for([&] { return f.served("k.test") == id_of(v3); }));

  // A pair whose directory does not exist cannot be watched.
  CHECK_FALSE(w.add_pair({f.dir.path / "nope" / "c.pem", f.dir.path / "nope" / "k.pem"}).has_value());
  CHECK_FALSE(w.add_directory(f.dir.path / "nope").has_value());
}

TEST_CASE("watcher checks only the pairs a change names, among 200") {
  Fixture f;
  // Long enough that the two files of a pair written back to back land in one check even on a
  // loaded machine; the bounds below allow for a second check anyway.
  f.options.debounce = 300ms;
  constexpr int kPairs = 200;
  std::vector<testing::Issued> issued;
  for (int i = 0; i < kPairs; ++i) {
    issued.push_back(f.ca.issue({"p" + std::to_string(i) + ".test"}));
    f.write_pair(f.dir.path / "live" / ("p" + std::to_string(i) + ".test"), issued.back());
  }
  CertWatcher w(f.store, f.options);
  auto report = w.add_directory(f.dir.path);
  REQUIRE(report.has_value());
  CHECK(report->certificates.size() == kPairs);
  auto c0 = w.counters();
  CHECK(c0.full_checks == 1);
  CHECK(c0.pairs_checked >= kPairs);
  CHECK(c0.pairs_parsed == kPairs);
  REQUIRE(w.start());

  // One pair replaced: one pair looked at and parsed, one reloaded, no full check.
  auto v2 = f.ca.issue({"p17.test"});
  f.write_pair(f.dir.path / "live" / "p17.test", v2);
  REQUIRE(wait_for([&] { return f.served("p17.test") == id_of(v2); }));
  REQUIRE(wait_for([&] { return w.counters().reloaded == 1; }));
  auto c1 = w.counters();
  CHECK(c1.full_checks == c0.full_checks);
  CHECK(c1.reloaded == 1);
  CHECK(c1.loaded == kPairs);
  CHECK(c1.pairs_parsed - c0.pairs_parsed <= 2);  // 2: a check fell between the two files
  CHECK(c1.pairs_checked - c0.pairs_checked <= 6);  // not 200
  CHECK(f.served("p16.test") == id_of(issued[16]));

  // A new directory: watched and loaded, still without looking at the 200 others.
  auto n = f.ca.issue({"new.test"});
  f.write_pair(f.dir.path / "live" / "new.test", n);
  REQUIRE(wait_for([&] { return f.served("new.test") == id_of(n); }));
  REQUIRE(wait_for([&] { return w.counters().loaded == kPairs + 1; }));  // counted after it is served
  auto c2 = w.counters();
  CHECK(c2.full_checks == c0.full_checks);
  CHECK(c2.loaded == kPairs + 1);
  CHECK(c2.pairs_checked - c1.pairs_checked <= 6);
  // ... and watched from then on.
  auto n2 = f.ca.issue({"new.test"});
  f.write_pair(f.dir.path / "live" / "new.test", n2);
  REQUIRE(wait_for([&] { return f.served("new.test") == id_of(n2); }));

  // A directory created empty and filled only after a check looked at it is still seen: the
  // empty directory is watched too.
  auto checks = w.counters().checks;
  fs::create_directories(f.dir.path / "live" / "late.test");
  REQUIRE(wait_for([&] { return w.counters().checks > checks; }));
  auto late = f.ca.issue({"late.test"});
  f.write_pair(f.dir.path / "live" / "late.test", late);
  REQUIRE(wait_for([&] { return f.served("late.test") == id_of(late); }));

  // A removed directory: reported, its certificate keeps serving.
  fs::remove_all(f.dir.path / "live" / "p3.test");
  REQUIRE(wait_for([&] { return f.count(WatchEvent::Type::removed) == 1; }));
  CHECK(f.served("p3.test") == id_of(issued[3]));
  auto c3 = w.counters();
  CHECK(c3.full_checks == c0.full_checks);
  CHECK(c3.pairs_parsed - c0.pairs_parsed <= 8);
  CHECK(c3.failed == 0);

  // rescan() (SIGHUP) still looks at every pair, and parses none that did not change.
  w.rescan();
  auto c4 = w.counters();
  CHECK(c4.full_checks == c0.full_checks + 1);
  CHECK(c4.pairs_checked - c3.pairs_checked >= kPairs);
  CHECK(c4.pairs_parsed == c3.pairs_parsed);
  CHECK(c4.removed == 1);  // not reported again
}

TEST_CASE("watcher adopts a bulk-loaded directory and parses only the pairs that changed since") {
  Fixture f;
  constexpr int kPairs = 20;
  std::vector<testing::Issued> issued;
  for (int i = 0; i < kPairs; ++i) {
    issued.push_back(f.ca.issue({"q" + std::to_string(i) + ".test"}));
    f.write_pair(f.dir.path / "live" / ("q" + std::to_string(i) + ".test"), issued.back());
  }
  // A bad pair: the bulk load reports it, and so does the watcher's first check.
  auto other = f.ca.issue({"bad.test"});
  put(f.dir.path / "bad.test" / "fullchain.pem", f.ca.chain_pem(issued[0]));
  put(f.dir.path / "bad.test" / "privkey.pem", other.key_pem);
  LoadOptions lo = bulk_load_options();
  lo.record_sources = true;
  auto loaded = load_directory(f.dir.path, lo);
  REQUIRE(loaded.has_value());
  REQUIRE(loaded->failures.size() == 1);
  CHECK(loaded->failures[0].path == f.dir.path / "bad.test" / "fullchain.pem");
  CHECK(publish_all(*f.store, *loaded) == kPairs);
  REQUIRE(loaded->sources.size() == kPairs);

  // Between the load and the watch: one pair replaced, one added, one removed.
  auto v2 = f.ca.issue({"q5.test"});
  f.write_pair(f.dir.path / "live" / "q5.test", v2);
  auto added = f.ca.issue({"added.test"});
  f.write_pair(f.dir.path / "live" / "added.test", added);
  fs::remove_all(f.dir.path / "live" / "q9.test");

  CertWatcher w(f.store, f.options);
  auto report = w.adopt_directory(f.dir.path, *loaded);
  REQUIRE(report.has_value());
  auto c = w.counters();
  CHECK(c.full_checks == 1);
  // The 18 unchanged pairs are not read again: q5, added.test and the bad pair are.
  CHECK(c.pairs_parsed == 3);
  CHECK(c.reloaded == 1);
  CHECK(c.loaded == kPairs + 1);
  CHECK(c.removed == 1);
  CHECK(c.failed == 1);
  REQUIRE(report->failures.size() == 1);
  CHECK(report->failures[0].path == f.dir.path / "bad.test" / "fullchain.pem");
  CHECK(report->failures[0].error.message.find("does not match") != std::string::npos);
  CHECK(report->certificates.size() == 2);  // q5's new one and added.test's
  CHECK(f.served("q5.test") == id_of(v2));
  CHECK(f.served("added.test") == id_of(added));
  CHECK(f.served("q9.test") == id_of(issued[9]));  // removed: keeps serving
  CHECK(f.served("q4.test") == id_of(issued[4]));
  CHECK(f.store->snapshot()->certificates().size() == kPairs + 1);  // q5's old one left

  // And it watches: a replaced adopted pair is reloaded.
  REQUIRE(w.start());
  auto v3 = f.ca.issue({"q7.test"});
  f.write_pair(f.dir.path / "live" / "q7.test", v3);
  CHECK(wait_for([&] { return f.served("q7.test") == id_of(v3); }));
  CHECK(wait_for([&] { return w.counters().reloaded == 2; }));
  // rescan() parses nothing that did not change.
  auto before = w.counters().pairs_parsed;
  w.rescan();
  CHECK(w.counters().pairs_parsed == before);
}

TEST_CASE("watcher falls back to a full check when the inotify queue overflowed") {
  long max_queued = 0;
  std::ifstream("/proc/sys/fs/inotify/max_queued_events") >> max_queued;
  if (max_queued <= 0 || max_queued > 200000) {
    MESSAGE("skipped: fs.inotify.max_queued_events is " << max_queued << " (too many events to overflow it)");
    return;
  }
  Fixture f;
  auto a = f.ca.issue({"a.test"});
  auto b = f.ca.issue({"b.test"});
  f.write_pair(f.dir.path / "a.test", a);
  f.write_pair(f.dir.path / "b.test", b);
  CertWatcher w(f.store, f.options);
  REQUIRE(w.add_directory(f.dir.path).has_value());
  REQUIRE(w.start());
  // With the thread stopped nobody reads the queue; the watches stay. Fill the queue past its
  // limit (a file in the watched directory written and chmod-ed in turn: two events that the
  // kernel does not merge, and cheap), then change a pair: its events are lost, only the
  // overflow marker says something happened.
  w.stop();
  fs::path junk = f.dir.path / "junk";
  int fd = ::open(junk.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
  REQUIRE(fd >= 0);
  long failed_calls = 0;
  for (long i = 0; i < max_queued / 2 + 100; ++i) {
    failed_calls += ::write(fd, "x", 1) != 1;
    failed_calls += ::fchmod(fd, (i % 2) ? 0600 : 0640) != 0;
  }
  ::close(fd);
  REQUIRE(failed_calls == 0);
  auto a2 = f.ca.issue({"a.test"});
  f.write_pair(f.dir.path / "a.test", a2);
  CHECK(f.served("a.test") == id_of(a));
  auto before = w.counters();
  REQUIRE(w.start());
  CHECK(wait_for([&] { return f.served("a.test") == id_of(a2); }));
  auto after = w.counters();
  CHECK(after.full_checks >= before.full_checks + 1);
  CHECK(after.pairs_checked - before.pairs_checked >= 2);  // b.test was looked at as well
  CHECK(f.served("b.test") == id_of(b));
  CHECK(after.failed == 0);
  bool logged = false;
  for (const auto& l : f.logger.lines()) logged = logged || l.find("inotify queue overflowed") != std::string::npos;
  CHECK(logged);
  w.stop();
}

TEST_CASE("watcher stop returns promptly while a change waits for its debounce") {
  Fixture f;
  f.options.debounce = 60s;
  f.options.max_delay = 120s;
  auto a = f.ca.issue({"a.test"});
  f.write_pair(f.dir.path / "a.test", a);
  CertWatcher w(f.store, f.options);
  REQUIRE(w.add_directory(f.dir.path).has_value());
  REQUIRE(w.start());
  f.write_pair(f.dir.path / "a.test", f.ca.issue({"a.test"}));
  std::this_thread::sleep_for(100ms);
  auto t0 = std::chrono::steady_clock::now();
  w.stop();
  CHECK(std::chrono::steady_clock::now() - t0 < 5s);
  CHECK(f.served("a.test") == id_of(a));  // the debounce had not passed
  // Restartable, and rescan() applies pending changes at once.
  w.rescan();
  CHECK(f.served("a.test") != id_of(a));
  REQUIRE(w.start());
  w.stop();
}

TEST_CASE("watcher polls a watched directory that was deleted until it comes back") {
  Fixture f;
  f.options.fallback_poll = 200ms;
  fs::path root = f.dir.path / "certs";
  auto a = f.ca.issue({"a.test"});
  f.write_pair(root / "a.test", a);
  CertWatcher w(f.store, f.options);
  REQUIRE(w.add_directory(root).has_value());
  REQUIRE(w.start());
  fs::remove_all(root);
  REQUIRE(wait_for([&] { return f.count(WatchEvent::Type::removed) == 1; }));
  CHECK(f.served("a.test") == id_of(a));  // still serving the last good one
  // Recreated (a deploy that replaces the whole directory): found by polling, then watched.
  auto a2 = f.ca.issue({"a.test"});
  f.write_pair(root / "a.test", a2);
  CHECK(wait_for([&] { return f.served("a.test") == id_of(a2); }));
  auto a3 = f.ca.issue({"a.test"});
  f.write_pair(root / "a.test", a3);
  CHECK(wait_for([&] { return f.served("a.test") == id_of(a3); }));
  CHECK(w.counters().failed == 0);
}

}  // TEST_SUITE
