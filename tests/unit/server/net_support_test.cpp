// tests/support/net.h: the ports free_port() hands out are distinct within a process. The
// kernel's bind(0) picks a random free port each time, so before claim_port two calls in a row
// returned the same port about 1 time in 14,000, and a server told both ports failed to start.

#include <doctest/doctest.h>

#include <set>
#include <string>
#include <vector>

#include "tests/support/net.h"

using autotls::testing::bind_claimed;
using autotls::testing::claim_port;
using autotls::testing::connect_to;
using autotls::testing::free_port;
using autotls::testing::RefusedPort;

TEST_SUITE("server.test_support") {

TEST_CASE("free_port never hands out the same port twice in a process") {
  // 2,000 draws from about 14,000 odd ephemeral ports: without the record of handed-out ports a
  // repeat is all but certain (birthday bound: the chance of none is below 1e-50).
  std::set<int> seen;
  for (int i = 0; i < 2000; ++i) {
    int p = free_port();
    CHECK(p > 0);
    REQUIRE_MESSAGE(seen.insert(p).second, "port " << p << " handed out twice");
  }
  // A port that was handed out cannot be claimed again.
  CHECK_FALSE(claim_port(*seen.begin()));
}

TEST_CASE("bind_claimed binds only ports free_port hands out and skips one it cannot bind") {
  // A stand-in for httplib::Server: refuses its first bind (another process took the port).
  struct Server {
    std::vector<int> tried;
    bool bind_to_port(const char* host, int port) {
      CHECK(std::string(host) == "127.0.0.1");
      tried.push_back(port);
      return tried.size() > 1;
    }
  } server;
  std::set<int> handed;
  for (int i = 0; i < 200; ++i) handed.insert(free_port());
  const int port = bind_claimed(server);
  REQUIRE(server.tried.size() == 2);
  CHECK(port == server.tried.back());
  CHECK(server.tried.front() != port);
  for (int p : server.tried) {
    CHECK(handed.count(p) == 0);  // never a port handed out before
    CHECK_FALSE(claim_port(p));   // and recorded, so nobody is handed it later
  }
}

TEST_CASE("a RefusedPort is never a port free_port handed out, and refuses connections") {
  // free_port's ports are closed until their user binds them, so a plain bind(0) may pick one:
  // 2,000 of them against 2,000 bind(0)s of about 14,000 ports would meet ~280 times.
  std::set<int> handed;
  for (int i = 0; i < 2000; ++i) handed.insert(free_port());
  std::set<int> refused;
  for (int i = 0; i < 2000; ++i) {
    RefusedPort p;
    REQUIRE_MESSAGE(handed.count(p.port()) == 0, "port " << p.port() << " was handed out by free_port");
    refused.insert(p.port());
    if (i == 0) CHECK(connect_to(p.port()) < 0);  // bound, not listening: refused
  }
  // Nor does free_port hand out a RefusedPort's port afterwards.
  for (int i = 0; i < 500; ++i) CHECK(refused.count(free_port()) == 0);
}

}  // TEST_SUITE
