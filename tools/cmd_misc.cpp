// autotls list / revoke / account: what is stored, revocation, and ACME account management.

#include <unistd.h>

#include <cctype>
#include <fstream>
#include <iostream>
#include <sstream>

#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "acme/ari.h"
#include "acme/jws.h"
#include "acme/util/openssl.h"
#include "tools/cli.h"
#include "tools/progress.h"

namespace autotls::cli {

namespace {

using json = nlohmann::json;
using std::chrono::system_clock;

std::string join(const std::vector<std::string>& v, const char* sep = ", ") {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : sep) + x;
  return s;
}

// new_stored_key generates an account key of the named type and writes it (0600) to
// storage_key before anyone uses it. A bad type name is Errc::invalid_input (exit 2).
Result<acme::PrivateKey> new_stored_key(Context& ctx, const std::string& type, const std::string& storage_key) {
  auto kt = acme::parse_key_type(type);
  if (!kt) return fail(Errc::invalid_input, "--key-type must be ec256, ec384, rsa2048, rsa3072 or rsa4096");
  auto k = acme::PrivateKey::generate(*kt);
  if (!k) return fail(k.error());
  auto pem = k->to_pem();
  if (!pem) return fail(pem.error());
  if (auto st = ctx.storage->put(storage_key, *pem, true); !st) return fail(st.error());
  return k;
}

struct AccountKeys {
  std::string dir, key, json, next_key;
  explicit AccountKeys(const std::string& directory_url)
      : dir("accounts/" + tlsreload::ca_storage_name(directory_url)),
        key(dir + "/account.key"),
        json(dir + "/account.json"),
        next_key(dir + "/account.next.key") {}
};

struct StoredAccount {
  acme::PrivateKey key;
  std::string url;
  json meta;
};

Result<std::optional<StoredAccount>> load_account(tlsreload::Storage& storage, const std::string& directory_url) {
  AccountKeys k(directory_url);
  auto pem = storage.get(k.key);
  if (!pem) return fail(pem.error());
  if (!*pem) return std::optional<StoredAccount>();
  auto key = acme::PrivateKey::from_pem(**pem);
  if (!key) return fail(key.error().with_context("account key " + k.key));
  auto text = storage.get(k.json);
  if (!text) return fail(text.error());
  json meta = *text ? json::parse(**text, nullptr, false) : json::object();
  if (!meta.is_object()) meta = json::object();
  std::string url = meta.value("url", "");
  return std::optional<StoredAccount>(StoredAccount{std::move(*key), url, meta});
}

Status save_account_json(tlsreload::Storage& storage, const std::string& directory_url, const acme::Account& a,
                         const json& previous) {
  AccountKeys k(directory_url);
  json j = previous.is_object() ? previous : json::object();
  j["url"] = a.url;
  j["directory_url"] = directory_url;
  j["contact"] = a.contact;
  j["status"] = a.status;
  if (!j.contains("created")) j["created"] = acme::format_rfc3339(system_clock::now());
  return storage.put(k.json, j.dump(2) + "\n");
}

void print_account(Context& ctx, const std::string& action, const acme::Account& a, const std::string& directory_url,
                   const std::string& thumbprint) {
  ctx.out.object({{"status", action}, {"account", {{"url", a.url}, {"status", a.status}, {"contact", a.contact},
                                                   {"directory_url", directory_url}, {"key_thumbprint", thumbprint}}}});
  ctx.out.result("account " + action + ": " + a.url);
  ctx.out.result("  CA:       " + directory_url);
  ctx.out.result("  status:   " + a.status);
  ctx.out.result("  contact:  " + (a.contact.empty() ? std::string("(none)") : join(a.contact)));
  ctx.out.result("  key:      " + thumbprint + " (JWK thumbprint)");
}

Result<std::string> first_certificate_der(const std::string& pem) {
  ossl::BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  X509* raw = bio ? PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr) : nullptr;
  if (!raw) return fail(Errc::invalid_input, "no PEM certificate found");
  ossl::X509Ptr x(raw);
  unsigned char* der = nullptr;
  int n = i2d_X509(x.get(), &der);
  if (n <= 0) return fail(Errc::crypto, "cannot encode the certificate");
  std::string out(reinterpret_cast<char*>(der), static_cast<size_t>(n));
  OPENSSL_free(der);
  return out;
}

