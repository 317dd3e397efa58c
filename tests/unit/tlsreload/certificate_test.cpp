#include <doctest/doctest.h>

#include <chrono>
#include <cstring>

#include "tests/support/fake_clock.h"
#include "tests/support/test_keys.h"
#include "tests/unit/tlsreload/test_ca.h"
#include "tlsreload/certificate.h"
#include "tlsreload/detail/intern.h"

#include <malloc.h>

#include <openssl/ssl.h>
#include <openssl/x509v3.h>

using namespace autotls;
using namespace autotls::tlsreload;
using autotls::testing::FakeClock;
using autotls::testing::TestCa;
using autotls::testing::TestKeyType;

namespace {

struct Fixture {
  FakeClock clock;
  TestCa ca{"Cert", clock.now()};
  LoadOptions options() const {
    LoadOptions o;
    o.clock = &clock;
    return o;
  }
};

// reflow rewrites each PEM block's base64 body with `width` characters a line (0: one line)
// and `eol` line endings, to exercise the base64 decoder's line handling.
std::string reflow(const std::string& pem, std::size_t width, const std::string& eol) {
  std::string out, body;
  std::size_t pos = 0;
  while (pos < pem.size()) {
    std::size_t nl = pem.find('\n', pos);
    std::string line = pem.substr(pos, nl == std::string::npos ? std::string::npos : nl - pos);
    pos = nl == std::string::npos ? pem.size() : nl + 1;
    if (line.starts_with("-----BEGIN")) {
      out += line + eol;
      body.clear();
    } else if (line.starts_with("-----END")) {
      for (std::size_t i = 0; i < body.size(); i += width ? width : body.size()) {
        out += body.substr(i, width ? width : body.size()) + eol;
      }
      out += line + eol;
    } else {
      body += line;
    }
  }
  return out;
}

bool contains(const std::string& haystack, std::string_view needle) {
  return haystack.find(needle) != std::string::npos;
}

}  // namespace

