// Request heads that two readers could read apart (RFC 9112 framing, field syntax), over real
// loopback sockets: a proxy site in front of an upstream that answers with the exact bytes of
// the head it received, so a test sees what we forwarded, and a static site beside it.

#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "server/server.h"
#include "tests/support/net.h"
#include "tests/support/start_server.h"
#include "tests/support/temp_dir.h"

using namespace autotls;
using namespace autotls::server;
using std::chrono::milliseconds;
namespace fs = std::filesystem;

namespace {

// HeadEcho is a loopback upstream on bare sockets: for each request it reads the head (and a
// Content-Length body), then answers 200 whose body is the head exactly as it arrived; to a
// head with "X-Hop-Fields: yes" the answer also carries "Connection: X-Up-Hop", "X-Up-Hop"
// and "X-Up-Kept"; to one with "X-Chunked: yes" the body goes in one chunk (no
// Content-Length). requests counts the heads it read.
class HeadEcho {
 public:
  HeadEcho() {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    REQUIRE(::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    REQUIRE(::listen(listen_fd_, 16) == 0);
    REQUIRE(::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &len) == 0);
    port = ntohs(a.sin_port);
    acceptor_ = std::thread([this] { accept_loop(); });
  }
  ~HeadEcho() {
    stop_ = true;
    ::shutdown(listen_fd_, SHUT_RDWR);
    acceptor_.join();
    for (auto& t : conns_) t.join();
    ::close(listen_fd_);
  }
  HeadEcho(const HeadEcho&) = delete;
  HeadEcho& operator=(const HeadEcho&) = delete;

  int port = 0;
  std::atomic<int> requests{0};

 private:
  void accept_loop() {
    for (;;) {
      int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) return;
      conns_.emplace_back([this, fd] {
        serve(fd);
        ::close(fd);
      });
    }
  }
  // recv_some waits up to 100 ms at a time, so that the destructor is never held up long.
  bool recv_some(int fd, std::string& in) {
    while (!stop_) {
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      char buf[4096];
      ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n <= 0) return false;
      in.append(buf, static_cast<std::size_t>(n));
      return true;
    }
    return false;
  }
  void serve(int fd) {
    std::string in;
    for (;;) {
      std::size_t end;
      while ((end = in.find("\r\n\r\n")) == std::string::npos) {
        if (!recv_some(fd, in)) return;
      }
      std::string head = in.substr(0, end + 4);
      std::size_t body = 0;
      if (auto cl = head.find("\r\nContent-Length: "); cl != std::string::npos) {
        body = std::stoul(head.substr(cl + 18));
      }
      while (in.size() < head.size() + body) {
        if (!recv_some(fd, in)) return;
      }
      in.erase(0, head.size() + body);
      ++requests;
      std::string hop = head.find("\r\nX-Hop-Fields: yes\r\n") != std::string::npos
                            ? "Connection: X-Up-Hop\r\nX-Up-Hop: 1\r\nX-Up-Kept: 2\r\n"
                            : "";
      std::string out = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n" + hop;
      if (head.find("\r\nX-Chunked: yes\r\n") != std::string::npos) {
        char size[32];
        std::snprintf(size, sizeof size, "%zx", head.size());
        out += "Transfer-Encoding: chunked\r\n\r\n" + std::string(size) + "\r\n" + head + "\r\n0\r\n\r\n";
      } else {
        out += "Content-Length: " + std::to_string(head.size()) + "\r\n\r\n" + head;
      }
      if (::send(fd, out.data(), out.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(out.size())) return;
    }
  }

  int listen_fd_ = -1;
  std::atomic<bool> stop_{false};
  std::thread acceptor_;
  std::vector<std::thread> conns_;  // the acceptor's until it is joined
};

// Plain HTTP (the bytes on the wire are the test's): p.test proxies to the echo, s.test serves
// files.
std::unique_ptr<Server> start_sites(const HeadEcho& up, const fs::path& www) {
  ServerConfig cfg;
  cfg.https = {{"127.0.0.1", 0}};  // the default is 0.0.0.0:443
  cfg.http = {{"127.0.0.1", 0}};
  cfg.redirect_to_https = false;
  cfg.worker_threads = 2;
  cfg.sites["p.test"] = ProxySite{"http://127.0.0.1:" + std::to_string(up.port)};
  fs::create_directories(www);
  std::ofstream(www / "a.txt") << "AAA";
  cfg.sites["s.test"] = StaticSite{www};
  return autotls::testing::start_server(std::move(cfg));
}

