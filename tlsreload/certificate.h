#pragma once

// Certificate: one validated leaf + chain + private key, immutable once built.
//
// This header forward-declares the few OpenSSL types it mentions (<openssl/types.h> holds only
// typedefs), so including it does not pull the OpenSSL API into callers.

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <openssl/types.h>

#include "acme/util/clock.h"
#include "acme/util/error.h"

struct stack_st_X509;  // STACK_OF(X509)

namespace autotls::tlsreload {

namespace detail {
class Intermediate;  // an interned, shared intermediate certificate (detail/intern.h)
}

// KeyKind is the family of the leaf key; it decides which slot of a name the certificate fills
// (a name may hold one ECDSA and one RSA certificate at once).
enum class KeyKind { ecdsa, rsa };

// LoadOptions controls Certificate::from_pem.
struct LoadOptions {
  // clock supplies "now" for the validity check. nullptr means system_clock(). The clock MUST
  // outlive the from_pem call only (it is not retained).
  const Clock* clock = nullptr;
  // allow_not_yet_valid accepts a leaf whose notBefore is in the future (pre-staging a renewal).
  // An expired leaf is always refused.
  bool allow_not_yet_valid = false;
};

// OpenSslView is the pre-built OpenSSL form of a Certificate, borrowed: the pointers are owned
// by the Certificate and live exactly as long as it. SSL_use_cert_and_key() takes its own
// references, so a handshake may keep using them after it let go of the Certificate.
struct OpenSslView {
  X509* leaf = nullptr;
  EVP_PKEY* key = nullptr;
  stack_st_X509* chain = nullptr;  // intermediates in order, never null (may be empty)
};

// Certificate is immutable after from_pem() returns it, so any number of threads may read it
// without synchronization. It is always handled through std::shared_ptr<const Certificate>.
//
// Intermediates are interned process-wide by the SHA-256 of their DER: a thousand leaves from
// one CA share one parsed X509 of its intermediate (detail/intern.h).
//
// TODO(store): the 4 KiB-per-certificate memory target at 100,000 certificates needs the
// OpenSSL objects to be built lazily from compact DER into a bounded cache of hot entries. All
// OpenSSL access already goes through openssl(), so that change stays inside this class.
class Certificate {
 public:
  using Sha256 = std::array<std::uint8_t, 32>;

  // from_pem parses and validates a certificate chain (leaf first, then intermediates, as in
  // certbot's fullchain.pem) and its private key (PKCS#8 "PRIVATE KEY", SEC1 "EC PRIVATE KEY" or
  // PKCS#1 "RSA PRIVATE KEY"). It never prompts for a password: an encrypted key is refused.
  //
  // Validation, every step of which must pass before the certificate can be published:
  //   - the key matches the leaf;
  //   - each certificate of the chain is issued by the next one (issuer name == next subject,
  //     signature verifies with the next public key);
  //   - now (from options.clock) is inside the leaf's validity window;
  //   - the leaf has at least one dNSName or iPAddress subjectAltName, each of them usable as a
  //     lookup key (wildcards only as a whole left-most label);
  //   - the key is ECDSA (P-256, P-384, P-521) or RSA.
  // Errors are Errc::invalid_input (bad input) or Errc::crypto, with a message that says what
  // was wrong ("certificate chain: certificate #2 did not issue certificate #1: ...").
  [[nodiscard]] static Result<std::shared_ptr<const Certificate>> from_pem(
      std::string_view chain_pem, std::string_view key_pem, const LoadOptions& options = {});

  ~Certificate();
  Certificate(const Certificate&) = delete;
  Certificate& operator=(const Certificate&) = delete;

  // names returns the subjectAltNames: dNSNames lower-cased ("*.example.com" kept as is), then
  // iPAddresses in text form ("192.0.2.1", "2001:db8::1"). Duplicates removed, never empty.
  const std::vector<std::string>& names() const { return names_; }
  std::chrono::system_clock::time_point not_before() const { return not_before_; }
  std::chrono::system_clock::time_point not_after() const { return not_after_; }
  // serial_hex is the leaf serial number, lower-case hex without separators.
  const std::string& serial_hex() const { return serial_hex_; }
  // issuer_cn is the issuer's commonName ("" when it has none); issuer_dn its RFC 2253 form.
  const std::string& issuer_cn() const { return issuer_cn_; }
  const std::string& issuer_dn() const { return issuer_dn_; }
  KeyKind key_kind() const { return key_kind_; }
  // key_type names the key as the configuration does: "ec256", "ec384", "ec521", "rsa2048"...
  const std::string& key_type() const { return key_type_; }
  // fingerprint is the SHA-256 of the leaf DER; id() is its lower-case hex, the certificate's
  // identity in CertStore::remove().
  const Sha256& fingerprint() const { return fingerprint_; }
  const std::string& id() const { return id_; }
  // chain_length counts the intermediates (the leaf excluded).
  std::size_t chain_length() const { return chain_.size(); }

  // openssl returns the pre-built OpenSSL objects, so the handshake path parses nothing.
  OpenSslView openssl() const { return {leaf_, key_, chain_stack_}; }

 private:
  Certificate() = default;
  friend struct CertificateBuilder;

  std::vector<std::string> names_;
  std::chrono::system_clock::time_point not_before_{};
  std::chrono::system_clock::time_point not_after_{};
  std::string serial_hex_;
  std::string issuer_cn_;
  std::string issuer_dn_;
  std::string key_type_;
  std::string id_;
  Sha256 fingerprint_{};
  KeyKind key_kind_ = KeyKind::ecdsa;

  // Owned (freed in the destructor). chain_stack_ borrows the X509s that chain_ keeps alive.
  X509* leaf_ = nullptr;
  EVP_PKEY* key_ = nullptr;
  stack_st_X509* chain_stack_ = nullptr;
  std::vector<std::shared_ptr<const detail::Intermediate>> chain_;
};

// is_valid_lookup_name reports whether name (already lower-case) can be a CertStore key: a DNS
// name of LDH/underscore labels, optionally with "*." as the whole first label, or an IP
// address in the text form Certificate::names() produces.
bool is_valid_lookup_name(std::string_view name);

}  // namespace autotls::tlsreload
