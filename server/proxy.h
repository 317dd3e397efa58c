#pragma once

// Streaming reverse proxy with its own HTTP/1.1 upstream client (TLS to https:// upstreams,
// verified against the system CAs), run on the worker that
// handles the request: the request body is pulled from the client connection and written to
// the upstream as it arrives, the response body is read from the upstream by the response's
// content provider as the client takes it; upstream connections are kept alive in a small pool
// per upstream. No thread of its own, no hand-off: the upstream I/O is blocking with
// SO_RCVTIMEO / SO_SNDTIMEO (one system call per read or write that waits).
// Internal to server/ (used by server.cpp).

#include <httplib.h>
#include <openssl/ssl.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

#include "acme/util/logger.h"
#include "server/config.h"

namespace autotls::server::detail {

struct Exchange;  // one request to an upstream (proxy.cpp)

// UpstreamConn is one connection to an upstream: its socket and the bytes read from it that
// no response has used yet.
struct UpstreamConn {
  int fd = -1;
  SSL* ssl = nullptr;  // an https upstream: TLS over fd (freed, then fd closed, on close)
  std::unique_ptr<char[]> buf;  // 64 KiB once the first read needs it
  std::size_t pos = 0;           // buf[pos, end): received, not yet consumed
  std::size_t end = 0;
  // The socket timeouts set on fd (SO_RCVTIMEO / SO_SNDTIMEO), so a reused connection sets
  // them again only when a reload changed them.
  std::chrono::milliseconds read_timeout{-1};
  std::chrono::milliseconds write_timeout{-1};
  UpstreamConn() = default;
  UpstreamConn(const UpstreamConn&) = delete;
  UpstreamConn& operator=(const UpstreamConn&) = delete;
  ~UpstreamConn();
};

// UpstreamPool keeps idle keep-alive upstream connections per upstream URL (at most the site's
// max_idle each, none older than its idle_timeout). A connection goes back only after a
// response that was read to its end and did not ask to close (Connection: close in any case,
// HTTP/1.0, a body delimited by the close); a failed or cancelled exchange closes it. It knows
// every exchange in flight, so that abort_all can cut them at the end of a drain. Thread-safe.
class UpstreamPool {
 public:
  UpstreamPool() = default;
  ~UpstreamPool();
  UpstreamPool(const UpstreamPool&) = delete;
  UpstreamPool& operator=(const UpstreamPool&) = delete;

  // acquire returns an idle connection to upstream (one of site's) that the upstream has not
  // closed (nullptr when there is none); expired ones are closed.
  std::unique_ptr<UpstreamConn> acquire(const std::string& upstream, const ProxySite& site);
  void release(const std::string& upstream, const ProxySite& site,
               std::unique_ptr<UpstreamConn> conn);

  // Counts for /metrics: tunnels open now and since start, requests moved to another
  // upstream after a failed connect.
  std::uint64_t tunnels_open() const { return tunnels_open_.load(std::memory_order_relaxed); }
  std::uint64_t tunnels_total() const { return tunnels_total_.load(std::memory_order_relaxed); }
  std::uint64_t failovers() const { return failovers_.load(std::memory_order_relaxed); }
  void count_failover() { failovers_.fetch_add(1, std::memory_order_relaxed); }

  // order is the site's upstreams in the order a request tries them: round robin from a turn
  // shared by all sites, those left out after a failed connect (mark_failed) last.
  std::vector<const std::string*> order(const ProxySite& site);
  // mark_failed leaves upstream out until `until` (a connect to it failed).
  void mark_failed(const std::string& upstream, std::chrono::steady_clock::time_point until);
  std::size_t idle(const std::string& upstream) const;
  // retain closes the idle connections of every upstream not in keep (a reload changed or
  // removed the sites that used them); clear closes all of them (shutdown).
  void retain(const std::vector<std::string>& keep);
  void clear();

  // abort_all cuts every exchange in flight: its upstream socket is shut down (a connect,
  // read or write in progress ends at once), so the worker closes the client connection
  // without a complete response. Every later proxy() call fails at once, and no connection goes
  // back to the pool. Server::shutdown calls it when the drain deadline has passed. Idempotent.
  void abort_all();

  // end_tunnels ends every tunnel (a WebSocket passed through after a 101) at once, and
  // refuses every later one (503): Server::shutdown calls it as the drain begins, since a
  // tunnel may stay open for hours and a drain waits for open connections. Idempotent.
  void end_tunnels();

  // enter registers an exchange for abort_all (false: aborting, do not start it); leave is
  // called by the exchange's destructor; enter_tunnel marks a registered exchange as a tunnel
  // for end_tunnels (false: tunnels are ended, do not start it). Used by proxy() only.
  bool enter(Exchange* e);
  void leave(Exchange* e);
  bool enter_tunnel(Exchange* e);

  // tls_ctx is the client SSL_CTX for https upstreams, made on first use and shared by all of
  // them: TLS 1.2 or later, the peer verified against the system's CAs
  // (SSL_CTX_set_default_verify_paths: SSL_CERT_FILE / SSL_CERT_DIR as read at that time).
  // nullptr when it cannot be made.
  SSL_CTX* tls_ctx();

