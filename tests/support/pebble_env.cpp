#include "tests/support/pebble_env.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <system_error>
#include <thread>

#include <nlohmann/json.hpp>
#include <openssl/ec.h>
#include <openssl/pem.h>
#include <openssl/rand.h>

#include "acme/util/base64.h"
#include "acme/util/openssl.h"
#include "tests/support/net.h"

extern char** environ;

namespace autotls::testing {

namespace {

using Clock = std::chrono::steady_clock;

// ---- ports ---------------------------------------------------------------------------------

// Fd closes a descriptor on scope exit.
struct Fd {
  int fd = -1;
  Fd() = default;
  explicit Fd(int f) : fd(f) {}
  Fd(Fd&& o) noexcept : fd(std::exchange(o.fd, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      reset();
      fd = std::exchange(o.fd, -1);
    }
    return *this;
  }
  ~Fd() { reset(); }
  void reset() {
    if (fd >= 0) ::close(fd);
    fd = -1;
  }
};

sockaddr_in loopback(int port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return a;
}

bool bind_ok(int fd, int port) {
  auto a = loopback(port);
  return ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
}

// pick_ports returns n distinct loopback ports that are free for TCP and UDP right now (the DNS
// server needs both). The probe sockets stay open until all n are chosen so the kernel cannot
// hand out the same port twice; someone may still take one before our children bind it, which
// launch() detects and retries. Every port returned is claimed (net.h): this process never
// hands it out again.
Result<std::vector<int>> pick_ports(size_t n) {
  std::vector<Fd> held;
  std::vector<int> ports;
  for (int attempt = 0; ports.size() < n && attempt < 200; ++attempt) {
    Fd tcp(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (tcp.fd < 0 || !bind_ok(tcp.fd, 0)) return fail(Errc::io, std::string("bind-0 probe: ") + std::strerror(errno));
    sockaddr_in a{};
    socklen_t len = sizeof a;
    if (::getsockname(tcp.fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
      return fail(Errc::io, std::string("getsockname: ") + std::strerror(errno));
    }
    int port = ntohs(a.sin_port);
    // Not one that free_port() or an earlier pick in this process handed out: http_port() and
    // tls_port() are bound by the test itself, later, and nobody holds them until then.
    if (!claim_port(port)) continue;
    Fd udp(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    if (udp.fd < 0 || !bind_ok(udp.fd, port)) continue;
    held.push_back(std::move(tcp));
    held.push_back(std::move(udp));
    ports.push_back(port);
  }
  if (ports.size() < n) return fail(Errc::io, "could not find free loopback ports");
  return ports;
}

// ---- files and processes -------------------------------------------------------------------

Status write_file(const std::filesystem::path& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << data;
  out.close();
  if (!out) return fail(Errc::io, "write " + path.string() + " failed");
  return {};
}

std::string read_tail(const std::filesystem::path& path, size_t max_bytes) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "(no log)\n";
  std::stringstream ss;
  ss << in.rdbuf();
  std::string s = ss.str();
  if (s.size() > max_bytes) s = "...\n" + s.substr(s.size() - max_bytes);
  return s;
}

std::optional<std::string> find_on_path(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::string_view rest = path != nullptr ? path : "/usr/local/bin:/usr/bin:/bin";
  while (true) {
    auto colon = rest.find(':');
    std::string dir(rest.substr(0, colon));
    if (dir.empty()) dir = ".";
    std::string full = dir + "/" + name;
    if (::access(full.c_str(), X_OK) == 0) return full;
    if (colon == std::string_view::npos) break;
    rest.remove_prefix(colon + 1);
  }
  return std::nullopt;
}

// spawn starts argv with stdout and stderr appended to log and stdin from /dev/null. The child
// gets the parent's environment minus proxy variables (Pebble must reach 127.0.0.1 directly),
// plus extra_env. When setpriv is installed the child is started through
// `setpriv --pdeathsig KILL`, so a crashed or killed test leaves no server behind.
Result<pid_t> spawn(std::vector<std::string> argv, const std::filesystem::path& log,
                    const std::vector<std::string>& extra_env) {
  static const std::optional<std::string> setpriv = find_on_path("setpriv");
  if (setpriv) argv.insert(argv.begin(), {*setpriv, "--pdeathsig", "KILL", "--"});

  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    std::string_view kv(*e);
    std::string name(kv.substr(0, kv.find('=')));
    std::string lower;
    for (char c : name) lower += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (lower == "http_proxy" || lower == "https_proxy" || lower == "all_proxy") continue;
    bool overridden = false;
    for (const auto& x : extra_env) {
      if (x.substr(0, x.find('=')) == name) overridden = true;
    }
    if (!overridden) env.emplace_back(kv);
  }
  env.insert(env.end(), extra_env.begin(), extra_env.end());

  std::vector<char*> cargv;
  for (auto& a : argv) cargv.push_back(a.data());
  cargv.push_back(nullptr);
  std::vector<char*> cenv;
  for (auto& e : env) cenv.push_back(e.data());
  cenv.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  // A fresh process group keeps terminal signals meant for the test runner away from the
  // servers; the destructor stops them explicitly.
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP);
  posix_spawnattr_setpgroup(&attr, 0);
  pid_t pid = -1;
  int rc = ::posix_spawnp(&pid, cargv[0], &actions, &attr, cargv.data(), cenv.data());
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) return fail(Errc::io, "posix_spawn " + argv[0] + ": " + std::strerror(rc));
  return pid;
}

// alive reaps pid if it exited and reports whether it is still running.
bool alive(pid_t& pid) {
  if (pid <= 0) return false;
  int status = 0;
  pid_t r = ::waitpid(pid, &status, WNOHANG);
  if (r == 0) return true;
  pid = -1;  // exited (and reaped) or not our child
  return false;
}

void terminate(pid_t& pid) {
  if (pid <= 0) return;
  ::kill(pid, SIGTERM);
  auto deadline = Clock::now() + std::chrono::seconds(3);
  while (Clock::now() < deadline) {
    int status = 0;
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid || (r < 0 && errno == ECHILD)) {
      pid = -1;
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ::kill(pid, SIGKILL);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  pid = -1;
}

std::string fqdn(std::string host) {
  if (host.empty() || host.back() != '.') host += '.';
  return host;
}

// ---- certificates --------------------------------------------------------------------------

Result<ossl::EvpPkeyPtr> p256_key() {
  ossl::EvpPkeyPtr key(EVP_EC_gen("P-256"));
  if (!key) return fail(ossl::error("EVP_EC_gen"));
  return key;
}

Result<std::string> pem_of(X509* cert) {
  ossl::BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_X509(bio.get(), cert) != 1) return fail(ossl::error("PEM_write_bio_X509"));
  char* data = nullptr;
  long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

Result<std::string> pem_of(EVP_PKEY* key) {
  ossl::BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr, nullptr) != 1) {
    return fail(ossl::error("PEM_write_bio_PrivateKey"));
  }
  char* data = nullptr;
  long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

Status add_ext(X509* cert, X509* issuer, int nid, const std::string& value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  ossl::X509ExtPtr ext(X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str()));
  if (!ext || X509_add_ext(cert, ext.get(), -1) != 1) {
    return fail(ossl::error("X509V3_EXT_conf_nid " + std::string(OBJ_nid2sn(nid))));
  }
  return {};
}

