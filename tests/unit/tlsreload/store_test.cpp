#include <doctest/doctest.h>

#include <cctype>
#include <cstring>
#include <memory>
#include <random>

#include "tests/support/fake_clock.h"
#include "tests/unit/tlsreload/test_ca.h"
#include "tlsreload/store.h"

using namespace autotls;
using namespace autotls::tlsreload;
using autotls::testing::FakeClock;
using autotls::testing::TestCa;
using autotls::testing::TestKeyType;

namespace {

struct Fixture {
  FakeClock clock;
  TestCa ca{"Store", clock.now()};
  CertStore store;

  std::shared_ptr<const Certificate> make(std::vector<std::string> names,
                                          TestKeyType key = TestKeyType::ec256) {
    auto leaf = ca.issue(std::move(names), key);
    LoadOptions o;
    o.clock = &clock;
    auto c = Certificate::from_pem(ca.chain_pem(leaf), leaf.key_pem, o);
    REQUIRE_MESSAGE(c, c.error().message);
    return *c;
  }
  std::shared_ptr<const Certificate> put(std::vector<std::string> names,
                                         TestKeyType key = TestKeyType::ec256) {
    auto c = make(std::move(names), key);
    REQUIRE(store.publish(c));
    return c;
  }
  std::string served(std::string_view sni, bool ecdsa = true) {
    auto c = store.lookup(sni, ecdsa);
    return c ? c->names().front() : std::string("<none>");
  }
};

}  // namespace

