// The command line's definition (CLI11) and the JSON config file applied over it
// (tools/config.h).

#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include <CLI/CLI.hpp>

#include "tools/cli.h"
#include "tools/config.h"

namespace autotls::cli {

using json = nlohmann::json;

constexpr const char* kExitCodes =
    "Exit codes:\n"
    "  0  success\n"
    "  1  nothing to do (certificate still good, nothing due; delete not confirmed)\n"
    "  2  usage or configuration error\n"
    "  3  the CA refused (its problem document is printed; rateLimited prints when to retry)\n"
    "  4  network failure (CA unreachable, timeout)\n"
    "  5  validation failed (the CA could not verify a challenge)\n"
    "  6  local I/O or other failure (storage, ports, hooks)\n";

std::vector<CLI::App*> selected_chain(CLI::App& app) {
  std::vector<CLI::App*> chain{&app};
  CLI::App* cur = &app;
  for (;;) {
    auto subs = cur->get_subcommands();
    if (subs.empty()) break;
    cur = subs.front();
    chain.push_back(cur);
  }
  return chain;
}

CLI::Option* find_option(const std::vector<CLI::App*>& chain, const std::string& long_name) {
  for (auto it = chain.rbegin(); it != chain.rend(); ++it) {
    for (CLI::Option* opt : (*it)->get_options()) {
      for (const auto& l : opt->get_lnames()) {
        if (l == long_name) return opt;
      }
    }
  }
  return nullptr;
}

static void collect_long_names(CLI::App* app, std::set<std::string>& out) {
  for (CLI::Option* opt : app->get_options()) {
    for (const auto& l : opt->get_lnames()) out.insert(l);
  }
  for (CLI::App* sub : app->get_subcommands([](CLI::App*) { return true; })) collect_long_names(sub, out);
}

static std::string scalar_text(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
  return v.dump();
}

Status apply_config(CLI::App& app, Options& o, const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) return fail(Errc::invalid_input, "config file " + file + ": cannot read: " + std::strerror(errno));
  std::stringstream ss;
  ss << in.rdbuf();
  return apply_config_text(app, o, file, ss.str());
}

Status apply_config_text(CLI::App& app, Options& o, const std::string& file, std::string_view text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    return fail(Errc::invalid_input, "config file " + file + ": invalid JSON: " + e.what());
  }
  if (!j.is_object()) return fail(Errc::invalid_input, "config file " + file + ": the top level must be a JSON object");
  auto chain = selected_chain(app);
  std::set<std::string> known;
  collect_long_names(&app, known);
  for (auto it = j.begin(); it != j.end(); ++it) {
    std::string key = it.key();
    if (key == "domains") key = "domain";
    if (key == "issuers") {
      o.issuer_objects = it.value();
      continue;
    }
    if (key == "sites") {
      o.sites = it.value();
      continue;
    }
    if (key == "config" || key == "help" || key == "version") {
      return fail(Errc::invalid_input, "config file " + file + ": key \"" + it.key() + "\" is not allowed in a config file");
    }
    if (!known.count(key)) return fail(Errc::invalid_input, "config file " + file + ": unknown key \"" + it.key() + "\"");
    CLI::Option* opt = find_option(chain, key);
    if (!opt) continue;                // an option of another subcommand: not for this one
    if (opt->count() > 0) continue;    // the command line wins
    const json& v = it.value();
    std::vector<std::string> values;
    if (v.is_array()) {
      for (const auto& e : v) {
        if (e.is_object() || e.is_array()) {
          return fail(Errc::invalid_input, "config file " + file + ": \"" + it.key() + "\" must be a list of strings");
        }
        values.push_back(scalar_text(e));
      }
    } else if (v.is_object() || v.is_null()) {
      return fail(Errc::invalid_input, "config file " + file + ": \"" + it.key() + "\" must be a string, number, boolean or list");
    } else {
      if (opt->get_expected_max() == 0 && !v.is_boolean()) {
        return fail(Errc::invalid_input, "config file " + file + ": \"" + it.key() + "\" must be true or false");
      }
      values.push_back(scalar_text(v));
    }
    if (values.empty()) continue;
    try {
      opt->add_result(values);
      opt->run_callback();
    } catch (const CLI::Error& e) {
      return fail(Errc::invalid_input, "config file " + file + ": \"" + it.key() + "\": " + e.what());
    }
  }
  return {};
}

