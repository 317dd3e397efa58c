// Client behaviour against an in-process fake CA: the whole RFC 8555 flow, and every retry
// and error path (badNonce, 5xx, Retry-After, rateLimited, malformed replies).

#include <doctest/doctest.h>

#include <openssl/pem.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <optional>
#include <random>
#include <thread>

#include "acme/ari.h"
#include "acme/client.h"
#include "acme/prefetch.h"
#include "acme/problem.h"
#include "acme/util/openssl.h"
#include "tests/support/fake_acme.h"
#include "tests/support/fake_ca_endpoint.h"
#include "tests/support/fake_clock.h"

using namespace autotls;
using namespace autotls::acme;
using autotls::testing::FakeAcmeServer;
using autotls::testing::FakeAcmeTransport;
using autotls::testing::FakeClock;
using autotls::testing::make_problem;
using std::chrono::milliseconds;
using std::chrono::seconds;

namespace {

struct RecordingSolver : Solver {
  std::vector<std::string> presented, cleaned;
  Status present(const Identifier& id, const Challenge& ch, std::string_view ka) override {
    CHECK(ka.starts_with(ch.token + "."));
    presented.push_back(id.value + " " + ch.type);
    return {};
  }
  void cleanup(const Identifier& id, const Challenge& ch, std::string_view) override {
    cleaned.push_back(id.value + " " + ch.type);
  }
};

struct Fixture {
  std::shared_ptr<FakeAcmeServer> ca;
  std::shared_ptr<FakeAcmeTransport> transport;
  FakeClock clock;
  std::unique_ptr<Client> client;

  explicit Fixture(FakeAcmeServer::Options o = {}) {
    ca = std::make_shared<FakeAcmeServer>(o);
    transport = std::make_shared<FakeAcmeTransport>(ca);
    ClientOptions opts;
    opts.directory_url = ca->directory_url();
    opts.transport = transport;
    opts.clock = &clock;
    auto c = Client::create(opts);
    REQUIRE_MESSAGE(c.has_value(), (c ? "" : c.error().message));
    client = std::move(*c);
  }

  std::shared_ptr<const Signer> new_signer(KeyType t = KeyType::ec256) {
    auto k = PrivateKey::generate(t);
    REQUIRE(k.has_value());
    return std::make_shared<KeySigner>(std::move(*k));
  }

  Account register_new(KeyType t = KeyType::ec256) {
    client->set_account(new_signer(t));
    auto a = client->register_account({{"mailto:admin@example.test"}, true, std::nullopt});
    REQUIRE_MESSAGE(a.has_value(), (a ? "" : a.error().message));
    return *a;
  }

