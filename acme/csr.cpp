#include "acme/csr.h"

#include <arpa/inet.h>

#include <string>

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/x509.h>

#include "acme/util/openssl.h"

namespace autotls::acme {
namespace {

// RFC 5280 Appendix A.1: ub-common-name INTEGER ::= 64.
constexpr size_t kMaxCommonName = 64;

// dns_name_ok accepts what can go in a dNSName: printable ASCII without spaces (RFC 5280
// §4.2.1.6: IA5String in "preferred name syntax"; IDNs must already be A-labels, RFC 8555
// §7.1.4). Full hostname syntax is the CA's to judge.
bool dns_name_ok(std::string_view name) {
  if (name.empty() || name.size() > 253 + 1) return false;
  for (char c : name) {
    auto u = static_cast<unsigned char>(c);
    if (u <= 0x20 || u >= 0x7f) return false;
  }
  return true;
}

// ip_octets parses an IPv4 or IPv6 literal into its 4 or 16 network-order octets (RFC 5280
// §4.2.1.6: "the octet string MUST contain exactly four octets [or] sixteen octets").
std::optional<std::string> ip_octets(const std::string& text) {
  unsigned char buf[16];
  if (inet_pton(AF_INET, text.c_str(), buf) == 1) {
    return std::string(reinterpret_cast<const char*>(buf), 4);
  }
  if (inet_pton(AF_INET6, text.c_str(), buf) == 1) {
    return std::string(reinterpret_cast<const char*>(buf), 16);
  }
  return std::nullopt;
}

// add_general_name appends a dNSName or iPAddress for identifier to names.
Status add_general_name(GENERAL_NAMES* names, const Identifier& id) {
  GENERAL_NAME* gn = GENERAL_NAME_new();
  if (!gn) return fail(ossl::error("CSR"));
  if (id.type == "dns") {
    if (!dns_name_ok(id.value)) {
      GENERAL_NAME_free(gn);
      return fail(Errc::invalid_input, "CSR: invalid DNS name \"" + id.value + "\"");
    }
    ASN1_IA5STRING* s = ASN1_IA5STRING_new();
    if (!s || ASN1_STRING_set(s, id.value.data(), int(id.value.size())) != 1) {
      ASN1_IA5STRING_free(s);
      GENERAL_NAME_free(gn);
      return fail(ossl::error("CSR"));
    }
    GENERAL_NAME_set0_value(gn, GEN_DNS, s);
  } else if (id.type == "ip") {
    // RFC 8738 §3: "The iPAddress [...] MUST be in the CSR".
    auto octets = ip_octets(id.value);
    if (!octets) {
      GENERAL_NAME_free(gn);
      return fail(Errc::invalid_input, "CSR: invalid IP address \"" + id.value + "\"");
    }
    ASN1_OCTET_STRING* s = ASN1_OCTET_STRING_new();
    if (!s || ASN1_OCTET_STRING_set(s, reinterpret_cast<const unsigned char*>(octets->data()),
                                    int(octets->size())) != 1) {
      ASN1_OCTET_STRING_free(s);
      GENERAL_NAME_free(gn);
      return fail(ossl::error("CSR"));
    }
    GENERAL_NAME_set0_value(gn, GEN_IPADD, s);
  } else {
    GENERAL_NAME_free(gn);
    return fail(Errc::invalid_input, "CSR: unsupported identifier type \"" + id.type + "\"");
  }
  if (sk_GENERAL_NAME_push(names, gn) == 0) {
    GENERAL_NAME_free(gn);
    return fail(ossl::error("CSR"));
  }
  return {};
}

// set_public_key puts key's public half into req. An EC key's algorithm and point are set
// directly (X509_PUBKEY_set0_param): X509_REQ_set_pubkey encodes the key through OSSL_ENCODER and
// decodes the result back through OSSL_DECODER in OpenSSL 3.0, ~5 M instructions, nine tenths of
// the CSR (callgrind of `autotls issue`, docs/benchmarks.md, session 14). RSA keys, and an EC
// key whose point cannot be read, take X509_REQ_set_pubkey.
bool set_public_key(X509_REQ* req, const PrivateKey& key) {
  if (key.type() == KeyType::ec256 || key.type() == KeyType::ec384) {
    unsigned char point[1 + 2 * 48];
    std::size_t len = 0;
    X509_PUBKEY* pub = X509_REQ_get_X509_PUBKEY(req);
    if (pub && EVP_PKEY_get_octet_string_param(key.evp(), OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, point,
                                               sizeof point, &len) == 1) {
      auto* copy = static_cast<unsigned char*>(OPENSSL_memdup(point, len));
      const int curve = key.type() == KeyType::ec256 ? NID_X9_62_prime256v1 : NID_secp384r1;
      // The OIDs are OpenSSL's static objects; set0 takes the copy of the point.
      if (copy && X509_PUBKEY_set0_param(pub, OBJ_nid2obj(NID_X9_62_id_ecPublicKey), V_ASN1_OBJECT,
                                         OBJ_nid2obj(curve), copy, static_cast<int>(len)) == 1) {
        return true;
      }
      OPENSSL_free(copy);
    }
    ERR_clear_error();
  }
  return X509_REQ_set_pubkey(req, key.evp()) == 1;
}

}  // namespace

Result<std::string> make_csr(const PrivateKey& key, const std::vector<Identifier>& identifiers) {
  if (identifiers.empty()) return fail(Errc::invalid_input, "CSR: no identifiers");

  // RFC 8555 §7.4: "The CSR MUST indicate the exact same set of requested identifiers as the
  // initial newOrder request. Identifiers of type "dns" MUST appear either in the commonName
  // portion of the requested subject name or in an extensionRequest attribute [...] requesting
  // a subjectAltName extension, or both." All go in the SAN; the CN is a courtesy copy.
  ossl::GeneralNamesPtr names(sk_GENERAL_NAME_new_null());
  if (!names) return fail(ossl::error("CSR"));
  const Identifier* common_name = nullptr;
  for (const auto& id : identifiers) {
    if (auto st = add_general_name(names.get(), id); !st) return fail(st.error());
    if (!common_name && id.type == "dns") common_name = &id;
  }

  ossl::X509ReqPtr req(X509_REQ_new());
  // RFC 2986 §4.1: version is 0 (v1).
  if (!req || X509_REQ_set_version(req.get(), 0) != 1) return fail(ossl::error("CSR"));

  if (common_name && common_name->value.size() <= kMaxCommonName) {
    X509_NAME* subject = X509_REQ_get_subject_name(req.get());
    if (X509_NAME_add_entry_by_NID(
            subject, NID_commonName, MBSTRING_ASC,
            reinterpret_cast<const unsigned char*>(common_name->value.data()),
            int(common_name->value.size()), -1, 0) != 1) {
      return fail(ossl::error("CSR: subject"));
    }
  }

  STACK_OF(X509_EXTENSION)* exts = sk_X509_EXTENSION_new_null();
  if (!exts) return fail(ossl::error("CSR"));
  // RFC 5280 §4.2.1.6: the SAN "MUST be critical" only when the subject is empty.
  int critical = X509_NAME_entry_count(X509_REQ_get_subject_name(req.get())) == 0 ? 1 : 0;
  bool ok = X509V3_add1_i2d(&exts, NID_subject_alt_name, names.get(), critical,
                            X509V3_ADD_DEFAULT) == 1 &&
            X509_REQ_add_extensions(req.get(), exts) == 1;
  sk_X509_EXTENSION_pop_free(exts, X509_EXTENSION_free);
  if (!ok) return fail(ossl::error("CSR: subjectAltName"));

  if (!set_public_key(req.get(), key)) return fail(ossl::error("CSR: public key"));
  // A P-384 key is paired with SHA-384 (RFC 5758 §3.2 ecdsa-with-SHA384); otherwise SHA-256.
  const EVP_MD* md = key.type() == KeyType::ec384 ? EVP_sha384() : EVP_sha256();
  if (X509_REQ_sign(req.get(), key.evp(), md) <= 0) return fail(ossl::error("CSR: sign"));

  unsigned char* der = nullptr;
  int len = i2d_X509_REQ(req.get(), &der);
  if (len <= 0) return fail(ossl::error("CSR: encode"));
  std::string out(reinterpret_cast<const char*>(der), size_t(len));
  OPENSSL_free(der);
  return out;
}

}  // namespace autotls::acme
