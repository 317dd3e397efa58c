#pragma once

// ServerConfig: what the HTTPS frontend listens on, what it serves for each host name, and the
// limits that keep slow or greedy clients from exhausting it.

#include <chrono>
#include <cstddef>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace autotls::tlsreload {
struct AttachOptions;
}  // namespace autotls::tlsreload

namespace autotls::server {

// Endpoint is one listening address. address is numeric ("0.0.0.0", "::", "127.0.0.1"); port 0
// asks the kernel for an ephemeral port (read it back with Server::https_port()/http_port()).
struct Endpoint {
  std::string address;
  int port = 0;
};

// ResponseHeaders are header fields a site puts on every response it gives (as Caddy's
// `header` directive does: security headers, Cache-Control): each replaces any field of the
// same name the response had, an upstream's included. An entry without a value removes the
// field instead (Caddy's `header -Server`): an upstream's Server or X-Powered-By, or, for
// Strict-Transport-Security, the server-wide HSTS field on this site. Not on a WebSocket's
// 101, nor on the answers that come before a site is chosen (400 for a bad Host, 421, 431,
// 408, ...).
using ResponseHeaders = std::vector<std::pair<std::string, std::optional<std::string>>>;

// response_header_error is empty when name: value may be a ResponseHeaders entry: name a
// field name (RFC 9110 token), not one that frames the message or the connection
// (Content-Length, Transfer-Encoding, Connection, Keep-Alive, Upgrade, TE, Trailer,
// Proxy-Connection; they can be neither set nor removed), value (when set) visible ASCII,
// spaces and tabs (no line breaks, no leading or trailing white space). Otherwise one line
// saying what is wrong.
std::string response_header_error(std::string_view name, const std::optional<std::string>& value);

// StaticSite serves files below root. Request paths are URL-decoded, must not contain a ".."
// segment (400), and the resolved file (symlinks followed) must stay inside root (404).
// A directory serves its index file. Only GET and HEAD are allowed (405 otherwise).
struct StaticSite {
  std::filesystem::path root;
  std::string index = "index.html";
  ResponseHeaders headers{};
};

// ProxySite forwards requests to upstream, "http://host:port" or "https://host:port" (no path).
// Method, target, headers (minus hop-by-hop ones) and body are passed on; the original Host is
// kept; X-Forwarded-For/-Proto/-Host are set by us (client-supplied values are replaced, never
// trusted). Connect failure answers 502, a connect or read timeout 504.
struct ProxySite {
  ProxySite() = default;
  explicit ProxySite(std::string url) : upstream(std::move(url)) {}

