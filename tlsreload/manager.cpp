#include "tlsreload/manager.h"

#include <algorithm>
#include <cmath>

#include <nlohmann/json.hpp>

#include "acme/ari.h"
#include "acme/jws.h"
#include "acme/types.h"
#include "acme/util/der.h"
#include "tlsreload/internal_ca.h"

namespace autotls::tlsreload {

namespace {

using json = nlohmann::json;
using std::chrono::system_clock;
constexpr std::string_view kLog = "tlsreload.manager";

// ari_id_of is RFC 9773's identifier of the chain's leaf: read from the DER when it can be
// (der::ari_cert_id), else through OpenSSL's parser (acme::ari_cert_id, ~0.7 ms in 3.0).
std::string ari_id_of(std::string_view chain_pem) {
  if (auto id = der::ari_cert_id(chain_pem)) return *id;
  return acme::ari_cert_id(chain_pem).value_or("");
}

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}

// normalize lower-cases names and drops trailing dots (RFC 4343: DNS names compare without
// case) so that the same set always maps to the same storage name.
std::vector<std::string> normalize(const std::vector<std::string>& names) {
  std::vector<std::string> out;
  for (const auto& n : names) {
    std::string_view v = n;
    while (v.ends_with('.')) v.remove_suffix(1);
    // An address in the text its certificate's names give it ("0:0::ABCD" is "::abcd"), or a
    // stored certificate would never be found to cover it.
    std::string l = acme::canonical_ip(v).value_or(lower(v));
    if (std::find(out.begin(), out.end(), l) == out.end()) out.push_back(std::move(l));
  }
  return out;
}

bool covers(const Certificate& cert, const std::vector<std::string>& names) {
  const auto& have = cert.names();
  return std::all_of(names.begin(), names.end(), [&](const std::string& n) {
    return std::find(have.begin(), have.end(), n) != have.end();
  });
}

std::string live_key(const std::string& name, std::string_view file) {
  return "live/" + name + "/" + std::string(file);
}

void put_time(json& j, const char* field, const std::optional<system_clock::time_point>& t) {
  if (t) j[field] = acme::format_rfc3339(*t);
}

std::optional<system_clock::time_point> get_time(const json& j, const char* field) {
  auto it = j.find(field);
  if (it == j.end() || !it->is_string()) return std::nullopt;
  return acme::parse_rfc3339(it->get<std::string>());
}

std::string get_string(const json& j, const char* field) {
  auto it = j.find(field);
  return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
}

// LockKeeper refreshes a held storage lock until destroyed, then releases it: an issuance may
// outlast the lock's ttl (slow validation, Retry-After), and a lock that silently expired
// would let another process issue the same names.
//
// Its refresh thread is detached, not joined: the destructor sets done under the mutex the
// thread holds while it refreshes, so once it has the mutex no refresh runs or follows, and
// the lock is released at once. Joining there made the release (and the end of every
// issuance) wait until the woken thread was scheduled and exited: 0.1 ms on an idle machine,
// up to 12 ms on a loaded one (cli_trace of `autotls issue`). The thread touches the storage
// and the logger only while done is false; after that only the state it shares.
class LockKeeper {
 public:
  LockKeeper(Storage& storage, LockToken token, std::chrono::seconds ttl, Logger& logger)
      : storage_(storage), token_(std::move(token)), logger_(logger), state_(std::make_shared<State>()) {
    std::thread([state = state_, &storage, token = token_, ttl, &logger] { run(*state, storage, token, ttl, logger); })
        .detach();
  }
  ~LockKeeper() {
    {
      std::lock_guard lock(state_->mu);
      state_->done = true;
    }
    state_->cv.notify_all();
    if (auto st = storage_.unlock(token_); !st) {
      logger_.log(LogLevel::warn, kLog, "unlock failed", {{"lock", token_.name}, {"error", st.error().message}});
    }
  }
  LockKeeper(const LockKeeper&) = delete;
  LockKeeper& operator=(const LockKeeper&) = delete;

 private:
  struct State {
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
  };

  static void run(State& state, Storage& storage, const LockToken& token, std::chrono::seconds ttl, Logger& logger) {
    std::unique_lock lock(state.mu);
    // Real time on purpose: the lease must be renewed however an injected clock moves.
    auto period = std::max<std::chrono::milliseconds>(ttl / 3, std::chrono::milliseconds(100));
    while (!state.cv.wait_for(lock, period, [&state] { return state.done; })) {
      if (auto st = storage.refresh(token, ttl); !st) {
        logger.log(LogLevel::warn, kLog, "lock refresh failed", {{"lock", token.name}, {"error", st.error().message}});
      }
    }
  }

  Storage& storage_;
  LockToken token_;
  Logger& logger_;
  std::shared_ptr<State> state_;
};

}  // namespace

std::string_view to_string(ManagerEvent::Type type) {
  switch (type) {
    case ManagerEvent::Type::loaded: return "loaded";
    case ManagerEvent::Type::obtained: return "obtained";
    case ManagerEvent::Type::renewed: return "renewed";
    case ManagerEvent::Type::failed: return "failed";
    case ManagerEvent::Type::expiring: return "expiring";
    case ManagerEvent::Type::revoked: return "revoked";
    case ManagerEvent::Type::issuer_failed: return "issuer_failed";
  }
  return "unknown";
}

std::string CertificateState::to_json() const {
  json j;
  j["names"] = names;
  j["directory_url"] = directory_url;
  j["issuer_name"] = issuer_name;
  j["issuer"] = issuer;
  if (!profile.empty()) j["profile"] = profile;
  j["cert_id"] = cert_id;
  j["serial"] = serial;
  j["ari_id"] = ari_id;
  j["not_before"] = acme::format_rfc3339(not_before);
  j["not_after"] = acme::format_rfc3339(not_after);
  json ari = json::object();
  put_time(ari, "window_start", ari_window_start);
  put_time(ari, "window_end", ari_window_end);
  put_time(ari, "selected", ari_selected);
  put_time(ari, "next_fetch", ari_next_fetch);
  if (!ari_explanation_url.empty()) ari["explanation_url"] = ari_explanation_url;
  j["ari"] = ari;
  j["failures"] = failures;
  j["last_error"] = last_error;
  put_time(j, "next_attempt", next_attempt);
  if (revoked_at) {
    json r = {{"at", acme::format_rfc3339(*revoked_at)}};
    if (!revocation_reason.empty()) r["reason"] = revocation_reason;
    j["revoked"] = r;
  }
  return j.dump(2) + "\n";
}

