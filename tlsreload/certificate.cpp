#include "tlsreload/certificate.h"

#include <algorithm>
#include <bit>
#include <cctype>
#include <cstring>
#include <ctime>

#include <arpa/inet.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/params.h>
#include <openssl/pem.h>

#include <mutex>
#include <optional>
#include <unordered_map>

#include "acme/util/openssl.h"
#include "tlsreload/detail/compact.h"
#include "acme/util/der.h"
#include "acme/util/ec_key.h"
#include "tlsreload/detail/intern.h"

namespace autotls::tlsreload {
namespace detail {

std::atomic<bool> g_any_verify_failed{false};

struct IssuerNames {
  std::string cn;
  std::string dn;
};

// OpenSslObjects are what a handshake needs, built from a Certificate's DER. The chain stack
// owns a reference to each intermediate, so a view may outlive its Certificate.
struct OpenSslObjects {
  ossl::X509Ptr leaf;
  ossl::EvpPkeyPtr key;
  ossl::X509StackPtr chain;
};

}  // namespace detail

namespace {

enum KeyFormat : std::uint8_t { kPkcs8 = 0, kSec1 = 1, kPkcs1 = 2 };

// The OpenSSL object cache (see Certificate's class comment). Leaked: certificates held by
// static objects or thread-local snapshot caches may be destroyed after function-local statics.
struct ObjectCache {
  std::mutex mu;
  std::vector<const Certificate*> ring;  // the hot certificates; each knows its index
  std::size_t hand = 0;                  // the CLOCK hand
  std::size_t capacity = kDefaultOpenSslCacheCapacity;  // when !automatic
  bool automatic = true;                                // see openssl_cache_capacity_for()
  std::uint64_t builds = 0;
  std::uint64_t evictions = 0;
  std::atomic<std::uint64_t> verify_failed{0};
};
ObjectCache& object_cache() {
  static auto* c = new ObjectCache;
  return *c;
}

// Certificates alive in the process (built and not yet destroyed): sizes the automatic bound.
std::atomic<std::size_t> g_live_certificates{0};

// The largest number of library contexts noted (note_openssl_signing_contexts).
std::atomic<std::size_t> g_signing_contexts{1};

// capacity_of is the cache bound in force (under cache.mu).
std::size_t capacity_of(const ObjectCache& cache) {
  if (!cache.automatic) return cache.capacity;
  return openssl_cache_capacity_for(g_live_certificates.load(std::memory_order_relaxed),
                                    g_signing_contexts.load(std::memory_order_relaxed));
}

// Deferred verification results are written once, under this mutex (rare: once per certificate).
std::mutex& verify_mu() {
  static auto* mu = new std::mutex;
  return *mu;
}

constexpr std::size_t kNoSlot = static_cast<std::size_t>(-1);

}  // namespace

namespace {

// A PEM file bigger than this is not a certificate chain or a key; refuse before parsing.
constexpr std::size_t kMaxPemBytes = 1 << 20;

struct PemBlock {  // from OpenSSL's PEM reader (the full path)
  std::string name;    // "CERTIFICATE", "PRIVATE KEY", ...
  std::string header;  // RFC 1421 headers, e.g. "Proc-Type: 4,ENCRYPTED" for legacy encryption
  std::string der;
};

bool all_space(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isspace(c) != 0; });
}

// read_pem_blocks splits text into PEM blocks. Text outside blocks is ignored, as OpenSSL does
// (certbot and `openssl x509 -text` put human-readable text there); a block that starts but does
// not end properly, or whose base64 is broken, is an error naming the block's position.
Result<std::vector<PemBlock>> read_pem_blocks(std::string_view text, std::string_view what) {
  std::string w(what);
  if (text.size() > kMaxPemBytes) {
    return fail(Errc::invalid_input, w + ": PEM input larger than 1 MiB");
  }
  if (all_space(text)) return fail(Errc::invalid_input, w + ": empty PEM input");
  ERR_clear_error();
  ossl::BioPtr bio(BIO_new_mem_buf(text.data(), static_cast<int>(text.size())));
  if (!bio) return fail(ossl::error(w + ": BIO_new_mem_buf"));
  std::vector<PemBlock> blocks;
  for (;;) {
    char* name = nullptr;
    char* header = nullptr;
    unsigned char* data = nullptr;
    long len = 0;
    int ok = PEM_read_bio(bio.get(), &name, &header, &data, &len);
    if (ok != 1) {
      unsigned long e = ERR_peek_last_error();
      bool clean_end = ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE;
      std::string reason = ossl::drain_errors();
      if (clean_end) break;
      return fail(Errc::invalid_input, w + ": malformed PEM block #" +
                                           std::to_string(blocks.size() + 1) + " (" + reason + ")");
    }
    PemBlock b;
    b.name = name;
    b.header = header ? header : "";
    b.der.assign(reinterpret_cast<const char*>(data), static_cast<std::size_t>(len));
    OPENSSL_free(name);
    OPENSSL_free(header);
    OPENSSL_free(data);
    blocks.push_back(std::move(b));
  }
  if (blocks.empty()) {
    return fail(Errc::invalid_input, w + ": no PEM block found (not PEM, or truncated before "
                                         "the first -----END line)");
  }
  return blocks;
}

std::string hex(const unsigned char* p, std::size_t n) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out(2 * n, '0');
  for (std::size_t i = 0; i < n; ++i) {
    out[2 * i] = kDigits[p[i] >> 4];
    out[2 * i + 1] = kDigits[p[i] & 0xf];
  }
  return out;
}

std::string name_cn(const X509_NAME* name) {
  int idx = X509_NAME_get_index_by_NID(name, NID_commonName, -1);
  if (idx < 0) return {};
  ASN1_STRING* s = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, idx));
  unsigned char* utf8 = nullptr;
  int n = ASN1_STRING_to_UTF8(&utf8, s);
  if (n < 0) return {};
  std::string out(reinterpret_cast<char*>(utf8), static_cast<std::size_t>(n));
  OPENSSL_free(utf8);
  return out;
}