bool is_ip_literal(const std::string& s) {
  unsigned char buf[16];
  return inet_pton(AF_INET, s.c_str(), buf) == 1 || inet_pton(AF_INET6, s.c_str(), buf) == 1;
}

// new_cert fills in serial, validity (an hour back, a week ahead) and subject CN.
Result<ossl::X509Ptr> new_cert(const std::string& cn, EVP_PKEY* key) {
  ossl::X509Ptr cert(X509_new());
  if (!cert) return fail(ossl::error("X509_new"));
  X509_set_version(cert.get(), X509_VERSION_3);
  unsigned char serial[16];
  if (RAND_bytes(serial, sizeof serial) != 1) return fail(ossl::error("RAND_bytes"));
  serial[0] &= 0x7f;  // positive
  ossl::BignumPtr bn(BN_bin2bn(serial, sizeof serial, nullptr));
  if (!bn || BN_to_ASN1_INTEGER(bn.get(), X509_get_serialNumber(cert.get())) == nullptr) {
    return fail(ossl::error("serial"));
  }
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), -3600);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), 7L * 24 * 3600);
  X509_NAME* name = X509_get_subject_name(cert.get());
  if (X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                                 reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0) != 1) {
    return fail(ossl::error("X509_NAME_add_entry_by_txt"));
  }
  if (X509_set_pubkey(cert.get(), key) != 1) return fail(ossl::error("X509_set_pubkey"));
  return cert;
}

