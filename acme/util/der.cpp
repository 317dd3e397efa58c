#include "acme/util/der.h"

#include <array>
#include <cstring>

#include <openssl/obj_mac.h>

#include "acme/util/base64.h"

namespace autotls::der {
namespace {

// ---- PEM ----

constexpr std::array<std::int8_t, 256> make_b64_table() {
  std::array<std::int8_t, 256> t{};
  for (auto& v : t) v = -1;
  const char* alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  for (int i = 0; i < 64; ++i) t[static_cast<unsigned char>(alphabet[i])] = static_cast<std::int8_t>(i);
  return t;
}
constexpr auto kB64 = make_b64_table();

// b64_decode decodes base64 with whitespace anywhere (PEM lines). Four characters at a time
// while they are all alphabet characters (the inside of a PEM line), one at a time around line
// breaks and padding: a bulk load decodes 200,000 files, and a byte at a time was most of the
// load's user CPU time (docs/benchmarks.md).
bool b64_decode(std::string_view in, std::string& out) {
  out.resize(in.size() / 4 * 3 + 3);
  auto* o = reinterpret_cast<unsigned char*>(out.data());
  std::size_t n = 0;
  const auto* p = reinterpret_cast<const unsigned char*>(in.data());
  const auto* end = p + in.size();
  std::uint32_t acc = 0;
  int bits = 0;
  int pad = 0;
  while (p != end) {
    if (bits == 0 && pad == 0 && end - p >= 4) {
      int a = kB64[p[0]], b = kB64[p[1]], c = kB64[p[2]], d = kB64[p[3]];
      if ((a | b | c | d) >= 0) {
        auto v = static_cast<std::uint32_t>(a << 18 | b << 12 | c << 6 | d);
        o[n] = static_cast<unsigned char>(v >> 16);
        o[n + 1] = static_cast<unsigned char>(v >> 8);
        o[n + 2] = static_cast<unsigned char>(v);
        n += 3;
        p += 4;
        continue;
      }
    }
    unsigned char c = *p++;
    if (c == '\n' || c == '\r' || c == ' ' || c == '\t') continue;
    if (c == '=') {
      ++pad;
      continue;
    }
    if (pad != 0) return false;  // data after padding
    int v = kB64[c];
    if (v < 0) return false;
    acc = (acc << 6) | static_cast<std::uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      o[n++] = static_cast<unsigned char>((acc >> bits) & 0xff);
    }
  }
  out.resize(n);
  return pad <= 2 && bits < 6 && n != 0;
}

// ---- DER ----

struct Tlv {
  std::uint8_t tag = 0;
  std::string_view content;
};

// Reader walks a sequence of TLVs. Only definite lengths up to 2^24 are accepted.
struct Reader {
  std::string_view rest;

  bool empty() const { return rest.empty(); }
  std::uint8_t peek() const { return rest.empty() ? 0 : static_cast<std::uint8_t>(rest[0]); }

  bool next(Tlv& out, std::string_view* whole = nullptr) {
    if (rest.size() < 2) return false;
    auto b = [&](std::size_t i) { return static_cast<std::uint8_t>(rest[i]); };
    out.tag = b(0);
    if ((out.tag & 0x1f) == 0x1f) return false;  // multi-byte tags: never in what we read
    std::size_t len = b(1);
    std::size_t hdr = 2;
    if (len & 0x80) {
      std::size_t n = len & 0x7f;
      if (n == 0 || n > 3 || rest.size() < 2 + n) return false;
      len = 0;
      for (std::size_t i = 0; i < n; ++i) len = (len << 8) | b(2 + i);
      hdr += n;
    }
    if (rest.size() - hdr < len) return false;
    out.content = rest.substr(hdr, len);
    if (whole) *whole = rest.substr(0, hdr + len);
    rest.remove_prefix(hdr + len);
    return true;
  }

