#include "tlsreload/detail/client_hello.h"

namespace autotls::tlsreload::detail {
namespace {

// Reader walks a byte span; every read checks the remaining length first.
class Reader {
 public:
  explicit Reader(Bytes b) : b_(b) {}
  bool u8(unsigned& v) {
    if (b_.size() < 1) return false;
    v = b_[0];
    b_ = b_.subspan(1);
    return true;
  }
  bool u16(unsigned& v) {
    if (b_.size() < 2) return false;
    v = (unsigned{b_[0]} << 8) | b_[1];
    b_ = b_.subspan(2);
    return true;
  }
  bool bytes(std::size_t n, Bytes& out) {
    if (b_.size() < n) return false;
    out = b_.first(n);
    b_ = b_.subspan(n);
    return true;
  }
  bool empty() const { return b_.empty(); }

 private:
  Bytes b_;
};

}  // namespace

bool parse_server_name(Bytes ext, std::string_view& host) {
  host = {};
  Reader r(ext);
  unsigned list_len = 0;
  Bytes list;
  if (!r.u16(list_len) || list_len == 0 || !r.bytes(list_len, list) || !r.empty()) return false;
  Reader l(list);
  bool seen_host = false;
  while (!l.empty()) {
    unsigned type = 0, len = 0;
    Bytes name;
    if (!l.u8(type) || !l.u16(len) || !l.bytes(len, name)) return false;
    if (type != 0) continue;  // only host_name(0) is defined; skip unknown types
    // RFC 6066 §3: "The ServerNameList MUST NOT contain more than one name of the same
    // name_type." and HostName is opaque<1..2^16-1>.
    if (seen_host || len == 0) return false;
    seen_host = true;
    host = std::string_view(reinterpret_cast<const char*>(name.data()), name.size());
  }
  return true;
}

bool sigalgs_offer_ecdsa(Bytes ext, bool& ecdsa) {
  ecdsa = false;
  Reader r(ext);
  unsigned len = 0;
  Bytes list;
  if (!r.u16(len) || len < 2 || len % 2 != 0 || !r.bytes(len, list) || !r.empty()) return false;
  for (std::size_t i = 0; i < list.size(); i += 2) {
    unsigned scheme = (unsigned{list[i]} << 8) | list[i + 1];
    // ecdsa_secp256r1_sha256, ecdsa_secp384r1_sha384, ecdsa_secp521r1_sha512 (RFC 8446), and
    // ecdsa_sha1 (TLS 1.2 {sha1, ecdsa}). TLS 1.3 ties each scheme to a curve; we only ever serve
    // P-256 or P-384 ECDSA certificates to clients that list some ECDSA scheme, which every
    // real client lists together.
    if (scheme == 0x0403 || scheme == 0x0503 || scheme == 0x0603 || scheme == 0x0203) {
      ecdsa = true;
    }
  }
  return true;
}

bool alpn_offers(Bytes list, bool with_length_prefix, std::string_view protocol, bool& offered) {
  offered = false;
  Reader r(list);
  if (with_length_prefix) {
    unsigned len = 0;
    Bytes body;
    if (!r.u16(len) || len < 2 || !r.bytes(len, body) || !r.empty()) return false;
    r = Reader(body);
  }
  while (!r.empty()) {
    unsigned len = 0;
    Bytes name;
    if (!r.u8(len) || len == 0 || !r.bytes(len, name)) return false;
    if (std::string_view(reinterpret_cast<const char*>(name.data()), name.size()) == protocol) {
      offered = true;
    }
  }
  return true;
}

bool versions_offer_tls13(Bytes ext, bool& tls13) {
  tls13 = false;
  Reader r(ext);
  unsigned len = 0;
  Bytes list;
  if (!r.u8(len) || len < 2 || len % 2 != 0 || !r.bytes(len, list) || !r.empty()) return false;
  for (std::size_t i = 0; i < list.size(); i += 2) {
    if (list[i] == 0x03 && list[i + 1] == 0x04) tls13 = true;
  }
  return true;
}

}  // namespace autotls::tlsreload::detail
