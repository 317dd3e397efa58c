#pragma once

// A fast path for reading certificate and key files: just enough PEM and DER to get a leaf's
// metadata, a private key's parts and to check that they belong together, without OpenSSL's
// parsers. Used by tlsreload (bulk loads, the manager's ARI id), acme (keys) and the CLI.
//
// Why: in OpenSSL 3.0, d2i_X509 decodes the SubjectPublicKeyInfo through the provider decoder
// machinery and d2i of a private key does the same; together they cost hundreds of
// microseconds per certificate, ten times the 20 us per certificate a 100,000-certificate load
// on two cores can afford (docs/benchmarks.md).
//
// Everything here only ACCEPTS what it fully understands: any input it does not recognise
// makes it return std::nullopt, and the caller then takes the full OpenSSL path, which gives
// the proper error message. So the fast path can be incomplete, never more permissive than
// "well-formed DER for the fields we read". The parts of the DER it skips (signature, other
// extensions) are parsed by OpenSSL when the certificate is first used (Certificate::verify).

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace autotls::der {

// PemDer is one decoded PEM block.
struct PemDer {
  std::string name;  // "CERTIFICATE", "PRIVATE KEY", ...
  std::string der;
};

// fast_pem_blocks decodes the PEM blocks of text (text outside blocks ignored). nullopt for
// anything unusual: RFC 1421 headers, bad base64, an unterminated block, no block at all.
std::optional<std::vector<PemDer>> fast_pem_blocks(std::string_view text);

// LeafFields are what Certificate needs from a leaf, read straight from its DER.
struct LeafFields {
  std::string serial_hex;            // as BN_bn2hex, lower-cased
  std::string_view issuer_der;       // the issuer Name, a view into the DER
  std::string_view subject_der;      // the subject Name, a view into the DER
  std::int64_t not_before = 0;       // seconds since the epoch
  std::int64_t not_after = 0;
  int key_nid = 0;                   // NID_X9_62_id_ecPublicKey or NID_rsaEncryption
  int curve_nid = 0;                 // for EC keys
  std::string_view public_key;       // EC: the point; RSA: the RSAPublicKey DER
  // SANs: (type, bytes) with type 2 = dNSName, 7 = iPAddress; other types are not listed.
  std::vector<std::pair<int, std::string_view>> sans;
  std::string_view serial_der;  // the serial's INTEGER content octets, as encoded
  // The Authority Key Identifier's keyIdentifier; empty without one (RFC 9773's ARI id needs it).
  std::string_view aki_key_id;
};

// parse_leaf reads der (which must be exactly one Certificate). Views point into der.
std::optional<LeafFields> parse_leaf(std::string_view der);

// ari_cert_id is RFC 9773's certificate identifier (base64url(AKI keyIdentifier) "."
// base64url(serial content octets)) of the first certificate of chain_pem, read without
// OpenSSL's parsers (acme::ari_cert_id parses with d2i_X509: ~0.7 ms in OpenSSL 3.0). nullopt
// when the fast path cannot tell (no AKI keyIdentifier, anything parse_leaf refuses): the caller
// then uses acme::ari_cert_id.
std::optional<std::string> ari_cert_id(std::string_view chain_pem);

// KeyFields describe a private key from its DER (PKCS#8, SEC1 or PKCS#1 as named by pem_name).
struct KeyFields {
  int key_nid = 0;
  int curve_nid = 0;
  std::string_view public_key;  // EC: the embedded point; RSA: empty (see rsa_n / rsa_e)
  std::string_view ec_private;  // EC: the private scalar (big-endian octets); secret
  std::string_view rsa_n;       // RSA modulus and exponent INTEGER contents
  std::string_view rsa_e;
};
std::optional<KeyFields> parse_key(std::string_view pem_name, std::string_view der);

// key_matches_leaf compares the public halves, as X509_check_private_key does, on the bytes.
// nullopt when it cannot tell (e.g. an EC key without its embedded public point).
std::optional<bool> key_matches_leaf(const KeyFields& key, const LeafFields& leaf);

// rsa_bits is the bit length of an RSA modulus given as INTEGER content bytes.
int rsa_bits(std::string_view n);

// RSAPublicKey DER -> (n, e) contents.
bool split_rsa_public(std::string_view der, std::string_view& n, std::string_view& e);

}  // namespace autotls::der