Result<CertificateState> CertificateState::from_json(std::string_view text) {
  auto j = json::parse(text, nullptr, false);
  if (!j.is_object()) return fail(Errc::bad_response, "meta.json: not a JSON object");
  CertificateState s;
  if (auto it = j.find("names"); it != j.end() && it->is_array()) {
    for (const auto& n : *it) {
      if (n.is_string()) s.names.push_back(n.get<std::string>());
    }
  }
  s.directory_url = get_string(j, "directory_url");
  s.issuer_name = get_string(j, "issuer_name");
  s.issuer = get_string(j, "issuer");
  s.profile = get_string(j, "profile");
  s.cert_id = get_string(j, "cert_id");
  s.serial = get_string(j, "serial");
  s.ari_id = get_string(j, "ari_id");
  s.not_before = get_time(j, "not_before").value_or(system_clock::time_point{});
  s.not_after = get_time(j, "not_after").value_or(system_clock::time_point{});
  if (auto ari = j.find("ari"); ari != j.end() && ari->is_object()) {
    s.ari_window_start = get_time(*ari, "window_start");
    s.ari_window_end = get_time(*ari, "window_end");
    s.ari_selected = get_time(*ari, "selected");
    s.ari_next_fetch = get_time(*ari, "next_fetch");
    s.ari_explanation_url = get_string(*ari, "explanation_url");
  }
  // A count as written, within what record_failure can add to (an edited file may say anything).
  if (auto f = j.find("failures"); f != j.end() && f->is_number_integer()) {
    s.failures = static_cast<int>(std::clamp<long long>(f->get<long long>(), 0, 1'000'000));
  }
  s.last_error = get_string(j, "last_error");
  s.next_attempt = get_time(j, "next_attempt");
  if (auto r = j.find("revoked"); r != j.end() && r->is_object()) {
    s.revoked_at = get_time(*r, "at");
    if (s.revoked_at) s.revocation_reason = get_string(*r, "reason");
  }
  return s;
}

system_clock::time_point ratio_renewal_time(system_clock::time_point not_before,
                                            system_clock::time_point not_after, double ratio) {
  auto lifetime = not_after - not_before;
  // Short-lived certificates get half their lifetime: a third of 6 days leaves too little
  // room for a retry or two after a failed renewal.
  if (lifetime < std::chrono::hours(24 * 10)) ratio = std::max(ratio, 0.5);
  ratio = std::clamp(ratio, 0.0, 1.0);
  auto remaining = std::chrono::duration_cast<system_clock::duration>(lifetime * ratio);
  return not_after - remaining;
}

// kMaxHonouredRetryAfter bounds the Retry-After a failed issuance waits out (record_failure).
constexpr std::chrono::seconds kMaxHonouredRetryAfter{7 * 24 * 3600};
// The renewalInfo poll interval, whatever Retry-After says (RFC 9773 §4.3.3's "reasonable
// limits"): not more often than once a minute, at least twice a day.
constexpr std::chrono::seconds kAriMinPoll{60};
constexpr std::chrono::seconds kAriMaxPoll{12 * 3600};

std::chrono::seconds failure_backoff(int failures) {
  constexpr std::chrono::seconds kFirst{60};
  constexpr std::chrono::seconds kCap{24 * 3600};
  if (failures <= 1) return kFirst;
  if (failures > 20) return kCap;
  return std::min(kFirst * (int64_t{1} << (failures - 1)), kCap);
}

// StopClock delegates to the configured clock, and lets stop(grace) cut every wait short: a
// cancelled sleep returns false, which the ACME client and Storage::lock treat as "abandon".
class Manager::StopClock : public Clock {
 public:
  explicit StopClock(Clock& inner) : inner_(inner) {}
  time_point now() const override { return inner_.now(); }
  bool sleep_for(std::chrono::milliseconds d) override {
    if (cancelled()) return false;
    if (&inner_ != &autotls::system_clock()) {
      // An injected clock (tests, the CLI's own cancellable clock) decides how to wait.
      return inner_.sleep_for(d) && !cancelled();
    }
    std::unique_lock lock(mu_);
    return !cv_.wait_for(lock, d, [this] { return cancelled_; });
  }
  void cancel(bool on) {
    {
      std::lock_guard lock(mu_);
      cancelled_ = on;
    }
    cv_.notify_all();
  }
  bool cancelled() const {
    std::lock_guard lock(mu_);
    return cancelled_;
  }

 private:
  Clock& inner_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool cancelled_ = false;
};

// IssuerSlot is one configured issuer with its lazily made client, account and internal CA.
struct Manager::IssuerSlot {
  IssuerConfig cfg;
  std::mutex mu;  // guards the members below and the account set-up
  std::unique_ptr<acme::Client> client;
  bool account_ready = false;
  // The stored account (key and URL), read by issue_at before the client connects; taken by
  // the next ensure_account.
  std::optional<StoredAccount> stored_account;
  std::shared_ptr<InternalCA> internal;
};

Manager::Manager(ManagerOptions options, std::shared_ptr<Storage> storage, std::shared_ptr<CertStore> store,
                 std::shared_ptr<ChallengeStore> challenges)
    : options_(std::move(options)),
      storage_(std::move(storage)),
      store_(std::move(store)),
      challenges_(std::move(challenges)),
      stop_clock_(std::make_unique<StopClock>(options_.clock ? *options_.clock : autotls::system_clock())),
      clock_(stop_clock_.get()),
      logger_(options_.logger ? options_.logger : &null_logger()),
      rng_(options_.rng_seed ? options_.rng_seed : std::random_device{}()) {
  std::vector<IssuerConfig> list = options_.issuers;
  if (list.empty()) {
    IssuerConfig one;
    one.internal = options_.directory_url == kInternalIssuer;
    if (!one.internal) one.directory_url = options_.directory_url;
    list.push_back(std::move(one));
  }
  for (auto& cfg : list) {
    // What an issuer leaves empty comes from the top-level options.
    if (cfg.directory_url == kInternalIssuer) cfg.internal = true;
    if (cfg.ca_bundle.empty()) cfg.ca_bundle = options_.ca_bundle;
    if (cfg.email.empty()) cfg.email = options_.email;
    if (!cfg.eab && options_.issuers.empty()) cfg.eab = options_.eab;
    if (cfg.profile.empty()) cfg.profile = options_.profile;
    if (cfg.preferred_chain.empty()) cfg.preferred_chain = options_.preferred_chain;
    if (!cfg.key_type) cfg.key_type = options_.key_type;
    if (!cfg.transport) cfg.transport = options_.transport;
    auto slot = std::make_unique<IssuerSlot>();
    slot->cfg = std::move(cfg);
    issuers_.push_back(std::move(slot));
  }
}

Manager::~Manager() { stop(); }

Manager::Counters Manager::counters() const {
  return {loaded_.load(),    obtained_.load(), renewed_.load(),  failed_.load(),
          fallbacks_.load(), expiring_.load(), abandoned_.load(), revoked_.load()};
}

void Manager::emit(ManagerEvent::Type type, const Managed& m, const Error* error) {
  ManagerEvent e;
  e.type = type;
  e.name = m.key;
  e.names = m.names;
  if (m.cert) e.cert_id = m.cert->id();
  e.issuer = m.state.issuer_name;
  if (error) e.error = *error;
  if (m.cert) e.not_after = m.cert->not_after();
  std::lock_guard lock(events_mu_);
  pending_events_.push_back(std::move(e));
}

// IssueSlot is a counting semaphore's hold: at most max_concurrent_issuances orders at once.
class Manager::IssueSlot {
 public:
  explicit IssueSlot(Manager& m) : m_(m) {
    const int cap = std::max(1, m_.options_.max_concurrent_issuances);
    std::unique_lock lock(m_.slots_mu_);
    m_.slots_cv_.wait(lock, [&] { return m_.slots_used_ < cap; });
    ++m_.slots_used_;
  }
  ~IssueSlot() {
    {
      std::lock_guard lock(m_.slots_mu_);
      --m_.slots_used_;
    }
    // notify_all: stop(grace) waits on the same condition for no order in flight.
    m_.slots_cv_.notify_all();
  }
  IssueSlot(const IssueSlot&) = delete;
  IssueSlot& operator=(const IssueSlot&) = delete;

 private:
  Manager& m_;
};

