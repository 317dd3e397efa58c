#include <doctest/doctest.h>

#include <algorithm>
#include <string>
#include <vector>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>

#include "acme/key.h"
#include "acme/util/openssl.h"
#include "server/detail/lib_contexts.h"

using autotls::server::detail::reactor_lib_context;
namespace ossl = autotls::ossl;

namespace {

// sign_in signs with key through ctx (nullptr: the default context) and checks the signature
// in the default context.
bool sign_in(OSSL_LIB_CTX* ctx, EVP_PKEY* key) {
  const unsigned char msg[] = "autotls";
  unsigned char sig[1024];
  std::size_t sig_len = sizeof sig;
  ossl::EvpMdCtxPtr s(EVP_MD_CTX_new());
  bool ok = EVP_DigestSignInit_ex(s.get(), nullptr, "SHA256", ctx, nullptr, key, nullptr) == 1 &&
            EVP_DigestSign(s.get(), sig, &sig_len, msg, sizeof msg) == 1;
  ossl::EvpMdCtxPtr v(EVP_MD_CTX_new());
  ok = ok && EVP_DigestVerifyInit_ex(v.get(), nullptr, "SHA256", nullptr, nullptr, key, nullptr) == 1 &&
       EVP_DigestVerify(v.get(), sig, sig_len, msg, sizeof msg) == 1;
  ERR_clear_error();
  return ok;
}

}  // namespace

TEST_CASE("reactor_lib_context: one context per index, made once, apart from the default") {
  std::string why;
  OSSL_LIB_CTX* a = reactor_lib_context(0, why);
  REQUIRE_MESSAGE(a != nullptr, why);
  CHECK(why.empty());
  OSSL_LIB_CTX* b = reactor_lib_context(1, why);
  REQUIRE_MESSAGE(b != nullptr, why);
  CHECK(a != b);
  CHECK(reactor_lib_context(0, why) == a);  // the same context on every call
  CHECK(a != OSSL_LIB_CTX_get0_global_default());
  CHECK(b != OSSL_LIB_CTX_get0_global_default());

  // A key made in the default context (as the store's are) signs through either context: it is
  // exported into it on first use. Freeing the key afterwards frees those copies; the
  // contexts stay (under ASan a freed context would show here as a use after free).
  for (auto type : {autotls::acme::KeyType::ec256, autotls::acme::KeyType::rsa2048}) {
    auto key = autotls::acme::PrivateKey::generate(type);
    REQUIRE(key);
    CHECK(sign_in(nullptr, key->evp()));
    CHECK(sign_in(a, key->evp()));
    CHECK(sign_in(b, key->evp()));
  }

  // A TLS server context in it works as one in the default context does.
  ossl::SslCtxPtr ctx(SSL_CTX_new_ex(a, nullptr, TLS_server_method()));
  CHECK(ctx != nullptr);
}

TEST_CASE("make_lib_context loads the providers it is given, and refuses what it cannot") {
  std::vector<std::string> active = autotls::server::detail::default_providers();
  CHECK(std::find(active.begin(), active.end(), "default") != active.end());

  std::string why;
  for (const auto& providers : {std::vector<std::string>{}, std::vector<std::string>{"default"},
                                std::vector<std::string>{"default", "base"}}) {
    auto c = autotls::server::detail::make_lib_context(providers, why);
    CHECK_MESSAGE(c.ctx != nullptr, why);
    CHECK(why.empty());
    CHECK(c.providers.size() == std::max<std::size_t>(1, providers.size()));
    autotls::server::detail::free_lib_context(c);  // nothing exported into it: free to go
  }
  // Each failure frees what it made (LeakSanitizer checks under ASan).
  CHECK(autotls::server::detail::make_lib_context({"nosuch"}, why).ctx == nullptr);
  CHECK(why.rfind("loading the OpenSSL provider \"nosuch\": ", 0) == 0);
  // The base provider alone has encoders and decoders, no digest.
  CHECK(autotls::server::detail::make_lib_context({"base"}, why).ctx == nullptr);
  CHECK(why.rfind("no SHA-256 or HKDF in a new library context", 0) == 0);
  CHECK(autotls::server::detail::make_lib_context({"default", "fips"}, why).ctx == nullptr);
  CHECK(why.find("FIPS provider") != std::string::npos);
}
