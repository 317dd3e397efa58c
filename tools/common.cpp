#include "tools/cli.h"

#include <fcntl.h>
#include <pwd.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <iostream>
#include <sstream>

#include <idn2.h>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "acme/ari.h"
#include "acme/problem.h"
#include "acme/util/openssl.h"
#include "server/server.h"
#include "acme/util/der.h"
#include "tlsreload/dns_update.h"
#include "tlsreload/store.h"

extern char** environ;

namespace autotls::cli {

namespace {

using json = nlohmann::json;
using std::chrono::system_clock;
namespace fs = std::filesystem;

std::string now_text() { return acme::format_rfc3339(system_clock::now()); }

bool contains(std::string_view haystack, std::string_view needle) {
  return haystack.find(needle) != std::string_view::npos;
}

}  // namespace

// ---------------------------------------------------------------- output

namespace {
std::atomic<bool> g_printed{false};
}  // namespace

bool printed_anything() { return g_printed.load(std::memory_order_relaxed); }

namespace {
// put_line writes text and a newline with one write(2) (std::cerr is unbuffered: each << is a
// system call of its own), so that a line never interleaves with another process's output on
// the same stderr, such as a hook's or a second autotls in the same cron job.
void put_line(std::ostream& os, std::string text) {
  text += '\n';
  os.write(text.data(), static_cast<std::streamsize>(text.size()));
  os.flush();
}
}  // namespace

void Output::info(const std::string& line) {
  if (quiet_ || json_) return;
  std::lock_guard lock(mu_);
  put_line(std::cerr, line);
  g_printed = true;
}

void Output::result(const std::string& line) {
  if (json_) return;
  std::lock_guard lock(mu_);
  put_line(std::cout, line);
  g_printed = true;
}

void Output::object(const nlohmann::json& j) {
  if (!json_) return;
  std::lock_guard lock(mu_);
  put_line(std::cout, j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
  g_printed = true;
}

void Output::error(const Error& e, int exit_code) {
  std::lock_guard lock(mu_);
  g_printed = true;
  if (json_) {
    nlohmann::json j = {{"status", "error"}, {"exit_code", exit_code}, {"error", error_json(e)}};
    put_line(std::cout, j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
    return;
  }
  put_line(std::cerr, "autotls: error: " + describe_error(e));
}

void Output::error(const std::string& message, int exit_code) { error(Error(Errc::invalid_input, message), exit_code); }

bool CliLogger::enabled(LogLevel level) const { return verbose_ || level >= LogLevel::error; }

void CliLogger::log(LogLevel level, std::string_view subsystem, std::string_view message,
                    std::initializer_list<LogField> fields) {
  // Without --verbose the commands report errors themselves; library logs would repeat them.
  if (!verbose_) return;
  std::lock_guard lock(mu_);
  g_printed = true;
  if (json_) {
    json j = {{"time", now_text()}, {"level", to_string(level)}, {"subsystem", subsystem}, {"message", message}};
    for (const auto& f : fields) j[std::string(f.key)] = f.value;
    put_line(std::cerr, j.dump(-1, ' ', false, json::error_handler_t::replace));
    return;
  }
  std::string line = now_text() + " " + std::string(to_string(level)) + " " + std::string(subsystem) + ": " +
                     std::string(message);
  for (const auto& f : fields) {
    line += ' ';
    line += f.key;
    line += '=';
    line += f.value;
  }
  put_line(std::cerr, std::move(line));
}

// ---------------------------------------------------------------- options

std::optional<std::string> directory_url_for(const std::string& ca) {
  if (ca == "letsencrypt") return "https://acme-v02.api.letsencrypt.org/directory";
  if (ca == "letsencrypt-staging") return "https://acme-staging-v02.api.letsencrypt.org/directory";
  if (ca == "zerossl") return "https://acme.zerossl.com/v2/DV90";
  if (ca == tlsreload::kInternalIssuer) return std::string(tlsreload::kInternalIssuer);
  if (ca.starts_with("https://") || ca.starts_with("http://")) return ca;
  return std::nullopt;
}

std::string default_storage() {
  if (::geteuid() == 0) return "/var/lib/autotls";
  if (const char* x = std::getenv("XDG_DATA_HOME"); x && *x) return std::string(x) + "/autotls";
  const char* home = std::getenv("HOME");
  std::string h = home && *home ? home : "";
  if (h.empty()) {
    if (passwd* pw = ::getpwuid(::geteuid()); pw && pw->pw_dir) h = pw->pw_dir;
  }
  return h + "/.local/share/autotls";
}

Result<std::pair<std::string, int>> parse_host_port(const std::string& text) {
  std::string host;
  std::string port;
  if (text.starts_with("[")) {
    auto close = text.find(']');
    if (close == std::string::npos || close + 1 >= text.size() || text[close + 1] != ':') {
      return fail(Errc::invalid_input, "bad address \"" + text + "\": expected [V6]:PORT");
    }
    host = text.substr(1, close - 1);
    port = text.substr(close + 2);
  } else {
    auto colon = text.rfind(':');
    if (colon == std::string::npos) return fail(Errc::invalid_input, "bad address \"" + text + "\": expected HOST:PORT");
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
    // "::1:443" cannot be split safely, and CLI11 takes a bracketed value with no port
    // ("[::1]") for a list and strips the brackets: "::1" would become host ":" port 1.
    if (host.find(':') != std::string::npos) {
      return fail(Errc::invalid_input,
                  "bad address \"" + text + "\": an IPv6 address needs brackets and a port: [V6]:PORT");
    }
  }
  if (host.empty()) host = "0.0.0.0";
  if (host == "localhost") host = "127.0.0.1";
  char* end = nullptr;
  long p = std::strtol(port.c_str(), &end, 10);
  if (port.empty() || *end != '\0' || p < 0 || p > 65535) {
    return fail(Errc::invalid_input, "bad port in address \"" + text + "\"");
  }
  return std::pair{host, static_cast<int>(p)};
}

Result<std::optional<acme::ExternalAccountBinding>> eab_from(const Options& o) {
  std::string hmac = o.eab_hmac;
  if (hmac.empty() && !o.eab_hmac_file.empty()) {
    std::ifstream in(o.eab_hmac_file);
    if (!in) return fail(Errc::invalid_input, "--eab-hmac-file " + o.eab_hmac_file + ": cannot read");
    std::getline(in, hmac);
  }
  if (hmac.empty()) {
    if (const char* e = std::getenv("AUTOTLS_EAB_HMAC"); e) hmac = e;
  }
  while (!hmac.empty() && std::isspace(static_cast<unsigned char>(hmac.back()))) hmac.pop_back();
  if (o.eab_kid.empty() && hmac.empty()) return std::optional<acme::ExternalAccountBinding>();
  if (o.eab_kid.empty()) return fail(Errc::invalid_input, "an EAB HMAC key was given without --eab-kid");
  // The key itself is never part of a message.
  if (hmac.empty()) {
    return fail(Errc::invalid_input, "--eab-kid needs the HMAC key: --eab-hmac, --eab-hmac-file or AUTOTLS_EAB_HMAC");
  }
  acme::ExternalAccountBinding eab;
  eab.kid = o.eab_kid;
  eab.hmac_key = hmac;
  return std::optional<acme::ExternalAccountBinding>(std::move(eab));
}

std::string tsig_key_text(const Options& o) {
  if (!o.tsig_key.empty()) return o.tsig_key;
  if (const char* e = std::getenv("AUTOTLS_TSIG_KEY"); e) return e;
  return {};
}

Result<std::shared_ptr<acme::Solver>> dns_update_solver(const Options& o) {
  if (o.dns_server.empty()) {
    if (!o.tsig_key.empty() || !o.dns_zone.empty()) {
      return fail(Errc::invalid_input, "--tsig-key and --dns-zone need --dns-server HOST[:PORT]");
    }
    return std::shared_ptr<acme::Solver>();
  }
  if (!o.dns_hook.empty()) return fail(Errc::invalid_input, "give --dns-hook or --dns-server, not both");
  auto server = tlsreload::dns::parse_server(o.dns_server);
  if (!server) return fail(server.error());
  std::string key_text = tsig_key_text(o);
  if (key_text.empty()) {
    return fail(Errc::invalid_input,
                "--dns-server needs --tsig-key NAME:ALGORITHM:BASE64SECRET or a BIND key file (or AUTOTLS_TSIG_KEY)");
  }
  auto key = tlsreload::dns::parse_tsig_key(key_text);
  if (!key) return fail(key.error());
  if (!o.dns_zone.empty()) {
    if (auto z = tlsreload::dns::wire::encode_name(o.dns_zone); !z) return fail(Errc::invalid_input, "--dns-zone: " + z.error().message);
  }
  return std::shared_ptr<acme::Solver>(std::make_shared<tlsreload::dns::Rfc2136Solver>(*server, *key, o.dns_zone));
}

// ---------------------------------------------------------------- names

Result<IdnName> idn_name(const std::string& input) {
  std::string n = input;
  while (!n.empty() && n.back() == '.') n.pop_back();
  if (auto ip = acme::canonical_ip(n)) return IdnName{*ip, *ip};
  std::string prefix;
  if (n.starts_with("*.")) {
    prefix = "*.";
    n = n.substr(2);
  }
  bool ascii = std::all_of(n.begin(), n.end(), [](unsigned char c) { return c < 0x80; });
  IdnName out;
  if (ascii) {
    std::transform(n.begin(), n.end(), n.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    out.ascii = prefix + n;
    out.unicode = out.ascii;
    if (n.starts_with("xn--") || contains(n, ".xn--")) {
      char* u = nullptr;
      int rc = idn2_to_unicode_8z8z(n.c_str(), &u, 0);
      if (rc != IDN2_OK) {
        return fail(Errc::invalid_input, "\"" + input + "\" is not a valid internationalized domain name: " +
                                             idn2_strerror(rc));
      }
      out.unicode = prefix + u;
      idn2_free(u);
    }
    return out;
  }
  char* a = nullptr;
  int rc = idn2_to_ascii_8z(n.c_str(), &a, IDN2_NFC_INPUT | IDN2_NONTRANSITIONAL);
  if (rc != IDN2_OK) {
    return fail(Errc::invalid_input, "\"" + input + "\" is not a valid internationalized domain name: " +
                                         idn2_strerror(rc) + " (names must be UTF-8; see IDNA2008)");
  }
  out.ascii = prefix + a;
  idn2_free(a);
  char* u = nullptr;
  if (idn2_to_unicode_8z8z(out.ascii.c_str() + prefix.size(), &u, 0) == IDN2_OK) {
    out.unicode = prefix + u;
    idn2_free(u);
  } else {
    out.unicode = prefix + n;
  }
  return out;
}

Result<std::vector<std::string>> normalized(const std::vector<std::string>& in) {
  std::vector<std::string> out;
  for (const auto& raw : in) {
    auto n = idn_name(raw);
    if (!n) return fail(n.error());
    if (!n->ascii.empty() && std::find(out.begin(), out.end(), n->ascii) == out.end()) out.push_back(n->ascii);
  }
  return out;
}

Result<std::vector<std::string>> requested_names(const Options& o, const std::string& command) {
  for (const auto& ip : o.ips) {
    if (acme::identifier_for(ip).type != "ip") return fail(Errc::invalid_input, "--ip " + ip + ": not an IP address");
  }
  std::vector<std::string> given = o.domains;
  given.insert(given.end(), o.ips.begin(), o.ips.end());
  auto names = normalized(given);
  if (!names) return fail(Errc::invalid_input, command + ": " + names.error().message);
  for (const auto& n : *names) {
    if (!tlsreload::is_valid_lookup_name(n)) {
      return fail(Errc::invalid_input, command + ": \"" + n + "\" is not a valid DNS name or IP address");
    }
  }
  return names;
}

std::string wildcard_challenge_error(const Options& o, const std::vector<std::string>& names, const std::string& command) {
  auto wildcard = std::find_if(names.begin(), names.end(), [](const std::string& n) { return n.starts_with("*."); });
  if (wildcard == names.end() || o.challenge == "dns-01") return {};
  // The internal CA takes no challenge. An issuer list that does not parse is reported later,
  // by manager_options, with its own message.
  auto issuers = issuer_list(o);
  if (!issuers) return {};
  const bool internal_only =
      issuers->empty() ? directory_url_for(o.ca) == std::string(tlsreload::kInternalIssuer)
                       : std::all_of(issuers->begin(), issuers->end(), [](const auto& is) { return is.internal; });
  if (internal_only) return {};
  return command + ": " + *wildcard + ": a wildcard certificate needs --challenge dns-01 (CAs validate wildcard names only over DNS, not " +
         o.challenge + ")";
}

std::string show_name(const std::string& ascii) {
  auto n = idn_name(ascii);
  if (!n || n->unicode == n->ascii) return ascii;
  return ascii + " (" + n->unicode + ")";
}

json unicode_names(const std::vector<std::string>& names) {
  json j = json::array();
  for (const auto& n : names) {
    auto i = idn_name(n);
    j.push_back(i ? i->unicode : n);
  }
  return j;
}

// ---------------------------------------------------------------- errors

int exit_code_for(const Error& e) {
  if (e.validation_failed) return kExitValidation;
  if (e.problem) return kExitCaRefused;
  switch (e.code) {
    case Errc::transport:
    case Errc::timeout: return kExitNetwork;
    case Errc::protocol:
    case Errc::bad_response: return kExitCaRefused;
    case Errc::invalid_input: return kExitUsage;
    case Errc::crypto:
    case Errc::io:
    case Errc::cancelled: return kExitLocal;
  }
  return kExitLocal;
}

std::string describe_error(const Error& e) {
  std::string s = e.message;
  if (e.problem) {
    const auto& p = *e.problem;
    s += "\n  problem: " + p.type;
    if (!p.detail.empty()) s += "\n  detail: " + p.detail;
    for (const auto& sp : p.subproblems) {
      s += "\n  subproblem: ";
      if (!sp.identifier_value.empty()) s += sp.identifier_type + ":" + sp.identifier_value + ": ";
      s += sp.type;
      if (!sp.detail.empty()) s += ": " + sp.detail;
    }
    if (!p.instance.empty()) s += "\n  see: " + p.instance;
  }
  if (e.retry_after) {
    s += "\n  retry after " + acme::format_rfc3339(system_clock::now() + *e.retry_after);
  } else if (e.problem && e.problem->is("rateLimited")) {
    s += "\n  rate limited: retry later (the CA gave no Retry-After)";
  }
  return s;
}

json error_json(const Error& e) {
  json j = {{"code", to_string(e.code)}, {"message", e.message}};
  if (e.http_status) j["http_status"] = e.http_status;
  if (e.problem) {
    json p = {{"type", e.problem->type}, {"detail", e.problem->detail}};
    if (!e.problem->instance.empty()) p["instance"] = e.problem->instance;
    json subs = json::array();
    for (const auto& sp : e.problem->subproblems) {
      subs.push_back({{"type", sp.type}, {"detail", sp.detail},
                      {"identifier", {{"type", sp.identifier_type}, {"value", sp.identifier_value}}}});
    }
    p["subproblems"] = subs;
    j["problem"] = p;
  }
  if (e.retry_after) j["retry_after"] = acme::format_rfc3339(system_clock::now() + *e.retry_after);
  return j;
}

int report(Context& ctx, const Error& e) {
  int code = exit_code_for(e);
  ctx.out.error(e, code);
  return code;
}

int usage_error(Context& ctx, const std::string& message) {
  ctx.out.error(Error(Errc::invalid_input, message), kExitUsage);
  return kExitUsage;
}

// ---------------------------------------------------------------- storage helpers

LivePaths live_paths(const std::string& storage_root, const std::string& name) {
  LivePaths p;
  p.dir = fs::path(storage_root) / "live" / name;
  p.cert = p.dir / "cert.pem";
  p.chain = p.dir / "chain.pem";
  p.fullchain = p.dir / "fullchain.pem";
  p.key = p.dir / "privkey.pem";
  p.meta = p.dir / "meta.json";
  return p;
}

Status run_deploy_hook(const std::string& hook, const std::vector<std::string>& names, const LivePaths& paths,
                       const std::string& event, const std::string& error, const std::string& label) {
  std::string all;
  for (const auto& n : names) all += (all.empty() ? "" : " ") + n;
  // The environment is built before fork(): between fork and exec only async-signal-safe
  // calls are allowed, and serve is multi-threaded.
  std::vector<std::string> env;
  for (char** e = environ; e && *e; ++e) {
    std::string_view v(*e);
    if (v.starts_with("AUTOTLS_NAMES=") || v.starts_with("AUTOTLS_CERT_PATH=") || v.starts_with("AUTOTLS_KEY_PATH=") ||
        v.starts_with("AUTOTLS_FULLCHAIN_PATH=") || v.starts_with("AUTOTLS_CHAIN_PATH=") ||
        v.starts_with("AUTOTLS_EVENT=") || v.starts_with("AUTOTLS_ERROR=") || v.starts_with("AUTOTLS_META_PATH=")) {
      continue;
    }
    env.emplace_back(v);
  }
  env.push_back("AUTOTLS_NAMES=" + all);
  env.push_back("AUTOTLS_CERT_PATH=" + paths.cert.string());
  env.push_back("AUTOTLS_KEY_PATH=" + paths.key.string());
  env.push_back("AUTOTLS_FULLCHAIN_PATH=" + paths.fullchain.string());
  env.push_back("AUTOTLS_CHAIN_PATH=" + paths.chain.string());
  if (!event.empty()) env.push_back("AUTOTLS_EVENT=" + event);
  if (!error.empty()) env.push_back("AUTOTLS_ERROR=" + error);
  env.push_back("AUTOTLS_META_PATH=" + paths.meta.string());
  std::vector<char*> envp;
  for (auto& s : env) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::string sh = "/bin/sh", dash_c = "-c", cmd = hook;
  char* argv[] = {sh.data(), dash_c.data(), cmd.data(), nullptr};
  pid_t pid = ::fork();
  if (pid < 0) return fail(Errc::io, label + ": fork: " + std::string(std::strerror(errno)));
  if (pid == 0) {
    // serve blocks SIGTERM/SIGINT/SIGHUP in every thread (it takes them with sigwait); the
    // hook must not inherit that mask.
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    // stdout carries the command's results (one JSON object per line with --json): what the
    // hook prints goes to stderr.
    ::dup2(STDERR_FILENO, STDOUT_FILENO);
    ::execve("/bin/sh", argv, envp.data());
    ::_exit(127);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return fail(Errc::io, label + ": waitpid: " + std::string(std::strerror(errno)));
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return {};
  std::string why = WIFEXITED(status) ? "exited with status " + std::to_string(WEXITSTATUS(status))
                                      : "killed by signal " + std::to_string(WTERMSIG(status));
  return fail(Errc::io, label + " `" + hook + "` " + why);
}

Status run_event_hook(const std::string& hook, const std::string& event, const std::vector<std::string>& names,
                      const LivePaths& paths, const std::string& error) {
  return run_deploy_hook(hook, names, paths, event, error, "event hook");
}

namespace {

std::optional<system_clock::time_point> asn1_time(const ASN1_TIME* t) {
  std::tm tm{};
  if (!t || ASN1_TIME_to_tm(t, &tm) != 1) return std::nullopt;
  return system_clock::from_time_t(::timegm(&tm));
}

// parse_leaf reads the first certificate of a PEM text: names, validity, issuer, key type.
// parse_leaf_fast fills what parse_leaf fills from the leaf's DER (tlsreload's fast path:
// tens of microseconds where d2i_X509 takes ~0.7 ms in OpenSSL 3.0, per certificate listed or
// shown after an issuance). false when it cannot (then parse_leaf uses OpenSSL): anything the
// fast path does not read, a key type it does not name, or an issuer to print (no meta.json).
bool parse_leaf_fast(const std::string& pem, CertInfo& c) {
  if (c.issuer.empty()) return false;
  auto blocks = der::fast_pem_blocks(pem);
  if (!blocks || blocks->empty() || (*blocks)[0].name != "CERTIFICATE") return false;
  auto leaf = der::parse_leaf((*blocks)[0].der);
  if (!leaf) return false;
  std::string key_type;
  if (leaf->key_nid == NID_X9_62_id_ecPublicKey) {
    key_type = leaf->curve_nid == NID_X9_62_prime256v1 ? "ec256"
               : leaf->curve_nid == NID_secp384r1     ? "ec384"
               : leaf->curve_nid == NID_secp521r1     ? "ec521"
                                                      : "";
  } else if (leaf->key_nid == NID_rsaEncryption) {
    std::string_view n, e;
    if (der::split_rsa_public(leaf->public_key, n, e)) {
      key_type = "rsa" + std::to_string(der::rsa_bits(n));
    }
  }
  if (key_type.empty()) return false;
  c.not_before = system_clock::time_point(std::chrono::seconds(leaf->not_before));
  c.not_after = system_clock::time_point(std::chrono::seconds(leaf->not_after));
  c.key_type = std::move(key_type);
  if (c.names.empty()) {
    for (const auto& [type, value] : leaf->sans) {
      if (type == 2) c.names.emplace_back(value);  // dNSName
    }
  }
  return true;
}

bool parse_leaf(const std::string& pem, CertInfo& c) {
  if (parse_leaf_fast(pem, c)) return true;
  ossl::BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (!bio) return false;
  X509* raw = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr);
  if (!raw) return false;
  ossl::X509Ptr x(raw);
  if (auto t = asn1_time(X509_get0_notBefore(x.get()))) c.not_before = *t;
  if (auto t = asn1_time(X509_get0_notAfter(x.get()))) c.not_after = *t;
  if (c.issuer.empty()) {
    ossl::BioPtr out(BIO_new(BIO_s_mem()));
    X509_NAME_print_ex(out.get(), X509_get_issuer_name(x.get()), 0, XN_FLAG_RFC2253);
    char* data = nullptr;
    long n = BIO_get_mem_data(out.get(), &data);
    if (n > 0) c.issuer.assign(data, static_cast<size_t>(n));
  }
  if (EVP_PKEY* k = X509_get0_pubkey(x.get())) {
    if (EVP_PKEY_get_base_id(k) == EVP_PKEY_EC) {
      char group[64] = {0};
      size_t len = 0;
      EVP_PKEY_get_group_name(k, group, sizeof group, &len);
      std::string g(group);
      c.key_type = g == "prime256v1" ? "ec256" : g == "secp384r1" ? "ec384" : g == "secp521r1" ? "ec521" : "ec:" + g;
    } else if (EVP_PKEY_get_base_id(k) == EVP_PKEY_RSA) {
      c.key_type = "rsa" + std::to_string(EVP_PKEY_get_bits(k));
    } else {
      c.key_type = "other";
    }
  }
  if (c.names.empty()) {
    auto* sans = static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(x.get(), NID_subject_alt_name, nullptr, nullptr));
    if (sans) {
      for (int i = 0; i < sk_GENERAL_NAME_num(sans); ++i) {
        const GENERAL_NAME* gn = sk_GENERAL_NAME_value(sans, i);
        if (gn->type == GEN_DNS) {
          const auto* s = gn->d.dNSName;
          c.names.emplace_back(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)), ASN1_STRING_length(s));
        }
      }
      GENERAL_NAMES_free(sans);
    }
  }
  return true;
}

}  // namespace

Result<std::optional<CertInfo>> stored_certificate(tlsreload::Storage& storage, const std::string& key) {
  auto meta = storage.get("live/" + key + "/meta.json");
  if (!meta) return fail(meta.error());
  auto chain = storage.get("live/" + key + "/fullchain.pem");
  if (!chain) return fail(chain.error());
  if (!*meta && !*chain) return std::optional<CertInfo>();
  CertInfo c;
  c.key = key;
  std::optional<tlsreload::CertificateState> st;
  if (*meta) {
    auto s = tlsreload::CertificateState::from_json(**meta);
    if (s) st = std::move(*s);
  }
  if (st) {
    c.names = st->names;
    c.directory_url = st->directory_url;
    c.issuer = st->issuer;
    c.serial = st->serial;
    c.failures = st->failures;
    c.last_error = st->last_error;
    c.next_attempt = st->next_attempt;
  }
  if (*chain && parse_leaf(**chain, c)) {
    c.has_cert = true;
  } else {
    c.problem = *chain ? "fullchain.pem cannot be parsed" : "no fullchain.pem";
  }
  auto renewal = storage.get("live/" + key + "/renewal.json");
  if (renewal && *renewal) {
    auto j = json::parse(**renewal, nullptr, false);
    if (j.is_object()) c.renewal = j;
  }
  if (c.directory_url.empty() && c.renewal.is_object()) c.directory_url = c.renewal.value("directory_url", "");

  auto now = system_clock::now();
  if (!c.has_cert) {
    c.renewal_time = now;
    c.renewal_reason = c.problem;
    c.due = true;
    return std::optional<CertInfo>(std::move(c));
  }
  // The Manager's rule (tlsreload/manager.cpp due_time): ARI's choice when the CA gave one,
  // but never later than when a sixth of the lifetime remains; otherwise a third remaining.
  auto ratio_time = tlsreload::ratio_renewal_time(c.not_before, c.not_after, 1.0 / 3.0);
  if (st && st->ari_selected) {
    auto emergency = tlsreload::ratio_renewal_time(c.not_before, c.not_after, 1.0 / 6.0);
    c.renewal_time = std::min(*st->ari_selected, emergency);
    c.renewal_reason = *st->ari_selected <= emergency ? "time chosen in the CA's ARI renewal window"
                                                      : "a sixth of the lifetime remains (before the ARI window)";
  } else {
    c.renewal_time = ratio_time;
    auto lifetime = c.not_after - c.not_before;
    c.renewal_reason = lifetime < std::chrono::hours(24 * 10) ? "half of the (short) lifetime remains"
                                                              : "a third of the lifetime remains";
  }
  if (now >= c.not_after) {
    c.renewal_reason = "expired";
  }
  c.due = now >= c.renewal_time;
  if (c.next_attempt && c.failures > 0 && *c.next_attempt > c.renewal_time) {
    c.renewal_time = *c.next_attempt;
    c.renewal_reason = "backing off after " + std::to_string(c.failures) + " failed attempt(s)";
    c.due = now >= c.renewal_time;
  }
  return std::optional<CertInfo>(std::move(c));
}

Result<std::vector<CertInfo>> stored_certificates(tlsreload::Storage& storage) {
  auto keys = storage.list("live");
  if (!keys) return fail(keys.error());
  std::vector<std::string> names;
  for (const auto& k : *keys) {
    // live/<name>/<file>
    auto rest = std::string_view(k).substr(5);
    auto slash = rest.find('/');
    if (slash == std::string_view::npos) continue;
    std::string n(rest.substr(0, slash));
    if (names.empty() || names.back() != n) names.push_back(n);
  }
  std::vector<CertInfo> out;
  for (const auto& n : names) {
    auto c = stored_certificate(storage, n);
    if (!c) return fail(c.error());
    if (*c) out.push_back(std::move(**c));
  }
  return out;
}

json cert_info_json(const CertInfo& c, const std::string& storage_root) {
  auto now = system_clock::now();
  auto paths = live_paths(storage_root, c.key);
  json j = {{"name", c.key},
            {"names", c.names},
            {"unicode_names", unicode_names(c.names)},
            {"directory_url", c.directory_url},
            {"issuer", c.issuer},
            {"key_type", c.key_type},
            {"serial", c.serial},
            {"valid", c.has_cert && now < c.not_after},
            {"due", c.due},
            {"renewal_reason", c.renewal_reason},
            {"failures", c.failures},
            {"last_error", c.last_error},
            {"fullchain_path", paths.fullchain.string()},
            {"key_path", paths.key.string()},
            {"cert_path", paths.cert.string()},
            {"chain_path", paths.chain.string()}};
  if (c.has_cert) {
    j["not_before"] = acme::format_rfc3339(c.not_before);
    j["not_after"] = acme::format_rfc3339(c.not_after);
    j["days_left"] = std::chrono::duration_cast<std::chrono::hours>(c.not_after - now).count() / 24;
  } else {
    j["problem"] = c.problem;
  }
  j["renewal_time"] = acme::format_rfc3339(c.renewal_time);
  if (c.next_attempt) j["next_attempt"] = acme::format_rfc3339(*c.next_attempt);
  return j;
}

// ---------------------------------------------------------------- solvers and responders

Status WebrootSolver::present(const acme::Identifier&, const acme::Challenge& challenge,
                              std::string_view key_authorization) {
  if (challenge.type != "http-01") return fail(Errc::invalid_input, "--webroot answers http-01 only");
  fs::path dir = root_ / ".well-known" / "acme-challenge";
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return fail(Errc::io, "webroot: cannot create " + dir.string() + ": " + ec.message());
  fs::path file = dir / challenge.token;
  fs::path tmp = dir / (challenge.token + ".tmp");
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << key_authorization;
    if (!out) return fail(Errc::io, "webroot: cannot write " + tmp.string());
  }
  // World-readable: the web server serving the webroot usually runs as another user.
  fs::permissions(tmp, fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read | fs::perms::others_read, ec);
  fs::rename(tmp, file, ec);
  if (ec) return fail(Errc::io, "webroot: cannot write " + file.string() + ": " + ec.message());
  return {};
}

