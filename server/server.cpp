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
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <fstream>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <httplib.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "acme/util/openssl.h"
#include "server/detail/http_util.h"
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

// Mozilla "intermediate" TLS 1.2 suites (https://ssl-config.mozilla.org/, guideline 5.7);
// TLS 1.3 suites are OpenSSL's defaults, which match the guideline.
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

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return std::tolower(static_cast<unsigned char>(x)) ==
                  std::tolower(static_cast<unsigned char>(y));
         });
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

// Pollable is what an epoll event points at: a listener, the wake-up eventfd, or a connection.
struct Pollable {
  enum class Kind { listener, wake, connection } kind;
  explicit Pollable(Kind k) : kind(k) {}
};

struct Listener : Pollable {
  Listener() : Pollable(Kind::listener) {}
  int fd = -1;
  bool tls = false;
  bool admin = false;  // plain HTTP admin endpoint (AdminConfig)
  std::string name;  // "https listener 127.0.0.1:443"
  int port = 0;
};

// Connection is owned by exactly one thread at a time: the reactor (phases handshake and
// header) or a worker (phase busy). Only the open-connection table is shared.
struct Connection : Pollable {
  Connection() : Pollable(Kind::connection) {}
  enum class Phase { handshake, header, busy };
  int fd = -1;
  const Listener* listener = nullptr;
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
class ConnStream final : public httplib::Stream {
 public:
  ConnStream(Connection& c, milliseconds read_timeout, milliseconds write_timeout)
      : c_(c), read_timeout_(read_timeout), write_timeout_(write_timeout) {}

  bool is_readable() const override {
    if (!c_.unread().empty()) return true;
    if (c_.ssl && SSL_pending(c_.ssl.get()) > 0) return true;
    return wait(POLLIN, read_timeout_);
  }
  bool is_writable() const override { return wait(POLLOUT, write_timeout_); }

  ssize_t read(char* ptr, size_t size) override {
    if (size == 0) return 0;
    if (auto u = c_.unread(); !u.empty()) {
      size_t n = std::min(size, u.size());
      std::memcpy(ptr, u.data(), n);
      c_.pos += n;
      if (c_.pos == c_.buf.size()) {
        c_.buf.clear();
        c_.pos = 0;
      }
      return static_cast<ssize_t>(n);
    }
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
      if (!wait_until(want, deadline)) return -1;
    }
  }

  ssize_t write(const char* ptr, size_t size) override {
    if (size == 0) return 0;
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
      if (!wait_until(want, deadline)) return -1;
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

 private:
  bool wait(short events, milliseconds timeout) const {
    return wait_until(events, SteadyClock::now() + timeout);
  }
  bool wait_until(short events, SteadyClock::time_point deadline) const {
    for (;;) {
      auto left = std::chrono::duration_cast<milliseconds>(deadline - SteadyClock::now());
      if (left.count() < 0) return false;
      pollfd p{c_.fd, events, 0};
      int r = ::poll(&p, 1, poll_ms(left) + 1);
      if (r > 0) return (p.revents & (events | POLLHUP | POLLERR)) != 0;
      if (r == 0) return false;
      if (errno != EINTR) return false;
    }
  }

  Connection& c_;
  milliseconds read_timeout_, write_timeout_;
};

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

}  // namespace

struct Server::Impl {
  ServerConfig cfg;
  std::shared_ptr<tlsreload::CertStore> store;
  std::shared_ptr<tlsreload::ChallengeStore> challenges;
  Logger* log = &null_logger();

  ossl::SslCtxPtr ssl_ctx;
  std::vector<std::unique_ptr<Listener>> listeners;
  int https_port = 0;
  int http_port = 0;
  int admin_port = 0;
  std::size_t worker_count = 8;

  // Routers exist from create() so that their constructor (which also ignores SIGPIPE: OpenSSL
  // writes to sockets with write(2), not send(MSG_NOSIGNAL)) runs before anything is served.
  Router https_router;
  Router http_router;
  Router admin_router;

  int epoll_fd = -1;
  int wake_fd = -1;
  Pollable wake_tag{Pollable::Kind::wake};
  std::thread reactor;
  std::vector<std::thread> workers;

