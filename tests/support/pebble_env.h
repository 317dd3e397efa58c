#pragma once

// PebbleEnv: a private Pebble ACME CA plus pebble-challtestsrv (mock DNS) for one test, on
// loopback ports nobody else uses. Test-only code; see STYLE.md §8 and docs in PEBBLE.md.

#include <sys/types.h>

#include <chrono>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "acme/transport.h"
#include "acme/util/error.h"

namespace autotls::testing {

// PebbleOptions configures one Pebble launch. Unset optionals leave Pebble's defaults.
struct PebbleOptions {
  // externalAccountBindingRequired and externalAccountMACKeys (kid -> base64url HMAC key).
  bool eab_required = false;
  std::map<std::string, std::string> eab_mac_keys;
  // certificateValidityPeriod in seconds; short values make renewal tests possible.
  std::optional<long> certificate_validity_seconds;
  // PEBBLE_WFE_NONCEREJECT: percent of good nonces rejected as badNonce (Pebble's default 5).
  std::optional<int> nonce_reject_percent;
  // PEBBLE_AUTHZREUSE: percent of authorizations reused (Pebble's default 50). Pebble makes a new
  // authorization when rand.Intn(100) > percent, so 0 still reuses a valid one 1 time in 100.
  std::optional<int> authz_reuse_percent;
  // PEBBLE_CHAIN_LENGTH: certificates in the issued chain including the root.
  std::optional<int> chain_length;
  // PEBBLE_ALTERNATE_ROOTS: extra chains offered via Link rel="alternate".
  std::optional<int> alternate_roots;
  // PEBBLE_VA_ALWAYS_VALID=1: every challenge validates without contacting the client.
  bool va_always_valid = false;
  // dns_server ("127.0.0.1:PORT") replaces challtestsrv as the resolver Pebble validates
  // through (-dnsserver), e.g. a BindEnv; empty: challtestsrv.
  std::string dns_server;
  // How long start() waits for both servers to answer.
  std::chrono::milliseconds ready_timeout{15'000};
};

// PemPair is a certificate (or chain) and its private key, both PEM.
struct PemPair {
  std::string cert_pem;
  std::string key_pem;
};

// PebbleEnv owns a running pebble and pebble-challtestsrv, a temporary directory with their
// config, TLS material and logs, and the ports they listen on (all on 127.0.0.1).
// Every name resolves to 127.0.0.1 through challtestsrv; Pebble validates http-01 on
// http_port() and tls-alpn-01 on tls_port(), where the test runs its own responders.
// The destructor stops both processes (SIGTERM, then SIGKILL after 3 s), reaps them and
// removes the directory. Children also die with the test process (setpriv --pdeathsig).
// Methods are safe to call from several threads once start() has returned.
class PebbleEnv {
 public:
  // start finds free ports, writes the config and a throw-away CA for Pebble's own HTTPS
  // listener, launches both programs and waits until they answer. Errc::io when a program
  // cannot be launched, Errc::timeout when it does not answer in time; the message then ends
  // with the tail of the logs. A port taken by someone else in between is retried.
  static Result<std::unique_ptr<PebbleEnv>> start(const PebbleOptions& options = {});

  // available reports whether both `pebble` and `pebble-challtestsrv` are on PATH.
  static bool available();
  // required_by_ci reports whether a missing Pebble must fail rather than skip (CI=true or 1).
  static bool required_by_ci();

  ~PebbleEnv();
  PebbleEnv(const PebbleEnv&) = delete;
  PebbleEnv& operator=(const PebbleEnv&) = delete;

  // directory_url is "https://127.0.0.1:PORT/dir".
  std::string directory_url() const;
  // ca_bundle_path is a PEM file with the CA that signed Pebble's listener certificate; pass it
  // as CurlOptions::ca_bundle. It does NOT verify issued certificates: see pebble_root_pem().
  std::string ca_bundle_path() const;
  // curl_options returns CurlOptions that trust ca_bundle_path(), with short test timeouts.
  acme::CurlOptions curl_options() const;
  // http_port / tls_port are where Pebble validates http-01 and tls-alpn-01 (127.0.0.1).
  int http_port() const { return http_port_; }
  int tls_port() const { return tls_port_; }
  int listen_port() const { return listen_port_; }
  int management_port() const { return management_port_; }
  int dns_port() const { return dns_port_; }
  // management_url is Pebble's management listener, "https://127.0.0.1:PORT".
  std::string management_url() const;
  // challtestsrv_management_url is "http://127.0.0.1:PORT" (plain HTTP).
  std::string challtestsrv_management_url() const;
  const std::filesystem::path& dir() const { return dir_; }

  // set_txt publishes a TXT record; host is a full name such as "_acme-challenge.example.test"
  // (a trailing dot is added when missing). clear_txt removes every TXT record of host.
  Status set_txt(const std::string& host, const std::string& value);
  Status clear_txt(const std::string& host);
  // add_a makes host resolve to the given IPv4 addresses instead of the default 127.0.0.1.
  Status add_a(const std::string& host, const std::vector<std::string>& addresses);
  Status clear_a(const std::string& host);

