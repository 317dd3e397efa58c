#include <doctest/doctest.h>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

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

namespace {

// with_config runs reactor_lib_context(index) with OPENSSL_CONF naming a file holding text
// (the default context read its own at initialisation and is not affected), then restores it.
OSSL_LIB_CTX* with_config(std::size_t index, const std::string& text, std::string& file,
                          std::string& why) {
  const char* old = std::getenv("OPENSSL_CONF");
  std::string saved = old ? old : "";
  file = "/tmp/autotls-lib-context-test-" + std::to_string(::getpid()) + ".cnf";
  FILE* f = std::fopen(file.c_str(), "w");
  REQUIRE(f);
  std::fputs(text.c_str(), f);
  std::fclose(f);
  ::setenv("OPENSSL_CONF", file.c_str(), 1);
  OSSL_LIB_CTX* c = reactor_lib_context(index, why);
  ::unlink(file.c_str());
  if (old) {
    ::setenv("OPENSSL_CONF", saved.c_str(), 1);
  } else {
    ::unsetenv("OPENSSL_CONF");
  }
  return c;
}

}  // namespace

// Indexes no other test uses: the outcome for an index is kept for the process.
TEST_CASE("reactor_lib_context: a configuration that does not load is an error, every time") {
  std::string file, why;
  CHECK(with_config(900, "[unterminated section\n", file, why) == nullptr);
  CAPTURE(why);
  CHECK(why.rfind("loading " + file + ": ", 0) == 0);
  std::string again;
  CHECK(reactor_lib_context(900, again) == nullptr);  // not retried
  CHECK(again == why);
}

TEST_CASE("reactor_lib_context: a configuration whose providers cannot sign is an error") {
  // Loads (OpenSSL 3.0 tolerates a provider it cannot find) but leaves nothing to fetch from.
  std::string file, why;
  CHECK(with_config(901,
                    "openssl_conf = init\n[init]\nproviders = prov\n[prov]\nnosuch = nosuch_sect\n"
                    "[nosuch_sect]\nactivate = 1\n",
                    file, why) == nullptr);
  CAPTURE(why);
  CHECK(why.find("no SHA-256 or HKDF in a new library context (configuration " + file + ")") !=
        std::string::npos);
}
