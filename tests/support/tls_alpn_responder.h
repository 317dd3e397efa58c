#pragma once

// TlsAlpnResponder: the client side of a tls-alpn-01 challenge for tests (RFC 8737).

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "acme/util/error.h"

namespace autotls::testing {

// TlsAlpnResponder is a TLS server on 127.0.0.1:<port> that accepts only ALPN "acme-tls/1"
// (RFC 8737 §3) and presents the challenge certificate set for the SNI name. It completes the
// handshake and closes the connection. Connections are served one at a time, each bounded by a
// 5 s socket timeout. Certificates may be set from any thread. The destructor stops the accept
// loop (within ~100 ms) and joins its thread.
class TlsAlpnResponder {
 public:
  // start binds 127.0.0.1:port (0: any free port). Errc::io if the port cannot be bound.
  static Result<std::unique_ptr<TlsAlpnResponder>> start(int port);

  ~TlsAlpnResponder();
  TlsAlpnResponder(const TlsAlpnResponder&) = delete;
  TlsAlpnResponder& operator=(const TlsAlpnResponder&) = delete;

  int port() const { return port_; }
  // set presents cert_pem (first certificate used) with key_pem for SNI server_name (matched
  // case-insensitively). Errc::crypto when the PEM does not parse or the key does not match.
  Status set(const std::string& server_name, const std::string& cert_pem, const std::string& key_pem);
  void remove(const std::string& server_name);
  // handshakes counts completed acme-tls/1 handshakes; failures counts refused or failed ones
  // (no ALPN acme-tls/1, unknown SNI, broken client).
  size_t handshakes() const { return handshakes_.load(); }
  size_t failures() const { return failures_.load(); }

 private:
  struct Impl;
  TlsAlpnResponder();
  void run();

  std::unique_ptr<Impl> impl_;
  int port_ = 0;
  int listen_fd_ = -1;
  std::atomic<bool> stop_{false};
  std::atomic<size_t> handshakes_{0};
  std::atomic<size_t> failures_{0};
  std::thread thread_;
};

}  // namespace autotls::testing