Result<ossl::X509Ptr> parse_cert(const std::string& pem) {
  ossl::BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  ossl::X509Ptr cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (!cert) return fail(ossl::error("PEM_read_bio_X509"));
  return cert;
}

Result<ossl::EvpPkeyPtr> parse_key(const std::string& pem) {
  ossl::BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  ossl::EvpPkeyPtr key(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  if (!key) return fail(ossl::error("PEM_read_bio_PrivateKey"));
  return key;
}

}  // namespace

Result<PemPair> make_test_ca(const std::string& common_name) {
  auto key = p256_key();
  if (!key) return fail(key.error());
  auto cert = new_cert(common_name, key->get());
  if (!cert) return fail(cert.error());
  X509* c = cert->get();
  if (X509_set_issuer_name(c, X509_get_subject_name(c)) != 1) return fail(ossl::error("issuer"));
  for (auto [nid, value] : {std::pair{NID_basic_constraints, "critical,CA:TRUE"},
                            std::pair{NID_key_usage, "critical,keyCertSign,cRLSign,digitalSignature"},
                            std::pair{NID_subject_key_identifier, "hash"}}) {
    if (auto s = add_ext(c, c, nid, value); !s) return fail(s.error());
  }
  if (X509_sign(c, key->get(), EVP_sha256()) <= 0) return fail(ossl::error("X509_sign"));
  auto cert_pem = pem_of(c);
  auto key_pem = pem_of(key->get());
  if (!cert_pem) return fail(cert_pem.error());
  if (!key_pem) return fail(key_pem.error());
  return PemPair{*cert_pem, *key_pem};
}

Result<PemPair> make_test_leaf(const std::vector<std::string>& names, const PemPair& ca,
                               std::chrono::seconds not_after_from_now) {
  if (names.empty()) return fail(Errc::invalid_input, "make_test_leaf: no names");
  auto key = p256_key();
  if (!key) return fail(key.error());
  auto cert = new_cert(names.front(), key->get());
  if (!cert) return fail(cert.error());
  X509* c = cert->get();
  const long after = static_cast<long>(not_after_from_now.count());
  X509_gmtime_adj(X509_getm_notAfter(c), after);
  if (after < 0) X509_gmtime_adj(X509_getm_notBefore(c), after - 24L * 3600);

  ossl::X509Ptr ca_cert;
  ossl::EvpPkeyPtr ca_key;
  if (!ca.cert_pem.empty()) {
    auto pc = parse_cert(ca.cert_pem);
    if (!pc) return fail(pc.error());
    auto pk = parse_key(ca.key_pem);
    if (!pk) return fail(pk.error());
    ca_cert = std::move(*pc);
    ca_key = std::move(*pk);
  }
  X509* issuer = ca_cert ? ca_cert.get() : c;
  EVP_PKEY* signer = ca_key ? ca_key.get() : key->get();
  if (X509_set_issuer_name(c, X509_get_subject_name(issuer)) != 1) return fail(ossl::error("issuer"));

  std::string san;
  for (const auto& n : names) {
    if (!san.empty()) san += ",";
    san += (is_ip_literal(n) ? "IP:" : "DNS:") + n;
  }
  std::vector<std::pair<int, std::string>> exts = {
      {NID_basic_constraints, "critical,CA:FALSE"},
      {NID_key_usage, "critical,digitalSignature"},
      {NID_ext_key_usage, "serverAuth"},
      {NID_subject_alt_name, san},
      {NID_subject_key_identifier, "hash"},
  };
  if (ca_cert) exts.emplace_back(NID_authority_key_identifier, "keyid:always");
  for (const auto& [nid, value] : exts) {
    if (auto s = add_ext(c, issuer, nid, value); !s) return fail(s.error());
  }
  if (X509_sign(c, signer, EVP_sha256()) <= 0) return fail(ossl::error("X509_sign"));
  auto cert_pem = pem_of(c);
  auto key_pem = pem_of(key->get());
  if (!cert_pem) return fail(cert_pem.error());
  if (!key_pem) return fail(key_pem.error());
  return PemPair{*cert_pem, *key_pem};
}

