#include "server/server.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <linux/openat2.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <fstream>
#include <mutex>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <httplib.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>

#include "acme/types.h"
#include "acme/util/openssl.h"
#include "server/detail/access_log.h"
#include "server/detail/http_util.h"
#include "server/detail/lib_contexts.h"
#include "server/detail/snapshot_cell.h"
#include "server/detail/tickets.h"
#include "server/proxy.h"
#include "tlsreload/challenges.h"
#include "tlsreload/openssl_hook.h"
#include "tlsreload/store.h"

namespace autotls::server {
namespace {

using SteadyClock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr std::string_view kLog = "server";

// kMaxAdminConnections caps admin connections apart from max_connections, so a flood of client
// connections never locks the operator out and a busy scraper never takes client slots.
constexpr std::size_t kMaxAdminConnections = 64;

// Mozilla "intermediate" suites (https://ssl-config.mozilla.org/, guideline 5.7), in its order:
// AES-128-GCM first. The server's order decides (see configure_tls).
constexpr const char* kIntermediateCiphersuites =
    "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";
constexpr const char* kIntermediateCiphers =
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305";

std::string errno_text(int err) {
  std::string s = std::strerror(err);
  if (!s.empty()) s[0] = static_cast<char>(std::tolower(static_cast<unsigned char>(s[0])));
  return s;
}

int poll_ms(milliseconds d) {
  return static_cast<int>(std::clamp<long long>(d.count(), 0, 24LL * 3600 * 1000));
}

void addr_to_text(const sockaddr_storage& ss, std::string& ip, int& port) {
  char buf[INET6_ADDRSTRLEN] = {};
  if (ss.ss_family == AF_INET) {
    const auto* a = reinterpret_cast<const sockaddr_in*>(&ss);
    ::inet_ntop(AF_INET, &a->sin_addr, buf, sizeof buf);
    port = ntohs(a->sin_port);
  } else if (ss.ss_family == AF_INET6) {
    const auto* a = reinterpret_cast<const sockaddr_in6*>(&ss);
    ::inet_ntop(AF_INET6, &a->sin6_addr, buf, sizeof buf);
    port = ntohs(a->sin6_port);
  }
  ip = buf;
}

// t_request_start is when the current request's header was parsed on this worker thread (set
// by the pre-routing handler, read by the logger after the response is written).
thread_local SteadyClock::time_point t_request_start{};

// t_close_after is set by a handler that left the connection out of step (a request body not
// read to its end, a proxy exchange cut at the drain deadline): the response says
// "Connection: close" and the connection closes once it is written. Reset before each request.
thread_local bool t_close_after = false;

// t_no_hsts is set by a handler whose site removes Strict-Transport-Security (its headers name
// the field without a value): the server-wide HSTS field is not added. Reset before each
// request, with t_close_after.
thread_local bool t_no_hsts = false;

// Pollable is what an epoll event points at: a listener, the wake-up eventfd, or a connection.
struct Pollable {
  enum class Kind { listener, wake, connection } kind;
  explicit Pollable(Kind k) : kind(k) {}
};

struct Listener : Pollable {
  Listener() : Pollable(Kind::listener) {}
  // Read by every reactor, closed by the first that sees the drain (under Impl::listen_mu).
  std::atomic<int> fd{-1};
  bool tls = false;
  bool admin = false;  // plain HTTP admin endpoint (AdminConfig)
  std::string name;  // "https listener 127.0.0.1:443"
  int port = 0;
  std::string address;    // numeric, as configured
  bool wildcard = false;  // 0.0.0.0 or ::: the local address must be asked per connection
  Endpoint configured;    // as the config said (port 0 kept): what a reload compares
  // retired: a reload removed this listener. Its socket is closed at once; its connections
  // finish the request under way and close. The object lives until the Server goes (its
  // connections point at it).
  std::atomic<bool> retired{false};
};

struct Limits;

struct Reactor;

// Connection is owned by exactly one thread at a time: its home reactor (phases handshake,
// header, writing) or a worker (phase busy). Only the open-connection table is shared.
struct Connection : Pollable {
  Connection() : Pollable(Kind::connection) {}
  enum class Phase { handshake, header, writing, busy };
  int fd = -1;
  const Listener* listener = nullptr;
  Reactor* home = nullptr;  // the reactor whose epoll set watches it; never changes
  // The timeouts, caps and routers in force when it was accepted (a reload changes them for
  // connections accepted afterwards only).
  std::shared_ptr<Limits> lim;
  ossl::SslPtr ssl;
  Phase phase = Phase::header;
  std::string buf;  // received, not yet consumed bytes are buf[pos..]
  std::size_t pos = 0;
  SteadyClock::time_point deadline;
  bool header_started = false;  // a byte of the current request has arrived
  bool keep_alive_wait = false; // waiting for the next request on a kept-alive connection
  uint32_t events = 0;          // current epoll interest
  bool registered = false;      // in epoll
  bool closed = false;
  // hello_retry: the client-hello callback asked to be run again (on-demand issuance); the
  // connection is out of epoll and retry_hellos() re-drives it at retry_at.
  bool hello_retry = false;
  SteadyClock::time_point retry_at;
  std::size_t requests = 0;
  // A response a reactor serves is built in `out` and written without blocking (phase
  // writing), then the connection closes when close_after_write, else waits for the next request.
  std::string out;
  std::size_t out_pos = 0;
  bool close_after_write = false;
  bool prefer_worker = false;  // its last request needed a worker: send the next one there
  // read_timed_out: a worker's read of this request's body waited past timeouts.read. Set by
  // ConnStream::read, which may run on a proxy exchange thread while the worker waits in the
  // handler (hence atomic); read by the proxy (408, not an upstream failure) and the
  // post-routing handler. Reset before each request a worker serves.
  std::atomic<bool> read_timed_out{false};
  std::string remote_ip, local_ip;
  int remote_port = 0, local_port = 0;

  std::string_view unread() const { return std::string_view(buf).substr(pos); }
  void compact() {
    if (pos > 0) {
      buf.erase(0, pos);
      pos = 0;
    }
  }
};

// ConnStream is the httplib::Stream a worker hands to httplib's request parser: bytes the
// reactor already read come first, then the socket (TLS or not) with read/write timeouts.
//
// Writes are collected in c.out so that a response's header and a small body leave as one TLS
// record and one write(2). On a worker (blocking mode) out is flushed, waiting up to
// write_timeout per wait, once it reaches kFlushBytes and by flush() after each response. On a
// reactor (inline mode) nothing ever blocks: reads come only from bytes already received (the
// reactor checked the whole request is there) and the whole response stays in out for the
// reactor to write when the socket takes it.
class ConnStream final : public httplib::Stream {
 public:
  static constexpr std::size_t kFlushBytes = 16 * 1024;

  // Timeouts hit are counted in *timeouts_hit when given (client connections; not the admin
  // listener's).
  struct TimeoutCounters {  // value-initialize ({}): both null
    std::atomic<std::uint64_t>* read;
    std::atomic<std::uint64_t>* write;
  };

  ConnStream(Connection& c, milliseconds read_timeout, milliseconds write_timeout,
             bool inline_mode = false, TimeoutCounters counters = {})
      : c_(c), read_timeout_(read_timeout), write_timeout_(write_timeout),
        inline_(inline_mode), counters_(counters) {}

  bool is_readable() const override {
    if (hijacked_) return false;
    if (!c_.unread().empty()) return true;
    // SSL_has_pending, not SSL_pending: with read-ahead a whole record may sit unprocessed.
    if (c_.ssl && SSL_has_pending(c_.ssl.get())) return true;
    if (inline_) return false;
    return wait(POLLIN, read_timeout_);
  }
  bool is_writable() const override {
    if (write_failed_ || hijacked_) return false;
    if (inline_ || c_.out.size() < kFlushBytes) return true;
    if (wait(POLLOUT, write_timeout_, counters_.write)) return true;
    write_failed_ = true;
    return false;
  }

  ssize_t read(char* ptr, size_t size) override {
    if (hijacked_) return -1;
    if (size == 0) return 0;
    if (auto u = c_.unread(); !u.empty()) {
      size_t n = std::min(size, u.size());
      std::memcpy(ptr, u.data(), n);
      c_.pos += n;
      // Inline mode keeps consumed bytes: a request sent on to a worker is parsed again.
      if (c_.pos == c_.buf.size() && !inline_) {
        c_.buf.clear();
        c_.pos = 0;
      }
      return static_cast<ssize_t>(n);
    }
    if (inline_) return -1;  // never happens: the reactor buffered the whole request
    // Whatever we owe the client goes out before we wait for more from it.
    if (!flush()) return -1;
    auto deadline = SteadyClock::now() + read_timeout_;
    for (;;) {
      short want = POLLIN;
      if (c_.ssl) {
        ERR_clear_error();
        int n = SSL_read(c_.ssl.get(), ptr, static_cast<int>(std::min<size_t>(size, 1 << 30)));
        if (n > 0) return n;
        int err = SSL_get_error(c_.ssl.get(), n);
        if (err == SSL_ERROR_WANT_WRITE) {
          want = POLLOUT;
        } else if (err != SSL_ERROR_WANT_READ) {
          ERR_clear_error();
          return -1;
        }
      } else {
        ssize_t n = ::recv(c_.fd, ptr, size, 0);
        if (n >= 0) return n;
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
      }
      switch (wait_until(want, deadline, counters_.read)) {
        case Waited::ready:
          break;
        case Waited::timeout:
          c_.read_timed_out.store(true, std::memory_order_release);
          return -1;
        case Waited::error:
          return -1;
      }
    }
  }

  ssize_t write(const char* ptr, size_t size) override {
    if (hijacked_) return -1;
    if (size == 0) return 0;
    c_.out.append(ptr, size);
    if (!inline_ && c_.out.size() >= kFlushBytes && !flush()) return -1;
    return static_cast<ssize_t>(size);
  }

  // flush writes out in full (blocking mode), each wait bounded by write_timeout. After one
  // write failed (timed out or refused) every later one fails at once: the connection is
  // closing, and a second wait would hold the worker and count a second timeout.
  bool flush() {
    if (hijacked_) return false;
    while (c_.out_pos < c_.out.size()) {
      if (write_failed_) return false;
      ssize_t n = write_socket(c_.out.data() + c_.out_pos, c_.out.size() - c_.out_pos);
      if (n <= 0) {
        write_failed_ = true;
        return false;
      }
      c_.out_pos += static_cast<size_t>(n);
    }
    c_.out.clear();
    c_.out_pos = 0;
    return true;
  }

  ssize_t write_socket(const char* ptr, size_t size) {
    auto deadline = SteadyClock::now() + write_timeout_;
    for (;;) {
      short want = POLLOUT;
      if (c_.ssl) {
        ERR_clear_error();
        int n = SSL_write(c_.ssl.get(), ptr, static_cast<int>(std::min<size_t>(size, 1 << 30)));
        if (n > 0) return n;
        int err = SSL_get_error(c_.ssl.get(), n);
        if (err == SSL_ERROR_WANT_READ) {
          want = POLLIN;
        } else if (err != SSL_ERROR_WANT_WRITE) {
          ERR_clear_error();
          return -1;
        }
      } else {
        ssize_t n = ::send(c_.fd, ptr, size, MSG_NOSIGNAL);
        if (n >= 0) return n;
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
      }
      if (wait_until(want, deadline, counters_.write) != Waited::ready) return -1;
    }
  }

  void get_remote_ip_and_port(std::string& ip, int& port) const override {
    ip = c_.remote_ip;
    port = c_.remote_port;
  }
  void get_local_ip_and_port(std::string& ip, int& port) const override {
    ip = c_.local_ip;
    port = c_.local_port;
  }
  socket_t socket() const override { return c_.fd; }

  // hijack hands the connection over to a tunnel (a WebSocket after a 101): what is owed to
  // the client is written, then every later read, write and flush of this stream fails, so
  // httplib writes nothing more and the worker closes the connection after the handler.
  // The bytes received past the request move to early. False when the flush failed.
  bool hijack(std::string& early) {
    if (inline_ || !flush()) return false;
    early.assign(c_.unread());
    c_.buf.clear();
    c_.pos = 0;
    hijacked_ = true;
    return true;
  }

 private:
  // wait_until waits for events until deadline: ready, timeout (the deadline passed; counted
  // in *timed_out, if given) or error (poll failed, or woke without the events: closed).
  enum class Waited { ready, timeout, error };
  bool wait(short events, milliseconds timeout,
            std::atomic<std::uint64_t>* timed_out = nullptr) const {
    return wait_until(events, SteadyClock::now() + timeout, timed_out) == Waited::ready;
  }
  Waited wait_until(short events, SteadyClock::time_point deadline,
                    std::atomic<std::uint64_t>* timed_out = nullptr) const {
    for (;;) {
      auto left = std::chrono::duration_cast<milliseconds>(deadline - SteadyClock::now());
      if (left.count() < 0) break;
      pollfd p{c_.fd, events, 0};
      int r = ::poll(&p, 1, poll_ms(left) + 1);
      if (r > 0) {
        return (p.revents & (events | POLLHUP | POLLERR)) != 0 ? Waited::ready : Waited::error;
      }
      if (r == 0) break;
      if (errno != EINTR) return Waited::error;
    }
    if (timed_out) timed_out->fetch_add(1, std::memory_order_relaxed);
    return Waited::timeout;
  }

  Connection& c_;
  milliseconds read_timeout_, write_timeout_;
  bool inline_;
  TimeoutCounters counters_;
  mutable bool write_failed_ = false;  // a write or a wait for one failed: the rest fail at once
  bool hijacked_ = false;              // a tunnel took the connection over (hijack)
};

// Reactor is one event loop thread: its own epoll set (the shared listeners are in every set
// with EPOLLEXCLUSIVE, so a new connection wakes one reactor), the connections it accepted,
// and the queue on which workers give connections back to it.
struct Reactor {
  std::size_t index = 0;  // its place in Impl::reactors
  int epoll_fd = -1;
  int wake_fd = -1;
  Pollable wake_tag{Pollable::Kind::wake};
  std::thread thread;
  // Reactor-thread-only state.
  std::unordered_map<Connection*, std::unique_ptr<Connection>> owned;
  std::vector<std::unique_ptr<Connection>> graveyard;  // freed after each epoll batch
  bool accept_paused = false;
  SteadyClock::time_point accept_resume;
  bool drain_seen = false;
  SteadyClock::time_point next_expire_scan;
  // Handshakes parked by wait_hello (may hold connections closed since: checked in owned).
  std::vector<Connection*> parked_hellos;
  // The limits given to new connections, refreshed when Impl::limits_version moves.
  std::shared_ptr<Limits> lim;
  std::uint64_t lim_version = 0;
  std::uint64_t retired_seen = 0;  // Impl::retired_version last swept
  // Filled by workers.
  std::mutex back_mu;
  std::vector<std::unique_ptr<Connection>> back;

