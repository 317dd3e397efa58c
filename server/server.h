#pragma once

// Server: the HTTPS (and plain HTTP) frontend. Certificates come from a tlsreload::CertStore
// on every handshake, so renewals take effect without restarting a listener; challenge
// material comes from a tlsreload::ChallengeStore (http-01 on the HTTP listener, tls-alpn-01
// on the HTTPS listener).

#include <openssl/types.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "acme/util/error.h"
#include "acme/util/logger.h"
#include "server/config.h"

namespace autotls::tlsreload {
class CertStore;
class ChallengeStore;
}  // namespace autotls::tlsreload

namespace autotls::server {

// Server owns its listening sockets, reactor threads (one per core by default) and a pool of
// worker threads.
//
// The reactors accept connections, run TLS handshakes and read request headers without
// blocking. A complete request whose handler cannot block (small static files, redirects,
// http-01) is answered by the reactor itself; anything else (reverse proxy, a body still to
// come, large files, admin endpoints) is given to a worker, which runs the handler and writes
// the response, then gives a keep-alive connection back to its reactor. A slow or silent
// client therefore never holds a thread: it holds one file descriptor until its handshake /
// header / idle / write deadline closes it.
//
// Thread-safety: create, start and shutdown are called from one controlling thread; the
// accessors may be called from any thread.
class Server {
 public:
  // Counters cover the client (https / http) listeners only, never the admin listener.
  struct Counters {
    std::uint64_t accepted = 0;
    std::uint64_t rejected_over_capacity = 0;  // closed at accept: max_connections reached, or
                                             // out of file descriptors (EMFILE/ENFILE)
    std::uint64_t handshakes = 0;           // TLS handshakes completed (tls-alpn-01 ones included)
    std::uint64_t handshake_failed = 0;
    std::uint64_t handshake_timeout = 0;
    std::uint64_t header_timeout = 0;       // request header not complete by its deadline
    std::uint64_t idle_closed = 0;          // keep-alive connection idle past timeouts.idle
    std::uint64_t read_timeout = 0;         // a request-body read waited past timeouts.read
    std::uint64_t write_timeout = 0;        // a response write waited past timeouts.write
    std::uint64_t sni_misses = 0;           // ClientHello SNI no certificate names (tlsreload::HookCounters)
    std::uint64_t no_sni = 0;               // ClientHello without SNI
    std::uint64_t header_too_large = 0;     // 431
    std::uint64_t bad_request_head = 0;     // 400, 501, 505 for the head (check_request_head)
    std::uint64_t requests = 0;             // requests answered (by a reactor or a worker)
    std::uint64_t forced_closed = 0;        // still open when the drain deadline passed
    std::uint64_t open_connections = 0;     // gauge
    std::uint64_t tunnels_open = 0;         // gauge: WebSockets passed through now
    std::uint64_t tunnels = 0;              // WebSockets passed through since start
    std::uint64_t upstream_failovers = 0;   // requests moved to another upstream after a failed connect
  };

  // create validates config and binds every listening socket (so "address already in use" is
  // reported here, as "https listener 0.0.0.0:443: address already in use", Errc::io), builds
  // the TLS context (TLS 1.2+, Mozilla "intermediate" ciphers, no renegotiation) and attaches
  // store and challenges to it. Nothing is served until start(). challenges may be null (no
  // http-01 / tls-alpn-01 answers). logger may be null (silent); it MUST outlive the Server.
  [[nodiscard]] static Result<std::unique_ptr<Server>> create(
      ServerConfig config, std::shared_ptr<tlsreload::CertStore> store,
      std::shared_ptr<tlsreload::ChallengeStore> challenges, Logger* logger);

  // The destructor calls shutdown(0ms) if the server is still running.
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // start launches the reactor and worker threads. Fails if called twice or after shutdown.
  [[nodiscard]] Status start();

  // https_port / http_port return the bound port of the first https / http listener (the
  // kernel's choice when the config said 0), or 0 when there is none; a reload may change it.
  int https_port() const;
  int http_port() const;
  // admin_port returns the bound port of the admin listener (ServerConfig::admin), or 0.
  int admin_port() const;

  // prepare_key makes key's copy in the OpenSSL library context of every reactor after the
  // first (ServerConfig::reactor_threads; docs/server.md): the copy the first handshake that
  // reactor signs with key would otherwise make, an export of ~25 us for a P-256 key (docs/
  // benchmarks.md, session 26), which the key keeps while it lives (~2.1 KiB each). For an
  // embedder that builds its certificates' objects before serving (Certificate::openssl()),
  // so that no handshake pays it; `autotls serve` builds them in handshakes and does not call
  // it. Returns the number of contexts that hold a copy now (0 with one reactor, or for a null
  // key). Thread-safe; not during a reload that adds the first https listener.
  std::size_t prepare_key(EVP_PKEY* key) const;

  // shutdown closes the listening sockets (new connections are refused), closes idle
  // connections, lets requests in flight finish and answer with "Connection: close" until
  // drain has passed, then shuts down the sockets still open, cuts the proxied requests still
  // waiting on their upstream (their clients see the connection close, without a response) and
  // joins every thread: it returns shortly after drain, not after an upstream's read_timeout
  // (an upstream connect in progress at that moment may still take its connect_timeout).
  // Idempotent.
  void shutdown(std::chrono::milliseconds drain);

  // ready reports whether the server is started and not shutting down (the admin /readyz also
  // asks AdminConfig::ready).
  bool ready() const;

  Counters counters() const;

  // reload applies a new configuration to a running server (SIGHUP in `autotls serve`). The
  // new config is validated first (as create does: listeners, timeouts, caps, site names,
  // static roots, upstream URLs, the access log file opens): on error nothing changes and the
  // error says why. Then:
  //  - listeners (https, http, admin): an endpoint still configured keeps its socket and its
  //    connections untouched; a new one is bound and served; one no longer configured is
  //    closed at once and its connections close after the request under way. Per kind, all or
  //    nothing: when a new endpoint cannot be bound (in use, permission) that kind keeps its
  //    old listeners, the error is logged and listed in ReloadReport::failed, and the rest of
  //    the reload still applies. backlog applies to every listener (listen(2) again).
  //  - timeouts, max_header_bytes, max_body_bytes, keep_alive_max_requests apply to
  //    connections accepted after reload returns (a connection keeps those it was accepted
  //    with); max_connections applies to the next accept.
  //  - worker_threads: the pool grows at once or shrinks as workers become idle.
  //  - sites, default_site, hsts_*, redirect_*, access_log: for every request whose header is
  //    parsed after reload returns (a request in flight finishes with the site it started
  //    with); an access_log.file is opened again (logrotate: rename, then reload).
  //  - tickets.rotate_every applies to the running key ring.
  // Not applied, named in ReloadReport::not_applied ("restart to apply"): reactor_threads,
  // alpn_protocols, tickets.enabled / tickets.lifetime (the TLS context is never changed
  // live). Call it from a controlling thread; it is serialized with shutdown() and refused
  // once shutdown began.
  struct ReloadReport {
    std::vector<std::string> not_applied;  // e.g. {"reactor_threads"}
    std::vector<std::string> failed;       // e.g. {"https listener 0.0.0.0:443: address already in use"}
  };
  [[nodiscard]] Result<ReloadReport> reload(ServerConfig config);

  // rotate_ticket_keys makes a new session-ticket key current now (as if its schedule had come
  // due); older keys still open tickets for SessionTickets::lifetime. For operators and tests.
  void rotate_ticket_keys();

 private:
  struct Impl;
  explicit Server(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace autotls::server