void WebrootSolver::cleanup(const acme::Identifier&, const acme::Challenge& challenge, std::string_view) {
  std::error_code ec;
  fs::remove(root_ / ".well-known" / "acme-challenge" / challenge.token, ec);
}

namespace {

class ServerResponder : public Responder {
 public:
  explicit ServerResponder(std::unique_ptr<server::Server> s) : server_(std::move(s)) {}
  ~ServerResponder() override { server_->shutdown(std::chrono::milliseconds(500)); }

 private:
  std::unique_ptr<server::Server> server_;
};

}  // namespace

Result<std::unique_ptr<Responder>> start_responder(const std::string& challenge_type, const std::string& address,
                                                   std::shared_ptr<tlsreload::ChallengeStore> challenges,
                                                   Logger* logger) {
  auto hp = parse_host_port(address);
  if (!hp) return fail(hp.error());
  server::ServerConfig cfg;
  // A responder answers one CA's few validation requests from its reactor (http-01 and
  // tls-alpn-01 never block): one reactor and the smallest worker pool start fastest.
  cfg.reactor_threads = 1;
  cfg.worker_threads = 1;
  const bool http = challenge_type == "http-01";
  if (http) {
    // Only the http listener: http-01 needs nothing else (other requests get a 404).
    cfg.https = {};
    cfg.http = {{hp->first, hp->second}};
  } else {
    cfg.https = {{hp->first, hp->second}};
    cfg.http = {};
  }
  auto s = server::Server::create(cfg, std::make_shared<tlsreload::CertStore>(), std::move(challenges), logger);
  if (!s) {
    const auto& msg = s.error().message;
    std::string port = std::to_string(hp->second);
    std::string alternatives = http ? "use --webroot or --http-address" : "use --tls-address, or --challenge http-01 or dns-01";
    if (contains(msg, "address already in use")) {
      return fail(Errc::io, "port " + port + " is in use by another process: " + alternatives + " (" + msg + ")");
    }
    if (contains(msg, "permission denied")) {
      return fail(Errc::io, "port " + port + " needs root or CAP_NET_BIND_SERVICE: " + alternatives + " (" + msg + ")");
    }
    return fail(s.error());
  }
  if (auto st = (*s)->start(); !st) return fail(st.error());
  return std::unique_ptr<Responder>(new ServerResponder(std::move(*s)));
}

