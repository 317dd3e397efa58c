// tls_bench: the autotls HTTPS frontend (server::Server) serving one static directory with a
// fixed certificate, for tools/bench/tls.sh to load with wrk and compare with nginx.
//
//   tls_bench --port P --root DIR --cert A.pem --key A.key [--cert2 B.pem --key2 B.key]
//             [--swaps-per-s N] [--workers N] [--reactors N]
//             [--store DIR [--cache N] [--warm] [--no-huge-pages] [--no-key-copies]]
//             [--upstream URL] [--no-tickets]
//   tls_bench client --port P (--name NAME | --names-dir DIR) --threads T --secs S [--seed N]
//
// --store DIR also loads every certificate of a certbot-layout DIR/live (store_bench gen),
// --cache sets the OpenSSL object cache capacity (default: the library's) and --warm builds
// every certificate's OpenSSL objects before listening (what a long-running server has done by
// the time each name has been seen once), and then puts the malloc heaps on huge pages
// (tlsreload::advise_heap_huge_pages, with MADV_COLLAPSE) unless --no-huge-pages. It also
// makes each key's copy in the library context of every reactor after the first
// (Server::prepare_key), which that reactor's first handshake with the key would make, unless
// --no-key-copies (the state right after a warm-up of the objects alone).
// --upstream serves every request by reverse proxy to
// URL instead of the static root. --no-tickets turns session tickets off (tickets.enabled =
// false), so that no client can resume: every connection is a full handshake.
//
// client mode is the load generator for the many-certificates benchmark (wrk cannot vary SNI):
// T threads, each in a loop: connect, full TLS handshake (no resumption, unlike wrk, which keeps
// its session across reconnects; no verification, like wrk) with SNI drawn at random from DIR's names (a label under each wildcard) or NAME, one
// GET with Connection: close, read to EOF. Prints {"handshakes", "failures", "rate"}. The names
// are drawn from a generator seeded with --seed (default 1) and the thread's index: runs with the
// same seed draw the same names, so only the first run against a fresh server is cold.
//
// No ACME and no storage: the certificate is published into a tlsreload::CertStore directly
// (and made the default). The server uses the library's production defaults (workers, limits,
// TLS settings) unless --workers is given. Signals, taken by one thread with sigwait:
//   SIGUSR1  start publishing the two certificates alternately, N per second (needs --cert2)
//   SIGUSR2  stop publishing; prints one JSON line to stdout with the publishes done
//   SIGINT / SIGTERM  shut down (prints the server counters as one JSON line)
// It prints {"listening": PORT} on stdout once the server is started.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/ssl.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <random>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "server/server.h"
#include "tlsreload/certificate.h"
#include "tlsreload/heap_pages.h"
#include "tlsreload/loader.h"
#include "tlsreload/store.h"

namespace {

using namespace autotls;
using json = nlohmann::json;

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

[[noreturn]] void die(const std::string& msg) {
  std::cerr << "tls_bench: " << msg << "\n";
  std::exit(2);
}

std::shared_ptr<const tlsreload::Certificate> load(const std::string& cert, const std::string& key) {
  auto c = tlsreload::Certificate::from_pem(read_file(cert), read_file(key));
  if (!c) die(cert + ": " + c.error().message);
  return *c;
}

// client_once: one connection, one full handshake, one request; true when a 200 came back.
bool client_once(SSL_CTX* ctx, int port, const std::string& name) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  timeval tv{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bool ok = false;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
    SSL* ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    SSL_set_tlsext_host_name(ssl, name.c_str());
    if (SSL_connect(ssl) == 1) {
      std::string req = "GET / HTTP/1.1\r\nHost: " + name + "\r\nConnection: close\r\n\r\n";
      if (SSL_write(ssl, req.data(), static_cast<int>(req.size())) > 0) {
        std::string got;
        char buf[4096];
        int n;
        while ((n = SSL_read(ssl, buf, sizeof buf)) > 0) got.append(buf, static_cast<size_t>(n));
        ok = got.rfind("HTTP/1.1 200", 0) == 0;
      }
    }
    SSL_free(ssl);
  }
  ::close(fd);
  return ok;
}

