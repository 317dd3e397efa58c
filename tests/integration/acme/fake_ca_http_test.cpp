// ARI and profiles over real HTTP: Pebble 2.4.0 has neither, so the test tree's fake CA is
// served on a loopback port and the production libcurl transport talks to it.

#include <doctest/doctest.h>

#include <httplib.h>

#include <thread>

#include "acme/ari.h"
#include "acme/client.h"
#include "acme/problem.h"
#include "tests/support/fake_acme.h"

using namespace autotls;
using namespace autotls::acme;
using autotls::testing::FakeAcmeServer;

namespace {

// FakeCaEndpoint serves a FakeAcmeServer over plain HTTP on 127.0.0.1.
class FakeCaEndpoint {
 public:
  explicit FakeCaEndpoint(FakeAcmeServer::Options options) {
    port_ = server_.bind_to_any_port("127.0.0.1");
    REQUIRE(port_ > 0);
    options.base = "http://127.0.0.1:" + std::to_string(port_);
    ca_ = std::make_shared<FakeAcmeServer>(options);
    auto handler = [this](const httplib::Request& req, httplib::Response& res) {
      HttpRequest r{req.method, ca_->options().base + req.target, {}, req.body};
      for (const auto& [k, v] : req.headers) r.headers.emplace_back(k, v);
      HttpResponse out = ca_->handle(r);
      res.status = out.status;
      std::string type = "application/octet-stream";
      for (const auto& [k, v] : out.headers) {
        if (strcasecmp(k.c_str(), "Content-Type") == 0) type = v;
        else res.set_header(k, v);
      }
      res.set_content(out.body, type);
    };
    server_.Get(".*", handler);
    server_.Post(".*", handler);
    server_.Options(".*", handler);
    // HEAD is answered by httplib from the GET handler.
    server_.set_tcp_nodelay(true);
    thread_ = std::thread([this] { server_.listen_after_bind(); });
    // bind_to_any_port already listens: connections queue until the accept loop runs.
  }
  ~FakeCaEndpoint() {
    server_.stop();
    thread_.join();
  }
  FakeAcmeServer& ca() { return *ca_; }
  std::string directory_url() const { return ca_->directory_url(); }

 private:
  httplib::Server server_;
  std::shared_ptr<FakeAcmeServer> ca_;
  int port_ = 0;
  std::thread thread_;
};

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
