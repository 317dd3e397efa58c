// store_bench: figures for the certificate store (tlsreload::CertStore).
//
//   store_bench gen DIR N        write N ECDSA P-256 leaves (one shared intermediate) in
//                                certbot layout: DIR/live/<name>/{fullchain,privkey}.pem
//   store_bench load DIR         load DIR into a fresh store; JSON: load_s, rss_bytes_per_cert
//   store_bench watch DIR        CertWatcher: time to add DIR/live (load + inotify watches),
//                                time from a new certificate written for one pair to its
//                                publish, and the cost of a full rescan (SIGHUP)
//   store_bench lookup DIR [S]   lookup latency at 1, 1,000 and all certificates; publish
//                                latency; reader throughput under swaps (S seconds with and
//                                S without a writer, in 5 alternating pairs); atomic<shared_ptr>
//
// Each mode prints one JSON object as its last line. tools/bench/run store merges them.
// Every tenth name is a wildcard ("*.wN.bench.test"), so wildcard hits are measured too.

#include <openssl/ec.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <ctime>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

#include "tlsreload/watcher.h"

#include "acme/util/openssl.h"
#include "tlsreload/certificate.h"
#include "tlsreload/loader.h"
#include "tlsreload/store.h"

namespace fs = std::filesystem;
using namespace autotls;
using SteadyClock = std::chrono::steady_clock;
using nlohmann::json;

namespace {

std::string name_for(size_t i) {
  if (i % 10 == 9) return "*.w" + std::to_string(i) + ".bench.test";
  return "h" + std::to_string(i) + ".bench.test";
}

std::string dir_for(size_t i) {
  if (i % 10 == 9) return "_wildcard_.w" + std::to_string(i) + ".bench.test";
  return name_for(i);
}

// sni_for returns a name that hits certificate i (a label under a wildcard).
std::string sni_for(size_t i) {
  if (i % 10 == 9) return "x.w" + std::to_string(i) + ".bench.test";
  return name_for(i);
}

std::string pem_of(X509* x) {
  ossl::BioPtr bio(BIO_new(BIO_s_mem()));
  PEM_write_bio_X509(bio.get(), x);
  char* d = nullptr;
  long n = BIO_get_mem_data(bio.get(), &d);
  return std::string(d, static_cast<size_t>(n));
}

std::string key_pem_of(EVP_PKEY* k) {
  ossl::BioPtr bio(BIO_new(BIO_s_mem()));
  PEM_write_bio_PrivateKey(bio.get(), k, nullptr, nullptr, 0, nullptr, nullptr);
  char* d = nullptr;
  long n = BIO_get_mem_data(bio.get(), &d);
  return std::string(d, static_cast<size_t>(n));
}

void ext(X509* cert, X509* issuer, int nid, const std::string& value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  ossl::X509ExtPtr e(X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str()));
  X509_add_ext(cert, e.get(), -1);
}

