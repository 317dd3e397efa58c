#pragma once

// The `autotls` command line: options shared by every subcommand, exit codes, output, and the
// helpers the subcommands share. Only tools/ reads argv, config files and the environment.

#include <chrono>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "acme/client.h"
#include "acme/key.h"
#include "acme/util/error.h"
#include "acme/util/logger.h"
#include "tlsreload/challenges.h"
#include "tlsreload/manager.h"
#include "tlsreload/storage.h"

namespace autotls::cli {

// Exit codes (docs/cli.md). Never 0 on a failure.
inline constexpr int kExitOk = 0;
inline constexpr int kExitNothingToDo = 1;
inline constexpr int kExitUsage = 2;
inline constexpr int kExitCaRefused = 3;
inline constexpr int kExitNetwork = 4;
inline constexpr int kExitValidation = 5;
inline constexpr int kExitLocal = 6;

// Options holds every flag of every subcommand; CLI11 and the JSON config file both write it.
struct Options {
  // Common.
  std::string ca = "letsencrypt";
  std::string ca_bundle;
  std::string storage;
  std::string storage_sync = "filesystem";  // filesystem | per-file (tlsreload::FileStorage::Sync)
  std::string config;
  std::string email;
  bool agree_tos = false;
  std::string eab_kid;
  std::string eab_hmac;
  std::string eab_hmac_file;
  bool json = false;
  bool quiet = false;
  bool verbose = false;
  std::string deploy_hook;
  std::string event_hook;  // run for every certificate event (obtained, renewed, failed, expiring, revoked)

  // issue / serve / renew: what to order and how to prove control.
  std::vector<std::string> domains;
  std::vector<std::string> ips;
  std::string challenge = "http-01";
  std::vector<std::string> http_addresses;   // issue: standalone; serve: http listeners
  std::vector<std::string> https_addresses;  // serve: https listeners
  std::string tls_address;                   // issue: standalone tls-alpn-01
  std::string webroot;
  std::string out_dir;  // issue/renew --out: copies of the certificate files (absolute once parsed)
  std::string dns_hook;
  std::string dns_server;  // dns-01 by RFC 2136: HOST[:PORT] of the primary server
  std::string tsig_key;    // NAME:ALGORITHM:BASE64 or a BIND key file (also AUTOTLS_TSIG_KEY)
  std::string dns_zone;    // zone to update (default: found with an SOA query)
  std::string key_type = "ec256";
  std::string profile;
  std::string preferred_chain;
  bool force = false;

  // renew.
  std::vector<std::string> renew_names;
  bool all = false;
  bool no_random_sleep = false;
  int max_random_sleep = 480;

  // revoke.
  std::string revoke_name;
  std::string cert_file;
  std::string reason;
  std::string key_file;
  bool delete_after_revoke = false;  // revoke NAME: then delete it from storage (as `delete`)

  // delete.
  std::string delete_name;
  bool yes = false;  // delete: do not ask, even on a terminal

  // account.
  std::string new_key_type = "ec256";