  Reactor() = default;
  Reactor(const Reactor&) = delete;
  Reactor& operator=(const Reactor&) = delete;
  ~Reactor() {
    if (epoll_fd >= 0) ::close(epoll_fd);
    if (wake_fd >= 0) ::close(wake_fd);
  }
  void wake() {
    uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake_fd, &one, sizeof one);
  }
};

// InlineRequest is set (thread-local) while a reactor runs a handler itself. A handler that
// would block (proxy, a large file) sets defer instead of answering; the reactor then discards
// the response and hands the request, still buffered, to a worker.
struct InlineRequest {
  bool defer = false;
};
thread_local InlineRequest* tl_inline = nullptr;

// tl_conn is the connection whose request this thread (reactor or worker) is running, so the
// post-routing handler can see that its listener was retired by a reload meanwhile.
thread_local const Connection* tl_conn = nullptr;
// tl_stream is the stream of that connection on a worker (null on a reactor): a tunnel takes
// the connection over through it.
thread_local ConnStream* tl_stream = nullptr;
// t_tunnel is the tunnel UpgradeHooks::run gave this worker during the current request: once
// the handler has returned, serve() hands it and the connection to the tunnel thread.
thread_local std::unique_ptr<detail::Tunnel> t_tunnel;

// TunnelEntry is one tunnel on the tunnel thread: the client connection a worker handed over
// and the tunnel that runs on it. Both its sockets are in the tunnel thread's epoll set
// (edge-triggered), with the entry as their data.
struct TunnelEntry {
  std::unique_ptr<Connection> conn;
  std::unique_ptr<detail::Tunnel> tunnel;
  bool queued = false;  // in the list of entries to run in this round
};

// Static files up to this size are read whole and served by a reactor; larger ones stream on
// a worker.
constexpr std::uintmax_t kInlineFileBytes = 64 * 1024;

// body_left_unread: httplib 0.11.4 reads a request body only for POST, PUT, PATCH, DELETE
// (and PRI). For any other method (GET, HEAD, OPTIONS, ...) a body announced by Content-Length
// or Transfer-Encoding stays on the connection, where it would be parsed as the next request
// ("GET / ... Content-Length: N" carrying a second request: one request to a proxy in front
// of us, two to us). Such a request is answered and the connection closed after it (set by
// the pre-routing handlers through t_close_after), so its body is never parsed.
bool body_left_unread(const httplib::Request& req) {
  const std::string& m = req.method;
  if (m == "POST" || m == "PUT" || m == "PATCH" || m == "DELETE" || m == "PRI") return false;
  if (req.has_header("Transfer-Encoding")) return true;
  return req.has_header("Content-Length") && req.get_header_value("Content-Length") != "0";
}

// new_boundary is a multipart boundary no file is likely to hold: "autotls-" and 24 random
// hex digits.
std::string new_boundary() {
  unsigned char raw[12];
  if (RAND_bytes(raw, sizeof raw) != 1) {
    ERR_clear_error();
    auto t = static_cast<std::uint64_t>(SteadyClock::now().time_since_epoch().count());
    std::memcpy(raw, &t, sizeof t);
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string b = "autotls-";
  for (unsigned char c : raw) {
    b.push_back(kHex[c >> 4]);
    b.push_back(kHex[c & 15]);
  }
  return b;
}

// Router is httplib's request parser, router and response writer without its listener: our
// reactor feeds it one complete request at a time through process_request (protected).
class Router final : public httplib::Server {
 public:
  // httplib streams a content provider (our static files) only while svr_sock_ is valid: it
  // reads INVALID_SOCKET as "shutting down". We never listen through httplib, so park a
  // harmless descriptor there and take it back before ~Server() could look at it.
  Router() { svr_sock_ = ::open("/dev/null", O_RDONLY | O_CLOEXEC); }
  ~Router() override {
    socket_t fd = svr_sock_.exchange(INVALID_SOCKET);
    if (fd != INVALID_SOCKET) ::close(fd);
  }
  Router(const Router&) = delete;
  Router& operator=(const Router&) = delete;

  bool serve(httplib::Stream& strm, bool close_connection, bool& connection_closed) {
    return process_request(strm, close_connection, connection_closed, nullptr);
  }
};

// Routing is the part of the configuration that SIGHUP / Server::reload may replace while
// requests run: a request takes one snapshot when its handler starts and keeps it to the end.
struct Routing {
  std::map<std::string, Site> sites;
  std::optional<Site> default_site;
  bool wildcard_sites = false;  // a key of sites is "*.<host>"
  std::chrono::seconds hsts_max_age{0};
  bool hsts_include_subdomains = false;
  bool redirect_to_https = true;
  int redirect_port = 0;
  AccessLog access_log;

  static std::shared_ptr<const Routing> from(const ServerConfig& c) {
    auto r = std::make_shared<Routing>();
    r->sites = c.sites;
    r->default_site = c.default_site;
    r->wildcard_sites = std::any_of(c.sites.begin(), c.sites.end(), [](const auto& kv) { return kv.first.starts_with("*."); });
    r->hsts_max_age = c.hsts_max_age;
    r->hsts_include_subdomains = c.hsts_include_subdomains;
    r->redirect_to_https = c.redirect_to_https;
    r->redirect_port = c.redirect_port;
    r->access_log = c.access_log;
    return r;
  }

  // site_for is what serves host (as detail::host_of reads the Host header): its own site, else
  // the wildcard site one label up ("*.example.com" for a.example.com), else the default
  // site; nullptr when none does.
  const Site* site_for(const std::string& host) const {
    if (auto it = sites.find(host); it != sites.end()) return &it->second;
    if (wildcard_sites) {
      // An IPv4 address never reaches a wildcard key: create() refuses "*.<address>".
      if (auto dot = host.find('.'); dot != std::string::npos && dot > 0) {
        std::string key = "*";
        key.append(host, dot, std::string::npos);
        if (auto it = sites.find(key); it != sites.end()) return &it->second;
      }
    }
    return default_site ? &*default_site : nullptr;
  }
};

// Limits is the part of the configuration a connection keeps from accept to close: a reload
// makes a new one for the connections accepted after it (a connection never sees its deadlines
// or caps change under it).
struct Limits {
  Timeouts timeouts;
  std::size_t max_header_bytes = 0;
  std::size_t max_body_bytes = 0;
  std::size_t keep_alive_max_requests = 0;
  // httplib's payload limit (max_body_bytes) is a router setting, so each Limits has its own
  // routers; they are configured once, before any connection can use them.
  Router https_router;
  Router http_router;

  bool same(const ServerConfig& c) const {
    return timeouts.handshake == c.timeouts.handshake && timeouts.header == c.timeouts.header &&
           timeouts.read == c.timeouts.read && timeouts.write == c.timeouts.write &&
           timeouts.idle == c.timeouts.idle && max_header_bytes == c.max_header_bytes &&
           max_body_bytes == c.max_body_bytes &&
           keep_alive_max_requests == c.keep_alive_max_requests;
  }
};

// Worker is one thread of the worker pool; done is set as its last act, so a reload can join
// the threads a smaller pool let go without waiting.
struct Worker {
  std::thread thread;
  std::atomic<bool> done{false};
};

bool same_endpoint(const Endpoint& a, const Endpoint& b) {
  return a.address == b.address && a.port == b.port;
}

}  // namespace

struct Server::Impl {
  ServerConfig cfg;
  std::shared_ptr<tlsreload::CertStore> store;
  std::shared_ptr<tlsreload::ChallengeStore> challenges;
  Logger* log = &null_logger();

  // Declared before ssl_ctx so it outlives the SSL_CTX whose ticket callback points at it.
  std::unique_ptr<detail::TicketKeyRing> tickets;
  ossl::SslCtxPtr ssl_ctx;  // reactor 0's, in OpenSSL's default library context
  // Reactor k >= 1 uses reactor_ctxs[k - 1], alike but in a library context of its own
  // (detail/lib_contexts.h: the reactors then do not share OpenSSL's fetch locks). Empty when
  // one reactor, or when no such context could be made (every reactor uses ssl_ctx). Filled by
  // build_tls before hooked_ctx is set, unchanged after.
  std::vector<ossl::SslCtxPtr> reactor_ctxs;
  std::vector<OSSL_LIB_CTX*> reactor_libs;  // the library context of each of reactor_ctxs
  // What requests route by: replaced as a whole by reload, read by every request without a
  // lock (detail::SnapshotCell).
  detail::SnapshotCell<Routing> routing_cell;
  // Every listener ever opened (retired ones too: connections point at them); changed under
  // listen_mu by the controlling thread, read under it by the reactors.
  std::vector<std::unique_ptr<Listener>> listeners;
  std::atomic<int> https_port{0};
  std::atomic<int> http_port{0};
  std::atomic<int> admin_port{0};
  std::size_t worker_count = 8;
  std::size_t reactor_count = 1;
  std::atomic<std::size_t> max_connections{0};

  // Routers exist from create() so that their constructor (which also ignores SIGPIPE: OpenSSL
  // writes to sockets with write(2), not send(MSG_NOSIGNAL)) runs before anything is served.
  // The client routers live in Limits (one pair per reload generation).
  Router admin_router;
  // The Limits new connections get; replaced by reload (under limits_mu, bumping the version).
  std::mutex limits_mu;
  std::shared_ptr<Limits> limits;
  std::atomic<std::uint64_t> limits_version{1};
  // Bumped (under listen_mu) each time a reload retires listeners: reactors then close the idle
  // connections of retired listeners.
  std::atomic<std::uint64_t> retired_version{0};
  // Serializes reload against shutdown (both from controlling threads).
  std::mutex control_mu;

  std::vector<std::unique_ptr<Reactor>> reactors;
  // Static roots (canonical path) opened O_PATH once, for open_beneath.
  std::unordered_map<std::string, int> root_fds;
  // Worker pool: worker_target is the size asked for, worker_running the threads still in
  // worker_loop (both under work_mu); a loop over the target leaves. workers is changed under
  // work_mu too.
  std::vector<std::unique_ptr<Worker>> workers;
  std::size_t worker_target = 0;
  std::size_t worker_running = 0;

  // Tunnels (WebSockets passed through after a 101) run on one thread of their own, started
  // with the first tunnel (tunnel_loop): a tunnel costs two descriptors and its buffers, never
  // a thread. Workers hand them over through tunnel_new.
  std::mutex tunnel_mu;
  std::vector<std::unique_ptr<TunnelEntry>> tunnel_new;  // under tunnel_mu
  bool tunnel_stop = false;                               // under tunnel_mu
  std::thread tunnel_thread;                              // started under tunnel_mu
  int tunnel_epoll = -1;
  int tunnel_wake = -1;

  // Closing the client listeners at the drain and (re)adding them to an epoll set after an
  // accept pause are serialized, so no reactor ever adds a closed (or reused) descriptor.
  std::mutex listen_mu;
  bool listeners_closed = false;

  // Worker queue (connections go back to their home reactor's queue).
  std::mutex work_mu;
  std::condition_variable work_cv;
  std::deque<std::unique_ptr<Connection>> work;
  bool work_stop = false;

  // Every open client socket, for the cap and the forced close at the drain deadline. A
  // socket leaves this set (under open_mu) before it is closed, so shutdown(2) on a member
  // never hits a reused descriptor.
  std::mutex open_mu;
  std::condition_variable open_cv;
  std::unordered_set<int> open_fds;
  std::unordered_set<int> admin_fds;  // admin connections: capped apart, not drained for

  std::atomic<bool> started{false};
  std::atomic<bool> draining{false};
  std::atomic<bool> stop_reactor{false};
  bool shut_down = false;

  detail::UpstreamPool upstreams;
  detail::LatencyHistogram latency;  // client requests, header parsed -> response written
  std::atomic<std::uint64_t> accepted{0}, rejected{0}, handshakes{0}, handshake_failed{0},
      handshake_timeout{0}, header_timeout{0}, idle_closed{0}, header_too_large{0},
      bad_head{0}, requests{0}, forced_closed{0}, read_timeout{0}, write_timeout{0};
  // The https SSL_CTX once attach succeeded on it and on reactor_ctxs (their client-hello hooks
  // count SNI misses), for the metrics; set once, and the SSL_CTXs live as long as the Impl.
  std::atomic<SSL_CTX*> hooked_ctx{nullptr};

  tlsreload::HookCounters sni_counters() const {
    SSL_CTX* ctx = hooked_ctx.load(std::memory_order_acquire);
    tlsreload::HookCounters sum = tlsreload::hook_counters(ctx);
    if (!ctx) return sum;
    for (const auto& rc : reactor_ctxs) {
      tlsreload::HookCounters c = tlsreload::hook_counters(rc.get());
      sum.sni_misses += c.sni_misses;
      sum.no_sni += c.no_sni;
    }
    return sum;
  }

  // The SSL_CTX a connection accepted by reactor r starts its handshake in.
  SSL_CTX* tls_context(const Reactor& r) const {
    if (r.index == 0 || reactor_ctxs.empty()) return ssl_ctx.get();
    return reactor_ctxs[(r.index - 1) % reactor_ctxs.size()].get();
  }

  // A reserve descriptor (/dev/null) held for the moment the process runs out of them: on
  // EMFILE/ENFILE accept closes it, accepts one pending connection and closes that at once, then
  // takes it back. Without it the pending connections sit in the backlog until a descriptor
  // frees up, and their clients wait on a connection nobody answers. -1 while a reactor is
  // using it (or no descriptor was free to take it back: the next shed tries again).
  std::atomic<int> spare_fd{-1};
  std::atomic<bool> spare_off{false};
  // Rate limit of the "out of descriptors" warning (steady-clock nanoseconds of the last one)
  // and the connections shed since it.
  std::atomic<std::int64_t> shed_logged_at{0};
  std::atomic<std::uint64_t> shed_since_log{0};

  ~Impl() {
    for (auto& l : listeners) {
      if (l->fd >= 0) ::close(l->fd);
    }
    if (int fd = spare_fd.exchange(-1); fd >= 0) ::close(fd);
    for (auto& [root, fd] : root_fds) ::close(fd);
    if (tunnel_epoll >= 0) ::close(tunnel_epoll);
    if (tunnel_wake >= 0) ::close(tunnel_wake);
  }

  // --- setup ---------------------------------------------------------------------------------

  Status validate_and_resolve() {
    if (auto st = validate_limits(cfg); !st) return st;
    unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    worker_count = resolved_workers(cfg);
    reactor_count = cfg.reactor_threads ? cfg.reactor_threads : cores;
    max_connections = cfg.max_connections;
    if (auto st = resolve_routing(cfg); !st) return st;
    routing_cell.store(Routing::from(cfg));
    return {};
  }

  static std::size_t resolved_workers(const ServerConfig& c) {
    unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    return c.worker_threads ? c.worker_threads : std::max<std::size_t>(8, 2 * cores);
  }

  // validate_limits checks what create and reload both refuse: listeners, timeouts, caps,
  // tickets.
  static Status validate_limits(const ServerConfig& cfg) {
    // An http-only server (the CLI's standalone http-01 responder) is allowed; with no listener
    // at all there is nothing to serve.
    if (cfg.https.empty() && cfg.http.empty()) {
      return fail(Errc::invalid_input, "server config: no https or http listener");
    }
    std::vector<Endpoint> admin_eps;
    if (cfg.admin.endpoint) admin_eps.push_back(*cfg.admin.endpoint);
    const auto& admin_list = admin_eps;
    for (const auto* list : {&cfg.https, &cfg.http, &admin_list}) {
      for (const auto& ep : *list) {
        if (ep.port < 0 || ep.port > 65535) {
          return fail(Errc::invalid_input,
                      "server config: bad port " + detail::format_endpoint(ep.address, ep.port));
        }
      }
    }
    auto positive = [](milliseconds d) { return d.count() > 0; };
    const auto& t = cfg.timeouts;
    if (!positive(t.handshake) || !positive(t.header) || !positive(t.read) ||
        !positive(t.write) || !positive(t.idle)) {
      return fail(Errc::invalid_input, "server config: every timeout must be positive");
    }
    if (cfg.max_connections == 0 || cfg.max_header_bytes < 256 ||
        cfg.keep_alive_max_requests == 0 || cfg.backlog <= 0) {
      return fail(Errc::invalid_input,
                  "server config: max_connections, keep_alive_max_requests and backlog must be "
                  "positive, max_header_bytes at least 256");
    }
    if (cfg.tickets.enabled &&
        (cfg.tickets.rotate_every.count() <= 0 || cfg.tickets.lifetime.count() <= 0)) {
      return fail(Errc::invalid_input,
                  "server config: tickets.rotate_every and tickets.lifetime must be positive");
    }
    return {};
  }

