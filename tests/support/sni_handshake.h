#pragma once

// TLS client connections to a server on 127.0.0.1 with a chosen SNI: one handshake and request
// at a time (tls_get: fresh or given client context, optional session to resume), handshakes
// from several threads, and random_sni_names: distinct names nobody allowed. Used by the
// server, on-demand and cli tests. Test-only code.

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "acme/util/openssl.h"
#include "tests/support/net.h"

namespace autotls::testing {

// TlsGet is what one client connection of tls_get saw.
struct TlsGet {
  bool connected = false;  // the TCP connection was made
  bool ok = false;         // the TLS handshake completed
  bool verified = false;   // ... and the server's certificate verified for the SNI name
  bool reused = false;     // ... and resumed the session offered
  std::string cipher;       // the suite the handshake settled on (OpenSSL's name)
  std::string status_line;  // the answer's first line, without its CRLF ("" when none came)
  std::string error;        // OpenSSL's reason when the handshake failed
  SSL_SESSION* session = nullptr;  // with keep_session: the session it ended with (its tickets
                                   // read); the caller frees it (SSL_SESSION_free)
};

struct TlsGetOptions {
  SSL_SESSION* offer = nullptr;  // a session (ticket) to offer for resumption
  bool request = true;  // send "GET /" with Connection: close and read the answer to its end
  bool keep_session = false;
};

// tls_get connects to 127.0.0.1:port and runs one TLS handshake with ctx (nullptr: a fresh
// client context that verifies nothing), sending sni unless it is empty and checking the
// certificate's names against it; then, unless told not to, one GET. It ends with a clean
// shutdown: without one OpenSSL marks the session not resumable. A 15 s I/O timeout
// (connect_to) bounds every wait, so it may run on a test's client threads (it never REQUIREs).
inline TlsGet tls_get(int port, const std::string& sni, SSL_CTX* ctx = nullptr,
                      const TlsGetOptions& opt = {}) {
  TlsGet r;
  ossl::SslCtxPtr fresh;
  if (!ctx) {
    fresh.reset(SSL_CTX_new(TLS_client_method()));
    SSL_CTX_set_verify(fresh.get(), SSL_VERIFY_NONE, nullptr);
    ctx = fresh.get();
  }
  int fd = connect_to(port, std::chrono::seconds(15));
  if (fd < 0) {
    r.error = "connect failed";
    return r;
  }
  r.connected = true;
  ossl::SslPtr ssl(SSL_new(ctx));
  SSL_set_fd(ssl.get(), fd);
  if (!sni.empty()) {
    SSL_set_tlsext_host_name(ssl.get(), sni.c_str());
    SSL_set1_host(ssl.get(), sni.c_str());
  }
  if (opt.offer) SSL_set_session(ssl.get(), opt.offer);
  ERR_clear_error();
  r.ok = SSL_connect(ssl.get()) == 1;
  if (r.ok) {
    r.verified = SSL_get_verify_result(ssl.get()) == X509_V_OK;
    r.reused = SSL_session_reused(ssl.get()) == 1;
    r.cipher = SSL_get_cipher_name(ssl.get());
    if (opt.request) {
      // A TLS 1.3 server sends its tickets after the handshake: reading the answer reads them.
      std::string req = "GET / HTTP/1.1\r\nHost: " + sni + "\r\nConnection: close\r\n\r\n";
      std::string answer;
      char buf[4096];
      if (SSL_write(ssl.get(), req.data(), static_cast<int>(req.size())) > 0) {
        for (int n; (n = SSL_read(ssl.get(), buf, sizeof buf)) > 0;) answer.append(buf, static_cast<size_t>(n));
      }
      r.status_line = answer.substr(0, answer.find("\r\n"));
    }
    if (opt.keep_session) r.session = SSL_get1_session(ssl.get());
    SSL_shutdown(ssl.get());
  } else {
    unsigned long e = ERR_peek_last_error();
    r.error = e ? ERR_reason_error_string(e) ? ERR_reason_error_string(e) : "unknown" : "closed";
  }
  ERR_clear_error();
  ssl.reset();
  ::close(fd);
  return r;
}

struct HandshakeResult {
  bool ok = false;
  bool verified = false;
  std::string error;  // OpenSSL's reason when it failed
  std::chrono::milliseconds took{0};
};

// tls_handshake runs tls_get's handshake alone (no request) with ctx, and times it.
inline HandshakeResult tls_handshake(int port, const std::string& sni, SSL_CTX* ctx) {
  auto t0 = std::chrono::steady_clock::now();
  TlsGet g = tls_get(port, sni, ctx, {.request = false});
  HandshakeResult r{g.ok, g.verified, g.error, {}};
  r.took = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0);
  return r;
}

// tls_handshakes runs one handshake per name from `threads` client threads; returns how many
// succeeded.
inline int tls_handshakes(int port, const std::vector<std::string>& names, int threads, SSL_CTX* ctx) {
  std::atomic<size_t> next{0};
  std::atomic<int> ok{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([&] {
      for (size_t i; (i = next++) < names.size();) {
        if (tls_handshake(port, names[i], ctx).ok) ++ok;
      }
    });
  }
  for (auto& t : ts) t.join();
  return ok;
}

// random_sni_names makes n distinct SNI values nobody allowed: mostly plausible DNS names
// (under example.org and other.ondemand.test), some junk (IP literals, bad characters, path
// tricks, overlong labels). The same seed gives the same names on every run.
inline std::vector<std::string> random_sni_names(int n) {
  std::mt19937 rng(12345);
  std::uniform_int_distribution<int> len(3, 20), letter(0, 25), kind(0, 9);
  std::vector<std::string> out;
  for (int i = 0; i < n; ++i) {
    std::string label;
    for (int k = len(rng); k > 0; --k) label += static_cast<char>('a' + letter(rng));
    label += std::to_string(i);
    switch (kind(rng)) {
      case 0: out.push_back("10." + std::to_string(i % 256) + ".0.1"); break;
      case 1: out.push_back(label + "/../etc.example.org"); break;
      case 2: out.push_back(label + "_x.example.org"); break;
      case 3: out.push_back(std::string(64, 'a') + label + ".example.org"); break;
      default: out.push_back(label + (i % 2 ? ".example.org" : ".other.ondemand.test")); break;
    }
  }
  return out;
}

}  // namespace autotls::testing
