#pragma once

// Manager: keeps certificates for sets of names issued, stored, published and renewed.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "acme/client.h"
#include "acme/key.h"
#include "acme/transport.h"
#include "acme/util/clock.h"
#include "acme/util/error.h"
#include "acme/util/logger.h"
#include "tlsreload/certificate.h"
#include "tlsreload/challenges.h"
#include "tlsreload/issuer.h"
#include "tlsreload/storage.h"
#include "tlsreload/store.h"

namespace autotls::tlsreload {

class InternalCA;

// ManagerEvent reports what happened to one managed certificate.
struct ManagerEvent {
  // expiring: a renewal failed and the certificate served has little time left (at most 7
  // days, and at most a third of its lifetime): someone must look now.
  // revoked: the certificate served was revoked (meta.json says so, written by `autotls
  // revoke`); it is renewed at once, without "replaces".
  // issuer_failed: an issuer that is not the last of the list failed this issuance (error);
  // issuer is the one that failed, next_issuer the one after it, fallback whether that one is
  // asked now (ManagerOptions::issuers: falls_through()). Unlike the others it is delivered at
  // once, from the issuing thread, before the next issuer is asked, so that a command can say
  // so as it happens: as for on_progress, on_event must then return quickly and not call into
  // the Manager (the certificate's locks are held). The last issuer's failure is `failed`.
  enum class Type { loaded, obtained, renewed, failed, expiring, revoked, issuer_failed };
  Type type = Type::loaded;
  std::string name;                // storage name ("_wildcard_.example.com")
  std::vector<std::string> names;  // the managed name set
  std::string cert_id;             // Certificate::id() of the certificate now served ("" if none)
  std::optional<Error> error;      // for failed, expiring and issuer_failed
  std::string issuer;              // IssuerConfig::label() of the CA that issued the certificate
                                   // (issuer_failed: of the CA that failed)
  std::optional<std::chrono::system_clock::time_point> not_after;  // of the certificate served
  std::string next_issuer;         // issuer_failed: IssuerConfig::label() of the next CA
  bool fallback = false;           // issuer_failed: the next CA is asked now
};
std::string_view to_string(ManagerEvent::Type type);

// CertificateSettings are what one managed name set may choose for itself (a site of `autotls
// serve`). A field left empty takes the issuer's value, which defaults to ManagerOptions'
// (site > issuer > global). Renewals keep using the settings the name set was managed with.
struct CertificateSettings {
  // key_type of the certificate's key. A served certificate whose key is of another type
  // (Certificate::key_type()) is due at once: the configuration changed, so it is issued again
  // (the old one keeps serving until the new one is in hand, and if issuance fails).
  std::optional<acme::KeyType> key_type;
  // profile (draft-aaron-acme-profiles: "classic", "tlsserver", "shortlived" at Let's
  // Encrypt) is sent in newOrder; a change takes effect at the next renewal.
  std::string profile;
  // preferred_chain is the issuer CN of the chain's top certificate (RFC 8555 §7.4.2); a
  // change takes effect at the next renewal.
  std::string preferred_chain;