std::string name_dn(const X509_NAME* name) {
  ossl::BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || X509_NAME_print_ex(bio.get(), name, 0, XN_FLAG_RFC2253) < 0) return {};
  char* data = nullptr;
  long n = BIO_get_mem_data(bio.get(), &data);
  return n > 0 ? std::string(data, static_cast<std::size_t>(n)) : std::string();
}

// describe names a certificate in error messages: "#2 (CN=R3)".
std::string describe(std::size_t index, X509* x) {
  std::string cn = name_cn(X509_get_subject_name(x));
  return "#" + std::to_string(index + 1) + (cn.empty() ? "" : " (CN=" + cn + ")");
}

Result<std::chrono::system_clock::time_point> to_time_point(const ASN1_TIME* t,
                                                            std::string_view what) {
  struct tm tm{};
  if (ASN1_TIME_to_tm(t, &tm) != 1) {
    return fail(Errc::invalid_input, "leaf certificate: unreadable " + std::string(what));
  }
  // system_clock counts nanoseconds in 64 bits and ends in 2262; RFC 5280 §4.1.2.5 uses
  // 99991231235959Z for "no expiration". Clamp instead of overflowing into the past.
  constexpr std::time_t kMax = std::chrono::duration_cast<std::chrono::seconds>(
                                   std::chrono::system_clock::time_point::max().time_since_epoch())
                                   .count() - 1;
  std::time_t secs = timegm(&tm);
  if (secs > kMax) secs = kMax;
  return std::chrono::system_clock::from_time_t(secs);
}