std::shared_ptr<std::mutex> Manager::name_mutex(const std::string& key) {
  std::lock_guard lock(names_mu_);
  auto& m = name_mutexes_[key];
  if (!m) m = std::make_shared<std::mutex>();
  return m;
}

void Manager::flush_events() {
  std::vector<ManagerEvent> events;
  {
    std::lock_guard lock(events_mu_);
    events.swap(pending_events_);
  }
  if (!options_.on_event) return;
  for (const auto& e : events) options_.on_event(e);
}

// client returns the ACME client of an issuer, connecting on first use. Call with slot.mu held.
Result<acme::Client*> Manager::client(IssuerSlot& slot) {
  if (slot.client) return slot.client.get();
  acme::ClientOptions o = options_.client_options;
  o.directory_url = slot.cfg.directory_url;
  o.transport = slot.cfg.transport;
  if (!o.transport) {
    acme::CurlOptions curl;
    curl.ca_bundle = slot.cfg.ca_bundle;
    o.transport = std::shared_ptr<acme::HttpTransport>(acme::make_curl_transport(curl));
  }
  o.clock = clock_;
  o.logger = logger_;
  // A CA with another after it in the list: if nothing answers its directory, one retry (0.5 s,
  // for a blip) and then the next CA, not 3.5 s of backoff per issuance. The last (or only)
  // CA keeps the full retries: there is nowhere else to go, and it may be restarting.
  if (o.max_directory_transport_retries < 0 && &slot != issuers_.back().get()) o.max_directory_transport_retries = 1;
  auto c = acme::Client::create(std::move(o));
  if (!c) return fail(c.error());
  slot.client = std::move(*c);
  return slot.client.get();
}

Manager::IssuerSlot* Manager::slot_for(const std::string& account_id) {
  for (auto& s : issuers_) {
    if (s->cfg.account_id() == account_id) return s.get();
  }
  return nullptr;
}

bool Manager::cancelled() const { return stop_clock_->cancelled(); }

Result<std::shared_ptr<InternalCA>> Manager::internal_ca(IssuerSlot& slot) {
  if (slot.internal) return slot.internal;
  InternalCA::Options o;
  o.leaf_lifetime = options_.internal_lifetime;
  o.lock_ttl = options_.lock_ttl;
  o.lock_wait = options_.lock_wait;
  auto ca = InternalCA::load_or_create(*storage_, *clock_, *logger_, o);
  if (!ca) return fail(ca.error());
  slot.internal = *ca;
  logger_->log(LogLevel::info, kLog, "internal CA ready: trust its root to trust its certificates",
               {{"root", std::string(InternalCA::kRootCertKey)}});
  return slot.internal;
}

Result<std::string> Manager::internal_root_pem() {
  for (auto& s : issuers_) {
    if (!s->cfg.internal) continue;
    std::lock_guard lock(s->mu);
    auto ca = internal_ca(*s);
    if (!ca) return fail(ca.error());
    return (*ca)->root_pem();
  }
  return fail(Errc::invalid_input, "no internal issuer is configured");
}

// ensure_account loads the account for this CA from storage or registers one. Account data is
// per directory URL: an account exists at one CA only (RFC 8555 §7.3).
// Call with slot.mu held.
Result<Manager::StoredAccount> Manager::load_account(const IssuerSlot& slot) {
  const std::string dir = "accounts/" + ca_storage_name(slot.cfg.directory_url);
  const std::string key_key = dir + "/account.key", json_key = dir + "/account.json";
  auto key_pem = storage_->get(key_key);
  if (!key_pem) return fail(key_pem.error());
  if (!*key_pem) return StoredAccount{};
  auto key = acme::PrivateKey::from_pem(**key_pem);
  if (!key) return fail(key.error().with_context("account key " + key_key));
  auto text = storage_->get(json_key);
  if (!text) return fail(text.error());
  std::string url;
  if (*text) url = get_string(json::parse(**text, nullptr, false), "url");
  return StoredAccount{std::move(*key), url};
}

Status Manager::ensure_account(IssuerSlot& slot, acme::Client& client, bool reregister) {
  if (slot.account_ready && !reregister) return {};
  const std::string& directory_url = slot.cfg.directory_url;
  const std::string dir = "accounts/" + ca_storage_name(directory_url);
  const std::string key_key = dir + "/account.key", json_key = dir + "/account.json";

  // What issue_at read before connecting, unless registering again (then read it afresh).
  std::optional<StoredAccount> stored = std::exchange(slot.stored_account, std::nullopt);
  Result<StoredAccount> loaded = stored && !reregister ? Result<StoredAccount>(std::move(*stored)) : load_account(slot);
  if (!loaded) return fail(loaded.error());
  if (loaded->key && !loaded->url.empty() && !reregister) {
    client.set_account(std::make_shared<acme::KeySigner>(*loaded->key), loaded->url);
    slot.account_ready = true;
    return {};
  }

  // Creating an account: lock so that processes sharing the storage create one, not several.
  auto token = storage_->lock("account/" + ca_storage_name(directory_url), options_.lock_ttl,
                              clock_->now() + options_.lock_wait, *clock_);
  if (!token) return fail(token.error());
  LockKeeper keeper(*storage_, *token, options_.lock_ttl, *logger_);
  loaded = load_account(slot);
  if (!loaded) return fail(loaded.error());
  if (loaded->key && !loaded->url.empty() && !reregister) {
    client.set_account(std::make_shared<acme::KeySigner>(*loaded->key), loaded->url);
    slot.account_ready = true;
    return {};
  }
  std::optional<acme::PrivateKey> key = loaded->key;
  if (!key) {
    auto k = acme::PrivateKey::generate(acme::KeyType::ec256);
    if (!k) return fail(k.error());
    auto pem = k->to_pem();
    if (!pem) return fail(pem.error());
    // The key is saved before registering: if we crash after the CA created the account, the
    // next run finds it again with the same key (RFC 8555 §7.3.1).
    if (auto st = storage_->put(key_key, *pem, /*secret=*/true); !st) return st;
    key = std::move(*k);
  }
  client.set_account(std::make_shared<acme::KeySigner>(*key));
  acme::NewAccountOptions na;
  if (!slot.cfg.email.empty()) na.contact.push_back("mailto:" + slot.cfg.email);
  na.agree_to_terms = options_.agree_to_terms;
  na.eab = slot.cfg.eab;
  auto account = client.register_account(na);
  if (!account) return fail(account.error());
  json j{{"url", account->url}, {"directory_url", directory_url}, {"contact", account->contact},
         {"status", account->status}, {"created", acme::format_rfc3339(clock_->now())}};
  if (auto st = storage_->put(json_key, j.dump(2) + "\n"); !st) return st;
  logger_->log(LogLevel::info, kLog, "ACME account ready", {{"account", account->url}, {"issuer", slot.cfg.label()}});
  slot.account_ready = true;
  return {};
}

