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
  LibContext made;
  std::string error;
};

}  // namespace

LibContext make_lib_context(const std::vector<std::string>& providers, std::string& error) {
  error.clear();
  LibContext c;
  for (const auto& name : providers) {
    if (name == "fips") {
      error = "the default library context has the FIPS provider; a new one would not carry its "
              "configuration";
      return c;
    }
  }
  c.ctx = OSSL_LIB_CTX_new();
  if (!c.ctx) {
    error = "OSSL_LIB_CTX_new: " + ossl::drain_errors();
    return c;
  }
  std::vector<std::string> load = providers;
  if (load.empty()) load.push_back("default");
  for (const auto& name : load) {
    OSSL_PROVIDER* p = OSSL_PROVIDER_load(c.ctx, name.c_str());
    if (!p) {
      error = "loading the OpenSSL provider \"" + name + "\": " + ossl::drain_errors();
      break;
    }
    c.providers.push_back(p);
  }
  if (error.empty()) {
    EVP_MD* md = EVP_MD_fetch(c.ctx, "SHA256", nullptr);
    EVP_KDF* kdf = EVP_KDF_fetch(c.ctx, "HKDF", nullptr);
    if (!md || !kdf) error = "no SHA-256 or HKDF in a new library context: " + ossl::drain_errors();
    EVP_MD_free(md);
    EVP_KDF_free(kdf);
  }
  if (!error.empty()) free_lib_context(c);  // nothing was exported into it yet
  return c;
}

void free_lib_context(LibContext& c) {
  for (OSSL_PROVIDER* p : c.providers) OSSL_PROVIDER_unload(p);
  c.providers.clear();
  OSSL_LIB_CTX_free(c.ctx);
  c.ctx = nullptr;
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
    s.made = make_lib_context(default_providers(), s.error);
  }
  error = s.error;
  return s.made.ctx;
}

}  // namespace autotls::server::detail
