// The /metrics counters that need a real TLS handshake or a stalled client: SNI misses (the
// client-hello hook's counters) and the read / write timeouts hit.

#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include <httplib.h>

#include "server/server.h"
#include "tests/support/net.h"
#include "tests/support/pebble_env.h"
#include "tests/support/sni_handshake.h"
#include "tests/support/temp_dir.h"
#include "tlsreload/store.h"

using namespace autotls;
using namespace autotls::server;
using std::chrono::milliseconds;
using autotls::testing::connect_to;
using SteadyClock = std::chrono::steady_clock;
namespace fs = std::filesystem;

namespace {

std::unique_ptr<Server> start(ServerConfig cfg, std::shared_ptr<tlsreload::CertStore> store) {
  auto s = Server::create(std::move(cfg), std::move(store), nullptr, nullptr);
  REQUIRE_MESSAGE(s, s.error().message);
  REQUIRE((*s)->start());
  return std::move(*s);
}

// handshake runs one TLS handshake with 127.0.0.1:port, sending sni unless it is empty.
bool handshake(int port, const std::string& sni) {
  auto g = autotls::testing::tls_get(port, sni, nullptr, {.request = false});
  REQUIRE(g.connected);
  return g.ok;
}

std::string metrics(int admin_port) {
  httplib::Client cli("127.0.0.1", admin_port);
  cli.set_connection_timeout(std::chrono::seconds(5));
  cli.set_read_timeout(std::chrono::seconds(5));
  auto r = cli.Get("/metrics");
  REQUIRE(r);
  REQUIRE(r->status == 200);
  return r->body;
}

bool contains(const std::string& text, const std::string& needle) {
  return text.find(needle) != std::string::npos;
}

// wait_closed waits (at most 5 s) until the server closes fd: EOF or reset.
bool wait_closed(int fd) {
  char buf[4096];
  auto until = SteadyClock::now() + std::chrono::seconds(5);
  while (SteadyClock::now() < until) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 200) <= 0) continue;
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) return true;
  }
  return false;
}

}  // namespace

TEST_SUITE("server") {
  TEST_CASE("metrics count SNI misses and hellos without SNI apart from hits") {
    auto ca = autotls::testing::make_test_ca("metrics test CA");
    REQUIRE(ca);
    auto store = std::make_shared<tlsreload::CertStore>();
    for (const auto& names : {std::vector<std::string>{"a.test"}, {"*.w.test"}}) {
      auto leaf = autotls::testing::make_test_leaf(names, *ca);
      REQUIRE(leaf);
      REQUIRE(store->publish_pem(leaf->cert_pem, leaf->key_pem));
    }
    ServerConfig cfg;
    cfg.https = {{"127.0.0.1", 0}};
    cfg.http = {};  // not the default :80, which tests running alongside may hold
    cfg.admin.endpoint = Endpoint{"127.0.0.1", 0};
    auto srv = start(cfg, store);
    int port = srv->https_port();

    // Hits: exact, wildcard, case and trailing dot.
    CHECK(handshake(port, "a.test"));
    CHECK(handshake(port, "x.w.test"));
    CHECK(handshake(port, "A.TEST."));
    CHECK(srv->counters().sni_misses == 0);
    CHECK(srv->counters().no_sni == 0);
    // No default certificate: an unknown name and a hello without SNI fail, and count.
    CHECK_FALSE(handshake(port, "unknown.test"));
    CHECK_FALSE(handshake(port, "a.b.w.test"));  // the wildcard covers one label only
    CHECK_FALSE(handshake(port, ""));
    CHECK(srv->counters().sni_misses == 2);
    CHECK(srv->counters().no_sni == 1);
    // With a default certificate they succeed, and still count.
    auto def = autotls::testing::make_test_leaf({"default.test"}, *ca);
    REQUIRE(def);
    auto cert = store->publish_pem(def->cert_pem, def->key_pem);
    REQUIRE(cert);
    REQUIRE(store->set_default(*cert));
    CHECK(handshake(port, "other.test"));
    CHECK(handshake(port, ""));
    CHECK(handshake(port, "a.test"));
    auto c = srv->counters();
    CHECK(c.sni_misses == 3);
    CHECK(c.no_sni == 2);

    std::string m = metrics(srv->admin_port());
    CAPTURE(m);
    CHECK(contains(m, "# TYPE autotls_server_sni_misses_total counter\n"));
    CHECK(contains(m, "\nautotls_server_sni_misses_total 3\n"));
    CHECK(contains(m, "# TYPE autotls_server_no_sni_total counter\n"));
    CHECK(contains(m, "\nautotls_server_no_sni_total 2\n"));
  }

  TEST_CASE("metrics count request-body read timeouts and response write timeouts") {
    autotls::testing::TempDir dir("autotls-metrics-timeouts");
    fs::create_directories(dir.path / "www");
    std::ofstream(dir.path / "www" / "f.bin", std::ios::binary) << std::string(60 * 1024, 'x');
    ServerConfig cfg;
    cfg.http = {{"127.0.0.1", 0}};
    cfg.redirect_to_https = false;
    cfg.default_site = StaticSite{dir.path / "www"};
    cfg.admin.endpoint = Endpoint{"127.0.0.1", 0};
    cfg.timeouts.read = milliseconds(300);
    cfg.timeouts.write = milliseconds(300);
    cfg.worker_threads = 2;
    auto srv = start(cfg, std::make_shared<tlsreload::CertStore>());
    int port = srv->http_port();
    CHECK(srv->counters().read_timeout == 0);
    CHECK(srv->counters().write_timeout == 0);

    SUBCASE("a request body that stops coming") {
      // Not all of the body is here, so a worker reads it, waiting at most timeouts.read.
      int fd = connect_to(port);
      REQUIRE(fd >= 0);
      std::string req = "POST /f.bin HTTP/1.1\r\nHost: s.test\r\nContent-Length: 1000\r\n\r\n0123456789";
      REQUIRE(::send(fd, req.data(), req.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(req.size()));
      CHECK(wait_closed(fd));
      ::close(fd);
      CHECK(srv->counters().read_timeout == 1);
      CHECK(srv->counters().write_timeout == 0);
      CHECK(contains(metrics(srv->admin_port()), "\nautotls_server_read_timeout_total 1\n"));
    }
    SUBCASE("a client that stops reading its responses") {
      int fd = ::socket(AF_INET, SOCK_STREAM, 0);
      int small = 4096;
      ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_port = htons(static_cast<uint16_t>(port));
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
      // 300 x 60 KiB = 18 MB, more than any socket buffer takes; never read.
      std::string reqs;
      for (int i = 0; i < 300; ++i) reqs += "GET /f.bin HTTP/1.1\r\nHost: s.test\r\n\r\n";
      REQUIRE(::send(fd, reqs.data(), reqs.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(reqs.size()));
      // Served until the socket is full (so the connection was accepted), then closed.
      auto until = SteadyClock::now() + std::chrono::seconds(5);
      while ((srv->counters().requests == 0 || srv->counters().open_connections > 0) &&
             SteadyClock::now() < until) {
        std::this_thread::sleep_for(milliseconds(20));
      }
      ::close(fd);
      auto c = srv->counters();
      CHECK(c.requests > 0);
      CHECK(c.open_connections == 0);
      CHECK(c.write_timeout == 1);
      CHECK(srv->counters().read_timeout == 0);
      CHECK(contains(metrics(srv->admin_port()), "\nautotls_server_write_timeout_total 1\n"));
    }
  }
}
