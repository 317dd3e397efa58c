#pragma once

// The command line's definition (CLI11) and the JSON config file applied over it: what main()
// parses, what serve parses again on SIGHUP (reparse), and what the fuzz target
// tests/fuzz/fuzz_serve_config feeds. serve_setup turns serve's options into the server
// configuration and the names to hold certificates for (tools/cmd_serve.cpp).

#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>

#include "server/config.h"
#include "tlsreload/on_demand.h"
#include "tools/cli.h"

namespace autotls::cli {

// Cli is the command line definition bound to one Options. It is built by a function so that
// `serve` can build a fresh one on SIGHUP and re-read the same argv and config file.
struct Cli {
  CLI::App app{"autotls: ACME client and zero-downtime TLS certificate manager", "autotls"};
  bool show_version = false;
  CLI::App* version = nullptr;
  CLI::App* issue = nullptr;
  CLI::App* renew = nullptr;
  CLI::App* revoke = nullptr;
  CLI::App* del = nullptr;
  CLI::App* list = nullptr;
  CLI::App* account = nullptr;
  CLI::App* serve = nullptr;
  std::vector<std::pair<std::string, CLI::App*>> account_cmds;
};

// build_cli defines every flag of every subcommand on cli, each writing its field of o.
void build_cli(Cli& cli, Options& o);

// selected_chain returns the root app and every selected subcommand, deepest last.
std::vector<CLI::App*> selected_chain(CLI::App& app);
// find_option finds the option named --long_name of the deepest subcommand of chain that has one.
CLI::Option* find_option(const std::vector<CLI::App*>& chain, const std::string& long_name);

// apply_config sets every option the config file names and the command line did not (after
// app.parse). Errors name the file and the key. apply_config_text does it for the file's text.
Status apply_config(CLI::App& app, Options& o, const std::string& file);
Status apply_config_text(CLI::App& app, Options& o, const std::string& file, std::string_view text);

// reparse builds a fresh command line, parses argv again and re-reads the config file it names:
// what `serve` does on SIGHUP. Errors are the ones a start would report.
Result<Options> reparse(int argc, char** argv);

// ServeSetup is what the options say to serve: the server configuration (without the admin
// callbacks) and the names to hold certificates for. Built at start and again on SIGHUP.
struct ServeSetup {
  server::ServerConfig cfg;
  std::vector<std::string> names;
  // cert_settings: the certificate settings of each site that sets any (by site name).
  std::map<std::string, tlsreload::CertificateSettings> cert_settings;
  tlsreload::OnDemandOptions on_demand;  // checked; not reloadable on SIGHUP
};

// serve_setup checks serve's options and builds its ServeSetup; it reads no file and opens
// nothing. Errc::invalid_input with one line naming the flag or config key.
Result<ServeSetup> serve_setup(const Options& o);

}  // namespace autotls::cli
