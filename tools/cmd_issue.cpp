// autotls issue / renew: obtain and renew certificates through tlsreload::Manager into storage.

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <random>
#include <thread>

#include "acme/ari.h"
#include "acme/prefetch.h"
#include "tlsreload/store.h"
#include "tools/cli.h"
#include "tools/progress.h"

namespace autotls::cli {

namespace {

using json = nlohmann::json;
using std::chrono::system_clock;

std::string shown_list(const std::vector<std::string>& names, const char* sep) {
  std::string list;
  for (const auto& n : names) list += (list.empty() ? "" : sep) + show_name(n);
  return list;
}

// RunResult is what one Manager run did for one name set.
struct RunResult {
  std::vector<tlsreload::ManagerEvent> events;
  Status status;
  std::string first_issuer;  // label of the first issuer tried ("" with one issuer)
  // issued is the obtained or renewed event, if any.
  const tlsreload::ManagerEvent* issued() const {
    for (const auto& e : events) {
      if (e.type == tlsreload::ManagerEvent::Type::obtained || e.type == tlsreload::ManagerEvent::Type::renewed) return &e;
    }
    return nullptr;
  }
  // fallback reports whether the certificate came from an issuer other than the first.
  bool fallback() const {
    const auto* e = issued();
    return e && !first_issuer.empty() && e->issuer != first_issuer;
  }
  bool settings_saved = false;  // renewal.json went into the certificate's set (SettingsInSet)
  bool changed() const {
    return std::any_of(events.begin(), events.end(), [](const auto& e) {
      return e.type == tlsreload::ManagerEvent::Type::obtained || e.type == tlsreload::ManagerEvent::Type::renewed;
    });
  }
  std::optional<Error> failure() const {
    for (const auto& e : events) {
      if (e.type == tlsreload::ManagerEvent::Type::failed && e.error) return e.error;
    }
    if (!status) return status.error();
    return std::nullopt;
  }
};

// SettingsInSet is the storage the manager of `issue` writes through. It adds one more file
// (renewal.json, the renewal settings) to the set of files of the certificate it persists
// (put_set of live/<name>), so the settings land with the certificate in the same durable
// switch instead of costing a put of their own (two more syncs) afterwards. Everything else
// goes straight to the storage it wraps.
class SettingsInSet final : public tlsreload::Storage {
 public:
  SettingsInSet(std::shared_ptr<tlsreload::Storage> inner, std::string prefix, tlsreload::StorageFile extra)
      : inner_(std::move(inner)), prefix_(std::move(prefix)), extra_(std::move(extra)) {}

  // saved reports whether a set with the extra file was stored.
  bool saved() const { return saved_.load(); }

  Result<std::optional<std::string>> get(std::string_view key) override { return inner_->get(key); }
  Status put(std::string_view key, std::string_view value, bool secret) override { return inner_->put(key, value, secret); }
  Status put_set(std::string_view prefix, const std::vector<tlsreload::StorageFile>& files) override {
    if (prefix != prefix_ ||
        std::any_of(files.begin(), files.end(), [&](const auto& f) { return f.name == extra_.name; })) {
      return inner_->put_set(prefix, files);
    }
    std::vector<tlsreload::StorageFile> all = files;
    all.push_back(extra_);
    Status st = inner_->put_set(prefix, all);
    if (st) saved_.store(true);
    return st;
  }
  Result<std::vector<std::string>> list(std::string_view prefix) override { return inner_->list(prefix); }
  Status remove(std::string_view key) override { return inner_->remove(key); }
  Result<std::string> generation(std::string_view key) override { return inner_->generation(key); }
  Result<std::optional<tlsreload::LockToken>> try_lock(std::string_view name, std::chrono::seconds ttl) override {
    return inner_->try_lock(name, ttl);
  }
  Status refresh(const tlsreload::LockToken& token, std::chrono::seconds ttl) override { return inner_->refresh(token, ttl); }
  Status unlock(const tlsreload::LockToken& token) override { return inner_->unlock(token); }

