#include "tlsreload/certificate.h"

#include <algorithm>
#include <cctype>
#include <cstring>
#include <ctime>

#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/pem.h>

#include "acme/util/openssl.h"
#include "tlsreload/detail/intern.h"

namespace autotls::tlsreload {

// CertificateBuilder is the one place allowed to fill a Certificate (it is a friend).
struct CertificateBuilder {
  static std::shared_ptr<Certificate> make() { return std::shared_ptr<Certificate>(new Certificate); }
  static Certificate& mut(Certificate& c) { return c; }
};

namespace {

// A PEM file bigger than this is not a certificate chain or a key; refuse before parsing.
constexpr std::size_t kMaxPemBytes = 1 << 20;

struct PemBlock {
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

Result<ossl::EvpPkeyPtr> parse_key(std::string_view key_pem) {
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
  const auto* p = reinterpret_cast<const unsigned char*>(key_block->der.data());
  const unsigned char* end = p + key_block->der.size();
  long len = static_cast<long>(key_block->der.size());
  ERR_clear_error();
  ossl::EvpPkeyPtr key;
  if (key_block->name == "PRIVATE KEY") {  // PKCS#8 (RFC 5208)
    std::unique_ptr<PKCS8_PRIV_KEY_INFO, ossl::Free<PKCS8_PRIV_KEY_INFO_free>> info(
        d2i_PKCS8_PRIV_KEY_INFO(nullptr, &p, len));
    if (info) key.reset(EVP_PKCS82PKEY(info.get()));
  } else if (key_block->name == "EC PRIVATE KEY") {  // SEC1 (RFC 5915)
    key.reset(d2i_PrivateKey(EVP_PKEY_EC, nullptr, &p, len));
  } else if (key_block->name == "RSA PRIVATE KEY") {  // PKCS#1 (RFC 8017)
    key.reset(d2i_PrivateKey(EVP_PKEY_RSA, nullptr, &p, len));
  } else {
    return fail(Errc::invalid_input, "private key: unsupported format \"" + key_block->name + "\"");
  }
  if (!key) {
    return fail(Errc::invalid_input, "private key: cannot parse the " + key_block->name +
                                         " block (" + ossl::drain_errors() + ")");
  }
  if (p != end) return fail(Errc::invalid_input, "private key: trailing bytes after the DER key");
  return key;
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

Result<std::vector<std::string>> san_names(X509* leaf) {
  int crit = 0;
  ossl::GeneralNamesPtr sans(static_cast<GENERAL_NAMES*>(
      X509_get_ext_d2i(leaf, NID_subject_alt_name, &crit, nullptr)));
  std::vector<std::string> dns, ips;
  for (int i = 0; sans && i < sk_GENERAL_NAME_num(sans.get()); ++i) {
    const GENERAL_NAME* gn = sk_GENERAL_NAME_value(sans.get(), i);
    if (gn->type == GEN_DNS) {
      const ASN1_IA5STRING* s = gn->d.dNSName;
      std::string name(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                       static_cast<std::size_t>(ASN1_STRING_length(s)));
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
    } else if (gn->type == GEN_IPADD) {
      const ASN1_OCTET_STRING* s = gn->d.iPAddress;
      char buf[INET6_ADDRSTRLEN] = {};
      int len = ASN1_STRING_length(s);
      const unsigned char* p = ASN1_STRING_get0_data(s);
      if (len == 4) {
        inet_ntop(AF_INET, p, buf, sizeof buf);
      } else if (len == 16) {
        inet_ntop(AF_INET6, p, buf, sizeof buf);
      } else {
        return fail(Errc::invalid_input, "leaf certificate: iPAddress SAN of length " +
                                             std::to_string(len));
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

bool is_ldh_label(std::string_view label) {
  if (label.empty() || label.size() > 63) return false;
  for (char c : label) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
    if (!ok) return false;
  }
  return true;
}

}  // namespace

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

Result<std::shared_ptr<const Certificate>> Certificate::from_pem(std::string_view chain_pem,
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
  auto key = parse_key(key_pem);
  if (!key) return fail(key.error());
  auto kind = classify_key(key->get());
  if (!kind) return fail(kind.error());

  X509* leaf = certs.front().get();
  ERR_clear_error();
  if (X509_check_private_key(leaf, key->get()) != 1) {
    ossl::drain_errors();
    return fail(Errc::invalid_input, "private key does not match the leaf certificate");
  }

  // Each link must be issued by the next one. Checked here, not left to clients, because a
  // misordered or foreign chain fails only on some clients and would otherwise go unnoticed.
  for (std::size_t i = 0; i + 1 < certs.size(); ++i) {
    X509* child = certs[i].get();
    X509* parent = certs[i + 1].get();
    std::string link = "certificate chain: certificate " + describe(i + 1, parent) +
                       " did not issue certificate " + describe(i, child);
    if (X509_NAME_cmp(X509_get_issuer_name(child), X509_get_subject_name(parent)) != 0) {
      return fail(Errc::invalid_input, link + ": issuer name differs (wrong order or wrong chain)");
    }
    EVP_PKEY* parent_key = X509_get0_pubkey(parent);
    if (!parent_key || X509_verify(child, parent_key) != 1) {
      ossl::drain_errors();
      return fail(Errc::invalid_input, link + ": signature does not verify");
    }
  }

  const Clock& clock = options.clock ? *options.clock : system_clock();
  auto now = clock.now();
  auto not_before = to_time_point(X509_get0_notBefore(leaf), "notBefore");
  if (!not_before) return fail(not_before.error());
  auto not_after = to_time_point(X509_get0_notAfter(leaf), "notAfter");
  if (!not_after) return fail(not_after.error());
  // Only the leaf's window is enforced: an expired cross-signed root at the end of a chain is
  // common (and harmless to clients that build a shorter path), so refusing it would do harm.
  if (now > *not_after) {
    return fail(Errc::invalid_input, "leaf certificate expired: notAfter " +
                                         iso8601(*not_after) + " is before now " + iso8601(now));
  }
  if (now < *not_before && !options.allow_not_yet_valid) {
    return fail(Errc::invalid_input, "leaf certificate not yet valid: notBefore " +
                                         iso8601(*not_before) + " is after now " + iso8601(now));
  }

  auto names = san_names(leaf);
  if (!names) return fail(names.error());

  auto cert = CertificateBuilder::make();
  Certificate& c = *cert;
  c.names_ = std::move(*names);
  c.not_before_ = *not_before;
  c.not_after_ = *not_after;
  c.key_kind_ = kind->first;
  c.key_type_ = std::move(kind->second);
  c.issuer_cn_ = name_cn(X509_get_issuer_name(leaf));
  c.issuer_dn_ = name_dn(X509_get_issuer_name(leaf));
  {
    ossl::BignumPtr bn(ASN1_INTEGER_to_BN(X509_get0_serialNumber(leaf), nullptr));
    if (!bn) return fail(ossl::error("leaf certificate: serial number"));
    char* h = BN_bn2hex(bn.get());
    if (!h) return fail(ossl::error("leaf certificate: serial number"));
    c.serial_hex_ = h;
    OPENSSL_free(h);
    for (char& ch : c.serial_hex_) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  }
  unsigned int md_len = 0;
  if (X509_digest(leaf, EVP_sha256(), c.fingerprint_.data(), &md_len) != 1 ||
      md_len != c.fingerprint_.size()) {
    return fail(ossl::error("leaf certificate: SHA-256 fingerprint"));
  }
  c.id_ = hex(c.fingerprint_.data(), c.fingerprint_.size());

  c.chain_stack_ = sk_X509_new_reserve(nullptr, static_cast<int>(certs.size()));
  if (!c.chain_stack_) return fail(ossl::error("certificate chain: sk_X509_new_reserve"));
  for (std::size_t i = 1; i < certs.size(); ++i) {
    auto shared = detail::intern(std::move(certs[i]));
    if (!shared) return fail(shared.error());
    // The stack borrows the X509; chain_ keeps it alive for the Certificate's lifetime.
    sk_X509_push(c.chain_stack_, (*shared)->x509());
    c.chain_.push_back(std::move(*shared));
  }
  c.leaf_ = certs.front().release();
  c.key_ = key->release();
  return std::shared_ptr<const Certificate>(std::move(cert));
}

Certificate::~Certificate() {
  sk_X509_free(chain_stack_);  // borrowing stack: the X509s belong to chain_
  X509_free(leaf_);
  EVP_PKEY_free(key_);
}

}  // namespace autotls::tlsreload
