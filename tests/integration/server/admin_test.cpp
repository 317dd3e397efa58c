#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "server/server.h"
#include "tests/support/net.h"
#include "tlsreload/store.h"

using namespace autotls;
using namespace autotls::server;
using std::chrono::milliseconds;
using autotls::testing::connect_to;
using SteadyClock = std::chrono::steady_clock;

namespace {

ServerConfig admin_config() {
  ServerConfig cfg;
  cfg.https = {{"127.0.0.1", 0}};
  cfg.http = {{"127.0.0.1", 0}};
  cfg.admin.endpoint = Endpoint{"127.0.0.1", 0};
  cfg.worker_threads = 4;
  return cfg;
}

std::unique_ptr<Server> start(ServerConfig cfg) {
  auto s = Server::create(std::move(cfg), std::make_shared<tlsreload::CertStore>(), nullptr,
                          nullptr);
  REQUIRE_MESSAGE(s, s.error().message);
  REQUIRE((*s)->start());
  REQUIRE((*s)->admin_port() > 0);
  return std::move(*s);
}

struct Reply {
  int status = 0;  // 0: no answer
  std::string body;
  std::string content_type;
};

Reply get(int port, const std::string& path, const std::string& host = "localhost") {
  httplib::Client cli("127.0.0.1", port);
  cli.set_connection_timeout(std::chrono::seconds(5));
  cli.set_read_timeout(std::chrono::seconds(5));
  auto r = cli.Get(path.c_str(), {{"Host", host}});
  if (!r) return {};
  return {r->status, r->body, r->get_header_value("Content-Type")};
}

bool contains(const std::string& text, const std::string& needle) {
  return text.find(needle) != std::string::npos;
}

}  // namespace

