// Operations on a running server: reload (SIGHUP path) without disturbing open connections,
// session-ticket resumption with rotating keys, the access log and the latency histogram.

#include <doctest/doctest.h>

#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <curl/curl.h>
#include <httplib.h>
#include <nlohmann/json.hpp>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "server/server.h"
#include "tests/support/net.h"
#include "tests/support/start_server.h"
#include "tests/support/pebble_env.h"
#include "tests/support/sni_handshake.h"
#include "tests/support/temp_dir.h"
#include "tlsreload/store.h"

using namespace autotls;
using namespace autotls::server;
using std::chrono::milliseconds;
namespace fs = std::filesystem;

using autotls::testing::start_server;

namespace {

// Dir is a fresh temporary directory (tests/support TempDir) named after the test.
struct Dir : autotls::testing::TempDir {
  explicit Dir(const std::string& tag) : TempDir("autotls-ops-" + tag) {}
  fs::path site(const std::string& name, const std::string& index_body) const {
    fs::path root = path / name;
    fs::create_directories(root);
    std::ofstream(root / "index.html") << index_body;
    return root;
  }
};

// Conn is one plain-HTTP client connection kept open across requests (keep-alive); get
// returns {0, ""} when the connection is gone.
struct Conn : autotls::testing::RawConn {
  explicit Conn(int port) : RawConn(port) { REQUIRE(connected()); }
};

ServerConfig plain_config() {
  ServerConfig cfg;
  cfg.https = {{"127.0.0.1", 0}};
  cfg.http = {{"127.0.0.1", 0}};
  cfg.redirect_to_https = false;  // sites over plain HTTP: the reload test needs no TLS
  cfg.worker_threads = 4;
  return cfg;
}

// tls_config is plain_config for the TLS tests: plain HTTP redirects to HTTPS, and every host
// gets one static site ("t\n") whose files are in dir.
ServerConfig tls_config(const Dir& dir) {
  auto cfg = plain_config();
  cfg.redirect_to_https = true;
  cfg.default_site = StaticSite{dir.site("t", "t\n")};
  return cfg;
}

// store_for is a store holding one certificate for name, from a fresh test CA.
std::shared_ptr<tlsreload::CertStore> store_for(const std::string& name) {
  auto ca = autotls::testing::make_test_ca("ops test CA");
  REQUIRE(ca);
  auto leaf = autotls::testing::make_test_leaf({name}, *ca);
  REQUIRE(leaf);
  auto store = std::make_shared<tlsreload::CertStore>();
  REQUIRE(store->publish_pem(leaf->cert_pem, leaf->key_pem));
  return store;
}

// TlsClient handshakes with 127.0.0.1:port for sni, optionally offering a saved session.
struct TlsClient {
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  explicit TlsClient(int version) {
    SSL_CTX_set_min_proto_version(ctx, version);
    SSL_CTX_set_max_proto_version(ctx, version);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, nullptr);
  }
  ~TlsClient() { SSL_CTX_free(ctx); }

  struct Outcome {
    bool ok = false;
    bool reused = false;
    SSL_SESSION* session = nullptr;  // owned by the caller (SSL_SESSION_free)
  };

  Outcome connect(int port, const std::string& sni, SSL_SESSION* offer) {
    auto g = autotls::testing::tls_get(port, sni, ctx, {.offer = offer, .keep_session = true});
    return {g.ok, g.reused, g.session};
  }
};

// peak_rss_kib is this process's high-water resident set (VmHWM), in KiB.
long peak_rss_kib() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stol(line.substr(6));
  }
  return -1;
}

// StreamingUpstream never holds a whole body either: /sink counts a request body as it
// arrives, /big produces its response in 64 KiB pieces, /hello records the client port.
struct StreamingUpstream {
  httplib::Server svr;
  std::thread thread;
  int port = 0;
  std::mutex mu;
  std::set<int> hello_ports;
  static constexpr std::size_t kBig = 50u << 20;

