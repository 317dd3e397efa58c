#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <curl/curl.h>
#include <httplib.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "acme/types.h"
#include "acme/util/openssl.h"
#include "server/server.h"
#include "tests/support/net.h"
#include "tests/support/pebble_env.h"
#include "tlsreload/challenges.h"
#include "tlsreload/store.h"

using namespace autotls;
using namespace autotls::server;
using autotls::testing::make_test_ca;
using autotls::testing::make_test_leaf;
using autotls::testing::PemPair;
using std::chrono::milliseconds;
using autotls::testing::connect_to;
using autotls::testing::free_port;
using SteadyClock = std::chrono::steady_clock;
namespace fs = std::filesystem;

namespace {

fs::path temp_dir(const std::string& tag) {
  fs::path p = fs::temp_directory_path() /
               ("autotls-srv-" + tag + "-" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

// Fixture: a test CA, a store with certificates, a server on 127.0.0.1 ephemeral ports.
struct Env {
  PemPair ca;
  fs::path dir;
  fs::path ca_file;
  std::shared_ptr<tlsreload::CertStore> store = std::make_shared<tlsreload::CertStore>();
  std::shared_ptr<tlsreload::ChallengeStore> challenges =
      std::make_shared<tlsreload::ChallengeStore>();
  std::unique_ptr<Server> server;

  explicit Env(const std::string& tag) {
    auto c = make_test_ca("autotls server test CA");
    REQUIRE_MESSAGE(c, c.error().message);
    ca = *c;
    dir = temp_dir(tag);
    ca_file = dir / "ca.pem";
    std::ofstream(ca_file) << ca.cert_pem;
  }
  ~Env() {
    if (server) server->shutdown(milliseconds(0));
    server.reset();
    fs::remove_all(dir);
  }

  void publish(const std::vector<std::string>& names) {
    auto leaf = make_test_leaf(names, ca);
    REQUIRE_MESSAGE(leaf, leaf.error().message);
    auto r = store->publish_pem(leaf->cert_pem, leaf->key_pem);
    REQUIRE_MESSAGE(r, r.error().message);
  }

  static ServerConfig base_config() {
    ServerConfig cfg;
    cfg.https = {{"127.0.0.1", 0}};
    cfg.http = {{"127.0.0.1", 0}};
    return cfg;
  }

  void start(ServerConfig cfg) {
    auto s = Server::create(std::move(cfg), store, challenges, nullptr);
    REQUIRE_MESSAGE(s, s.error().message);
    server = std::move(*s);
    REQUIRE(server->start());
    REQUIRE(server->ready());
    REQUIRE(server->https_port() > 0);
  }
};

struct CurlReply {
  CURLcode code = CURLE_OK;
  long status = 0;
  std::string body;
  std::string headers;
  std::string error;
};

size_t append_cb(char* p, size_t size, size_t n, void* user) {
  static_cast<std::string*>(user)->append(p, size * n);
  return size * n;
}

// curl_request fetches url; names in resolve_names map to 127.0.0.1:port.
CurlReply curl_request(const std::string& url, const std::vector<std::string>& resolve_names,
                       int port, const fs::path& ca_file, const std::string& method = "GET",
                       const std::string& body = {}, bool path_as_is = false,
                       long timeout_ms = 10'000) {
  CurlReply out;
  CURL* h = curl_easy_init();
  curl_slist* resolve = nullptr;
  for (const auto& n : resolve_names) {
    resolve = curl_slist_append(resolve, (n + ":" + std::to_string(port) + ":127.0.0.1").c_str());
  }
  char err[CURL_ERROR_SIZE] = {};
  curl_easy_setopt(h, CURLOPT_URL, url.c_str());
  curl_easy_setopt(h, CURLOPT_RESOLVE, resolve);
  if (!ca_file.empty()) curl_easy_setopt(h, CURLOPT_CAINFO, ca_file.c_str());
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, append_cb);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &out.body);
  curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, append_cb);
  curl_easy_setopt(h, CURLOPT_HEADERDATA, &out.headers);
  curl_easy_setopt(h, CURLOPT_ERRORBUFFER, err);
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, timeout_ms);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  if (path_as_is) curl_easy_setopt(h, CURLOPT_PATH_AS_IS, 1L);
  if (method != "GET") curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method.c_str());
  if (!body.empty()) {
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, body.c_str());
    curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, static_cast<long>(body.size()));
  }
  out.code = curl_easy_perform(h);
  curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &out.status);
  out.error = err;
  curl_slist_free_all(resolve);
  curl_easy_cleanup(h);
  return out;
}

// s_client_san runs `openssl s_client` against 127.0.0.1:port with SNI name and returns the
// served leaf's subject and subjectAltName extension as text.
std::string s_client_san(int port, const std::string& name) {
  std::string cmd = "echo | openssl s_client -connect 127.0.0.1:" + std::to_string(port) +
                    " -servername " + name +
                    " 2>/dev/null | openssl x509 -noout -subject -ext subjectAltName 2>&1";
  std::string out;
  FILE* f = ::popen(cmd.c_str(), "r");
  if (!f) return out;
  char buf[512];
  while (size_t n = std::fread(buf, 1, sizeof buf, f)) out.append(buf, n);
  ::pclose(f);
  return out;
}