// ---------------------------------------------------------------- manager set-up

Result<tlsreload::ManagerOptions> manager_options(Context& ctx, const std::string& directory_url) {
  return manager_options(ctx, ctx.options, directory_url);
}

Result<tlsreload::ManagerOptions> manager_options(Context& ctx, const Options& o, const std::string& directory_url) {
  tlsreload::ManagerOptions mo;
  mo.directory_url = directory_url;
  mo.ca_bundle = o.ca_bundle;
  mo.email = o.email;
  mo.agree_to_terms = o.agree_tos;
  auto eab = eab_from(o);
  if (!eab) return fail(eab.error());
  mo.eab = *eab;
  if (o.challenge != "http-01" && o.challenge != "tls-alpn-01" && o.challenge != "dns-01") {
    return fail(Errc::invalid_input, "--challenge must be http-01, tls-alpn-01 or dns-01, not \"" + o.challenge + "\"");
  }
  mo.challenge_type = o.challenge;
  mo.dns_hook = o.dns_hook;
  if (o.challenge == "dns-01") {
    auto solver = dns_update_solver(o);
    if (!solver) return fail(solver.error());
    if (*solver) mo.solver = *solver;
  }
  auto kt = acme::parse_key_type(o.key_type);
  if (!kt) return fail(Errc::invalid_input, "--key-type must be ec256, ec384, rsa2048, rsa3072 or rsa4096, not \"" + o.key_type + "\"");
  mo.key_type = *kt;
  mo.profile = o.profile;
  mo.preferred_chain = o.preferred_chain;
  mo.logger = &ctx.logger;
  auto issuers = issuer_list(o);
  if (!issuers) return fail(issuers.error());
  mo.issuers = std::move(*issuers);
  return mo;
}