TEST_SUITE("tlsreload.store") {

TEST_CASE_FIXTURE(Fixture, "store matches exact names case-insensitively and ignores a trailing dot") {
  put({"example.com", "www.example.com"});
  put({"other.test"});
  CHECK(served("example.com") == "example.com");
  CHECK(served("WWW.EXAMPLE.COM") == "example.com");
  CHECK(served("Www.Example.Com.") == "example.com");
  CHECK(served("other.test") == "other.test");
  CHECK(served("other.test..") == "<none>");
  CHECK(served("nope.test") == "<none>");
  CHECK(served("") == "<none>");
  CHECK(served(".example.com") == "<none>");  // never reaches a wildcard key directly
  CHECK(served(std::string(300, 'a')) == "<none>");
}

// Names of every length around the 8-byte words the lookup folds case in and the 31 bytes a
// slot holds inline; bytes next to the accepted ranges ('@' '[' '`' '{' '/' ';' 0x80+) anywhere
// in the name must make it miss, both through lookup() and lookup_for_handshake().
// The SNI-miss counters of the client-hello hook rest on this flag: set only when no name
// answered (the default or nothing), never touched on a hit.
TEST_CASE_FIXTURE(Fixture, "lookup_for_handshake flags a lookup no name answered") {
  auto exact = put({"a.test"});
  auto wild = put({"*.w.test"});
  auto rsa_only = put({"r.test"}, TestKeyType::rsa2048);
  auto missed = [&](std::string_view sni, bool ecdsa, const Certificate* want) {
    bool m = false;
    CHECK(store.lookup_for_handshake(sni, ecdsa, &m) == want);
    return m;
  };
  CHECK_FALSE(missed("a.test", true, exact.get()));
  CHECK_FALSE(missed("X.W.TEST.", true, wild.get()));
  CHECK(missed("nope.test", true, nullptr));
  CHECK(missed("", true, nullptr));
  // Only the other key family under the name, and no default: still served by name.
  CHECK_FALSE(missed("r.test", true, rsa_only.get()));
  auto def = make({"default.test"});
  REQUIRE(store.set_default(def));
  CHECK_FALSE(missed("a.test", true, exact.get()));
  CHECK(missed("nope.test", true, def.get()));
  CHECK(missed("", true, def.get()));
  CHECK(missed("a.b.w.test", true, def.get()));
  // The flag is only ever set: a hit leaves a true one as it was.
  bool m = true;
  CHECK(store.lookup_for_handshake("a.test", true, &m) == exact.get());
  CHECK(m);
}

TEST_CASE_FIXTURE(Fixture, "store matches names of every length and refuses bytes outside the name alphabet") {
  auto def = make({"default.test"});
  REQUIRE(store.set_default(def));
  std::vector<std::pair<std::string, std::shared_ptr<const Certificate>>> held;
  for (std::size_t len : {1, 7, 8, 9, 15, 16, 17, 30, 31, 32, 33, 40, 63, 64, 65, 100}) {
    // len characters in labels of at most 9 ("kb0-_z9ak.kb0..."), then ".t".
    std::string name(len, 'k');
    for (std::size_t i = 0; i < len; ++i) {
      std::size_t in_label = i % 10;
      if (in_label == 9 && i + 1 < len) name[i] = '.';
      else if (in_label != 0 && in_label != 8 && i + 1 < len && (i + 1) % 10 != 9) name[i] = "ab0-_z9"[i % 7];
    }
    name += ".t";
    held.emplace_back(name, put({name}));
  }
  auto wild = put({"*.abcdefghijklmnopqrstuvwxyz0123456789-long-parent.test"});
  for (const auto& [name, cert] : held) {
    CAPTURE(name);
    std::string upper = name;
    for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    CHECK(store.lookup(name) == cert);
    CHECK(store.lookup(upper + ".") == cert);
    CHECK(store.lookup_for_handshake(upper, true) == cert.get());
    for (std::size_t pos : {std::size_t{0}, name.size() / 2, name.size() - 1}) {
      for (char bad : {'@', '[', '`', '{', '/', ';', ' ', '\x7f', '\x80', '\xc3'}) {
        std::string broken = name;
        broken[pos] = bad;
        CAPTURE(pos);
        CAPTURE(static_cast<int>(static_cast<unsigned char>(bad)));
        CHECK(store.lookup(broken) == def);
        CHECK(store.lookup_for_handshake(broken, true) == def.get());
      }
    }
  }
  CHECK(store.lookup("X.ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-LONG-PARENT.TEST") == wild);
  CHECK(store.lookup("x.y.abcdefghijklmnopqrstuvwxyz0123456789-long-parent.test") == def);
  CHECK(store.lookup(std::string(253, 'a')) == def);
  // Removing a long name and a short one by name works through the edited shards too.
  REQUIRE(store.remove_name(held.back().first));
  REQUIRE(store.remove_name(held.front().first));
  CHECK(store.lookup(held.back().first) == def);
  CHECK(store.lookup(held.front().first) == def);
  CHECK(store.lookup(held[5].first) == held[5].second);
}

// The lookup's key: both normalizations (SSE2 where the build has it, and the SWAR one) against
// a byte-at-a-time reference, for every byte value at every position of names of every
// length up to 48 (across the 8- and 16-byte chunks), every length up to the limit, and
// random names. The input sits at the very end of its buffer, so a read past it is a
// sanitizer error. The bytes after the key up to the next multiple of 8 must be zero.
TEST_CASE("normalize_sni lower-cases the name alphabet and refuses every other byte") {
  auto reference = [](std::string_view sni, std::string& key) -> std::size_t {
    if (!sni.empty() && sni.back() == '.') sni.remove_suffix(1);
    if (sni.empty() || sni.size() > kMaxSniName || sni.front() == '.') return 0;
    key.clear();
    for (char c : sni) {
      if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
      bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_' || c == ':';
      if (!ok) return 0;
      key += c;
    }
    return key.size();
  };
  std::size_t checked = 0;
  auto check = [&](const std::string& name) {
    std::string want;
    const std::size_t n = reference(name, want);
    // Exactly sized heap copy: the name ends where its allocation ends.
    std::unique_ptr<char[]> exact(new char[name.size()]);
    std::memcpy(exact.get(), name.data(), name.size());
    std::string_view sni(exact.get(), name.size());
    for (auto* f : {&detail::normalize_sni, &detail::normalize_sni_swar}) {
      char buf[kMaxSniName + 16];
      std::memset(buf, 0x5a, sizeof buf);
      const std::size_t got = f(sni, buf);
      if (got != n) {
        CAPTURE(name);
        CAPTURE(f == &detail::normalize_sni_swar);
        REQUIRE(got == n);
      }
      if (n != 0) {
        const std::string key(buf, n);
        const std::string pad(buf + n, (n + 7) / 8 * 8 - n);
        if (key != want || pad != std::string(pad.size(), '\0')) {
          CAPTURE(name);
          CAPTURE(f == &detail::normalize_sni_swar);
          CHECK(key == want);
          CHECK(pad == std::string(pad.size(), '\0'));
        }
      }
    }
    ++checked;
  };
  for (std::size_t len = 1; len <= 48; ++len) {
    std::string base(len, 'a');
    for (std::size_t i = 0; i < len; ++i) base[i] = "aZ0-_.:9y"[i % 9];
    if (base.front() == '.') base.front() = 'a';
    for (std::size_t pos = 0; pos < len; ++pos) {
      for (int b = 0; b < 256; ++b) {
        std::string name = base;
        name[pos] = static_cast<char>(b);
        check(name);
      }
    }
  }
  for (std::size_t len = 0; len <= kMaxSniName + 2; ++len) {
    check(std::string(len, 'Q'));
    check(std::string(len, 'q') + ".");
  }
  std::mt19937 rng(7);
  const std::string alphabet = "abcxyzABCXYZ0189-._:@[`{/ \x7f\x80\xff";
  for (int k = 0; k < 20000; ++k) {
    std::string name(rng() % 80, 'a');
    for (char& c : name) c = alphabet[rng() % alphabet.size()];
    check(name);
  }
  CHECK(checked > 300000);
}

TEST_CASE_FIXTURE(Fixture, "store wildcard covers exactly one label") {
  put({"*.example.com"});
  CHECK(served("a.example.com") == "*.example.com");
  CHECK(served("A.Example.COM.") == "*.example.com");
  CHECK(served("a.b.example.com") == "<none>");
  CHECK(served("example.com") == "<none>");
  CHECK(served("*.example.com") == "<none>");  // a literal "*" is not a valid SNI byte
  put({"api.example.com"});
  CHECK(served("api.example.com") == "api.example.com");  // exact beats wildcard
  CHECK(served("www.example.com") == "*.example.com");
}

TEST_CASE_FIXTURE(Fixture, "store lookup_name finds a wildcard name's own entry and never the default") {
  auto wildcard = put({"*.example.com"});
  auto def = make({"default.test"});
  REQUIRE(store.set_default(def));
  // lookup() takes "*.example.com" as an SNI name: not a valid one, so the default answers.
  CHECK(served("*.example.com") == "default.test");
  CHECK(store.lookup_name("*.example.com") == wildcard);
  CHECK(store.lookup_name("*.EXAMPLE.com.") == wildcard);
  REQUIRE(store.snapshot()->entry("*.example.com"));
  CHECK(store.snapshot()->entry("*.example.com")->ecdsa == wildcard);
  CHECK(store.snapshot()->entry("a.example.com") == nullptr);  // no wildcard matching
  // A name the wildcard covers is served by it; one it does not cover gets nothing.
  CHECK(store.lookup_name("a.example.com") == wildcard);
  CHECK(store.lookup_name("example.com") == nullptr);
  CHECK(store.lookup_name("a.b.example.com") == nullptr);
  CHECK(store.lookup_name("zzz.test") == nullptr);
  CHECK(store.lookup_name("*.other.test") == nullptr);
  CHECK(store.lookup_name("") == nullptr);
  // Exact beats wildcard; key families as in lookup().
  auto api = put({"api.example.com"});
  CHECK(store.lookup_name("api.example.com") == api);
  auto rsa = put({"*.example.com"}, TestKeyType::rsa2048);
  CHECK(store.lookup_name("*.example.com", false) == rsa);
  CHECK(store.lookup_name("*.example.com", true) == wildcard);
  CHECK(store.lookup_name("api.example.com", false) == rsa);
  REQUIRE(store.remove(rsa->id()));
  CHECK(store.lookup_name("*.example.com", false) == wildcard);  // only the other family: served anyway
}

TEST_CASE_FIXTURE(Fixture, "store serves punycode IDN names as ASCII") {
  put({"xn--bcher-kva.example"});
  CHECK(served("xn--bcher-kva.example") == "xn--bcher-kva.example");
  CHECK(served("XN--BCHER-KVA.example") == "xn--bcher-kva.example");
  CHECK(served("bücher.example") == "<none>");  // U-labels are the client's job to convert
}

TEST_CASE_FIXTURE(Fixture, "store falls back to the default certificate") {
  put({"a.test"});
  auto def = make({"default.test"});
  CHECK(served("zzz.test") == "<none>");
  REQUIRE(store.set_default(def));
  CHECK(served("zzz.test") == "default.test");
  CHECK(served("") == "default.test");
  CHECK(served("bad name!") == "default.test");
  CHECK(served("a.test") == "a.test");
  CHECK(store.snapshot()->default_pair().ecdsa == def);
  store.clear_default();
  CHECK(served("zzz.test") == "<none>");
}

TEST_CASE_FIXTURE(Fixture, "store picks ECDSA or RSA by client support") {
  auto ec = put({"dual.test"});
  auto rsa = put({"dual.test"}, TestKeyType::rsa2048);
  CHECK(store.lookup("dual.test", true) == ec);
  CHECK(store.lookup("dual.test", false) == rsa);

  SUBCASE("a step with only the other family defers to a usable later step") {
    put({"ec-only.example.com"});
    put({"*.example.com"}, TestKeyType::rsa2048);
    CHECK(store.lookup("ec-only.example.com", true)->names().front() == "ec-only.example.com");
    CHECK(store.lookup("ec-only.example.com", false)->names().front() == "*.example.com");
  }
  SUBCASE("with nothing usable the first match is served anyway") {
    put({"only-ec.test"});
    CHECK(store.lookup("only-ec.test", false)->names().front() == "only-ec.test");
  }
}

TEST_CASE_FIXTURE(Fixture, "store publish replaces per name and key family and counts") {
  auto v1 = put({"a.test", "b.test"});
  CHECK(store.version() == 2);
  CHECK(store.counters().publish_ok == 1);
  auto v2 = put({"a.test"});  // renewal that dropped b.test
  CHECK(store.lookup("a.test") == v2);
  CHECK(store.lookup("b.test") == v1);  // v1 still holds b.test
  auto snap = store.snapshot();
  CHECK(snap->certificates().size() == 2);
  CHECK(snap->name_count() == 2);

  // Re-publishing what is already there is a no-op without a new version.
  auto version = store.version();
  REQUIRE(store.publish(v2));
  CHECK(store.version() == version);
  CHECK(store.counters().publish_ok == 3);
}

TEST_CASE_FIXTURE(Fixture, "store publish failure leaves the store unchanged and counts") {
  auto good = put({"a.test"});
  auto before = store.snapshot();
  auto bad_leaf = ca.issue({"a.test"});
  auto other = ca.issue({"a.test"});
  LoadOptions o;
  o.clock = &clock;
  auto r = store.publish_pem(ca.chain_pem(bad_leaf), other.key_pem, o);  // mismatched key
  REQUIRE_FALSE(r);
  CHECK(r.error().message == "publish: private key does not match the leaf certificate");
  CHECK_FALSE(store.publish(nullptr));
  CHECK(store.counters().publish_failed == 2);
  CHECK(store.counters().publish_ok == 1);
  CHECK(store.snapshot() == before);  // not even a new version
  CHECK(store.lookup("a.test") == good);

  // Bad first, then good: the good one goes in.
  auto ok = store.publish_pem(ca.chain_pem(other), other.key_pem, o);
  REQUIRE(ok);
  CHECK(store.lookup("a.test") == *ok);
}

TEST_CASE_FIXTURE(Fixture, "store remove by id and by name") {
  auto a = put({"a.test", "*.a.test"});
  auto b = put({"b.test"});
  auto b_rsa = put({"b.test"}, TestKeyType::rsa2048);
  REQUIRE(store.remove(a->id()));
  CHECK(served("a.test") == "<none>");
  CHECK(served("x.a.test") == "<none>");
  CHECK_FALSE(store.remove(a->id()));
  CHECK(store.counters().remove_failed == 1);

  REQUIRE(store.remove_name("B.TEST."));
  CHECK(store.lookup("b.test", true) == nullptr);
  CHECK(store.lookup("b.test", false) == nullptr);
  CHECK(store.snapshot()->certificates().empty());
  CHECK(store.snapshot()->name_count() == 0);
  CHECK_FALSE(store.remove_name("b.test"));

  auto w = put({"*.w.test"});
  REQUIRE(store.remove_name("*.w.test"));
  CHECK(served("x.w.test") == "<none>");

  // A certificate replaced on all its names has left the store: its id is gone.
  auto c1 = put({"c.test"});
  put({"c.test"});
  CHECK_FALSE(store.remove(c1->id()));

  // Removing the default by id.
  auto d = make({"d.test"});
  REQUIRE(store.set_default(d));
  REQUIRE(store.remove(d->id()));
  CHECK(served("anything") == "<none>");
  (void)b;
  (void)b_rsa;
  (void)w;
}

TEST_CASE_FIXTURE(Fixture, "store snapshot held by a handshake survives later changes") {
  auto a = put({"a.test"});
  auto snap = store.snapshot();
  std::weak_ptr<const Certificate> weak = a;
  REQUIRE(store.remove(a->id()));
  a.reset();
  const auto* found = snap->find("a.test", true);
  REQUIRE(found);
  CHECK((*found)->names().front() == "a.test");
  CHECK_FALSE(weak.expired());
  snap.reset();
  store.lookup("refresh-this-thread-cache");  // the thread cache held the old snapshot too
  // Replaced snapshots are freed by the writer (so that readers never pay for it): on the
  // store's next change once no thread cache holds them.
  REQUIRE(store.publish(make({"b.test"})));
  CHECK(weak.expired());
}

TEST_CASE_FIXTURE(Fixture, "store publish_batch makes one version and reports each refusal") {
  auto a = make({"a.test"});
  auto b = make({"b.test", "*.b.test"});
  auto v = store.version();
  auto results = store.publish_batch({a, nullptr, b, a});
  REQUIRE(results.size() == 4);
  CHECK(results[0]);
  CHECK_FALSE(results[1]);
  CHECK(results[2]);
  CHECK(results[3]);
  CHECK(store.version() == v + 1);
  CHECK(served("a.test") == "a.test");
  CHECK(served("x.b.test") == "b.test");
  CHECK(store.counters().publish_failed == 1);
  CHECK(store.counters().publish_ok == 3);
  CHECK(store.publish_batch({a, b}).size() == 2);
  CHECK(store.version() == v + 1);  // nothing changed: no new version
  REQUIRE(store.remove(a->id()));
  CHECK(served("a.test") == "<none>");
}

TEST_CASE_FIXTURE(Fixture, "store treats a certificate that failed deferred verification as absent") {
  TestCa impostor("Store", clock.now());  // same names, other keys: passes the byte checks
  LoadOptions deferred;
  deferred.clock = &clock;
  deferred.chain_check = LoadOptions::ChainCheck::deferred;
  auto leaf = ca.issue({"bad.example.test"});
  auto bad = Certificate::from_pem(leaf.cert_pem + impostor.intermediate().cert_pem, leaf.key_pem,
                                   deferred);
  REQUIRE(bad);
  auto wildcard = put({"*.example.test"});
  auto fallback = make({"default.test"});
  REQUIRE(store.set_default(fallback));
  REQUIRE(store.publish(*bad));
  // Pending: served (its first use verifies it).
  CHECK(store.lookup("bad.example.test") == *bad);
  CHECK_FALSE((*bad)->openssl());
  // Failed: absent, so the wildcard step applies, then the default.
  CHECK(served("bad.example.test") == "*.example.test");
  REQUIRE(store.remove(wildcard->id()));
  CHECK(served("bad.example.test") == "default.test");
  store.clear_default();
  CHECK(store.lookup("bad.example.test") == nullptr);
}

TEST_CASE_FIXTURE(Fixture, "store handles many names across shards") {
  std::vector<std::shared_ptr<const Certificate>> certs;
  for (int i = 0; i < 300; ++i) certs.push_back(put({"host" + std::to_string(i) + ".test"}));
  CHECK(store.snapshot()->name_count() == 300);
  for (int i = 0; i < 300; ++i) {
    REQUIRE(store.lookup("host" + std::to_string(i) + ".test") == certs[i]);
  }
  CHECK(store.version() == 301);
  // Lookups through two stores on one thread do not mix up the thread-local caches.
  CertStore other;
  CHECK(other.lookup("host1.test") == nullptr);
  CHECK(store.lookup("host1.test") == certs[1]);
}

// The slot arrays live in a pool that recycles freed blocks by size (TablePool in store.cpp):
// shards grow through several sizes, shrink to nothing and grow again, and every name must
// still find its own certificate (a block handed out twice, or freed with the wrong size,
// would make one shard's slots overwrite another's).
TEST_CASE_FIXTURE(Fixture, "store tables stay exact while shards grow, empty and refill") {
  auto names = [](char prefix, int n) {
    std::vector<std::string> v;
    for (int i = 0; i < n; ++i) v.push_back(std::string(1, prefix) + std::to_string(i) + ".pool.test");
    return v;
  };
  auto all_served_by = [&](const std::vector<std::string>& ns, const std::shared_ptr<const Certificate>& c) {
    for (const auto& n : ns) {
      if (store.lookup(n) != c) return false;
    }
    return true;
  };
  const auto a_names = names('a', 3000), b_names = names('b', 3000), c_names = names('c', 3000);
  auto a = put(a_names);
  auto b = put(b_names);
  CHECK(all_served_by(a_names, a));
  CHECK(all_served_by(b_names, b));
  REQUIRE(store.remove(a->id()));
  CHECK(all_served_by(a_names, nullptr));
  CHECK(all_served_by(b_names, b));
  auto c = put(c_names);  // reuses the blocks a's shards gave back
  CHECK(all_served_by(b_names, b));
  CHECK(all_served_by(c_names, c));
  REQUIRE(store.remove(b->id()));
  REQUIRE(store.remove(c->id()));
  CHECK(store.snapshot()->name_count() == 0);
  auto a2 = put(a_names);
  CHECK(all_served_by(a_names, a2));
  CHECK(all_served_by(c_names, nullptr));
}

}  // TEST_SUITE
