// The reverse proxy's upstream client over TLS: an https:// upstream on loopback, its
// certificate trusted (or not) through SSL_CERT_FILE, which the client context reads through
// SSL_CTX_set_default_verify_paths when it is made.

#include <doctest/doctest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <openssl/pem.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>
#include <openssl/x509v3.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <vector>
#include <set>
#include <string>
#include <thread>

#include "acme/util/logger.h"
#include "acme/util/openssl.h"
#include "server/proxy.h"
#include "tests/support/temp_dir.h"
#include "tests/support/test_keys.h"

using namespace autotls;
using namespace autotls::server;
using std::chrono::milliseconds;

namespace {

// self_signed is a throw-away certificate for 127.0.0.1 (its own CA: trusted when it is in the
// bundle, unknown otherwise).
ossl::X509Ptr self_signed(const char* cn, long serial,
                          const char* names = "IP:127.0.0.1,DNS:localhost") {
  const auto& key = testing::cached_key(acme::KeyType::ec256);
  ossl::X509Ptr cert(X509_new());
  REQUIRE(cert);
  X509_set_version(cert.get(), 2);
  ASN1_INTEGER_set(X509_get_serialNumber(cert.get()), serial);
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), -3600);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), 3600);
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>(cn),
                             -1, -1, 0);
  X509_set_issuer_name(cert.get(), name);
  X509_set_pubkey(cert.get(), key.evp());
  X509V3_CTX v3;
  X509V3_set_ctx_nodb(&v3);
  X509V3_set_ctx(&v3, cert.get(), cert.get(), nullptr, nullptr, 0);
  X509_EXTENSION* san =
      X509V3_EXT_conf_nid(nullptr, &v3, NID_subject_alt_name, names);
  REQUIRE(san != nullptr);
  X509_add_ext(cert.get(), san, -1);
  X509_EXTENSION_free(san);
  REQUIRE(X509_sign(cert.get(), key.evp(), EVP_sha256()) > 0);
  return cert;
}

// TlsUpstream is an https server on loopback that echoes what it got.
struct TlsUpstream {
  httplib::SSLServer server;
  std::thread thread;
  int port = 0;
  std::mutex mu;
  std::set<int> client_ports;  // one per upstream connection
  std::condition_variable cv;
  bool hanging = false;  // under mu: a /hang request is in its handler
  bool release = false;  // under mu: /hang may answer

  explicit TlsUpstream(X509* cert)
      : server([cert](SSL_CTX& ctx) {
          const auto& key = testing::cached_key(acme::KeyType::ec256);
          return SSL_CTX_use_certificate(&ctx, cert) == 1 &&
                 SSL_CTX_use_PrivateKey(&ctx, key.evp()) == 1;
        }) {
    server.Post("/echo", [this](const httplib::Request& req, httplib::Response& res) {
      {
        std::lock_guard lock(mu);
        client_ports.insert(req.remote_port);
      }
      res.set_header("X-Method", req.method);
      res.set_header("X-Got", req.get_header_value("X-Test"));
      res.set_header("X-Proto", req.get_header_value("X-Forwarded-Proto"));
      res.set_content("echo:" + req.body, "text/plain");
    });
    server.Post("/hang", [this](const httplib::Request&, httplib::Response& res) {
      std::unique_lock lock(mu);
      hanging = true;
      cv.notify_all();
      cv.wait_for(lock, std::chrono::seconds(10), [&] { return release; });
      res.set_content("late", "text/plain");
    });
    port = server.bind_to_any_port("127.0.0.1");
    REQUIRE(port > 0);
    thread = std::thread([this] { server.listen_after_bind(); });
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (!server.is_running() && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(milliseconds(1));
    }
    REQUIRE(server.is_running());
  }
  ~TlsUpstream() {
    {
      std::lock_guard lock(mu);
      release = true;
    }
    cv.notify_all();
    server.stop();
    thread.join();
  }
};

// LateTicketUpstream is a TLS 1.3 upstream on loopback, one connection at a time, that sends
// one more NewSessionTicket after each response: the pooled connection then has a TLS record
// waiting on its socket that is no response (what a peek at the socket alone takes for stray
// bytes).
struct LateTicketUpstream {
  int listener = -1;
  int port = 0;
  SSL_CTX* ctx = nullptr;
  std::atomic<bool> stop{false};
  std::atomic<int> accepted{0};
  std::atomic<int> requests{0};
  std::thread thread;

