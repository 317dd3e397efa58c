#include "server/proxy.h"

#include <algorithm>
#include <charconv>
#include <cerrno>
#include <cstring>
#include <optional>
#include <string_view>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/x509v3.h>

#include "server/detail/http_util.h"

namespace autotls::server::detail {
namespace {
using SteadyClock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// kBufBytes is an upstream connection's read buffer: a response header must fit in it, and
// body bytes are read (and passed on) at most this many at a time.
constexpr std::size_t kBufBytes = 64 * 1024;

// Why an exchange failed (none: it did not).
enum class Err {
  none,
  unsupported,      // the upstream URL is not http[s]://host[:port]
  resolve,          // the host name did not resolve
  connect,          // refused, unreachable
  connect_timeout,  // connect_timeout passed
  write,            // the upstream closed or reset while we sent the request
  write_timeout,    // a send waited write_timeout
  read,             // a read failed (reset)
  read_timeout,     // a read waited read_timeout
  closed,           // the upstream closed the connection before the response was complete
  bad_response,     // not an HTTP/1.x response, or a header over 64 KiB
  framing,          // Content-Length and Transfer-Encoding, or differing Content-Lengths
  client_body,      // the client's request body broke off (or ran past max_body)
  tls,              // TLS to an https upstream: no client context, or the handshake failed
  tls_verify,       // the https upstream's certificate did not verify (chain or name)
};

const char* to_string(Err e) {
  switch (e) {
    case Err::none: return "none";
    case Err::unsupported: return "invalid upstream URL (http[s]://host[:port] only)";
    case Err::resolve: return "cannot resolve the upstream host";
    case Err::connect: return "connect failed";
    case Err::connect_timeout: return "connect timed out";
    case Err::write: return "write failed";
    case Err::write_timeout: return "write timed out";
    case Err::read: return "read failed";
    case Err::read_timeout: return "read timed out";
    case Err::closed: return "connection closed by the upstream";
    case Err::bad_response: return "malformed response";
    case Err::framing: return "ambiguous body length (Content-Length)";
    case Err::client_body: return "request body broke off";
    case Err::tls: return "TLS handshake failed";
    case Err::tls_verify: return "upstream certificate verification failed";
  }
  return "?";
}

// connection_options joins the values of a message's Connection fields: the connection
// options, among them the names of fields meant for this hop only (RFC 9110 §7.6.1: a proxy
// removes them before it forwards the message). named_in tells whether options names name.
std::string connection_options(const httplib::Headers& headers) {
  std::string options;
  auto [from, to] = headers.equal_range("Connection");
  for (auto it = from; it != to; ++it) options.append(it->second).append(",");
  return options;
}
bool named_in(const std::string& options, std::string_view name) {
  return !options.empty() && has_token(options, name);
}

// body_framing reads the response's Content-Length; false when its framing is ambiguous:
// Content-Length with Transfer-Encoding (RFC 9112 6.1: a server MUST NOT send both), several
// Content-Length values that differ, or one that is not a number. A proxy must not forward
// such a response (RFC 9112 6.3): 502.
bool body_framing(const httplib::Headers& headers, std::optional<std::uint64_t>& length,
                  bool& te) {
  te = false;
  for (const auto& [k, v] : headers) {
    if (iequals(k, "transfer-encoding")) {
      te = true;
    } else if (iequals(k, "content-length")) {
      std::uint64_t n = 0;
      auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
      if (ec != std::errc() || end != v.data() + v.size() || v.empty()) return false;
      if (length && *length != n) return false;
      length = n;
    }
  }
  return !(te && length);
}

// Target is an upstream URL taken apart: "http[s]://host[:port]".
struct Target {
  std::string host;
  std::string port = "80";
  std::string host_header;  // host[:port], for a request that has no Host
  bool tls = false;         // https: TLS to the upstream, its certificate verified for host
};

// parse_upstream takes url apart; false (with what is wrong in why) when it is not
// http[s]://host[:port]: another scheme or none, no host, a port that is not 1-65535, or
// anything after the authority (a path, even "/", a query, user info).
bool parse_upstream(std::string_view url, Target& t, std::string& why) {
  auto s = url.find("://");
  if (s == std::string_view::npos) {
    why = "no scheme";
    return false;
  }
  if (iequals(url.substr(0, s), "https")) {
    t.tls = true;
    t.port = "443";
  } else if (!iequals(url.substr(0, s), "http")) {
    why = "scheme \"" + std::string(url.substr(0, s)) + "\" is not http or https";
    return false;
  }
  url.remove_prefix(s + 3);
  if (auto extra = url.find_first_of("/?#@"); extra != std::string_view::npos) {
    why = url[extra] == '@' ? "user info is not supported" : "a path is not supported";
    return false;
  }
  t.host_header = std::string(url);
  if (!url.empty() && url.front() == '[') {
    auto close = url.find(']');
    if (close == std::string_view::npos) {
      why = "no ']' after the IPv6 address";
      return false;
    }
    t.host = std::string(url.substr(1, close - 1));
    url.remove_prefix(close + 1);
    if (!url.empty() && url.front() != ':') {
      why = "unexpected text after the IPv6 address";
      return false;
    }
  } else {
    auto colon = url.find(':');
    t.host = std::string(url.substr(0, colon));
    url.remove_prefix(colon == std::string_view::npos ? url.size() : colon);
  }
  if (t.host.empty()) {
    why = "no host";
    return false;
  }
  if (!url.empty()) {
    url.remove_prefix(1);  // ':'
    unsigned port = 0;
    auto [p, ec] = std::from_chars(url.data(), url.data() + url.size(), port);
    if (url.empty() || ec != std::errc() || p != url.data() + url.size() || port == 0 ||
        port > 65535) {
      why = "port \"" + std::string(url) + "\" is not 1-65535";
      return false;
    }
    t.port = std::to_string(port);
  }
  return true;
}

timeval to_timeval(milliseconds ms) {
  if (ms.count() <= 0) ms = milliseconds(1);  // 0 would mean "no timeout"
  return timeval{static_cast<time_t>(ms.count() / 1000),
                 static_cast<suseconds_t>((ms.count() % 1000) * 1000)};
}

// set_timeouts gives the socket the site's read and write timeouts (each read or write waits
// at most that long: httplib's client's semantics), unless it has them already.
void set_timeouts(UpstreamConn& c, const ProxySite& site) {
  if (c.read_timeout != site.read_timeout) {
    auto tv = to_timeval(site.read_timeout);
    ::setsockopt(c.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    c.read_timeout = site.read_timeout;
  }
  if (c.write_timeout != site.write_timeout) {
    auto tv = to_timeval(site.write_timeout);
    ::setsockopt(c.fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    c.write_timeout = site.write_timeout;
  }
}

// tls_io_error maps a failed SSL_read / SSL_write (r <= 0) to an Err: a read or write that
// waited its socket timeout is WANT_READ / WANT_WRITE (the socket is blocking with
// SO_RCVTIMEO / SO_SNDTIMEO); an EOF without close_notify counts as a close
// (SSL_OP_IGNORE_UNEXPECTED_EOF), as it does over plain TCP. retry: interrupted, call again.
Err tls_io_error(UpstreamConn& c, int r, Err timeout, Err failed, bool& retry) {
  int e = SSL_get_error(c.ssl, r);
  int saved = errno;
  ERR_clear_error();
  retry = false;
  switch (e) {
    case SSL_ERROR_ZERO_RETURN: return Err::closed;
    case SSL_ERROR_WANT_READ:
    case SSL_ERROR_WANT_WRITE:
      retry = saved == EINTR;
      return timeout;
    case SSL_ERROR_SYSCALL: return r == 0 || saved == 0 ? Err::closed : failed;
    default: return failed;
  }
}

Err write_all(UpstreamConn& c, std::string_view s) {
  while (c.ssl && !s.empty()) {
    errno = 0;
    int n = SSL_write(c.ssl, s.data(), static_cast<int>(std::min<std::size_t>(s.size(), 1 << 30)));
    if (n > 0) {
      s.remove_prefix(static_cast<std::size_t>(n));
      continue;
    }
    bool retry = false;
    Err e = tls_io_error(c, n, Err::write_timeout, Err::write, retry);
    if (!retry) return e == Err::closed ? Err::write : e;
  }
  while (!s.empty()) {
    ssize_t n = ::send(c.fd, s.data(), s.size(), MSG_NOSIGNAL);
    if (n > 0) {
      s.remove_prefix(static_cast<std::size_t>(n));
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else {
      return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) ? Err::write_timeout : Err::write;
    }
  }
  return Err::none;
}

// fill reads what the upstream has sent (one recv, waiting at most read_timeout) into the
// connection's buffer. The buffer is compacted first; a full buffer is bad_response (a header
// line or chunk-size line over 64 KiB).
Err fill(UpstreamConn& c) {
  if (!c.buf) c.buf = std::make_unique<char[]>(kBufBytes);
  if (c.pos == c.end) {
    c.pos = c.end = 0;
  } else if (c.end == kBufBytes) {
    if (c.pos == 0) return Err::bad_response;
    std::memmove(c.buf.get(), c.buf.get() + c.pos, c.end - c.pos);
    c.end -= c.pos;
    c.pos = 0;
  }
  while (c.ssl) {
    errno = 0;
    int n = SSL_read(c.ssl, c.buf.get() + c.end, static_cast<int>(kBufBytes - c.end));
    if (n > 0) {
      c.end += static_cast<std::size_t>(n);
      return Err::none;
    }
    bool retry = false;
    Err e = tls_io_error(c, n, Err::read_timeout, Err::read, retry);
    if (!retry) return e;
  }
  for (;;) {
    ssize_t n = ::recv(c.fd, c.buf.get() + c.end, kBufBytes - c.end, 0);
    if (n > 0) {
      c.end += static_cast<std::size_t>(n);
      return Err::none;
    }
    if (n == 0) return Err::closed;
    if (errno == EINTR) continue;
    return errno == EAGAIN || errno == EWOULDBLOCK ? Err::read_timeout : Err::read;
  }
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

// next_line takes one line (without its LF and a CR before it) from [pos, end) of c's buffer,
// false when no whole line is buffered.
bool next_line(UpstreamConn& c, std::string_view& line) {
  const char* b = c.buf.get() + c.pos;
  const void* lf = std::memchr(b, '\n', c.end - c.pos);
  if (!lf) return false;
  std::size_t n = static_cast<std::size_t>(static_cast<const char*>(lf) - b);
  line = std::string_view(b, n);
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  c.pos += n + 1;
  return true;
}

struct Head {
  int status = 0;
  bool http10 = false;
  httplib::Headers headers;
};

// read_head reads a response header (1xx interim responses other than 101 skipped). got_bytes tells whether
// any byte of a response arrived (a pooled connection that fails before that may be retried).
// A 101 is an answer only to a request that asked for an upgrade (upgrade); to any other it
// is a malformed response.
Err read_head(UpstreamConn& c, Head& h, bool& got_bytes, bool upgrade) {
  for (;;) {
    std::size_t end;
    while ((end = c.buf ? header_end(std::string_view(c.buf.get() + c.pos, c.end - c.pos)) : 0) ==
           0) {
      Err e = fill(c);
      if (e != Err::none) return e;
      got_bytes = true;
    }
    std::size_t stop = c.pos + end;
    std::string_view line;
    next_line(c, line);
    // "HTTP/1.1 200 OK"
    if (line.size() < 12 || line.substr(0, 7) != "HTTP/1." || line[8] != ' ' ||
        (line.size() > 12 && line[12] != ' ')) {
      return Err::bad_response;
    }
    int status = 0;
    auto [p, ec] = std::from_chars(line.data() + 9, line.data() + 12, status);
    if (ec != std::errc() || p != line.data() + 12 || status < 100) return Err::bad_response;
    h.status = status;
    h.http10 = line[7] == '0';
    h.headers.clear();
    while (c.pos < stop) {
      next_line(c, line);
      if (line.empty()) break;
      if (line.front() == ' ' || line.front() == '\t') return Err::bad_response;  // obs-fold
      auto colon = line.find(':');
      if (colon == 0 || colon == std::string_view::npos) return Err::bad_response;
      auto name = line.substr(0, colon);
      if (name.find_first_of(" \t") != std::string_view::npos) return Err::bad_response;
      h.headers.emplace(std::string(name), std::string(trim(line.substr(colon + 1))));
    }
    c.pos = stop;
    if (status == 101) return upgrade && !h.http10 ? Err::none : Err::bad_response;
    if (status >= 200) return Err::none;
    // 100 Continue, 103 Early Hints: not passed on; the final response follows.
  }
}
}  // namespace

UpstreamConn::~UpstreamConn() {
  // No close_notify: the connection is closed because it failed, was cut, or sat idle too
  // long; the upstream sees the TCP close (as over plain HTTP).
  if (ssl) SSL_free(ssl);
  if (fd >= 0) ::close(fd);
}

// Exchange is one request to an upstream, from proxy() until the response's content provider
// is done with it (it is shared with the provider). Its socket is registered (under mu) so that
// abort_all can shut it down from another thread.
struct Exchange {
  UpstreamPool& pool;
  bool registered = false;
  std::unique_ptr<UpstreamConn> conn;  // the worker's, never touched by another thread
  std::mutex mu;
  int fd = -1;           // under mu: conn's socket while it is in use
  bool aborted = false;  // under mu: abort_all cut the exchange
  std::string why;       // the worker's: what a TLS handshake failed on, for the log line
  bool tunnel = false;   // under the pool's mu_: a WebSocket passed through (end_tunnels)

  explicit Exchange(UpstreamPool& p) : pool(p) {}
  Exchange(const Exchange&) = delete;
  Exchange& operator=(const Exchange&) = delete;
  ~Exchange() {
    if (registered) pool.leave(this);  // abort_all can no longer reach fd: it closes below
  }
  void watch(std::unique_ptr<UpstreamConn> c) {
    conn = std::move(c);
    std::lock_guard lock(mu);
    fd = conn->fd;
    if (aborted) ::shutdown(fd, SHUT_RDWR);
  }
  // take ends the watch and hands the connection out (to the pool, or to be closed).
  std::unique_ptr<UpstreamConn> take() {
    {
      std::lock_guard lock(mu);
      fd = -1;
    }
    return std::move(conn);
  }
  void drop() { take().reset(); }
  bool is_aborted() {
    std::lock_guard lock(mu);
    return aborted;
  }
};

namespace {
// handshake runs the TLS handshake on ex's freshly connected socket: SNI and the expected name
// (or, for an IP literal, the expected address: no SNI) are the URL's host; the chain must
// verify against the client context's CAs. Each read or write of the handshake waits at most
// connect_timeout (then it is connect_timeout: 504); abort_all's shutdown ends it at once.
Err handshake(Exchange& ex, const Target& t, const ProxySite& site) {
  auto& c = *ex.conn;
  SSL_CTX* ctx = ex.pool.tls_ctx();
  if (!ctx) {
    ex.why = "cannot create the TLS client context";
    return Err::tls;
  }
  auto tv = to_timeval(site.connect_timeout);
  ::setsockopt(c.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(c.fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  c.read_timeout = c.write_timeout = milliseconds(-1);  // set_timeouts sets them again
  c.ssl = SSL_new(ctx);
  if (!c.ssl || SSL_set_fd(c.ssl, c.fd) != 1) {
    ERR_clear_error();
    ex.why = "cannot create the TLS connection";
    return Err::tls;
  }
  in6_addr ip{};
  bool literal = ::inet_pton(AF_INET, t.host.c_str(), &ip) == 1 ||
                 ::inet_pton(AF_INET6, t.host.c_str(), &ip) == 1;
  bool named = literal
                   ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c.ssl), t.host.c_str()) == 1
                   : SSL_set_tlsext_host_name(c.ssl, t.host.c_str()) == 1 &&
                         SSL_set1_host(c.ssl, t.host.c_str()) == 1;
  if (!named) {
    ERR_clear_error();
    ex.why = "cannot set the expected name " + t.host;
    return Err::tls;
  }
  for (;;) {
    errno = 0;
    int r = SSL_connect(c.ssl);
    if (r == 1) return Err::none;
    int e = SSL_get_error(c.ssl, r);
    int saved = errno;
    if ((e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) && saved == EINTR) continue;
    long verify = SSL_get_verify_result(c.ssl);
    unsigned long code = ERR_peek_last_error();
    ERR_clear_error();
    if (verify != X509_V_OK) {
      ex.why = X509_verify_cert_error_string(verify);
      return Err::tls_verify;
    }
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return Err::connect_timeout;
    if (code != 0) {
      const char* reason = ERR_reason_error_string(code);
      ex.why = reason ? reason : "TLS error";
    } else {
      ex.why = "connection closed during the handshake";
    }
    return Err::tls;
  }
}

// connect_to opens a new connection to t (each address in turn, connect_timeout in all),
// watched by ex so that abort_all can cut the connect.
Err connect_to(Exchange& ex, const Target& t, const ProxySite& site) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* list = nullptr;
  if (::getaddrinfo(t.host.c_str(), t.port.c_str(), &hints, &list) != 0 || !list) {
    return Err::resolve;
  }
  auto deadline = SteadyClock::now() + site.connect_timeout;
  Err err = Err::connect;
  for (addrinfo* ai = list; ai; ai = ai->ai_next) {
    int fd = ::socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) continue;
    auto c = std::make_unique<UpstreamConn>();
    c->fd = fd;
    ex.watch(std::move(c));
    int r = ::connect(fd, ai->ai_addr, ai->ai_addrlen);
    if (r < 0 && errno == EINPROGRESS) {
      for (;;) {
        auto left = std::chrono::duration_cast<milliseconds>(deadline - SteadyClock::now());
        if (left.count() <= 0) {
          r = -2;
          break;
        }
        pollfd p{fd, POLLOUT, 0};
        int n = ::poll(&p, 1, static_cast<int>(std::min<long long>(left.count(), 1 << 30)));
        if (n < 0 && errno == EINTR) continue;
        if (n == 0) {
          r = -2;
          break;
        }
        int soerr = 0;
        socklen_t len = sizeof soerr;
        r = ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) == 0 && soerr == 0 ? 0 : -1;
        break;
      }
    }
    if (ex.is_aborted()) {
      ex.drop();
      err = Err::closed;
      break;
    }
    if (r == 0) {
      ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
      int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      err = t.tls ? handshake(ex, t, site) : Err::none;
      break;
    }
    ex.drop();
    if (r == -2) {
      err = Err::connect_timeout;
      break;
    }
  }
  ::freeaddrinfo(list);
  return err;
}
}  // namespace

namespace {
// tls_idle is the liveness check of an idle TLS connection with bytes waiting on its socket:
// they may be a TLS 1.3 NewSessionTicket (sent after the handshake, often read only now),
// which is no response. They are read through TLS without waiting: still open when nothing
// but such records came (the read would block); data, an alert or a close: not reusable.
bool tls_idle(UpstreamConn& c) {
  int flags = ::fcntl(c.fd, F_GETFL);
  if (flags < 0 || ::fcntl(c.fd, F_SETFL, flags | O_NONBLOCK) < 0) return false;
  char b;
  int r = SSL_peek(c.ssl, &b, 1);
  bool open = r <= 0 && SSL_get_error(c.ssl, r) == SSL_ERROR_WANT_READ;
  ERR_clear_error();
  return ::fcntl(c.fd, F_SETFL, flags) == 0 && open;
}
}  // namespace

std::unique_ptr<UpstreamConn> UpstreamPool::acquire(const std::string& upstream,
                                                   const ProxySite& site) {
  for (;;) {
    std::unique_ptr<UpstreamConn> conn;
    std::vector<Idle> expired;  // closed outside mu_
    {
      std::lock_guard lock(mu_);
      auto it = idle_.find(upstream);
      if (it == idle_.end() || it->second.empty()) return nullptr;
      auto& list = it->second;
      // The newest is the likeliest still open; everything idle for too long is closed.
      auto cutoff = SteadyClock::now() - site.idle_timeout;
      auto keep = std::partition_point(list.begin(), list.end(),
                                       [&](const Idle& i) { return i.since <= cutoff; });
      expired.insert(expired.end(), std::make_move_iterator(list.begin()),
                     std::make_move_iterator(keep));
      list.erase(list.begin(), keep);
      if (list.empty()) return nullptr;
      conn = std::move(list.back().conn);
      list.pop_back();
    }
    // Still open, and nothing unasked for waiting on it: a peek that would block (no system
    // call sleeps). A closed one (the upstream's keep-alive timeout) is dropped here instead of
    // failing the request.
    char c;
    ssize_t n = ::recv(conn->fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return conn;
    if (n > 0 && conn->ssl && tls_idle(*conn)) return conn;
  }
}

UpstreamPool::~UpstreamPool() {
  clear();
  if (tls_ctx_) SSL_CTX_free(tls_ctx_);
}

SSL_CTX* UpstreamPool::tls_ctx() {
  std::lock_guard lock(mu_);
  if (tls_ctx_) return tls_ctx_;
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  if (!ctx || SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1 ||
      SSL_CTX_set_default_verify_paths(ctx) != 1) {
    ERR_clear_error();
    if (ctx) SSL_CTX_free(ctx);
    return nullptr;
  }
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nullptr);
  // A body delimited by the close ends at the TCP close, as over plain HTTP (many servers
  // close without close_notify).
  SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
  tls_ctx_ = ctx;
  return ctx;
}

void UpstreamPool::release(const std::string& upstream, const ProxySite& site,
                           std::unique_ptr<UpstreamConn> conn) {
  // Bytes past the response (an upstream that sent more than it framed): never reused.
  if (!conn || site.max_idle == 0 || conn->pos != conn->end ||
      (conn->ssl && SSL_pending(conn->ssl) > 0)) {
    return;
  }
  std::unique_ptr<UpstreamConn> dropped;
  std::lock_guard lock(mu_);
  if (aborting_) return;
  auto it = idle_.find(upstream);
  if (it == idle_.end()) it = idle_.emplace(upstream, std::vector<Idle>{}).first;
  auto& list = it->second;
  list.push_back({std::move(conn), SteadyClock::now()});
  if (list.size() > site.max_idle) {
    dropped = std::move(list.front().conn);  // the oldest: the likeliest to be closed soon
    list.erase(list.begin());
  }
}

std::vector<const std::string*> UpstreamPool::order(const ProxySite& site) {
  std::vector<const std::string*> all{&site.upstream};
  if (site.more_upstreams.empty()) return all;  // one upstream: no turn, no lock
  all.reserve(1 + site.more_upstreams.size());
  for (const auto& u : site.more_upstreams) all.push_back(&u);
  auto now = SteadyClock::now();
  std::lock_guard lock(mu_);
  std::rotate(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(turn_++ % all.size()),
              all.end());
  std::stable_partition(all.begin(), all.end(), [&](const std::string* u) {
    auto it = failed_until_.find(*u);
    return it == failed_until_.end() || it->second <= now;
  });
  return all;
}

void UpstreamPool::mark_failed(const std::string& upstream, SteadyClock::time_point until) {
  std::lock_guard lock(mu_);
  failed_until_[upstream] = until;
}

void UpstreamPool::retain(const std::vector<std::string>& keep) {
  std::map<std::string, std::vector<Idle>, std::less<>> gone;
  {
    std::lock_guard lock(mu_);
    std::erase_if(failed_until_, [&](const auto& f) {
      return std::find(keep.begin(), keep.end(), f.first) == keep.end();
    });
    for (auto it = idle_.begin(); it != idle_.end();) {
      if (std::find(keep.begin(), keep.end(), it->first) == keep.end()) {
        gone.insert(idle_.extract(it++));
      } else {
        ++it;
      }
    }
  }
}

void UpstreamPool::clear() {
  std::map<std::string, std::vector<Idle>, std::less<>> gone;
  std::lock_guard lock(mu_);
  gone.swap(idle_);
}

std::size_t UpstreamPool::idle(const std::string& upstream) const {
  std::lock_guard lock(mu_);
  auto it = idle_.find(upstream);
  return it == idle_.end() ? 0 : it->second.size();
}

bool UpstreamPool::enter(Exchange* e) {
  std::lock_guard lock(mu_);
  if (aborting_) return false;
  active_.insert(e);
  e->registered = true;
  return true;
}

void UpstreamPool::leave(Exchange* e) {
  std::lock_guard lock(mu_);
  active_.erase(e);
  if (e->tunnel) tunnels_open_.fetch_sub(1, std::memory_order_relaxed);
}

bool UpstreamPool::enter_tunnel(Exchange* e) {
  std::lock_guard lock(mu_);
  if (aborting_ || tunnels_ended_) return false;
  e->tunnel = true;
  tunnels_open_.fetch_add(1, std::memory_order_relaxed);
  tunnels_total_.fetch_add(1, std::memory_order_relaxed);
  return true;
}

void UpstreamPool::end_tunnels() {
  std::lock_guard lock(mu_);
  tunnels_ended_ = true;
  for (Exchange* e : active_) {
    if (!e->tunnel) continue;
    std::lock_guard elock(e->mu);
    e->aborted = true;
    if (e->fd >= 0) ::shutdown(e->fd, SHUT_RDWR);
  }
}

void UpstreamPool::abort_all() {
  std::map<std::string, std::vector<Idle>, std::less<>> gone;
  std::lock_guard lock(mu_);
  aborting_ = true;
  gone.swap(idle_);
  // Under mu_: an exchange leaves (and closes its socket) only after it is out of active_.
  for (Exchange* e : active_) {
    std::lock_guard elock(e->mu);
    e->aborted = true;
    if (e->fd >= 0) ::shutdown(e->fd, SHUT_RDWR);
  }
}

namespace {
// BodyReader passes the upstream's response body on to the client, from the worker (the
// response's content provider): Content-Length, chunked (decoded: httplib frames it again) or
// delimited by the close. The connection goes back to the pool as soon as the body's last byte
// is read, before that byte is written to the client, so a client's next request finds it.
struct BodyReader {
  enum class Mode { length, chunked, close };
  enum class Chunk { size, data, crlf, trailers };
  std::shared_ptr<Exchange> ex;
  ProxySite site;
  std::string upstream;  // the one of site's upstreams that answers
  Mode mode = Mode::length;
  bool keep = false;        // the connection may go back to the pool once the body is read
  std::uint64_t left = 0;   // length: bytes still to come; chunked: of the current chunk
  Chunk state = Chunk::size;