// connect is make_client with its directory request shown as progress.
Result<std::unique_ptr<acme::Client>> connect(Context& ctx, ProgressPrinter& progress, const std::string& directory_url,
                                              const std::string& subject) {
  auto c = progress.wait("directory", "fetching the CA directory " + directory_url, subject,
                         [&] { return make_client(ctx, directory_url); });
  if (c) progress.step("directory", "CA directory fetched: " + directory_url, false, subject, directory_url);
  return c;
}

Result<std::string> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return fail(Errc::invalid_input, path + ": cannot read");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

int cmd_list(Context& ctx) {
  auto certs = stored_certificates(*ctx.storage);
  if (!certs) return report(ctx, certs.error());
  if (ctx.out.is_json()) {
    json arr = json::array();
    for (const auto& c : *certs) arr.push_back(cert_info_json(c, ctx.storage_root));
    ctx.out.object({{"storage", ctx.storage_root}, {"certificates", arr}});
    return kExitOk;
  }
  if (certs->empty()) {
    ctx.out.result("no certificates in " + ctx.storage_root);
    return kExitOk;
  }
  auto now = system_clock::now();
  for (const auto& c : *certs) {
    auto paths = live_paths(ctx.storage_root, c.key);
    // Unicode names are stored as punycode; people read them as they wrote them: "ascii (unicode)".
    std::vector<std::string> shown;
    for (const auto& n : c.names) shown.push_back(show_name(n));
    ctx.out.result(show_name(c.key));
    ctx.out.result("  names:         " + join(shown));
    if (c.has_cert) {
      auto days = std::chrono::duration_cast<std::chrono::hours>(c.not_after - now).count() / 24;
      ctx.out.result("  issuer:        " + c.issuer);
      ctx.out.result("  key type:      " + c.key_type);
      ctx.out.result("  not after:     " + acme::format_rfc3339(c.not_after) +
                     (now >= c.not_after ? std::string(" (EXPIRED)") : " (" + std::to_string(days) + " days left)"));
    } else {
      ctx.out.result("  problem:       " + c.problem);
    }
    ctx.out.result("  renewal:       " + std::string(c.due ? "due now" : acme::format_rfc3339(c.renewal_time)) + " (" +
                   c.renewal_reason + ")");
    if (!c.directory_url.empty()) ctx.out.result("  CA:            " + c.directory_url);
    if (!c.last_error.empty()) {
      ctx.out.result("  last error:    " + c.last_error + " (" + std::to_string(c.failures) + " failure(s))");
    }
    ctx.out.result("  fullchain:     " + paths.fullchain.string());
    ctx.out.result("  private key:   " + paths.key.string());
  }
  return kExitOk;
}

