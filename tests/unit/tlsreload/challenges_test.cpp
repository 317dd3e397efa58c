// ChallengeStore and ChallengeSolver: http-01 tokens, tls-alpn-01 certificates, dns-01 hooks.

#include <doctest/doctest.h>

#include <signal.h>

#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "acme/challenge.h"
#include "tlsreload/challenges.h"

using namespace autotls;
using namespace autotls::tlsreload;
namespace fs = std::filesystem;

namespace {

struct HookDir {
  fs::path path;
  HookDir() {
    std::string tmpl = (fs::temp_directory_path() / "autotls-hook-XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
  }
  ~HookDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  // script writes an executable /bin/sh script and returns its path.
  std::string script(const std::string& name, const std::string& body) {
    fs::path p = path / name;
    std::ofstream(p) << "#!/bin/sh\n" << body << "\n";
    ::chmod(p.c_str(), 0755);
    return p.string();
  }
  std::string read(const std::string& name) {
    std::ifstream in(path / name);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }
};

acme::Challenge challenge(std::string type, std::string token = "tok123") {
  acme::Challenge c;
  c.type = std::move(type);
  c.url = "https://ca.test/chall/1";
  c.status = "pending";
  c.token = std::move(token);
  return c;
}

}  // namespace

TEST_SUITE("tlsreload.challenges") {

TEST_CASE("http-01 key authorizations by token") {
  ChallengeStore store;
  CHECK_FALSE(store.http01("tok").has_value());
  store.put_http01("tok", "tok.thumb");
  CHECK(store.http01("tok") == std::optional<std::string>("tok.thumb"));
  CHECK_FALSE(store.http01("other").has_value());
  CHECK(store.size() == 1);
  store.remove_http01("tok");
  CHECK_FALSE(store.http01("tok").has_value());
  CHECK(store.size() == 0);
}

TEST_CASE("a lookup of an http-01 token counts as the CA fetching it") {
  using std::chrono::milliseconds;
  ChallengeStore store;
  store.put_http01("tok", "tok.thumb");
  // Nothing fetched yet: the wait runs out (bounded) and says so.
  CHECK_FALSE(store.wait_http01_fetched("tok", milliseconds(5)));
  // A lookup of another token, or of one not presented, is not a fetch of this one.
  CHECK_FALSE(store.http01("other").has_value());
  CHECK_FALSE(store.wait_http01_fetched("tok", milliseconds(0)));
  REQUIRE(store.http01("tok").has_value());
  CHECK(store.wait_http01_fetched("tok", milliseconds(0)));
  // Presented again (a new validation of the same token): not fetched until looked up again.
  store.put_http01("tok", "tok.thumb");
  CHECK_FALSE(store.wait_http01_fetched("tok", milliseconds(0)));

  // A lookup from a listener's thread wakes a waiter.
  std::thread listener([&] {
    std::this_thread::sleep_for(milliseconds(20));
    (void)store.http01("tok");
  });
  CHECK(store.wait_http01_fetched("tok", milliseconds(10'000)));
  listener.join();
  store.remove_http01("tok");
  CHECK_FALSE(store.wait_http01_fetched("tok", milliseconds(0)));
}

TEST_CASE("a wait for an http-01 fetch lasts until the lookups have been quiet for the asked time") {
  using namespace std::chrono;
  ChallengeStore store;
  store.put_http01("tok", "tok.thumb");
  // Nothing fetched: quiet or not, the wait runs out and says so.
  CHECK_FALSE(store.wait_http01_fetched("tok", milliseconds(1), milliseconds(1)));
  // A CA fetching from several vantage points: each lookup starts the quiet time again.
  REQUIRE(store.http01("tok").has_value());
  auto first = steady_clock::now();
  std::atomic<bool> second{false};
  std::thread vantage([&] {
    std::this_thread::sleep_for(milliseconds(50));
    (void)store.http01("tok");
    second = true;
  });
  // Fetched but not quiet yet: the bound comes first, and the answer is still "fetched".
  CHECK(store.wait_http01_fetched("tok", milliseconds(0), seconds(10)));
  // A second of quiet after the latest lookup: never before the second one plus that (the old
  // wait returned at the first lookup).
  CHECK(store.wait_http01_fetched("tok", seconds(60), seconds(1)));
  CHECK(second);
  CHECK(steady_clock::now() - first >= milliseconds(1050));
  vantage.join();
  // Quiet long enough already: true at once.
  CHECK(store.wait_http01_fetched("tok", milliseconds(0), milliseconds(0)));
  store.remove_http01("tok");
}

TEST_CASE("the solver tells when an http-01 key authorization was fetched, and only for http-01") {
  using std::chrono::milliseconds;
  auto store = std::make_shared<ChallengeStore>();
  ChallengeSolver solver(store);
  auto id = acme::Identifier::dns("www.example.com");
  auto http = challenge("http-01", "tokB");
  REQUIRE(solver.present(id, http, "tokB.thumb").has_value());
  CHECK_FALSE(solver.await_fetch(id, http, milliseconds(1), milliseconds(0)));
  REQUIRE(store->http01("tokB").has_value());
  CHECK(solver.await_fetch(id, http, milliseconds(0), milliseconds(0)));
  auto alpn = challenge("tls-alpn-01");
  REQUIRE(solver.present(id, alpn, "tok123.thumb").has_value());
  CHECK(store->tls_alpn("www.example.com"));
  CHECK_FALSE(solver.await_fetch(id, alpn, milliseconds(0), milliseconds(0)));
  solver.cleanup(id, http, "tokB.thumb");
  solver.cleanup(id, alpn, "tok123.thumb");
}

TEST_CASE("tls-alpn-01 certificates by SNI") {
  ChallengeStore store;
  REQUIRE(store.put_tls_alpn(acme::Identifier::dns("Example.com"), "tok.thumb").has_value());
  auto cert = store.tls_alpn("EXAMPLE.com.");
  REQUIRE(cert);
  CHECK(cert->names() == std::vector<std::string>{"example.com"});
  CHECK_FALSE(store.tls_alpn("other.example"));

  // RFC 8738 §6: an IP identifier is validated with its reverse-DNS name as SNI.
  REQUIRE(store.put_tls_alpn(acme::Identifier::ip("192.0.2.7"), "tok.thumb").has_value());
  auto ip = store.tls_alpn("7.2.0.192.in-addr.arpa");
  REQUIRE(ip);
  CHECK(ip->names() == std::vector<std::string>{"192.0.2.7"});
  CHECK(store.size() == 2);

  store.remove_tls_alpn(acme::Identifier::dns("example.com"));
  CHECK_FALSE(store.tls_alpn("example.com"));
  CHECK_FALSE(store.put_tls_alpn(acme::Identifier::ip("not-an-ip"), "x").has_value());
}

TEST_CASE("solver presents and cleans up through the store") {
  auto store = std::make_shared<ChallengeStore>();
  ChallengeSolver solver(store);
  auto id = acme::Identifier::dns("www.example.com");

  auto http = challenge("http-01", "tokA");
  REQUIRE(solver.present(id, http, "tokA.thumb").has_value());
  CHECK(store->http01("tokA") == std::optional<std::string>("tokA.thumb"));
  solver.cleanup(id, http, "tokA.thumb");
  CHECK_FALSE(store->http01("tokA").has_value());

  auto alpn = challenge("tls-alpn-01");
  REQUIRE(solver.present(id, alpn, "tok123.thumb").has_value());
  CHECK(store->tls_alpn("www.example.com"));
  solver.cleanup(id, alpn, "tok123.thumb");
  CHECK_FALSE(store->tls_alpn("www.example.com"));

  auto unknown = solver.present(id, challenge("carrier-pigeon-01"), "x");
  REQUIRE_FALSE(unknown.has_value());
  CHECK(unknown.error().code == Errc::invalid_input);
  auto dns = solver.present(id, challenge("dns-01"), "x");
  REQUIRE_FALSE(dns.has_value());
  CHECK(dns.error().message.find("no DNS hook") != std::string::npos);
  CHECK(store->size() == 0);
}

TEST_CASE("dns-01 runs the hook with add and del") {
  HookDir dir;
  std::string log = (dir.path / "calls.log").string();
  std::string hook = dir.script("hook.sh", "echo \"$1|$2|$3|$#\" >> '" + log + "'");
  auto store = std::make_shared<ChallengeStore>();
  ChallengeSolver solver(store, hook);
  auto id = acme::Identifier::dns("*.example.com");
  auto ch = challenge("dns-01");
  std::string value = acme::dns01_txt_value("tok123.thumb");

  REQUIRE(solver.present(id, ch, "tok123.thumb").has_value());
  // RFC 8555 §8.4: the wildcard's record is at the base domain.
  CHECK(dir.read("calls.log") == "add|_acme-challenge.example.com|" + value + "|3\n");
  solver.cleanup(id, ch, "tok123.thumb");
  CHECK(dir.read("calls.log") == "add|_acme-challenge.example.com|" + value + "|3\n" +
                                     "del|_acme-challenge.example.com|" + value + "|3\n");
}

TEST_CASE("dns hook arguments never reach a shell") {
  HookDir dir;
  std::string log = (dir.path / "args.log").string();
  std::string hook = dir.script("hook.sh", "printf '%s' \"$3\" > '" + log + "'");
  std::string nasty = "$(touch " + (dir.path / "pwned").string() + "); `id` 'quote\" *";
  REQUIRE(run_dns_hook(hook, "add", "_acme-challenge.example.com", nasty, std::chrono::seconds(10)).has_value());
  CHECK(dir.read("args.log") == nasty);
  CHECK_FALSE(fs::exists(dir.path / "pwned"));
}

TEST_CASE("dns hook failures carry the exit status") {
  HookDir dir;
  std::string hook = dir.script("fail.sh", "exit 3");
  auto r = run_dns_hook(hook, "add", "_acme-challenge.example.com", "v", std::chrono::seconds(10));
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == Errc::io);
  CHECK(r.error().message.find("exit status 3") != std::string::npos);

  auto missing = run_dns_hook((dir.path / "nope").string(), "add", "x", "v", std::chrono::seconds(10));
  REQUIRE_FALSE(missing.has_value());
  CHECK(missing.error().code == Errc::io);

  auto store = std::make_shared<ChallengeStore>();
  ChallengeSolver solver(store, hook);
  auto st = solver.present(acme::Identifier::dns("example.com"), challenge("dns-01"), "k");
  REQUIRE_FALSE(st.has_value());
  CHECK(st.error().message.find("exit status 3") != std::string::npos);
}

TEST_CASE("a hung dns hook is killed at its deadline") {
  HookDir dir;
  std::string hook = dir.script("hang.sh", "exec sleep 30");
  auto start = std::chrono::steady_clock::now();
  auto r = run_dns_hook(hook, "add", "_acme-challenge.example.com", "v", std::chrono::milliseconds(200));
  auto took = std::chrono::steady_clock::now() - start;
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == Errc::timeout);
  CHECK(took < std::chrono::seconds(5));
}

}  // TEST_SUITE

TEST_SUITE("tlsreload.challenges") {

TEST_CASE("a dns hook starts with no signal blocked") {
  // `autotls serve` blocks SIGTERM, SIGINT and SIGHUP in every thread to take them with sigwait;
  // a hook must not inherit that, or it (and its children) could not be stopped. An ignored
  // signal is inherited across exec too: the hook gets default dispositions (SigIgn), checked
  // on SIGHUP's bit only, as Python itself ignores SIGPIPE and SIGXFSZ at start.
  // Not a /bin/sh script: dash clears its mask at start and would hide the inherited one.
  HookDir dir;
  std::string hook = (dir.path / "mask.py").string();
  std::ofstream(hook) << "#!/usr/bin/python3\n"
                         "import sys\n"
                         "st = {l.split(':')[0]: int(l.split()[1], 16) for l in open('/proc/self/status')\n"
                         "      if l.startswith(('SigBlk:', 'SigIgn:'))}\n"
                         "sys.exit(7 if st['SigBlk'] != 0 else 8 if st['SigIgn'] & (1 << (1 - 1)) else 0)\n";
  ::chmod(hook.c_str(), 0755);
  sigset_t set, old;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &set, &old);
  struct sigaction ignore{}, old_hup{};
  ignore.sa_handler = SIG_IGN;
  sigemptyset(&ignore.sa_mask);
  ::sigaction(SIGHUP, &ignore, &old_hup);
  auto r = run_dns_hook(hook, "add", "_acme-challenge.example.com", "v", std::chrono::milliseconds(5000));
  ::sigaction(SIGHUP, &old_hup, nullptr);
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  CHECK_MESSAGE(r.has_value(), (r ? "" : r.error().message));
}

}  // TEST_SUITE
