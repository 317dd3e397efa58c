// Issuer fallback against a real Pebble: the first issuer is a CA that cannot be reached (a
// closed loopback port) or answers 500 to everything (a loopback server), and Pebble, second,
// issues.

#include <doctest/doctest.h>

#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <thread>

#include <httplib.h>

#include "tests/support/net.h"
#include "tests/support/pebble_env.h"
#include "tests/support/test_solver.h"
#include "tlsreload/manager.h"

using namespace autotls;
using namespace autotls::tlsreload;
using autotls::testing::PebbleEnv;
using autotls::testing::PebbleOptions;
using autotls::testing::PebbleSolver;
namespace fs = std::filesystem;

namespace {

struct Dir {
  fs::path path;
  Dir() {
    std::string tmpl = (fs::temp_directory_path() / "autotls-issuer-pebble-XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
  }
  ~Dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

// BrokenCA answers every request with HTTP 500 and a serverInternal problem.
class BrokenCA {
 public:
  BrokenCA() {
    auto handler = [this](const httplib::Request&, httplib::Response& res) {
      ++hits_;
      res.status = 500;
      res.set_content(R"({"type":"urn:ietf:params:acme:error:serverInternal","detail":"down for maintenance"})",
                      "application/problem+json");
    };
    server_.Get(".*", handler);
    server_.Post(".*", handler);
    port_ = autotls::testing::bind_claimed(server_);  // never a PebbleEnv port still unbound
    thread_ = std::thread([this] { server_.listen_after_bind(); });
  }
  ~BrokenCA() {
    server_.stop();
    thread_.join();
  }
  std::string directory_url() const { return "http://127.0.0.1:" + std::to_string(port_) + "/directory"; }
  int hits() const { return hits_.load(); }

 private:
  httplib::Server server_;
  std::thread thread_;
  int port_ = 0;
  std::atomic<int> hits_{0};
};

ManagerOptions fallback_options(PebbleEnv& env, const std::string& first_url, std::shared_ptr<acme::Solver> solver) {
  ManagerOptions o;
  IssuerConfig first;
  first.name = "broken";
  first.directory_url = first_url;
  IssuerConfig pebble;
  pebble.name = "pebble";
  pebble.directory_url = env.directory_url();
  pebble.ca_bundle = env.ca_bundle_path();
  o.issuers = {first, pebble};
  o.email = "admin@example.test";
  o.agree_to_terms = true;
  o.solver = std::move(solver);
  // Few and quick retries against the broken CA, so the test stays short.
  o.client_options.max_server_retries = 1;
  return o;
}

}  // namespace

TEST_SUITE("tlsreload.issuer_pebble") {

TEST_CASE("issuer fallback to pebble when the first CA is unreachable or failing") {
  AUTOTLS_START_PEBBLE(env, PebbleOptions{});
  auto solver = std::make_shared<PebbleSolver>(*env);
  BrokenCA broken;
  // Refuses connections, and is not one of the Pebble ports the solver's responders bind.
  autotls::testing::RefusedPort refused;
  const std::vector<std::string> urls{"http://127.0.0.1:" + std::to_string(refused.port()) + "/directory",
                                      broken.directory_url()};
  for (size_t i = 0; i < urls.size(); ++i) {
    CAPTURE(urls[i]);
    Dir dir;
    auto storage = std::make_shared<FileStorage>(dir.path);
    auto store = std::make_shared<CertStore>();
    Manager m(fallback_options(*env, urls[i], solver), storage, store, std::make_shared<ChallengeStore>());
    std::string name = "fallback" + std::to_string(i) + ".example.test";
    auto st = m.manage({name});
    REQUIRE_MESSAGE(st.has_value(), (st ? "" : st.error().message + "\n" + env->log_tail()));
    CHECK(m.counters().obtained == 1);
    CHECK(m.counters().fallbacks == 1);
    REQUIRE(store->lookup(name));
    auto meta = storage->get("live/" + name + "/meta.json");
    REQUIRE(meta.has_value());
    REQUIRE(meta->has_value());
    auto state = CertificateState::from_json(**meta);
    REQUIRE(state.has_value());
    CHECK(state->issuer_name == "pebble");
    CHECK(state->directory_url == env->directory_url());
    // Only Pebble's account was created.
    auto accounts = storage->list("accounts");
    REQUIRE(accounts.has_value());
    CHECK(accounts->size() == 2);
  }
  CHECK(broken.hits() >= 1);
  CHECK(solver->presented() >= 2);
}

}  // TEST_SUITE