TEST_SUITE("tlsreload.certificate") {

TEST_CASE_FIXTURE(Fixture, "certificate parses metadata of a valid ECDSA chain") {
  auto spec = ca.spec({"WWW.Example.com", "example.com", "*.example.com"});
  spec.ips = {"192.0.2.7", "2001:db8::1"};
  auto leaf = ca.issue(spec);
  auto cert = Certificate::from_pem(ca.chain_pem(leaf), leaf.key_pem, options());
  REQUIRE_MESSAGE(cert, cert.error().message);
  const Certificate& c = **cert;
  CHECK(c.names() == std::vector<std::string>{"www.example.com", "example.com", "*.example.com",
                                              "192.0.2.7", "2001:db8::1"});
  CHECK(c.key_kind() == KeyKind::ecdsa);
  CHECK(c.key_type() == "ec256");
  CHECK(c.issuer_cn() == "Cert Intermediate");
  CHECK(c.issuer_dn() == "CN=Cert Intermediate");
  CHECK(c.chain_length() == 1);
  CHECK(c.id().size() == 64);
  CHECK(c.not_before() == std::chrono::time_point_cast<std::chrono::seconds>(spec.not_before));
  CHECK(c.not_after() == std::chrono::time_point_cast<std::chrono::seconds>(spec.not_after));
  CHECK_FALSE(c.serial_hex().empty());
  CHECK(c.serial_hex().find_first_not_of("0123456789abcdef") == std::string::npos);

  // The fingerprint is the SHA-256 of the leaf DER.
  unsigned char md[32];
  unsigned int len = 0;
  X509_digest(leaf.cert.get(), EVP_sha256(), md, &len);
  CHECK(std::equal(md, md + 32, c.fingerprint().begin()));
  auto v = c.openssl();
  CHECK(X509_cmp(v.leaf, leaf.cert.get()) == 0);
  CHECK(sk_X509_num(v.chain) == 1);
}

TEST_CASE_FIXTURE(Fixture, "certificate accepts every key encoding") {
  SUBCASE("ec256 sec1") {
    auto leaf = ca.issue({"a.test"});
    auto c = Certificate::from_pem(ca.chain_pem(leaf), testing::key_to_pem_traditional(leaf.key.get()), options());
    REQUIRE_MESSAGE(c, c.error().message);
    CHECK((*c)->key_type() == "ec256");
  }
  SUBCASE("ec384 pkcs8") {
    auto leaf = ca.issue({"a.test"}, TestKeyType::ec384);
    auto c = Certificate::from_pem(ca.chain_pem(leaf), leaf.key_pem, options());
    REQUIRE_MESSAGE(c, c.error().message);
    CHECK((*c)->key_type() == "ec384");
  }
  SUBCASE("rsa pkcs1 and pkcs8") {
    auto leaf = ca.issue({"a.test"}, TestKeyType::rsa2048);
    for (const std::string& key : {leaf.key_pem, testing::key_to_pem_traditional(leaf.key.get())}) {
      auto c = Certificate::from_pem(ca.chain_pem(leaf), key, options());
      REQUIRE_MESSAGE(c, c.error().message);
      CHECK((*c)->key_kind() == KeyKind::rsa);
      CHECK((*c)->key_type() == "rsa2048");
    }
  }
  SUBCASE("text around the blocks is ignored") {
    auto leaf = ca.issue({"a.test"});
    auto c = Certificate::from_pem("subject=CN = a.test\n" + ca.chain_pem(leaf) + "\n\n",
                                   "EC key follows\n" + leaf.key_pem, options());
    CHECK_MESSAGE(c, c.error().message);
  }
}

TEST_CASE_FIXTURE(Fixture, "certificate refuses a key that does not match the leaf") {
  auto leaf = ca.issue({"a.test"});
  auto other = ca.issue({"a.test"});
  auto c = Certificate::from_pem(ca.chain_pem(leaf), other.key_pem, options());
  REQUIRE_FALSE(c);
  CHECK(c.error().code == Errc::invalid_input);
  CHECK(c.error().message == "private key does not match the leaf certificate");
}

TEST_CASE_FIXTURE(Fixture, "certificate refuses an expired leaf") {
  auto spec = ca.spec({"a.test"});
  spec.not_before = clock.now() - std::chrono::hours(24 * 100);
  spec.not_after = clock.now() - std::chrono::seconds(1);
  auto leaf = ca.issue(spec);
  auto c = Certificate::from_pem(ca.chain_pem(leaf), leaf.key_pem, options());
  REQUIRE_FALSE(c);
  CHECK_MESSAGE(contains(c.error().message, "leaf certificate expired"), c.error().message);
  // The same certificate was fine a day earlier: the injected clock decides.
  clock.advance(-std::chrono::hours(24));
  CHECK(Certificate::from_pem(ca.chain_pem(leaf), leaf.key_pem, options()));
}

TEST_CASE_FIXTURE(Fixture, "certificate refuses a not yet valid leaf unless allowed") {
  auto spec = ca.spec({"a.test"});
  spec.not_before = clock.now() + std::chrono::hours(2);
  auto leaf = ca.issue(spec);
  auto c = Certificate::from_pem(ca.chain_pem(leaf), leaf.key_pem, options());
  REQUIRE_FALSE(c);
  CHECK_MESSAGE(contains(c.error().message, "not yet valid"), c.error().message);
  LoadOptions o = options();
  o.allow_not_yet_valid = true;
  CHECK(Certificate::from_pem(ca.chain_pem(leaf), leaf.key_pem, o));
}

TEST_CASE_FIXTURE(Fixture, "certificate refuses a broken chain") {
  auto leaf = ca.issue({"a.test"});
  SUBCASE("wrong order") {
    auto c = Certificate::from_pem(leaf.cert_pem + ca.root().cert_pem + ca.intermediate().cert_pem,
                                   leaf.key_pem, options());
    REQUIRE_FALSE(c);
    CHECK_MESSAGE(contains(c.error().message, "certificate #2 (CN=Cert Root) did not issue "
                                              "certificate #1 (CN=a.test): issuer name differs"),
                  c.error().message);
  }
  SUBCASE("same names but another CA's key") {
    TestCa impostor("Cert", clock.now());  // identical subject names, different keys
    auto c = Certificate::from_pem(leaf.cert_pem + impostor.intermediate().cert_pem, leaf.key_pem,
                                   options());
    REQUIRE_FALSE(c);
    CHECK_MESSAGE(contains(c.error().message, "signature does not verify"), c.error().message);
  }
  SUBCASE("full chain up to the root is fine") {
    auto c = Certificate::from_pem(ca.chain_pem(leaf) + ca.root().cert_pem, leaf.key_pem, options());
    REQUIRE_MESSAGE(c, c.error().message);
    CHECK((*c)->chain_length() == 2);
  }
}

TEST_CASE_FIXTURE(Fixture, "certificate reports garbage truncated and empty input precisely") {
  auto leaf = ca.issue({"a.test"});
  std::string chain = ca.chain_pem(leaf);
  struct Case {
    std::string what;
    std::string chain;
    std::string key;
    const char* message;
  };
  std::vector<Case> cases = {
      {"empty chain", "", leaf.key_pem, "certificate chain: empty PEM input"},
      {"blank chain", " \n\t\n", leaf.key_pem, "certificate chain: empty PEM input"},
      {"garbage chain", "hello, this is not a certificate", leaf.key_pem,
       "certificate chain: no PEM block found"},
      {"truncated chain", leaf.cert_pem.substr(0, leaf.cert_pem.size() / 2), leaf.key_pem,
       "certificate chain: malformed PEM block #1"},
      {"truncated second block", leaf.cert_pem + ca.intermediate().cert_pem.substr(0, 100),
       leaf.key_pem, "certificate chain: malformed PEM block #2"},
      {"bad base64 body", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
       leaf.key_pem, "certificate chain: certificate #1: not a DER certificate"},
      {"key in the chain file", leaf.key_pem, leaf.key_pem,
       "certificate chain: certificate #1: unexpected PEM block \"PRIVATE KEY\""},
      {"empty key", chain, "", "private key: empty PEM input"},
      {"garbage key", chain, "xyz", "private key: no PEM block found"},
      {"truncated key", chain, leaf.key_pem.substr(0, leaf.key_pem.size() - 30),
       "private key: malformed PEM block #1"},
      {"certificate as key", chain, leaf.cert_pem, "private key: no PRIVATE KEY"},
      {"two keys", chain, leaf.key_pem + leaf.key_pem, "private key: more than one private key"},
  };
  for (const Case& k : cases) {
    CAPTURE(k.what);
    auto c = Certificate::from_pem(k.chain, k.key, options());
    REQUIRE_FALSE(c);
    CHECK(c.error().code == Errc::invalid_input);
    CHECK_MESSAGE(c.error().message.starts_with(k.message), c.error().message);
  }
}

TEST_CASE_FIXTURE(Fixture, "certificate refuses an encrypted key without prompting") {
  auto leaf = ca.issue({"a.test"});
  for (const std::string& key : {testing::key_to_pem_encrypted_pkcs8(leaf.key.get()),
                                 testing::key_to_pem_encrypted_traditional(leaf.key.get())}) {
    auto c = Certificate::from_pem(ca.chain_pem(leaf), key, options());
    REQUIRE_FALSE(c);
    CHECK_MESSAGE(contains(c.error().message, "the key is encrypted"), c.error().message);
  }
}

TEST_CASE_FIXTURE(Fixture, "certificate refuses a leaf without SANs") {
  auto leaf = ca.issue(ca.spec({}));
  auto c = Certificate::from_pem(ca.chain_pem(leaf), leaf.key_pem, options());
  REQUIRE_FALSE(c);
  CHECK(c.error().message == "leaf certificate: no dNSName or iPAddress subjectAltName");
}

TEST_CASE_FIXTURE(Fixture, "certificate refuses unusable SAN names") {
  for (const char* bad : {"a.*.example.com", "f*.example.com", "*.*.example.com", "a..b"}) {
    CAPTURE(bad);
    auto leaf = ca.issue({bad});
    auto c = Certificate::from_pem(ca.chain_pem(leaf), leaf.key_pem, options());
    REQUIRE_FALSE(c);
    CHECK(contains(c.error().message, "unusable dNSName"));
  }
}

TEST_CASE("certificate lookup name syntax") {
  CHECK(is_valid_lookup_name("example.com"));
  CHECK(is_valid_lookup_name("*.example.com"));
  CHECK(is_valid_lookup_name("xn--bcher-kva.example"));
  CHECK(is_valid_lookup_name("_acme-challenge.example.com"));
  CHECK(is_valid_lookup_name("2001:db8::1"));
  CHECK(is_valid_lookup_name("localhost"));
  CHECK_FALSE(is_valid_lookup_name(""));
  CHECK_FALSE(is_valid_lookup_name("*."));
  CHECK_FALSE(is_valid_lookup_name("*"));
  CHECK_FALSE(is_valid_lookup_name("Example.com"));  // keys are lower-case
  CHECK_FALSE(is_valid_lookup_name("bücher.example"));
  CHECK_FALSE(is_valid_lookup_name("a..b"));
  CHECK_FALSE(is_valid_lookup_name("a.b."));
  CHECK_FALSE(is_valid_lookup_name(std::string(64, 'a') + ".com"));
  CHECK_FALSE(is_valid_lookup_name("::zz"));
}

TEST_CASE_FIXTURE(Fixture, "certificate intermediates are interned and freed") {
  std::size_t before = detail::interned_count_for_test();
  auto l1 = ca.issue({"one.test"});
  auto l2 = ca.issue({"two.test"});
  auto c1 = Certificate::from_pem(ca.chain_pem(l1), l1.key_pem, options());
  auto c2 = Certificate::from_pem(ca.chain_pem(l2), l2.key_pem, options());
  REQUIRE(c1);
  REQUIRE(c2);
  X509* i1 = sk_X509_value((*c1)->openssl().chain, 0);
  X509* i2 = sk_X509_value((*c2)->openssl().chain, 0);
  CHECK(i1 == i2);  // one parsed copy shared by both leaves
  CHECK((*c1)->openssl().leaf != (*c2)->openssl().leaf);
  CHECK(detail::interned_count_for_test() == before + 1);

  TestCa other("Other", clock.now());
  auto l3 = other.issue({"three.test"});
  auto c3 = Certificate::from_pem(other.chain_pem(l3), l3.key_pem, options());
  REQUIRE(c3);
  CHECK(sk_X509_value((*c3)->openssl().chain, 0) != i1);
  CHECK(detail::interned_count_for_test() == before + 2);

  // Weak references: once no certificate uses an intermediate, it leaves the table.
  c1 = fail(Errc::invalid_input, "dropped");
  c2 = fail(Errc::invalid_input, "dropped");
  c3 = fail(Errc::invalid_input, "dropped");
  CHECK(detail::interned_count_for_test() == before);
}


TEST_CASE_FIXTURE(Fixture, "certificate deferred fast path reads the same metadata as the full path") {
  LoadOptions deferred = options();
  deferred.chain_check = LoadOptions::ChainCheck::deferred;
  auto check_same = [&](const std::string& chain, const std::string& key) {
    auto full = Certificate::from_pem(chain, key, options());
    auto fast = Certificate::from_pem(chain, key, deferred);
    REQUIRE_MESSAGE(full, full.error().message);
    REQUIRE_MESSAGE(fast, fast.error().message);
    const Certificate& a = **full;
    const Certificate& b = **fast;
    CHECK(a.verification() == Verification::verified);
    CHECK(b.verification() == Verification::pending);
    CHECK(a.names() == b.names());
    CHECK(a.not_before() == b.not_before());
    CHECK(a.not_after() == b.not_after());
    CHECK(a.serial_hex() == b.serial_hex());
    CHECK(a.issuer_cn() == b.issuer_cn());
    CHECK(a.issuer_dn() == b.issuer_dn());
    CHECK(a.key_kind() == b.key_kind());
    CHECK(a.key_type() == b.key_type());
    CHECK(a.id() == b.id());
    CHECK(a.chain_length() == b.chain_length());
    CHECK(b.verify());
    CHECK(b.verification() == Verification::verified);
    auto v = b.openssl();
    REQUIRE(v);
    CHECK(X509_cmp(v.leaf, a.openssl().leaf) == 0);
  };
  SUBCASE("ec256 pkcs8 with an IP and a wildcard") {
    auto s = ca.spec({"Fast.test", "*.fast.test"});
    s.ips = {"192.0.2.7", "2001:db8::7"};
    auto leaf = ca.issue(s);
    check_same(ca.chain_pem(leaf), leaf.key_pem);
  }
  SUBCASE("ec384 sec1") {
    auto leaf = ca.issue({"ec384.test"}, TestKeyType::ec384);
    check_same(ca.chain_pem(leaf), testing::key_to_pem_traditional(leaf.key.get()));
  }
  SUBCASE("base64 bodies with other line shapes (the fast decoder's line handling)") {
    auto leaf = ca.issue({"lines.test"});
    for (std::size_t width : {std::size_t{76}, std::size_t{4}, std::size_t{5}, std::size_t{0}}) {
      for (std::string eol : {"\n", "\r\n"}) {
        CAPTURE(width);
        check_same(reflow(ca.chain_pem(leaf), width, eol), reflow(leaf.key_pem, width, eol));
      }
    }
  }
  SUBCASE("rsa pkcs1 and pkcs8, chain up to the root") {
    auto leaf = ca.issue({"rsa.test"}, TestKeyType::rsa2048);
    check_same(ca.chain_pem(leaf) + ca.root().cert_pem, testing::key_to_pem_traditional(leaf.key.get()));
    check_same(ca.chain_pem(leaf), leaf.key_pem);
  }
}

TEST_CASE_FIXTURE(Fixture, "certificate deferred path refuses what it can check at load") {
  LoadOptions deferred = options();
  deferred.chain_check = LoadOptions::ChainCheck::deferred;
  auto leaf = ca.issue({"a.test"});
  auto other = ca.issue({"b.test"});
  auto mismatch = Certificate::from_pem(ca.chain_pem(leaf), other.key_pem, deferred);
  REQUIRE_FALSE(mismatch);
  CHECK(mismatch.error().message == "private key does not match the leaf certificate");
  clock.advance(std::chrono::hours(24 * 91));
  auto expired = Certificate::from_pem(ca.chain_pem(leaf), leaf.key_pem, deferred);
  REQUIRE_FALSE(expired);
  CHECK_MESSAGE(contains(expired.error().message, "leaf certificate expired"), expired.error().message);
}

TEST_CASE_FIXTURE(Fixture, "certificate deferred verification failure is final and reported") {
  LoadOptions deferred = options();
  deferred.chain_check = LoadOptions::ChainCheck::deferred;
  TestCa impostor("Cert", clock.now());  // identical names: the byte check at load passes
  auto leaf = ca.issue({"a.test"});
  auto c = Certificate::from_pem(leaf.cert_pem + impostor.intermediate().cert_pem, leaf.key_pem,
                                 deferred);
  REQUIRE_MESSAGE(c, c.error().message);
  CHECK((*c)->verification() == Verification::pending);
  auto before = openssl_cache_stats().verify_failed;
  auto v = (*c)->openssl();
  CHECK_FALSE(v);
  CHECK(v.leaf == nullptr);
  CHECK((*c)->verification() == Verification::failed);
  CHECK(openssl_cache_stats().verify_failed == before + 1);
  auto st = (*c)->verify();
  REQUIRE_FALSE(st);
  CHECK_MESSAGE(contains(st.error().message, "signature does not verify"), st.error().message);
  CHECK_FALSE((*c)->openssl());
  CHECK(openssl_cache_stats().verify_failed == before + 1);  // counted once
}

TEST_CASE_FIXTURE(Fixture, "certificate deferred keys built on first use sign for the leaf") {
  // The handshake objects of a deferred certificate are built from the key's parts (not
  // OpenSSL's DER decoder): a signature made with the built key must verify with the leaf's
  // public key, for each curve and each key format (PKCS#8, SEC1) and for RSA.
  LoadOptions deferred = options();
  deferred.chain_check = LoadOptions::ChainCheck::deferred;
  for (auto type : {testing::TestKeyType::ec256, testing::TestKeyType::ec384, testing::TestKeyType::rsa2048}) {
    auto spec = ca.spec({"sign.test"});
    spec.key = type;
    auto leaf = ca.issue(spec);
    ossl::BioPtr bio(BIO_new_mem_buf(leaf.key_pem.data(), static_cast<int>(leaf.key_pem.size())));
    ossl::EvpPkeyPtr parsed(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
    REQUIRE(parsed);
    for (const std::string& key_pem : {leaf.key_pem, testing::key_to_pem_traditional(parsed.get())}) {
      auto c = Certificate::from_pem(ca.chain_pem(leaf), key_pem, deferred);
      REQUIRE_MESSAGE(c, c.error().message);
      auto view = (*c)->openssl();
      REQUIRE(view);
      CHECK((*c)->verification() == Verification::verified);
      unsigned char digest[32] = {1, 2, 3};
      unsigned char sig[1024];
      std::size_t sig_len = sizeof sig;
      std::unique_ptr<EVP_PKEY_CTX, ossl::Free<EVP_PKEY_CTX_free>> sctx(EVP_PKEY_CTX_new(view.key, nullptr));
      REQUIRE(EVP_PKEY_sign_init(sctx.get()) == 1);
      REQUIRE(EVP_PKEY_sign(sctx.get(), sig, &sig_len, digest, sizeof digest) == 1);
      std::unique_ptr<EVP_PKEY_CTX, ossl::Free<EVP_PKEY_CTX_free>> vctx(
          EVP_PKEY_CTX_new(X509_get0_pubkey(view.leaf), nullptr));
      REQUIRE(EVP_PKEY_verify_init(vctx.get()) == 1);
      CHECK(EVP_PKEY_verify(vctx.get(), sig, sig_len, digest, sizeof digest) == 1);
      CHECK(EVP_PKEY_eq(view.key, parsed.get()) == 1);
    }
  }
}

TEST_CASE_FIXTURE(Fixture, "certificate EC keys are served as the leaf's own key object") {
  // The builder gives the leaf's public-key object the private half of an EC key, so that
  // SSL_use_cert_and_key's key check compares one object with itself. The key served must still
  // be the file's: it signs what an independent copy of the leaf's public key verifies, on both
  // load paths and in both EC formats, and an SSL takes it. RSA keys stay separate objects.
  LoadOptions deferred = options();
  deferred.chain_check = LoadOptions::ChainCheck::deferred;
  ossl::SslCtxPtr ctx(SSL_CTX_new(TLS_server_method()));
  REQUIRE(ctx);
  for (auto type : {testing::TestKeyType::ec256, testing::TestKeyType::ec384, testing::TestKeyType::rsa2048}) {
    bool ec = type != testing::TestKeyType::rsa2048;
    auto spec = ca.spec({"own.test"});
    spec.key = type;
    auto leaf = ca.issue(spec);
    ossl::BioPtr bio(BIO_new_mem_buf(leaf.cert_pem.data(), static_cast<int>(leaf.cert_pem.size())));
    ossl::X509Ptr copy(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
    REQUIRE(copy);
    EVP_PKEY* independent = X509_get0_pubkey(copy.get());
    for (const std::string& key_pem : {leaf.key_pem, testing::key_to_pem_traditional(leaf.key.get())}) {
      for (const LoadOptions& o : {options(), deferred}) {
        auto c = Certificate::from_pem(ca.chain_pem(leaf), key_pem, o);
        REQUIRE_MESSAGE(c, c.error().message);
        auto view = (*c)->openssl();
        REQUIRE(view);
        CHECK((view.key == X509_get0_pubkey(view.leaf)) == ec);
        CHECK(testing::signs_for(view.key, independent));
        CHECK(EVP_PKEY_eq(view.key, leaf.key.get()) == 1);
        // The leaf's DER is what was loaded (its cached encoding is untouched).
        unsigned char* der = nullptr;
        int len = i2d_X509(view.leaf, &der);
        unsigned char* want = nullptr;
        int want_len = i2d_X509(copy.get(), &want);
        CHECK((len == want_len && len > 0 && std::memcmp(der, want, static_cast<std::size_t>(len)) == 0));
        OPENSSL_free(der);
        OPENSSL_free(want);
        ossl::SslPtr ssl(SSL_new(ctx.get()));
        REQUIRE(ssl);
        CHECK(SSL_use_cert_and_key(ssl.get(), view.leaf, view.key, view.chain, 1) == 1);
        CHECK(SSL_check_private_key(ssl.get()) == 1);
      }
    }
  }
}

TEST_CASE_FIXTURE(Fixture, "certificate built objects come with the leaf's extension cache filled") {
  // OpenSSL fills an X509's extension cache (flags, SHA-1, decoded extensions) on first use;
  // SSL_use_cert_and_key is such a use. The builder fills it, so that the first handshake of a
  // built (or warmed) certificate does not: afterwards asking for the flags allocates nothing.
  // mallinfo2 counts the whole process's heap, and nothing else runs in this test meanwhile.
  LoadOptions deferred = options();
  deferred.chain_check = LoadOptions::ChainCheck::deferred;
  auto leaf = ca.issue(ca.spec({"ext.test", "www.ext.test"}));
  for (const LoadOptions& o : {options(), deferred}) {
    auto c = Certificate::from_pem(ca.chain_pem(leaf), leaf.key_pem, o);
    REQUIRE_MESSAGE(c, c.error().message);
    auto view = (*c)->openssl();
    REQUIRE(view);
    std::size_t before = mallinfo2().uordblks;
    std::uint32_t flags = X509_get_extension_flags(view.leaf);
    std::size_t after = mallinfo2().uordblks;
    CHECK((flags & EXFLAG_SET) != 0);
    CHECK((flags & EXFLAG_INVALID) == 0);
    CHECK(after == before);
  }
}

TEST_CASE("certificate OpenSSL object cache bound follows the live certificates") {
  CHECK(openssl_cache_capacity_for(0) == kDefaultOpenSslCacheCapacity);
  CHECK(openssl_cache_capacity_for(100000) == 20000);  // a fifth
  // Each further library context that signs adds a key copy: the bound shrinks to pay for it.
  CHECK(openssl_cache_capacity_for(100000, 1) == 20000);
  CHECK(openssl_cache_capacity_for(100000, 2) == 15625);
  CHECK(openssl_cache_capacity_for(1000000, 4) == 108695);
  CHECK(openssl_cache_capacity_for(100000, 8) == kDefaultOpenSslCacheCapacity);
  CHECK(openssl_cache_capacity_for(100000, 0) == 20000);
  set_openssl_cache_capacity(7);
  CHECK(openssl_cache_stats().capacity == 7);
  set_openssl_cache_capacity_automatic();
  CHECK(openssl_cache_stats().capacity >= kDefaultOpenSslCacheCapacity);
}

TEST_CASE("certificate OpenSSL object cache: the signing contexts noted only grow") {
  std::size_t before = openssl_cache_stats().signing_contexts;
  CHECK(before >= 1);
  note_openssl_signing_contexts(before + 2);
  CHECK(openssl_cache_stats().signing_contexts == before + 2);
  note_openssl_signing_contexts(before + 1);  // fewer: the copies of the others remain
  CHECK(openssl_cache_stats().signing_contexts == before + 2);
  note_openssl_signing_contexts(0);
  CHECK(openssl_cache_stats().signing_contexts == before + 2);
}

TEST_CASE_FIXTURE(Fixture, "certificate OpenSSL object cache evicts and rebuilds") {
  set_openssl_cache_capacity(2);
  std::vector<std::shared_ptr<const Certificate>> certs;
  for (int i = 0; i < 5; ++i) {
    auto leaf = ca.issue({"lru" + std::to_string(i) + ".test"});
    auto c = Certificate::from_pem(ca.chain_pem(leaf), leaf.key_pem, options());
    REQUIRE(c);
    certs.push_back(*c);
  }
  auto s = openssl_cache_stats();
  CHECK(s.size == 2);
  // A view keeps its objects alive through eviction.
  auto held = certs[0]->openssl();
  REQUIRE(held);
  unsigned char* der = nullptr;
  int len = i2d_X509(held.leaf, &der);
  REQUIRE(len > 0);
  std::string first(reinterpret_cast<char*>(der), static_cast<std::size_t>(len));
  OPENSSL_free(der);
  auto builds = openssl_cache_stats().builds;
  for (auto& c : certs) REQUIRE(c->openssl());
  for (auto& c : certs) REQUIRE(c->openssl());
  s = openssl_cache_stats();
  CHECK(s.size == 2);
  CHECK(s.builds > builds);  // evicted entries were rebuilt from DER
  CHECK(s.evictions >= 3);
  der = nullptr;
  len = i2d_X509(held.leaf, &der);  // still valid although evicted meanwhile
  CHECK(std::string(reinterpret_cast<char*>(der), static_cast<std::size_t>(len)) == first);
  OPENSSL_free(der);
  auto rebuilt = certs[0]->openssl();
  REQUIRE(rebuilt);
  CHECK(X509_cmp(rebuilt.leaf, held.leaf) == 0);
  CHECK(X509_check_private_key(rebuilt.leaf, rebuilt.key) == 1);
  CHECK(sk_X509_num(rebuilt.chain) == 1);
  // Capacity 0: nothing kept, every use builds.
  set_openssl_cache_capacity(0);
  CHECK(openssl_cache_stats().size == 0);
  CHECK(certs[1]->openssl());
  CHECK(openssl_cache_stats().size == 0);
  certs.clear();  // destroying cached certificates leaves no dangling cache entries
  set_openssl_cache_capacity_automatic();
}

}  // TEST_SUITE