  bool operator==(const CertificateSettings&) const = default;
};

struct ManagerOptions {
  // issuers are tried in order for every issuance and renewal; a failure at one moves on to
  // the next when falls_through() says so (tlsreload/issuer.h). Renewal starts at the first
  // again. Empty: one issuer made of directory_url, ca_bundle, email, eab, profile,
  // preferred_chain and transport below (directory_url "internal": the internal CA). Fields an
  // IssuerConfig leaves empty take the values below.
  std::vector<IssuerConfig> issuers;
  // internal_lifetime is how long leaves of the internal CA are valid.
  std::chrono::hours internal_lifetime{24 * 7};
  std::string directory_url;  // the CA's ACME directory
  std::string ca_bundle;      // PEM roots for the CA's HTTPS; empty: system store
  std::string email;          // contact, sent as "mailto:<email>"; empty: none
  bool agree_to_terms = false;
  std::optional<acme::ExternalAccountBinding> eab;
  std::string challenge_type = "http-01";  // "http-01", "tls-alpn-01" or "dns-01"
  std::string dns_hook;                    // program for dns-01 (see ChallengeSolver)
  acme::KeyType key_type = acme::KeyType::ec256;
  // solver replaces the ChallengeSolver the manager builds over the challenge store and
  // dns_hook (the CLI's --webroot solver, for one); null: that ChallengeSolver.
  std::shared_ptr<acme::Solver> solver;
  // profile (draft-aaron-acme-profiles) and preferred_chain (issuer CN of the chain's top
  // certificate, RFC 8555 §7.4.2) are used for every order; empty: the CA's defaults.
  std::string profile;
  std::string preferred_chain;
  // renewal_ratio: renew when this share of the lifetime remains (half, at least, for
  // certificates shorter than 10 days). Used when the CA has no ARI.
  double renewal_ratio = 1.0 / 3.0;
  // check_interval: how often the background thread looks for due renewals at most.
  std::chrono::seconds check_interval{600};
  // storage_poll_interval: how often the background thread asks storage whether a managed
  // certificate was replaced by someone else (another instance, `autotls renew`): one
  // Storage::generation() per certificate. A replaced, valid certificate is served at once.
  std::chrono::milliseconds storage_poll_interval{std::chrono::seconds(30)};
  // Storage lock per certificate: its ttl (refreshed while held) and how long to wait for it.
  std::chrono::seconds lock_ttl{60};
  std::chrono::seconds lock_wait{600};
  Clock* clock = nullptr;    // nullptr: system_clock()
  Logger* logger = nullptr;  // nullptr: null_logger()
  // transport replaces the libcurl transport (tests inject a fake CA here).
  std::shared_ptr<acme::HttpTransport> transport;
  // client_options tunes the ACME client (polling, retries); its directory_url, transport,
  // clock and logger are overwritten from the fields above.
  acme::ClientOptions client_options;
  // on_event is called after each load, issuance, renewal and failure, from the thread that
  // did the work, once the work is over and no Manager lock is held (issuer_failed excepted:
  // see ManagerEvent).
  std::function<void(const ManagerEvent&)> on_event;
  // on_progress, when set, is called at each step of an ACME issuance (acme::ProgressEvent:
  // directory, account, then what acme::obtain reports), from the thread doing the issuance,
  // with elapsed time counted from the start of the attempt at one issuer; it must return
  // quickly and not call into the Manager (an issuer lock may be held). The internal CA
  // reports nothing.
  acme::ProgressCallback on_progress;
  // rng_seed seeds the jitter and ARI choices; 0 means from std::random_device.
  uint64_t rng_seed = 0;
  // max_concurrent_issuances caps the orders this Manager runs at once (different name sets
  // issue in parallel up to the cap; one name set never has two in flight). At least 1.
  int max_concurrent_issuances = 8;
};

// CertificateState is the per-certificate metadata kept in storage (meta.json).
struct CertificateState {
  std::vector<std::string> names;
  std::string directory_url;  // of the CA that issued it ("internal" for the internal CA)
  std::string issuer_name;    // IssuerConfig::label() of that CA
  std::string issuer;  // issuer DN
  std::string profile;  // the ACME profile asked for in the order ("" for the CA's default)
  std::string cert_id;  // Certificate::id()
  std::string serial;
  std::string ari_id;   // RFC 9773 §4.1 identifier ("" when the certificate has no AKI)
  std::chrono::system_clock::time_point not_before{}, not_after{};
  // ARI (RFC 9773 §4.2): the last window, the time picked in it, when to fetch again.
  std::optional<std::chrono::system_clock::time_point> ari_window_start, ari_window_end;
  std::optional<std::chrono::system_clock::time_point> ari_selected;
  std::optional<std::chrono::system_clock::time_point> ari_next_fetch;
  std::string ari_explanation_url;
  // Failures since the last success, the last error, and the earliest next attempt.
  int failures = 0;
  std::string last_error;
  std::optional<std::chrono::system_clock::time_point> next_attempt;
  // Set when this certificate was revoked (`autotls revoke`): it is due at once.
  std::optional<std::chrono::system_clock::time_point> revoked_at;
  std::string revocation_reason;  // as given to revoke ("" when unspecified)