 private:
  struct Idle {
    std::unique_ptr<UpstreamConn> conn;
    std::chrono::steady_clock::time_point since;
  };
  mutable std::mutex mu_;
  std::map<std::string, std::vector<Idle>, std::less<>> idle_;  // oldest first
  bool aborting_ = false;
  bool tunnels_ended_ = false;
  std::map<std::string, std::chrono::steady_clock::time_point, std::less<>> failed_until_;
  std::size_t turn_ = 0;
  std::atomic<std::uint64_t> tunnels_open_{0}, tunnels_total_{0}, failovers_{0};
  std::unordered_set<Exchange*> active_;
  SSL_CTX* tls_ctx_ = nullptr;  // under mu_
};

// TunnelClient is the client's side of a tunnel: the connection the upgrade request came on,
// handed over by the server once the upstream has agreed to switch protocols.
struct TunnelClient {
  int fd = -1;          // non-blocking
  SSL* ssl = nullptr;   // TLS over fd; null on a plain HTTP listener
  std::string early;    // bytes the client sent after the request, already read by the server
};

// Tunnel is a WebSocket (whatever protocol the upstream switched to with its 101) passed
// through: the client's socket and the upstream's, both non-blocking, and the bytes on their
// way in each direction (first the 101 to the client, and whatever either side sent early).
// proxy() makes it and hands it to the server (UpgradeHooks::run), which runs every tunnel on
// one thread of its own: run() when a socket is ready, deadline() checked now and then, then
// finish() once. Not thread-safe: one thread at a time.
class Tunnel {
 public:
  enum class End {
    open,    // still running: wait for `wait`
    closed,  // both sides have ended and everything was delivered
    idle,    // nothing moved either way for the site's tunnel_idle_timeout
    failed,  // a side failed or was reset
    cut,     // end_tunnels or abort_all (shutdown)
  };
  struct State;  // proxy.cpp
  explicit Tunnel(std::unique_ptr<State> state);
  Tunnel(const Tunnel&) = delete;
  Tunnel& operator=(const Tunnel&) = delete;
  ~Tunnel();

  int upstream_fd() const;
  // run moves the bytes that can move without waiting, up to a share (kTunnelShare bytes) so
  // that one busy tunnel does not hold up the others. open: wait for either socket (or for
  // deadline()), or, with again set, run it again soon: it stopped on its share with more to
  // move. Anything else: the tunnel is over, call finish(). Without again, every socket it
  // stopped on has reported EAGAIN for what it waits for, so edge-triggered readiness is
  // enough.
  End run(bool& again);
  // deadline is when the tunnel ends as idle unless a byte moves before.
  std::chrono::steady_clock::time_point deadline() const;
  // finish logs the end ("tunnel closed": how, how long, bytes each way) and closes the
  // upstream connection. The client connection is the server's to close.
  void finish(End end);

 private:
  std::unique_ptr<State> s_;
};

// UpgradeHooks let proxy() pass a WebSocket upgrade through to the upstream (without them the
// Upgrade header is dropped, as every hop-by-hop header is).
struct UpgradeHooks {
  // take hands the client connection over: what the server still owes the client is written
  // first, and after it httplib neither reads nor writes the connection. False when that
  // write failed (the client is gone).
  std::function<bool(TunnelClient&)> take;
  // run takes the tunnel that take's connection went to: once the handler has returned, the
  // server runs it off the worker, and closes the client connection when it ends.
  std::function<void(std::unique_ptr<Tunnel>)> run;
};

// proxy forwards req to site and fills res. reader (may be null) streams the request body;
// without it req.body is sent. A body over max_body answers 413. Answers 502 when the upstream
// cannot be reached, fails before its response header or sends an ambiguous body length (both
// Content-Length and Transfer-Encoding, or differing Content-Lengths), 504 on a connect or
// response timeout;
// a failure after the header was forwarded aborts the client connection (the status line is
// already gone: the response's content provider fails, so httplib reports the write failed).
// Returns false when the client connection is out of step and MUST be closed after res is
// written ("Connection: close"): the request body was not read to its end (the upstream failed
// while it was being streamed, or the client's body broke off), or abort_all cut the exchange.
// After a 502/504 whose request body was fully consumed it returns true: keep-alive may stay.
// A GET/HEAD/OPTIONS/PUT/DELETE whose request body (if any) was not streamed, sent on a pooled
// connection that fails before any byte of the response, is sent once more on a new connection
// (the upstream closed an idle connection as we reused it), provided it failed quickly (under
// min(1 s, read_timeout / 2)) and not by a timeout; any other method or failure answers 502
// (504 for a timeout).
// client_read_timed_out (may be null) is the client connection's flag that a read of its
// request body waited past the server's read timeout (set by the connection stream). A
// request whose body stopped coming is the client's fault, not the upstream's: it answers 408
// and returns false (the rest of the body is not on the connection); the upstream, which got a
// request cut short, sees its connection closed.
// WebSocket (with upgrade non-null): a GET over HTTP/1.1 without a body, with "Connection:
// upgrade" and "Upgrade: websocket", is sent on with both headers. When the upstream answers
// 101, proxy() takes the client connection over (upgrade->take) and hands a Tunnel to
// upgrade->run, which writes the 101 with the upstream's header fields to the client and
// passes bytes both ways until one side has closed and the other has sent everything, nothing
// moved either way for the site's tunnel_idle_timeout, a side failed, or end_tunnels /
// abort_all. proxy() sets res.status to 101 (for the access log) and returns false at once:
// the worker is free, and the connection is never reused. Any
// other answer to an upgrade request is passed on as usual. Other Upgrade values (h2c, ...)
// are dropped: the request goes on as a plain one.
[[nodiscard]] bool proxy(const ProxySite& site, const httplib::Request& req,
           const httplib::ContentReader* reader, httplib::Response& res, bool tls,
           std::size_t max_body, UpstreamPool& pool, Logger& log,
           const std::atomic<bool>* client_read_timed_out = nullptr,
           const UpgradeHooks* upgrade = nullptr);

}  // namespace autotls::server::detail
