// WebSocket through the reverse proxy, over real loopback sockets: the upgrade request goes on
// with its Upgrade, the upstream's 101 comes back, and then bytes pass both ways (plain HTTP and
// TLS), with half-closes, an idle timeout, more tunnels than workers, and a shutdown that ends
// them at once.

#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include <atomic>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <httplib.h>

#include "server/server.h"
#include "tests/support/net.h"
#include "tests/support/start_server.h"
#include "tests/support/temp_dir.h"
#include "tests/support/pebble_env.h"
#include "tlsreload/store.h"

using namespace autotls;
using namespace autotls::server;
using std::chrono::milliseconds;
using autotls::testing::connect_to;
using SteadyClock = std::chrono::steady_clock;
namespace fs = std::filesystem;

using autotls::testing::start_server;

namespace {

bool send_all(int fd, std::string_view s) {
  while (!s.empty()) {
    ssize_t n = ::send(fd, s.data(), s.size(), MSG_NOSIGNAL);
    if (n <= 0) return false;
    s.remove_prefix(static_cast<size_t>(n));
  }
  return true;
}

std::string upper(std::string s) {
  for (char& ch : s) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  return s;
}

// WsUpstream is a loopback upstream on bare sockets. Per request path:
//   /ws          101 (Upgrade: websocket, Sec-WebSocket-Accept: accept-<key>) and "hello" in
//                the same write; then every byte received comes back upper-cased; at the
//                client's end (EOF) it sends "bye" and closes
//   /ws-quiet    101, then only the echo (no "hello", no "bye")
//   /ws-no-name  101 without an Upgrade header
//   /refuse      403 "no" (keep-alive)
//   /plain       200 whose body is the request header as received (keep-alive)
// Every request header is kept in heads.
class WsUpstream {
 public:
  int port = 0;
  std::atomic<int> accepted{0};
  std::atomic<int> live{0};    // connections open now
  std::atomic<int> tunnels{0}; // 101s sent

  WsUpstream() : listen_fd_(autotls::testing::listen_loopback(port)) {
    acceptor_ = std::thread([this] { accept_loop(); });
  }
  ~WsUpstream() {
    stop_ = true;
    acceptor_.join();
    {
      std::lock_guard lock(mu_);
      for (int fd : fds_) ::shutdown(fd, SHUT_RDWR);
    }
    for (auto& t : conns_) t.join();
    ::close(listen_fd_);
  }
  WsUpstream(const WsUpstream&) = delete;
  WsUpstream& operator=(const WsUpstream&) = delete;

  std::vector<std::string> heads() {
    std::lock_guard lock(mu_);
    return heads_;
  }