std::string iso8601(std::chrono::system_clock::time_point t) {
  std::time_t tt = std::chrono::system_clock::to_time_t(t);
  struct tm tm{};
  gmtime_r(&tt, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

// fill_extension_cache makes OpenSSL fill a leaf's X509v3 extension cache (flags, SHA-1 of the
// DER, decoded extensions) now, when its handshake objects are built. Otherwise OpenSSL fills it
// inside the first handshake that serves them (SSL_use_cert_and_key checks the extension flags):
// ~32 k instructions, +1.2 % of that handshake, that a warm-up through openssl() did not cover
// (docs/benchmarks.md, session 9). An invalid extension only sets EXFLAG_INVALID there, as it
// would in that handshake.
void fill_extension_cache(X509* leaf) {
  (void)X509_get_extension_flags(leaf);
  ERR_clear_error();
}

Result<ossl::X509Ptr> parse_certificate(const PemBlock& b, std::size_t index) {
  std::string where = "certificate chain: certificate #" + std::to_string(index + 1);
  if (b.name != "CERTIFICATE") {
    return fail(Errc::invalid_input,
                where + ": unexpected PEM block \"" + b.name + "\" (expected CERTIFICATE)");
  }
  const auto* p = reinterpret_cast<const unsigned char*>(b.der.data());
  const unsigned char* end = p + b.der.size();
  ERR_clear_error();
  ossl::X509Ptr x(d2i_X509(nullptr, &p, static_cast<long>(b.der.size())));
  if (!x) {
    return fail(Errc::invalid_input, where + ": not a DER certificate (" + ossl::drain_errors() + ")");
  }
  if (p != end) return fail(Errc::invalid_input, where + ": trailing bytes after the DER certificate");
  return x;
}


struct KeyBlock {
  std::string name;
  std::string der;
  KeyFormat format = kPkcs8;
};

// find_key_block picks the one private key block of key_pem (the full path's messages).
Result<KeyBlock> find_key_block(std::string_view key_pem) {
  auto blocks = read_pem_blocks(key_pem, "private key");
  if (!blocks) return fail(blocks.error());
  const PemBlock* key_block = nullptr;
  for (const PemBlock& b : *blocks) {
    bool is_key = b.name.size() >= 11 && b.name.compare(b.name.size() - 11, 11, "PRIVATE KEY") == 0;
    if (!is_key) continue;  // "EC PARAMETERS" precedes the key in `openssl ecparam -genkey`
    // Never prompt and never guess a password: an unattended server has nobody to ask.
    if (b.name == "ENCRYPTED PRIVATE KEY" || b.header.find("ENCRYPTED") != std::string::npos) {
      return fail(Errc::invalid_input,
                  "private key: the key is encrypted; autotls needs an unencrypted key "
                  "(decrypt it with `openssl pkey -in key.pem -out key.pem`)");
    }
    if (key_block) return fail(Errc::invalid_input, "private key: more than one private key in the PEM input");
    key_block = &b;
  }
  if (!key_block) {
    return fail(Errc::invalid_input, "private key: no PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE "
                                     "KEY block found");
  }
  KeyBlock out;
  if (key_block->name == "PRIVATE KEY") {  // PKCS#8 (RFC 5208)
    out.format = kPkcs8;
  } else if (key_block->name == "EC PRIVATE KEY") {  // SEC1 (RFC 5915)
    out.format = kSec1;
  } else if (key_block->name == "RSA PRIVATE KEY") {  // PKCS#1 (RFC 8017)
    out.format = kPkcs1;
  } else {
    return fail(Errc::invalid_input, "private key: unsupported format \"" + key_block->name + "\"");
  }
  out.name = key_block->name;
  out.der = key_block->der;
  return out;
}

const char* format_name(std::uint8_t format) {
  switch (format) {
    case kSec1: return "EC PRIVATE KEY";
    case kPkcs1: return "RSA PRIVATE KEY";
    default: return "PRIVATE KEY";
  }
}

Result<ossl::EvpPkeyPtr> decode_key(std::uint8_t format, std::string_view der) {
  const auto* p = reinterpret_cast<const unsigned char*>(der.data());
  const unsigned char* end = p + der.size();
  long len = static_cast<long>(der.size());
  ERR_clear_error();
  ossl::EvpPkeyPtr key;
  if (format == kPkcs8) {
    std::unique_ptr<PKCS8_PRIV_KEY_INFO, ossl::Free<PKCS8_PRIV_KEY_INFO_free>> info(
        d2i_PKCS8_PRIV_KEY_INFO(nullptr, &p, len));
    if (info) key.reset(EVP_PKCS82PKEY(info.get()));
  } else {
    key.reset(d2i_PrivateKey(format == kSec1 ? EVP_PKEY_EC : EVP_PKEY_RSA, nullptr, &p, len));
  }
  if (!key) {
    return fail(Errc::invalid_input, std::string("private key: cannot parse the ") +
                                         format_name(format) + " block (" + ossl::drain_errors() + ")");
  }
  if (p != end) return fail(Errc::invalid_input, "private key: trailing bytes after the DER key");
  return key;
}

// fast_ec_key reads an EC key without OpenSSL's decoders (acme/util/ec_key.h): about 1 ms per
// key with them on this machine, most of a cold handshake (docs/benchmarks.md). nullptr when it
// cannot (PKCS#1, not EC, no embedded point): the caller then uses decode_key.
ossl::EvpPkeyPtr fast_ec_key(std::uint8_t format, std::string_view der) {
  if (format == kPkcs1) return nullptr;
  return ossl::ec_key_from_der(format_name(format), der);
}

// leaf_key_pair makes the leaf's own public-key object (X509_get0_pubkey) its key pair, with the
// private half of the key DER (ossl::ec_key_add_private, which first checks that the key's
// curve and point are the leaf's), and returns a new reference to it. nullptr when it cannot
// (RSA, a point in another encoding, anything the fast path declines): the caller then builds a
// separate key, checked against the leaf by OpenSSL. Why: with one object for both,
// SSL_use_cert_and_key's key check (EVP_PKEY_eq) returns at once; with two it compares their
// curves field by field, ~1.5 us of every handshake, and with 100,000 certificates the two
// copies of the curve are ~50 last-level cache misses of it (docs/benchmarks.md, session 9). It
// also leaves one copy of the curve per built certificate instead of two.
ossl::EvpPkeyPtr leaf_key_pair(X509* leaf, std::uint8_t format, std::string_view der) {
  if (format == kPkcs1) return nullptr;
  EVP_PKEY* pub = X509_get0_pubkey(leaf);
  if (!pub || !ossl::ec_key_add_private(pub, format_name(format), der)) {
    return nullptr;
  }
  EVP_PKEY_up_ref(pub);
  return ossl::EvpPkeyPtr(pub);
}

Result<std::pair<KeyKind, std::string>> classify_key(EVP_PKEY* key) {
  switch (EVP_PKEY_get_base_id(key)) {
    case EVP_PKEY_EC: {
      char group[64] = {};
      std::size_t n = 0;
      if (EVP_PKEY_get_group_name(key, group, sizeof group, &n) != 1) break;
      std::string_view g(group, n);
      if (g == "prime256v1" || g == "P-256") return std::pair{KeyKind::ecdsa, std::string("ec256")};
      if (g == "secp384r1" || g == "P-384") return std::pair{KeyKind::ecdsa, std::string("ec384")};
      if (g == "secp521r1" || g == "P-521") return std::pair{KeyKind::ecdsa, std::string("ec521")};
      return fail(Errc::invalid_input, "private key: unsupported EC curve " + std::string(g));
    }
    case EVP_PKEY_RSA:
      return std::pair{KeyKind::rsa, "rsa" + std::to_string(EVP_PKEY_get_bits(key))};
    default:
      break;
  }
  return fail(Errc::invalid_input, "private key: unsupported key type (need ECDSA P-256/P-384/"
                                   "P-521 or RSA)");
}

using SanList = std::vector<std::pair<int, std::string_view>>;  // (2 dNSName | 7 iPAddress, bytes)

// names_from_sans turns SAN entries into Certificate::names(), the same for both load paths.
Result<std::vector<std::string>> names_from_sans(const SanList& sans) {
  std::vector<std::string> dns, ips;
  for (const auto& [type, bytes] : sans) {
    if (type == 2) {
      std::string name(bytes);
      // RFC 4343: DNS names compare case-insensitively; keys are lower-case.
      for (char& c : name) {
        if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
      }
      if (!is_valid_lookup_name(name)) {
        return fail(Errc::invalid_input, "leaf certificate: unusable dNSName \"" + name +
                                             "\" (wildcards only as a whole first label; "
                                             "IDNs in A-label form)");
      }
      dns.push_back(std::move(name));
    } else {
      char buf[INET6_ADDRSTRLEN] = {};
      if (bytes.size() == 4) {
        inet_ntop(AF_INET, bytes.data(), buf, sizeof buf);
      } else if (bytes.size() == 16) {
        inet_ntop(AF_INET6, bytes.data(), buf, sizeof buf);
      } else {
        return fail(Errc::invalid_input, "leaf certificate: iPAddress SAN of length " +
                                             std::to_string(bytes.size()));
      }
      ips.emplace_back(buf);
    }
  }
  for (auto& ip : ips) dns.push_back(std::move(ip));
  // Remove duplicates but keep the certificate's order (the first name is the "main" one).
  std::vector<std::string> out;
  for (auto& n : dns) {
    if (std::find(out.begin(), out.end(), n) == out.end()) out.push_back(std::move(n));
  }
  if (out.empty()) {
    // RFC 6125 §6.4.4 and the CA/Browser Forum rules: names live in subjectAltName; clients
    // ignore the CN, so a certificate without SANs cannot serve anyone.
    return fail(Errc::invalid_input, "leaf certificate: no dNSName or iPAddress subjectAltName");
  }
  return out;
}

Result<std::vector<std::string>> san_names(X509* leaf) {
  int crit = 0;
  ossl::GeneralNamesPtr sans(static_cast<GENERAL_NAMES*>(
      X509_get_ext_d2i(leaf, NID_subject_alt_name, &crit, nullptr)));
  SanList list;
  for (int i = 0; sans && i < sk_GENERAL_NAME_num(sans.get()); ++i) {
    const GENERAL_NAME* gn = sk_GENERAL_NAME_value(sans.get(), i);
    const ASN1_STRING* s = gn->type == GEN_DNS ? gn->d.dNSName
                           : gn->type == GEN_IPADD ? gn->d.iPAddress : nullptr;
    if (!s) continue;
    list.emplace_back(gn->type == GEN_DNS ? 2 : 7,
                      std::string_view(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                                       static_cast<std::size_t>(ASN1_STRING_length(s))));
  }
  return names_from_sans(list);
}

bool is_ldh_label(std::string_view label) {
  if (label.empty() || label.size() > 63) return false;
  for (char c : label) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
    if (!ok) return false;
  }
  return true;
}

// check_links checks that each certificate is issued by the next one. Checked here, not left
// to clients, because a misordered or foreign chain fails only on some clients and would
// otherwise go unnoticed.
Status check_links(const std::vector<X509*>& certs) {
  for (std::size_t i = 0; i + 1 < certs.size(); ++i) {
    X509* child = certs[i];
    X509* parent = certs[i + 1];
    // The message is made only on failure: its names cost ~9 k instructions per certificate's
    // first use, which passes (docs/benchmarks.md, session 13).
    auto link = [&] {
      return "certificate chain: certificate " + describe(i + 1, parent) +
             " did not issue certificate " + describe(i, child);
    };
    if (X509_NAME_cmp(X509_get_issuer_name(child), X509_get_subject_name(parent)) != 0) {
      return fail(Errc::invalid_input, link() + ": issuer name differs (wrong order or wrong chain)");
    }
    EVP_PKEY* parent_key = X509_get0_pubkey(parent);
    if (!parent_key || X509_verify(child, parent_key) != 1) {
      ossl::drain_errors();
      return fail(Errc::invalid_input, link() + ": signature does not verify");
    }
  }
  return {};
}

Status check_window(std::chrono::system_clock::time_point not_before,
                    std::chrono::system_clock::time_point not_after, const LoadOptions& options) {
  const Clock& clock = options.clock ? *options.clock : system_clock();
  auto now = clock.now();
  // Only the leaf's window is enforced: an expired cross-signed root at the end of a chain is
  // common (and harmless to clients that build a shorter path), so refusing it would do harm.
  if (now > not_after) {
    return fail(Errc::invalid_input, "leaf certificate expired: notAfter " + iso8601(not_after) +
                                         " is before now " + iso8601(now));
  }
  if (now < not_before && !options.allow_not_yet_valid) {
    return fail(Errc::invalid_input, "leaf certificate not yet valid: notBefore " +
                                         iso8601(not_before) + " is after now " + iso8601(now));
  }
  return {};
}

std::chrono::system_clock::time_point clamp_time(std::int64_t secs) {
  constexpr std::int64_t kMax = std::chrono::duration_cast<std::chrono::seconds>(
                                    std::chrono::system_clock::time_point::max().time_since_epoch())
                                    .count() - 1;
  return std::chrono::system_clock::from_time_t(static_cast<std::time_t>(std::min(secs, kMax)));
}


// intern_issuer shares the issuer names of every certificate from one CA (a few CAs, so the
// table is never pruned). parsed may be null: the DER is then parsed on first sight.
std::shared_ptr<const detail::IssuerNames> intern_issuer(std::string_view der, const X509_NAME* parsed) {
  static auto* mu = new std::mutex;
  static auto* table = new std::unordered_map<std::string, std::shared_ptr<const detail::IssuerNames>>;
  // A bulk load sees one issuer over and over: compare with this thread's last one first
  // (no allocation, no mutex). Entries are never removed, so the last one stays valid.
  thread_local std::string last_der;
  thread_local std::shared_ptr<const detail::IssuerNames> last;
  if (last && der == last_der) return last;
  auto remember = [&](std::shared_ptr<const detail::IssuerNames> found) {
    last_der.assign(der);
    last = found;
    return found;
  };
  {
    std::lock_guard lock(*mu);
    auto it = table->find(std::string(der));
    if (it != table->end()) return remember(it->second);
  }
  auto names = std::make_shared<detail::IssuerNames>();
  ossl::X509NamePtr owned;
  if (!parsed) {
    const auto* p = reinterpret_cast<const unsigned char*>(der.data());
    owned.reset(d2i_X509_NAME(nullptr, &p, static_cast<long>(der.size())));
    ERR_clear_error();
    parsed = owned.get();
  }
  if (parsed) {
    names->cn = name_cn(parsed);
    names->dn = name_dn(parsed);
  }
  std::lock_guard lock(*mu);
  return remember(table->try_emplace(std::string(der), std::move(names)).first->second);
}

// sha256_hex computes a leaf's fingerprint. The digest is fetched from the provider once and
// each thread reuses one context: EVP_Digest(EVP_sha256()) fetched the algorithm on every call
// (OpenSSL 3.0's provider lookup takes a global lock and compares names), about as costly as
// hashing the certificate itself at bulk-load rates.
std::string sha256_hex(std::string_view der, Certificate::Sha256& out, bool& ok) {
  static const EVP_MD* md = [] {
    const EVP_MD* fetched = EVP_MD_fetch(nullptr, "SHA256", nullptr);  // leaked: process-wide
    return fetched ? fetched : EVP_sha256();
  }();
  thread_local ossl::EvpMdCtxPtr ctx(EVP_MD_CTX_new());
  unsigned int len = 0;
  ok = ctx && EVP_DigestInit_ex2(ctx.get(), md, nullptr) == 1 &&
       EVP_DigestUpdate(ctx.get(), der.data(), der.size()) == 1 &&
       EVP_DigestFinal_ex(ctx.get(), out.data(), &len) == 1 && len == out.size();
  return hex(out.data(), out.size());
}

}  // namespace

