// autotls serve: the Manager (issue, store, renew) and server::Server (HTTPS, http-01,
// tls-alpn-01, static sites and reverse proxy) in one process, with signal handling.

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <condition_variable>
#include <cstdio>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <thread>
#include <tuple>

#include "acme/ari.h"
#include "server/server.h"
#include "tlsreload/heap_pages.h"
#include "tlsreload/internal_ca.h"
#include "tlsreload/on_demand.h"
#include "tlsreload/store.h"
#include "tools/cli.h"
#include "tools/config.h"
#include "tools/progress.h"
#include "tools/serve_files.h"

namespace autotls::cli {

namespace {

using json = nlohmann::json;
using std::chrono::system_clock;

// CancellableClock lets shutdown cut short the Manager's waits (polling, lock waits): a
// cancelled sleep returns false and the issuance in progress is abandoned.
class CancellableClock : public Clock {
 public:
  time_point now() const override { return system_clock::now(); }
  bool sleep_for(std::chrono::milliseconds d) override {
    std::unique_lock lock(mu_);
    return !cv_.wait_for(lock, d, [this] { return cancelled_; });
  }
  void cancel() {
    {
      std::lock_guard lock(mu_);
      cancelled_ = true;
    }
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool cancelled_ = false;
};

// SiteEntry is one entry of "sites": what to serve, and the certificate settings of the
// site's name (empty fields: the issuer's, then the top-level ones).
struct SiteEntry {
  server::Site site;
  tlsreload::CertificateSettings cert;
};

// The certificate keys of a site, each also accepted with an underscore (key_type), as Caddy
// and the issue text spell them; giving both spellings is an error.
constexpr std::pair<const char*, const char*> kSiteCertKeys[] = {
    {"key-type", "key_type"}, {"profile", "profile"}, {"preferred-chain", "preferred_chain"}};

// site_cert_settings reads a site's key-type, profile and preferred-chain. Errors name the site
// and the key as written.
Result<tlsreload::CertificateSettings> site_cert_settings(const std::string& host, const json& j) {
  tlsreload::CertificateSettings out;
  for (const auto& [dash, under] : kSiteCertKeys) {
    const bool has_dash = j.contains(dash), has_under = std::string_view(dash) != under && j.contains(under);
    if (has_dash && has_under) {
      return fail(Errc::invalid_input, "sites." + host + ": give \"" + dash + "\" or \"" + under + "\", not both");
    }
    if (!has_dash && !has_under) continue;
    const std::string key = has_dash ? dash : under;
    const std::string where = "sites." + host + "." + key;
    const json& v = j[key];
    if (!v.is_string()) return fail(Errc::invalid_input, where + ": expected a string");
    std::string text = v.get<std::string>();
    if (std::string_view(dash) == "key-type") {
      auto kt = acme::parse_key_type(text);
      if (!kt) {
        return fail(Errc::invalid_input, where + ": must be ec256, ec384, rsa2048, rsa3072 or rsa4096, not \"" + text + "\"");
      }
      out.key_type = *kt;
    } else if (std::string_view(dash) == "profile") {
      // Profile names are the CA's (draft-aaron-acme-profiles); Let's Encrypt's are classic,
      // tlsserver and shortlived. Whether the CA offers it is checked at the order.
      bool ok = !text.empty() && text.size() <= 64 && std::all_of(text.begin(), text.end(), [](char c) {
        return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
      });
      if (!ok) {
        return fail(Errc::invalid_input, where + ": \"" + text + "\" is not a profile name (letters, digits, '-', '_', '.'; "
                                         "for example classic, tlsserver or shortlived)");
      }
      out.profile = std::move(text);
    } else {
      bool ok = !text.empty() && std::none_of(text.begin(), text.end(), [](char c) {
        return static_cast<unsigned char>(c) < 0x20 || c == 0x7f;
      });
      if (!ok) {
        return fail(Errc::invalid_input, where + ": expected the common name of a root or intermediate, such as "
                                         "\"ISRG Root X1\"");
      }
      out.preferred_chain = std::move(text);
    }
  }
  return out;
}

Result<SiteEntry> site_from_json(const std::string& host, const json& j) {
  if (!j.is_object()) {
    return fail(Errc::invalid_input, "sites." + host + ": expected an object {\"root\": DIR}, {\"proxy\": URL} or {\"redirect\": URL}");
  }
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    bool cert_key = std::any_of(std::begin(kSiteCertKeys), std::end(kSiteCertKeys),
                                [&](const auto& p) { return k == p.first || k == p.second; });
    if (k != "root" && k != "proxy" && k != "index" && k != "upstream-keepalive" &&
        k != "upstream-idle-timeout" && k != "tunnel-idle-timeout" && k != "upstream-fail-timeout" &&
        k != "redirect" && k != "redirect-code" && k != "headers" && !cert_key) {
      return fail(Errc::invalid_input,
                  "sites." + host + ": unknown key \"" + k + "\" (root, index, proxy, upstream-keepalive, upstream-idle-timeout, upstream-fail-timeout, tunnel-idle-timeout, redirect, redirect-code, headers, key-type, profile, preferred-chain)");
    }
  }
  auto cert = site_cert_settings(host, j);
  if (!cert) return fail(cert.error());
  server::ResponseHeaders headers;
  if (j.contains("headers")) {
    const auto& hj = j["headers"];
    if (!hj.is_object()) {
      return fail(Errc::invalid_input, "sites." + host + ".headers: expected an object {\"Field-Name\": \"value\", ...}");
    }
    for (auto it = hj.begin(); it != hj.end(); ++it) {
      if (!it.value().is_string() && !it.value().is_null()) {
        return fail(Errc::invalid_input, "sites." + host + ".headers." + it.key() +
                                             ": expected a string (or null, to remove the field)");
      }
      std::optional<std::string> value;
      if (it.value().is_string()) value = it.value().get<std::string>();
      if (auto why = server::response_header_error(it.key(), value); !why.empty()) {
        return fail(Errc::invalid_input, "sites." + host + ".headers: " + why);
      }
      for (const auto& [seen, v] : headers) {
        if (std::equal(seen.begin(), seen.end(), it.key().begin(), it.key().end(), [](char a, char b) {
              return std::tolower(static_cast<unsigned char>(a)) == std::tolower(static_cast<unsigned char>(b));
            })) {
          return fail(Errc::invalid_input, "sites." + host + ".headers: \"" + seen + "\" and \"" + it.key() + "\" are the same field");
        }
      }
      headers.emplace_back(it.key(), std::move(value));
    }
  }
  bool root = j.contains("root"), proxy = j.contains("proxy"), redirect = j.contains("redirect");
  if (int(root) + int(proxy) + int(redirect) != 1) {
    return fail(Errc::invalid_input, "sites." + host + ": give exactly one of \"root\", \"proxy\" and \"redirect\"");
  }
  if (!redirect && j.contains("redirect-code")) {
    return fail(Errc::invalid_input, "sites." + host + ": redirect-code needs \"redirect\"");
  }
  if (!root && j.contains("index")) {
    return fail(Errc::invalid_input, "sites." + host + ": index needs \"root\"");
  }
  if (redirect) {
    if (j.contains("upstream-keepalive") || j.contains("upstream-idle-timeout") ||
        j.contains("upstream-fail-timeout") || j.contains("tunnel-idle-timeout")) {
      return fail(Errc::invalid_input, "sites." + host + ": upstream-keepalive, upstream-idle-timeout, upstream-fail-timeout and tunnel-idle-timeout need \"proxy\"");
    }
    if (!j["redirect"].is_string()) return fail(Errc::invalid_input, "sites." + host + ".redirect: expected a string");
    server::RedirectSite r;
    r.to = j["redirect"].get<std::string>();
    if (j.contains("redirect-code")) {
      const auto& v = j["redirect-code"];
      if (!v.is_number_integer()) {
        return fail(Errc::invalid_input, "sites." + host + ".redirect-code: expected 301, 302, 303, 307 or 308");
      }
      auto code = v.get<long long>();
      if (code != 301 && code != 302 && code != 303 && code != 307 && code != 308) {
        return fail(Errc::invalid_input, "sites." + host + ".redirect-code: " + std::to_string(code) +
                                             " is not a redirect status (301, 302, 303, 307 or 308)");
      }
      r.status = static_cast<int>(code);
    }
    if (auto why = server::redirect_error(r.to, r.status); !why.empty()) {
      return fail(Errc::invalid_input, "sites." + host + ": " + why);
    }
    r.headers = std::move(headers);
    return SiteEntry{server::Site(r), *cert};
  }
  if (root && (j.contains("upstream-keepalive") || j.contains("upstream-idle-timeout") ||
               j.contains("upstream-fail-timeout") || j.contains("tunnel-idle-timeout"))) {
    return fail(Errc::invalid_input, "sites." + host + ": upstream-keepalive, upstream-idle-timeout, upstream-fail-timeout and tunnel-idle-timeout need \"proxy\"");
  }
  if (root) {
    if (!j["root"].is_string()) return fail(Errc::invalid_input, "sites." + host + ".root: expected a string");
    server::StaticSite s;
    s.root = j["root"].get<std::string>();
    if (j.contains("index")) {
      const auto& v = j["index"];
      if (!v.is_string() || v.get<std::string>().empty()) {
        return fail(Errc::invalid_input, "sites." + host + ".index: expected a file name such as \"index.html\"");
      }
      s.index = v.get<std::string>();
    }
    s.headers = std::move(headers);
    return SiteEntry{server::Site(s), *cert};
  }
  // One upstream, or a list that requests are spread over in turn.
  const auto& pj = j["proxy"];
  std::vector<std::string> urls;
  if (pj.is_string()) {
    urls.push_back(pj.get<std::string>());
  } else if (pj.is_array() && !pj.empty() &&
             std::all_of(pj.begin(), pj.end(), [](const json& u) { return u.is_string(); })) {
    for (const auto& u : pj) urls.push_back(u.get<std::string>());
  } else {
    return fail(Errc::invalid_input, "sites." + host + ".proxy: expected a URL or a non-empty list of URLs");
  }
  for (const auto& url : urls) {
    if (auto why = server::upstream_error(url); !why.empty()) {
      return fail(Errc::invalid_input, "sites." + host + ".proxy: " + why);
    }
    if (std::count(urls.begin(), urls.end(), url) > 1) {
      return fail(Errc::invalid_input, "sites." + host + ".proxy: \"" + url + "\" is listed twice");
    }
  }
  server::ProxySite p;
  p.upstream = urls.front();
  p.more_upstreams.assign(urls.begin() + 1, urls.end());
  if (j.contains("upstream-keepalive")) {
    const auto& v = j["upstream-keepalive"];
    if (!v.is_number_integer() || v.get<long long>() < 0 || v.get<long long>() > 1024) {
      return fail(Errc::invalid_input, "sites." + host + ".upstream-keepalive: expected an integer 0-1024");
    }
    p.max_idle = static_cast<std::size_t>(v.get<long long>());
  }
  if (j.contains("upstream-idle-timeout")) {
    const auto& v = j["upstream-idle-timeout"];
    if (!v.is_number() || v.get<double>() < 0.001 || v.get<double>() > 86400) {
      return fail(Errc::invalid_input, "sites." + host + ".upstream-idle-timeout: expected seconds, 0.001-86400");
    }
    p.idle_timeout = std::chrono::milliseconds(static_cast<long long>(v.get<double>() * 1000));
  }
  if (j.contains("upstream-fail-timeout")) {
    const auto& v = j["upstream-fail-timeout"];
    if (!v.is_number() || v.get<double>() < 0 || v.get<double>() > 86400) {
      return fail(Errc::invalid_input, "sites." + host + ".upstream-fail-timeout: expected seconds, 0-86400");
    }
    p.fail_timeout = std::chrono::milliseconds(static_cast<long long>(v.get<double>() * 1000));
  }
  if (j.contains("tunnel-idle-timeout")) {
    const auto& v = j["tunnel-idle-timeout"];
    if (!v.is_number() || v.get<double>() < 0.001 || v.get<double>() > 604800) {
      return fail(Errc::invalid_input, "sites." + host + ".tunnel-idle-timeout: expected seconds, 0.001-604800");
    }
    p.tunnel_idle_timeout =
        std::chrono::milliseconds(static_cast<long long>(v.get<double>() * 1000));
  }
  p.headers = std::move(headers);
  return SiteEntry{server::Site(p), *cert};
}

Result<std::vector<server::Endpoint>> endpoints(const std::vector<std::string>& addresses,
                                                const std::vector<std::string>& defaults) {
  std::vector<server::Endpoint> out;
  const auto& list = addresses.empty() ? defaults : addresses;
  for (const auto& a : list) {
    if (a == "off" || a == "none") return std::vector<server::Endpoint>{};
    auto hp = parse_host_port(a);
    if (!hp) return fail(hp.error());
    out.push_back({hp->first, hp->second});
  }
  return out;
}

// prometheus_label escapes a label value (text format 0.0.4: backslash, quote, newline).
std::string prometheus_label(const std::string& v) {
  std::string out;
  for (char ch : v) {
    if (ch == '\\' || ch == '"') out += '\\';
    if (ch == '\n') {
      out += "\\n";
      continue;
    }
    out += ch;
  }
  return out;
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : " ") + x;
  return s;
}

// A --cert-dir may hold 100,000 names: a log line names the first kShownNames of a list and
// counts the rest (a SIGHUP's reload line listing all of them was 2 MB).
constexpr std::size_t kShownNames = 20;

std::vector<std::string> first_names(const std::vector<std::string>& v) {
  return {v.begin(), v.begin() + static_cast<std::ptrdiff_t>(std::min(v.size(), kShownNames))};
}

// join_names is join of first_names, with " and N more" when names were left out.
std::string join_names(const std::vector<std::string>& v) {
  std::string s = join(first_names(v));
  if (v.size() > kShownNames) s += " and " + std::to_string(v.size() - kShownNames) + " more";
  return s;
}

// parse_rate reads "N/DURATION" (DURATION: a number with s, m or h, e.g. "20/1m"; "0/1s" is
// unlimited).
Result<tlsreload::Rate> parse_rate(const std::string& flag, const std::string& text) {
  auto bad = [&] {
    return fail(Errc::invalid_input, flag + ": \"" + text + "\" is not N/DURATION (for example 20/1m, 2/1h)");
  };
  auto slash = text.find('/');
  if (slash == std::string::npos || slash == 0 || slash + 2 > text.size()) return bad();
  tlsreload::Rate r;
  long long secs = 0;
  try {
    size_t used = 0;
    r.count = std::stoi(text.substr(0, slash), &used);
    if (used != slash || r.count < 0) return bad();
    std::string d = text.substr(slash + 1);
    long long mult = d.back() == 's' ? 1 : d.back() == 'm' ? 60 : d.back() == 'h' ? 3600 : 0;
    if (mult == 0) return bad();
    d.pop_back();
    secs = std::stoll(d, &used) * mult;
    if (used != d.size() || secs <= 0) return bad();
  } catch (const std::exception&) {
    return bad();
  }
  r.per = std::chrono::seconds(secs);
  return r;
}

// seconds_option converts a flag's seconds to milliseconds when lo <= v <= hi, else an error
// naming the flag and the range (NaN and values too large for the conversion included).
Result<std::chrono::milliseconds> seconds_option(const char* flag, double v, double lo, double hi) {
  if (!(v >= lo && v <= hi)) {
    std::ostringstream text;
    text << flag << " must be between " << lo << " and " << hi << " seconds, not " << v;
    return fail(Errc::invalid_input, text.str());
  }
  return std::chrono::milliseconds(static_cast<long long>(v * 1000));
}

Result<tlsreload::OnDemandOptions> on_demand_options(const Options& o, const std::string& ca_bundle) {
  tlsreload::OnDemandOptions od;
  od.enabled = o.on_demand;
  od.allowed = o.on_demand_allow;
  for (auto& p : od.allowed) {
    for (char& c : p) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  od.ask_url = o.on_demand_ask;
  od.ca_bundle = ca_bundle;
  auto rate = parse_rate("--on-demand-rate", o.on_demand_rate);
  if (!rate) return fail(rate.error());
  od.global_rate = *rate;
  rate = parse_rate("--on-demand-name-rate", o.on_demand_name_rate);
  if (!rate) return fail(rate.error());
  od.per_name_rate = *rate;
  od.max_concurrent = o.on_demand_max_concurrent;
  if (o.on_demand_max_cached < 1) return fail(Errc::invalid_input, "--on-demand-max-cached must be at least 1");
  od.max_cached = static_cast<size_t>(o.on_demand_max_cached);
  auto wait = seconds_option("--on-demand-wait", o.on_demand_wait, 0.001, 86'400);
  if (!wait) return fail(wait.error());
  od.handshake_wait = *wait;
  auto ask = seconds_option("--on-demand-ask-timeout", o.on_demand_ask_timeout, 0.001, 86'400);
  if (!ask) return fail(ask.error());
  od.ask_timeout = *ask;
  if (o.on_demand_deny_ttl < 0) return fail(Errc::invalid_input, "--on-demand-deny-ttl must not be negative");
  od.deny_ttl = std::chrono::seconds(o.on_demand_deny_ttl);
  if (auto st = tlsreload::validate_on_demand(od); !st) return fail(st.error());
  if (!od.enabled && (!od.allowed.empty() || !od.ask_url.empty())) {
    return fail(Errc::invalid_input, "--on-demand-allow/--on-demand-ask given without --on-demand: add --on-demand "
                                     "(\"on-demand\": true) to enable on-demand issuance");
  }
  return od;
}

// server_limits copies the timeouts, caps, thread counts and ticket schedule into cfg, each
// checked against a sane range.
Status server_limits(const Options& o, server::ServerConfig& cfg) {
  auto bad = [](const std::string& m) { return fail(Errc::invalid_input, m); };
  auto seconds = [&](const char* flag, double v, std::chrono::milliseconds& out) -> Status {
    // At least 10 ms (a deadline below the reactor's 50 ms tick is not meaningful), at most a day.
    auto ms = seconds_option(flag, v, 0.01, 86'400);
    if (!ms) return fail(ms.error());
    out = *ms;
    return {};
  };
  auto& t = cfg.timeouts;
  for (auto [flag, v, out] : {std::tuple{"--handshake-timeout", o.handshake_timeout, &t.handshake},
                              std::tuple{"--header-timeout", o.header_timeout, &t.header},
                              std::tuple{"--read-timeout", o.read_timeout, &t.read},
                              std::tuple{"--write-timeout", o.write_timeout, &t.write},
                              std::tuple{"--idle-timeout", o.idle_timeout, &t.idle}}) {
    if (auto st = seconds(flag, v, *out); !st) return st;
  }
  auto range = [&](const char* flag, long long v, long long lo, long long hi) -> Status {
    if (v < lo || v > hi) {
      return bad(std::string(flag) + " must be between " + std::to_string(lo) + " and " + std::to_string(hi) +
                 ", not " + std::to_string(v));
    }
    return {};
  };
  const std::tuple<const char*, long long, long long, long long> ranges[] = {
      {"--max-connections", o.max_connections, 1, 10'000'000},
      {"--max-header-bytes", o.max_header_bytes, 256, 1 << 20},
      {"--max-body-bytes", o.max_body_bytes, 0, 1LL << 40},
      {"--keep-alive-max-requests", o.keep_alive_max_requests, 1, 1'000'000'000},
      {"--worker-threads", o.worker_threads, 0, 1024},
      {"--reactor-threads", o.reactor_threads, 0, 256},
      {"--backlog", o.backlog, 1, 65'535},
      // Keys rotate at least a minute and at most a day apart; a ticket lives 1 min..7 days.
      {"--ticket-rotation", o.ticket_rotation, 60, 86'400},
      {"--ticket-lifetime", o.ticket_lifetime, 60, 7 * 86'400},
  };
  for (const auto& [flag, v, lo, hi] : ranges) {
    if (auto st = range(flag, v, lo, hi); !st) return st;
  }
  if (o.ticket_rotation > o.ticket_lifetime) {
    return bad("--ticket-rotation (" + std::to_string(o.ticket_rotation) + " s) must not exceed --ticket-lifetime (" +
               std::to_string(o.ticket_lifetime) + " s)");
  }
  cfg.max_connections = static_cast<std::size_t>(o.max_connections);
  cfg.max_header_bytes = static_cast<std::size_t>(o.max_header_bytes);
  cfg.max_body_bytes = static_cast<std::size_t>(o.max_body_bytes);
  cfg.keep_alive_max_requests = static_cast<std::size_t>(o.keep_alive_max_requests);
  cfg.worker_threads = static_cast<std::size_t>(o.worker_threads);
  cfg.reactor_threads = static_cast<std::size_t>(o.reactor_threads);
  cfg.backlog = o.backlog;
  cfg.tickets.rotate_every = std::chrono::seconds(o.ticket_rotation);
  cfg.tickets.lifetime = std::chrono::seconds(o.ticket_lifetime);
  return {};
}

}  // namespace

Result<ServeSetup> serve_setup(const Options& o) {
  auto bad = [](const std::string& m) { return fail(Errc::invalid_input, m); };
  ServeSetup out;
  auto& cfg = out.cfg;
  auto& names = out.names;
  // The names as issue takes them (lower case, punycode, no trailing dot), each one a
  // certificate can hold: refused here, before anything listens, never dropped later.
  auto requested = requested_names(o, "serve");
  if (!requested) return fail(requested.error());
  names = std::move(*requested);
  const std::string in_file = o.config.empty() ? "" : o.config + ": ";
  if (o.sites.is_object()) {
    std::map<std::string, std::string> written;  // normalized host -> the key as written
    for (auto it = o.sites.begin(); it != o.sites.end(); ++it) {
      // A site's host is one name, matched against the Host header as the server reads it:
      // lower case, punycode for Unicode, no trailing dot. "*.example.com" serves the hosts one
      // label under example.com that have no site of their own (its certificate: a wildcard).
      auto host = idn_name(it.key());
      if (!host) return bad(in_file + "sites." + it.key() + ": " + host.error().message);
      if (host->ascii.starts_with("*.") && acme::identifier_for(host->ascii.substr(2)).type == "ip") {
        return bad(in_file + "sites." + it.key() + ": a wildcard is over a host name, not an address");
      }
      if (!tlsreload::is_valid_lookup_name(host->ascii)) {
        return bad(in_file + "sites." + it.key() + ": not a valid DNS name or IP address");
      }
      if (auto [w, fresh] = written.emplace(host->ascii, it.key()); !fresh) {
        return bad(in_file + "sites." + w->second + " and sites." + it.key() + " are the same host (" + host->ascii + ")");
      }
      auto site = site_from_json(it.key(), it.value());
      if (!site) return bad(in_file + site.error().message);
      cfg.sites[host->ascii] = site->site;
      if (site->cert != tlsreload::CertificateSettings{}) out.cert_settings[host->ascii] = site->cert;
      if (std::find(names.begin(), names.end(), host->ascii) == names.end() && o.domains.empty()) names.push_back(host->ascii);
    }
  } else if (!o.sites.is_null()) {
    return bad(o.config + ": \"sites\" must be an object");
  }
  auto od = on_demand_options(o, {});  // the ask URL uses the system roots
  if (!od) return bad("serve: " + od.error().message);
  out.on_demand = *od;
  const bool files = !o.serve_certs.empty() || !o.serve_keys.empty() || !o.cert_dirs.empty();
  if (names.empty() && !od->enabled && !files) {
    return bad("serve: give the names to serve with -d NAME (or \"sites\" in the config file, --cert/--key, "
               "--cert-dir, or --on-demand)");
  }
  if (int(!o.root.empty()) + int(!o.proxy.empty()) + int(!o.redirect.empty()) > 1) {
    return bad("serve: give one of --root, --proxy and --redirect, not several");
  }
  if (o.redirect.empty() && o.redirect_code != 302) return bad("serve: --redirect-code needs --redirect");
  if (!o.root.empty()) cfg.default_site = server::StaticSite{o.root};
  if (!o.proxy.empty()) {
    if (auto why = server::upstream_error(o.proxy); !why.empty()) return bad("--proxy: " + why);
    cfg.default_site = server::ProxySite{o.proxy};
  }
  if (!o.redirect.empty()) {
    if (auto why = server::redirect_error(o.redirect, o.redirect_code); !why.empty()) return bad("--redirect: " + why);
    cfg.default_site = server::RedirectSite{o.redirect, o.redirect_code};
  }
  if (!cfg.default_site && cfg.sites.empty()) {
    return bad("serve: say what to serve: --root DIR, --proxy URL, --redirect URL, or \"sites\" in the config file");
  }
  if (!o.webroot.empty()) return bad("serve: --webroot is for issue; serve answers http-01 itself");
  if (o.challenge == "dns-01" && o.dns_hook.empty() && o.dns_server.empty()) {
    return bad("--challenge dns-01 needs --dns-server HOST[:PORT] with --tsig-key (RFC 2136), or --dns-hook CMD");
  }
  // A wildcard that certificate files may hold is not refused: they are read after this.
  if (auto why = wildcard_challenge_error(o, names, "serve"); !why.empty() && !files) return bad(why);
  auto https = endpoints(o.https_addresses, {"0.0.0.0:443", "[::]:443"});
  if (!https) return bad(https.error().message);
  if (https->empty()) return bad("serve: at least one --https-address is needed");
  auto http = endpoints(o.http_addresses, {"0.0.0.0:80", "[::]:80"});
  if (!http) return bad(http.error().message);
  if (http->empty() && o.challenge == "http-01" && (od->enabled || (!names.empty() && !files))) {
    return bad("serve: http-01 needs an http listener: give --http-address or --challenge tls-alpn-01");
  }
  cfg.https = *https;
  cfg.http = *http;
  cfg.redirect_to_https = !o.no_redirect;
  cfg.hsts_max_age = std::chrono::seconds(o.hsts);
  if (o.admin_address != "off" && o.admin_address != "none") {
    auto hp = parse_host_port(o.admin_address);
    if (!hp) return bad("--admin-address: " + hp.error().message);
    cfg.admin.endpoint = server::Endpoint{hp->first, hp->second};
  }
  if (o.access_log != "off") {
    if (o.access_log != "json" && o.access_log != "combined") {
      return bad("--access-log must be off, json or combined, not \"" + o.access_log + "\"");
    }
    cfg.access_log.enabled = true;
    cfg.access_log.format = o.access_log;
  }
  if (!o.access_log_file.empty()) {
    if (o.access_log == "off") return bad("--access-log-file needs --access-log json or combined");
    cfg.access_log.file = o.access_log_file;
  }
  if (auto d = seconds_option("--drain", o.drain, 0, 86'400); !d) return bad(d.error().message);
  if (auto st = server_limits(o, cfg); !st) return bad(st.error().message);
  return out;
}

namespace {

// NameList is the names served: the configured ones (replaced on SIGHUP) and those the
// certificate files' certificates hold now, followed as the watcher and the verification
// behind a snapshot report them (a pair added, or reloaded with other names, after start).
// Read by the admin callbacks and the worker. The file names are held once, counted
// (NameCounts), and change by batch: one lock per burst of watcher events, however long.
class NameList {
 public:
  explicit NameList(std::vector<std::string> configured) : configured_(std::move(configured)) {}

  // get is the configured names, then the file names not among them (sorted).
  std::vector<std::string> get() const {
    std::lock_guard lock(mu_);
    return merged();
  }
  // first_file_names is the first kShownNames file names (sorted) and how many there are.
  std::pair<std::vector<std::string>, std::size_t> first_file_names() const {
    std::lock_guard lock(mu_);
    std::pair<std::vector<std::string>, std::size_t> out;
    for (const auto& [n, count] : files_) {
      if (count <= 0) continue;
      if (out.first.size() < kShownNames) out.first.push_back(n);
      ++out.second;
    }
    return out;
  }
  // acme is the configured names no file certificate covers (those are issued).
  std::vector<std::string> acme() const {
    std::lock_guard lock(mu_);
    std::vector<std::string> out;
    for (const auto& n : configured_) {
      if (!covered_by(files_, n)) out.push_back(n);
    }
    return out;
  }
  bool covered(const std::string& name) const {
    std::lock_guard lock(mu_);
    return covered_by(files_, name);
  }
  // listed says name is one of get()'s names now (exactly; a file's wildcard does not list the
  // names under it).
  bool listed(const std::string& name) const {
    std::lock_guard lock(mu_);
    auto f = files_.find(name);
    if (f != files_.end() && f->second > 0) return true;
    return std::find(configured_.begin(), configured_.end(), name) != configured_.end();
  }
  // OnConfigured hears what a SIGHUP changed for ACME: withdrawn, the names no longer
  // configured that no file certificate covers (the Manager must stop managing them); resumed,
  // names withdrawn at an earlier SIGHUP that are configured again and not covered (the Manager
  // takes them back). A name a file covers is the file's either way (handed over, or never
  // issued), so it is in neither list.
  using OnConfigured = std::function<void(const std::vector<std::string>& withdrawn, const std::vector<std::string>& resumed)>;

  // set_configured replaces the configured names (SIGHUP); returns get() before and after.
  // on_configured (if set) is called under the lock, so that no coverage change (on_coverage)
  // comes between the lists and what the Manager is told.
  std::pair<std::vector<std::string>, std::vector<std::string>> set_configured(std::vector<std::string> v,
                                                                               const OnConfigured& on_configured = {}) {
    std::lock_guard lock(mu_);
    auto before = merged();
    const std::set<std::string> old_set(configured_.begin(), configured_.end());
    const std::set<std::string> new_set(v.begin(), v.end());
    std::vector<std::string> withdrawn, resumed;
    for (const auto& n : old_set) {
      if (!new_set.count(n) && !covered_by(files_, n) && withdrawn_.insert(n).second) withdrawn.push_back(n);
    }
    for (const auto& n : new_set) {
      // Configured again: no longer withdrawn. One a file covers now stays held by the Manager
      // as a handed-over name (on_coverage resumes it when the file stops covering it).
      if (old_set.count(n) || !withdrawn_.erase(n)) continue;
      if (!covered_by(files_, n)) resumed.push_back(n);
    }
    configured_ = std::move(v);
    if (on_configured && (!withdrawn.empty() || !resumed.empty())) on_configured(withdrawn, resumed);
    return {std::move(before), merged()};
  }
  // take_back_withdrawn is for on-demand issuance, once its policy allowed name: a name
  // withdrawn at a SIGHUP (its site removed) and covered by no file is no longer withdrawn and
  // returns true; the caller lifts the Manager's hold (resume), and on-demand manages it from
  // then on as any name it allows (loaded from storage first). A SIGHUP that configures the
  // site again finds nothing to resume, one that leaves it out finds nothing to withdraw.
  bool take_back_withdrawn(const std::string& name) {
    std::lock_guard lock(mu_);
    if (covered_by(files_, name)) return false;
    return withdrawn_.erase(name) > 0;
  }
  // add_files adds counts (the start's loads) to the file names.
  void add_files(NameCounts counts) {
    std::lock_guard lock(mu_);
    if (files_.size() < counts.size()) files_.swap(counts);  // merge the smaller into the larger
    for (const auto& [n, count] : counts) {
      auto it = files_.try_emplace(n, 0).first;
      if ((it->second += count) == 0) files_.erase(it);
    }
  }
  // Certificates of one burst (update's entered).
  using Certs = std::vector<std::shared_ptr<const tlsreload::Certificate>>;
  // OnCoverage hears what one burst changed: the configured names a file certificate covers
  // now and did not before (entered holds the burst's certificates, among them those that cover
  // them, and chains their pairs' chain files, in the same order), and the names no file
  // certificate covers any more that need ACME again: configured ones, and those handed over
  // earlier (configured then, perhaps not now after a SIGHUP).
  using OnCoverage = std::function<void(const std::vector<std::string>& covered, const std::vector<std::string>& uncovered,
                                        const Certs& entered, const std::vector<std::string>& chains)>;

  // update applies one burst: the names of each certificate of left leave (once per
  // certificate: a name another file certificate holds stays), those of entered (whose pairs'
  // chain files chains holds, in the same order) join. A certificate of left that was retired
  // (taken out of the store by a verification while a watcher entry still named it) left
  // already: it is skipped once.
  void update(const std::vector<const tlsreload::Certificate*>& left, const Certs& entered,
              const std::vector<std::string>& chains, const Certs& retire = {}) {
    std::lock_guard lock(mu_);
    // A configured name a file starts covering is handed over to the file (no more ACME for
    // it); one no longer covered after this burst (its pair reloaded without it, or gone at a
    // verification) must be issued at once. Only the configured and handed-over names are
    // looked at, and only in the direction the burst can move them.
    std::vector<std::string> was_covered, was_uncovered;
    if (on_coverage_) {
      if (!left.empty()) {
        std::set<std::string_view> seen;
        for (const auto* list : {&configured_, &handed_over_}) {
          for (const auto& n : *list) {
            if (seen.insert(n).second && covered_by(files_, n)) was_covered.push_back(n);
          }
        }
      }
      if (!entered.empty()) {
        for (const auto& n : configured_) {
          if (!covered_by(files_, n)) was_uncovered.push_back(n);
        }
      }
    }
    for (const auto* c : left) {
      if (auto it = retired_.find(c); it != retired_.end()) {
        retired_.erase(it);
        continue;
      }
      count_names(files_, *c, -1);
    }
    for (const auto& c : entered) count_names(files_, *c, 1);
    for (const auto& c : retire) retired_.emplace(c.get(), c);
    std::vector<std::string> covered, uncovered;
    for (auto& n : was_uncovered) {
      if (covered_by(files_, n)) covered.push_back(std::move(n));
    }
    for (auto& n : was_covered) {
      if (!covered_by(files_, n)) uncovered.push_back(std::move(n));
    }
    for (const auto& n : uncovered) std::erase(handed_over_, n);
    for (const auto& n : covered) {
      if (std::find(handed_over_.begin(), handed_over_.end(), n) == handed_over_.end()) handed_over_.push_back(n);
    }
    // Under mu_, so that the Manager hears of coverage changes in the order they happen (and
    // once cleared by set_on_coverage, it is never called again).
    if (!covered.empty() || !uncovered.empty()) on_coverage_(covered, uncovered, entered, chains);
  }
  // set_on_coverage sets what update() calls when configured names start or stop being covered
  // by a file certificate (serve hands them over to the file, or back to ACME); nullptr clears
  // it before what it uses is gone.
  void set_on_coverage(OnCoverage f) {
    std::lock_guard lock(mu_);
    on_coverage_ = std::move(f);
  }

 private:
  std::vector<std::string> merged() const {
    std::vector<std::string> out = configured_;
    std::set<std::string_view> have(configured_.begin(), configured_.end());
    out.reserve(configured_.size() + files_.size());
    for (const auto& [n, count] : files_) {
      if (count > 0 && !have.count(n)) out.push_back(n);
    }
    return out;
  }

  mutable std::mutex mu_;
  std::vector<std::string> configured_;
  NameCounts files_;
  // Certificates a verification took out of the store (their pair was gone) that the watcher
  // may still name as a pair's previous certificate, should the pair come back; kept alive
  // here so that the address stays theirs. As many as pairs gone while the process was down.
  std::map<const tlsreload::Certificate*, std::shared_ptr<const tlsreload::Certificate>> retired_;
  // The names handed over to a file certificate (Manager::unmanage) and not given back yet:
  // as many as configured names a file took over.
  std::vector<std::string> handed_over_;
  // The names withdrawn from the Manager because their site left the configuration (SIGHUP)
  // and not configured again since: as many as sites removed.
  std::set<std::string> withdrawn_;
  OnCoverage on_coverage_;
};

}  // namespace

int cmd_serve(Context& ctx) {
  Options& o = ctx.options;
  auto setup = serve_setup(o);
  if (!setup) return usage_error(ctx, setup.error().message);
  server::ServerConfig cfg = setup->cfg;
  // Written by a SIGHUP reload on the worker thread, read by the shutdown path.
  std::atomic<long long> drain_ms{static_cast<long long>(o.drain * 1000)};

  auto mo = manager_options(ctx, ctx.directory_url);
  if (!mo) return report(ctx, mo.error());

  auto event_line = [&](const std::string& event, const json& fields, const std::string& text) {
    json j = {{"time", acme::format_rfc3339(system_clock::now())}, {"event", event}};
    for (auto it = fields.begin(); it != fields.end(); ++it) j[it.key()] = it.value();
    if (ctx.out.is_json()) {
      ctx.out.object(j);
    } else {
      ctx.out.result(acme::format_rfc3339(system_clock::now()) + " " + event + " " + text);
    }
  };

  // Signals are taken by one thread with sigwait, so the handlers run no code in signal
  // context. They are blocked before any thread starts, so every thread inherits the mask.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);

  CancellableClock clock;
  auto store = std::make_shared<tlsreload::CertStore>();
  auto challenges = std::make_shared<tlsreload::ChallengeStore>();

  // Certificate files (--cert/--key, --cert-dir): checked whole and published before anything
  // listens; their names are served from them, not issued. The watcher thread starts after the
  // signal mask, so it never takes SIGHUP itself. Events are printed once serving started.
  auto files_started = std::make_shared<std::atomic<bool>>(false);
  // Each --cert-dir's store snapshot: <storage>/snapshots unless the config moves or disables it.
  std::string snapshot_dir;
  if (o.cert_dir_snapshots != "off") {
    std::error_code ec;
    snapshot_dir = o.cert_dir_snapshots.empty() ? (std::filesystem::path(ctx.storage_root) / "snapshots").string()
                                                : o.cert_dir_snapshots;
    snapshot_dir = std::filesystem::absolute(snapshot_dir, ec).string();
  }
  // The names served: the configured ones, and the files' names as the files change (the
  // explicit pairs' first loads come as events before load_cert_files returns).
  auto live_names = std::make_shared<NameList>(setup->names);
  auto on_file_events = [live_names](const std::vector<tlsreload::WatchEvent>& events) {
    std::vector<const tlsreload::Certificate*> left;
    NameList::Certs entered;
    std::vector<std::string> chains;
    for (const auto& e : events) {
      if (e.type != tlsreload::WatchEvent::Type::loaded && e.type != tlsreload::WatchEvent::Type::reloaded) continue;
      // removed and failed change nothing: the last good certificate keeps serving.
      if (e.previous) left.push_back(e.previous.get());
      if (e.cert) {
        entered.push_back(e.cert);
        chains.push_back(e.path.native());
      }
    }
    if (!left.empty() || !entered.empty()) live_names->update(left, entered, chains);
  };
  auto files = load_cert_files(
      o, snapshot_dir, store, &ctx.logger,
      [&event_line, files_started](const tlsreload::WatchEvent& e) {
        if (!files_started->load()) return;
        json f = {{"path", e.path.string()}, {"cert_id", e.cert_id}};
        std::string text = e.path.string();
        if (e.error) {
          f["error"] = error_json(*e.error);
          text += ": " + e.error->message + " (the last good certificate keeps serving)";
        }
        event_line("cert_file_" + std::string(tlsreload::to_string(e.type)), f, text);
      },
      on_file_events);
  if (!files) return usage_error(ctx, files.error().message);
  // Moved, not copied: with a --cert-dir of 100,000 pairs each copy of the names cost ~6-10 MB.
  live_names->add_files(std::move(files->names));
  auto acme_names = [live_names] { return live_names->acme(); };
  for (const auto& [path, error] : files->ignored) {
    event_line("cert_dir_snapshot_ignored", {{"snapshot", path}, {"error", error_json(error)}},
               path + ": " + error.message + " (loading the directory instead)");
  }
  if (files->watcher) {
    files_started->store(true);
    const auto [shown, count] = live_names->first_file_names();
    std::string listed = join(shown);
    if (count > shown.size()) listed += " and " + std::to_string(count - shown.size()) + " more";
    std::string snap = files->from_snapshot == 0 ? ""
                       : "; " + std::to_string(files->from_snapshot) +
                             " --cert-dir served from its store snapshot, verifying it in the background";
    event_line("cert_files", {{"names", shown}, {"count", count}, {"from_snapshot", files->from_snapshot}},
               "serving certificate files for " + listed + " (reloaded on change" + snap + ")");
  }
  // What the snapshots leave behind the start (started once the server listens): the
  // directories served from their snapshots verified, the others' snapshots written.
  auto snapshot_done = [&event_line, live_names](const CertDirSnapshot& r) {
    if (r.verified) {
      // What the verification changed, in one batch (its watcher events are not passed on).
      std::vector<const tlsreload::Certificate*> left;
      for (const auto* v : {&r.gone, &r.replaced}) {
        for (const auto& c : *v) left.push_back(c.get());
      }
      // A gone pair's certificate left the store, but the watcher still holds it as that pair's
      // last good one: should the pair come back, its event names it as replaced.
      if (!left.empty() || !r.fresh.empty()) live_names->update(left, r.fresh, r.fresh_chains, r.gone);
    }
    json f = {{"dir", r.dir}, {"snapshot", r.snapshot}, {"loaded", r.loaded}, {"seconds", r.seconds}};
    std::string text = r.dir + ": ";
    if (r.verified) {
      f["changed"] = r.changed;
      f["added"] = r.added;
      f["removed"] = r.removed;
      f["kept"] = r.kept;
      f["failed"] = r.failed;
      f["changed_paths"] = r.changed_paths;
      f["loose_keys"] = r.loose_keys;
      if (r.error) f["error"] = error_json(*r.error);
      char secs[32];
      std::snprintf(secs, sizeof secs, "%.1f", r.seconds);
      text += r.error ? "verification failed, the snapshot keeps serving: " + r.error->message
                      : "verified behind the store snapshot in " + std::string(secs) + " s: " +
                            std::to_string(r.loaded) + " pairs, " + std::to_string(r.changed) + " changed, " +
                            std::to_string(r.added) + " new, " + std::to_string(r.removed) + " removed, " +
                            std::to_string(r.failed) + " failed (" + std::to_string(r.kept) +
                            " of them still served from the snapshot)";
      if (r.loose_keys > 0) {
        f["loose_key_error"] = r.loose_key_error;
        text += "; " + std::to_string(r.loose_keys) + " private keys accessible by group or others (still served), " +
                "the first: " + r.loose_key_error;
      }
    } else {
      text += "store snapshot of " + std::to_string(r.loaded) + " pairs";
    }
    if (!r.written) {
      f["snapshot_error"] = error_json(r.written.error());
      text += "; snapshot not written: " + r.written.error().message;
    } else if (!r.error) {
      text += "; snapshot written to " + r.snapshot;
    }
    event_line(r.verified ? "cert_dir_verified" : "cert_dir_snapshot_written", f, text);
  };

  // The CA is asked about its terms only when something may be issued: as issue and renew do,
  // terms not agreed to stop us, and a CA of an issuer list that cannot be reached now does not
  // (issuance falls back past it; the one CA of --ca unreachable does stop us, exit 4).
  if (!acme_names().empty() || setup->on_demand.enabled) {
    if (auto st = check_issuer_terms(ctx, mo->issuers); !st) return report(ctx, st.error());
  }
  mo->clock = &clock;
  // Each ACME step of each issuance, as a plain line on stderr naming its certificate (a JSON
  // line with --json); declared before the Manager so that it outlives it.
  ProgressPrinter progress(ProgressPrinter::mode_for_log(o), stderr, true);
  mo->on_progress = progress.callback();
  std::string deploy_hook = o.deploy_hook;
  std::string event_hook = o.event_hook;
  std::string storage_root = ctx.storage_root;
  mo->on_event = [&, deploy_hook, event_hook, storage_root](const tlsreload::ManagerEvent& e) {
    // An issuer of the list failed: said at once as an event line (the Manager's own log line
    // is a warning that only --verbose shows). It comes with the Manager's locks held, so no
    // hook runs for it.
    if (e.type == tlsreload::ManagerEvent::Type::issuer_failed) {
      const std::string error = e.error ? describe_error(*e.error) : std::string();
      event_line(e.fallback ? "issuer_fallback" : "issuer_failed",
                 {{"name", e.name}, {"names", e.names}, {"issuer", e.issuer}, {"next", e.next_issuer}, {"error", error}},
                 "issuer " + e.issuer + " failed for " + e.name + ": " + error +
                     (e.fallback ? "; trying the next issuer, " + e.next_issuer
                                 : "; not trying the next issuer (" + e.next_issuer + ")"));
      return;
    }
    json f = {{"name", e.name}, {"names", e.names}, {"cert_id", e.cert_id}};
    if (!e.issuer.empty()) f["issuer"] = e.issuer;
    if (e.not_after) f["not_after"] = acme::format_rfc3339(*e.not_after);
    std::string text = e.name + " (" + join(e.names) + ")";
    if (e.error) {
      f["error"] = error_json(*e.error);
      text += ": " + describe_error(*e.error);
    }
    event_line(std::string(tlsreload::to_string(e.type)), f, text);
    bool issued = e.type == tlsreload::ManagerEvent::Type::obtained || e.type == tlsreload::ManagerEvent::Type::renewed;
    if (issued && !deploy_hook.empty()) {
      if (auto st = run_deploy_hook(deploy_hook, e.names, live_paths(storage_root, e.name), std::string(tlsreload::to_string(e.type)));
          !st) {
        event_line("deploy_hook_failed", {{"name", e.name}, {"error", st.error().message}}, e.name + ": " + st.error().message);
      }
    }
    // The event hook hears every event but "loaded": failures too (CAs no longer email).
    if (!event_hook.empty() && e.type != tlsreload::ManagerEvent::Type::loaded) {
      if (auto st = run_event_hook(event_hook, std::string(tlsreload::to_string(e.type)), e.names,
                                   live_paths(storage_root, e.name), e.error ? describe_error(*e.error) : "");
          !st) {
        event_line("event_hook_failed", {{"name", e.name}, {"error", st.error().message}}, e.name + ": " + st.error().message);
      }
    }
  };

  // Constructed before the server so the admin callbacks can read it; it does no work until
  // manage()/start().
  const bool internal = mo->issuers.empty() ? ctx.directory_url == tlsreload::kInternalIssuer
                                             : std::any_of(mo->issuers.begin(), mo->issuers.end(),
                                                           [](const auto& is) { return is.internal; });
  tlsreload::Manager manager(std::move(*mo), ctx.storage, store, challenges);
  if (internal) {
    // Made now (not at the first issuance) so that its path is printed before anything else.
    auto root = manager.internal_root_pem();
    if (!root) return report(ctx, root.error());
    std::string path = (std::filesystem::path(storage_root) / std::string(tlsreload::InternalCA::kRootCertKey)).string();
    event_line("internal_ca", {{"root", path}}, "the internal CA's root is " + path + ": add it to your trust store");
  }

  // On-demand: names no one configured get a certificate at their first handshake (policy
  // checked first); created before the server, whose SSL_CTX calls into it.
  std::unique_ptr<tlsreload::OnDemand> on_demand;

  // Admin callbacks run on server worker threads: Manager and CertStore reads are thread-safe.
  // They ask the store what it serves for each name with lookup_name, not lookup: a wildcard
  // name ("*.example.com", of a file certificate or a site) is no SNI name and lookup() would
  // never find its entry, and a default certificate must not make a name count as served.
  cfg.admin.ready = [store, live_names] {
    auto now = system_clock::now();
    auto names = live_names->get();
    return std::all_of(names.begin(), names.end(), [&](const std::string& n) {
      auto cert = store->lookup_name(n);
      return cert && cert->not_after() > now;
    });
  };
  cfg.admin.metrics = [&manager, &on_demand, &files, store, live_names] {
    auto names = live_names->get();
    std::string out =
        "# HELP autotls_certificate_not_after_seconds Expiry (Unix time) of the certificate served "
        "for a name.\n# TYPE autotls_certificate_not_after_seconds gauge\n";
    for (const auto& n : names) {
      auto cert = store->lookup_name(n);
      if (!cert) continue;
      auto secs = std::chrono::duration_cast<std::chrono::seconds>(cert->not_after().time_since_epoch());
      out += "autotls_certificate_not_after_seconds{name=\"" + prometheus_label(n) + "\"} " +
             std::to_string(secs.count()) + "\n";
    }
    auto c = manager.counters();
    const std::tuple<const char*, std::uint64_t, const char*> counters[] = {
        {"loaded", c.loaded, "Certificates loaded from storage by the manager since start."},
        {"obtained", c.obtained, "Certificates obtained by the manager since start."},
        {"renewed", c.renewed, "Certificates renewed by the manager since start."},
        {"failed", c.failed, "Failed issuances and renewals since start."},
        {"fallbacks", c.fallbacks, "Certificates issued by an issuer other than the first since start."},
        {"expiring", c.expiring, "Failed renewals of a certificate with at most 7 days (and a third of its lifetime) left."},
        {"abandoned", c.abandoned, "Issuances abandoned at shutdown."},
        {"revoked", c.revoked, "Revoked certificates found in storage (renewed at once) since start."}};
    for (const auto& [what, value, help] : counters) {
      out += prometheus_counter(std::string("autotls_certificates_") + what + "_total", help, value);
    }
    if (on_demand) {
      auto d = on_demand->counters();
      const std::pair<const char*, std::uint64_t> od[] = {
          {"invalid", d.invalid}, {"denied", d.denied},   {"negative_hits", d.negative_hits},
          {"asked", d.asked},     {"throttled", d.throttled}, {"loaded", d.loaded},
          {"obtained", d.obtained}, {"failed", d.failed}, {"evicted", d.evicted}};
      out += "# HELP autotls_on_demand_total On-demand decisions and jobs by outcome.\n"
             "# TYPE autotls_on_demand_total counter\n";
      for (const auto& [what, value] : od) {
        out += std::string("autotls_on_demand_total{outcome=\"") + what + "\"} " + std::to_string(value) + "\n";
      }
      // Not an outcome row: touched counts handshakes, the rows above count names and jobs.
      out += prometheus_counter("autotls_on_demand_touched_total",
                                "Handshakes served an on-demand certificate (its least-recently-used stamp refreshed).",
                                d.touched);
    }
    // While a --cert-dir is verified behind its snapshot, the watcher is busy with its full
    // load: its failing gauge would wait for it.
    if (files->watcher) out += watcher_metrics(*files->watcher, files->verifying->load());
    return out;
  };
  cfg.admin.certificates = [&manager, store, live_names] {
    auto names = live_names->get();
    json list = json::array();
    for (const auto& n : names) {
      json j = {{"name", n}, {"managed", false}};
      if (live_names->covered(n)) {
        j["source"] = "files";
        if (auto cert = store->lookup_name(n)) {
          j["names"] = cert->names();
          j["not_after"] = acme::format_rfc3339(cert->not_after());
        }
        list.push_back(std::move(j));
        continue;
      }
      if (auto st = manager.state({n})) {
        j["managed"] = true;
        j["names"] = st->names;
        j["issuer"] = st->issuer;
        j["serial"] = st->serial;
        j["not_before"] = acme::format_rfc3339(st->not_before);
        j["not_after"] = acme::format_rfc3339(st->not_after);
        j["failures"] = st->failures;
        j["last_error"] = st->last_error.empty() ? json(nullptr) : json(st->last_error);
        j["next_attempt"] = st->next_attempt ? json(acme::format_rfc3339(*st->next_attempt)) : json(nullptr);
      }
      auto due = manager.renewal_time({n});
      j["next_renewal"] = due ? json(acme::format_rfc3339(*due)) : json(nullptr);
      list.push_back(std::move(j));
    }
    return list.dump();
  };

  if (tlsreload::OnDemandOptions od = setup->on_demand; od.enabled) {
    od.clock = &clock;
    od.logger = &ctx.logger;
    auto backend = tlsreload::manager_backend(manager, *store);
    // A name whose site a SIGHUP removed is held by the Manager (no renewal, nothing
    // published), and manage()/load refuse it: an allowed on-demand name is taken back first,
    // so it is served (from storage when it is there) as Caddy serves any name its on-demand
    // policy allows. Called only after the policy allowed the name.
    auto take_back = [live_names, &manager](const std::string& name) {
      if (live_names->take_back_withdrawn(name)) manager.resume({name});
    };
    backend.load = [load = std::move(backend.load), take_back](const std::string& name) {
      take_back(name);
      return load(name);
    };
    // A job that ends for a name a SIGHUP made a site meanwhile leaves it out of the LRU (the
    // reload lists it before it calls release, below), so on-demand never evicts a site.
    backend.configured = [live_names](const std::string& name) { return live_names->listed(name); };
    auto created = tlsreload::OnDemand::create(od, std::move(backend));
    if (!created) return usage_error(ctx, "serve: " + created.error().message);
    on_demand = std::move(*created);
    cfg.tls_hooks = [p = on_demand.get()](tlsreload::AttachOptions& a) { p->install(a); };
    // The on-demand wait ends a handshake with an alert; the server's own deadline must not
    // cut it short.
    cfg.timeouts.handshake = std::max(cfg.timeouts.handshake,
                                      std::chrono::duration_cast<std::chrono::milliseconds>(od.handshake_wait) +
                                          std::chrono::seconds(2));
  }

  auto srv = server::Server::create(cfg, store, challenges, &ctx.logger);
  if (!srv) return report(ctx, srv.error());
  if (auto st = (*srv)->start(); !st) return report(ctx, st.error());
  {
    json f = {{"https_port", (*srv)->https_port()}, {"http_port", (*srv)->http_port()},
              {"admin_port", (*srv)->admin_port()}};
    std::string text = "https port " + std::to_string((*srv)->https_port());
    if ((*srv)->http_port()) text += ", http port " + std::to_string((*srv)->http_port());
    if ((*srv)->admin_port()) text += ", admin port " + std::to_string((*srv)->admin_port());
    event_line("listening", f, text);
  }
  files->snapshot_work(snapshot_done);

  // Per-site certificate settings; read and replaced (SIGHUP) on the worker thread only.
  std::map<std::string, tlsreload::CertificateSettings> cert_settings = setup->cert_settings;

  std::mutex mu;
  std::condition_variable cv;
  bool stopping = false;
  bool reload = true;  // the first pass manages every name
  bool manage_again = false;  // a configured name lost its file certificate: an ACME pass
  bool work_done = false;
  // hand_over gives a configured name to the file certificates that cover it now (entered holds
  // them): the Manager stops issuing and renewing it (a renewal in flight is stored but not
  // published), and its ACME certificate leaves the store, where it would otherwise keep
  // winning: an exact name over a file's wildcard, or one key family over a file of the other.
  auto hand_over = [&](const std::string& n, const NameList::Certs& entered, const std::vector<std::string>& chains) {
    const std::string id = manager.unmanage({n});
    NameList::Certs covering;               // the burst's certificates that cover n
    std::vector<const std::string*> pairs;  // their pairs' chain files
    for (std::size_t i = 0; i < entered.size(); ++i) {
      NameCounts one;
      count_names(one, *entered[i], 1);
      if (!covered_by(one, n)) continue;
      covering.push_back(entered[i]);
      pairs.push_back(i < chains.size() ? &chains[i] : nullptr);
    }
    // The very certificate may be in a file (live/ copied into the --cert-dir): it stays.
    const bool in_file = std::any_of(covering.begin(), covering.end(), [&](const auto& c) { return c->id() == id; });
    bool removed = false;
    if (!id.empty() && !in_file) {
      for (bool ecdsa : {true, false}) {
        if (auto c = store->lookup_name(n, ecdsa); c && c->id() == id) {
          removed = store->remove(id).has_value();
          break;
        }
      }
    }
    // A renewal that was published in the instant between the file certificate's publication
    // and unmanage() took its place (and was removed above): the file's certificate goes back.
    // The one its pair serves now, published under the watcher's lock (CertWatcher::republish):
    // another thread (a rescan, the verification behind a snapshot) may have loaded a newer
    // version of the pair meanwhile, which the burst's older certificate must not replace.
    auto now = store->lookup_name(n);
    NameCounts served;
    if (now) count_names(served, *now, 1);
    if (!covered_by(served, n) && files->watcher) {
      for (const auto* chain : pairs) {
        if (chain) (void)files->watcher->republish(*chain);
      }
    }
    event_line("unmanaged", {{"name", n}, {"cert_id", id}, {"removed", removed}, {"reason", "file"}},
               n + ": served from a certificate file now; no longer issued or renewed over ACME");
  };
  // A configured name that a file certificate starts covering after start is handed over to it
  // at once; one that a file stops covering (its pair reloaded without it, or gone at the
  // verification behind a snapshot) is handed back and issued at once, not at the next SIGHUP.
  // Called by the watcher's (or the verification's) thread with the name list's lock held
  // (never the other way round: nothing here takes it); cleared before mu and cv go. A
  // hand-over's republish takes the watcher's lock under it, which is safe: the watcher calls
  // out (its events) with no lock held. (It may wait there for a check in progress, a full one
  // too; only in the rare instant a renewal took the file's place.)
  live_names->set_on_coverage([&](const std::vector<std::string>& covered, const std::vector<std::string>& uncovered,
                                  const NameList::Certs& entered, const std::vector<std::string>& chains) {
    for (const auto& n : covered) hand_over(n, entered, chains);
    if (uncovered.empty()) return;
    for (const auto& n : uncovered) manager.resume({n});
    std::lock_guard lock(mu);
    manage_again = true;
    cv.notify_all();
  });
  struct ClearOnCoverage {
    NameList& names;
    ~ClearOnCoverage() { names.set_on_coverage(nullptr); }
  } clear_on_coverage{*live_names};

  // reload_config re-reads the command line and config file (SIGHUP). A configuration that
  // does not parse or validate is refused with one "reload_failed" line and the running one
  // stays; otherwise sites, redirects, HSTS and the access log change at once (listeners and
  // open connections untouched), new names get certificates and removed names stop being
  // reported. Settings that need a restart are named in the "reload" line.
  auto reload_config = [&] {
    auto refuse = [&](const std::string& why) {
      event_line("reload_failed", {{"error", why}}, "configuration not reloaded, the running one stays: " + why);
    };
    files->rescan();  // deferred while a --cert-dir is verified (never waits for it)
    if (!ctx.reparse) {
      event_line("reload", json::object(), "re-reading certificates from storage");
      return;
    }
    auto next = ctx.reparse();
    if (!next) return refuse(next.error().message);
    auto ns = serve_setup(*next);
    if (!ns) return refuse(ns.error().message);
    // Same callbacks; the endpoint as the file now says, so reload() can report a change.
    auto admin_endpoint = ns->cfg.admin.endpoint;
    ns->cfg.admin = cfg.admin;
    ns->cfg.admin.endpoint = admin_endpoint;
    if (on_demand) {
      // As at start: the on-demand wait, not the server's deadline, ends a waiting handshake
      // (otherwise every reload would report "timeouts" as not applied).
      ns->cfg.timeouts.handshake = std::max(ns->cfg.timeouts.handshake, cfg.timeouts.handshake);
    }
    auto rep = (*srv)->reload(ns->cfg);
    if (!rep) return refuse(rep.error().message);
    std::vector<std::string> not_applied = rep->not_applied;
    const std::pair<const char*, bool> restart_only[] = {
        {"ca", next->ca != o.ca},
        {"storage", next->storage != o.storage},
        {"storage-sync", next->storage_sync != o.storage_sync},
        {"email", next->email != o.email},
        {"challenge", next->challenge != o.challenge},
        {"dns-hook", next->dns_hook != o.dns_hook},
        {"dns-server", next->dns_server != o.dns_server},
        {"tsig-key", next->tsig_key != o.tsig_key},
        {"dns-zone", next->dns_zone != o.dns_zone},
        {"key-type", next->key_type != o.key_type},
        {"deploy-hook", next->deploy_hook != o.deploy_hook},
        {"cert", next->serve_certs != o.serve_certs},
        {"key", next->serve_keys != o.serve_keys},
        {"cert-dir", next->cert_dirs != o.cert_dirs},
        {"cert-dir-snapshots", next->cert_dir_snapshots != o.cert_dir_snapshots},
        {"event-hook", next->event_hook != o.event_hook},
        {"log-format", next->log_format != o.log_format},
    };
    for (const auto& [key, changed] : restart_only) {
      if (changed) not_applied.push_back(key);
    }
    // The file names as they are now (the rescan above applied what changed on disk). A name
    // whose site left the configuration is no longer managed (no renewal, ARI check or
    // storage adoption; a renewal in flight is stored, not published) and its ACME certificate
    // leaves the store, as Caddy stops serving a removed site; storage keeps it. A site added
    // back is managed again from storage (`loaded`, no new order unless it is due).
    auto withdraw = [&](const std::vector<std::string>& withdrawn, const std::vector<std::string>& resumed) {
      for (const auto& n : withdrawn) {
        const std::string id = manager.unmanage({n});
        const bool removed = !id.empty() && store->remove(id).has_value();
        event_line("unmanaged", {{"name", n}, {"cert_id", id}, {"removed", removed}, {"reason", "site_removed"}},
                   n + ": its site was removed from the configuration; no longer issued, renewed or served");
      }
      // The ACME pass after this reload manages them (they are configured and not covered).
      for (const auto& n : resumed) manager.resume({n});
    };
    auto [old_names, new_names] = live_names->set_configured(ns->names, withdraw);
    std::vector<std::string> added, removed;
    // Sets: with a --cert-dir of 100,000 names, a linear find per name kept a SIGHUP busy for
    // minutes (10^10 comparisons).
    {
      const std::set<std::string_view> old_set(old_names.begin(), old_names.end());
      const std::set<std::string_view> new_set(new_names.begin(), new_names.end());
      for (const auto& n : new_names) {
        if (!old_set.count(n)) added.push_back(n);
      }
      for (const auto& n : old_names) {
        if (!new_set.count(n)) removed.push_back(n);
      }
    }
    // A name on-demand loaded or issued that is a site now is managed as configured: it leaves
    // on-demand's LRU, which would otherwise evict it (forget it, out of the store) one day.
    if (on_demand && !added.empty()) on_demand->release(added);
    // Applied by the manage() pass that follows: a site whose key type changed is reissued.
    cert_settings = ns->cert_settings;
    drain_ms = static_cast<long long>(next->drain * 1000);
    std::string text = "configuration reloaded: " + std::to_string(ns->cfg.sites.size()) + " sites";
    if (!added.empty()) text += ", new names " + join_names(added);
    if (!removed.empty()) text += ", removed names " + join_names(removed);
    if (!not_applied.empty()) text += "; needs a restart to take effect: " + join(not_applied);
    if (!rep->failed.empty()) text += "; kept the old listeners: " + join(rep->failed);
    event_line("reload",
               {{"sites", ns->cfg.sites.size()}, {"names", first_names(new_names)}, {"names_count", new_names.size()},
                {"added", first_names(added)}, {"added_count", added.size()}, {"removed", first_names(removed)},
                {"removed_count", removed.size()}, {"not_applied", not_applied}, {"failed", rep->failed}},
               text);
  };

  // One certificate per name (like Caddy): a name the CA refuses does not hold up the others.
  std::thread worker([&] {
    bool first = true;
    for (;;) {
      bool do_reload = false;
      {
        std::unique_lock lock(mu);
        cv.wait(lock, [&] { return stopping || reload || manage_again; });
        if (stopping) break;
        do_reload = reload;
        reload = false;
        manage_again = false;
      }
      if (!first && do_reload) reload_config();
      for (const auto& n : acme_names()) {
        {
          std::lock_guard lock(mu);
          if (stopping) break;
        }
        auto site = cert_settings.find(n);
        (void)manager.manage({n}, site == cert_settings.end() ? tlsreload::CertificateSettings{} : site->second);
      }
      if (first) {
        first = false;
        {
          std::lock_guard lock(mu);
          if (stopping) break;  // never start renewals once the drain began
        }
        manager.start();
        auto managed = acme_names();
        event_line("ready", {{"names", managed}}, managed.empty() ? "nothing to issue" : "managing " + join(managed));
      }
    }
    std::lock_guard lock(mu);
    work_done = true;
    cv.notify_all();
  });

  std::thread signals([&] {
    int count = 0;
    for (;;) {
      int sig = 0;
      if (sigwait(&set, &sig) != 0) continue;
      if (sig == SIGHUP) {
        std::lock_guard lock(mu);
        reload = true;
        cv.notify_all();
        continue;
      }
      if (++count > 1) {
        // A second SIGTERM/SIGINT: the operator does not want to wait for the drain.
        std::fflush(nullptr);
        std::_Exit(kExitLocal);
      }
      std::lock_guard lock(mu);
      stopping = true;
      cv.notify_all();
      if (sig == SIGINT || sig == SIGTERM) {
        // Keep waiting: a second signal must still be caught while the drain runs.
        continue;
      }
    }
  });
  signals.detach();

  {
    // Meanwhile, once a minute: when the OpenSSL object cache has grown by kHugePageStep
    // certificates since the last look, put the malloc heaps that hold those objects on huge
    // pages (tlsreload/heap_pages.h). This thread is otherwise idle, so the synchronous merge
    // costs the reactors nothing but the kernel's brief locks; after the first merge, later ones
    // find most of the heap merged already.
    constexpr std::size_t kHugePageStep = 8192;  // about 40 MiB of built objects
    std::size_t advised_at = 0;
    bool refused = false;  // once refused (THP off, a kernel before 6.1), never asked again
    std::unique_lock lock(mu);
    while (!cv.wait_for(lock, std::chrono::minutes(1), [&] { return stopping; })) {
      std::size_t built = tlsreload::openssl_cache_stats().size;
      if (refused || built < advised_at + kHugePageStep) continue;
      advised_at = built;
      lock.unlock();
      auto hp = tlsreload::advise_heap_huge_pages(true);
      refused = !hp.error.empty();
      event_line("huge_pages",
                 {{"built", built}, {"advised_mib", hp.advised_bytes >> 20},
                  {"collapsed_mib", hp.collapsed_bytes >> 20},
                  {"not_collapsed_mib", hp.not_collapsed_bytes >> 20}, {"error", hp.error}},
                 "malloc heaps of " + std::to_string(built) + " built certificates on huge pages: " +
                     std::to_string(hp.collapsed_bytes >> 20) + " MiB" +
                     (hp.not_collapsed_bytes ? ", " + std::to_string(hp.not_collapsed_bytes >> 20) +
                                                   " MiB left to khugepaged"
                                             : "") +
                     (refused ? " (" + hp.error + ")" : ""));
      lock.lock();
    }
  }
  auto drain = std::chrono::milliseconds(drain_ms.load());
  event_line("shutdown", {{"drain_seconds", static_cast<double>(drain.count()) / 1000}},
             "draining for up to " + std::to_string(drain.count()) + " ms");
  // Issuances in flight get the drain period too, alongside the connections; then they are
  // abandoned (every wait cut short, storage lock released, nothing written).
  std::thread manager_stop([&] {
    manager.stop(drain);
    clock.cancel();
  });
  (*srv)->shutdown(drain);
  manager_stop.join();
  {
    std::unique_lock lock(mu);
    // An issuance blocked in a network call cannot be interrupted; do not wait for it long.
    if (!cv.wait_for(lock, std::chrono::seconds(5), [&] { return work_done; })) {
      lock.unlock();
      event_line("stopped", json::object(), "(an issuance was still running)");
      std::fflush(nullptr);
      std::_Exit(kExitOk);
    }
  }
  worker.join();
  event_line("stopped", json::object(), "");
  std::fflush(nullptr);
  // The signal thread is detached and blocked in sigwait; end the process without unwinding
  // objects it might still read.
  std::_Exit(kExitOk);
}

}  // namespace autotls::cli
