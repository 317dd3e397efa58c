#pragma once

// Bounds-checked parsers for the ClientHello extensions the SNI hook reads. Everything here
// comes straight from an unauthenticated peer: every length is checked before it is used, and
// nothing allocates.

#include <cstdint>
#include <span>
#include <string_view>

namespace autotls::tlsreload::detail {

using Bytes = std::span<const unsigned char>;

// parse_server_name reads the server_name extension body (RFC 6066 §3):
//   struct { NameType name_type; select (name_type) { case host_name: HostName; } name; }
//   ServerName; struct { ServerName server_name_list<1..2^16-1> } ServerNameList;
// and sets host to the host_name entry (a view into ext), or to "" when there is none.
// Returns false when the extension is malformed (lengths overrun, trailing bytes, an empty or
// repeated host_name).
bool parse_server_name(Bytes ext, std::string_view& host);

// sigalgs_offer_ecdsa reads the signature_algorithms extension body (RFC 8446 §4.2.3,
// RFC 5246 §7.4.1.4.1): SignatureScheme supported_signature_algorithms<2..2^16-2>; and sets
// ecdsa when an ECDSA scheme is listed. Returns false when malformed.
bool sigalgs_offer_ecdsa(Bytes ext, bool& ecdsa);

// alpn_offers reads an ALPN protocol list (RFC 7301 §3.1:
// ProtocolName protocol_name_list<2..2^16-1>, each ProtocolName<1..2^8-1>) and sets offered
// when protocol is in it. with_length_prefix is true for the extension body and false for the
// bare list OpenSSL passes to the ALPN select callback. Returns false when malformed.
bool alpn_offers(Bytes list, bool with_length_prefix, std::string_view protocol, bool& offered);

// versions_offer_tls13 reads the supported_versions extension of a ClientHello (RFC 8446
// §4.2.1: ProtocolVersion versions<2..254>) and sets tls13 when 0x0304 is listed.
bool versions_offer_tls13(Bytes ext, bool& tls13);

}  // namespace autotls::tlsreload::detail
