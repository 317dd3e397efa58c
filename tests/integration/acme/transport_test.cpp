// Integration tests for the libcurl transport (against Pebble and small local servers) and for
// the challenge responders in tests/support.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <doctest/doctest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "acme/transport.h"
#include "acme/util/openssl.h"
#include "tests/support/http01_responder.h"
#include "tests/support/net.h"
#include "tests/support/pebble_env.h"
#include "tests/support/temp_dir.h"
#include "tests/support/test_keys.h"
#include "tests/support/tls_alpn_responder.h"

using autotls::Errc;
using autotls::acme::CurlOptions;
using autotls::acme::HttpRequest;
using autotls::acme::make_curl_transport;
using autotls::testing::PebbleEnv;

namespace {

using namespace std::chrono_literals;

// LocalServer runs an httplib::Server on 127.0.0.1 with an OS-chosen port for one test.
class LocalServer {
 public:
  LocalServer() {
    server.set_keep_alive_max_count(1000);
    server.set_keep_alive_timeout(2);
    // httplib writes headers and body separately; with Nagle on, the second write waits for
    // the client's delayed ACK (40 ms a response). Accepted sockets inherit TCP_NODELAY.
    server.set_socket_options([](socket_t sock) {
      int one = 1;
      ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
      ::setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    });
  }
  ~LocalServer() {
    server.stop();
    if (thread_.joinable()) thread_.join();
  }
  void start() {
    port = server.bind_to_any_port("127.0.0.1");
    REQUIRE(port > 0);
    thread_ = std::thread([this] { server.listen_after_bind(); });
    auto deadline = std::chrono::steady_clock::now() + 5s;
    while (!server.is_running() && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(1ms);
    }
    REQUIRE(server.is_running());
  }
  std::string url(const std::string& path) const { return "http://127.0.0.1:" + std::to_string(port) + path; }

  httplib::Server server;
  int port = 0;

