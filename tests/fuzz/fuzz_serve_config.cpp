// libFuzzer target: `autotls serve --config FILE` with the input as the file: the JSON read over
// the command line (apply_config_text: every key a flag, "sites", "issuers") and the checks that
// turn serve's options into the server configuration (serve_setup: sites, names, addresses,
// limits, on-demand). Every input must end in a configuration or an error; an exception that
// escapes, a crash or undefined behaviour is a finding (ASan, UBSan). tools/fuzz runs it.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>

#include "tools/config.h"

using namespace autotls::cli;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // One command line for every input (building it is most of the cost of an input): the
  // options go back to their defaults and CLI11 forgets what it parsed, as a fresh one would.
  static Options o;
  static auto cli = [] {
    auto c = std::make_unique<Cli>();
    build_cli(*c, o);
    return c;
  }();
  o = Options{};
  cli->app.clear();
  const char* argv[] = {"autotls", "serve", "--config", "fuzz.json"};
  cli->app.parse(4, argv);  // a fixed, valid command line: CLI11 throws only on a bad one
  std::string_view text(reinterpret_cast<const char*>(data), size);
  if (!apply_config_text(cli->app, o, o.config, text)) return 0;
  auto setup = serve_setup(o);
  if (setup) {
    // What serve_setup accepted, the server refuses only for what it opens (files, ports).
    for (const auto& [host, site] : setup->cfg.sites) {
      if (host.empty() || host.starts_with("*.")) __builtin_trap();
    }
  }
  return 0;
}