// ---- PebbleEnv -----------------------------------------------------------------------------

bool PebbleEnv::available() {
  return find_on_path("pebble").has_value() && find_on_path("pebble-challtestsrv").has_value();
}

bool PebbleEnv::required_by_ci() {
  const char* ci = std::getenv("CI");
  if (ci == nullptr) return false;
  std::string v(ci);
  for (auto& c : v) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return v == "true" || v == "1" || v == "yes";
}

Result<std::unique_ptr<PebbleEnv>> PebbleEnv::start(const PebbleOptions& options) {
  if (!available()) return fail(Errc::io, "PebbleEnv: pebble / pebble-challtestsrv not on PATH");
  Error last;
  // A port picked by the probe can be taken by another process before Pebble binds it; the
  // children then exit at once and a fresh set of ports is tried.
  for (int attempt = 0; attempt < 3; ++attempt) {
    std::unique_ptr<PebbleEnv> env(new PebbleEnv());
    auto s = env->launch(options);
    if (s) s = env->wait_ready(options);
    if (s) return env;
    last = s.error();
    bool port_clash = last.message.find("address already in use") != std::string::npos;
    if (!port_clash) break;
  }
  return fail(last);
}

Status PebbleEnv::launch(const PebbleOptions& options) {
  auto base = std::filesystem::temp_directory_path() / "autotls-pebble-XXXXXX";
  std::string tmpl = base.string();
  if (::mkdtemp(tmpl.data()) == nullptr) {
    return fail(Errc::io, "PebbleEnv: mkdtemp " + tmpl + ": " + std::strerror(errno));
  }
  dir_ = tmpl;

  auto ports = pick_ports(6);
  if (!ports) return fail(ports.error());
  listen_port_ = (*ports)[0];
  management_port_ = (*ports)[1];
  dns_port_ = (*ports)[2];
  challtestsrv_port_ = (*ports)[3];
  http_port_ = (*ports)[4];
  tls_port_ = (*ports)[5];

  auto ca = make_test_ca("autotls test CA for Pebble's listener");
  if (!ca) return fail(ca.error().with_context("PebbleEnv"));
  auto leaf = make_test_leaf({"localhost", "127.0.0.1", "::1"}, *ca);
  if (!leaf) return fail(leaf.error().with_context("PebbleEnv"));
  for (auto [name, data] : {std::pair{"ca.pem", &ca->cert_pem}, std::pair{"cert.pem", &leaf->cert_pem},
                            std::pair{"key.pem", &leaf->key_pem}}) {
    if (auto s = write_file(dir_ / name, *data); !s) return s;
  }

  nlohmann::json pebble = {
      {"listenAddress", "127.0.0.1:" + std::to_string(listen_port_)},
      {"managementListenAddress", "127.0.0.1:" + std::to_string(management_port_)},
      {"certificate", (dir_ / "cert.pem").string()},
      {"privateKey", (dir_ / "key.pem").string()},
      {"httpPort", http_port_},
      {"tlsPort", tls_port_},
      {"ocspResponderURL", ""},
      {"externalAccountBindingRequired", options.eab_required},
      {"externalAccountMACKeys", nlohmann::json::object()},
  };
  for (const auto& [kid, key] : options.eab_mac_keys) pebble["externalAccountMACKeys"][kid] = key;
  if (options.certificate_validity_seconds) {
    pebble["certificateValidityPeriod"] = *options.certificate_validity_seconds;
  }
  auto config = dir_ / "pebble-config.json";
  if (auto s = write_file(config, nlohmann::json{{"pebble", pebble}}.dump(2)); !s) return s;

  acme::CurlOptions co;
  co.ca_bundle = ca_bundle_path();
  co.connect_timeout = std::chrono::milliseconds(1000);
  co.total_timeout = std::chrono::milliseconds(5000);
  https_ = acme::make_curl_transport(co);
  co.ca_bundle.clear();
  http_ = acme::make_curl_transport(co);

  auto srv = spawn({"pebble-challtestsrv", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
                    "-dns01", "127.0.0.1:" + std::to_string(dns_port_), "-management",
                    "127.0.0.1:" + std::to_string(challtestsrv_port_), "-http01", "", "-https01",
                    "", "-tlsalpn01", ""},
                   dir_ / "challtestsrv.log", {});
  if (!srv) return fail(srv.error());
  challtestsrv_pid_ = *srv;

  std::vector<std::string> env = {"PEBBLE_VA_NOSLEEP=1"};
  if (options.nonce_reject_percent) {
    env.push_back("PEBBLE_WFE_NONCEREJECT=" + std::to_string(*options.nonce_reject_percent));
  }
  if (options.authz_reuse_percent) {
    env.push_back("PEBBLE_AUTHZREUSE=" + std::to_string(*options.authz_reuse_percent));
  }
  if (options.chain_length) env.push_back("PEBBLE_CHAIN_LENGTH=" + std::to_string(*options.chain_length));
  if (options.alternate_roots) {
    env.push_back("PEBBLE_ALTERNATE_ROOTS=" + std::to_string(*options.alternate_roots));
  }
  if (options.va_always_valid) env.push_back("PEBBLE_VA_ALWAYS_VALID=1");
  std::string resolver =
      options.dns_server.empty() ? "127.0.0.1:" + std::to_string(dns_port_) : options.dns_server;
  auto peb = spawn({"pebble", "-config", config.string(), "-dnsserver", resolver},
                   dir_ / "pebble.log", env);
  if (!peb) return fail(peb.error());
  pebble_pid_ = *peb;
  return {};
}