 private:
  void accept_loop() {
    while (!stop_) {
      pollfd p{listen_fd_, POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      ++accepted;
      ++live;
      {
        std::lock_guard lock(mu_);
        fds_.push_back(fd);
      }
      conns_.emplace_back([this, fd] {
        serve(fd);
        ::close(fd);
        --live;
      });
    }
  }

  void serve(int fd) {
    std::string buf;
    char tmp[16 * 1024];
    for (;;) {
      std::size_t end;
      while ((end = buf.find("\r\n\r\n")) == std::string::npos) {
        ssize_t n = ::recv(fd, tmp, sizeof tmp, 0);
        if (n <= 0) return;
        buf.append(tmp, static_cast<size_t>(n));
      }
      std::string head = buf.substr(0, end + 4);
      buf.erase(0, end + 4);
      {
        std::lock_guard lock(mu_);
        heads_.push_back(head);
      }
      std::string path = head.substr(head.find(' ') + 1);
      path = path.substr(0, path.find(' '));
      auto field = [&](const std::string& name) {
        auto at = head.find("\r\n" + name + ": ");
        if (at == std::string::npos) return std::string();
        at += name.size() + 4;
        return head.substr(at, head.find("\r\n", at) - at);
      };
      if (path == "/refuse") {
        if (!send_all(fd, "HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")) return;
        continue;
      }
      if (path == "/plain") {
        if (!send_all(fd, "HTTP/1.1 200 OK\r\nContent-Length: " + std::to_string(head.size()) +
                              "\r\n\r\n" + head)) {
          return;
        }
        continue;
      }
      if (path == "/ws-no-name") {
        send_all(fd, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n");
        return;
      }
      bool quiet = path == "/ws-quiet";
      ++tunnels;
      std::string answer =
          "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          "Sec-WebSocket-Accept: accept-" + field("Sec-WebSocket-Key") + "\r\n\r\n";
      if (!quiet) answer += "hello";
      if (!send_all(fd, answer)) return;
      // Echo, upper-cased, until the client's end.
      if (!buf.empty() && !send_all(fd, upper(buf))) return;
      for (;;) {
        ssize_t n = ::recv(fd, tmp, sizeof tmp, 0);
        if (n <= 0) break;
        if (!send_all(fd, upper(std::string(tmp, static_cast<size_t>(n))))) return;
      }
      if (!quiet) send_all(fd, "bye");
      return;
    }
  }

  int listen_fd_ = -1;
  std::atomic<bool> stop_{false};
  std::thread acceptor_;
  std::vector<std::thread> conns_;  // the acceptor's until it is joined
  std::mutex mu_;
  std::vector<int> fds_;
  std::vector<std::string> heads_;
};

// Stream is the client side: a TCP connection to the server, with TLS over it or not.
class Stream {
 public:
  Stream(int port, SSL_CTX* ctx, const std::string& sni) {
    fd_ = connect_to(port, std::chrono::seconds(3));
    REQUIRE(fd_ >= 0);
    if (!ctx) return;
    ssl_ = SSL_new(ctx);
    SSL_set_fd(ssl_, fd_);
    SSL_set_tlsext_host_name(ssl_, sni.c_str());
    REQUIRE(SSL_connect(ssl_) == 1);
  }
  ~Stream() { close(); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  bool send(std::string_view s) {
    if (!ssl_) return send_all(fd_, s);
    while (!s.empty()) {
      int n = SSL_write(ssl_, s.data(), static_cast<int>(s.size()));
      if (n <= 0) return false;
      s.remove_prefix(static_cast<size_t>(n));
    }
    return true;
  }
  // read_until reads until got holds want (true), or the peer closes or 10 s pass (false).
  bool read_until(std::string& got, const std::string& want) {
    auto deadline = SteadyClock::now() + std::chrono::seconds(10);
    while (got.find(want) == std::string::npos) {
      if (!read_some(got, deadline)) return false;
    }
    return true;
  }
  // read_response reads one response framed by Content-Length ("" when it does not come).
  std::string read_response() {
    std::string got;
    if (!read_until(got, "\r\n\r\n")) return "";
    auto head = got.find("\r\n\r\n") + 4;
    auto cl = got.find("Content-Length: ");
    if (cl == std::string::npos || cl > head) return got;
    auto want = head + std::stoul(got.substr(cl + 16));
    auto deadline = SteadyClock::now() + std::chrono::seconds(5);
    while (got.size() < want && read_some(got, deadline)) {
    }
    return got;
  }
  // read_to_close reads until the peer closes (true) or bound passes (false).
  bool read_to_close(std::string& got, milliseconds bound = milliseconds(5'000)) {
    auto deadline = SteadyClock::now() + bound;
    while (read_some(got, deadline)) {
    }
    return closed_;
  }
  // end_writes sends our end (close_notify over TLS, a FIN otherwise), reading still open.
  void end_writes() {
    if (ssl_) {
      SSL_shutdown(ssl_);
    } else {
      ::shutdown(fd_, SHUT_WR);
    }
  }
  void close() {
    if (ssl_) SSL_free(ssl_);
    ssl_ = nullptr;
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  bool read_some(std::string& got, SteadyClock::time_point deadline) {
    char buf[16 * 1024];
    if (!ssl_ || SSL_pending(ssl_) == 0) {
      auto left = std::chrono::duration_cast<milliseconds>(deadline - SteadyClock::now());
      if (left.count() <= 0) return false;
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) return false;
    }
    int n = ssl_ ? SSL_read(ssl_, buf, sizeof buf)
                 : static_cast<int>(::recv(fd_, buf, sizeof buf, 0));
    if (n <= 0) {
      ERR_clear_error();
      closed_ = true;
      return false;
    }
    got.append(buf, static_cast<size_t>(n));
    return true;
  }

  int fd_ = -1;
  SSL* ssl_ = nullptr;
  bool closed_ = false;
};

std::string upgrade_request(const std::string& path, const std::string& host = "p.test") {
  return "GET " + path + " HTTP/1.1\r\nHost: " + host +
         "\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n"
         "Sec-WebSocket-Key: k3y\r\nSec-WebSocket-Version: 13\r\n\r\n";
}

ServerConfig ws_config(const WsUpstream& up, milliseconds tunnel_idle = milliseconds(30'000)) {
  ServerConfig cfg;
  cfg.https = {{"127.0.0.1", 0}};
  cfg.http = {{"127.0.0.1", 0}};
  cfg.redirect_to_https = false;
  cfg.worker_threads = 2;
  ProxySite p{"http://127.0.0.1:" + std::to_string(up.port)};
  p.tunnel_idle_timeout = tunnel_idle;
  cfg.sites["p.test"] = p;
  return cfg;
}

using autotls::testing::wait_until;

// opened runs an upgrade for path on s and checks the 101; returns what followed it.
std::string opened(Stream& s, const std::string& path, const std::string& early = "") {
  REQUIRE(s.send(upgrade_request(path) + early));
  std::string got;
  REQUIRE(s.read_until(got, "\r\n\r\n"));
  CAPTURE(got);
  CHECK(got.rfind("HTTP/1.1 101 Switching Protocols\r\n", 0) == 0);
  CHECK(got.find("\r\nUpgrade: websocket\r\n") != std::string::npos);
  CHECK(got.find("\r\nConnection: Upgrade\r\n") != std::string::npos);
  CHECK(got.find("\r\nSec-WebSocket-Accept: accept-k3y\r\n") != std::string::npos);
  CHECK(got.find("Keep-Alive") == std::string::npos);
  CHECK(got.find("Content-Length") == std::string::npos);
  return got.substr(got.find("\r\n\r\n") + 4);
}

}  // namespace

TEST_SUITE("server") {
  TEST_CASE("proxy passes a WebSocket upgrade on and tunnels bytes both ways until both ends close") {
    WsUpstream up;
    auto cfg = ws_config(up);
    cfg.admin.endpoint = Endpoint{"127.0.0.1", 0};
    auto srv = start_server(std::move(cfg));
    Stream s(srv->http_port(), nullptr, "");
    // Bytes sent right behind the request reach the upstream after it.
    std::string got = opened(s, "/ws", "early;");
    REQUIRE(s.read_until(got, "helloEARLY;"));
    CHECK(got == "helloEARLY;");

    CHECK(srv->counters().tunnels_open == 1);
    CHECK(srv->counters().tunnels == 1);
    auto heads = up.heads();
    REQUIRE(heads.size() == 1);
    CAPTURE(heads[0]);
    CHECK(heads[0].rfind("GET /ws HTTP/1.1\r\n", 0) == 0);
    CHECK(heads[0].find("\r\nConnection: Upgrade\r\n") != std::string::npos);
    CHECK(heads[0].find("\r\nUpgrade: websocket\r\n") != std::string::npos);
    CHECK(heads[0].find("\r\nSec-WebSocket-Key: k3y\r\n") != std::string::npos);
    CHECK(heads[0].find("\r\nX-Forwarded-For: 127.0.0.1\r\n") != std::string::npos);
    CHECK(heads[0].find("keep-alive") == std::string::npos);

    // Messages both ways, then 2 MB at once: the tunnel waits for the slower side.
    got.clear();
    REQUIRE(s.send("ping-1"));
    REQUIRE(s.read_until(got, "PING-1"));
    std::string big(2 << 20, 'x');
    for (std::size_t i = 0; i < big.size(); i += 997) big[i] = 'y';
    big += "the end";
    std::thread writer([&] { CHECK(s.send(big)); });
    got.clear();
    bool all = s.read_until(got, "THE END");
    writer.join();
    CHECK(all);
    CHECK(got.size() == big.size());
    CHECK((got == upper(big)));  // not printed: 2 MB

    // Our end goes on to the upstream, whose last words and close come back.
    s.end_writes();
    got.clear();
    CHECK(s.read_to_close(got));
    CHECK(got == "bye");
    CHECK(wait_until([&] { return up.live.load() == 0; }));
    // The server closed the client connection after the tunnel.
    CHECK(wait_until([&] { return srv->counters().open_connections == 0; }));
    // The tunnel's life is not a request's latency: the histogram has no entry for the 101.
    httplib::Client adm("127.0.0.1", srv->admin_port());
    auto m = adm.Get("/metrics");
    REQUIRE(m);
    CHECK(m->body.find("\nautotls_server_request_duration_seconds_count 0\n") != std::string::npos);
    CHECK(m->body.find("\nautotls_server_tunnels_open 0\n") != std::string::npos);
    CHECK(m->body.find("\nautotls_server_tunnels_total 1\n") != std::string::npos);
    srv->shutdown(milliseconds(1'000));
  }

  TEST_CASE("proxy tunnels a WebSocket over TLS") {
    WsUpstream up;
    auto ca = autotls::testing::make_test_ca("upgrade test CA");
    REQUIRE(ca);
    auto leaf = autotls::testing::make_test_leaf({"p.test"}, *ca);
    REQUIRE(leaf);
    auto store = std::make_shared<tlsreload::CertStore>();
    REQUIRE(store->publish_pem(leaf->cert_pem, leaf->key_pem));
    auto srv = start_server(ws_config(up), store);
    SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
    {
      Stream s(srv->https_port(), ctx, "p.test");
      std::string got = opened(s, "/ws");
      REQUIRE(s.read_until(got, "hello"));
      got.clear();
      for (int i = 0; i < 50; ++i) {
        std::string msg = "message " + std::to_string(i) + ";";
        REQUIRE(s.send(msg));
        REQUIRE(s.read_until(got, upper(msg)));
      }
      std::string big(300'000, 'q');
      big += "the end";
      std::thread writer([&] { CHECK(s.send(big)); });
      got.clear();
      bool all = s.read_until(got, "THE END");
      writer.join();
      CHECK(all);
      CHECK((got == upper(big)));
      s.end_writes();  // close_notify
      got.clear();
      CHECK(s.read_to_close(got));
      CHECK(got == "bye");
    }
    CHECK(wait_until([&] { return up.live.load() == 0; }));
    SSL_CTX_free(ctx);
    srv->shutdown(milliseconds(1'000));
  }

  TEST_CASE("an upgrade the upstream refuses is an ordinary response, and h2c is never passed on") {
    WsUpstream up;
    auto srv = start_server(ws_config(up));
    Stream s(srv->http_port(), nullptr, "");
    REQUIRE(s.send(upgrade_request("/refuse")));
    std::string got;
    REQUIRE(s.read_until(got, "\r\n\r\nno"));
    CHECK(got.rfind("HTTP/1.1 403 ", 0) == 0);
    // The connection stays an HTTP connection.
    REQUIRE(s.send("GET /plain HTTP/1.1\r\nHost: p.test\r\nConnection: Upgrade\r\n"
                   "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"));
    got = s.read_response();
    CAPTURE(got);
    CHECK(got.rfind("HTTP/1.1 200 ", 0) == 0);
    std::string echoed = got.substr(got.find("\r\n\r\n") + 4);
    CHECK(echoed.find("Upgrade") == std::string::npos);
    CHECK(echoed.find("h2c") == std::string::npos);
    // A WebSocket upgrade with a body, or by POST, is a plain request too.
    REQUIRE(s.send("POST /plain HTTP/1.1\r\nHost: p.test\r\nConnection: Upgrade\r\n"
                   "Upgrade: websocket\r\nContent-Length: 2\r\n\r\nab"));
    got = s.read_response();
    CAPTURE(got);
    CHECK(got.rfind("HTTP/1.1 200 ", 0) == 0);
    CHECK(got.find("POST /plain") != std::string::npos);
    CHECK(got.substr(got.find("\r\n\r\n") + 4).find("Upgrade") == std::string::npos);
    CHECK(up.tunnels.load() == 0);
    srv->shutdown(milliseconds(1'000));
  }

  TEST_CASE("a 101 without an Upgrade header, or to a request that asked none, is a 502") {
    WsUpstream up;
    auto srv = start_server(ws_config(up));
    {
      Stream s(srv->http_port(), nullptr, "");
      REQUIRE(s.send(upgrade_request("/ws-no-name")));
      std::string got;
      CHECK(s.read_to_close(got));
      CAPTURE(got);
      CHECK(got.rfind("HTTP/1.1 502 ", 0) == 0);
    }
    {
      // No Connection: upgrade, so nothing was asked.
      Stream s(srv->http_port(), nullptr, "");
      REQUIRE(s.send("GET /ws HTTP/1.1\r\nHost: p.test\r\nUpgrade: websocket\r\n\r\n"));
      std::string got;
      REQUIRE(s.read_until(got, "\r\n\r\n"));
      CAPTURE(got);
      CHECK(got.rfind("HTTP/1.1 502 ", 0) == 0);
    }
    srv->shutdown(milliseconds(1'000));
  }

  TEST_CASE("tunnels do not take the workers: more tunnels than workers, and requests still served") {
    WsUpstream up;
    auto cfg = ws_config(up);
    cfg.worker_threads = 2;
    auto srv = start_server(std::move(cfg));
    auto threads = [] {
      std::size_t n = 0;
      for ([[maybe_unused]] const auto& t : fs::directory_iterator("/proc/self/task")) ++n;
      return n;
    };
    const std::size_t before = threads();
    constexpr int kTunnels = 16;
    std::vector<std::unique_ptr<Stream>> open;
    for (int i = 0; i < kTunnels; ++i) {
      open.push_back(std::make_unique<Stream>(srv->http_port(), nullptr, ""));
      std::string got = opened(*open.back(), "/ws-quiet");
      CHECK(got.empty());
    }
    // All tunnels run on one thread of the server's: the process has one thread more per
    // tunnel (the test upstream's, one per connection) and the tunnel thread, not a worker per
    // tunnel besides.
    const std::size_t during = threads();
    CHECK_MESSAGE(during <= before + kTunnels + 2, ("threads before " + std::to_string(before) +
                                                    ", with the tunnels " + std::to_string(during)));
    // Every tunnel still answers.
    for (std::size_t i = 0; i < open.size(); ++i) {
      std::string msg = "t" + std::to_string(i) + ";";
      REQUIRE(open[i]->send(msg));
      std::string got;
      CHECK(open[i]->read_until(got, upper(msg)));
    }
    // And an ordinary proxied request finds a worker.
    {
      Stream s(srv->http_port(), nullptr, "");
      REQUIRE(s.send("GET /plain HTTP/1.1\r\nHost: p.test\r\n\r\n"));
      std::string got;
      CHECK(s.read_until(got, "\r\n\r\nGET /plain"));
    }
    for (auto& s : open) s->end_writes();
    for (auto& s : open) {
      std::string got;
      CHECK(s->read_to_close(got));
    }
    CHECK(wait_until([&] { return up.live.load() <= 1; }));  // the /plain connection is pooled
    srv->shutdown(milliseconds(1'000));
  }

  TEST_CASE("a tunnel where nothing moves is closed at tunnel_idle_timeout") {
    WsUpstream up;
    // 1 s: wide enough that a loaded machine (sanitizers, -j2) never lets 1 s pass between
    // two of the messages below.
    auto srv = start_server(ws_config(up, milliseconds(1'000)));
    Stream s(srv->http_port(), nullptr, "");
    std::string got = opened(s, "/ws-quiet");
    // Traffic keeps it open past the timeout.
    for (int i = 0; i < 8; ++i) {
      std::this_thread::sleep_for(milliseconds(200));
      REQUIRE(s.send("x"));
      REQUIRE(s.read_until(got, std::string(static_cast<std::size_t>(i + 1), 'X')));
    }
    auto quiet_from = SteadyClock::now();
    got.clear();
    CHECK(s.read_to_close(got, milliseconds(5'000)));
    CHECK(got.empty());
    CHECK(SteadyClock::now() - quiet_from >= milliseconds(800));
    CHECK(wait_until([&] { return up.live.load() == 0; }));
    srv->shutdown(milliseconds(1'000));
  }

  TEST_CASE("shutdown ends open tunnels at once instead of waiting out the drain") {
    WsUpstream up;
    auto srv = start_server(ws_config(up));
    Stream a(srv->http_port(), nullptr, "");
    Stream b(srv->http_port(), nullptr, "");
    opened(a, "/ws-quiet");
    opened(b, "/ws-quiet");
    std::string got;
    REQUIRE(a.send("still here"));
    REQUIRE(a.read_until(got, "STILL HERE"));
    auto t0 = SteadyClock::now();
    srv->shutdown(milliseconds(20'000));
    // Well inside the drain deadline: nothing else was in flight.
    CHECK(SteadyClock::now() - t0 < milliseconds(10'000));
    got.clear();
    CHECK(a.read_to_close(got, milliseconds(2'000)));
    CHECK(b.read_to_close(got, milliseconds(2'000)));
    CHECK(wait_until([&] { return up.live.load() == 0; }));
  }
}
