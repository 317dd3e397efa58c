#include "tlsreload/internal_ca.h"

#include <ctime>

#include <openssl/bn.h>
#include <openssl/pem.h>
#include <openssl/rand.h>

#include "acme/types.h"
#include "acme/util/openssl.h"

namespace autotls::tlsreload {

namespace {

constexpr std::string_view kLog = "tlsreload.internal_ca";

std::string to_pem(X509* x) {
  ossl::BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_X509(bio.get(), x) != 1) return {};
  char* data = nullptr;
  long n = BIO_get_mem_data(bio.get(), &data);
  return n > 0 ? std::string(data, static_cast<size_t>(n)) : std::string();
}

Result<ossl::X509Ptr> from_pem(const std::string& pem) {
  ossl::BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (!bio) return fail(ossl::error("BIO_new_mem_buf"));
  X509* x = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr);
  if (!x) return fail(ossl::error("PEM_read_bio_X509"));
  return ossl::X509Ptr(x);
}

// random_serial sets a positive 127-bit serial (RFC 5280 §4.1.2.2: at most 20 octets).
Status random_serial(X509* x) {
  unsigned char bytes[16];
  if (RAND_bytes(bytes, sizeof bytes) != 1) return fail(ossl::error("RAND_bytes"));
  bytes[0] &= 0x7f;
  ossl::BignumPtr bn(BN_bin2bn(bytes, sizeof bytes, nullptr));
  if (!bn || !BN_to_ASN1_INTEGER(bn.get(), X509_get_serialNumber(x))) return fail(ossl::error("serial"));
  return {};
}

Status add_ext(X509* cert, X509* issuer, int nid, const std::string& value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  ossl::X509ExtPtr ext(X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str()));
  if (!ext || X509_add_ext(cert, ext.get(), -1) != 1) {
    return fail(ossl::error(std::string("certificate extension ") + OBJ_nid2sn(nid) + "=" + value));
  }
  return {};
}

Status set_validity(X509* x, std::chrono::system_clock::time_point from, std::chrono::system_clock::time_point to) {
  if (!ASN1_TIME_set(X509_getm_notBefore(x), std::chrono::system_clock::to_time_t(from)) ||
      !ASN1_TIME_set(X509_getm_notAfter(x), std::chrono::system_clock::to_time_t(to))) {
    return fail(ossl::error("ASN1_TIME_set"));
  }
  return {};
}

std::optional<std::chrono::system_clock::time_point> not_after(X509* x) {
  std::tm tm{};
  if (ASN1_TIME_to_tm(X509_get0_notAfter(x), &tm) != 1) return std::nullopt;
  return std::chrono::system_clock::from_time_t(::timegm(&tm));
}

}  // namespace

struct InternalCA::Impl {
  ossl::X509Ptr root;
  acme::PrivateKey key;
  std::chrono::system_clock::time_point root_not_after;
};

InternalCA::InternalCA(std::unique_ptr<Impl> impl, std::string root_pem, Clock& clock, Options options)
    : impl_(std::move(impl)), root_pem_(std::move(root_pem)), clock_(clock), options_(options) {}

InternalCA::~InternalCA() = default;

