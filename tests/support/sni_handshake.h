#pragma once

// TLS client handshakes with a chosen SNI against a server on 127.0.0.1, one at a time or
// many from several threads, and random_sni_names: distinct names nobody allowed. Used by the
// on-demand tests (server against the fake CA, cli against Pebble). Test-only code.

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
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

namespace autotls::testing {

struct HandshakeResult {
  bool ok = false;
  bool verified = false;
  std::string error;  // OpenSSL's reason when it failed
  std::chrono::milliseconds took{0};
};

// tls_handshake connects to 127.0.0.1:port and runs one TLS handshake sending sni (and checking
// the certificate names it) with ctx; a 15 s receive timeout bounds it.
inline HandshakeResult tls_handshake(int port, const std::string& sni, SSL_CTX* ctx) {
  HandshakeResult r;
  auto t0 = std::chrono::steady_clock::now();
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval tv{15, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    r.error = "connect failed";
    return r;
  }
  ossl::SslPtr ssl(SSL_new(ctx));
  SSL_set_fd(ssl.get(), fd);
  SSL_set_tlsext_host_name(ssl.get(), sni.c_str());
  SSL_set1_host(ssl.get(), sni.c_str());
  ERR_clear_error();
  r.ok = SSL_connect(ssl.get()) == 1;
  if (r.ok) {
    r.verified = SSL_get_verify_result(ssl.get()) == X509_V_OK;
    SSL_shutdown(ssl.get());
  } else {
    unsigned long e = ERR_peek_last_error();
    r.error = e ? ERR_reason_error_string(e) ? ERR_reason_error_string(e) : "unknown" : "closed";
  }
  ERR_clear_error();
  ::close(fd);
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
