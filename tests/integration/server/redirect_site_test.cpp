// A redirect site answers every request with its redirect (www to the bare domain, an old
// name to a new one), over real loopback sockets: on the plain listener (http_redirect off),
// on TLS with the site's own certificate, with a request body read away so that the
// connection stays usable, and on a reload that turns a static site into a redirect.

#include <doctest/doctest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "server/server.h"
#include "tests/support/net.h"
#include "tests/support/start_server.h"
#include "tests/support/sni_handshake.h"
#include "tests/support/temp_dir.h"
#include "tests/support/pebble_env.h"
#include "tlsreload/store.h"

using namespace autotls;
using namespace autotls::server;
using std::chrono::milliseconds;
namespace fs = std::filesystem;

using autotls::testing::start_server;

namespace {

struct Response {
  int status = 0;
  std::string body;
  std::string head;  // status line and fields, without the blank line
  std::string field(const std::string& name) const {
    auto at = head.find("\r\n" + name + ": ");
    if (at == std::string::npos) return {};
    at += name.size() + 4;
    auto end = head.find("\r\n", at);
    return head.substr(at, end == std::string::npos ? std::string::npos : end - at);
  }
};

// Client is one keep-alive plain-HTTP connection (RawConn) that sends a request and reads one
// response.
class Client {
 public:
  explicit Client(int port) : conn_(port) { REQUIRE(conn_.connected()); }
  Response send(const std::string& request) {
    REQUIRE(conn_.send(request));
    auto [status, body] = conn_.response();
    REQUIRE(status != 0);
    return {status, body, conn_.last_head()};
  }
  Response get(const std::string& host, const std::string& target) {
    return send("GET " + target + " HTTP/1.1\r\nHost: " + host + "\r\n\r\n");
  }

 private:
  autotls::testing::RawConn conn_;
};

// new_home makes dir/www with an index.html of "new home\n", the root of base_config's static
// site.
fs::path new_home(const autotls::testing::TempDir& dir) {
  fs::path www = dir.path / "www";
  fs::create_directories(www);
  std::ofstream(www / "index.html") << "new home\n";
  return www;
}

ServerConfig base_config(const fs::path& www) {
  ServerConfig cfg;
  cfg.https = {{"127.0.0.1", 0}};
  cfg.http = {{"127.0.0.1", 0}};
  cfg.redirect_to_https = false;
  cfg.sites["new.test"] = StaticSite{www};
  cfg.sites["www.new.test"] = RedirectSite{"https://new.test"};
  cfg.sites["old.test"] = RedirectSite{"https://new.test/archive{uri}", 301};
  cfg.sites["moved.test"] = RedirectSite{"/landing.html", 308};
  return cfg;
}

}  // namespace

