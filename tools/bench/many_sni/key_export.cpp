// key_export.cpp: what a P-256 key's first signature in a second OpenSSL library context costs
// (the export server::Server::prepare_key does ahead of time; docs/benchmarks.md, session 26).
// key_export DIR N: reads the first N DIR/*/privkey.pem (a store_bench fixture's live/), then
// times, per key, EVP_DigestSignInit_ex in the default context, in a second context (the first
// time there: an export), and in the second context again; PRIME=1 first makes each copy with
// EVP_PKEY_sign_init, as prepare_key does. Build: g++ -O2 key_export.cpp -o key_export -lcrypto
#include <dirent.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/provider.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: key_export DIR N\n");
    return 2;
  }
  std::string dir = argv[1];
  std::size_t n = std::strtoul(argv[2], nullptr, 10);
  std::vector<EVP_PKEY*> keys;
  DIR* d = opendir(dir.c_str());
  if (!d) return 1;
  while (dirent* e = readdir(d)) {
    if (keys.size() >= n) break;
    if (e->d_name[0] == '.') continue;
    FILE* f = std::fopen((dir + "/" + e->d_name + "/privkey.pem").c_str(), "r");
    if (!f) continue;
    if (EVP_PKEY* k = PEM_read_PrivateKey(f, nullptr, nullptr, nullptr)) keys.push_back(k);
    std::fclose(f);
  }
  closedir(d);
  if (keys.empty()) return 1;
  OSSL_LIB_CTX* lib = OSSL_LIB_CTX_new();
  if (!lib || !OSSL_PROVIDER_load(lib, "default")) return 1;
  auto run = [&](OSSL_LIB_CTX* c, const char* what) {
    auto t0 = std::chrono::steady_clock::now();
    for (EVP_PKEY* k : keys) {
      EVP_MD_CTX* m = EVP_MD_CTX_new();
      if (EVP_DigestSignInit_ex(m, nullptr, "SHA256", c, nullptr, k, nullptr) != 1) std::exit(1);
      EVP_MD_CTX_free(m);
    }
    std::chrono::duration<double, std::micro> us = std::chrono::steady_clock::now() - t0;
    std::printf("%s: %.2f us per key\n", what, us.count() / static_cast<double>(keys.size()));
  };
  run(nullptr, "default context");
  run(nullptr, "default context, again");
  if (std::getenv("PRIME")) {
    for (EVP_PKEY* k : keys) {
      EVP_PKEY_CTX* c = EVP_PKEY_CTX_new_from_pkey(lib, k, nullptr);
      if (!c || EVP_PKEY_sign_init(c) != 1) std::exit(1);
      EVP_PKEY_CTX_free(c);
    }
  }
  run(lib, "second context, first signature");
  run(lib, "second context, again");
  std::printf("keys %zu\n", keys.size());
}
