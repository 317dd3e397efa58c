#include "acme/util/base64.h"

#include <string>

#include <doctest/doctest.h>

using autotls::base64_decode;
using autotls::base64_encode;
using autotls::base64url_decode;
using autotls::base64url_encode;

TEST_SUITE("acme.base64") {

TEST_CASE("base64 encodes the RFC 4648 section 10 test vectors") {
  struct Vector {
    const char* in;
    const char* std;
    const char* url;
  };
  // RFC 4648 §10; base64url is the same without "=" padding (RFC 7515 §2).
  const Vector vectors[] = {
      {"", "", ""},
      {"f", "Zg==", "Zg"},
      {"fo", "Zm8=", "Zm8"},
      {"foo", "Zm9v", "Zm9v"},
      {"foob", "Zm9vYg==", "Zm9vYg"},
      {"fooba", "Zm9vYmE=", "Zm9vYmE"},
      {"foobar", "Zm9vYmFy", "Zm9vYmFy"},
  };
  for (const auto& v : vectors) {
    CAPTURE(v.in);
    CHECK(base64_encode(v.in) == v.std);
    CHECK(base64url_encode(v.in) == v.url);
    CHECK(base64_decode(v.std) == std::optional<std::string>(v.in));
    CHECK(base64url_decode(v.url) == std::optional<std::string>(v.in));
  }
}

TEST_CASE("base64url uses the URL-safe alphabet of RFC 7515 appendix C") {
  // RFC 7515 Appendix C: the octets [3, 236, 255, 224, 193] encode as "A-z_4ME".
  const std::string octets("\x03\xec\xff\xe0\xc1", 5);
  CHECK(base64url_encode(octets) == "A-z_4ME");
  CHECK(base64url_decode("A-z_4ME") == octets);
  CHECK(base64_encode(octets) == "A+z/4ME=");
  CHECK(base64_decode("A+z/4ME=") == octets);
}

TEST_CASE("base64url decode accepts optional padding") {
  CHECK(base64url_decode("Zg==") == std::optional<std::string>("f"));
  CHECK(base64url_decode("Zg") == std::optional<std::string>("f"));
  CHECK(base64url_decode("Zm8=") == std::optional<std::string>("fo"));
  CHECK(base64_decode("Zm8") == std::optional<std::string>("fo"));
}

TEST_CASE("base64 decode rejects characters of the other alphabet and garbage") {
  CHECK_FALSE(base64url_decode("A+z/4ME").has_value());
  CHECK_FALSE(base64_decode("A-z_4ME").has_value());
  CHECK_FALSE(base64url_decode("Zm 9v").has_value());
  CHECK_FALSE(base64url_decode("Zm9v\n").has_value());
  CHECK_FALSE(base64url_decode("Zg==Zg").has_value());
  CHECK_FALSE(base64url_decode("not base64!").has_value());
  CHECK_FALSE(base64url_decode(std::string("Zm\0v", 4)).has_value());
}

TEST_CASE("base64 decode rejects an impossible length") {
  // 4n+1 characters cannot come from any octet string.
  CHECK_FALSE(base64url_decode("Z").has_value());
  CHECK_FALSE(base64url_decode("Zm9vZ").has_value());
  CHECK_FALSE(base64_decode("Zm9vZ").has_value());
}

TEST_CASE("base64 round-trips every octet value at every length") {
  std::string all;
  for (int i = 0; i < 256; ++i) all += char(i);
  for (size_t len = 0; len <= all.size(); ++len) {
    std::string in = all.substr(all.size() - len);
    CAPTURE(len);
    std::string url = base64url_encode(in);
    CHECK(url.find_first_of("+/=") == std::string::npos);
    CHECK(url.size() == (len * 4 + 2) / 3);
    REQUIRE(base64url_decode(url).has_value());
    CHECK(*base64url_decode(url) == in);
    std::string std_text = base64_encode(in);
    CHECK(std_text.size() % 4 == 0);
    REQUIRE(base64_decode(std_text).has_value());
    CHECK(*base64_decode(std_text) == in);
  }
}

}  // TEST_SUITE