  void finish() {
    auto conn = ex->take();
    if (keep && !ex->is_aborted()) ex->pool.release(upstream, site, std::move(conn));
  }
  // data passes bytes from the buffer to the client; at the end of the body the connection
  // is released first (the bytes are copied out of its buffer).
  bool pass(httplib::DataSink& sink, std::size_t n, bool last) {
    auto& c = *ex->conn;
    const char* p = c.buf.get() + c.pos;
    c.pos += n;
    if (!last) return sink.write(p, n);
    thread_local std::string tail;
    tail.assign(p, n);
    finish();
    return tail.empty() || sink.write(tail.data(), tail.size());
  }
  bool length_body(httplib::DataSink& sink) {
    if (ex->is_aborted()) return false;
    auto& c = *ex->conn;
    if (c.pos == c.end && fill(c) != Err::none) return false;
    auto n = static_cast<std::size_t>(std::min<std::uint64_t>(c.end - c.pos, left));
    left -= n;
    return pass(sink, n, left == 0);
  }
  bool close_body(httplib::DataSink& sink) {
    if (ex->is_aborted()) return false;
    auto& c = *ex->conn;
    if (c.pos == c.end) {
      Err e = fill(c);
      if (e == Err::closed) {
        ex->drop();
        sink.done();
        return true;
      }
      if (e != Err::none) return false;
    }
    return pass(sink, c.end - c.pos, false);
  }
  bool chunked_body(httplib::DataSink& sink) {
    for (;;) {
      if (ex->is_aborted()) return false;
      auto& c = *ex->conn;
      if (state == Chunk::data) {
        if (c.pos == c.end && fill(c) != Err::none) return false;
        auto n = static_cast<std::size_t>(std::min<std::uint64_t>(c.end - c.pos, left));
        left -= n;
        if (left == 0) state = Chunk::crlf;
        return pass(sink, n, false);
      }
      std::string_view line;
      while (!c.buf || !next_line(c, line)) {
        if (fill(c) != Err::none) return false;
      }
      if (state == Chunk::crlf) {
        if (!line.empty()) return false;
        state = Chunk::size;
      } else if (state == Chunk::size) {
        line = trim(line.substr(0, line.find(';')));
        std::uint64_t n = 0;
        auto [p, ec] = std::from_chars(line.data(), line.data() + line.size(), n, 16);
        if (line.empty() || ec != std::errc() || p != line.data() + line.size()) return false;
        left = n;
        state = n == 0 ? Chunk::trailers : Chunk::data;
      } else if (line.empty()) {  // trailers (dropped) end with an empty line
        finish();
        sink.done();
        return true;
      }
    }
  }
};

// --- tunnels: a WebSocket passed through after the upstream's 101 ---------------------------

// kTunnelChunk is the most a tunnel reads from one side before it writes it to the other.
constexpr std::size_t kTunnelChunk = 16 * 1024;
// kTunnelShare is how many bytes one call of Tunnel::run moves at most (give or take a chunk)
// before the tunnel thread turns to the others.
constexpr std::uint64_t kTunnelShare = 256 * 1024;

// Side is one end of a tunnel: a non-blocking socket, with TLS over it or not.
struct Side {
  int fd = -1;
  SSL* ssl = nullptr;
  bool eof = false;   // it has sent its last byte (a TCP FIN or a TLS close_notify)
  bool shut = false;  // we have told it that we send no more
};

enum class Io { done, again, eof, failed };

// side_io reads into buf (writing: false) or writes from it (true) at most len bytes, without
// waiting: done (n bytes), again (events: what to poll for), eof (reading only: the peer's
// end; a TLS close without close_notify counts, which OpenSSL 3 reports as an error) or
// failed. A TLS write that must wait is called again later with the same bytes at the same
// address, as SSL_write requires.
Io side_io(Side& s, char* buf, std::size_t len, bool writing, std::size_t& n, short& events) {
  if (s.ssl) {
    ERR_clear_error();
    int cap = static_cast<int>(std::min<std::size_t>(len, 1 << 30));
    int r = writing ? SSL_write(s.ssl, buf, cap) : SSL_read(s.ssl, buf, cap);
    if (r > 0) {
      n = static_cast<std::size_t>(r);
      return Io::done;
    }
    int e = SSL_get_error(s.ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
      events = e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT;
      return Io::again;
    }
    bool eof = !writing && (e == SSL_ERROR_ZERO_RETURN ||
                            (e == SSL_ERROR_SSL && ERR_GET_REASON(ERR_peek_error()) ==
                                                       SSL_R_UNEXPECTED_EOF_WHILE_READING));
    ERR_clear_error();
    return eof ? Io::eof : Io::failed;
  }
  for (;;) {
    ssize_t r = writing ? ::send(s.fd, buf, len, MSG_NOSIGNAL) : ::recv(s.fd, buf, len, 0);
    if (r > 0 || (r == 0 && writing)) {
      n = static_cast<std::size_t>(r);
      return Io::done;
    }
    if (r == 0) return Io::eof;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      events = writing ? POLLOUT : POLLIN;
      return Io::again;
    }
    return Io::failed;
  }
}

// Pump is one direction of a tunnel: bytes read from `from`, not yet all written to `to`.
struct Pump {
  Side* from = nullptr;
  Side* to = nullptr;
  std::string buf;
  std::size_t pos = 0;
  std::uint64_t bytes = 0;  // written to `to`
  short read_events = 0;    // what the read that would block waits for (0: none waiting)
  short write_events = 0;   // ... the write
};

// step makes what progress one direction can without waiting: a write of what is pending,
// else a read and a write of it. Sets moved when a byte went anywhere; false on a failure.
bool step(Pump& p, bool& moved) {
  p.read_events = p.write_events = 0;
  for (int round = 0; round < 2; ++round) {
    if (p.pos < p.buf.size()) {
      std::size_t n = 0;
      short ev = 0;
      Io r = side_io(*p.to, p.buf.data() + p.pos, p.buf.size() - p.pos, true, n, ev);
      if (r == Io::failed) return false;
      if (r == Io::again) {
        p.write_events = ev;
        return true;
      }
      p.pos += n;
      p.bytes += n;
      moved = true;
      if (p.pos < p.buf.size()) continue;
      p.buf.clear();
      p.pos = 0;
    }
    if (round == 1 || p.from->eof) break;
    p.buf.resize(kTunnelChunk);
    std::size_t n = 0;
    short ev = 0;
    Io r = side_io(*p.from, p.buf.data(), p.buf.size(), false, n, ev);
    p.buf.resize(r == Io::done ? n : 0);
    if (r == Io::failed) return false;
    if (r == Io::again) {
      p.read_events = ev;
      break;
    }
    if (r == Io::eof) {
      p.from->eof = true;
      break;
    }
    moved = true;
  }
  if (p.from->eof && p.buf.empty() && !p.to->shut) {
    // Pass the end on, and keep the other direction open (a half-close).
    p.to->shut = true;
    if (p.to->ssl) {
      SSL_shutdown(p.to->ssl);
      ERR_clear_error();
    } else {
      ::shutdown(p.to->fd, SHUT_WR);
    }
  }
  return true;
}

}  // namespace

