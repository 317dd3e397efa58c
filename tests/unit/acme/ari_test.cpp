#include "acme/ari.h"

#include <chrono>
#include <optional>
#include <random>
#include <string>

#include <doctest/doctest.h>
#include <openssl/pem.h>

#include "acme/key.h"
#include "acme/util/openssl.h"
#include "acme/util/der.h"

namespace {

using autotls::Errc;
using autotls::acme::KeyType;
using autotls::acme::PrivateKey;
using autotls::acme::RenewalInfo;
using std::chrono::system_clock;
using namespace std::chrono_literals;
namespace ossl = autotls::ossl;

const PrivateKey& signing_key() {
  static PrivateKey key = *PrivateKey::generate(KeyType::ec256);
  return key;
}

// make_cert builds a certificate with the given serial (hex, positive) and, when aki is not
// empty, an Authority Key Identifier whose keyIdentifier is aki.
ossl::X509Ptr make_cert(const char* serial_hex, const std::string& aki) {
  ossl::X509Ptr cert(X509_new());
  REQUIRE(cert);
  REQUIRE(X509_set_version(cert.get(), X509_VERSION_3) == 1);
  BIGNUM* bn = nullptr;
  REQUIRE(BN_hex2bn(&bn, serial_hex) > 0);
  ossl::BignumPtr serial(bn);
  REQUIRE(BN_to_ASN1_INTEGER(serial.get(), X509_get_serialNumber(cert.get())) != nullptr);
  ossl::X509NamePtr name(X509_NAME_new());
  REQUIRE(X509_NAME_add_entry_by_NID(name.get(), NID_commonName, MBSTRING_ASC,
                                     reinterpret_cast<const unsigned char*>("ari.test"), -1, -1,
                                     0) == 1);
  REQUIRE(X509_set_subject_name(cert.get(), name.get()) == 1);
  REQUIRE(X509_set_issuer_name(cert.get(), name.get()) == 1);
  REQUIRE(ASN1_TIME_set_string_X509(X509_getm_notBefore(cert.get()), "20250101000000Z") == 1);
  REQUIRE(ASN1_TIME_set_string_X509(X509_getm_notAfter(cert.get()), "20250401000000Z") == 1);
  REQUIRE(X509_set_pubkey(cert.get(), signing_key().evp()) == 1);
  if (!aki.empty()) {
    ossl::AuthorityKeyIdPtr akid(AUTHORITY_KEYID_new());
    REQUIRE(akid);
    akid->keyid = ASN1_OCTET_STRING_new();
    REQUIRE(ASN1_OCTET_STRING_set(akid->keyid, reinterpret_cast<const unsigned char*>(aki.data()),
                                  int(aki.size())) == 1);
    REQUIRE(X509_add1_ext_i2d(cert.get(), NID_authority_key_identifier, akid.get(), 0,
                              X509V3_ADD_DEFAULT) == 1);
  }
  REQUIRE(X509_sign(cert.get(), signing_key().evp(), EVP_sha256()) > 0);
  return cert;
}

std::string to_pem(X509* cert) {
  ossl::BioPtr bio(BIO_new(BIO_s_mem()));
  REQUIRE(PEM_write_bio_X509(bio.get(), cert) == 1);
  char* data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, size_t(len));
}

std::string to_der(X509* cert) {
  unsigned char* der = nullptr;
  int len = i2d_X509(cert, &der);
  REQUIRE(len > 0);
  std::string out(reinterpret_cast<char*>(der), size_t(len));
  OPENSSL_free(der);
  return out;
}

// RFC 9773 §4.1 example: AKI keyIdentifier
// 69:88:5B:6B:87:46:40:41:E1:B3:7B:84:7B:A0:AE:2C:DE:01:C8:D4.
const std::string kRfcAki("\x69\x88\x5B\x6B\x87\x46\x40\x41\xE1\xB3\x7B\x84\x7B\xA0\xAE\x2C"
                          "\xDE\x01\xC8\xD4",
                          20);

system_clock::time_point utc(int y, unsigned m, unsigned d, int hh = 0, int mm = 0, int ss = 0) {
  using namespace std::chrono;
  return sys_days(year(y) / month(m) / day(d)) + hours(hh) + minutes(mm) + seconds(ss);
}

RenewalInfo must_parse(std::string_view body) {
  auto r = autotls::acme::parse_renewal_info(body);
  REQUIRE_MESSAGE(r.has_value(), (r ? "" : r.error().message));
  return *r;
}

}  // namespace