  explicit LateTicketUpstream(X509* cert) {
    ctx = SSL_CTX_new(TLS_server_method());
    REQUIRE(ctx);
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    REQUIRE(SSL_CTX_use_certificate(ctx, cert) == 1);
    REQUIRE(SSL_CTX_use_PrivateKey(ctx, testing::cached_key(acme::KeyType::ec256).evp()) == 1);
    listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(listener >= 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(listener, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    REQUIRE(::listen(listener, 4) == 0);
    socklen_t len = sizeof a;
    ::getsockname(listener, reinterpret_cast<sockaddr*>(&a), &len);
    port = ntohs(a.sin_port);
    thread = std::thread([this] { run(); });
  }
  ~LateTicketUpstream() {
    stop = true;
    thread.join();
    ::close(listener);
    SSL_CTX_free(ctx);
  }
  // wait polls fd for input in 50 ms steps until stop (false then).
  bool wait(int fd) {
    while (!stop) {
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 50) > 0) return true;
    }
    return false;
  }
  void run() {
    while (wait(listener)) {
      int fd = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      ++accepted;
      SSL* ssl = SSL_new(ctx);
      SSL_set_fd(ssl, fd);
      if (SSL_accept(ssl) == 1) serve(ssl, fd);
      SSL_free(ssl);
      ::close(fd);
    }
  }
  void serve(SSL* ssl, int fd) {
    std::string in;
    char buf[4096];
    for (;;) {
      auto end = in.find("\r\n\r\n");
      if (end != std::string::npos) {
        std::size_t length = 0;
        if (auto cl = in.find("Content-Length: "); cl != std::string::npos && cl < end) {
          length = std::stoul(in.substr(cl + 16));
        }
        if (in.size() >= end + 4 + length) {
          in.erase(0, end + 4 + length);
          static const std::string ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
          if (SSL_write(ssl, ok.data(), static_cast<int>(ok.size())) <= 0) return;
          if (SSL_new_session_ticket(ssl) != 1 || SSL_do_handshake(ssl) != 1) return;
          ++requests;
          continue;
        }
      }
      if (SSL_pending(ssl) == 0 && !wait(fd)) return;
      int n = SSL_read(ssl, buf, sizeof buf);
      if (n <= 0) return;
      in.append(buf, static_cast<std::size_t>(n));
    }
  }
};

// Env sets an environment variable for the test and restores it after.
struct Env {
  std::string name;
  std::optional<std::string> old;
  Env(const char* n, const std::string& v) : name(n) {
    if (const char* o = std::getenv(n)) old = o;
    ::setenv(n, v.c_str(), 1);
  }
  ~Env() {
    if (old) {
      ::setenv(name.c_str(), old->c_str(), 1);
    } else {
      ::unsetenv(name.c_str());
    }
  }
};

// Lines keeps the "error" field of each log line.
struct Lines : Logger {
  std::mutex mu;
  std::vector<std::string> errors;
  bool enabled(LogLevel) const override { return true; }
  void log(LogLevel, std::string_view, std::string_view,
           std::initializer_list<LogField> fields) override {
    std::lock_guard lock(mu);
    for (const auto& f : fields) {
      if (f.key == "error") errors.push_back(f.value);
    }
  }
};

struct Result {
  int status = 0;
  std::string body;
  httplib::Response res;
};

Result post(const ProxySite& site, detail::UpstreamPool& pool, const std::string& body,
            Logger& log = null_logger()) {
  httplib::Request req;
  req.method = "POST";
  req.target = "/echo";
  req.path = "/echo";
  req.headers.emplace("Host", "p.test");
  req.headers.emplace("X-Test", "forty-two");
  req.body = body;
  Result r;
  bool in_step = detail::proxy(site, req, nullptr, r.res, true, 1 << 20, pool, log);
  CHECK(in_step);
  if (r.res.content_provider_) {
    httplib::DataSink sink;
    sink.write = [&](const char* d, size_t n) {
      r.body.append(d, n);
      return true;
    };
    sink.done = [] {};
    while (r.body.size() < r.res.content_length_) {
      REQUIRE(r.res.content_provider_(r.body.size(), r.res.content_length_ - r.body.size(), sink));
    }
  } else {
    r.body = r.res.body;
  }
  r.status = r.res.status;
  return r;
}

}  // namespace