  std::string to_json() const;
  static Result<CertificateState> from_json(std::string_view text);
};

// ratio_renewal_time is when a certificate valid [not_before, not_after) is due without ARI:
// when `ratio` of its lifetime remains, or half for lifetimes under 10 days.
std::chrono::system_clock::time_point ratio_renewal_time(std::chrono::system_clock::time_point not_before,
                                                         std::chrono::system_clock::time_point not_after,
                                                         double ratio);

// failure_backoff is the wait after the n-th consecutive failure (n >= 1), without jitter:
// 1 minute, doubling, capped at 1 day.
std::chrono::seconds failure_backoff(int failures);

// Manager obtains, stores, publishes and renews certificates for name sets.
//
// Every certificate passes Certificate::from_pem (key matches, chain links, valid now, names
// usable) and must cover the names asked for before it is persisted or published; a failed
// issuance or renewal never removes or replaces the certificate being served. Issuance of a
// name set is guarded by a storage lock, and storage is re-read once the lock is held, so
// several Managers (processes, hosts) sharing one Storage issue a name set once.
//
// Methods are thread-safe. Work on one name set (load, issue, renew) is serialized; different
// name sets are issued concurrently, at most max_concurrent_issuances orders at a time. The
// ACME client and account are created once, under their own lock; acme::Client is safe for
// concurrent orders (its nonce pool and account state are behind its mutex).
class Manager {
 public:
  struct Counters {
    uint64_t loaded = 0;    // certificates taken from storage instead of issued
    uint64_t obtained = 0;  // first issuances
    uint64_t renewed = 0;
    uint64_t failed = 0;    // failed issuances and renewals
    uint64_t fallbacks = 0;  // issuances that succeeded at an issuer other than the first
    uint64_t expiring = 0;   // expiring events
    uint64_t abandoned = 0;  // issuances abandoned at shutdown (stop with a grace period)
    uint64_t revoked = 0;    // revoked certificates found in storage (then renewed at once)
  };

  Manager(ManagerOptions options, std::shared_ptr<Storage> storage, std::shared_ptr<CertStore> store,
          std::shared_ptr<ChallengeStore> challenges);
  ~Manager();  // stops the background thread
  Manager(const Manager&) = delete;
  Manager& operator=(const Manager&) = delete;

  // manage ensures a certificate for names (the first one names it in storage) is served: the
  // stored one when it is valid, covers the names and is not due; otherwise a new one. A due
  // certificate whose renewal fails keeps being served and manage() succeeds (the failure is
  // recorded for renew_due's backoff); manage() fails only when nothing can be served.
  //
  // settings (key type, profile, preferred chain) override the issuer's and global options for
  // this name set, now and at every renewal; calling manage() again with other settings
  // replaces them (a changed key type makes the certificate due at once).
  [[nodiscard]] Status manage(const std::vector<std::string>& names, const CertificateSettings& settings = {});

  // renew_due renews every managed certificate whose renewal time has come and whose backoff
  // has passed, fetching ARI windows as they fall due. Returns how many were renewed; failures
  // are counted, reported through on_event and recorded in meta.json, not returned.
  [[nodiscard]] Result<int> renew_due();

  // renew renews the certificate managed for names now if force or if it is due.
  [[nodiscard]] Status renew(const std::vector<std::string>& names, bool force);

  // adopt_stored serves the certificates that another process wrote to storage since this
  // manager last read or wrote them (Storage::generation changed): each is validated like any
  // stored certificate (a half-written or bad one is ignored until the next look) and must
  // cover the names. Returns how many were adopted. It also reads meta.json when that changed:
  // a certificate served that was marked revoked there (`autotls revoke`) gets a revoked event
  // and is due at once (the next renew_due renews it). The background thread calls it every
  // storage_poll_interval, then renew_due.
  int adopt_stored();

