// autotls: the command line. Parses flags (CLI11) and the JSON config file (tools/config.h),
// then runs one subcommand and maps its Result to the documented exit codes (docs/cli.md).

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>

#include <CLI/CLI.hpp>

#include "tools/cli.h"
#include "tools/config.h"
#include "tools/serve_files.h"

namespace {

using namespace autotls;
using namespace autotls::cli;

// end_now ends the process with code once its output is flushed, without running destructors
// and exit handlers: by then issue and renew have stored what they obtained (synced), released
// their locks and joined their threads, and what is left is freeing memory the kernel frees
// anyway and OpenSSL's own clean-up, 1-2 ms at the end of every issuance (perf: exit handlers
// were ~2.5 % of `issue`'s CPU samples). Sanitizer builds return normally: their leak check runs
// at exit.
int end_now(int code) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  return code;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
  return code;
#endif
#endif
  std::cout.flush();
  std::cerr.flush();
  std::fflush(nullptr);
  std::_Exit(code);
}

}  // namespace

int main(int argc, char** argv) {
  restore_env_after_reexec();  // serve's re-execution for huge pages (serve_files.h)
  Options o;
  auto cli_ptr = std::make_unique<Cli>();
  Cli& cli = *cli_ptr;
  build_cli(cli, o);
  CLI::App& app = cli.app;
  bool& show_version = cli.show_version;
  auto* version = cli.version;
  auto* issue = cli.issue;
  auto* renew = cli.renew;
  auto* revoke = cli.revoke;
  auto* del = cli.del;
  auto* list = cli.list;
  auto* account = cli.account;
  auto* serve = cli.serve;
  auto& account_cmds = cli.account_cmds;

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    if (show_version) {
      std::cout << "autotls " << AUTOTLS_VERSION << "\n";
      return kExitOk;
    }
    app.exit(e);
    return kExitUsage;
  }

  // serve's --log-format (or "log-format" in the config file) decides JSON lines for it; --json
  // keeps meaning JSON whatever --log-format says. Resolved again once the config file is read.
  auto log_json = [&](const Options& opts) {
    return opts.json || (serve->parsed() && (opts.log_format == "json" ||
                                             (opts.log_format == "auto" && ::isatty(STDERR_FILENO) != 1)));
  };
  Options early = o;  // the config file may still change --log-format / --json
  early.json = log_json(o);
  Output out(early);
  if (!o.config.empty()) {
    if (auto st = apply_config(app, o, o.config); !st) {
      out.error(st.error(), kExitUsage);
      return kExitUsage;
    }
  }
  o.json = log_json(o);
  Output output(o);  // --json / --quiet may have come from the config file
  CliLogger logger(o.verbose, o.json);

  if (version->parsed() || show_version) {
    if (o.json) {
      output.object({{"version", AUTOTLS_VERSION}});
    } else {
      std::cout << "autotls " << AUTOTLS_VERSION << "\n";
    }
    return kExitOk;
  }

  // A large --cert-dir: serve starts again with glibc's heap on huge pages (serve_files.h).
  // The new image runs main again, so a start that goes on prints nothing before this point:
  // what is printed earlier ends the process (errors, --help, --version), and a line printed
  // here anyway keeps serve from re-executing (printed_anything()) rather than be doubled.
  if (serve->parsed()) reexec_for_huge_pages(o, argv, logger);

  auto chain = selected_chain(app);
  auto given = [chain](const std::string& name) {
    CLI::Option* opt = find_option(chain, name);
    return opt && opt->count() > 0;
  };
  Context ctx{o, output, logger, {}, given("ca"), {}, nullptr, given, {}, {}};
  ctx.reparse = [argc, argv] { return reparse(argc, argv); };
  auto dir = directory_url_for(o.ca);
  if (!dir) {
    return usage_error(ctx, "--ca must be letsencrypt, letsencrypt-staging, zerossl, internal or a directory URL, not \"" + o.ca + "\"");
  }
  ctx.directory_url = *dir;
  ctx.storage_root = o.storage.empty() ? default_storage() : o.storage;
  {
    auto fs = std::make_shared<tlsreload::FileStorage>(ctx.storage_root);
    fs->set_sync(o.storage_sync == "per-file" ? tlsreload::FileStorage::Sync::per_file
                                              : tlsreload::FileStorage::Sync::filesystem);
    ctx.storage = std::move(fs);
  }

  if (issue->parsed()) return end_now(cmd_issue(ctx));
  if (renew->parsed()) return end_now(cmd_renew(ctx));
  if (revoke->parsed()) return cmd_revoke(ctx);
  if (del->parsed()) return cmd_delete(ctx);
  if (list->parsed()) return cmd_list(ctx);
  if (serve->parsed()) return cmd_serve(ctx);
  if (account->parsed()) {
    for (const auto& [name, sub] : account_cmds) {
      if (sub->parsed()) return cmd_account(ctx, name);
    }
  }
  return usage_error(ctx, "no command given (see autotls --help)");
}