static void add_common(CLI::App& app, Options& o) {
  app.add_option("--ca", o.ca, "ACME CA: letsencrypt, letsencrypt-staging, zerossl, a directory URL, or internal (a local CA)")
      ->capture_default_str();
  app.add_option("--ca-bundle", o.ca_bundle, "PEM file of roots trusted for the CA's HTTPS (default: system store)");
  app.add_option("--storage", o.storage,
                 "storage directory (default: /var/lib/autotls as root, else $XDG_DATA_HOME/autotls or "
                 "~/.local/share/autotls)");
  app.add_option("--storage-sync", o.storage_sync,
                 "how a new certificate's files are made durable before they go live: filesystem (one "
                 "syncfs of the storage's filesystem, the fastest on a quiet disk) or per-file (an fsync "
                 "of each file: on a host where others keep much unwritten data on that filesystem)")
      ->check(CLI::IsMember({"filesystem", "per-file"}))
      ->capture_default_str();
  app.add_option("--config", o.config, "JSON config file; every flag has a key of its long name; flags win");
  app.add_option("--email", o.email, "contact e-mail for the ACME account");
  app.add_flag("--agree-tos", o.agree_tos, "agree to the CA's terms of service");
  app.add_option("--eab-kid", o.eab_kid, "External Account Binding key id (ZeroSSL, some private CAs)");
  app.add_option("--eab-hmac", o.eab_hmac, "EAB HMAC key, base64url (also AUTOTLS_EAB_HMAC or --eab-hmac-file)");
  app.add_option("--eab-hmac-file", o.eab_hmac_file, "file holding the EAB HMAC key");
  app.add_flag("--json", o.json, "machine-readable output: one JSON object per line on stdout");
  app.add_flag("-q,--quiet", o.quiet, "no progress messages");
  app.add_flag("-v,--verbose", o.verbose, "show library logs (ACME requests, listeners) on stderr");
  app.add_option("--deploy-hook", o.deploy_hook,
                 "shell command run (issue, renew, serve) after a certificate is obtained or renewed, with "
                 "AUTOTLS_EVENT (obtained|renewed), AUTOTLS_NAMES, AUTOTLS_CERT_PATH, AUTOTLS_KEY_PATH, "
                 "AUTOTLS_FULLCHAIN_PATH, AUTOTLS_CHAIN_PATH, AUTOTLS_META_PATH; if it fails the certificate stays "
                 "saved and issue/renew exit 6");
  app.add_option("--event-hook", o.event_hook,
                 "shell command run (issue, renew, serve, revoke) for every certificate event: obtained, renewed, "
                 "failed, expiring, revoked; environment as for --deploy-hook plus AUTOTLS_ERROR for failed/expiring");
}

static void add_issuer_option(CLI::App* c, Options& o) {
  c->add_option("--issuer", o.issuers,
                "CA to try in order, falling back to the next on failure (repeat; values as for --ca; "
                "\"issuers\" in the config file for per-CA settings)");
}

constexpr const char* kHookHelp =
    "Hooks (run with /bin/sh -c; names and paths only in the environment):\n"
    "  --deploy-hook CMD  after a certificate is obtained or renewed\n"
    "  --event-hook CMD   for every event: obtained, renewed, failed, expiring, revoked\n"
    "  AUTOTLS_EVENT, AUTOTLS_NAMES (space-separated), AUTOTLS_CERT_PATH, AUTOTLS_KEY_PATH,\n"
    "  AUTOTLS_FULLCHAIN_PATH, AUTOTLS_CHAIN_PATH, AUTOTLS_META_PATH, AUTOTLS_ERROR (failed, expiring)\n"
    "  A hook that fails prints a warning; the certificate stays saved and the exit status is 6.\n\n";

static void add_challenge_options(CLI::App* c, Options& o, bool standalone) {
  c->add_option("-c,--challenge", o.challenge, "http-01, tls-alpn-01 or dns-01")->capture_default_str();
  if (standalone) {
    c->add_option("--http-address", o.http_addresses, "HOST:PORT of the standalone http-01 responder (default 0.0.0.0:80)")
        ->expected(1);
    c->add_option("--tls-address", o.tls_address, "HOST:PORT of the standalone tls-alpn-01 responder (default 0.0.0.0:443)");
    c->add_option("--webroot", o.webroot, "write http-01 files to DIR/.well-known/acme-challenge/ for a running web server");
  }
  c->add_option("--dns-hook", o.dns_hook, "program for dns-01, run as `CMD add|del <record name> <value>`");
  c->add_option("--dns-server", o.dns_server, "dns-01 by RFC 2136 dynamic update: HOST[:PORT] of the primary server");
  c->add_option("--tsig-key", o.tsig_key,
                "TSIG key for --dns-server: NAME:ALGORITHM:BASE64SECRET or a BIND key file (also AUTOTLS_TSIG_KEY); "
                "never printed");
  c->add_option("--dns-zone", o.dns_zone, "zone for --dns-server updates (default: found with an SOA query)");
  c->add_option("--key-type", o.key_type, "certificate key: ec256, ec384, rsa2048, rsa3072, rsa4096")->capture_default_str();
  c->add_option("--profile", o.profile, "ACME profile name (if the CA offers profiles)");
  c->add_option("--preferred-chain", o.preferred_chain, "issuer CN of the preferred chain's top certificate");
}