struct Tunnel::State {
  std::shared_ptr<Exchange> ex;  // holds the upstream connection; end_tunnels reaches it
  Logger* log = nullptr;
  std::string upstream_url, protocol;
  Side client, upstream;
  Pump down, up;  // down: upstream to client (the 101 first), up: client to upstream
  std::size_t head_bytes = 0;  // the 101's bytes at the front of down
  milliseconds idle{0};
  SteadyClock::time_point started, deadline;
};

Tunnel::Tunnel(std::unique_ptr<State> state) : s_(std::move(state)) {}
Tunnel::~Tunnel() = default;
int Tunnel::upstream_fd() const { return s_->upstream.fd; }
SteadyClock::time_point Tunnel::deadline() const { return s_->deadline; }

Tunnel::End Tunnel::run(bool& again) {
  State& s = *s_;
  again = false;
  const std::uint64_t budget_end = s.up.bytes + s.down.bytes + kTunnelShare;
  for (;;) {
    if (s.ex->is_aborted()) return End::cut;
    bool moved = false;
    if (!step(s.up, moved) || !step(s.down, moved)) return End::failed;
    if (s.client.eof && s.upstream.eof && s.up.buf.empty() && s.down.buf.empty()) {
      return End::closed;
    }
    if (moved) {
      s.deadline = SteadyClock::now() + s.idle;
      if (s.up.bytes + s.down.bytes >= budget_end) {
        again = true;
        return End::open;
      }
      continue;
    }
    bool waiting = s.up.read_events || s.up.write_events || s.down.read_events ||
                   s.down.write_events;
    if (!waiting) return End::closed;  // nothing left to wait for
    if (SteadyClock::now() >= s.deadline) return End::idle;
    return End::open;
  }
}