  // resolve_routing checks the reloadable part of c (site names, static roots, upstreams,
  // redirect port, access log format) and makes static roots canonical.
  static Status resolve_routing(ServerConfig& cfg) {
    if (cfg.redirect_port < 0 || cfg.redirect_port > 65535) {
      return fail(Errc::invalid_input, "server config: bad redirect_port");
    }
    if (cfg.access_log.enabled && cfg.access_log.format != "json" &&
        cfg.access_log.format != "combined") {
      return fail(Errc::invalid_input, "server config: access log format '" +
                                           cfg.access_log.format + "' (json or combined)");
    }
    if (cfg.access_log.enabled && !cfg.access_log.file.empty() && !cfg.access_log.sink) {
      // Opened here, on every create and reload: a reload after logrotate renamed the file
      // writes to a new one at the same path. Lines are appended with one write(2) each.
      int fd = ::open(cfg.access_log.file.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC,
                      0640);
      if (fd < 0) {
        return fail(Errc::io, "server config: access log " + cfg.access_log.file.string() + ": " +
                                  errno_text(errno));
      }
      auto file = std::shared_ptr<int>(new int(fd), [](int* p) {
        ::close(*p);
        delete p;
      });
      cfg.access_log.sink = [file](const std::string& line) {
        std::string out = line + '\n';
        [[maybe_unused]] auto n = ::write(*file, out.data(), out.size());
      };
    }
    std::map<std::string, Site> sites;
    for (auto& [name, site] : cfg.sites) {
      // A site is keyed as host_of reads the Host header: an IPv6 address without its brackets.
      // A wildcard is "*." and a host name (one label of any host under it), never an address.
      const bool v6 = name.find(':') != std::string::npos;
      const bool wildcard = name.starts_with("*.");
      const std::string base = wildcard ? name.substr(2) : name;
      auto host = detail::host_of(v6 ? "[" + base + "]" : base);
      if (!host || *host != base || (wildcard && acme::identifier_for(base).type == "ip")) {
        return fail(Errc::invalid_input, "server config: site name '" + name + "' is not a lower-case host name" +
                                             (v6 ? " or IPv6 address" : wildcard ? " under a wildcard" : ""));
      }
      auto st = resolve_site(name, site);
      if (!st) return st;
      sites.emplace(name, site);
    }
    cfg.sites = std::move(sites);
    if (cfg.default_site) {
      auto st = resolve_site("default", *cfg.default_site);
      if (!st) return st;
    }
    return {};
  }

  static Status resolve_site(const std::string& name, Site& site) {
    for (const auto& [field, value] : headers_of(site)) {
      if (auto why = response_header_error(field, value); !why.empty()) {
        return fail(Errc::invalid_input, "site " + name + ": " + why);
      }
    }
    if (auto* s = std::get_if<StaticSite>(&site)) {
      std::error_code ec;
      auto root = std::filesystem::canonical(s->root, ec);
      if (ec || !std::filesystem::is_directory(root)) {
        return fail(Errc::invalid_input, "site " + name + ": static root " + s->root.string() +
                                             ": " + (ec ? ec.message() : "not a directory"));
      }
      s->root = root;
      return {};
    }
    if (const auto* rd = std::get_if<RedirectSite>(&site)) {
      if (auto why = redirect_error(rd->to, rd->status); !why.empty()) {
        return fail(Errc::invalid_input, "site " + name + ": " + why);
      }
      return {};
    }
    auto& p = std::get<ProxySite>(site);
    if (auto why = upstream_error(p.upstream); !why.empty()) {
      return fail(Errc::invalid_input, "site " + name + ": " + why);
    }
    for (const auto& u : p.more_upstreams) {
      if (auto why = upstream_error(u); !why.empty()) {
        return fail(Errc::invalid_input, "site " + name + ": " + why);
      }
    }
    if (p.fail_timeout.count() < 0) {
      return fail(Errc::invalid_input, "site " + name + ": fail_timeout must not be negative");
    }
    if (p.connect_timeout.count() <= 0 || p.read_timeout.count() <= 0 ||
        p.write_timeout.count() <= 0) {
      return fail(Errc::invalid_input, "site " + name + ": upstream timeouts must be positive");
    }
    if (p.max_idle > 1024 || (p.max_idle > 0 && p.idle_timeout.count() <= 0)) {
      return fail(Errc::invalid_input,
                  "site " + name + ": upstream max_idle must be 0-1024, idle_timeout positive");
    }
    if (p.tunnel_idle_timeout.count() <= 0) {
      return fail(Errc::invalid_input, "site " + name + ": tunnel_idle_timeout must be positive");
    }
    return {};
  }

  Result<std::unique_ptr<Listener>> bind_listener(const Endpoint& ep, bool tls, bool admin,
                                                  int backlog) {
    auto l = std::make_unique<Listener>();
    l->tls = tls;
    l->admin = admin;
    l->configured = ep;
    l->name = std::string(admin ? "admin" : tls ? "https" : "http") + " listener " +
              detail::format_endpoint(ep.address, ep.port);
    addrinfo hints{};
    hints.ai_flags = AI_PASSIVE | AI_NUMERICHOST | AI_NUMERICSERV;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    std::string port = std::to_string(ep.port);
    if (int rc = ::getaddrinfo(ep.address.c_str(), port.c_str(), &hints, &res); rc != 0) {
      return fail(Errc::invalid_input, l->name + ": " + ::gai_strerror(rc));
    }
    std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> guard(res, ::freeaddrinfo);
    int fd = ::socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return fail(Errc::io, l->name + ": socket: " + errno_text(errno));
    l->fd = fd;  // closed by ~Listener's owner on failure below
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    // So that "0.0.0.0:443" and "[::]:443" can both be bound, as the defaults do.
    if (res->ai_family == AF_INET6) ::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (::bind(fd, res->ai_addr, res->ai_addrlen) != 0 || ::listen(fd, backlog) != 0) {
      int err = errno;
      ::close(fd);
      return fail(Errc::io, l->name + ": " + errno_text(err));
    }
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len);
    addr_to_text(ss, l->address, l->port);
    l->wildcard = l->address == "0.0.0.0" || l->address == "::";
    return l;
  }

  // build_tls makes ssl_ctx and reactor_ctxs, configured alike, and attaches the store to each.
  Status build_tls() {
    if (cfg.tickets.enabled) {
      tickets = std::make_unique<detail::TicketKeyRing>(cfg.tickets.rotate_every,
                                                        cfg.tickets.lifetime);
    }
    tlsreload::AttachOptions opts;
    opts.alpn_protocols = cfg.alpn_protocols;
    if (challenges) {
      // Holds the ChallengeStore alive as long as the SSL_CTX (attach owns the options).
      opts.alpn_challenge = [ch = challenges](std::string_view sni) { return ch->tls_alpn(sni); };
    }
    if (cfg.tls_hooks) cfg.tls_hooks(opts);
    ssl_ctx.reset(SSL_CTX_new(TLS_server_method()));
    if (!ssl_ctx) return fail(ossl::error("https: SSL_CTX_new"));
    if (auto st = configure_tls(ssl_ctx.get(), nullptr, opts); !st) return st;
    reactor_ctxs.clear();
    reactor_libs.clear();
    for (std::size_t k = 1; k < reactor_count; ++k) {
      std::string why;
      OSSL_LIB_CTX* lib = detail::reactor_lib_context(k - 1, why);
      ossl::SslCtxPtr ctx(lib ? SSL_CTX_new_ex(lib, nullptr, TLS_server_method()) : nullptr);
      if (lib && !ctx) why = "SSL_CTX_new_ex: " + ossl::drain_errors();
      if (!ctx) {
        // Not an error: the reactors share the default context, as they did before.
        log->log(LogLevel::warn, kLog, "reactors share one OpenSSL library context",
                 {{"reactor", std::to_string(k)}, {"error", why}});
        reactor_ctxs.clear();
        reactor_libs.clear();
        break;
      }
      if (auto st = configure_tls(ctx.get(), lib, opts); !st) return st;
      reactor_ctxs.push_back(std::move(ctx));
      reactor_libs.push_back(lib);
    }
    // Keys copied into reactor_ctxs' contexts cost the object cache room (tlsreload).
    tlsreload::note_openssl_signing_contexts(1 + reactor_ctxs.size());
    hooked_ctx.store(ssl_ctx.get(), std::memory_order_release);
    return {};
  }