 private:
  std::thread thread_;
};

HttpRequest get(std::string url) { return HttpRequest{"GET", std::move(url), {}, {}}; }

// TlsProbe is the result of one TLS client handshake to 127.0.0.1:port.
struct TlsProbe {
  bool ok = false;
  std::string alpn;
  autotls::ossl::X509Ptr peer;
};

TlsProbe tls_connect(int port, const std::string& sni, const std::string& alpn_protocol) {
  TlsProbe out;
  autotls::ossl::SslCtxPtr ctx(SSL_CTX_new(TLS_client_method()));
  REQUIRE(ctx);
  // tls-alpn-01 certificates are self-signed: the ACME server checks the extension, not a chain.
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_NONE, nullptr);
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  timeval tv{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  autotls::ossl::SslPtr ssl(SSL_new(ctx.get()));
  SSL_set_fd(ssl.get(), fd);
  SSL_set_tlsext_host_name(ssl.get(), sni.c_str());
  std::string wire(1, static_cast<char>(alpn_protocol.size()));
  wire += alpn_protocol;
  SSL_set_alpn_protos(ssl.get(), reinterpret_cast<const unsigned char*>(wire.data()),
                      static_cast<unsigned int>(wire.size()));
  if (SSL_connect(ssl.get()) == 1) {
    out.ok = true;
    const unsigned char* p = nullptr;
    unsigned int n = 0;
    SSL_get0_alpn_selected(ssl.get(), &p, &n);
    out.alpn.assign(reinterpret_cast<const char*>(p), n);
    out.peer.reset(SSL_get1_peer_certificate(ssl.get()));
    SSL_shutdown(ssl.get());
  }
  ERR_clear_error();
  ssl.reset();
  ::close(fd);
  return out;
}

autotls::ossl::X509Ptr parse_pem(const std::string& pem) {
  autotls::ossl::BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  return autotls::ossl::X509Ptr(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
}

}  // namespace

TEST_SUITE("acme.transport") {

TEST_CASE("curl transport fetches the Pebble directory") {
  AUTOTLS_START_PEBBLE(env);
  auto transport = make_curl_transport(env->curl_options());
  auto r = transport->send(get(env->directory_url()));
  REQUIRE_MESSAGE(r.has_value(), r.error().message);
  CHECK(r->status == 200);
  auto type = r->header("CONTENT-TYPE");
  REQUIRE(type.has_value());
  CHECK(type->find("application/json") != std::string::npos);
  auto dir = nlohmann::json::parse(r->body, nullptr, false);
  REQUIRE_FALSE(dir.is_discarded());
  CHECK(dir.contains("newNonce"));
  CHECK(dir.contains("newAccount"));
  CHECK(dir.contains("newOrder"));
}

TEST_CASE("HEAD newNonce returns a Replay-Nonce and no body") {
  AUTOTLS_START_PEBBLE(env);
  auto transport = make_curl_transport(env->curl_options());
  auto d = transport->send(get(env->directory_url()));
  REQUIRE_MESSAGE(d.has_value(), d.error().message);
  auto new_nonce = nlohmann::json::parse(d->body).at("newNonce").get<std::string>();
  std::set<std::string> nonces;
  for (int i = 0; i < 3; ++i) {
    auto r = transport->send(HttpRequest{"HEAD", new_nonce, {}, {}});
    REQUIRE_MESSAGE(r.has_value(), r.error().message);
    CHECK(r->status == 200);
    CHECK(r->body.empty());
    auto nonce = r->header("replay-nonce");
    REQUIRE(nonce.has_value());
    CHECK_FALSE(nonce->empty());
    CHECK(r->headers_named("Replay-Nonce").size() == 1);
    nonces.insert(*nonce);
  }
  CHECK(nonces.size() == 3);
}

TEST_CASE("a CA bundle that did not sign the server certificate gives a transport error") {
  AUTOTLS_START_PEBBLE(env);
  auto other = autotls::testing::make_test_ca("unrelated CA");
  REQUIRE(other.has_value());
  auto path = env->dir() / "other-ca.pem";
  std::ofstream(path) << other->cert_pem;
  CurlOptions options = env->curl_options();
  options.ca_bundle = path.string();
  auto r = make_curl_transport(options)->send(get(env->directory_url()));
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == Errc::transport);
  CHECK(r.error().message.find(env->directory_url()) != std::string::npos);
  // The system store does not trust Pebble's listener either.
  auto sys = make_curl_transport(CurlOptions{})->send(get(env->directory_url()));
  REQUIRE_FALSE(sys.has_value());
  CHECK(sys.error().code == Errc::transport);
}

TEST_CASE("PebbleEnv serves its roots and accepts challtestsrv records") {
  AUTOTLS_START_PEBBLE(env);
  CHECK(env->running());
  auto root = env->pebble_root_pem();
  REQUIRE_MESSAGE(root.has_value(), root.error().message);
  auto root_cert = parse_pem(*root);
  REQUIRE(root_cert);
  auto inter = env->pebble_intermediate_pem();
  REQUIRE_MESSAGE(inter.has_value(), inter.error().message);
  auto inter_cert = parse_pem(*inter);
  REQUIRE(inter_cert);
  CHECK(X509_check_issued(root_cert.get(), inter_cert.get()) == X509_V_OK);
  auto both = env->pebble_roots_pem();
  REQUIRE(both.has_value());
  CHECK(*both == *root + *inter);

  auto s = env->set_txt("_acme-challenge.example.test", "abc");
  CHECK_MESSAGE(s.has_value(), s.error().message);
  s = env->clear_txt("_acme-challenge.example.test.");
  CHECK_MESSAGE(s.has_value(), s.error().message);
  s = env->add_a("other.example.test", {"127.0.0.2"});
  CHECK_MESSAGE(s.has_value(), s.error().message);
  s = env->clear_a("other.example.test");
  CHECK_MESSAGE(s.has_value(), s.error().message);
}

TEST_CASE("PebbleEnv writes its options into the config") {
  autotls::testing::PebbleOptions options;
  options.eab_required = true;
  options.eab_mac_keys["kid-1"] = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
  options.certificate_validity_seconds = 120;
  AUTOTLS_START_PEBBLE(env, options);
  auto r = make_curl_transport(env->curl_options())->send(get(env->directory_url()));
  REQUIRE_MESSAGE(r.has_value(), r.error().message);
  auto dir = nlohmann::json::parse(r->body);
  CHECK(dir["meta"]["externalAccountRequired"] == true);
}

TEST_CASE("PebbleEnv stops its servers and removes its directory") {
  AUTOTLS_REQUIRE_PEBBLE();
  std::filesystem::path dir;
  std::string url;
  CurlOptions options;
  {
    auto env = PebbleEnv::start();
    REQUIRE_MESSAGE(env.has_value(), env.error().message);
    dir = (*env)->dir();
    url = (*env)->directory_url();
    options = (*env)->curl_options();
    CHECK(std::filesystem::exists(dir));
    CHECK(std::filesystem::exists((*env)->ca_bundle_path()));
  }
  CHECK_FALSE(std::filesystem::exists(dir));
  options.ca_bundle.clear();
  auto r = make_curl_transport(options)->send(get(url));
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == Errc::transport);
}