  StreamingUpstream() {
    svr.Post("/sink", [](const httplib::Request&, httplib::Response& res,
                         const httplib::ContentReader& reader) {
      std::size_t n = 0;
      reader([&](const char*, size_t len) {
        n += len;
        return true;
      });
      res.set_content("got=" + std::to_string(n), "text/plain");
    });
    svr.Get("/big", [](const httplib::Request&, httplib::Response& res) {
      res.set_content_provider(kBig, "application/octet-stream",
                               [](size_t offset, size_t length, httplib::DataSink& sink) {
                                 static const std::string piece(64 * 1024, 'x');
                                 (void)offset;
                                 return sink.write(piece.data(), std::min(length, piece.size()));
                               });
    });
    svr.Get("/hello", [this](const httplib::Request& req, httplib::Response& res) {
      std::lock_guard lock(mu);
      hello_ports.insert(req.remote_port);
      res.set_content("hi", "text/plain");
    });
    svr.set_keep_alive_max_count(1'000);  // httplib closes after 5 requests by default
    port = svr.bind_to_any_port("127.0.0.1");
    thread = std::thread([this] { svr.listen_after_bind(); });
    while (!svr.is_running()) std::this_thread::sleep_for(milliseconds(5));
  }
  ~StreamingUpstream() {
    svr.stop();
    thread.join();
  }
};

size_t count_bytes(char*, size_t size, size_t n, void* user) {
  *static_cast<std::size_t*>(user) += size * n;
  return size * n;
}

struct Generated {
  std::size_t left;
};

size_t generate(char* buf, size_t size, size_t n, void* user) {
  auto* g = static_cast<Generated*>(user);
  std::size_t k = std::min(size * n, g->left);
  std::memset(buf, 'y', k);
  g->left -= k;
  return k;
}

}  // namespace

TEST_SUITE("server") {
  TEST_CASE("the proxy streams 50 MB each way in bounded memory and reuses upstream connections") {
    StreamingUpstream up;
    auto cfg = plain_config();
    cfg.sites["p.test"] = ProxySite{"http://127.0.0.1:" + std::to_string(up.port)};
    cfg.max_body_bytes = 100u << 20;
    auto srv = start_server(cfg);
    int port = srv->http_port();
    std::string base = "http://p.test:" + std::to_string(port);
    curl_slist* resolve =
        curl_slist_append(nullptr, ("p.test:" + std::to_string(port) + ":127.0.0.1").c_str());
    long before = peak_rss_kib();

    // 50 MB up: generated by curl as it sends, counted by the upstream as it arrives.
    {
      CURL* h = curl_easy_init();
      Generated g{StreamingUpstream::kBig};
      std::string body;
      curl_easy_setopt(h, CURLOPT_URL, (base + "/sink").c_str());
      curl_easy_setopt(h, CURLOPT_RESOLVE, resolve);
      curl_easy_setopt(h, CURLOPT_POST, 1L);
      curl_easy_setopt(h, CURLOPT_READFUNCTION, generate);
      curl_easy_setopt(h, CURLOPT_READDATA, &g);
      curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE,
                       static_cast<curl_off_t>(StreamingUpstream::kBig));
      curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, +[](char* p, size_t s, size_t n, void* u) {
        static_cast<std::string*>(u)->append(p, s * n);
        return s * n;
      });
      curl_easy_setopt(h, CURLOPT_WRITEDATA, &body);
      curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 60'000L);
      curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
      CHECK(curl_easy_perform(h) == CURLE_OK);
      long status = 0;
      curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
      CHECK(status == 200);
      CHECK(body == "got=" + std::to_string(StreamingUpstream::kBig));
      curl_easy_cleanup(h);
    }
    // 50 MB down.
    {
      CURL* h = curl_easy_init();
      std::size_t got = 0;
      curl_easy_setopt(h, CURLOPT_URL, (base + "/big").c_str());
      curl_easy_setopt(h, CURLOPT_RESOLVE, resolve);
      curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, count_bytes);
      curl_easy_setopt(h, CURLOPT_WRITEDATA, &got);
      curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 60'000L);
      curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
      CHECK(curl_easy_perform(h) == CURLE_OK);
      long status = 0;
      curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
      CHECK(status == 200);
      CHECK(got == StreamingUpstream::kBig);
      curl_easy_cleanup(h);
    }
    // A chunked upload (no Content-Length) stays chunked on the way up.
    {
      CURL* h = curl_easy_init();
      Generated g{5u << 20};
      std::string body;
      curl_slist* hdrs = curl_slist_append(nullptr, "Transfer-Encoding: chunked");
      curl_easy_setopt(h, CURLOPT_URL, (base + "/sink").c_str());
      curl_easy_setopt(h, CURLOPT_RESOLVE, resolve);
      curl_easy_setopt(h, CURLOPT_POST, 1L);
      curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
      curl_easy_setopt(h, CURLOPT_READFUNCTION, generate);
      curl_easy_setopt(h, CURLOPT_READDATA, &g);
      curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, +[](char* p, size_t s, size_t n, void* u) {
        static_cast<std::string*>(u)->append(p, s * n);
        return s * n;
      });
      curl_easy_setopt(h, CURLOPT_WRITEDATA, &body);
      curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 60'000L);
      curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
      CHECK(curl_easy_perform(h) == CURLE_OK);
      CHECK(body == "got=" + std::to_string(5u << 20));
      curl_slist_free_all(hdrs);
      curl_easy_cleanup(h);
    }
    long growth_mib = (peak_rss_kib() - before) / 1024;
    MESSAGE("peak RSS growth for 2 x 50 MB through the proxy: " << growth_mib << " MiB");
    // Buffering either body whole would hold at least 50 MB (twice that with the copies).