  IssuedCertificate issue(std::vector<Identifier> ids, std::string type = "http-01") {
    RecordingSolver solver;
    ObtainRequest req;
    req.identifiers = std::move(ids);
    req.challenge_type = std::move(type);
    auto r = obtain(*client, req, solver);
    REQUIRE_MESSAGE(r.has_value(), (r ? "" : r.error().message));
    return *r;
  }
};

std::string cert_der(const std::string& chain_pem) {
  ossl::BioPtr bio(BIO_new_mem_buf(chain_pem.data(), static_cast<int>(chain_pem.size())));
  ossl::X509Ptr x(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  REQUIRE(x);
  unsigned char* der = nullptr;
  int len = i2d_X509(x.get(), &der);
  std::string out(reinterpret_cast<char*>(der), static_cast<size_t>(len));
  OPENSSL_free(der);
  return out;
}

}  // namespace

TEST_SUITE("acme.client") {

TEST_CASE("directory meta is read") {
  FakeAcmeServer::Options o;
  o.profiles = {{"classic", "the usual"}, {"shortlived", "six days"}};
  o.external_account_required = true;
  Fixture f(o);
  const auto& d = f.client->directory();
  CHECK(d.new_nonce == "https://ca.test/new-nonce");
  CHECK(d.renewal_info == "https://ca.test/renewal-info");
  CHECK(d.terms_of_service == "https://ca.test/terms");
  CHECK(d.external_account_required);
  CHECK(d.profiles.size() == 2);
  CHECK(d.profiles.at("shortlived") == "six days");
  CHECK(d.caa_identities == std::vector<std::string>{"ca.test"});
}

TEST_CASE("directory that is not usable is an error") {
  for (std::string body : {std::string("not json"), std::string("[1,2]"), std::string(R"({"newNonce":"x"})")}) {
    auto ca = std::make_shared<FakeAcmeServer>(FakeAcmeServer::Options{});
    ca->intercept = [body](const acme::HttpRequest&) -> std::optional<acme::HttpResponse> {
      acme::HttpResponse r;
      r.status = 200;
      r.headers.emplace_back("Content-Type", "application/json");
      r.body = body;
      return r;
    };
    ClientOptions opts;
    opts.directory_url = ca->directory_url();
    opts.transport = std::make_shared<FakeAcmeTransport>(ca);
    auto c = Client::create(opts);
    REQUIRE_FALSE(c.has_value());
    CHECK(c.error().code == Errc::bad_response);
    CHECK(c.error().message.starts_with("directory: "));
  }
}

TEST_CASE("create refuses missing transport or URL") {
  ClientOptions opts;
  CHECK(Client::create(opts).error().code == Errc::invalid_input);
}

TEST_CASE("account register find and re-register return one account") {
  Fixture f;
  auto key = f.new_signer();
  f.client->set_account(key);
  auto created = f.client->register_account({{"mailto:a@example.test"}, true, std::nullopt});
  REQUIRE(created.has_value());
  CHECK(created->status == "valid");
  CHECK(created->url.starts_with("https://ca.test/acct/"));
  CHECK(f.client->account_url() == created->url);

  f.client->set_account(key);
  auto found = f.client->find_account();
  REQUIRE(found.has_value());
  CHECK(found->url == created->url);
  auto again = f.client->register_account({{}, true, std::nullopt});
  REQUIRE(again.has_value());
  CHECK(again->url == created->url);
  CHECK(f.ca->accounts() == 1);
  CHECK(f.ca->nonce_errors() == 0);
  CHECK(f.ca->jws_errors() == 0);
}

TEST_CASE("find_account for an unknown key is accountDoesNotExist") {
  Fixture f;
  f.client->set_account(f.new_signer());
  auto found = f.client->find_account();
  REQUIRE_FALSE(found.has_value());
  REQUIRE(found.error().problem.has_value());
  CHECK(found.error().problem->is(problem_type::kAccountDoesNotExist));
  CHECK(found.error().code == Errc::protocol);
  CHECK_FALSE(found.error().retryable());
}

TEST_CASE("terms not agreed gives userActionRequired") {
  Fixture f;
  f.client->set_account(f.new_signer());
  auto a = f.client->register_account({{}, false, std::nullopt});
  REQUIRE_FALSE(a.has_value());
  CHECK(a.error().problem->is(problem_type::kUserActionRequired));
}

TEST_CASE("account keys of every type sign acceptably") {
  for (KeyType t : {KeyType::ec256, KeyType::ec384, KeyType::rsa2048}) {
    Fixture f;
    f.register_new(t);
    CHECK(f.client->fetch_account().has_value());
    CHECK(f.ca->jws_errors() == 0);
  }
}

TEST_CASE("external account binding") {
  FakeAcmeServer::Options o;
  o.external_account_required = true;
  o.eab_kid = "kid-1";
  o.eab_hmac_b64url = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
  Fixture f(o);
  f.client->set_account(f.new_signer());

  auto none = f.client->register_account({{}, true, std::nullopt});
  REQUIRE_FALSE(none.has_value());
  CHECK(none.error().code == Errc::invalid_input);  // refused before anything is sent
  CHECK(f.ca->accounts() == 0);

  auto wrong = f.client->register_account({{}, true, ExternalAccountBinding{"kid-1", "d3Jvbmcta2V5", "HS256"}});
  REQUIRE_FALSE(wrong.has_value());
  CHECK(wrong.error().problem->is(problem_type::kUnauthorized));

  auto ok = f.client->register_account({{}, true, ExternalAccountBinding{"kid-1", o.eab_hmac_b64url, "HS256"}});
  REQUIRE_MESSAGE(ok.has_value(), (ok ? "" : ok.error().message));
  CHECK(f.ca->accounts() == 1);
}

TEST_CASE("update contacts and deactivate") {
  Fixture f;
  f.register_new();
  auto u = f.client->update_account({"mailto:new@example.test"});
  REQUIRE(u.has_value());
  CHECK(u->contact == std::vector<std::string>{"mailto:new@example.test"});
  auto d = f.client->deactivate_account();
  REQUIRE(d.has_value());
  CHECK(d->status == "deactivated");
  auto after = f.client->fetch_account();
  REQUIRE_FALSE(after.has_value());
  CHECK(after.error().problem->is(problem_type::kUnauthorized));
}

TEST_CASE("key rollover switches the signing key") {
  Fixture f;
  auto old_key = f.new_signer();
  f.client->set_account(old_key);
  auto acct = f.client->register_account({{}, true, std::nullopt});
  REQUIRE(acct.has_value());
  auto new_key = f.new_signer(KeyType::ec384);
  auto st = f.client->change_key(new_key);
  REQUIRE_MESSAGE(st.has_value(), (st ? "" : st.error().message));
  CHECK(f.client->signer() == new_key);
  CHECK(f.client->fetch_account().has_value());
  // The old key no longer finds the account; the new one does.
  f.client->set_account(old_key);
  CHECK_FALSE(f.client->find_account().has_value());
  f.client->set_account(new_key);
  auto found = f.client->find_account();
  REQUIRE(found.has_value());
  CHECK(found->url == acct->url);
}

TEST_CASE("obtain issues a certificate by each challenge type") {
  for (std::string type : {"http-01", "dns-01", "tls-alpn-01"}) {
    Fixture f;
    f.register_new();
    RecordingSolver solver;
    ObtainRequest req;
    req.identifiers = {Identifier::dns("a.example.test"), Identifier::dns("b.example.test")};
    req.challenge_type = type;
    auto r = obtain(*f.client, req, solver);
    REQUIRE_MESSAGE(r.has_value(), (r ? "" : r.error().message));
    CHECK(split_pem_chain(r->chain_pem).size() == 2);
    CHECK(r->key_pem.find("BEGIN PRIVATE KEY") != std::string::npos);
    CHECK(r->order.status == "valid");
    CHECK(solver.presented.size() == 2);
    CHECK(solver.cleaned == solver.presented);
    CHECK(solver.presented[0] == "a.example.test " + type);
    CHECK(f.ca->nonce_errors() == 0);
    CHECK(f.ca->jws_errors() == 0);
  }
}

TEST_CASE("obtain a wildcard by dns-01 and an IP address") {
  Fixture f;
  f.register_new();
  RecordingSolver solver;
  ObtainRequest req;
  req.identifiers = {Identifier::dns("*.example.test")};
  req.challenge_type = "dns-01";
  auto r = obtain(*f.client, req, solver);
  REQUIRE_MESSAGE(r.has_value(), (r ? "" : r.error().message));
  CHECK(solver.presented == std::vector<std::string>{"*.example.test dns-01"});

  ObtainRequest ip;
  ip.identifiers = {Identifier::ip("127.0.0.1")};
  auto r2 = obtain(*f.client, ip, solver);
  REQUIRE_MESSAGE(r2.has_value(), (r2 ? "" : r2.error().message));
}

TEST_CASE("obtain with an unoffered challenge type names what is offered") {
  Fixture f;
  f.register_new();
  RecordingSolver solver;
  ObtainRequest req;
  req.identifiers = {Identifier::dns("*.example.test")};
  req.challenge_type = "http-01";
  auto r = obtain(*f.client, req, solver);
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().message.find("offers: dns-01") != std::string::npos);
}

TEST_CASE("failed validation is reported and material cleaned up") {
  FakeAcmeServer::Options o;
  o.failing_identifiers = {"bad.example.test"};
  Fixture f(o);
  f.register_new();
  RecordingSolver solver;
  ObtainRequest req;
  req.identifiers = {Identifier::dns("ok.example.test"), Identifier::dns("bad.example.test")};
  auto r = obtain(*f.client, req, solver);
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().message.find("bad.example.test") != std::string::npos);
  REQUIRE(r.error().problem.has_value());
  CHECK(r.error().problem->is(problem_type::kIncorrectResponse));
  CHECK(r.error().validation_failed);
  CHECK(solver.cleaned.size() == 2);
}

