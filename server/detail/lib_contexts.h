#pragma once

// Library contexts for the reactors after the first: why a reactor may get an OpenSSL library
// context (OSSL_LIB_CTX) of its own.
//
// OpenSSL 3.0's libssl fetches its algorithms afresh in every handshake (the TLS 1.3 key
// schedule's KDF, its HMACs and digests, the ciphers), and each fetch takes read locks of the
// library context's method store and name map. Two reactor threads in one context take the
// same lock words thousands of times a second, and the cache lines bounce between the cores;
// nginx's workers are processes and do not share them. Measured on the benchmark machine (two
// reactors; docs/benchmarks.md, session 18): the share of the server's CPU in those locks went
// from 4.6-5.3 % to 3.7-3.9 %, nginx's level (3.4-3.8 %); the handshake rate moved less than
// that machine's noise. The contention grows with the number of reactors.
//
// The price: a certificate's private key lives in the default context (the loader builds it
// there), so the first handshake a reactor signs with it exports the key into that reactor's
// context, a copy the key keeps (about 2.1 KiB for a P-256 key) until it is freed. Reactor 0
// keeps the default context, so a server with R reactors holds at most R - 1 such copies of a
// built key.
//
// The contexts are made once per process and never freed: every exported copy refers to its
// context's provider, and a key may outlive the server that exported it (the store is the
// caller's), so freeing a context before every key would leave those copies dangling.

#include <openssl/types.h>

#include <cstddef>
#include <string>
#include <vector>

namespace autotls::server::detail {

// reactor_lib_context returns the process's library context number i (0-based; the caller
// gives reactor k context k - 1), made on first use by make_lib_context with the providers
// active in the default context then. When it cannot be made, it returns nullptr with the
// reason in error, and every later call for i returns nullptr with the same reason: the
// reactor then uses the default context. Thread-safe.
OSSL_LIB_CTX* reactor_lib_context(std::size_t i, std::string& error);

// LibContext is a library context with the providers loaded into it (OSSL_PROVIDER_load's
// handles, which the context's own free does not release).
struct LibContext {
  OSSL_LIB_CTX* ctx = nullptr;
  std::vector<OSSL_PROVIDER*> providers;
};

// make_lib_context makes a library context with the named providers loaded (none named: the
// default provider), and checks that it can fetch SHA-256 and HKDF. It refuses the FIPS
// provider: a FIPS set-up's default properties ("fips=yes") live in the default context's
// configuration, which is not loaded again here (loading a configuration file re-runs
// OpenSSL's process-wide modules, such as the SSL one, under other threads' feet), so the new
// context would not enforce them. On failure it returns an empty LibContext and says why in
// error.
LibContext make_lib_context(const std::vector<std::string>& providers, std::string& error);

// free_lib_context unloads c's providers and frees its context: only for a context no key has
// signed in (tests; the reactors' contexts are never freed).
void free_lib_context(LibContext& c);

// default_providers names the providers active in the default context.
std::vector<std::string> default_providers();

}  // namespace autotls::server::detail