// mark_revoked records a revocation in the stored certificate's meta.json ("revoked"), so that
// a running `serve` (it polls storage) or the next start replaces the certificate at once.
// Nothing is written when storage now holds another certificate under that name (renewed
// meanwhile). Returns the state written, or nullopt.
Result<std::optional<tlsreload::CertificateState>> mark_revoked(tlsreload::Storage& storage, const std::string& key,
                                                                const std::string& der, const std::string& reason) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(der.data(), der.size(), md, &len, EVP_sha256(), nullptr) != 1) {
    return fail(Errc::io, "SHA-256 of the revoked certificate failed");
  }
  static const char* kHex = "0123456789abcdef";
  std::string id;
  for (unsigned int i = 0; i < len; ++i) {
    id += kHex[md[i] >> 4];
    id += kHex[md[i] & 15];
  }
  const std::string meta_key = "live/" + key + "/meta.json";
  auto meta = storage.get(meta_key);
  if (!meta) return fail(meta.error());
  tlsreload::CertificateState s;
  if (*meta) {
    auto parsed = tlsreload::CertificateState::from_json(**meta);
    if (parsed && !parsed->cert_id.empty() && parsed->cert_id != id) return std::optional<tlsreload::CertificateState>();
    if (parsed) s = std::move(*parsed);
  }
  s.cert_id = id;  // a certificate stored without meta.json gets a minimal one
  s.revoked_at = std::chrono::system_clock::now();
  s.revocation_reason = reason;
  if (auto st = storage.put(meta_key, s.to_json()); !st) return fail(st.error());
  return std::optional<tlsreload::CertificateState>(std::move(s));
}

namespace {

// delete_stored removes live/<key> and its versions from storage (FileStorage::remove_set:
// the set disappears at once, a crash leaves nothing a reader sees), holding the certificate's
// storage lock, so a renewal by another process (serve, a cron renew) is not cut in the middle.
// Prints what it did; returns the exit code.
int delete_stored(Context& ctx, const std::string& key, const std::vector<std::string>& names) {
  auto token = ctx.storage->lock("cert/" + key, std::chrono::seconds(60), autotls::system_clock().now() + std::chrono::seconds(5),
                                 autotls::system_clock());
  if (!token) {
    Error e = token.error();
    if (e.code == Errc::timeout) {
      e = Error(Errc::io, "another process (a renewal by serve or renew) holds the storage lock of " + key +
                              ": try again when it has finished");
    }
    return report(ctx, e.with_context("delete " + key));
  }
  Status removed = ctx.storage->remove_set("live/" + key);
  if (auto st = ctx.storage->unlock(*token); !st) ctx.out.info("autotls: warning: delete " + key + ": " + st.error().message);
  if (!removed) return report(ctx, removed.error().with_context("delete " + key));
  ctx.out.result("deleted " + key + " from " + ctx.storage_root);
  ctx.out.info("a serve or renew still configured for " + key + " obtains a new certificate");
  ctx.out.object({{"status", "deleted"}, {"certificate", key}, {"names", names}, {"storage", ctx.storage_root}});
  return kExitOk;
}

// confirm_delete asks before a delete, as certbot does, but only when someone can answer: stdin
// and stderr are terminals, and neither --yes nor --json or --quiet (a script's modes) was
// given. Anything but y or yes (either case), end of input included, is a no. Without a
// terminal it does not ask: scripts and tests behave as before the question existed.
bool confirm_delete(Context& ctx, const std::string& key) {
  const Options& o = ctx.options;
  if (o.yes || o.json || o.quiet || !::isatty(STDIN_FILENO) || !::isatty(STDERR_FILENO)) return true;
  const auto root = std::filesystem::path(ctx.storage_root);
  std::cerr << "Delete the certificate " << key << " and its files (" << (root / "live" / key).string() << ", "
            << (root / "archive" / key).string() << ")? [y/N] " << std::flush;
  std::string answer;
  if (!std::getline(std::cin, answer)) {
    std::cerr << "\n";
    return false;
  }
  std::string a;
  for (char ch : answer) {
    if (ch == ' ' || ch == '\t' || ch == '\r') continue;
    a += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  }
  return a == "y" || a == "yes";
}

}  // namespace

int cmd_delete(Context& ctx) {
  const Options& o = ctx.options;
  std::string key = tlsreload::storage_name(o.delete_name);
  if (!tlsreload::valid_storage_key("live/" + key)) return usage_error(ctx, "delete: \"" + o.delete_name + "\" is not a certificate name");
  auto c = stored_certificate(*ctx.storage, key);
  if (!c) return report(ctx, c.error());
  if (!*c) return usage_error(ctx, "delete: no stored certificate named " + o.delete_name + " in " + ctx.storage_root + " (see autotls list)");
  std::vector<std::string> names = (*c)->names.empty() ? std::vector<std::string>{key} : (*c)->names;
  if (!confirm_delete(ctx, key)) {
    ctx.out.info("delete cancelled: nothing deleted (answer y to delete, or give --yes)");
    return kExitNothingToDo;
  }
  return delete_stored(ctx, key, names);
}