TEST_CASE("badNonce is retried with a fresh nonce") {
  Fixture f;
  f.register_new();
  int rejected = 0;
  f.ca->intercept = [&](const acme::HttpRequest& req) -> std::optional<acme::HttpResponse> {
    if (req.method == "POST" && rejected < 3) {
      ++rejected;
      return make_problem(*f.ca, 400, "badNonce", "stale nonce");
    }
    return std::nullopt;
  };
  auto a = f.client->fetch_account();
  REQUIRE_MESSAGE(a.has_value(), (a ? "" : a.error().message));
  CHECK(rejected == 3);
  CHECK(f.client->stats().bad_nonce_retries == 3);
}

TEST_CASE("badNonce retries are bounded") {
  Fixture f;
  f.register_new();
  int seen = 0;
  f.ca->intercept = [&](const acme::HttpRequest& req) -> std::optional<acme::HttpResponse> {
    if (req.method != "POST") return std::nullopt;
    ++seen;
    return make_problem(*f.ca, 400, "badNonce", "stale nonce");
  };
  auto a = f.client->fetch_account();
  REQUIRE_FALSE(a.has_value());
  CHECK(a.error().problem->is(problem_type::kBadNonce));
  CHECK(seen == f.client->options().max_bad_nonce_retries + 1);
}

TEST_CASE("server errors are retried after Retry-After") {
  Fixture f;
  f.register_new();
  int faults = 0;
  f.ca->intercept = [&](const acme::HttpRequest& req) -> std::optional<acme::HttpResponse> {
    if (req.method == "POST" && faults < 2) {
      ++faults;
      return make_problem(*f.ca, 503, "serverInternal", "busy", {{"Retry-After", "7"}});
    }
    return std::nullopt;
  };
  auto a = f.client->fetch_account();
  REQUIRE_MESSAGE(a.has_value(), (a ? "" : a.error().message));
  auto sleeps = f.clock.sleeps();
  REQUIRE(sleeps.size() == 2);
  CHECK(sleeps[0] == seconds(7));
  CHECK(f.client->stats().server_retries == 2);
}

TEST_CASE("a Retry-After beyond the cap ends the call with the delay") {
  Fixture f;
  f.register_new();
  f.ca->intercept = [&](const acme::HttpRequest& req) -> std::optional<acme::HttpResponse> {
    if (req.method == "POST") return make_problem(*f.ca, 503, "serverInternal", "maintenance", {{"Retry-After", "3600"}});
    return std::nullopt;
  };
  auto a = f.client->fetch_account();
  REQUIRE_FALSE(a.has_value());
  REQUIRE(a.error().retry_after.has_value());
  CHECK(*a.error().retry_after == seconds(3600));
  CHECK(a.error().retryable());
  CHECK(f.clock.sleeps().empty());
}

TEST_CASE("rateLimited is returned at once with its Retry-After") {
  Fixture f;
  f.register_new();
  int posts = 0;
  f.ca->intercept = [&](const acme::HttpRequest& req) -> std::optional<acme::HttpResponse> {
    if (req.url == "https://ca.test/new-order") {
      ++posts;
      return make_problem(*f.ca, 429, "rateLimited", "too many certificates for example.test",
                          {{"Retry-After", "Wed, 21 Oct 2037 07:28:00 GMT"}});
    }
    return std::nullopt;
  };
  auto o = f.client->new_order({{Identifier::dns("example.test")}, "", ""});
  REQUIRE_FALSE(o.has_value());
  CHECK(posts == 1);
  CHECK(o.error().problem->is(problem_type::kRateLimited));
  CHECK_FALSE(o.error().validation_failed);
  REQUIRE(o.error().retry_after.has_value());
  CHECK(o.error().retry_after->count() > 0);
  CHECK(o.error().message.find("newOrder: HTTP 429: rateLimited: too many") == 0);
}

