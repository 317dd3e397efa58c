#include "acme/util/ec_key.h"

#include <algorithm>
#include <bit>
#include <cstdint>
#include <memory>
#include <optional>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/params.h>

#include "acme/util/der.h"

namespace autotls::ossl {

namespace {

// usable_ec_fields: an EC key on a named curve, with its embedded point and a scalar that fits.
bool usable_ec_fields(const std::optional<der::KeyFields>& k) {
  return k && k->key_nid == NID_X9_62_id_ecPublicKey && !k->public_key.empty() &&
         !k->ec_private.empty() && k->ec_private.size() <= 66 && OBJ_nid2sn(k->curve_nid);
}

// fromdata builds k into *out with EVP_PKEY_fromdata: a new key when *out is null, otherwise
// into the existing one (EVP_PKEY_fromdata then replaces its key data).
bool fromdata(const der::KeyFields& k, EVP_PKEY** out) {
  const char* group = OBJ_nid2sn(k.curve_nid);
  // OSSL_PARAM integers are in native byte order; the DER scalar is big-endian.
  unsigned char scalar[66];
  std::size_t n = k.ec_private.size();
  for (std::size_t i = 0; i < n; ++i) scalar[i] = static_cast<unsigned char>(k.ec_private[n - 1 - i]);
  if constexpr (std::endian::native == std::endian::big) std::reverse(scalar, scalar + n);
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, const_cast<char*>(group), 0),
      OSSL_PARAM_construct_BN(OSSL_PKEY_PARAM_PRIV_KEY, scalar, n),
      OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY,
                                        const_cast<char*>(k.public_key.data()), k.public_key.size()),
      OSSL_PARAM_construct_end(),
  };
  // One context per thread, reused: EVP_PKEY_CTX_new_from_name fetches the EC key manager
  // (name lookups under OpenSSL's locks, ~15 k instructions, 0.5 % of a first use;
  // docs/benchmarks.md, session 13); EVP_PKEY_fromdata_init resets the operation and keeps it.
  thread_local std::unique_ptr<EVP_PKEY_CTX, Free<EVP_PKEY_CTX_free>> ctx(
      EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr));
  bool ok = ctx && EVP_PKEY_fromdata_init(ctx.get()) == 1 &&
            EVP_PKEY_fromdata(ctx.get(), out, EVP_PKEY_KEYPAIR, params) == 1;
  OPENSSL_cleanse(scalar, sizeof scalar);
  ERR_clear_error();
  return ok;
}

}  // namespace

EvpPkeyPtr ec_key_from_der(std::string_view pem_name, std::string_view block) {
  auto k = der::parse_key(pem_name, block);
  if (!usable_ec_fields(k)) return nullptr;
  EVP_PKEY* raw = nullptr;
  if (!fromdata(*k, &raw)) return nullptr;
  return EvpPkeyPtr(raw);
}

bool ec_key_add_private(EVP_PKEY* pub, std::string_view pem_name, std::string_view block) {
  if (!pub || EVP_PKEY_get_base_id(pub) != EVP_PKEY_EC) return false;
  auto k = der::parse_key(pem_name, block);
  if (!usable_ec_fields(k)) return false;
  // The same curve...
  char group[64] = {};
  std::size_t n = 0;
  if (EVP_PKEY_get_group_name(pub, group, sizeof group, &n) != 1) return false;
  int nid = OBJ_sn2nid(group);
  if (nid == NID_undef) nid = EC_curve_nist2nid(group);
  // ...and the same point, in the same encoding (another encoding of it: false, the caller's
  // separate key and OpenSSL's own check then decide).
  unsigned char point[133];
  std::size_t len = 0;
  bool same = nid == k->curve_nid &&
              EVP_PKEY_get_octet_string_param(pub, OSSL_PKEY_PARAM_PUB_KEY, point, sizeof point, &len) == 1 &&
              std::string_view(reinterpret_cast<const char*>(point), len) == k->public_key;
  ERR_clear_error();
  if (!same) return false;
  EVP_PKEY* target = pub;
  return fromdata(*k, &target) && target == pub;
}