  // configure_tls sets ctx, made in library context lib (nullptr: the default), up as every
  // https context is (TLS settings, tickets from the one ring, the store attached with a copy
  // of opts).
  Status configure_tls(SSL_CTX* ctx, OSSL_LIB_CTX* lib, const tlsreload::AttachOptions& opts) {
    if (SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1 ||
        SSL_CTX_set_cipher_list(ctx, kIntermediateCiphers) != 1 ||
        SSL_CTX_set_ciphersuites(ctx, kIntermediateCiphersuites) != 1) {
      return fail(ossl::error("https: TLS settings"));
    }
    // Renegotiation is a DoS lever and HTTP/1.1 over TLS never needs it.
    // The suites are all strong, so the server picks the cheapest one the client offers, as Go
    // (Caddy) does: AES-128-GCM with SHA-256 costs a TLS 1.3 resumption 7-9 % less server CPU
    // in OpenSSL (a full handshake 1-7 %) than the AES-256-GCM with SHA-384 that OpenSSL
    // clients list first: its key schedule hashes with SHA-256 (tools/bench/suite_cost). A
    // client that lists ChaCha20 first (no AES hardware) still gets it (PRIORITIZE_CHACHA).
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION |
                                 SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_PRIORITIZE_CHACHA);
    // Idle keep-alive connections should not pin 34 KiB of TLS buffers each.
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    // Read-ahead: one read(2) fetches a record's header and body (and whatever follows)
    // instead of one for the 5-byte header and one for the rest. Every reader loops until
    // SSL_read says WANT_READ (the reactor) or checks SSL_has_pending before waiting (workers),
    // so bytes held inside OpenSSL are never forgotten by epoll.
    SSL_CTX_set_read_ahead(ctx, 1);
    static constexpr unsigned char kSidCtx[] = "autotls";
    SSL_CTX_set_session_id_context(ctx, kSidCtx, sizeof kSidCtx - 1);
    // Resumption is stateless only: no server-side session cache (memory per client, and a
    // session ID would resume even after its ticket key was retired).
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    if (tickets) {
      if (auto st = tickets->install(ctx, lib); !st) return st;
      // One TLS 1.3 ticket per handshake instead of OpenSSL's two: a client resumes with one,
      // and each costs an encryption and a record.
      SSL_CTX_set_num_tickets(ctx, 1);
    } else {
      SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
      // TLS 1.3 would still send stateful tickets backed by the (disabled) cache.
      SSL_CTX_set_num_tickets(ctx, 0);
    }
    // The SSL_CTX is fully configured here, before any handshake: it is never mutated live.
    auto st = tlsreload::attach(ctx, store, opts);
    if (!st) return fail(st.error().with_context("https"));
    return {};
  }

  void open_roots() {
    auto add = [this](const Site& site) {
      const auto* s = std::get_if<StaticSite>(&site);
      if (!s || root_fds.count(s->root.native())) return;
      int fd = ::open(s->root.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
      if (fd >= 0) root_fds.emplace(s->root.native(), fd);  // else: resolve_static only
    };
    for (const auto& [name, site] : cfg.sites) add(site);
    if (cfg.default_site) add(*cfg.default_site);
  }

  // make_limits builds the Limits (and its client routers) for c.
  std::shared_ptr<Limits> make_limits(const ServerConfig& c) {
    auto lim = std::make_shared<Limits>();
    lim->timeouts = c.timeouts;
    lim->max_header_bytes = c.max_header_bytes;
    lim->max_body_bytes = c.max_body_bytes;
    lim->keep_alive_max_requests = c.keep_alive_max_requests;
    setup_client_routes(*lim);
    return lim;
  }

  void setup_routes() {
    limits = make_limits(cfg);
    setup_admin_routes();
  }

  void setup_client_routes(Limits& lim) {
    Router& https_router = lim.https_router;
    Router& http_router = lim.http_router;
    const std::size_t max_body = lim.max_body_bytes;
    auto site_handler = [this, max_body](bool tls) {
      return [this, tls, max_body](const httplib::Request& req, httplib::Response& res) {
        handle_site(req, res, tls, nullptr, max_body);
      };
    };
    // Methods with a body get it through a ContentReader: a proxied body is streamed to the
    // upstream instead of being read whole into req.body first.
    auto body_handler = [this, max_body](bool tls) {
      return [this, tls, max_body](const httplib::Request& req, httplib::Response& res,
                                   const httplib::ContentReader& reader) {
        handle_site(req, res, tls, &reader, max_body);
      };
    };
    auto http_handler = [this, max_body](const httplib::Request& req, httplib::Response& res) {
      handle_http(req, res, nullptr, max_body);
    };
    auto http_body_handler = [this, max_body](const httplib::Request& req,
                                              httplib::Response& res,
                                              const httplib::ContentReader& reader) {
      handle_http(req, res, &reader, max_body);
    };
    const std::string all = ".*";
    https_router.Get(all, site_handler(true))
        .Post(all, body_handler(true))
        .Put(all, body_handler(true))
        .Patch(all, body_handler(true))
        .Delete(all, body_handler(true))
        .Options(all, site_handler(true));
    http_router.Get(all, http_handler)
        .Post(all, http_body_handler)
        .Put(all, http_body_handler)
        .Patch(all, http_body_handler)
        .Delete(all, http_body_handler)
        .Options(all, http_handler);
    // The same handlers as a pre-routing handler, which httplib calls before its route table:
    // every request would match ".*" anyway, and this skips a std::regex match per request.
    // httplib reads a request body only after pre-routing, so a request with a body goes
    // through the table; other methods (TRACE, CONNECT) too, and get its 404, as before.
    auto routed = [](const httplib::Request& req) {
      const std::string& m = req.method;
      if (req.has_header("Transfer-Encoding")) return false;
      if (req.has_header("Content-Length") && req.get_header_value("Content-Length") != "0") {
        return false;
      }
      return m == "GET" || m == "HEAD" || m == "POST" || m == "PUT" || m == "PATCH" ||
             m == "DELETE" || m == "OPTIONS";
    };
    using HR = httplib::Server::HandlerResponse;
    // Each also marks the request's start for the latency histogram (one pre-routing handler
    // per server: this is it).
    https_router.set_pre_routing_handler(
        [this, routed, max_body](const httplib::Request& req, httplib::Response& res) {
          t_request_start = SteadyClock::now();
          if (body_left_unread(req)) t_close_after = true;
          if (!routed(req)) return HR::Unhandled;
          handle_site(req, res, true, nullptr, max_body);
          return HR::Handled;
        });
    http_router.set_pre_routing_handler(
        [this, routed, max_body](const httplib::Request& req, httplib::Response& res) {
          t_request_start = SteadyClock::now();
          if (body_left_unread(req)) t_close_after = true;
          if (!routed(req)) return HR::Unhandled;
          handle_http(req, res, nullptr, max_body);
          return HR::Handled;
        });
    for (auto [router, tls] : {std::pair{&https_router, true}, std::pair{&http_router, false}}) {
      // The lambdas below capture tls by copy (tls = tls): Clang before 16 cannot capture a
      // structured binding by name.
      router->set_payload_max_length(lim.max_body_bytes);
      router->set_keep_alive_max_count(lim.keep_alive_max_requests);
      router->set_keep_alive_timeout(
          std::max<time_t>(1, std::chrono::duration_cast<std::chrono::seconds>(lim.timeouts.idle)
                                  .count()));
      router->set_post_routing_handler(
          [this, tls = tls](const httplib::Request&, httplib::Response& res) {
            auto r = routing();
            // Unless the answer has one already: a site's headers or its upstream may set
            // their own (one field, never two).
            if (tls && r->hsts_max_age.count() > 0 && !t_no_hsts &&
                !res.has_header("Strict-Transport-Security")) {
              std::string v = "max-age=" + std::to_string(r->hsts_max_age.count());
              if (r->hsts_include_subdomains) v += "; includeSubDomains";
              res.set_header("Strict-Transport-Security", v);
            }
            if (tl_conn && tl_conn->read_timed_out.load(std::memory_order_acquire)) {
              // The request body stopped coming (timeouts.read): whatever the handler made of
              // the failed read (a body read away for a static site or a redirect, httplib's
              // own 400), the answer is 408, and the connection closes (the rest of the body
              // would be parsed as a request). The proxy answers 408 itself. A response with
              // a content provider was under way before the read: left as it is.
              if (!res.content_provider_ && res.status != 408) {
                res.status = 408;
                res.headers.erase("Content-Type");
                res.set_content("request body timed out\n", "text/plain");
              }
              t_close_after = true;
            }
            if (draining.load() || t_close_after ||
                (tl_conn && tl_conn->listener->retired.load())) {
              // httplib offered keep-alive before this handler ran; take it back.
              res.headers.erase("Keep-Alive");
              res.headers.erase("Connection");
              res.set_header("Connection", "close");
            }
          });
      router->set_logger([this, tls = tls](const httplib::Request& req, const httplib::Response& res) {
        on_request_done(req, res, tls);
      });
    }
  }

  // on_request_done runs on the worker after httplib wrote the response: latency histogram
  // and access log.
  void on_request_done(const httplib::Request& req, const httplib::Response& res, bool tls) {
    // A request the reactor deferred is replayed on a worker, which logs it; the reactor's
    // pass wrote only a placeholder response, discarded.
    if (tl_inline && tl_inline->defer) {
      t_request_start = {};
      return;
    }
    auto now = SteadyClock::now();
    // A request refused before routing (413, 400) has no start mark: count it as instant.
    auto start = t_request_start == SteadyClock::time_point{} ? now : t_request_start;
    t_request_start = {};
    auto duration = now - start;
    // A 101's "duration" is its tunnel's whole life (a WebSocket, minutes or hours): not a
    // request's latency, and it would fill the top bucket. The access log keeps it.
    if (res.status != 101) latency.observe(duration);
    auto r = routing();
    if (!r->access_log.enabled) return;
    detail::AccessEntry e;
    e.time = std::chrono::system_clock::now();
    e.remote = req.remote_addr;
    std::string host = req.get_header_value("Host");
    std::string referer = req.get_header_value("Referer");
    std::string agent = req.get_header_value("User-Agent");
    e.host = host;
    e.method = req.method;
    e.target = req.target;
    e.version = req.version;
    e.referer = referer;
    e.user_agent = agent;
    e.status = res.status;
    e.bytes = res.content_provider_ ? res.content_length_ : res.body.size();
    e.duration = duration;
    e.tls = tls;
    std::string line = r->access_log.format == "combined" ? detail::format_access_combined(e)
                                                           : detail::format_access_json(e);
    if (r->access_log.sink) {
      r->access_log.sink(line);
    } else {
      line += '\n';
      [[maybe_unused]] auto n = ::write(STDERR_FILENO, line.data(), line.size());
    }
  }

  void setup_admin_routes() {
    admin_router.Get("/healthz", [](const httplib::Request&, httplib::Response& res) {
      res.set_content("ok\n", "text/plain");
    });
    admin_router.Get("/readyz", [this](const httplib::Request&, httplib::Response& res) {
      bool ready = started.load() && !draining.load() && (!cfg.admin.ready || cfg.admin.ready());
      // Checked again: shutdown() may have begun while the callback ran.
      ready = ready && !draining.load();
      res.status = ready ? 200 : 503;
      res.set_content(ready ? "ready\n" : "not ready\n", "text/plain");
    });
    admin_router.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      std::string text = metrics_text();
      if (cfg.admin.metrics) text += cfg.admin.metrics();
      res.set_content(text, "text/plain; version=0.0.4; charset=utf-8");
    });
    admin_router.Get("/certificates", [this](const httplib::Request&, httplib::Response& res) {
      if (!cfg.admin.certificates) {
        res.status = 404;
        res.set_content("no certificate source configured\n", "text/plain");
        return;
      }
      res.set_content(cfg.admin.certificates(), "application/json");
    });
    admin_router.set_payload_max_length(64 * 1024);
    admin_router.set_keep_alive_max_count(cfg.keep_alive_max_requests);
    admin_router.set_keep_alive_timeout(std::max<time_t>(
        1, std::chrono::duration_cast<std::chrono::seconds>(cfg.timeouts.idle).count()));
    admin_router.set_pre_routing_handler([](const httplib::Request& req, httplib::Response&) {
      if (body_left_unread(req)) t_close_after = true;
      return httplib::Server::HandlerResponse::Unhandled;
    });
    admin_router.set_post_routing_handler([this](const httplib::Request&, httplib::Response& res) {
      res.set_header("Cache-Control", "no-store");
      if (draining.load() || t_close_after) {
        res.headers.erase("Keep-Alive");
        res.headers.erase("Connection");
        res.set_header("Connection", "close");
      }
    });
  }

  // metrics_text renders the client counters in the Prometheus text exposition format 0.0.4
  // (https://prometheus.io/docs/instrumenting/exposition_formats/).
  std::string metrics_text() {
    const tlsreload::HookCounters sni = sni_counters();
    struct Metric {
      const char* name;
      const char* type;
      const char* help;
      std::uint64_t value;
    };
    const Metric metrics[] = {
        {"autotls_server_accepted_total", "counter", "Client connections accepted.",
         accepted.load()},
        {"autotls_server_rejected_over_capacity_total", "counter",
         "Connections closed at accept because max_connections was reached or the process was "
         "out of file descriptors.", rejected.load()},
        {"autotls_server_handshakes_total", "counter", "TLS handshakes completed.",
         handshakes.load()},
        {"autotls_server_handshake_failed_total", "counter", "TLS handshakes that failed.",
         handshake_failed.load()},
        {"autotls_server_handshake_timeout_total", "counter",
         "TLS handshakes not complete by the handshake deadline.", handshake_timeout.load()},
        {"autotls_server_header_timeout_total", "counter",
         "Request headers not complete by the header deadline.", header_timeout.load()},
        {"autotls_server_idle_closed_total", "counter",
         "Keep-alive connections closed after the idle timeout.", idle_closed.load()},
        {"autotls_server_read_timeout_total", "counter",
         "Request-body reads that waited longer than the read timeout.", read_timeout.load()},
        {"autotls_server_write_timeout_total", "counter",
         "Response writes that waited longer than the write timeout.", write_timeout.load()},
        {"autotls_server_sni_misses_total", "counter",
         "TLS ClientHellos whose SNI no certificate names (default certificate or refused).",
         sni.sni_misses},
        {"autotls_server_no_sni_total", "counter",
         "TLS ClientHellos without SNI (default certificate or refused).", sni.no_sni},
        {"autotls_server_header_too_large_total", "counter",
         "Requests refused with 431 (max_header_bytes).", header_too_large.load()},
        {"autotls_server_bad_request_head_total", "counter",
         "Requests refused with 400, 501 or 505 for their head (framing, field syntax, version).",
         bad_head.load()},
        {"autotls_server_requests_total", "counter", "Requests answered.",
         requests.load()},
        {"autotls_server_forced_closed_total", "counter",
         "Connections still open when the drain deadline passed.", forced_closed.load()},
        {"autotls_server_open_connections", "gauge", "Open client connections.", open_count()},
        {"autotls_server_tunnels_open", "gauge", "WebSockets passed through to an upstream now.",
         upstreams.tunnels_open()},
        {"autotls_server_tunnels_total", "counter",
         "WebSockets passed through to an upstream since start.", upstreams.tunnels_total()},
        {"autotls_server_upstream_failovers_total", "counter",
         "Proxied requests moved to another upstream after a failed connect.",
         upstreams.failovers()},
        {"autotls_server_ready", "gauge", "1 when started and not draining.",
         started.load() && !draining.load() ? 1u : 0u},
    };
    std::string out;
    for (const auto& m : metrics) {
      out += std::string("# HELP ") + m.name + " " + m.help + "\n";
      out += std::string("# TYPE ") + m.name + " " + m.type + "\n";
      out += std::string(m.name) + " " + std::to_string(m.value) + "\n";
    }
    out += latency.render("autotls_server_request_duration_seconds",
                          "Client request duration from parsed header to response written.");
    return out;
  }

  // --- request handlers (worker threads) ------------------------------------------------------

  // origin_form is req as an origin-form request when its target is absolute-form (RFC 9112
  // §3.2.2: an origin server must accept "GET http://host/path", and goes by the target's
  // authority, not by Host): target and path from the URL's path and query, Host its
  // authority. nullopt for any other target (nearly every request: one comparison).
  static std::optional<httplib::Request> origin_form(const httplib::Request& req) {
    if (req.target.empty() || req.target.front() == '/') return std::nullopt;
    auto abs = detail::absolute_target(req.target);
    if (!abs) return std::nullopt;
    httplib::Request out = req;
    out.target = abs->origin;
    auto q = abs->origin.find('?');
    out.path = httplib::detail::decode_url(abs->origin.substr(0, q), false);
    out.params.clear();
    if (q != std::string::npos) httplib::detail::parse_query_text(abs->origin.substr(q + 1), out.params);
    out.headers.erase("Host");
    out.headers.emplace("Host", abs->authority);
    return out;
  }

  // NoLibraryCompression takes Accept-Encoding off httplib's own request when the handler is
  // done, before httplib writes the answer: it gzipped any text answer for a request whose
  // Accept-Encoding held "gzip" (even "gzip;q=0", a refusal), a 206 included (its
  // Content-Range then named bytes of the identity body that the client never got), under the
  // file's strong ETag, and a chunked proxied answer too. We compress nothing, as Caddy without
  // `encode` and nginx without `gzip on`; the proxy passes the field to the upstream, whose
  // encoding reaches the client as it was sent. The request is httplib's own, non-const object.
  struct NoLibraryCompression {
    const httplib::Request& req;
    ~NoLibraryCompression() { const_cast<httplib::Request&>(req).headers.erase("Accept-Encoding"); }
  };

  void handle_http(const httplib::Request& req, httplib::Response& res,
                   const httplib::ContentReader* reader, std::size_t max_body) {
    NoLibraryCompression identity{req};
    if (auto origin = origin_form(req)) {
      handle_http(*origin, res, reader, max_body);
      return;
    }
    auto r = routing();
    if (!r->redirect_to_https && !detail::acme_challenge_token(req.path)) {
      handle_site(req, res, false, reader, max_body);
      return;
    }
    // Nothing below reads a body: read it away so the connection stays in step (or close it
    // when that fails).
    if (reader && !(*reader)([](const char*, size_t) { return true; })) t_close_after = true;
    if (auto token = detail::acme_challenge_token(req.path)) {
      std::optional<std::string> key_auth;
      if (challenges) key_auth = challenges->http01(*token);
      if (key_auth) {
        // RFC 8555 §8.3: the body is the key authorization, Content-Type application/octet-
        // stream is what the RFC shows, but CAs accept any; text/plain is what the brief asks.
        res.set_content(*key_auth, "text/plain");
      } else {
        res.status = 404;
        res.set_content("unknown challenge token\n", "text/plain");
      }
      return;
    }
    auto host = detail::host_of(req.get_header_value("Host"));
    if (!host) {
      res.status = 400;
      res.set_content("missing or bad Host header\n", "text/plain");
      return;
    }
    int port = r->redirect_port ? r->redirect_port : https_port.load();
    if (port == 0) {
      // No https listener to send the client to (an http-only responder).
      res.status = 404;
      res.set_content("not found: this listener answers only ACME http-01 challenges\n", "text/plain");
      return;
    }
    // 308 (RFC 9110 §15.4.9) keeps the method and body, unlike 301/302.
    res.status = 308;
    res.set_header("Location", detail::redirect_location(*host, req.target, port));
  }

  void handle_site(const httplib::Request& req, httplib::Response& res, bool tls,
                   const httplib::ContentReader* reader, std::size_t max_body) {
    NoLibraryCompression identity{req};
    if (auto origin = origin_form(req)) {
      handle_site(*origin, res, tls, reader, max_body);
      return;
    }
    // A body nobody reads would be parsed as the next request: read it away (bounded by
    // max_body_bytes and the read timeout) unless the proxy streams it.
    auto discard_body = [&] {
      if (reader && !(*reader)([](const char*, size_t) { return true; })) t_close_after = true;
    };
    auto host = detail::host_of(req.get_header_value("Host"));
    if (!host) {
      discard_body();
      res.status = 400;
      res.set_content("missing or bad Host header\n", "text/plain");
      return;
    }
    // The snapshot keeps the site alive for this request even if a reload removes it.
    auto r = routing();
    const Site* site = r->site_for(*host);
    if (!site) {
      discard_body();
      res.status = 421;
      res.set_content("no site for this host\n", "text/plain");
      return;
    }
    if (const auto* s = std::get_if<StaticSite>(site)) {
      discard_body();
      serve_static(*s, req, res);
    } else if (const auto* rd = std::get_if<RedirectSite>(site)) {
      discard_body();
      res.status = rd->status;
      res.set_header("Location", detail::redirect_site_location(rd->to, req.target));
    } else {
      if (tl_inline) {
        // The upstream may take its time: never on a reactor.
        tl_inline->defer = true;
        return;
      }
      detail::UpgradeHooks hooks;
      if (tl_stream && tl_conn) {
        const Connection* conn = tl_conn;
        ConnStream* stream = tl_stream;
        hooks.take = [conn, stream](detail::TunnelClient& tc) {
          if (!stream->hijack(tc.early)) return false;
          tc.fd = conn->fd;
          tc.ssl = conn->ssl.get();
          return true;
        };
        hooks.run = [](std::unique_ptr<detail::Tunnel> t) { t_tunnel = std::move(t); };
      }
      if (!detail::proxy(std::get<ProxySite>(*site), req, reader, res, tls, max_body,
                         upstreams, *log, tl_conn ? &tl_conn->read_timed_out : nullptr,
                         hooks.take ? &hooks : nullptr)) {
        t_close_after = true;
      }
      if (res.status == 101) return;  // a tunnel: its head went out as the upstream gave it
    }
    // The site's own fields replace any of the same name (httplib's Headers compare names
    // without case).
    for (const auto& [field, value] : headers_of(*site)) {
      res.headers.erase(field);
      if (value) {
        res.headers.emplace(field, *value);
      } else if (detail::iequals(field, "Strict-Transport-Security")) {
        t_no_hsts = true;
      }
    }
  }

  // open_beneath is the fast path of resolve_static: one openat2(RESOLVE_BENEATH) from the
  // root's descriptor, which the kernel guarantees never leaves the root, instead of a
  // readlink per path component. It answers found (fd open) or not_found only when that is
  // certainly resolve_static's answer too; anything else (dot segments, a symlink leaving the
  // directory it starts from, an absolute symlink, no openat2) returns bad_request, meaning
  // "ask resolve_static".
  //
  // st_out, when given, receives the fstat of the file found (so the caller need not ask again).
  detail::StaticLookup open_beneath(const StaticSite& site, std::string_view url_path, int& fd,
                                    std::filesystem::path& file,
                                    struct stat* st_out = nullptr) const {
    constexpr auto kAsk = detail::StaticLookup::bad_request;
    auto root = root_fds.find(site.root.native());
    if (root == root_fds.end() || url_path.empty() || url_path.front() != '/' ||
        url_path.find('\0') != std::string_view::npos ||
        url_path.find('\\') != std::string_view::npos) {
      return kAsk;
    }
    for (std::size_t pos = 1; pos <= url_path.size();) {
      auto slash = std::min(url_path.find('/', pos), url_path.size());
      auto seg = url_path.substr(pos, slash - pos);
      if (seg == "." || seg == "..") return kAsk;
      pos = slash + 1;
    }
    std::string rel(url_path.substr(1));
    if (rel.empty()) rel = ".";
    auto open_at = [](int dir, const char* path) {
      open_how how{};
      how.flags = O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK;
      how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
      return static_cast<int>(::syscall(SYS_openat2, dir, path, &how, sizeof how));
    };
    int f = open_at(root->second, rel.c_str());
    if (f < 0) return errno == ENOENT ? detail::StaticLookup::not_found : kAsk;
    struct stat st {};
    if (::fstat(f, &st) != 0) {
      ::close(f);
      return kAsk;
    }
    file = site.root / rel;
    if (S_ISDIR(st.st_mode)) {
      if (site.index.empty() || url_path.back() != '/') {
        ::close(f);
        return site.index.empty() ? detail::StaticLookup::not_found
                                  : detail::StaticLookup::add_slash;
      }
      int g = open_at(f, site.index.c_str());
      int err = errno;
      ::close(f);
      if (g < 0) return err == ENOENT ? detail::StaticLookup::not_found : kAsk;
      f = g;
      file /= site.index;
      if (::fstat(f, &st) != 0) {
        ::close(f);
        return kAsk;
      }
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(f);
      return detail::StaticLookup::not_found;
    }
    fd = f;
    if (st_out) *st_out = st;
    return detail::StaticLookup::found;
  }

  void serve_static(const StaticSite& site, const httplib::Request& req,
                    httplib::Response& res) const {
    if (req.method != "GET" && req.method != "HEAD") {
      res.status = 405;
      res.set_header("Allow", "GET, HEAD");
      return;
    }
    std::filesystem::path file;
    int fd = -1;
    struct stat st {};
    auto lookup = open_beneath(site, req.path, fd, file, &st);
    bool have_st = fd >= 0;
    if (lookup == detail::StaticLookup::bad_request) {
      lookup = detail::resolve_static(site.root, req.path, site.index, file);
    }
    switch (lookup) {
      case detail::StaticLookup::bad_request:
        res.status = 400;
        res.set_content("bad path\n", "text/plain");
        return;
      case detail::StaticLookup::not_found:
        res.status = 404;
        res.set_content("not found\n", "text/plain");
        return;
      case detail::StaticLookup::add_slash: {
        // The target as sent (path still encoded), with '/' after its path; leading slashes
        // made one, or "//host/dir" would send the client to another host.
        std::string_view target = req.target;
        auto query = target.find('?');
        std::string_view path = target.substr(0, query);
        while (path.starts_with("//")) path.remove_prefix(1);
        std::string to(path);
        to += '/';
        if (query != std::string_view::npos) to += target.substr(query);
        res.status = 308;
        res.set_header("Location", to);
        return;
      }
      case detail::StaticLookup::found:
        break;
    }
    // open_beneath's fstat stands (one fstat a request, not two).
    if (fd < 0) fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd >= 0 && !have_st) have_st = ::fstat(fd, &st) == 0;
    if (fd < 0 || !have_st || !S_ISREG(st.st_mode)) {
      if (fd >= 0) ::close(fd);
      res.status = 404;
      res.set_content("not found\n", "text/plain");
      return;
    }
    // Validators and conditional requests (RFC 9110 §8.8, §13), as Caddy's and nginx's file
    // servers: a browser revalidating its cached copy gets a 304 instead of the file again.
    auto v = detail::file_validators(st);
    auto field = [&](const char* name) -> const std::string* {
      auto it = req.headers.find(name);
      return it == req.headers.end() ? nullptr : &it->second;
    };
    int pre = detail::evaluate_preconditions(
        {field("If-Match"), field("If-None-Match"), field("If-Modified-Since"),
         field("If-Unmodified-Since")},
        v);
    if (pre != 200) {
      ::close(fd);
      res.status = pre;
      res.set_header("ETag", v.etag);
      res.set_header("Last-Modified", v.last_modified);
      if (pre == 412) {
        res.set_content("precondition failed\n", "text/plain");
      } else {
        // What a 200 would carry (RFC 9110 §8.6), not httplib's "0" for an empty body.
        res.set_header("Content-Length", std::to_string(st.st_size));
      }
      return;
    }
    // Ranges are ours (plan_ranges): httplib never sees a Range field (normalize_request_head
    // renames it kRangeField), so it neither parses nor applies one.
    const auto size = static_cast<std::uint64_t>(st.st_size);
    const std::string type(detail::content_type_for(file));
    detail::RangePlan plan;
    if (const std::string* range = field(detail::kRangeField.data())) {
      const std::string* if_range = field("If-Range");
      // The client's copy is not this one: the whole file, not the range.
      if (!if_range || detail::if_range_holds(*if_range, v)) plan = detail::plan_ranges(*range, size);
    }
    res.set_header("ETag", v.etag);
    res.set_header("Last-Modified", v.last_modified);
    if (plan.kind == detail::RangePlan::Kind::unsatisfiable) {
      ::close(fd);
      res.status = 416;
      res.set_header("Content-Range", "bytes */" + std::to_string(size));
      res.set_content("range not satisfiable\n", "text/plain");
      return;
    }
    // The body: each part of the file after its head, then the tail. The whole file is one
    // part without either (set below when it is streamed); one range, a part with a
    // Content-Range field; several, a multipart/byteranges body.
    std::vector<std::pair<std::uint64_t, std::uint64_t>> parts;
    detail::Byteranges layout;
    auto one_part = [&](std::uint64_t first, std::uint64_t last) {
      parts = {{first, last}};
      layout.heads.assign(1, std::string());
      layout.length = last - first + 1;
    };
    std::string content_type = type;
    if (plan.parts.size() > 1) {
      std::string boundary = new_boundary();
      layout = detail::byteranges_layout(plan.parts, size, type, boundary);
      content_type = "multipart/byteranges; boundary=" + boundary;
      parts = std::move(plan.parts);
      res.status = 206;
    } else if (plan.parts.size() == 1) {
      res.status = 206;
      auto [first, last] = plan.parts[0];
      res.set_header("Content-Range", "bytes " + std::to_string(first) + "-" +
                                          std::to_string(last) + "/" + std::to_string(size));
      one_part(first, last);
    }
    if (tl_inline) {
      // On a reactor: a small file is read whole (one open, fstat, read); a larger one is
      // streamed by a worker.
      if (size <= kInlineFileBytes) {
        std::string whole(static_cast<std::size_t>(size), '\0');
        std::size_t got = 0;
        while (got < whole.size()) {
          ssize_t n = ::read(fd, whole.data() + got, whole.size() - got);
          if (n < 0 && errno == EINTR) continue;
          if (n <= 0) break;
          got += static_cast<std::size_t>(n);
        }
        ::close(fd);
        if (got != whole.size()) {
          res.status = 404;
          res.set_content("not found\n", "text/plain");
          return;
        }
        if (res.status == 206) {
          std::string out;
          out.reserve(static_cast<std::size_t>(layout.length));
          for (std::size_t i = 0; i < parts.size(); ++i) {
            auto [first, last] = parts[i];
            out.append(layout.heads[i]);
            out.append(whole, static_cast<std::size_t>(first), static_cast<std::size_t>(last - first + 1));
          }
          out.append(layout.tail);
          whole = std::move(out);
        }
        res.body = std::move(whole);
        res.set_header("Content-Type", content_type);
        return;
      }
      ::close(fd);
      tl_inline->defer = true;
      return;
    }
    ::close(fd);
    if (res.status != 206 && size > 0) one_part(0, size - 1);
    auto body = std::make_shared<Body>();
    body->parts = std::move(parts);
    body->layout = std::move(layout);
    body->in.open(file, std::ios::binary);
    if (!body->in) {
      res.status = 404;
      res.set_content("not found\n", "text/plain");
      return;
    }
    // Streamed in chunks so a large file never sits in memory whole.
    res.set_content_provider(
        static_cast<size_t>(body->layout.length), content_type,
        [body](size_t offset, size_t length, httplib::DataSink& sink) {
          return body->write(offset, length, sink);
        });
  }

  // Body is a static answer streamed by a worker: the file's parts, each after its head, then
  // the tail (Byteranges).
  struct Body {
    std::ifstream in;
    std::vector<std::pair<std::uint64_t, std::uint64_t>> parts;
    detail::Byteranges layout;

    // write sends what comes at offset of the body, at most length bytes (one head, or up to
    // 64 KiB of one part); httplib calls it again from where it ended.
    bool write(std::uint64_t offset, std::uint64_t length, httplib::DataSink& sink) {
      std::uint64_t at = 0;
      auto text = [&](const std::string& t) {
        auto from = static_cast<std::size_t>(offset - at);
        return sink.write(t.data() + from, static_cast<std::size_t>(std::min<std::uint64_t>(t.size() - from, length)));
      };
      for (std::size_t i = 0; i < parts.size(); ++i) {
        const std::string& head = layout.heads[i];
        if (offset < at + head.size()) return text(head);
        at += head.size();
        const std::uint64_t len = parts[i].second - parts[i].first + 1;
        if (offset < at + len) {
          char chunk[64 * 1024];
          std::uint64_t want = std::min<std::uint64_t>({len - (offset - at), sizeof chunk, length});
          in.clear();
          in.seekg(static_cast<std::streamoff>(parts[i].first + (offset - at)));
          in.read(chunk, static_cast<std::streamsize>(want));
          auto n = in.gcount();
          if (n <= 0) return false;
          return sink.write(chunk, static_cast<size_t>(n));
        }
        at += len;
      }
      if (offset < at + layout.tail.size()) return text(layout.tail);
      return false;
    }
  };

  std::shared_ptr<const Routing> routing() const { return routing_cell.load(); }

  // --- connection table ----------------------------------------------------------------------

  bool register_open(int fd, bool admin) {
    std::lock_guard lock(open_mu);
    auto& set = admin ? admin_fds : open_fds;
    if (set.size() >= (admin ? kMaxAdminConnections : max_connections.load())) return false;
    set.insert(fd);
    return true;
  }

  void close_socket(Connection& c) {
    if (c.ssl && c.phase != Connection::Phase::handshake) {
      // Best effort close_notify; the socket is non-blocking so this never waits.
      SSL_shutdown(c.ssl.get());
      ERR_clear_error();
    }
    {
      std::lock_guard lock(open_mu);
      open_fds.erase(c.fd);
      admin_fds.erase(c.fd);
    }
    ::close(c.fd);
    c.fd = -1;
    open_cv.notify_all();
  }

  std::size_t open_count() {
    std::lock_guard lock(open_mu);
    return open_fds.size();
  }

  void wake_all() {
    for (auto& r : reactors) r->wake();
  }

  // --- reactors ------------------------------------------------------------------------------

  static void interest(Connection* c, uint32_t events) {
    epoll_event ev{};
    ev.events = events;
    ev.data.ptr = static_cast<Pollable*>(c);
    if (!c->registered) {
      ::epoll_ctl(c->home->epoll_fd, EPOLL_CTL_ADD, c->fd, &ev);
      c->registered = true;
    } else if (c->events != events) {
      ::epoll_ctl(c->home->epoll_fd, EPOLL_CTL_MOD, c->fd, &ev);
    }
    c->events = events;
  }

  void reactor_close(Connection* c) {
    if (c->closed) return;
    c->closed = true;
    Reactor& r = *c->home;
    // Removed from the epoll set explicitly: close() alone removes it only when no other copy
    // of the descriptor exists, and a hook's fork() holds copies until its exec. A stale entry
    // would return this Connection after the graveyard freed it. An event already returned in
    // this batch finds c->closed (c lives on in the graveyard until the batch is done).
    if (c->registered) ::epoll_ctl(r.epoll_fd, EPOLL_CTL_DEL, c->fd, nullptr);
    c->registered = false;
    close_socket(*c);
    auto it = r.owned.find(c);
    if (it != r.owned.end()) {
      r.graveyard.push_back(std::move(it->second));
      r.owned.erase(it);
    }
  }

  void dispatch(Connection* c) {
    Reactor& r = *c->home;
    if (c->registered) ::epoll_ctl(r.epoll_fd, EPOLL_CTL_DEL, c->fd, nullptr);
    c->registered = false;
    c->events = 0;
    c->phase = Connection::Phase::busy;
    auto it = r.owned.find(c);
    std::unique_ptr<Connection> owned_ptr = std::move(it->second);
    r.owned.erase(it);
    {
      std::lock_guard lock(work_mu);
      work.push_back(std::move(owned_ptr));
    }
    work_cv.notify_one();
  }

  // vet_head checks the request head at c.unread()[0, head) before anything reads it
  // (detail::check_request_head) and, when httplib must read another text, rewrites it in
  // c.buf (detail::normalize_request_head; head follows). Every head is vetted once, by the
  // reactor or by the worker that serves the request behind another. A check whose status is
  // not 0 is answered (detail::head_fault_response) and the connection closed; otherwise it
  // tells how the body is framed.
  detail::HeadCheck vet_head(Connection& c, std::size_t& head) {
    detail::HeadCheck check = detail::check_request_head(c.unread().substr(0, head));
    if (check.status != 0) {
      if (!c.listener->admin) ++bad_head;
      return check;
    }
    if (check.rewrite) {
      std::string normal = detail::normalize_request_head(c.unread().substr(0, head));
      c.buf.replace(c.pos, head, normal);
      head = normal.size();
    }
    return check;
  }

  void reply_and_close(Connection* c, std::string_view response) {
    // Best effort on a non-blocking socket: the client is misbehaving anyway.
    if (c->ssl) {
      ERR_clear_error();
      SSL_write(c->ssl.get(), response.data(), static_cast<int>(response.size()));
      ERR_clear_error();
    } else {
      [[maybe_unused]] auto n = ::send(c->fd, response.data(), response.size(), MSG_NOSIGNAL);
    }
    reactor_close(c);
  }

  // wait_hello: the client-hello callback answered retry (on-demand issuance under way).
  enum class Step { done, wait_read, wait_write, wait_hello, failed };

  // handshake_step runs the TLS handshake as far as it goes without blocking. It is the one
  // place a connection's handshake advances.
  Step handshake_step(Connection* c) {
    ERR_clear_error();
    c->hello_retry = false;
    int r = SSL_do_handshake(c->ssl.get());
    if (r == 1) return Step::done;
    int err = SSL_get_error(c->ssl.get(), r);
    if (err == SSL_ERROR_WANT_READ) return Step::wait_read;
    if (err == SSL_ERROR_WANT_WRITE) return Step::wait_write;
    if (err == SSL_ERROR_WANT_CLIENT_HELLO_CB) return Step::wait_hello;
    ERR_clear_error();
    return Step::failed;
  }

  // write_step writes c->out without blocking.
  Step write_step(Connection* c) {
    while (c->out_pos < c->out.size()) {
      const char* p = c->out.data() + c->out_pos;
      std::size_t left = c->out.size() - c->out_pos;
      if (c->ssl) {
        ERR_clear_error();
        // Retried with the same buffer after WANT_*, as SSL_write requires (out is untouched
        // until it has all gone).
        int n = SSL_write(c->ssl.get(), p, static_cast<int>(std::min<std::size_t>(left, 1 << 30)));
        if (n > 0) {
          c->out_pos += static_cast<std::size_t>(n);
          continue;
        }
        int err = SSL_get_error(c->ssl.get(), n);
        ERR_clear_error();
        if (err == SSL_ERROR_WANT_WRITE) return Step::wait_write;
        if (err == SSL_ERROR_WANT_READ) return Step::wait_read;
        return Step::failed;
      }
      ssize_t n = ::send(c->fd, p, left, MSG_NOSIGNAL);
      if (n >= 0) {
        c->out_pos += static_cast<std::size_t>(n);
        continue;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return Step::wait_write;
      return Step::failed;
    }
    c->out.clear();
    c->out_pos = 0;
    return Step::done;
  }

  // next_request puts a connection whose response has gone out back on the wait for its next
  // request (idle deadline, or header deadline when bytes of it are already here).
  void next_request(Connection& c) {
    c.compact();
    c.phase = Connection::Phase::header;
    c.header_started = !c.unread().empty();
    c.keep_alive_wait = true;
    c.deadline = SteadyClock::now() +
                 (c.header_started ? c.lim->timeouts.header : c.lim->timeouts.idle);
  }

  Router& router_for(const Connection& c) {
    return c.listener->admin ? admin_router
           : c.listener->tls ? c.lim->https_router
                             : c.lim->http_router;
  }

  // closing: the connection ends after the request under way (drain, or its listener was
  // removed by a reload).
  bool closing(const Connection& c) const {
    return draining.load() || c.listener->retired.load(std::memory_order_relaxed);
  }

  // current_limits is the Limits for a connection this reactor accepts now.
  const std::shared_ptr<Limits>& current_limits(Reactor& r) {
    if (limits_version.load(std::memory_order_acquire) != r.lim_version) {
      std::lock_guard lock(limits_mu);
      r.lim = limits;
      r.lim_version = limits_version.load();
    }
    return r.lim;
  }

  // serve_fast answers, without httplib, the request a keep-alive client sends most: GET or
  // HEAD of a small file of a static site, no body, nothing in the header that changes the
  // answer (Range, Accept-Encoding, Expect, ...), access log off. It writes into c->out the
  // bytes httplib would write for it (same header fields in the same order; the tests compare
  // both paths) and consumes the request. Anything else returns false with nothing sent or
  // consumed, and httplib handles the request. httplib spends some 40,000 instructions a
  // request on parsing into std::multimap and std::string, case-folding with tolower(),
  // snprintf and a std::stringstream; this is a few thousand.
  bool serve_fast(Connection* c, std::size_t head, bool close_connection,
                  bool& connection_closed) {
    if (c->listener->admin) return false;
    auto start = SteadyClock::now();
    auto req = detail::parse_fast_request(c->unread().substr(0, head), CPPHTTPLIB_HEADER_MAX_LENGTH);
    if (!req) return false;
    const std::string_view target = req->target, conn_value = req->connection;
    const bool is_head = req->head, http10 = req->http10;
    auto host = detail::host_of(req->host);
    if (!host) return false;
    auto r = routing();
    if (r->access_log.enabled) return false;  // the log line is built from httplib's Request
    if (!c->listener->tls &&
        (r->redirect_to_https || detail::acme_challenge_token(target))) {
      return false;  // handle_http's redirect or challenge
    }
    const Site* site = r->site_for(*host);
    const auto* s = site ? std::get_if<StaticSite>(site) : nullptr;
    if (!s || !s->headers.empty()) return false;  // httplib's path puts the site's fields on
    int fd = -1;
    std::filesystem::path file;
    struct stat st {};
    if (open_beneath(*s, target, fd, file, &st) != detail::StaticLookup::found) {
      if (fd >= 0) ::close(fd);
      return false;
    }
    std::size_t size = static_cast<std::size_t>(st.st_size);
    if (static_cast<std::uintmax_t>(st.st_size) > kInlineFileBytes) {
      ::close(fd);
      return false;
    }
    // httplib: "Connection: close" when asked to close or the client said close, else
    // Keep-Alive; the post-routing handler turns it into close when draining or retired.
    bool say_close = close_connection || conn_value == "close" || draining.load() ||
                     c->listener->retired.load();
    std::string& out = c->out;
    out.clear();
    out += "HTTP/1.1 200 OK\r\n";
    // httplib writes its header multimap in case-insensitive name order.
    if (is_head) out += "Accept-Ranges: bytes\r\n";
    if (say_close) out += "Connection: close\r\n";
    char num[24];
    auto append_num = [&](std::uintmax_t v) {
      auto [end, ec] = std::to_chars(num, num + sizeof num, v);
      out.append(num, static_cast<std::size_t>(end - num));
    };
    auto v = detail::file_validators(st);
    out += "Content-Length: ";
    append_num(size);
    out += "\r\nContent-Type: ";
    out += detail::content_type_for(file);
    out += "\r\nETag: ";
    out += v.etag;
    out += "\r\n";
    if (!say_close) {
      out += "Keep-Alive: timeout=";
      append_num(static_cast<std::uintmax_t>(std::max<long long>(
          1, std::chrono::duration_cast<std::chrono::seconds>(c->lim->timeouts.idle).count())));
      out += ", max=";
      append_num(c->lim->keep_alive_max_requests);
      out += "\r\n";
    }
    out += "Last-Modified: ";
    out += v.last_modified;
    out += "\r\n";
    if (c->listener->tls && r->hsts_max_age.count() > 0) {
      out += "Strict-Transport-Security: max-age=";
      append_num(static_cast<std::uintmax_t>(r->hsts_max_age.count()));
      if (r->hsts_include_subdomains) out += "; includeSubDomains";
      out += "\r\n";
    }
    out += "\r\n";
    // The body is read for HEAD too, as serve_static does: a file that shrank meanwhile is
    // left to httplib's path (which opens it again), never answered short.
    std::size_t at = out.size();
    out.resize(at + size);
    std::size_t got = 0;
    while (got < size) {
      ssize_t n = ::read(fd, out.data() + at + got, size - got);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      got += static_cast<std::size_t>(n);
    }
    ::close(fd);
    if (got != size) {
      out.clear();
      return false;
    }
    if (is_head) out.resize(at);
    c->pos += head;
    connection_closed = conn_value == "close" || (http10 && conn_value != "Keep-Alive");
    latency.observe(SteadyClock::now() - start);
    return true;
  }

  // serve_inline runs the request at c->unread() (complete, body included) on the reactor.
  // Returns false when the handler deferred it to a worker (already dispatched).
  bool serve_inline(Connection* c, std::size_t head) {
    std::size_t start = c->pos;
    InlineRequest state;
    tl_inline = &state;
    ConnStream stream(*c, c->lim->timeouts.read, c->lim->timeouts.write, /*inline_mode=*/true);
    bool close_connection = closing(*c) || c->requests + 1 >= c->lim->keep_alive_max_requests;
    bool connection_closed = false;
    t_close_after = false;
    t_no_hsts = false;
    tl_conn = c;
    bool ok = serve_fast(c, head, close_connection, connection_closed) ||
              router_for(*c).serve(stream, close_connection, connection_closed);
    tl_conn = nullptr;
    tl_inline = nullptr;
    if (state.defer) {
      c->pos = start;
      c->out.clear();
      c->out_pos = 0;
      c->prefer_worker = true;
      dispatch(c);
      return false;
    }
    ++c->requests;
    if (!c->listener->admin) ++requests;
    c->close_after_write =
        !ok || connection_closed || close_connection || t_close_after || closing(*c);
    c->phase = Connection::Phase::writing;
    c->deadline = SteadyClock::now() + c->lim->timeouts.write;
    return true;
  }

  // advance moves a reactor-owned connection as far as it can go without blocking.
  void advance(Connection* c) {
    if (c->phase == Connection::Phase::handshake) {
      switch (handshake_step(c)) {
        case Step::wait_read:
          return interest(c, EPOLLIN);
        case Step::wait_write:
          return interest(c, EPOLLOUT);
        case Step::wait_hello:
          return wait_hello(c);
        case Step::failed:
          ++handshake_failed;
          return reactor_close(c);
        case Step::done:
          // Counted before the request is read, so a client that got its answer is counted.
          // (The admin listener is plain HTTP: every handshake is a client one.)
          ++handshakes;
          break;
      }
      c->phase = Connection::Phase::header;
      c->deadline = SteadyClock::now() + c->lim->timeouts.header;
    }
    for (;;) {
      if (c->phase == Connection::Phase::writing) {
        switch (write_step(c)) {
          case Step::wait_read:
            return interest(c, EPOLLIN);
          case Step::wait_write:
            return interest(c, EPOLLOUT);
          case Step::wait_hello:  // a handshake-only state; write_step never returns it
          case Step::failed:
            return reactor_close(c);
          case Step::done:
            break;
        }
        // A drain that began while the response was going out ends the connection too (the
        // reactor's sweep of idle connections at the drain's start has passed it by).
        if (c->close_after_write || closing(*c)) return reactor_close(c);
        next_request(*c);
      }
      // RFC 9112 §2.2: a server SHOULD ignore at least one empty line before the request line.
      while (c->pos < c->buf.size() && (c->buf[c->pos] == '\r' || c->buf[c->pos] == '\n')) {
        ++c->pos;
      }
      if (c->pos == c->buf.size()) {
        c->buf.clear();
        c->pos = 0;
      }
      if (std::size_t head = detail::header_end(c->unread()); head != 0) {
        detail::HeadCheck check = vet_head(*c, head);
        if (check.status != 0) return reply_and_close(c, detail::head_fault_response(check));
        // Handlers that never block run here; anything that may wait goes to a worker (so
        // does a request whose body is not all here yet).
        if (c->listener->admin || c->prefer_worker || check.chunked ||
            c->unread().size() - head < check.content_length) {
          return dispatch(c);
        }
        if (!serve_inline(c, head)) return;
        continue;  // write the response
      }
      if (c->unread().size() > c->lim->max_header_bytes) {
        ++header_too_large;
        return reply_and_close(c,
                               "HTTP/1.1 431 Request Header Fields Too Large\r\n"
                               "Content-Length: 0\r\nConnection: close\r\n\r\n");
      }
      char tmp[16 * 1024];
      ssize_t n;
      uint32_t wait_for = EPOLLIN;
      if (c->ssl) {
        ERR_clear_error();
        int r = SSL_read(c->ssl.get(), tmp, sizeof tmp);
        n = r;
        if (r <= 0) {
          int err = SSL_get_error(c->ssl.get(), r);
          ERR_clear_error();
          if (err == SSL_ERROR_WANT_WRITE) wait_for = EPOLLOUT;
          if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE) return reactor_close(c);
        }
      } else {
        n = ::recv(c->fd, tmp, sizeof tmp, 0);
        if (n == 0) return reactor_close(c);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return reactor_close(c);
      }
      if (n <= 0) return interest(c, wait_for);
      if (!c->header_started) {
        c->header_started = true;
        // A kept-alive connection was on its idle deadline; its request gets the header one.
        if (c->keep_alive_wait) c->deadline = SteadyClock::now() + c->lim->timeouts.header;
        if (cfg.on_header_started && !c->listener->admin) cfg.on_header_started();
      }
      c->buf.append(tmp, static_cast<size_t>(n));
    }
  }

  // wait_hello parks a connection whose client-hello callback answered retry: out of epoll (a
  // readable or hung-up socket must not spin the loop), re-driven by retry_hellos().
  void wait_hello(Connection* c) {
    if (c->registered) ::epoll_ctl(c->home->epoll_fd, EPOLL_CTL_DEL, c->fd, nullptr);
    c->registered = false;
    c->events = 0;
    c->hello_retry = true;
    c->retry_at = SteadyClock::now() + milliseconds(25);
    c->home->parked_hellos.push_back(c);
  }

  void retry_hellos(Reactor& r, SteadyClock::time_point now) {
    if (r.parked_hellos.empty()) return;
    std::vector<Connection*> parked;
    parked.swap(r.parked_hellos);
    for (Connection* c : parked) {
      // A parked connection may have been closed (deadline, drain) and freed since.
      if (!r.owned.count(c) || c->closed || !c->hello_retry) continue;
      if (now < c->retry_at) {
        r.parked_hellos.push_back(c);
      } else if (now < c->deadline) {
        advance(c);  // may park it again
      }
    }
  }

  // Connections accepted per listener wake-up: a reactor takes a few and leaves the rest of
  // the queue to the others, so the handshakes spread over the cores.
  static constexpr int kAcceptBatch = 8;

  void on_accept(Reactor& r, Listener& l) {
    for (int i = 0; i < kAcceptBatch; ++i) {
      sockaddr_storage ss{};
      socklen_t len = sizeof ss;
      const int lfd = l.fd.load();
      if (lfd < 0) return;  // retired by a reload meanwhile
      int fd = ::accept4(lfd, reinterpret_cast<sockaddr*>(&ss), &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd >= 0 && (l.retired.load() || l.fd.load() != lfd)) {
        // A reload closed this listener while we were accepting: the descriptor number may
        // already name another socket (a newly bound listener), so the connection is not ours.
        ::close(fd);
        return;
      }
      if (fd < 0) {
        if (errno == EINTR || errno == ECONNABORTED) continue;
        const int err = errno;
        if (err == EMFILE || err == ENFILE) {
          Shed shed = shed_pending(lfd, l, err);
          if (shed == Shed::closed_one) continue;
          if (shed == Shed::queue_empty) return;
        }
        if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) {
          // Out of descriptors (and the reserve in use by another reactor or not retaken) or
          // of kernel memory: the listener stays readable, so stop polling it for a moment
          // instead of spinning.
          log->log(LogLevel::warn, kLog, "accept paused", {{"error", errno_text(err)}});
          pause_accept(r);
        }
        return;
      }
      if (spare_fd.load(std::memory_order_relaxed) < 0 && !take_spare()) {
        // Out of descriptors with the reserve gone: another reactor's shed freed it and this
        // accept took that slot. Shed this connection instead and make its slot the reserve
        // again, or every later EMFILE would find no reserve until a connection closes.
        ::close(fd);
        if (!l.admin) {
          ++accepted;
          ++rejected;
        }
        take_spare();
        continue;
      }
      if (!l.admin) ++accepted;
      if (!register_open(fd, l.admin)) {
        if (!l.admin) ++rejected;
        ::close(fd);
        continue;
      }
      auto c = std::make_unique<Connection>();
      c->fd = fd;
      c->listener = &l;
      c->home = &r;
      c->lim = current_limits(r);
      int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      addr_to_text(ss, c->remote_ip, c->remote_port);
      if (!l.wildcard) {
        c->local_ip = l.address;
        c->local_port = l.port;
      } else {
        sockaddr_storage local{};
        socklen_t local_len = sizeof local;
        if (::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &local_len) == 0) {
          addr_to_text(local, c->local_ip, c->local_port);
        }
      }
      auto now = SteadyClock::now();
      if (l.tls) {
        c->ssl.reset(SSL_new(tls_context(r)));
        if (!c->ssl || SSL_set_fd(c->ssl.get(), fd) != 1) {
          ERR_clear_error();
          close_socket(*c);
          continue;
        }
        SSL_set_accept_state(c->ssl.get());
        c->phase = Connection::Phase::handshake;
        c->deadline = now + c->lim->timeouts.handshake;
      } else {
        c->phase = Connection::Phase::header;
        c->deadline = now + c->lim->timeouts.header;
      }
      Connection* raw = c.get();
      r.owned.emplace(raw, std::move(c));
      // The client speaks first, but its ClientHello / request is often not here yet at
      // accept: wait for epoll rather than try a read that would mostly fail.
      interest(raw, EPOLLIN);
    }
  }

  // take_spare opens the reserve descriptor if it is not held (create, and after a shed whose
  // reopen found no free descriptor). Returns false only when that failed for want of a
  // descriptor (EMFILE/ENFILE); a /dev/null that cannot be opened at all (a chroot without it)
  // turns the reserve off for good.
  bool take_spare() {
    if (spare_fd.load() >= 0 || spare_off.load(std::memory_order_relaxed)) return true;
    int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      if (errno == EMFILE || errno == ENFILE) return false;
      spare_off = true;
      return true;
    }
    int expected = -1;
    if (!spare_fd.compare_exchange_strong(expected, fd)) ::close(fd);  // another took it first
    return true;
  }

  // shed_pending is called when accept failed with EMFILE/ENFILE (err): it frees the reserve
  // descriptor, accepts one pending connection of listener lfd on it and closes it at once, so
  // its client sees the connection closed instead of waiting in the backlog; then it takes the
  // reserve back. unable when it could not (no reserve, or another thread took the freed
  // descriptor first): the caller pauses accepting as before.
  enum class Shed { closed_one, queue_empty, unable };
  Shed shed_pending(int lfd, Listener& l, int err) {
    int spare = spare_fd.exchange(-1);
    if (spare < 0) {
      take_spare();  // a descriptor may have been freed since the last attempt
      spare = spare_fd.exchange(-1);
      if (spare < 0) return Shed::unable;
    }
    ::close(spare);
    int fd = ::accept4(lfd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    const int accept_err = errno;
    if (fd >= 0) {
      ::close(fd);  // FIN: the client sees EOF at once
      if (!l.admin) {
        ++accepted;  // as a connection over max_connections is: accepted, then rejected
        ++rejected;
      }
    }
    take_spare();
    if (fd < 0) {
      // Another reactor emptied the queue meanwhile, or the freed descriptor went elsewhere.
      return accept_err == EAGAIN || accept_err == EWOULDBLOCK ? Shed::queue_empty : Shed::unable;
    }
    // One warning a second at most: a flood would otherwise write one line per connection.
    ++shed_since_log;
    auto now = SteadyClock::now().time_since_epoch().count();
    auto last = shed_logged_at.load();
    if (now - last >= std::chrono::nanoseconds(std::chrono::seconds(1)).count() &&
        shed_logged_at.compare_exchange_strong(last, now)) {
      log->log(LogLevel::warn, kLog, "out of file descriptors: connections closed at accept",
               {{"error", errno_text(err)},
                {"listener", l.name},
                {"closed", std::to_string(shed_since_log.exchange(0))}});
    }
    return Shed::closed_one;
  }

  void pause_accept(Reactor& r) {
    if (r.accept_paused) return;
    std::lock_guard lock(listen_mu);
    for (auto& l : listeners) {
      if (l->fd >= 0) ::epoll_ctl(r.epoll_fd, EPOLL_CTL_DEL, l->fd, nullptr);
    }
    r.accept_paused = true;
    r.accept_resume = SteadyClock::now() + milliseconds(100);
  }

  void watch_listeners(Reactor& r) {
    std::lock_guard lock(listen_mu);
    for (auto& l : listeners) {
      if (l->fd < 0) continue;
      epoll_event ev{};
      // EPOLLEXCLUSIVE: one connection wakes one of the reactors blocked in epoll_wait, not all.
      ev.events = EPOLLIN | EPOLLEXCLUSIVE;
      ev.data.ptr = static_cast<Pollable*>(l.get());
      ::epoll_ctl(r.epoll_fd, EPOLL_CTL_ADD, l->fd, &ev);
    }
  }

  // close_listeners closes the client listeners; the admin listener too when include_admin (at
  // the very end), so /readyz keeps answering 503 while the drain runs. Closing a descriptor
  // removes it from every reactor's epoll set.
  void close_listeners(bool include_admin) {
    std::lock_guard lock(listen_mu);
    if (listeners_closed && !include_admin) return;
    listeners_closed = true;
    for (auto& l : listeners) {
      if (l->fd < 0 || (l->admin && !include_admin)) continue;
      ::close(l->fd.exchange(-1));
    }
  }

  void expire(Reactor& r, SteadyClock::time_point now) {
    std::vector<Connection*> expired;
    for (auto& [raw, c] : r.owned) {
      if (now >= c->deadline) expired.push_back(raw);
    }
    for (Connection* c : expired) {
      if (c->listener->admin) {
        // Admin connections stay out of the client counters.
      } else if (c->phase == Connection::Phase::handshake) {
        ++handshake_timeout;
      } else if (c->phase == Connection::Phase::writing) {
        // The client did not take its response within timeouts.write.
        ++write_timeout;
      } else if (c->keep_alive_wait && !c->header_started) {
        ++idle_closed;
      } else {
        ++header_timeout;
      }
      reactor_close(c);
    }
  }

  void reactor_loop(Reactor& r) {
    std::vector<epoll_event> events(256);
    while (!stop_reactor.load()) {
      // 50 ms bounds how late a deadline fires; a timer wheel can replace the scan later.
      int n = ::epoll_wait(r.epoll_fd, events.data(), static_cast<int>(events.size()), 50);
      for (int i = 0; i < n; ++i) {
        auto* p = static_cast<Pollable*>(events[i].data.ptr);
        switch (p->kind) {
          case Pollable::Kind::wake: {
            uint64_t v;
            [[maybe_unused]] auto rd = ::read(r.wake_fd, &v, sizeof v);
            break;
          }
          case Pollable::Kind::listener:
            if (auto* l = static_cast<Listener*>(p); l->fd >= 0) on_accept(r, *l);
            break;
          case Pollable::Kind::connection: {
            auto* c = static_cast<Connection*>(p);
            if (!c->closed) advance(c);
            break;
          }
        }
      }
      std::vector<std::unique_ptr<Connection>> returned;
      {
        std::lock_guard lock(r.back_mu);
        returned.swap(r.back);
      }
      for (auto& c : returned) {
        Connection* raw = c.get();
        r.owned.emplace(raw, std::move(c));
        if (closing(*raw) && !raw->header_started && !raw->listener->admin) {
          reactor_close(raw);  // came back after the drain's (or a retirement's) sweep
          continue;
        }
        // Bytes may already wait inside OpenSSL or our buffer, where epoll cannot see them.
        advance(raw);
      }
      auto now = SteadyClock::now();
      if (r.accept_paused && now >= r.accept_resume) {
        r.accept_paused = false;
        watch_listeners(r);
      }
      if (draining.load() && !r.drain_seen) {
        r.drain_seen = true;
        close_listeners(false);
        // Client connections with no request under way have nothing to finish. Admin ones
        // stay: a probe that connected just now must still get its 503, and shutdown does not
        // wait for them.
        std::vector<Connection*> idle;
        for (auto& [raw, c] : r.owned) {
          if (!c->header_started && !c->listener->admin) idle.push_back(raw);
        }
        for (Connection* c : idle) reactor_close(c);
      }
      if (auto v = retired_version.load(); v != r.retired_seen) {
        r.retired_seen = v;
        // A reload removed listeners: their connections with no request under way close now,
        // the others after their response (closing()).
        std::vector<Connection*> idle;
        for (auto& [raw, c] : r.owned) {
          if (!c->header_started && c->listener->retired.load()) idle.push_back(raw);
        }
        for (Connection* c : idle) reactor_close(c);
      }
      // Deadlines are checked every 50 ms, not after every batch of events: under load a batch
      // is a handful of events and the scan would cost more than they do.
      if (now >= r.next_expire_scan) {
        expire(r, now);
        r.next_expire_scan = now + milliseconds(50);
      }
      retry_hellos(r, now);
      r.graveyard.clear();
    }
    for (auto& [raw, c] : r.owned) {
      c->closed = true;
      close_socket(*c);
    }
    r.owned.clear();
  }

  // --- reload ---------------------------------------------------------------------------------

  // resize_workers makes the pool n threads: missing ones start at once, extra ones leave when
  // next idle (a request in flight finishes first). Threads that have left are joined here.
  void resize_workers(std::size_t n) {
    {
      std::lock_guard lock(work_mu);
      worker_target = n;
      add_workers_locked();
    }
    work_cv.notify_all();
  }

  // add_workers_locked starts the workers missing from worker_target, and
  // joins those that have left (they hold no lock, and are past worker_loop). Under work_mu;
  // never once shutdown has stopped the pool.
  void add_workers_locked() {
    if (work_stop) return;
    std::erase_if(workers, [](const std::unique_ptr<Worker>& w) {
      if (!w->done.load()) return false;
      w->thread.join();
      return true;
    });
    for (; worker_running < worker_target; ++worker_running) {
      auto w = std::make_unique<Worker>();
      Worker* raw = w.get();
      try {
        w->thread = std::thread([this, raw] {
          worker_loop();
          raw->done = true;
        });
      } catch (const std::system_error& e) {
        // Out of threads (RLIMIT_NPROC, memory): the pool stays smaller; the next call tries
        // again. Never an exception out of a request handler or a reload.
        log->log(LogLevel::error, kLog, "cannot start a worker thread", {{"error", e.what()}});
        return;
      }
      workers.push_back(std::move(w));
    }
  }

  // reload_listeners makes the open listeners of one kind (https, http or admin) those of
  // want. A listener whose configured endpoint is still wanted is kept as it is (never closed
  // or rebound, its connections untouched); new endpoints are bound; the others are retired:
  // closed at once, their connections closed once idle. All or nothing: when a new endpoint
  // cannot be bound, those bound so far are closed again, nothing changes and the bind error
  // is returned. Controlling thread only.
  Status reload_listeners(const std::vector<Endpoint>& want, bool tls, bool admin,
                          int backlog) {
    std::vector<Listener*> current;
    for (auto& l : listeners) {
      if (l->tls == tls && l->admin == admin && !l->retired.load() && l->fd >= 0) {
        current.push_back(l.get());
      }
    }
    auto wanted = [&](const Endpoint& ep) {
      return std::any_of(want.begin(), want.end(),
                         [&](const Endpoint& w) { return same_endpoint(w, ep); });
    };
    std::vector<std::unique_ptr<Listener>> added;
    for (const auto& ep : want) {
      bool have = std::any_of(current.begin(), current.end(),
                              [&](const Listener* l) { return same_endpoint(l->configured, ep); });
      if (have) continue;
      auto l = bind_listener(ep, tls, admin, backlog);
      if (!l) {
        for (auto& a : added) ::close(a->fd.exchange(-1));
        return fail(l.error());
      }
      added.push_back(std::move(*l));
    }
    std::vector<Listener*> removed;
    for (Listener* l : current) {
      if (!wanted(l->configured)) removed.push_back(l);
    }
    if (added.empty() && removed.empty()) return {};
    {
      std::lock_guard lock(listen_mu);
      for (Listener* l : removed) {
        l->retired = true;
        int fd = l->fd.exchange(-1);
        // Out of every epoll set before the close: a copy of the descriptor (a hook's fork
        // before its exec) would otherwise keep the registration alive.
        for (auto& r : reactors) ::epoll_ctl(r->epoll_fd, EPOLL_CTL_DEL, fd, nullptr);
        ::close(fd);
        log->log(LogLevel::info, kLog, "listener closed", {{"listener", l->name}});
      }
      for (auto& a : added) {
        for (auto& r : reactors) {
          epoll_event ev{};
          ev.events = EPOLLIN | EPOLLEXCLUSIVE;
          ev.data.ptr = static_cast<Pollable*>(a.get());
          ::epoll_ctl(r->epoll_fd, EPOLL_CTL_ADD, a->fd, &ev);
        }
        if (started.load()) {
          log->log(LogLevel::info, kLog, "listening",
                   {{"listener", a->name}, {"port", std::to_string(a->port)}});
        }
        listeners.push_back(std::move(a));
      }
      if (!removed.empty()) retired_version.fetch_add(1);
    }
    wake_all();  // the reactors sweep the idle connections of retired listeners now
    return {};
  }

  // refresh_ports recomputes https_port / http_port / admin_port: the port of the listener of
  // the first configured endpoint of each kind.
  void refresh_ports() {
    auto port_of = [&](const std::vector<Endpoint>& eps, bool tls, bool admin) {
      for (const auto& ep : eps) {
        for (auto& l : listeners) {
          if (l->tls == tls && l->admin == admin && !l->retired.load() &&
              same_endpoint(l->configured, ep)) {
            return l->port;
          }
        }
      }
      return 0;
    };
    https_port = port_of(cfg.https, true, false);
    http_port = port_of(cfg.http, false, false);
    std::vector<Endpoint> admin_eps;
    if (cfg.admin.endpoint) admin_eps.push_back(*cfg.admin.endpoint);
    admin_port = port_of(admin_eps, false, true);
  }

  // --- tunnels -------------------------------------------------------------------------------

  // start_tunnel hands a tunnel and its client connection to the tunnel thread (started with
  // the first). During shutdown, or when the thread cannot be had, the tunnel ends at once.
  void start_tunnel(std::unique_ptr<Connection> c, std::unique_ptr<detail::Tunnel> t) {
    auto e = std::make_unique<TunnelEntry>();
    e->conn = std::move(c);
    e->tunnel = std::move(t);
    {
      std::lock_guard lock(tunnel_mu);
      if (!tunnel_stop && start_tunnel_thread_locked()) tunnel_new.push_back(std::move(e));
    }
    if (e) {
      e->tunnel->finish(detail::Tunnel::End::cut);
      close_socket(*e->conn);
      return;
    }
    wake_tunnels();
  }

  void wake_tunnels() {
    uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(tunnel_wake, &one, sizeof one);
  }

  // start_tunnel_thread_locked starts the tunnel thread unless it runs; false when it cannot
  // (no descriptors, no threads: logged). Under tunnel_mu.
  bool start_tunnel_thread_locked() {
    if (tunnel_thread.joinable()) return true;
    if (tunnel_epoll < 0) tunnel_epoll = ::epoll_create1(EPOLL_CLOEXEC);
    if (tunnel_wake < 0) tunnel_wake = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.ptr = nullptr;  // the wake-up
    if (tunnel_epoll < 0 || tunnel_wake < 0 ||
        (::epoll_ctl(tunnel_epoll, EPOLL_CTL_ADD, tunnel_wake, &ev) != 0 && errno != EEXIST)) {
      log->log(LogLevel::error, kLog, "cannot start the tunnel thread",
               {{"error", std::strerror(errno)}});
      return false;
    }
    try {
      tunnel_thread = std::thread([this] { tunnel_loop(); });
    } catch (const std::system_error& ex) {
      log->log(LogLevel::error, kLog, "cannot start the tunnel thread", {{"error", ex.what()}});
      return false;
    }
    return true;
  }

  // tunnel_loop runs every tunnel: each is run when one of its sockets reports an event, at
  // once when its last run stopped on its share of bytes, and once past its idle deadline
  // (checked every 200 ms). At tunnel_stop the ones left are cut.
  void tunnel_loop() {
    using End = detail::Tunnel::End;
    std::unordered_map<TunnelEntry*, std::unique_ptr<TunnelEntry>> live;
    std::vector<epoll_event> events(128);
    std::vector<TunnelEntry*> batch, again;
    auto next_scan = SteadyClock::now() + milliseconds(200);
    auto end = [&](TunnelEntry* e, End how) {
      ::epoll_ctl(tunnel_epoll, EPOLL_CTL_DEL, e->conn->fd, nullptr);
      ::epoll_ctl(tunnel_epoll, EPOLL_CTL_DEL, e->tunnel->upstream_fd(), nullptr);
      e->tunnel->finish(how);
      close_socket(*e->conn);
      live.erase(e);
    };
    auto queue = [&](TunnelEntry* e) {
      if (e->queued) return;
      e->queued = true;
      batch.push_back(e);
    };
    for (;;) {
      int n = ::epoll_wait(tunnel_epoll, events.data(), static_cast<int>(events.size()),
                           again.empty() ? 200 : 0);
      batch.clear();
      for (TunnelEntry* e : again) queue(e);
      again.clear();
      for (int i = 0; i < n; ++i) {
        auto* e = static_cast<TunnelEntry*>(events[i].data.ptr);
        if (!e) {
          uint64_t v;
          [[maybe_unused]] auto rd = ::read(tunnel_wake, &v, sizeof v);
          continue;
        }
        queue(e);
      }
      std::vector<std::unique_ptr<TunnelEntry>> fresh;
      bool stop;
      {
        std::lock_guard lock(tunnel_mu);
        fresh.swap(tunnel_new);
        stop = tunnel_stop;
      }
      for (auto& f : fresh) {
        TunnelEntry* e = f.get();
        live.emplace(e, std::move(f));
        epoll_event ev{};
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
        ev.data.ptr = e;
        if (::epoll_ctl(tunnel_epoll, EPOLL_CTL_ADD, e->conn->fd, &ev) != 0 ||
            ::epoll_ctl(tunnel_epoll, EPOLL_CTL_ADD, e->tunnel->upstream_fd(), &ev) != 0) {
          end(e, End::failed);
          continue;
        }
        queue(e);
      }
      if (stop) {
        std::vector<TunnelEntry*> all;
        for (auto& [raw, e] : live) all.push_back(raw);
        for (TunnelEntry* e : all) end(e, End::cut);
        return;
      }
      for (TunnelEntry* e : batch) {
        e->queued = false;
        bool more = false;
        End how = e->tunnel->run(more);
        if (how != End::open) {
          end(e, how);
        } else if (more) {
          again.push_back(e);
        }
      }
      auto now = SteadyClock::now();
      if (now >= next_scan) {
        next_scan = now + milliseconds(200);
        // The ones past their idle deadline run in the next round (at once: `again` makes the
        // wait zero), where run() ends them as idle unless a byte moves.
        for (auto& [raw, e] : live) {
          if (now >= e->tunnel->deadline()) again.push_back(raw);
        }
      }
    }
  }

  // --- workers -------------------------------------------------------------------------------

  void worker_loop() {
    for (;;) {
      std::unique_ptr<Connection> c;
      {
        std::unique_lock lock(work_mu);
        work_cv.wait(lock, [&] {
          return work_stop || !work.empty() || worker_running > worker_target;
        });
        if (work.empty() || worker_running > worker_target) {
          --worker_running;  // stopping, or a reload made the pool smaller
          return;
        }
        c = std::move(work.front());
        work.pop_front();
      }
      serve(std::move(c));
    }
  }

  void serve(std::unique_ptr<Connection> c) {
    Router& router = router_for(*c);
    ConnStream::TimeoutCounters hits{};
    if (!c->listener->admin) hits = {&read_timeout, &write_timeout};
    ConnStream stream(*c, c->lim->timeouts.read, c->lim->timeouts.write, false, hits);
    for (;;) {
      bool close_connection =
          closing(*c) || c->requests + 1 >= c->lim->keep_alive_max_requests;
      bool connection_closed = false;
      t_close_after = false;
      t_no_hsts = false;
      c->read_timed_out.store(false, std::memory_order_relaxed);
      tl_conn = c.get();
      tl_stream = &stream;
      bool ok = router.serve(stream, close_connection, connection_closed);
      tl_conn = nullptr;
      tl_stream = nullptr;
      if (t_tunnel) {
        // The connection is a tunnel's now (its stream was hijacked: nothing more to flush).
        ++c->requests;
        ++requests;
        start_tunnel(std::move(c), std::move(t_tunnel));
        return;
      }
      ok = stream.flush() && ok;
      ++c->requests;
      if (!c->listener->admin) ++requests;
      if (!ok || connection_closed || close_connection || t_close_after || closing(*c)) {
        close_socket(*c);
        return;
      }
      // A pipelined request that is already here in full is served without a round trip
      // through the reactor.
      auto u = c->unread();
      auto start = u.find_first_not_of("\r\n");
      if (start == std::string_view::npos) break;
      std::size_t head = detail::header_end(u.substr(start));
      if (head == 0) break;
      c->pos += start;
      if (detail::HeadCheck check = vet_head(*c, head); check.status != 0) {
        std::string refusal = detail::head_fault_response(check);
        stream.write(refusal.data(), refusal.size());
        stream.flush();
        close_socket(*c);
        return;
      }
    }
    next_request(*c);
    Reactor& home = *c->home;
    bool first;
    {
      std::lock_guard lock(home.back_mu);
      first = home.back.empty();
      home.back.push_back(std::move(c));
    }
    // One wake-up per batch: a queue that was not empty already has one on its way (its first
    // connection's), and the reactor takes the whole queue after reading its events, so it
    // cannot miss this one. Saves a write(2), and often a reactor wake-up, per request served
    // by a worker under load.
    if (first) home.wake();
  }
};

