#include "tlsreload/on_demand.h"

#include <algorithm>
#include <array>
#include <functional>

#include "tlsreload/manager.h"
#include "tlsreload/store.h"

namespace autotls::tlsreload {

namespace {

constexpr std::string_view kLog = "tlsreload.on_demand";

bool is_ldh(char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-'; }

// split_labels splits a name at dots (empty labels kept, so they can be refused).
std::vector<std::string_view> split_labels(std::string_view name) {
  std::vector<std::string_view> out;
  size_t start = 0;
  for (;;) {
    size_t dot = name.find('.', start);
    if (dot == std::string_view::npos) {
      out.push_back(name.substr(start));
      return out;
    }
    out.push_back(name.substr(start, dot - start));
    start = dot + 1;
  }
}

// valid_pattern checks an allowed pattern: a valid name, optionally after "*." or "**.".
Status valid_pattern(const std::string& pattern) {
  std::string_view rest = pattern;
  if (rest.starts_with("**.")) {
    rest.remove_prefix(3);
  } else if (rest.starts_with("*.")) {
    rest.remove_prefix(2);
  }
  auto n = on_demand_name(rest);
  if (!n || *n != rest) {
    return fail(Errc::invalid_input, "on-demand: allowed pattern \"" + pattern +
                                         "\" is not a lower-case DNS name, \"*.NAME\" or \"**.NAME\"");
  }
  return {};
}

// Process-wide versions of LRU indexes, so that a thread's cached copy can never be taken for
// another OnDemand's index of the same number.
std::atomic<uint64_t> g_lru_versions{0};

}  // namespace

namespace detail {

struct NameHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};

// OnDemandLruEntry is one on-demand name in memory; last_used is written by handshakes
// (relaxed: only the order of stamps matters, and a stale read only makes eviction a little
// less exact) and read by the evictor.
struct OnDemandLruEntry {
  explicit OnDemandLruEntry(uint64_t stamp) : last_used(stamp) {}
  std::atomic<uint64_t> last_used;
};

using LruShard = std::unordered_map<std::string, std::shared_ptr<OnDemandLruEntry>, NameHash, std::equal_to<>>;
constexpr std::size_t kLruShards = 64;

// OnDemandLru is one immutable version of the index. A change copies the array of shard
// pointers and the shards it edits, never the others, so adding a name to 10,000 costs about
// 160 map entries, not 10,000.
struct OnDemandLru {
  uint64_t version = 0;
  std::size_t size = 0;
  std::array<std::shared_ptr<const LruShard>, kLruShards> shards;  // never null

