#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <csignal>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <set>
#include <thread>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "acme/util/openssl.h"
#include "tests/unit/tlsreload/test_ca.h"
#include "tlsreload/openssl_hook.h"
#include "tlsreload/store.h"

using namespace autotls;
using namespace autotls::tlsreload;
using autotls::testing::TestCa;
using autotls::testing::TestKeyType;

namespace {

void set_timeouts(int fd) {
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

// TlsServer is an OpenSSL server on 127.0.0.1 using attach(); it serves one connection at a
// time: handshake, write one byte, close.
class TlsServer {
 public:
  TlsServer(std::shared_ptr<CertStore> store, AttachOptions options = {}) {
    std::signal(SIGPIPE, SIG_IGN);
    ctx_.reset(SSL_CTX_new(TLS_server_method()));
    REQUIRE(ctx_);
    auto st = attach(ctx_.get(), std::move(store), std::move(options));
    REQUIRE_MESSAGE(st, st.error().message);
    CHECK_FALSE(attach(ctx_.get(), std::make_shared<CertStore>()));  // at most once
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    REQUIRE(fd_ >= 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    REQUIRE(listen(fd_, 64) == 0);
    socklen_t len = sizeof addr;
    getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] { run(); });
  }
  ~TlsServer() {
    stop_ = true;
    thread_.join();
    close(fd_);
  }
  std::uint16_t port() const { return port_; }
  SSL_CTX* ctx() const { return ctx_.get(); }
  int ok() const { return ok_.load(); }
  int failed() const { return failed_.load(); }

 private:
  void run() {
    while (!stop_) {
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, 50) <= 0) continue;
      int c = accept(fd_, nullptr, nullptr);
      if (c < 0) continue;
      set_timeouts(c);
      ossl::SslPtr ssl(SSL_new(ctx_.get()));
      SSL_set_fd(ssl.get(), c);
      if (SSL_accept(ssl.get()) == 1) {
        ++ok_;
        SSL_write(ssl.get(), "x", 1);
        SSL_shutdown(ssl.get());
      } else {
        ++failed_;
      }
      ERR_clear_error();
      ssl.reset();
      close(c);
    }
  }

  ossl::SslCtxPtr ctx_;
  int fd_ = -1;
  std::uint16_t port_ = 0;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<int> ok_{0}, failed_{0};
};

struct ClientOptions {
  ClientOptions(std::string s = "", bool verify = true) : sni(std::move(s)), verify_host(verify) {}
  std::string sni;                 // "" sends no SNI
  bool verify_host = true;         // check the served certificate against sni
  std::string alpn;                // one protocol to offer, "" for none
  std::string sigalgs;             // restrict signature algorithms, "" for OpenSSL's default
  std::string tls12_ciphers;       // non-empty: TLS 1.2 only, with these cipher suites
};

struct Handshake {
  bool ok = false;
  std::string error;
  ossl::X509Ptr peer;
  std::string alpn;
  int peer_key_id = 0;
};

Handshake handshake(std::uint16_t port, const TestCa& ca, const ClientOptions& o) {
  Handshake h;
  ossl::SslCtxPtr ctx(SSL_CTX_new(TLS_client_method()));
  X509_STORE_add_cert(SSL_CTX_get_cert_store(ctx.get()), ca.root().cert.get());
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
  if (!o.tls12_ciphers.empty()) {
    SSL_CTX_set_max_proto_version(ctx.get(), TLS1_2_VERSION);
    SSL_CTX_set_cipher_list(ctx.get(), o.tls12_ciphers.c_str());
  }
  if (!o.sigalgs.empty()) REQUIRE(SSL_CTX_set1_sigalgs_list(ctx.get(), o.sigalgs.c_str()) == 1);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  set_timeouts(fd);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(port);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    close(fd);
    h.error = "connect failed";
    return h;
  }
  ossl::SslPtr ssl(SSL_new(ctx.get()));
  SSL_set_fd(ssl.get(), fd);
  if (!o.sni.empty()) SSL_set_tlsext_host_name(ssl.get(), o.sni.c_str());
  if (!o.sni.empty() && o.verify_host) X509_VERIFY_PARAM_set1_host(SSL_get0_param(ssl.get()), o.sni.c_str(), 0);
  if (!o.verify_host) SSL_set_verify(ssl.get(), SSL_VERIFY_NONE, nullptr);
  if (!o.alpn.empty()) {
    std::string wire = std::string(1, static_cast<char>(o.alpn.size())) + o.alpn;
    SSL_set_alpn_protos(ssl.get(), reinterpret_cast<const unsigned char*>(wire.data()),
                        static_cast<unsigned>(wire.size()));
  }
  if (SSL_connect(ssl.get()) == 1) {
    char byte = 0;
    h.ok = SSL_read(ssl.get(), &byte, 1) == 1 && byte == 'x';
    if (!h.ok) h.error = "no byte after handshake: " + ossl::drain_errors();
    h.peer.reset(SSL_get1_peer_certificate(ssl.get()));
    if (h.peer) h.peer_key_id = EVP_PKEY_get_base_id(X509_get0_pubkey(h.peer.get()));
    const unsigned char* proto = nullptr;
    unsigned len = 0;
    SSL_get0_alpn_selected(ssl.get(), &proto, &len);
    h.alpn.assign(reinterpret_cast<const char*>(proto), len);
  } else {
    h.error = ossl::drain_errors();
  }
  ssl.reset();
  close(fd);
  return h;
}