  // serve.
  std::string root;
  std::string proxy;
  std::string redirect;     // serve: redirect every other name (server::RedirectSite::to)
  int redirect_code = 302;  // serve: its status
  double drain = 15;
  std::string admin_address = "127.0.0.1:2019";  // serve: admin listener, "off" for none
  bool no_redirect = false;
  int hsts = 0;
  std::string access_log = "off";  // serve: off, json or combined (stderr)
  std::string access_log_file;     // serve: append access-log lines here (reopened on SIGHUP)
  // serve: auto, json or text. json is --json for serve (event lines, progress, logs and errors
  // as JSON lines); auto picks json when stderr is not a terminal (a service manager, a pipe);
  // --json wins over text. Resolved into `json` by main before any output.
  std::string log_format = "auto";
  // serve: server limits (docs/config.md, "Server limits"); defaults are server::ServerConfig's.
  double handshake_timeout = 10;
  double header_timeout = 10;
  double read_timeout = 30;
  double write_timeout = 30;
  double idle_timeout = 60;
  long long max_connections = 10'000;
  long long max_header_bytes = 16 * 1024;
  long long max_body_bytes = 10 * 1024 * 1024;
  long long keep_alive_max_requests = 1'000;
  int worker_threads = 0;   // 0: max(8, 2 x cores)
  int reactor_threads = 0;  // 0: one per core
  int backlog = 1'024;
  int ticket_rotation = 3'600;       // seconds between session-ticket key rotations
  int ticket_lifetime = 12 * 3'600;  // seconds a session ticket is honoured
  nlohmann::json sites;  // from the config file only: {"host": {"root": DIR} | {"proxy": URL}}
  // serve, issue, renew: issuers tried in order (--issuer, repeatable: a --ca value); "issuers" in the config
  // file gives objects with per-issuer settings (docs/config.md). Empty: --ca alone.
  std::vector<std::string> issuers;
  nlohmann::json issuer_objects;
  // serve: on-demand issuance (docs/config.md).
  bool on_demand = false;
  std::vector<std::string> on_demand_allow;
  std::string on_demand_ask;
  std::string on_demand_rate = "20/1m";
  std::string on_demand_name_rate = "2/1h";
  int on_demand_max_concurrent = 4;
  int on_demand_max_cached = 10'000;
  double on_demand_wait = 10;
  double on_demand_ask_timeout = 3;
  int on_demand_deny_ttl = 600;
  // serve: certificate files served as they are (not issued over ACME), watched and reloaded
  // on change: --cert/--key pairs (repeatable, in order) and certbot-style --cert-dir.
  std::vector<std::string> serve_certs;
  std::vector<std::string> serve_keys;
  std::vector<std::string> cert_dirs;
  // serve: where each --cert-dir's store snapshot is kept ("" : <storage>/snapshots; "off": no
  // snapshot). See docs/config.md.
  std::string cert_dir_snapshots;
};

// Output prints results and progress: human text on stdout (progress on stderr), or with
// --json one JSON object per line on stdout. Thread-safe.
class Output {
 public:
  explicit Output(const Options& o) : json_(o.json), quiet_(o.quiet), verbose_(o.verbose) {}
  bool is_json() const { return json_; }
  bool verbose() const { return verbose_; }
  // info prints a progress line (stderr, not with --quiet or --json).
  void info(const std::string& line);
  // result prints a line of the command's result (stdout, not with --json).
  void result(const std::string& line);
  // object prints one JSON line (only with --json).
  void object(const nlohmann::json& j);
  // error prints an Error for people (stderr), or as {"status":"error",...} with --json.
  void error(const Error& e, int exit_code);
  void error(const std::string& message, int exit_code);

 private:
  std::mutex mu_;
  bool json_, quiet_, verbose_;
};

// printed_anything tells whether an Output or a CliLogger has printed a line in this process
// image yet (serve re-executes itself only before that: serve_files.h, reexec_for_huge_pages).
bool printed_anything();

// CliLogger shows library logs on stderr: with --verbose from debug up, otherwise nothing.
class CliLogger : public Logger {
 public:
  CliLogger(bool verbose, bool json) : verbose_(verbose), json_(json) {}
  bool enabled(LogLevel level) const override;
  void log(LogLevel level, std::string_view subsystem, std::string_view message,
           std::initializer_list<LogField> fields) override;

