#pragma once

// OnDemand: certificates for names nobody configured, decided at the TLS handshake (Caddy's
// "on_demand_tls"). Off unless enabled, allowed only by a policy (name patterns and/or an "ask"
// URL), throttled, and never blocking a handshake thread.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include "acme/transport.h"
#include "acme/util/clock.h"
#include "acme/util/error.h"
#include "acme/util/logger.h"
#include "tlsreload/detail/hazard.h"
#include "tlsreload/openssl_hook.h"

namespace autotls::tlsreload {

// Rate allows `count` events per `per` (a sliding window). count 0: unlimited.
struct Rate {
  int count = 0;
  std::chrono::seconds per{0};
};

struct OnDemandOptions {
  bool enabled = false;
  // allowed: name patterns. "example.com" (that name), "*.example.com" (one label in front),
  // "**.example.com" (one or more labels in front). When non-empty a name must match one.
  std::vector<std::string> allowed;
  // ask_url: when set, GET <ask_url>?domain=<name> must answer 200 for the name to be allowed
  // (anything else, an error or ask_timeout denies). With allowed set too, both must agree.
  std::string ask_url;
  std::chrono::milliseconds ask_timeout{3'000};
  // ask_transport replaces the libcurl transport for the ask request (tests inject a fake).
  std::shared_ptr<acme::HttpTransport> ask_transport;
  std::string ca_bundle;  // for an https ask URL; empty: system store
  // Throttles on issuance (not on loads from storage): across all names and per name.
  Rate global_rate{20, std::chrono::seconds(60)};
  Rate per_name_rate{2, std::chrono::seconds(3600)};
  // max_concurrent: on-demand jobs (ask, load, issue) in flight at once; max_queued: jobs
  // waiting for one of them. A handshake that would queue beyond it fails at once.
  int max_concurrent = 4;
  std::size_t max_queued = 256;
  // deny_ttl: how long a denied name (pattern, ask) is refused without asking again;
  // failure_ttl: the same after a failed ask request, a failed issuance or a throttle.
  // max_denied caps the negative cache (expired entries go first, then arbitrary ones).
  std::chrono::seconds deny_ttl{600};
  std::chrono::seconds failure_ttl{60};
  std::size_t max_denied = 100'000;
  // max_cached: on-demand certificates held in memory; beyond it the least recently used
  // (by handshake) is evicted and comes back from storage on its next handshake.
  std::size_t max_cached = 10'000;
  // handshake_wait: how long a handshake waits for its name's job (AttachOptions).
  std::chrono::milliseconds handshake_wait{10'000};
  Clock* clock = nullptr;    // nullptr: system_clock()
  Logger* logger = nullptr;  // nullptr: null_logger()
};

// validate_on_demand checks options: with enabled, a policy (allowed and/or ask_url) is
// required, patterns must parse, and limits must be positive. The error names the fix.
[[nodiscard]] Status validate_on_demand(const OnDemandOptions& options);

// on_demand_name normalizes sni (lower case, one trailing dot dropped) and checks that it is a
// DNS name a CA could issue for: LDH labels of 1..63 octets (no leading/trailing hyphen), at
// most 253 octets, at least two labels, not an IP literal, no wildcard, no path separator.
// Returns the normalized name or why it is refused.
[[nodiscard]] Result<std::string> on_demand_name(std::string_view sni);

// matches_pattern reports whether name (normalized) matches one allowed pattern.
bool matches_pattern(std::string_view pattern, std::string_view name);

// OnDemandBackend is how OnDemand reaches storage and the CA (the Manager in production).
// Each function gets one normalized name and is called from an OnDemand worker thread.
struct OnDemandBackend {
  // load serves the stored certificate for name if storage has a valid one; true if it did.
  std::function<Result<bool>(const std::string& name)> load;
  // obtain issues, stores and serves a certificate for name.
  std::function<Status(const std::string& name)> obtain;
  // evict takes name's certificate out of memory (store and renewals), not out of storage.
  std::function<void(const std::string& name)> evict;
  // configured (optional) says name is configured now (a site), which on-demand must never
  // evict: a job that ends for such a name does not add it to the LRU. It is asked under the
  // LRU's lock, so a name made configured before release() is called for it is either found
  // configured here or taken out by that release(); it must not call into the OnDemand.
  std::function<bool(const std::string& name)> configured;
};

class Manager;
class CertStore;
namespace detail {
struct OnDemandLru;  // the LRU index of on-demand certificates (on_demand.cpp)
}
// manager_backend wires OnDemand to a Manager: load is Manager::load_stored_only, obtain is
// Manager::manage, evict is Manager::forget plus CertStore::remove. Both MUST outlive the
// OnDemand.
OnDemandBackend manager_backend(Manager& manager, CertStore& store);

class OnDemand {
 public:
  struct Counters {
    uint64_t invalid = 0;        // refused names that are not valid DNS names
    uint64_t denied = 0;         // refused by pattern or ask
    uint64_t negative_hits = 0;  // handshakes refused from the negative cache
    uint64_t asked = 0;          // ask requests sent
    uint64_t throttled = 0;      // issuances refused by a rate, and handshakes over max_queued
    uint64_t loaded = 0;         // certificates loaded from storage
    uint64_t obtained = 0;       // certificates issued
    uint64_t failed = 0;         // failed loads and issuances
    uint64_t evicted = 0;        // certificates evicted from memory
    // touched: handshakes that refreshed an on-demand certificate's LRU stamp. Handshakes
    // served a configured certificate never count here (nor take any lock in touch()).
    uint64_t touched = 0;
  };

  // create validates options (validate_on_demand) and starts max_concurrent worker threads.
  [[nodiscard]] static Result<std::unique_ptr<OnDemand>> create(OnDemandOptions options,
                                                                OnDemandBackend backend);
  ~OnDemand();  // stops the workers (a job in progress finishes first)
  OnDemand(const OnDemand&) = delete;
  OnDemand& operator=(const OnDemand&) = delete;

  // decide is AttachOptions::on_unknown_name: never blocks on I/O. An invalid name, a name in
  // the negative cache or outside the patterns fails; otherwise a job for the name is started
  // (or joined) and the handshake is told to retry.
  UnknownName decide(std::string_view sni);
  // touch is AttachOptions::on_served: marks an on-demand name as just used. It takes no lock
  // and allocates nothing: with no on-demand certificate in memory it is one atomic load; else
  // a lookup in a per-thread copy of the LRU index, and for an on-demand name one relaxed
  // atomic increment and store. Names not obtained on demand are left alone.
  void touch(std::string_view sni);
  // install sets on_unknown_name, on_served and unknown_name_wait in attach options. This
  // OnDemand MUST outlive the SSL_CTX they are attached to.
  void install(AttachOptions& options);

  // release takes names out of the LRU index without evicting them: they stay managed and in
  // the store, and are never evicted by this OnDemand again (until a handshake makes one an
  // on-demand name again). For names that became configured (serve: a SIGHUP made the name a
  // site), which, like every configured name, must not be evicted. A job in flight for such a
  // name when it is released would add it back when it ends: make the name configured (the
  // backend's `configured`) before calling release, and that job leaves it out.
  void release(const std::vector<std::string>& names);
  // wait_idle waits until no job is queued or running, up to timeout (tests, shutdown).
  bool wait_idle(std::chrono::milliseconds timeout);
  // denied reports whether sni is in the negative cache now.
  bool denied(std::string_view sni) const;
  // cached lists the on-demand names held in memory, most recently used first.
  std::vector<std::string> cached() const;
  Counters counters() const;

 private:
  OnDemand(OnDemandOptions options, OnDemandBackend backend);
  void worker();
  void run_job(const std::string& name);
  // ask returns 1 (allowed), 0 (denied) or -1 (failed: error or timeout).
  int ask(const std::string& name);
  bool allowed_by_patterns(const std::string& name) const;
  void deny(const std::string& name, std::chrono::seconds ttl);  // with mu_ held
  bool take_rate(const std::string& name);                        // with mu_ held
  void remember(const std::string& name);  // adds to the LRU, evicts beyond max_cached
  // publish_lru makes next the LRU index (with lru_mu_ held).
  void publish_lru(std::shared_ptr<const detail::OnDemandLru> next);

  OnDemandOptions options_;
  OnDemandBackend backend_;
  Clock* clock_;
  Logger* logger_;
  std::shared_ptr<acme::HttpTransport> ask_transport_;

  mutable std::mutex mu_;
  std::condition_variable cv_;       // jobs queued, or stopping
  std::condition_variable idle_cv_;  // a job finished
  bool stopping_ = false;
  std::deque<std::string> queue_;
  std::set<std::string> pending_;  // queued or running
  std::size_t running_ = 0;
  std::unordered_map<std::string, Clock::time_point> denied_;  // name -> until
  std::deque<Clock::time_point> global_issued_;
  std::unordered_map<std::string, std::deque<Clock::time_point>> name_issued_;
  Counters counters_;

  // The LRU of on-demand certificates in memory. Handshakes (touch) never lock it nor wait for
  // a writer: the index (name -> entry, in shards) is immutable and replaced under lru_mu_
  // (writers only) when a name comes or goes, copying only the shard that changed; a handshake
  // uses its thread's copy of the index, revalidated against lru_version_, and refreshes that
  // copy without a lock through lru_ (hazard pointers: the CertStore scheme, same code). Each
  // entry has a last-used stamp, a relaxed atomic taken from tick_, that the evictor reads to
  // pick the least recent.
  mutable std::mutex lru_mu_;  // serializes writers (remember) and cached()/counters()
  detail::HazardPublished<detail::OnDemandLru> lru_;  // current()/publish() under lru_mu_
  uint64_t remembered_ = 0;  // stamps taken by remember(), not handshakes (lru_mu_)
  // lru_version_: the version of lru_ (process-wide unique), 0 while it is empty.
  alignas(64) std::atomic<uint64_t> lru_version_{0};
  alignas(64) std::atomic<uint64_t> tick_{0};

  std::vector<std::thread> workers_;
};

}  // namespace autotls::tlsreload