int client_main(int argc, char** argv) {
  int port = 0, threads = 2;
  std::uint64_t seed = 1;
  double secs = 5;
  std::string name, names_dir;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) die(a + " needs a value");
      return argv[++i];
    };
    if (a == "--port") port = std::stoi(next());
    else if (a == "--name") name = next();
    else if (a == "--names-dir") names_dir = next();
    else if (a == "--threads") threads = std::stoi(next());
    else if (a == "--secs") secs = std::stod(next());
    else if (a == "--seed") seed = std::stoull(next());
    else die("client: unknown option " + a);
  }
  std::vector<std::string> names;
  if (!names_dir.empty()) {
    for (const auto& e : std::filesystem::directory_iterator(names_dir)) {
      std::string n = e.path().filename().string();
      if (n.rfind("_wildcard_.", 0) == 0) n.replace(0, 10, "x");  // "x.<rest>" under "*.<rest>"
      names.push_back(n);
    }
  } else {
    names.push_back(name);
  }
  if (names.empty() || port == 0) die("client: needs --port and --name or a non-empty --names-dir");
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
  std::atomic<std::uint64_t> done{0}, failed{0};
  auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(secs);
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      // The sequence of names is fixed by the seed: a second run with the same seed against
      // the same server finds every name it draws already built (not cold any more).
      std::mt19937_64 rng(static_cast<std::uint64_t>(t) * 7919 + seed);
      std::uniform_int_distribution<std::size_t> pick(0, names.size() - 1);
      while (std::chrono::steady_clock::now() < until) {
        if (client_once(ctx, port, names[pick(rng)])) ++done;
        else ++failed;
      }
    });
  }
  auto t0 = std::chrono::steady_clock::now();
  for (auto& t : ts) t.join();
  double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << json{{"handshakes", done.load()}, {"failures", failed.load()},
                    {"names", names.size()}, {"rate", double(done.load()) / wall}}
                   .dump()
            << std::endl;
  SSL_CTX_free(ctx);
  return 0;
}

}  // namespace

// Builders runs a job on every one of its threads at once (run waits for all of them), and
// keeps the threads until it is destroyed: the warm-up's. glibc gives each thread a malloc
// arena, and a thread that exits leaves its arena to the next thread made; kept alive until
// the process ends (the default), the builders' arenas stay theirs, and the server's threads,
// started later, get fresh ones instead of heaps full of the built objects and the holes the
// builds left (as the library's loader threads, tlsreload/loader.cpp). --no-park-builders ends
// them before the server starts, as before.
class Builders {
 public:
  explicit Builders(unsigned n) {
    for (unsigned i = 0; i < n; ++i) {
      threads_.emplace_back([this] {
        std::uint64_t seen = 0;
        for (;;) {
          std::function<void()> job;
          {
            std::unique_lock lock(mu_);
            cv_.wait(lock, [&] { return quit_ || generation_ != seen; });
            if (quit_) return;
            seen = generation_;
            job = job_;
          }
          job();
          std::lock_guard lock(mu_);
          if (--pending_ == 0) cv_.notify_all();
        }
      });
    }
  }
  ~Builders() {
    {
      std::lock_guard lock(mu_);
      quit_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  void run(std::function<void()> job) {
    std::unique_lock lock(mu_);
    job_ = std::move(job);
    pending_ = threads_.size();
    ++generation_;
    cv_.notify_all();
    cv_.wait(lock, [&] { return pending_ == 0; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::function<void()> job_;
  std::uint64_t generation_ = 0;
  std::size_t pending_ = 0;
  bool quit_ = false;
  std::vector<std::thread> threads_;
};

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "client") return client_main(argc, argv);
  int port = 0;
  std::string root, cert, key, cert2, key2;
  double swaps_per_s = 100;
  std::size_t workers = 0, reactors = 0;
  std::string store_dir, upstream;
  long cache = -1;
  bool warm = false;
  bool huge_pages = true;
  bool tickets = true;
  bool key_copies = true;
  bool park_builders = true;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) die(a + " needs a value");
      return argv[++i];
    };
    if (a == "--port") port = std::stoi(next());
    else if (a == "--root") root = next();
    else if (a == "--cert") cert = next();
    else if (a == "--key") key = next();
    else if (a == "--cert2") cert2 = next();
    else if (a == "--key2") key2 = next();
    else if (a == "--swaps-per-s") swaps_per_s = std::stod(next());
    else if (a == "--workers") workers = std::stoul(next());
    else if (a == "--reactors") reactors = std::stoul(next());
    else if (a == "--store") store_dir = next();
    else if (a == "--cache") cache = std::stol(next());
    else if (a == "--warm") warm = true;
    else if (a == "--no-huge-pages") huge_pages = false;
    else if (a == "--no-tickets") tickets = false;
    else if (a == "--no-key-copies") key_copies = false;
    else if (a == "--no-park-builders") park_builders = false;
    else if (a == "--upstream") upstream = next();
    else die("unknown option " + a);
  }
  if (root.empty() || cert.empty() || key.empty()) die("usage: tls_bench --port P --root DIR --cert PEM --key PEM ...");