// load_stored returns the certificate stored under key, validated, with its state; nullopt
// when there is none or it is unusable (half-replaced pair, expired, corrupt), in which case
// it will be issued again.
Result<std::optional<Manager::Managed>> Manager::load_stored(const std::string& key,
                                                            const std::vector<std::string>& names,
                                                            const CertificateSettings& settings) {
  // The generation first: a change after it is noticed by adopt_stored's next look.
  auto generation = storage_->generation(live_key(key, "fullchain.pem"));
  if (!generation) return fail(generation.error());
  auto chain = storage_->get(live_key(key, "fullchain.pem"));
  if (!chain) return fail(chain.error());
  auto priv = storage_->get(live_key(key, "privkey.pem"));
  if (!priv) return fail(priv.error());
  if (!*chain || !*priv) return std::optional<Managed>();
  LoadOptions lo;
  lo.clock = clock_;
  auto cert = Certificate::from_pem(**chain, **priv, lo);
  if (!cert) {
    logger_->log(LogLevel::warn, kLog, "stored certificate unusable; it will be issued again",
                 {{"name", key}, {"error", cert.error().message}});
    return std::optional<Managed>();
  }
  Managed m;
  m.names = names;
  m.key = key;
  m.settings = settings;
  m.cert = *cert;
  m.chain_pem = **chain;
  m.generation = *generation;
  auto meta_generation = storage_->generation(live_key(key, "meta.json"));
  if (!meta_generation) return fail(meta_generation.error());
  m.meta_generation = *meta_generation;
  auto meta = storage_->get(live_key(key, "meta.json"));
  if (!meta) return fail(meta.error());
  if (*meta) {
    auto s = CertificateState::from_json(**meta);
    // State written for another certificate (a crash between the files) describes nothing here.
    if (s && s->cert_id == (*cert)->id()) m.state = std::move(*s);
  }
  auto& st = m.state;
  st.names = names;
  // A certificate without state (written by someone else) is taken as the first issuer's.
  if (st.directory_url.empty()) {
    st.directory_url = issuers_.front()->cfg.account_id();
    st.issuer_name = issuers_.front()->cfg.label();
  }
  st.issuer = (*cert)->issuer_dn();
  st.cert_id = (*cert)->id();
  st.serial = (*cert)->serial_hex();
  st.not_before = (*cert)->not_before();
  st.not_after = (*cert)->not_after();
  if (st.ari_id.empty()) st.ari_id = ari_id_of(m.chain_pem);
  return std::optional<Managed>(std::move(m));
}

system_clock::time_point Manager::due_time(const Managed& m) const {
  // Nothing served, a revoked certificate, or one whose key type is no longer the configured
  // one: due now.
  if (!m.cert || m.state.revoked_at || key_type_changed(m)) return system_clock::time_point{};
  auto nb = m.cert->not_before(), na = m.cert->not_after();
  if (m.state.ari_selected) {
    // RFC 9773 §4.3.2 lets the CA move the window; whatever it says, a certificate this close
    // to expiry is renewed now (half the usual remaining share).
    auto emergency = ratio_renewal_time(nb, na, std::clamp(options_.renewal_ratio, 0.0, 1.0) / 2);
    return std::min(*m.state.ari_selected, emergency);
  }
  return ratio_renewal_time(nb, na, options_.renewal_ratio);
}

acme::KeyType Manager::expected_key_type(const Managed& m) const {
  if (m.settings.key_type) return *m.settings.key_type;
  for (const auto& s : issuers_) {
    if (s->cfg.account_id() == m.state.directory_url) return *s->cfg.key_type;
  }
  return *issuers_.front()->cfg.key_type;
}

bool Manager::key_type_changed(const Managed& m) const {
  return m.cert && m.cert->key_type() != acme::to_string(expected_key_type(m));
}

Status Manager::publish_replacing(const std::string& key, const std::shared_ptr<const Certificate>& next,
                                  const Certificate* previous) {
  std::lock_guard lock(publish_mu_);
  if (held_.count(key)) {
    // unmanage() came while this certificate was being issued or loaded: something else serves
    // these names now, and must keep serving them.
    logger_->log(LogLevel::info, kLog, "certificate not published: its names are no longer managed",
                 {{"name", key}, {"id", next->id()}});
    return {};
  }
  if (auto st = store_->publish(next); !st) return st;
  published_[key] = next->id();
  if (previous && previous->key_kind() != next->key_kind() && previous->id() != next->id()) {
    // Nothing to undo if it is gone already (another path removed it): the new one serves.
    (void)store_->remove(previous->id());
  }
  return {};
}

bool Manager::due(const Managed& m) const {
  return !m.cert || !covers(*m.cert, m.names) || clock_->now() >= due_time(m);
}

void Manager::record_failure(Managed& m, const Error& e) {
  auto& s = m.state;
  s.failures += 1;
  s.last_error = e.message;
  auto wait = failure_backoff(s.failures);
  // Jitter (up to +10%) so that many certificates failing together do not retry in lockstep.
  std::uniform_int_distribution<int64_t> jitter(0, wait.count() / 10);
  {
    std::lock_guard lock(rng_mu_);
    wait += std::chrono::seconds(jitter(rng_));
  }
  // rateLimited and other answers with Retry-After: never come back earlier than asked
  // (RFC 8555 §6.6), up to a point. A CA's limits refill within days (Let's Encrypt's longest
  // window is a week), so a longer wait is a broken reply; and a wait that would let the
  // certificate served run out is cut to half the time it has left (the next try, rate
  // limited again, halves it again), so the expiry is met with attempts, not silence.
  const auto now = clock_->now();
  if (e.retry_after) {
    auto honoured = std::min(*e.retry_after, kMaxHonouredRetryAfter);
    if (m.cert) {
      auto half_left = std::chrono::duration_cast<std::chrono::seconds>((m.cert->not_after() - now) / 2);
      honoured = std::min(honoured, std::max(half_left, std::chrono::seconds(0)));
    }
    if (honoured < *e.retry_after) {
      logger_->log(LogLevel::warn, kLog, "Retry-After cut short",
                   {{"name", m.key}, {"retry_after_s", std::to_string(e.retry_after->count())},
                    {"honoured_s", std::to_string(honoured.count())}});
    }
    wait = std::max(wait, honoured);
  }
  s.next_attempt = now + wait;
  failed_.fetch_add(1);
  logger_->log(LogLevel::error, kLog, "certificate issuance failed",
               {{"name", m.key}, {"error", e.message}, {"failures", std::to_string(s.failures)},
                {"next_attempt", acme::format_rfc3339(*s.next_attempt)}});
  emit(ManagerEvent::Type::failed, m, &e);
  check_expiring(m, e);
  if (m.cert) {
    if (auto st = save_state(m); !st) {
      logger_->log(LogLevel::warn, kLog, "cannot save meta.json", {{"name", m.key}, {"error", st.error().message}});
    }
  }
}

// check_expiring raises the alarm when renewal keeps failing and the certificate served is
// close to its end: at most 7 days left and at most a third of its lifetime (so a 6-day
// certificate, renewed at half its lifetime, gets a retry or two before the alarm).
void Manager::check_expiring(Managed& m, const Error& e) {
  if (!m.cert) return;
  auto now = clock_->now();
  auto nb = m.cert->not_before(), na = m.cert->not_after();
  auto threshold = std::min<system_clock::duration>(std::chrono::hours(24 * 7), (na - nb) / 3);
  if (na - now > threshold) return;
  expiring_.fetch_add(1);
  auto hours = std::chrono::duration_cast<std::chrono::hours>(na - now).count();
  logger_->log(LogLevel::error, kLog, "certificate expires soon and renewal is failing",
               {{"name", m.key}, {"not_after", acme::format_rfc3339(na)}, {"hours_left", std::to_string(hours)},
                {"error", e.message}});
  emit(ManagerEvent::Type::expiring, m, &e);
}