Server::Server(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Server::~Server() {
  if (impl_) shutdown(milliseconds(0));
}

Result<std::unique_ptr<Server>> Server::create(ServerConfig config,
                                               std::shared_ptr<tlsreload::CertStore> store,
                                               std::shared_ptr<tlsreload::ChallengeStore> challenges,
                                               Logger* logger) {
  if (!store) return fail(Errc::invalid_input, "server: no certificate store");
  auto impl = std::make_unique<Impl>();
  impl->cfg = std::move(config);
  impl->store = std::move(store);
  impl->challenges = std::move(challenges);
  if (logger) impl->log = logger;

  if (auto st = impl->validate_and_resolve(); !st) return fail(st.error());
  // The TLS context only when an https listener needs it: the http-01 responder of `issue` has
  // none, and building one (SSL_CTX_new, ticket keys from the DRBG) there competed for
  // OpenSSL's locks with the client's own SSL_CTX_new on the way to the CA. A reload that adds
  // the first https listener builds it then.
  if (!impl->cfg.https.empty()) {
    if (auto st = impl->build_tls(); !st) return fail(st.error());
  }
  for (const auto& ep : impl->cfg.https) {
    auto l = impl->bind_listener(ep, true, false, impl->cfg.backlog);
    if (!l) return fail(l.error());
    if (impl->https_port == 0) impl->https_port = (*l)->port;
    impl->listeners.push_back(std::move(*l));
  }
  for (const auto& ep : impl->cfg.http) {
    auto l = impl->bind_listener(ep, false, false, impl->cfg.backlog);
    if (!l) return fail(l.error());
    if (impl->http_port == 0) impl->http_port = (*l)->port;
    impl->listeners.push_back(std::move(*l));
  }
  if (impl->cfg.admin.endpoint) {
    auto l = impl->bind_listener(*impl->cfg.admin.endpoint, false, true, impl->cfg.backlog);
    if (!l) return fail(l.error());
    impl->admin_port = (*l)->port;
    impl->listeners.push_back(std::move(*l));
  }
  impl->open_roots();
  impl->setup_routes();
  impl->take_spare();
  return std::unique_ptr<Server>(new Server(std::move(impl)));
}

Status Server::start() {
  Impl& m = *impl_;
  if (m.started.load() || m.shut_down) {
    return fail(Errc::invalid_input, "server: start called twice or after shutdown");
  }
  for (std::size_t i = 0; i < m.reactor_count; ++i) {
    auto r = std::make_unique<Reactor>();
    r->epoll_fd = ::epoll_create1(EPOLL_CLOEXEC);
    r->wake_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (r->epoll_fd < 0 || r->wake_fd < 0) {
      m.reactors.clear();
      return fail(Errc::io, "server: epoll/eventfd: " + errno_text(errno));
    }
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.ptr = &r->wake_tag;
    ::epoll_ctl(r->epoll_fd, EPOLL_CTL_ADD, r->wake_fd, &ev);
    m.watch_listeners(*r);
    r->index = m.reactors.size();
    m.reactors.push_back(std::move(r));
  }
  m.resize_workers(m.worker_count);
  {
    std::lock_guard lock(m.work_mu);
    if (m.worker_running == 0) return fail(Errc::io, "server: cannot start any worker thread");
  }
  for (auto& r : m.reactors) {
    r->thread = std::thread([&m, rp = r.get()] { m.reactor_loop(*rp); });
  }
  m.started = true;
  for (const auto& l : m.listeners) {
    if (l->fd < 0) continue;  // retired by a reload before start
    m.log->log(LogLevel::info, kLog, "listening",
               {{"listener", l->name}, {"port", std::to_string(l->port)}});
  }
  return {};
}

int Server::https_port() const { return impl_->https_port; }
int Server::http_port() const { return impl_->http_port; }
int Server::admin_port() const { return impl_->admin_port; }

std::size_t Server::prepare_key(EVP_PKEY* key) const {
  std::size_t made = 0;
  if (!key) return made;
  for (OSSL_LIB_CTX* lib : impl_->reactor_libs) {
    // Initializing a signature in lib exports the key into lib's provider (evp_pkey_export_to_
    // provider) and caches the copy in the key, as the first handshake there would.
    EVP_PKEY_CTX* c = EVP_PKEY_CTX_new_from_pkey(lib, key, nullptr);
    if (c && EVP_PKEY_sign_init(c) == 1) ++made;
    else ossl::drain_errors();
    EVP_PKEY_CTX_free(c);
  }
  return made;
}

bool Server::ready() const { return impl_->started.load() && !impl_->draining.load(); }

void Server::shutdown(milliseconds drain) {
  Impl& m = *impl_;
  std::lock_guard control(m.control_mu);
  if (m.shut_down) return;
  m.shut_down = true;
  if (!m.started.load()) {
    for (auto& l : m.listeners) {
      if (l->fd >= 0) ::close(l->fd);
      l->fd = -1;
    }
    return;
  }
  auto deadline = SteadyClock::now() + drain;
  m.draining = true;
  // Tunnels (WebSockets) would hold the drain to its deadline: they end now, as Caddy's do;
  // their clients reconnect to the next instance.
  m.upstreams.end_tunnels();
  m.wake_all();
  {
    std::unique_lock lock(m.open_mu);
    m.open_cv.wait_until(lock, deadline, [&] { return m.open_fds.empty(); });
    // Past the deadline: wake every blocked reader and writer; their owners then close.
    for (int fd : m.open_fds) {
      ::shutdown(fd, SHUT_RDWR);
      ++m.forced_closed;
    }
    // Admin connections are not waited for; they end with the reactor and workers.
    for (int fd : m.admin_fds) ::shutdown(fd, SHUT_RDWR);
  }
  // A worker waiting on an upstream would otherwise wait up to the site's read_timeout. Its
  // client socket is already shut down above, so no answer can reach the client now.
  m.upstreams.abort_all();
  m.stop_reactor = true;
  m.wake_all();
  for (auto& r : m.reactors) r->thread.join();
  m.close_listeners(true);
  {
    std::lock_guard lock(m.work_mu);
    m.work_stop = true;
  }
  m.work_cv.notify_all();
  for (auto& w : m.workers) w->thread.join();
  m.workers.clear();
  // Tunnels ended with the drain's start (end_tunnels); the thread cuts any left (one handed
  // over since) and leaves.
  {
    std::lock_guard lock(m.tunnel_mu);
    m.tunnel_stop = true;
  }
  if (m.tunnel_thread.joinable()) {
    m.wake_tunnels();
    m.tunnel_thread.join();
  }
  // A worker that looked at `draining` just before it was set may have handed a connection
  // back after the reactor left.
  for (auto& r : m.reactors) {
    for (auto& c : r->back) m.close_socket(*c);
    r->back.clear();
  }
  m.started = false;
  m.log->log(LogLevel::info, kLog, "stopped",
             {{"forced_closed", std::to_string(m.forced_closed.load())}});
}

Result<Server::ReloadReport> Server::reload(ServerConfig config) {
  Impl& m = *impl_;
  std::lock_guard control(m.control_mu);
  if (m.shut_down || m.draining.load()) {
    return fail(Errc::invalid_input, "server: reload during shutdown");
  }
  // Everything is checked before anything changes: an invalid config changes nothing.
  if (auto st = Impl::validate_limits(config); !st) return fail(st.error());
  if (auto st = Impl::resolve_routing(config); !st) return fail(st.error());
  ReloadReport report;
  ServerConfig& old = m.cfg;

  // Listeners, per kind, all or nothing: a kind whose new listener cannot be bound keeps its
  // old listeners (and is compared against them again at the next reload).
  const int backlog_for_new = config.backlog;
  auto apply = [&](std::vector<Endpoint>& current, const std::vector<Endpoint>& want, bool tls,
                   bool admin, const char* field) {
    auto st = m.reload_listeners(want, tls, admin, backlog_for_new);
    if (st) {
      current = want;
      return;
    }
    report.failed.push_back(st.error().message);
    m.log->log(LogLevel::error, kLog, "listener not changed",
               {{"field", field}, {"error", st.error().message}});
  };
  // A server created without https listeners has no TLS context yet (create): it is built,
  // with the TLS settings the server was created with, before the first one is bound.
  if (!config.https.empty() && !m.ssl_ctx) {
    if (auto st = m.build_tls(); !st) {
      m.reactor_ctxs.clear();
      m.reactor_libs.clear();
      m.ssl_ctx.reset();
      m.tickets.reset();
      report.failed.push_back(st.error().message);
      m.log->log(LogLevel::error, kLog, "listener not changed", {{"field", "https"}, {"error", st.error().message}});
    } else {
      apply(old.https, config.https, true, false, "https");
    }
  } else {
    apply(old.https, config.https, true, false, "https");
  }
  apply(old.http, config.http, false, false, "http");
  {
    std::vector<Endpoint> cur, want;
    if (old.admin.endpoint) cur.push_back(*old.admin.endpoint);
    if (config.admin.endpoint) want.push_back(*config.admin.endpoint);
    apply(cur, want, false, true, "admin");
    old.admin.endpoint = cur.empty() ? std::nullopt : std::optional<Endpoint>(cur.front());
  }
  if (old.backlog != config.backlog) {
    // listen(2) again on a listening socket only changes its queue length (Linux).
    std::lock_guard lock(m.listen_mu);
    for (auto& l : m.listeners) {
      if (l->fd >= 0) ::listen(l->fd, config.backlog);
    }
    old.backlog = config.backlog;
  }
  m.refresh_ports();

  // Timeouts and caps: connections accepted from now on get the new Limits.
  if (!m.limits->same(config)) {
    auto next = m.make_limits(config);
    std::lock_guard lock(m.limits_mu);
    m.limits = std::move(next);
    m.limits_version.fetch_add(1, std::memory_order_release);
  }
  old.timeouts = config.timeouts;
  old.max_header_bytes = config.max_header_bytes;
  old.max_body_bytes = config.max_body_bytes;
  old.keep_alive_max_requests = config.keep_alive_max_requests;
  old.max_connections = config.max_connections;
  m.max_connections = config.max_connections;

  if (std::size_t n = Impl::resolved_workers(config); n != m.worker_count) {
    m.worker_count = n;
    if (m.started.load()) m.resize_workers(n);
  }
  old.worker_threads = config.worker_threads;

  unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  std::size_t reactors = config.reactor_threads ? config.reactor_threads : cores;
  if (reactors != m.reactor_count) {
    // A connection stays on the reactor that accepted it for its whole life: moving them to a
    // new set of epoll loops is not worth it for a setting changed this rarely.
    report.not_applied.push_back("reactor_threads");
    m.log->log(LogLevel::warn, kLog, "reactor_threads change needs a restart to take effect",
               {{"running", std::to_string(m.reactor_count)},
                {"configured", std::to_string(reactors)}});
  }
  if (old.alpn_protocols != config.alpn_protocols) report.not_applied.push_back("alpn_protocols");
  if (old.tickets.enabled != config.tickets.enabled ||
      old.tickets.lifetime != config.tickets.lifetime) {
    // The lifetime is the SSL_CTX's session timeout, and the SSL_CTX is never changed live.
    report.not_applied.push_back("tickets");
  } else if (m.tickets && old.tickets.rotate_every != config.tickets.rotate_every) {
    m.tickets->set_rotate_every(config.tickets.rotate_every);
    old.tickets.rotate_every = config.tickets.rotate_every;
  }

  m.routing_cell.store(Routing::from(config));  // stores are serialized by control_mu
  {
    // Idle upstream connections of an upstream no site uses any more are closed now, not kept
    // until shutdown (a request still running against it may put its connection back: that
    // one is closed at the next reload, or at shutdown).
    std::vector<std::string> keep;
    auto add = [&](const Site& site) {
      if (auto* p = std::get_if<ProxySite>(&site)) {
        keep.push_back(p->upstream);
        keep.insert(keep.end(), p->more_upstreams.begin(), p->more_upstreams.end());
      }
    };
    for (const auto& [name, site] : config.sites) add(site);
    if (config.default_site) add(*config.default_site);
    m.upstreams.retain(keep);
  }
  // Fields only this thread reads (the routing snapshot is what requests see).
  old.sites = std::move(config.sites);
  old.default_site = std::move(config.default_site);
  old.hsts_max_age = config.hsts_max_age;
  old.hsts_include_subdomains = config.hsts_include_subdomains;
  old.redirect_to_https = config.redirect_to_https;
  old.redirect_port = config.redirect_port;
  // Drops this copy's hold on the previous access-log file: its descriptor closes when the
  // last request using the previous snapshot is done (a rotated file is not kept open).
  old.access_log = std::move(config.access_log);
  auto join = [](const std::vector<std::string>& v) {
    std::string s;
    for (const auto& f : v) s += (s.empty() ? "" : ",") + f;
    return s;
  };
  m.log->log(LogLevel::info, kLog, "configuration reloaded",
             {{"sites", std::to_string(old.sites.size())},
              {"not_applied", join(report.not_applied)},
              {"failed", join(report.failed)}});
  return report;
}

void Server::rotate_ticket_keys() {
  if (impl_->tickets) impl_->tickets->rotate_now();
}

Server::Counters Server::counters() const {
  Impl& m = *impl_;
  Counters c;
  c.accepted = m.accepted.load();
  c.rejected_over_capacity = m.rejected.load();
  c.handshakes = m.handshakes.load();
  c.handshake_failed = m.handshake_failed.load();
  c.handshake_timeout = m.handshake_timeout.load();
  c.header_timeout = m.header_timeout.load();
  c.idle_closed = m.idle_closed.load();
  c.read_timeout = m.read_timeout.load();
  c.write_timeout = m.write_timeout.load();
  auto sni = m.sni_counters();
  c.sni_misses = sni.sni_misses;
  c.no_sni = sni.no_sni;
  c.header_too_large = m.header_too_large.load();
  c.bad_request_head = m.bad_head.load();
  c.requests = m.requests.load();
  c.forced_closed = m.forced_closed.load();
  c.open_connections = m.open_count();
  c.tunnels_open = m.upstreams.tunnels_open();
  c.tunnels = m.upstreams.tunnels_total();
  c.upstream_failovers = m.upstreams.failovers();
  return c;
}

std::string response_header_error(std::string_view name, const std::optional<std::string>& set) {
  static constexpr std::string_view kTchar = "!#$%&'*+-.^_`|~";
  auto is_tchar = [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || kTchar.find(c) != std::string_view::npos;
  };
  if (name.empty() || !std::all_of(name.begin(), name.end(), is_tchar)) {
    return "header \"" + std::string(name) + "\": not a field name (letters, digits and !#$%&'*+-.^_`|~)";
  }
  static constexpr std::string_view kManaged[] = {"content-length", "transfer-encoding", "connection",
                                                  "keep-alive", "upgrade", "te", "trailer",
                                                  "proxy-connection"};
  for (auto m : kManaged) {
    if (detail::iequals(name, m)) {
      return "header \"" + std::string(name) + "\": set by the server for each response, not by a site";
    }
  }
  if (!set) return {};  // removed: the name is all there is to check
  std::string_view value = *set;
  bool ok = std::all_of(value.begin(), value.end(), [](char c) {
    auto u = static_cast<unsigned char>(c);
    return u == '\t' || (u >= 0x20 && u != 0x7f);
  });
  if (!ok) return "header \"" + std::string(name) + "\": the value holds a line break or another control character";
  if (!value.empty() && (value.front() == ' ' || value.front() == '\t' || value.back() == ' ' ||
                         value.back() == '\t')) {
    return "header \"" + std::string(name) + "\": the value begins or ends with white space";
  }
  return {};
}

std::string redirect_error(std::string_view to, int status) {
  if (auto why = detail::redirect_to_error(to); !why.empty()) return why;
  if (status != 301 && status != 302 && status != 303 && status != 307 && status != 308) {
    return "redirect status " + std::to_string(status) + ": expected 301, 302, 303, 307 or 308";
  }
  return {};
}

}  // namespace autotls::server