TEST_CASE("transport faults are retried a bounded number of times") {
  Fixture f;
  f.register_new();
  f.transport->fail_next(2);
  CHECK(f.client->fetch_account().has_value());
  f.transport->fail_next(100);
  auto a = f.client->fetch_account();
  REQUIRE_FALSE(a.has_value());
  CHECK(a.error().code == Errc::transport);
  f.transport->fail_next(0);
}

TEST_CASE("polling honours Retry-After and gives up at the deadline") {
  FakeAcmeServer::Options o;
  o.poll_retry_after = 3;
  o.authz_pending_polls = 2;
  Fixture f(o);
  f.register_new();
  f.issue({Identifier::dns("slow.example.test")});
  bool saw_three = false;
  for (auto s : f.clock.sleeps()) saw_three |= s == seconds(3);
  CHECK(saw_three);

  FakeAcmeServer::Options never;
  never.authz_pending_polls = 1'000'000;
  Fixture g(never);
  g.register_new();
  RecordingSolver solver;
  ObtainRequest req;
  req.identifiers = {Identifier::dns("never.example.test")};
  auto r = obtain(*g.client, req, solver);
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == Errc::timeout);
  CHECK(solver.cleaned.size() == 1);
  // Backoff grows to poll_max and the total stays within poll_timeout.
  milliseconds total{0};
  for (auto s : g.clock.sleeps()) {
    CHECK(s <= g.client->options().poll_max);
    total += s;
  }
  CHECK(total <= g.client->options().poll_timeout);
}

TEST_CASE("replies that make no sense become errors") {
  struct Case {
    const char* name;
    std::function<void(acme::HttpResponse&)> mutate;
    Errc want;
  };
  std::vector<Case> cases = {
      {"malformed JSON", [](acme::HttpResponse& r) { r.body = "{\"status\": "; }, Errc::bad_response},
      {"wrong content type", [](acme::HttpResponse& r) {
         for (auto& h : r.headers) if (h.first == "Content-Type") h.second = "text/html";
       }, Errc::bad_response},
      {"missing Location", [](acme::HttpResponse& r) {
         std::erase_if(r.headers, [](auto& h) { return h.first == "Location"; });
       }, Errc::bad_response},
      {"missing finalize", [](acme::HttpResponse& r) {
         auto j = nlohmann::json::parse(r.body);
         j.erase("finalize");
         r.body = j.dump();
       }, Errc::bad_response},
      {"identifiers not objects", [](acme::HttpResponse& r) {
         auto j = nlohmann::json::parse(r.body);
         j["identifiers"] = {1, 2};
         r.body = j.dump();
       }, Errc::bad_response},
  };
  for (auto& c : cases) {
    CAPTURE(c.name);
    Fixture f;
    f.register_new();
    auto* ca = f.ca.get();
    bool inside = false;
    f.ca->intercept = [&, ca](const acme::HttpRequest& req) -> std::optional<acme::HttpResponse> {
      if (inside || req.url != "https://ca.test/new-order") return std::nullopt;
      inside = true;  // let the real server answer, then spoil its reply
      auto r = ca->handle(req);
      inside = false;
      c.mutate(r);
      return r;
    };
    auto o = f.client->new_order({{Identifier::dns("example.test")}, "", ""});
    REQUIRE_FALSE(o.has_value());
    CHECK(o.error().code == c.want);
    CHECK(o.error().message.starts_with("newOrder: "));
  }
}

TEST_CASE("a challenge token that is not base64url is refused") {
  Fixture f;
  f.register_new();
  auto o = f.client->new_order({{Identifier::dns("example.test")}, "", ""});
  REQUIRE(o.has_value());
  f.ca->intercept = [&](const acme::HttpRequest& req) -> std::optional<acme::HttpResponse> {
    if (req.url != o->authorizations[0]) return std::nullopt;
    acme::HttpResponse r;
    r.status = 200;
    r.headers = {{"Content-Type", "application/json"}, {"Replay-Nonce", "n1"}};
    r.body = R"({"status":"pending","identifier":{"type":"dns","value":"example.test"},
      "challenges":[{"type":"http-01","url":"https://ca.test/c","status":"pending","token":"../../etc/passwd"}]})";
    return r;
  };
  auto a = f.client->fetch_authorization(o->authorizations[0]);
  REQUIRE_FALSE(a.has_value());
  CHECK(a.error().code == Errc::bad_response);
}

TEST_CASE("garbage replies never crash the client") {
  std::mt19937 rng(12345);
  for (int i = 0; i < 200; ++i) {
    Fixture f;
    f.register_new();
    std::string garbage;
    int len = static_cast<int>(rng() % 300);
    for (int k = 0; k < len; ++k) garbage += static_cast<char>(rng() % 256);
    if (i % 3 == 0) garbage = "{\"status\":" + std::to_string(rng()) + ",\"identifiers\":\"x\",\"finalize\":[]}";
    int status = (i % 2) ? 200 : 400 + static_cast<int>(rng() % 200);
    f.ca->intercept = [&](const acme::HttpRequest& req) -> std::optional<acme::HttpResponse> {
      if (req.method != "POST") return std::nullopt;
      acme::HttpResponse r;
      r.status = status;
      r.headers = {{"Content-Type", (i % 4) ? "application/json" : "application/problem+json"},
                   {"Replay-Nonce", "n"}, {"Location", "https://ca.test/x"}, {"Retry-After", garbage.substr(0, 5)}};
      r.body = garbage;
      return r;
    };
    RecordingSolver solver;
    ObtainRequest req;
    req.identifiers = {Identifier::dns("example.test")};
    auto r = obtain(*f.client, req, solver);
    CHECK_FALSE(r.has_value());
  }
}