  // Reactor-only state.
  std::unordered_map<Connection*, std::unique_ptr<Connection>> owned;
  std::vector<std::unique_ptr<Connection>> graveyard;  // freed after each epoll batch
  bool listeners_closed = false;
  bool accept_paused = false;
  SteadyClock::time_point accept_resume;

  // Worker queue and hand-back queue.
  std::mutex work_mu;
  std::condition_variable work_cv;
  std::deque<std::unique_ptr<Connection>> work;
  bool work_stop = false;
  std::mutex back_mu;
  std::vector<std::unique_ptr<Connection>> back;

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

  std::atomic<std::uint64_t> accepted{0}, rejected{0}, handshake_failed{0},
      handshake_timeout{0}, header_timeout{0}, idle_closed{0}, header_too_large{0},
      requests{0}, forced_closed{0};

  ~Impl() {
    for (auto& l : listeners) {
      if (l->fd >= 0) ::close(l->fd);
    }
    if (epoll_fd >= 0) ::close(epoll_fd);
    if (wake_fd >= 0) ::close(wake_fd);
  }

  // --- setup ---------------------------------------------------------------------------------

  Status validate_and_resolve() {
    if (cfg.https.empty()) return fail(Errc::invalid_input, "server config: no https listener");
    std::vector<Endpoint> admin_list;
    if (cfg.admin.endpoint) admin_list.push_back(*cfg.admin.endpoint);
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
    if (cfg.redirect_port < 0 || cfg.redirect_port > 65535) {
      return fail(Errc::invalid_input, "server config: bad redirect_port");
    }
    unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    worker_count = cfg.worker_threads ? cfg.worker_threads : std::max<std::size_t>(8, 2 * cores);

    std::map<std::string, Site> sites;
    for (auto& [name, site] : cfg.sites) {
      auto host = detail::host_of(name);
      if (!host || *host != name) {
        return fail(Errc::invalid_input,
                    "server config: site name '" + name + "' is not a lower-case host name");
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
    auto& p = std::get<ProxySite>(site);
    auto scheme_end = p.upstream.find("://");
    std::string scheme = scheme_end == std::string::npos ? "" : p.upstream.substr(0, scheme_end);
    if ((scheme != "http" && scheme != "https") ||
        p.upstream.find('/', scheme_end + 3) != std::string::npos ||
        p.upstream.size() == scheme_end + 3) {
      return fail(Errc::invalid_input, "site " + name + ": upstream '" + p.upstream +
                                           "' must be http(s)://host[:port] without a path");
    }
    if (p.connect_timeout.count() <= 0 || p.read_timeout.count() <= 0 ||
        p.write_timeout.count() <= 0) {
      return fail(Errc::invalid_input, "site " + name + ": upstream timeouts must be positive");
    }
    return {};
  }

  Result<std::unique_ptr<Listener>> bind_listener(const Endpoint& ep, bool tls,
                                                  bool admin = false) {
    auto l = std::make_unique<Listener>();
    l->tls = tls;
    l->admin = admin;
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
    if (::bind(fd, res->ai_addr, res->ai_addrlen) != 0 || ::listen(fd, cfg.backlog) != 0) {
      int err = errno;
      ::close(fd);
      return fail(Errc::io, l->name + ": " + errno_text(err));
    }
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len);
    std::string ip;
    addr_to_text(ss, ip, l->port);
    return l;
  }

  Status build_tls() {
    ssl_ctx.reset(SSL_CTX_new(TLS_server_method()));
    if (!ssl_ctx) return fail(ossl::error("https: SSL_CTX_new"));
    SSL_CTX* ctx = ssl_ctx.get();
    if (SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1 ||
        SSL_CTX_set_cipher_list(ctx, kIntermediateCiphers) != 1) {
      return fail(ossl::error("https: TLS settings"));
    }
    // Renegotiation is a DoS lever and HTTP/1.1 over TLS never needs it. Mozilla intermediate
    // lets the client choose among the (all strong) suites: no SSL_OP_CIPHER_SERVER_PREFERENCE.
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
    // Idle keep-alive connections should not pin 34 KiB of TLS buffers each.
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    static constexpr unsigned char kSidCtx[] = "autotls";
    SSL_CTX_set_session_id_context(ctx, kSidCtx, sizeof kSidCtx - 1);
    // Session tickets stay on (OpenSSL's default, a random ticket key per SSL_CTX).
    tlsreload::AttachOptions opts;
    opts.alpn_protocols = cfg.alpn_protocols;
    if (challenges) {
      // Holds the ChallengeStore alive as long as the SSL_CTX (attach owns the options).
      opts.alpn_challenge = [ch = challenges](std::string_view sni) { return ch->tls_alpn(sni); };
    }
    if (cfg.tls_hooks) cfg.tls_hooks(opts);
    // The SSL_CTX is fully configured here, before any handshake: it is never mutated live.
    auto st = tlsreload::attach(ctx, store, std::move(opts));
    if (!st) return fail(st.error().with_context("https"));
    return {};
  }

  void setup_routes() {
    auto site_handler = [this](bool tls) {
      return [this, tls](const httplib::Request& req, httplib::Response& res) {
        handle_site(req, res, tls);
      };
    };
    auto http_handler = [this](const httplib::Request& req, httplib::Response& res) {
      handle_http(req, res);
    };
    const std::string all = ".*";
    https_router.Get(all, site_handler(true))
        .Post(all, site_handler(true))
        .Put(all, site_handler(true))
        .Patch(all, site_handler(true))
        .Delete(all, site_handler(true))
        .Options(all, site_handler(true));
    http_router.Get(all, http_handler)
        .Post(all, http_handler)
        .Put(all, http_handler)
        .Patch(all, http_handler)
        .Delete(all, http_handler)
        .Options(all, http_handler);
    setup_admin_routes();
    for (auto [router, tls] : {std::pair{&https_router, true}, std::pair{&http_router, false}}) {
      router->set_payload_max_length(cfg.max_body_bytes);
      router->set_keep_alive_max_count(cfg.keep_alive_max_requests);
      router->set_keep_alive_timeout(
          std::max<time_t>(1, std::chrono::duration_cast<std::chrono::seconds>(cfg.timeouts.idle)
                                  .count()));
      router->set_post_routing_handler(
          [this, tls](const httplib::Request&, httplib::Response& res) {
            if (tls && cfg.hsts_max_age.count() > 0) {
              std::string v = "max-age=" + std::to_string(cfg.hsts_max_age.count());
              if (cfg.hsts_include_subdomains) v += "; includeSubDomains";
              res.set_header("Strict-Transport-Security", v);
            }
            if (draining.load()) res.set_header("Connection", "close");
          });
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
    admin_router.set_post_routing_handler([this](const httplib::Request&, httplib::Response& res) {
      res.set_header("Cache-Control", "no-store");
      if (draining.load()) res.set_header("Connection", "close");
    });
  }

  // metrics_text renders the client counters in the Prometheus text exposition format 0.0.4
  // (https://prometheus.io/docs/instrumenting/exposition_formats/).
  std::string metrics_text() {
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
         "Connections closed at accept because max_connections was reached.", rejected.load()},
        {"autotls_server_handshake_failed_total", "counter", "TLS handshakes that failed.",
         handshake_failed.load()},
        {"autotls_server_handshake_timeout_total", "counter",
         "TLS handshakes not complete by the handshake deadline.", handshake_timeout.load()},
        {"autotls_server_header_timeout_total", "counter",
         "Request headers not complete by the header deadline.", header_timeout.load()},
        {"autotls_server_idle_closed_total", "counter",
         "Keep-alive connections closed after the idle timeout.", idle_closed.load()},
        {"autotls_server_header_too_large_total", "counter",
         "Requests refused with 431 (max_header_bytes).", header_too_large.load()},
        {"autotls_server_requests_total", "counter", "Requests handled by workers.",
         requests.load()},
        {"autotls_server_forced_closed_total", "counter",
         "Connections still open when the drain deadline passed.", forced_closed.load()},
        {"autotls_server_open_connections", "gauge", "Open client connections.", open_count()},
        {"autotls_server_ready", "gauge", "1 when started and not draining.",
         started.load() && !draining.load() ? 1u : 0u},
    };
    std::string out;
    for (const auto& m : metrics) {
      out += std::string("# HELP ") + m.name + " " + m.help + "\n";
      out += std::string("# TYPE ") + m.name + " " + m.type + "\n";
      out += std::string(m.name) + " " + std::to_string(m.value) + "\n";
    }
    return out;
  }