Status PebbleEnv::wait_ready(const PebbleOptions& options) {
  auto deadline = Clock::now() + options.ready_timeout;
  bool pebble_ready = false;
  bool challtestsrv_ready = false;
  std::string last_error;
  while (Clock::now() < deadline) {
    if (!alive(pebble_pid_) || !alive(challtestsrv_pid_)) {
      std::string logs = log_tail();
      std::string lower;
      for (char c : logs) lower += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      std::string clash = lower.find("address already in use") != std::string::npos
                              ? " (address already in use)"
                              : "";
      return fail(Errc::io, "PebbleEnv: " + std::string(pebble_pid_ <= 0 ? "pebble" : "pebble-challtestsrv") +
                                " exited during startup" + clash + "\n" + logs);
    }
    if (!challtestsrv_ready) {
      // Any HTTP answer means the management listener is up; it starts with the DNS server.
      auto r = http_->send({"GET", challtestsrv_management_url() + "/", {}, {}});
      if (r) challtestsrv_ready = true;
      else last_error = r.error().message;
    }
    if (!pebble_ready) {
      auto r = https_->send({"GET", directory_url(), {}, {}});
      if (r && r->status == 200) pebble_ready = true;
      else last_error = r ? "HTTP " + std::to_string(r->status) : r.error().message;
    }
    if (pebble_ready && challtestsrv_ready) return {};
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return fail(Errc::timeout, "PebbleEnv: not ready after " + std::to_string(options.ready_timeout.count()) +
                                 " ms: " + last_error + "\n" + log_tail());
}

PebbleEnv::~PebbleEnv() { stop(); }

void PebbleEnv::stop() {
  https_.reset();
  http_.reset();
  terminate(pebble_pid_);
  terminate(challtestsrv_pid_);
  if (!dir_.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
}

bool PebbleEnv::running() const {
  return alive(pebble_pid_) && alive(challtestsrv_pid_);
}

std::string PebbleEnv::directory_url() const {
  return "https://127.0.0.1:" + std::to_string(listen_port_) + "/dir";
}
std::string PebbleEnv::ca_bundle_path() const { return (dir_ / "ca.pem").string(); }
std::string PebbleEnv::management_url() const {
  return "https://127.0.0.1:" + std::to_string(management_port_);
}
std::string PebbleEnv::challtestsrv_management_url() const {
  return "http://127.0.0.1:" + std::to_string(challtestsrv_port_);
}

acme::CurlOptions PebbleEnv::curl_options() const {
  acme::CurlOptions co;
  co.ca_bundle = ca_bundle_path();
  co.connect_timeout = std::chrono::milliseconds(2000);
  co.total_timeout = std::chrono::milliseconds(20000);
  return co;
}

Result<std::string> PebbleEnv::get(const std::string& url) const {
  auto r = https_->send({"GET", url, {}, {}});
  if (!r) return fail(r.error());
  if (r->status != 200) return fail(Errc::protocol, "GET " + url + ": HTTP " + std::to_string(r->status));
  return r->body;
}

Result<std::string> PebbleEnv::pebble_root_pem() const { return get(management_url() + "/roots/0"); }
Result<std::string> PebbleEnv::pebble_intermediate_pem() const {
  return get(management_url() + "/intermediates/0");
}
Result<std::string> PebbleEnv::pebble_roots_pem() const {
  auto root = pebble_root_pem();
  if (!root) return root;
  auto inter = pebble_intermediate_pem();
  if (!inter) return inter;
  std::string out = *root;
  if (!out.empty() && out.back() != '\n') out += '\n';
  return out + *inter;
}

Status PebbleEnv::post_challtestsrv(const std::string& path, const std::string& json_body) {
  std::string url = challtestsrv_management_url() + path;
  auto r = http_->send({"POST", url, {{"Content-Type", "application/json"}}, json_body});
  if (!r) return fail(r.error());
  if (r->status != 200) {
    return fail(Errc::protocol, "POST " + url + ": HTTP " + std::to_string(r->status) + ": " + r->body);
  }
  return {};
}

Status PebbleEnv::set_txt(const std::string& host, const std::string& value) {
  return post_challtestsrv("/set-txt", nlohmann::json{{"host", fqdn(host)}, {"value", value}}.dump());
}
Status PebbleEnv::clear_txt(const std::string& host) {
  return post_challtestsrv("/clear-txt", nlohmann::json{{"host", fqdn(host)}}.dump());
}
Status PebbleEnv::add_a(const std::string& host, const std::vector<std::string>& addresses) {
  return post_challtestsrv("/add-a", nlohmann::json{{"host", fqdn(host)}, {"addresses", addresses}}.dump());
}
Status PebbleEnv::clear_a(const std::string& host) {
  return post_challtestsrv("/clear-a", nlohmann::json{{"host", fqdn(host)}}.dump());
}

std::string PebbleEnv::log_tail(size_t max_bytes) const {
  return "--- pebble.log ---\n" + read_tail(dir_ / "pebble.log", max_bytes) +
         "--- challtestsrv.log ---\n" + read_tail(dir_ / "challtestsrv.log", max_bytes);
}

// ---- BindEnv ---------------------------------------------------------------------------------

namespace {
std::optional<std::string> named_path() {
  if (auto p = find_on_path("named")) return p;
  if (::access("/usr/sbin/named", X_OK) == 0) return std::string("/usr/sbin/named");
  return std::nullopt;
}
}  // namespace

bool BindEnv::available() { return named_path().has_value(); }

Result<std::unique_ptr<BindEnv>> BindEnv::start(const std::string& zone, const std::string& key_name) {
  auto named = named_path();
  if (!named) return fail(Errc::io, "BindEnv: named not found (install Debian package bind9: tools/setup)");
  std::unique_ptr<BindEnv> b(new BindEnv());
  std::string tmpl = (std::filesystem::temp_directory_path() / "autotls-bind-XXXXXX").string();
  if (::mkdtemp(tmpl.data()) == nullptr) return fail(Errc::io, "BindEnv: mkdtemp: " + std::string(std::strerror(errno)));
  b->dir_ = tmpl;
  b->key_name_ = key_name;
  unsigned char secret[32];
  if (RAND_bytes(secret, sizeof secret) != 1) return fail(Errc::crypto, "BindEnv: RAND_bytes failed");
  b->secret_b64_ = base64_encode(std::string_view(reinterpret_cast<char*>(secret), sizeof secret));
  std::string key_stmt = "key \"" + key_name + "\" {\n\talgorithm hmac-sha256;\n\tsecret \"" + b->secret_b64_ + "\";\n};\n";
  if (auto st = write_file(b->key_file(), key_stmt); !st) return fail(st.error());
  std::string d = b->dir_.string();
  if (auto st = write_file(b->dir_ / "zone.db", "$TTL 60\n@ IN SOA ns." + zone + ". admin." + zone +
                                                   ". 1 60 60 600 60\n@ IN NS ns." + zone + ".\nns IN A 127.0.0.1\n");
      !st) {
    return fail(st.error());
  }
  for (int attempt = 0; attempt < 3; ++attempt) {
    auto ports = pick_ports(1);
    if (!ports) return fail(ports.error());
    b->port_ = (*ports)[0];
    std::string conf = "options {\n  directory \"" + d + "\";\n  listen-on port " + std::to_string(b->port_) +
                       " { 127.0.0.1; };\n  listen-on-v6 { none; };\n  pid-file \"" + d + "/named.pid\";\n"
                       "  session-keyfile \"" + d + "/session.key\";\n  managed-keys-directory \"" + d + "\";\n"
                       "  recursion no;\n  dnssec-validation no;\n  notify no;\n};\ncontrols { };\n" + key_stmt +
                       "zone \"" + zone + "\" {\n  type primary;\n  file \"" + d + "/zone.db\";\n"
                       "  update-policy { grant " + key_name + " zonesub TXT; };\n};\n";
    if (auto st = write_file(b->dir_ / "named.conf", conf); !st) return fail(st.error());
    auto log = b->dir_ / "named.log";
    std::error_code ec;
    std::filesystem::remove(log, ec);
    auto pid = spawn({*named, "-g", "-c", (b->dir_ / "named.conf").string(), "-p", std::to_string(b->port_)}, log, {});
    if (!pid) return fail(pid.error());
    b->pid_ = *pid;
    auto deadline = Clock::now() + std::chrono::seconds(15);
    while (Clock::now() < deadline && alive(b->pid_)) {
      if (read_tail(log, 100000).find("\nrunning") != std::string::npos ||
          read_tail(log, 100000).find(" running\n") != std::string::npos) {
        return b;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    bool port_taken = read_tail(log, 100000).find("address in use") != std::string::npos;
    terminate(b->pid_);
    if (!port_taken) return fail(Errc::timeout, "BindEnv: named did not start:\n" + b->log_tail());
  }
  return fail(Errc::io, "BindEnv: named could not bind a port:\n" + b->log_tail());
}

BindEnv::~BindEnv() {
  terminate(pid_);
  if (!dir_.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
}

std::string BindEnv::log_tail(size_t max_bytes) const {
  return "--- named.log ---\n" + read_tail(dir_ / "named.log", max_bytes);
}

}  // namespace autotls::testing
