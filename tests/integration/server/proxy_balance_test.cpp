// A proxy site with several upstreams: requests go to each in turn, an upstream that cannot be
// reached is left out for fail_timeout while the request goes to the next one, and it takes
// requests again afterwards. Over real loopback sockets.

#include <doctest/doctest.h>

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <httplib.h>

#include "server/server.h"
#include "tests/support/net.h"
#include "tests/support/recording_logger.h"
#include "tlsreload/store.h"

using namespace autotls;
using namespace autotls::server;
using std::chrono::milliseconds;
using autotls::testing::connect_to;
using autotls::testing::free_port;
using SteadyClock = std::chrono::steady_clock;

namespace {

// Named is an httplib upstream on a given loopback port that answers its name, to GET and
// POST, and counts the requests it got.
struct Named {
  httplib::Server svr;
  std::thread thread;
  std::string name;
  int port;
  std::atomic<int> hits{0};
  Named(std::string n, int p) : name(std::move(n)), port(p) {
    auto answer = [this](const httplib::Request&, httplib::Response& res) {
      ++hits;
      res.set_content(name, "text/plain");
    };
    svr.Get("/who", answer);
    svr.Post("/who", answer);
    REQUIRE(svr.bind_to_port("127.0.0.1", port));
    thread = std::thread([this] { svr.listen_after_bind(); });
  }
  ~Named() {
    svr.stop();
    thread.join();
  }
};

std::string url(int port) { return "http://127.0.0.1:" + std::to_string(port); }

// ask sends one request on a new connection and returns the response body ("" on failure),
// or the status line when it is not 200.
std::string ask(int port, const std::string& method = "GET") {
  int fd = connect_to(port, std::chrono::seconds(3));
  REQUIRE(fd >= 0);
  std::string req = method + " /who HTTP/1.1\r\nHost: lb.test\r\nConnection: close\r\n" +
                    (method == "POST" ? "Content-Length: 2\r\n\r\nhi" : "\r\n");
  REQUIRE(::send(fd, req.data(), req.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(req.size()));
  std::string got;
  char buf[4096];
  auto deadline = SteadyClock::now() + std::chrono::seconds(10);
  while (SteadyClock::now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    got.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fd);
  if (got.rfind("HTTP/1.1 200 ", 0) != 0) return got.substr(0, got.find("\r\n"));
  return got.substr(got.find("\r\n\r\n") + 4);
}

std::unique_ptr<Server> start(ProxySite site, Logger* log) {
  ServerConfig cfg;
  cfg.https = {{"127.0.0.1", 0}};
  cfg.http = {{"127.0.0.1", 0}};
  cfg.redirect_to_https = false;
  cfg.sites["lb.test"] = std::move(site);
  auto s = Server::create(std::move(cfg), std::make_shared<tlsreload::CertStore>(), nullptr, log);
  REQUIRE_MESSAGE(s, s.error().message);
  REQUIRE((*s)->start());
  return std::move(*s);
}

std::size_t lines_with(const testing::RecordingLogger& log, const std::string& text) {
  auto lines = log.lines();
  return static_cast<std::size_t>(std::count_if(lines.begin(), lines.end(), [&](const std::string& l) {
    return l.find(text) != std::string::npos;
  }));
}

}  // namespace

TEST_SUITE("server") {
  TEST_CASE("a proxy site with several upstreams sends requests to each in turn") {
    Named a("a", free_port()), b("b", free_port()), c("c", free_port());
    ProxySite site{url(a.port)};
    site.more_upstreams = {url(b.port), url(c.port)};
    auto srv = start(site, nullptr);
    std::map<std::string, int> seen;
    for (int i = 0; i < 30; ++i) ++seen[ask(srv->http_port())];
    CHECK(seen["a"] == 10);
    CHECK(seen["b"] == 10);
    CHECK(seen["c"] == 10);
    CHECK(a.hits.load() == 10);
    srv->shutdown(milliseconds(1'000));
  }

  TEST_CASE("an unreachable upstream is left out for fail_timeout, and its requests go to the next (POSTs too)") {
    testing::RecordingLogger log;
    Named a("a", free_port());
    const int b_port = free_port();  // nothing listens there yet
    ProxySite site{url(a.port)};
    site.more_upstreams = {url(b_port)};
    site.fail_timeout = milliseconds(2'000);
    auto srv = start(site, &log);
    auto t0 = SteadyClock::now();
    for (int i = 0; i < 8; ++i) {
      CAPTURE(i);
      CHECK(ask(srv->http_port(), i % 2 ? "POST" : "GET") == "a");
    }
    // One connect to b failed; b was left out for the rest (all within fail_timeout: 8 local
    // requests take milliseconds, even under sanitizers).
    REQUIRE(SteadyClock::now() - t0 < milliseconds(2'000));
    CHECK(lines_with(log, "upstream unreachable, trying the next upstream=" + url(b_port)) == 1);
    CHECK(lines_with(log, "upstream request failed") == 0);
    CHECK(srv->counters().upstream_failovers == 1);

    // b comes up; after fail_timeout it takes its turn again.
    Named b("b", b_port);
    std::this_thread::sleep_for(milliseconds(2'100));
    std::map<std::string, int> seen;
    for (int i = 0; i < 6; ++i) ++seen[ask(srv->http_port())];
    CHECK(seen["a"] == 3);
    CHECK(seen["b"] == 3);
    srv->shutdown(milliseconds(1'000));
  }

  TEST_CASE("when every upstream of a site is unreachable the request gets one 502") {
    testing::RecordingLogger log;
    testing::RefusedPort x, y;
    ProxySite site{url(x.port())};
    site.more_upstreams = {url(y.port())};
    auto srv = start(site, &log);
    CHECK(ask(srv->http_port()) == "HTTP/1.1 502 Bad Gateway");
    CHECK(lines_with(log, "upstream unreachable, trying the next") == 1);
    CHECK(srv->counters().upstream_failovers == 1);
    CHECK(lines_with(log, "upstream request failed") == 1);
    // Both left out now: they are still tried, in turn, rather than refusing at once.
    CHECK(ask(srv->http_port()) == "HTTP/1.1 502 Bad Gateway");
    CHECK(lines_with(log, "upstream request failed") == 2);
    srv->shutdown(milliseconds(1'000));
  }
}
