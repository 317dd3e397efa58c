// issuance_bench: how fast autotls's acme library obtains certificates from a local Pebble.
//
//   issuance_bench --directory URL --ca PEM --http-port P [options]
//
// It registers one fresh account and obtains --count certificates (one name each) with a pool of
// --concurrency threads that share one acme::Client; then, --one-runs times, it makes a fresh
// Client and a fresh account and obtains one certificate alone. Challenges are answered at once:
// http-01 by an in-process responder on 127.0.0.1:P (the port Pebble validates), or dns-01 via
// pebble-challtestsrv's management API (--challtestsrv URL). The last line printed is one JSON
// object; tools/bench/issuance.sh runs it and merges the figures with lego's and uacme's.
//
// Options: --count N (100) --concurrency K (8) --prefix P (names are P000.issuance.test ...)
//          --challenge http-01|dns-01 --challtestsrv URL --one-runs R (5)
//          --poll-initial-ms MS --poll-max-ms MS (default: the library's ClientOptions)

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "acme/challenge.h"
#include "acme/client.h"
#include "acme/jws.h"
#include "acme/key.h"
#include "acme/transport.h"

using namespace autotls;
using namespace autotls::acme;
using SteadyClock = std::chrono::steady_clock;
using nlohmann::json;

namespace {

double seconds_since(SteadyClock::time_point t0) {
  return std::chrono::duration<double>(SteadyClock::now() - t0).count();
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t i = static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(i, v.size() - 1)];
}

double median(std::vector<double> v) { return percentile(std::move(v), 0.5); }

// CountingTransport wraps the real transport and counts requests per Pebble resource, so the
// JSON shows how many polls an issuance took (Pebble's paths: /authZ/, /my-order/, ...).
class CountingTransport final : public HttpTransport {
 public:
  explicit CountingTransport(std::unique_ptr<HttpTransport> inner) : inner_(std::move(inner)) {}
  Result<HttpResponse> send(const HttpRequest& request) override {
    auto t0 = SteadyClock::now();
    auto r = inner_->send(request);
    double dt = seconds_since(t0);
    std::string kind = classify(request);
    std::lock_guard lock(mu_);
    auto& c = counts_[kind];
    c.first += 1;
    c.second += dt;
    return r;
  }
  json to_json() const {
    std::lock_guard lock(mu_);
    json out = json::object();
    for (const auto& [k, v] : counts_) {
      out[k] = {{"n", v.first}, {"mean_ms", v.first ? 1000.0 * v.second / v.first : 0.0}};
    }
    return out;
  }

 private:
  static std::string classify(const HttpRequest& r) {
    static const char* kinds[] = {"/nonce-plz", "/sign-me-up", "/order-plz", "/authZ/", "/chalZ/",
                                  "/finalize-order/", "/my-order/", "/certZ/", "/dir"};
    for (const char* k : kinds) {
      if (r.url.find(k) != std::string::npos) return r.method + " " + k;
    }
    return r.method + " other";
  }
  std::unique_ptr<HttpTransport> inner_;
  mutable std::mutex mu_;
  std::map<std::string, std::pair<uint64_t, double>> counts_;
};

// Http01Server answers GET /.well-known/acme-challenge/<token> from an in-memory map.
class Http01Server {
 public:
  bool start(int port) {
    // Pebble's VA opens one connection per validation; closing after the reply keeps stop()
    // from waiting on idle keep-alive connections.
    server_.set_keep_alive_max_count(1);
    // TCP_NODELAY, inherited by accepted sockets: without it httplib's split writes of headers
    // and body meet delayed ACK and each reply stalls ~40 ms.
    server_.set_socket_options([this](socket_t sock) {
      int one = 1;
      ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
      ::setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      listen_fd_ = sock;
    });
    server_.Get(R"(/\.well-known/acme-challenge/([^/]+))",
                [this](const httplib::Request& req, httplib::Response& res) {
                  std::string value;
                  {
                    std::lock_guard lock(mu_);
                    auto it = tokens_.find(req.matches[1]);
                    if (it == tokens_.end()) {
                      res.status = 404;
                      return;
                    }
                    value = it->second;
                  }
                  res.set_content(value, "text/plain");
                });
    if (!server_.bind_to_port("127.0.0.1", port)) return false;
    // Debian's libcpp-httplib listens with a backlog of 5 (CPPHTTPLIB_LISTEN_BACKLOG, compiled
    // into the .so). With more validations in flight than that, the kernel drops SYNs and Pebble
    // retries them after 1 s. Linux lets listen() on a listening socket raise the backlog.
    if (listen_fd_ >= 0) ::listen(listen_fd_, 1024);
    thread_ = std::thread([this] { server_.listen_after_bind(); });
    while (!server_.is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    return true;
  }
  ~Http01Server() {
    server_.stop();
    if (thread_.joinable()) thread_.join();
  }
  void set(const std::string& token, std::string ka) {
    std::lock_guard lock(mu_);
    tokens_[token] = std::move(ka);
  }
  void remove(const std::string& token) {
    std::lock_guard lock(mu_);
    tokens_.erase(token);
  }

 private:
  httplib::Server server_;
  socket_t listen_fd_ = -1;
  std::thread thread_;
  std::mutex mu_;
  std::map<std::string, std::string> tokens_;
};

class HttpSolver final : public Solver {
 public:
  explicit HttpSolver(Http01Server& s) : s_(s) {}
  Status present(const Identifier&, const Challenge& c, std::string_view ka) override {
    s_.set(c.token, std::string(ka));
    return {};
  }
  void cleanup(const Identifier&, const Challenge& c, std::string_view) override { s_.remove(c.token); }