 private:
  std::shared_ptr<tlsreload::Storage> inner_;
  std::string prefix_;
  tlsreload::StorageFile extra_;
  std::atomic<bool> saved_{false};
};

// check_challenge_options refuses combinations that cannot work before anything is started.
Status check_challenge_options(const Options& o) {
  if (o.challenge != "http-01" && o.challenge != "tls-alpn-01" && o.challenge != "dns-01") {
    return fail(Errc::invalid_input, "--challenge must be http-01, tls-alpn-01 or dns-01, not \"" + o.challenge + "\"");
  }
  if (!o.webroot.empty() && o.challenge != "http-01") return fail(Errc::invalid_input, "--webroot works with --challenge http-01 only");
  if (o.challenge == "dns-01" && o.dns_hook.empty() && o.dns_server.empty()) {
    return fail(Errc::invalid_input,
                "--challenge dns-01 needs --dns-server HOST[:PORT] with --tsig-key (RFC 2136), or --dns-hook CMD "
                "(called as `CMD add|del <record> <value>`)");
  }
  if (o.challenge == "dns-01") {
    if (auto s = dns_update_solver(o); !s) return fail(s.error());
  }
  if (!o.ips.empty() && o.challenge == "dns-01") return fail(Errc::invalid_input, "IP addresses cannot be validated by dns-01 (RFC 8738)");
  return {};
}

// issuer_labels names the CAs tried, in order: the --issuer / "issuers" list, else the one CA.
std::string issuer_labels(const std::vector<tlsreload::IssuerConfig>& issuers, const std::string& directory_url) {
  if (issuers.empty()) return directory_url;
  std::string s;
  for (const auto& i : issuers) s += (s.empty() ? "" : ", then ") + i.label();
  return s;
}

// note_issuer_failed turns the Manager's issuer_failed event into a progress note, whatever
// --verbose says, so that a fallback to the next issuer is said as it happens (the event comes
// before the next issuer's steps).
void note_issuer_failed(ProgressPrinter& progress, const tlsreload::ManagerEvent& e) {
  const std::string error = e.error ? e.error->message : std::string();
  json j = {{"name", e.name}, {"issuer", e.issuer}, {"next", e.next_issuer}, {"error", error}};
  std::string text = "issuer " + e.issuer + " failed for " + e.name + ": " + error +
                     (e.fallback ? "; trying the next issuer, " + e.next_issuer
                                 : "; not trying the next issuer (" + e.next_issuer + ")");
  progress.note(e.fallback ? "issuer_fallback" : "issuer_failed", j, text);
}

// ManagerRun is what one run_manager call sets up, in the order it is torn down (last member
// first): the manager (with its transport and prefetch thread) before the progress
// printer it reports through, the responder after the manager.
struct ManagerRun {
  std::shared_ptr<tlsreload::ChallengeStore> challenges = std::make_shared<tlsreload::ChallengeStore>();
  std::unique_ptr<Responder> responder;
  std::mutex mu;
  std::vector<tlsreload::ManagerEvent> events;  // guarded by mu
  std::unique_ptr<ProgressPrinter> progress;
  std::unique_ptr<tlsreload::Manager> manager;
};

// run_manager runs the Manager for names with the options' challenge set-up: a standalone
// responder or a webroot solver for http-01, a standalone listener for tls-alpn-01. settings,
// when given, is written with the certificate's files if one is obtained (SettingsInSet).
// With linger, the responder and the manager are not stopped on return but handed to
// ctx.lingering: issue, which then ends with _Exit, does not wait for their threads (the
// storage lock is released and the certificate synced before manage returns).
RunResult run_manager(Context& ctx, const Options& o, const std::string& directory_url,
                      const std::vector<std::string>& names, bool force,
                      const tlsreload::StorageFile* settings = nullptr, bool linger = false) {
  RunResult r;
  auto run = std::make_shared<ManagerRun>();
  // o, not ctx.options: renew passes the settings saved in renewal.json.
  auto mo = manager_options(ctx, o, directory_url);
  if (!mo) {
    r.status = fail(mo.error());
    return r;
  }
  if (mo->issuers.size() > 1) r.first_issuer = mo->issuers.front().label();
  if (directory_url != tlsreload::kInternalIssuer && mo->issuers.empty() && !mo->transport) {
    // One CA: connect to it and fetch its directory and a nonce now, while the responder
    // starts and the manager takes the storage lock and loads the account (acme/prefetch.h).
    // If the responder cannot start, returning waits for these requests (bounded by the
    // transport's timeouts).
    acme::CurlOptions curl;
    curl.ca_bundle = mo->ca_bundle;
    mo->transport = acme::make_prefetching_transport(acme::make_curl_transport(curl), directory_url);
  }
  auto& challenges = run->challenges;
  if (directory_url == tlsreload::kInternalIssuer) {
    // The internal CA validates nothing: no responder.
  } else if (o.challenge == "http-01" && !o.webroot.empty()) {
    mo->solver = std::make_shared<WebrootSolver>(o.webroot);
  } else if (o.challenge == "http-01" || o.challenge == "tls-alpn-01") {
    std::string address = o.challenge == "http-01" ? (o.http_addresses.empty() ? "0.0.0.0:80" : o.http_addresses.front())
                                                   : (o.tls_address.empty() ? "0.0.0.0:443" : o.tls_address);
    auto started = start_responder(o.challenge, address, challenges, &ctx.logger);
    if (!started) {
      r.status = fail(started.error());
      return r;
    }
    run->responder = std::move(*started);
    ctx.out.info("answering " + o.challenge + " on " + address);
  }
  // Collected in the run, which outlives the manager however long it lingers.
  mo->on_event = [run = run.get()](const tlsreload::ManagerEvent& e) {
    // Said at once, and no hook runs for it (it comes with the Manager's locks held).
    if (e.type == tlsreload::ManagerEvent::Type::issuer_failed) return note_issuer_failed(*run->progress, e);
    std::lock_guard lock(run->mu);
    run->events.push_back(e);
  };
  // Made before the manager so that it outlives it; finished (a spinner line cleared) before
  // the command prints its result or error.
  run->progress = std::make_unique<ProgressPrinter>(ProgressPrinter::mode_for(o));
  mo->on_progress = run->progress->callback();
  std::shared_ptr<tlsreload::Storage> storage = ctx.storage;
  std::shared_ptr<SettingsInSet> with_settings;
  if (settings) {
    with_settings = std::make_shared<SettingsInSet>(ctx.storage, "live/" + tlsreload::storage_name(names.front()), *settings);
    storage = with_settings;
  }
  run->manager = std::make_unique<tlsreload::Manager>(std::move(*mo), storage, std::make_shared<tlsreload::CertStore>(),
                                                      challenges);
  auto collect = [&] {
    std::lock_guard lock(run->mu);
    r.events = run->events;
  };
  r.status = run->manager->manage(names);
  collect();
  if (r.status && force && !r.changed() && !r.failure()) {
    r.status = run->manager->renew(names, true);
    collect();
  }
  r.settings_saved = with_settings && with_settings->saved();
  run->progress->finish();
  if (linger) ctx.lingering = std::move(run);
  return r;
}

json renewal_settings(const Options& o, const std::string& directory_url) {
  json j = {{"directory_url", directory_url}, {"challenge", o.challenge}, {"key-type", o.key_type}};
  if (!o.ca_bundle.empty()) j["ca-bundle"] = o.ca_bundle;
  if (!o.http_addresses.empty()) j["http-address"] = o.http_addresses.front();
  if (!o.tls_address.empty()) j["tls-address"] = o.tls_address;
  if (!o.webroot.empty()) j["webroot"] = o.webroot;
  if (!o.out_dir.empty()) j["out"] = o.out_dir;
  if (!o.dns_hook.empty()) j["dns-hook"] = o.dns_hook;
  if (!o.dns_server.empty()) j["dns-server"] = o.dns_server;
  if (!o.dns_zone.empty()) j["dns-zone"] = o.dns_zone;
  // The TSIG key is kept for renew (renewal.json is then written 0600, like private keys)
  // unless it came from AUTOTLS_TSIG_KEY, which renew reads again.
  if (!o.tsig_key.empty()) j["tsig-key"] = o.tsig_key;
  if (!o.profile.empty()) j["profile"] = o.profile;
  if (!o.preferred_chain.empty()) j["preferred-chain"] = o.preferred_chain;
  if (!o.deploy_hook.empty()) j["deploy-hook"] = o.deploy_hook;
  if (!o.event_hook.empty()) j["event-hook"] = o.event_hook;
  if (!o.issuers.empty()) j["issuer"] = o.issuers;
  if (!o.issuer_objects.is_null()) j["issuers"] = o.issuer_objects;
  return j;
}

// secret_settings reports whether renewal.json holds a secret (then written 0600): an inline
// TSIG key, or an EAB HMAC key inside "issuers".
bool secret_settings(const Options& o) {
  if (!o.tsig_key.empty()) return true;
  if (!o.issuer_objects.is_array()) return false;
  return std::any_of(o.issuer_objects.begin(), o.issuer_objects.end(),
                     [](const json& i) { return i.is_object() && i.contains("eab-hmac"); });
}

// run_hooks runs, as serve does, --deploy-hook for each obtained or renewed event and
// --event-hook for every event but "loaded" (failed and expiring with AUTOTLS_ERROR). A hook
// that fails is a warning (with --json a {"event":"deploy_hook_failed"|"event_hook_failed"}
// line) and the result is false: the command then exits 6, the certificate staying saved.
bool run_hooks(Context& ctx, const Options& o, const std::vector<tlsreload::ManagerEvent>& events) {
  bool ok = true;
  auto failed = [&](const std::string& event, const std::string& name, const Error& e) {
    ok = false;
    ctx.out.object({{"event", event}, {"name", name}, {"exit_code", kExitLocal}, {"error", error_json(e)}});
    ctx.out.info("autotls: warning: " + e.message + " (for " + name + "; the certificate stays saved; exit status " +
                 std::to_string(kExitLocal) + ")");
  };
  for (const auto& e : events) {
    const std::string type(tlsreload::to_string(e.type));
    const bool issued = e.type == tlsreload::ManagerEvent::Type::obtained || e.type == tlsreload::ManagerEvent::Type::renewed;
    auto paths = live_paths(ctx.storage_root, e.name);
    if (issued && !o.deploy_hook.empty()) {
      ctx.out.info("running the deploy hook for " + e.name);
      if (auto st = run_deploy_hook(o.deploy_hook, e.names, paths, type); !st) failed("deploy_hook_failed", e.name, st.error());
    }
    if (!o.event_hook.empty() && e.type != tlsreload::ManagerEvent::Type::loaded) {
      ctx.out.info("running the event hook for " + e.name + " (" + type + ")");
      if (auto st = run_event_hook(o.event_hook, type, e.names, paths, e.error ? describe_error(*e.error) : ""); !st) {
        failed("event_hook_failed", e.name, st.error());
      }
    }
  }
  return ok;
}

// renewal_file is renewal.json as stored: 0600 when it holds a secret, like private keys.
tlsreload::StorageFile renewal_file(const Options& o, const std::string& directory_url) {
  return {"renewal.json", renewal_settings(o, directory_url).dump(2) + "\n", secret_settings(o)};
}

// copy_out writes the stored certificate's files into --out DIR (when given), each through a
// temporary file, fsync and rename (FileStorage::put), so a reader of DIR never sees half a file
// and the key is 0600 from its first byte. Software that wants its files in its own place
// (certbot's --cert-path, lego's --path) needs no deploy hook for it. Runs before the hooks, so
// a deploy hook sees DIR up to date. A failure is a warning: the certificate stays stored.
bool copy_out(Context& ctx, const Options& o, const std::string& key) {
  if (o.out_dir.empty()) return true;
  auto report_failure = [&](const std::string& why) {
    ctx.out.info("autotls: warning: cannot write the certificate files for " + key + " into " + o.out_dir + ": " +
                 why + " (the certificate stays stored; exit status 6)");
    return false;
  };
  std::error_code ec;
  std::filesystem::create_directories(o.out_dir, ec);
  if (ec) return report_failure(ec.message());
  tlsreload::FileStorage out(o.out_dir);
  // The key last: a reader that sees the new key also sees the certificate it belongs with.
  const std::pair<const char*, bool> files[] = {
      {"cert.pem", false}, {"chain.pem", false}, {"fullchain.pem", false}, {"privkey.pem", true}};
  for (const auto& [name, secret] : files) {
    auto data = ctx.storage->get("live/" + key + "/" + name);
    if (!data) return report_failure(data.error().message);
    if (!*data) {
      if (std::string_view(name) == "chain.pem") continue;  // a self-signed leaf has no chain
      return report_failure(std::string(name) + " is not in storage");
    }
    if (auto st = out.put(name, **data, secret); !st) return report_failure(st.error().message);
  }
  ctx.out.result("  copied to:     " + o.out_dir);
  return true;
}

// after_success prints the paths, saves the renewal settings (unless they were stored with the
// certificate already) and runs the hooks.
int after_success(Context& ctx, const Options& o, const std::string& key, const std::vector<std::string>& names,
                  const std::string& directory_url, const std::string& action, const RunResult& r) {
  auto paths = live_paths(ctx.storage_root, key);
  if (!r.settings_saved) {
    auto f = renewal_file(o, directory_url);
    if (auto st = ctx.storage->put("live/" + key + "/" + f.name, f.value, f.secret); !st) {
      ctx.out.info("warning: cannot save renewal settings: " + st.error().message);
    }
  }
  auto info = stored_certificate(*ctx.storage, key);
  json j = {{"status", action}, {"name", key}, {"names", names}};
  if (info && *info) j = cert_info_json(**info, ctx.storage_root), j["status"] = action;
  j["unicode_names"] = unicode_names(names);  // the names asked for, also when storage was unreadable
  const auto* issued = r.issued();
  if (issued) j["issuer_name"] = issued->issuer;
  j["fallback"] = r.fallback();
  ctx.out.object(j);
  ctx.out.result("Certificate " + action + " for " + shown_list(names, ", "));
  if (issued && r.fallback()) {
    ctx.out.result("  issued by:     " + issued->issuer + " (fallback: " + r.first_issuer + " failed)");
  } else if (issued && !r.first_issuer.empty()) {
    ctx.out.result("  issued by:     " + issued->issuer);
  }
  if (info && *info && (*info)->has_cert) ctx.out.result("  expires:       " + acme::format_rfc3339((*info)->not_after));
  ctx.out.result("  fullchain:     " + paths.fullchain.string());
  ctx.out.result("  private key:   " + paths.key.string());
  ctx.out.result("  certificate:   " + paths.cert.string());
  ctx.out.result("  chain:         " + paths.chain.string());
  if (directory_url == tlsreload::kInternalIssuer) {
    ctx.out.result("  trust root:    " + (std::filesystem::path(ctx.storage_root) / "internal" / "root.pem").string());
  }
  bool copied = copy_out(ctx, o, key);
  return run_hooks(ctx, o, r.events) && copied ? kExitOk : kExitLocal;
}

}  // namespace

int cmd_issue(Context& ctx) {
  Options& o = ctx.options;
  auto requested = requested_names(o, "issue");
  if (!requested) return usage_error(ctx, requested.error().message);
  const std::vector<std::string>& names = *requested;
  if (names.empty()) return usage_error(ctx, "issue: give at least one name with -d NAME (or an address with --ip)");
  if (auto st = check_challenge_options(o); !st) return usage_error(ctx, st.error().message);
  if (auto why = wildcard_challenge_error(o, names, "issue"); !why.empty()) return usage_error(ctx, why);
  if (!o.webroot.empty() && !std::filesystem::is_directory(o.webroot)) {
    return usage_error(ctx, "--webroot " + o.webroot + ": not a directory");
  }
  if (!acme::parse_key_type(o.key_type)) return usage_error(ctx, "--key-type must be ec256, ec384, rsa2048, rsa3072 or rsa4096");
  if (!o.out_dir.empty()) {
    // Absolute before it is saved in renewal.json: renew runs from cron, in another directory.
    std::error_code ec;
    auto abs = std::filesystem::absolute(o.out_dir, ec);
    if (ec) return usage_error(ctx, "--out " + o.out_dir + ": " + ec.message());
    o.out_dir = abs.lexically_normal().string();
    if (std::filesystem::exists(o.out_dir) && !std::filesystem::is_directory(o.out_dir)) {
      return usage_error(ctx, "--out " + o.out_dir + ": not a directory");
    }
  }
  auto eab = eab_from(o);
  if (!eab) return usage_error(ctx, eab.error().message);
  // --issuer / "issuers": the CAs tried in order, as in serve (tlsreload/issuer.h).
  auto issuers = issuer_list(o);
  if (!issuers) return usage_error(ctx, issuers.error().message);
  std::vector<std::string> accepted_cas;  // a stored certificate from any of them is reused
  for (const auto& i : *issuers) accepted_cas.push_back(i.account_id());
  if (accepted_cas.empty()) accepted_cas.push_back(ctx.directory_url);

  const std::string key = tlsreload::storage_name(names.front());
  bool force = o.force;
  auto stored = stored_certificate(*ctx.storage, key);
  if (!stored) return report(ctx, stored.error());
  if (*stored && (*stored)->has_cert && !force) {
    const CertInfo& c = **stored;
    bool covers = std::all_of(names.begin(), names.end(), [&](const std::string& n) {
      return std::find(c.names.begin(), c.names.end(), n) != c.names.end();
    });
    auto kt = acme::parse_key_type(o.key_type);
    bool same_key = kt && c.key_type == acme::to_string(*kt);
    bool same_ca = c.directory_url.empty() ||
                   std::find(accepted_cas.begin(), accepted_cas.end(), c.directory_url) != accepted_cas.end();
    if (!covers || !same_key || !same_ca) {
      force = true;
      ctx.out.info(std::string("the stored certificate ") +
                   (!covers ? "does not cover every name" : !same_key ? "has another key type" : "is from another CA") +
                   ": issuing a new one");
    } else if (!c.due) {
      auto paths = live_paths(ctx.storage_root, key);
      json j = cert_info_json(c, ctx.storage_root);
      j["status"] = "nothing to do";
      ctx.out.object(j);
      ctx.out.result("nothing to do: the certificate for " + key + " is valid until " + acme::format_rfc3339(c.not_after) +
                     " and not due for renewal until " + acme::format_rfc3339(c.renewal_time) + " (use --force to renew now)");
      ctx.out.result("  fullchain:     " + paths.fullchain.string());
      ctx.out.result("  private key:   " + paths.key.string());
      // --out DIR gets the stored files even so: DIR may be new, or its files lost.
      if (!copy_out(ctx, o, key)) return kExitLocal;
      return kExitNothingToDo;
    }
  }
  if (auto st = check_issuer_terms(ctx, *issuers); !st) return report(ctx, st.error());

  ctx.out.info("obtaining a certificate for " + shown_list(names, " ") + " from " + issuer_labels(*issuers, ctx.directory_url) +
               " (" + o.challenge + ")");
  const auto settings = renewal_file(o, ctx.directory_url);
  // Nothing follows the run but printing and the exit, unless hooks run: a deploy hook may
  // start a server on the responder's port, so then the responder is stopped first.
  const bool linger = o.deploy_hook.empty() && o.event_hook.empty();
  auto r = run_manager(ctx, o, ctx.directory_url, names, force, &settings, linger);
  if (auto err = r.failure()) {
    // The failure is an event too: the event hook hears it (CAs no longer email about expiry).
    run_hooks(ctx, o, r.events);
    return report(ctx, *err);
  }
  if (!r.changed()) {
    ctx.out.result("nothing to do: the stored certificate for " + key + " is still good");
    ctx.out.object({{"status", "nothing to do"}, {"name", key}});
    return kExitNothingToDo;
  }
  return after_success(ctx, o, key, names, ctx.directory_url, "obtained", r);
}

int cmd_renew(Context& ctx) {
  Options& o = ctx.options;
  auto all = stored_certificates(*ctx.storage);
  if (!all) return report(ctx, all.error());
  std::vector<CertInfo> todo;
  if (o.renew_names.empty() || o.all) {
    if (!o.renew_names.empty()) return usage_error(ctx, "renew: give names or --all, not both");
    todo = *all;
  } else {
    auto wanted = normalized(o.renew_names);
    if (!wanted) return usage_error(ctx, "renew: " + wanted.error().message);
    for (const auto& n : *wanted) {
      std::string key = tlsreload::storage_name(n);
      auto it = std::find_if(all->begin(), all->end(), [&](const CertInfo& c) { return c.key == key; });
      if (it == all->end()) return usage_error(ctx, "renew: no stored certificate named " + n + " in " + ctx.storage_root);
      todo.push_back(*it);
    }
  }
  if (todo.empty()) {
    ctx.out.result("nothing to do: no certificates in " + ctx.storage_root);
    // --json callers parse stdout: an empty stdout would look like a crash, not "nothing to do".
    ctx.out.object({{"status", "nothing to do"}, {"storage", ctx.storage_root}, {"certificates", json::array()}});
    return kExitNothingToDo;
  }

  // Spread renewals run from cron/timers over time, so that many hosts do not hit the CA at
  // the same second (certbot does the same when not on a terminal).
  bool any_due = std::any_of(todo.begin(), todo.end(), [](const CertInfo& c) { return c.due; });
  if ((any_due || o.force) && !o.force && !o.no_random_sleep && !::isatty(STDOUT_FILENO) && o.max_random_sleep > 0) {
    std::uniform_int_distribution<int> d(0, o.max_random_sleep);
    std::random_device rd;
    int s = d(rd);
    ctx.out.info("not on a terminal: sleeping " + std::to_string(s) + " s before renewing (--no-random-sleep to skip)");
    std::this_thread::sleep_for(std::chrono::seconds(s));
  }

  int renewed = 0;
  int first_failure = 0;
  for (const auto& c : todo) {
    if (!c.due && !o.force) {
      std::string why = "not due until " + acme::format_rfc3339(c.renewal_time) + " (" + c.renewal_reason + ")";
      ctx.out.result("skipped " + show_name(c.key) + ": " + why);
      ctx.out.object({{"name", c.key}, {"action", "skipped"}, {"reason", why},
                      {"renewal_time", acme::format_rfc3339(c.renewal_time)}});
      continue;
    }
    // The settings used at issue time, unless overridden now.
    Options co = o;
    const json& rs = c.renewal;
    auto take = [&](const char* k, std::string& field) {
      if (!ctx.given(k) && rs.is_object() && rs.contains(k) && rs[k].is_string()) field = rs[k].get<std::string>();
    };
    take("challenge", co.challenge);
    take("key-type", co.key_type);
    take("ca-bundle", co.ca_bundle);
    take("tls-address", co.tls_address);
    take("webroot", co.webroot);
    take("out", co.out_dir);
    take("dns-hook", co.dns_hook);
    take("dns-server", co.dns_server);
    take("dns-zone", co.dns_zone);
    take("tsig-key", co.tsig_key);
    take("profile", co.profile);
    take("preferred-chain", co.preferred_chain);
    take("deploy-hook", co.deploy_hook);
    take("event-hook", co.event_hook);
    // The issuer list saved at issue time, unless --ca, --issuer or "issuers" is given now.
    if (!ctx.ca_given && !ctx.given("issuer") && co.issuer_objects.is_null() && rs.is_object()) {
      if (rs.contains("issuer") && rs["issuer"].is_array()) {
        co.issuers.clear();
        for (const auto& i : rs["issuer"]) {
          if (i.is_string()) co.issuers.push_back(i.get<std::string>());
        }
      }
      if (rs.contains("issuers") && rs["issuers"].is_array()) co.issuer_objects = rs["issuers"];
    }
    if (!ctx.given("http-address") && rs.is_object() && rs.contains("http-address") && rs["http-address"].is_string()) {
      co.http_addresses = {rs["http-address"].get<std::string>()};
    }
    std::string dir = ctx.ca_given || c.directory_url.empty() ? ctx.directory_url : c.directory_url;
    std::vector<std::string> names = c.names.empty() ? std::vector<std::string>{c.key} : c.names;

    auto fail_one = [&](const Error& e) {
      int code = exit_code_for(e);
      if (!first_failure) first_failure = code;
      ctx.out.result("failed " + show_name(c.key) + ": " + describe_error(e));
      ctx.out.object({{"name", c.key}, {"action", "failed"}, {"exit_code", code}, {"error", error_json(e)}});
    };
    if (auto st = check_challenge_options(co); !st) {
      fail_one(st.error());
      continue;
    }
    auto issuers = issuer_list(co);
    if (!issuers) {
      fail_one(issuers.error());
      continue;
    }
    ctx.out.info("renewing " + show_name(c.key) + " (" + (o.force && !c.due ? std::string("forced") : c.renewal_reason) + ") via " +
                 co.challenge + " at " + issuer_labels(*issuers, dir));
    auto r = run_manager(ctx, co, dir, names, o.force);
    if (auto err = r.failure()) {
      fail_one(*err);
      if (!run_hooks(ctx, co, r.events) && !first_failure) first_failure = kExitLocal;
      continue;
    }
    if (!r.changed()) {
      ctx.out.result("skipped " + show_name(c.key) + ": the stored certificate is not due");
      ctx.out.object({{"name", c.key}, {"action", "skipped"}, {"reason", "not due"}});
      continue;
    }
    ++renewed;
    auto info = stored_certificate(*ctx.storage, c.key);
    json j = {{"name", c.key}, {"action", "renewed"}};
    std::string by;
    if (const auto* issued = r.issued()) {
      j["issuer_name"] = issued->issuer;
      j["fallback"] = r.fallback();
      if (r.fallback()) by = " (issued by " + issued->issuer + ": fallback, " + r.first_issuer + " failed)";
    }
    if (info && *info) {
      j["not_after"] = acme::format_rfc3339((*info)->not_after);
      j["fullchain_path"] = live_paths(ctx.storage_root, c.key).fullchain.string();
      ctx.out.result("renewed " + show_name(c.key) + ": valid until " + acme::format_rfc3339((*info)->not_after) + by);
    } else {
      ctx.out.result("renewed " + show_name(c.key) + by);
    }
    ctx.out.object(j);
    if (!copy_out(ctx, co, c.key) && !first_failure) first_failure = kExitLocal;
    // A failing hook: the renewed certificate is saved; the run exits 6 unless something failed first.
    if (!run_hooks(ctx, co, r.events) && !first_failure) first_failure = kExitLocal;
  }
  if (first_failure) return first_failure;
  return renewed > 0 ? kExitOk : kExitNothingToDo;
}

}  // namespace autotls::cli