void Manager::note_revoked(const Managed& m) {
  revoked_.fetch_add(1);
  logger_->log(LogLevel::error, kLog, "the certificate served was revoked; renewing it now",
               {{"name", m.key},
                {"id", m.cert ? m.cert->id() : std::string()},
                {"revoked_at", acme::format_rfc3339(*m.state.revoked_at)},
                {"reason", m.state.revocation_reason}});
  emit(ManagerEvent::Type::revoked, m);
}

Status Manager::save_state(const Managed& m) {
  const std::string path = live_key(m.key, "meta.json");
  CertificateState state = m.state;
  // `autotls revoke` (another process) may have marked this certificate revoked since we last
  // read meta.json: carry its mark over instead of writing over it (adopt_stored acts on it).
  if (!state.revoked_at) {
    if (auto text = storage_->get(path); text && *text) {
      auto stored = CertificateState::from_json(**text);
      if (stored && stored->cert_id == state.cert_id && stored->revoked_at) {
        state.revoked_at = stored->revoked_at;
        state.revocation_reason = stored->revocation_reason;
      }
    }
  }
  return storage_->put(path, state.to_json());
}

// persist writes every file of the certificate as one set (Storage::put_set): FileStorage
// switches live/<name> to the new version with one rename, so neither load_stored nor an
// outside reader (nginx) ever sees the new certificate with the old key. A backend without
// atomic sets may leave a mixed pair after a crash: load_stored refuses it and the name is
// issued again, rather than ever serving a mismatched pair.
Status Manager::persist(const Managed& m) {
  auto parts = acme::split_pem_chain(m.chain_pem);
  std::string leaf = parts.empty() ? std::string() : parts.front();
  std::string rest;
  for (size_t i = 1; i < parts.size(); ++i) rest += parts[i];
  return storage_->put_set("live/" + m.key, {{"privkey.pem", m.key_pem, /*secret=*/true},
                                             {"cert.pem", leaf},
                                             {"chain.pem", rest},
                                             {"fullchain.pem", m.chain_pem},
                                             {"meta.json", m.state.to_json()}});
}

// issue_at obtains a chain and key from one issuer.
Result<Manager::Issued> Manager::issue_at(IssuerSlot& slot, const std::vector<std::string>& names,
                                          const std::string& replaces, const CertificateSettings& settings) {
  const IssuerConfig& cfg = slot.cfg;
  // The name set's own settings first, then the issuer's (which default to the global ones).
  const acme::KeyType key_type = settings.key_type.value_or(*cfg.key_type);
  if (cfg.internal) {
    std::shared_ptr<InternalCA> ca;
    {
      std::lock_guard lock(slot.mu);
      auto c = internal_ca(slot);
      if (!c) return fail(c.error());
      ca = *c;
    }
    auto issued = ca->issue(names, key_type);
    if (!issued) return fail(issued.error());
    return Issued{std::move(issued->chain_pem), std::move(issued->key_pem)};
  }
  // The client and account are set up once per issuer; concurrent issuances wait for that,
  // then share the client (acme::Client is safe for concurrent orders).
  acme::Client* acme_client = nullptr;
  const auto started = clock_->now();
  auto progress = [&](acme::ProgressEvent::Step step, std::string detail) {
    if (!options_.on_progress) return;
    acme::ProgressEvent e;
    e.step = step;
    e.subject = names.empty() ? std::string() : names.front();
    e.detail = std::move(detail);
    e.elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(clock_->now() - started);
    options_.on_progress(e);
  };
  {
    std::lock_guard lock(slot.mu);
    if (!slot.client && !slot.account_ready) {
      // Read the stored account (parsing its key takes a millisecond) before connecting: with
      // a prefetching transport (acme/prefetch.h), creating the client waits for the
      // directory, so this overlaps that wait instead of following it. An error here is left
      // for ensure_account, which reads again and reports it.
      if (auto a = load_account(slot)) slot.stored_account = std::move(*a);
    }
    auto c = client(slot);
    if (!c) return fail(c.error().with_context("ACME directory"));
    acme_client = *c;
    progress(acme::ProgressEvent::Step::directory, cfg.directory_url);
    if (auto st = ensure_account(slot, *acme_client, false); !st) return fail(st.error().with_context("ACME account"));
    progress(acme::ProgressEvent::Step::account, acme_client->account_url());
  }
  ChallengeSolver default_solver(challenges_, options_.dns_hook);
  acme::Solver& solver = options_.solver ? *options_.solver : default_solver;
  acme::ObtainRequest req;
  for (const auto& n : names) req.identifiers.push_back(acme::identifier_for(n));
  req.challenge_type = options_.challenge_type;
  req.key_type = key_type;
  req.profile = settings.profile.empty() ? cfg.profile : settings.profile;
  req.preferred_chain = settings.preferred_chain.empty() ? cfg.preferred_chain : settings.preferred_chain;
  // RFC 9773 §5: "replaces" tells the CA which certificate this one renews.
  if (!acme_client->directory().renewal_info.empty()) req.replaces = replaces;
  req.progress = options_.on_progress;
  req.progress_start = started;
  auto issued = acme::obtain(*acme_client, req, solver);
  if (!issued && issued.error().problem && issued.error().problem->is("accountDoesNotExist")) {
    // The CA forgot the stored account (a test CA restarted, or it was deleted): register the
    // same key again and retry once.
    {
      std::lock_guard lock(slot.mu);
      if (auto st = ensure_account(slot, *acme_client, true); !st) return fail(st.error().with_context("ACME account"));
    }
    issued = acme::obtain(*acme_client, req, solver);
  }
  if (!issued) return fail(issued.error());
  return Issued{std::move(issued->chain_pem), std::move(issued->key_pem)};
}