TEST_CASE("two PebbleEnvs run side by side on different ports") {
  AUTOTLS_START_PEBBLE(a);
  AUTOTLS_START_PEBBLE(b);
  std::set<int> ports = {a->listen_port(), a->management_port(), a->dns_port(), a->http_port(),
                         a->tls_port(),    b->listen_port(),     b->management_port(),
                         b->dns_port(),    b->http_port(),       b->tls_port()};
  CHECK(ports.size() == 10);
  for (auto* env : {a.get(), b.get()}) {
    auto r = make_curl_transport(env->curl_options())->send(get(env->directory_url()));
    REQUIRE_MESSAGE(r.has_value(), r.error().message);
    CHECK(r->status == 200);
  }
}

TEST_CASE("a refused connection gives a transport error") {
  // Errc::transport, not Errc::timeout: the refusal is reported as such, not waited out.
  autotls::testing::RefusedPort closed;  // bound, not listening: connects are refused
  std::string url = "http://127.0.0.1:" + std::to_string(closed.port()) + "/dir";
  auto r = make_curl_transport()->send(get(url));
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == Errc::transport);
  CHECK(r.error().message.find(url) != std::string::npos);
  CHECK(r.error().retryable());
}

TEST_CASE("a body over the cap gives bad_response and one at the cap is accepted") {
  LocalServer local;
  local.server.Get("/big", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(std::string(100'000, 'x'), "text/plain");
  });
  local.server.Get("/exact", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(std::string(4096, 'y'), "text/plain");
  });
  local.start();
  CurlOptions options;
  options.max_body_bytes = 4096;
  auto transport = make_curl_transport(options);
  auto big = transport->send(get(local.url("/big")));
  REQUIRE_FALSE(big.has_value());
  CHECK(big.error().code == Errc::bad_response);
  CHECK(big.error().message.find("response body exceeds 4096 bytes") != std::string::npos);
  // The pooled handle is still usable after an aborted transfer.
  auto exact = transport->send(get(local.url("/exact")));
  REQUIRE_MESSAGE(exact.has_value(), exact.error().message);
  CHECK(exact->body.size() == 4096);
}

TEST_CASE("a slow server gives a timeout error") {
  LocalServer local;
  std::atomic<bool> release{false};
  local.server.Get("/slow", [&](const httplib::Request&, httplib::Response& res) {
    auto until = std::chrono::steady_clock::now() + 3s;
    while (!release && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(5ms);
    res.set_content("late", "text/plain");
  });
  local.start();
  CurlOptions options;
  options.total_timeout = 300ms;
  auto r = make_curl_transport(options)->send(get(local.url("/slow")));
  release = true;
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == Errc::timeout);
}