// CertificateBuilder is the one place allowed to fill a Certificate (it is a friend), and the
// owner of the object cache's bookkeeping.
struct CertificateBuilder {
  // One allocation with the reference count right before the object: a store writer that
  // copies a shard's entries prefetches the counts through the raw pointer (store.cpp).
  struct Allocated : Certificate {};
  static std::shared_ptr<Certificate> make() {
    auto c = std::make_shared<Allocated>();
    c->counted_ = true;
    g_live_certificates.fetch_add(1, std::memory_order_relaxed);
    return c;
  }

  // Full validation with OpenSSL's parsers: what from_pem does by default.
  static Result<std::shared_ptr<const Certificate>> full(std::string_view chain_pem,
                                                          std::string_view key_pem,
                                                          const LoadOptions& options);
  // The deferred fast path; nullopt when it cannot decide (then full() runs).
  static std::optional<Result<std::shared_ptr<const Certificate>>> fast(std::string_view chain_pem,
                                                                        std::string_view key_pem,
                                                                        const LoadOptions& options);

  static Result<std::shared_ptr<const detail::OpenSslObjects>> build(const Certificate& c);
  static Status deferred_checks(const Certificate& c, const detail::OpenSslObjects& o);
  static void settle(const Certificate& c, const Status& st);
  static std::shared_ptr<const detail::OpenSslObjects> miss(const Certificate& c);
  static std::shared_ptr<const detail::OpenSslObjects> insert(
      const Certificate& c, std::shared_ptr<const detail::OpenSslObjects> objs, bool count_build);
  static void shrink(ObjectCache& cache, std::vector<std::shared_ptr<const detail::OpenSslObjects>>& dropped);
  static void remove_at(ObjectCache& cache, std::size_t i);
  static void forget(const Certificate& c);