// issue tries each issuer in order until one gives a valid certificate, or a failure that
// must not fall through (falls_through()) ends the attempt. The error returned is the last
// one, its message listing every issuer's failure.
Result<Manager::Managed> Manager::issue(const std::vector<std::string>& names, const std::string& key,
                                        const CertificateSettings& settings, const Managed* current) {
  std::string messages;
  for (size_t i = 0; i < issuers_.size(); ++i) {
    IssuerSlot& slot = *issuers_[i];
    const IssuerConfig& cfg = slot.cfg;
    // "replaces" only means something to the CA that issued the certificate being replaced.
    std::string replaces;
    // Nor for a revoked certificate: it is replaced because it is revoked, not renewed in a
    // window, and CAs may refuse "replaces" for it.
    if (current && current->cert && !current->state.revoked_at && current->state.directory_url == cfg.account_id()) {
      replaces = current->state.ari_id;
    }
    auto got = issue_at(slot, names, replaces, settings);
    const acme::KeyType want = settings.key_type.value_or(*cfg.key_type);
    Result<std::shared_ptr<const Certificate>> cert = fail(Errc::invalid_input, "");
    if (got) {
      // Validate before anyone can see it: a broken certificate from the CA must never reach
      // storage or the store.
      LoadOptions lo;
      lo.clock = clock_;
      cert = Certificate::from_pem(got->chain_pem, got->key_pem, lo);
      if (!cert) {
        // The CA's fault, whatever OpenSSL called it: the next issuer may do better.
        Error refused = cert.error().with_context("issued certificate refused");
        refused.code = Errc::bad_response;
        cert = fail(refused);
      } else if (!covers(**cert, names)) {
        cert = fail(Errc::bad_response, "issued certificate refused: it does not cover every requested name");
      } else if ((*cert)->key_type() != acme::to_string(want)) {
        // Our own CSR names the key, so this is a defect somewhere; never serve it as if it
        // were what the configuration asked for.
        cert = fail(Errc::bad_response, "issued certificate refused: its key is " + (*cert)->key_type() + ", but " +
                                            std::string(acme::to_string(want)) + " is configured");
      }
    } else {
      cert = fail(got.error());
    }
    if (cert) {
      if (i > 0) {
        fallbacks_.fetch_add(1);
        logger_->log(LogLevel::warn, kLog, "certificate issued by a fallback issuer",
                     {{"name", key}, {"issuer", cfg.label()}, {"earlier_failures", messages}});
      }
      Managed m;
      m.names = names;
      m.key = key;
      m.settings = settings;
      m.cert = *cert;
      m.chain_pem = std::move(got->chain_pem);
      m.key_pem = std::move(got->key_pem);
      auto& s = m.state;
      s.names = names;
      s.directory_url = cfg.account_id();
      s.issuer_name = cfg.label();
      s.issuer = (*cert)->issuer_dn();
      if (!cfg.internal) s.profile = settings.profile.empty() ? cfg.profile : settings.profile;
      s.cert_id = (*cert)->id();
      s.serial = (*cert)->serial_hex();
      s.not_before = (*cert)->not_before();
      s.not_after = (*cert)->not_after();
      s.ari_id = ari_id_of(m.chain_pem);
      return m;
    }
    Error e = cert.error();
    messages += (messages.empty() ? "" : "; ") + ("issuer " + cfg.label() + ": " + e.message);
    const bool last = i + 1 == issuers_.size();
    const bool next = !last && falls_through(e) && !cancelled();
    if (!last) {
      logger_->log(next ? LogLevel::warn : LogLevel::error, kLog,
                   next ? "issuer failed; trying the next one" : "issuer failed; not trying the next one",
                   {{"name", key}, {"issuer", cfg.label()}, {"next", issuers_[i + 1]->cfg.label()}, {"error", e.message}});
      // At once, not queued like the other events: a command says so before the next issuer's
      // steps (and when the next one is not tried, before the failure).
      if (options_.on_event) {
        ManagerEvent ev;
        ev.type = ManagerEvent::Type::issuer_failed;
        ev.name = key;
        ev.names = names;
        ev.error = e;
        ev.issuer = cfg.label();
        if (current && current->cert) {
          ev.cert_id = current->cert->id();
          ev.not_after = current->cert->not_after();
        }
        ev.next_issuer = issuers_[i + 1]->cfg.label();
        ev.fallback = next;
        options_.on_event(ev);
      }
    }
    if (!next) {
      if (issuers_.size() > 1) e.message = messages;
      return fail(e);
    }
  }
  return fail(Errc::invalid_input, "no issuer configured");
}

// renew_locked issues a certificate for m under the storage lock of its name. Once the lock is
// held, storage is read again: another process may have issued while we waited, and then its
// certificate is adopted instead of ordering another one.
Status Manager::renew_locked(Managed& m, bool force) {
  const bool first = !m.cert;
  auto token = storage_->lock("cert/" + m.key, options_.lock_ttl, clock_->now() + options_.lock_wait, *clock_);
  if (!token) {
    if (token.error().code == Errc::cancelled) return fail(token.error());
    record_failure(m, token.error());
    return fail(token.error());
  }
  LockKeeper keeper(*storage_, *token, options_.lock_ttl, *logger_);

  auto stored = load_stored(m.key, m.names, m.settings);
  if (!stored) {
    record_failure(m, stored.error());
    return fail(stored.error());
  }
  if (!force && *stored && (!m.cert || (*stored)->cert->id() != m.cert->id()) && !due(**stored)) {
    if (auto st = publish_replacing(m.key, (*stored)->cert, m.cert.get()); !st) return st;
    m = std::move(**stored);
    loaded_.fetch_add(1);
    emit(ManagerEvent::Type::loaded, m);
    return {};
  }

  auto issued = [&] {
    IssueSlot slot(*this);
    return issue(m.names, m.key, m.settings, m.cert ? &m : nullptr);
  }();
  if (!issued) {
    if (issued.error().code == Errc::cancelled) {
      // Abandoned at shutdown: not the CA's fault, so no failure and no backoff recorded.
      abandoned_.fetch_add(1);
      logger_->log(LogLevel::warn, kLog, "issuance abandoned at shutdown", {{"name", m.key}});
      return fail(issued.error());
    }
    record_failure(m, issued.error());
    return fail(issued.error());
  }
  Managed n = std::move(*issued);
  Status persisted = persist(n);
  n.key_pem.clear();
  // The generation of what storage holds now: the new files, or (when saving failed) the old
  // ones, which adopt_stored() must then not take for a change made by another process and
  // serve over the newer certificate.
  n.generation = storage_->generation(live_key(n.key, "fullchain.pem")).value_or(persisted ? "" : m.generation);
  // A valid new certificate is served even if it could not be saved: it is strictly better
  // than the old one. The error is still reported (a restart would issue again).
  if (auto st = publish_replacing(n.key, n.cert, m.cert.get()); !st) {
    record_failure(m, st.error());
    return st;
  }
  m = std::move(n);
  (first ? obtained_ : renewed_).fetch_add(1);
  logger_->log(LogLevel::info, kLog, first ? "certificate obtained" : "certificate renewed",
               {{"name", m.key}, {"id", m.cert->id()}, {"not_after", acme::format_rfc3339(m.state.not_after)}});
  emit(first ? ManagerEvent::Type::obtained : ManagerEvent::Type::renewed, m);
  if (!persisted) {
    logger_->log(LogLevel::error, kLog, "cannot persist certificate",
                 {{"name", m.key}, {"error", persisted.error().message}});
    return persisted;
  }
  return {};
}

Status Manager::manage(const std::vector<std::string>& input, const CertificateSettings& settings) {
  auto names = normalize(input);
  if (names.empty()) return fail(Errc::invalid_input, "manage: no names");
  for (const auto& n : names) {
    if (!is_valid_lookup_name(n)) {
      // Logged as well as returned: a caller that manages names in a loop (serve) must not
      // lose one without a word.
      logger_->log(LogLevel::error, kLog, "cannot manage an invalid name", {{"name", n}});
      return fail(Errc::invalid_input, "manage: invalid name \"" + n + "\"");
    }
  }
  const std::string key = storage_name(names.front());
  if (is_held(key)) return fail(Errc::invalid_input, "manage: " + names.front() + " is unmanaged (resume it first)");
  Status result;
  {
    auto name_mu = name_mutex(key);
    std::lock_guard work(*name_mu);
    auto stored = load_stored(key, names, settings);
    if (!stored) {
      logger_->log(LogLevel::error, kLog, "cannot read the stored certificate", {{"name", key}, {"error", stored.error().message}});
      return fail(stored.error());
    }
    // Managed already (manage() called again, e.g. on a configuration reload): the certificate
    // served now, which a stored one of the other key family must not leave in the store.
    std::shared_ptr<const Certificate> previous;
    {
      std::lock_guard lock(mu_);
      if (auto it = managed_.find(key); it != managed_.end()) previous = it->second.cert;
    }
    Managed m;
    m.names = names;
    m.key = key;
    m.settings = settings;
    m.state.names = names;
    if (*stored) {
      m = std::move(**stored);
      // Serve what we have at once, even if due: it is valid, and renewal may take a while.
      if (auto st = publish_replacing(key, m.cert, previous.get()); !st) return st;
    }
    if (m.cert && m.state.revoked_at) note_revoked(m);
    const bool need = due(m);
    const bool backing_off = m.cert && m.state.next_attempt && clock_->now() < *m.state.next_attempt;
    if (m.cert && (!need || backing_off)) {
      loaded_.fetch_add(1);
      emit(ManagerEvent::Type::loaded, m);
    } else {
      result = renew_locked(m, /*force=*/false);
      // Still serving a valid certificate: the failure is recorded for renew_due's backoff.
      if (!result && m.cert) result = {};
    }
    keep(key, std::move(m));
  }
  flush_events();
  return result;
}

