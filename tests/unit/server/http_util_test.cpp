#include <doctest/doctest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "server/detail/http_util.h"

using namespace autotls::server::detail;
namespace fs = std::filesystem;

TEST_SUITE("server.http_util") {
  TEST_CASE("host_of strips the port and lower-cases") {
    CHECK(host_of("Example.COM:8443") == "example.com");
    CHECK(host_of("example.com") == "example.com");
    CHECK(host_of("example.com.") == "example.com");
    CHECK(host_of("[::1]:443") == "::1");
    CHECK(host_of("127.0.0.1:80") == "127.0.0.1");
    CHECK_FALSE(host_of(""));
    CHECK_FALSE(host_of("evil.com/path"));
    CHECK_FALSE(host_of("a b"));
    CHECK_FALSE(host_of("example.com:8x"));
    CHECK_FALSE(host_of("[::1"));
    CHECK_FALSE(host_of("example.com.."));  // an empty label (it was read as "example.com.", no site)
  }

  TEST_CASE("host_of gives an IPv6 literal in its canonical text and refuses brackets around no address") {
    CHECK(host_of("[::ABCD]") == "::abcd");
    CHECK(host_of("[0:0:0:0:0:0:0:1]:8443") == "::1");
    CHECK(host_of("[2001:DB8:0:0:1:0:0:1]") == "2001:db8::1:0:0:1");  // the first longest run
    CHECK(host_of("[2001:db8:0:1:1:1:1:1]") == "2001:db8:0:1:1:1:1:1");  // one zero group stays
    CHECK(host_of("[::FFFF:192.0.2.1]") == "::ffff:192.0.2.1");
    CHECK_FALSE(host_of("[1:2]"));
    CHECK_FALSE(host_of("[:::1]"));
    CHECK_FALSE(host_of("[]"));
    CHECK_FALSE(host_of("[0000:0000:0000:0000:0000:0000:0000:0000:1]"));  // longer than any address
  }

  TEST_CASE("redirect_location keeps path and query") {
    CHECK(redirect_location("example.com", "/a/b?x=1&y=2", 443) ==
          "https://example.com/a/b?x=1&y=2");
    CHECK(redirect_location("example.com", "/", 8443) == "https://example.com:8443/");
    CHECK(redirect_location("::1", "/x", 443) == "https://[::1]/x");
  }

  TEST_CASE("redirect_site_location keeps the request target for a bare origin and fills {uri}") {
    CHECK(redirect_site_location("https://example.com", "/a/b?x=1") == "https://example.com/a/b?x=1");
    CHECK(redirect_site_location("https://example.com:8443", "/") == "https://example.com:8443/");
    CHECK(redirect_site_location("https://example.com{uri}", "/a?q") == "https://example.com/a?q");
    CHECK(redirect_site_location("https://example.com/new{uri}", "/a") == "https://example.com/new/a");
    CHECK(redirect_site_location("http://[::1]:8080/{uri}{uri}", "/x") == "http://[::1]:8080//x/x");
    // A URL with a path but no {uri}, and a path: exactly that, whatever was asked.
    CHECK(redirect_site_location("https://example.com/", "/a/b") == "https://example.com/");
    CHECK(redirect_site_location("https://example.com/landing?from=old", "/a") ==
          "https://example.com/landing?from=old");
    CHECK(redirect_site_location("https://example.com?x=1", "/a") == "https://example.com?x=1");
    CHECK(redirect_site_location("/moved", "/a") == "/moved");
    CHECK(redirect_site_location("/moved{uri}", "/a?b") == "/moved/a?b");
    // A target that is not origin-form (absolute-form, "*") counts as "/".
    CHECK(redirect_site_location("https://example.com", "*") == "https://example.com/");
    CHECK(redirect_site_location("https://example.com{uri}", "http://evil.test/x") == "https://example.com/");
  }

  TEST_CASE("redirect_site_location never turns a path into another host") {
    // "{uri}" alone, or after "/", with a target starting "//": the Location must stay a path.
    CHECK(redirect_site_location("{uri}", "//evil.test/x") == "/evil.test/x");
    CHECK(redirect_site_location("/{uri}", "/evil.test/x") == "/evil.test/x");
    CHECK(redirect_site_location("{uri}", "///") == "/");
    CHECK(redirect_site_location("{uri}", "/") == "/");
  }

  TEST_CASE("redirect_to_error accepts URLs and paths, and says what is wrong with anything else") {
    CHECK(redirect_to_error("https://example.com") == "");
    CHECK(redirect_to_error("http://example.com:8080/a{uri}") == "");
    CHECK(redirect_to_error("https://[::1]:8443") == "");
    CHECK(redirect_to_error("https://example.com{uri}") == "");
    CHECK(redirect_to_error("/landing") == "");
    CHECK(redirect_to_error("{uri}") != "");  // neither a URL nor a path
    CHECK(redirect_to_error("") != "");
    CHECK(redirect_to_error("example.com") != "");
    CHECK(redirect_to_error("ftp://example.com") != "");
    CHECK(redirect_to_error("https://") != "");
    CHECK(redirect_to_error("https://:443/") != "");
    CHECK(redirect_to_error("https://user@example.com") != "");
    CHECK(redirect_to_error("//example.com") != "");
    CHECK(redirect_to_error("https://example.com/a b") != "");
    CHECK(redirect_to_error("https://example.com/\r\nSet-Cookie: x") != "");
    CHECK(redirect_to_error("https://example.com/#frag") != "");
    CHECK(redirect_to_error("https://example.com/{path}") != "");
    CHECK(redirect_to_error("https://example.com/{uri") != "");
    CHECK(redirect_to_error("https://example.com/uri}") != "");
    CHECK(redirect_to_error("https://example.com/a\"b") != "");
    CHECK(redirect_to_error("https://exa%6dple.com") != "");
  }

  TEST_CASE("acme_challenge_token accepts only base64url tokens") {
    CHECK(acme_challenge_token("/.well-known/acme-challenge/abc-DEF_123") == "abc-DEF_123");
    CHECK_FALSE(acme_challenge_token("/.well-known/acme-challenge/"));
    CHECK_FALSE(acme_challenge_token("/.well-known/acme-challenge/a/b"));
    CHECK_FALSE(acme_challenge_token("/.well-known/acme-challenge/a.b"));
    CHECK_FALSE(acme_challenge_token("/index.html"));
  }

  TEST_CASE("content_type_for maps common extensions") {
    CHECK(content_type_for("a/index.HTML") == "text/html; charset=utf-8");
    CHECK(content_type_for("x.css") == "text/css; charset=utf-8");
    CHECK(content_type_for("x.png") == "image/png");
    CHECK(content_type_for("x.woff2") == "font/woff2");
    CHECK(content_type_for("noext") == "application/octet-stream");
  }

  TEST_CASE("absolute_target takes an absolute-form target apart into authority and origin form") {
    auto t = absolute_target("http://Example.com:8080/a/b?x=1&y=2");
    REQUIRE(t);
    CHECK(t->authority == "Example.com:8080");
    CHECK(t->origin == "/a/b?x=1&y=2");
    t = absolute_target("HTTPS://example.com");
    REQUIRE(t);
    CHECK(t->authority == "example.com");
    CHECK(t->origin == "/");
    t = absolute_target("http://example.com?q");
    REQUIRE(t);
    CHECK(t->origin == "/?q");
    t = absolute_target("http://[::1]:80/p#frag");
    REQUIRE(t);
    CHECK(t->authority == "[::1]:80");
    CHECK(t->origin == "/p");
    // User info names no host: the authority is empty, so the request has no usable host.
    t = absolute_target("http://user:pw@example.com/");
    REQUIRE(t);
    CHECK(t->authority.empty());
    CHECK(t->origin == "/");
    for (const char* other : {"/a", "*", "example.com:443", "ftp://example.com/", "http:/x", "httpx://h/"}) {
      CAPTURE(other);
      CHECK_FALSE(absolute_target(other));
    }
  }

  TEST_CASE("header_end finds the blank line") {
    CHECK(header_end("GET / HTTP/1.1\r\nHost: a\r\n\r\n") == 27);
    CHECK(header_end("GET / HTTP/1.1\nHost: a\n\n") == 24);
    CHECK(header_end("GET / HTTP/1.1\r\nHost: a\r\n") == 0);
    CHECK(header_end("GET / HTTP/1.1\r\nHost: a\r\n\r\nBODY") == 27);
  }

  TEST_CASE("is_hop_by_hop") {
    CHECK(is_hop_by_hop("Connection"));
    CHECK(is_hop_by_hop("transfer-encoding"));
    CHECK(is_hop_by_hop("X-Forwarded-For"));
    CHECK(is_hop_by_hop("X-FORWARDED-HOST"));
    CHECK_FALSE(is_hop_by_hop("Content-Type"));
    CHECK_FALSE(is_hop_by_hop("Host"));
  }

  TEST_CASE("resolve_static refuses traversal and symlink escapes") {
    fs::path base = fs::temp_directory_path() / ("autotls-static-" + std::to_string(::getpid()));
    fs::remove_all(base);
    fs::create_directories(base / "root" / "sub");
    fs::create_directories(base / "outside");
    std::ofstream(base / "root" / "index.html") << "home";
    std::ofstream(base / "root" / "sub" / "a.txt") << "a";
    std::ofstream(base / "outside" / "secret.txt") << "secret";
    fs::create_symlink(base / "outside" / "secret.txt", base / "root" / "link.txt");
    fs::create_symlink(base / "outside", base / "root" / "linkdir");
    fs::path root = fs::canonical(base / "root");
    fs::path out;

    CHECK(resolve_static(root, "/", "index.html", out) == StaticLookup::found);
    CHECK(out == root / "index.html");
    CHECK(resolve_static(root, "/sub/a.txt", "index.html", out) == StaticLookup::found);
    CHECK(resolve_static(root, "/sub/../index.html", "index.html", out) ==
          StaticLookup::bad_request);
    CHECK(resolve_static(root, "/../outside/secret.txt", "index.html", out) ==
          StaticLookup::bad_request);
    CHECK(resolve_static(root, "/./index.html", "index.html", out) == StaticLookup::bad_request);
    CHECK(resolve_static(root, "/a\\..\\b", "index.html", out) == StaticLookup::bad_request);
    CHECK(resolve_static(root, std::string_view("/a\0b", 4), "index.html", out) ==
          StaticLookup::bad_request);
    CHECK(resolve_static(root, "/link.txt", "index.html", out) == StaticLookup::not_found);
    CHECK(resolve_static(root, "/linkdir/secret.txt", "index.html", out) ==
          StaticLookup::not_found);
    CHECK(resolve_static(root, "/missing", "index.html", out) == StaticLookup::not_found);
    // A directory without its '/' is redirected to it (even one with no index: that 404s
    // after); with no index file name at all, it is not found either way. A file named with a
    // trailing '/' is not found.
    CHECK(resolve_static(root, "/sub", "index.html", out) == StaticLookup::add_slash);
    CHECK(resolve_static(root, "/sub/", "index.html", out) == StaticLookup::not_found);
    CHECK(resolve_static(root, "/sub", "", out) == StaticLookup::not_found);
    CHECK(resolve_static(root, "/sub/a.txt/", "index.html", out) == StaticLookup::not_found);
    CHECK(resolve_static(root, "/index.html/", "index.html", out) == StaticLookup::not_found);
    std::ofstream(base / "root" / "sub" / "index.html") << "sub";
    CHECK(resolve_static(root, "/sub", "index.html", out) == StaticLookup::add_slash);
    CHECK(resolve_static(root, "/sub/", "index.html", out) == StaticLookup::found);
    CHECK(out == root / "sub" / "index.html");
    CHECK(resolve_static(root, "//sub//", "index.html", out) == StaticLookup::found);
    fs::remove_all(base);
  }
}