  bool expect(std::uint8_t tag, std::string_view& content, std::string_view* whole = nullptr) {
    Tlv t;
    if (!next(t, whole) || t.tag != tag) return false;
    content = t.content;
    return true;
  }
};

constexpr std::uint8_t kSeq = 0x30, kInt = 0x02, kBits = 0x03, kOctets = 0x04, kOid = 0x06,
                       kNull = 0x05, kUtcTime = 0x17, kGenTime = 0x18, kBool = 0x01;

// OID contents (without tag and length).
constexpr std::string_view kOidEcPublicKey("\x2a\x86\x48\xce\x3d\x02\x01", 7);
constexpr std::string_view kOidRsa("\x2a\x86\x48\x86\xf7\x0d\x01\x01\x01", 9);
constexpr std::string_view kOidP256("\x2a\x86\x48\xce\x3d\x03\x01\x07", 8);
constexpr std::string_view kOidP384("\x2b\x81\x04\x00\x22", 5);
constexpr std::string_view kOidP521("\x2b\x81\x04\x00\x23", 5);
constexpr std::string_view kOidSan("\x55\x1d\x11", 3);
constexpr std::string_view kOidAki("\x55\x1d\x23", 3);

int curve_nid(std::string_view oid) {
  if (oid == kOidP256) return NID_X9_62_prime256v1;
  if (oid == kOidP384) return NID_secp384r1;
  if (oid == kOidP521) return NID_secp521r1;
  return 0;
}

bool bit_string_bytes(std::string_view content, std::string_view& bytes) {
  if (content.empty() || content[0] != 0) return false;  // whole bytes only
  bytes = content.substr(1);
  return true;
}

// days_from_civil: days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
// algorithm, public domain: howardhinnant.github.io/date_algorithms.html).
std::int64_t days_from_civil(std::int64_t y, unsigned m, unsigned d) {
  y -= m <= 2;
  const std::int64_t era = (y >= 0 ? y : y - 399) / 400;
  const auto yoe = static_cast<unsigned>(y - era * 400);
  const unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
  const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + static_cast<std::int64_t>(doe) - 719468;
}

// RFC 5280 §4.1.2.5: UTCTime YYMMDDHHMMSSZ (YY < 50 is 20YY) and GeneralizedTime
// YYYYMMDDHHMMSSZ, always in Z and with seconds.
bool parse_time(const Tlv& t, std::int64_t& out) {
  std::string_view s = t.content;
  std::size_t year_digits = t.tag == kUtcTime ? 2 : t.tag == kGenTime ? 4 : 0;
  if (year_digits == 0 || s.size() != year_digits + 11 || s.back() != 'Z') return false;
  for (std::size_t i = 0; i + 1 < s.size(); ++i) {
    if (s[i] < '0' || s[i] > '9') return false;
  }
  auto num = [&](std::size_t pos, std::size_t n) {
    int v = 0;
    for (std::size_t i = 0; i < n; ++i) v = v * 10 + (s[pos + i] - '0');
    return v;
  };
  int year = num(0, year_digits);
  if (year_digits == 2) year += year < 50 ? 2000 : 1900;
  std::size_t p = year_digits;
  int mon = num(p, 2), day = num(p + 2, 2), hh = num(p + 4, 2), mm = num(p + 6, 2), ss = num(p + 8, 2);
  if (mon < 1 || mon > 12 || day < 1 || day > 31 || hh > 23 || mm > 59 || ss > 60) return false;
  out = days_from_civil(year, static_cast<unsigned>(mon), static_cast<unsigned>(day)) * 86400 +
        hh * 3600 + mm * 60 + ss;
  return true;
}

bool parse_spki(std::string_view spki, int& key_nid, int& curve, std::string_view& pub) {
  Reader r{spki};
  std::string_view alg, bits;
  if (!r.expect(kSeq, alg) || !r.expect(kBits, bits) || !r.empty()) return false;
  Reader a{alg};
  std::string_view oid;
  if (!a.expect(kOid, oid)) return false;
  if (oid == kOidEcPublicKey) {
    std::string_view curve_oid;
    if (!a.expect(kOid, curve_oid) || !a.empty()) return false;
    key_nid = NID_X9_62_id_ecPublicKey;
    curve = curve_nid(curve_oid);
    if (curve == 0) return false;
  } else if (oid == kOidRsa) {
    std::string_view null;
    if (!a.expect(kNull, null) || !a.empty()) return false;
    key_nid = NID_rsaEncryption;
  } else {
    return false;
  }
  return bit_string_bytes(bits, pub);
}

bool parse_general_names(std::string_view seq, std::vector<std::pair<int, std::string_view>>& out) {
  Reader r{seq};
  while (!r.empty()) {
    Tlv t;
    if (!r.next(t)) return false;
    if (t.tag == 0x82) out.emplace_back(2, t.content);       // [2] dNSName
    else if (t.tag == 0x87) out.emplace_back(7, t.content);  // [7] iPAddress
  }
  return true;
}

bool parse_ec_private(std::string_view seq, int& curve, std::string_view& pub,
                      std::string_view& scalar) {
  // RFC 5915 §3: ECPrivateKey ::= SEQUENCE { version INTEGER { ecPrivkeyVer1(1) },
  //   privateKey OCTET STRING, parameters [0] ECParameters OPTIONAL,
  //   publicKey [1] BIT STRING OPTIONAL }
  Reader r{seq};
  std::string_view version, priv;
  if (!r.expect(kInt, version) || version != std::string_view("\x01", 1)) return false;
  if (!r.expect(kOctets, priv) || priv.empty()) return false;
  scalar = priv;
  while (!r.empty()) {
    Tlv t;
    if (!r.next(t)) return false;
    Reader inner{t.content};
    if (t.tag == 0xa0) {
      std::string_view oid;
      if (!inner.expect(kOid, oid) || !inner.empty()) return false;
      int c = curve_nid(oid);
      if (c == 0 || (curve != 0 && c != curve)) return false;
      curve = c;
    } else if (t.tag == 0xa1) {
      std::string_view bits;
      if (!inner.expect(kBits, bits) || !inner.empty() || !bit_string_bytes(bits, pub)) return false;
    } else {
      return false;
    }
  }
  return curve != 0;
}

bool parse_rsa_private(std::string_view seq, std::string_view& n, std::string_view& e) {
  // RFC 8017 A.1.2: RSAPrivateKey ::= SEQUENCE { version, modulus, publicExponent, ... }
  Reader r{seq};
  std::string_view version;
  if (!r.expect(kInt, version) || version != std::string_view("\x00", 1)) return false;
  return r.expect(kInt, n) && r.expect(kInt, e);
}

}  // namespace

