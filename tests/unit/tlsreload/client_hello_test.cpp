#include <doctest/doctest.h>

#include <vector>

#include "tlsreload/detail/client_hello.h"

using namespace autotls::tlsreload::detail;

namespace {
Bytes b(const std::vector<unsigned char>& v) { return {v.data(), v.size()}; }
}  // namespace

TEST_SUITE("tlsreload.client_hello") {

TEST_CASE("client hello server_name parsing is bounds checked") {
  std::string_view host;
  // list length 8: host_name(0), length 5, "a.com"
  std::vector<unsigned char> ok = {0, 8, 0, 0, 5, 'a', '.', 'c', 'o', 'm'};
  REQUIRE(parse_server_name(b(ok), host));
  CHECK(host == "a.com");

  // Every strict prefix is malformed, never an over-read.
  for (std::size_t n = 0; n < ok.size(); ++n) {
    std::vector<unsigned char> cut(ok.begin(), ok.begin() + static_cast<long>(n));
    CHECK_FALSE(parse_server_name(b(cut), host));
  }
  std::vector<unsigned char> overrun = {0, 8, 0, 0, 9, 'a', '.', 'c', 'o', 'm'};
  CHECK_FALSE(parse_server_name(b(overrun), host));
  std::vector<unsigned char> trailing = {0, 8, 0, 0, 5, 'a', '.', 'c', 'o', 'm', 0};
  CHECK_FALSE(parse_server_name(b(trailing), host));
  std::vector<unsigned char> twice = {0, 12, 0, 0, 1, 'a', 0, 0, 1, 'b', 0, 0, 0, 0};
  twice[1] = 10;
  twice.resize(12);
  CHECK_FALSE(parse_server_name(b(twice), host));
  std::vector<unsigned char> empty_name = {0, 3, 0, 0, 0};
  CHECK_FALSE(parse_server_name(b(empty_name), host));
  std::vector<unsigned char> other_type = {0, 4, 7, 0, 1, 'x'};
  REQUIRE(parse_server_name(b(other_type), host));
  CHECK(host.empty());
}

TEST_CASE("client hello signature algorithms detect ECDSA") {
  bool ecdsa = true;
  std::vector<unsigned char> rsa_only = {0, 4, 0x08, 0x04, 0x04, 0x01};
  REQUIRE(sigalgs_offer_ecdsa(b(rsa_only), ecdsa));
  CHECK_FALSE(ecdsa);
  std::vector<unsigned char> with_p256 = {0, 4, 0x08, 0x04, 0x04, 0x03};
  REQUIRE(sigalgs_offer_ecdsa(b(with_p256), ecdsa));
  CHECK(ecdsa);
  std::vector<unsigned char> with_p384 = {0, 2, 0x05, 0x03};
  REQUIRE(sigalgs_offer_ecdsa(b(with_p384), ecdsa));
  CHECK(ecdsa);
  std::vector<unsigned char> odd = {0, 3, 0x04, 0x03, 0x01};
  CHECK_FALSE(sigalgs_offer_ecdsa(b(odd), ecdsa));
  std::vector<unsigned char> overrun = {0, 6, 0x04, 0x03};
  CHECK_FALSE(sigalgs_offer_ecdsa(b(overrun), ecdsa));
  CHECK_FALSE(sigalgs_offer_ecdsa(Bytes{}, ecdsa));
}

TEST_CASE("client hello ALPN lists") {
  bool offered = false;
  // h2, acme-tls/1 with the extension's 2-byte length prefix
  std::vector<unsigned char> ext = {0, 14, 2, 'h', '2', 10, 'a', 'c', 'm', 'e', '-', 't', 'l', 's', '/', '1'};
  REQUIRE(alpn_offers(b(ext), true, "acme-tls/1", offered));
  CHECK(offered);
  REQUIRE(alpn_offers(b(ext), true, "http/1.1", offered));
  CHECK_FALSE(offered);
  std::vector<unsigned char> bare(ext.begin() + 2, ext.end());
  REQUIRE(alpn_offers(b(bare), false, "h2", offered));
  CHECK(offered);
  std::vector<unsigned char> overrun = {0, 14, 2, 'h', '2', 20, 'a'};
  CHECK_FALSE(alpn_offers(b(overrun), true, "h2", offered));
  std::vector<unsigned char> zero_len = {0, 1, 0};
  CHECK_FALSE(alpn_offers(b(zero_len), true, "h2", offered));
}

TEST_CASE("client hello supported versions") {
  bool tls13 = false;
  std::vector<unsigned char> v = {4, 0x03, 0x04, 0x03, 0x03};
  REQUIRE(versions_offer_tls13(b(v), tls13));
  CHECK(tls13);
  std::vector<unsigned char> v12 = {2, 0x03, 0x03};
  REQUIRE(versions_offer_tls13(b(v12), tls13));
  CHECK_FALSE(tls13);
  std::vector<unsigned char> bad = {5, 0x03, 0x04};
  CHECK_FALSE(versions_offer_tls13(b(bad), tls13));
}

}  // TEST_SUITE