namespace {

void put_length(std::string& out, std::size_t n) {
  if (n < 0x80) {
    out += static_cast<char>(n);
  } else if (n <= 0xff) {
    out += '\x81';
    out += static_cast<char>(n);
  } else {
    out += '\x82';
    out += static_cast<char>(n >> 8);
    out += static_cast<char>(n & 0xff);
  }
}

// append_tlv appends tag, length and content to out. The buffers that hold the private scalar
// are reserved large enough up front (kReserve), so that no reallocation leaves a copy behind
// uncleansed.
void append_tlv(std::string& out, std::uint8_t tag, std::string_view content) {
  out += static_cast<char>(tag);
  put_length(out, content.size());
  out.append(content);
}

constexpr std::size_t kReserve = 512;  // a P-521 PKCS#8 key is 241 bytes

}  // namespace

std::string ec_key_to_pkcs8(EVP_PKEY* key) {
  if (!key || EVP_PKEY_get_base_id(key) != EVP_PKEY_EC) return {};
  char group[32] = {};
  std::size_t group_len = 0;
  if (EVP_PKEY_get_utf8_string_param(key, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group, &group_len) != 1) {
    ERR_clear_error();
    return {};
  }
  // The curve's OID (DER, with tag and length) and the order's length in bytes.
  const std::string_view name(group, group_len);
  std::string_view curve_oid;
  std::size_t scalar_len = 0;
  if (name == "prime256v1") {
    curve_oid = std::string_view("\x06\x08\x2a\x86\x48\xce\x3d\x03\x01\x07", 10);
    scalar_len = 32;
  } else if (name == "secp384r1") {
    curve_oid = std::string_view("\x06\x05\x2b\x81\x04\x00\x22", 7);
    scalar_len = 48;
  } else if (name == "secp521r1") {
    curve_oid = std::string_view("\x06\x05\x2b\x81\x04\x00\x23", 7);
    scalar_len = 66;
  } else {
    return {};
  }
  unsigned char point[1 + 2 * 66];
  std::size_t point_len = 0;
  BIGNUM* priv = nullptr;
  if (EVP_PKEY_get_octet_string_param(key, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, point, sizeof point, &point_len) != 1 ||
      point_len != 1 + 2 * scalar_len || point[0] != 0x04 ||
      EVP_PKEY_get_bn_param(key, OSSL_PKEY_PARAM_PRIV_KEY, &priv) != 1) {
    BN_clear_free(priv);
    ERR_clear_error();
    return {};
  }
  std::string scalar(scalar_len, '\0');
  const bool scalar_ok =
      BN_bn2binpad(priv, reinterpret_cast<unsigned char*>(scalar.data()), static_cast<int>(scalar_len)) ==
      static_cast<int>(scalar_len);
  BN_clear_free(priv);
  if (!scalar_ok) {
    OPENSSL_cleanse(scalar.data(), scalar.size());
    ERR_clear_error();
    return {};
  }
  // RFC 5915 ECPrivateKey { version 1, privateKey, [1] publicKey } inside RFC 5208
  // PrivateKeyInfo { version 0, AlgorithmIdentifier { id-ecPublicKey, namedCurve }, privateKey }.
  std::string bits(1, '\0');  // no unused bits
  bits.append(reinterpret_cast<const char*>(point), point_len);
  std::string public_part;
  append_tlv(public_part, 0x03, bits);
  std::string inner, ec_private, info, out;
  for (std::string* b : {&inner, &ec_private, &info, &out}) b->reserve(kReserve);
  inner.append("\x02\x01\x01", 3);
  append_tlv(inner, 0x04, scalar);
  append_tlv(inner, 0xa1, public_part);
  append_tlv(ec_private, 0x30, inner);
  info.append("\x02\x01\x00", 3);
  std::string algorithm("\x06\x07\x2a\x86\x48\xce\x3d\x02\x01", 9);
  algorithm.append(curve_oid);
  append_tlv(info, 0x30, algorithm);
  append_tlv(info, 0x04, ec_private);
  append_tlv(out, 0x30, info);
  for (std::string* b : {&scalar, &inner, &ec_private, &info}) OPENSSL_cleanse(b->data(), b->size());
  return out;
}

}  // namespace autotls::ossl