TEST_CASE("POST sends the body and headers and redirects are not followed") {
  LocalServer local;
  local.server.Post("/echo", [](const httplib::Request& req, httplib::Response& res) {
    nlohmann::json j = {{"body", req.body},
                        {"content_type", req.get_header_value("Content-Type")},
                        {"user_agent", req.get_header_value("User-Agent")},
                        {"expect", req.get_header_value("Expect")}};
    res.set_header("Link", "<https://a.example/1>;rel=\"up\"");
    res.set_header("link", "<https://a.example/2>;rel=\"alternate\"");
    res.set_header("Replay-Nonce", "n1");
    res.status = 201;
    res.set_content(j.dump(), "application/json");
  });
  local.server.Get("/moved", [](const httplib::Request&, httplib::Response& res) {
    res.set_redirect("/elsewhere", 302);
  });
  local.start();
  auto transport = make_curl_transport();
  std::string body(5000, 'j');  // over curl's 1 KiB "Expect: 100-continue" threshold
  auto r = transport->send(HttpRequest{"POST", local.url("/echo"),
                                       {{"Content-Type", "application/jose+json"}}, body});
  REQUIRE_MESSAGE(r.has_value(), r.error().message);
  CHECK(r->status == 201);
  auto j = nlohmann::json::parse(r->body);
  CHECK(j["body"] == body);
  CHECK(j["content_type"] == "application/jose+json");
  CHECK(j["user_agent"] == "autotls/" + std::string(autotls::acme::version()));
  CHECK(j["expect"] == "");
  auto links = r->headers_named("LINK");
  REQUIRE(links.size() == 2);
  CHECK(links[0] == "<https://a.example/1>;rel=\"up\"");
  CHECK(links[1] == "<https://a.example/2>;rel=\"alternate\"");
  CHECK(r->header("replay-nonce") == "n1");
  CHECK_FALSE(r->header("X-Absent").has_value());

  auto moved = transport->send(get(local.url("/moved")));
  REQUIRE_MESSAGE(moved.has_value(), moved.error().message);
  CHECK(moved->status == 302);
  CHECK(moved->header("Location") == "/elsewhere");

  CurlOptions custom;
  custom.user_agent = "test-agent/1";
  auto ua = make_curl_transport(custom)->send(HttpRequest{"POST", local.url("/echo"), {}, "x"});
  REQUIRE(ua.has_value());
  CHECK(nlohmann::json::parse(ua->body)["user_agent"] == "test-agent/1");
}

TEST_CASE("only http and https URLs and GET HEAD POST methods are accepted") {
  auto transport = make_curl_transport();
  auto ftp = transport->send(get("ftp://127.0.0.1:1/file"));
  REQUIRE_FALSE(ftp.has_value());
  CHECK(ftp.error().code == Errc::transport);
  auto file = transport->send(get("file:///etc/hostname"));
  REQUIRE_FALSE(file.has_value());
  CHECK(file.error().code == Errc::transport);
  auto put = transport->send(HttpRequest{"PUT", "http://127.0.0.1:1/", {}, {}});
  REQUIRE_FALSE(put.has_value());
  CHECK(put.error().code == Errc::invalid_input);
}

TEST_CASE("sequential requests reuse one connection") {
  LocalServer local;
  std::mutex mu;
  std::set<int> client_ports;
  local.server.Get("/ping", [&](const httplib::Request& req, httplib::Response& res) {
    std::lock_guard lock(mu);
    client_ports.insert(req.remote_port);
    res.set_content("pong", "text/plain");
  });
  local.start();
  auto transport = make_curl_transport();
  for (int i = 0; i < 5; ++i) {
    auto r = transport->send(get(local.url("/ping")));
    REQUIRE_MESSAGE(r.has_value(), r.error().message);
    CHECK(r->body == "pong");
  }
  std::lock_guard lock(mu);
  CHECK(client_ports.size() == 1);
}