  // The store snapshot's conversions (detail/compact.h).
  static detail::CompactCertificate to_compact(const Certificate& c);
  static Result<std::shared_ptr<const Certificate>> from_compact(const detail::CompactCertificate& f,
                                                                 const LoadOptions& options);
};

bool is_valid_lookup_name(std::string_view name) {
  if (name.empty() || name.size() > 253) return false;
  if (name.find(':') != std::string_view::npos) {
    unsigned char buf[16];
    std::string s(name);
    return inet_pton(AF_INET6, s.c_str(), buf) == 1;
  }
  if (name.starts_with("*.")) name.remove_prefix(2);
  if (name.empty()) return false;
  std::size_t start = 0;
  for (;;) {
    std::size_t dot = name.find('.', start);
    std::string_view label =
        name.substr(start, dot == std::string_view::npos ? std::string_view::npos : dot - start);
    if (!is_ldh_label(label)) return false;
    if (dot == std::string_view::npos) return true;
    start = dot + 1;
  }
}

Result<std::shared_ptr<const Certificate>> CertificateBuilder::full(std::string_view chain_pem,
                                                                    std::string_view key_pem,
                                                                    const LoadOptions& options) {
  auto blocks = read_pem_blocks(chain_pem, "certificate chain");
  if (!blocks) return fail(blocks.error());
  std::vector<ossl::X509Ptr> certs;
  for (std::size_t i = 0; i < blocks->size(); ++i) {
    auto x = parse_certificate((*blocks)[i], i);
    if (!x) return fail(x.error());
    certs.push_back(std::move(*x));
  }
  auto key_block = find_key_block(key_pem);
  if (!key_block) return fail(key_block.error());
  // An EC key is read without OpenSSL's decoders, as build() does (fast_ec_key); the checks
  // below are OpenSSL's either way (X509_check_private_key).
  Result<ossl::EvpPkeyPtr> key = fast_ec_key(key_block->format, key_block->der);
  if (!*key) key = decode_key(key_block->format, key_block->der);
  if (!key) return fail(key.error());
  auto kind = classify_key(key->get());
  if (!kind) return fail(kind.error());

  X509* leaf = certs.front().get();
  ERR_clear_error();
  if (X509_check_private_key(leaf, key->get()) != 1) {
    ossl::drain_errors();
    return fail(Errc::invalid_input, "private key does not match the leaf certificate");
  }
  std::vector<X509*> raw;
  for (auto& x : certs) raw.push_back(x.get());
  if (auto st = check_links(raw); !st) return fail(st.error());

  auto not_before = to_time_point(X509_get0_notBefore(leaf), "notBefore");
  if (!not_before) return fail(not_before.error());
  auto not_after = to_time_point(X509_get0_notAfter(leaf), "notAfter");
  if (!not_after) return fail(not_after.error());
  if (auto st = check_window(*not_before, *not_after, options); !st) return fail(st.error());

  auto names = san_names(leaf);
  if (!names) return fail(names.error());

  auto cert = make();
  Certificate& c = *cert;
  c.names_ = std::move(*names);
  c.not_before_ = *not_before;
  c.not_after_ = *not_after;
  c.key_kind_ = kind->first;
  c.key_type_ = std::move(kind->second);
  c.issuer_ = intern_issuer(detail::name_der(X509_get_issuer_name(leaf)), X509_get_issuer_name(leaf));
  {
    ossl::BignumPtr bn(ASN1_INTEGER_to_BN(X509_get0_serialNumber(leaf), nullptr));
    if (!bn) return fail(ossl::error("leaf certificate: serial number"));
    char* h = BN_bn2hex(bn.get());
    if (!h) return fail(ossl::error("leaf certificate: serial number"));
    c.serial_hex_ = h;
    OPENSSL_free(h);
    for (char& ch : c.serial_hex_) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  }
  c.leaf_der_ = std::move((*blocks)[0].der);
  bool ok = false;
  c.id_ = sha256_hex(c.leaf_der_, c.fingerprint_, ok);
  if (!ok) return fail(ossl::error("leaf certificate: SHA-256 fingerprint"));
  c.key_der_ = std::move(key_block->der);
  c.key_format_ = key_block->format;

  auto objs = std::make_shared<detail::OpenSslObjects>();
  objs->chain.reset(sk_X509_new_reserve(nullptr, static_cast<int>(certs.size())));
  if (!objs->chain) return fail(ossl::error("certificate chain: sk_X509_new_reserve"));
  for (std::size_t i = 1; i < certs.size(); ++i) {
    auto shared = detail::intern(std::move(certs[i]));
    if (!shared) return fail(shared.error());
    sk_X509_push(objs->chain.get(), ossl::up_ref((*shared)->x509()).release());
    c.chain_.push_back(std::move(*shared));
  }
  objs->leaf = std::move(certs.front());
  // The key was checked against the leaf above; serve it as the leaf's own key object where
  // that works (see leaf_key_pair), else as read.
  objs->key = leaf_key_pair(objs->leaf.get(), c.key_format_, c.key_der_);
  if (!objs->key) objs->key = std::move(*key);
  fill_extension_cache(objs->leaf.get());
  c.verification_.store(Verification::verified, std::memory_order_relaxed);
  // A certificate just validated is about to be served: start it hot.
  insert(c, std::move(objs), false);
  return std::shared_ptr<const Certificate>(std::move(cert));
}

