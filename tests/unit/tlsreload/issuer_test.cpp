// Issuer fallback with two in-process fake CAs, the fall-through rule, the expiring event and
// abandoning an issuance at shutdown.

#include <doctest/doctest.h>

#include <atomic>
#include <filesystem>
#include <future>
#include <mutex>
#include <thread>

#include <nlohmann/json.hpp>

#include "tests/support/fake_acme.h"
#include "tests/support/fake_clock.h"
#include "tlsreload/manager.h"

using namespace autotls;
using namespace autotls::tlsreload;
using autotls::testing::FakeAcmeServer;
using autotls::testing::FakeAcmeTransport;
using autotls::testing::FakeClock;
using autotls::testing::problem_reply;
namespace fs = std::filesystem;
using namespace std::chrono_literals;

namespace {

// DownTransport is a CA nobody can reach.
class DownTransport : public acme::HttpTransport {
 public:
  Result<acme::HttpResponse> send(const acme::HttpRequest&) override {
    ++calls;
    return tl::unexpected(Error(Errc::transport, "connect: connection refused (injected)"));
  }
  std::atomic<int> calls{0};
};

struct TwoCAs {
  fs::path dir;
  FakeClock clock{std::chrono::system_clock::now()};
  std::shared_ptr<FakeAcmeServer> first, second;
  std::shared_ptr<FakeAcmeTransport> first_transport, second_transport;
  std::shared_ptr<FileStorage> storage;
  std::shared_ptr<CertStore> certs = std::make_shared<CertStore>();
  std::shared_ptr<ChallengeStore> challenges = std::make_shared<ChallengeStore>();
  std::mutex mu;
  std::vector<ManagerEvent> events;

