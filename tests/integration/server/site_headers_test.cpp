// A site's headers (StaticSite/ProxySite/RedirectSite::headers, serve's "headers") are on each
// of its responses, replacing a field of the same name: a static file the reactor would answer
// on its fast path, a 404, a redirect, a proxied answer whose upstream set the same field; and
// over TLS the server's HSTS field gives way to a site's own instead of doubling it. A field
// named without a value is removed: an upstream's, the static path's own, the server's HSTS.

#include <doctest/doctest.h>

#include <httplib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "server/server.h"
#include "tests/support/net.h"
#include "tests/support/start_server.h"
#include "tests/support/pebble_env.h"
#include "tests/support/temp_dir.h"
#include "tlsreload/store.h"

using namespace autotls;
using namespace autotls::server;
using std::chrono::milliseconds;
namespace fs = std::filesystem;

using autotls::testing::start_server;

namespace {

// raw_get sends a GET with no field but Host (what the reactor's fast path answers when the
// site has no headers of its own) and returns the response's head and body.
std::string raw_get(int port, const std::string& host, const std::string& path) {
  int fd = autotls::testing::connect_to(port, std::chrono::seconds(3));
  REQUIRE(fd >= 0);
  std::string req = "GET " + path + " HTTP/1.1\r\nHost: " + host + "\r\nConnection: close\r\n\r\n";
  REQUIRE(::send(fd, req.data(), req.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(req.size()));
  std::string out;
  char buf[4096];
  for (ssize_t n; (n = ::recv(fd, buf, sizeof buf, 0)) > 0;) out.append(buf, static_cast<std::size_t>(n));
  ::close(fd);
  return out;
}

std::size_t count_of(const httplib::Headers& h, const std::string& name) { return h.count(name); }

// store_for is a store whose default certificate (from a test CA) covers names.
std::shared_ptr<tlsreload::CertStore> store_for(const std::vector<std::string>& names) {
  auto ca = autotls::testing::make_test_ca("headers test CA");
  REQUIRE(ca);
  auto leaf = autotls::testing::make_test_leaf(names, *ca);
  REQUIRE(leaf);
  auto store = std::make_shared<tlsreload::CertStore>();
  auto cert = store->publish_pem(leaf->cert_pem, leaf->key_pem);
  REQUIRE(cert);
  REQUIRE(store->set_default(*cert));
  return store;
}

// Upstream answers with its own Cache-Control and X-Upstream.
struct Upstream {
  httplib::Server svr;
  std::thread thread;
  int port = 0;
  Upstream() {
    svr.Get("/", [](const httplib::Request&, httplib::Response& res) {
      res.set_header("Cache-Control", "no-store");
      res.set_header("X-Upstream", "yes");
      res.set_content("from upstream\n", "text/plain");
    });
    port = autotls::testing::bind_claimed(svr);
    thread = std::thread([this] { svr.listen_after_bind(); });
  }
  ~Upstream() {
    svr.stop();
    thread.join();
  }
};

}  // namespace

TEST_SUITE("server") {
  TEST_CASE("a site's headers are on every response it gives and replace fields of the same name") {
    autotls::testing::TempDir dir("autotls-hdrs");
    fs::path www = dir.path / "www";
    fs::create_directories(www);
    std::ofstream(www / "index.html") << "home\n";
    Upstream up;
    const ResponseHeaders site_headers = {{"X-Frame-Options", "DENY"}, {"Cache-Control", "max-age=60"}};

    ServerConfig cfg;
    cfg.https = {{"127.0.0.1", 0}};
    cfg.http = {{"127.0.0.1", 0}};
    cfg.redirect_to_https = false;
    StaticSite st{www};
    st.headers = site_headers;
    cfg.sites["s.test"] = st;
    cfg.sites["plain.test"] = StaticSite{www};
    ProxySite px("http://127.0.0.1:" + std::to_string(up.port));
    px.headers = site_headers;
    cfg.sites["p.test"] = px;
    RedirectSite rd{"https://s.test", 301};
    rd.headers = {{"X-Frame-Options", "DENY"}};
    cfg.sites["r.test"] = rd;
    auto srv = start_server(cfg);

    httplib::Client cli("127.0.0.1", srv->http_port());
    auto get = [&](const std::string& host, const std::string& path) {
      auto r = cli.Get(path.c_str(), {{"Host", host}});
      REQUIRE(r);
      return r.value();
    };
    // A plain GET of a small file: what the reactor answers itself when the site has no fields.
    auto fast = raw_get(srv->http_port(), "s.test", "/index.html");
    CHECK(fast.rfind("HTTP/1.1 200 OK\r\n", 0) == 0);
    CHECK(fast.find("\r\nX-Frame-Options: DENY\r\n") != std::string::npos);
    CHECK(fast.find("\r\nCache-Control: max-age=60\r\n") != std::string::npos);
    CHECK(fast.substr(fast.size() - 5) == "home\n");
    auto fast_plain = raw_get(srv->http_port(), "plain.test", "/index.html");
    CHECK(fast_plain.rfind("HTTP/1.1 200 OK\r\n", 0) == 0);
    CHECK(fast_plain.find("X-Frame-Options") == std::string::npos);
    for (int i = 0; i < 2; ++i) {
      auto r = get("s.test", "/index.html");
      CHECK(r.status == 200);
      CHECK(r.body == "home\n");
      CHECK(r.get_header_value("X-Frame-Options") == "DENY");
      CHECK(r.get_header_value("Cache-Control") == "max-age=60");
      CHECK(count_of(r.headers, "Cache-Control") == 1);
    }
    auto missing = get("s.test", "/nope.html");
    CHECK(missing.status == 404);
    CHECK(missing.get_header_value("X-Frame-Options") == "DENY");
    // The site next to it has none.
    auto plain = get("plain.test", "/index.html");
    CHECK(plain.status == 200);
    CHECK_FALSE(plain.has_header("X-Frame-Options"));
    // Proxied: the upstream's Cache-Control gives way to the site's, its other fields stay.
    auto proxied = get("p.test", "/");
    CHECK(proxied.status == 200);
    CHECK(proxied.body == "from upstream\n");
    CHECK(proxied.get_header_value("Cache-Control") == "max-age=60");
    CHECK(count_of(proxied.headers, "Cache-Control") == 1);
    CHECK(proxied.get_header_value("X-Upstream") == "yes");
    CHECK(proxied.get_header_value("X-Frame-Options") == "DENY");
    auto redirected = get("r.test", "/a");
    CHECK(redirected.status == 301);
    CHECK(redirected.get_header_value("Location") == "https://s.test/a");
    CHECK(redirected.get_header_value("X-Frame-Options") == "DENY");

    // A reload takes a site's fields away (and the fast path back).
    cfg.sites["s.test"] = StaticSite{www};
    auto rl = srv->reload(cfg);
    REQUIRE_MESSAGE(rl, rl.error().message);
    auto after = get("s.test", "/index.html");
    CHECK(after.status == 200);
    CHECK_FALSE(after.has_header("X-Frame-Options"));
    CHECK(raw_get(srv->http_port(), "s.test", "/index.html").find("X-Frame-Options") == std::string::npos);
    srv->shutdown(milliseconds(1'000));
  }

  TEST_CASE("over TLS the server's HSTS field gives way to a site's own instead of doubling it") {
    autotls::testing::TempDir dir("autotls-hdrs-tls");
    fs::path www = dir.path / "www";
    fs::create_directories(www);
    std::ofstream(www / "index.html") << "home\n";
    auto store = store_for({"s.test", "plain.test"});
    ServerConfig cfg;
    cfg.https = {{"127.0.0.1", 0}};
    cfg.http = {};
    cfg.hsts_max_age = std::chrono::seconds(600);
    StaticSite st{www};
    st.headers = {{"Strict-Transport-Security", "max-age=31536000; preload"}};
    cfg.sites["s.test"] = st;
    cfg.sites["plain.test"] = StaticSite{www};
    auto srv = start_server(cfg, store);

    httplib::SSLClient cli("127.0.0.1", srv->https_port());
    cli.enable_server_certificate_verification(false);
    auto own = cli.Get("/", {{"Host", "s.test"}});
    REQUIRE(own);
    CHECK(own->status == 200);
    CHECK(own->headers.count("Strict-Transport-Security") == 1);
    CHECK(own->get_header_value("Strict-Transport-Security") == "max-age=31536000; preload");
    auto server_wide = cli.Get("/", {{"Host", "plain.test"}});
    REQUIRE(server_wide);
    CHECK(server_wide->headers.count("Strict-Transport-Security") == 1);
    CHECK(server_wide->get_header_value("Strict-Transport-Security") == "max-age=600");
    srv->shutdown(milliseconds(1'000));
  }

  TEST_CASE("a site's header without a value removes the field: an upstream's, a file's validators, the server's HSTS") {
    autotls::testing::TempDir dir("autotls-hdrs-rm");
    fs::path www = dir.path / "www";
    fs::create_directories(www);
    std::ofstream(www / "index.html") << "home\n";
    httplib::Server upstream;
    upstream.Get("/", [](const httplib::Request&, httplib::Response& res) {
      res.set_header("Server", "upstreamd/1.0");
      res.set_header("X-Powered-By", "php/5");
      res.set_header("X-Upstream", "yes");
      res.set_content("from upstream\n", "text/plain");
    });
    int up_port = autotls::testing::bind_claimed(upstream);
    std::thread up_thread([&] { upstream.listen_after_bind(); });
    auto store = store_for({"p.test", "s.test", "plain.test"});

    ServerConfig cfg;
    cfg.https = {{"127.0.0.1", 0}};
    cfg.http = {{"127.0.0.1", 0}};
    cfg.redirect_to_https = false;
    cfg.hsts_max_age = std::chrono::seconds(600);
    ProxySite px("http://127.0.0.1:" + std::to_string(up_port));
    px.headers = {{"Server", std::nullopt}, {"x-powered-by", std::nullopt}, {"X-Frame-Options", "DENY"}};
    cfg.sites["p.test"] = px;
    // A static site that takes a file's validators away: the reactor's fast path, which would
    // put them on, must give the request to httplib's path.
    StaticSite st{www};
    st.headers = {{"ETag", std::nullopt}, {"Last-Modified", std::nullopt},
                  {"Strict-Transport-Security", std::nullopt}};
    cfg.sites["s.test"] = st;
    cfg.sites["plain.test"] = StaticSite{www};
    auto srv = start_server(cfg, store);

    httplib::Client cli("127.0.0.1", srv->http_port());
    auto proxied = cli.Get("/", {{"Host", "p.test"}});
    REQUIRE(proxied);
    CHECK(proxied->status == 200);
    CHECK(proxied->body == "from upstream\n");
    CHECK_FALSE(proxied->has_header("Server"));
    CHECK_FALSE(proxied->has_header("X-Powered-By"));
    CHECK(proxied->get_header_value("X-Upstream") == "yes");
    CHECK(proxied->get_header_value("X-Frame-Options") == "DENY");

    auto fast_plain = raw_get(srv->http_port(), "plain.test", "/index.html");
    CHECK(fast_plain.rfind("HTTP/1.1 200 OK\r\n", 0) == 0);
    CHECK(fast_plain.find("\r\nETag: ") != std::string::npos);  // what the removal must take away
    auto fast = raw_get(srv->http_port(), "s.test", "/index.html");
    CHECK(fast.rfind("HTTP/1.1 200 OK\r\n", 0) == 0);
    CHECK(fast.find("ETag") == std::string::npos);
    CHECK(fast.find("Last-Modified") == std::string::npos);
    CHECK(fast.substr(fast.size() - 5) == "home\n");

    // Over TLS: the site that removes Strict-Transport-Security gets no HSTS field; the site
    // next to it gets the server's.
    httplib::SSLClient tls("127.0.0.1", srv->https_port());
    tls.enable_server_certificate_verification(false);
    auto no_hsts = tls.Get("/index.html", {{"Host", "s.test"}});
    REQUIRE(no_hsts);
    CHECK(no_hsts->status == 200);
    CHECK_FALSE(no_hsts->has_header("Strict-Transport-Security"));
    CHECK_FALSE(no_hsts->has_header("ETag"));
    auto missing = tls.Get("/nope.html", {{"Host", "s.test"}});
    REQUIRE(missing);
    CHECK(missing->status == 404);
    CHECK_FALSE(missing->has_header("Strict-Transport-Security"));
    auto with_hsts = tls.Get("/index.html", {{"Host", "plain.test"}});
    REQUIRE(with_hsts);
    CHECK(with_hsts->get_header_value("Strict-Transport-Security") == "max-age=600");
    CHECK(with_hsts->has_header("ETag"));
    // Proxied over TLS, on the same worker after the static site's request: the flag of the
    // request before does not carry over.
    auto proxied_tls = tls.Get("/", {{"Host", "p.test"}});
    REQUIRE(proxied_tls);
    CHECK(proxied_tls->get_header_value("Strict-Transport-Security") == "max-age=600");
    CHECK_FALSE(proxied_tls->has_header("Server"));
    srv->shutdown(milliseconds(1'000));
    upstream.stop();
    up_thread.join();
  }

  TEST_CASE("Server::create refuses a site header that would break the message") {
    for (const auto& [field, value, says] :
         {std::tuple{std::string("Content-Length"), std::optional<std::string>("5"), std::string("set by the server")},
          std::tuple{std::string("Content-Length"), std::optional<std::string>(), std::string("set by the server")},
          std::tuple{std::string("X Bad"), std::optional<std::string>(), std::string("not a field name")},
          std::tuple{std::string("transfer-encoding"), std::optional<std::string>("chunked"), std::string("set by the server")},
          std::tuple{std::string("Connection"), std::optional<std::string>("close"), std::string("set by the server")},
          std::tuple{std::string("X Bad"), std::optional<std::string>("v"), std::string("not a field name")},
          std::tuple{std::string(""), std::optional<std::string>("v"), std::string("not a field name")},
          std::tuple{std::string("X-Ok"), std::optional<std::string>("a\r\nSet-Cookie: x=1"), std::string("control character")},
          std::tuple{std::string("X-Ok"), std::optional<std::string>(" padded"), std::string("white space")}}) {
      CAPTURE(field);
      ServerConfig cfg;
      cfg.https = {{"127.0.0.1", 0}};
      cfg.http = {};
      RedirectSite rd{"https://x.test"};
      rd.headers = {{field, value}};
      cfg.sites["h.test"] = rd;
      auto s = Server::create(std::move(cfg), std::make_shared<tlsreload::CertStore>(), nullptr, nullptr);
      REQUIRE_FALSE(s);
      CHECK(s.error().message.find("site h.test: header") != std::string::npos);
      CHECK(s.error().message.find(says) != std::string::npos);
    }
  }
}
