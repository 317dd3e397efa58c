#include <doctest/doctest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "tests/support/fake_clock.h"
#include "tests/unit/tlsreload/test_ca.h"
#include "tlsreload/loader.h"
#include "tlsreload/store.h"

using namespace autotls;
using namespace autotls::tlsreload;
namespace fs = std::filesystem;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "tlsreload-loader-XXXXXX").string();
    REQUIRE(mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

void write(const fs::path& p, const std::string& data) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << data;
}

}  // namespace

TEST_SUITE("tlsreload.loader") {

TEST_CASE("loader reads a certbot directory and reports each bad file") {
  testing::FakeClock clock;
  testing::TestCa ca("Loader", clock.now());
  TempDir dir;
  auto good1 = ca.issue({"good1.test"});
  auto good2 = ca.issue({"good2.test"}, testing::TestKeyType::rsa2048);
  auto bad = ca.issue({"bad.test"});
  write(dir.path / "good1.test" / "fullchain.pem", ca.chain_pem(good1));
  write(dir.path / "good1.test" / "privkey.pem", good1.key_pem);
  write(dir.path / "live" / "good2.test" / "fullchain.pem", ca.chain_pem(good2));
  write(dir.path / "live" / "good2.test" / "privkey.pem", testing::key_to_pem_traditional(good2.key.get()));
  write(dir.path / "live" / "README", "certbot readme");
  write(dir.path / "bad-key.test" / "fullchain.pem", ca.chain_pem(bad));
  write(dir.path / "bad-key.test" / "privkey.pem", "not a key");
  write(dir.path / "mismatch.test" / "fullchain.pem", ca.chain_pem(bad));
  write(dir.path / "mismatch.test" / "privkey.pem", good1.key_pem);
  write(dir.path / "no-key.test" / "fullchain.pem", ca.chain_pem(bad));
  fs::create_directories(dir.path / "archive");
  fs::create_directories(dir.path / "renewal");

  LoadOptions o;
  o.clock = &clock;
  auto report = load_directory(dir.path, o);
  REQUIRE_MESSAGE(report, report.error().message);
  REQUIRE(report->certificates.size() == 2);
  std::vector<std::string> names;
  for (const auto& c : report->certificates) names.push_back(c->names().front());
  std::sort(names.begin(), names.end());
  CHECK(names == std::vector<std::string>{"good1.test", "good2.test"});

  REQUIRE(report->failures.size() == 3);
  auto failure_for = [&](const fs::path& p) -> const LoadFailure* {
    for (const auto& f : report->failures) {
      if (f.path == p) return &f;
    }
    return nullptr;
  };
  const LoadFailure* f1 = failure_for(dir.path / "no-key.test" / "privkey.pem");
  REQUIRE(f1);
  CHECK(f1->error.message.ends_with("privkey.pem: missing"));
  const LoadFailure* f2 = failure_for(dir.path / "bad-key.test" / "privkey.pem");
  REQUIRE(f2);
  CHECK(f2->error.message == (dir.path / "bad-key.test" / "privkey.pem").string() +
                                 ": private key: no PEM block found (not PEM, or truncated before "
                                 "the first -----END line)");
  const LoadFailure* f3 = failure_for(dir.path / "mismatch.test" / "fullchain.pem");
  REQUIRE(f3);
  CHECK(f3->error.message.ends_with("private key does not match the leaf certificate"));

  CertStore store;
  CHECK(publish_all(store, *report) == 2);
  CHECK(store.lookup("good1.test") != nullptr);
  CHECK(store.lookup("good2.test", false) != nullptr);
  CHECK(store.lookup("bad.test") == nullptr);
}

TEST_CASE("loader explicit pairs and unreadable inputs") {
  testing::FakeClock clock;
  testing::TestCa ca("Loader", clock.now());
  TempDir dir;
  auto leaf = ca.issue({"pair.test"});
  write(dir.path / "c.pem", ca.chain_pem(leaf));
  write(dir.path / "k.pem", leaf.key_pem);
  LoadOptions o;
  o.clock = &clock;
  auto report = load_pairs({{dir.path / "c.pem", dir.path / "k.pem"},
                            {dir.path / "missing.pem", dir.path / "k.pem"}},
                           o);
  REQUIRE(report.certificates.size() == 1);
  REQUIRE(report.failures.size() == 1);
  CHECK(report.failures[0].path == dir.path / "missing.pem");
  CHECK(report.failures[0].error.code == Errc::io);

  CHECK_FALSE(load_directory(dir.path / "does-not-exist", o));
  write(dir.path / "big.pem", std::string((1 << 20) + 1, 'A'));
  auto big = load_pair({dir.path / "big.pem", dir.path / "k.pem"}, o);
  REQUIRE_FALSE(big);
  CHECK(big.error().message.ends_with("larger than 1 MiB, not a PEM file"));
}

}  // TEST_SUITE