Result<std::shared_ptr<InternalCA>> InternalCA::load_or_create(Storage& storage, Clock& clock, Logger& logger,
                                                               const Options& options) {
  const std::string cert_key(kRootCertKey), key_key(kRootKeyKey);
  auto load = [&]() -> Result<std::shared_ptr<InternalCA>> {
    auto cert_pem = storage.get(cert_key);
    if (!cert_pem) return fail(cert_pem.error());
    auto key_pem = storage.get(key_key);
    if (!key_pem) return fail(key_pem.error());
    if (!*cert_pem && !*key_pem) return std::shared_ptr<InternalCA>();
    const std::string fix = ": restore it from a backup, or delete both " + cert_key + " and " + key_key +
                            " to make a new root (which every client must trust again)";
    if (!*cert_pem || !*key_pem) {
      return fail(Errc::invalid_input, "internal CA: " + (*cert_pem ? key_key : cert_key) + " is missing" + fix);
    }
    auto root = from_pem(**cert_pem);
    if (!root) return fail(Errc::invalid_input, "internal CA: " + cert_key + " is not a certificate" + fix);
    auto key = acme::PrivateKey::from_pem(**key_pem);
    if (!key) return fail(Errc::invalid_input, "internal CA: " + key_key + ": " + key.error().message + fix);
    if (X509_check_private_key(root->get(), key->evp()) != 1) {
      ossl::drain_errors();
      return fail(Errc::invalid_input, "internal CA: " + key_key + " does not match " + cert_key + fix);
    }
    auto na = not_after(root->get());
    if (!na || *na <= clock.now() + options.leaf_lifetime) {
      return fail(Errc::invalid_input, "internal CA: the root " + cert_key + " has expired or expires within a leaf's lifetime" + fix);
    }
    auto impl = std::make_unique<Impl>(Impl{std::move(*root), std::move(*key), *na});
    return std::shared_ptr<InternalCA>(new InternalCA(std::move(impl), **cert_pem, clock, options));
  };

  auto found = load();
  if (!found || *found) return found;
  auto token = storage.lock("internal-ca", options.lock_ttl, clock.now() + options.lock_wait, clock);
  if (!token) return fail(token.error().with_context("internal CA lock"));
  struct Unlock {
    Storage& s;
    LockToken t;
    ~Unlock() { (void)s.unlock(t); }
  } unlock{storage, *token};
  found = load();  // another process may have made it while we waited
  if (!found || *found) return found;

  auto key = acme::PrivateKey::generate(acme::KeyType::ec256);
  if (!key) return fail(key.error());
  ossl::X509Ptr root(X509_new());
  if (!root) return fail(ossl::error("X509_new"));
  auto now = clock.now();
  unsigned char tag[4];
  if (RAND_bytes(tag, sizeof tag) != 1) return fail(ossl::error("RAND_bytes"));
  char hex[9];
  std::snprintf(hex, sizeof hex, "%02x%02x%02x%02x", tag[0], tag[1], tag[2], tag[3]);
  // A per-installation CN, so that two installations' roots are told apart in a trust store.
  std::string cn = std::string("autotls internal root ") + hex;
  X509_NAME* name = X509_get_subject_name(root.get());
  if (X509_set_version(root.get(), 2) != 1 || !random_serial(root.get()) ||
      X509_NAME_add_entry_by_txt(name, "O", MBSTRING_UTF8, reinterpret_cast<const unsigned char*>("autotls"), -1, -1, 0) != 1 ||
      X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0) != 1 ||
      X509_set_issuer_name(root.get(), name) != 1 || X509_set_pubkey(root.get(), key->evp()) != 1) {
    return fail(ossl::error("internal CA root"));
  }
  if (auto st = set_validity(root.get(), now - std::chrono::hours(1), now + options.root_lifetime); !st) return fail(st.error());
  for (auto [nid, value] : {std::pair{NID_basic_constraints, "critical,CA:TRUE,pathlen:0"},
                            std::pair{NID_key_usage, "critical,keyCertSign,cRLSign"},
                            std::pair{NID_subject_key_identifier, "hash"}}) {
    if (auto st = add_ext(root.get(), root.get(), nid, value); !st) return fail(st.error());
  }
  if (X509_sign(root.get(), key->evp(), EVP_sha256()) <= 0) return fail(ossl::error("signing the internal root"));
  std::string root_pem = to_pem(root.get());
  auto key_pem = key->to_pem();
  if (root_pem.empty() || !key_pem) return fail(Errc::crypto, "internal CA: cannot encode the new root");
  // Key first: a crash between the two leaves a key without a certificate, which load()
  // reports rather than guessing.
  if (auto st = storage.put(key_key, *key_pem, /*secret=*/true); !st) return fail(st.error());
  if (auto st = storage.put(cert_key, root_pem); !st) return fail(st.error());
  logger.log(LogLevel::info, kLog, "internal CA root created: add it to your trust store",
             {{"root", cert_key}, {"subject", cn}});
  auto na = not_after(root.get());
  auto impl = std::make_unique<Impl>(Impl{std::move(root), std::move(*key), na.value_or(now + options.root_lifetime)});
  return std::shared_ptr<InternalCA>(new InternalCA(std::move(impl), std::move(root_pem), clock, options));
}

Result<InternalCA::Issued> InternalCA::issue(const std::vector<std::string>& names, acme::KeyType key_type) const {
  if (names.empty()) return fail(Errc::invalid_input, "internal CA: no names");
  auto key = acme::PrivateKey::generate(key_type);
  if (!key) return fail(key.error());
  ossl::X509Ptr leaf(X509_new());
  if (!leaf) return fail(ossl::error("X509_new"));
  auto now = clock_.now();
  auto end = std::min(now + options_.leaf_lifetime, impl_->root_not_after);
  std::string san;
  for (const auto& n : names) {
    if (n.find_first_of(",\n") != std::string::npos) return fail(Errc::invalid_input, "internal CA: bad name \"" + n + "\"");
    san += (san.empty() ? "" : ",") + std::string(acme::identifier_for(n).type == "ip" ? "IP:" : "DNS:") + n;
  }
  X509_NAME* subject = X509_get_subject_name(leaf.get());
  std::string cn = names.front().size() <= 64 ? names.front() : std::string();
  if (X509_set_version(leaf.get(), 2) != 1 || !random_serial(leaf.get()) ||
      X509_set_issuer_name(leaf.get(), X509_get_subject_name(impl_->root.get())) != 1 ||
      X509_set_pubkey(leaf.get(), key->evp()) != 1) {
    return fail(ossl::error("internal CA leaf"));
  }
  if (!cn.empty() && X509_NAME_add_entry_by_txt(subject, "CN", MBSTRING_UTF8,
                                                reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0) != 1) {
    return fail(ossl::error("internal CA leaf subject"));
  }
  // Backdated a little for clocks that lag ours.
  if (auto st = set_validity(leaf.get(), now - std::chrono::minutes(5), end); !st) return fail(st.error());
  std::string usage = key_type == acme::KeyType::ec256 || key_type == acme::KeyType::ec384
                          ? "critical,digitalSignature"
                          : "critical,digitalSignature,keyEncipherment";
  for (auto [nid, value] : {std::pair{NID_basic_constraints, std::string("critical,CA:FALSE")},
                            std::pair{NID_key_usage, usage},
                            std::pair{NID_ext_key_usage, std::string("serverAuth")},
                            std::pair{NID_subject_key_identifier, std::string("hash")},
                            std::pair{NID_authority_key_identifier, std::string("keyid:always")},
                            std::pair{NID_subject_alt_name, san}}) {
    if (auto st = add_ext(leaf.get(), impl_->root.get(), nid, value); !st) return fail(st.error());
  }
  if (X509_sign(leaf.get(), impl_->key.evp(), EVP_sha256()) <= 0) return fail(ossl::error("signing an internal leaf"));
  auto key_pem = key->to_pem();
  if (!key_pem) return fail(key_pem.error());
  std::string leaf_pem = to_pem(leaf.get());
  if (leaf_pem.empty()) return fail(Errc::crypto, "internal CA: cannot encode the leaf");
  return Issued{leaf_pem + root_pem_, std::move(*key_pem)};
}

}  // namespace autotls::tlsreload
