// store_bench: figures for the certificate store (tlsreload::CertStore).
//
//   store_bench gen DIR N        write N ECDSA P-256 leaves (one shared intermediate) in
//                                certbot layout: DIR/live/<name>/{fullchain,privkey}.pem
//   store_bench load DIR         load DIR into a fresh store; JSON: load_s, rss_bytes_per_cert
//   store_bench watch DIR        CertWatcher: time to add DIR/live (load + inotify watches),
//                                time from a new certificate written for one pair to its
//                                publish, and the cost of a full rescan (SIGHUP)
//   store_bench lookup DIR [S [R]]  lookup latency at 1, 1,000 and all certificates; publish
//                                latency; reader throughput under swaps (S seconds, default 2,
//                                of each kind of phase, in R rounds, default 5, of alternating
//                                phases); atomic<shared_ptr>
//   store_bench swaps DIR [S [R]]   only the reader throughput part of lookup
//   store_bench openssl DIR      the OpenSSL objects alone: first use, rebuild, hit, and the
//                                parts of a first use (leaf d2i_X509, leaf signature check)
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
#include <map>
#include <array>
#include <iostream>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <ctime>
#include <sys/resource.h>
#include <unistd.h>
#include <sstream>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <nlohmann/json.hpp>

#include "tlsreload/watcher.h"

#include "acme/util/openssl.h"
#include "tlsreload/certificate.h"
#include "tlsreload/loader.h"
#include "tlsreload/store.h"
#include "tlsreload/snapshot.h"

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
  double user_s = 0, sys_s = 0;  // CPU time of the load, all threads (getrusage)
  size_t failures = 0;
};

