// Reactors after the first run their handshakes in OpenSSL library contexts of their own
// (server/detail/lib_contexts.h): every reactor serves, keys built in the default context sign
// in the others (or are copied there before serving: Server::prepare_key), and the SNI counters
// add up across the contexts.

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <openssl/ssl.h>

#include "server/server.h"
#include "tests/support/pebble_env.h"
#include "tests/support/sni_handshake.h"
#include "tlsreload/certificate.h"
#include "tlsreload/store.h"

using namespace autotls;
using namespace autotls::server;

namespace {

enum class Outcome { answered, handshake_failed, no_answer };  // no_answer: or no connection

// get runs one connection to 127.0.0.1:port with sni, then "GET /" and the status line: a full
// handshake (a fresh client context), or, given a session (a ticket), a resumption attempt;
// *session is then replaced by the new one the server sent, and *resumed says whether the
// handshake resumed.
Outcome get(int port, const std::string& sni, SSL_SESSION** session = nullptr,
            bool* resumed = nullptr) {
  auto g = autotls::testing::tls_get(
      port, sni, nullptr, {.offer = session ? *session : nullptr, .keep_session = session != nullptr});
  if (!g.connected) return Outcome::no_answer;
  if (!g.ok) return Outcome::handshake_failed;
  if (resumed) *resumed = g.reused;
  if (session) {
    SSL_SESSION_free(*session);
    *session = g.session;
  }
  return g.status_line.starts_with("HTTP/1.1 ") ? Outcome::answered : Outcome::no_answer;
}

// ThreeReactors is a server with three reactors serving a.test from one certificate, which
// records the reactor threads that read a request header.
struct ThreeReactors {
  // Made before the server and released after it: the key keeps the copies the reactors'
  // contexts exported, which must outlive the server.
  std::shared_ptr<tlsreload::CertStore> store = std::make_shared<tlsreload::CertStore>();
  std::mutex mu;
  std::set<std::thread::id> reactors;
  std::unique_ptr<Server> srv;
  int port = 0;

  ThreeReactors() {
    auto ca = autotls::testing::make_test_ca("reactors test CA");
    REQUIRE(ca);
    auto leaf = autotls::testing::make_test_leaf({"a.test"}, *ca);
    REQUIRE(leaf);
    REQUIRE(store->publish_pem(leaf->cert_pem, leaf->key_pem));
    ServerConfig cfg;
    cfg.https = {{"127.0.0.1", 0}};
    cfg.http = {};  // not the default :80, which tests running alongside may hold
    cfg.reactor_threads = 3;
    cfg.on_header_started = [this] {
      std::lock_guard lock(mu);
      reactors.insert(std::this_thread::get_id());
    };
    auto s = Server::create(cfg, store, nullptr, nullptr);
    REQUIRE_MESSAGE(s, s.error().message);
    srv = std::move(*s);
    REQUIRE(srv->start());
    port = srv->https_port();
  }
  ~ThreeReactors() {
    if (srv) srv->shutdown(std::chrono::seconds(5));
  }

  std::size_t reactors_seen() {
    std::lock_guard lock(mu);
    return reactors.size();
  }
};

}  // namespace

TEST_SUITE("server") {
  TEST_CASE("reactors after the first handshake in library contexts of their own") {
    ThreeReactors t;
    int port = t.port;
    // The object cache knows keys may be copied into three contexts, and sizes itself for it.
    CHECK(tlsreload::openssl_cache_stats().signing_contexts >= 3);

    // Four clients at once, 25 connections each (which reactor accepts a connection is the
    // kernel's choice); every fifth asks for a name the store does not have (no default
    // certificate: the handshake fails, and counts as a miss in that reactor's context).
    std::atomic<int> answered{0}, refused{0}, other{0};
    std::vector<std::thread> clients;
    for (int t = 0; t < 4; ++t) {
      clients.emplace_back([&, t] {
        for (int i = 0; i < 25; ++i) {
          bool unknown = (i + t) % 5 == 0;
          Outcome o = get(port, unknown ? "unknown.test" : "a.test");
          if (o == (unknown ? Outcome::handshake_failed : Outcome::answered)) {
            ++(unknown ? refused : answered);
          } else {
            ++other;
          }
        }
      });
    }
    for (auto& c : clients) c.join();
    CHECK(other == 0);
    CHECK(answered > 0);
    CHECK(t.reactors_seen() >= 2);  // so some handshakes signed in a reactor's own context
    // The misses of every context are counted.
    CHECK(t.srv->counters().sni_misses == static_cast<std::uint64_t>(refused.load()));
  }

  TEST_CASE("prepare_key makes a key's copy in every other reactor's library context") {
    ThreeReactors t;
    auto cert = t.store->lookup("a.test", true);
    REQUIRE(cert);
    auto view = cert->openssl();
    REQUIRE(view);
    // Three reactors: the first signs in the default context, the two others in contexts of
    // their own, each of which gets a copy; a second call finds them made.
    CHECK(t.srv->prepare_key(view.key) == 2);
    CHECK(t.srv->prepare_key(view.key) == 2);
    CHECK(t.srv->prepare_key(nullptr) == 0);
    // The copies sign: every reactor still completes handshakes with the key.
    for (int i = 0; i < 12; ++i) CHECK(get(t.port, "a.test") == Outcome::answered);

    // One reactor: no context of its own to copy into.
    ServerConfig cfg;
    cfg.https = {{"127.0.0.1", 0}};
    cfg.http = {};
    cfg.reactor_threads = 1;
    auto one = Server::create(cfg, t.store, nullptr, nullptr);
    REQUIRE_MESSAGE(one, one.error().message);
    CHECK((*one)->prepare_key(view.key) == 0);
  }

  TEST_CASE("a ticket sealed in one reactor's library context opens in the others") {
    ThreeReactors t;
    int port = t.port;

    // Four clients at once, each resuming with the ticket of its previous connection, which
    // another reactor may have sealed (every reactor's context has the same ticket keys).
    std::atomic<int> resumed_count{0}, full{0}, other{0};
    std::vector<std::thread> clients;
    for (int t = 0; t < 4; ++t) {
      clients.emplace_back([&] {
        SSL_SESSION* session = nullptr;
        for (int i = 0; i < 15; ++i) {
          bool resumed = false;
          if (get(port, "a.test", &session, &resumed) != Outcome::answered) {
            ++other;
          } else {
            ++(resumed ? resumed_count : full);
          }
        }
        SSL_SESSION_free(session);
      });
    }
    for (auto& c : clients) c.join();
    CHECK(other == 0);
    CHECK(full.load() == 4);  // each client's first connection only
    CHECK(resumed_count.load() == 4 * 14);
    CHECK(t.reactors_seen() >= 2);
  }
}