namespace {
const char* to_string(Tunnel::End e) {
  switch (e) {
    case Tunnel::End::open: return "open";
    case Tunnel::End::closed: return "closed by both sides";
    case Tunnel::End::idle: return "idle timeout";
    case Tunnel::End::failed: return "a side failed or reset";
    case Tunnel::End::cut: return "ended by the server (shutdown)";
  }
  return "?";
}
}  // namespace

void Tunnel::finish(End end) {
  State& s = *s_;
  s.ex->drop();
  auto secs = std::chrono::duration<double>(SteadyClock::now() - s.started).count();
  s.log->log(LogLevel::info, "server", "tunnel closed",
             {{"upstream", s.upstream_url},
              {"protocol", s.protocol},
              {"end", to_string(end)},
              {"seconds", std::to_string(secs)},
              {"bytes_to_upstream", std::to_string(s.up.bytes)},
              {"bytes_to_client",
               std::to_string(s.down.bytes > s.head_bytes ? s.down.bytes - s.head_bytes : 0)}});
}

namespace {
// tunnel takes the client connection over after the upstream's 101 (h) and hands the tunnel
// to the server (hooks.run), which runs it off this worker. Always false: the client
// connection is never reused.
bool tunnel(const std::string& upstream_url, const ProxySite& site,
            const std::shared_ptr<Exchange>& ex, const Head& h, const UpgradeHooks& hooks,
            httplib::Response& res, Logger& log) {
  res.status = 101;  // what the access log records
  std::string protocol;
  for (const auto& [k, v] : h.headers) {
    if (iequals(k, "upgrade")) protocol = v;
  }
  if (protocol.empty()) {
    // RFC 9110 7.8: a 101 names the protocol it switches to.
    ex->drop();
    res.status = 502;
    res.set_content("upstream unavailable\n", "text/plain");
    log.log(LogLevel::warn, "server", "upstream request failed",
            {{"upstream", upstream_url},
             {"error", "101 without an Upgrade header"},
             {"status", "502"},
             {"connection", "closed"}});
    return false;
  }
  if (!ex->pool.enter_tunnel(ex.get())) {
    ex->drop();
    res.status = 503;
    res.set_content("shutting down\n", "text/plain");
    return false;
  }
  TunnelClient tc;
  if (!hooks.take(tc)) {
    ex->drop();
    return false;
  }
  UpstreamConn& c = *ex->conn;
  int flags = ::fcntl(c.fd, F_GETFL);
  if (flags < 0 || ::fcntl(c.fd, F_SETFL, flags | O_NONBLOCK) < 0) {
    ex->drop();
    return false;
  }
  auto s = std::make_unique<Tunnel::State>();
  s->ex = ex;
  s->log = &log;
  s->upstream_url = upstream_url;
  s->protocol = protocol;
  s->client = {tc.fd, tc.ssl, false, false};
  s->upstream = {c.fd, c.ssl, false, false};
  s->down.from = s->up.to = &s->upstream;
  s->down.to = s->up.from = &s->client;
  // The 101 as the client gets it: the upstream's fields but the hop-by-hop ones, then any
  // bytes the upstream sent after it (a first message).
  std::string& head = s->down.buf;
  head = "HTTP/1.1 101 Switching Protocols\r\n";
  const std::string options = connection_options(h.headers);
  for (const auto& [k, v] : h.headers) {
    if (!is_hop_by_hop(k) && !named_in(options, k)) head.append(k).append(": ").append(v).append("\r\n");
  }
  head.append("Connection: Upgrade\r\nUpgrade: ").append(protocol).append("\r\n\r\n");
  s->head_bytes = head.size();
  if (c.buf) head.append(c.buf.get() + c.pos, c.end - c.pos);
  c.pos = c.end = 0;
  s->up.buf = std::move(tc.early);
  s->idle = site.tunnel_idle_timeout;
  s->started = SteadyClock::now();
  s->deadline = s->started + s->idle;
  hooks.run(std::make_unique<Tunnel>(std::move(s)));
  return false;
}

bool is_idempotent(const std::string& m) {
  // Sending these twice does no more than sending them once (RFC 9110 9.2.2).
  return m == "GET" || m == "HEAD" || m == "OPTIONS" || m == "PUT" || m == "DELETE";
}
}  // namespace

}  // namespace autotls::server::detail