TEST_SUITE("server") {
  TEST_CASE("proxy speaks TLS to an https upstream and verifies its certificate") {
    auto trusted = self_signed("autotls test upstream", 1);
    auto elsewhere = self_signed("autotls test other name", 3, "DNS:other.test");
    testing::TempDir dir("autotls-proxy-tls");
    const auto bundle = dir.path / "ca.pem";
    {
      ossl::BioPtr out(BIO_new_file(bundle.c_str(), "w"));
      REQUIRE(out);
      REQUIRE(PEM_write_bio_X509(out.get(), trusted.get()) == 1);
      REQUIRE(PEM_write_bio_X509(out.get(), elsewhere.get()) == 1);
    }
    // Read when the pool makes its client context, on the first https exchange.
    Env cert_file("SSL_CERT_FILE", bundle.string());
    TlsUpstream up(trusted.get());
    detail::UpstreamPool pool;

    SUBCASE("method, headers and body go through; the TLS connection is pooled") {
      for (const char* host : {"127.0.0.1", "localhost"}) {
        ProxySite site{std::string("https://") + host + ":" + std::to_string(up.port)};
        site.read_timeout = milliseconds(5'000);
        // Twice: the second request reuses the pooled connection (past the TLS 1.3 session
        // tickets that arrived after the first response, if they did not come with it).
        for (int i = 0; i < 2; ++i) {
          auto r = post(site, pool, "payload " + std::to_string(i));
          CHECK(r.status == 200);
          CHECK(r.body == "echo:payload " + std::to_string(i));
          CHECK(r.res.get_header_value("X-Method") == "POST");
          CHECK(r.res.get_header_value("X-Got") == "forty-two");
          CHECK(r.res.get_header_value("X-Proto") == "https");
          CHECK(pool.idle(site.upstream) == 1);
        }
      }
      std::lock_guard lock(up.mu);
      CHECK(up.client_ports.size() == 2);  // one connection per upstream URL
    }

    SUBCASE("a session ticket that came after the response does not stop reuse") {
      LateTicketUpstream late(trusted.get());
      ProxySite site{"https://127.0.0.1:" + std::to_string(late.port)};
      site.read_timeout = milliseconds(5'000);
      for (int i = 0; i < 3; ++i) {
        auto r = post(site, pool, "x");
        CHECK(r.status == 200);
        CHECK(r.body == "ok");
        CHECK(pool.idle(site.upstream) == 1);
      }
      CHECK(late.requests.load() == 3);
      CHECK(late.accepted.load() == 1);
      pool.clear();
    }

    SUBCASE("abort_all cuts an exchange waiting on a TLS upstream") {
      ProxySite site{"https://127.0.0.1:" + std::to_string(up.port)};
      site.read_timeout = milliseconds(20'000);
      httplib::Request req;
      req.method = "POST";
      req.target = "/hang";
      req.path = "/hang";
      req.body = "x";
      httplib::Response res;
      std::atomic<bool> done{false};
      bool in_step = true;
      std::thread worker([&] {
        in_step = detail::proxy(site, req, nullptr, res, true, 1 << 20, pool, null_logger());
        done = true;
      });
      {
        std::unique_lock lock(up.mu);
        REQUIRE(up.cv.wait_for(lock, std::chrono::seconds(5), [&] { return up.hanging; }));
      }
      pool.abort_all();
      worker.join();  // at once, not after read_timeout (the handler holds its answer 10 s)
      CHECK(done.load());
      CHECK(res.status == 502);
      CHECK_FALSE(in_step);  // not the 200 the handler sends when it gives up after 10 s
    }

    SUBCASE("an upstream whose certificate is not trusted answers 502") {
      auto unknown = self_signed("autotls untrusted upstream", 2);
      TlsUpstream other(unknown.get());
      ProxySite site{"https://127.0.0.1:" + std::to_string(other.port)};
      Lines log;
      auto r = post(site, pool, "x", log);
      CHECK(r.status == 502);
      REQUIRE(log.errors.size() == 1);
      CHECK(log.errors[0].find("certificate verification failed: self-signed certificate") !=
            std::string::npos);
      CHECK(pool.idle(site.upstream) == 0);
      std::lock_guard lock(other.mu);
      CHECK(other.client_ports.empty());
    }

    SUBCASE("a trusted certificate for another name answers 502") {
      TlsUpstream other(elsewhere.get());
      Lines log;
      for (const char* host : {"127.0.0.1", "localhost"}) {
        ProxySite site{std::string("https://") + host + ":" + std::to_string(other.port)};
        auto r = post(site, pool, "x", log);
        CHECK(r.status == 502);
      }
      REQUIRE(log.errors.size() == 2);
      for (const auto& e : log.errors) {
        CHECK(e.find("certificate verification failed") != std::string::npos);
        CHECK(e.find("mismatch") != std::string::npos);
      }
      std::lock_guard lock(other.mu);
      CHECK(other.client_ports.empty());
    }
  }
}