 private:
  Http01Server& s_;
};

// DnsSolver publishes TXT records through pebble-challtestsrv's management API.
class DnsSolver final : public Solver {
 public:
  DnsSolver(std::string base, std::shared_ptr<HttpTransport> http) : base_(std::move(base)), http_(std::move(http)) {}
  Status present(const Identifier& id, const Challenge&, std::string_view ka) override {
    return post("/set-txt", {{"host", host(id)}, {"value", dns01_txt_value(ka)}});
  }
  void cleanup(const Identifier& id, const Challenge&, std::string_view) override {
    (void)post("/clear-txt", {{"host", host(id)}});
  }

 private:
  static std::string host(const Identifier& id) { return dns01_record_name(id.value) + "."; }
  Status post(const std::string& path, const json& body) {
    auto r = http_->send({"POST", base_ + path, {{"Content-Type", "application/json"}}, body.dump()});
    if (!r) return fail(r.error());
    if (r->status != 200) return fail(Errc::protocol, "challtestsrv " + path + ": HTTP " + std::to_string(r->status));
    return {};
  }
  std::string base_;
  std::shared_ptr<HttpTransport> http_;
};

struct Args {
  std::string directory, ca, challtestsrv, prefix = "c", challenge = "http-01";
  int http_port = 0, count = 100, concurrency = 8, one_runs = 5;
  std::optional<int> poll_initial_ms, poll_max_ms;
};

std::optional<Args> parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    if (i + 1 >= argc) return std::nullopt;
    std::string v = argv[++i];
    if (k == "--directory") a.directory = v;
    else if (k == "--ca") a.ca = v;
    else if (k == "--http-port") a.http_port = std::stoi(v);
    else if (k == "--count") a.count = std::stoi(v);
    else if (k == "--concurrency") a.concurrency = std::stoi(v);
    else if (k == "--prefix") a.prefix = v;
    else if (k == "--challenge") a.challenge = v;
    else if (k == "--challtestsrv") a.challtestsrv = v;
    else if (k == "--one-runs") a.one_runs = std::stoi(v);
    else if (k == "--poll-initial-ms") a.poll_initial_ms = std::stoi(v);
    else if (k == "--poll-max-ms") a.poll_max_ms = std::stoi(v);
    else return std::nullopt;
  }
  if (a.directory.empty() || a.ca.empty() || a.concurrency < 1 || a.count < 0) return std::nullopt;
  if (a.challenge == "http-01" && a.http_port <= 0) return std::nullopt;
  if (a.challenge == "dns-01" && a.challtestsrv.empty()) return std::nullopt;
  return a;
}

std::string name_for(const Args& a, int i) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%03d", i);
  return a.prefix + buf + ".issuance.test";
}

struct Session {
  std::unique_ptr<Client> client;
  std::shared_ptr<CountingTransport> transport;
};

// new_session makes a Client (fetching the directory) and registers a fresh account.
Result<Session> new_session(const Args& a) {
  CurlOptions co;
  co.ca_bundle = a.ca;
  // Short timeouts: on loopback a reply takes milliseconds, and a stuck server must end the run.
  co.connect_timeout = std::chrono::milliseconds(2000);
  co.total_timeout = std::chrono::milliseconds(15000);
  auto transport = std::make_shared<CountingTransport>(make_curl_transport(co));
  ClientOptions opts;
  opts.directory_url = a.directory;
  opts.transport = transport;
  if (a.poll_initial_ms) opts.poll_initial = std::chrono::milliseconds(*a.poll_initial_ms);
  if (a.poll_max_ms) opts.poll_max = std::chrono::milliseconds(*a.poll_max_ms);
  auto client = Client::create(opts);
  if (!client) return fail(client.error());
  auto key = PrivateKey::generate(KeyType::ec256);
  if (!key) return fail(key.error());
  (*client)->set_account(std::make_shared<KeySigner>(std::move(*key)));
  auto acct = (*client)->register_account({{"mailto:bench@example.test"}, true, std::nullopt});
  if (!acct) return fail(acct.error());
  return Session{std::move(*client), transport};
}

}  // namespace