  TwoCAs() {
    std::string tmpl = (fs::temp_directory_path() / "autotls-issuer-XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    dir = tmpl;
    FakeAcmeServer::Options a;
    a.base = "https://first.test";
    a.ari = false;
    FakeAcmeServer::Options b;
    b.base = "https://second.test";
    b.ari = false;
    first = std::make_shared<FakeAcmeServer>(a);
    second = std::make_shared<FakeAcmeServer>(b);
    first_transport = std::make_shared<FakeAcmeTransport>(first);
    second_transport = std::make_shared<FakeAcmeTransport>(second);
    storage = std::make_shared<FileStorage>(dir, &clock);
  }
  ~TwoCAs() {
    first->intercept = nullptr;
    second->intercept = nullptr;
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  ManagerOptions options() {
    ManagerOptions o;
    IssuerConfig one;
    one.name = "first";
    one.directory_url = first->directory_url();
    one.transport = first_transport;
    IssuerConfig two;
    two.name = "second";
    two.directory_url = second->directory_url();
    two.transport = second_transport;
    o.issuers = {one, two};
    o.email = "admin@example.test";
    o.agree_to_terms = true;
    o.clock = &clock;
    o.rng_seed = 7;
    o.on_event = [this](const ManagerEvent& e) {
      std::lock_guard lock(mu);
      events.push_back(e);
    };
    return o;
  }
  std::unique_ptr<Manager> manager() { return std::make_unique<Manager>(options(), storage, certs, challenges); }
  std::vector<ManagerEvent::Type> event_types() {
    std::lock_guard lock(mu);
    std::vector<ManagerEvent::Type> out;
    for (auto& e : events) out.push_back(e.type);
    return out;
  }
  CertificateState meta(const std::string& name) {
    auto text = storage->get("live/" + name + "/meta.json");
    REQUIRE(text.has_value());
    REQUIRE(text->has_value());
    auto s = CertificateState::from_json(**text);
    REQUIRE(s.has_value());
    return *s;
  }
};

// order_reply answers an order poll with an order the CA gave up on.
acme::HttpResponse invalid_order(FakeAcmeServer& ca, const std::string& url) {
  acme::HttpResponse r;
  r.status = 200;
  r.headers = {{"Content-Type", "application/json"}, {"Replay-Nonce", ca.issue_nonce()}};
  r.body = nlohmann::json{{"status", "invalid"},
                          {"identifiers", {{{"type", "dns"}, {"value", "example.com"}}}},
                          {"authorizations", nlohmann::json::array()},
                          {"finalize", url + "/finalize"},
                          {"error", {{"type", "urn:ietf:params:acme:error:serverInternal"}, {"detail", "gave up"}}}}
               .dump();
  return r;
}

const std::vector<std::string> kNames{"example.com", "www.example.com"};

}  // namespace

TEST_SUITE("tlsreload.issuer") {

TEST_CASE("falls_through moves on for CA side failures and stops for local ones") {
  CHECK(falls_through(Error(Errc::transport, "connect: refused")));
  CHECK(falls_through(Error(Errc::timeout, "total timeout")));
  CHECK(falls_through(Error(Errc::bad_response, "directory: not JSON")));
  Error server(Errc::protocol, "newOrder: HTTP 500");
  server.http_status = 500;
  CHECK(falls_through(server));
  Error limited(Errc::protocol, "newOrder: rateLimited");
  limited.problem = acme::Problem{"urn:ietf:params:acme:error:rateLimited", "too many", "", 429, {}};
  CHECK(falls_through(limited));
  CHECK(falls_through(Error(Errc::protocol, "order is invalid, not ready to finalize")));
  CHECK(falls_through(Error(Errc::invalid_input, "the CA offers no tls-alpn-01 challenge for a.test (it offers: http-01)")));

  Error validation(Errc::protocol, "validation of example.com by http-01 failed: authorization is invalid: 404");
  validation.problem = acme::Problem{"urn:ietf:params:acme:error:unauthorized", "404", "", 403, {}};
  CHECK_FALSE(falls_through(validation));
  Error caa = validation;
  caa.problem = acme::Problem{"urn:ietf:params:acme:error:caa", "CAA forbids", "", 403, {}};
  CHECK(falls_through(caa));  // another CA may be allowed by CAA, and checks it itself

  CHECK_FALSE(falls_through(Error(Errc::cancelled, "poll: cancelled")));
  CHECK_FALSE(falls_through(Error(Errc::io, "storage: disk full")));
  CHECK_FALSE(falls_through(Error(Errc::crypto, "key generation")));
  CHECK_FALSE(falls_through(Error(Errc::invalid_input, "newOrder: no identifiers")));
}

TEST_CASE("the second issuer is used when the first fails in each CA side way") {
  struct Case {
    const char* what;
    std::function<void(TwoCAs&)> break_first;
  };
  std::vector<Case> cases{
      {"unreachable", [](TwoCAs& e) { e.first_transport->fail_next(1'000'000); }},
      {"server error",
       [](TwoCAs& e) {
         FakeAcmeServer* ca = e.first.get();
         e.first->intercept = [ca](const acme::HttpRequest& req) -> std::optional<acme::HttpResponse> {
           if (req.url.ends_with("/new-order")) return problem_reply(*ca, 500, "serverInternal");
           return std::nullopt;
         };
       }},
      {"rate limited",
       [](TwoCAs& e) {
         FakeAcmeServer* ca = e.first.get();
         e.first->intercept = [ca](const acme::HttpRequest& req) -> std::optional<acme::HttpResponse> {
           if (req.url.ends_with("/new-order")) return problem_reply(*ca, 429, "rateLimited", {{"Retry-After", "3600"}});
           return std::nullopt;
         };
       }},
      {"order invalid",
       [](TwoCAs& e) {
         FakeAcmeServer* ca = e.first.get();
         e.first->intercept = [ca](const acme::HttpRequest& req) -> std::optional<acme::HttpResponse> {
           if (req.url.find("/order/") != std::string::npos) return invalid_order(*ca, req.url);
           return std::nullopt;
         };
       }},
  };
  for (auto& c : cases) {
    CAPTURE(c.what);
    TwoCAs env;
    c.break_first(env);
    auto m = env.manager();
    auto st = m->manage(kNames);
    REQUIRE_MESSAGE(st.has_value(), (st ? "" : st.error().message));
    CHECK(env.second->orders().size() == 1);
    CHECK(m->counters().obtained == 1);
    CHECK(m->counters().fallbacks == 1);
    CHECK(m->counters().failed == 0);
    auto served = env.certs->lookup("example.com");
    REQUIRE(served);
    // meta.json names the issuer that issued.
    auto meta = env.meta("example.com");
    CHECK(meta.issuer_name == "second");
    CHECK(meta.directory_url == env.second->directory_url());
    // The first CA's failure is an event of its own, then the certificate from the second.
    REQUIRE(env.event_types() == std::vector{ManagerEvent::Type::issuer_failed, ManagerEvent::Type::obtained});
    const auto& f = env.events.front();
    CHECK(f.issuer == "first");
    CHECK(f.next_issuer == "second");
    CHECK(f.fallback);
    CHECK(f.name == "example.com");
    CHECK(f.names == kNames);
    REQUIRE(f.error.has_value());
    CHECK(!f.error->message.empty());
    CHECK(env.events.back().issuer == "second");
  }
}

TEST_CASE("an issuer failing is an issuer_failed event delivered before the next issuer is asked") {
  TwoCAs env;
  env.first_transport->fail_next(1'000'000);
  auto o = env.options();
  // What the second CA had seen when the event arrived: it must not have been asked yet, so a
  // command can say "trying the next issuer" before the next issuer's steps.
  size_t second_accounts = 99, second_orders = 99;
  std::vector<ManagerEvent::Type> types;
  o.on_event = [&](const ManagerEvent& e) {
    types.push_back(e.type);
    if (e.type == ManagerEvent::Type::issuer_failed) {
      second_accounts = env.second->accounts();
      second_orders = env.second->orders().size();
    }
  };
  Manager m(o, env.storage, env.certs, env.challenges);
  REQUIRE(m.manage(kNames).has_value());
  CHECK(types == std::vector{ManagerEvent::Type::issuer_failed, ManagerEvent::Type::obtained});
  CHECK(second_accounts == 0);
  CHECK(second_orders == 0);
  CHECK(env.second->orders().size() == 1);
  CHECK(to_string(ManagerEvent::Type::issuer_failed) == "issuer_failed");
}

TEST_CASE("an unreachable issuer with another after it is asked twice and a sole one four times") {
  constexpr int kMany = 1'000'000;
  {
    // Nothing answers the first CA's directory: one retry, then the second CA.
    TwoCAs env;
    env.first_transport->fail_next(kMany);
    auto m = env.manager();
    REQUIRE(m->manage(kNames).has_value());
    CHECK(kMany - env.first_transport->fail_pending() == 2);
    CHECK(env.meta("example.com").issuer_name == "second");
  }
  {
    // A blip (one lost request) at the first CA is still met by the retry: it issues.
    TwoCAs env;
    env.first_transport->fail_next(1);
    auto m = env.manager();
    REQUIRE(m->manage(kNames).has_value());
    CHECK(env.meta("example.com").issuer_name == "first");
    CHECK(env.second->orders().empty());
  }
  {
    // The only CA keeps every retry (1 + max_server_retries): it may be restarting.
    TwoCAs env;
    env.first_transport->fail_next(kMany);
    auto o = env.options();
    o.issuers.resize(1);
    Manager m(o, env.storage, env.certs, env.challenges);
    REQUIRE_FALSE(m.manage(kNames).has_value());
    CHECK(kMany - env.first_transport->fail_pending() == 4);
  }
}

TEST_CASE("a failed validation does not fall through to the next issuer") {
  TwoCAs env;
  FakeAcmeServer::Options a;
  a.base = "https://first.test";
  a.ari = false;
  a.failing_identifiers = {"www.example.com"};
  env.first = std::make_shared<FakeAcmeServer>(a);
  env.first_transport = std::make_shared<FakeAcmeTransport>(env.first);
  auto m = env.manager();
  auto st = m->manage(kNames);
  REQUIRE_FALSE(st.has_value());
  CHECK(st.error().message.find("validation of www.example.com") != std::string::npos);
  CHECK(env.first->orders().size() == 1);
  CHECK(env.second->orders().empty());
  CHECK(env.second->accounts() == 0);
  CHECK(m->counters().failed == 1);
  // Said as an issuer_failed event that does not fall back, then the failure.
  REQUIRE(env.event_types() == std::vector{ManagerEvent::Type::issuer_failed, ManagerEvent::Type::failed});
  CHECK(env.events.front().issuer == "first");
  CHECK(env.events.front().next_issuer == "second");
  CHECK_FALSE(env.events.front().fallback);
}

TEST_CASE("when every issuer fails the error names each one") {
  TwoCAs env;
  env.first_transport->fail_next(1'000'000);
  FakeAcmeServer* ca = env.second.get();
  env.second->intercept = [ca](const acme::HttpRequest& req) -> std::optional<acme::HttpResponse> {
    if (req.url.ends_with("/new-order")) return problem_reply(*ca, 429, "rateLimited", {{"Retry-After", "7200"}});
    return std::nullopt;
  };
  auto m = env.manager();
  auto st = m->manage(kNames);
  REQUIRE_FALSE(st.has_value());
  CHECK(st.error().message.find("issuer first: ") != std::string::npos);
  CHECK(st.error().message.find("issuer second: ") != std::string::npos);
  // The backoff honours the last CA's Retry-After.
  auto s = m->state(kNames).value();
  REQUIRE(s.next_attempt.has_value());
  CHECK(*s.next_attempt >= env.clock.now() + 7200s);
  CHECK(s.last_error.find("issuer first") != std::string::npos);
}

TEST_CASE("accounts are kept per CA and renewal starts at the first issuer again") {
  TwoCAs env;
  env.first_transport->fail_next(1'000'000);
  auto m = env.manager();
  REQUIRE(m->manage(kNames).has_value());
  CHECK(env.meta("example.com").issuer_name == "second");
  // The first CA is back: the forced renewal goes to it, with its own account.
  env.first_transport->fail_next(0);
  REQUIRE(m->renew(kNames, true).has_value());
  CHECK(env.first->orders().size() == 1);
  CHECK(env.second->orders().size() == 1);
  auto meta = env.meta("example.com");
  CHECK(meta.issuer_name == "first");
  CHECK(meta.directory_url == env.first->directory_url());
  CHECK(env.first->accounts() == 1);
  CHECK(env.second->accounts() == 1);
  auto accounts = env.storage->list("accounts");
  REQUIRE(accounts.has_value());
  CHECK(accounts->size() == 4);  // account.json + account.key per CA
  CHECK(m->counters().renewed == 1);
  CHECK(m->counters().fallbacks == 1);
}

TEST_CASE("a renewal failing near expiry raises expiring with the error") {
  TwoCAs env;
  ManagerOptions o = env.options();
  o.issuers.resize(1);
  auto m = std::make_unique<Manager>(o, env.storage, env.certs, env.challenges);
  REQUIRE(m->manage(kNames).has_value());
  FakeAcmeServer* ca = env.first.get();
  env.first->intercept = [ca](const acme::HttpRequest& req) -> std::optional<acme::HttpResponse> {
    if (req.url.ends_with("/new-order")) return problem_reply(*ca, 403, "unauthorized");
    return std::nullopt;
  };
  auto not_after = m->state(kNames)->not_after;
  // Due but with plenty of time left: failed, not yet expiring.
  env.clock.advance(std::chrono::duration_cast<std::chrono::milliseconds>(*m->renewal_time(kNames) - env.clock.now() + 1s));
  CHECK(m->renew_due().value() == 0);
  CHECK(m->counters().expiring == 0);
  CHECK(env.event_types().back() == ManagerEvent::Type::failed);
  // Three days before expiry.
  env.clock.advance(std::chrono::duration_cast<std::chrono::milliseconds>(not_after - 72h - env.clock.now()));
  CHECK(m->renew_due().value() == 0);
  CHECK(m->counters().expiring == 1);
  CHECK(m->counters().failed == 2);
  std::lock_guard lock(env.mu);
  REQUIRE(env.events.size() >= 2);
  const auto& e = env.events.back();
  CHECK(e.type == ManagerEvent::Type::expiring);
  REQUIRE(e.error.has_value());
  CHECK(e.error->message.find("unauthorized") != std::string::npos);
  REQUIRE(e.not_after.has_value());
  CHECK(*e.not_after == not_after);
  CHECK(env.meta("example.com").last_error.find("unauthorized") != std::string::npos);
}

TEST_CASE("stop with a grace period abandons an issuance held in processing") {
  TwoCAs env;
  FakeAcmeServer::Options a;
  a.base = "https://slow.test";
  a.ari = false;
  a.order_processing_polls = 1'000'000;  // the order never leaves "processing"
  a.poll_retry_after = 1;
  env.first = std::make_shared<FakeAcmeServer>(a);
  env.first_transport = std::make_shared<FakeAcmeTransport>(env.first);
  std::atomic<bool> finalized{false};
  env.first->intercept = [&](const acme::HttpRequest& req) -> std::optional<acme::HttpResponse> {
    if (req.url.find("/finalize/") != std::string::npos) finalized = true;
    return std::nullopt;
  };
  ManagerOptions o = env.options();
  o.clock = nullptr;  // real waits, so that the poll really blocks
  auto m = std::make_unique<Manager>(o, env.storage, env.certs, env.challenges);
  auto fut = std::async(std::launch::async, [&] { return m->manage(kNames); });
  auto until = std::chrono::steady_clock::now() + 10s;
  while (!finalized && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(10ms);
  REQUIRE(finalized);
  auto t0 = std::chrono::steady_clock::now();
  m->stop(200ms);
  REQUIRE(fut.wait_for(10s) == std::future_status::ready);
  auto st = fut.get();
  auto took = std::chrono::steady_clock::now() - t0;
  CHECK(took < 5s);  // generous: the grace period plus one poll round trip
  REQUIRE_FALSE(st.has_value());
  CHECK(st.error().code == Errc::cancelled);
  CHECK(m->counters().abandoned == 1);
  CHECK(m->counters().failed == 0);  // no backoff for an abandoned attempt
  CHECK(env.second->orders().empty());  // cancellation does not fall through
  // Nothing written, and the storage lock is free for the next process.
  CHECK_FALSE(fs::exists(env.dir / "live" / "example.com" / "fullchain.pem"));
  CHECK_FALSE(fs::exists(env.dir / "live" / "example.com" / "privkey.pem"));
  auto lock = env.storage->try_lock("cert/example.com", 60s);
  REQUIRE(lock.has_value());
  CHECK(lock->has_value());
  CHECK(env.certs->lookup("example.com") == nullptr);
}

}  // TEST_SUITE