std::optional<Result<std::shared_ptr<const Certificate>>> CertificateBuilder::fast(
    std::string_view chain_pem, std::string_view key_pem, const LoadOptions& options) {
  if (chain_pem.size() > kMaxPemBytes || key_pem.size() > kMaxPemBytes) return std::nullopt;
  auto blocks = der::fast_pem_blocks(chain_pem);
  auto key_blocks = der::fast_pem_blocks(key_pem);
  if (!blocks || !key_blocks) return std::nullopt;
  for (const auto& b : *blocks) {
    if (b.name != "CERTIFICATE") return std::nullopt;
  }
  const der::PemDer* kb = nullptr;
  for (const auto& b : *key_blocks) {
    if (!b.name.ends_with("PRIVATE KEY")) continue;
    if (kb || b.name.starts_with("ENCRYPTED")) return std::nullopt;
    kb = &b;
  }
  if (!kb) return std::nullopt;
  auto leaf = der::parse_leaf((*blocks)[0].der);
  auto key = der::parse_key(kb->name, kb->der);
  if (!leaf || !key) return std::nullopt;
  auto match = der::key_matches_leaf(*key, *leaf);
  if (!match) return std::nullopt;
  if (!*match) {
    return Result<std::shared_ptr<const Certificate>>(
        fail(Errc::invalid_input, "private key does not match the leaf certificate"));
  }
  std::vector<std::shared_ptr<const detail::Intermediate>> chain;
  std::string_view issuer = leaf->issuer_der;
  for (std::size_t i = 1; i < blocks->size(); ++i) {
    auto inter = detail::intern_der((*blocks)[i].der);
    if (!inter) return std::nullopt;
    // Byte-equal DER names are equal names; anything else is for X509_NAME_cmp (full path).
    if ((*inter)->subject_der() != issuer) return std::nullopt;
    issuer = (*inter)->issuer_der();
    chain.push_back(std::move(*inter));
  }
  auto not_before = clamp_time(leaf->not_before);
  auto not_after = clamp_time(leaf->not_after);
  if (auto st = check_window(not_before, not_after, options); !st) {
    return Result<std::shared_ptr<const Certificate>>(fail(st.error()));
  }
  auto names = names_from_sans(leaf->sans);
  if (!names) return Result<std::shared_ptr<const Certificate>>(fail(names.error()));

  auto cert = make();
  Certificate& c = *cert;
  c.names_ = std::move(*names);
  c.not_before_ = not_before;
  c.not_after_ = not_after;
  if (key->key_nid == NID_X9_62_id_ecPublicKey) {
    c.key_kind_ = KeyKind::ecdsa;
    c.key_type_ = key->curve_nid == NID_X9_62_prime256v1 ? "ec256"
                  : key->curve_nid == NID_secp384r1       ? "ec384"
                                                          : "ec521";
  } else {
    c.key_kind_ = KeyKind::rsa;
    c.key_type_ = "rsa" + std::to_string(der::rsa_bits(key->rsa_n));
  }
  c.serial_hex_ = std::move(leaf->serial_hex);
  c.issuer_ = intern_issuer(leaf->issuer_der, nullptr);
  bool ok = false;
  c.id_ = sha256_hex((*blocks)[0].der, c.fingerprint_, ok);
  if (!ok) return std::nullopt;
  c.key_format_ = kb->name == "PRIVATE KEY" ? kPkcs8 : kb->name == "EC PRIVATE KEY" ? kSec1 : kPkcs1;
  c.chain_ = std::move(chain);
  c.verification_.store(Verification::pending, std::memory_order_relaxed);
  // The views into the DER die with the blocks: move the DER last.
  c.leaf_der_ = std::move((*blocks)[0].der);
  c.key_der_ = std::move(const_cast<der::PemDer*>(kb)->der);
  return Result<std::shared_ptr<const Certificate>>(std::shared_ptr<const Certificate>(std::move(cert)));
}

Result<std::shared_ptr<const Certificate>> Certificate::from_pem(std::string_view chain_pem,
                                                                 std::string_view key_pem,
                                                                 const LoadOptions& options) {
  if (options.chain_check == LoadOptions::ChainCheck::deferred) {
    if (auto r = CertificateBuilder::fast(chain_pem, key_pem, options)) return std::move(*r);
  }
  return CertificateBuilder::full(chain_pem, key_pem, options);
}

Result<std::shared_ptr<const detail::OpenSslObjects>> CertificateBuilder::build(const Certificate& c) {
  auto objs = std::make_shared<detail::OpenSslObjects>();
  const auto* p = reinterpret_cast<const unsigned char*>(c.leaf_der_.data());
  ERR_clear_error();
  objs->leaf.reset(d2i_X509(nullptr, &p, static_cast<long>(c.leaf_der_.size())));
  if (!objs->leaf || p != reinterpret_cast<const unsigned char*>(c.leaf_der_.data()) + c.leaf_der_.size()) {
    return fail(Errc::invalid_input, "leaf certificate: not a DER certificate (" +
                                         ossl::drain_errors() + ")");
  }
  fill_extension_cache(objs->leaf.get());
  objs->key = leaf_key_pair(objs->leaf.get(), c.key_format_, c.key_der_);
  if (!objs->key) objs->key = fast_ec_key(c.key_format_, c.key_der_);
  if (!objs->key) {
    auto key = decode_key(c.key_format_, c.key_der_);
    if (!key) return fail(key.error());
    objs->key = std::move(*key);
  }
  objs->chain.reset(sk_X509_new_reserve(nullptr, static_cast<int>(c.chain_.size()) + 1));
  if (!objs->chain) return fail(ossl::error("certificate chain: sk_X509_new_reserve"));
  for (const auto& inter : c.chain_) sk_X509_push(objs->chain.get(), ossl::up_ref(inter->x509()).release());
  return std::shared_ptr<const detail::OpenSslObjects>(std::move(objs));
}

