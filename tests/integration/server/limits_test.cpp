// Limits that protect the server from clients that hold a connection and send nothing useful
// (idle keep-alive, a stalled request body), the IPv6 listener, and descriptor exhaustion.
// Every wait is bounded; no assertion is about speed beyond "it happened before a generous
// bound".

#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>

#include <curl/curl.h>
#include <httplib.h>

#include "server/server.h"
#include "tests/support/net.h"
#include "tests/support/pebble_env.h"
#include "tests/support/temp_dir.h"
#include "tlsreload/store.h"

using namespace autotls;
using namespace autotls::server;
using std::chrono::milliseconds;
using SteadyClock = std::chrono::steady_clock;
namespace fs = std::filesystem;

namespace {

struct Dir : autotls::testing::TempDir {
  explicit Dir(const std::string& tag) : TempDir("autotls-limits-" + tag) {}
  fs::path site(const std::string& index_body) const {
    fs::path root = path / "www";
    fs::create_directories(root);
    std::ofstream(root / "index.html") << index_body;
    return root;
  }
};

ServerConfig plain_config(const fs::path& root) {
  ServerConfig cfg;
  cfg.https = {{"127.0.0.1", 0}};
  cfg.http = {{"127.0.0.1", 0}};
  cfg.redirect_to_https = false;  // the site over plain HTTP: these tests need no TLS
  cfg.worker_threads = 4;
  cfg.default_site = StaticSite{root};
  return cfg;
}

std::unique_ptr<Server> start(ServerConfig cfg,
                              std::shared_ptr<tlsreload::CertStore> store = nullptr) {
  if (!store) store = std::make_shared<tlsreload::CertStore>();
  auto s = Server::create(std::move(cfg), store, nullptr, nullptr);
  REQUIRE_MESSAGE(s, s.error().message);
  REQUIRE((*s)->start());
  return std::move(*s);
}

// read_until_closed reads fd until the server closes it (EOF or reset) or `bound` passes.
// Returns whether it was closed; what arrived before is appended to out.
bool read_until_closed(int fd, milliseconds bound, std::string& out) {
  auto deadline = SteadyClock::now() + bound;
  for (;;) {
    auto left = std::chrono::duration_cast<milliseconds>(deadline - SteadyClock::now());
    if (left.count() <= 0) return false;
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) return false;
    char buf[4096];
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) return true;
    out.append(buf, static_cast<std::size_t>(n));
  }
}

size_t append_cb(char* p, size_t size, size_t n, void* user) {
  static_cast<std::string*>(user)->append(p, size * n);
  return size * n;
}

}  // namespace

