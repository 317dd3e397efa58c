// The internal issuer: a local root kept in storage, leaves issued at once, served through the
// store, the same root after a restart, renewal by the Manager's usual rules.

#include <doctest/doctest.h>

#include <sys/stat.h>

#include <filesystem>

#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "acme/util/openssl.h"
#include "tests/support/fake_clock.h"
#include "tlsreload/internal_ca.h"
#include "tlsreload/manager.h"

using namespace autotls;
using namespace autotls::tlsreload;
using autotls::testing::FakeClock;
namespace fs = std::filesystem;
using namespace std::chrono_literals;

namespace {

struct InternalEnv {
  fs::path dir;
  FakeClock clock{std::chrono::system_clock::now()};
  std::shared_ptr<FileStorage> storage;
  std::shared_ptr<CertStore> certs = std::make_shared<CertStore>();
  std::shared_ptr<ChallengeStore> challenges = std::make_shared<ChallengeStore>();

  InternalEnv() {
    std::string tmpl = (fs::temp_directory_path() / "autotls-internal-XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    dir = tmpl;
    storage = std::make_shared<FileStorage>(dir, &clock);
  }
  ~InternalEnv() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  std::unique_ptr<Manager> manager(std::shared_ptr<CertStore> store = nullptr) {
    ManagerOptions o;
    o.directory_url = "internal";
    o.clock = &clock;
    o.rng_seed = 3;
    return std::make_unique<Manager>(o, storage, store ? store : certs, challenges);
  }
  std::string file(const std::string& key) {
    auto v = storage->get(key);
    REQUIRE(v.has_value());
    return v->value_or("");
  }
};

ossl::X509Ptr parse(const std::string& pem) {
  ossl::BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  return ossl::X509Ptr(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
}

// verifies reports whether the leaf of chain_pem verifies against root_pem for name/ip.
bool verifies(const std::string& chain_pem, const std::string& root_pem, const std::string& host, bool ip) {
  auto leaf = parse(chain_pem);
  auto root = parse(root_pem);
  if (!leaf || !root) return false;
  std::unique_ptr<X509_STORE, ossl::Free<X509_STORE_free>> store(X509_STORE_new());
  X509_STORE_add_cert(store.get(), root.get());
  std::unique_ptr<X509_STORE_CTX, ossl::Free<X509_STORE_CTX_free>> ctx(X509_STORE_CTX_new());
  X509_STORE_CTX_init(ctx.get(), store.get(), leaf.get(), nullptr);
  X509_VERIFY_PARAM* param = X509_STORE_CTX_get0_param(ctx.get());
  if (ip) {
    X509_VERIFY_PARAM_set1_ip_asc(param, host.c_str());
  } else {
    X509_VERIFY_PARAM_set1_host(param, host.c_str(), 0);
  }
  X509_VERIFY_PARAM_set_purpose(param, X509_PURPOSE_SSL_SERVER);
  return X509_verify_cert(ctx.get()) == 1;
}

mode_t mode_of(const fs::path& p) {
  struct stat sb {};
  REQUIRE(::stat(p.c_str(), &sb) == 0);
  return sb.st_mode & 0777;
}

}  // namespace

TEST_SUITE("tlsreload.internal") {

TEST_CASE("the internal issuer issues at once and the store serves it") {
  InternalEnv env;
  auto m = env.manager();
  auto st = m->manage({"localhost", "app.internal", "127.0.0.1"});
  REQUIRE_MESSAGE(st.has_value(), (st ? "" : st.error().message));
  CHECK(m->counters().obtained == 1);
  auto cert = env.certs->lookup("app.internal");
  REQUIRE(cert);
  CHECK(env.certs->lookup("localhost")->id() == cert->id());
  // Short-lived: 7 days (and a little backdating).
  auto lifetime = cert->not_after() - cert->not_before();
  CHECK(lifetime >= std::chrono::hours(24 * 7));
  CHECK(lifetime <= std::chrono::hours(24 * 7) + 10min);

  std::string root = env.file(std::string(InternalCA::kRootCertKey));
  REQUIRE_FALSE(root.empty());
  CHECK(mode_of(env.dir / "internal" / "root.key") == 0600);
  auto root_pem = m->internal_root_pem();
  REQUIRE(root_pem.has_value());
  CHECK(*root_pem == root);
  std::string chain = env.file("live/localhost/fullchain.pem");
  CHECK(verifies(chain, root, "app.internal", false));
  CHECK(verifies(chain, root, "localhost", false));
  CHECK(verifies(chain, root, "127.0.0.1", true));
  CHECK_FALSE(verifies(chain, root, "other.internal", false));
  auto meta = CertificateState::from_json(env.file("live/localhost/meta.json"));
  REQUIRE(meta.has_value());
  CHECK(meta->directory_url == "internal");
  CHECK(meta->issuer_name == "internal");
  CHECK(meta->issuer.find("autotls internal root") != std::string::npos);
}

TEST_CASE("the internal root survives a restart and new leaves chain to it") {
  InternalEnv env;
  REQUIRE(env.manager()->manage({"a.internal"}).has_value());
  std::string root = env.file(std::string(InternalCA::kRootCertKey));
  std::string key = env.file(std::string(InternalCA::kRootKeyKey));
  std::string first_leaf = env.file("live/a.internal/fullchain.pem");

  auto store2 = std::make_shared<CertStore>();
  auto m2 = env.manager(store2);
  REQUIRE(m2->manage({"a.internal"}).has_value());
  CHECK(m2->counters().loaded == 1);  // served from storage, nothing issued
  REQUIRE(m2->renew({"a.internal"}, true).has_value());
  REQUIRE(m2->manage({"b.internal"}).has_value());
  CHECK(env.file(std::string(InternalCA::kRootCertKey)) == root);
  CHECK(env.file(std::string(InternalCA::kRootKeyKey)) == key);
  CHECK(env.file("live/a.internal/fullchain.pem") != first_leaf);
  CHECK(verifies(env.file("live/a.internal/fullchain.pem"), root, "a.internal", false));
  CHECK(verifies(env.file("live/b.internal/fullchain.pem"), root, "b.internal", false));
}

TEST_CASE("internal leaves renew at half their lifetime like any short certificate") {
  InternalEnv env;
  auto m = env.manager();
  REQUIRE(m->manage({"svc.internal"}).has_value());
  std::string before = env.certs->lookup("svc.internal")->id();
  auto due = m->renewal_time({"svc.internal"});
  REQUIRE(due.has_value());
  auto st = m->state({"svc.internal"}).value();
  CHECK(*due == st.not_before + (st.not_after - st.not_before) / 2);
  env.clock.advance(std::chrono::duration_cast<std::chrono::milliseconds>(*due - env.clock.now() - 1min));
  CHECK(m->renew_due().value() == 0);
  env.clock.advance(2min);
  CHECK(m->renew_due().value() == 1);
  CHECK(env.certs->lookup("svc.internal")->id() != before);
  CHECK(m->counters().renewed == 1);
}

TEST_CASE("a damaged internal root is reported and never replaced") {
  InternalEnv env;
  REQUIRE(env.manager()->manage({"a.internal"}).has_value());
  std::string root = env.file(std::string(InternalCA::kRootCertKey));
  REQUIRE(env.storage->remove(InternalCA::kRootKeyKey).has_value());
  auto m = env.manager();
  auto st = m->manage({"b.internal"});
  REQUIRE_FALSE(st.has_value());
  CHECK(st.error().message.find("internal/root.key is missing") != std::string::npos);
  CHECK(env.file(std::string(InternalCA::kRootCertKey)) == root);
}

}  // TEST_SUITE
