// Crash safety of the manager's storage: a child process renewing in a loop (against the
// in-process fake CA, so each renewal takes milliseconds) is killed with SIGKILL at random
// moments, over a hundred times; after each kill every stored certificate must be whole: the
// live pair loads and matches (Certificate::from_pem), meta.json parses and describes it.

#include <doctest/doctest.h>

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "acme/key.h"
#include "tests/support/fake_acme.h"
#include "tests/support/temp_dir.h"
#include "tlsreload/manager.h"

using namespace autotls;
using namespace autotls::tlsreload;
using autotls::testing::FakeAcmeServer;
using autotls::testing::FakeAcmeTransport;
namespace fs = std::filesystem;
using namespace std::chrono_literals;

namespace {

// ShiftedClock is real time plus an offset. Child n runs n minutes "later" than child n-1,
// so the storage lock a killed child left behind (ttl 1 s) has expired for the next one and
// is taken over, as it would be after a real second: the takeover path runs without the
// test sleeping through lock ttls.
class ShiftedClock : public Clock {
 public:
  explicit ShiftedClock(std::chrono::seconds offset) : offset_(offset) {}
  time_point now() const override { return std::chrono::system_clock::now() + offset_; }
  bool sleep_for(std::chrono::milliseconds d) override {
    std::this_thread::sleep_for(d);
    return true;
  }

 private:
  std::chrono::seconds offset_;
};

const std::vector<std::vector<std::string>> kSets{{"crash.test", "www.crash.test"}, {"other.test"}};

// renew_forever is the child: a Manager on the shared directory renewing both sets in turn
// until killed (or, as a safety net, after 20 s).
[[noreturn]] void renew_forever(const fs::path& dir, int generation) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  ShiftedClock clock(std::chrono::seconds(60 * generation));
  FakeAcmeServer::Options co;
  co.ari = false;
  co.authz_pending_polls = 0;
  co.order_processing_polls = 0;
  auto ca = std::make_shared<FakeAcmeServer>(co);
  ManagerOptions o;
  o.directory_url = ca->directory_url();
  o.agree_to_terms = true;
  o.transport = std::make_shared<FakeAcmeTransport>(ca);
  o.clock = &clock;
  o.lock_ttl = 1s;
  o.lock_wait = 5s;
  o.client_options.poll_initial = std::chrono::milliseconds(1);
  auto storage = std::make_shared<FileStorage>(dir, &clock);
  Manager m(o, storage, std::make_shared<CertStore>(), std::make_shared<ChallengeStore>());
  auto end = std::chrono::steady_clock::now() + 20s;
  for (const auto& names : kSets) (void)m.manage(names);
  while (std::chrono::steady_clock::now() < end) {
    for (const auto& names : kSets) (void)m.renew(names, /*force=*/true);
  }
  ::_exit(0);
}

std::optional<std::string> slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) return std::nullopt;
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// check_storage returns "" when every name set that has files holds a whole certificate, or
// what is wrong. ids receives the certificate id of each set.
std::string check_storage(const fs::path& dir, std::map<std::string, std::string>& ids) {
  for (const auto& names : kSets) {
    const std::string key = storage_name(names.front());
    fs::path live = dir / "live" / key;
    std::error_code ec;
    if (!fs::exists(live, ec)) {
      if (ids.count(key)) return key + ": live directory vanished";
      continue;
    }
    auto chain = slurp(live / "fullchain.pem");
    auto priv = slurp(live / "privkey.pem");
    auto meta = slurp(live / "meta.json");
    if (!chain || !priv || !meta) return key + ": a file is missing";
    auto cert = Certificate::from_pem(*chain, *priv, LoadOptions{});
    if (!cert) return key + ": " + cert.error().message;
    for (const auto& n : names) {
      const auto& have = (*cert)->names();
      if (std::find(have.begin(), have.end(), n) == have.end()) return key + ": does not cover " + n;
    }
    auto state = CertificateState::from_json(*meta);
    if (!state) return key + ": meta.json: " + state.error().message;
    if (state->cert_id != (*cert)->id()) return key + ": meta.json describes another certificate";
    ids[key] = (*cert)->id();
  }
  std::error_code ec;
  for (fs::recursive_directory_iterator it(dir / "accounts", ec), end; !ec && it != end; it.increment(ec)) {
    const auto& e = *it;
    if (e.path().filename() != "account.key") continue;
    auto pem = slurp(e.path());
    if (!pem || !acme::PrivateKey::from_pem(*pem)) return e.path().string() + ": not a whole key";
  }
  return "";
}

}  // namespace