TEST_CASE("replaces is sent and refused replaces is retried without it") {
  Fixture f;
  f.register_new();
  auto first = f.issue({Identifier::dns("example.test")});
  auto id = ari_cert_id(first.chain_pem);
  REQUIRE(id.has_value());

  RecordingSolver solver;
  ObtainRequest req;
  req.identifiers = {Identifier::dns("example.test")};
  req.replaces = *id;
  auto second = obtain(*f.client, req, solver);
  REQUIRE_MESSAGE(second.has_value(), (second ? "" : second.error().message));
  auto orders = f.ca->orders();
  REQUIRE(orders.size() == 2);
  CHECK(orders[1].payload.value("replaces", "") == *id);

  // The same certificate again: the CA says alreadyReplaced, the client orders without it.
  auto third = obtain(*f.client, req, solver);
  REQUIRE_MESSAGE(third.has_value(), (third ? "" : third.error().message));
  orders = f.ca->orders();
  REQUIRE(orders.size() == 4);
  CHECK(orders[2].payload.value("replaces", "") == *id);
  CHECK_FALSE(orders[3].payload.contains("replaces"));
}

TEST_CASE("profiles are checked against the directory and sent") {
  FakeAcmeServer::Options o;
  o.profiles = {{"classic", ""}, {"shortlived", ""}};
  Fixture f(o);
  f.register_new();
  auto bad = f.client->new_order({{Identifier::dns("example.test")}, "tlsserver", ""});
  REQUIRE_FALSE(bad.has_value());
  CHECK(bad.error().code == Errc::invalid_input);
  CHECK(bad.error().message.find("classic, shortlived") != std::string::npos);
  auto good = f.client->new_order({{Identifier::dns("example.test")}, "shortlived", ""});
  REQUIRE(good.has_value());
  CHECK(good->profile == "shortlived");
  CHECK(f.ca->orders().back().payload.value("profile", "") == "shortlived");
}

TEST_CASE("renewal info from ARI") {
  Fixture f;
  f.register_new();
  auto cert = f.issue({Identifier::dns("example.test")});
  auto id = ari_cert_id(cert.chain_pem);
  REQUIRE(id.has_value());
  auto info = f.client->renewal_info(*id);
  REQUIRE_MESSAGE(info.has_value(), (info ? "" : info.error().message));
  CHECK(format_rfc3339(info->window_start) == "2030-01-01T00:00:00Z");
  CHECK(info->window_end - info->window_start == std::chrono::hours(24));
  CHECK(info->explanation_url == "https://ca.test/why");
  REQUIRE(info->retry_after.has_value());
  CHECK(*info->retry_after == seconds(21600));

  FakeAcmeServer::Options no_ari;
  no_ari.ari = false;
  Fixture g(no_ari);
  auto none = g.client->renewal_info(*id);
  REQUIRE_FALSE(none.has_value());
  CHECK(none.error().message.find("does not offer ARI") != std::string::npos);
}

TEST_CASE("preferred chain picks the alternate by issuer name") {
  Fixture f;
  f.register_new();
  RecordingSolver solver;
  ObtainRequest req;
  req.identifiers = {Identifier::dns("example.test")};
  auto plain = obtain(*f.client, req, solver);
  REQUIRE(plain.has_value());
  req.preferred_chain = f.ca->alternate_root_cn();
  auto alt = obtain(*f.client, req, solver);
  REQUIRE(alt.has_value());
  CHECK(alt->url.ends_with("/alt"));
  CHECK_FALSE(plain->url.ends_with("/alt"));
  req.preferred_chain = "No Such Root";
  auto fallback = obtain(*f.client, req, solver);
  REQUIRE(fallback.has_value());
  CHECK_FALSE(fallback->url.ends_with("/alt"));
}

TEST_CASE("revocation by account and by certificate key") {
  Fixture f;
  f.register_new();
  auto one = f.issue({Identifier::dns("one.example.test")});
  auto two = f.issue({Identifier::dns("two.example.test")});

  auto st = f.client->revoke(cert_der(one.chain_pem), RevocationReason::superseded);
  REQUIRE_MESSAGE(st.has_value(), (st ? "" : st.error().message));
  auto again = f.client->revoke(cert_der(one.chain_pem), RevocationReason::superseded);
  REQUIRE_FALSE(again.has_value());
  CHECK(again.error().problem->is(problem_type::kAlreadyRevoked));

  auto key = PrivateKey::from_pem(two.key_pem);
  REQUIRE(key.has_value());
  KeySigner cert_signer(*key);
  auto st2 = f.client->revoke(cert_der(two.chain_pem), RevocationReason::key_compromise, &cert_signer);
  REQUIRE_MESSAGE(st2.has_value(), (st2 ? "" : st2.error().message));
  CHECK(f.ca->revoked_serials().size() == 2);
}

TEST_CASE("several threads share one client") {
  Fixture f;
  f.register_new();
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      RecordingSolver solver;
      ObtainRequest req;
      req.identifiers = {Identifier::dns("t" + std::to_string(t) + ".example.test")};
      if (obtain(*f.client, req, solver)) ++ok;
    });
  }
  for (auto& t : threads) t.join();
  CHECK(ok == 4);
  CHECK(f.ca->nonce_errors() == 0);
}

}  // TEST_SUITE