  // The upstream; with more_upstreams, the first of several that requests are spread over in
  // turn (round robin). An upstream whose connect fails (refused, unreachable, timed out, TLS
  // refused) is left out for fail_timeout, and the request goes to the next one: it never
  // reached the failed one, so any method may move. When every upstream is left out, they are
  // tried all the same, in turn.
  std::string upstream;
  std::vector<std::string> more_upstreams;
  std::chrono::milliseconds fail_timeout{10'000};
  std::chrono::milliseconds connect_timeout{5'000};
  std::chrono::milliseconds read_timeout{60'000};
  std::chrono::milliseconds write_timeout{60'000};
  // Idle keep-alive connections kept per upstream URL (0: a new connection per request), and
  // how long one may stay idle before it is closed instead of reused: shorter than the
  // upstream's own keep-alive timeout (nginx 75 s, Node 5 s, Apache 5 s), so that an upstream
  // rarely closes a connection as we reuse it (a GET/HEAD/OPTIONS/PUT/DELETE that meets such a
  // close is retried once on a new connection; a POST answers 502).
  std::size_t max_idle = 32;
  std::chrono::milliseconds idle_timeout{4'000};
  // A WebSocket passed through (after the upstream's 101) is closed when no byte has moved in
  // either direction for this long (nginx closes after proxy_read_timeout, 60 s, without a
  // byte from the upstream; Caddy never). Applications that keep sockets open send pings.
  std::chrono::milliseconds tunnel_idle_timeout{300'000};
  ResponseHeaders headers{};
};

// upstream_error is empty when url is a usable ProxySite::upstream ("http://host[:port]" or
// "https://host[:port]", port 1-65535, nothing after it, not even "/"); otherwise one line
// naming the URL and what is wrong with it. Server::create and reload refuse such a site;
// `autotls serve` refuses it when it reads its configuration.
std::string upstream_error(std::string_view url);

// RedirectSite answers every request with a redirect (as Caddy's `redir` and nginx's
// `return 301 URL` do; www to the bare domain is the common case). to is an absolute URL,
// "http(s)://host[:port][/path...]", or a path beginning with "/" (the same host). "{uri}" in
// it stands for the request target (path and query, as received); a URL with no path at all
// ("https://example.com") keeps the request target, as if it ended in "{uri}". status is 301,
// 302, 303, 307 or 308; 302 by default, as Caddy's (a permanent redirect is cached by browsers,
// so a mistake outlives its fix). A request body is read away, as for a static site.
struct RedirectSite {
  std::string to;
  int status = 302;
  ResponseHeaders headers{};
};

// redirect_error is empty when to and status make a usable RedirectSite; otherwise one line
// saying what is wrong. Server::create and reload refuse such a site.
std::string redirect_error(std::string_view to, int status);

using Site = std::variant<StaticSite, ProxySite, RedirectSite>;

// headers_of gives the ResponseHeaders of whichever kind of site s is.
inline const ResponseHeaders& headers_of(const Site& s) {
  return std::visit([](const auto& v) -> const ResponseHeaders& { return v.headers; }, s);
}

struct Timeouts {
  // handshake: from accept until the TLS handshake completes.
  std::chrono::milliseconds handshake{10'000};
  // header: until the request line and all header fields have arrived, counted from the end
  // of the handshake (a new connection) or from the first byte of a request (keep-alive).
  std::chrono::milliseconds header{10'000};
  // read / write: the longest wait for one socket read (request body) or write (response).
  std::chrono::milliseconds read{30'000};
  std::chrono::milliseconds write{30'000};
  // idle: how long a keep-alive connection may wait for the next request's first byte.
  std::chrono::milliseconds idle{60'000};
};

// AdminConfig is the operator endpoint: plain HTTP (no TLS), meant for loopback or a private
// network, served by the same reactor and workers as the client listeners. Its connections
// are capped separately (64), do not count toward max_connections or the client counters, and
// its listener stays open during a drain so that /readyz can answer 503 to load balancers.
//   GET /healthz      200 "ok" while the process serves requests at all.
//   GET /readyz       200 "ready" when the server is started, not draining and ready() (if
//                     set) returns true; 503 "not ready" otherwise.
//   GET /metrics      Prometheus text format 0.0.4: the Server counters (autotls_server_*),
//                     then whatever metrics() (if set) returns, appended verbatim.
//   GET /certificates certificates() (if set) as application/json; 404 when unset.
// The callbacks run on worker threads, possibly concurrently, and MUST be thread-safe, return
// quickly and not throw. They MUST NOT call back into this Server's shutdown().
struct AdminConfig {
  // endpoint is the admin listener; empty disables it (the library default).
  std::optional<Endpoint> endpoint;
  std::function<bool()> ready;
  // metrics returns extra exposition text (with its own # HELP / # TYPE lines, ending in \n).
  std::function<std::string()> metrics;
  std::function<std::string()> certificates;
};

// SessionTickets: stateless TLS session resumption (TLS 1.2 tickets and TLS 1.3 PSK tickets).
// Ticket keys are random, live in memory only (never on disk, never shared between processes)
// and rotate every rotate_every; a retired key still opens tickets until lifetime has passed,
// then it is wiped. A ticket whose key is gone, or older than lifetime, gets a full handshake.
// Stateful session-ID resumption is off (no server-side session cache).
// A reload (Server::reload) applies a new rotate_every to the running key ring; enabled and
// lifetime need a restart.
struct SessionTickets {
  bool enabled = true;
  std::chrono::seconds rotate_every{3'600};
  // lifetime is the ticket lifetime hint sent to clients and the longest a ticket is honoured.
  std::chrono::seconds lifetime{12 * 3'600};
};

// AccessLog: one line per request (after the response is written). Off by default.
//   format "json":     {"time":...,"remote":...,"host":...,"method":...,"target":...,
//                       "status":...,"bytes":...,"duration_ms":...,"tls":true}
//   format "combined": the NCSA combined log format of Apache/nginx.
// sink receives each line without the trailing newline; it runs on worker threads, MUST be
// thread-safe and quick. Without a sink, lines are appended to file (created 0640 if missing,
// opened again by every Server::reload, so a reload after a rename - logrotate - writes to a
// new file at the same path), or go to stderr when file is empty.
struct AccessLog {
  bool enabled = false;
  std::string format = "json";
  std::filesystem::path file;
  std::function<void(const std::string&)> sink;
};

// ServerConfig is validated by Server::create; the defaults are production values.
struct ServerConfig {
  // https listeners; at least one is required.
  std::vector<Endpoint> https = {{"0.0.0.0", 443}, {"::", 443}};
  // http listeners (http-01 challenges and redirects); empty disables plain HTTP.
  std::vector<Endpoint> http = {{"0.0.0.0", 80}, {"::", 80}};
  // redirect_to_https answers every plain-HTTP request other than an http-01 challenge with a
  // 308 to https://<host><target>. When false the sites are served over plain HTTP too.
  bool redirect_to_https = true;
  // redirect_port is the port put into redirect URLs: 0 means the first https listener's port
  // (omitted from the URL when it is 443). Set it when a NAT maps 443 to another local port.
  int redirect_port = 0;

  // sites maps lower-case host names (port ignored) to what they serve. A key "*.example.com"
  // serves the hosts one label under example.com that have no site of their own (not
  // example.com, not a.b.example.com), as a wildcard certificate covers them.
  std::map<std::string, Site> sites;
  // default_site serves hosts not in sites; without it they get 421 Misdirected Request.
  std::optional<Site> default_site;

  // hsts_max_age > 0 adds "Strict-Transport-Security: max-age=N" to HTTPS responses that do
  // not carry one already (from the site's headers, or its upstream).
  std::chrono::seconds hsts_max_age{0};
  bool hsts_include_subdomains = false;

  Timeouts timeouts;

  // max_connections caps open client connections across all listeners; over the cap a new
  // connection is closed at once.
  std::size_t max_connections = 10'000;
  // max_header_bytes caps the request line plus header fields (431 and close when exceeded).
  std::size_t max_header_bytes = 16 * 1024;
  // max_body_bytes caps a request body (413).
  std::size_t max_body_bytes = 10 * 1024 * 1024;
  // keep_alive_max_requests closes a connection after this many requests.
  std::size_t keep_alive_max_requests = 1'000;
  // reactor_threads accept connections, run TLS handshakes, read request headers and serve
  // requests whose handler never blocks (static files up to 64 KiB, redirects, http-01);
  // 0 means one per core.
  std::size_t reactor_threads = 0;
  // worker_threads run the handlers that may block (reverse proxy, request bodies still to
  // arrive, large files, the admin endpoints); 0 means max(8, 2 * cores).
  std::size_t worker_threads = 0;
  // backlog is the listen(2) queue length.
  int backlog = 1'024;
  // alpn_protocols offered on the https listeners, in preference order.
  std::vector<std::string> alpn_protocols = {"http/1.1"};
  // admin is the operator endpoint (/healthz, /readyz, /metrics, /certificates); off by default.
  AdminConfig admin;
  SessionTickets tickets;
  AccessLog access_log;
  // tls_hooks, when set, may add to the tlsreload::AttachOptions of the https listeners just
  // before they are attached (on-demand issuance sets on_unknown_name and on_served there).
  // A hook answering UnknownName::retry suspends the handshake: the reactor re-runs it every
  // ~25 ms until it completes, fails, or timeouts.handshake passes.
  std::function<void(tlsreload::AttachOptions&)> tls_hooks;
  // on_header_started, when set, is called on a reactor thread each time it has read the first
  // bytes of a client request (not an admin one) from a connection: from then on the request
  // is under way (a drain or a reload lets it finish instead of closing the connection). For
  // tests, which wait for it instead of sleeping; it must be quick. Not changed by reload.
  std::function<void()> on_header_started;
};

}  // namespace autotls::server
