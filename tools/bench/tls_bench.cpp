// tls_bench: the autotls HTTPS frontend (server::Server) serving one static directory with a
// fixed certificate, for tools/bench/tls.sh to load with wrk and compare with nginx.
//
//   tls_bench --port P --root DIR --cert A.pem --key A.key [--cert2 B.pem --key2 B.key]
//             [--swaps-per-s N] [--workers N]
//
// No ACME and no storage: the certificate is published into a tlsreload::CertStore directly
// (and made the default). The server uses the library's production defaults (workers, limits,
// TLS settings) unless --workers is given. Signals, taken by one thread with sigwait:
//   SIGUSR1  start publishing the two certificates alternately, N per second (needs --cert2)
//   SIGUSR2  stop publishing; prints one JSON line to stdout with the publishes done
//   SIGINT / SIGTERM  shut down (prints the server counters as one JSON line)
// It prints {"listening": PORT} on stdout once the server is started.

#include <signal.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "server/server.h"
#include "tlsreload/certificate.h"
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

}  // namespace

int main(int argc, char** argv) {
  int port = 0;
  std::string root, cert, key, cert2, key2;
  double swaps_per_s = 100;
  std::size_t workers = 0;
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

  server::ServerConfig cfg;
  cfg.https = {{"127.0.0.1", port}};
  cfg.http = {};
  cfg.default_site = server::StaticSite{root};
  if (workers) cfg.worker_threads = workers;
  auto srv = server::Server::create(cfg, store, nullptr, nullptr);
  if (!srv) die("create: " + srv.error().message);
  if (auto st = (*srv)->start(); !st) die("start: " + st.error().message);
  std::cout << json{{"listening", (*srv)->https_port()}}.dump() << std::endl;

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
                    {"rejected_over_capacity", c.rejected_over_capacity}}
                   .dump()
            << std::endl;
  return 0;
}