Loaded load(const fs::path& dir) {
  Loaded out;
  out.store = std::make_shared<tlsreload::CertStore>();
  rusage ru0{};
  getrusage(RUSAGE_SELF, &ru0);
  auto t0 = SteadyClock::now();
  auto report = tlsreload::load_directory(dir / "live");
  if (!report) {
    std::cerr << "load: " << report.error().message << "\n";
    std::exit(2);
  }
  tlsreload::publish_all(*out.store, *report);
  out.seconds = std::chrono::duration<double>(SteadyClock::now() - t0).count();
  rusage ru1{};
  getrusage(RUSAGE_SELF, &ru1);
  auto secs = [](const timeval& t) { return double(t.tv_sec) + double(t.tv_usec) / 1e6; };
  out.user_s = secs(ru1.ru_utime) - secs(ru0.ru_utime);
  out.sys_s = secs(ru1.ru_stime) - secs(ru0.ru_stime);
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
           {"load_user_s", l.user_s}, {"load_sys_s", l.sys_s}, {"load_cpu_s", l.user_s + l.sys_s},
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

// The parts of a first use, timed alone with OpenSSL on the same files (the first 500
// certificates of DIR/live): parsing the leaf DER (d2i_X509, which in OpenSSL 3.0 decodes the
// public key through an OSSL_DECODER context built anew for each call) and verifying the leaf's
// signature with the intermediate's key (the deferred chain check). The rest of a first use is
// the private key (EVP_PKEY_fromdata) and bookkeeping.
void openssl_parts(const fs::path& dir, json& out) {
  std::vector<std::string> leaves;
  ossl::X509Ptr issuer;
  for (const auto& e : fs::directory_iterator(dir / "live")) {
    if (leaves.size() == 500) break;
    std::ifstream in(e.path() / "fullchain.pem");
    std::string pem((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    ossl::BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
    ossl::X509Ptr leaf(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
    ossl::X509Ptr inter(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
    if (!leaf || !inter) continue;
    unsigned char* der = nullptr;
    int n = i2d_X509(leaf.get(), &der);
    if (n <= 0) continue;
    leaves.emplace_back(reinterpret_cast<char*>(der), static_cast<size_t>(n));
    OPENSSL_free(der);
    if (!issuer) issuer = std::move(inter);
  }
  if (leaves.empty() || !issuer) return;
  EVP_PKEY* issuer_key = X509_get0_pubkey(issuer.get());
  std::vector<double> parse, verify;
  for (const std::string& d : leaves) {
    const auto* p = reinterpret_cast<const unsigned char*>(d.data());
    auto t0 = SteadyClock::now();
    ossl::X509Ptr x(d2i_X509(nullptr, &p, static_cast<long>(d.size())));
    auto t1 = SteadyClock::now();
    int ok = x ? X509_verify(x.get(), issuer_key) : 0;
    auto t2 = SteadyClock::now();
    if (ok != 1) continue;
    parse.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    verify.push_back(std::chrono::duration<double, std::micro>(t2 - t1).count());
  }
  out["openssl_leaf_d2i_us_p50"] = median(parse);
  out["openssl_leaf_verify_us_p50"] = median(verify);
}

// openssl_mode: only the figures above, in a fresh process (a focused run for the cold path).
int openssl_mode(const fs::path& dir) {
  Loaded l = load(dir);
  json out;
  out["certificates"] = l.certs.size();
  openssl_figures(l, out);
  openssl_parts(dir, out);
  std::cout << out.dump() << std::endl;
  return 0;
}

int lookup_mode(const fs::path& dir, double seconds_per_phase, int rounds, bool latency) {
  Loaded l = load(dir);
  const size_t total = l.certs.size();
  std::mt19937_64 rng(42);
  json out;

  // Latency at several sizes: a store holding the first `size` certificates.
  for (size_t size : latency ? std::vector<size_t>{1, 1000, total} : std::vector<size_t>{}) {
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

  if (latency) openssl_figures(l, out);

  // Baseline: the same names in one std::unordered_map behind std::atomic<std::shared_ptr>,
  // GCC 12's version of which takes a spin lock on every load.
  if (latency) {
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
  if (latency) {
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

  // Reader throughput on 2 threads, without and with a writer making 1,000 swaps a second.
  //
  // A swap is one publish() that replaces the certificate of a name by another one (what a
  // renewal or a reload does): one new snapshot, and the name is never absent. The second set
  // of certificates is built here (same names as the first 512 non-wildcard certificates, a
  // throwaway CA, fully validated before the phases start); the writer alternates them.
  // The earlier definition, remove() + publish() of one certificate (two snapshots, and the
  // name missing in between), is still measured for comparison ("remove_publish"). "idle" is a
  // writer that wakes up 1,000 times a second and does nothing: what the wake-ups alone cost.
  std::vector<std::pair<std::shared_ptr<const tlsreload::Certificate>,
                        std::shared_ptr<const tlsreload::Certificate>>> swap_set;
  {
    auto ca_key = p256();
    auto ca = make("Bench Swap CA", ca_key.get(), nullptr, ca_key.get(), true, "", 1);
    std::string ca_pem = pem_of(ca.get());
    // l.certs is in directory order, not in i order: find each name's certificate.
    std::unordered_map<std::string, std::shared_ptr<const tlsreload::Certificate>> by_name;
    for (const auto& c : l.certs) by_name[c->names().front()] = c;
    for (size_t i = 0; i < total && swap_set.size() < 512; ++i) {
      if (i % 10 == 9 || !by_name.count(name_for(i))) continue;
      auto key = p256();
      auto leaf = make(name_for(i), key.get(), ca.get(), ca_key.get(), false, "DNS:" + name_for(i),
                       static_cast<long>(i + 1000000));
      auto alt = tlsreload::Certificate::from_pem(pem_of(leaf.get()) + ca_pem, key_pem_of(key.get()));
      if (!alt) {
        std::cerr << "swap set: " << alt.error().message << "\n";
        std::exit(2);
      }
      swap_set.emplace_back(by_name[name_for(i)], *alt);
    }
  }
  enum class Writer { none, swap, idle, remove_publish };
  auto thread_cpu_ns = [] {
    timespec ts{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
  };
  struct Phase {
    double per_s = 0;       // lookups per second, both readers (each over its own run time)
    double per_cpu_s = 0;   // lookups per reader CPU second
    double swaps_per_s = 0;
    double writer_cpu_us_per_swap = 0;
    double versions_per_swap = 0;  // new snapshots per swap: 1 for a replacing publish
  };
  size_t swap_k = 0;  // carries on across phases, so each phase swaps different names
  // remove + publish walks the other certificates (one in the swap set would take its name
  // back from the alternative and turn later swaps into no-ops).
  std::vector<std::shared_ptr<const tlsreload::Certificate>> rp_certs;
  {
    std::unordered_set<const tlsreload::Certificate*> in_set;
    for (auto& [a, b] : swap_set) in_set.insert(a.get());
    for (auto& c : l.certs) {
      if (!in_set.count(c.get())) rp_certs.push_back(c);
    }
  }
  size_t rp_k = 0;
  auto names = sample_names(total, total, false, rng);
  auto throughput = [&](Writer kind) {
    std::atomic<bool> stop{false};
    struct alignas(64) ReaderResult {
      uint64_t ops = 0;
      double wall_s = 0;
      int64_t cpu_ns = 0;
    };
    std::array<ReaderResult, 2> results;
    auto reader = [&](ReaderResult& r, size_t idx) {
      uint64_t local = 0;
      uintptr_t sink = 0;  // per thread: a shared sink line would bounce between the readers
      int64_t cpu0 = thread_cpu_ns();
      auto t0 = SteadyClock::now();
      while (!stop.load(std::memory_order_relaxed)) {
        for (int k = 0; k < 256; ++k) {
          sink ^= reinterpret_cast<uintptr_t>(l.store->lookup_for_handshake(names[idx], true));
          if (++idx == names.size()) idx = 0;
        }
        local += 256;
      }
      r.wall_s = std::chrono::duration<double>(SteadyClock::now() - t0).count();
      r.cpu_ns = thread_cpu_ns() - cpu0;
      r.ops = local;
      g_sink = reinterpret_cast<const void*>(sink);
    };
    std::thread r1(reader, std::ref(results[0]), size_t{0}),
        r2(reader, std::ref(results[1]), names.size() / 2);
    std::thread w;
    uint64_t swaps = 0;
    double writer_wall_s = 0;
    int64_t writer_cpu_ns = 0;
    const uint64_t version0 = l.store->version();
    if (kind != Writer::none) {
      w = std::thread([&] {
        int64_t cpu0 = thread_cpu_ns();
        auto t0 = SteadyClock::now();
        auto next = t0;
        while (!stop.load(std::memory_order_relaxed)) {
          if (kind == Writer::swap) {
            auto& [a, b] = swap_set[swap_k % swap_set.size()];
            (void)l.store->publish((swap_k / swap_set.size()) % 2 == 0 ? b : a);
          } else if (kind == Writer::remove_publish) {
            auto& c = rp_certs[rp_k++ % rp_certs.size()];
            (void)l.store->remove(c->id());
            (void)l.store->publish(c);
          }
          if (kind == Writer::swap) ++swap_k;
          ++swaps;
          // Paced by absolute deadlines 1 ms apart (not sleep(1 ms), which drifts below the
          // rate): one swap per wake-up, except after a preemption, when the writer catches up
          // back to back so that the average stays 1,000 a second. The rate achieved (over the
          // writer's own run time) is reported.
          next += std::chrono::milliseconds(1);
          std::this_thread::sleep_until(next);
        }
        writer_wall_s = std::chrono::duration<double>(SteadyClock::now() - t0).count();
        writer_cpu_ns = thread_cpu_ns() - cpu0;
      });
    }
    std::this_thread::sleep_for(std::chrono::duration<double>(seconds_per_phase));
    stop = true;
    r1.join();
    r2.join();
    if (w.joinable()) w.join();
    Phase p;
    uint64_t ops = 0;
    int64_t cpu = 0;
    for (auto& r : results) {
      p.per_s += double(r.ops) / r.wall_s;
      ops += r.ops;
      cpu += r.cpu_ns;
    }
    p.per_cpu_s = double(ops) / (double(cpu) / 1e9);
    if (writer_wall_s > 0) p.swaps_per_s = double(swaps) / writer_wall_s;
    if (swaps > 0) p.writer_cpu_us_per_swap = double(writer_cpu_ns) / 1e3 / double(swaps);
    if (swaps > 0) p.versions_per_swap = double(l.store->version() - version0) / double(swaps);
    return p;
  };
  // The phases alternate (`rounds` rounds, 5 by default, of: no writer, swaps, idle writer, remove+publish), and each
  // ratio is the median of the per-round ratios against that round's no-writer phase: on a
  // shared machine the background load drifts over seconds, and long phases in a row mostly
  // measured that drift. Every phase has the same two reader threads, the same names and the
  // same length (unpinned, like the server's threads); rates use each reader's own run time.
  // Also reported: the ratios per reader CPU second (lookups / CPU time of the reader threads,
  // CLOCK_THREAD_CPUTIME_ID), which other processes' load does not move: what the writer costs
  // the readers themselves (cache misses, refreshes, interrupts), leaving out its own CPU time,
  // which writer_cpu_us_per_swap gives.
  struct Series {
    std::vector<double> ratio, cpu_ratio, swaps, writer_us, versions;
  };
  std::map<std::string, Series> series;
  std::vector<double> quiet_v, busy_v;
  seconds_per_phase /= rounds;
  for (int round = 0; round < rounds; ++round) {
    Phase quiet = throughput(Writer::none);
    quiet_v.push_back(quiet.per_s);
    for (auto [kind, label] : {std::pair{Writer::swap, "swap"}, std::pair{Writer::idle, "idle"},
                               std::pair{Writer::remove_publish, "remove_publish"}}) {
      Phase busy = throughput(kind);
      auto& s = series[label];
      s.ratio.push_back(busy.per_s / quiet.per_s);
      s.cpu_ratio.push_back(busy.per_cpu_s / quiet.per_cpu_s);
      s.swaps.push_back(busy.swaps_per_s);
      s.writer_us.push_back(busy.writer_cpu_us_per_swap);
      s.versions.push_back(busy.versions_per_swap);
      if (kind == Writer::swap) busy_v.push_back(busy.per_s);
    }
  }
  out["reader_lookups_per_s_no_writer"] = median(quiet_v);
  out["reader_lookups_per_s_under_swaps"] = median(busy_v);
  for (auto& [label, s] : series) {
    std::string suffix = label == "swap" ? "under_swaps" : label;
    out["reader_throughput_ratio_" + suffix] = median(s.ratio);
    out["reader_throughput_ratios_" + suffix] = s.ratio;
    out["reader_throughput_ratio_per_cpu_s_" + suffix] = median(s.cpu_ratio);
    out["reader_throughput_ratios_per_cpu_s_" + suffix] = s.cpu_ratio;
    out["writer_per_s_" + suffix] = median(s.swaps);
    out["writer_cpu_us_per_swap_" + suffix] = median(s.writer_us);
    out["snapshots_per_swap_" + suffix] = median(s.versions);
  }
  out["writer_swaps_per_s"] = median(series["swap"].swaps);
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

// ---- serve first from a store snapshot (tlsreload/snapshot.h) ----

// vda_reads returns the reads completed and merged by the virtio disk (/proc/diskstats fields
// 4 and 5), the request counts docs/benchmarks.md compares.
std::pair<long, long> disk_reads() {
  std::ifstream f("/proc/diskstats");
  std::string line;
  while (std::getline(f, line)) {
    std::istringstream in(line);
    long major = 0, minor = 0, reads = 0, merged = 0;
    std::string dev;
    if (in >> major >> minor >> dev >> reads >> merged && dev == "vda") return {reads, merged};
  }
  return {0, 0};
}

// own_read_bytes is what this process had read from the disk (/proc/self/io read_bytes):
// unlike /proc/diskstats it does not count other processes' reads of the same disk.
long own_read_bytes() {
  std::ifstream f("/proc/self/io");
  std::string key;
  long value = 0;
  while (f >> key >> value) {
    if (key == "read_bytes:") return value;
  }
  return 0;
}

std::string loadavg() {
  std::ifstream f("/proc/loadavg");
  std::string a, b, c;
  f >> a >> b >> c;
  return a + " " + b + " " + c;
}

// drop_caches empties the page cache (root only), so what follows reads from disk.
bool drop_caches() {
  ::sync();
  std::ofstream f("/proc/sys/vm/drop_caches");
  f << "3\n";
  f.flush();
  return static_cast<bool>(f);
}

struct Cpu {
  double user = 0, sys = 0;
  static Cpu now() {
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    auto secs = [](const timeval& t) { return double(t.tv_sec) + double(t.tv_usec) / 1e6; };
    return {secs(ru.ru_utime), secs(ru.ru_stime)};
  }
};

// snapshot_write_mode loads DIR/live and writes its snapshot to FILE (the state a previous run
// of the server would leave).
int snapshot_write_mode(const fs::path& dir, const fs::path& file) {
  tlsreload::LoadOptions options = tlsreload::bulk_load_options();
  options.record_sources = true;
  auto report = tlsreload::load_directory(dir / "live", options);
  if (!report) {
    std::cerr << "load: " << report.error().message << "\n";
    return 2;
  }
  auto t0 = SteadyClock::now();
  if (auto st = tlsreload::write_snapshot(file, report->certificates, report->sources); !st) {
    std::cerr << st.error().message << "\n";
    return 2;
  }
  double secs = std::chrono::duration<double>(SteadyClock::now() - t0).count();
  json out{{"count", report->certificates.size()}, {"write_s", secs}, {"bytes", fs::file_size(file)},
           {"loadavg", loadavg()}};
  std::cout << out.dump() << "\n";
  return 0;
}

// snapshot_start_mode is a start from FILE: the snapshot published (every certificate
// servable), then the verification (the full load of DIR/live, publish what differs, remove
// what is gone), then the rewrite of the snapshot (to FILE.new, so FILE stays for the next
// run). With --cold, the page cache is dropped first.
// With --start-only, it stops once the snapshot is published (for profiling the start).
int snapshot_start_mode(const fs::path& dir, const fs::path& file, bool cold, bool start_only) {
  if (cold && !drop_caches()) std::cerr << "could not drop the page cache (not root?)\n";
  const std::string load_before = loadavg();
  auto disk0 = disk_reads();
  long own0 = own_read_bytes();
  Cpu c0 = Cpu::now();
  auto t0 = SteadyClock::now();
  tlsreload::CertStore store;
  tlsreload::DirectoryLoadOptions options;
  options.snapshot_path = file;
  tlsreload::SnapshotStart start = tlsreload::publish_snapshot(store, options);
  auto t1 = SteadyClock::now();
  Cpu c1 = Cpu::now();
  auto disk1 = disk_reads();
  long own1 = own_read_bytes();
  if (!start.used) {
    std::cerr << "snapshot not used: " << (start.ignored ? start.ignored->message : "missing") << "\n";
    return 2;
  }
  // Every certificate servable: each one's first name finds a certificate (outside the timing;
  // a wildcard's first name is looked up as one name it covers).
  size_t servable = 0;
  for (const auto& c : start.certificates) {
    std::string name = c->names().front();
    if (name.starts_with("*.")) name[0] = 'x';
    servable += store.lookup(name) != nullptr;
  }
  if (start_only) {
    std::cout << json{{"servable_s", std::chrono::duration<double>(t1 - t0).count()}, {"servable", servable},
                      {"servable_user_s", c1.user - c0.user}, {"servable_sys_s", c1.sys - c0.sys},
                      {"loadavg", load_before}}.dump()
              << "\n";
    return 0;
  }
  auto t2 = SteadyClock::now();
  Cpu c2 = Cpu::now();
  auto disk2 = disk_reads();
  long own2 = own_read_bytes();
  options.snapshot_path.clear();  // the rewrite is timed on its own below
  auto check = tlsreload::check_directory(store, dir / "live", start, options);
  auto t3 = SteadyClock::now();
  Cpu c3 = Cpu::now();
  auto disk3 = disk_reads();
  long own3 = own_read_bytes();
  if (!check) {
    std::cerr << "verification: " << check.error().message << "\n";
    return 2;
  }
  fs::path rewrite = file;
  rewrite += ".new";
  auto st = tlsreload::write_snapshot(rewrite, check->report.certificates, check->report.sources);
  auto t4 = SteadyClock::now();
  fs::remove(rewrite);
  auto d = [](auto a, auto b) { return std::chrono::duration<double>(b - a).count(); };
  json out{{"cold", cold},
           {"loadavg_before", load_before},
           {"loadavg_after", loadavg()},
           {"snapshot_bytes", fs::file_size(file)},
           {"published", start.published},
           {"refused", start.refused.size()},
           {"servable", servable},
           {"servable_s", d(t0, t1)},
           {"servable_user_s", c1.user - c0.user},
           {"servable_sys_s", c1.sys - c0.sys},
           {"servable_disk_reads", disk1.first - disk0.first},
           {"servable_disk_merged", disk1.second - disk0.second},
           {"servable_own_read_bytes", own1 - own0},
           {"verify_s", d(t2, t3)},
           {"verified_after_start_s", d(t0, t3) - d(t1, t2)},
           {"verify_user_s", c3.user - c2.user},
           {"verify_sys_s", c3.sys - c2.sys},
           {"verify_disk_reads", disk3.first - disk2.first},
           {"verify_own_read_bytes", own3 - own2},
           {"verify_loaded", check->report.certificates.size()},
           {"verify_failures", check->report.failures.size()},
           {"verify_removed", check->removed},
           {"rewrite_s", d(t3, t4)},
           {"rewrite_ok", static_cast<bool>(st)}};
  std::cout << out.dump() << "\n";
  return 0;
}

int main(int argc, char** argv) {
  if (argc >= 3 && std::string(argv[1]) == "watch") return watch_mode(argv[2]);
  if (argc >= 4 && std::string(argv[1]) == "gen") return gen(argv[2], std::stoul(argv[3]));
  if (argc >= 3 && std::string(argv[1]) == "load") return load_mode(argv[2]);
  if (argc >= 4 && std::string(argv[1]) == "snapshot-write") return snapshot_write_mode(argv[2], argv[3]);
  if (argc >= 4 && std::string(argv[1]) == "snapshot-start") {
    bool cold = false, start_only = false;
    for (int i = 4; i < argc; ++i) {
      cold |= std::string(argv[i]) == "--cold";
      start_only |= std::string(argv[i]) == "--start-only";
    }
    return snapshot_start_mode(argv[2], argv[3], cold, start_only);
  }
  if (argc >= 3 && std::string(argv[1]) == "openssl") return openssl_mode(argv[2]);
  if (argc >= 3 && std::string(argv[1]) == "lookup") {
    return lookup_mode(argv[2], argc >= 4 ? std::stod(argv[3]) : 2.0, argc >= 5 ? std::stoi(argv[4]) : 5, true);
  }
  if (argc >= 3 && std::string(argv[1]) == "swaps") {
    return lookup_mode(argv[2], argc >= 4 ? std::stod(argv[3]) : 2.0, argc >= 5 ? std::stoi(argv[4]) : 5, false);
  }
  std::cerr << "usage: store_bench gen DIR N | load DIR | lookup DIR [S [R]] | swaps DIR [S [R]] | "
               "openssl DIR | watch DIR | snapshot-write DIR FILE | snapshot-start DIR FILE [--cold] [--start-only]\n";
  return 2;
}
