#include "acme/ari.h"

#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>

#include <openssl/pem.h>

#include "acme/util/base64.h"
#include "acme/util/openssl.h"

namespace autotls::acme {
namespace {

using std::chrono::system_clock;

// read_certificate takes the first PEM certificate of text, or text as DER.
ossl::X509Ptr read_certificate(std::string_view text) {
  if (text.size() > size_t(std::numeric_limits<int>::max())) return nullptr;
  if (text.find("-----BEGIN") != std::string_view::npos) {
    ossl::BioPtr bio(BIO_new_mem_buf(text.data(), int(text.size())));
    if (!bio) return nullptr;
    return ossl::X509Ptr(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  }
  const auto* p = reinterpret_cast<const unsigned char*>(text.data());
  return ossl::X509Ptr(d2i_X509(nullptr, &p, long(text.size())));
}

// der_content strips the tag and length of one DER TLV, leaving its content octets.
std::optional<std::string> der_content(const unsigned char* der, size_t len) {
  if (len < 2) return std::nullopt;
  size_t header = 2;
  size_t content = der[1];
  if (der[1] & 0x80) {
    size_t n = der[1] & 0x7f;
    if (n == 0 || n > sizeof(size_t) || len < 2 + n) return std::nullopt;
    content = 0;
    for (size_t i = 0; i < n; ++i) content = (content << 8) | der[2 + i];
    header += n;
  }
  if (len - header != content) return std::nullopt;
  return std::string(reinterpret_cast<const char*>(der + header), content);
}

// Parses exactly n decimal digits from text at pos.
std::optional<int> digits(std::string_view text, size_t& pos, size_t n) {
  if (pos + n > text.size()) return std::nullopt;
  int v = 0;
  for (size_t i = 0; i < n; ++i) {
    char c = text[pos + i];
    if (c < '0' || c > '9') return std::nullopt;
    v = v * 10 + (c - '0');
  }
  pos += n;
  return v;
}

bool expect(std::string_view text, size_t& pos, char a, char b = '\0') {
  if (pos >= text.size()) return false;
  char c = text[pos];
  if (c != a && (b == '\0' || c != b)) return false;
  ++pos;
  return true;
}

}  // namespace

Result<std::string> ari_cert_id(std::string_view certificate) {
  auto cert = read_certificate(certificate);
  if (!cert) {
    ossl::drain_errors();
    return fail(Errc::invalid_input, "ARI certificate id: cannot parse the certificate");
  }
  // RFC 9773 §4.1: the identifier is base64url(keyIdentifier of the Authority Key Identifier
  // extension) "." base64url(DER encoding of the serial number, without tag and length).
  const ASN1_OCTET_STRING* aki = X509_get0_authority_key_id(cert.get());
  ossl::drain_errors();
  if (!aki || ASN1_STRING_length(aki) <= 0) {
    return fail(Errc::invalid_input, "ARI certificate id: the certificate has no Authority Key "
                                     "Identifier keyIdentifier");
  }
  const ASN1_INTEGER* serial = X509_get0_serialNumber(cert.get());
  unsigned char* der = nullptr;
  int der_len = serial ? i2d_ASN1_INTEGER(serial, &der) : -1;
  if (der_len <= 0) return fail(ossl::error("ARI certificate id: serial number"));
  // The content octets keep the leading 0x00 a positive serial with its high bit set needs,
  // which ASN1_STRING_get0_data (the magnitude only) would drop.
  auto serial_octets = der_content(der, size_t(der_len));
  OPENSSL_free(der);
  if (!serial_octets || serial_octets->empty()) {
    return fail(Errc::invalid_input, "ARI certificate id: malformed serial number");
  }
  std::string_view key_id(reinterpret_cast<const char*>(ASN1_STRING_get0_data(aki)),
                          size_t(ASN1_STRING_length(aki)));
  return base64url_encode(key_id) + "." + base64url_encode(*serial_octets);
}

Result<RenewalInfo> parse_renewal_info(std::string_view body) {
  auto doc = nlohmann::json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object()) {
    return fail(Errc::bad_response, "renewalInfo: body is not a JSON object");
  }
  auto window = doc.find("suggestedWindow");
  if (window == doc.end() || !window->is_object()) {
    return fail(Errc::bad_response, "renewalInfo: missing suggestedWindow");
  }
  auto read_time = [&](const char* name) -> Result<system_clock::time_point> {
    auto it = window->find(name);
    if (it == window->end() || !it->is_string()) {
      return fail(Errc::bad_response,
                  std::string("renewalInfo: missing suggestedWindow.") + name);
    }
    auto t = parse_rfc3339(it->get_ref<const std::string&>());
    if (!t) {
      return fail(Errc::bad_response, std::string("renewalInfo: suggestedWindow.") + name +
                                          " is not an RFC 3339 timestamp");
    }
    return *t;
  };
  auto start = read_time("start");
  if (!start) return fail(start.error());
  auto end = read_time("end");
  if (!end) return fail(end.error());
  // RFC 9773 §4.2: a window whose end is not after its start is invalid.
  if (*end <= *start) {
    return fail(Errc::bad_response, "renewalInfo: suggestedWindow.end is not after its start");
  }
  RenewalInfo info;
  info.window_start = *start;
  info.window_end = *end;
  if (auto url = doc.find("explanationURL"); url != doc.end()) {
    if (!url->is_string()) {
      return fail(Errc::bad_response, "renewalInfo: explanationURL is not a string");
    }
    info.explanation_url = url->get<std::string>();
  }
  return info;
}

system_clock::time_point pick_renewal_time(const RenewalInfo& info, std::mt19937_64& rng) {
  if (info.window_end <= info.window_start) return info.window_start;
  // Work in unsigned ticks: end - start can exceed the signed range for extreme windows.
  auto start = uint64_t(info.window_start.time_since_epoch().count());
  auto end = uint64_t(info.window_end.time_since_epoch().count());
  uint64_t span = end - start;
  // Uniform in [start, end): the end itself is already outside the window.
  std::uniform_int_distribution<uint64_t> pick(0, span - 1);
  auto ticks = system_clock::rep(start + pick(rng));
  return system_clock::time_point(system_clock::duration(ticks));
}

std::optional<system_clock::time_point> parse_rfc3339(std::string_view text) {
  // RFC 3339 §5.6: full-date "T" partial-time time-offset, where partial-time may carry
  // time-secfrac and time-offset is "Z" or ("+" / "-") hh ":" mm. §5.6 NOTE: "T" and "Z" may
  // be lowercase.
  size_t pos = 0;
  auto year = digits(text, pos, 4);
  if (!year || !expect(text, pos, '-')) return std::nullopt;
  auto month = digits(text, pos, 2);
  if (!month || !expect(text, pos, '-')) return std::nullopt;
  auto day = digits(text, pos, 2);
  if (!day || !expect(text, pos, 'T', 't')) return std::nullopt;
  auto hour = digits(text, pos, 2);
  if (!hour || !expect(text, pos, ':')) return std::nullopt;
  auto minute = digits(text, pos, 2);
  if (!minute || !expect(text, pos, ':')) return std::nullopt;
  auto second = digits(text, pos, 2);
  if (!second) return std::nullopt;

  std::chrono::nanoseconds fraction{0};
  if (pos < text.size() && text[pos] == '.') {
    ++pos;
    size_t first = pos;
    int64_t ns = 0;
    int scale = 0;
    while (pos < text.size() && text[pos] >= '0' && text[pos] <= '9') {
      // Digits past nanoseconds are read and dropped.
      if (scale < 9) {
        ns = ns * 10 + (text[pos] - '0');
        ++scale;
      }
      ++pos;
    }
    if (pos == first) return std::nullopt;
    for (; scale < 9; ++scale) ns *= 10;
    fraction = std::chrono::nanoseconds(ns);
  }

  int offset_minutes = 0;
  if (pos >= text.size()) return std::nullopt;
  if (text[pos] == 'Z' || text[pos] == 'z') {
    ++pos;
  } else if (text[pos] == '+' || text[pos] == '-') {
    int sign = text[pos] == '-' ? -1 : 1;
    ++pos;
    auto oh = digits(text, pos, 2);
    if (!oh || !expect(text, pos, ':')) return std::nullopt;
    auto om = digits(text, pos, 2);
    if (!om || *oh > 23 || *om > 59) return std::nullopt;
    offset_minutes = sign * (*oh * 60 + *om);
  } else {
    return std::nullopt;
  }
  if (pos != text.size()) return std::nullopt;

  // RFC 3339 §5.7: ranges; second 60 is a leap second and lands on the next minute's 00,
  // the only thing system_clock (Unix time) can represent.
  if (*month < 1 || *month > 12 || *hour > 23 || *minute > 59 || *second > 60) {
    return std::nullopt;
  }
  using namespace std::chrono;
  year_month_day ymd{std::chrono::year(*year), std::chrono::month(unsigned(*month)),
                     std::chrono::day(unsigned(*day))};
  if (!ymd.ok()) return std::nullopt;
  int64_t secs = int64_t(sys_days(ymd).time_since_epoch().count()) * 86400 + *hour * 3600 +
                 *minute * 60 + *second - int64_t(offset_minutes) * 60;
  // system_clock counts nanoseconds in a signed 64-bit integer (about years 1678..2262).
  constexpr int64_t kLimit = std::numeric_limits<system_clock::rep>::max() /
                                 system_clock::period::den * system_clock::period::num -
                             1;
  if (secs <= -kLimit || secs >= kLimit) return std::nullopt;
  return system_clock::time_point(duration_cast<system_clock::duration>(seconds(secs)) +
                                  duration_cast<system_clock::duration>(fraction));
}

std::string format_rfc3339(system_clock::time_point t) {
  using namespace std::chrono;
  auto day_point = floor<days>(t);
  year_month_day ymd{day_point};
  auto since_midnight = t - day_point;
  auto secs = floor<seconds>(since_midnight);
  auto sub = duration_cast<nanoseconds>(since_midnight - secs).count();
  long s = long(secs.count());
  char buf[64];
  std::snprintf(buf, sizeof buf, "%04d-%02u-%02uT%02ld:%02ld:%02ld", int(ymd.year()),
                unsigned(ymd.month()), unsigned(ymd.day()), s / 3600, (s / 60) % 60, s % 60);
  std::string out = buf;
  if (sub != 0) {
    // Sub-second precision is kept so parse_rfc3339(format_rfc3339(t)) == t; trailing zeros
    // are dropped (RFC 3339 §5.6 time-secfrac is any number of digits).
    std::snprintf(buf, sizeof buf, ".%09lld", static_cast<long long>(sub));
    std::string frac = buf;
    while (frac.back() == '0') frac.pop_back();
    out += frac;
  }
  return out + "Z";
}

}  // namespace autotls::acme