void build_cli(Cli& cli, Options& o) {
  CLI::App& app = cli.app;
  bool& show_version = cli.show_version;
  auto& account_cmds = cli.account_cmds;
  app.footer(std::string("\n") + kExitCodes +
             "\nExamples:\n"
             "  autotls issue -d example.com --agree-tos --email me@example.com\n"
             "  autotls serve -d example.com --root /var/www --agree-tos\n"
             "  autotls list\n"
             "  autotls renew --all\n"
             "\nSee docs/cli.md and docs/config.md.");
  app.fallthrough();
  app.require_subcommand(1);
  app.add_flag("--version", show_version, "print the version and exit");
  add_common(app, o);

  cli.version = app.add_subcommand("version", "print the version");

  auto* issue = cli.issue = app.add_subcommand("issue", "obtain a certificate into storage");
  issue->add_option("-d,--domain", o.domains, "a DNS name for the certificate (repeat for more)");
  issue->add_option("--ip", o.ips, "an IP address for the certificate (RFC 8738; repeat for more)");
  add_challenge_options(issue, o, true);
  issue->add_flag("--force", o.force, "issue even if a stored certificate is still good");
  issue->add_option("--out", o.out_dir,
                    "also write fullchain.pem, privkey.pem (0600), cert.pem and chain.pem into DIR "
                    "(each replaced atomically; renew keeps doing it)");
  add_issuer_option(issue, o);
  issue->footer(std::string("\nExamples:\n"
                            "  autotls issue -d example.com -d www.example.com --agree-tos --email me@example.com\n"
                            "  autotls issue -d example.com --webroot /var/www/html\n"
                            "  autotls issue -d example.com --out /etc/ssl/example.com\n"
                            "  autotls issue -d example.com --challenge tls-alpn-01 --tls-address 0.0.0.0:443\n"
                            "  autotls issue -d '*.example.com' --challenge dns-01 --dns-hook /usr/local/bin/dns-hook\n"
                            "  autotls issue -d '*.example.com' -d example.com --challenge dns-01 --dns-server ns1.example.com \\\n"
                            "      --tsig-key /etc/bind/acme.key\n"
                            "  autotls issue -d test.example --ca https://127.0.0.1:14000/dir --ca-bundle pebble.pem\n"
                            "  autotls issue -d example.com --issuer letsencrypt --issuer zerossl --eab-kid KID \\\n"
                            "      --eab-hmac-file zerossl.key     # ZeroSSL if Let's Encrypt fails\n"
                            "  autotls issue -d example.com --deploy-hook 'systemctl reload nginx' \\\n"
                            "      --event-hook '/usr/local/bin/notify \"$AUTOTLS_EVENT\" \"$AUTOTLS_NAMES\"'\n"
                            "Files: <storage>/live/<first name>/{fullchain,privkey,cert,chain}.pem\n\n") +
                kHookHelp + kExitCodes);

  auto* renew = cli.renew = app.add_subcommand("renew", "renew stored certificates that are due");
  renew->add_option("names", o.renew_names, "stored certificate names (default: all)");
  renew->add_flag("--all", o.all, "every stored certificate (the default)");
  renew->add_flag("--force", o.force, "renew even if not due");
  renew->add_flag("--no-random-sleep", o.no_random_sleep, "do not wait a random time when not on a terminal");
  renew->add_option("--max-random-sleep", o.max_random_sleep, "longest random wait in seconds when not on a terminal")
      ->capture_default_str();
  add_challenge_options(renew, o, true);
  add_issuer_option(renew, o);
  renew->footer(std::string("\nSettings used at issue time (challenge, addresses, hooks, issuers) are kept in\n"
                            "<storage>/live/<name>/renewal.json and reused unless given again.\n\n"
                            "Examples:\n"
                            "  autotls renew                       # everything that is due\n"
                            "  autotls renew example.com --force   # now, due or not\n"
                            "  autotls renew --no-random-sleep     # from a timer, without the random delay\n"
                            "  autotls renew --deploy-hook 'systemctl reload haproxy'\n"
                            "  autotls renew --issuer letsencrypt --issuer https://acme.internal.example/directory\n\n") +
                kHookHelp + kExitCodes);

  auto* revoke = cli.revoke = app.add_subcommand("revoke", "revoke a certificate");
  revoke->add_option("name", o.revoke_name, "stored certificate name");
  revoke->add_option("--cert", o.cert_file, "PEM certificate file to revoke instead of a stored one");
  revoke->add_option("--reason", o.reason,
                     "unspecified, keyCompromise, affiliationChanged, superseded, cessationOfOperation");
  revoke->add_option("--key", o.key_file, "sign with the certificate's private key instead of the account key");
  revoke->add_flag("--delete-after-revoke", o.delete_after_revoke,
                   "then delete the stored certificate, its key and its versions (as `autotls delete`)");
  revoke->footer(std::string("\nExamples:\n"
                             "  autotls revoke example.com --reason superseded\n"
                             "  autotls revoke example.com --reason cessationOfOperation --delete-after-revoke\n"
                             "  autotls revoke --cert leaked.pem --key leaked.key --reason keyCompromise\n"
                             "  autotls revoke example.com --event-hook 'logger -t autotls \"$AUTOTLS_EVENT $AUTOTLS_NAMES\"'\n"
                             "  autotls revoke example.com --json   # progress as JSON lines on stderr\n\n"
                             "Progress (each request to the CA) goes to stderr: a spinner on a terminal, plain\n"
                             "lines otherwise, JSON lines with --json, nothing with --quiet.\n\n") +
                 kExitCodes);

  auto* del = cli.del = app.add_subcommand("delete", "delete a stored certificate, its key and its versions");
  del->add_option("name", o.delete_name, "stored certificate name (as `autotls list` shows it)")->required();
  del->add_flag("-y,--yes", o.yes, "do not ask for confirmation on a terminal");
  del->footer(std::string("\nThe certificate is not revoked (see `autotls revoke --delete-after-revoke`), and a\n"
                          "`serve` or `renew` still configured for the name obtains a new one.\n\n"
                          "On a terminal (stdin and stderr both), delete first asks\n"
                          "  Delete the certificate NAME and its files (STORAGE/live/NAME, STORAGE/archive/NAME)? [y/N]\n"
                          "and does nothing, exit 1, unless the answer is y or yes. --yes, --json and --quiet\n"
                          "never ask, and neither does a run without a terminal (a script, cron, a pipe).\n\n"
                          "Examples:\n"
                          "  autotls delete example.com\n"
                          "  autotls delete example.com --yes   # no question\n"
                          "  autotls delete '*.example.com' --storage /var/lib/autotls\n\n") +
              kExitCodes);

  auto* list = cli.list = app.add_subcommand("list", "show stored certificates");
  list->footer(std::string("\nExamples:\n  autotls list\n  autotls list --json | jq .\n\n") + kExitCodes);

  auto* account = cli.account = app.add_subcommand("account", "manage the ACME account at a CA");
  account->require_subcommand(1);
  for (auto [name, help] : std::initializer_list<std::pair<const char*, const char*>>{
           {"register", "create the account (or find the existing one for the stored key)"},
           {"show", "show the account as the CA knows it"},
           {"update", "change the contact (--email)"},
           {"rollover", "replace the account key (RFC 8555 §7.3.5)"},
           {"deactivate", "deactivate the account for good and forget it locally"}}) {
    auto* sub = account->add_subcommand(name, help);
    if (std::string(name) == "register" || std::string(name) == "rollover") {
      sub->add_option("--key-type", o.new_key_type, "account key type: ec256, ec384, rsa2048...")->capture_default_str();
    }
    account_cmds.emplace_back(name, sub);
  }
  account->footer(std::string("\nExamples:\n"
                              "  autotls account register --agree-tos --email me@example.com\n"
                              "  autotls account register --ca zerossl --eab-kid KID --eab-hmac-file eab.key --agree-tos\n"
                              "  autotls account show\n"
                              "  autotls account update --email new@example.com\n"
                              "  autotls account rollover\n"
                              "  autotls account deactivate\n"
                              "  autotls account show --json 2>progress.jsonl\n\n"
                              "Progress (each request to the CA) goes to stderr: a spinner on a terminal, plain\n"
                              "lines otherwise, JSON lines with --json, nothing with --quiet.\n\n") +
                  kExitCodes);

  auto* serve = cli.serve = app.add_subcommand("serve", "serve HTTPS for names, obtaining and renewing their certificates");
  serve->add_option("-d,--domain", o.domains, "a name to serve (repeat for more; one certificate per name)");
  serve->add_option("--ip", o.ips, "an IP address to serve");
  serve->add_option("--https-address", o.https_addresses, "HTTPS listener HOST:PORT (repeatable; default 0.0.0.0:443 and [::]:443)");
  serve->add_option("--http-address", o.http_addresses,
                    "HTTP listener HOST:PORT for http-01 and redirects (repeatable; default 0.0.0.0:80 and [::]:80; "
                    "\"off\" for none)");
  serve->add_option("--root", o.root, "serve static files from DIR for every name");
  serve->add_option("--proxy", o.proxy, "reverse-proxy every name to URL (http://host:port)");
  serve->add_option("--redirect", o.redirect,
                    "redirect every name to URL ({uri}: the request's path and query, which a bare "
                    "https://host keeps too) or to a /path on the same host");
  serve->add_option("--redirect-code", o.redirect_code, "status of --redirect: 301, 302 (default), 303, 307 or 308");
  serve->add_option("--admin-address", o.admin_address,
                    "admin listener HOST:PORT for /healthz, /readyz, /metrics, /certificates (plain HTTP; "
                    "\"off\" for none)")
      ->capture_default_str();
  serve->add_option("--drain", o.drain, "seconds to let requests finish on SIGTERM/SIGINT")->capture_default_str();
  add_issuer_option(serve, o);
  serve->add_flag("--no-redirect", o.no_redirect, "serve sites over plain HTTP too instead of redirecting to HTTPS");
  serve->add_option("--hsts", o.hsts, "Strict-Transport-Security max-age in seconds (0: none)");
  serve->add_option("--access-log", o.access_log,
                    "one line per request on stderr: off, json or combined (NCSA, as nginx/Apache)")
      ->check(CLI::IsMember({"off", "json", "combined"}))
      ->capture_default_str();
  serve->add_option("--log-format", o.log_format,
                    "event and log lines: json (one object per line, as --json), text, or auto: json when "
                    "stderr is not a terminal (systemd, a pipe), text on a terminal")
      ->check(CLI::IsMember({"auto", "json", "text"}))
      ->capture_default_str();
  serve->add_option("--access-log-file", o.access_log_file,
                    "append the access log to FILE instead of stderr (reopened on SIGHUP, for logrotate)");
  serve->add_option("--handshake-timeout", o.handshake_timeout, "seconds from accept to a finished TLS handshake")
      ->capture_default_str();
  serve->add_option("--header-timeout", o.header_timeout, "seconds for a complete request header")
      ->capture_default_str();
  serve->add_option("--read-timeout", o.read_timeout, "seconds one socket read of a request body may wait")
      ->capture_default_str();
  serve->add_option("--write-timeout", o.write_timeout, "seconds one socket write of a response may wait")
      ->capture_default_str();
  serve->add_option("--idle-timeout", o.idle_timeout, "seconds a keep-alive connection may wait for its next request")
      ->capture_default_str();
  serve->add_option("--max-connections", o.max_connections, "open client connections at most (more are closed at accept)")
      ->capture_default_str();
  serve->add_option("--max-header-bytes", o.max_header_bytes, "request line and header fields at most (431 beyond)")
      ->capture_default_str();
  serve->add_option("--max-body-bytes", o.max_body_bytes, "request body at most (413 beyond)")->capture_default_str();
  serve->add_option("--keep-alive-max-requests", o.keep_alive_max_requests, "requests per connection at most")
      ->capture_default_str();
  serve->add_option("--worker-threads", o.worker_threads, "threads for handlers that may block (0: max(8, 2 x cores))")
      ->capture_default_str();
  serve->add_option("--reactor-threads", o.reactor_threads, "event-loop threads (0: one per core; restart to change)")
      ->capture_default_str();
  serve->add_option("--backlog", o.backlog, "listen(2) queue length")->capture_default_str();
  serve->add_option("--ticket-rotation", o.ticket_rotation, "seconds between TLS session-ticket key rotations")
      ->capture_default_str();
  serve->add_option("--ticket-lifetime", o.ticket_lifetime, "seconds a TLS session ticket is honoured (restart to change)")
      ->capture_default_str();
  serve->add_flag("--on-demand", o.on_demand,
                  "issue certificates at the TLS handshake for names not configured (needs --on-demand-allow "
                  "and/or --on-demand-ask)");
  serve->add_option("--on-demand-allow", o.on_demand_allow,
                    "on-demand: allowed name pattern (NAME, *.NAME for one label, **.NAME for any depth; repeatable)");
  serve->add_option("--on-demand-ask", o.on_demand_ask, "on-demand: URL asked GET URL?domain=NAME; 200 allows");
  serve->add_option("--on-demand-ask-timeout", o.on_demand_ask_timeout, "on-demand: seconds to wait for the ask URL")
      ->capture_default_str();
  serve->add_option("--on-demand-rate", o.on_demand_rate, "on-demand: issuances allowed across all names, N/DURATION")
      ->capture_default_str();
  serve->add_option("--on-demand-name-rate", o.on_demand_name_rate, "on-demand: issuances allowed per name, N/DURATION")
      ->capture_default_str();
  serve->add_option("--on-demand-max-concurrent", o.on_demand_max_concurrent, "on-demand: jobs (ask, load, issue) at once")
      ->capture_default_str();
  serve->add_option("--on-demand-max-cached", o.on_demand_max_cached,
                    "on-demand: certificates held in memory (least recently used evicted)")
      ->capture_default_str();
  serve->add_option("--on-demand-wait", o.on_demand_wait, "on-demand: seconds a handshake waits for its certificate")
      ->capture_default_str();
  serve->add_option("--on-demand-deny-ttl", o.on_demand_deny_ttl, "on-demand: seconds a denied name stays denied")
      ->capture_default_str();
  serve->add_option("--cert", o.serve_certs,
                    "certificate chain file (PEM, leaf first) to serve as is; repeat with one --key each; its "
                    "names are not issued over ACME");
  serve->add_option("--key", o.serve_keys, "private key file of the --cert at the same position (mode 0600 or stricter)");
  serve->add_option("--cert-dir", o.cert_dirs,
                    "serve every <DIR>/<name>/{fullchain,privkey}.pem (certbot layout, also <DIR>/live/<name>/); "
                    "repeatable; files are reloaded on change");
  serve->add_option("--cert-dir-snapshots", o.cert_dir_snapshots,
                    "directory of the --cert-dir store snapshots (served at once at start, the directory verified "
                    "behind); default <storage>/snapshots; \"off\" to load every --cert-dir in full before serving");
  add_challenge_options(serve, o, false);
  serve->footer(std::string("\nSignals: SIGTERM/SIGINT drain then exit 0 (a second one exits at once, status 6);\n"
                            "SIGHUP re-reads the config file (sites, listeners, limits; reopens the access log file) and certificates.\n"
                            "Each ACME step of each issuance is a line on stderr (\"<name>: order created...\"),\n"
                            "a JSON line with --json, nothing with --quiet.\n"
                            "Event and log lines are text on a terminal and one JSON object per line otherwise\n"
                            "(systemd, a pipe); --log-format text|json chooses, --json means json.\n\n"
                            "Examples:\n"
                            "  autotls serve -d example.com --root /var/www --agree-tos --email me@example.com\n"
                            "  autotls serve -d app.example.com --proxy http://127.0.0.1:8080\n"
                            "  autotls serve --cert /etc/ssl/site.pem --key /etc/ssl/site.key --root /var/www\n"
                            "  autotls serve --cert-dir /etc/letsencrypt --proxy http://127.0.0.1:8080\n"
                            "  autotls serve -d '*.example.com' --root /var/www --challenge dns-01 --dns-server ns1.example.com \\\n"
                            "      --tsig-key /etc/bind/acme.key\n"
                            "  autotls serve --config /etc/autotls.json\n\n") +
                kExitCodes);
}

Result<Options> reparse(int argc, char** argv) {
  auto cli = std::make_unique<Cli>();
  Options o;
  build_cli(*cli, o);
  try {
    cli->app.parse(argc, argv);
  } catch (const CLI::Error& e) {
    return fail(Errc::invalid_input, std::string("command line: ") + e.what());
  }
  if (!o.config.empty()) {
    if (auto st = apply_config(cli->app, o, o.config); !st) return fail(st.error());
  }
  return o;
}

}  // namespace autotls::cli
