#pragma once

// A small in-process test CA: a root, an intermediate, and leaves with chosen SANs, validity
// and key type, all made with OpenSSL so tests need no fixture files. Header-only so the unit
// and integration binaries can both include it without touching the shared support library.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include "acme/util/openssl.h"

namespace autotls::testing {

enum class TestKeyType { ec256, ec384, rsa2048 };

inline void check_ossl(bool ok, const char* what) {
  if (!ok) throw std::runtime_error(std::string("test CA: ") + what + ": " + ossl::drain_errors());
}

// generate_test_key makes a key. RSA keys come from a small pool because generating a 2048-bit
// key takes tens of milliseconds; tests do not need distinct RSA keys per certificate.
inline ossl::EvpPkeyPtr generate_test_key(TestKeyType type, bool fresh = false) {
  if (type == TestKeyType::rsa2048 && !fresh) {
    static std::mutex mu;
    static std::vector<ossl::EvpPkeyPtr> pool;
    static std::size_t next = 0;
    std::lock_guard lock(mu);
    if (pool.size() < 3) {
      pool.push_back(generate_test_key(type, true));
      EVP_PKEY_up_ref(pool.back().get());
      return ossl::EvpPkeyPtr(pool.back().get());
    }
    EVP_PKEY* k = pool[next++ % pool.size()].get();
    EVP_PKEY_up_ref(k);
    return ossl::EvpPkeyPtr(k);
  }
  EVP_PKEY* k = nullptr;
  switch (type) {
    case TestKeyType::ec256: k = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"); break;
    case TestKeyType::ec384: k = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-384"); break;
    case TestKeyType::rsa2048: k = EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", size_t{2048}); break;
  }
  check_ossl(k != nullptr, "keygen");
  return ossl::EvpPkeyPtr(k);
}

inline std::string bio_string(BIO* bio) {
  char* data = nullptr;
  long n = BIO_get_mem_data(bio, &data);
  return std::string(data, static_cast<std::size_t>(n));
}

inline std::string cert_to_pem(X509* x) {
  ossl::BioPtr bio(BIO_new(BIO_s_mem()));
  check_ossl(PEM_write_bio_X509(bio.get(), x) == 1, "PEM_write_bio_X509");
  return bio_string(bio.get());
}

// key_to_pem_pkcs8 writes "PRIVATE KEY" (PKCS#8).
inline std::string key_to_pem_pkcs8(EVP_PKEY* k) {
  ossl::BioPtr bio(BIO_new(BIO_s_mem()));
  check_ossl(PEM_write_bio_PrivateKey(bio.get(), k, nullptr, nullptr, 0, nullptr, nullptr) == 1,
             "PEM_write_bio_PrivateKey");
  return bio_string(bio.get());
}

// key_to_pem_traditional writes "EC PRIVATE KEY" (SEC1) or "RSA PRIVATE KEY" (PKCS#1).
inline std::string key_to_pem_traditional(EVP_PKEY* k) {
  ossl::BioPtr bio(BIO_new(BIO_s_mem()));
  check_ossl(PEM_write_bio_PrivateKey_traditional(bio.get(), k, nullptr, nullptr, 0, nullptr,
                                                  nullptr) == 1,
             "PEM_write_bio_PrivateKey_traditional");
  return bio_string(bio.get());
}

// key_to_pem_encrypted_pkcs8 writes "ENCRYPTED PRIVATE KEY".
inline std::string key_to_pem_encrypted_pkcs8(EVP_PKEY* k) {
  ossl::BioPtr bio(BIO_new(BIO_s_mem()));
  char pass[] = "password";
  check_ossl(PEM_write_bio_PKCS8PrivateKey(bio.get(), k, EVP_aes_256_cbc(), pass, 8, nullptr,
                                           nullptr) == 1,
             "PEM_write_bio_PKCS8PrivateKey");
  return bio_string(bio.get());
}

// key_to_pem_encrypted_traditional writes the legacy "Proc-Type: 4,ENCRYPTED" form.
inline std::string key_to_pem_encrypted_traditional(EVP_PKEY* k) {
  ossl::BioPtr bio(BIO_new(BIO_s_mem()));
  unsigned char pass[] = "password";
  check_ossl(PEM_write_bio_PrivateKey_traditional(bio.get(), k, EVP_aes_256_cbc(), pass, 8,
                                                  nullptr, nullptr) == 1,
             "PEM_write_bio_PrivateKey_traditional (encrypted)");
  return bio_string(bio.get());
}

// Issued is a certificate with its key, in both OpenSSL and PEM form.
struct Issued {
  ossl::X509Ptr cert;
  ossl::EvpPkeyPtr key;
  std::string cert_pem;
  std::string key_pem;  // PKCS#8
};

struct LeafSpec {
  std::vector<std::string> dns;
  std::vector<std::string> ips;
  TestKeyType key = TestKeyType::ec256;
  std::chrono::system_clock::time_point not_before;
  std::chrono::system_clock::time_point not_after;
};

class TestCa {
 public:
  using time_point = std::chrono::system_clock::time_point;