  // start runs renew_due in a background thread every check_interval (sooner when a renewal
  // falls due earlier); stop ends it and returns promptly (waiting only for an issuance in
  // progress). Both are idempotent.
  void start();
  void stop();
  // stop(grace) also gives issuances in flight (in the background thread or in manage()/renew()
  // on other threads) until grace to finish; then they are abandoned: every wait of the ACME
  // client and of the storage lock is cut short, the issuance fails with Errc::cancelled
  // (not counted as a failure, no backoff recorded), its storage lock is released, and nothing
  // is written. A blocking HTTP request still runs to its own timeout. start() clears the
  // cancellation.
  void stop(std::chrono::milliseconds grace);

  // internal_root_pem returns the internal CA's root certificate (creating it if needed) when
  // an issuer is internal; its storage key is InternalCA::kRootCertKey.
  Result<std::string> internal_root_pem();

  // state returns the metadata of the certificate managed for names, if managed.
  std::optional<CertificateState> state(const std::vector<std::string>& names) const;
  // renewal_time returns when the certificate managed for names is due.
  std::optional<std::chrono::system_clock::time_point> renewal_time(const std::vector<std::string>& names) const;

  Counters counters() const;

  // load_stored_only serves the certificate stored for names, if storage holds a valid one
  // that covers them, and manages it from then on (renewals); it never orders. Returns
  // whether one was loaded. For on-demand names: storage first, the CA only if this is false.
  [[nodiscard]] Result<bool> load_stored_only(const std::vector<std::string>& names);

  // forget stops managing names (no more renewals, state() empty) and returns the id of the
  // certificate that was served for them ("" if none). The CertStore and storage are not
  // touched. For on-demand eviction: the certificate comes back with load_stored_only.
  std::string forget(const std::vector<std::string>& names);

  // unmanage stops managing names because something else serves them now (`autotls serve`: a
  // certificate file that covers a configured site name), and holds them until resume(names):
  //   - no renewal, ARI fetch or storage adoption for them from now on (state() is empty);
  //   - manage() and load_stored_only() refuse them (Errc::invalid_input), so a pass that read
  //     its list of names before the call, or an on-demand handshake, cannot take them back;
  //   - nothing more is published into the CertStore for them. Work in flight on another
  //     thread (an issuance or renewal that began before the call) is not waited for and not
  //     cut short: it finishes and its certificate is persisted to storage as usual (a renewed
  //     event follows), but it is not published, and the names stay unmanaged.
  // Returns the id of the certificate this Manager last published for the names ("" if none):
  // the caller decides whether it leaves the store (the Manager does not remove it: it may be
  // what still serves one key family). Storage is not touched. Never blocks on an issuance.
  std::string unmanage(const std::vector<std::string>& names);
  // resume lifts unmanage's hold: manage() takes the names again (storage first, as always).
  // Does nothing for names not held.
  void resume(const std::vector<std::string>& names);

 private:
  struct Managed {
    std::vector<std::string> names;
    std::string key;  // storage name
    std::shared_ptr<const Certificate> cert;
    std::string chain_pem;
    std::string key_pem;  // set only between issue() and persist()
    std::string generation;  // Storage::generation of fullchain.pem as last read or written
    std::string meta_generation;  // Storage::generation of meta.json as last read
    CertificateState state;
    CertificateSettings settings;  // the name set's own (empty fields: issuer, then global)
  };