int main(int argc, char** argv) {
  auto args = parse_args(argc, argv);
  if (!args) {
    std::cerr << "usage: issuance_bench --directory URL --ca PEM (--http-port P | --challenge dns-01 "
                 "--challtestsrv URL) [--count N] [--concurrency K] [--prefix P] [--one-runs R] "
                 "[--poll-initial-ms MS] [--poll-max-ms MS]\n";
    return 2;
  }
  const Args& a = *args;

  Http01Server http;
  std::unique_ptr<Solver> solver;
  if (a.challenge == "http-01") {
    if (!http.start(a.http_port)) {
      std::cerr << "cannot bind 127.0.0.1:" << a.http_port << "\n";
      return 2;
    }
    solver = std::make_unique<HttpSolver>(http);
  } else {
    solver = std::make_unique<DnsSolver>(a.challtestsrv, std::shared_ptr<HttpTransport>(make_curl_transport()));
  }

  json out;
  out["challenge"] = a.challenge;
  out["concurrency"] = a.concurrency;
  out["count"] = a.count;
  {
    ClientOptions d;
    out["poll_initial_ms"] = a.poll_initial_ms.value_or(static_cast<int>(d.poll_initial.count()));
    out["poll_max_ms"] = a.poll_max_ms.value_or(static_cast<int>(d.poll_max.count()));
  }
  int failures = 0;

  // N names, K workers, one Client and one account.
  if (a.count > 0) {
    auto t0 = SteadyClock::now();
    auto session = new_session(a);
    if (!session) {
      std::cerr << "account: " << session.error().message << "\n";
      return 2;
    }
    double setup_s = seconds_since(t0);
    std::atomic<int> next{0};
    std::mutex mu;
    std::vector<double> latencies;
    std::string first_error;
    auto worker = [&] {
      for (;;) {
        int i = next.fetch_add(1);
        if (i >= a.count) return;
        ObtainRequest req;
        req.identifiers = {Identifier::dns(name_for(a, i))};
        req.challenge_type = a.challenge;
        auto t = SteadyClock::now();
        auto r = obtain(*session->client, req, *solver);
        double dt = seconds_since(t);
        std::lock_guard lock(mu);
        if (r) {
          latencies.push_back(dt);
        } else {
          ++failures;
          if (first_error.empty()) first_error = name_for(a, i) + ": " + r.error().message;
        }
      }
    };
    std::vector<std::thread> pool;
    for (int k = 0; k < a.concurrency; ++k) pool.emplace_back(worker);
    for (auto& t : pool) t.join();
    double wall = seconds_since(t0);
    auto stats = session->client->stats();
    out["batch_wall_s"] = wall;
    out["batch_setup_s"] = setup_s;
    out["batch_ok"] = latencies.size();
    out["batch_failures"] = failures;
    out["batch_cert_s_p50"] = median(latencies);
    out["batch_cert_s_p90"] = percentile(latencies, 0.9);
    out["batch_cert_s_max"] = percentile(latencies, 1.0);
    out["batch_certs_per_s"] = latencies.size() / wall;
    out["batch_requests"] = stats.requests;
    out["batch_bad_nonce_retries"] = stats.bad_nonce_retries;
    out["batch_server_retries"] = stats.server_retries;
    out["batch_requests_by_kind"] = session->transport->to_json();
    if (!first_error.empty()) out["batch_first_error"] = first_error;
  }

  // One certificate alone, a fresh Client and account each time. one_s times obtain() alone;
  // one_cold_s also counts the directory fetch, TLS handshake and newAccount.
  std::vector<double> one, one_cold;
  json one_requests;
  for (int r = 0; r < a.one_runs; ++r) {
    auto t0 = SteadyClock::now();
    auto session = new_session(a);
    if (!session) {
      ++failures;
      std::cerr << "one: account: " << session.error().message << "\n";
      continue;
    }
    ObtainRequest req;
    req.identifiers = {Identifier::dns(a.prefix + "one" + std::to_string(r) + ".issuance.test")};
    req.challenge_type = a.challenge;
    auto t1 = SteadyClock::now();
    auto res = obtain(*session->client, req, *solver);
    if (!res) {
      ++failures;
      std::cerr << "one: " << res.error().message << "\n";
      continue;
    }
    one.push_back(seconds_since(t1));
    one_cold.push_back(seconds_since(t0));
    one_requests = session->transport->to_json();
  }
  if (a.one_runs > 0) {
    out["one_s_median"] = one.empty() ? json(nullptr) : json(median(one));
    out["one_cold_s_median"] = one_cold.empty() ? json(nullptr) : json(median(one_cold));
    out["one_s_runs"] = one;
    out["one_requests_by_kind_last"] = one_requests;
  }
  out["failures"] = failures;
  std::cout << out.dump() << std::endl;
  return failures == 0 ? 0 : 1;
}