TEST_SUITE("server.admin") {
  TEST_CASE("admin listener is off by default") {
    ServerConfig cfg = admin_config();
    cfg.admin = {};
    auto s = Server::create(std::move(cfg), std::make_shared<tlsreload::CertStore>(), nullptr,
                            nullptr);
    REQUIRE(s);
    CHECK((*s)->admin_port() == 0);
  }

  TEST_CASE("healthz readyz and certificates without callbacks") {
    auto srv = start(admin_config());
    int port = srv->admin_port();
    auto h = get(port, "/healthz");
    CHECK(h.status == 200);
    CHECK(h.body == "ok\n");
    CHECK(get(port, "/readyz").status == 200);
    CHECK(get(port, "/certificates").status == 404);
    CHECK(get(port, "/nope").status == 404);
    // The admin listener serves nothing else: no site routing, no redirect.
    CHECK(get(port, "/").status == 404);
  }

  TEST_CASE("readyz follows the readiness callback") {
    std::atomic<bool> ok{false};
    ServerConfig cfg = admin_config();
    cfg.admin.ready = [&ok] { return ok.load(); };
    auto srv = start(std::move(cfg));
    auto r = get(srv->admin_port(), "/readyz");
    CHECK(r.status == 503);
    CHECK(r.body == "not ready\n");
    ok = true;
    r = get(srv->admin_port(), "/readyz");
    CHECK(r.status == 200);
    CHECK(r.body == "ready\n");
    CHECK(get(srv->admin_port(), "/healthz").status == 200);
  }

  TEST_CASE("metrics count client traffic only and append the callback text") {
    ServerConfig cfg = admin_config();
    cfg.max_header_bytes = 1024;
    cfg.admin.metrics = [] {
      return std::string(
          "# HELP autotls_test_extra An extra metric.\n# TYPE autotls_test_extra gauge\n"
          "autotls_test_extra{name=\"a.test\"} 42\n");
    };
    cfg.admin.certificates = [] { return std::string(R"([{"names":["a.test"]}])"); };
    auto srv = start(std::move(cfg));
    int admin = srv->admin_port();
    // Three requests on three connections (308 redirects), and one 431.
    for (int i = 0; i < 3; ++i) CHECK(get(srv->http_port(), "/x", "a.test").status == 308);
    int fd = connect_to(srv->http_port());
    REQUIRE(fd >= 0);
    std::string big = "GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: " + std::string(2048, 'a');
    REQUIRE(::send(fd, big.data(), big.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(big.size()));
    char buf[256];
    auto n = ::recv(fd, buf, sizeof buf, 0);
    REQUIRE(n > 0);
    CHECK(contains(std::string(buf, static_cast<size_t>(n)), " 431 "));
    ::close(fd);

    // The server closes each connection just after its response: wait for the gauge to settle.
    Reply m;
    auto deadline = SteadyClock::now() + std::chrono::seconds(5);
    do {
      m = get(admin, "/metrics");
      if (contains(m.body, "\nautotls_server_open_connections 0\n")) break;
      std::this_thread::sleep_for(milliseconds(20));
    } while (SteadyClock::now() < deadline);
    REQUIRE(m.status == 200);
    CHECK(m.content_type == "text/plain; version=0.0.4; charset=utf-8");
    const std::string& t = m.body;
    INFO(t);
    CHECK(contains(t, "# HELP autotls_server_accepted_total "));
    CHECK(contains(t, "# TYPE autotls_server_accepted_total counter\n"));
    CHECK(contains(t, "\nautotls_server_accepted_total 4\n"));
    CHECK(contains(t, "\nautotls_server_requests_total 3\n"));
    CHECK(contains(t, "\nautotls_server_header_too_large_total 1\n"));
    for (const char* zero : {"rejected_over_capacity_total", "handshakes_total", "handshake_failed_total",
                             "handshake_timeout_total", "header_timeout_total",
                             "idle_closed_total", "forced_closed_total"}) {
      CHECK(contains(t, std::string("\nautotls_server_") + zero + " 0\n"));
    }
    CHECK(contains(t, "# TYPE autotls_server_open_connections gauge\n"));
    CHECK(contains(t, "\nautotls_server_open_connections 0\n"));
    CHECK(contains(t, "\nautotls_server_ready 1\n"));
    // The callback's text comes after ours, verbatim.
    CHECK(contains(t, "# TYPE autotls_test_extra gauge\nautotls_test_extra{name=\"a.test\"} 42\n"));
    CHECK(t.find("autotls_test_extra") > t.find("autotls_server_ready"));
    // Every sample line is "name[{labels}] value" after its HELP and TYPE lines.
    CHECK(t.back() == '\n');

    // Scrapes are not client requests.
    auto counters = srv->counters();
    CHECK(counters.requests == 3);
    CHECK(counters.accepted == 4);

    auto c = get(admin, "/certificates");
    CHECK(c.status == 200);
    CHECK(c.content_type == "application/json");
    auto j = nlohmann::json::parse(c.body, nullptr, false);
    REQUIRE(j.is_array());
    CHECK(j[0]["names"][0] == "a.test");
  }

  TEST_CASE("readyz answers 503 as soon as shutdown begins") {
    std::atomic<int> ready_calls{0};
    std::atomic<int> headers_started{0};
    ServerConfig cfg = admin_config();
    cfg.admin.ready = [&ready_calls] {
      ++ready_calls;
      return true;
    };
    cfg.on_header_started = [&headers_started] { ++headers_started; };
    auto srv = start(std::move(cfg));
    int admin = srv->admin_port();
    REQUIRE(get(admin, "/readyz").status == 200);
    // A request under way (header started, not finished) keeps the drain running.
    int fd = connect_to(srv->http_port());
    REQUIRE(fd >= 0);
    std::string partial = "GET / HTTP/1.1\r\n";
    REQUIRE(::send(fd, partial.data(), partial.size(), MSG_NOSIGNAL) > 0);
    // Wait until the reactor has read it (before, the drain would close the connection as idle).
    for (int i = 0; i < 5'000 && headers_started.load() == 0; ++i) std::this_thread::sleep_for(milliseconds(1));
    REQUIRE(headers_started.load() == 1);

    auto began = SteadyClock::now();
    std::thread stopper([&] { srv->shutdown(milliseconds(5'000)); });
    while (srv->ready()) std::this_thread::sleep_for(milliseconds(1));
    int calls_before = ready_calls.load();
    auto r = get(admin, "/readyz");
    CHECK(r.status == 503);
    CHECK(r.body == "not ready\n");
    CHECK(ready_calls.load() == calls_before);  // draining decides; the callback is not asked
    CHECK(get(admin, "/healthz").status == 200);
    CHECK(contains(get(admin, "/metrics").body, "\nautotls_server_ready 0\n"));
    // The client listener is closed while the admin one still answers.
    CHECK(get(srv->http_port(), "/").status == 0);

    ::close(fd);  // the last client connection goes: the drain ends early
    stopper.join();
    CHECK(SteadyClock::now() - began < std::chrono::seconds(4));
    CHECK(srv->counters().forced_closed == 0);
    CHECK(get(admin, "/healthz").status == 0);  // closed after the drain
  }
}