int cmd_revoke(Context& ctx) {
  const Options& o = ctx.options;
  if (o.revoke_name.empty() == o.cert_file.empty()) return usage_error(ctx, "revoke: give a stored NAME or --cert FILE (one of them)");
  std::optional<acme::RevocationReason> reason;
  if (!o.reason.empty()) {
    reason = acme::parse_revocation_reason(o.reason);
    if (!reason) {
      return usage_error(ctx, "--reason must be unspecified, keyCompromise, affiliationChanged, superseded or "
                              "cessationOfOperation (or their numbers), not \"" + o.reason + "\"");
    }
  }
  std::string pem;
  std::string directory_url = ctx.directory_url;
  std::string what;
  if (o.delete_after_revoke && o.revoke_name.empty()) {
    return usage_error(ctx, "revoke: --delete-after-revoke needs a stored NAME, not --cert");
  }
  if (!o.revoke_name.empty()) {
    std::string key = tlsreload::storage_name(o.revoke_name);
    auto c = stored_certificate(*ctx.storage, key);
    if (!c) return report(ctx, c.error());
    auto text = ctx.storage->get("live/" + key + "/cert.pem");
    if (!text) return report(ctx, text.error());
    if (!*c || !*text || text->value().empty()) return usage_error(ctx, "revoke: no stored certificate named " + o.revoke_name + " in " + ctx.storage_root);
    pem = **text;
    if (!ctx.ca_given && !(*c)->directory_url.empty()) directory_url = (*c)->directory_url;
    what = key;
  } else {
    auto text = read_file(o.cert_file);
    if (!text) return usage_error(ctx, text.error().message);
    pem = *text;
    what = o.cert_file;
  }
  auto der = first_certificate_der(pem);
  if (!der) return usage_error(ctx, "revoke: " + what + ": " + der.error().message);

  std::unique_ptr<acme::KeySigner> cert_signer;
  if (!o.key_file.empty()) {
    auto text = read_file(o.key_file);
    if (!text) return usage_error(ctx, text.error().message);
    auto key = acme::PrivateKey::from_pem(*text);
    if (!key) return usage_error(ctx, "--key " + o.key_file + ": " + key.error().message);
    cert_signer = std::make_unique<acme::KeySigner>(std::move(*key));
  }
  ctx.out.info("revoking " + what + " at " + directory_url + (cert_signer ? " (signed by the certificate key)" : " (signed by the account key)"));
  ProgressPrinter progress(ProgressPrinter::mode_for(o));
  auto client = connect(ctx, progress, directory_url, what);
  if (!client) return report(ctx, client.error());
  if (!cert_signer) {
    auto account = load_account(*ctx.storage, directory_url);
    if (!account) return report(ctx, account.error());
    if (!*account || (*account)->url.empty()) {
      return usage_error(ctx, "revoke: no ACME account for " + directory_url + " in " + ctx.storage_root +
                                  ": use --key with the certificate's private key, or the --ca that issued it");
    }
    (*client)->set_account(std::make_shared<acme::KeySigner>((*account)->key), (*account)->url);
    progress.step("account", "ACME account ready: " + (*account)->url, false, what, (*account)->url);
  }
  auto revoked = progress.wait("revoke", "asking the CA to revoke " + what, what,
                               [&] { return (*client)->revoke(*der, reason, cert_signer.get()); });
  if (!revoked) return report(ctx, revoked.error());
  progress.step("revoke", "certificate revoked: " + what + (o.reason.empty() ? "" : " (" + o.reason + ")"), false, what);
  ctx.out.result("revoked " + what);
  if (o.revoke_name.empty()) {
    ctx.out.object({{"status", "revoked"}, {"certificate", what}, {"directory_url", directory_url}});
    return kExitOk;
  }
  // A stored certificate: say so in meta.json (a running serve renews it at once), print the
  // revoked event and run the event hook.
  auto marked = mark_revoked(*ctx.storage, what, *der, o.reason);
  if (!marked) return report(ctx, marked.error().with_context("revoked, but meta.json not updated"));
  std::vector<std::string> names = *marked ? (*marked)->names : std::vector<std::string>{};
  if (names.empty()) names = {what};
  json j = {{"event", "revoked"}, {"status", "revoked"}, {"certificate", what}, {"names", names},
            {"directory_url", directory_url}};
  if (*marked) {
    j["revoked_at"] = acme::format_rfc3339(*(*marked)->revoked_at);
    ctx.out.info("recorded in " + live_paths(ctx.storage_root, what).meta.string() +
                 ": a running `autotls serve` renews it at once");
  }
  ctx.out.object(j);
  if (!o.event_hook.empty()) {
    if (auto st = run_event_hook(o.event_hook, "revoked", names, live_paths(ctx.storage_root, what)); !st) {
      return report(ctx, st.error());
    }
  }
  // After the hook, which may still want the files (AUTOTLS_CERT_PATH and friends). Not when
  // storage holds another certificate by now (renewed meanwhile): that one is not revoked.
  if (o.delete_after_revoke && !*marked) {
    ctx.out.info("not deleted: " + what + " holds a newer certificate than the one revoked");
  } else if (o.delete_after_revoke) {
    return delete_stored(ctx, what, names);
  }
  return kExitOk;
}

