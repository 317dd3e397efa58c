// The ACME client against a real Pebble: accounts, every challenge type, wildcard, IP,
// many names, revocation, alternate chains, and heavy badNonce rejection.

#include <doctest/doctest.h>

#include <openssl/pem.h>
#include <openssl/x509_vfy.h>

#include "acme/ari.h"
#include "acme/client.h"
#include "acme/problem.h"
#include "acme/util/openssl.h"
#include "tests/support/pebble_env.h"
#include "tests/support/test_solver.h"

using namespace autotls;
using namespace autotls::acme;
using autotls::testing::PebbleEnv;
using autotls::testing::PebbleOptions;
using autotls::testing::PebbleSolver;

namespace {

std::unique_ptr<Client> make_client(PebbleEnv& env, ClientOptions base = {}) {
  base.directory_url = env.directory_url();
  base.transport = std::shared_ptr<HttpTransport>(make_curl_transport(env.curl_options()));
  auto c = Client::create(base);
  REQUIRE_MESSAGE(c.has_value(), (c ? "" : c.error().message + "\n" + env.log_tail()));
  return std::move(*c);
}

std::shared_ptr<const Signer> new_key(KeyType t = KeyType::ec256) {
  auto k = PrivateKey::generate(t);
  REQUIRE(k.has_value());
  return std::make_shared<KeySigner>(std::move(*k));
}

Account register_account(Client& c, std::shared_ptr<const Signer> key = nullptr) {
  c.set_account(key ? key : new_key());
  auto a = c.register_account({{"mailto:test@example.test"}, true, std::nullopt});
  REQUIRE_MESSAGE(a.has_value(), (a ? "" : a.error().message));
  return *a;
}

std::vector<ossl::X509Ptr> parse_chain(const std::string& pem) {
  std::vector<ossl::X509Ptr> out;
  for (const auto& one : split_pem_chain(pem)) {
    ossl::BioPtr bio(BIO_new_mem_buf(one.data(), static_cast<int>(one.size())));
    ossl::X509Ptr x(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
    REQUIRE(x);
    out.push_back(std::move(x));
  }
  return out;
}

// verify_chain checks the leaf against Pebble's current root with OpenSSL's verifier, and that
// the leaf's public key matches the private key we were handed.
void verify_issued(PebbleEnv& env, const IssuedCertificate& issued, std::vector<std::string> names) {
  auto root_pem = env.pebble_root_pem();
  REQUIRE(root_pem.has_value());
  auto roots = parse_chain(*root_pem);
  auto chain = parse_chain(issued.chain_pem);
  REQUIRE(chain.size() >= 2);
  ossl::X509StackPtr untrusted(sk_X509_new_null());
  for (size_t i = 1; i < chain.size(); ++i) sk_X509_push(untrusted.get(), ossl::up_ref(chain[i].get()).release());
  std::unique_ptr<X509_STORE, ossl::Free<X509_STORE_free>> store(X509_STORE_new());
  X509_STORE_add_cert(store.get(), roots[0].get());
  std::unique_ptr<X509_STORE_CTX, ossl::Free<X509_STORE_CTX_free>> ctx(X509_STORE_CTX_new());
  X509_STORE_CTX_init(ctx.get(), store.get(), chain[0].get(), untrusted.get());
  int ok = X509_verify_cert(ctx.get());
  CHECK_MESSAGE(ok == 1, X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx.get())));

  auto key = PrivateKey::from_pem(issued.key_pem);
  REQUIRE(key.has_value());
  CHECK(X509_check_private_key(chain[0].get(), key->evp()) == 1);
  for (const auto& n : names) {
    bool ip = identifier_for(n).type == "ip";
    int match = ip ? X509_check_ip_asc(chain[0].get(), n.c_str(), 0)
                   : X509_check_host(chain[0].get(), n.c_str(), n.size(), 0, nullptr);
    CHECK_MESSAGE(match == 1, n);
  }
}

std::string leaf_der(const std::string& chain_pem) {
  auto chain = parse_chain(chain_pem);
  unsigned char* der = nullptr;
  int len = i2d_X509(chain[0].get(), &der);
  std::string out(reinterpret_cast<char*>(der), static_cast<size_t>(len));
  OPENSSL_free(der);
  return out;
}

IssuedCertificate issue(PebbleEnv& env, Client& client, std::vector<std::string> names,
                        std::string challenge = "http-01", std::string preferred_chain = {}) {
  PebbleSolver solver(env);
  ObtainRequest req;
  for (const auto& n : names) req.identifiers.push_back(identifier_for(n));
  req.challenge_type = std::move(challenge);
  req.preferred_chain = std::move(preferred_chain);
  auto r = obtain(client, req, solver);
  REQUIRE_MESSAGE(r.has_value(), (r ? "" : r.error().message + "\n" + env.log_tail()));
  CHECK(solver.cleaned() == solver.presented());
  verify_issued(env, *r, names);
  return *r;
}

}  // namespace

