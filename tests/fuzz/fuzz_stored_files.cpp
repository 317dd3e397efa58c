// libFuzzer target: files autotls reads back from disk that a person, another tool or a crash
// may have changed: a certificate's meta.json (CertificateState::from_json) and a BIND TSIG key
// file (parse_bind_key_text). The first byte picks the parser, the rest is the file. Every
// input must end in a value or an error; an exception that escapes, a crash or undefined
// behaviour is a finding (ASan, UBSan). tools/fuzz runs it.

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "tlsreload/dns_update.h"
#include "tlsreload/manager.h"

using namespace autotls::tlsreload;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  // A heap copy of exactly the input, so ASan sees a read one byte past it.
  std::string text(reinterpret_cast<const char*>(data + 1), size - 1);
  switch (data[0] % 2) {
    case 0: {
      auto st = CertificateState::from_json(text);
      // What it read, it writes back, and reads back the same way.
      if (st && !CertificateState::from_json(st->to_json())) __builtin_trap();
      break;
    }
    case 1: (void)dns::parse_bind_key_text(text); break;
  }
  return 0;
}