TEST_SUITE("server") {
  TEST_CASE("an absolute-form target is answered as its origin form, on the site its authority names") {
    autotls::testing::TempDir dir("autotls-absform");
    fs::path www = new_home(dir);
    auto srv = start_server(base_config(www));
    Client c(srv->http_port());
    // RFC 9112 3.2.2: the origin server uses the target's authority, not Host.
    auto r = c.get("new.test", "http://new.test/index.html");
    CHECK(r.status == 200);
    CHECK(r.body == "new home\n");
    r = c.get("old.test", "HTTP://New.Test:80/index.html?x=1");
    CHECK(r.status == 200);
    CHECK(r.body == "new home\n");
    r = c.get("new.test", "http://old.test/post/7?c=1");
    CHECK(r.status == 301);
    CHECK(r.field("Location") == "https://new.test/archive/post/7?c=1");
    r = c.get("new.test", "http://www.new.test");
    CHECK(r.status == 302);
    CHECK(r.field("Location") == "https://new.test/");
    // User info names no host.
    r = c.get("new.test", "http://user@new.test/index.html");
    CHECK(r.status == 400);
    // The connection is still in step, and origin form is as before.
    r = c.get("new.test", "/index.html");
    CHECK(r.status == 200);

    // A plain-HTTP listener that sends everyone to HTTPS does so with the origin form.
    auto cfg = base_config(www);
    cfg.redirect_to_https = true;
    cfg.redirect_port = 8443;
    auto redirecting = start_server(cfg);
    Client h(redirecting->http_port());
    r = h.get("elsewhere.test", "http://new.test/a?b=1");
    CHECK(r.status == 308);
    CHECK(r.field("Location") == "https://new.test:8443/a?b=1");
    srv->shutdown(milliseconds(1'000));
    redirecting->shutdown(milliseconds(1'000));
  }

  TEST_CASE("a redirect site answers every method with its status and Location, and the connection stays usable") {
    autotls::testing::TempDir dir("autotls-redir");
    fs::path www = new_home(dir);
    auto srv = start_server(base_config(www));
    Client c(srv->http_port());

    // The bare origin keeps path and query; 302 unless told otherwise.
    auto r = c.get("www.new.test", "/a/b?x=1&y=2");
    CHECK(r.status == 302);
    CHECK(r.field("Location") == "https://new.test/a/b?x=1&y=2");
    CHECK(r.field("Content-Length") == "0");
    r = c.get("WWW.new.test:80", "/");
    CHECK(r.status == 302);
    CHECK(r.field("Location") == "https://new.test/");

    // {uri} after a path prefix, 301.
    r = c.get("old.test", "/post/7?c=1");
    CHECK(r.status == 301);
    CHECK(r.field("Location") == "https://new.test/archive/post/7?c=1");

    // A path on the same host, whatever was asked; HEAD gets the same head.
    r = c.get("moved.test", "/anything");
    CHECK(r.status == 308);
    CHECK(r.field("Location") == "/landing.html");
    r = c.send("HEAD /x HTTP/1.1\r\nHost: moved.test\r\n\r\n");
    CHECK(r.status == 308);
    CHECK(r.field("Location") == "/landing.html");

    // A POST's body is read away: the next request on the connection is read as a request.
    const std::string body(5000, 'b');
    r = c.send("POST /form HTTP/1.1\r\nHost: old.test\r\nContent-Type: text/plain\r\n"
               "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body);
    CHECK(r.status == 301);
    CHECK(r.field("Location") == "https://new.test/archive/form");
    r = c.send("POST /c HTTP/1.1\r\nHost: www.new.test\r\nTransfer-Encoding: chunked\r\n\r\n"
               "5\r\nhello\r\n0\r\n\r\n");
    CHECK(r.status == 302);
    CHECK(r.field("Location") == "https://new.test/c");

    // The static site next to them is untouched.
    r = c.get("new.test", "/");
    CHECK(r.status == 200);
    CHECK(r.body == "new home\n");
    CHECK(r.field("Location").empty());
    srv->shutdown(milliseconds(1'000));
  }

  TEST_CASE("a redirect site is served over TLS with its own certificate") {
    autotls::testing::TempDir dir("autotls-redir-tls");
    fs::path www = dir.path / "www";
    fs::create_directories(www);
    auto ca = autotls::testing::make_test_ca("redirect test CA");
    REQUIRE(ca);
    auto leaf = autotls::testing::make_test_leaf({"www.new.test"}, *ca);
    REQUIRE(leaf);
    auto store = std::make_shared<tlsreload::CertStore>();
    REQUIRE(store->publish_pem(leaf->cert_pem, leaf->key_pem));
    auto srv = start_server(base_config(www), store);
    auto g = autotls::testing::tls_get(srv->https_port(), "www.new.test");
    CHECK(g.ok);
    CHECK(g.status_line == "HTTP/1.1 302 Found");
    srv->shutdown(milliseconds(1'000));
  }

  TEST_CASE("a reload turns a static site into a redirect and back and refuses a bad redirect") {
    autotls::testing::TempDir dir("autotls-redir-reload");
    fs::path www = dir.path / "www";
    fs::create_directories(www);
    std::ofstream(www / "index.html") << "home\n";
    auto cfg = base_config(www);
    auto srv = start_server(cfg);

    cfg.sites["new.test"] = RedirectSite{"https://newer.test", 307};
    auto st = srv->reload(cfg);
    REQUIRE_MESSAGE(st, st.error().message);
    {
      Client c(srv->http_port());
      auto r = c.get("new.test", "/p");
      CHECK(r.status == 307);
      CHECK(r.field("Location") == "https://newer.test/p");
    }

    // Refused as a whole: the site keeps redirecting as before.
    auto bad = cfg;
    bad.sites["new.test"] = RedirectSite{"https://newer.test", 200};
    auto refused = srv->reload(bad);
    REQUIRE_FALSE(refused);
    CHECK(refused.error().message.find("redirect status 200") != std::string::npos);
    bad.sites["new.test"] = RedirectSite{"//evil.test/x"};
    refused = srv->reload(bad);
    REQUIRE_FALSE(refused);
    CHECK(refused.error().message.find("another host") != std::string::npos);
    {
      Client c(srv->http_port());
      auto r = c.get("new.test", "/p");
      CHECK(r.status == 307);
    }

    cfg.sites["new.test"] = StaticSite{www};
    st = srv->reload(cfg);
    REQUIRE_MESSAGE(st, st.error().message);
    Client c(srv->http_port());
    auto r = c.get("new.test", "/");
    CHECK(r.status == 200);
    CHECK(r.body == "home\n");
    srv->shutdown(milliseconds(1'000));
  }

  TEST_CASE("Server::create refuses a redirect site it could not answer") {
    for (const auto& [site, says] :
         {std::pair{RedirectSite{"example.com"}, std::string("expected an http:// or https:// URL")},
          std::pair{RedirectSite{"https://new.test", 304}, std::string("redirect status 304")},
          std::pair{RedirectSite{"https://new.test/\r\nX: y"}, std::string("control characters")}}) {
      CAPTURE(site.to);
      ServerConfig cfg;
      cfg.https = {{"127.0.0.1", 0}};
      cfg.http = {};
      cfg.sites["r.test"] = site;
      auto s = Server::create(std::move(cfg), std::make_shared<tlsreload::CertStore>(), nullptr, nullptr);
      REQUIRE_FALSE(s);
      CHECK(s.error().message.find("site r.test") != std::string::npos);
      CHECK(s.error().message.find(says) != std::string::npos);
    }
  }
}