TEST_SUITE("acme.problem") {

TEST_CASE("problem documents with subproblems") {
  // RFC 8555 §6.7.1 example.
  std::string body = R"({
    "type": "urn:ietf:params:acme:error:malformed",
    "detail": "Some of the identifiers requested were rejected",
    "subproblems": [
      {"type": "urn:ietf:params:acme:error:malformed",
       "detail": "Invalid underscore in DNS name \"_example.org\"",
       "identifier": {"type": "dns", "value": "_example.org"}},
      {"type": "urn:ietf:params:acme:error:rejectedIdentifier",
       "detail": "This CA will not issue for \"example.net\"",
       "identifier": {"type": "dns", "value": "example.net"}}
    ]
  })";
  auto p = parse_problem(body, 400);
  REQUIRE(p.has_value());
  CHECK(p->is("malformed"));
  CHECK_FALSE(p->is("malforme"));
  CHECK(p->status == 400);
  REQUIRE(p->subproblems.size() == 2);
  CHECK(p->subproblems[1].type == "urn:ietf:params:acme:error:rejectedIdentifier");
  CHECK(p->subproblems[1].identifier_value == "example.net");
  CHECK(p->subproblems[0].identifier_type == "dns");
  std::string text = describe(*p);
  CHECK(text.find("example.net: rejectedIdentifier") != std::string::npos);
}

TEST_CASE("not a problem document") {
  CHECK_FALSE(parse_problem("", 500).has_value());
  CHECK_FALSE(parse_problem("<html>", 500).has_value());
  CHECK_FALSE(parse_problem(R"({"type": 5})", 500).has_value());
  CHECK_FALSE(parse_problem("[]", 500).has_value());
}

TEST_CASE("userActionRequired carries its instance") {
  acme::HttpResponse r;
  r.status = 403;
  r.headers = {{"Content-Type", "application/problem+json"}};
  r.body = R"({"type":"urn:ietf:params:acme:error:userActionRequired","detail":"Terms changed",
             "instance":"https://ca.test/agree"})";
  Error e = error_from_response("newOrder", r, std::chrono::system_clock::now());
  CHECK(e.code == Errc::protocol);
  CHECK(e.problem->instance == "https://ca.test/agree");
  CHECK(e.message.find("https://ca.test/agree") != std::string::npos);
  CHECK_FALSE(e.retryable());
}

TEST_CASE("Retry-After as seconds and as an HTTP date") {
  auto now = std::chrono::system_clock::from_time_t(784111777);  // Sun, 06 Nov 1994 08:49:37 GMT
  CHECK(parse_retry_after("120", now) == seconds(120));
  CHECK(parse_retry_after(" 5 ", now) == seconds(5));
  CHECK(parse_retry_after("Sun, 06 Nov 1994 08:51:37 GMT", now) == seconds(120));
  CHECK(parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now) == seconds(0));
  CHECK_FALSE(parse_retry_after("soon", now).has_value());
  CHECK_FALSE(parse_retry_after("12abc", now).has_value());
  CHECK_FALSE(parse_retry_after("", now).has_value());
}

TEST_CASE("a Retry-After years ahead is read as a year and overflows nothing") {
  // Found by tools/fuzz (fuzz_text_parsers): a date in 6115 overflowed system_clock's
  // nanoseconds (UBSan), and a delay as long would overflow whoever adds it to a time.
  auto now = std::chrono::system_clock::from_time_t(784111777);
  CHECK(parse_retry_after("Wed, 21 Oct 6115 07:28:00 GMT", now) == kMaxRetryAfter);
  CHECK(parse_retry_after("99999999999", now) == kMaxRetryAfter);
  CHECK(parse_retry_after("999999999999999999999999", now) == kMaxRetryAfter);  // past long long
  CHECK(parse_retry_after(std::to_string(kMaxRetryAfter.count() - 1), now) == kMaxRetryAfter - seconds(1));
  CHECK(parse_retry_after("Mon, 06 Nov 1995 08:49:37 GMT", now) == seconds(365L * 24 * 3600));
  CHECK(parse_retry_after("Wed, 06 Nov 1996 08:49:37 GMT", now) == kMaxRetryAfter);
  auto far = now + *parse_retry_after("Wed, 21 Oct 6115 07:28:00 GMT", now);
  CHECK(far > now);
}

TEST_CASE("error bodies that are not problems are quoted safely") {
  acme::HttpResponse r;
  r.status = 502;
  r.body = std::string("<html>bad\x01\x02 gateway</html>") + std::string(1000, 'x');
  Error e = error_from_response("newNonce", r, std::chrono::system_clock::now());
  CHECK(e.message.size() < 300);
  CHECK(e.message.find("HTTP 502") != std::string::npos);
  CHECK(e.retryable());
}

TEST_CASE("Link headers") {
  acme::HttpResponse r;
  r.headers = {{"Link", "<https://ca.test/a/1>;rel=\"alternate\", <https://ca.test/dir>;rel=\"index\""},
               {"link", "<https://ca.test/a/2>; rel=\"alternate\""},
               {"Link", "<https://ca.test/up>;rel=\"up\""}};
  auto alts = parse_link_headers(r, "alternate");
  REQUIRE(alts.size() == 2);
  CHECK(alts[0] == "https://ca.test/a/1");
  CHECK(alts[1] == "https://ca.test/a/2");
  CHECK(parse_link_headers(r, "up") == std::vector<std::string>{"https://ca.test/up"});
  CHECK(parse_link_headers(r, "alt").empty());
}

}  // TEST_SUITE

