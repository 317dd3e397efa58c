#pragma once

// attach: serve the certificates of a CertStore from an OpenSSL SSL_CTX, chosen per handshake
// from the ClientHello (SNI, signature algorithms, ALPN).

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <openssl/types.h>

#include "acme/util/error.h"
#include "tlsreload/certificate.h"
#include "tlsreload/store.h"

namespace autotls::tlsreload {

// kAcmeTlsAlpn is the ALPN protocol of the tls-alpn-01 challenge (RFC 8737 §6.2).
inline constexpr std::string_view kAcmeTlsAlpn = "acme-tls/1";

// UnknownName is what the client-hello callback does for an SNI that no certificate in the
// store covers (nothing matched, or only the default certificate did).
enum class UnknownName {
  serve_default,  // as without the hook: the default certificate, or unrecognized_name
  retry,          // suspend the handshake (SSL_CLIENT_HELLO_RETRY) and ask again later
  fail,           // fail the handshake with an unrecognized_name alert
};

struct AttachOptions {
  // alpn_challenge, when set, is consulted for ClientHellos that offer "acme-tls/1" (RFC 8737
  // §3: the validation server connects with that protocol and the SNI of the identifier). It
  // returns the challenge certificate for sni, or nullptr, which fails the handshake (a real
  // certificate would only make the validation fail later). It runs inside the OpenSSL
  // callback: it MUST be thread-safe, MUST return quickly and MUST NOT throw (a throw fails
  // the handshake with internal_error). When unset, acme-tls/1 is never selected.
  std::function<std::shared_ptr<const Certificate>(std::string_view sni)> alpn_challenge;
  // alpn_protocols are the protocols the ALPN callback may select for ordinary connections,
  // in server preference order. A client offering none of them gets no ALPN answer.
  std::vector<std::string> alpn_protocols = {"http/1.1"};

  // on_unknown_name, when set, is asked about every non-empty SNI that no certificate in the
  // store covers (on-demand issuance). Same rules as alpn_challenge: thread-safe, quick, no
  // throw, and it MUST NOT block (the server runs handshakes on a reactor). Answering retry
  // makes SSL_do_handshake fail with SSL_ERROR_WANT_CLIENT_HELLO_CB; the server calls
  // SSL_do_handshake again later, which runs the callback again (the certificate may be in
  // the store by then). After unknown_name_wait since the first retry of a connection, retry
  // turns into an unrecognized_name alert, so a handshake never waits longer than that.
  std::function<UnknownName(std::string_view sni)> on_unknown_name;
  std::chrono::milliseconds unknown_name_wait{10'000};
  // on_served, when set, is called with the SNI of every handshake that got a certificate
  // from the store (not the challenge ones): on-demand uses it to keep its LRU order. Same
  // rules as on_unknown_name.
  std::function<void(std::string_view sni)> on_served;
};

// A server that attaches with on_unknown_name MUST handle SSL_ERROR_WANT_CLIENT_HELLO_CB from
// SSL_do_handshake by calling it again later (a short timer), until its handshake deadline.
//
// attach installs a client-hello callback and an ALPN select callback on ctx. On each
// handshake the callback reads SNI, decides whether the client supports ECDSA, looks the
// certificate up in store (lock-free) and sets it, with its chain, on the SSL. An unknown name
// with no default certificate fails the handshake with an unrecognized_name alert; a malformed
// extension with decode_error. ctx does not need a certificate of its own: attach sets
// one on it, the store's default ECDSA certificate (else its only certificate, when it holds
// exactly one and it is ECDSA) as published at that moment, which every SSL starts with, and a
// handshake that is to serve that very certificate skips setting it again (the per-handshake
// key match, security checks and chain copy). A certificate published later is served as
// any other (the SSL's certificates are cleared, then set); the context keeps its own.
//
// attach MUST be called before ctx serves handshakes (a live SSL_CTX is never mutated), and at
// most once per ctx (a second call fails). ctx owns the store reference and options from then
// on and releases them in SSL_CTX_free. It replaces any client-hello or ALPN callback already
// set on ctx.
[[nodiscard]] Status attach(SSL_CTX* ctx, std::shared_ptr<CertStore> store,
                            AttachOptions options = {});

// HookCounters counts the ClientHellos of ordinary handshakes (not tls-alpn-01) on a ctx that
// no name in the store answered. Each hello counts once, when the callback gives its final
// answer (an on-demand retry is counted when it ends), and only in one of the two.
struct HookCounters {
  // An SNI that no certificate covers (exact or wildcard): the default certificate was served,
  // or the handshake failed with unrecognized_name (no default, or on-demand refused).
  std::uint64_t sni_misses = 0;
  // No server_name extension (or an empty name): the default certificate or unrecognized_name.
  std::uint64_t no_sni = 0;
};

// hook_counters reads ctx's counters (relaxed loads); zeros when attach was never called on ctx.
HookCounters hook_counters(const SSL_CTX* ctx);

}  // namespace autotls::tlsreload