Result<std::vector<tlsreload::IssuerConfig>> issuer_list(const Options& o) {
  std::vector<tlsreload::IssuerConfig> out;
  auto eab = eab_from(o);
  if (!eab) return fail(eab.error());
  for (const auto& ca : o.issuers) {
    auto dir = directory_url_for(ca);
    if (!dir) return fail(Errc::invalid_input, "--issuer must be letsencrypt, letsencrypt-staging, zerossl, internal or a directory URL, not \"" + ca + "\"");
    tlsreload::IssuerConfig c;
    c.name = ca.starts_with("http") ? std::string() : ca;
    c.internal = *dir == tlsreload::kInternalIssuer;
    if (!c.internal) c.directory_url = *dir;
    // Let's Encrypt takes no EAB, the internal CA no account: --eab-* is for the others.
    if (!c.internal && !ca.starts_with("letsencrypt")) c.eab = *eab;
    out.push_back(std::move(c));
  }
  if (o.issuer_objects.is_null()) return out;
  if (!out.empty()) return fail(Errc::invalid_input, "give the issuers with --issuer or with \"issuers\" in the config file, not both");
  if (!o.issuer_objects.is_array()) return fail(Errc::invalid_input, "config: \"issuers\" must be a list of objects");
  const std::vector<std::string> known{"ca", "ca-bundle", "email", "eab-kid", "eab-hmac", "eab-hmac-file",
                                       "profile", "preferred-chain", "key-type"};
  for (size_t i = 0; i < o.issuer_objects.size(); ++i) {
    const auto& j = o.issuer_objects[i];
    std::string where = "config: issuers[" + std::to_string(i) + "]";
    if (!j.is_object()) return fail(Errc::invalid_input, where + ": expected an object such as {\"ca\": \"letsencrypt\"}");
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (std::find(known.begin(), known.end(), it.key()) == known.end()) {
        return fail(Errc::invalid_input, where + ": unknown key \"" + it.key() + "\" (ca, ca-bundle, email, eab-kid, "
                                         "eab-hmac, eab-hmac-file, profile, preferred-chain, key-type)");
      }
      if (!it.value().is_string()) return fail(Errc::invalid_input, where + "." + it.key() + ": expected a string");
    }
    auto str = [&](const char* k) { return j.contains(k) ? j[k].get<std::string>() : std::string(); };
    std::string ca = str("ca");
    auto dir = directory_url_for(ca);
    if (!dir) return fail(Errc::invalid_input, where + ".ca: letsencrypt, letsencrypt-staging, zerossl, internal or a directory URL, not \"" + ca + "\"");
    tlsreload::IssuerConfig c;
    c.name = ca.starts_with("http") ? std::string() : ca;
    c.internal = *dir == tlsreload::kInternalIssuer;
    if (!c.internal) c.directory_url = *dir;
    c.ca_bundle = str("ca-bundle");
    c.email = str("email");
    c.profile = str("profile");
    c.preferred_chain = str("preferred-chain");
    if (j.contains("key-type")) {
      auto kt = acme::parse_key_type(str("key-type"));
      if (!kt) return fail(Errc::invalid_input, where + ".key-type: ec256, ec384, rsa2048, rsa3072 or rsa4096");
      c.key_type = *kt;
    }
    Options eo;
    eo.eab_kid = str("eab-kid");
    eo.eab_hmac = str("eab-hmac");
    eo.eab_hmac_file = str("eab-hmac-file");
    if (!eo.eab_kid.empty()) {
      // AUTOTLS_EAB_HMAC is for the single --eab-kid; here the key must be in the object.
      if (eo.eab_hmac.empty() && eo.eab_hmac_file.empty()) {
        return fail(Errc::invalid_input, where + ": eab-kid needs eab-hmac-file (or eab-hmac)");
      }
      auto e = eab_from(eo);
      if (!e) return fail(e.error().with_context(where));
      c.eab = *e;
    } else if (!eo.eab_hmac.empty() || !eo.eab_hmac_file.empty()) {
      return fail(Errc::invalid_input, where + ": an EAB HMAC key without eab-kid");
    }
    out.push_back(std::move(c));
  }
  return out;
}

