#include "tlsreload/openssl_hook.h"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>

#include <openssl/ssl.h>
#include <openssl/tls1.h>

#include "acme/util/openssl.h"
#include "tlsreload/detail/client_hello.h"

namespace autotls::tlsreload {
namespace {

struct HookState {
  std::shared_ptr<CertStore> store;
  AttachOptions options;
  // The certificate set on the SSL_CTX itself at attach (see pick_inherited), which every SSL
  // starts with (SSL_new copies the context's certificates), and its objects. Held here so the
  // Certificate's address stays unique while the context lives: a lookup that returns this very
  // pointer, on an SSL that still carries these very objects, needs no SSL_use_cert_and_key.
  std::shared_ptr<const Certificate> inherited;
  OpenSslView inherited_view;
  // Written only on the miss path, and on their own cache line: a hit reads store and options
  // and never writes anything shared (the handshake benchmarks measure that path).
  struct alignas(64) Misses {
    std::atomic<std::uint64_t> sni{0};
    std::atomic<std::uint64_t> no_sni{0};
  };
  mutable Misses misses;

  // count_miss records that no name answered sni (empty: no SNI at all).
  void count_miss(std::string_view sni) const {
    (sni.empty() ? misses.no_sni : misses.sni).fetch_add(1, std::memory_order_relaxed);
  }
};

void free_state(void* /*parent*/, void* ptr, CRYPTO_EX_DATA* /*ad*/, int /*idx*/, long /*argl*/,
                void* /*argp*/) {
  delete static_cast<HookState*>(ptr);
}

int state_index() {
  static const int index = SSL_CTX_get_ex_new_index(0, nullptr, nullptr, nullptr, free_state);
  return index;
}

detail::Bytes ext_bytes(const unsigned char* p, std::size_t n) { return {p, n}; }

bool offers_ecdsa_cipher_suite(SSL* ssl) {
  const unsigned char* p = nullptr;
  std::size_t len = SSL_client_hello_get0_ciphers(ssl, &p);
  for (std::size_t i = 0; i + 1 < len; i += 2) {
    const SSL_CIPHER* c = SSL_CIPHER_find(ssl, p + i);
    if (c && SSL_CIPHER_get_auth_nid(c) == NID_auth_ecdsa) return true;
  }
  return false;
}

// client_supports_ecdsa decides which key family to serve.
bool client_supports_ecdsa(SSL* ssl) {
  const unsigned char* p = nullptr;
  std::size_t n = 0;
  bool ecdsa_sigalg = true;
  if (SSL_client_hello_get0_ext(ssl, TLSEXT_TYPE_signature_algorithms, &p, &n) == 1) {
    // A malformed list is treated as "RSA only": the conservative answer.
    if (!detail::sigalgs_offer_ecdsa(ext_bytes(p, n), ecdsa_sigalg)) return false;
  }
  // Without the extension RFC 5246 §7.4.1.4.1 has the server "behave as if client had sent the
  // value {sha1,ecdsa}" (TLS 1.3 clients always send it), so ecdsa_sigalg stays true.
  if (!ecdsa_sigalg) return false;
  // TLS 1.3 suites do not name the certificate type; in TLS 1.2 the client must also offer an
  // ECDHE_ECDSA suite, or an ECDSA certificate leaves no cipher suite to agree on.
  bool tls13 = false;
  if (SSL_client_hello_get0_ext(ssl, TLSEXT_TYPE_supported_versions, &p, &n) == 1 &&
      detail::versions_offer_tls13(ext_bytes(p, n), tls13) && tls13) {
    return true;
  }
  return offers_ecdsa_cipher_suite(ssl);
}

// use_view sets a certificate's objects on ssl. The view keeps them alive during the call;
// override=1 replaces whatever the SSL_CTX configured, and OpenSSL takes its own references to
// the leaf, key and each chain certificate, so nothing needs to outlive this call. When the
// context carries a certificate of its own (HookState::inherited), every slot is cleared first:
// OpenSSL keeps one certificate per key type, and the context's ECDSA one left next to an RSA
// (or challenge) certificate set here could still be chosen for a client that accepts ECDSA.
bool use_view(SSL* ssl, const HookState& state, const OpenSslView& v) {
  if (state.inherited) SSL_certs_clear(ssl);
  if (SSL_use_cert_and_key(ssl, v.leaf, v.key, v.chain, 1) != 1) {
    ossl::drain_errors();
    return false;
  }
  return true;
}

// sni_covered reports whether cert names sni itself (exactly, or by a wildcard over its first
// label), as opposed to being the default certificate served for any name.
bool sni_covered(const Certificate& cert, std::string_view sni) {
  auto eq = [](std::string_view a, std::string_view b) {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i) {
      char x = a[i], y = b[i];
      if (x >= 'A' && x <= 'Z') x = static_cast<char>(x - 'A' + 'a');
      if (y >= 'A' && y <= 'Z') y = static_cast<char>(y - 'A' + 'a');
      if (x != y) return false;
    }
    return true;
  };
  if (sni.ends_with('.')) sni.remove_suffix(1);
  for (const std::string& n : cert.names()) {
    if (eq(n, sni)) return true;
    if (n.starts_with("*.")) {
      auto dot = sni.find('.');
      if (dot != std::string_view::npos && dot > 0 && eq(std::string_view(n).substr(1), sni.substr(dot))) {
        return true;
      }
    }
  }
  return false;
}

// The time of a connection's first on-demand retry, kept in the SSL's ex_data as
// milliseconds of the steady clock plus one (0: none yet), so nothing needs freeing.
int retry_index() {
  static const int index = SSL_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
  return index;
}

// retry_expired records the first retry of ssl and reports whether wait has passed since.
bool retry_expired(SSL* ssl, std::chrono::milliseconds wait) {
  using namespace std::chrono;
  auto now = duration_cast<milliseconds>(steady_clock::now().time_since_epoch()).count();
  int index = retry_index();
  if (index < 0) return true;
  auto first = reinterpret_cast<std::uintptr_t>(SSL_get_ex_data(ssl, index));
  if (first == 0) {
    SSL_set_ex_data(ssl, index, reinterpret_cast<void*>(static_cast<std::uintptr_t>(now) + 1));
    return false;
  }
  return now - static_cast<long long>(first - 1) >= wait.count();
}

int on_client_hello(SSL* ssl, int* alert, void* arg) noexcept {
  // No exception may unwind into OpenSSL's C frames.
  try {
    const auto* state = static_cast<const HookState*>(arg);
    const unsigned char* p = nullptr;
    std::size_t n = 0;
    std::string_view sni;
    if (SSL_client_hello_get0_ext(ssl, TLSEXT_TYPE_server_name, &p, &n) == 1 &&
        !detail::parse_server_name(ext_bytes(p, n), sni)) {
      *alert = SSL_AD_DECODE_ERROR;
      return SSL_CLIENT_HELLO_ERROR;
    }

    if (state->options.alpn_challenge &&
        SSL_client_hello_get0_ext(ssl, TLSEXT_TYPE_application_layer_protocol_negotiation, &p,
                                  &n) == 1) {
      bool offered = false;
      if (!detail::alpn_offers(ext_bytes(p, n), true, kAcmeTlsAlpn, offered)) {
        *alert = SSL_AD_DECODE_ERROR;
        return SSL_CLIENT_HELLO_ERROR;
      }
      if (offered) {
        // RFC 8737 §3: answer acme-tls/1 with the challenge certificate for this SNI.
        std::shared_ptr<const Certificate> challenge = state->options.alpn_challenge(sni);
        if (!challenge) {
          *alert = SSL_AD_UNRECOGNIZED_NAME;
          return SSL_CLIENT_HELLO_ERROR;
        }
        OpenSslView v = challenge->openssl();
        if (!v || !use_view(ssl, *state, v)) {
          *alert = SSL_AD_INTERNAL_ERROR;
          return SSL_CLIENT_HELLO_ERROR;
        }
        return SSL_CLIENT_HELLO_SUCCESS;
      }
    }

    // The borrowed pointer stays valid until this thread's next lookup; use_view takes OpenSSL
    // references before we return, so the handshake never depends on the store again.
    bool ecdsa = client_supports_ecdsa(ssl);
    if (state->options.on_unknown_name && !sni.empty()) {
      const Certificate* found = state->store->lookup_for_handshake(sni, ecdsa);
      if (!found || !sni_covered(*found, sni)) {
        switch (state->options.on_unknown_name(sni)) {
          case UnknownName::serve_default:
            break;
          case UnknownName::retry:
            if (!retry_expired(ssl, state->options.unknown_name_wait)) return SSL_CLIENT_HELLO_RETRY;
            state->count_miss(sni);
            *alert = SSL_AD_UNRECOGNIZED_NAME;
            return SSL_CLIENT_HELLO_ERROR;
          case UnknownName::fail:
            state->count_miss(sni);
            *alert = SSL_AD_UNRECOGNIZED_NAME;
            return SSL_CLIENT_HELLO_ERROR;
        }
      }
    }
    // An empty view means the certificate just failed its deferred verification (it is now
    // marked failed, so the next lookup skips it as absent: wildcard, default or nothing) or
    // could not be rebuilt. Each retry removes one certificate from the candidates (at most
    // exact, wildcard and default in both families), so the loop is bounded.
    // missed is set by the lookup only when no name answered (the default or nothing), so a hit
    // writes nothing but this local; once set it stays set, as later attempts only fall further.
    bool missed = false;
    for (int attempt = 0; attempt < 7; ++attempt) {
      const Certificate* cert = state->store->lookup_for_handshake(sni, ecdsa, &missed);
      if (!cert) {
        state->count_miss(sni);
        *alert = SSL_AD_UNRECOGNIZED_NAME;
        return SSL_CLIENT_HELLO_ERROR;
      }
      // The SSL_CTX's own certificate, still on this SSL as SSL_new copied it (an earlier call
      // of this callback for the same SSL, on an on-demand retry, may have replaced it): the
      // SSL already holds exactly what use_view would set (leaf, key, chain), so skip its
      // checks (key match, security level, chain copy; ~24 k instructions, docs/benchmarks.md
      // session 13). A certificate swapped in since attach is another pointer: normal path.
      if (cert == state->inherited.get() && SSL_get_certificate(ssl) == state->inherited_view.leaf &&
          SSL_get_privatekey(ssl) == state->inherited_view.key) {
        if (missed) [[unlikely]] state->count_miss(sni);
        if (state->options.on_served && !sni.empty()) state->options.on_served(sni);
        return SSL_CLIENT_HELLO_SUCCESS;
      }
      OpenSslView v = cert->openssl();
      if (!v) {
        if (cert->verification() == Verification::failed) continue;
        break;  // verified but not rebuildable (out of memory): no point in retrying
      }
      if (!use_view(ssl, *state, v)) break;
      if (missed) [[unlikely]] state->count_miss(sni);
      if (state->options.on_served && !sni.empty()) state->options.on_served(sni);
      return SSL_CLIENT_HELLO_SUCCESS;
    }
    *alert = SSL_AD_INTERNAL_ERROR;
    return SSL_CLIENT_HELLO_ERROR;
  } catch (...) {
    *alert = SSL_AD_INTERNAL_ERROR;
    return SSL_CLIENT_HELLO_ERROR;
  }
}

// on_alpn_select runs after the client-hello callback (OpenSSL processes ALPN when it builds
// the ServerHello), so acme-tls/1 offered here means the challenge certificate was served.
int on_alpn_select(SSL* /*ssl*/, const unsigned char** out, unsigned char* outlen,
                   const unsigned char* in, unsigned int inlen, void* arg) noexcept {
  try {
    const auto* state = static_cast<const HookState*>(arg);
    detail::Bytes list(in, inlen);
    auto choose = [&](std::string_view proto) {
      bool offered = false;
      if (!detail::alpn_offers(list, false, proto, offered) || !offered) return false;
      // Point into the client's list, which outlives the callback (SSL_select_next_proto does
      // the same).
      for (unsigned i = 0; i < inlen;) {
        unsigned len = in[i];
        if (std::string_view(reinterpret_cast<const char*>(in + i + 1), len) == proto) {
          *out = in + i + 1;
          *outlen = static_cast<unsigned char>(len);
          return true;
        }
        i += 1 + len;
      }
      return false;
    };
    if (state->options.alpn_challenge && choose(kAcmeTlsAlpn)) return SSL_TLSEXT_ERR_OK;
    for (const std::string& proto : state->options.alpn_protocols) {
      if (proto != kAcmeTlsAlpn && choose(proto)) return SSL_TLSEXT_ERR_OK;
    }
    return SSL_TLSEXT_ERR_NOACK;
  } catch (...) {
    return SSL_TLSEXT_ERR_ALERT_FATAL;
  }
}

// pick_inherited chooses the certificate attach sets on the SSL_CTX itself: the store's default
// ECDSA certificate, else its only certificate when it holds exactly one ECDSA certificate. A
// server with one certificate then does no per-handshake certificate work, as nginx with one
// certificate in its SSL_CTX does. nullptr when there is none (nothing published yet, or many).
std::shared_ptr<const Certificate> pick_inherited(const CertStore& store) {
  auto snap = store.snapshot();
  if (!snap) return nullptr;
  if (const auto& d = snap->default_pair().ecdsa) return d;
  if (snap->default_pair().rsa || snap->name_count() > 64) return nullptr;
  auto all = snap->certificates();
  if (all.size() != 1 || all.front()->key_kind() != KeyKind::ecdsa) return nullptr;
  return all.front();
}

}  // namespace