TEST_SUITE("acme.ari") {

TEST_CASE("ari_cert_id reproduces the RFC 9773 section 4.1 example") {
  // Serial 00:87:65:43:21: the DER content keeps the leading zero of a positive integer whose
  // high bit is set.
  auto cert = make_cert("87654321", kRfcAki);
  auto id = autotls::acme::ari_cert_id(to_pem(cert.get()));
  REQUIRE_MESSAGE(id.has_value(), (id ? "" : id.error().message));
  CHECK(*id == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE");
}

TEST_CASE("ari_cert_id accepts DER and uses the first certificate of a PEM chain") {
  auto leaf = make_cert("87654321", kRfcAki);
  auto other = make_cert("01", std::string(20, '\x11'));
  CHECK(autotls::acme::ari_cert_id(to_der(leaf.get())) ==
        std::string("aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"));
  std::string chain = "leaf:\n" + to_pem(leaf.get()) + to_pem(other.get());
  CHECK(autotls::acme::ari_cert_id(chain) == std::string("aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"));
  CHECK(autotls::acme::ari_cert_id(to_pem(other.get())) ==
        std::string("ERERERERERERERERERERERERERE.AQ"));
}

TEST_CASE("ari_cert_id encodes serials without a sign octet when none is needed") {
  // 0x7f needs no leading zero; a 20-octet serial with the high bit clear stays 20 octets.
  auto cert = make_cert("7F", kRfcAki);
  auto id = autotls::acme::ari_cert_id(to_pem(cert.get()));
  REQUIRE(id.has_value());
  CHECK(id->substr(id->find('.') + 1) == "fw");
  auto big = make_cert("0102030405060708090A0B0C0D0E0F1011121314", kRfcAki);
  id = autotls::acme::ari_cert_id(to_pem(big.get()));
  REQUIRE(id.has_value());
  CHECK(id->substr(id->find('.') + 1) == "AQIDBAUGBwgJCgsMDQ4PEBESExQ");
}

TEST_CASE("the DER fast path gives the same ARI id as OpenSSL's parse or says it cannot tell") {
  // tlsreload::der::ari_cert_id (what the manager uses first) must agree with
  // acme::ari_cert_id on every certificate it answers for, and decline the rest.
  namespace der = autotls::der;
  for (const char* serial : {"87654321", "7F", "01", "0102030405060708090A0B0C0D0E0F1011121314",
                             "FF0102030405060708090A0B0C0D0E0F10111213"}) {
    CAPTURE(serial);
    auto pem = to_pem(make_cert(serial, kRfcAki).get());
    auto slow = autotls::acme::ari_cert_id(pem);
    REQUIRE(slow.has_value());
    auto fast = der::ari_cert_id(pem);
    REQUIRE(fast.has_value());
    CHECK(*fast == *slow);
  }
  // The first certificate of a chain, as acme::ari_cert_id reads it.
  auto other = make_cert("01", std::string(20, '\x11'));
  std::string chain = to_pem(make_cert("87654321", kRfcAki).get()) + to_pem(other.get());
  CHECK(der::ari_cert_id(chain) == std::optional<std::string>("aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"));
  // No AKI keyIdentifier, DER instead of PEM, garbage: not answered (the caller falls back).
  CHECK_FALSE(der::ari_cert_id(to_pem(make_cert("1234", "").get())).has_value());
  CHECK_FALSE(der::ari_cert_id(to_der(other.get())).has_value());
  CHECK_FALSE(der::ari_cert_id("garbage").has_value());
  CHECK_FALSE(der::ari_cert_id("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").has_value());
}

TEST_CASE("ari_cert_id refuses certificates without an AKI and garbage") {
  auto no_aki = make_cert("1234", "");
  auto r = autotls::acme::ari_cert_id(to_pem(no_aki.get()));
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == Errc::invalid_input);
  CHECK(r.error().message.find("Authority Key Identifier") != std::string::npos);

  for (const char* text :
       {"", "garbage", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}) {
    CAPTURE(text);
    r = autotls::acme::ari_cert_id(text);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == Errc::invalid_input);
  }
  std::string der = to_der(no_aki.get());
  r = autotls::acme::ari_cert_id(der.substr(0, der.size() / 2));
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == Errc::invalid_input);
}