TEST_SUITE("server") {
  TEST_CASE("has_token finds a token in a comma-separated header value, ignoring case") {
    using autotls::server::detail::has_token;
    CHECK(has_token("close", "close"));
    CHECK(has_token("Close", "close"));
    CHECK(has_token("keep-alive, CLOSE", "close"));
    CHECK(has_token(" close ,upgrade", "close"));
    CHECK_FALSE(has_token("keep-alive", "close"));
    CHECK_FALSE(has_token("closed, xclose", "close"));
    CHECK_FALSE(has_token("", "close"));
  }

  TEST_CASE("parse_fast_request takes a plain GET or HEAD and leaves everything else to httplib") {
    auto r = parse_fast_request("GET /a/b.html HTTP/1.1\r\nHost: Example.com:8443\r\nUser-Agent: x\r\n"
                                "Connection:  close \t\r\n\r\n",
                                8192);
    REQUIRE(r);
    CHECK(r->target == "/a/b.html");
    CHECK(r->host == "Example.com:8443");
    CHECK(r->connection == "close");
    CHECK_FALSE(r->head);
    CHECK_FALSE(r->http10);
    auto h = parse_fast_request("HEAD / HTTP/1.0\r\nhost: a\r\n\r\n", 8192);
    REQUIRE(h);
    CHECK(h->head);
    CHECK(h->http10);
    CHECK(h->connection.empty());
    // A browser's Accept-Encoding changes nothing (nothing is compressed).
    CHECK(parse_fast_request("GET / HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip, br\r\n\r\n", 8192));

    const std::string ok_tail = "Host: a\r\n\r\n";
    for (const std::string& bad : std::vector<std::string>{
             "POST / HTTP/1.1\r\n" + ok_tail,              // not GET or HEAD
             "GET / HTTP/2\r\n" + ok_tail,                 // another version
             "GET /?q=1 HTTP/1.1\r\n" + ok_tail,           // a query
             "GET /a%20b HTTP/1.1\r\n" + ok_tail,          // percent-encoding
             "GET /a\\b HTTP/1.1\r\n" + ok_tail,          // a backslash
             "GET http://a/ HTTP/1.1\r\n" + ok_tail,       // absolute form
             "GET / HTTP/1.1\r\n\r\n",                     // no Host
             "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",  // two Hosts
             "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nConnection: close\r\n\r\n",
             "GET / HTTP/1.1\r\nHost: a\r\nRange: bytes=0-1\r\n\r\n",
             "GET / HTTP/1.1\r\nHost: a\r\nX-Autotls-Range: bytes=0-1\r\n\r\n",  // a Range, normalized
             "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
             "GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
             "GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
             "GET / HTTP/1.1\r\nHost: a\r\nIf-None-Match: \"x\"\r\n\r\n",   // conditional
             "GET / HTTP/1.1\r\nHost: a\r\nif-modified-since: x\r\n\r\n",
             "GET / HTTP/1.1\r\nHost: a\r\nIF-RANGE: x\r\n\r\n",
             "GET / HTTP/1.1\r\nHost: a\r\nX: \r\n\r\n",        // an empty value (httplib drops it)
             "GET / HTTP/1.1\r\nHost: a\r\nX: %41\r\n\r\n",     // httplib decodes values
             "GET / HTTP/1.1\r\nHost: a\r\n: v\r\n\r\n",        // no field name
             "GET / HTTP/1.1\r\nHost: a\r\nno colon\r\n\r\n",
             "GET / HTTP/1.1\nHost: a\r\n\r\n",                  // a bare LF
             "GET / HTTP/1.1\r\nHost: a\r\n\n",                  // a bare LF ends the head
             "GET / HTTP/1.1\r\nHost: a\r\n\r\nGET",             // bytes after the head
             "GET / HTTP/1.1\r\nHost: a\r\n",                     // no blank line
             "GET / HTTP/1.1",
             "",
         }) {
      CAPTURE(bad);
      CHECK_FALSE(parse_fast_request(bad, 8192));
    }
    // A field line longer than httplib's limit (CRLF included) is left to httplib (its 400).
    const std::string field = "X-Long: " + std::string(20, 'v') + "\r\n";
    const std::string req = "GET / HTTP/1.1\r\nHost: a\r\n" + field + "\r\n";
    CHECK(parse_fast_request(req, field.size()));
    CHECK_FALSE(parse_fast_request(req, field.size() - 1));
  }

  TEST_CASE("check_request_head refuses heads whose framing or fields two readers could read apart") {
    struct Case {
      std::string head;
      int status;
    };
    const std::string get = "GET / HTTP/1.1\r\nHost: a.test\r\n";
    const std::string post = "POST /u HTTP/1.1\r\nHost: a.test\r\n";
    const std::vector<Case> cases = {
        {get + "\r\n", 0},
        {"GET / HTTP/1.0\r\n\r\n", 0},
        {post + "Content-Length: 12\r\n\r\n", 0},
        {post + "Content-Length:  7 \r\n\r\n", 0},
        {post + "Transfer-Encoding: chunked\r\n\r\n", 0},
        {post + "Transfer-Encoding: Chunked\r\nX: %41\r\n\r\n", 0},
        {post + "transfer-encoding: ,chunked,\r\n\r\n", 0},
        {get + "X-Empty:\r\nX-Tab:\ta\tb\r\n\r\n", 0},
        {get + "X-Bytes: caf\xc3\xa9\r\n\r\n", 0},  // obs-text
        // framing
        {post + "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n", 400},
        {post + "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n", 400},
        {post + "Content-Length: 4\r\nContent-Length: 5\r\n\r\n", 400},
        {post + "Content-Length: 4\r\nContent-Length: 4\r\n\r\n", 400},
        {post + "Content-Length: 3, 3\r\n\r\n", 400},
        {post + "Content-Length: +3\r\n\r\n", 400},
        {post + "Content-Length: -1\r\n\r\n", 400},
        {post + "Content-Length: 0x10\r\n\r\n", 400},
        {post + "Content-Length:\r\n\r\n", 400},
        {post + "Content-Length: 1234567890123456789\r\n\r\n", 400},
        {post + "Content-Length: 123456789012345678\r\n\r\n", 0},
        {post + "Transfer-Encoding: gzip\r\n\r\n", 400},
        {post + "Transfer-Encoding: chunked, gzip\r\n\r\n", 400},
        {post + "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400},
        {post + "Transfer-Encoding: chunked, chunked\r\n\r\n", 400},
        {post + "Transfer-Encoding:\r\n\r\n", 400},
        {post + "Transfer-Encoding: chunkedx\r\n\r\n", 400},
        {post + "Transfer-Encoding: gzip, chunked\r\n\r\n", 501},
        {post + "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n", 501},
        {"POST /u HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400},
        // field lines
        {get + "Host: b.test\r\n\r\n", 400},
        {get + "X-A: 1\r\n 2\r\n\r\n", 400},
        {get + "X-A: 1\r\n\t2\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\n Host: a.test\r\n\r\n", 400},
        {post + "Content-Length : 3\r\n\r\n", 400},
        {post + "Content-Length\t: 3\r\n\r\n", 400},
        {get + ": x\r\n\r\n", 400},
        {get + "no colon\r\n\r\n", 400},
        {get + "X(A): 1\r\n\r\n", 400},
        {get + "X-A: a\rb\r\n\r\n", 400},
        {get + "X-A: a\r\r\n\r\n", 400},
        {get + std::string("X-A: a\0b\r\n\r\n", 12), 400},
        {get + "X-A: a\x7f\r\n\r\n", 400},
        {get + "X-A: a\x1b[0m\r\n\r\n", 400},
        // request line
        {"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400},
        {"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", 400},
        {"GET /\r\nHost: a\r\n\r\n", 400},
        {"GET / a HTTP/1.1\r\nHost: a\r\n\r\n", 400},
        {"GET / HTTP/1.10\r\nHost: a\r\n\r\n", 400},
        {"GET / HTTP/1\r\nHost: a\r\n\r\n", 400},
        {"GET / http/1.1\r\nHost: a\r\n\r\n", 400},
        {"G\"T / HTTP/1.1\r\nHost: a\r\n\r\n", 400},
        {" / HTTP/1.1\r\nHost: a\r\n\r\n", 400},
        {"GET /\x01 HTTP/1.1\r\nHost: a\r\n\r\n", 400},
        {"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505},
        {"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 505},
        {"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 0},
        {"GET / HTTP/1.1\nHost: a\n\n", 0},
    };
    for (const auto& c : cases) {
      CAPTURE(c.head);
      HeadCheck r = check_request_head(c.head);
      CHECK(r.status == c.status);
      CHECK(r.why.empty() == (c.status == 0));
    }
    // What httplib may read as sent needs no rewrite; the rest does.
    CHECK_FALSE(check_request_head(get + "X-A: b\r\n\r\n").rewrite);
    CHECK(check_request_head(get + "X-A: 100%\r\n\r\n").rewrite);
    CHECK(check_request_head("GET / HTTP/1.1\nHost: a\r\n\r\n").rewrite);
    CHECK(check_request_head("GET / HTTP/1.1\r\nHost: a\r\n\n").rewrite);
    CHECK(check_request_head("GET / HTTP/1.3\r\nHost: a\r\n\r\n").rewrite);
    // '%' in the target is httplib's to decode (the path), not a rewrite.
    CHECK_FALSE(check_request_head("GET /a%20b?q=%26 HTTP/1.1\r\nHost: a\r\n\r\n").rewrite);
    CHECK_FALSE(check_request_head(post + "Content-Length: 4\r\nContent-Length: 4\r\n\r\n").rewrite);
    // The body's framing, for the reactor to tell whether the body is all there.
    CHECK(check_request_head(post + "Content-Length:  7 \r\n\r\n").content_length == 7);
    CHECK_FALSE(check_request_head(post + "Content-Length: 7\r\n\r\n").chunked);
    CHECK(check_request_head(post + "Transfer-Encoding: chunked\r\n\r\n").chunked);
    CHECK(check_request_head(get + "\r\n").content_length == 0);
    // A Range is renamed for httplib, whatever it says.
    CHECK(check_request_head(get + "range: items=0-1\r\n\r\n").rewrite);
    CHECK_FALSE(check_request_head(get + "If-Range: \"x\"\r\n\r\n").rewrite);
  }

  TEST_CASE("normalize_request_head escapes '%' in field values, ends lines in CRLF and reads HTTP/1.x as 1.1") {
    CHECK(normalize_request_head("GET /a%20b HTTP/1.1\r\nHost: a\r\nX-A: foo%0d%0aX-B: 1\r\n"
                                 "Cookie: s=a%3Db; t=%u0041%\r\n\r\n") ==
          "GET /a%20b HTTP/1.1\r\nHost: a\r\nX-A: foo%250d%250aX-B: 1\r\n"
          "Cookie: s=a%253Db; t=%25u0041%25\r\n\r\n");
    CHECK(normalize_request_head("GET / HTTP/1.1\nHost: a\nX: 1\r\n\n") ==
          "GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n\r\n");
    CHECK(normalize_request_head("GET / HTTP/1.7\r\nHost: a\r\n\r\n") ==
          "GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    CHECK(normalize_request_head("GET / HTTP/1.0\r\n\r\n") == "GET / HTTP/1.0\r\n\r\n");
    CHECK(normalize_request_head("GET / HTTP/1.1\r\nRANGE: bytes=0-1%\r\nIf-Range: x\r\n\r\n") ==
          "GET / HTTP/1.1\r\nX-Autotls-Range: bytes=0-1%25\r\nIf-Range: x\r\n\r\n");
    // A name never holds '%' escaped (a name is a token: '%' in it stays as sent).
    CHECK(normalize_request_head("GET / HTTP/1.1\r\nX%: %\r\n\r\n") ==
          "GET / HTTP/1.1\r\nX%: %25\r\n\r\n");
    // What it gives is accepted again, with nothing more to rewrite but the '%' it wrote.
    auto again = check_request_head(normalize_request_head("GET / HTTP/1.2\nHost: a\n\n"));
    CHECK(again.status == 0);
    CHECK_FALSE(again.rewrite);
  }

  TEST_CASE("plan_ranges cuts ends to the file, drops ranges past it, and gives the whole file for what it will not split") {
    using Kind = RangePlan::Kind;
    using Parts = std::vector<std::pair<std::uint64_t, std::uint64_t>>;
    auto parts = [](std::string_view v, std::uint64_t size) {
      auto p = plan_ranges(v, size);
      REQUIRE(p.kind == Kind::parts);
      return p.parts;
    };
    CHECK(parts("bytes=0-4", 10) == Parts{{0, 4}});
    CHECK(parts("bytes=2-100000000", 10) == Parts{{2, 9}});
    CHECK(parts("bytes=3-", 10) == Parts{{3, 9}});
    CHECK(parts("bytes=-4", 10) == Parts{{6, 9}});
    CHECK(parts("bytes=-40", 10) == Parts{{0, 9}});
    CHECK(parts("Bytes=0-1 , , -2 ", 10) == Parts{{0, 1}, {8, 9}});
    CHECK(parts("bytes=0-1,20-30,-2", 10) == Parts{{0, 1}, {8, 9}});  // one past the end dropped
    CHECK(parts("bytes=9-9", 10) == Parts{{9, 9}});
    CHECK(parts("bytes=0-99999999999999999999999", 10) == Parts{{0, 9}});
    for (std::string_view none : {"bytes=10-", "bytes=10-20", "bytes=-0", "bytes=10-,-0"}) {
      CAPTURE(none);
      CHECK(plan_ranges(none, 10).kind == Kind::unsatisfiable);
    }
    for (std::string_view whole : {"", "bytes=", "bytes=,", "items=0-1", "bytes 0-1", "bytes=5-2",
                                   "bytes=a-b", "bytes=-", "bytes=1", "bytes=0-1-2", "bytes=+1-2",
                                   "bytes=0-5,5-9",       // 11 bytes of a 10-byte file
                                   "bytes=0-,0-"}) {
      CAPTURE(whole);
      auto p = plan_ranges(whole, 10);
      CHECK(p.kind == Kind::whole);
      CHECK(p.parts.empty());
    }
    CHECK(plan_ranges("bytes=0-", 0).kind == Kind::whole);  // an empty file: nothing to split
    std::string many = "bytes=0-0";
    for (std::size_t i = 1; i < kMaxRanges; ++i) many += "," + std::to_string(i) + "-" + std::to_string(i);
    CHECK(plan_ranges(many, 1000).parts.size() == kMaxRanges);
    CHECK(plan_ranges(many + ",999-999", 1000).kind == Kind::whole);
  }

  TEST_CASE("head_fault_response is a complete answer that closes the connection") {
    HeadCheck c;
    c.status = 501;
    c.why = "transfer coding not implemented";
    CHECK(head_fault_response(c) ==
          "HTTP/1.1 501 Not Implemented\r\nContent-Type: text/plain\r\nContent-Length: 32\r\n"
          "Connection: close\r\n\r\ntransfer coding not implemented\n");
    c.status = 505;
    CHECK(head_fault_response(c).starts_with("HTTP/1.1 505 HTTP Version Not Supported\r\n"));
    c.status = 400;
    CHECK(head_fault_response(c).starts_with("HTTP/1.1 400 Bad Request\r\n"));
  }

  TEST_CASE("file_validators: a strong tag of mtime and size, Last-Modified in IMF-fixdate") {
    struct stat st {};
    st.st_mtim.tv_sec = 784111777;  // RFC 9110's example date
    st.st_mtim.tv_nsec = 0x1234;
    st.st_size = 0x1f4;
    auto v = file_validators(st);
    CHECK(v.etag == "\"2ebc98a1.1234-1f4\"");
    CHECK(v.last_modified == "Sun, 06 Nov 1994 08:49:37 GMT");
    CHECK(v.mtime == 784111777);
    st.st_mtim.tv_nsec = 0x1235;  // touched within the same second: another tag
    CHECK(file_validators(st).etag != v.etag);
    CHECK(file_validators(st).last_modified == v.last_modified);
  }

  TEST_CASE("evaluate_preconditions follows RFC 9110 13.2.2 for GET and HEAD") {
    struct stat st {};
    st.st_mtim.tv_sec = 784111777;
    st.st_size = 10;
    auto v = file_validators(st);
    const std::string tag = v.etag, weak = "W/" + v.etag, other = "\"zz\"",
                      same = "Sun, 06 Nov 1994 08:49:37 GMT", later = "Sun, 06 Nov 1994 08:49:38 GMT",
                      earlier = "Sun, 06 Nov 1994 08:49:36 GMT", obsolete = "Sunday, 06-Nov-94 08:49:37 GMT",
                      junk = "yesterday", star = "*", list = other + ", " + weak, malformed = "zz, " + tag;
    auto eval = [&](const std::string* im, const std::string* inm, const std::string* ims,
                    const std::string* ius) { return evaluate_preconditions({im, inm, ims, ius}, v); };
    CHECK(eval(nullptr, nullptr, nullptr, nullptr) == 200);
    // If-None-Match: weak comparison, lists, *.
    CHECK(eval(nullptr, &tag, nullptr, nullptr) == 304);
    CHECK(eval(nullptr, &weak, nullptr, nullptr) == 304);
    CHECK(eval(nullptr, &list, nullptr, nullptr) == 304);
    CHECK(eval(nullptr, &star, nullptr, nullptr) == 304);
    CHECK(eval(nullptr, &other, nullptr, nullptr) == 200);
    CHECK(eval(nullptr, &malformed, nullptr, nullptr) == 200);
    // If-Modified-Since, ignored when If-None-Match is there or the date is not one.
    CHECK(eval(nullptr, nullptr, &same, nullptr) == 304);
    CHECK(eval(nullptr, nullptr, &later, nullptr) == 304);
    CHECK(eval(nullptr, nullptr, &obsolete, nullptr) == 304);
    CHECK(eval(nullptr, nullptr, &earlier, nullptr) == 200);
    CHECK(eval(nullptr, nullptr, &junk, nullptr) == 200);
    CHECK(eval(nullptr, &other, &same, nullptr) == 200);
    // If-Match: strong comparison; If-Unmodified-Since only without it.
    CHECK(eval(&tag, nullptr, nullptr, nullptr) == 200);
    CHECK(eval(&star, nullptr, nullptr, nullptr) == 200);
    CHECK(eval(&weak, nullptr, nullptr, nullptr) == 412);
    CHECK(eval(&other, nullptr, nullptr, nullptr) == 412);
    CHECK(eval(nullptr, nullptr, nullptr, &earlier) == 412);
    CHECK(eval(nullptr, nullptr, nullptr, &same) == 200);
    CHECK(eval(nullptr, nullptr, nullptr, &junk) == 200);
    CHECK(eval(&tag, nullptr, nullptr, &earlier) == 200);
    // 412 comes before 304.
    CHECK(eval(&other, &tag, nullptr, nullptr) == 412);
  }

  TEST_CASE("if_range_holds: a strong tag that matches, or exactly the Last-Modified date") {
    struct stat st {};
    st.st_mtim.tv_sec = 784111777;
    st.st_size = 10;
    auto v = file_validators(st);
    CHECK(if_range_holds(v.etag, v));
    CHECK_FALSE(if_range_holds("W/" + v.etag, v));
    CHECK_FALSE(if_range_holds("\"zz\"", v));
    CHECK(if_range_holds("Sun, 06 Nov 1994 08:49:37 GMT", v));
    CHECK_FALSE(if_range_holds("Sun, 06 Nov 1994 08:49:38 GMT", v));
    CHECK_FALSE(if_range_holds("soon", v));
  }
}
