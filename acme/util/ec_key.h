#pragma once

// EC private keys to and from PKCS#8 / SEC1 DER without OpenSSL 3.0's encoder and decoder
// frameworks. OpenSSL's readers (PEM_read_bio_PrivateKey, d2i_PrivateKey) and writers
// (PEM_write_bio_PrivateKey, i2d_PrivateKey) go through OSSL_DECODER / OSSL_ENCODER, which
// enumerate every implementation under global locks: ~5.7 M instructions to read one P-256 key
// and ~3.5 M to write one (callgrind of `autotls issue`, docs/benchmarks.md, session 14), where
// taking the key apart and EVP_PKEY_fromdata take ~0.2 M. Both functions give up (nullptr / an
// empty string) on anything they do not fully handle, and callers then use OpenSSL's path.

#include <string>
#include <string_view>

#include "acme/util/openssl.h"

namespace autotls::ossl {

// ec_key_from_der builds the key of a "PRIVATE KEY" (PKCS#8) or "EC PRIVATE KEY" (SEC1) DER
// block from its parts (curve, private scalar, the public point embedded in the DER) with
// EVP_PKEY_fromdata. OpenSSL's reader also takes the embedded point as the public key without
// recomputing it, so the key is the same. nullptr when the DER is not an EC key on a named
// curve with an embedded point, or fromdata refuses it.
EvpPkeyPtr ec_key_from_der(std::string_view pem_name, std::string_view block);

// ec_key_add_private makes pub, an EC public key (in autotls, a certificate's own: the EVP_PKEY
// that X509_get0_pubkey returns), the key pair of a "PRIVATE KEY" or "EC PRIVATE KEY" DER block,
// in place: EVP_PKEY_fromdata, given an existing key, replaces its key data. Only when the
// block's curve and embedded public point are pub's own (the point compared as bytes, in the
// same encoding: X509_check_private_key's test), so the public half stays what it was. false
// otherwise, with pub untouched (EVP_PKEY_fromdata replaces the data only after a complete
// import); the caller then keeps a separate key. Why: SSL_use_cert_and_key checks the key
// against the certificate with EVP_PKEY_eq, which returns at once for one object and otherwise
// compares two copies of the curve field by field (docs/benchmarks.md, session 15).
bool ec_key_add_private(EVP_PKEY* pub, std::string_view pem_name, std::string_view block);

// ec_key_to_pkcs8 writes key as unencrypted PKCS#8 DER, byte for byte what OpenSSL 3.0 writes
// (PrivateKeyInfo, id-ecPublicKey with the named curve, an ECPrivateKey with the scalar padded
// to the order's length and the public point, no [0] parameters). Empty when key is not an EC
// key on P-256, P-384 or P-521, or its parts cannot be read.
std::string ec_key_to_pkcs8(EVP_PKEY* key);

}  // namespace autotls::ossl