void Manager::refresh_ari(Managed& m) {
  auto now = clock_->now();
  if (m.state.ari_id.empty() || (m.state.ari_next_fetch && now < *m.state.ari_next_fetch)) return;
  // ARI is asked of the CA that issued the certificate, if it is still configured.
  IssuerSlot* slot = slot_for(m.state.directory_url);
  if (!slot || slot->cfg.internal) return;
  acme::Client* acme_client = nullptr;
  {
    std::lock_guard lock(slot->mu);
    auto c = client(*slot);
    if (!c) return;
    acme_client = *c;
  }
  if (acme_client->directory().renewal_info.empty()) return;
  auto info = acme_client->renewal_info(m.state.ari_id);
  auto& s = m.state;
  if (!info) {
    // Keep the last window; ask again in an hour, or when the CA said, within the same limits
    // as a successful poll.
    s.ari_next_fetch = now + std::clamp<std::chrono::seconds>(info.error().retry_after.value_or(std::chrono::hours(1)),
                                                              kAriMinPoll, kAriMaxPoll);
    logger_->log(LogLevel::warn, kLog, "renewalInfo failed", {{"name", m.key}, {"error", info.error().message}});
  } else {
    // RFC 9773 §4.3.2: pick a uniform random time in the window, and keep it while the window
    // stays the same (re-picking on every poll would drift toward the window's start).
    bool changed = s.ari_window_start != info->window_start || s.ari_window_end != info->window_end;
    if (changed || !s.ari_selected) {
      std::lock_guard lock(rng_mu_);
      s.ari_selected = acme::pick_renewal_time(*info, rng_);
    }
    s.ari_window_start = info->window_start;
    s.ari_window_end = info->window_end;
    s.ari_explanation_url = info->explanation_url;
    // RFC 9773 §4.3.3: honour Retry-After; but poll at least twice a day, and not more often
    // than once a minute.
    auto wait = std::clamp<std::chrono::seconds>(info->retry_after.value_or(std::chrono::hours(6)), kAriMinPoll,
                                                 kAriMaxPoll);
    s.ari_next_fetch = now + wait;
  }
  if (auto st = save_state(m); !st) {
    logger_->log(LogLevel::warn, kLog, "cannot save meta.json", {{"name", m.key}, {"error", st.error().message}});
  }
}

Result<int> Manager::renew_due() {
  std::vector<std::string> keys;
  {
    std::lock_guard lock(mu_);
    for (const auto& [k, _] : managed_) keys.push_back(k);
  }
  int renewed = 0;
  for (const auto& key : keys) {
    {
      auto name_mu = name_mutex(key);
      std::lock_guard work(*name_mu);
      Managed m;
      {
        std::lock_guard lock(mu_);
        auto it = managed_.find(key);
        if (it == managed_.end()) continue;
        m = it->second;
      }
      refresh_ari(m);
      bool backing_off = m.state.next_attempt && clock_->now() < *m.state.next_attempt;
      if (due(m) && !backing_off) {
        std::string before = m.cert ? m.cert->id() : std::string();
        (void)renew_locked(m, /*force=*/false);
        if (m.cert && m.cert->id() != before) ++renewed;
      }
      keep(key, std::move(m));
    }
    flush_events();
  }
  return renewed;
}

Status Manager::renew(const std::vector<std::string>& input, bool force) {
  auto names = normalize(input);
  if (names.empty()) return fail(Errc::invalid_input, "renew: no names");
  const std::string key = storage_name(names.front());
  Status result;
  {
    auto name_mu = name_mutex(key);
    std::lock_guard work(*name_mu);
    Managed m;
    {
      std::lock_guard lock(mu_);
      auto it = managed_.find(key);
      if (it == managed_.end()) return fail(Errc::invalid_input, "renew: " + names.front() + " is not managed");
      m = it->second;
    }
    m.names = names;
    if (force || due(m)) result = renew_locked(m, force);
    keep(key, std::move(m));
  }
  flush_events();
  return result;
}

Result<bool> Manager::load_stored_only(const std::vector<std::string>& input) {
  auto names = normalize(input);
  if (names.empty()) return fail(Errc::invalid_input, "load: no names");
  for (const auto& n : names) {
    if (!is_valid_lookup_name(n)) return fail(Errc::invalid_input, "load: invalid name \"" + n + "\"");
  }
  const std::string key = storage_name(names.front());
  if (is_held(key)) return fail(Errc::invalid_input, "load: " + names.front() + " is unmanaged");
  bool loaded = false;
  {
    auto name_mu = name_mutex(key);
    std::lock_guard work(*name_mu);
    auto stored = load_stored(key, names, {});
    if (!stored) return fail(stored.error());
    if (*stored && covers(*(*stored)->cert, names)) {
      Managed m = std::move(**stored);
      if (auto st = publish_replacing(key, m.cert, nullptr); !st) return fail(st.error());
      loaded_.fetch_add(1);
      emit(ManagerEvent::Type::loaded, m);
      keep(key, std::move(m));
      loaded = true;
    }
  }
  if (!loaded) prune_name_mutex(key);
  flush_events();
  return loaded;
}

std::string Manager::forget(const std::vector<std::string>& input) {
  auto names = normalize(input);
  if (names.empty()) return {};
  const std::string key = storage_name(names.front());
  auto name_mu = name_mutex(key);
  std::string id;
  {
    std::lock_guard work(*name_mu);
    std::lock_guard lock(mu_);
    auto it = managed_.find(key);
    if (it == managed_.end()) return {};
    id = it->second.cert ? it->second.cert->id() : std::string();
    managed_.erase(it);
  }
  {
    std::lock_guard lock(publish_mu_);
    published_.erase(key);
  }
  name_mu.reset();
  prune_name_mutex(key);
  return id;
}

std::string Manager::unmanage(const std::vector<std::string>& input) {
  auto names = normalize(input);
  if (names.empty()) return {};
  const std::string key = storage_name(names.front());
  std::string id;
  {
    // Not under the name's mutex: an issuance in flight holds it for as long as the order
    // takes. Holding publish_mu_ instead orders this call with every publication: one that
    // happened is in published_, one that did not will not (publish_replacing checks held_),
    // and the work's end does not bring the entry back (keep checks held_).
    std::lock_guard publish(publish_mu_);
    std::lock_guard lock(mu_);
    held_.insert(key);
    managed_.erase(key);
    if (auto it = published_.find(key); it != published_.end()) {
      id = std::move(it->second);
      published_.erase(it);
    }
  }
  prune_name_mutex(key);
  logger_->log(LogLevel::info, kLog, "no longer managed", {{"name", key}, {"id", id}});
  return id;
}

void Manager::resume(const std::vector<std::string>& input) {
  auto names = normalize(input);
  if (names.empty()) return;
  const std::string key = storage_name(names.front());
  std::lock_guard publish(publish_mu_);
  std::lock_guard lock(mu_);
  held_.erase(key);
}

