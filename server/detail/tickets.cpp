#include "server/detail/tickets.h"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/rand.h>

#include <algorithm>
#include <cstring>

#include "acme/util/openssl.h"

namespace autotls::server::detail {
namespace {

int ring_index() {
  static const int index = SSL_CTX_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
  return index;
}

}  // namespace

TicketKeyRing::TicketKeyRing(std::chrono::seconds rotate_every, std::chrono::seconds lifetime,
                             std::function<Clock::time_point()> now)
    : rotate_every_(std::max(rotate_every, std::chrono::seconds(1))),
      lifetime_(std::max(lifetime, std::chrono::seconds(1))),
      now_(now ? std::move(now) : [] { return Clock::now(); }) {
  // A ticket is at most `lifetime` old, so keys retired longer ago than that open nothing:
  // the current key plus ceil(lifetime / rotate_every) retired ones cover every live ticket.
  max_keys_ = max_keys(rotate_every_, lifetime_);
  std::lock_guard lock(mu_);
  add_key(now_());
}

std::size_t TicketKeyRing::max_keys(std::chrono::seconds rotate_every,
                                    std::chrono::seconds lifetime) {
  return 1 + static_cast<std::size_t>((lifetime.count() + rotate_every.count() - 1) /
                                      rotate_every.count());
}

void TicketKeyRing::set_rotate_every(std::chrono::seconds rotate_every) {
  std::lock_guard lock(mu_);
  rotate_every_ = std::max(rotate_every, std::chrono::seconds(1));
  // Never fewer slots than keys held: a shorter interval keeps the retired keys already
  // there (they still open tickets until lifetime); the ring trims itself as they expire.
  max_keys_ = std::max(max_keys(rotate_every_, lifetime_), keys_.size());
}

std::chrono::seconds TicketKeyRing::rotate_every() const {
  std::lock_guard lock(mu_);
  return rotate_every_;
}

TicketKeyRing::~TicketKeyRing() {
  for (auto& k : keys_) wipe(k);
  for (auto& in : installed_) EVP_CIPHER_free(in->aes);
}

void TicketKeyRing::wipe(Key& k) {
  OPENSSL_cleanse(k.aes.data(), k.aes.size());
  OPENSSL_cleanse(k.hmac.data(), k.hmac.size());
}

void TicketKeyRing::add_key(Clock::time_point now) {
  Key k;
  // RAND_priv_bytes: the private DRBG, kept apart from the one that makes public nonces.
  if (RAND_bytes(k.name.data(), static_cast<int>(k.name.size())) != 1 ||
      RAND_priv_bytes(k.aes.data(), static_cast<int>(k.aes.size())) != 1 ||
      RAND_priv_bytes(k.hmac.data(), static_cast<int>(k.hmac.size())) != 1) {
    // No randomness: keep the old key rather than sealing with a predictable one.
    ERR_clear_error();
    return;
  }
  k.created = now;
  k.retired = Clock::time_point::max();
  if (!keys_.empty()) keys_.front().retired = now;
  keys_.push_front(k);
  ++rotations_;
  while (keys_.size() > max_keys_) {
    wipe(keys_.back());
    keys_.pop_back();
  }
}

void TicketKeyRing::maintain(Clock::time_point now) {
  if (!keys_.empty() && now - keys_.front().created >= rotate_every_) add_key(now);
  while (keys_.size() > 1 && now - keys_.back().retired >= lifetime_) {
    wipe(keys_.back());
    keys_.pop_back();
  }
}

void TicketKeyRing::rotate_now() {
  std::lock_guard lock(mu_);
  add_key(now_());
}

std::size_t TicketKeyRing::size() const {
  std::lock_guard lock(mu_);
  return keys_.size();
}

std::uint64_t TicketKeyRing::rotations() const {
  std::lock_guard lock(mu_);
  return rotations_;
}

Status TicketKeyRing::install(SSL_CTX* ctx, OSSL_LIB_CTX* lib) {
  auto in = std::make_unique<Installed>();
  in->ring = this;
  in->lib = lib;
  in->aes = EVP_CIPHER_fetch(lib, "AES-256-CBC", nullptr);
  if (!in->aes) return fail(ossl::error("https: session tickets: AES-256-CBC"));
  Installed* raw = in.get();
  {
    std::lock_guard lock(mu_);
    installed_.push_back(std::move(in));
  }
  if (SSL_CTX_set_ex_data(ctx, ring_index(), raw) != 1 ||
      SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, &TicketKeyRing::callback) != 1) {
    return fail(ossl::error("https: session ticket key callback"));
  }
  // The lifetime hint sent to clients and the age past which OpenSSL itself refuses a ticket.
  SSL_CTX_set_timeout(ctx, static_cast<long>(lifetime_.count()));
  return {};
}

int TicketKeyRing::callback(SSL* ssl, unsigned char key_name[16], unsigned char iv[16],
                            EVP_CIPHER_CTX* cipher, EVP_MAC_CTX* mac, int enc) {
  auto* in = static_cast<const Installed*>(SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), ring_index()));
  if (!in) return enc ? -1 : 0;
  // The version is settled before the client hello's pre_shared_key extension is read.
  return in->ring->seal_or_open(*in, key_name, iv, cipher, mac, enc,
                                SSL_version(ssl) >= TLS1_3_VERSION);
}

int TicketKeyRing::seal_or_open(const Installed& in, unsigned char key_name[16],
                                unsigned char iv[16], EVP_CIPHER_CTX* cipher, EVP_MAC_CTX* mac,
                                int enc, bool tls13) {
  std::lock_guard lock(mu_);
  maintain(now_());
  const Key* key = nullptr;
  bool current = false;
  if (enc) {
    if (keys_.empty()) return -1;
    key = &keys_.front();
    current = true;
    std::memcpy(key_name, key->name.data(), key->name.size());
    if (RAND_bytes_ex(in.lib, iv, EVP_MAX_IV_LENGTH < 16 ? EVP_MAX_IV_LENGTH : 16, 0) != 1) {
      return -1;
    }
  } else {
    for (std::size_t i = 0; i < keys_.size(); ++i) {
      if (std::memcmp(keys_[i].name.data(), key_name, 16) == 0) {
        key = &keys_[i];
        current = i == 0;
        break;
      }
    }
    if (!key) return 0;  // unknown or retired key: full handshake, new ticket
  }
  OSSL_PARAM params[3];
  params[0] = OSSL_PARAM_construct_octet_string(
      OSSL_MAC_PARAM_KEY, const_cast<unsigned char*>(key->hmac.data()), key->hmac.size());
  params[1] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST,
                                               const_cast<char*>("SHA256"), 0);
  params[2] = OSSL_PARAM_construct_end();
  if (EVP_MAC_CTX_set_params(mac, params) != 1) return -1;
  int ok = enc ? EVP_EncryptInit_ex2(cipher, in.aes, key->aes.data(), iv, nullptr)
               : EVP_DecryptInit_ex2(cipher, in.aes, key->aes.data(), iv, nullptr);
  if (ok != 1) return -1;
  // 2: the ticket is good and the client gets a fresh one. Always in TLS 1.3: clients use each
  // ticket once (RFC 8446 §C.4 asks them to; OpenSSL's client, so wrk and curl, does), and
  // OpenSSL sends a TLS 1.3 resumption no new ticket when this answers 1, so such a client
  // would resume only every other connection and pay a full handshake in between. In TLS 1.2
  // a ticket is reused until it expires, so only one sealed with an older key is replaced.
  if (enc) return 1;
  return tls13 || !current ? 2 : 1;
}

}  // namespace autotls::server::detail
