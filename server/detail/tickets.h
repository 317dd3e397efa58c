#pragma once

// TicketKeyRing: the keys that encrypt TLS session tickets (RFC 5077 / RFC 8446 §4.6.1), kept
// in memory only and rotated on a schedule. New tickets are sealed with the newest key; older
// keys stay for decryption until every ticket they sealed has outlived `lifetime`, then they are
// wiped. A ticket sealed with a key that has left the ring gets a full handshake. Every TLS 1.3
// resumption gets a fresh ticket (clients use each once); a TLS 1.2 one only when its ticket was
// sealed with an older key.

#include <openssl/ssl.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "acme/util/error.h"

namespace autotls::server::detail {

class TicketKeyRing {
 public:
  using Clock = std::chrono::steady_clock;

  // rotate_every > 0 and lifetime > 0; now may be empty (steady_clock::now).
  TicketKeyRing(std::chrono::seconds rotate_every, std::chrono::seconds lifetime,
                std::function<Clock::time_point()> now = {});
  ~TicketKeyRing();
  TicketKeyRing(const TicketKeyRing&) = delete;
  TicketKeyRing& operator=(const TicketKeyRing&) = delete;

  // install makes ctx seal and open tickets with this ring (SSL_CTX_set_tlsext_ticket_key_evp_cb)
  // and sets the ticket lifetime hint and session timeout. lib is the OpenSSL library context
  // ctx was made in (nullptr: the default one): the ring fetches its cipher there once, and
  // takes the IVs from its random generator, so that a ticket sealed or opened fetches nothing
  // and touches no other context's locks. The ring MUST outlive ctx's handshakes: the caller
  // keeps both in the same owner. Several contexts may share one ring (each its own install).
  Status install(SSL_CTX* ctx, OSSL_LIB_CTX* lib = nullptr);

  // rotate_now starts a new current key at once (as if the schedule had come due).
  void rotate_now();
  // set_rotate_every changes the rotation interval (SIGHUP): the current key is replaced once
  // it is older than the new interval; the lifetime (and so which tickets open) is unchanged.
  void set_rotate_every(std::chrono::seconds rotate_every);
  std::chrono::seconds rotate_every() const;
  // size is the number of keys held (current + previous).
  std::size_t size() const;
  // rotations counts keys made since construction (the first key included).
  std::uint64_t rotations() const;

 private:
  struct Key {
    std::array<unsigned char, 16> name{};
    std::array<unsigned char, 32> aes{};
    std::array<unsigned char, 32> hmac{};
    Clock::time_point created;
    Clock::time_point retired;  // when a newer key replaced it (max() while current)
  };

  // What an SSL_CTX's ex data points at: the ring, and what install fetched for that context.
  struct Installed {
    TicketKeyRing* ring = nullptr;
    OSSL_LIB_CTX* lib = nullptr;
    EVP_CIPHER* aes = nullptr;  // AES-256-CBC, fetched in lib
  };

  static int callback(SSL* ssl, unsigned char key_name[16], unsigned char iv[16],
                      EVP_CIPHER_CTX* cipher, EVP_MAC_CTX* mac, int enc);
  int seal_or_open(const Installed& in, unsigned char key_name[16], unsigned char iv[16],
                   EVP_CIPHER_CTX* cipher, EVP_MAC_CTX* mac, int enc, bool tls13);
  // maintain rotates when due and drops expired keys; mu_ held.
  void maintain(Clock::time_point now);
  void add_key(Clock::time_point now);  // mu_ held
  static void wipe(Key& k);
  static std::size_t max_keys(std::chrono::seconds rotate_every, std::chrono::seconds lifetime);

  std::chrono::seconds rotate_every_;
  std::chrono::seconds lifetime_;
  std::size_t max_keys_;
  std::function<Clock::time_point()> now_;
  mutable std::mutex mu_;
  std::deque<Key> keys_;  // front: current
  std::uint64_t rotations_ = 0;
  std::vector<std::unique_ptr<Installed>> installed_;  // one per install; mu_ held to add
};

}  // namespace autotls::server::detail