TEST_CASE("parse_renewal_info reads the window and explanation URL") {
  auto info = must_parse(R"({
    "suggestedWindow": {"start": "2025-01-02T04:00:00Z", "end": "2025-01-03T04:00:00Z"},
    "explanationURL": "https://acme.example.com/docs/ari"
  })");
  CHECK(info.window_start == utc(2025, 1, 2, 4));
  CHECK(info.window_end == utc(2025, 1, 3, 4));
  CHECK(info.explanation_url == "https://acme.example.com/docs/ari");
  CHECK_FALSE(info.retry_after.has_value());
}

TEST_CASE("parse_renewal_info without explanationURL leaves it empty") {
  auto info = must_parse(R"({"suggestedWindow":
      {"start": "2025-01-02T04:00:00.5+01:00", "end": "2025-01-02T05:00:00Z"}})");
  CHECK(info.window_start == utc(2025, 1, 2, 3) + 500ms);
  CHECK(info.explanation_url.empty());
}

TEST_CASE("parse_renewal_info refuses malformed bodies") {
  const char* bodies[] = {
      "",
      "not json",
      "[]",
      R"({"suggestedWindow": {"start": "2025-01-02T04:00:00Z", "end": )",
      R"({})",
      R"({"suggestedWindow": "soon"})",
      R"({"suggestedWindow": {"end": "2025-01-03T04:00:00Z"}})",
      R"({"suggestedWindow": {"start": "2025-01-02T04:00:00Z"}})",
      R"({"suggestedWindow": {"start": "2025-01-02T04:00:00Z", "end": 1735876800}})",
      R"({"suggestedWindow": {"start": "yesterday", "end": "2025-01-03T04:00:00Z"}})",
      R"({"suggestedWindow": {"start": "2025-01-02T04:00:00Z", "end": "2025-01-02T04:00:00Z"}})",
      R"({"suggestedWindow": {"start": "2025-01-03T04:00:00Z", "end": "2025-01-02T04:00:00Z"}})",
      R"({"suggestedWindow": {"start": "2025-01-02T04:00:00Z", "end": "2025-01-03T04:00:00Z"},
          "explanationURL": 7})",
  };
  for (const char* body : bodies) {
    CAPTURE(body);
    auto r = autotls::acme::parse_renewal_info(body);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().code == Errc::bad_response);
  }
}

TEST_CASE("pick_renewal_time stays inside the window and spreads across it") {
  RenewalInfo info;
  info.window_start = utc(2025, 1, 2, 4);
  info.window_end = utc(2025, 1, 3, 4);
  std::mt19937_64 rng(12345);
  auto lowest = info.window_end;
  auto highest = info.window_start;
  double sum_hours = 0;
  constexpr int kDraws = 2000;
  for (int i = 0; i < kDraws; ++i) {
    auto t = autotls::acme::pick_renewal_time(info, rng);
    REQUIRE(t >= info.window_start);
    REQUIRE(t < info.window_end);
    lowest = std::min(lowest, t);
    highest = std::max(highest, t);
    sum_hours += std::chrono::duration<double, std::ratio<3600>>(t - info.window_start).count();
  }
  // Uniform over 24 hours: extremes near the edges, mean near 12 hours.
  CHECK(lowest - info.window_start < 1h);
  CHECK(info.window_end - highest < 1h);
  CHECK(sum_hours / kDraws == doctest::Approx(12.0).epsilon(0.05));
}

TEST_CASE("pick_renewal_time handles tiny and huge windows") {
  std::mt19937_64 rng(7);
  RenewalInfo info;
  info.window_start = utc(2025, 1, 1);
  info.window_end = info.window_start + system_clock::duration(1);
  CHECK(autotls::acme::pick_renewal_time(info, rng) == info.window_start);
  // A window wider than half the clock's range must not overflow.
  info.window_start = system_clock::time_point::min() + 1h;
  info.window_end = system_clock::time_point::max() - 1h;
  for (int i = 0; i < 100; ++i) {
    auto t = autotls::acme::pick_renewal_time(info, rng);
    CHECK(t >= info.window_start);
    CHECK(t < info.window_end);
  }
  // An invalid window never reaches here through parse_renewal_info; its start is returned.
  info.window_end = info.window_start;
  CHECK(autotls::acme::pick_renewal_time(info, rng) == info.window_start);
}