TEST_CASE("over TLS the transport offers HTTP/1.1 only, not HTTP/2") {
  // A self-signed certificate for 127.0.0.1 that the transport trusts through its CA bundle.
  const auto& key = autotls::testing::cached_key(autotls::acme::KeyType::ec256);
  autotls::ossl::X509Ptr cert(X509_new());
  REQUIRE(cert);
  X509_set_version(cert.get(), 2);
  ASN1_INTEGER_set(X509_get_serialNumber(cert.get()), 1);
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), -3600);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), 3600);
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>("loopback"), -1, -1, 0);
  X509_set_issuer_name(cert.get(), name);
  X509_set_pubkey(cert.get(), key.evp());
  X509V3_CTX v3;
  X509V3_set_ctx_nodb(&v3);
  X509V3_set_ctx(&v3, cert.get(), cert.get(), nullptr, nullptr, 0);
  X509_EXTENSION* san = X509V3_EXT_conf_nid(nullptr, &v3, NID_subject_alt_name, "IP:127.0.0.1");
  REQUIRE(san != nullptr);
  X509_add_ext(cert.get(), san, -1);
  X509_EXTENSION_free(san);
  REQUIRE(X509_sign(cert.get(), key.evp(), EVP_sha256()) > 0);
  autotls::testing::TempDir dir;
  const auto bundle = dir.path / "ca.pem";
  {
    autotls::ossl::BioPtr out(BIO_new_file(bundle.c_str(), "w"));
    REQUIRE(out);
    REQUIRE(PEM_write_bio_X509(out.get(), cert.get()) == 1);
  }

  // The server records the ALPN list the client offers and picks http/1.1 from it.
  static std::mutex offered_mu;
  static std::string offered;
  {
    std::lock_guard lock(offered_mu);
    offered.clear();
  }
  httplib::SSLServer server([&](SSL_CTX& ctx) {
    if (SSL_CTX_use_certificate(&ctx, cert.get()) != 1 || SSL_CTX_use_PrivateKey(&ctx, key.evp()) != 1) return false;
    SSL_CTX_set_alpn_select_cb(
        &ctx,
        [](SSL*, const unsigned char** sel, unsigned char* sel_len, const unsigned char* in, unsigned int in_len,
           void*) -> int {
          {
            std::lock_guard lock(offered_mu);
            offered.assign(reinterpret_cast<const char*>(in), in_len);
          }
          static const unsigned char h1[] = "\x08http/1.1";
          unsigned char* out = nullptr;
          if (SSL_select_next_proto(&out, sel_len, h1, sizeof h1 - 1, in, in_len) != OPENSSL_NPN_NEGOTIATED) {
            return SSL_TLSEXT_ERR_NOACK;
          }
          *sel = out;
          return SSL_TLSEXT_ERR_OK;
        },
        nullptr);
    return true;
  });
  server.Get("/ping", [](const httplib::Request&, httplib::Response& res) { res.set_content("pong", "text/plain"); });
  const int port = server.bind_to_any_port("127.0.0.1");
  REQUIRE(port > 0);
  std::thread t([&] { server.listen_after_bind(); });
  struct Stop {
    httplib::SSLServer& s;
    std::thread& t;
    ~Stop() {
      s.stop();
      t.join();
    }
  } stop{server, t};
  auto deadline = std::chrono::steady_clock::now() + 5s;
  while (!server.is_running() && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(1ms);
  REQUIRE(server.is_running());

  CurlOptions options;
  options.ca_bundle = bundle.string();
  auto transport = make_curl_transport(options);
  auto r = transport->send(get("https://127.0.0.1:" + std::to_string(port) + "/ping"));
  REQUIRE_MESSAGE(r.has_value(), r.error().message);
  CHECK(r->status == 200);
  CHECK(r->body == "pong");
  std::lock_guard lock(offered_mu);
  CHECK(offered == std::string("\x08http/1.1"));
}