int cmd_account(Context& ctx, const std::string& action) {
  const Options& o = ctx.options;
  const std::string& dir_url = ctx.directory_url;
  AccountKeys keys(dir_url);
  auto stored = load_account(*ctx.storage, dir_url);
  if (!stored) return report(ctx, stored.error());
  // Declared before the client: a spinner line is cleared before anything else is printed.
  ProgressPrinter progress(ProgressPrinter::mode_for(o));

  if (action == "register") {
    auto eab = eab_from(o);
    if (!eab) return usage_error(ctx, eab.error().message);
    auto client = connect(ctx, progress, dir_url, dir_url);
    if (!client) return report(ctx, client.error());
    if (!o.agree_tos && !(*stored && !(*stored)->url.empty()) && !(*client)->directory().terms_of_service.empty()) {
      return usage_error(ctx, "account register: read the CA's terms of service at " +
                                  (*client)->directory().terms_of_service + " and pass --agree-tos");
    }
    std::optional<acme::PrivateKey> key;
    json previous = json::object();
    if (*stored) {
      key = (*stored)->key;
      previous = (*stored)->meta;
    } else {
      // Saved before registering: a crash after the CA created the account finds it again.
      auto k = new_stored_key(ctx, o.new_key_type, keys.key);
      if (!k) return report(ctx, k.error());
      key = std::move(*k);
      progress.step("key", "account key generated (" + o.new_key_type + ") and saved", false, dir_url);
    }
    (*client)->set_account(std::make_shared<acme::KeySigner>(*key));
    acme::NewAccountOptions na;
    if (!o.email.empty()) na.contact.push_back("mailto:" + o.email);
    na.agree_to_terms = o.agree_tos;
    na.eab = *eab;
    auto a = progress.wait("register", "registering the account at the CA", dir_url,
                           [&] { return (*client)->register_account(na); });
    if (!a) return report(ctx, a.error());
    progress.step("register", "account registered: " + a->url, false, dir_url, a->url);
    if (auto st = save_account_json(*ctx.storage, dir_url, *a, previous); !st) return report(ctx, st.error());
    print_account(ctx, "registered", *a, dir_url, key->thumbprint());
    return kExitOk;
  }

  if (!*stored || (*stored)->url.empty()) {
    return usage_error(ctx, "account " + action + ": no ACME account for " + dir_url + " in " + ctx.storage_root +
                                " (autotls account register --ca ... --agree-tos)");
  }
  auto client = connect(ctx, progress, dir_url, dir_url);
  if (!client) return report(ctx, client.error());
  StoredAccount& acct = **stored;
  (*client)->set_account(std::make_shared<acme::KeySigner>(acct.key), acct.url);

  if (action == "show") {
    auto a = progress.wait("account", "fetching the account " + acct.url, dir_url, [&] { return (*client)->fetch_account(); });
    if (!a) return report(ctx, a.error());
    progress.step("account", "account fetched: " + a->url, false, dir_url, a->url);
    print_account(ctx, "found", *a, dir_url, acct.key.thumbprint());
    return kExitOk;
  }
  if (action == "update") {
    if (o.email.empty()) return usage_error(ctx, "account update: give the new contact with --email");
    auto a = progress.wait("update", "updating the account contact to mailto:" + o.email, dir_url,
                           [&] { return (*client)->update_account({"mailto:" + o.email}); });
    if (!a) return report(ctx, a.error());
    progress.step("update", "account contact updated: " + a->url, false, dir_url, a->url);
    if (auto st = save_account_json(*ctx.storage, dir_url, *a, acct.meta); !st) return report(ctx, st.error());
    print_account(ctx, "updated", *a, dir_url, acct.key.thumbprint());
    return kExitOk;
  }
  if (action == "rollover") {
    // The new key is on disk before the CA switches to it: a crash in between leaves both keys,
    // and account.next.key is the one to try.
    auto k = new_stored_key(ctx, o.new_key_type, keys.next_key);
    if (!k) return report(ctx, k.error());
    auto pem = k->to_pem();
    if (!pem) return report(ctx, pem.error());
    progress.step("key", "new account key generated (" + o.new_key_type + ") and saved", false, dir_url);
    if (auto st = progress.wait("rollover", "replacing the account key at the CA (RFC 8555 section 7.3.5)", dir_url,
                                [&] { return (*client)->change_key(std::make_shared<acme::KeySigner>(*k)); });
        !st) {
      (void)ctx.storage->remove(keys.next_key);
      return report(ctx, st.error());
    }
    if (auto st = ctx.storage->put(keys.key, *pem, true); !st) return report(ctx, st.error());
    (void)ctx.storage->remove(keys.next_key);
    progress.step("rollover", "account key replaced: " + acct.url, false, dir_url, acct.url);
    auto a = progress.wait("account", "fetching the account " + acct.url, dir_url, [&] { return (*client)->fetch_account(); });
    if (a) progress.step("account", "account fetched: " + a->url, false, dir_url, a->url);
    acme::Account shown;
    if (a) shown = *a;
    else shown.url = acct.url, shown.status = "valid";
    print_account(ctx, "rolled over", shown, dir_url, k->thumbprint());
    return kExitOk;
  }
  if (action == "deactivate") {
    auto a = progress.wait("deactivate", "deactivating the account " + acct.url, dir_url,
                           [&] { return (*client)->deactivate_account(); });
    if (!a) return report(ctx, a.error());
    progress.step("deactivate", "account deactivated: " + a->url, false, dir_url, a->url);
    // A deactivated account can never be used again (RFC 8555 §7.3.6): forget it, so the next
    // issuance registers a new one.
    (void)ctx.storage->remove(keys.key);
    (void)ctx.storage->remove(keys.json);
    print_account(ctx, "deactivated", *a, dir_url, acct.key.thumbprint());
    ctx.out.result("  local account files removed from " + ctx.storage_root + "/" + keys.dir);
    return kExitOk;
  }
  return usage_error(ctx, "account: unknown action " + action);
}

}  // namespace autotls::cli