#if defined(__SANITIZE_ADDRESS__)
    // ASan's quarantine keeps freed chunks out of reuse (256 MiB by default), so every chunk
    // that passed through counts as growth: RSS says nothing here. The normal build checks it.
    MESSAGE("ASan build: peak RSS not checked (allocator quarantine)");
#else
    CHECK(growth_mib < 32);
#endif

    // Sequential requests ride one kept-alive upstream connection (it goes back to the pool as
    // soon as the upstream response is in, before the client has read it).
    for (int i = 0; i < 5; ++i) {
      Conn c(port);
      CHECK(c.get("p.test").first == 404);  // upstream has no "/": its 404 passed through
    }
    {
      CURL* h = curl_easy_init();
      std::size_t got = 0;
      curl_easy_setopt(h, CURLOPT_URL, (base + "/hello").c_str());
      curl_easy_setopt(h, CURLOPT_RESOLVE, resolve);
      curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, count_bytes);
      curl_easy_setopt(h, CURLOPT_WRITEDATA, &got);
      curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
      for (int i = 0; i < 5; ++i) {
        CHECK(curl_easy_perform(h) == CURLE_OK);
      }
      CHECK(got == 10);
      curl_easy_cleanup(h);
    }
    {
      std::lock_guard lock(up.mu);
      CHECK(up.hello_ports.size() == 1);
    }
    curl_slist_free_all(resolve);
    srv->shutdown(milliseconds(1'000));
  }

  TEST_CASE("reload adds and removes sites while an open keep-alive connection keeps working") {
    Dir dir("reload");
    auto a_root = dir.site("a", "site a\n");
    auto b_root = dir.site("b", "site b\n");
    auto cfg = plain_config();
    cfg.sites["a.test"] = StaticSite{a_root};
    auto srv = start_server(cfg);
    int port = srv->http_port();

    Conn old_conn(port);
    REQUIRE(old_conn.get("a.test") == std::pair<int, std::string>{200, "site a\n"});
    CHECK(old_conn.get("b.test").first == 421);

    // A new site: served to new and already open connections; nothing to restart.
    auto next = plain_config();
    next.sites["a.test"] = StaticSite{a_root};
    next.sites["b.test"] = StaticSite{b_root};
    auto rep = srv->reload(next);
    REQUIRE_MESSAGE(rep, rep.error().message);
    CHECK(rep->not_applied.empty());
    {
      Conn fresh(port);
      CHECK(fresh.get("b.test") == std::pair<int, std::string>{200, "site b\n"});
    }
    CHECK(old_conn.get("b.test") == std::pair<int, std::string>{200, "site b\n"});
    CHECK(old_conn.get("a.test") == std::pair<int, std::string>{200, "site a\n"});

    // A bad configuration is refused whole; the running one stays.
    auto bad = next;
    bad.sites["c.test"] = StaticSite{dir.path / "missing"};
    auto refused = srv->reload(bad);
    REQUIRE_FALSE(refused);
    CHECK(refused.error().message.find("site c.test: static root") != std::string::npos);
    CHECK(refused.error().message.find("missing") != std::string::npos);
    auto bad_name = next;
    bad_name.sites["Upper.Test"] = StaticSite{a_root};
    CHECK_FALSE(srv->reload(bad_name));
    CHECK(old_conn.get("b.test").first == 200);

    // A removed site answers 421; a new https listener and new timeouts are applied without
    // touching the open connection (reload_test.cpp covers listeners and timeouts in detail).
    auto removed = plain_config();
    removed.sites["b.test"] = StaticSite{b_root};
    removed.https = {{"127.0.0.2", 0}};
    removed.timeouts.idle = milliseconds(5'000);
    auto rep2 = srv->reload(removed);
    REQUIRE(rep2);
    CHECK(rep2->not_applied.empty());
    CHECK(rep2->failed.empty());
    CHECK(old_conn.get("a.test").first == 421);
    CHECK(old_conn.get("b.test").first == 200);
    CHECK(srv->https_port() != 0);
    CHECK(srv->counters().idle_closed == 0);
    srv->shutdown(milliseconds(1'000));
  }

  TEST_CASE("an IP address is a site, an IPv6 one reached with Host: [address]:port") {
    Dir dir("ipsites");
    auto cfg = plain_config();
    cfg.sites["127.0.0.1"] = StaticSite{dir.site("v4", "site v4\n")};
    cfg.sites["::1"] = StaticSite{dir.site("v6", "site v6\n")};
    auto srv = start_server(cfg);
    Conn c(srv->http_port());
    CHECK(c.get("127.0.0.1:" + std::to_string(srv->http_port())) == std::pair<int, std::string>{200, "site v4\n"});
    CHECK(c.get("[::1]:" + std::to_string(srv->http_port())) == std::pair<int, std::string>{200, "site v6\n"});
    CHECK(c.get("[::1]") == std::pair<int, std::string>{200, "site v6\n"});
    CHECK(c.get("[::2]").first == 421);
    // Keyed as host_of reads the header: no brackets, lower case.
    for (const char* bad : {"[::1]", "::ABCD"}) {
      auto other = plain_config();
      other.sites[bad] = StaticSite{dir.path / "v6"};
      auto refused = Server::create(other, std::make_shared<tlsreload::CertStore>(), nullptr, nullptr);
      REQUIRE_FALSE(refused);
      CHECK(refused.error().message.find("is not a lower-case host name or IPv6 address") != std::string::npos);
    }
    srv->shutdown(milliseconds(1'000));
  }

  TEST_CASE("a wildcard site serves the hosts one label under it that have no site of their own") {
    Dir dir("wildsites");
    auto wild = dir.site("wild", "wild\n");
    auto exact = dir.site("exact", "exact\n");
    // Both request paths: the reactor's static fast path, and httplib's (taken for every
    // request when the access log is on).
    for (bool logged : {false, true}) {
      CAPTURE(logged);
      auto cfg = plain_config();
      cfg.sites["*.w.test"] = StaticSite{wild};
      cfg.sites["exact.w.test"] = StaticSite{exact};
      std::vector<std::string> lines;
      std::mutex mu;
      if (logged) {
        cfg.access_log.enabled = true;
        cfg.access_log.sink = [&](const std::string& line) {
          std::lock_guard lock(mu);
          lines.push_back(line);
        };
      }
      auto srv = start_server(cfg);
      Conn c(srv->http_port());
      CHECK(c.get("a.w.test") == std::pair<int, std::string>{200, "wild\n"});
      CHECK(c.get("xn--bcher-kva.w.test:" + std::to_string(srv->http_port())) ==
            std::pair<int, std::string>{200, "wild\n"});
      CHECK(c.get("exact.w.test") == std::pair<int, std::string>{200, "exact\n"});
      CHECK(c.get("w.test").first == 421);      // the wildcard's base is not under it
      CHECK(c.get("b.a.w.test").first == 421);  // nor two labels down
      CHECK(c.get("a.x.test").first == 421);
      srv->shutdown(milliseconds(1'000));
      if (logged) {
        std::lock_guard lock(mu);
        CHECK(lines.size() == 6);
      }
    }
    // With a default site, what no site (exact or wildcard) takes goes to it.
    auto cfg = plain_config();
    cfg.sites["*.w.test"] = StaticSite{wild};
    cfg.default_site = StaticSite{exact};
    auto srv = start_server(cfg);
    Conn c(srv->http_port());
    CHECK(c.get("a.w.test").second == "wild\n");
    CHECK(c.get("b.a.w.test").second == "exact\n");
    srv->shutdown(milliseconds(1'000));
    // A wildcard is "*." and a lower-case host name: no address under it, no second star.
    for (const char* bad : {"*.", "*.127.0.0.1", "*.::1", "*.*.w.test", "a.*.w.test", "*w.test", "*.W.test"}) {
      CAPTURE(bad);
      auto other = plain_config();
      other.sites[bad] = StaticSite{wild};
      auto refused = Server::create(other, std::make_shared<tlsreload::CertStore>(), nullptr, nullptr);
      REQUIRE_FALSE(refused);
      CHECK(refused.error().message.find(std::string("site name '") + bad + "' is not a lower-case host name") !=
            std::string::npos);
    }
  }

  TEST_CASE("session tickets resume and a ticket whose key left the ring gets a full handshake") {
    auto store = store_for("t.test");
    Dir dir("tickets");
    auto cfg = tls_config(dir);
    // Two hours of tickets with hourly keys: the current key and two retired ones.
    cfg.tickets.rotate_every = std::chrono::hours(1);
    cfg.tickets.lifetime = std::chrono::hours(2);
    auto srv = start_server(cfg, store);
    int port = srv->https_port();

    for (int version : {TLS1_3_VERSION, TLS1_2_VERSION}) {
      CAPTURE(version);
      TlsClient client(version);
      auto first = client.connect(port, "t.test", nullptr);
      REQUIRE(first.ok);
      CHECK_FALSE(first.reused);
      REQUIRE(first.session != nullptr);
      CHECK(SSL_SESSION_has_ticket(first.session) == 1);

      auto again = client.connect(port, "t.test", first.session);
      CHECK(again.ok);
      CHECK(again.reused);
      SSL_SESSION_free(again.session);

      // One rotation: the ticket's key is retired but still opens it.
      srv->rotate_ticket_keys();
      auto after_one = client.connect(port, "t.test", first.session);
      CHECK(after_one.ok);
      CHECK(after_one.reused);
      SSL_SESSION_free(after_one.session);

      // Two more: the key has left the ring; the handshake is a full one and succeeds.
      srv->rotate_ticket_keys();
      srv->rotate_ticket_keys();
      auto after_three = client.connect(port, "t.test", first.session);
      CHECK(after_three.ok);
      CHECK_FALSE(after_three.reused);
      SSL_SESSION_free(after_three.session);
      SSL_SESSION_free(first.session);
    }

    // TLS 1.1 is refused.
    TlsClient old(TLS1_1_VERSION);
    SSL_CTX_set_security_level(old.ctx, 0);
    SSL_CTX_set_cipher_list(old.ctx, "ALL:@SECLEVEL=0");
    auto r = old.connect(port, "t.test", nullptr);
    CHECK_FALSE(r.ok);
    srv->shutdown(milliseconds(1'000));
  }

  TEST_CASE("TLS 1.2 takes only Mozilla intermediate suites and refuses renegotiation") {
    auto store = store_for("t.test");
    Dir dir("tls12");
    auto cfg = tls_config(dir);
    auto srv = start_server(cfg, store);
    int port = srv->https_port();
    // An ECDHE-ECDSA AEAD suite is in the intermediate list; the same key exchange with CBC
    // and SHA-1 is not (it is in OpenSSL's defaults, so only our cipher list refuses it).
    for (const auto& [suite, accepted] : {std::pair{"ECDHE-ECDSA-AES128-GCM-SHA256", true},
                                          std::pair{"ECDHE-ECDSA-CHACHA20-POLY1305", true},
                                          std::pair{"ECDHE-ECDSA-AES128-SHA", false},
                                          std::pair{"ECDHE-ECDSA-AES256-SHA384", false}}) {
      std::string name = suite;
      CAPTURE(name);
      TlsClient c(TLS1_2_VERSION);
      SSL_CTX_set_security_level(c.ctx, 0);
      REQUIRE(SSL_CTX_set_cipher_list(c.ctx, suite) == 1);
      auto r = c.connect(port, "t.test", nullptr);
      CHECK(r.ok == accepted);
      if (r.session) SSL_SESSION_free(r.session);
    }

    // A client-initiated renegotiation gets no new handshake. SSL_OP_NO_RENEGOTIATION says so,
    // and OpenSSL 3 also refuses it unless SSL_OP_ALLOW_CLIENT_RENEGOTIATION is set (checked:
    // this part still passes without our option), so it guards against that option.
    TlsClient c(TLS1_2_VERSION);
    BIO* tcp = BIO_new_connect(("127.0.0.1:" + std::to_string(port)).c_str());
    REQUIRE(BIO_do_connect(tcp) == 1);
    int fd = -1;
    BIO_get_fd(tcp, &fd);
    timeval tv{5, 0};  // bounded: a server that ignored the request would leave us waiting
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    SSL* ssl = SSL_new(c.ctx);
    SSL_set_bio(ssl, tcp, tcp);
    SSL_set_tlsext_host_name(ssl, "t.test");
    REQUIRE(SSL_connect(ssl) == 1);
    REQUIRE(SSL_renegotiate(ssl) == 1);
    CHECK(SSL_do_handshake(ssl) != 1);
    ERR_clear_error();
    SSL_free(ssl);
    srv->shutdown(milliseconds(1'000));
  }

  TEST_CASE("the server picks AES-128-GCM among the suites offered, ChaCha20 for a client that lists it first") {
    auto store = store_for("t.test");
    Dir dir("suites");
    auto cfg = tls_config(dir);
    auto srv = start_server(cfg, store);
    int port = srv->https_port();
    struct Case {
      int version;
      const char* offer;  // the client's list, in its order of preference (nullptr: OpenSSL's)
      const char* want;
    };
    // OpenSSL's client lists TLS_AES_256_GCM_SHA384 first (TLS 1.3) and AES-256 before AES-128
    // (TLS 1.2); a server that followed the client would settle on AES-256.
    for (const auto& c : {Case{TLS1_3_VERSION, nullptr, "TLS_AES_128_GCM_SHA256"},
                          Case{TLS1_3_VERSION, "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256",
                               "TLS_AES_128_GCM_SHA256"},
                          Case{TLS1_3_VERSION, "TLS_AES_256_GCM_SHA384", "TLS_AES_256_GCM_SHA384"},
                          Case{TLS1_3_VERSION, "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256",
                               "TLS_CHACHA20_POLY1305_SHA256"},
                          Case{TLS1_2_VERSION, nullptr, "ECDHE-ECDSA-AES128-GCM-SHA256"},
                          Case{TLS1_2_VERSION, "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256",
                               "ECDHE-ECDSA-CHACHA20-POLY1305"}}) {
      std::string offer = c.offer ? c.offer : "(default)";
      CAPTURE(c.version);
      CAPTURE(offer);
      TlsClient client(c.version);
      if (c.offer && c.version == TLS1_3_VERSION) REQUIRE(SSL_CTX_set_ciphersuites(client.ctx, c.offer) == 1);
      if (c.offer && c.version == TLS1_2_VERSION) REQUIRE(SSL_CTX_set_cipher_list(client.ctx, c.offer) == 1);
      auto g = autotls::testing::tls_get(port, "t.test", client.ctx);
      REQUIRE(g.ok);
      CHECK(g.status_line == "HTTP/1.1 200 OK");
      CHECK(g.cipher == std::string(c.want));
    }
    srv->shutdown(milliseconds(1'000));
  }

  TEST_CASE("every TLS 1.3 resumption carries a fresh ticket, so single-use clients resume each time") {
    // OpenSSL's client (wrk, curl) uses a TLS 1.3 ticket once: a resumption that brought no new
    // ticket leaves it a session it will not offer again, so the next connection is a full
    // handshake. TLS 1.2 tickets are reused and are not renewed while their key is current.
    auto store = store_for("t.test");
    Dir dir("tickets13");
    auto cfg = tls_config(dir);
    auto srv = start_server(cfg, store);
    int port = srv->https_port();
    auto ticket = [](SSL_SESSION* s) {
      const unsigned char* t = nullptr;
      std::size_t len = 0;
      SSL_SESSION_get0_ticket(s, &t, &len);
      return std::string(reinterpret_cast<const char*>(t), len);
    };

    for (int version : {TLS1_3_VERSION, TLS1_2_VERSION}) {
      CAPTURE(version);
      TlsClient client(version);
      auto prev = client.connect(port, "t.test", nullptr);
      REQUIRE(prev.ok);
      CHECK_FALSE(prev.reused);
      REQUIRE(prev.session != nullptr);
      // Each connection offers the session the one before it ended with, as wrk does.
      for (int i = 0; i < 3; ++i) {
        CAPTURE(i);
        auto next = client.connect(port, "t.test", prev.session);
        REQUIRE(next.ok);
        CHECK(next.reused);
        REQUIRE(next.session != nullptr);
        CHECK(SSL_SESSION_is_resumable(next.session) == 1);
        if (version == TLS1_3_VERSION) {
          CHECK(ticket(next.session) != ticket(prev.session));
        } else {
          CHECK(ticket(next.session) == ticket(prev.session));
        }
        SSL_SESSION_free(prev.session);
        prev = next;
      }
      SSL_SESSION_free(prev.session);
    }
    srv->shutdown(milliseconds(1'000));
  }

  TEST_CASE("reload applies a new ticket rotation interval to the running key ring") {
    auto store = store_for("t.test");
    Dir dir("rotation");
    auto cfg = plain_config();
    cfg.default_site = StaticSite{dir.site("t", "t\n")};
    cfg.tickets.rotate_every = std::chrono::hours(1);
    cfg.tickets.lifetime = std::chrono::hours(2);
    auto srv = start_server(cfg, store);
    int port = srv->https_port();
    TlsClient client(TLS1_3_VERSION);
    // A ticket starts with the 16-byte name of the key that sealed it.
    auto key_name = [](SSL_SESSION* s) {
      const unsigned char* t = nullptr;
      size_t len = 0;
      SSL_SESSION_get0_ticket(s, &t, &len);
      return len >= 16 ? std::string(reinterpret_cast<const char*>(t), 16) : std::string();
    };
    auto first = client.connect(port, "t.test", nullptr);
    REQUIRE(first.ok);
    auto second = client.connect(port, "t.test", nullptr);
    REQUIRE(second.ok);
    REQUIRE(key_name(first.session).size() == 16);
    CHECK(key_name(second.session) == key_name(first.session));  // hourly: same key

    auto bad = cfg;
    bad.tickets.rotate_every = std::chrono::seconds(0);
    CHECK_FALSE(srv->reload(bad));
    auto next = cfg;
    next.tickets.rotate_every = std::chrono::seconds(1);
    auto rep = srv->reload(next);
    REQUIRE(rep);
    CHECK(rep->not_applied.empty());
    std::this_thread::sleep_for(milliseconds(1'100));
    auto third = client.connect(port, "t.test", nullptr);
    REQUIRE(third.ok);
    CHECK(key_name(third.session) != key_name(first.session));  // rotated on the new schedule
    // The retired key still opens the first ticket.
    auto resumed = client.connect(port, "t.test", first.session);
    CHECK(resumed.ok);
    CHECK(resumed.reused);
    // The lifetime belongs to the TLS context: reported, not applied.
    next.tickets.lifetime = std::chrono::hours(3);
    auto rep2 = srv->reload(next);
    REQUIRE(rep2);
    CHECK(rep2->not_applied == std::vector<std::string>{"tickets"});
    for (auto* s : {first.session, second.session, third.session, resumed.session}) {
      SSL_SESSION_free(s);
    }
    srv->shutdown(milliseconds(1'000));
  }

  TEST_CASE("a connection flood to twice the cap is refused and service returns after") {
    Dir dir("flood");
    auto cfg = plain_config();
    cfg.sites["a.test"] = StaticSite{dir.site("a", "site a\n")};
    cfg.max_connections = 20;
    auto srv = start_server(cfg);
    int port = srv->http_port();
    std::vector<std::unique_ptr<Conn>> flood;
    for (int i = 0; i < 40; ++i) flood.push_back(std::make_unique<Conn>(port));
    // Every connection asks; the 20 within the cap are answered, the rest were closed at accept.
    int answered = 0, refused = 0;
    for (auto& c : flood) {
      auto r = c->get("a.test");
      if (r.first == 200) ++answered;
      if (r.first == 0) ++refused;
    }
    CHECK(answered == 20);
    CHECK(refused == 20);
    CHECK(srv->counters().rejected_over_capacity == 20);
    CHECK(srv->counters().open_connections == 20);
    flood.clear();
    for (int i = 0; i < 400 && srv->counters().open_connections > 0; ++i) {
      std::this_thread::sleep_for(milliseconds(5));
    }
    CHECK(srv->counters().open_connections == 0);
    // Back to normal: 20 new clients are all served.
    for (int i = 0; i < 20; ++i) flood.push_back(std::make_unique<Conn>(port));
    int after = 0;
    for (auto& c : flood) after += c->get("a.test").first == 200 ? 1 : 0;
    CHECK(after == 20);
    flood.clear();
    srv->shutdown(milliseconds(1'000));
  }

  TEST_CASE("access log lines and the request duration histogram") {
    Dir dir("access");
    auto cfg = plain_config();
    cfg.sites["a.test"] = StaticSite{dir.site("a", "hello\n")};
    cfg.admin.endpoint = Endpoint{"127.0.0.1", 0};
    std::mutex mu;
    std::vector<std::string> lines;
    cfg.access_log.enabled = true;
    cfg.access_log.sink = [&](const std::string& line) {
      std::lock_guard lock(mu);
      lines.push_back(line);
    };
    // A line is written after its response, so the client may see the response first.
    auto wait_lines = [&](std::size_t n) {
      auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
      while (std::chrono::steady_clock::now() < deadline) {
        {
          std::lock_guard lock(mu);
          if (lines.size() >= n) return;
        }
        std::this_thread::sleep_for(milliseconds(5));
      }
    };
    auto srv = start_server(cfg);
    {
      Conn c(srv->http_port());
      CHECK(c.get("a.test").first == 200);
      CHECK(c.get("nope.test").first == 421);
    }
    wait_lines(2);
    {
      std::lock_guard lock(mu);
      REQUIRE(lines.size() == 2);
      auto j = nlohmann::json::parse(lines[0]);
      CHECK(j["host"] == "a.test");
      CHECK(j["method"] == "GET");
      CHECK(j["target"] == "/");
      CHECK(j["status"] == 200);
      CHECK(j["bytes"] == 6);
      CHECK(j["remote"] == "127.0.0.1");
      CHECK(j["tls"] == false);
      CHECK(j["duration_ms"].get<double>() >= 0);
      CHECK(nlohmann::json::parse(lines[1])["status"] == 421);
    }

    httplib::Client adm("127.0.0.1", srv->admin_port());
    auto m = adm.Get("/metrics");
    REQUIRE(m);
    INFO(m->body);
    CHECK(m->body.find("# TYPE autotls_server_request_duration_seconds histogram\n") !=
          std::string::npos);
    CHECK(m->body.find("\nautotls_server_request_duration_seconds_bucket{le=\"+Inf\"} 2\n") !=
          std::string::npos);
    CHECK(m->body.find("\nautotls_server_request_duration_seconds_count 2\n") != std::string::npos);

    // Switched to the combined format by a reload; off again by another.
    auto next = cfg;
    next.access_log.format = "combined";
    REQUIRE(srv->reload(next));
    {
      Conn c(srv->http_port());
      CHECK(c.get("a.test").first == 200);
    }
    next.access_log.format = "xml";
    auto bad = srv->reload(next);
    REQUIRE_FALSE(bad);
    CHECK(bad.error().message.find("access log format 'xml'") != std::string::npos);
    wait_lines(3);
    {
      std::lock_guard lock(mu);
      REQUIRE(lines.size() == 3);
      CHECK(lines[2].rfind("127.0.0.1 - - [", 0) == 0);
      CHECK(lines[2].find("] \"GET / HTTP/1.1\" 200 6 \"-\" \"-\"") != std::string::npos);
    }
    srv->shutdown(milliseconds(1'000));
  }
}