ossl::X509Ptr make(const std::string& cn, EVP_PKEY* key, X509* issuer, EVP_PKEY* issuer_key, bool ca,
                   const std::string& san, long serial) {
  ossl::X509Ptr x(X509_new());
  X509_set_version(x.get(), 2);
  ASN1_INTEGER_set(X509_get_serialNumber(x.get()), serial);
  X509_gmtime_adj(X509_getm_notBefore(x.get()), -3600);
  X509_gmtime_adj(X509_getm_notAfter(x.get()), 90L * 86400);
  X509_NAME_add_entry_by_txt(X509_get_subject_name(x.get()), "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
  X509_set_issuer_name(x.get(), issuer ? X509_get_subject_name(issuer) : X509_get_subject_name(x.get()));
  X509_set_pubkey(x.get(), key);
  X509* iss = issuer ? issuer : x.get();
  ext(x.get(), iss, NID_subject_key_identifier, "hash");
  ext(x.get(), iss, NID_authority_key_identifier, "keyid:always");
  ext(x.get(), iss, NID_basic_constraints, ca ? "critical,CA:TRUE" : "critical,CA:FALSE");
  if (!san.empty()) ext(x.get(), iss, NID_subject_alt_name, san);
  X509_sign(x.get(), issuer_key, EVP_sha256());
  return x;
}

ossl::EvpPkeyPtr p256() { return ossl::EvpPkeyPtr(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256")); }

void write_file(const fs::path& p, const std::string& data) {
  std::ofstream f(p, std::ios::binary);
  f << data;
}

int gen(const fs::path& dir, size_t n) {
  auto root_key = p256(), inter_key = p256();
  auto root = make("Bench Root", root_key.get(), nullptr, root_key.get(), true, "", 1);
  auto inter = make("Bench Intermediate", inter_key.get(), root.get(), root_key.get(), true, "", 2);
  std::string inter_pem = pem_of(inter.get());
  fs::create_directories(dir / "live");
  write_file(dir / "root.pem", pem_of(root.get()));
  // Two threads: generation is CPU-bound signing.
  auto work = [&](size_t begin, size_t step) {
    for (size_t i = begin; i < n; i += step) {
      auto key = p256();
      std::string name = name_for(i);
      auto leaf = make(name, key.get(), inter.get(), inter_key.get(), false, "DNS:" + name, static_cast<long>(i + 100));
      fs::path d = dir / "live" / dir_for(i);
      fs::create_directories(d);
      write_file(d / "fullchain.pem", pem_of(leaf.get()) + inter_pem);
      write_file(d / "privkey.pem", key_pem_of(key.get()));
    }
  };
  std::thread t(work, 1, 2);
  work(0, 2);
  t.join();
  write_file(dir / "complete", std::to_string(n));
  std::cout << json{{"generated", n}}.dump() << "\n";
  return 0;
}

size_t rss_bytes() {
  std::ifstream f("/proc/self/statm");
  size_t pages = 0, resident = 0;
  f >> pages >> resident;
  return resident * static_cast<size_t>(sysconf(_SC_PAGESIZE));
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

struct Loaded {
  std::shared_ptr<tlsreload::CertStore> store;
  std::vector<std::shared_ptr<const tlsreload::Certificate>> certs;
  double seconds = 0;
  size_t failures = 0;
};

Loaded load(const fs::path& dir) {
  Loaded out;
  out.store = std::make_shared<tlsreload::CertStore>();
  auto t0 = SteadyClock::now();
  auto report = tlsreload::load_directory(dir / "live");
  if (!report) {
    std::cerr << "load: " << report.error().message << "\n";
    std::exit(2);
  }
  tlsreload::publish_all(*out.store, *report);
  out.seconds = std::chrono::duration<double>(SteadyClock::now() - t0).count();
  out.failures = report->failures.size();
  for (auto& f : report->failures) std::cerr << f.path << ": " << f.error.message << "\n";
  out.certs = std::move(report->certificates);
  return out;
}

int load_mode(const fs::path& dir) {
  size_t before = rss_bytes();
  Loaded l = load(dir);
  size_t after = rss_bytes();
  size_t n = l.certs.size();
  json out{{"count", n}, {"failures", l.failures}, {"load_s", l.seconds},
           {"rss_bytes_per_cert", n ? double(after - before) / double(n) : 0.0}};
  // The same store with the OpenSSL object cache full (every certificate used once, so the
  // cache holds its capacity of hot entries): the memory a busy server actually has.
  // Touching capacity + 1,000 certificates fills it; each first use verifies (~0.5 ms).
  size_t touch = std::min(n, tlsreload::openssl_cache_stats().capacity + 1000);
  for (size_t i = 0; i < touch; ++i) (void)l.certs[i]->openssl();
  size_t hot = rss_bytes();
  auto stats = tlsreload::openssl_cache_stats();
  out["rss_bytes_per_cert_cache_full"] = n ? double(hot - before) / double(n) : 0.0;
  out["openssl_cache_size"] = stats.size;
  out["openssl_cache_capacity"] = stats.capacity;
  out["verify_failed"] = stats.verify_failed;
  // Full validation at load (LoadOptions{}: OpenSSL parsing + chain signature) on a sample,
  // per certificate, single thread: what the deferred default saves.
  {
    auto scan = tlsreload::find_certbot_pairs(dir / "live");
    std::vector<tlsreload::CertKeyPaths> sample(scan->pairs.begin(),
                                                scan->pairs.begin() + std::min<size_t>(500, scan->pairs.size()));
    auto t0 = SteadyClock::now();
    for (auto& p : sample) (void)tlsreload::load_pair(p, tlsreload::LoadOptions{});
    out["load_full_validation_us_per_cert_1thread"] =
        std::chrono::duration<double, std::micro>(SteadyClock::now() - t0).count() / double(sample.size());
  }
  std::cout << out.dump() << "\n";
  return 0;
}

// lookup_ns measures the median cost of lookup_for_handshake over batches of names.
template <class F>
double per_op_ns(const std::vector<std::string>& names, F&& op) {
  const size_t batch = 1000;
  std::vector<double> samples;
  size_t idx = 0;
  for (int b = 0; b < 200; ++b) {
    auto t0 = SteadyClock::now();
    for (size_t k = 0; k < batch; ++k) {
      op(names[idx]);
      if (++idx == names.size()) idx = 0;
    }
    samples.push_back(std::chrono::duration<double, std::nano>(SteadyClock::now() - t0).count() / batch);
  }
  return median(samples);
}

std::vector<std::string> sample_names(size_t count, size_t n, bool wildcard, std::mt19937_64& rng) {
  std::vector<std::string> out;
  if (wildcard && count < 10) return {sni_for(0)};  // no wildcard among so few
  while (out.size() < 4096) {
    size_t i = rng() % count;
    if (wildcard != (i % 10 == 9)) continue;
    out.push_back(sni_for(i));
  }
  (void)n;
  return out;
}

volatile const void* g_sink;

// Handshake-side cost of a certificate's OpenSSL objects: the first use of a bulk-loaded
// certificate (build from DER + deferred verification), a rebuild after eviction (build
// only), and a cache hit.
void openssl_figures(const Loaded& l, json& out) {
  const size_t total = l.certs.size();
  const size_t k = std::min<size_t>(500, total);
  std::vector<double> first, rebuild, hit;
  for (size_t i = 0; i < k; ++i) {
    auto t0 = SteadyClock::now();
    auto v = l.certs[i]->openssl();
    first.push_back(std::chrono::duration<double, std::micro>(SteadyClock::now() - t0).count());
    g_sink = v.leaf;
  }
  for (size_t i = 0; i < k; ++i) {
    auto t0 = SteadyClock::now();
    auto v = l.certs[i]->openssl();
    hit.push_back(std::chrono::duration<double, std::nano>(SteadyClock::now() - t0).count());
    g_sink = v.leaf;
  }
  tlsreload::set_openssl_cache_capacity(0);
  for (size_t i = 0; i < k; ++i) {
    auto t0 = SteadyClock::now();
    auto v = l.certs[i]->openssl();
    rebuild.push_back(std::chrono::duration<double, std::micro>(SteadyClock::now() - t0).count());
    g_sink = v.leaf;
  }
  tlsreload::set_openssl_cache_capacity_automatic();
  out["openssl_first_use_us_p50"] = median(first);
  out["openssl_rebuild_us_p50"] = median(rebuild);
  out["openssl_hit_ns_p50"] = median(hit);
}

// openssl_mode: only the figures above, in a fresh process (a focused run for the cold path).
int openssl_mode(const fs::path& dir) {
  Loaded l = load(dir);
  json out;
  out["certificates"] = l.certs.size();
  openssl_figures(l, out);
  std::cout << out.dump() << std::endl;
  return 0;
}

int lookup_mode(const fs::path& dir, double seconds_per_phase) {
  Loaded l = load(dir);
  const size_t total = l.certs.size();
  std::mt19937_64 rng(42);
  json out;

  // Latency at several sizes: a store holding the first `size` certificates.
  for (size_t size : {size_t(1), size_t(1000), total}) {
    if (size > total) continue;
    tlsreload::CertStore store;
    for (size_t i = 0; i < size; ++i) (void)store.publish(l.certs[i]);
    auto exact = sample_names(size, total, false, rng);
    auto wild = sample_names(size, total, true, rng);
    std::vector<std::string> miss;
    for (int i = 0; i < 4096; ++i) miss.push_back("miss" + std::to_string(rng() % 1000000) + ".other.test");
    auto op = [&](const std::string& s) { g_sink = store.lookup_for_handshake(s, true); };
    std::string suffix = size == total ? "all" : std::to_string(size);
    out["lookup_ns_p50_exact_" + suffix] = per_op_ns(exact, op);
    if (size >= 10) out["lookup_ns_p50_wildcard_" + suffix] = per_op_ns(wild, op);
    out["lookup_ns_p50_miss_" + suffix] = per_op_ns(miss, op);
    auto shared_op = [&](const std::string& s) { g_sink = store.lookup(s, true).get(); };
    out["lookup_shared_ns_p50_exact_" + suffix] = per_op_ns(exact, shared_op);
  }
  out["certificates"] = total;

  openssl_figures(l, out);

  // Baseline: the same names in one std::unordered_map behind std::atomic<std::shared_ptr>,
  // GCC 12's version of which takes a spin lock on every load.
  {
    using Map = std::unordered_map<std::string, std::shared_ptr<const tlsreload::Certificate>>;
    auto map = std::make_shared<Map>();
    for (size_t i = 0; i < total; ++i) (*map)[sni_for(i)] = l.certs[i];
    std::atomic<std::shared_ptr<const Map>> current(map);
    auto exact = sample_names(total, total, false, rng);
    out["atomic_shared_ptr_lookup_ns_p50"] = per_op_ns(exact, [&](const std::string& s) {
      auto m = current.load(std::memory_order_acquire);
      auto it = m->find(s);
      g_sink = it == m->end() ? nullptr : it->second.get();
    });
    out["atomic_shared_ptr_is_lock_free"] = current.is_lock_free();
  }

  // Publish latency into the full store: alternate two certificates for one name's slot.
  {
    auto& store = *l.store;
    std::vector<double> us;
    // Re-publishing certificate i replaces whatever holds its names; to force a real change,
    // alternate between two different certificates for name 0: certs[0] and a copy built from
    // certs[1]'s key is not possible, so alternate remove+publish of one certificate.
    for (int k = 0; k < 1000; ++k) {
      auto& c = l.certs[static_cast<size_t>(k) % total];
      (void)store.remove(c->id());
      auto t0 = SteadyClock::now();
      (void)store.publish(c);
      us.push_back(std::chrono::duration<double, std::micro>(SteadyClock::now() - t0).count());
    }
    out["publish_us_p50"] = median(us);
  }

  // Reader throughput on 2 threads, without and with a writer publishing 1,000 times a second.
  auto throughput = [&](bool writer_on) {
    std::atomic<bool> stop{false};
    std::atomic<uint64_t> ops{0};
    std::atomic<int64_t> cpu_ns{0};
    auto names = sample_names(total, total, false, rng);
    auto thread_cpu_ns = [] {
      timespec ts{};
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
      return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
    };
    auto reader = [&] {
      uint64_t local = 0;
      size_t idx = 0;
      int64_t cpu0 = thread_cpu_ns();
      while (!stop.load(std::memory_order_relaxed)) {
        for (int k = 0; k < 256; ++k) {
          g_sink = l.store->lookup_for_handshake(names[idx], true);
          if (++idx == names.size()) idx = 0;
        }
        local += 256;
      }
      ops += local;
      cpu_ns += thread_cpu_ns() - cpu0;
    };
    std::thread r1(reader), r2(reader);
    std::thread w;
    std::atomic<uint64_t> swaps{0};
    if (writer_on) {
      w = std::thread([&] {
        size_t k = 0;
        auto next = SteadyClock::now();
        while (!stop.load()) {
          auto& c = l.certs[k++ % total];
          (void)l.store->remove(c->id());
          (void)l.store->publish(c);
          ++swaps;
          next += std::chrono::milliseconds(1);
          std::this_thread::sleep_until(next);
        }
      });
    }
    std::this_thread::sleep_for(std::chrono::duration<double>(seconds_per_phase));
    stop = true;
    r1.join();
    r2.join();
    if (w.joinable()) w.join();
    struct Phase {
      double per_s, swaps_per_s, per_cpu_s;
    };
    return Phase{double(ops.load()) / seconds_per_phase, double(swaps.load()) / seconds_per_phase,
                 double(ops.load()) / (double(cpu_ns.load()) / 1e9)};
  };
  // Quiet and busy phases alternate (5 pairs), and the ratio is the median of the per-pair
  // ratios: on a shared machine the background load drifts over seconds, and two long phases
  // in a row mostly measured that drift.
  // Also reported: the same ratio per reader CPU second (lookups / CPU time of the reader
  // threads), which other processes' load does not move: it shows what the swaps cost the
  // readers themselves (cache misses, refreshes), leaving out the writer's own CPU time.
  std::vector<double> quiet_v, busy_v, ratios, swaps_v, cpu_ratios;
  seconds_per_phase /= 5;
  for (int pair = 0; pair < 5; ++pair) {
    auto quiet = throughput(false);
    auto busy = throughput(true);
    quiet_v.push_back(quiet.per_s);
    busy_v.push_back(busy.per_s);
    swaps_v.push_back(busy.swaps_per_s);
    ratios.push_back(busy.per_s / quiet.per_s);
    cpu_ratios.push_back(busy.per_cpu_s / quiet.per_cpu_s);
  }
  out["reader_throughput_ratio_per_cpu_s"] = median(cpu_ratios);
  out["reader_throughput_ratios_per_cpu_s"] = cpu_ratios;
  out["reader_lookups_per_s_no_writer"] = median(quiet_v);
  out["reader_lookups_per_s_under_swaps"] = median(busy_v);
  out["writer_swaps_per_s"] = median(swaps_v);
  out["reader_throughput_ratio_under_swaps"] = median(ratios);
  out["reader_throughput_ratios"] = ratios;
  std::cout << out.dump() << "\n";
  return 0;
}

}  // namespace

// watch_mode: what CertWatcher costs on a big directory. Each change writes a new certificate
// for one pair (fresh key and leaf from a CA of this run; key first, then chain, each by
// rename, as careful writers do) and measures until the watcher publishes it (its `reloaded`
// event), with the debounce set to 20 ms; the watcher thread's CPU time per change is read in
// the event callback (which runs on that thread). A full rescan (what every change cost
// before the watcher checked only the pairs the events name; still what SIGHUP and a queue
// overflow cost) is timed after.
int watch_mode(const fs::path& dir) {
  using namespace std::chrono;
  auto store = std::make_shared<tlsreload::CertStore>();
  tlsreload::WatcherOptions wo;
  wo.debounce = milliseconds(20);
  std::mutex mu;
  std::condition_variable cv;
  std::string published;  // chain path of the last reloaded event
  double thread_cpu_ms = 0;
  SteadyClock::time_point published_at;
  wo.on_event = [&](const tlsreload::WatchEvent& e) {
    if (e.type != tlsreload::WatchEvent::Type::reloaded) return;
    struct timespec ts {};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    std::lock_guard lock(mu);
    published = e.path.string();
    published_at = SteadyClock::now();
    thread_cpu_ms = double(ts.tv_sec) * 1e3 + double(ts.tv_nsec) / 1e6;
    cv.notify_all();
  };
  tlsreload::CertWatcher w(store, wo);
  auto t0 = SteadyClock::now();
  auto report = w.add_directory(dir / "live");
  if (!report) {
    std::cerr << "watch: " << report.error().message << "\n";
    return 2;
  }
  double add_s = duration<double>(SteadyClock::now() - t0).count();
  if (!w.start()) return 2;

  auto root_key = p256(), inter_key = p256();
  auto root = make("Bench Watch Root", root_key.get(), nullptr, root_key.get(), true, "", 1);
  auto inter = make("Bench Watch Intermediate", inter_key.get(), root.get(), root_key.get(), true, "", 2);
  const std::string inter_pem = pem_of(inter.get());
  const size_t n = report->certificates.size();
  std::vector<double> change_ms, cpu_ms;
  std::vector<double> checked, parsed;
  double last_cpu = -1;
  int missed = 0;
  std::map<fs::path, std::string> originals;  // put back at the end: the fixture is reused
  for (int k = 0; k < 7; ++k) {
    size_t i = (static_cast<size_t>(k) * 7919 + 3) % std::max<size_t>(n, 1);
    if (i % 10 == 9) ++i;  // a plain name (the wildcard ones are named differently)
    fs::path d = dir / "live" / dir_for(i);
    for (const char* f : {"privkey.pem", "fullchain.pem"}) {
      if (originals.count(d / f)) continue;
      std::ifstream in(d / f, std::ios::binary);
      originals[d / f] = std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    }
    auto key = p256();
    auto leaf = make(name_for(i), key.get(), inter.get(), inter_key.get(), false, "DNS:" + name_for(i),
                     static_cast<long>(1000000 + k));
    {
      std::lock_guard lock(mu);
      published.clear();
    }
    auto before = w.counters();
    write_file(d / ".privkey.pem", key_pem_of(key.get()));
    fs::rename(d / ".privkey.pem", d / "privkey.pem");
    write_file(d / ".fullchain.pem", pem_of(leaf.get()) + inter_pem);
    auto t1 = SteadyClock::now();
    fs::rename(d / ".fullchain.pem", d / "fullchain.pem");
    std::unique_lock lock(mu);
    const std::string want = (d / "fullchain.pem").string();
    if (!cv.wait_for(lock, seconds(60), [&] { return published == want; })) {
      ++missed;
      continue;
    }
    double ms = duration<double, std::milli>(published_at - t1).count();
    double cpu = thread_cpu_ms;
    lock.unlock();
    auto after = w.counters();
    checked.push_back(double(after.pairs_checked - before.pairs_checked));
    parsed.push_back(double(after.pairs_parsed - before.pairs_parsed));
    // The first change's CPU time includes the thread's start; count from the first publish.
    if (last_cpu >= 0) cpu_ms.push_back(cpu - last_cpu);
    last_cpu = cpu;
    change_ms.push_back(ms);
  }
  // A full check with nothing changed: wall and CPU time of the calling thread.
  std::vector<double> rescan_ms, rescan_cpu_ms;
  for (int k = 0; k < 3; ++k) {
    struct timespec c0 {}, c1 {};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
    auto t1 = SteadyClock::now();
    w.rescan();
    rescan_ms.push_back(duration<double, std::milli>(SteadyClock::now() - t1).count());
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
    rescan_cpu_ms.push_back(double(c1.tv_sec - c0.tv_sec) * 1e3 + double(c1.tv_nsec - c0.tv_nsec) / 1e6);
  }
  w.stop();
  for (const auto& [p, data] : originals) {
    write_file(p.parent_path() / ".restore", data);
    fs::rename(p.parent_path() / ".restore", p);
  }
  auto c = w.counters();
  json out{{"count", n},
           {"failures", report->failures.size()},
           {"watch_add_s", add_s},
           {"watch_debounce_ms", wo.debounce.count()},
           {"watch_change_to_publish_ms_p50", median(change_ms)},
           {"watch_change_to_publish_ms", change_ms},
           {"watch_change_thread_cpu_ms_p50", median(cpu_ms)},
           {"watch_change_pairs_checked_p50", median(checked)},
           {"watch_change_pairs_parsed_p50", median(parsed)},
           {"watch_changes_missed", missed},
           {"watch_full_rescan_ms_p50", median(rescan_ms)},
           {"watch_full_rescan_cpu_ms_p50", median(rescan_cpu_ms)},
           {"watch_failed", c.failed}};
  std::cout << out.dump() << "\n";
  return missed == 0 ? 0 : 2;
}

int main(int argc, char** argv) {
  if (argc >= 3 && std::string(argv[1]) == "watch") return watch_mode(argv[2]);
  if (argc >= 4 && std::string(argv[1]) == "gen") return gen(argv[2], std::stoul(argv[3]));
  if (argc >= 3 && std::string(argv[1]) == "load") return load_mode(argv[2]);
  if (argc >= 3 && std::string(argv[1]) == "openssl") return openssl_mode(argv[2]);
  if (argc >= 3 && std::string(argv[1]) == "lookup") return lookup_mode(argv[2], argc >= 4 ? std::stod(argv[3]) : 2.0);
  std::cerr << "usage: store_bench gen DIR N | load DIR | watch DIR | lookup DIR [seconds]\n";
  return 2;
}