TEST_CASE("one transport serves many threads at once") {
  LocalServer local;
  // httplib listens with a backlog of 5: more simultaneous connects than that can overflow it
  // and stall a second on SYN retransmission, so 4 threads.
  local.server.new_task_queue = [] { return new httplib::ThreadPool(8); };
  local.server.Get(R"(/n/(\d+))", [](const httplib::Request& req, httplib::Response& res) {
    res.set_header("X-N", req.matches[1]);
    res.set_content(req.matches[1], "text/plain");
  });
  local.start();
  auto transport = make_curl_transport();
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i) {
        std::string n = std::to_string(t * 100 + i);
        auto r = transport->send(get(local.url("/n/" + n)));
        if (r && r->status == 200 && r->body == n && r->header("x-n") == n) ++ok;
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(ok == 200);
}

TEST_CASE("http-01 responder serves key authorizations by token") {
  auto responder = autotls::testing::Http01Responder::start(0);
  REQUIRE_MESSAGE(responder.has_value(), responder.error().message);
  auto& r = **responder;
  r.set("tok-1", "tok-1.thumb");
  auto transport = make_curl_transport();
  std::string base = "http://127.0.0.1:" + std::to_string(r.port()) + "/.well-known/acme-challenge/";
  auto hit = transport->send(get(base + "tok-1"));
  REQUIRE_MESSAGE(hit.has_value(), hit.error().message);
  CHECK(hit->status == 200);
  CHECK(hit->body == "tok-1.thumb");
  auto miss = transport->send(get(base + "tok-2"));
  REQUIRE(miss.has_value());
  CHECK(miss->status == 404);
  r.remove("tok-1");
  auto gone = transport->send(get(base + "tok-1"));
  REQUIRE(gone.has_value());
  CHECK(gone->status == 404);
  CHECK(r.hits() == 1);
  CHECK(r.misses() == 2);
}

TEST_CASE("http-01 responder reports a port in use") {
  auto first = autotls::testing::Http01Responder::start(0);
  REQUIRE(first.has_value());
  auto second = autotls::testing::Http01Responder::start((*first)->port());
  REQUIRE_FALSE(second.has_value());
  CHECK(second.error().code == Errc::io);
}

TEST_CASE("tls-alpn-01 responder presents the certificate for the SNI name over acme-tls/1") {
  auto responder = autotls::testing::TlsAlpnResponder::start(0);
  REQUIRE_MESSAGE(responder.has_value(), responder.error().message);
  auto& r = **responder;
  auto cert = autotls::testing::make_test_leaf({"example.test"});
  REQUIRE_MESSAGE(cert.has_value(), cert.error().message);
  auto status = r.set("Example.Test", cert->cert_pem, cert->key_pem);
  REQUIRE_MESSAGE(status.has_value(), status.error().message);

  auto probe = tls_connect(r.port(), "example.test", "acme-tls/1");
  REQUIRE(probe.ok);
  CHECK(probe.alpn == "acme-tls/1");
  REQUIRE(probe.peer);
  auto expected = parse_pem(cert->cert_pem);
  CHECK(X509_cmp(probe.peer.get(), expected.get()) == 0);

  // No acme-tls/1, or a name without a certificate: the handshake is refused.
  CHECK_FALSE(tls_connect(r.port(), "example.test", "http/1.1").ok);
  CHECK_FALSE(tls_connect(r.port(), "unknown.test", "acme-tls/1").ok);
  r.remove("example.test");
  CHECK_FALSE(tls_connect(r.port(), "example.test", "acme-tls/1").ok);
  // The responder counts a failure after its SSL_accept returns, which can be after the client
  // already saw the alert: wait for the counter (bounded) instead of reading it at once.
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (r.failures() < 3 && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  CHECK(r.handshakes() == 1);
  CHECK(r.failures() == 3);

  auto other = autotls::testing::make_test_leaf({"other.test"});
  REQUIRE(other.has_value());
  auto mismatch = r.set("x.test", cert->cert_pem, other->key_pem);
  REQUIRE_FALSE(mismatch.has_value());
  CHECK(mismatch.error().code == Errc::crypto);
}

}  // TEST_SUITE