  // --- request handlers (worker threads) ------------------------------------------------------

  void handle_http(const httplib::Request& req, httplib::Response& res) {
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
    if (!cfg.redirect_to_https) {
      handle_site(req, res, false);
      return;
    }
    auto host = detail::host_of(req.get_header_value("Host"));
    if (!host) {
      res.status = 400;
      res.set_content("missing or bad Host header\n", "text/plain");
      return;
    }
    int port = cfg.redirect_port ? cfg.redirect_port : https_port;
    // 308 (RFC 9110 §15.4.9) keeps the method and body, unlike 301/302.
    res.status = 308;
    res.set_header("Location", detail::redirect_location(*host, req.target, port));
  }

  void handle_site(const httplib::Request& req, httplib::Response& res, bool tls) {
    auto host = detail::host_of(req.get_header_value("Host"));
    if (!host) {
      res.status = 400;
      res.set_content("missing or bad Host header\n", "text/plain");
      return;
    }
    const Site* site = nullptr;
    if (auto it = cfg.sites.find(*host); it != cfg.sites.end()) {
      site = &it->second;
    } else if (cfg.default_site) {
      site = &*cfg.default_site;
    }
    if (!site) {
      res.status = 421;
      res.set_content("no site for this host\n", "text/plain");
      return;
    }
    if (const auto* s = std::get_if<StaticSite>(site)) {
      serve_static(*s, req, res);
    } else {
      serve_proxy(std::get<ProxySite>(*site), req, res, tls);
    }
  }