// Upstream is a local httplib server for proxy tests.
struct Upstream {
  httplib::Server svr;
  std::thread thread;
  int port = 0;
  std::atomic<int> slow_started{0};
  // slow_gate > 0 holds every /slow request until that many have arrived (up to 10 s), so they
  // all wait at once.
  std::atomic<int> slow_gate{0};
  Upstream() {
    // Enough threads that 50 slow requests wait side by side (httplib's default is 8).
    svr.new_task_queue = [] { return new httplib::ThreadPool(64); };
    svr.Get("/echo", [](const httplib::Request& req, httplib::Response& res) {
      std::string out = "xff=" + req.get_header_value("X-Forwarded-For") +
                        ";proto=" + req.get_header_value("X-Forwarded-Proto") +
                        ";fhost=" + req.get_header_value("X-Forwarded-Host") +
                        ";host=" + req.get_header_value("Host") +
                        ";xff_count=" + std::to_string(req.get_header_value_count("X-Forwarded-For")) +
                        ";q=" + req.get_param_value("q") + ";custom=" + req.get_header_value("X-Custom");
      res.set_header("X-Upstream", "yes");
      res.set_content(out, "text/plain");
    });
    svr.Post("/echo", [](const httplib::Request& req, httplib::Response& res) {
      res.status = 201;
      res.set_content("method=" + req.method + ";body=" + req.body, "text/plain");
    });
    svr.Get("/slow", [this](const httplib::Request&, httplib::Response& res) {
      ++slow_started;
      for (int i = 0; i < 2'000 && slow_started.load() < slow_gate.load(); ++i) {
        std::this_thread::sleep_for(milliseconds(5));
      }
      std::this_thread::sleep_for(milliseconds(1'000));
      res.set_content("slow done", "text/plain");
    });
    port = svr.bind_to_any_port("127.0.0.1");
    thread = std::thread([this] { svr.listen_after_bind(); });
    while (!svr.is_running()) std::this_thread::sleep_for(milliseconds(5));
  }
  ~Upstream() {
    svr.stop();
    thread.join();
  }
};

}  // namespace

TEST_SUITE("server") {
  TEST_CASE("create reports a port in use clearly") {
    autotls::testing::BusyPort busy;
    int port = busy.port();

    ServerConfig cfg = Env::base_config();
    cfg.https = {{"127.0.0.1", port}};
    auto s = Server::create(cfg, std::make_shared<tlsreload::CertStore>(), nullptr, nullptr);
    REQUIRE_FALSE(s);
    CHECK(s.error().code == Errc::io);
    CHECK(s.error().message ==
          "https listener 127.0.0.1:" + std::to_string(port) + ": address already in use");

    cfg = Env::base_config();
    cfg.http = {{"127.0.0.1", port}};
    s = Server::create(cfg, std::make_shared<tlsreload::CertStore>(), nullptr, nullptr);
    REQUIRE_FALSE(s);
    CHECK(s.error().message ==
          "http listener 127.0.0.1:" + std::to_string(port) + ": address already in use");
    busy.close();

    cfg = Env::base_config();
    cfg.sites["static.test"] = StaticSite{"/nonexistent/autotls"};
    s = Server::create(cfg, std::make_shared<tlsreload::CertStore>(), nullptr, nullptr);
    REQUIRE_FALSE(s);
    CHECK(s.error().code == Errc::invalid_input);
    cfg = Env::base_config();
    cfg.sites["proxy.test"] = ProxySite{"ftp://x"};
    s = Server::create(cfg, std::make_shared<tlsreload::CertStore>(), nullptr, nullptr);
    REQUIRE_FALSE(s);
    CHECK(s.error().message.find("site proxy.test: upstream \"ftp://x\": scheme") != std::string::npos);
    cfg.sites["proxy.test"] = ProxySite{"http://127.0.0.1:99999"};  // was accepted: 502 per request
    s = Server::create(cfg, std::make_shared<tlsreload::CertStore>(), nullptr, nullptr);
    REQUIRE_FALSE(s);
    CHECK(s.error().message.find("port \"99999\" is not 1-65535") != std::string::npos);
  }

  TEST_CASE("sni selects the certificate for each name and a wildcard") {
    Env env("sni");
    env.publish({"a.test"});
    env.publish({"b.test"});
    env.publish({"*.wild.test"});
    ServerConfig cfg = Env::base_config();
    fs::create_directories(env.dir / "www");
    std::ofstream(env.dir / "www" / "index.html") << "hello";
    cfg.default_site = StaticSite{env.dir / "www"};
    cfg.hsts_max_age = std::chrono::seconds(3600);
    env.start(cfg);
    int port = env.server->https_port();

    for (std::string name : {"a.test", "b.test", "x.wild.test"}) {
      CAPTURE(name);
      auto r = curl_request("https://" + name + ":" + std::to_string(port) + "/", {name}, port,
                            env.ca_file);
      CHECK_MESSAGE(r.code == CURLE_OK, r.error);
      CHECK(r.status == 200);
      CHECK(r.body == "hello");
      CHECK(r.headers.find("Strict-Transport-Security: max-age=3600") != std::string::npos);
    }
    // One completed handshake per request (each on a new connection), counted before it was
    // answered (autotls_server_handshakes_total on /metrics).
    CHECK(env.server->counters().handshakes == 3);
    CHECK(env.server->counters().handshake_failed == 0);
    // Verification must fail for a name no certificate covers (one label too deep).
    auto bad = curl_request("https://a.b.wild.test:" + std::to_string(port) + "/",
                            {"a.b.wild.test"}, port, env.ca_file);
    CHECK(bad.code != CURLE_OK);

    std::string a = s_client_san(port, "a.test");
    CHECK_MESSAGE(a.find("DNS:a.test") != std::string::npos, a);
    std::string b = s_client_san(port, "b.test");
    CHECK_MESSAGE(b.find("DNS:b.test") != std::string::npos, b);
    std::string w = s_client_san(port, "x.wild.test");
    CHECK_MESSAGE(w.find("DNS:*.wild.test") != std::string::npos, w);
  }

  TEST_CASE("certificate swap under handshake load fails no handshake") {
    Env env("swap");
    env.publish({"swap.test"});
    ServerConfig cfg = Env::base_config();
    env.start(cfg);
    int port = env.server->https_port();

    // The proof: 1,000 replacements, zero failed handshakes.
    constexpr int kSwaps = 1'000;
    // 100 distinct certificates published in turn: each publish replaces the one being served
    // by another (checked on the store's version below); making 1,000 would cost seconds.
    constexpr int kDistinct = 100;
    std::vector<PemPair> leaves;
    for (int i = 0; i < kDistinct; ++i) {
      auto l = make_test_leaf({"swap.test"}, env.ca);
      REQUIRE(l);
      leaves.push_back(*l);
    }

    ossl::SslCtxPtr ctx(SSL_CTX_new(TLS_client_method()));
    REQUIRE(ctx);
    SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
    REQUIRE(SSL_CTX_load_verify_locations(ctx.get(), env.ca_file.c_str(), nullptr) == 1);

    std::atomic<bool> stop{false};
    std::atomic<int> ok{0}, failed{0};
    std::thread client([&] {
      while (!stop.load()) {
        int fd = connect_to(port);
        if (fd < 0) {
          ++failed;
          continue;
        }
        timeval tv{5, 0};
        ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        ossl::SslPtr ssl(SSL_new(ctx.get()));
        SSL_set_fd(ssl.get(), fd);
        SSL_set_tlsext_host_name(ssl.get(), "swap.test");
        SSL_set1_host(ssl.get(), "swap.test");
        if (SSL_connect(ssl.get()) == 1 && SSL_get_verify_result(ssl.get()) == X509_V_OK) {
          ++ok;
        } else {
          ++failed;
          ERR_clear_error();
        }
        ::close(fd);
      }
    });
    auto t0 = SteadyClock::now();
    int paced_out = 0;
    const auto version0 = env.store->version();
    for (int i = 0; i < kSwaps; ++i) {
      const PemPair& l = leaves[static_cast<std::size_t>(i % kDistinct)];
      int before_swap = ok.load() + failed.load();
      auto r = env.store->publish_pem(l.cert_pem, l.key_pem);
      REQUIRE_MESSAGE(r, r.error().message);
      // At least one handshake ends after each swap (paced by the client, not by a clock, so a
      // loaded machine makes the test slower, not weaker); 5 s bounds a stuck client.
      auto wait_until = SteadyClock::now() + std::chrono::seconds(5);
      while (ok.load() + failed.load() <= before_swap && SteadyClock::now() < wait_until) {
        std::this_thread::sleep_for(std::chrono::microseconds(100));
      }
      if (ok.load() + failed.load() <= before_swap) ++paced_out;
    }
    // Let the client see the last certificate too.
    int before = ok.load();
    while (ok.load() < before + 5 && SteadyClock::now() - t0 < std::chrono::seconds(20)) {
      std::this_thread::sleep_for(milliseconds(5));
    }
    stop = true;
    client.join();
    auto elapsed = std::chrono::duration_cast<milliseconds>(SteadyClock::now() - t0).count();
    MESSAGE("swaps=" << kSwaps << " handshakes=" << ok.load() << " failed=" << failed.load()
                     << " in " << elapsed << " ms");
    CHECK(failed.load() == 0);
    CHECK(paced_out == 0);
    CHECK(env.store->version() - version0 == static_cast<std::uint64_t>(kSwaps));
    CHECK(ok.load() >= kSwaps);
    CHECK(env.server->counters().handshake_failed == 0);
  }

  TEST_CASE("a server created without https listeners builds its TLS context when a reload adds one") {
    // create builds no TLS context without an https listener (issue's http-01 responder);
    // the first https listener a reload adds must still complete handshakes.
    Env env("late-tls");
    env.publish({"late.test"});
    fs::create_directories(env.dir / "www");
    std::ofstream(env.dir / "www" / "index.html") << "late";
    ServerConfig cfg;
    cfg.https = {};
    cfg.http = {{"127.0.0.1", 0}};
    cfg.redirect_to_https = false;
    cfg.default_site = StaticSite{env.dir / "www"};
    auto s = Server::create(cfg, env.store, env.challenges, nullptr);
    REQUIRE_MESSAGE(s, s.error().message);
    env.server = std::move(*s);
    REQUIRE(env.server->start());
    CHECK(env.server->https_port() == 0);

    int port = free_port();
    auto next = cfg;
    next.https = {{"127.0.0.1", port}};
    auto rep = env.server->reload(next);
    REQUIRE_MESSAGE(rep, rep.error().message);
    CHECK(rep->failed.empty());
    auto r = curl_request("https://late.test:" + std::to_string(port) + "/", {"late.test"}, port, env.ca_file);
    CHECK_MESSAGE(r.code == CURLE_OK, r.error);
    CHECK(r.status == 200);
    CHECK(r.body == "late");
  }

  TEST_CASE("tls-alpn-01 is answered on the live https listener") {
    Env env("alpn");
    env.publish({"alpn.test"});
    env.start(Env::base_config());
    int port = env.server->https_port();
    auto put = env.challenges->put_tls_alpn(acme::Identifier::dns("alpn.test"),
                                            "token.thumbprint");
    REQUIRE_MESSAGE(put, put.error().message);

    auto handshake = [&](bool acme_alpn, std::string& alpn, bool& has_acme_ext) {
      ossl::SslCtxPtr ctx(SSL_CTX_new(TLS_client_method()));
      int fd = connect_to(port);
      REQUIRE(fd >= 0);
      ossl::SslPtr ssl(SSL_new(ctx.get()));
      SSL_set_fd(ssl.get(), fd);
      SSL_set_tlsext_host_name(ssl.get(), "alpn.test");
      static const unsigned char kAcme[] = "\x0a" "acme-tls/1";
      static const unsigned char kHttp[] = "\x08" "http/1.1";
      if (acme_alpn) {
        SSL_set_alpn_protos(ssl.get(), kAcme, sizeof kAcme - 1);
      } else {
        SSL_set_alpn_protos(ssl.get(), kHttp, sizeof kHttp - 1);
      }
      bool ok = SSL_connect(ssl.get()) == 1;
      const unsigned char* sel = nullptr;
      unsigned len = 0;
      SSL_get0_alpn_selected(ssl.get(), &sel, &len);
      alpn.assign(reinterpret_cast<const char*>(sel), len);
      ossl::X509Ptr peer(SSL_get1_peer_certificate(ssl.get()));
      // RFC 8737 §3: id-pe-acmeIdentifier is 1.3.6.1.5.5.7.1.31.
      std::unique_ptr<ASN1_OBJECT, ossl::Free<ASN1_OBJECT_free>> oid(
          OBJ_txt2obj("1.3.6.1.5.5.7.1.31", 1));
      has_acme_ext = peer && X509_get_ext_by_OBJ(peer.get(), oid.get(), -1) >= 0;
      ::close(fd);
      return ok;
    };
    std::string alpn;
    bool ext = false;
    CHECK(handshake(true, alpn, ext));
    CHECK(alpn == "acme-tls/1");
    CHECK(ext);
    CHECK(handshake(false, alpn, ext));
    CHECK(alpn == "http/1.1");
    CHECK_FALSE(ext);
  }

  TEST_CASE("http listener serves http-01 tokens and redirects the rest") {
    Env env("http01");
    env.publish({"example.test"});
    env.start(Env::base_config());
    env.challenges->put_http01("tok-EN_123", "tok-EN_123.thumbprint");
    int hp = env.server->http_port();
    std::string base = "http://example.test:" + std::to_string(hp);

    auto r = curl_request(base + "/.well-known/acme-challenge/tok-EN_123", {"example.test"}, hp,
                          {});
    CHECK(r.code == CURLE_OK);
    CHECK(r.status == 200);
    CHECK(r.body == "tok-EN_123.thumbprint");
    CHECK(r.headers.find("Content-Type: text/plain") != std::string::npos);

    r = curl_request(base + "/.well-known/acme-challenge/unknown", {"example.test"}, hp, {});
    CHECK(r.status == 404);

    r = curl_request(base + "/some/path?x=1&y=two", {"example.test"}, hp, {});
    CHECK(r.status == 308);
    std::string want = "Location: https://example.test:" +
                       std::to_string(env.server->https_port()) + "/some/path?x=1&y=two";
    CHECK_MESSAGE(r.headers.find(want) != std::string::npos, r.headers);

    r = curl_request(base + "/form", {"example.test"}, hp, {}, "POST", "a=b");
    CHECK(r.status == 308);
  }

  TEST_CASE("an http-only server answers http-01 tokens and 404 for the rest") {
    Env env("http01only");
    ServerConfig cfg = Env::base_config();
    cfg.https = {};
    cfg.http = {{"127.0.0.1", 0}};
    auto s = Server::create(std::move(cfg), env.store, env.challenges, nullptr);
    REQUIRE_MESSAGE(s, s.error().message);
    auto& server = *s;
    REQUIRE(server->start());
    env.challenges->put_http01("tok-only", "tok-only.thumbprint");
    CHECK(server->https_port() == 0);
    int hp = server->http_port();
    REQUIRE(hp > 0);
    std::string base = "http://example.test:" + std::to_string(hp);
    auto r = curl_request(base + "/.well-known/acme-challenge/tok-only", {"example.test"}, hp, {});
    CHECK(r.status == 200);
    CHECK(r.body == "tok-only.thumbprint");
    r = curl_request(base + "/some/path", {"example.test"}, hp, {});
    CHECK(r.status == 404);
    CHECK(r.headers.find("Location:") == std::string::npos);
  }

  TEST_CASE("static files are served without traversal") {
    Env env("static");
    env.publish({"static.test"});
    fs::create_directories(env.dir / "www" / "css");
    std::ofstream(env.dir / "www" / "index.html") << "<h1>home</h1>";
    std::ofstream(env.dir / "www" / "css" / "site.css") << "body{}";
    std::ofstream(env.dir / "secret.txt") << "secret";
    ServerConfig cfg = Env::base_config();
    cfg.sites["static.test"] = StaticSite{env.dir / "www"};
    env.start(cfg);
    int port = env.server->https_port();
    std::string base = "https://static.test:" + std::to_string(port);
    auto get = [&](const std::string& path, bool as_is = false) {
      return curl_request(base + path, {"static.test"}, port, env.ca_file, "GET", {}, as_is);
    };

    auto r = get("/");
    CHECK(r.status == 200);
    CHECK(r.body == "<h1>home</h1>");
    CHECK(r.headers.find("Content-Type: text/html") != std::string::npos);
    r = get("/css/site.css");
    CHECK(r.status == 200);
    CHECK(r.body == "body{}");
    CHECK(r.headers.find("Content-Type: text/css") != std::string::npos);
    CHECK(get("/missing.txt").status == 404);
    // A directory without its '/' is redirected to it, query kept, never to another host
    // ("//css" is a path here, not a network-path reference); a file with a trailing '/' is
    // not found. css/ has no index file: 404 there.
    std::ofstream(env.dir / "www" / "css" / "index.html") << "css home";
    for (auto [path, to] : {std::pair{"/css", "/css/"}, {"/css?v=1&w", "/css/?v=1&w"},
                            {"//css", "/css/"}, {"/c%73s", "/c%73s/"}}) {
      CAPTURE(path);
      auto p = get(path, true);
      CHECK(p.status == 308);
      CHECK(p.headers.find("\r\nLocation: " + std::string(to) + "\r\n") != std::string::npos);
    }
    CHECK(get("/css/").body == "css home");
    CHECK(get("/css/site.css/", true).status == 404);
    CHECK(get("/index.html/", true).status == 404);
    fs::remove(env.dir / "www" / "css" / "index.html");
    CHECK(get("/css/").status == 404);
    for (std::string probe : {"/../secret.txt", "/css/../../secret.txt", "/%2e%2e/secret.txt",
                              "/css/%2E%2E/%2e%2e/secret.txt", "/..%2fsecret.txt"}) {
      CAPTURE(probe);
      auto p = get(probe, true);
      CHECK((p.status == 400 || p.status == 404));
      CHECK(p.body.find("secret") == std::string::npos);
    }
    // Symlinks: followed while they stay under the root (relative, absolute, through a
    // directory), refused when they leave it, whichever resolution path (openat2 or canonical)
    // answers.
    fs::create_directories(env.dir / "outside");
    std::ofstream(env.dir / "outside" / "x.txt") << "secret";
    fs::create_symlink("css/site.css", env.dir / "www" / "rel.css");
    fs::create_symlink(env.dir / "www" / "css" / "site.css", env.dir / "www" / "abs.css");
    fs::create_symlink("../css", env.dir / "www" / "css" / "up");
    fs::create_symlink(env.dir / "secret.txt", env.dir / "www" / "escape.txt");
    fs::create_symlink("../outside", env.dir / "www" / "escdir");
    for (std::string ok : {"/rel.css", "/abs.css", "/css/up/site.css"}) {
      CAPTURE(ok);
      auto p = get(ok);
      CHECK(p.status == 200);
      CHECK(p.body == "body{}");
    }
    for (std::string bad : {"/escape.txt", "/escdir/x.txt"}) {
      CAPTURE(bad);
      auto p = get(bad);
      CHECK(p.status == 404);
      CHECK(p.body.find("secret") == std::string::npos);
    }
    // A file larger than a reactor serves itself (64 KiB) is streamed by a worker; a small one
    // after it is served by the reactor again.
    std::string big(300 * 1024, 'b');
    for (std::size_t i = 0; i < big.size(); i += 997) big[i] = static_cast<char>('a' + i % 26);
    std::ofstream(env.dir / "www" / "big.bin", std::ios::binary) << big;
    for (int i = 0; i < 2; ++i) {
      auto p = get("/big.bin");
      CHECK(p.status == 200);
      CHECK(p.body == big);
    }
    CHECK(get("/css/site.css").body == "body{}");
    auto post = curl_request(base + "/", {"static.test"}, port, env.ca_file, "POST", "x");
    CHECK(post.status == 405);
    // An unknown host with no default site.
    auto other = curl_request("https://other.test:" + std::to_string(port) + "/",
                              {"other.test"}, port, {}, "GET");
    CHECK(other.code != CURLE_OK);  // no certificate for other.test: handshake refused
  }

  TEST_CASE("pipelined requests on one connection mix reactor and worker handlers in order") {
    // Static (served on the reactor), proxied with a body (sent on to a worker), a body that
    // arrives later (worker), then static again: all on one kept-alive connection, in order.
    Upstream up;
    Env env("pipeline");
    env.publish({"s.test"});
    fs::create_directories(env.dir / "www");
    std::ofstream(env.dir / "www" / "a.txt") << "AAA";
    ServerConfig cfg = Env::base_config();
    cfg.redirect_to_https = false;
    cfg.sites["s.test"] = StaticSite{env.dir / "www"};
    cfg.sites["p.test"] = ProxySite{"http://127.0.0.1:" + std::to_string(up.port)};
    env.start(cfg);
    int fd = connect_to(env.server->http_port());
    REQUIRE(fd >= 0);
    timeval tv{5, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    std::string first =
        "GET /a.txt HTTP/1.1\r\nHost: s.test\r\n\r\n"
        "POST /echo HTTP/1.1\r\nHost: p.test\r\nContent-Length: 5\r\n\r\nhello"
        "GET /a.txt HTTP/1.1\r\nHost: s.test\r\n\r\n"
        "POST /echo HTTP/1.1\r\nHost: p.test\r\nContent-Length: 4\r\n\r\nwo";
    REQUIRE(::send(fd, first.data(), first.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(first.size()));
    std::this_thread::sleep_for(milliseconds(100));
    std::string rest = "rd" "GET /a.txt HTTP/1.1\r\nHost: s.test\r\nConnection: close\r\n\r\n";
    REQUIRE(::send(fd, rest.data(), rest.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(rest.size()));
    std::string got;
    char buf[4096];
    for (;;) {
      ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n <= 0) break;
      got.append(buf, static_cast<size_t>(n));
    }
    ::close(fd);
    std::vector<std::string> statuses, bodies;
    for (std::size_t pos = 0; (pos = got.find("HTTP/1.1 ", pos)) != std::string::npos;) {
      statuses.push_back(got.substr(pos + 9, 3));
      auto head_end = got.find("\r\n\r\n", pos);
      auto cl = got.find("Content-Length: ", pos);
      REQUIRE(head_end != std::string::npos);
      REQUIRE(cl != std::string::npos);
      auto len = std::stoul(got.substr(cl + 16));
      bodies.push_back(got.substr(head_end + 4, len));
      pos = head_end + 4 + len;
    }
    CAPTURE(got);
    CHECK(statuses == std::vector<std::string>{"200", "201", "200", "201", "200"});
    CHECK(bodies == std::vector<std::string>{"AAA", "method=POST;body=hello", "AAA",
                                             "method=POST;body=word", "AAA"});
    CHECK(env.server->counters().requests == 5);
  }

  TEST_CASE("a static GET or HEAD answered on the fast path reads byte for byte as httplib's answer") {
    // The reactor answers a plain GET/HEAD of a small static file itself (serve_fast); a field
    // whose value holds '%' sends the same request through httplib instead, which ignores the
    // field. Each request is followed on the same connection by a plain GET, and
    // keep_alive_max_requests = 2 makes that one the last: both answers, the Keep-Alive and
    // Connection fields and where the connection ends must not depend on the path taken.
    Env env("fastpath");
    env.publish({"s.test"});
    fs::create_directories(env.dir / "www" / "d");
    std::ofstream(env.dir / "www" / "a.txt") << "AAA";
    std::ofstream(env.dir / "www" / "d" / "index.html") << "<p>index</p>\n";
    std::ofstream(env.dir / "www" / "e.json");  // empty
    ServerConfig cfg = Env::base_config();
    cfg.redirect_to_https = false;
    cfg.hsts_max_age = std::chrono::seconds(600);
    cfg.hsts_include_subdomains = true;
    cfg.keep_alive_max_requests = 2;
    cfg.timeouts.idle = std::chrono::seconds(7);
    cfg.sites["s.test"] = StaticSite{env.dir / "www"};
    env.start(cfg);

    ossl::SslCtxPtr ctx(SSL_CTX_new(TLS_client_method()));
    REQUIRE(ctx);
    SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
    REQUIRE(SSL_CTX_load_verify_locations(ctx.get(), env.ca_file.c_str(), nullptr) == 1);
    // exchange sends req and returns all the connection carried until the server closed it.
    auto exchange = [&](bool tls, const std::string& req) {
      int fd = connect_to(tls ? env.server->https_port() : env.server->http_port());
      REQUIRE(fd >= 0);
      timeval tv{5, 0};
      ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
      std::string got;
      char buf[4096];
      if (tls) {
        ossl::SslPtr ssl(SSL_new(ctx.get()));
        SSL_set_fd(ssl.get(), fd);
        SSL_set_tlsext_host_name(ssl.get(), "s.test");
        REQUIRE(SSL_connect(ssl.get()) == 1);
        REQUIRE(SSL_write(ssl.get(), req.data(), static_cast<int>(req.size())) ==
                static_cast<int>(req.size()));
        for (;;) {
          int n = SSL_read(ssl.get(), buf, sizeof buf);
          if (n <= 0) break;
          got.append(buf, static_cast<size_t>(n));
        }
        ERR_clear_error();
      } else {
        REQUIRE(::send(fd, req.data(), req.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(req.size()));
        for (;;) {
          ssize_t n = ::recv(fd, buf, sizeof buf, 0);
          if (n <= 0) break;
          got.append(buf, static_cast<size_t>(n));
        }
      }
      ::close(fd);
      return got;
    };
    const std::string next = "GET /a.txt HTTP/1.1\r\nHost: s.test\r\n\r\n";
    struct Case {
      std::string first_line, fields;
    };
    const std::vector<Case> cases = {
        {"GET /a.txt HTTP/1.1", "Host: s.test\r\n"},
        {"HEAD /a.txt HTTP/1.1", "Host: S.Test:443\r\nUser-Agent: t\r\n"},
        {"GET /d/ HTTP/1.1", "host:  s.test \r\n"},
        {"GET /e.json HTTP/1.1", "Host: s.test\r\nAccept: */*\r\n"},
        {"GET /a.txt HTTP/1.1", "Host: s.test\r\nConnection: close\r\n"},
        {"GET /a.txt HTTP/1.1", "Host: s.test\r\nConnection: keep-alive\r\n"},
        {"GET /a.txt HTTP/1.0", "Host: s.test\r\n"},
        {"GET /a.txt HTTP/1.0", "Host: s.test\r\nConnection: Keep-Alive\r\n"},
        {"HEAD /d/index.html HTTP/1.0", "Host: s.test\r\nConnection: Keep-Alive\r\n"},
    };
    for (bool tls : {false, true}) {
      for (const auto& c : cases) {
        std::string fast = exchange(tls, c.first_line + "\r\n" + c.fields + "\r\n" + next);
        std::string slow =
            exchange(tls, c.first_line + "\r\n" + c.fields + "X-Via: httplib%21\r\n\r\n" + next);
        CAPTURE(tls);
        CAPTURE(c.first_line);
        CAPTURE(c.fields);
        CHECK(fast.starts_with("HTTP/1.1 200 OK\r\n"));
        CHECK(fast == slow);
        CHECK((fast.find("Strict-Transport-Security: max-age=600; includeSubDomains\r\n") !=
               std::string::npos) == tls);
      }
    }
    // httplib answers 400 to a field line over 8 KiB (CPPHTTPLIB_HEADER_MAX_LENGTH), within
    // max_header_bytes (16 KiB): the fast path must leave that request to it, not serve the
    // file. (httplib keeps the connection; only its first answer is read.)
    int fd = connect_to(env.server->http_port());
    REQUIRE(fd >= 0);
    timeval tv{5, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    const std::string big = "GET /a.txt HTTP/1.1\r\nHost: s.test\r\nCookie: " +
                            std::string(9000, 'c') + "\r\n\r\n";
    REQUIRE(::send(fd, big.data(), big.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(big.size()));
    std::string got;
    char buf[4096];
    while (got.find("\r\n\r\n") == std::string::npos) {
      ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n <= 0) break;
      got.append(buf, static_cast<size_t>(n));
    }
    ::close(fd);
    CAPTURE(got);
    CHECK(got.starts_with("HTTP/1.1 400 "));
  }

  TEST_CASE("a client that stops reading is closed at the write deadline") {
    // Responses a reactor writes itself wait for the socket without blocking anything, and
    // only until timeouts.write.
    Env env("writedeadline");
    env.publish({"s.test"});
    fs::create_directories(env.dir / "www");
    std::ofstream(env.dir / "www" / "f.bin", std::ios::binary) << std::string(60 * 1024, 'x');
    ServerConfig cfg = Env::base_config();
    cfg.redirect_to_https = false;
    cfg.sites["s.test"] = StaticSite{env.dir / "www"};
    cfg.timeouts.write = milliseconds(500);
    env.start(cfg);
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    int small = 4096;
    ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(env.server->http_port()));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    std::string reqs;
    // 300 x 60 KiB = 18 MB, more than any socket buffer takes.
    for (int i = 0; i < 300; ++i) reqs += "GET /f.bin HTTP/1.1\r\nHost: s.test\r\n\r\n";
    REQUIRE(::send(fd, reqs.data(), reqs.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(reqs.size()));
    // A normal client is answered meanwhile.
    auto r = curl_request("http://s.test:" + std::to_string(env.server->http_port()) + "/f.bin",
                          {"s.test"}, env.server->http_port(), {});
    CHECK(r.status == 200);
    CHECK(r.body.size() == 60 * 1024);
    auto start = std::chrono::steady_clock::now();
    while (env.server->counters().open_connections > 0 &&
           std::chrono::steady_clock::now() - start < std::chrono::seconds(5)) {
      std::this_thread::sleep_for(milliseconds(20));
    }
    auto waited = std::chrono::steady_clock::now() - start;
    CHECK(env.server->counters().open_connections == 0);
    CHECK(waited < std::chrono::seconds(3));
    ::close(fd);
  }

  TEST_CASE("reverse proxy forwards with x-forwarded headers and maps upstream failures") {
    Upstream up;
    Env env("proxy");
    env.publish({"app.test", "down.test"});
    ServerConfig cfg = Env::base_config();
    cfg.sites["app.test"] = ProxySite{"http://127.0.0.1:" + std::to_string(up.port)};
    ProxySite down{"http://127.0.0.1:" + std::to_string(free_port())};
    cfg.sites["down.test"] = down;
    env.start(cfg);
    int port = env.server->https_port();
    std::string host = "app.test:" + std::to_string(port);

    CurlReply r;
    {
      CURL* h = curl_easy_init();
      curl_slist* resolve = curl_slist_append(nullptr, (host + ":127.0.0.1").c_str());
      curl_slist* hdrs = curl_slist_append(nullptr, "X-Custom: kept");
      hdrs = curl_slist_append(hdrs, "X-Forwarded-For: 6.6.6.6");
      std::string url = "https://" + host + "/echo?q=42";
      curl_easy_setopt(h, CURLOPT_URL, url.c_str());
      curl_easy_setopt(h, CURLOPT_RESOLVE, resolve);
      curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
      curl_easy_setopt(h, CURLOPT_CAINFO, env.ca_file.c_str());
      curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, append_cb);
      curl_easy_setopt(h, CURLOPT_WRITEDATA, &r.body);
      curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, append_cb);
      curl_easy_setopt(h, CURLOPT_HEADERDATA, &r.headers);
      curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 10'000L);
      r.code = curl_easy_perform(h);
      curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &r.status);
      curl_slist_free_all(hdrs);
      curl_slist_free_all(resolve);
      curl_easy_cleanup(h);
    }
    CHECK(r.code == CURLE_OK);
    CHECK(r.status == 200);
    CHECK(r.body == "xff=127.0.0.1;proto=https;fhost=" + host + ";host=" + host +
                        ";xff_count=1;q=42;custom=kept");
    CHECK(r.headers.find("X-Upstream: yes") != std::string::npos);

    auto post = curl_request("https://" + host + "/echo", {"app.test"}, port, env.ca_file,
                             "POST", "payload-123");
    CHECK(post.status == 201);
    CHECK(post.body == "method=POST;body=payload-123");

    auto d = curl_request("https://down.test:" + std::to_string(port) + "/echo", {"down.test"},
                          port, env.ca_file);
    CHECK(d.code == CURLE_OK);
    CHECK(d.status == 502);
  }

  TEST_CASE("proxy answers 504 when the upstream is too slow and 413 for a large body") {
    Upstream up;
    Env env("proxy504");
    env.publish({"app.test"});
    ServerConfig cfg = Env::base_config();
    ProxySite site{"http://127.0.0.1:" + std::to_string(up.port)};
    site.read_timeout = milliseconds(300);
    cfg.sites["app.test"] = site;
    cfg.max_body_bytes = 1024;
    env.start(cfg);
    int port = env.server->https_port();
    std::string base = "https://app.test:" + std::to_string(port);
    auto r = curl_request(base + "/slow", {"app.test"}, port, env.ca_file);
    CHECK(r.status == 504);
    auto big = curl_request(base + "/echo", {"app.test"}, port, env.ca_file, "POST",
                            std::string(4096, 'x'));
    CHECK(big.status == 413);
  }

  TEST_CASE("slowloris: 200 trickling and 200 silent connections, a normal client is answered and the slow ones close at their deadline") {
    // The proof: 200 connections trickling one header byte per second plus 200 that
    // connect and say nothing; a normal client still gets its answer, and the slow ones are
    // closed at their deadline. Half of each kind on the https listener (the tricklers after
    // a complete handshake: header deadline from its end; the silent ones: handshake
    // deadline), half on the http listener (header deadline from accept).
    constexpr int kHalf = 100;
    constexpr auto kDeadline = milliseconds(3'000);
    // A slow connection must be closed within this after its deadline; the server scans
    // every 50 ms, the rest is slack for a loaded machine (it bounds the test, not speed).
    constexpr auto kLateBound = milliseconds(4'000);
    // 400 client sockets here and 400 in the server, plus curl, the store and the reactors.
    rlimit nofile{};
    REQUIRE(::getrlimit(RLIMIT_NOFILE, &nofile) == 0);
    if (nofile.rlim_cur < 4'096) {
      nofile.rlim_cur = std::min<rlim_t>(4'096, nofile.rlim_max);
      ::setrlimit(RLIMIT_NOFILE, &nofile);
      REQUIRE(::getrlimit(RLIMIT_NOFILE, &nofile) == 0);
    }
    REQUIRE_MESSAGE(nofile.rlim_cur >= 1'024, "RLIMIT_NOFILE too low for 400 slow connections");
    // A trickler's write after the server closed it must fail, not kill the test.
    ::signal(SIGPIPE, SIG_IGN);

    Env env("slowloris");
    env.publish({"normal.test"});
    fs::create_directories(env.dir / "www");
    std::ofstream(env.dir / "www" / "index.html") << "ok";
    ServerConfig cfg = Env::base_config();
    cfg.default_site = StaticSite{env.dir / "www"};
    cfg.timeouts.header = kDeadline;
    cfg.timeouts.handshake = kDeadline;
    cfg.max_connections = 1'000;  // above the 400 slow ones and the normal client
    cfg.backlog = 1'024;
    cfg.worker_threads = 8;
    env.start(cfg);
    int hp = env.server->http_port();
    int sp = env.server->https_port();

    enum class Kind { trickle_tls, trickle_http, silent_tls, silent_http };
    struct Slow {
      Kind kind;
      int fd = -1;
      ossl::SslPtr ssl;                // trickle_tls only
      SteadyClock::time_point base;    // no later than the server's start of its deadline
      SteadyClock::time_point closed;  // when the test saw EOF or reset
      bool is_closed = false;
      std::size_t sent = 0;            // header bytes trickled
      SteadyClock::time_point next_send;
    };
    const std::string header =
        "GET / HTTP/1.1\r\nHost: normal.test\r\nX-Slow: " + std::string(64, 'a') + "\r\n";
    auto set_nonblocking = [](int fd) { ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK); };
    // trickle sends the next header byte (and plans the one after a second later); false when
    // the server has closed the connection.
    auto trickle = [&](Slow& c) {
      c.next_send = SteadyClock::now() + std::chrono::seconds(1);
      if (c.sent >= header.size()) return true;
      if (c.ssl) {
        ERR_clear_error();
        int n = SSL_write(c.ssl.get(), &header[c.sent], 1);
        if (n == 1) ++c.sent;
        int err = n == 1 ? SSL_ERROR_NONE : SSL_get_error(c.ssl.get(), n);
        ERR_clear_error();
        return err == SSL_ERROR_NONE || err == SSL_ERROR_WANT_WRITE || err == SSL_ERROR_WANT_READ;
      }
      ssize_t n = ::send(c.fd, &header[c.sent], 1, MSG_NOSIGNAL);
      if (n == 1) ++c.sent;
      return n == 1 || (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK));
    };
    // drained reads whatever arrived (a session ticket, nothing else is expected); true at EOF
    // or on an error (reset).
    auto drained = [](Slow& c) {
      char buf[4096];
      for (;;) {
        if (c.ssl) {
          ERR_clear_error();
          int n = SSL_read(c.ssl.get(), buf, sizeof buf);
          if (n > 0) continue;
          int err = SSL_get_error(c.ssl.get(), n);
          ERR_clear_error();
          return err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE;
        }
        ssize_t n = ::recv(c.fd, buf, sizeof buf, 0);
        if (n > 0) continue;
        return n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK);
      }
    };

    ossl::SslCtxPtr ctx(SSL_CTX_new(TLS_client_method()));
    SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_NONE, nullptr);
    std::vector<Slow> slow(4 * kHalf);
    auto is_trickler = [](const Slow& c) {
      return c.kind == Kind::trickle_tls || c.kind == Kind::trickle_http;
    };
    // trickle_due sends a byte to every open trickler whose second has passed.
    std::size_t open = slow.size();
    auto trickle_due = [&] {
      auto now = SteadyClock::now();
      for (auto& c : slow) {
        if (c.fd < 0 || c.is_closed || !is_trickler(c) || now < c.next_send) continue;
        if (!trickle(c)) {  // refused: closed (seen here before the read side)
          c.is_closed = true;
          c.closed = SteadyClock::now();
          --open;
        }
      }
    };
    auto t_setup = SteadyClock::now();
    for (int i = 0; i < 4 * kHalf; ++i) {
      Slow& c = slow[i];
      c.kind = static_cast<Kind>(i / kHalf);
      bool tls_port = c.kind == Kind::trickle_tls || c.kind == Kind::silent_tls;
      c.base = SteadyClock::now();
      c.fd = connect_to(tls_port ? sp : hp, std::chrono::seconds(10));
      REQUIRE(c.fd >= 0);
      if (c.kind == Kind::trickle_tls) {
        c.ssl.reset(SSL_new(ctx.get()));
        SSL_set_fd(c.ssl.get(), c.fd);
        SSL_set_tlsext_host_name(c.ssl.get(), "normal.test");
        c.base = SteadyClock::now();  // the header deadline starts when the handshake ends
        REQUIRE(SSL_connect(c.ssl.get()) == 1);
      }
      set_nonblocking(c.fd);
      if (is_trickler(c)) REQUIRE(trickle(c));
      trickle_due();
    }
    auto setup_ms = std::chrono::duration_cast<milliseconds>(SteadyClock::now() - t_setup).count();
    // The server has them all (400 open) before the normal client comes.
    for (int i = 0; i < 500 && env.server->counters().open_connections < 4 * kHalf; ++i) {
      std::this_thread::sleep_for(milliseconds(10));
      trickle_due();
    }
    REQUIRE(env.server->counters().open_connections == 4 * kHalf);

    // The normal client, on its own thread while this one keeps trickling.
    CurlReply normal;
    long long normal_ms = 0;
    Server::Counters at_answer{};
    std::thread client([&] {
      auto n0 = SteadyClock::now();
      normal = curl_request("https://normal.test:" + std::to_string(sp) + "/", {"normal.test"}, sp,
                            env.ca_file);
      normal_ms = std::chrono::duration_cast<milliseconds>(SteadyClock::now() - n0).count();
      at_answer = env.server->counters();
    });

    // Trickle one byte per second to each open trickler; watch every slow one for its close.
    auto last_base = slow.back().base;
    for (const auto& c : slow) last_base = std::max(last_base, c.base);
    auto give_up = last_base + kDeadline + kLateBound;
    std::vector<pollfd> pfds;
    std::vector<std::size_t> index;
    while (open > 0 && SteadyClock::now() < give_up) {
      pfds.clear();
      index.clear();
      for (std::size_t i = 0; i < slow.size(); ++i) {
        if (slow[i].is_closed) continue;
        pfds.push_back({slow[i].fd, POLLIN, 0});
        index.push_back(i);
      }
      ::poll(pfds.data(), pfds.size(), 20);
      auto now = SteadyClock::now();
      for (std::size_t k = 0; k < pfds.size(); ++k) {
        Slow& c = slow[index[k]];
        if (pfds[k].revents == 0 || !drained(c)) continue;
        c.is_closed = true;
        c.closed = now;
        --open;
      }
      trickle_due();
    }
    client.join();

    // The normal client got its answer, and before any slow connection had reached its
    // deadline (all 400 were still open): no worker or reactor was held by them.
    CHECK(normal.code == CURLE_OK);
    CHECK(normal.status == 200);
    CHECK(normal.body == "ok");
    CHECK(at_answer.header_timeout == 0);
    CHECK(at_answer.handshake_timeout == 0);
    CHECK(at_answer.open_connections >= 4 * kHalf);
    // The 1 s: reported, not asserted (a loaded 2-core machine may stall any thread);
    // the ordering check above is the load-proof form of "slow clients do not delay it".
    WARN_MESSAGE(normal_ms < 1'000, "normal request took " << normal_ms << " ms");

    // Every slow one was closed at its deadline: never before it, and within the bound.
    long long early = 0, late_max = 0, late_sum = 0;
    int closed = 0, trickled_more = 0;
    for (const auto& c : slow) {
      if (!c.is_closed) continue;
      ++closed;
      auto after = std::chrono::duration_cast<milliseconds>(c.closed - c.base);
      if (after < kDeadline) ++early;
      long long late = (after - kDeadline).count();
      late_max = std::max(late_max, late);
      late_sum += late;
      if (is_trickler(c) && c.sent >= 2) ++trickled_more;
    }
    MESSAGE("setup " << setup_ms << " ms; normal request " << normal_ms << " ms; " << closed
                     << " of " << slow.size() << " slow connections closed, "
                     << (closed ? late_sum / closed : 0) << " ms after their deadline on average, "
                     << late_max << " ms at most");
    CHECK(closed == 4 * kHalf);
    CHECK(early == 0);
    CHECK(late_max <= kLateBound.count());
    // The tricklers kept sending (a byte a second never moved their deadline).
    CHECK(trickled_more == 2 * kHalf);
    auto c = env.server->counters();
    CHECK(c.header_timeout == 3 * kHalf);  // tricklers on both listeners, silent http
    CHECK(c.handshake_timeout == kHalf);   // silent https
    CHECK(c.requests == 1);
    for (auto& s : slow) {
      s.ssl.reset();
      ::close(s.fd);
    }
  }

  TEST_CASE("connections over the cap are closed at once") {
    Env env("cap");
    env.publish({"cap.test"});
    ServerConfig cfg = Env::base_config();
    cfg.max_connections = 5;
    env.start(cfg);
    std::vector<int> fds;
    for (int i = 0; i < 5; ++i) fds.push_back(connect_to(env.server->http_port()));
    // Wait until the reactor accepted all five.
    for (int i = 0; i < 200 && env.server->counters().open_connections < 5; ++i) {
      std::this_thread::sleep_for(milliseconds(5));
    }
    int extra = connect_to(env.server->http_port());
    REQUIRE(extra >= 0);
    pollfd p{extra, POLLIN, 0};
    REQUIRE(::poll(&p, 1, 2'000) == 1);
    char b;
    CHECK(::recv(extra, &b, 1, 0) <= 0);
    CHECK(env.server->counters().rejected_over_capacity >= 1);
    ::close(extra);
    for (int fd : fds) ::close(fd);
  }

  TEST_CASE("graceful shutdown drains in-flight requests and refuses new ones") {
    Upstream up;
    Env env("drain");
    env.publish({"app.test"});
    ServerConfig cfg = Env::base_config();
    cfg.sites["app.test"] = ProxySite{"http://127.0.0.1:" + std::to_string(up.port)};
    // A proxied request holds its worker while the upstream answers.
    cfg.worker_threads = 64;
    env.start(cfg);
    int port = env.server->https_port();

    constexpr int kInFlight = 50;
    up.slow_gate = kInFlight;
    std::vector<CurlReply> replies(kInFlight);
    std::vector<std::thread> clients;
    for (int i = 0; i < kInFlight; ++i) {
      clients.emplace_back([&, i] {
        replies[i] = curl_request("https://app.test:" + std::to_string(port) + "/slow",
                                  {"app.test"}, port, env.ca_file);
      });
    }
    // Wait until every request is in the upstream handler (it sleeps 1 s).
    for (int i = 0; i < 2'000 && up.slow_started.load() < kInFlight; ++i) {
      std::this_thread::sleep_for(milliseconds(5));
    }
    REQUIRE(up.slow_started.load() == kInFlight);
    std::atomic<int> refused_probe{-2};
    std::thread prober([&] {
      std::this_thread::sleep_for(milliseconds(200));
      int fd = connect_to(port);
      refused_probe = fd < 0 ? 1 : 0;
      if (fd >= 0) ::close(fd);
    });
    auto s0 = SteadyClock::now();
    env.server->shutdown(milliseconds(5'000));
    auto shutdown_ms = std::chrono::duration_cast<milliseconds>(SteadyClock::now() - s0).count();
    for (auto& t : clients) t.join();
    prober.join();
    MESSAGE("shutdown with " << kInFlight << " in flight took " << shutdown_ms << " ms");
    for (const auto& r : replies) {
      CHECK_MESSAGE(r.code == CURLE_OK, r.error);
      CHECK(r.status == 200);
      CHECK(r.body == "slow done");
      CHECK_MESSAGE(r.headers.find("Connection: close") != std::string::npos, r.headers);
    }
    CHECK(refused_probe.load() == 1);
    CHECK(shutdown_ms < 3'000);
    CHECK_FALSE(env.server->ready());
    CHECK(env.server->counters().forced_closed == 0);
  }
}
