// Static files carry validators (ETag, Last-Modified) and answer conditional requests: a
// browser revalidating its cached copy gets 304, a stale If-Range gets the whole file, a failed
// If-Match gets 412. Over real loopback sockets, on every path a static answer takes: the
// reactor's fast path (a plain GET), httplib on the reactor (a small file with a conditional
// field) and a worker (a file over 64 KiB, streamed).

#include <doctest/doctest.h>

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "acme/util/http_date.h"
#include "server/server.h"
#include "tests/support/net.h"
#include "tests/support/temp_dir.h"
#include "tlsreload/store.h"

using namespace autotls;
using namespace autotls::server;
using std::chrono::milliseconds;
using autotls::testing::connect_to;
using SteadyClock = std::chrono::steady_clock;
namespace fs = std::filesystem;

namespace {

struct Response {
  std::string head;  // status line and fields, up to the blank line
  std::string body;
  int status = 0;
  std::string field(const std::string& name) const {
    auto at = head.find("\r\n" + name + ": ");
    if (at == std::string::npos) return {};
    at += name.size() + 4;
    return head.substr(at, head.find("\r\n", at) - at);
  }
};

// Client is one keep-alive connection that sends a request and reads one response (framed
// by Content-Length; no body after a 304 or a HEAD, whatever Content-Length says).
class Client {
 public:
  explicit Client(int port) : fd_(connect_to(port, std::chrono::seconds(3))) { REQUIRE(fd_ >= 0); }
  ~Client() { ::close(fd_); }
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  Response get(const std::string& path, const std::string& fields = "", bool head = false) {
    std::string req = std::string(head ? "HEAD " : "GET ") + path +
                      " HTTP/1.1\r\nHost: s.test\r\n" + fields + "\r\n";
    REQUIRE(::send(fd_, req.data(), req.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(req.size()));
    Response r;
    REQUIRE(read_until([&] { return buf_.find("\r\n\r\n") != std::string::npos; }));
    auto end = buf_.find("\r\n\r\n");
    r.head = buf_.substr(0, end + 2);
    buf_.erase(0, end + 4);
    r.status = std::stoi(r.head.substr(9, 3));
    std::size_t len = 0;
    if (auto cl = r.field("Content-Length"); !cl.empty()) len = std::stoul(cl);
    if (head || r.status == 304) len = 0;
    REQUIRE(read_until([&] { return buf_.size() >= len; }));
    r.body = buf_.substr(0, len);
    buf_.erase(0, len);
    return r;
  }
  // idle: nothing more arrived (a 304 must not be followed by a body).
  bool idle() {
    pollfd p{fd_, POLLIN, 0};
    return buf_.empty() && ::poll(&p, 1, 100) == 0;
  }

 private:
  template <class F>
  bool read_until(F done) {
    auto deadline = SteadyClock::now() + std::chrono::seconds(5);
    char tmp[64 * 1024];
    while (!done()) {
      auto left = std::chrono::duration_cast<milliseconds>(deadline - SteadyClock::now());
      pollfd p{fd_, POLLIN, 0};
      if (left.count() <= 0 || ::poll(&p, 1, static_cast<int>(left.count())) <= 0) return false;
      ssize_t n = ::recv(fd_, tmp, sizeof tmp, 0);
      if (n <= 0) return false;
      buf_.append(tmp, static_cast<std::size_t>(n));
    }
    return true;
  }
  int fd_;
  std::string buf_;
};

std::unique_ptr<Server> start(const fs::path& www) {
  ServerConfig cfg;
  cfg.https = {{"127.0.0.1", 0}};
  cfg.http = {{"127.0.0.1", 0}};
  cfg.redirect_to_https = false;
  cfg.sites["s.test"] = StaticSite{www};
  auto s = Server::create(std::move(cfg), std::make_shared<tlsreload::CertStore>(), nullptr, nullptr);
  REQUIRE_MESSAGE(s, s.error().message);
  REQUIRE((*s)->start());
  return std::move(*s);
}

}  // namespace

TEST_SUITE("server") {
  TEST_CASE("static files carry ETag and Last-Modified and answer conditional requests with 304, 412 or the whole file") {
    autotls::testing::TempDir dir("autotls-cond");
    fs::path www = dir.path / "www";
    fs::create_directories(www);
    const std::string small = "small file\n", large(200'000, 'L');
    std::ofstream(www / "small.txt") << small;
    std::ofstream(www / "large.bin") << large;
    auto srv = start(www);
    Client c(srv->http_port());

    for (const auto& [path, content] : {std::pair{std::string("/small.txt"), small},
                                        std::pair{std::string("/large.bin"), large}}) {
      CAPTURE(path);
      struct stat st {};
      REQUIRE(::stat((www / path.substr(1)).c_str(), &st) == 0);
      const std::string last_modified = format_http_date(st.st_mtim.tv_sec);

      // A plain GET (the small file: the reactor's fast path) and a HEAD carry both.
      auto plain = c.get(path);
      CHECK(plain.status == 200);
      CHECK(plain.body == content);
      const std::string etag = plain.field("ETag");
      CHECK(etag.size() > 2);
      CHECK(etag.front() == '"');
      CHECK(plain.field("Last-Modified") == last_modified);
      auto head = c.get(path, "", true);
      CHECK(head.status == 200);
      CHECK(head.field("ETag") == etag);
      CHECK(head.field("Last-Modified") == last_modified);

      // Revalidation: 304, no body, the validators and the 200's length.
      for (const std::string& fields :
           {"If-None-Match: " + etag + "\r\n", "If-None-Match: \"nope\", W/" + etag + "\r\n",
            std::string("If-None-Match: *\r\n"), "If-Modified-Since: " + last_modified + "\r\n",
            "If-Modified-Since: " + format_http_date(st.st_mtim.tv_sec + 3600) + "\r\n"}) {
        CAPTURE(fields);
        auto r = c.get(path, fields);
        CHECK(r.status == 304);
        CHECK(r.field("ETag") == etag);
        CHECK(r.field("Last-Modified") == last_modified);
        CHECK(r.field("Content-Length") == std::to_string(content.size()));
        CHECK(r.field("Content-Type").empty());
        CHECK(c.idle());
        auto h = c.get(path, fields, true);
        CHECK(h.status == 304);
      }
      // Not the same copy: the file.
      for (const std::string& fields :
           {std::string("If-None-Match: \"nope\"\r\n"),
            "If-Modified-Since: " + format_http_date(st.st_mtim.tv_sec - 1) + "\r\n",
            std::string("If-Modified-Since: not a date\r\n"),
            // If-None-Match wins over If-Modified-Since.
            "If-None-Match: \"nope\"\r\nIf-Modified-Since: " + last_modified + "\r\n"}) {
        CAPTURE(fields);
        auto r = c.get(path, fields);
        CHECK(r.status == 200);
        CHECK(r.body == content);
      }
      // If-Match / If-Unmodified-Since: 412 when they fail.
      CHECK(c.get(path, "If-Match: " + etag + "\r\n").status == 200);
      auto failed = c.get(path, "If-Match: \"nope\"\r\n");
      CHECK(failed.status == 412);
      CHECK(failed.field("ETag") == etag);
      CHECK(c.get(path, "If-Unmodified-Since: " + format_http_date(st.st_mtim.tv_sec - 60) + "\r\n")
                .status == 412);
      // If-Range: the range when the copy is this one, the whole file otherwise.
      auto part = c.get(path, "Range: bytes=0-4\r\nIf-Range: " + etag + "\r\n");
      CHECK(part.status == 206);
      CHECK(part.body == content.substr(0, 5));
      CHECK(part.field("ETag") == etag);
      auto by_date = c.get(path, "Range: bytes=0-4\r\nIf-Range: " + last_modified + "\r\n");
      CHECK(by_date.status == 206);
      for (const std::string& stale : {std::string("\"nope\""), "W/" + etag,
                                       format_http_date(st.st_mtim.tv_sec - 1)}) {
        CAPTURE(stale);
        auto whole = c.get(path, "Range: bytes=0-4\r\nIf-Range: " + stale + "\r\n");
        CHECK(whole.status == 200);
        CHECK(whole.body == content);
      }
    }

    // The file changes: its tag changes, and the old tag gets the new file.
    auto before = c.get("/small.txt");
    const std::string old_tag = before.field("ETag");
    std::ofstream(www / "small.txt", std::ios::trunc) << "changed\n";
    struct timespec times[2] = {{0, UTIME_OMIT}, {std::time(nullptr) + 5, 0}};
    REQUIRE(::utimensat(AT_FDCWD, (www / "small.txt").c_str(), times, 0) == 0);
    auto after = c.get("/small.txt", "If-None-Match: " + old_tag + "\r\n");
    CHECK(after.status == 200);
    CHECK(after.body == "changed\n");
    CHECK(after.field("ETag") != old_tag);
    srv->shutdown(milliseconds(1'000));
  }
}