TEST_SUITE("server") {
  TEST_CASE("an idle keep-alive connection is closed at the idle timeout") {
    Dir dir("idle");
    ServerConfig cfg = plain_config(dir.site("ok"));
    cfg.timeouts.idle = milliseconds(500);
    auto server = start(cfg);
    autotls::testing::RawConn conn(server->http_port());
    REQUIRE(conn.connected());
    auto [status, body] = conn.get("idle.test");
    REQUIRE(status == 200);
    CHECK(body == "ok");
    // The response kept the connection open; now it waits for a request that never comes.
    CHECK(conn.last_head().find("Connection: close") == std::string::npos);
    CHECK(server->counters().idle_closed == 0);
    // Idle 500 ms plus the 50 ms deadline scan; 10 s is the bound that keeps the test from
    // hanging if the server never closes it.
    CHECK(conn.closed_within(milliseconds(10'000)));
    auto c = server->counters();
    CHECK(c.idle_closed == 1);
    CHECK(c.header_timeout == 0);  // counted as idle, not as a slow header
    server->shutdown(milliseconds(0));
  }

  TEST_CASE("a request body that stalls past the read timeout ends the connection") {
    // Only a proxied request reads a body (a static site answers 405 without reading it): the
    // body goes to the upstream as it arrives, each client read waiting up to timeouts.read.
    httplib::Server up;
    std::atomic<int> upstream_calls{0};
    up.Post("/upload", [&](const httplib::Request&, httplib::Response& res) {
      ++upstream_calls;
      res.set_content("uploaded", "text/plain");
    });
    int up_port = up.bind_to_any_port("127.0.0.1");
    REQUIRE(up_port > 0);
    std::thread up_thread([&] { up.listen_after_bind(); });
    while (!up.is_running()) std::this_thread::sleep_for(milliseconds(5));
    struct Stop {
      httplib::Server& s;
      std::thread& t;
      ~Stop() {
        s.stop();
        t.join();
      }
    } stop_upstream{up, up_thread};

    Dir dir("bodystall");
    ServerConfig cfg = plain_config(dir.site("ok"));
    cfg.sites["stall.test"] = ProxySite{"http://127.0.0.1:" + std::to_string(up_port)};
    cfg.timeouts.read = milliseconds(500);
    // The idle and header deadlines are long, so only the body read timeout can end it.
    cfg.timeouts.idle = milliseconds(60'000);
    cfg.timeouts.header = milliseconds(60'000);
    auto server = start(cfg);
    int fd = autotls::testing::connect_to(server->http_port());
    REQUIRE(fd >= 0);
    // A complete header announcing 100 body bytes, then 10 of them and nothing more.
    std::string req =
        "POST /upload HTTP/1.1\r\nHost: stall.test\r\nContent-Length: 100\r\n\r\n0123456789";
    REQUIRE(::send(fd, req.data(), req.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(req.size()));
    std::string got;
    // 500 ms read timeout; 10 s only bounds the test if the server never closes.
    bool closed = read_until_closed(fd, milliseconds(10'000), got);
    ::close(fd);
    CAPTURE(got);
    CHECK(closed);
    // The exchange failed (502: the upstream never got the whole request) and, the body being
    // cut short, the connection is not kept alive: its missing bytes would parse as a request.
    CHECK(got.starts_with("HTTP/1.1 502 "));
    CHECK(got.find("Connection: close") != std::string::npos);
    CHECK(upstream_calls.load() == 0);
    // The server still serves others.
    autotls::testing::RawConn other(server->http_port());
    CHECK(other.get("other.test").first == 200);
    server->shutdown(milliseconds(0));
  }

  TEST_CASE("the https listener serves over IPv6 on ::1") {
    // Skip when this machine has no IPv6 loopback (a container without it).
    {
      int probe = ::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_in6 a{};
      a.sin6_family = AF_INET6;
      a.sin6_addr = in6addr_loopback;
      bool ok = probe >= 0 && ::bind(probe, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
      if (probe >= 0) ::close(probe);
      if (!ok) {
        MESSAGE("SKIP: ::1 cannot be bound on this machine");
        return;
      }
    }
    auto ca = autotls::testing::make_test_ca("limits test CA");
    REQUIRE(ca);
    auto leaf = autotls::testing::make_test_leaf({"v6.test"}, *ca);
    REQUIRE(leaf);
    auto store = std::make_shared<tlsreload::CertStore>();
    REQUIRE(store->publish_pem(leaf->cert_pem, leaf->key_pem));
    Dir dir("ipv6");
    fs::path ca_file = dir.path / "ca.pem";
    std::ofstream(ca_file) << ca->cert_pem;
    ServerConfig cfg = plain_config(dir.site("over v6"));
    cfg.https = {{"::1", 0}};
    cfg.http = {{"::1", 0}};
    auto server = start(cfg, store);
    int port = server->https_port();
    REQUIRE(port > 0);

    // Nothing answers on 127.0.0.1 at that port: the listener is the IPv6 one only.
    int v4 = autotls::testing::connect_to(port);
    CHECK(v4 < 0);
    if (v4 >= 0) ::close(v4);

    std::string body, err(CURL_ERROR_SIZE, '\0');
    CURL* h = curl_easy_init();
    std::string url = "https://v6.test:" + std::to_string(port) + "/";
    curl_slist* resolve =
        curl_slist_append(nullptr, ("v6.test:" + std::to_string(port) + ":[::1]").c_str());
    curl_easy_setopt(h, CURLOPT_URL, url.c_str());
    curl_easy_setopt(h, CURLOPT_RESOLVE, resolve);
    curl_easy_setopt(h, CURLOPT_CAINFO, ca_file.c_str());
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, append_cb);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &body);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, err.data());
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 10'000L);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    CURLcode code = curl_easy_perform(h);
    long status = 0;
    char* ip = nullptr;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_getinfo(h, CURLINFO_PRIMARY_IP, &ip);
    std::string primary = ip ? ip : "";
    curl_slist_free_all(resolve);
    curl_easy_cleanup(h);
    CHECK_MESSAGE(code == CURLE_OK, err.c_str());
    CHECK(status == 200);
    CHECK(body == "over v6");
    CHECK(primary == "::1");
    CHECK(server->counters().handshakes == 1);
    server->shutdown(milliseconds(0));
  }
}