  // Blocked before any thread starts, so every thread inherits the mask and only sigwait
  // below sees these signals.
  sigset_t set;
  sigemptyset(&set);
  for (int s : {SIGINT, SIGTERM, SIGUSR1, SIGUSR2}) sigaddset(&set, s);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);

  auto store = std::make_shared<tlsreload::CertStore>();
  auto a = load(cert, key);
  std::shared_ptr<const tlsreload::Certificate> b;
  if (!cert2.empty()) b = load(cert2, key2);
  if (auto st = store->publish(a); !st) die("publish: " + st.error().message);
  if (auto st = store->set_default(a); !st) die("set_default: " + st.error().message);
  json loaded;
  std::vector<std::shared_ptr<const tlsreload::Certificate>> warmed;  // --warm: what was built
  std::optional<Builders> builders;                                     // --warm: who built it
  if (!store_dir.empty()) {
    if (cache >= 0) tlsreload::set_openssl_cache_capacity(static_cast<std::size_t>(cache));
    auto t0 = std::chrono::steady_clock::now();
    auto report = tlsreload::load_directory(std::filesystem::path(store_dir) / "live");
    if (!report) die("load " + store_dir + ": " + report.error().message);
    std::size_t n = tlsreload::publish_all(*store, *report);
    double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double warm_s = 0;
    if (warm) {
      auto t1 = std::chrono::steady_clock::now();
      auto& certs = report->certificates;
      std::atomic<std::size_t> next{0};
      builders.emplace(std::max(1u, std::thread::hardware_concurrency()));
      builders->run([&] {
        for (std::size_t i; (i = next++) < certs.size();) (void)certs[i]->openssl();
      });
      warmed = certs;
      warm_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
    }
    auto stats = tlsreload::openssl_cache_stats();
    loaded = {{"loaded", n}, {"load_s", load_s}, {"warm_s", warm_s},
              {"openssl_cache_capacity", stats.capacity}, {"openssl_cache_size", stats.size},
              {"openssl_cache_builds", stats.builds}};
  }

  server::ServerConfig cfg;
  cfg.https = {{"127.0.0.1", port}};
  cfg.http = {};
  cfg.default_site = server::StaticSite{root};
  if (!upstream.empty()) cfg.default_site = server::ProxySite{upstream};
  if (workers) cfg.worker_threads = workers;
  if (reactors) cfg.reactor_threads = reactors;
  cfg.tickets.enabled = tickets;
  auto srv = server::Server::create(cfg, store, nullptr, nullptr);
  if (!srv) die("create: " + srv.error().message);
  if (warm && key_copies && !warmed.empty()) {
    // Every key's copy in the other reactors' library contexts too, as a server that has been
    // up a while holds them (Server::prepare_key): otherwise a random name's first handshake on
    // such a reactor pays an export, ~25 us, and the measurement a warm-up.
    auto t3 = std::chrono::steady_clock::now();
    std::atomic<std::size_t> next{0}, copies{0};
    auto& certs = warmed;
    builders->run([&] {
      for (std::size_t i; (i = next++) < certs.size();) {
        if (auto v = certs[i]->openssl()) copies += (*srv)->prepare_key(v.key);
      }
    });
    loaded["key_copies"] = copies.load();
    loaded["key_copies_s"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t3).count();
  }
  if (warm && huge_pages && !warmed.empty()) {
    // What `autotls serve` does once the cache has grown by 8,192 (tools/cmd_serve.cpp), done
    // here at once, after the key copies, so that the measurement does not depend on when that
    // happens.
    auto t2 = std::chrono::steady_clock::now();
    auto hp = tlsreload::advise_heap_huge_pages(true);
    loaded["huge_pages"] = {
        {"advised_mib", hp.advised_bytes >> 20}, {"collapsed_mib", hp.collapsed_bytes >> 20},
        {"not_collapsed_mib", hp.not_collapsed_bytes >> 20},
        {"s", std::chrono::duration<double>(std::chrono::steady_clock::now() - t2).count()},
        {"error", hp.error}};
  }
  if (!store_dir.empty()) std::cerr << "tls_bench: " << loaded.dump() << "\n";
  if (!park_builders) builders.reset();
  if (auto st = (*srv)->start(); !st) die("start: " + st.error().message);
  std::cout << json{{"listening", (*srv)->https_port()}, {"store", loaded}}.dump() << std::endl;

  std::mutex mu;
  std::condition_variable cv;
  bool swapping = false, stopping = false;
  std::uint64_t swaps = 0, swap_failures = 0;
  std::thread swapper([&] {
    auto period = std::chrono::duration_cast<std::chrono::steady_clock::duration>(
        std::chrono::duration<double>(1.0 / swaps_per_s));
    auto due = std::chrono::steady_clock::now();
    std::unique_lock lock(mu);
    for (;;) {
      cv.wait(lock, [&] { return stopping || swapping; });
      if (stopping) return;
      due = std::chrono::steady_clock::now();
      while (swapping && !stopping) {
        // Alternate so that each publish changes the certificate (publishing the holder again
        // is a no-op without a new version).
        auto& next = (swaps % 2 == 0) ? b : a;
        lock.unlock();
        bool ok = static_cast<bool>(store->publish(next));
        lock.lock();
        ++swaps;
        if (!ok) ++swap_failures;
        due += period;
        cv.wait_until(lock, due, [&] { return stopping || !swapping; });
      }
    }
  });

  for (;;) {
    int sig = 0;
    sigwait(&set, &sig);
    if (sig == SIGUSR1) {
      if (!b) {
        std::cerr << "tls_bench: SIGUSR1 ignored: no --cert2\n";
        continue;
      }
      std::lock_guard lock(mu);
      swapping = true;
      swaps = 0;
      swap_failures = 0;
      cv.notify_all();
    } else if (sig == SIGUSR2) {
      std::lock_guard lock(mu);
      swapping = false;
      cv.notify_all();
      std::cout << json{{"swaps", swaps}, {"publish_failed", swap_failures}, {"version", store->version()}}.dump()
                << std::endl;
    } else {
      break;
    }
  }
  {
    std::lock_guard lock(mu);
    stopping = true;
  }
  cv.notify_all();
  swapper.join();
  (*srv)->shutdown(std::chrono::milliseconds(500));
  auto c = (*srv)->counters();
  std::cout << json{{"accepted", c.accepted},
                    {"requests", c.requests},
                    {"handshake_failed", c.handshake_failed},
                    {"handshake_timeout", c.handshake_timeout},
                    {"rejected_over_capacity", c.rejected_over_capacity},
                    {"openssl_cache_builds", tlsreload::openssl_cache_stats().builds},
                    {"openssl_cache_evictions", tlsreload::openssl_cache_stats().evictions}}
                   .dump()
            << std::endl;
  return 0;
}