  static void serve_static(const StaticSite& site, const httplib::Request& req,
                           httplib::Response& res) {
    if (req.method != "GET" && req.method != "HEAD") {
      res.status = 405;
      res.set_header("Allow", "GET, HEAD");
      return;
    }
    std::filesystem::path file;
    switch (detail::resolve_static(site.root, req.path, site.index, file)) {
      case detail::StaticLookup::bad_request:
        res.status = 400;
        res.set_content("bad path\n", "text/plain");
        return;
      case detail::StaticLookup::not_found:
        res.status = 404;
        res.set_content("not found\n", "text/plain");
        return;
      case detail::StaticLookup::found:
        break;
    }
    std::error_code ec;
    auto size = std::filesystem::file_size(file, ec);
    auto in = std::make_shared<std::ifstream>(file, std::ios::binary);
    if (ec || !*in) {
      res.status = 404;
      res.set_content("not found\n", "text/plain");
      return;
    }
    // Streamed in chunks so a large file never sits in memory whole.
    res.set_content_provider(
        static_cast<size_t>(size), std::string(detail::content_type_for(file)),
        [in](size_t offset, size_t length, httplib::DataSink& sink) {
          char chunk[64 * 1024];
          in->clear();
          in->seekg(static_cast<std::streamoff>(offset));
          in->read(chunk, static_cast<std::streamsize>(std::min(length, sizeof chunk)));
          auto n = in->gcount();
          if (n <= 0) return false;
          return sink.write(chunk, static_cast<size_t>(n));
        });
  }