TEST_CASE("parse_rfc3339 reads valid timestamps") {
  using autotls::acme::parse_rfc3339;
  CHECK(parse_rfc3339("2025-01-02T04:05:06Z") == utc(2025, 1, 2, 4, 5, 6));
  CHECK(parse_rfc3339("2025-01-02t04:05:06z") == utc(2025, 1, 2, 4, 5, 6));
  CHECK(parse_rfc3339("1970-01-01T00:00:00Z") == system_clock::time_point{});
  CHECK(parse_rfc3339("1969-12-31T23:59:59Z") == system_clock::time_point{} - 1s);
  CHECK(parse_rfc3339("2025-01-02T04:05:06.5Z") == utc(2025, 1, 2, 4, 5, 6) + 500ms);
  CHECK(parse_rfc3339("2025-01-02T04:05:06.123456789Z") ==
        utc(2025, 1, 2, 4, 5, 6) + 123456789ns);
  // Digits past nanoseconds are dropped.
  CHECK(parse_rfc3339("2025-01-02T04:05:06.1234567899Z") ==
        utc(2025, 1, 2, 4, 5, 6) + 123456789ns);
  CHECK(parse_rfc3339("2025-01-02T04:05:06+02:00") == utc(2025, 1, 2, 2, 5, 6));
  CHECK(parse_rfc3339("2025-01-02T04:05:06-05:30") == utc(2025, 1, 2, 9, 35, 6));
  CHECK(parse_rfc3339("2025-01-01T01:00:00+02:00") == utc(2024, 12, 31, 23));
  CHECK(parse_rfc3339("2024-02-29T12:00:00Z") == utc(2024, 2, 29, 12));
  // RFC 3339 §5.7 allows a leap second; Unix time folds it into the next second.
  CHECK(parse_rfc3339("2016-12-31T23:59:60Z") == utc(2017, 1, 1));
}

TEST_CASE("parse_rfc3339 refuses invalid timestamps") {
  using autotls::acme::parse_rfc3339;
  for (const char* text : {
           "",
           "2025-01-02",
           "2025-01-02T04:05:06",
           "2025-01-02 04:05:06Z",
           "2025-01-02T04:05Z",
           "2025-1-02T04:05:06Z",
           "2025-13-02T04:05:06Z",
           "2025-00-02T04:05:06Z",
           "2025-02-30T04:05:06Z",
           "2023-02-29T04:05:06Z",
           "2025-01-32T04:05:06Z",
           "2025-01-02T24:00:00Z",
           "2025-01-02T04:60:00Z",
           "2025-01-02T04:05:61Z",
           "2025-01-02T04:05:06.Z",
           "2025-01-02T04:05:06+2:00",
           "2025-01-02T04:05:06+0200",
           "2025-01-02T04:05:06+24:00",
           "2025-01-02T04:05:06Z ",
           "2025-01-02T04:05:06ZZ",
           " 2025-01-02T04:05:06Z",
           "+2025-01-02T04:05:06Z",
           // Outside what system_clock (signed 64-bit nanoseconds) can represent.
           "2300-01-01T00:00:00Z",
           "1600-01-01T00:00:00Z",
       }) {
    CAPTURE(text);
    CHECK_FALSE(parse_rfc3339(text).has_value());
  }
}

TEST_CASE("format_rfc3339 writes UTC with Z") {
  using autotls::acme::format_rfc3339;
  CHECK(format_rfc3339(system_clock::time_point{}) == "1970-01-01T00:00:00Z");
  CHECK(format_rfc3339(utc(2025, 1, 2, 4, 5, 6)) == "2025-01-02T04:05:06Z");
  CHECK(format_rfc3339(utc(2025, 1, 2, 4, 5, 6) + 500ms) == "2025-01-02T04:05:06.5Z");
  CHECK(format_rfc3339(utc(2025, 1, 2, 4, 5, 6) + 1ns) == "2025-01-02T04:05:06.000000001Z");
  CHECK(format_rfc3339(system_clock::time_point{} - 500ms) == "1969-12-31T23:59:59.5Z");
  CHECK(format_rfc3339(utc(2024, 2, 29, 23, 59, 59)) == "2024-02-29T23:59:59Z");
}

TEST_CASE("format_rfc3339 and parse_rfc3339 round-trip") {
  std::mt19937_64 rng(99);
  // Years 1900 to 2200 at nanosecond resolution.
  std::uniform_int_distribution<int64_t> pick(-2208988800LL * 1000000000LL,
                                              7258118400LL * 1000000000LL);
  for (int i = 0; i < 500; ++i) {
    system_clock::time_point t{system_clock::duration(pick(rng))};
    std::string text = autotls::acme::format_rfc3339(t);
    CAPTURE(text);
    CHECK(autotls::acme::parse_rfc3339(text) == t);
  }
}

}  // TEST_SUITE