Status CertificateBuilder::deferred_checks(const Certificate& c, const detail::OpenSslObjects& o) {
  // When o.key is the leaf's own key object (leaf_key_pair), this check is met by construction:
  // ec_key_add_private compared the key's curve and point with the leaf's before adding it.
  ERR_clear_error();
  if (X509_check_private_key(o.leaf.get(), o.key.get()) != 1) {
    ossl::drain_errors();
    return fail(Errc::invalid_input, "private key does not match the leaf certificate");
  }
  auto kind = classify_key(o.key.get());
  if (!kind) return fail(kind.error());
  if (kind->first != c.key_kind_ || kind->second != c.key_type_) {
    return fail(Errc::invalid_input, "private key: OpenSSL reads a " + kind->second +
                                         " key where the DER said " + c.key_type_);
  }
  std::vector<X509*> raw{o.leaf.get()};
  for (const auto& inter : c.chain_) raw.push_back(inter->x509());
  return check_links(raw);
}

void CertificateBuilder::settle(const Certificate& c, const Status& st) {
  std::lock_guard lock(verify_mu());
  if (c.verification_.load(std::memory_order_relaxed) != Verification::pending) return;
  if (st) {
    c.verification_.store(Verification::verified, std::memory_order_release);
    return;
  }
  // Written once, before the release store that publishes it (readers acquire the state).
  c.verify_error_ = std::make_unique<const std::string>("deferred verification of " + c.id_ +
                                                        ": " + st.error().message);
  // Counted before the state is published: a thread that sees this certificate failed also
  // sees a non-zero count, which lets Snapshot::find skip per-certificate checks while it is 0.
  object_cache().verify_failed.fetch_add(1, std::memory_order_relaxed);
  detail::g_any_verify_failed.store(true, std::memory_order_relaxed);
  c.verification_.store(Verification::failed, std::memory_order_release);
}

std::shared_ptr<const detail::OpenSslObjects> CertificateBuilder::miss(const Certificate& c) {
  if (c.verification() == Verification::failed) return nullptr;
  auto built = build(c);
  if (c.verification() == Verification::pending) {
    Status st = built ? deferred_checks(c, **built) : Status(fail(built.error()));
    settle(c, st);
  }
  if (!built || c.verification() != Verification::verified) return nullptr;
  return insert(c, std::move(*built), true);
}

std::shared_ptr<const detail::OpenSslObjects> CertificateBuilder::insert(
    const Certificate& c, std::shared_ptr<const detail::OpenSslObjects> objs, bool count_build) {
  std::vector<std::shared_ptr<const detail::OpenSslObjects>> dropped;  // freed after the lock
  ObjectCache& cache = object_cache();
  std::lock_guard lock(cache.mu);
  if (count_build) ++cache.builds;
  if (c.cache_slot_ != kNoSlot) {
    // Another thread built it first: serve one copy.
    if (auto current = c.hot_.load(std::memory_order_acquire)) return current;
  }
  if (capacity_of(cache) == 0) return objs;
  c.hot_.store(objs, std::memory_order_release);
  c.referenced_.store(true, std::memory_order_relaxed);
  c.cache_slot_ = cache.ring.size();
  cache.ring.push_back(&c);
  shrink(cache, dropped);
  return objs;
}

void CertificateBuilder::remove_at(ObjectCache& cache, std::size_t i) {
  const Certificate* victim = cache.ring[i];
  const Certificate* last = cache.ring.back();
  cache.ring[i] = last;
  last->cache_slot_ = i;
  cache.ring.pop_back();
  victim->cache_slot_ = kNoSlot;
}

void CertificateBuilder::shrink(ObjectCache& cache,
                                std::vector<std::shared_ptr<const detail::OpenSslObjects>>& dropped) {
  // CLOCK: a referenced entry gets a second chance, so at most two sweeps.
  const std::size_t capacity = capacity_of(cache);
  while (cache.ring.size() > capacity) {
    if (cache.hand >= cache.ring.size()) cache.hand = 0;
    const Certificate* victim = cache.ring[cache.hand];
    if (victim->referenced_.load(std::memory_order_relaxed)) {
      victim->referenced_.store(false, std::memory_order_relaxed);
      ++cache.hand;
      continue;
    }
    dropped.push_back(victim->hot_.exchange(nullptr, std::memory_order_acq_rel));
    remove_at(cache, cache.hand);
    ++cache.evictions;
  }
}

void CertificateBuilder::forget(const Certificate& c) {
  ObjectCache& cache = object_cache();
  std::lock_guard lock(cache.mu);
  if (c.cache_slot_ != kNoSlot) remove_at(cache, c.cache_slot_);
}

OpenSslView Certificate::openssl() const {
  auto objs = hot_.load(std::memory_order_acquire);
  if (objs) {
    // Read before writing: a hot entry's bit is usually set, and a store would make every
    // handshake on another core take the cache line.
    if (!referenced_.load(std::memory_order_relaxed)) referenced_.store(true, std::memory_order_relaxed);
  } else {
    objs = CertificateBuilder::miss(*this);
    if (!objs) return {};
  }
  return {objs->leaf.get(), objs->key.get(), objs->chain.get(), objs};
}

Status Certificate::verify() const {
  if (verification() == Verification::pending) {
    auto built = CertificateBuilder::build(*this);
    Status st = built ? CertificateBuilder::deferred_checks(*this, **built) : Status(fail(built.error()));
    CertificateBuilder::settle(*this, st);
  }
  if (verification() == Verification::failed) return fail(Errc::invalid_input, *verify_error_);
  return {};
}

const std::string& Certificate::issuer_cn() const { return issuer_->cn; }
const std::string& Certificate::issuer_dn() const { return issuer_->dn; }

Certificate::~Certificate() {
  if (counted_) g_live_certificates.fetch_sub(1, std::memory_order_relaxed);
  CertificateBuilder::forget(*this);
  if (!key_der_.empty()) OPENSSL_cleanse(key_der_.data(), key_der_.size());
}