 private:
  std::mutex mu_;
  bool verbose_, json_;
};

// directory_url_for maps --ca (a short name or a URL) to a directory URL; nullopt if unknown.
std::optional<std::string> directory_url_for(const std::string& ca);
// default_storage is /var/lib/autotls for root, else $XDG_DATA_HOME/autotls or
// ~/.local/share/autotls.
std::string default_storage();
// exit_code_for classifies an Error into the documented exit codes.
int exit_code_for(const Error& e);
// describe_error renders an Error with its problem document, subproblems and retry time.
std::string describe_error(const Error& e);
nlohmann::json error_json(const Error& e);
// eab_from resolves --eab-kid with --eab-hmac, AUTOTLS_EAB_HMAC or --eab-hmac-file.
Result<std::optional<acme::ExternalAccountBinding>> eab_from(const Options& o);

// tsig_key_text is --tsig-key, else AUTOTLS_TSIG_KEY (empty when neither is set).
std::string tsig_key_text(const Options& o);
// dns_update_solver builds the RFC 2136 solver from --dns-server/--tsig-key/--dns-zone; null
// when --dns-server is not set. Usage errors (bad server, bad key) never contain the secret.
Result<std::shared_ptr<acme::Solver>> dns_update_solver(const Options& o);

// IdnName is a name as the CA sees it (ASCII; punycode for Unicode labels) and as people
// write it (Unicode; the same as ascii for plain names).
struct IdnName {
  std::string ascii, unicode;
};
// idn_name converts a DNS name given in Unicode (UTF-8) to punycode with libidn2 (IDNA2008,
// TR46 non-transitional, NFC), keeping a leading "*." and dropping a trailing dot; an ASCII
// name is lower-cased and its xn-- labels are decoded for display. IP addresses pass through.
// Errc::invalid_input naming the name and libidn2's reason for an invalid IDN.
Result<IdnName> idn_name(const std::string& name);
// normalized lower-cases names, drops trailing dots and duplicates, and converts Unicode names
// to punycode (idn_name); an invalid internationalized name is an error.
Result<std::vector<std::string>> normalized(const std::vector<std::string>& in);
// requested_names is -d and --ip as issue and serve take them: each --ip an address, every name
// normalized, each one a certificate can hold. Errors start with command ("serve: ...") except
// --ip's, which name the flag.
Result<std::vector<std::string>> requested_names(const Options& o, const std::string& command);
// wildcard_challenge_error says why names cannot be issued when one is a wildcard
// ("*.example.com") and an ACME CA would be asked to validate it with a challenge other than
// dns-01: CAs offer only dns-01 for a wildcard (RFC 8555 §7.1.3; Let's Encrypt, Pebble), so the
// order could never be fulfilled. Empty when they can (dns-01, or every issuer internal).
std::string wildcard_challenge_error(const Options& o, const std::vector<std::string>& names, const std::string& command);
// show_name is "ascii (unicode)" when they differ, else ascii.
std::string show_name(const std::string& ascii);
// unicode_names is the Unicode form of each name (as idn_name; the name itself when not an IDN),
// for the "unicode_names" of JSON results beside the punycode "names".
nlohmann::json unicode_names(const std::vector<std::string>& names);

// Paths of one stored certificate (docs/storage.md).
struct LivePaths {
  std::filesystem::path dir, cert, chain, fullchain, key, meta;
};
LivePaths live_paths(const std::string& storage_root, const std::string& storage_name);

// run_deploy_hook runs `/bin/sh -c hook` with AUTOTLS_NAMES, AUTOTLS_CERT_PATH,
// AUTOTLS_KEY_PATH, AUTOTLS_FULLCHAIN_PATH (and AUTOTLS_CHAIN_PATH) set, AUTOTLS_EVENT
// ("obtained" or "renewed") when event is given and AUTOTLS_ERROR when error is, and waits for
// it. Names and paths reach the hook only through the environment, never in the command
// string. The hook's stdout is our stderr (stdout is for results). label names the hook in
// errors ("deploy hook", "event hook").
Status run_deploy_hook(const std::string& hook, const std::vector<std::string>& names,
                       const LivePaths& paths, const std::string& event = "", const std::string& error = "",
                       const std::string& label = "deploy hook");

// run_event_hook runs the --event-hook command for one certificate event (obtained, renewed,
// failed, expiring, revoked): run_deploy_hook with AUTOTLS_EVENT, and AUTOTLS_ERROR for
// failures.
Status run_event_hook(const std::string& hook, const std::string& event, const std::vector<std::string>& names,
                      const LivePaths& paths, const std::string& error = "");

// CertInfo is what `list` and `renew` know about a stored certificate without contacting a CA.
struct CertInfo {
  std::string key;  // storage name
  std::vector<std::string> names;
  std::string directory_url, issuer, key_type, serial;
  std::chrono::system_clock::time_point not_before{}, not_after{};
  std::chrono::system_clock::time_point renewal_time{};
  std::string renewal_reason;  // why renewal_time
  bool due = false;
  int failures = 0;
  std::string last_error;
  std::optional<std::chrono::system_clock::time_point> next_attempt;
  bool has_cert = false;
  std::string problem;  // e.g. "no fullchain.pem"
  nlohmann::json renewal;  // the CLI's renewal.json (settings used at issue time)
};
// stored_certificates lists every live/<name>/ in storage.
Result<std::vector<CertInfo>> stored_certificates(tlsreload::Storage& storage);
Result<std::optional<CertInfo>> stored_certificate(tlsreload::Storage& storage, const std::string& key);
nlohmann::json cert_info_json(const CertInfo& c, const std::string& storage_root);

// WebrootSolver writes http-01 key authorizations to
// <root>/.well-known/acme-challenge/<token> for an existing web server to serve.
class WebrootSolver : public acme::Solver {
 public:
  explicit WebrootSolver(std::filesystem::path root) : root_(std::move(root)) {}
  Status present(const acme::Identifier& identifier, const acme::Challenge& challenge,
                 std::string_view key_authorization) override;
  void cleanup(const acme::Identifier& identifier, const acme::Challenge& challenge,
               std::string_view key_authorization) override;