  // pebble_root_pem is GET /roots/0 from the management listener: the root of issued chains,
  // new at every launch. pebble_intermediate_pem is GET /intermediates/0.
  // pebble_roots_pem is both, root first.
  Result<std::string> pebble_root_pem() const;
  Result<std::string> pebble_intermediate_pem() const;
  Result<std::string> pebble_roots_pem() const;

  // log_tail returns the last max_bytes of each program's log, labelled, for failure messages.
  std::string log_tail(size_t max_bytes = 4000) const;

  // running reports whether both child processes are still alive.
  bool running() const;

 private:
  PebbleEnv() = default;
  Status launch(const PebbleOptions& options);
  Status wait_ready(const PebbleOptions& options);
  Result<std::string> get(const std::string& url) const;
  Status post_challtestsrv(const std::string& path, const std::string& json_body);
  void stop();

  std::filesystem::path dir_;
  int listen_port_ = 0;
  int management_port_ = 0;
  int dns_port_ = 0;
  int challtestsrv_port_ = 0;
  int http_port_ = 0;
  int tls_port_ = 0;
  // mutable: running() reaps a child that exited.
  mutable pid_t pebble_pid_ = -1;
  mutable pid_t challtestsrv_pid_ = -1;
  std::unique_ptr<acme::HttpTransport> https_;  // trusts ca_bundle_path()
  std::unique_ptr<acme::HttpTransport> http_;   // plain HTTP to challtestsrv
};

// BindEnv is a BIND 9 `named` started for one test: its own config, zone files and working
// directory in a temporary directory, listening on 127.0.0.1 (UDP and TCP) on a free high
// port, primary for one zone that accepts TSIG-signed dynamic updates of TXT records
// (update-policy grant KEY zonesub TXT), recursion off. The destructor stops it (SIGTERM,
// SIGKILL after 3 s) and removes the directory; it also dies with the test (pdeathsig).
class BindEnv {
 public:
  // start launches named for zone with a random hmac-sha256 key named key_name, and waits
  // (up to 15 s) until it reports "running".
  static Result<std::unique_ptr<BindEnv>> start(const std::string& zone, const std::string& key_name = "acme-key");
  // available reports whether named is installed (Debian package bind9).
  static bool available();
  ~BindEnv();
  BindEnv(const BindEnv&) = delete;
  BindEnv& operator=(const BindEnv&) = delete;

  int port() const { return port_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  const std::string& key_name() const { return key_name_; }
  // secret_base64 is the key's secret; tsig_key is "name:hmac-sha256:secret".
  const std::string& secret_base64() const { return secret_b64_; }
  std::string tsig_key() const { return key_name_ + ":hmac-sha256:" + secret_b64_; }
  // key_file is the key in BIND's own format (as tsig-keygen writes it).
  std::filesystem::path key_file() const { return dir_ / "acme.key"; }
  const std::filesystem::path& dir() const { return dir_; }
  std::string log_tail(size_t max_bytes = 4000) const;

 private:
  BindEnv() = default;
  std::filesystem::path dir_;
  int port_ = 0;
  pid_t pid_ = -1;
  std::string key_name_, secret_b64_;
};

// make_test_ca creates a self-signed P-256 CA certificate named common_name.
Result<PemPair> make_test_ca(const std::string& common_name);
// make_test_leaf creates a P-256 server certificate for names (DNS names or IP literals),
// signed by ca (as returned by make_test_ca). An empty ca makes it self-signed. It is valid
// from an hour ago until not_after_from_now (a week by default); a negative value makes an
// expired certificate (valid for the day before its notAfter).
Result<PemPair> make_test_leaf(const std::vector<std::string>& names, const PemPair& ca = {},
                               std::chrono::seconds not_after_from_now = std::chrono::hours(7 * 24));

}  // namespace autotls::testing

// AUTOTLS_REQUIRE_PEBBLE() returns from the test case when Pebble is not installed, with a
// loud message; under CI (CI=true) it fails the test instead, because CI must never skip.
// Use it first in a TEST_CASE body (it expands to a `return`, so not inside a SUBCASE helper).
#define AUTOTLS_REQUIRE_PEBBLE()                                                             \
  do {                                                                                       \
    if (!::autotls::testing::PebbleEnv::available()) {                                       \
      if (::autotls::testing::PebbleEnv::required_by_ci()) {                                 \
        FAIL("pebble / pebble-challtestsrv not on PATH and CI=true: install Debian package " \
             "'pebble' (tools/setup)");                                                      \
      }                                                                                      \
      MESSAGE("SKIPPED: pebble / pebble-challtestsrv not on PATH (install Debian package " \
              "'pebble'; under CI=true this fails)");                                        \
      return;                                                                                \
    }                                                                                        \
  } while (false)

// AUTOTLS_START_PEBBLE(var, options) declares `var`, a std::unique_ptr<PebbleEnv>, after
// AUTOTLS_REQUIRE_PEBBLE(); a launch failure fails the test with Pebble's log tail.
#define AUTOTLS_START_PEBBLE(var, ...)                                          \
  AUTOTLS_REQUIRE_PEBBLE();                                                     \
  auto var##_result_ = ::autotls::testing::PebbleEnv::start(__VA_ARGS__);       \
  REQUIRE_MESSAGE(var##_result_.has_value(), var##_result_.error().message);    \
  auto var = std::move(*var##_result_)
