#include "server/detail/lib_contexts.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/provider.h>

#include <mutex>
#include <vector>

#include "acme/util/openssl.h"

namespace autotls::server::detail {
namespace {

struct Slot {
  bool tried = false;
  OSSL_LIB_CTX* ctx = nullptr;
  std::string error;
};

}  // namespace

OSSL_LIB_CTX* make_lib_context(const std::vector<std::string>& providers, std::string& error) {
  error.clear();
  for (const auto& name : providers) {
    if (name == "fips") {
      error = "the default library context has the FIPS provider; a new one would not carry its "
              "configuration";
      return nullptr;
    }
  }
  OSSL_LIB_CTX* ctx = OSSL_LIB_CTX_new();
  if (!ctx) {
    error = "OSSL_LIB_CTX_new: " + ossl::drain_errors();
    return nullptr;
  }
  std::vector<std::string> load = providers;
  if (load.empty()) load.push_back("default");
  for (const auto& name : load) {
    // Kept loaded for the context's life (never unloaded: the context is never freed).
    if (!OSSL_PROVIDER_load(ctx, name.c_str())) {
      error = "loading the OpenSSL provider \"" + name + "\": " + ossl::drain_errors();
      break;
    }
  }
  if (error.empty()) {
    EVP_MD* md = EVP_MD_fetch(ctx, "SHA256", nullptr);
    EVP_KDF* kdf = EVP_KDF_fetch(ctx, "HKDF", nullptr);
    if (!md || !kdf) error = "no SHA-256 or HKDF in a new library context: " + ossl::drain_errors();
    EVP_MD_free(md);
    EVP_KDF_free(kdf);
  }
  if (!error.empty()) {
    OSSL_LIB_CTX_free(ctx);  // nothing was exported into it yet
    return nullptr;
  }
  return ctx;
}

std::vector<std::string> default_providers() {
  std::vector<std::string> names;
  OSSL_PROVIDER_do_all(
      nullptr,
      [](OSSL_PROVIDER* p, void* arg) {
        static_cast<std::vector<std::string>*>(arg)->push_back(OSSL_PROVIDER_get0_name(p));
        return 1;
      },
      &names);
  return names;
}

OSSL_LIB_CTX* reactor_lib_context(std::size_t i, std::string& error) {
  static std::mutex mu;
  // Never destroyed (see the header): reachable from this static for leak checkers.
  static auto* slots = new std::vector<Slot>();
  std::lock_guard lock(mu);
  if (slots->size() <= i) slots->resize(i + 1);
  Slot& s = (*slots)[i];
  if (!s.tried) {
    s.tried = true;
    s.ctx = make_lib_context(default_providers(), s.error);
  }
  error = s.error;
  return s.ctx;
}

}  // namespace autotls::server::detail
