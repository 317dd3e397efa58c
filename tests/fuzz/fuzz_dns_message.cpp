// libFuzzer target: the DNS messages the RFC 2136 client (dns-01) reads from a DNS server: the
// wire-format parser (names with compression pointers, record sections) and the TSIG check of a
// response (RFC 8945), which parses the message again, finds its last record and recomputes
// the MAC. Every input must end in a message or an error; a crash, a read outside the input or
// undefined behaviour is a finding (ASan, UBSan). tools/fuzz runs it.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "tlsreload/dns_update.h"

using namespace autotls::tlsreload;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // A heap copy of exactly the input, so ASan sees a read one byte past it.
  std::string bytes(reinterpret_cast<const char*>(data), size);
  auto msg = dns::wire::parse(bytes);
  if (msg) {
    for (const auto& section : {&msg->answers, &msg->authority, &msg->additional}) {
      for (const auto& rr : *section) {
        // What parse reports must lie inside the message.
        if (rr.offset > bytes.size() || rr.rdata_offset > bytes.size() ||
            rr.rdata.size() > bytes.size() - rr.rdata_offset) {
          __builtin_trap();
        }
      }
    }
    (void)dns::wire::rcode_name(msg->rcode());
  }
  static const dns::TsigKey key{"acme-key.", "hmac-sha256", std::string(32, 'k')};
  const auto now = std::chrono::system_clock::time_point(std::chrono::seconds(1'800'000'000));
  (void)dns::verify(bytes, key, std::string(32, 'm'), now);
  (void)dns::verify(bytes, key, "", now);
  return 0;
}