std::optional<std::vector<PemDer>> fast_pem_blocks(std::string_view text) {
  std::vector<PemDer> out;
  constexpr std::string_view kBegin = "-----BEGIN ";
  for (std::size_t pos = 0;;) {
    std::size_t b = text.find(kBegin, pos);
    if (b == std::string_view::npos) break;
    if (b != 0 && text[b - 1] != '\n') return std::nullopt;
    std::size_t name_start = b + kBegin.size();
    std::size_t name_end = text.find("-----", name_start);
    if (name_end == std::string_view::npos) return std::nullopt;
    std::string_view name = text.substr(name_start, name_end - name_start);
    std::size_t body = name_end + 5;
    if (body < text.size() && text[body] == '\r') ++body;
    if (body >= text.size() || text[body] != '\n') return std::nullopt;
    ++body;
    std::string end_line = "-----END " + std::string(name) + "-----";
    std::size_t e = text.find(end_line, body);
    if (e == std::string_view::npos) return std::nullopt;
    std::string_view b64 = text.substr(body, e - body);
    if (b64.find(':') != std::string_view::npos || b64.find('-') != std::string_view::npos) {
      return std::nullopt;  // RFC 1421 headers or a nested marker: leave it to OpenSSL
    }
    PemDer block;
    block.name = std::string(name);
    if (!b64_decode(b64, block.der)) return std::nullopt;
    out.push_back(std::move(block));
    pos = e + end_line.size();
  }
  if (out.empty()) return std::nullopt;
  return out;
}