TEST_CASE("obtain reports its steps in order with elapsed time") {
  FakeAcmeServer::Options o;
  o.authz_pending_polls = 2;
  o.order_processing_polls = 2;
  Fixture f(o);
  f.register_new();
  RecordingSolver solver;
  ObtainRequest req;
  req.identifiers = {{"dns", "a.example.test"}, {"dns", "b.example.test"}};
  std::vector<ProgressEvent> events;
  req.progress = [&](const ProgressEvent& e) { events.push_back(e); };
  auto r = obtain(*f.client, req, solver);
  REQUIRE_MESSAGE(r.has_value(), (r ? "" : r.error().message));

  // The steps without the polling ticks, in the order they happened.
  std::vector<std::string> steps;
  int validating_ticks = 0, issuing_ticks = 0;
  for (const auto& e : events) {
    CHECK(e.subject == "a.example.test");
    if (e.tick > 0) {
      CHECK(e.waiting);
      CHECK(!steps.empty());
      if (e.step == ProgressEvent::Step::validating) ++validating_ticks;
      if (e.step == ProgressEvent::Step::issuing) ++issuing_ticks;
      continue;
    }
    std::string s(to_string(e.step));
    if (!e.identifier.empty()) s += " " + e.identifier;
    if (!e.challenge_type.empty()) s += " " + e.challenge_type;
    steps.push_back(s);
  }
  std::vector<std::string> want = {
      "order",
      "authorization a.example.test http-01",
      "presented a.example.test http-01",
      "authorization b.example.test http-01",
      "presented b.example.test http-01",
      "validating a.example.test http-01",
      "validated a.example.test http-01",
      "validating b.example.test http-01",
      "validated b.example.test http-01",
      "finalizing",
      "issuing",
      "downloaded",
  };
  CHECK(steps == want);
  // The CA kept each authorization pending for a poll and the order processing for one: at
  // least one tick each while waiting.
  CHECK(validating_ticks >= 1);
  CHECK(issuing_ticks >= 1);
  // Elapsed time runs on the client's clock (FakeClock advances by the poll delays) and never
  // goes back; the poll delays make the last step later than the first.
  for (size_t i = 1; i < events.size(); ++i) CHECK(events[i].elapsed >= events[i - 1].elapsed);
  CHECK(events.back().elapsed > events.front().elapsed);
  CHECK(events.back().detail == r->url);
  CHECK(events.front().detail == r->order.url);

  // Without a callback obtain is unchanged (and reports nothing).
  ObtainRequest quiet;
  quiet.identifiers = {{"dns", "c.example.test"}};
  CHECK(obtain(*f.client, quiet, solver).has_value());
}