namespace autotls::server {
std::string upstream_error(std::string_view url) {
  detail::Target t;
  std::string why;
  if (detail::parse_upstream(url, t, why)) return {};
  return "upstream \"" + std::string(url) + "\": " + why +
         " (expected http://host[:port] or https://host[:port])";
}
}  // namespace autotls::server

namespace autotls::server::detail {

bool proxy(const ProxySite& site, const httplib::Request& req,
           const httplib::ContentReader* reader, httplib::Response& res, bool tls,
           std::size_t max_body, UpstreamPool& pool, Logger& log,
           const std::atomic<bool>* client_read_timed_out, const UpgradeHooks* upgrade) {
  bool has_length = req.has_header("Content-Length");
  bool chunked = iequals(req.get_header_value("Transfer-Encoding"), "chunked");
  // A WebSocket handshake (RFC 6455 4.1: GET, HTTP/1.1) is passed on with its upgrade; any
  // other Upgrade (h2c, ...) is dropped with the hop-by-hop fields.
  bool want_upgrade = upgrade && req.method == "GET" && req.version == "HTTP/1.1" &&
                      !has_length && !req.has_header("Transfer-Encoding") &&
                      has_token(req.get_header_value("Connection"), "upgrade") &&
                      has_token(req.get_header_value("Upgrade"), "websocket");
  if (reader && has_length && req.get_header_value<uint64_t>("Content-Length") > max_body) {
    // httplib's reader refuses it at once and sets 413 on res (its payload limit).
    (*reader)([](const char*, size_t) { return true; });
    res.status = 413;
    res.set_content("request body too large\n", "text/plain");
    return true;  // httplib skipped the body: the connection is still in step
  }
  auto ex = std::make_shared<Exchange>(pool);
  if (!pool.enter(ex.get())) {
    // The drain deadline has passed: no new exchange starts (the connection is being cut).
    res.status = 503;
    res.set_content("shutting down\n", "text/plain");
    return false;
  }
  bool streamed = reader && (has_length || chunked);

  // The request header, as the upstream gets it.
  std::string head;
  head.reserve(512);
  head.append(req.method).append(" ").append(req.target).append(" HTTP/1.1\r\n");
  const std::string options = connection_options(req.headers);
  for (const auto& [k, v] : req.headers) {
    // Accept-Encoding goes on: the upstream's encoding reaches the client as sent (the server
    // never compresses). Expect: the body follows
    // at once (httplib already answered 100-continue to the client). Content-Length and
    // Transfer-Encoding are hop-by-hop here: set below for the body we send. So is any field
    // the client's Connection names (RFC 9110 §7.6.1), but Host.
    if (is_hop_by_hop(k) || iequals(k, "expect") ||
        (named_in(options, k) && !iequals(k, "host"))) {
      continue;
    }
    if (iequals(k, kRangeField)) {
      head.append("Range: ").append(v).append("\r\n");  // the client's Range (kRangeField)
      continue;
    }
    head.append(k).append(": ").append(v).append("\r\n");
  }
  // The upstreams in the order this request tries them; a site with one builds no list.
  std::vector<const std::string*> candidates;
  if (!site.more_upstreams.empty()) candidates = pool.order(site);
  std::size_t pick = 0;
  const std::string* upstream = candidates.empty() ? &site.upstream : candidates[0];
  Target target;
  std::string url_error;
  bool url_ok = parse_upstream(*upstream, target, url_error);
  if (!req.has_header("Host")) head.append("Host: ").append(target.host_header).append("\r\n");
  // Client-supplied X-Forwarded-* were dropped above: we are the edge, nothing before us is
  // trusted.
  head.append("X-Forwarded-For: ").append(req.remote_addr).append("\r\n");
  head.append(tls ? "X-Forwarded-Proto: https\r\n" : "X-Forwarded-Proto: http\r\n");
  head.append("X-Forwarded-Host: ").append(req.get_header_value("Host")).append("\r\n");
  if (want_upgrade) {
    head.append("Connection: Upgrade\r\nUpgrade: ")
        .append(req.get_header_value("Upgrade"))
        .append("\r\n");
  } else if (site.max_idle == 0) {
    head.append("Connection: close\r\n");
  }
  if (streamed && has_length) {
    head.append("Content-Length: ")
        .append(std::to_string(req.get_header_value<uint64_t>("Content-Length")))
        .append("\r\n");
  } else if (streamed) {
    head.append("Transfer-Encoding: chunked\r\n");
  } else if (!req.body.empty() || req.method == "POST" || req.method == "PUT" ||
             req.method == "PATCH") {
    head.append("Content-Length: ").append(std::to_string(req.body.size())).append("\r\n");
  }
  head.append("\r\n");

  bool reader_used = false;    // the request body was (partly) consumed
  bool body_complete = false;  // ... and read to its end
  // send writes the request: the header with the first piece of the body, then each piece as
  // the client's stream yields it (chunked stays chunked).
  auto send = [&](UpstreamConn& c) -> Err {
    if (!streamed) {
      if (req.body.empty()) return write_all(c, head);
      std::string out = head + req.body;
      return write_all(c, out);
    }
    reader_used = true;
    std::string out = head;
    Err e = Err::none;
    bool ok = (*reader)([&](const char* data, size_t n) {
      if (n == 0) return true;
      if (!has_length) {
        char size[24];
        auto [p, ec] = std::to_chars(size, size + sizeof size - 2, n, 16);
        *p++ = '\r';
        *p++ = '\n';
        out.append(size, p);
        out.append(data, n).append("\r\n");
      } else {
        out.append(data, n);
      }
      e = write_all(c, out);
      out.clear();
      return e == Err::none;
    });
    body_complete = ok;
    if (!ok) return e != Err::none ? e : Err::client_body;
    if (!has_length) out.append("0\r\n\r\n");
    return out.empty() ? Err::none : write_all(c, out);
  };

  Head h;
  Err err = url_ok ? Err::none : Err::unsupported;
  if (!url_ok) ex->why = url_error;
  for (int attempt = 0; url_ok; ++attempt) {
    bool reused = false;
    if (attempt == 0) {
      if (auto c = pool.acquire(*upstream, site)) {
        ex->watch(std::move(c));
        reused = true;
      }
    }
    if (!reused) {
      err = connect_to(*ex, target, site);
      bool unreachable = err == Err::resolve || err == Err::connect ||
                         err == Err::connect_timeout || err == Err::tls || err == Err::tls_verify;
      if (unreachable && candidates.size() > 1 && !ex->is_aborted()) {
        // The request never reached it: left out for a while, and the next one gets it.
        pool.mark_failed(*upstream, SteadyClock::now() + site.fail_timeout);
        if (pick + 1 < candidates.size()) {
          log.log(LogLevel::warn, "server", "upstream unreachable, trying the next",
                  {{"upstream", *upstream},
                   {"error", ex->why.empty() ? to_string(err)
                                             : std::string(to_string(err)) + ": " + ex->why},
                   {"next", *candidates[pick + 1]}});
          upstream = candidates[++pick];
          pool.count_failover();
          ex->why.clear();
          if (!parse_upstream(*upstream, target, url_error)) {
            err = Err::unsupported;
            ex->why = url_error;
            break;
          }
          attempt = -1;  // the next upstream's pool first
          continue;
        }
      }
      if (err != Err::none) break;
    }
    set_timeouts(*ex->conn, site);
    auto sent_at = SteadyClock::now();
    err = send(*ex->conn);
    bool got_bytes = false;
    if (err == Err::none) err = read_head(*ex->conn, h, got_bytes, want_upgrade);
    if (err == Err::none) break;
    // The pooled connection failed before any byte of a response (the upstream closed it as
    // we reused it: its keep-alive timeout ran out, or it restarted): once on a new one. Only
    // a failure that came at once: an upstream that took its time before failing may have
    // acted on the request (or crashed on it), and a timeout is never waited out twice.
    auto quick = std::min<SteadyClock::duration>(std::chrono::seconds(1), site.read_timeout / 2);
    bool retry = reused && is_idempotent(req.method) && !reader_used && !got_bytes &&
                 (err == Err::closed || err == Err::read || err == Err::write) &&
                 SteadyClock::now() - sent_at < quick && !ex->is_aborted();
    ex->drop();
    if (!retry) break;
  }
  if (err == Err::none && h.status == 101) {
    return tunnel(*upstream, site, ex, h, *upgrade, res, log);
  }
  std::optional<std::uint64_t> length;
  bool te = false;
  if (err == Err::none && !body_framing(h.headers, length, te)) {
    err = Err::framing;
    ex->drop();
  }

  if (err != Err::none) {
    bool aborted = ex->is_aborted();
    // Never sent: the request body is still on the client connection; read it away so the
    // next request on this keep-alive connection parses from the right place. A body that was
    // streamed in part leaves the connection out of step: it is closed after this answer (its
    // remaining bytes must never parse as a request).
    bool in_step = true;
    if (reader && !aborted) {
      in_step = reader_used ? body_complete : (*reader)([](const char*, size_t) { return true; });
    } else if (reader) {
      in_step = false;
    }
    if (res.status == 413) {
      // A chunked body ran past the payload limit inside httplib's reader.
      res.set_content("request body too large\n", "text/plain");
      return false;
    }
    if (!in_step && client_read_timed_out &&
        client_read_timed_out->load(std::memory_order_acquire)) {
      // The client's body stopped coming (the read timed out while it was streamed to the
      // upstream, or while it was read away after an upstream failure). The upstream got a
      // request cut short and its connection closed (a failed exchange is never pooled).
      // Counted by the stream as a read timeout.
      res.status = 408;
      res.set_content("request body timed out\n", "text/plain");
      log.log(LogLevel::info, "server", "client request body timed out",
              {{"upstream", *upstream},
               {"sent_to_upstream", reader_used ? "partly" : "no"},
               {"exchange", to_string(err)},
               {"status", "408"},
               {"connection", "closed"}});
      return false;
    }
    if (err == Err::client_body && !aborted) {
      // The client's body is at fault, not the upstream: a chunk size that is no number or
      // overflows, a trailer section (httplib 0.11's reader takes none), or the client gone.
      // The upstream got a request cut short and its connection closed.
      res.status = 400;
      res.set_content("bad request body\n", "text/plain");
      log.log(LogLevel::info, "server", "client request body malformed",
              {{"upstream", *upstream}, {"sent_to_upstream", "partly"}, {"status", "400"},
               {"connection", "closed"}});
      return false;
    }
    bool timed_out = err == Err::connect_timeout || err == Err::read_timeout;
    res.status = timed_out ? 504 : 502;
    res.set_content(timed_out ? "upstream timed out\n" : "upstream unavailable\n", "text/plain");
    log.log(LogLevel::warn, "server", "upstream request failed",
            {{"upstream", *upstream},
             {"error", aborted ? "cut at the drain deadline"
                       : ex->why.empty() ? to_string(err)
                                         : std::string(to_string(err)) + ": " + ex->why},
             {"status", std::to_string(res.status)},
             {"connection", in_step ? "kept" : "closed"}});
    return in_step && !aborted;
  }

  res.status = h.status;
  std::string content_type = "application/octet-stream";
  bool keep = !h.http10 && site.max_idle > 0;
  const std::string upstream_options = connection_options(h.headers);
  if (named_in(upstream_options, "close")) keep = false;
  for (const auto& [k, v] : h.headers) {
    if (iequals(k, "content-type")) {
      content_type = v;
      continue;
    }
    if (!is_hop_by_hop(k) && !named_in(upstream_options, k)) res.headers.emplace(k, v);
  }
  bool no_body = req.method == "HEAD" || h.status == 204 || h.status == 304 ||
                 (length && *length == 0);
  if (no_body) {
    auto conn = ex->take();
    if (keep) pool.release(*upstream, site, std::move(conn));
    if (length && req.method == "HEAD") res.set_header("Content-Length", std::to_string(*length));
    if (h.status != 204 && h.status != 304 && req.method != "HEAD") {
      res.set_content("", content_type);
    } else if (h.headers.find("Content-Type") != h.headers.end()) {
      res.set_header("Content-Type", content_type);
    }
    return true;
  }
  auto body = std::make_shared<BodyReader>();
  body->ex = ex;
  body->site = site;
  body->upstream = *upstream;
  body->keep = keep;
  if (length) {
    body->mode = BodyReader::Mode::length;
    body->left = *length;
    res.set_content_provider(*length, content_type,
                             [body](size_t, size_t, httplib::DataSink& sink) {
                               return body->length_body(sink);
                             });
  } else {
    // Transfer-Encoding: chunked when chunked is its last coding; otherwise (another coding,
    // or no framing at all) the body ends with the connection (RFC 9112 6.3).
    bool te_chunked = false;
    if (te) {
      std::string_view v;
      for (const auto& [k, val] : h.headers) {
        if (iequals(k, "transfer-encoding")) v = val;
      }
      auto comma = v.rfind(',');
      te_chunked = iequals(trim(comma == std::string_view::npos ? v : v.substr(comma + 1)),
                           "chunked");
    }
    body->mode = te_chunked ? BodyReader::Mode::chunked : BodyReader::Mode::close;
    if (!te_chunked) body->keep = false;
    res.set_chunked_content_provider(
        content_type, [body](size_t, httplib::DataSink& sink) {
          return body->mode == BodyReader::Mode::chunked ? body->chunked_body(sink)
                                                         : body->close_body(sink);
        });
  }
  // The upstream read the whole request before it answered: the client connection is in step.
  // A response that breaks off later fails its content provider, and httplib reports the
  // write as failed, which closes the connection.
  return true;
}

}  // namespace autotls::server::detail