// Sites is a test's upstream, site root and server (start_sites), made fresh for it.
struct Sites {
  HeadEcho up;
  autotls::testing::TempDir dir;
  std::unique_ptr<Server> server;
  explicit Sites(const std::string& tag)
      : dir("autotls-rh-" + tag), server(start_sites(up, dir.path / "www")) {}
};

// line_starts tells whether some line of text (after a CRLF) begins with prefix.
bool line_starts(const std::string& text, const std::string& prefix) {
  return text.find("\r\n" + prefix) != std::string::npos;
}

}  // namespace

TEST_SUITE("server") {
  TEST_CASE("field values reach the upstream as the client sent them, '%' and all") {
    Sites s("pct");
    autotls::testing::RawConn c(s.server->http_port());
    REQUIRE(c.connected());
    // httplib 0.11 URL-decodes field values: forwarded, "%0d%0a" became a line break in the
    // upstream's head (a field of the client's making), and "%3D" an '='.
    const std::string fields =
        "X-A: foo%0d%0aX-Injected: 1\r\n"
        "Cookie: s=a%3Db; t=%u0041; u=100%\r\n"
        "Authorization: Bearer a%2Fb\r\n";
    REQUIRE(c.send("GET /x%2Fy?q=%26 HTTP/1.1\r\nHost: p.test\r\n" + fields + "\r\n"));
    auto [status, seen] = c.response();
    REQUIRE(status == 200);
    CHECK(seen.starts_with("GET /x%2Fy?q=%26 HTTP/1.1\r\n"));
    CHECK(line_starts(seen, "X-A: foo%0d%0aX-Injected: 1\r\n"));
    CHECK_FALSE(line_starts(seen, "X-Injected"));
    CHECK(line_starts(seen, "Cookie: s=a%3Db; t=%u0041; u=100%\r\n"));
    CHECK(line_starts(seen, "Authorization: Bearer a%2Fb\r\n"));

    // Pipelined on one connection, each head vetted once whichever thread serves it (escaped
    // twice, "%" would arrive as "%25"): a proxied POST (a worker), a static GET behind it (the
    // worker's pipelined path), two proxied ones, and a static one the reactor serves.
    const std::string post = "POST /p HTTP/1.1\r\nHost: p.test\r\nX-N: 1%\r\nContent-Length: 3\r\n\r\nabc";
    const std::string stat = "GET /a.txt HTTP/1.1\r\nHost: s.test\r\nX-N: 2%25\r\n\r\n";
    const std::string get = "GET /g HTTP/1.1\r\nHost: p.test\r\nX-N: 3%41\r\n\r\n";
    REQUIRE(c.send(post + stat + get + get));
    auto r1 = c.response();
    auto r2 = c.response();
    auto r3 = c.response();
    auto r4 = c.response();
    CHECK(r1.first == 200);
    CHECK(line_starts(r1.second, "X-N: 1%\r\n"));
    CHECK(r2 == std::make_pair(200, std::string("AAA")));
    CHECK(r3.first == 200);
    CHECK(line_starts(r3.second, "X-N: 3%41\r\n"));
    CHECK(r4 == r3);
    REQUIRE(c.send(stat));
    CHECK(c.response() == std::make_pair(200, std::string("AAA")));
    CHECK(s.up.requests == 4);

    // A Host whose '%' httplib would have decoded into a served name is no such name.
    REQUIRE(c.send("GET /a.txt HTTP/1.1\r\nHost: s%2etest\r\n\r\n"));
    CHECK(c.response().first == 400);
    CHECK(s.server->counters().bad_request_head == 0);
  }

  TEST_CASE("fields a Connection field names are not forwarded, either way") {
    Sites s("conn");
    autotls::testing::RawConn c(s.server->http_port());
    REQUIRE(c.connected());
    // RFC 9110 §7.6.1: the fields a Connection names are for that hop alone (Host is never
    // dropped: the upstream needs it).
    REQUIRE(c.send("GET /c HTTP/1.1\r\nHost: p.test\r\nConnection: keep-alive, X-Secret\r\n"
                   "Connection: host, x-other-secret\r\nX-Secret: 1\r\nX-Other-Secret: 2\r\n"
                   "X-Kept: 3\r\nX-Hop-Fields: yes\r\n\r\n"));
    auto [status, seen] = c.response();
    REQUIRE(status == 200);
    CHECK(line_starts(seen, "Host: p.test\r\n"));
    CHECK(line_starts(seen, "X-Kept: 3\r\n"));
    CHECK_FALSE(line_starts(seen, "X-Secret"));
    CHECK_FALSE(line_starts(seen, "X-Other-Secret"));
    // And the upstream's: its X-Up-Hop stays on its hop.
    CHECK(c.last_head().find("\r\nX-Up-Kept: 2") != std::string::npos);
    CHECK(c.last_head().find("X-Up-Hop") == std::string::npos);
  }

  TEST_CASE("a proxied Range is the upstream's to answer: its whole 200 reaches the client whole") {
    Sites s("range");
    autotls::testing::RawConn c(s.server->http_port());
    REQUIRE(c.connected());
    // httplib applied the ranges it parsed to the proxied answer: "200 OK", Content-Length 5,
    // a Content-Range, then every byte of the upstream's body (the rest read as the next
    // response).
    for (int i = 0; i < 2; ++i) {
      REQUIRE(c.send("GET /r HTTP/1.1\r\nHost: p.test\r\nRange: bytes=0-4\r\n\r\n"));
      auto [status, seen] = c.response();
      CHECK(status == 200);
      CHECK(seen.starts_with("GET /r HTTP/1.1\r\n"));
      CHECK(line_starts(seen, "Range: bytes=0-4\r\n"));
      CHECK(c.last_head().find("Content-Range") == std::string::npos);
      CHECK(c.last_head().find("\r\nContent-Length: " + std::to_string(seen.size())) != std::string::npos);
    }
    // Any Range is the upstream's to read, one httplib could not parse among them (it answered
    // 416 itself, before the proxy ran).
    REQUIRE(c.send("GET /r HTTP/1.1\r\nHost: p.test\r\nRange: items=0-1 , 5%\r\n\r\n"));
    auto [status, seen] = c.response();
    CHECK(status == 200);
    CHECK(line_starts(seen, "Range: items=0-1 , 5%\r\n"));
    CHECK_FALSE(line_starts(seen, "X-Autotls-Range"));
    CHECK(c.closed_within(milliseconds(200)) == false);
    CHECK(s.up.requests == 3);
  }

  TEST_CASE("the proxy passes Accept-Encoding on and never compresses an answer itself") {
    Sites s("gzip");
    autotls::testing::RawConn c(s.server->http_port());
    REQUIRE(c.connected());
    // A fixed-length text answer, then a chunked one (httplib gzipped that one).
    REQUIRE(c.send("GET /a HTTP/1.1\r\nHost: p.test\r\nAccept-Encoding: gzip\r\n\r\n"));
    auto [status, seen] = c.response();
    CHECK(status == 200);
    CHECK(line_starts(seen, "Accept-Encoding: gzip\r\n"));
    CHECK(c.last_head().find("Content-Encoding") == std::string::npos);
    REQUIRE(c.send("GET /b HTTP/1.1\r\nHost: p.test\r\nAccept-Encoding: gzip\r\nX-Chunked: yes\r\n\r\n"));
    std::string head = c.read_until("\r\n\r\n");
    REQUIRE_FALSE(head.empty());
    CHECK(head.starts_with("HTTP/1.1 200"));
    CHECK(head.find("Content-Encoding") == std::string::npos);
    std::string body = c.read_until("\r\n0\r\n\r\n");
    CHECK(body.find("GET /b HTTP/1.1\r\n") != std::string::npos);  // the upstream's text, as is
  }

  TEST_CASE("a head with ambiguous framing or a bad field line is refused and the connection closed") {
    Sites s("bad");
    struct Case {
      std::string head;
      int status;
      std::string why;
    };
    const std::string post = "POST /u HTTP/1.1\r\nHost: p.test\r\n";
    const std::vector<Case> cases = {
        {post + "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400,
         "both Content-Length and Transfer-Encoding"},
        {post + "Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcde", 400,
         "more than one Content-Length field"},
        {post + "Content-Length: +3\r\n\r\nabc", 400, "bad Content-Length"},
        {post + "Content-Length : 3\r\n\r\nabc", 400, "bad field name"},
        {post + "Transfer-Encoding: gzip\r\n\r\n0\r\n\r\n", 400,
         "chunked is not the final transfer coding, once"},
        {post + "Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501,
         "transfer coding not implemented"},
        {"POST /u HTTP/1.0\r\nHost: p.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400,
         "Transfer-Encoding in an HTTP/1.0 request"},
        {"GET /a.txt HTTP/1.1\r\nHost: s.test\r\nHost: p.test\r\n\r\n", 400,
         "more than one Host field"},
        {"GET /u HTTP/1.1\r\nHost: p.test\r\nX-A: 1\r\n X-B: 2\r\n\r\n", 400,
         "field line begins with whitespace (obs-fold)"},
        {"GET /u HTTP/1.1\r\nHost: p.test\r\nX-A: 1\r2\r\n\r\n", 400,
         "control character in a field value"},
        {"GET  /a.txt HTTP/1.1\r\nHost: s.test\r\n\r\n", 400, "bad request line"},
        {"GET /a.txt HTTP/2.0\r\nHost: s.test\r\n\r\n", 505, "HTTP version not supported"},
    };
    std::uint64_t refused = 0;
    for (const auto& c : cases) {
      CAPTURE(c.head);
      for (bool behind : {false, true}) {
        CAPTURE(behind);
        autotls::testing::RawConn conn(s.server->http_port());
        REQUIRE(conn.connected());
        // Alone (the reactor reads it), and behind a proxied request on the same connection (the
        // worker that served that one reads it).
        const std::string first = behind ? "GET /first HTTP/1.1\r\nHost: p.test\r\n\r\n" : "";
        const int before = s.up.requests;
        REQUIRE(conn.send(first + c.head));
        if (behind) CHECK(conn.response().first == 200);
        auto [status, body] = conn.response();
        CHECK(status == c.status);
        CHECK(body == c.why + "\n");
        CHECK(conn.last_head().find("\r\nConnection: close") != std::string::npos);
        CHECK(conn.closed_within(milliseconds(2'000)));
        CHECK(s.up.requests == before + (behind ? 1 : 0));
        ++refused;
      }
    }
    CHECK(s.server->counters().bad_request_head == refused);
  }

  TEST_CASE("a chunked body the proxy cannot read answers 400, not the upstream's 502") {
    Sites s("chunk");
    const std::string head = "POST /c HTTP/1.1\r\nHost: p.test\r\nTransfer-Encoding: chunked\r\n\r\n";
    for (std::string body : {std::string("zz\r\nabc\r\n0\r\n\r\n"),
                             std::string("ffffffffffffffffffff\r\nabc\r\n0\r\n\r\n"),
                             std::string("3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n")}) {
      CAPTURE(body);
      autotls::testing::RawConn c(s.server->http_port());
      REQUIRE(c.connected());
      REQUIRE(c.send(head + body));
      auto [status, text] = c.response();
      CHECK(status == 400);
      CHECK(text == "bad request body\n");
      CHECK(c.last_head().find("\r\nConnection: close") != std::string::npos);
      CHECK(c.closed_within(milliseconds(2'000)));
    }
    // A good one still goes through.
    autotls::testing::RawConn c(s.server->http_port());
    REQUIRE(c.send(head + "3\r\nabc\r\n0\r\n\r\n"));
    CHECK(c.response().first == 200);
  }

  TEST_CASE("a head with bare LF line ends or HTTP/1.2 is served as HTTP/1.1") {
    Sites s("lf");
    autotls::testing::RawConn c(s.server->http_port());
    REQUIRE(c.connected());
    REQUIRE(c.send("GET /a.txt HTTP/1.1\nHost: s.test\n\n"));
    CHECK(c.response() == std::make_pair(200, std::string("AAA")));
    REQUIRE(c.send("GET /lf HTTP/1.1\nHost: p.test\nX-A: 5%\r\n\n"));
    auto [status, seen] = c.response();
    CHECK(status == 200);
    CHECK(seen.starts_with("GET /lf HTTP/1.1\r\n"));
    CHECK(line_starts(seen, "X-A: 5%\r\n"));
    REQUIRE(c.send("GET /a.txt HTTP/1.2\r\nHost: s.test\r\n\r\n"));
    CHECK(c.response() == std::make_pair(200, std::string("AAA")));
    CHECK(c.last_head().starts_with("HTTP/1.1 200"));
    CHECK(s.server->counters().bad_request_head == 0);
  }
}