Result<std::unique_ptr<acme::Client>> make_client(Context& ctx, const std::string& directory_url, bool no_retries) {
  acme::CurlOptions curl;
  curl.ca_bundle = ctx.options.ca_bundle;
  acme::ClientOptions co;
  co.directory_url = directory_url;
  if (no_retries) co.max_server_retries = 0;
  co.transport = std::shared_ptr<acme::HttpTransport>(acme::make_curl_transport(curl));
  co.logger = &ctx.logger;
  auto c = acme::Client::create(co);
  if (!c) return fail(c.error().with_context("ACME directory " + directory_url));
  return std::move(*c);
}

Status check_terms(Context& ctx, const std::string& directory_url, bool probe) {
  if (ctx.options.agree_tos || directory_url == tlsreload::kInternalIssuer) return {};
  auto stored = ctx.storage->get("accounts/" + tlsreload::ca_storage_name(directory_url) + "/account.json");
  if (stored && *stored) return {};
  auto client = make_client(ctx, directory_url, probe);
  if (!client) return fail(client.error());
  const auto& tos = (*client)->directory().terms_of_service;
  if (tos.empty()) return {};
  return fail(Errc::invalid_input,
              "no ACME account yet at " + directory_url + ": read the CA's terms of service at " + tos +
                  " and pass --agree-tos (or \"agree-tos\": true in the config file)");
}

Status check_issuer_terms(Context& ctx, const std::vector<tlsreload::IssuerConfig>& issuers) {
  if (issuers.empty()) return check_terms(ctx, ctx.directory_url);
  for (const auto& is : issuers) {
    if (is.internal) continue;
    // Terms not agreed to stop us; a CA that cannot be reached now does not (asked once, not
    // retried: the Manager tries it again in earnest).
    if (auto st = check_terms(ctx, is.directory_url, true); !st && st.error().code == Errc::invalid_input) return st;
  }
  return {};
}

}  // namespace autotls::cli
