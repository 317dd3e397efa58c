#include "server/detail/lib_contexts.h"

#include <openssl/conf.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <unistd.h>

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

std::string make(OSSL_LIB_CTX*& out) {
  OSSL_LIB_CTX* ctx = OSSL_LIB_CTX_new();
  if (!ctx) return "OSSL_LIB_CTX_new: " + ossl::drain_errors();
  std::string error, loaded;
  // The configuration file the default context reads at initialisation: its providers and
  // default properties (a FIPS set-up, say) apply to this context too. Without a file,
  // OpenSSL falls back to the default provider, as in the default context.
  if (char* file = CONF_get1_default_config_file()) {
    if (::access(file, R_OK) == 0) {
      if (OSSL_LIB_CTX_load_config(ctx, file) != 1) {
        error = std::string("loading ") + file + ": " + ossl::drain_errors();
      } else {
        loaded = std::string(" (configuration ") + file + ")";
      }
    }
    OPENSSL_free(file);
  }
  if (error.empty()) {
    EVP_MD* md = EVP_MD_fetch(ctx, "SHA256", nullptr);
    EVP_KDF* kdf = EVP_KDF_fetch(ctx, "HKDF", nullptr);
    if (!md || !kdf) {
      error = "no SHA-256 or HKDF in a new library context" + loaded + ": " + ossl::drain_errors();
    }
    EVP_MD_free(md);
    EVP_KDF_free(kdf);
  }
  if (!error.empty()) {
    OSSL_LIB_CTX_free(ctx);  // nothing was exported into it yet
    return error;
  }
  out = ctx;
  return {};
}

}  // namespace

OSSL_LIB_CTX* reactor_lib_context(std::size_t i, std::string& error) {
  static std::mutex mu;
  // Never destroyed (see the header): reachable from this static for leak checkers.
  static auto* slots = new std::vector<Slot>();
  std::lock_guard lock(mu);
  if (slots->size() <= i) slots->resize(i + 1);
  Slot& s = (*slots)[i];
  if (!s.tried) {
    s.tried = true;
    s.error = make(s.ctx);
  }
  error = s.error;
  return s.ctx;
}

}  // namespace autotls::server::detail
