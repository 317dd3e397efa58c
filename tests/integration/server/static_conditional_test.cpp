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

  TEST_CASE("static ranges: ends cut to the file, 416 with bytes */size, and no answer larger than the file") {
    autotls::testing::TempDir dir("autotls-range");
    fs::path www = dir.path / "www";
    fs::create_directories(www);
    std::string small = "0123456789", large(300'000, 'x');
    for (std::size_t i = 0; i < large.size(); ++i) large[i] = static_cast<char>('a' + i % 26);
    std::ofstream(www / "small.txt") << small;
    std::ofstream(www / "large.bin") << large;
    std::ofstream(www / "empty.txt");
    auto srv = start(www);
    Client c(srv->http_port());
    for (const auto& [path, content] : {std::pair{std::string("/small.txt"), small},
                                        std::pair{std::string("/large.bin"), large}}) {
      CAPTURE(path);
      const std::string size = std::to_string(content.size());
      // A range past the end is cut to it (a player asks bytes=0-1048575 of a small file).
      auto cut = c.get(path, "Range: bytes=2-100000000\r\n");
      CHECK(cut.status == 206);
      CHECK(cut.field("Content-Range") == "bytes 2-" + std::to_string(content.size() - 1) + "/" + size);
      CHECK(cut.body == content.substr(2));
      auto open_end = c.get(path, "Range: bytes=3-\r\n");
      CHECK(open_end.field("Content-Range") == "bytes 3-" + std::to_string(content.size() - 1) + "/" + size);
      CHECK(open_end.body == content.substr(3));
      auto suffix = c.get(path, "Range: bytes=-4\r\n");
      CHECK(suffix.status == 206);
      CHECK(suffix.body == content.substr(content.size() - 4));
      CHECK(c.get(path, "Range: bytes=-100000000\r\n").body == content);
      // Nothing satisfiable: 416 naming the size.
      for (std::string r : {"bytes=" + size + "-", std::string("bytes=-0"), std::string("bytes=900000000-900000001")}) {
        CAPTURE(r);
        auto none = c.get(path, "Range: " + r + "\r\n");
        CHECK(none.status == 416);
        CHECK(none.field("Content-Range") == "bytes */" + size);
      }
      // Two parts: multipart, each with its own Content-Range.
      auto two = c.get(path, "Range: bytes=0-1,-2\r\n");
      CHECK(two.status == 206);
      CHECK(two.field("Content-Type").starts_with("multipart/byteranges"));
      const std::string boundary = two.field("Content-Type").substr(two.field("Content-Type").find("boundary=") + 9);
      const std::string type = path == "/small.txt" ? "text/plain; charset=utf-8" : "application/octet-stream";
      CHECK(two.body == "--" + boundary + "\r\nContent-Type: " + type +
                            "\r\nContent-Range: bytes 0-1/" + size + "\r\n\r\n" + content.substr(0, 2) +
                            "\r\n--" + boundary + "\r\nContent-Type: " + type +
                            "\r\nContent-Range: bytes " + std::to_string(content.size() - 2) + "-" +
                            std::to_string(content.size() - 1) + "/" + size + "\r\n\r\n" +
                            content.substr(content.size() - 2) + "\r\n--" + boundary + "--\r\n");
      CHECK(boundary.size() >= 20);
      // Parts that add up to more than the file, or more than kMaxRanges of them: the file
      // once, 200 (before: 200 x "0-99999" of a 100 KB file answered 20 MB; 200 x "0-", parts
      // without their bytes).
      std::string many = "bytes=0-";
      for (int i = 0; i < 199; ++i) many += ",0-";
      auto whole = c.get(path, "Range: " + many + "\r\n");
      CHECK(whole.status == 200);
      CHECK(whole.body == content);
      std::string single_bytes = "bytes=0-0";
      for (int i = 1; i <= 100; ++i) single_bytes += "," + std::to_string(i) + "-" + std::to_string(i);
      if (content.size() > 101) CHECK(c.get(path, "Range: " + single_bytes + "\r\n").status == 200);
    }
    // A 404 is no part of anything; an absolute-form target (served from a copy of the
    // request) gets its range too.
    auto missing = c.get("/missing.txt", "Range: bytes=0-2\r\n");
    CHECK(missing.status == 404);
    CHECK(missing.body == "not found\n");
    CHECK(missing.field("Content-Range").empty());
    auto absolute = c.get("http://s.test/small.txt", "Range: bytes=1-2\r\n");
    CHECK(absolute.status == 206);
    CHECK(absolute.body == "12");
    // A Range httplib could not parse answered 416 before any handler ran; RFC 9110 §14.2 asks
    // it ignored: another unit, first > last. A set with spaces before a comma, or a 20-digit
    // end, is a range.
    for (std::string ignored : {"items=0-1", "bytes=5-2", "bytes 0-1"}) {
      CAPTURE(ignored);
      auto whole = c.get("/small.txt", "Range: " + ignored + "\r\n");
      CHECK(whole.status == 200);
      CHECK(whole.body == small);
    }
    auto spaced = c.get("/small.txt", "Range: bytes=0-1 , 4-5\r\n");
    CHECK(spaced.status == 206);
    CHECK(spaced.field("Content-Type").starts_with("multipart/byteranges"));
    auto huge_end = c.get("/small.txt", "Range: bytes=3-99999999999999999999\r\n");
    CHECK(huge_end.status == 206);
    CHECK(huge_end.body == small.substr(3));
    // Nothing is compressed: httplib gzipped a text answer for any Accept-Encoding naming gzip
    // (a refusal, "gzip;q=0", too), a 206 included, under the file's strong ETag.
    for (std::string accept : {"gzip", "gzip;q=0", "gzip, deflate, br"}) {
      CAPTURE(accept);
      auto plain = c.get("/small.txt", "Accept-Encoding: " + accept + "\r\n");
      CHECK(plain.status == 200);
      CHECK(plain.field("Content-Encoding").empty());
      CHECK(plain.body == small);
      auto ranged = c.get("/small.txt", "Accept-Encoding: " + accept + "\r\nRange: bytes=2-4\r\n");
      CHECK(ranged.status == 206);
      CHECK(ranged.field("Content-Encoding").empty());
      CHECK(ranged.body == small.substr(2, 3));
    }
    // An empty file has no range to give: the (empty) file.
    auto empty = c.get("/empty.txt", "Range: bytes=0-\r\n");
    CHECK(empty.status == 200);
    CHECK(empty.body.empty());
    srv->shutdown(milliseconds(1'000));
  }
}
