#include <doctest/doctest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>

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
  }

  TEST_CASE("redirect_location keeps path and query") {
    CHECK(redirect_location("example.com", "/a/b?x=1&y=2", 443) ==
          "https://example.com/a/b?x=1&y=2");
    CHECK(redirect_location("example.com", "/", 8443) == "https://example.com:8443/");
    CHECK(redirect_location("::1", "/x", 443) == "https://[::1]/x");
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
    CHECK(resolve_static(root, "/sub", "index.html", out) == StaticLookup::not_found);
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
}
