#include "acme/types.h"

#include <doctest/doctest.h>

using autotls::acme::canonical_ip;
using autotls::acme::identifier_for;

TEST_SUITE("acme.types") {
  TEST_CASE("identifier_for tells an address from a DNS name") {
    CHECK(identifier_for("192.0.2.1").type == "ip");
    CHECK(identifier_for("2001:db8::1").type == "ip");
    CHECK(identifier_for("example.com").type == "dns");
    CHECK(identifier_for("*.example.com").type == "dns");
    CHECK(identifier_for("192.0.2").type == "dns");
  }

  TEST_CASE("canonical_ip is RFC 8738's text: dotted decimal, RFC 5952 for IPv6") {
    CHECK(canonical_ip("192.0.2.1") == "192.0.2.1");
    CHECK(canonical_ip("::ABCD") == "::abcd");
    CHECK(canonical_ip("0:0:0:0:0:0:0:1") == "::1");
    CHECK(canonical_ip("2001:0DB8:0000:0000:0001:0000:0000:0001") == "2001:db8::1:0:0:1");
    CHECK(canonical_ip("2001:db8:0:1:1:1:1:1") == "2001:db8:0:1:1:1:1:1");
    CHECK(canonical_ip("::ffff:192.0.2.1") == "::ffff:192.0.2.1");
    CHECK_FALSE(canonical_ip("example.com"));
    CHECK_FALSE(canonical_ip("192.0.2"));
    CHECK_FALSE(canonical_ip("[::1]"));
    CHECK_FALSE(canonical_ip(""));
  }
}