HookCounters hook_counters(const SSL_CTX* ctx) {
  HookCounters c;
  int index = state_index();
  if (!ctx || index < 0) return c;
  const auto* state = static_cast<const HookState*>(SSL_CTX_get_ex_data(ctx, index));
  if (!state) return c;
  c.sni_misses = state->misses.sni.load(std::memory_order_relaxed);
  c.no_sni = state->misses.no_sni.load(std::memory_order_relaxed);
  return c;
}

Status attach(SSL_CTX* ctx, std::shared_ptr<CertStore> store, AttachOptions options) {
  if (!ctx || !store) return fail(Errc::invalid_input, "attach: null SSL_CTX or store");
  int index = state_index();
  if (index < 0) return fail(ossl::error("attach: SSL_CTX_get_ex_new_index"));
  if (SSL_CTX_get_ex_data(ctx, index) != nullptr) {
    return fail(Errc::invalid_input, "attach: this SSL_CTX already has a store attached");
  }
  auto state = std::make_unique<HookState>();
  state->store = std::move(store);
  state->options = std::move(options);
  if (SSL_CTX_set_ex_data(ctx, index, state.get()) != 1) {
    return fail(ossl::error("attach: SSL_CTX_set_ex_data"));
  }
  HookState* raw = state.release();  // owned by ctx now: free_state runs in SSL_CTX_free
  // The context's own certificate (see pick_inherited); without one (or if it cannot be set),
  // every handshake sets its certificate in the callback, as before.
  if (auto cert = pick_inherited(*raw->store)) {
    OpenSslView v = cert->openssl();
    if (v && SSL_CTX_use_cert_and_key(ctx, v.leaf, v.key, v.chain, 1) == 1) {
      raw->inherited = std::move(cert);
      raw->inherited_view = std::move(v);
    } else {
      ossl::drain_errors();
    }
  }
  SSL_CTX_set_client_hello_cb(ctx, on_client_hello, raw);
  SSL_CTX_set_alpn_select_cb(ctx, on_alpn_select, raw);
  return {};
}

}  // namespace autotls::tlsreload