TEST_SUITE("acme.pebble") {

TEST_CASE("account create find update and deactivate") {
  AUTOTLS_START_PEBBLE(env, PebbleOptions{});
  auto client = make_client(*env);
  auto key = new_key();
  auto created = register_account(*client, key);
  CHECK(created.status == "valid");

  client->set_account(key);
  auto found = client->find_account();
  REQUIRE_MESSAGE(found.has_value(), (found ? "" : found.error().message));
  CHECK(found->url == created.url);

  auto updated = client->update_account({"mailto:other@example.test"});
  REQUIRE_MESSAGE(updated.has_value(), (updated ? "" : updated.error().message));
  CHECK(updated->contact == std::vector<std::string>{"mailto:other@example.test"});

  client->set_account(new_key());
  auto missing = client->find_account();
  REQUIRE_FALSE(missing.has_value());
  REQUIRE(missing.error().problem.has_value());
  CHECK(missing.error().problem->is(problem_type::kAccountDoesNotExist));

  client->set_account(key, created.url);
  auto gone = client->deactivate_account();
  REQUIRE_MESSAGE(gone.has_value(), (gone ? "" : gone.error().message));
  CHECK(gone->status == "deactivated");
  auto after = client->new_order({{Identifier::dns("x.example.test")}, "", ""});
  CHECK_FALSE(after.has_value());
}

TEST_CASE("key rollover") {
  AUTOTLS_START_PEBBLE(env, PebbleOptions{});
  auto client = make_client(*env);
  auto old_key = new_key();
  auto acct = register_account(*client, old_key);
  auto next = new_key(KeyType::ec384);
  auto st = client->change_key(next);
  REQUIRE_MESSAGE(st.has_value(), (st ? "" : st.error().message));
  client->set_account(next);
  auto found = client->find_account();
  REQUIRE_MESSAGE(found.has_value(), (found ? "" : found.error().message));
  CHECK(found->url == acct.url);
  issue(*env, *client, {"rolled.example.test"});
  client->set_account(old_key);
  CHECK_FALSE(client->find_account().has_value());
}

TEST_CASE("external account binding") {
  PebbleOptions opts;
  opts.eab_required = true;
  opts.eab_mac_keys = {{"kid-1", "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"}};
  AUTOTLS_START_PEBBLE(env, opts);
  auto client = make_client(*env);
  CHECK(client->directory().external_account_required);
  client->set_account(new_key());
  auto without = client->register_account({{}, true, std::nullopt});
  REQUIRE_FALSE(without.has_value());
  CHECK(without.error().code == Errc::invalid_input);
  auto wrong = client->register_account({{}, true, ExternalAccountBinding{"kid-1", "AAAAAAAAAAAAAAAAAAAAAA", "HS256"}});
  CHECK_FALSE(wrong.has_value());
  auto ok = client->register_account({{}, true, ExternalAccountBinding{"kid-1", opts.eab_mac_keys["kid-1"], "HS256"}});
  REQUIRE_MESSAGE(ok.has_value(), (ok ? "" : ok.error().message + "\n" + env->log_tail()));
  issue(*env, *client, {"eab.example.test"});
}

TEST_CASE("issue by http-01") {
  AUTOTLS_START_PEBBLE(env, PebbleOptions{});
  auto client = make_client(*env);
  register_account(*client);
  auto cert = issue(*env, *client, {"http.example.test", "www.http.example.test"}, "http-01");
  CHECK(cert.order.status == "valid");
}

TEST_CASE("issue by tls-alpn-01") {
  AUTOTLS_START_PEBBLE(env, PebbleOptions{});
  auto client = make_client(*env);
  register_account(*client);
  issue(*env, *client, {"alpn.example.test"}, "tls-alpn-01");
}

TEST_CASE("issue by dns-01 and a wildcard") {
  AUTOTLS_START_PEBBLE(env, PebbleOptions{});
  auto client = make_client(*env);
  register_account(*client);
  issue(*env, *client, {"dns.example.test"}, "dns-01");
  issue(*env, *client, {"*.wild.example.test"}, "dns-01");
}

TEST_CASE("an IP address certificate") {
  AUTOTLS_START_PEBBLE(env, PebbleOptions{});
  auto client = make_client(*env);
  register_account(*client);
  issue(*env, *client, {"127.0.0.1"}, "http-01");
}

TEST_CASE("ten names in one order with RSA and P-384 account keys") {
  AUTOTLS_START_PEBBLE(env, PebbleOptions{});
  auto client = make_client(*env);
  register_account(*client, new_key(KeyType::rsa2048));
  std::vector<std::string> names;
  for (int i = 0; i < 10; ++i) names.push_back("n" + std::to_string(i) + ".many.example.test");
  issue(*env, *client, names);
  register_account(*client, new_key(KeyType::ec384));
  issue(*env, *client, {"p384.example.test"});
}

TEST_CASE("certificate key types") {
  AUTOTLS_START_PEBBLE(env, PebbleOptions{});
  auto client = make_client(*env);
  register_account(*client);
  for (KeyType t : {KeyType::ec384, KeyType::rsa2048}) {
    PebbleSolver solver(*env);
    ObtainRequest req;
    req.identifiers = {Identifier::dns(std::string(to_string(t)) + ".keys.example.test")};
    req.key_type = t;
    auto r = obtain(*client, req, solver);
    REQUIRE_MESSAGE(r.has_value(), (r ? "" : r.error().message));
    auto key = PrivateKey::from_pem(r->key_pem);
    REQUIRE(key.has_value());
    CHECK(key->type() == t);
  }
}

TEST_CASE("revocation by account key and by certificate key") {
  AUTOTLS_START_PEBBLE(env, PebbleOptions{});
  auto client = make_client(*env);
  register_account(*client);
  auto one = issue(*env, *client, {"revoke1.example.test"});
  auto two = issue(*env, *client, {"revoke2.example.test"});

  auto st = client->revoke(leaf_der(one.chain_pem), RevocationReason::cessation_of_operation);
  REQUIRE_MESSAGE(st.has_value(), (st ? "" : st.error().message));
  auto again = client->revoke(leaf_der(one.chain_pem), RevocationReason::unspecified);
  REQUIRE_FALSE(again.has_value());
  REQUIRE(again.error().problem.has_value());
  CHECK(again.error().problem->is(problem_type::kAlreadyRevoked));

  auto key = PrivateKey::from_pem(two.key_pem);
  REQUIRE(key.has_value());
  KeySigner by_cert(*key);
  auto st2 = client->revoke(leaf_der(two.chain_pem), RevocationReason::key_compromise, &by_cert);
  REQUIRE_MESSAGE(st2.has_value(), (st2 ? "" : st2.error().message));
  auto again2 = client->revoke(leaf_der(two.chain_pem), std::nullopt, &by_cert);
  REQUIRE_FALSE(again2.has_value());
  CHECK(again2.error().problem->is(problem_type::kAlreadyRevoked));
}

TEST_CASE("alternate chains and the preferred chain") {
  PebbleOptions opts;
  opts.alternate_roots = 2;
  AUTOTLS_START_PEBBLE(env, opts);
  auto client = make_client(*env);
  register_account(*client);
  auto plain = issue(*env, *client, {"chain.example.test"});
  auto chain = client->download_certificate(plain.url);
  REQUIRE(chain.has_value());
  REQUIRE(chain->alternates.size() == 2);

  // Name the issuer of the top certificate of the second alternate and ask for it.
  auto alt = client->download_certificate(chain->alternates[1]);
  REQUIRE(alt.has_value());
  auto certs = parse_chain(alt->pem);
  char cn[256] = {0};
  X509_NAME_get_text_by_NID(X509_get_issuer_name(certs.back().get()), NID_commonName, cn, sizeof cn);
  REQUIRE(std::string(cn).size() > 0);
  PebbleSolver solver(*env);
  ObtainRequest req;
  req.identifiers = {Identifier::dns("chain2.example.test")};
  req.preferred_chain = cn;
  auto chosen = obtain(*client, req, solver);
  REQUIRE_MESSAGE(chosen.has_value(), (chosen ? "" : chosen.error().message));
  auto chosen_certs = parse_chain(chosen->chain_pem);
  char got[256] = {0};
  X509_NAME_get_text_by_NID(X509_get_issuer_name(chosen_certs.back().get()), NID_commonName, got, sizeof got);
  CHECK(std::string(got) == std::string(cn));
}

TEST_CASE("heavy badNonce rejection still completes") {
  PebbleOptions opts;
  opts.nonce_reject_percent = 40;
  AUTOTLS_START_PEBBLE(env, opts);
  auto client = make_client(*env);
  register_account(*client);
  for (int i = 0; i < 3; ++i) issue(*env, *client, {"nonce" + std::to_string(i) + ".example.test"});
  CHECK(client->stats().bad_nonce_retries > 0);
}

TEST_CASE("a failed validation is a typed error") {
  AUTOTLS_START_PEBBLE(env, PebbleOptions{});
  auto client = make_client(*env);
  register_account(*client);
  // A solver that presents nothing: Pebble's http-01 fetch finds no responder.
  struct Silent : Solver {
    Status present(const Identifier&, const Challenge&, std::string_view) override { return {}; }
    void cleanup(const Identifier&, const Challenge&, std::string_view) override {}
  } silent;
  ObtainRequest req;
  req.identifiers = {Identifier::dns("nobody.example.test")};
  auto r = obtain(*client, req, silent);
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == Errc::protocol);
  REQUIRE(r.error().problem.has_value());
  CHECK(r.error().message.find("nobody.example.test") != std::string::npos);
}

}  // TEST_SUITE