  struct IssuerSlot;
  struct Issued {
    std::string chain_pem, key_pem;
  };
  Result<acme::Client*> client(IssuerSlot& slot);
  // StoredAccount is the account of one CA as stored: no key yet, or a key with the account URL
  // (empty when registration did not finish).
  struct StoredAccount {
    std::optional<acme::PrivateKey> key;
    std::string url;
  };
  Result<StoredAccount> load_account(const IssuerSlot& slot);
  Status ensure_account(IssuerSlot& slot, acme::Client& client, bool reregister);
  Result<std::shared_ptr<InternalCA>> internal_ca(IssuerSlot& slot);
  Result<Issued> issue_at(IssuerSlot& slot, const std::vector<std::string>& names, const std::string& replaces,
                          const CertificateSettings& settings);
  IssuerSlot* slot_for(const std::string& account_id);
  bool cancelled() const;
  Result<std::optional<Managed>> load_stored(const std::string& key, const std::vector<std::string>& names,
                                            const CertificateSettings& settings);
  Status renew_locked(Managed& m, bool force);
  void flush_events();
  Result<Managed> issue(const std::vector<std::string>& names, const std::string& key,
                        const CertificateSettings& settings, const Managed* current);
  // expected_key_type is the key type m's certificate must have: its own setting, else that of
  // the issuer that issued it (if still configured), else the first issuer's.
  acme::KeyType expected_key_type(const Managed& m) const;
  // key_type_changed: m serves a certificate whose key is not of expected_key_type(m).
  bool key_type_changed(const Managed& m) const;
  // publish_replacing publishes next and takes previous out of the store when it is of the
  // other key family (publish replaces only the slots of next's family: an ECDSA certificate
  // would otherwise keep serving ECDSA clients after a change to RSA).
  // It is the only way the Manager puts a certificate into the store: for a storage name that
  // unmanage() holds it publishes nothing (and succeeds).
  Status publish_replacing(const std::string& key, const std::shared_ptr<const Certificate>& next,
                           const Certificate* previous);
  // keep stores m as what is managed under key, unless unmanage() holds key (the work that
  // produced m began before the hold and must not bring the name set back).
  void keep(const std::string& key, Managed m);
  bool is_held(const std::string& key) const;
  Status persist(const Managed& m);
  Status save_state(const Managed& m);
  void refresh_ari(Managed& m);
  std::chrono::system_clock::time_point due_time(const Managed& m) const;
  bool due(const Managed& m) const;
  void record_failure(Managed& m, const Error& e);
  void emit(ManagerEvent::Type type, const Managed& m, const Error* error = nullptr);
  void check_expiring(Managed& m, const Error& e);
  void note_revoked(const Managed& m);  // counts, logs and emits a revoked event
  void run_loop();

  ManagerOptions options_;
  std::shared_ptr<Storage> storage_;
  std::shared_ptr<CertStore> store_;
  std::shared_ptr<ChallengeStore> challenges_;
  class StopClock;
  std::unique_ptr<StopClock> stop_clock_;  // wraps options_.clock; stop(grace) cancels it
  Clock* clock_;
  Logger* logger_;

  // name_mutex returns the mutex that serializes work on one storage name.
  std::shared_ptr<std::mutex> name_mutex(const std::string& key);
  // prune_name_mutex drops key's mutex when key is not managed and nobody holds it, so names
  // looked up once (on-demand) do not grow the map without bound.
  void prune_name_mutex(const std::string& key);
  // IssueSlot holds one of max_concurrent_issuances while an order runs.
  class IssueSlot;

  std::vector<std::unique_ptr<IssuerSlot>> issuers_;  // each with its own lock
  std::mutex rng_mu_;  // guards rng_
  std::mt19937_64 rng_;
  std::mutex events_mu_;  // guards pending_events_
  std::vector<ManagerEvent> pending_events_;  // emitted by flush_events() after the work
  std::mutex names_mu_;  // guards name_mutexes_
  std::map<std::string, std::shared_ptr<std::mutex>> name_mutexes_;  // by storage name
  std::mutex slots_mu_;
  std::condition_variable slots_cv_;
  int slots_used_ = 0;

  mutable std::mutex mu_;  // guards managed_
  std::map<std::string, Managed> managed_;  // by storage name

  // publish_mu_ is held across each store change publish_replacing makes, and to change held_:
  // so unmanage() either comes after a publication (and returns its id) or before it (and the
  // publication does not happen). Lock order: publish_mu_, then mu_.
  std::mutex publish_mu_;
  std::set<std::string> held_;  // storage names unmanage()d; written holding publish_mu_ and mu_
  // The id of the certificate last published for each storage name (publish_mu_); erased by
  // forget() and unmanage().
  std::map<std::string, std::string> published_;

  std::atomic<uint64_t> loaded_{0}, obtained_{0}, renewed_{0}, failed_{0}, fallbacks_{0}, expiring_{0}, abandoned_{0},
      revoked_{0};

  std::mutex loop_mu_;
  std::condition_variable loop_cv_;
  bool stopping_ = false;
  bool loop_done_ = false;
  std::thread thread_;
};

}  // namespace autotls::tlsreload
