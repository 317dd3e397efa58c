// ARI and profiles over real HTTP: Pebble 2.4.0 has neither, so the test tree's fake CA is
// served on a loopback port and the production libcurl transport talks to it.

#include <doctest/doctest.h>

#include <httplib.h>

#include <thread>

#include "acme/ari.h"
#include "acme/client.h"
#include "acme/problem.h"
#include "tests/support/fake_acme.h"
#include "tests/support/fake_ca_endpoint.h"

using namespace autotls;
using namespace autotls::acme;
using autotls::testing::FakeAcmeServer;
using autotls::testing::FakeCaEndpoint;

namespace {

struct NullSolver : Solver {
  Status present(const Identifier&, const Challenge&, std::string_view) override { return {}; }
  void cleanup(const Identifier&, const Challenge&, std::string_view) override {}
};

std::unique_ptr<Client> connect(FakeCaEndpoint& ep) {
  ClientOptions o;
  o.directory_url = ep.directory_url();
  o.transport = std::shared_ptr<HttpTransport>(make_curl_transport());
  auto c = Client::create(o);
  REQUIRE_MESSAGE(c.has_value(), (c ? "" : c.error().message));
  auto key = PrivateKey::generate(KeyType::ec256);
  REQUIRE(key.has_value());
  (*c)->set_account(std::make_shared<KeySigner>(*key));
  auto acct = (*c)->register_account({{}, true, std::nullopt});
  REQUIRE_MESSAGE(acct.has_value(), (acct ? "" : acct.error().message));
  return std::move(*c);
}

}  // namespace

TEST_SUITE("acme.fake_ca") {

TEST_CASE("ARI window and replaces over HTTP") {
  FakeAcmeServer::Options o;
  o.renewal_window_start = "2031-03-01T00:00:00Z";
  o.renewal_window_end = "2031-03-03T00:00:00Z";
  o.renewal_retry_after = 3600;
  FakeCaEndpoint ep(o);
  REQUIRE(ep.port() > 0);
  auto client = connect(ep);
  CHECK(client->directory().renewal_info == ep.ca().options().base + "/renewal-info");

  NullSolver solver;
  ObtainRequest req;
  req.identifiers = {Identifier::dns("ari.example.test")};
  auto first = obtain(*client, req, solver);
  REQUIRE_MESSAGE(first.has_value(), (first ? "" : first.error().message));
  auto id = ari_cert_id(first->chain_pem);
  REQUIRE(id.has_value());

  auto info = client->renewal_info(*id);
  REQUIRE_MESSAGE(info.has_value(), (info ? "" : info.error().message));
  CHECK(format_rfc3339(info->window_start) == "2031-03-01T00:00:00Z");
  CHECK(format_rfc3339(info->window_end) == "2031-03-03T00:00:00Z");
  REQUIRE(info->retry_after.has_value());
  CHECK(info->retry_after->count() == 3600);
  std::mt19937_64 rng(7);
  auto when = pick_renewal_time(*info, rng);
  CHECK(when >= info->window_start);
  CHECK(when < info->window_end);

  req.replaces = *id;
  auto renewed = obtain(*client, req, solver);
  REQUIRE_MESSAGE(renewed.has_value(), (renewed ? "" : renewed.error().message));
  CHECK(ep.ca().orders().back().payload.value("replaces", "") == *id);
  // Replacing the same certificate again: 409 alreadyReplaced, then an order without it.
  auto again = obtain(*client, req, solver);
  REQUIRE_MESSAGE(again.has_value(), (again ? "" : again.error().message));
  CHECK_FALSE(ep.ca().orders().back().payload.contains("replaces"));

  auto unknown = client->renewal_info("AAAA.BBBB");
  REQUIRE_FALSE(unknown.has_value());
  CHECK(unknown.error().http_status == 404);
}

TEST_CASE("profiles over HTTP") {
  FakeAcmeServer::Options o;
  o.profiles = {{"classic", "90 days"}, {"shortlived", "6 days"}, {"tlsserver", "server auth only"}};
  FakeCaEndpoint ep(o);
  REQUIRE(ep.port() > 0);
  auto client = connect(ep);
  CHECK(client->directory().profiles.size() == 3);
  NullSolver solver;
  ObtainRequest req;
  req.identifiers = {Identifier::dns("profile.example.test")};
  req.profile = "shortlived";
  auto r = obtain(*client, req, solver);
  REQUIRE_MESSAGE(r.has_value(), (r ? "" : r.error().message));
  CHECK(r->order.profile == "shortlived");
  CHECK(ep.ca().orders().back().payload.value("profile", "") == "shortlived");

  req.profile = "nonesuch";
  auto bad = obtain(*client, req, solver);
  REQUIRE_FALSE(bad.has_value());
  CHECK(bad.error().code == Errc::invalid_input);
}

}  // TEST_SUITE