  static std::size_t shard_of(std::string_view name) { return NameHash{}(name) % kLruShards; }
  // find: entries are shared with later versions; only their stamp ever changes.
  OnDemandLruEntry* find(std::string_view name) const {
    const LruShard& s = *shards[shard_of(name)];
    auto it = s.find(name);
    return it == s.end() ? nullptr : it->second.get();
  }
};

}  // namespace detail

namespace {

using detail::OnDemandLru;

// The per-thread copy of the last LRU index a handshake on this thread used.
struct LruCache {
  uint64_t version = 0;
  std::shared_ptr<const OnDemandLru> index;
};
thread_local LruCache tl_lru;

std::shared_ptr<const OnDemandLru> empty_lru() {
  auto e = std::make_shared<OnDemandLru>();
  auto shard = std::make_shared<const detail::LruShard>();
  e->shards.fill(shard);
  e->version = g_lru_versions.fetch_add(1, std::memory_order_relaxed) + 1;
  return e;
}

}  // namespace

Result<std::string> on_demand_name(std::string_view sni) {
  if (sni.ends_with('.')) sni.remove_suffix(1);
  if (sni.empty()) return fail(Errc::invalid_input, "empty name");
  if (sni.size() > 253) return fail(Errc::invalid_input, "name longer than 253 octets");
  std::string name(sni);
  for (char& c : name) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    if (!is_ldh(c) && c != '.') {
      return fail(Errc::invalid_input, "name contains a character other than letters, digits, '-' and '.'");
    }
  }
  auto labels = split_labels(name);
  if (labels.size() < 2) return fail(Errc::invalid_input, "name has a single label");
  for (auto label : labels) {
    if (label.empty()) return fail(Errc::invalid_input, "name has an empty label");
    if (label.size() > 63) return fail(Errc::invalid_input, "name has a label longer than 63 octets");
    if (label.front() == '-' || label.back() == '-') {
      return fail(Errc::invalid_input, "name has a label starting or ending with '-'");
    }
  }
  // An all-numeric last label is an IPv4 literal (or would be read as one); IPv6 literals
  // already failed on ':'. IP addresses are never issued on demand.
  if (std::all_of(labels.back().begin(), labels.back().end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return fail(Errc::invalid_input, "name is an IP address literal");
  }
  return name;
}

bool matches_pattern(std::string_view pattern, std::string_view name) {
  if (pattern.starts_with("**.")) {
    std::string_view suffix = pattern.substr(2);  // ".example.com"
    return name.size() > suffix.size() && name.ends_with(suffix);
  }
  if (pattern.starts_with("*.")) {
    std::string_view suffix = pattern.substr(1);
    auto dot = name.find('.');
    return dot != std::string_view::npos && dot > 0 && name.substr(dot) == suffix;
  }
  return pattern == name;
}

Status validate_on_demand(const OnDemandOptions& o) {
  if (!o.enabled) return {};
  if (o.allowed.empty() && o.ask_url.empty()) {
    return fail(Errc::invalid_input,
                "on-demand is enabled without a policy: set \"on-demand-allow\" (name patterns) and/or "
                "\"on-demand-ask\" (a URL that answers 200 for allowed names)");
  }
  for (const auto& p : o.allowed) {
    if (auto st = valid_pattern(p); !st) return st;
  }
  if (!o.ask_url.empty() && !o.ask_url.starts_with("http://") && !o.ask_url.starts_with("https://")) {
    return fail(Errc::invalid_input, "on-demand: ask URL \"" + o.ask_url + "\" must start with http:// or https://");
  }
  if (o.max_concurrent < 1) return fail(Errc::invalid_input, "on-demand: max concurrent issuances must be at least 1");
  if (o.max_cached < 1) return fail(Errc::invalid_input, "on-demand: max cached certificates must be at least 1");
  if (o.global_rate.count < 0 || o.per_name_rate.count < 0) {
    return fail(Errc::invalid_input, "on-demand: rates must not be negative");
  }
  if ((o.global_rate.count > 0 && o.global_rate.per.count() <= 0) ||
      (o.per_name_rate.count > 0 && o.per_name_rate.per.count() <= 0)) {
    return fail(Errc::invalid_input, "on-demand: a rate needs a positive interval");
  }
  if (o.handshake_wait.count() <= 0 || o.ask_timeout.count() <= 0) {
    return fail(Errc::invalid_input, "on-demand: handshake wait and ask timeout must be positive");
  }
  return {};
}

OnDemandBackend manager_backend(Manager& manager, CertStore& store) {
  OnDemandBackend b;
  b.load = [&manager](const std::string& name) { return manager.load_stored_only({name}); };
  b.obtain = [&manager](const std::string& name) {
    auto st = manager.manage({name});
    // A name that got no certificate is not kept managed: renew_due would retry it forever
    // (spending the CA's failed-validation limit) and the LRU never sees it. The negative
    // cache holds it off; a later handshake may try again.
    if (!st) (void)manager.forget({name});
    return st;
  };
  b.evict = [&manager, &store](const std::string& name) {
    std::string id = manager.forget({name});
    if (!id.empty()) (void)store.remove(id);
  };
  return b;
}

Result<std::unique_ptr<OnDemand>> OnDemand::create(OnDemandOptions options, OnDemandBackend backend) {
  if (auto st = validate_on_demand(options); !st) return fail(st.error());
  if (!options.enabled) return fail(Errc::invalid_input, "on-demand: not enabled");
  if (!backend.load || !backend.obtain || !backend.evict) {
    return fail(Errc::invalid_input, "on-demand: backend needs load, obtain and evict");
  }
  std::unique_ptr<OnDemand> od(new OnDemand(std::move(options), std::move(backend)));
  if (!od->options_.ask_url.empty() && !od->ask_transport_) {
    acme::CurlOptions curl;
    curl.ca_bundle = od->options_.ca_bundle;
    curl.total_timeout = od->options_.ask_timeout;
    curl.connect_timeout = std::min(od->options_.ask_timeout, std::chrono::milliseconds(2'000));
    curl.max_body_bytes = 64 * 1024;
    od->ask_transport_ = std::shared_ptr<acme::HttpTransport>(acme::make_curl_transport(curl));
  }
  for (int i = 0; i < od->options_.max_concurrent; ++i) {
    od->workers_.emplace_back([p = od.get()] { p->worker(); });
  }
  return od;
}

OnDemand::OnDemand(OnDemandOptions options, OnDemandBackend backend)
    : options_(std::move(options)),
      backend_(std::move(backend)),
      clock_(options_.clock ? options_.clock : &autotls::system_clock()),
      logger_(options_.logger ? options_.logger : &null_logger()),
      ask_transport_(options_.ask_transport),
      lru_(empty_lru()) {}

OnDemand::~OnDemand() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void OnDemand::install(AttachOptions& options) {
  options.on_unknown_name = [this](std::string_view sni) { return decide(sni); };
  options.on_served = [this](std::string_view sni) { touch(sni); };
  options.unknown_name_wait = options_.handshake_wait;
}

bool OnDemand::allowed_by_patterns(const std::string& name) const {
  if (options_.allowed.empty()) return true;  // the ask URL decides alone
  return std::any_of(options_.allowed.begin(), options_.allowed.end(),
                     [&](const std::string& p) { return matches_pattern(p, name); });
}

void OnDemand::deny(const std::string& name, std::chrono::seconds ttl) {
  auto now = clock_->now();
  if (denied_.size() >= options_.max_denied) {
    std::erase_if(denied_, [&](const auto& e) { return e.second <= now; });
    // Still full (a flood of distinct names): drop arbitrary entries; a dropped name is only
    // checked again (patterns, ask), never allowed by it.
    while (denied_.size() >= options_.max_denied && !denied_.empty()) denied_.erase(denied_.begin());
  }
  denied_[name] = now + ttl;
}

UnknownName OnDemand::decide(std::string_view sni) {
  auto name = on_demand_name(sni);
  std::lock_guard lock(mu_);
  if (!name) {
    // Not cached: refusing costs no more than the lookup would, and keeps junk out of memory.
    ++counters_.invalid;
    return UnknownName::fail;
  }
  if (pending_.count(*name)) return UnknownName::retry;
  if (auto it = denied_.find(*name); it != denied_.end()) {
    if (clock_->now() < it->second) {
      ++counters_.negative_hits;
      return UnknownName::fail;
    }
    denied_.erase(it);
  }
  if (!allowed_by_patterns(*name)) {
    ++counters_.denied;
    deny(*name, options_.deny_ttl);
    return UnknownName::fail;
  }
  if (stopping_ || queue_.size() >= options_.max_queued) {
    ++counters_.throttled;
    return UnknownName::fail;
  }
  pending_.insert(*name);
  queue_.push_back(std::move(*name));
  cv_.notify_one();
  return UnknownName::retry;
}

void OnDemand::touch(std::string_view sni) {
  // Every handshake with a certificate comes here; most are for configured names. Nothing on
  // this path locks, allocates or writes shared memory unless the name is an on-demand one.
  const uint64_t v = lru_version_.load(std::memory_order_acquire);
  if (v == 0) return;  // no on-demand certificate in memory
  if (sni.ends_with('.')) sni.remove_suffix(1);
  if (sni.empty() || sni.size() > 253) return;  // never an on-demand name (on_demand_name)
  char buf[253];
  for (std::size_t i = 0; i < sni.size(); ++i) {
    char c = sni[i];
    buf[i] = c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c;
  }
  LruCache& cache = tl_lru;
  if (cache.version != v) [[unlikely]] {
    // Only after the index changed (an on-demand load, issuance or eviction): no lock, so a
    // handshake never waits for a writer building the next index or scanning for evictions.
    std::shared_ptr<const OnDemandLru> fresh = lru_.acquire();
    cache.version = fresh->version;
    // The previous copy is parked by the writer (HazardPublished::publish): dropping it is a
    // decrement, never the free.
    cache.index.swap(fresh);
  }
  detail::OnDemandLruEntry* e = cache.index->find(std::string_view(buf, sni.size()));
  if (!e) return;
  e->last_used.store(tick_.fetch_add(1, std::memory_order_relaxed) + 1, std::memory_order_relaxed);
}

void OnDemand::publish_lru(std::shared_ptr<const OnDemandLru> next) {
  const uint64_t v = next->size ? next->version : 0;
  // Published before its version, so a handshake that sees v acquires this index or a later
  // one. Threads may still hold the previous index in their copy: publish() parks it and
  // frees it at a later change, once no thread holds or is taking it.
  lru_.publish(std::move(next));
  lru_version_.store(v, std::memory_order_release);
}

void OnDemand::remember(const std::string& name) {
  std::vector<std::string> evict;
  {
    std::unique_lock lock(lru_mu_);
    // A name that became configured while its job ran (a SIGHUP made it a site) is not
    // on-demand's to evict. Asked under lru_mu_: see OnDemandBackend::configured.
    if (backend_.configured && backend_.configured(name)) {
      lock.unlock();
      logger_->log(LogLevel::debug, kLog, "configured name left out of the on-demand cache", {{"name", name}});
      return;
    }
    ++remembered_;
    const uint64_t stamp = tick_.fetch_add(1, std::memory_order_relaxed) + 1;
    if (auto* e = lru_.current()->find(name)) {
      e->last_used.store(stamp, std::memory_order_relaxed);
    } else {
      auto next = std::make_shared<OnDemandLru>(*lru_.current());
      std::array<detail::LruShard*, detail::kLruShards> copied{};  // shards of next already copied
      auto edit = [&](std::size_t s) {
        if (!copied[s]) {
          auto shard = std::make_shared<detail::LruShard>(*next->shards[s]);
          copied[s] = shard.get();
          next->shards[s] = std::move(shard);
        }
        return copied[s];
      };
      edit(OnDemandLru::shard_of(name))->emplace(name, std::make_shared<detail::OnDemandLruEntry>(stamp));
      next->size += 1;
      if (next->size > options_.max_cached) {
        // The least recent by stamp; never the name just added (a handshake may have stamped
        // others since, but it is the one a handshake is waiting for).
        std::vector<std::pair<uint64_t, const std::string*>> all;
        all.reserve(next->size);
        for (const auto& shard : next->shards) {
          for (const auto& [n, entry] : *shard) {
            if (n != name) all.emplace_back(entry->last_used.load(std::memory_order_relaxed), &n);
          }
        }
        const std::size_t over = next->size - options_.max_cached;
        std::nth_element(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(over - 1), all.end());
        std::sort(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(over));
        for (std::size_t i = 0; i < over; ++i) evict.push_back(*all[i].second);  // copied before erasing
        for (const auto& n : evict) edit(OnDemandLru::shard_of(n))->erase(n);
        next->size -= over;
      }
      next->version = g_lru_versions.fetch_add(1, std::memory_order_relaxed) + 1;
      publish_lru(std::move(next));
    }
  }
  for (const auto& e : evict) {
    backend_.evict(e);
    logger_->log(LogLevel::debug, kLog, "certificate evicted from memory", {{"name", e}});
    std::lock_guard lock(mu_);
    ++counters_.evicted;
  }
}

void OnDemand::release(const std::vector<std::string>& names) {
  std::lock_guard lock(lru_mu_);
  std::shared_ptr<OnDemandLru> next;
  std::array<detail::LruShard*, detail::kLruShards> copied{};  // shards of next already copied
  for (const auto& input : names) {
    // As the LRU holds them (decide's spelling); a name that is none was never remembered.
    auto valid = on_demand_name(input);
    if (!valid) continue;
    const std::string& name = *valid;
    if (!lru_.current()->find(name) || (next && !next->find(name))) continue;
    if (!next) next = std::make_shared<OnDemandLru>(*lru_.current());
    const std::size_t s = OnDemandLru::shard_of(name);
    if (!copied[s]) {
      auto shard = std::make_shared<detail::LruShard>(*next->shards[s]);
      copied[s] = shard.get();
      next->shards[s] = std::move(shard);
    }
    copied[s]->erase(name);
    next->size -= 1;
  }
  if (!next) return;
  next->version = g_lru_versions.fetch_add(1, std::memory_order_relaxed) + 1;
  publish_lru(std::move(next));
}

bool OnDemand::take_rate(const std::string& name) {
  auto now = clock_->now();
  auto within = [&](std::deque<Clock::time_point>& q, const Rate& r) {
    if (r.count <= 0) return true;
    while (!q.empty() && q.front() <= now - r.per) q.pop_front();
    return q.size() < static_cast<size_t>(r.count);
  };
  auto& mine = name_issued_[name];
  if (!within(global_issued_, options_.global_rate) || !within(mine, options_.per_name_rate)) {
    if (mine.empty()) name_issued_.erase(name);
    return false;
  }
  global_issued_.push_back(now);
  mine.push_back(now);
  // Forget names whose window is over, so the map does not grow with every name ever issued.
  if (name_issued_.size() > 4096) {
    std::erase_if(name_issued_, [&](const auto& e) {
      return e.second.empty() || e.second.back() <= now - options_.per_name_rate.per;
    });
  }
  return true;
}

int OnDemand::ask(const std::string& name) {
  {
    std::lock_guard lock(mu_);
    ++counters_.asked;
  }
  acme::HttpRequest req;
  req.method = "GET";
  req.url = options_.ask_url + (options_.ask_url.find('?') == std::string::npos ? "?" : "&") + "domain=" + name;
  auto start = std::chrono::steady_clock::now();
  auto r = ask_transport_->send(req);
  // An injected transport may not enforce the timeout itself: a late answer is a timeout.
  if (r && std::chrono::steady_clock::now() - start > options_.ask_timeout) {
    r = fail(Errc::timeout, "ask: no answer within the timeout");
  }
  if (!r) {
    logger_->log(LogLevel::warn, kLog, "ask request failed; name denied",
                 {{"name", name}, {"error", r.error().message}});
    return -1;
  }
  return r->status == 200 ? 1 : 0;
}

void OnDemand::run_job(const std::string& name) {
  if (!options_.ask_url.empty()) {
    int a = ask(name);
    if (a != 1) {
      {
        std::lock_guard lock(mu_);
        ++counters_.denied;
        deny(name, a == 0 ? options_.deny_ttl : options_.failure_ttl);
      }
      // Logged after mu_ is released: handshakes (decide) take mu_.
      logger_->log(LogLevel::info, kLog, "on-demand name denied by the ask URL", {{"name", name}});
      return;
    }
  }
  // Storage first: a certificate issued before (by this or another instance, or evicted from
  // memory) is loaded, not issued again.
  auto loaded = backend_.load(name);
  if (loaded && *loaded) {
    std::lock_guard lock(mu_);
    ++counters_.loaded;
  }
  if (loaded && *loaded) {
    remember(name);
    return;
  }
  if (!loaded) {
    logger_->log(LogLevel::warn, kLog, "storage read failed", {{"name", name}, {"error", loaded.error().message}});
    std::lock_guard lock(mu_);
    ++counters_.failed;
    deny(name, options_.failure_ttl);
    return;
  }
  bool throttled = false;
  {
    std::lock_guard lock(mu_);
    if (!take_rate(name)) {
      ++counters_.throttled;
      deny(name, options_.failure_ttl);
      throttled = true;
    }
  }
  if (throttled) {
    logger_->log(LogLevel::warn, kLog, "on-demand issuance throttled", {{"name", name}});  // not under mu_
    return;
  }
  auto st = backend_.obtain(name);
  if (!st) {
    logger_->log(LogLevel::warn, kLog, "on-demand issuance failed", {{"name", name}, {"error", st.error().message}});
    std::lock_guard lock(mu_);
    ++counters_.failed;
    deny(name, options_.failure_ttl);
    return;
  }
  {
    std::lock_guard lock(mu_);
    ++counters_.obtained;
  }
  remember(name);
}

void OnDemand::worker() {
  for (;;) {
    std::string name;
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      name = std::move(queue_.front());
      queue_.pop_front();
      ++running_;
    }
    try {
      run_job(name);
    } catch (const std::exception& e) {
      logger_->log(LogLevel::error, kLog, "on-demand job failed", {{"name", name}, {"error", e.what()}});
    }
    {
      std::lock_guard lock(mu_);
      pending_.erase(name);
      --running_;
    }
    idle_cv_.notify_all();
  }
}

bool OnDemand::wait_idle(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  return idle_cv_.wait_for(lock, timeout, [&] { return queue_.empty() && running_ == 0; });
}

bool OnDemand::denied(std::string_view sni) const {
  auto name = on_demand_name(sni);
  if (!name) return false;
  std::lock_guard lock(mu_);
  auto it = denied_.find(*name);
  return it != denied_.end() && clock_->now() < it->second;
}

std::vector<std::string> OnDemand::cached() const {
  std::vector<std::pair<uint64_t, std::string>> all;
  {
    std::lock_guard lock(lru_mu_);
    for (const auto& shard : lru_.current()->shards) {
      for (const auto& [n, entry] : *shard) all.emplace_back(entry->last_used.load(std::memory_order_relaxed), n);
    }
  }
  std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  std::vector<std::string> out;
  out.reserve(all.size());
  for (auto& [_, n] : all) out.push_back(std::move(n));
  return out;
}

OnDemand::Counters OnDemand::counters() const {
  Counters c;
  {
    std::lock_guard lock(mu_);
    c = counters_;
  }
  std::lock_guard lock(lru_mu_);
  // Every stamp is a handshake's touch or a remember(); the latter are counted.
  c.touched = tick_.load(std::memory_order_relaxed) - remembered_;
  return c;
}

}  // namespace autotls::tlsreload