 private:
  std::filesystem::path root_;
};

// Responder is a standalone http-01 or tls-alpn-01 listener answering from a ChallengeStore.
class Responder {
 public:
  virtual ~Responder() = default;
};
// start_responder binds address ("HOST:PORT") for challenge_type and serves challenges. A port
// in use is an Errc::io naming --webroot / --http-address (or --tls-address).
Result<std::unique_ptr<Responder>> start_responder(const std::string& challenge_type,
                                                   const std::string& address,
                                                   std::shared_ptr<tlsreload::ChallengeStore> challenges,
                                                   Logger* logger);

// parse_host_port reads "HOST:PORT", "[V6]:PORT" or ":PORT" (host 0.0.0.0).
Result<std::pair<std::string, int>> parse_host_port(const std::string& text);

// Context is what every command receives.
struct Context {
  Options& options;
  Output& out;
  CliLogger& logger;
  std::string directory_url;  // resolved --ca
  bool ca_given = false;      // --ca given on the command line or in the config
  std::string storage_root;
  std::shared_ptr<tlsreload::FileStorage> storage;
  // given reports whether an option (long name without dashes) was set by flag or config.
  std::function<bool(const std::string&)> given;
  // reparse reads the same command line and config file again into fresh Options (serve's
  // SIGHUP); empty in tests that build a Context by hand.
  std::function<Result<Options>()> reparse;
  // lingering holds what a command started and leaves running until the process ends (issue:
  // the http-01 responder and the manager with its prefetch thread, see cmd_issue.cpp), so that
  // stopping and joining them is not on the way to the exit. Destroyed with the Context when
  // main returns normally (sanitizer builds); never when the command ends with _Exit.
  std::shared_ptr<void> lingering;
};

// manager_options builds ManagerOptions for the CA in directory_url from the options, and
// its issuer list from --issuer / "issuers" when given (serve, issue, renew).
Result<tlsreload::ManagerOptions> manager_options(Context& ctx, const std::string& directory_url);
// The same from options o instead of ctx.options (renew: the settings saved at issue time).
Result<tlsreload::ManagerOptions> manager_options(Context& ctx, const Options& o, const std::string& directory_url);
// issuer_list reads --issuer and the config file's "issuers" (empty when neither is given).
Result<std::vector<tlsreload::IssuerConfig>> issuer_list(const Options& o);
// make_client connects to the CA at directory_url with the configured CA bundle and logger;
// no_retries: a transport failure or 5xx is not retried (a quick probe).
Result<std::unique_ptr<acme::Client>> make_client(Context& ctx, const std::string& directory_url, bool no_retries = false);

// check_terms fails with a usage error when the CA has terms of service, no account is stored
// yet and --agree-tos was not given. probe: the directory is asked once, without retries.
Status check_terms(Context& ctx, const std::string& directory_url, bool probe = false);
// check_issuer_terms is check_terms for an issuer list (issue, renew, serve): each ACME issuer's
// terms must be agreed to, but a CA that cannot be reached now does not stop the command
// (issuance falls back past it). An empty list checks ctx.directory_url alone.
Status check_issuer_terms(Context& ctx, const std::vector<tlsreload::IssuerConfig>& issuers);

int cmd_issue(Context& ctx);
int cmd_renew(Context& ctx);
int cmd_revoke(Context& ctx);
int cmd_delete(Context& ctx);
int cmd_list(Context& ctx);
int cmd_account(Context& ctx, const std::string& action);
int cmd_serve(Context& ctx);

// Return from a command with an error printed.
int report(Context& ctx, const Error& e);
int usage_error(Context& ctx, const std::string& message);

}  // namespace autotls::cli
