#pragma once

// dns-01 by RFC 2136 dynamic update, signed with TSIG (RFC 8945).
//
// A small, self-contained DNS client for one job: add and delete the TXT records of dns-01
// challenges at an authoritative server that accepts TSIG-signed UPDATE messages (BIND 9,
// Knot, PowerDNS, ...). Messages go over UDP; a truncated answer, or none, is retried over TCP.
// Every request is signed and every answer's TSIG is verified before its result is believed.

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "acme/client.h"
#include "acme/util/error.h"

namespace autotls::tlsreload::dns {

// TsigKey is a shared secret for TSIG: its name (a domain name, e.g. "acme-key."), the HMAC
// algorithm ("hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224" or "hmac-sha1") and
// the raw secret bytes.
struct TsigKey {
  std::string name;
  std::string algorithm = "hmac-sha256";
  std::string secret;
};

// parse_tsig_key reads "name:algorithm:base64secret", or, when text names a readable file,
// that file in BIND's key format (`key "name" { algorithm hmac-sha256; secret "..."; };`, as
// tsig-keygen writes it). Errors never contain the secret.
Result<TsigKey> parse_tsig_key(const std::string& text);
// parse_bind_key_file parses the text of a BIND key file (the first key statement).
Result<TsigKey> parse_bind_key_text(std::string_view text);

// Wire-format building blocks, exposed for tests.
namespace wire {
inline constexpr uint16_t kTypeA = 1, kTypeSoa = 6, kTypeTxt = 16, kTypeTsig = 250;
inline constexpr uint16_t kClassIn = 1, kClassNone = 254, kClassAny = 255;
inline constexpr int kOpcodeQuery = 0, kOpcodeUpdate = 5;

// encode_name writes a domain name in uncompressed, lower-cased wire form ("a.b" and "a.b."
// are the same name). Errc::invalid_input for an empty label or a label over 63 octets.
Result<std::string> encode_name(std::string_view name);

struct Record {
  std::string name;  // presentation form, with trailing dot
  uint16_t type = 0, klass = 0;
  uint32_t ttl = 0;
  std::string rdata;        // raw RDATA
  size_t offset = 0;        // where the record starts in the message
  size_t rdata_offset = 0;  // where its RDATA starts in the message
};

struct Message {
  uint16_t id = 0, flags = 0;
  int opcode() const { return (flags >> 11) & 0xf; }
  int rcode() const { return flags & 0xf; }
  bool truncated() const { return (flags & 0x0200) != 0; }
  std::vector<std::string> questions;  // names of the question (zone) section
  std::vector<Record> answers, authority, additional;
};

// parse reads a whole DNS message (name compression allowed). Errc::bad_response if it is
// malformed.
Result<Message> parse(std::string_view bytes);

// rcode_name is "NOERROR", "REFUSED", "NOTAUTH", ... (or "RCODE n").
std::string rcode_name(int rcode);
}  // namespace wire

// UpdateRequest builds an RFC 2136 UPDATE for one zone: each add/del is one update RR.
struct TxtChange {
  bool add = true;     // add the TXT record, or delete exactly this record (class NONE)
  std::string name;    // owner, e.g. "_acme-challenge.example.com"
  std::string value;   // TXT data (one character-string, up to 255 octets)
  uint32_t ttl = 60;
};
Result<std::string> build_update(uint16_t id, std::string_view zone, const std::vector<TxtChange>& changes);
Result<std::string> build_query(uint16_t id, std::string_view name, uint16_t type);

// sign appends a TSIG record to message (RFC 8945 §4.3.3): MAC over the message and the TSIG
// variables, ARCOUNT incremented. request_mac is empty for a request; for a response it is the
// request's MAC (§4.3.1 / §5.3). Returns the MAC it produced.
Result<std::string> sign(std::string& message, const TsigKey& key, std::chrono::system_clock::time_point now,
                         std::string_view request_mac = {}, uint16_t fudge = 300);

// verify checks the TSIG record that ends a response to a request whose MAC was request_mac:
// present, last, same key name and algorithm, a MAC that matches and a time within fudge.
// A server that rejected our key answers with a TSIG error (BADKEY, BADSIG, BADTIME) and no
// MAC: that is reported as such (Errc::protocol naming the key and the fix).
Status verify(std::string_view response, const TsigKey& key, std::string_view request_mac,
              std::chrono::system_clock::time_point now);

// Server is where updates go: "host" or "host:port" (default port 53), "[v6]:port".
struct Server {
  std::string host;
  int port = 53;
};
Result<Server> parse_server(const std::string& text);

// Client sends signed queries and updates to one server.
class Client {
 public:
  Client(Server server, TsigKey key, std::chrono::milliseconds timeout = std::chrono::seconds(5))
      : server_(std::move(server)), key_(std::move(key)), timeout_(timeout) {}

  // find_zone asks the server for the SOA that covers name (its answer or authority section)
  // and returns the zone's name with a trailing dot.
  Result<std::string> find_zone(std::string_view name);
  // update sends one signed UPDATE to the zone and checks the signed answer: NOERROR, or an
  // Errc::protocol error naming the rcode (REFUSED, NOTAUTH, NOTZONE, ...) and what to check.
  Status update(std::string_view zone, const std::vector<TxtChange>& changes);

 private:
  // exchange sends a signed message (UDP, then TCP when truncated or unanswered) and returns
  // the verified answer.
  Result<wire::Message> exchange(std::string message, uint16_t id);

  Server server_;
  TsigKey key_;
  std::chrono::milliseconds timeout_;
};

// Rfc2136Solver answers dns-01 by adding the TXT record at the server (zone found by an SOA
// query unless given) and deleting exactly that record on cleanup. Other challenge types fail.
class Rfc2136Solver : public acme::Solver {
 public:
  Rfc2136Solver(Server server, TsigKey key, std::string zone = {},
                std::chrono::milliseconds timeout = std::chrono::seconds(5))
      : client_(std::move(server), std::move(key), timeout), zone_(std::move(zone)) {}
  Status present(const acme::Identifier& identifier, const acme::Challenge& challenge,
                 std::string_view key_authorization) override;
  void cleanup(const acme::Identifier& identifier, const acme::Challenge& challenge,
               std::string_view key_authorization) override;

 private:
  Result<std::string> zone_for(const std::string& record);
  Client client_;
  std::string zone_;
};

}  // namespace autotls::tlsreload::dns