void set_openssl_cache_capacity(std::size_t capacity) {
  std::vector<std::shared_ptr<const detail::OpenSslObjects>> dropped;
  ObjectCache& cache = object_cache();
  std::lock_guard lock(cache.mu);
  cache.capacity = capacity;
  cache.automatic = false;
  CertificateBuilder::shrink(cache, dropped);
}

void set_openssl_cache_capacity_automatic() {
  std::vector<std::shared_ptr<const detail::OpenSslObjects>> dropped;
  ObjectCache& cache = object_cache();
  std::lock_guard lock(cache.mu);
  cache.automatic = true;
  CertificateBuilder::shrink(cache, dropped);
}

std::size_t openssl_cache_capacity_for(std::size_t certificates, std::size_t contexts) {
  // A built key's copy in each further context is ~2.1 KiB; a built certificate raises
  // `serve`'s RSS by ~7.5 KiB in all (OpenSSL's 4.7–5.3 KiB of objects, with the heap around
  // them; sessions 17 and 18). So each further context costs 7/25 of one more.
  std::size_t extra = contexts > 1 ? contexts - 1 : 0;
  return std::max(kDefaultOpenSslCacheCapacity, certificates * 5 / (25 + 7 * extra));
}

void note_openssl_signing_contexts(std::size_t contexts) {
  std::size_t seen = g_signing_contexts.load(std::memory_order_relaxed);
  while (contexts > seen && !g_signing_contexts.compare_exchange_weak(seen, contexts)) {
  }
}

OpenSslCacheStats openssl_cache_stats() {
  ObjectCache& cache = object_cache();
  std::lock_guard lock(cache.mu);
  OpenSslCacheStats s;
  s.size = cache.ring.size();
  s.capacity = capacity_of(cache);
  s.builds = cache.builds;
  s.evictions = cache.evictions;
  s.verify_failed = cache.verify_failed.load(std::memory_order_relaxed);
  s.signing_contexts = g_signing_contexts.load(std::memory_order_relaxed);
  return s;
}

detail::CompactCertificate CertificateBuilder::to_compact(const Certificate& c) {
  detail::CompactCertificate f;
  f.names.assign(c.names_.begin(), c.names_.end());
  f.not_before_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(c.not_before_.time_since_epoch()).count();
  f.not_after_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(c.not_after_.time_since_epoch()).count();
  f.serial_hex = c.serial_hex_;
  f.issuer_cn = c.issuer_->cn;
  f.issuer_dn = c.issuer_->dn;
  f.key_type = c.key_type_;
  f.key_kind = c.key_kind_;
  f.key_format = c.key_format_;
  f.fingerprint = c.fingerprint_;
  f.leaf_der = c.leaf_der_;
  f.key_der = c.key_der_;
  f.chain = c.chain_;
  return f;
}

Result<std::shared_ptr<const Certificate>> CertificateBuilder::from_compact(const detail::CompactCertificate& f,
                                                                            const LoadOptions& options) {
  using std::chrono::system_clock;
  auto at = [](std::int64_t ns) {
    return system_clock::time_point(std::chrono::duration_cast<system_clock::duration>(std::chrono::nanoseconds(ns)));
  };
  const auto not_before = at(f.not_before_ns), not_after = at(f.not_after_ns);
  if (auto st = check_window(not_before, not_after, options); !st) return fail(st.error());
  if (f.names.empty()) return fail(Errc::invalid_input, "leaf certificate: no names");
  for (std::string_view n : f.names) {
    if (!is_valid_lookup_name(n)) {
      return fail(Errc::invalid_input, "leaf certificate: unusable name \"" + std::string(n) + "\"");
    }
  }
  const bool ec = f.key_type.starts_with("ec");
  if (f.key_format > kPkcs1 || (f.key_kind == KeyKind::ecdsa) != ec ||
      (!ec && !f.key_type.starts_with("rsa")) || f.leaf_der.empty() || f.key_der.empty()) {
    return fail(Errc::invalid_input, "compact certificate: inconsistent key fields");
  }
  for (const auto& inter : f.chain) {
    if (!inter) return fail(Errc::invalid_input, "compact certificate: missing intermediate");
  }
  // A snapshot holds a few issuers over and over: share this thread's last one.
  thread_local std::shared_ptr<const detail::IssuerNames> last_issuer;
  if (!last_issuer || last_issuer->cn != f.issuer_cn || last_issuer->dn != f.issuer_dn) {
    last_issuer = std::make_shared<const detail::IssuerNames>(
        detail::IssuerNames{std::string(f.issuer_cn), std::string(f.issuer_dn)});
  }
  auto cert = make();
  Certificate& c = *cert;
  c.names_.assign(f.names.begin(), f.names.end());
  c.not_before_ = not_before;
  c.not_after_ = not_after;
  c.serial_hex_ = f.serial_hex;
  c.issuer_ = last_issuer;
  c.key_type_ = f.key_type;
  c.key_kind_ = f.key_kind;
  c.key_format_ = f.key_format;
  c.fingerprint_ = f.fingerprint;
  c.id_ = hex(f.fingerprint.data(), f.fingerprint.size());
  c.leaf_der_ = f.leaf_der;
  c.key_der_ = f.key_der;
  c.chain_ = f.chain;
  c.verification_.store(Verification::pending, std::memory_order_relaxed);
  return std::shared_ptr<const Certificate>(std::move(cert));
}

namespace detail {

CompactCertificate to_compact(const Certificate& c) { return CertificateBuilder::to_compact(c); }

Result<std::shared_ptr<const Certificate>> from_compact(const CompactCertificate& c, const LoadOptions& options) {
  return CertificateBuilder::from_compact(c, options);
}

std::string intermediate_der(const Intermediate& inter) {
  unsigned char* out = nullptr;
  int n = i2d_X509(inter.x509(), &out);
  if (n <= 0) {
    ossl::drain_errors();
    return {};
  }
  std::string der(reinterpret_cast<const char*>(out), static_cast<std::size_t>(n));
  OPENSSL_free(out);
  return der;
}

}  // namespace detail

}  // namespace autotls::tlsreload