TEST_SUITE("tlsreload.crash") {

TEST_CASE("storage stays whole when a renewing process is killed at random moments") {
  // On tmpfs when there is one: fsync costs milliseconds on a disk and nothing there, and a
  // killed process loses nothing the kernel already has (fsync matters for power loss, which
  // this test cannot cause). What is tested is that every state the files pass through, in
  // the order they are written and renamed, is a whole certificate.
  std::error_code shm_ec;
  fs::path base = fs::is_directory("/dev/shm", shm_ec) && ::access("/dev/shm", W_OK) == 0 ? fs::path("/dev/shm") : fs::path();
  testing::TempDir dir("autotls-crash", base);
  std::mt19937 rng(std::random_device{}());
  std::map<std::string, std::string> ids;
  std::set<std::string> seen;
  int generation = 0;

  // First a child that runs until both sets exist, so that every later kill has something
  // to damage.
  {
    pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) renew_forever(dir.path, generation);
    auto deadline = std::chrono::steady_clock::now() + 15s;
    while (std::chrono::steady_clock::now() < deadline) {
      std::map<std::string, std::string> now;
      if (check_storage(dir.path, now).empty() && now.size() == kSets.size()) break;
      std::this_thread::sleep_for(5ms);
    }
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    ++generation;
    std::string err = check_storage(dir.path, ids);
    REQUIRE_MESSAGE(err.empty(), err);
    REQUIRE(ids.size() == kSets.size());
  }

  int kills = 0, changes = 0, stale_locks = 0;
  const auto start = std::chrono::steady_clock::now();
  // Kills land 0-60 ms after the fork: in start-up, in the middle of renewals, between them.
  // A slow machine (sanitizers) that completes no renewal in 20 kills gets a wider window.
  int max_delay_us = 60000, since_change = 0;
  // settle: the widest window still completed no renewal (seen under ASan at load: every
  // renewal slower than 480 ms); the next child is killed only once it has completed one
  // (bounded), i.e. in the middle of its next.
  bool settle = false;
  // The budget bounds the test's time; it is not what is tested, and the loop normally ends at
  // 120 kills well before it. It was 25 s (60 s under sanitizers), and 120 kills took 18 s here
  // with the suite running at -j4: on CI's ~2x slower machine the budget ended the loop near
  // 80 kills and `kills >= 100` failed. Sanitizers make each fork and child several times
  // slower still.
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
  const auto budget = 180s;
#else
  const auto budget = 90s;
#endif
  while (kills < 120 && std::chrono::steady_clock::now() - start < budget) {
    pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) renew_forever(dir.path, generation);
    if (settle) {
      settle = false;
      auto deadline = std::chrono::steady_clock::now() + 15s;
      while (std::chrono::steady_clock::now() < deadline) {
        std::map<std::string, std::string> now;
        if (check_storage(dir.path, now).empty() && now.size() == ids.size() && now != ids) break;
        std::this_thread::sleep_for(5ms);
      }
      std::this_thread::sleep_for(std::chrono::microseconds(std::uniform_int_distribution<int>(0, 20000)(rng)));
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(std::uniform_int_distribution<int>(0, max_delay_us)(rng)));
    }
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    ++generation;
    ++kills;
    CHECK(WIFSIGNALED(status));

    auto before = ids;
    std::string err = check_storage(dir.path, ids);
    REQUIRE_MESSAGE(err.empty(), "after kill " << kills << ": " << err);
    bool changed = false;
    for (const auto& [k, id] : ids) {
      if (before[k] != id) ++changes, changed = true;
      seen.insert(id);
    }
    since_change = changed ? 0 : since_change + 1;
    if (since_change >= 20) {
      if (max_delay_us < 480000) {
        max_delay_us *= 2;
      } else {
        settle = true;
      }
      since_change = 0;
    }
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(dir.path / "locks", ec)) {
      if (e.path().extension() == ".lock") ++stale_locks;
    }
  }
  MESSAGE("kills: " << kills << ", renewals seen: " << changes << ", lock files found after kills: " << stale_locks
                    << ", in " << std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start).count()
                    << " ms");
  CHECK(kills >= 100);
  // The kills landed while renewals were in progress and renewals kept completing after
  // them: stale locks were taken over by the next child.
  CHECK(stale_locks > 0);
  CHECK(changes > 0);
  CHECK(seen.size() > 2);
  // Old archive versions are pruned (a killed child may leave one more than the limit).
  for (const auto& names : kSets) {
    int versions = 0;
    for (const auto& e : fs::directory_iterator(dir.path / "archive" / storage_name(names.front()))) {
      versions += !e.path().filename().string().starts_with('.');
    }
    CHECK(versions <= FileStorage::kKeepVersions + 1);
  }
}

}  // TEST_SUITE