std::optional<LeafFields> parse_leaf(std::string_view der) {
  LeafFields f;
  Reader top{der};
  std::string_view cert, tbs, sig_alg, sig;
  if (!top.expect(kSeq, cert) || !top.empty()) return std::nullopt;
  Reader c{cert};
  if (!c.expect(kSeq, tbs) || !c.expect(kSeq, sig_alg) || !c.expect(kBits, sig) || !c.empty()) {
    return std::nullopt;
  }
  Reader t{tbs};
  std::string_view version_wrap, serial, alg, validity, spki;
  if (t.peek() == 0xa0) {
    Reader v{};
    if (!t.expect(0xa0, version_wrap)) return std::nullopt;
    v.rest = version_wrap;
    std::string_view version;
    if (!v.expect(kInt, version) || version != std::string_view("\x02", 1)) return std::nullopt;
  } else {
    return std::nullopt;  // v1 certificates have no extensions, hence no SANs: OpenSSL says so
  }
  if (!t.expect(kInt, serial) || serial.empty()) return std::nullopt;
  if (static_cast<std::uint8_t>(serial[0]) & 0x80) return std::nullopt;  // negative: rare, slow path
  std::string_view ignored;
  if (!t.expect(kSeq, alg) || !t.expect(kSeq, ignored, &f.issuer_der) ||
      !t.expect(kSeq, validity) || !t.expect(kSeq, ignored, &f.subject_der) ||
      !t.expect(kSeq, spki)) {
    return std::nullopt;
  }
  {
    Reader v{validity};
    Tlv nb, na;
    if (!v.next(nb) || !v.next(na) || !v.empty()) return std::nullopt;
    if (!parse_time(nb, f.not_before) || !parse_time(na, f.not_after)) return std::nullopt;
  }
  if (!parse_spki(spki, f.key_nid, f.curve_nid, f.public_key)) return std::nullopt;
  bool seen_san = false, seen_aki = false;
  while (!t.empty()) {
    Tlv x;
    if (!t.next(x)) return std::nullopt;
    if (x.tag == 0x81 || x.tag == 0x82) continue;  // issuer/subject unique IDs
    if (x.tag != 0xa3) return std::nullopt;
    Reader wrap{x.content};
    std::string_view exts;
    if (!wrap.expect(kSeq, exts) || !wrap.empty()) return std::nullopt;
    Reader e{exts};
    while (!e.empty()) {
      std::string_view ext, oid, value;
      if (!e.expect(kSeq, ext)) return std::nullopt;
      Reader one{ext};
      if (!one.expect(kOid, oid)) return std::nullopt;
      if (one.peek() == kBool) {
        std::string_view crit;
        if (!one.expect(kBool, crit)) return std::nullopt;
      }
      if (!one.expect(kOctets, value) || !one.empty()) return std::nullopt;
      if (oid == kOidAki) {
        // AuthorityKeyIdentifier ::= SEQUENCE { keyIdentifier [0] IMPLICIT OCTET STRING
        // OPTIONAL, authorityCertIssuer [1], authorityCertSerialNumber [2] } (RFC 5280 4.2.1.1)
        if (seen_aki) return std::nullopt;  // OpenSSL refuses a repeated extension
        seen_aki = true;
        Reader av{value};
        std::string_view aki;
        if (!av.expect(kSeq, aki) || !av.empty()) return std::nullopt;
        Reader ak{aki};
        if (!ak.empty() && ak.peek() == 0x80) {
          if (!ak.expect(0x80, f.aki_key_id)) return std::nullopt;
        }
        while (!ak.empty()) {  // the other two fields: well-formed, not read
          Tlv other;
          if (!ak.next(other) || (other.tag != 0xa1 && other.tag != 0x82)) return std::nullopt;
        }
        continue;
      }
      if (oid != kOidSan) continue;
      if (seen_san) return std::nullopt;  // OpenSSL refuses a repeated extension
      seen_san = true;
      Reader sv{value};
      std::string_view names;
      if (!sv.expect(kSeq, names) || !sv.empty() || !parse_general_names(names, f.sans)) {
        return std::nullopt;
      }
    }
  }
  f.serial_der = serial;
  // BN_bn2hex: big-endian bytes, leading zero bytes dropped, two digits per byte; 0 is "0".
  std::size_t skip = 0;
  while (skip + 1 < serial.size() && serial[skip] == 0) ++skip;
  static constexpr char kDigits[] = "0123456789abcdef";
  if (serial.size() - skip == 1 && serial[skip] == 0) {
    f.serial_hex = "0";
  } else {
    for (std::size_t i = skip; i < serial.size(); ++i) {
      auto byte = static_cast<std::uint8_t>(serial[i]);
      f.serial_hex.push_back(kDigits[byte >> 4]);
      f.serial_hex.push_back(kDigits[byte & 0xf]);
    }
  }
  return f;
}