  void serve_proxy(const ProxySite& site, const httplib::Request& req, httplib::Response& res,
                   bool tls) {
    httplib::Client cli(site.upstream);
    cli.set_connection_timeout(site.connect_timeout);
    cli.set_read_timeout(site.read_timeout);
    cli.set_write_timeout(site.write_timeout);
    cli.set_keep_alive(false);
    cli.set_follow_location(false);
    cli.set_decompress(false);

    httplib::Request up;
    up.method = req.method;
    up.path = req.target;
    for (const auto& [k, v] : req.headers) {
      // Accept-Encoding is dropped so the upstream answers uncompressed and our own
      // compression (httplib's, negotiated with the client) never encodes twice.
      if (detail::is_hop_by_hop(k) || iequals(k, "accept-encoding")) {
        continue;
      }
      up.headers.emplace(k, v);
    }
    // Client-supplied X-Forwarded-* were dropped above: we are the edge, nothing before us is
    // trusted.
    up.headers.emplace("X-Forwarded-For", req.remote_addr);
    up.headers.emplace("X-Forwarded-Proto", tls ? "https" : "http");
    up.headers.emplace("X-Forwarded-Host", req.get_header_value("Host"));
    up.body = req.body;

    auto started_at = SteadyClock::now();
    auto r = cli.send(up);
    if (!r) {
      auto err = r.error();
      auto elapsed = SteadyClock::now() - started_at;
      bool timed_out = err == httplib::Error::ConnectionTimeout ||
                       (err == httplib::Error::Read && elapsed >= site.read_timeout * 9 / 10);
      res.status = timed_out ? 504 : 502;
      res.set_content(timed_out ? "upstream timed out\n" : "upstream unavailable\n",
                      "text/plain");
      log->log(LogLevel::warn, kLog, "upstream request failed",
               {{"upstream", site.upstream}, {"error", httplib::to_string(err)},
                {"status", std::to_string(res.status)}});
      return;
    }
    res.status = r->status;
    for (const auto& [k, v] : r->headers) {
      if (!detail::is_hop_by_hop(k)) res.headers.emplace(k, v);
    }
    res.body = std::move(r->body);
  }

  // --- connection table ----------------------------------------------------------------------

  bool register_open(int fd, bool admin) {
    std::lock_guard lock(open_mu);
    auto& set = admin ? admin_fds : open_fds;
    if (set.size() >= (admin ? kMaxAdminConnections : cfg.max_connections)) return false;
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

  void wake() {
    uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake_fd, &one, sizeof one);
  }

  // --- reactor -------------------------------------------------------------------------------

  void interest(Connection* c, uint32_t events) {
    epoll_event ev{};
    ev.events = events;
    ev.data.ptr = static_cast<Pollable*>(c);
    if (!c->registered) {
      ::epoll_ctl(epoll_fd, EPOLL_CTL_ADD, c->fd, &ev);
      c->registered = true;
    } else if (c->events != events) {
      ::epoll_ctl(epoll_fd, EPOLL_CTL_MOD, c->fd, &ev);
    }
    c->events = events;
  }

  void reactor_close(Connection* c) {
    if (c->closed) return;
    c->closed = true;
    if (c->registered) ::epoll_ctl(epoll_fd, EPOLL_CTL_DEL, c->fd, nullptr);
    c->registered = false;
    close_socket(*c);
    auto it = owned.find(c);
    if (it != owned.end()) {
      graveyard.push_back(std::move(it->second));
      owned.erase(it);
    }
  }