TEST_SUITE("acme.client") {

namespace {

// RequestLog records "METHOD /path" of every request the fake CA sees (from any thread).
struct RequestLog {
  std::mutex mu;
  std::vector<std::string> lines;
  void attach(FakeAcmeServer& ca) {
    const std::string base = ca.options().base;
    ca.intercept = [this, base](const acme::HttpRequest& r) -> std::optional<acme::HttpResponse> {
      std::lock_guard lock(mu);
      lines.push_back(r.method + " " + r.url.substr(base.size()));
      return std::nullopt;
    };
  }
  int count(std::string_view prefix) {
    std::lock_guard lock(mu);
    return static_cast<int>(std::count_if(lines.begin(), lines.end(), [&](const std::string& l) { return l.starts_with(prefix); }));
  }
};

}  // namespace

TEST_CASE("obtain polls one step after responding and finalizes a ready order without polling it") {
  FakeAcmeServer::Options o;
  o.authz_pending_polls = 0;         // valid by the first poll
  o.order_processing_polls = 0;      // issued at finalize
  o.order_ready_at_finalize = true;  // Boulder and Pebble work the order's status out at once
  Fixture f(o);
  f.register_new();
  RequestLog log;
  log.attach(*f.ca);
  const size_t slept_before = f.clock.sleeps().size();
  f.issue({Identifier::dns("quick.example.test")});
  // newOrder, the authorization, the challenge, one poll of the authorization, finalize and
  // the download: no poll of the order.
  CHECK(log.count("POST /order/") == 0);
  CHECK(log.count("POST /finalize/") == 1);
  CHECK(log.count("POST /authz/") == 2);
  // The only wait: one poll step between responding and the first poll (the fake clock does
  // not move while the key is made).
  auto sleeps = f.clock.sleeps();
  REQUIRE(sleeps.size() == slept_before + 1);
  CHECK(sleeps.back() == f.client->options().poll_initial);
}

TEST_CASE("obtain polls when the CA's fetches have been quiet for half a step, when the solver can tell") {
  FakeAcmeServer::Options o;
  o.authz_pending_polls = 0;
  o.order_processing_polls = 0;
  o.order_ready_at_finalize = true;
  Fixture f(o);
  f.register_new();
  RequestLog log;
  log.attach(*f.ca);
  // A solver whose responder saw the CA's validation request.
  struct FetchedSolver : RecordingSolver {
    RequestLog* log = nullptr;
    std::vector<std::string> last_request;  // what the CA had seen at each await_fetch
    std::vector<milliseconds> timeouts;
    std::vector<milliseconds> quiets;
    bool await_fetch(const Identifier&, const Challenge&, milliseconds timeout, milliseconds quiet) override {
      std::lock_guard lock(log->mu);
      last_request.push_back(log->lines.empty() ? "" : log->lines.back());
      timeouts.push_back(timeout);
      quiets.push_back(quiet);
      return true;
    }
  } solver;
  solver.log = &log;
  const size_t slept_before = f.clock.sleeps().size();
  ObtainRequest req;
  req.identifiers = {Identifier::dns("fetched.example.test")};
  auto r = obtain(*f.client, req, solver);
  REQUIRE_MESSAGE(r.has_value(), (r ? "" : r.error().message));
  const milliseconds step = f.client->options().poll_initial;
  // Asked once, after responding to the challenge and before the first poll, for at most four
  // poll steps (the fake clock does not move while the key is made).
  REQUIRE(solver.last_request.size() == 1);
  CHECK(solver.last_request[0].starts_with("POST /chall/"));
  CHECK(solver.timeouts[0] == 4 * step);
  // The fetches must have stopped for half a poll step (the solver waits for that)...
  CHECK(solver.quiets[0] == step / 2);
  CHECK(log.count("POST /authz/") == 2);  // the fetch, then one poll
  // ...and the poll goes out at once after: no sleep of obtain's own.
  CHECK(f.clock.sleeps().size() == slept_before);
}

TEST_CASE("obtain polls an order still processing after finalize half a step later") {
  FakeAcmeServer::Options o;
  o.authz_pending_polls = 0;         // valid by the first poll
  o.order_processing_polls = 1;      // "processing" at finalize and at the first poll
  o.order_ready_at_finalize = true;
  Fixture f(o);
  f.register_new();
  RequestLog log;
  log.attach(*f.ca);
  const size_t slept_before = f.clock.sleeps().size();
  f.issue({Identifier::dns("processing.example.test")});
  CHECK(log.count("POST /finalize/") == 1);
  CHECK(log.count("POST /order/") >= 1);
  // One poll step between responding and the first authorization poll, then half a step
  // between the finalize ("processing") and the first order poll (CAs sign in about a
  // millisecond; Pebble's order was valid by then in every traced run), then the poll schedule.
  auto sleeps = f.clock.sleeps();
  REQUIRE(sleeps.size() >= slept_before + 2);
  const milliseconds step = f.client->options().poll_initial;
  CHECK(sleeps[slept_before] == step);
  CHECK(sleeps[slept_before + 1] == step / 2);
  for (size_t i = slept_before + 2; i < sleeps.size(); ++i) CHECK(sleeps[i] >= step);
}

TEST_CASE("an order not yet ready at finalize is polled until ready, then finalized") {
  FakeAcmeServer::Options o;
  o.authz_pending_polls = 0;
  o.order_processing_polls = 1;
  Fixture f(o);  // the fake marks an order ready only when it is polled
  f.register_new();
  RequestLog log;
  log.attach(*f.ca);
  auto issued = f.issue({Identifier::dns("lagging.example.test")});
  CHECK(!issued.chain_pem.empty());
  CHECK(log.count("POST /finalize/") == 2);  // orderNotReady, then the real one
  CHECK(log.count("POST /order/") >= 2);     // until ready, then while processing
}

TEST_CASE("a prefetching transport sends the directory and first nonce requests once, ahead") {
  auto ca = std::make_shared<FakeAcmeServer>(FakeAcmeServer::Options{});
  RequestLog log;
  log.attach(*ca);
  auto inner = std::make_shared<FakeAcmeTransport>(ca);
  FakeClock clock;
  ClientOptions opts;
  opts.directory_url = ca->directory_url();
  opts.transport = make_prefetching_transport(inner, ca->directory_url());
  opts.clock = &clock;
  auto c = Client::create(opts);
  REQUIRE_MESSAGE(c.has_value(), (c ? "" : c.error().message));
  auto k = PrivateKey::generate(KeyType::ec256);
  REQUIRE(k.has_value());
  (*c)->set_account(std::make_shared<KeySigner>(std::move(*k)));
  auto a = (*c)->register_account({{"mailto:admin@example.test"}, true, std::nullopt});
  REQUIRE_MESSAGE(a.has_value(), (a ? "" : a.error().message));
  // The client asked for both; each went to the CA once, from the background thread.
  CHECK(log.count("GET /directory") == 1);
  CHECK(log.count("HEAD /new-nonce") == 1);
  CHECK(ca->nonce_errors() == 0);
  // Later requests, even equal ones, are sent as usual.
  auto again = Client::create(opts);
  REQUIRE(again.has_value());
  CHECK(log.count("GET /directory") == 2);
}

TEST_CASE("a failed prefetch is sent again by the client, and an unused one is waited for") {
  auto ca = std::make_shared<FakeAcmeServer>(FakeAcmeServer::Options{});
  RequestLog log;
  log.attach(*ca);
  auto inner = std::make_shared<FakeAcmeTransport>(ca);
  inner->fail_next(1);  // the prefetched GET of the directory
  ClientOptions opts;
  opts.directory_url = ca->directory_url();
  opts.transport = make_prefetching_transport(inner, ca->directory_url());
  auto c = Client::create(opts);
  REQUIRE_MESSAGE(c.has_value(), (c ? "" : c.error().message));
  CHECK(log.count("GET /directory") == 1);  // the failed one never reached the CA
  CHECK((*c)->directory().new_order == ca->options().base + "/new-order");

  // Never used: destroying it waits for its requests, which do not outlive it.
  auto unused = make_prefetching_transport(std::make_shared<FakeAcmeTransport>(ca), ca->directory_url());
  unused.reset();
  CHECK(log.count("GET /directory") == 2);
  CHECK(log.count("HEAD /new-nonce") == 1);
}

}  // TEST_SUITE