std::optional<KeyFields> parse_key(std::string_view pem_name, std::string_view der) {
  KeyFields k;
  Reader top{der};
  std::string_view seq;
  if (!top.expect(kSeq, seq) || !top.empty()) return std::nullopt;
  if (pem_name == "EC PRIVATE KEY") {
    k.key_nid = NID_X9_62_id_ecPublicKey;
    if (!parse_ec_private(seq, k.curve_nid, k.public_key, k.ec_private)) return std::nullopt;
    return k;
  }
  if (pem_name == "RSA PRIVATE KEY") {
    k.key_nid = NID_rsaEncryption;
    if (!parse_rsa_private(seq, k.rsa_n, k.rsa_e)) return std::nullopt;
    return k;
  }
  if (pem_name != "PRIVATE KEY") return std::nullopt;
  // RFC 5208 §5: PrivateKeyInfo ::= SEQUENCE { version, privateKeyAlgorithm, privateKey
  // OCTET STRING, attributes [0] OPTIONAL } (RFC 5958 adds [1] publicKey; rare: slow path).
  Reader r{seq};
  std::string_view version, alg, priv;
  if (!r.expect(kInt, version) || version != std::string_view("\x00", 1)) return std::nullopt;
  if (!r.expect(kSeq, alg) || !r.expect(kOctets, priv)) return std::nullopt;
  if (r.peek() == 0xa0) {
    std::string_view attrs;
    if (!r.expect(0xa0, attrs)) return std::nullopt;
  }
  if (!r.empty()) return std::nullopt;
  Reader a{alg};
  std::string_view oid;
  if (!a.expect(kOid, oid)) return std::nullopt;
  Reader inner{priv};
  std::string_view inner_seq;
  if (!inner.expect(kSeq, inner_seq) || !inner.empty()) return std::nullopt;
  if (oid == kOidEcPublicKey) {
    std::string_view curve_oid;
    if (!a.expect(kOid, curve_oid) || !a.empty()) return std::nullopt;
    k.key_nid = NID_X9_62_id_ecPublicKey;
    k.curve_nid = curve_nid(curve_oid);
    if (k.curve_nid == 0 || !parse_ec_private(inner_seq, k.curve_nid, k.public_key, k.ec_private)) return std::nullopt;
    return k;
  }
  if (oid == kOidRsa) {
    k.key_nid = NID_rsaEncryption;
    if (!parse_rsa_private(inner_seq, k.rsa_n, k.rsa_e)) return std::nullopt;
    return k;
  }
  return std::nullopt;
}

bool split_rsa_public(std::string_view der, std::string_view& n, std::string_view& e) {
  Reader top{der};
  std::string_view seq;
  if (!top.expect(kSeq, seq) || !top.empty()) return false;
  Reader r{seq};
  return r.expect(kInt, n) && r.expect(kInt, e) && r.empty();
}

std::optional<bool> key_matches_leaf(const KeyFields& key, const LeafFields& leaf) {
  if (key.key_nid != leaf.key_nid) return false;
  if (key.key_nid == NID_X9_62_id_ecPublicKey) {
    if (key.curve_nid != leaf.curve_nid) return false;
    if (key.public_key.empty()) return std::nullopt;  // SEC1 allows omitting it: slow path
    // Both in the same (uncompressed) form compare as bytes; a different form: slow path.
    if (key.public_key.empty() || leaf.public_key.empty() ||
        key.public_key[0] != leaf.public_key[0]) {
      return std::nullopt;
    }
    return key.public_key == leaf.public_key;
  }
  std::string_view n, e;
  if (!split_rsa_public(leaf.public_key, n, e)) return std::nullopt;
  return n == key.rsa_n && e == key.rsa_e;
}

int rsa_bits(std::string_view n) {
  std::size_t i = 0;
  while (i < n.size() && n[i] == 0) ++i;
  if (i == n.size()) return 0;
  auto first = static_cast<std::uint8_t>(n[i]);
  int bits = 0;
  while (first) {
    ++bits;
    first >>= 1;
  }
  return static_cast<int>((n.size() - i - 1) * 8) + bits;
}

std::optional<std::string> ari_cert_id(std::string_view chain_pem) {
  auto blocks = fast_pem_blocks(chain_pem);
  if (!blocks || blocks->empty() || (*blocks)[0].name != "CERTIFICATE") return std::nullopt;
  auto leaf = parse_leaf((*blocks)[0].der);
  if (!leaf || leaf->aki_key_id.empty() || leaf->serial_der.empty()) return std::nullopt;
  return base64url_encode(leaf->aki_key_id) + "." + base64url_encode(leaf->serial_der);
}

}  // namespace autotls::der