  void dispatch(Connection* c) {
    if (c->registered) ::epoll_ctl(epoll_fd, EPOLL_CTL_DEL, c->fd, nullptr);
    c->registered = false;
    c->events = 0;
    c->phase = Connection::Phase::busy;
    auto it = owned.find(c);
    std::unique_ptr<Connection> owned_ptr = std::move(it->second);
    owned.erase(it);
    {
      std::lock_guard lock(work_mu);
      work.push_back(std::move(owned_ptr));
    }
    work_cv.notify_one();
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

  // advance moves a reactor-owned connection as far as it can go without blocking.
  void advance(Connection* c) {
    if (c->phase == Connection::Phase::handshake) {
      ERR_clear_error();
      c->hello_retry = false;
      int r = SSL_do_handshake(c->ssl.get());
      if (r != 1) {
        int err = SSL_get_error(c->ssl.get(), r);
        if (err == SSL_ERROR_WANT_READ) return interest(c, EPOLLIN);
        if (err == SSL_ERROR_WANT_WRITE) return interest(c, EPOLLOUT);
        if (err == SSL_ERROR_WANT_CLIENT_HELLO_CB) return wait_hello(c);
        ERR_clear_error();
        ++handshake_failed;
        return reactor_close(c);
      }
      c->phase = Connection::Phase::header;
      c->deadline = SteadyClock::now() + cfg.timeouts.header;
    }
    for (;;) {
      // RFC 9112 §2.2: a server SHOULD ignore at least one empty line before the request line.
      while (c->pos < c->buf.size() && (c->buf[c->pos] == '\r' || c->buf[c->pos] == '\n')) {
        ++c->pos;
      }
      if (c->pos == c->buf.size()) {
        c->buf.clear();
        c->pos = 0;
      }
      if (detail::header_end(c->unread()) != 0) return dispatch(c);
      if (c->unread().size() > cfg.max_header_bytes) {
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
        if (c->keep_alive_wait) c->deadline = SteadyClock::now() + cfg.timeouts.header;
      }
      c->buf.append(tmp, static_cast<size_t>(n));
    }
  }

  // wait_hello parks a connection whose client-hello callback answered retry: out of epoll (a
  // readable or hung-up socket must not spin the loop), re-driven by retry_hellos().
  void wait_hello(Connection* c) {
    if (c->registered) ::epoll_ctl(epoll_fd, EPOLL_CTL_DEL, c->fd, nullptr);
    c->registered = false;
    c->events = 0;
    c->hello_retry = true;
    c->retry_at = SteadyClock::now() + milliseconds(25);
  }

  void retry_hellos(SteadyClock::time_point now) {
    std::vector<Connection*> due;
    for (auto& [raw, c] : owned) {
      if (c->hello_retry && now >= c->retry_at && now < c->deadline) due.push_back(raw);
    }
    for (Connection* c : due) {
      if (!c->closed) advance(c);
    }
  }

  void on_accept(Listener& l) {
    for (;;) {
      sockaddr_storage ss{};
      socklen_t len = sizeof ss;
      int fd = ::accept4(l.fd, reinterpret_cast<sockaddr*>(&ss), &len,
                         SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EINTR || errno == ECONNABORTED) continue;
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
          // Out of descriptors: the listener stays readable, so stop polling it for a moment
          // instead of spinning.
          log->log(LogLevel::warn, kLog, "accept paused", {{"error", errno_text(errno)}});
          pause_accept();
        }
        return;
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
      int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      addr_to_text(ss, c->remote_ip, c->remote_port);
      sockaddr_storage local{};
      socklen_t local_len = sizeof local;
      if (::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &local_len) == 0) {
        addr_to_text(local, c->local_ip, c->local_port);
      }
      auto now = SteadyClock::now();
      if (l.tls) {
        c->ssl.reset(SSL_new(ssl_ctx.get()));
        if (!c->ssl || SSL_set_fd(c->ssl.get(), fd) != 1) {
          ERR_clear_error();
          close_socket(*c);
          continue;
        }
        SSL_set_accept_state(c->ssl.get());
        c->phase = Connection::Phase::handshake;
        c->deadline = now + cfg.timeouts.handshake;
      } else {
        c->phase = Connection::Phase::header;
        c->deadline = now + cfg.timeouts.header;
      }
      Connection* raw = c.get();
      owned.emplace(raw, std::move(c));
      interest(raw, EPOLLIN);
    }
  }

  void pause_accept() {
    if (accept_paused) return;
    for (auto& l : listeners) {
      if (l->fd >= 0) ::epoll_ctl(epoll_fd, EPOLL_CTL_DEL, l->fd, nullptr);
    }
    accept_paused = true;
    accept_resume = SteadyClock::now() + milliseconds(100);
  }

  void watch_listeners() {
    for (auto& l : listeners) {
      if (l->fd < 0) continue;
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.ptr = static_cast<Pollable*>(l.get());
      ::epoll_ctl(epoll_fd, EPOLL_CTL_ADD, l->fd, &ev);
    }
  }

  // close_listeners closes the client listeners; the admin listener too when include_admin (at
  // the end of the reactor), so /readyz keeps answering 503 while the drain runs.
  void close_listeners(bool include_admin) {
    if (listeners_closed && !include_admin) return;
    listeners_closed = true;
    for (auto& l : listeners) {
      if (l->fd < 0 || (l->admin && !include_admin)) continue;
      if (!accept_paused) ::epoll_ctl(epoll_fd, EPOLL_CTL_DEL, l->fd, nullptr);
      ::close(l->fd);
      l->fd = -1;
    }
  }

  void expire(SteadyClock::time_point now) {
    std::vector<Connection*> expired;
    for (auto& [raw, c] : owned) {
      if (now >= c->deadline) expired.push_back(raw);
    }
    for (Connection* c : expired) {
      if (c->listener->admin) {
        // Admin connections stay out of the client counters.
      } else if (c->phase == Connection::Phase::handshake) {
        ++handshake_timeout;
      } else if (c->keep_alive_wait && !c->header_started) {
        ++idle_closed;
      } else {
        ++header_timeout;
      }
      reactor_close(c);
    }
  }

  void reactor_loop() {
    std::vector<epoll_event> events(256);
    while (!stop_reactor.load()) {
      // 50 ms bounds how late a deadline fires; a timer wheel can replace the scan later.
      int n = ::epoll_wait(epoll_fd, events.data(), static_cast<int>(events.size()), 50);
      for (int i = 0; i < n; ++i) {
        auto* p = static_cast<Pollable*>(events[i].data.ptr);
        switch (p->kind) {
          case Pollable::Kind::wake: {
            uint64_t v;
            [[maybe_unused]] auto r = ::read(wake_fd, &v, sizeof v);
            break;
          }
          case Pollable::Kind::listener:
            if (auto* l = static_cast<Listener*>(p); l->fd >= 0) on_accept(*l);
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
        std::lock_guard lock(back_mu);
        returned.swap(back);
      }
      for (auto& c : returned) {
        Connection* raw = c.get();
        owned.emplace(raw, std::move(c));
        // Bytes may already wait inside OpenSSL or our buffer, where epoll cannot see them.
        advance(raw);
      }
      auto now = SteadyClock::now();
      if (accept_paused && now >= accept_resume) {
        accept_paused = false;
        watch_listeners();
      }
      if (draining.load() && !listeners_closed) {
        close_listeners(false);
        // Client connections with no request under way have nothing to finish. Admin ones
        // stay: a probe that connected just now must still get its 503, and shutdown does not
        // wait for them.
        std::vector<Connection*> idle;
        for (auto& [raw, c] : owned) {
          if (!c->header_started && !c->listener->admin) idle.push_back(raw);
        }
        for (Connection* c : idle) reactor_close(c);
      }
      retry_hellos(now);
      expire(now);
      graveyard.clear();
    }
    close_listeners(true);
    for (auto& [raw, c] : owned) {
      c->closed = true;
      close_socket(*c);
    }
    owned.clear();
  }

  // --- workers -------------------------------------------------------------------------------

  void worker_loop() {
    for (;;) {
      std::unique_ptr<Connection> c;
      {
        std::unique_lock lock(work_mu);
        work_cv.wait(lock, [&] { return work_stop || !work.empty(); });
        if (work.empty()) return;
        c = std::move(work.front());
        work.pop_front();
      }
      serve(std::move(c));
    }
  }

  void serve(std::unique_ptr<Connection> c) {
    Router& router = c->listener->admin ? admin_router
                     : c->listener->tls ? https_router
                                        : http_router;
    ConnStream stream(*c, cfg.timeouts.read, cfg.timeouts.write);
    for (;;) {
      bool close_connection =
          draining.load() || c->requests + 1 >= cfg.keep_alive_max_requests;
      bool connection_closed = false;
      bool ok = router.serve(stream, close_connection, connection_closed);
      ++c->requests;
      if (!c->listener->admin) ++requests;
      if (!ok || connection_closed || close_connection || draining.load()) {
        close_socket(*c);
        return;
      }
      // A pipelined request that is already here in full is served without a round trip
      // through the reactor.
      auto u = c->unread();
      auto start = u.find_first_not_of("\r\n");
      if (start != std::string_view::npos && detail::header_end(u.substr(start)) != 0) continue;
      break;
    }
    c->compact();
    c->phase = Connection::Phase::header;
    c->header_started = !c->unread().empty();
    c->keep_alive_wait = true;
    c->deadline =
        SteadyClock::now() + (c->header_started ? cfg.timeouts.header : cfg.timeouts.idle);
    {
      std::lock_guard lock(back_mu);
      back.push_back(std::move(c));
    }
    wake();
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
  if (auto st = impl->build_tls(); !st) return fail(st.error());
  for (const auto& ep : impl->cfg.https) {
    auto l = impl->bind_listener(ep, true);
    if (!l) return fail(l.error());
    if (impl->https_port == 0) impl->https_port = (*l)->port;
    impl->listeners.push_back(std::move(*l));
  }
  for (const auto& ep : impl->cfg.http) {
    auto l = impl->bind_listener(ep, false);
    if (!l) return fail(l.error());
    if (impl->http_port == 0) impl->http_port = (*l)->port;
    impl->listeners.push_back(std::move(*l));
  }
  if (impl->cfg.admin.endpoint) {
    auto l = impl->bind_listener(*impl->cfg.admin.endpoint, false, true);
    if (!l) return fail(l.error());
    impl->admin_port = (*l)->port;
    impl->listeners.push_back(std::move(*l));
  }
  impl->setup_routes();
  return std::unique_ptr<Server>(new Server(std::move(impl)));
}

Status Server::start() {
  Impl& m = *impl_;
  if (m.started.load() || m.shut_down) {
    return fail(Errc::invalid_input, "server: start called twice or after shutdown");
  }
  m.epoll_fd = ::epoll_create1(EPOLL_CLOEXEC);
  m.wake_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (m.epoll_fd < 0 || m.wake_fd < 0) {
    return fail(Errc::io, "server: epoll/eventfd: " + errno_text(errno));
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = &m.wake_tag;
  ::epoll_ctl(m.epoll_fd, EPOLL_CTL_ADD, m.wake_fd, &ev);
  m.watch_listeners();
  for (std::size_t i = 0; i < m.worker_count; ++i) {
    m.workers.emplace_back([&m] { m.worker_loop(); });
  }
  m.reactor = std::thread([&m] { m.reactor_loop(); });
  m.started = true;
  for (const auto& l : m.listeners) {
    m.log->log(LogLevel::info, kLog, "listening",
               {{"listener", l->name}, {"port", std::to_string(l->port)}});
  }
  return {};
}

int Server::https_port() const { return impl_->https_port; }
int Server::http_port() const { return impl_->http_port; }
int Server::admin_port() const { return impl_->admin_port; }

bool Server::ready() const { return impl_->started.load() && !impl_->draining.load(); }

void Server::shutdown(milliseconds drain) {
  Impl& m = *impl_;
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
  m.wake();
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
  m.stop_reactor = true;
  m.wake();
  m.reactor.join();
  {
    std::lock_guard lock(m.work_mu);
    m.work_stop = true;
  }
  m.work_cv.notify_all();
  for (auto& w : m.workers) w.join();
  m.workers.clear();
  // A worker that looked at `draining` just before it was set may have handed a connection
  // back after the reactor left.
  for (auto& c : m.back) m.close_socket(*c);
  m.back.clear();
  m.started = false;
  m.log->log(LogLevel::info, kLog, "stopped",
             {{"forced_closed", std::to_string(m.forced_closed.load())}});
}

Server::Counters Server::counters() const {
  Impl& m = *impl_;
  Counters c;
  c.accepted = m.accepted.load();
  c.rejected_over_capacity = m.rejected.load();
  c.handshake_failed = m.handshake_failed.load();
  c.handshake_timeout = m.handshake_timeout.load();
  c.header_timeout = m.header_timeout.load();
  c.idle_closed = m.idle_closed.load();
  c.header_too_large = m.header_too_large.load();
  c.requests = m.requests.load();
  c.forced_closed = m.forced_closed.load();
  c.open_connections = m.open_count();
  return c;
}

}  // namespace autotls::server