std::string first_dns(X509* x) {
  ossl::GeneralNamesPtr names(static_cast<GENERAL_NAMES*>(
      X509_get_ext_d2i(x, NID_subject_alt_name, nullptr, nullptr)));
  if (!names || sk_GENERAL_NAME_num(names.get()) == 0) return {};
  const GENERAL_NAME* gn = sk_GENERAL_NAME_value(names.get(), 0);
  if (gn->type != GEN_DNS) return {};
  return std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(gn->d.dNSName)),
                     static_cast<std::size_t>(ASN1_STRING_length(gn->d.dNSName)));
}

std::shared_ptr<const Certificate> make(const TestCa& ca, std::vector<std::string> names,
                                        TestKeyType key = TestKeyType::ec256) {
  auto leaf = ca.issue(std::move(names), key);
  auto c = Certificate::from_pem(ca.chain_pem(leaf), leaf.key_pem);
  REQUIRE_MESSAGE(c, c.error().message);
  return *c;
}

}  // namespace

TEST_SUITE("tlsreload.handshake") {

TEST_CASE("handshake serves the certificate matching SNI with its chain") {
  TestCa ca("E2E");
  auto store = std::make_shared<CertStore>();
  REQUIRE(store->publish(make(ca, {"a.test"})));
  REQUIRE(store->publish(make(ca, {"*.wild.test"})));
  REQUIRE(store->set_default(make(ca, {"default.test"})));
  TlsServer server(store);

  // The client trusts only the root: verification proves the intermediate was sent too.
  for (const char* sni : {"a.test", "A.TEST", "x.wild.test"}) {
    CAPTURE(std::string(sni));
    auto h = handshake(server.port(), ca, {sni});
    REQUIRE_MESSAGE(h.ok, h.error);
  }
  auto a = handshake(server.port(), ca, {"a.test"});
  CHECK(first_dns(a.peer.get()) == "a.test");
  auto unknown = handshake(server.port(), ca, {"unknown.test", false});
  REQUIRE_MESSAGE(unknown.ok, unknown.error);
  CHECK(first_dns(unknown.peer.get()) == "default.test");
  auto no_sni = handshake(server.port(), ca, {"", false});
  REQUIRE_MESSAGE(no_sni.ok, no_sni.error);
  CHECK(first_dns(no_sni.peer.get()) == "default.test");
  auto deep = handshake(server.port(), ca, {"a.b.wild.test", false});
  REQUIRE(deep.ok);
  CHECK(first_dns(deep.peer.get()) == "default.test");
  CHECK(server.failed() == 0);
}

TEST_CASE("handshake picks RSA for clients without ECDSA") {
  TestCa ca("E2E");
  auto store = std::make_shared<CertStore>();
  REQUIRE(store->publish(make(ca, {"dual.test"})));
  REQUIRE(store->publish(make(ca, {"dual.test"}, TestKeyType::rsa2048)));
  TlsServer server(store);

  auto modern = handshake(server.port(), ca, {"dual.test"});
  REQUIRE_MESSAGE(modern.ok, modern.error);
  CHECK(modern.peer_key_id == EVP_PKEY_EC);

  ClientOptions rsa_sigalgs{"dual.test"};
  rsa_sigalgs.sigalgs = "rsa_pss_rsae_sha256:RSA+SHA256";
  auto h1 = handshake(server.port(), ca, rsa_sigalgs);
  REQUIRE_MESSAGE(h1.ok, h1.error);
  CHECK(h1.peer_key_id == EVP_PKEY_RSA);

  ClientOptions tls12_rsa_suites{"dual.test"};
  tls12_rsa_suites.tls12_ciphers = "ECDHE-RSA-AES128-GCM-SHA256";
  auto h2 = handshake(server.port(), ca, tls12_rsa_suites);
  REQUIRE_MESSAGE(h2.ok, h2.error);
  CHECK(h2.peer_key_id == EVP_PKEY_RSA);

  ClientOptions tls12_ecdsa_suites{"dual.test"};
  tls12_ecdsa_suites.tls12_ciphers = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256";
  auto h3 = handshake(server.port(), ca, tls12_ecdsa_suites);
  REQUIRE_MESSAGE(h3.ok, h3.error);
  CHECK(h3.peer_key_id == EVP_PKEY_EC);
}

TEST_CASE("handshake fails cleanly for an unknown name without default") {
  TestCa ca("E2E");
  auto store = std::make_shared<CertStore>();
  REQUIRE(store->publish(make(ca, {"a.test"})));
  TlsServer server(store);
  auto h = handshake(server.port(), ca, {"nope.test"});
  CHECK_FALSE(h.ok);
  CHECK_MESSAGE(h.error.find("unrecognized name") != std::string::npos, h.error);
  // The server keeps serving afterwards.
  CHECK(handshake(server.port(), ca, {"a.test"}).ok);
}

TEST_CASE("handshake answers acme-tls/1 with the challenge certificate") {
  TestCa ca("E2E");
  auto store = std::make_shared<CertStore>();
  REQUIRE(store->publish(make(ca, {"chal.test"})));
  auto challenge = make(ca, {"chal.test"});
  AttachOptions options;
  options.alpn_challenge = [challenge](std::string_view sni) {
    return sni == "chal.test" ? challenge : nullptr;
  };
  TlsServer server(store, options);

  ClientOptions acme{"chal.test"};
  acme.alpn = "acme-tls/1";
  auto h = handshake(server.port(), ca, acme);
  REQUIRE_MESSAGE(h.ok, h.error);
  CHECK(h.alpn == "acme-tls/1");
  CHECK(X509_cmp(h.peer.get(), challenge->openssl().leaf) == 0);

  ClientOptions web{"chal.test"};
  web.alpn = "http/1.1";
  auto w = handshake(server.port(), ca, web);
  REQUIRE_MESSAGE(w.ok, w.error);
  CHECK(w.alpn == "http/1.1");
  CHECK(X509_cmp(w.peer.get(), challenge->openssl().leaf) != 0);

  ClientOptions unknown{"other.test", false};
  unknown.alpn = "acme-tls/1";
  CHECK_FALSE(handshake(server.port(), ca, unknown).ok);
}

// attach sets the store's default ECDSA certificate (or its only certificate) on the SSL_CTX
// itself, so that handshakes for it need no per-connection certificate work; a certificate
// published since must still be served by the next handshake.
TEST_CASE("handshake with the context's own certificate serves a swapped certificate at once") {
  TestCa ca("Ctx");
  auto store = std::make_shared<CertStore>();
  auto first = make(ca, {"one.test"});
  auto second = make(ca, {"one.test"});
  REQUIRE(store->publish(first));
  REQUIRE(store->set_default(first));
  TlsServer server(store);
  REQUIRE(SSL_CTX_get0_certificate(server.ctx()) != nullptr);
  CHECK(X509_cmp(SSL_CTX_get0_certificate(server.ctx()), first->openssl().leaf) == 0);

  auto h1 = handshake(server.port(), ca, {"one.test"});
  REQUIRE_MESSAGE(h1.ok, h1.error);
  CHECK(X509_cmp(h1.peer.get(), first->openssl().leaf) == 0);
  REQUIRE(store->publish(second));
  auto h2 = handshake(server.port(), ca, {"one.test"});
  REQUIRE_MESSAGE(h2.ok, h2.error);
  CHECK(X509_cmp(h2.peer.get(), second->openssl().leaf) == 0);
  // The default (still the first) for another name, then the first again for its own name.
  auto other = handshake(server.port(), ca, {"other.test", false});
  REQUIRE_MESSAGE(other.ok, other.error);
  CHECK(X509_cmp(other.peer.get(), first->openssl().leaf) == 0);
  REQUIRE(store->publish(first));
  auto h3 = handshake(server.port(), ca, {"one.test"});
  REQUIRE_MESSAGE(h3.ok, h3.error);
  CHECK(X509_cmp(h3.peer.get(), first->openssl().leaf) == 0);
  CHECK(server.failed() == 0);
}

// OpenSSL keeps one certificate per key type on an SSL: the context's ECDSA certificate must not
// stay next to an RSA one the callback sets, or a client that accepts both would get the
// context's certificate (another name) instead. Here the context's certificate is the store's
// only one at attach (no default), and the RSA-only name is published after.
TEST_CASE("handshake with the context's own ECDSA certificate serves an RSA-only name its RSA certificate") {
  TestCa ca("Ctx");
  auto store = std::make_shared<CertStore>();
  auto only = make(ca, {"one.test"});
  REQUIRE(store->publish(only));
  TlsServer server(store);
  REQUIRE(SSL_CTX_get0_certificate(server.ctx()) != nullptr);
  CHECK(X509_cmp(SSL_CTX_get0_certificate(server.ctx()), only->openssl().leaf) == 0);
  auto rsa = make(ca, {"rsaonly.test"}, TestKeyType::rsa2048);
  REQUIRE(store->publish(rsa));

  auto h = handshake(server.port(), ca, {"rsaonly.test"});  // offers ECDSA and RSA, checks the name
  REQUIRE_MESSAGE(h.ok, h.error);
  CHECK(h.peer_key_id == EVP_PKEY_RSA);
  CHECK(X509_cmp(h.peer.get(), rsa->openssl().leaf) == 0);
  ClientOptions tls12{"rsaonly.test"};
  tls12.tls12_ciphers = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256";
  auto h12 = handshake(server.port(), ca, tls12);
  REQUIRE_MESSAGE(h12.ok, h12.error);
  CHECK(X509_cmp(h12.peer.get(), rsa->openssl().leaf) == 0);
  auto o = handshake(server.port(), ca, {"one.test"});
  REQUIRE_MESSAGE(o.ok, o.error);
  CHECK(X509_cmp(o.peer.get(), only->openssl().leaf) == 0);
  CHECK(server.failed() == 0);
}

// Publishes 1,000 times while a client handshakes in a loop: zero failed handshakes, and each
// one sees one of the published certificates.
TEST_CASE("handshake survives a swap loop without failures") {
  TestCa ca("Swap");
  auto store = std::make_shared<CertStore>();
  std::vector<std::shared_ptr<const Certificate>> pool;
  for (int i = 0; i < 4; ++i) pool.push_back(make(ca, {"swap.test"}));
  REQUIRE(store->publish(pool[0]));
  TlsServer server(store);

  std::atomic<bool> done{false};
  std::set<std::string> seen;
  int handshakes = 0, failures = 0, foreign = 0;
  std::thread client([&] {
    while (!done.load() || handshakes < 20) {
      auto h = handshake(server.port(), ca, {"swap.test"});
      ++handshakes;
      if (!h.ok) {
        ++failures;
        continue;
      }
      bool known = false;
      for (const auto& c : pool) {
        if (X509_cmp(h.peer.get(), c->openssl().leaf) == 0) {
          known = true;
          seen.insert(c->id());
        }
      }
      if (!known) ++foreign;
    }
  });
  for (int i = 1; i <= 1000; ++i) {
    REQUIRE(store->publish(pool[static_cast<std::size_t>(i) % pool.size()]));
    std::this_thread::sleep_for(std::chrono::microseconds(300));
  }
  done = true;
  client.join();
  MESSAGE("handshakes: " << handshakes << ", distinct certificates seen: " << seen.size());
  CHECK(failures == 0);
  CHECK(foreign == 0);
  CHECK(server.failed() == 0);
  CHECK(seen.size() >= 2);
  CHECK(store->counters().publish_ok == 1001);
}

}  // TEST_SUITE
