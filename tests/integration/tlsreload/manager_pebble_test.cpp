// Manager against a real Pebble: http-01 answered from the ChallengeStore, storage reuse across
// managers, forced renewal, and two managers sharing one storage directory.

#include <doctest/doctest.h>

#include <atomic>
#include <filesystem>
#include <thread>

#include <httplib.h>

#include "tests/support/pebble_env.h"
#include "tlsreload/manager.h"

using namespace autotls;
using namespace autotls::tlsreload;
using autotls::testing::PebbleEnv;
using autotls::testing::PebbleOptions;
namespace fs = std::filesystem;

namespace {

// ChallengeServer answers GET /.well-known/acme-challenge/<token> from a ChallengeStore, as the
// server/ module's HTTP listener does, on the port Pebble validates http-01 against.
class ChallengeServer {
 public:
  ChallengeServer(int port, std::shared_ptr<ChallengeStore> store) : store_(std::move(store)) {
    server_.Get(R"(/\.well-known/acme-challenge/([A-Za-z0-9_-]+))",
                [this](const httplib::Request& req, httplib::Response& res) {
                  auto ka = store_->http01(req.matches[1].str());
                  if (!ka) {
                    res.status = 404;
                    return;
                  }
                  ++hits_;
                  res.set_content(*ka, "text/plain");
                });
    REQUIRE(server_.bind_to_port("127.0.0.1", port));
    // Bound before the thread starts: connections queue in the backlog until it accepts.
    thread_ = std::thread([this] { server_.listen_after_bind(); });
  }
  ~ChallengeServer() {
    server_.stop();
    thread_.join();
  }
  int hits() const { return hits_.load(); }

 private:
  std::shared_ptr<ChallengeStore> store_;
  httplib::Server server_;
  std::thread thread_;
  std::atomic<int> hits_{0};
};

struct TempDir {
  fs::path path;
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "autotls-mgr-pebble-XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

ManagerOptions pebble_options(PebbleEnv& env) {
  ManagerOptions o;
  o.directory_url = env.directory_url();
  o.ca_bundle = env.ca_bundle_path();
  o.email = "admin@example.test";
  o.agree_to_terms = true;
  o.challenge_type = "http-01";
  return o;
}

std::string require_ok(const Status& st, PebbleEnv& env) {
  REQUIRE_MESSAGE(st.has_value(), (st ? "" : st.error().message + "\n" + env.log_tail()));
  return {};
}

}  // namespace

TEST_SUITE("tlsreload.manager_pebble") {

TEST_CASE("obtain then load from storage then forced renew") {
  AUTOTLS_START_PEBBLE(env, PebbleOptions{});
  TempDir dir;
  auto challenges = std::make_shared<ChallengeStore>();
  ChallengeServer http(env->http_port(), challenges);
  auto storage = std::make_shared<FileStorage>(dir.path);
  const std::vector<std::string> names{"site.example.test", "www.site.example.test"};

  auto store = std::make_shared<CertStore>();
  Manager first(pebble_options(*env), storage, store, challenges);
  require_ok(first.manage(names), *env);
  CHECK(first.counters().obtained == 1);
  auto cert = store->lookup("www.site.example.test");
  REQUIRE(cert);
  CHECK(cert->names() == names);
  CHECK(http.hits() >= 1);  // Pebble really fetched the token from the ChallengeStore
  CHECK(challenges->size() == 0);
  CHECK(fs::exists(dir.path / "live/site.example.test/fullchain.pem"));

  // A second manager (a restart) on the same storage: same certificate, no order.
  auto store2 = std::make_shared<CertStore>();
  Manager second(pebble_options(*env), storage, store2, challenges);
  require_ok(second.manage(names), *env);
  CHECK(second.counters().loaded == 1);
  CHECK(second.counters().obtained == 0);
  auto loaded = store2->lookup("site.example.test");
  REQUIRE(loaded);
  CHECK(loaded->fingerprint() == cert->fingerprint());

  // Forced renewal swaps the certificate in the store and on disk.
  auto version = store2->version();
  require_ok(second.renew(names, true), *env);
  CHECK(second.counters().renewed == 1);
  auto renewed = store2->lookup("site.example.test");
  REQUIRE(renewed);
  CHECK(renewed->fingerprint() != cert->fingerprint());
  CHECK(store2->version() > version);
  CHECK(store2->lookup("www.site.example.test")->id() == renewed->id());
  auto meta = storage->get("live/site.example.test/meta.json");
  REQUIRE(meta.has_value());
  REQUIRE(meta->has_value());
  CHECK(CertificateState::from_json(**meta)->cert_id == renewed->id());
}

TEST_CASE("two managers sharing a storage directory issue a name once") {
  AUTOTLS_START_PEBBLE(env, PebbleOptions{});
  TempDir dir;
  auto challenges = std::make_shared<ChallengeStore>();
  ChallengeServer http(env->http_port(), challenges);
  const std::vector<std::string> names{"shared.example.test"};

  std::vector<std::shared_ptr<CertStore>> stores{std::make_shared<CertStore>(), std::make_shared<CertStore>()};
  std::vector<std::string> errors(2);
  std::vector<Manager::Counters> counters(2);
  std::vector<std::thread> threads;
  for (int i = 0; i < 2; ++i) {
    threads.emplace_back([&, i] {
      // Separate storage objects on one directory, as two processes would have.
      Manager m(pebble_options(*env), std::make_shared<FileStorage>(dir.path), stores[i], challenges);
      auto st = m.manage(names);
      if (!st) errors[i] = st.error().message;
      counters[i] = m.counters();
    });
  }
  for (auto& t : threads) t.join();
  CHECK_MESSAGE(errors[0].empty(), (errors[0] + "\n" + env->log_tail()));
  CHECK_MESSAGE(errors[1].empty(), errors[1]);
  auto a = stores[0]->lookup("shared.example.test");
  auto b = stores[1]->lookup("shared.example.test");
  REQUIRE(a);
  REQUIRE(b);
  CHECK(a->fingerprint() == b->fingerprint());
  CHECK(counters[0].obtained + counters[1].obtained == 1);
  CHECK(counters[0].loaded + counters[1].loaded == 1);
}

}  // TEST_SUITE