bool Manager::is_held(const std::string& key) const {
  std::lock_guard lock(mu_);
  return held_.count(key) > 0;
}

void Manager::keep(const std::string& key, Managed m) {
  std::lock_guard lock(mu_);
  if (held_.count(key)) return;
  managed_[key] = std::move(m);
}

void Manager::prune_name_mutex(const std::string& key) {
  {
    std::lock_guard lock(mu_);
    if (managed_.count(key)) return;
  }
  // use_count 1: only the map holds it, so nobody waits on or holds it, and nobody can take a
  // copy while names_mu_ is held.
  std::lock_guard lock(names_mu_);
  auto it = name_mutexes_.find(key);
  if (it != name_mutexes_.end() && it->second.use_count() == 1) name_mutexes_.erase(it);
}

std::optional<CertificateState> Manager::state(const std::vector<std::string>& names) const {
  auto n = normalize(names);
  if (n.empty()) return std::nullopt;
  std::lock_guard lock(mu_);
  auto it = managed_.find(storage_name(n.front()));
  if (it == managed_.end()) return std::nullopt;
  return it->second.state;
}

std::optional<system_clock::time_point> Manager::renewal_time(const std::vector<std::string>& names) const {
  auto n = normalize(names);
  if (n.empty()) return std::nullopt;
  std::lock_guard lock(mu_);
  auto it = managed_.find(storage_name(n.front()));
  if (it == managed_.end() || !it->second.cert) return std::nullopt;
  return due_time(it->second);
}

int Manager::adopt_stored() {
  std::vector<std::string> keys;
  {
    std::lock_guard lock(mu_);
    for (const auto& [k, _] : managed_) keys.push_back(k);
  }
  int adopted = 0;
  for (const auto& key : keys) {
    flush_events();  // the previous name's, with no lock held (a continue skips the end)
    {
      auto name_mu = name_mutex(key);
      std::lock_guard work(*name_mu);
      Managed m;
      {
        std::lock_guard lock(mu_);
        auto it = managed_.find(key);
        if (it == managed_.end()) continue;
        m = it->second;
      }
      auto gen = storage_->generation(live_key(key, "fullchain.pem"));
      if (!gen || gen->empty()) continue;
      if (*gen == m.generation) {
        // Same certificate; its meta.json may say it was revoked meanwhile.
        auto mgen = storage_->generation(live_key(key, "meta.json"));
        if (!mgen || *mgen == m.meta_generation || !m.cert) continue;
        auto text = storage_->get(live_key(key, "meta.json"));
        if (!text) continue;
        m.meta_generation = *mgen;
        if (*text && !m.state.revoked_at) {
          auto s = CertificateState::from_json(**text);
          if (s && s->cert_id == m.cert->id() && s->revoked_at) {
            m.state.revoked_at = s->revoked_at;
            m.state.revocation_reason = s->revocation_reason;
            note_revoked(m);
          }
        }
        std::lock_guard lock(mu_);
        if (auto it = managed_.find(key); it != managed_.end()) it->second = std::move(m);
        continue;
      }
      auto stored = load_stored(key, m.names, m.settings);
      if (!stored) continue;  // storage unreadable now: look again next time
      if (!*stored || !covers(*(*stored)->cert, m.names)) {
        // Unusable (mismatched, expired, other names; load_stored logged why): keep serving
        // ours, and say it once per stored version, not at every poll.
        std::lock_guard lock(mu_);
        if (auto it = managed_.find(key); it != managed_.end()) it->second.generation = *gen;
        continue;
      }
      Managed n = std::move(**stored);
      n.names = m.names;
      if (!m.cert || n.cert->id() != m.cert->id()) {
        if (auto st = publish_replacing(key, n.cert, m.cert.get()); !st) {
          logger_->log(LogLevel::warn, kLog, "certificate from storage refused by the store",
                       {{"name", key}, {"error", st.error().message}});
          continue;
        }
        ++adopted;
        loaded_.fetch_add(1);
        logger_->log(LogLevel::info, kLog, "certificate replaced in storage by another process; serving it",
                     {{"name", key}, {"id", n.cert->id()}, {"not_after", acme::format_rfc3339(n.state.not_after)}});
        emit(ManagerEvent::Type::loaded, n);
      }
      keep(key, std::move(n));
    }
  }
  flush_events();
  return adopted;
}

void Manager::start() {
  std::lock_guard lock(loop_mu_);
  stop_clock_->cancel(false);
  if (thread_.joinable()) return;
  stopping_ = false;
  loop_done_ = false;
  thread_ = std::thread([this] {
    run_loop();
    std::lock_guard lock(loop_mu_);
    loop_done_ = true;
    loop_cv_.notify_all();
  });
}

void Manager::stop() {
  {
    std::lock_guard lock(loop_mu_);
    stopping_ = true;
  }
  loop_cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Manager::stop(std::chrono::milliseconds grace) {
  // Real time: the grace period is the operator's, whatever clock is injected.
  const auto deadline = std::chrono::steady_clock::now() + grace;
  {
    std::unique_lock lock(loop_mu_);
    stopping_ = true;
    loop_cv_.notify_all();
    if (thread_.joinable()) loop_cv_.wait_until(lock, deadline, [this] { return loop_done_; });
  }
  if (grace.count() > 0) {
    // Orders in flight on other threads (manage, renew, on-demand) get what is left of it.
    std::unique_lock slots(slots_mu_);
    slots_cv_.wait_until(slots, deadline, [this] { return slots_used_ == 0; });
  }
  stop_clock_->cancel(true);
  if (thread_.joinable()) thread_.join();
}

void Manager::run_loop() {
  auto next_adopt = std::chrono::steady_clock::now() + options_.storage_poll_interval;
  for (;;) {
    {
      std::lock_guard lock(loop_mu_);
      if (stopping_) return;
    }
    // Real time: how often storage is asked does not depend on an injected clock.
    if (std::chrono::steady_clock::now() >= next_adopt) {
      (void)adopt_stored();
      next_adopt = std::chrono::steady_clock::now() + options_.storage_poll_interval;
    }
    auto r = renew_due();
    if (!r) logger_->log(LogLevel::error, kLog, "renewal check failed", {{"error", r.error().message}});

    // Sleep until the next thing falls due (a renewal time or the end of a backoff), but at
    // most check_interval: ARI windows and storage can change without us knowing.
    auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(options_.check_interval);
    {
      std::lock_guard lock(mu_);
      auto now = clock_->now();
      for (const auto& [_, m] : managed_) {
        auto next = due_time(m);
        if (m.state.next_attempt) next = std::max(next, *m.state.next_attempt);
        if (m.state.ari_next_fetch) next = std::min(next, *m.state.ari_next_fetch);
        auto until = std::chrono::duration_cast<std::chrono::milliseconds>(next - now);
        wait = std::min(wait, std::max(until, std::chrono::milliseconds(1000)));
      }
    }
    auto to_adopt = std::chrono::ceil<std::chrono::milliseconds>(next_adopt - std::chrono::steady_clock::now());
    wait = std::min(wait, std::max(to_adopt, std::chrono::milliseconds(1)));
    std::unique_lock lock(loop_mu_);
    // A condition variable, not a sleep: stop() must not wait for the interval to pass.
    if (loop_cv_.wait_for(lock, wait, [this] { return stopping_; })) return;
  }
}

}  // namespace autotls::tlsreload