  // TestCa makes a root "<name> Root" and an intermediate "<name> Intermediate", valid from
  // ten days before now for ten years.
  explicit TestCa(std::string name = "Test", time_point now = std::chrono::system_clock::now())
      : now_(now) {
    using namespace std::chrono;
    root_ = make(name + " Root", nullptr, generate_test_key(TestKeyType::ec256), true, {}, {},
                 now - hours(240), now + hours(24 * 3650));
    intermediate_ = make(name + " Intermediate", &root_, generate_test_key(TestKeyType::ec256),
                         true, {}, {}, now - hours(240), now + hours(24 * 3650));
  }

  const Issued& root() const { return root_; }
  const Issued& intermediate() const { return intermediate_; }
  time_point now() const { return now_; }

  // spec returns a LeafSpec for names valid from an hour ago for 90 days.
  LeafSpec spec(std::vector<std::string> dns, TestKeyType key = TestKeyType::ec256) const {
    using namespace std::chrono;
    LeafSpec s;
    s.dns = std::move(dns);
    s.key = key;
    s.not_before = now_ - hours(1);
    s.not_after = now_ + hours(24 * 90);
    return s;
  }

  // issue signs a leaf with the intermediate.
  Issued issue(const LeafSpec& s) const {
    return make(s.dns.empty() ? std::string("no-san") : s.dns.front(), &intermediate_,
                generate_test_key(s.key), false, s.dns, s.ips, s.not_before, s.not_after);
  }
  Issued issue(std::vector<std::string> dns, TestKeyType key = TestKeyType::ec256) const {
    return issue(spec(std::move(dns), key));
  }

  // chain_pem is what certbot writes to fullchain.pem: leaf then intermediate.
  std::string chain_pem(const Issued& leaf) const { return leaf.cert_pem + intermediate_.cert_pem; }

 private:
  static Issued make(const std::string& cn, const Issued* issuer, ossl::EvpPkeyPtr key, bool ca,
                     const std::vector<std::string>& dns, const std::vector<std::string>& ips,
                     time_point not_before, time_point not_after) {
    static std::atomic<std::uint64_t> serial{0x1000};
    ossl::X509Ptr x(X509_new());
    check_ossl(x != nullptr, "X509_new");
    X509_set_version(x.get(), 2);
    ASN1_INTEGER_set_uint64(X509_get_serialNumber(x.get()), serial.fetch_add(1));
    X509_NAME* subject = X509_get_subject_name(x.get());
    X509_NAME_add_entry_by_txt(subject, "CN", MBSTRING_UTF8,
                               reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
    X509_set_issuer_name(x.get(), issuer ? X509_get_subject_name(issuer->cert.get()) : subject);
    ASN1_TIME_set(X509_getm_notBefore(x.get()), std::chrono::system_clock::to_time_t(not_before));
    ASN1_TIME_set(X509_getm_notAfter(x.get()), std::chrono::system_clock::to_time_t(not_after));
    check_ossl(X509_set_pubkey(x.get(), key.get()) == 1, "X509_set_pubkey");

    X509V3_CTX ctx;
    X509V3_set_ctx(&ctx, issuer ? issuer->cert.get() : x.get(), x.get(), nullptr, nullptr, 0);
    auto add = [&](int nid, const std::string& value) {
      ossl::X509ExtPtr ext(X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str()));
      check_ossl(ext != nullptr, "X509V3_EXT_conf_nid");
      check_ossl(X509_add_ext(x.get(), ext.get(), -1) == 1, "X509_add_ext");
    };
    add(NID_basic_constraints, ca ? "critical,CA:TRUE" : "critical,CA:FALSE");
    add(NID_key_usage, ca ? "critical,keyCertSign,cRLSign" : "critical,digitalSignature,keyEncipherment");
    add(NID_subject_key_identifier, "hash");
    if (issuer) add(NID_authority_key_identifier, "keyid:always");
    if (!ca) add(NID_ext_key_usage, "serverAuth");
    std::string san;
    for (const auto& d : dns) san += (san.empty() ? "" : ",") + std::string("DNS:") + d;
    for (const auto& i : ips) san += (san.empty() ? "" : ",") + std::string("IP:") + i;
    if (!san.empty()) add(NID_subject_alt_name, san);

    EVP_PKEY* signer = issuer ? issuer->key.get() : key.get();
    check_ossl(X509_sign(x.get(), signer, EVP_sha256()) > 0, "X509_sign");
    Issued out;
    out.cert_pem = cert_to_pem(x.get());
    out.key_pem = key_to_pem_pkcs8(key.get());
    out.cert = std::move(x);
    out.key = std::move(key);
    return out;
  }

  time_point now_;
  Issued root_;
  Issued intermediate_;
};

}  // namespace autotls::testing
