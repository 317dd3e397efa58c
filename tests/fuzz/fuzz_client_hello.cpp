// libFuzzer target: the client-hello extension parsers (tlsreload/detail/client_hello.h), which
// read bytes any TLS client sends before a handshake. No input may crash them or read outside
// it; ASan and UBSan check both. tools/fuzz runs it.

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "tlsreload/detail/client_hello.h"

using namespace autotls::tlsreload::detail;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // A copy of exactly `size` bytes on the heap, so ASan sees any read past the extension.
  std::vector<unsigned char> copy(data, data + size);
  Bytes ext{copy.data(), copy.size()};
  std::string_view host;
  bool flag = false;
  (void)parse_server_name(ext, host);
  (void)sigalgs_offer_ecdsa(ext, flag);
  (void)versions_offer_tls13(ext, flag);
  (void)alpn_offers(ext, true, "acme-tls/1", flag);
  (void)alpn_offers(ext, false, "http/1.1", flag);
  return 0;
}
