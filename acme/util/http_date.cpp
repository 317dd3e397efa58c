#include "acme/util/http_date.h"

#include <array>

namespace autotls {
namespace {

constexpr std::array<std::string_view, 7> kDays = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
constexpr std::array<std::string_view, 7> kLongDays = {"Sunday",   "Monday", "Tuesday", "Wednesday",
                                                       "Thursday", "Friday", "Saturday"};
constexpr std::array<std::string_view, 12> kMonths = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                                      "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};

// Reader walks the text; every take_* fails (returns false) without a match.
struct Reader {
  std::string_view s;
  bool take(std::string_view lit) {
    if (s.substr(0, lit.size()) != lit) return false;
    s.remove_prefix(lit.size());
    return true;
  }
  // digits reads exactly n digits.
  bool digits(int n, int& out) {
    if (s.size() < static_cast<std::size_t>(n)) return false;
    out = 0;
    for (int i = 0; i < n; ++i) {
      char c = s[static_cast<std::size_t>(i)];
      if (c < '0' || c > '9') return false;
      out = out * 10 + (c - '0');
    }
    s.remove_prefix(static_cast<std::size_t>(n));
    return true;
  }
  template <std::size_t N>
  bool one_of(const std::array<std::string_view, N>& names, int& index) {
    for (std::size_t i = 0; i < N; ++i) {
      if (take(names[i])) {
        index = static_cast<int>(i);
        return true;
      }
    }
    return false;
  }
  // clock reads "HH:MM:SS".
  bool clock(int& h, int& m, int& sec) {
    return digits(2, h) && take(":") && digits(2, m) && take(":") && digits(2, sec);
  }
};

bool leap(int y) { return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0; }

std::optional<std::time_t> make(int year, int month, int day, int h, int m, int sec) {
  static constexpr int kLen[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  int len = kLen[month] + (month == 1 && leap(year) ? 1 : 0);
  if (day < 1 || day > len || h > 23 || m > 59 || sec > 60) return std::nullopt;
  std::tm tm{};
  tm.tm_year = year - 1900;
  tm.tm_mon = month;
  tm.tm_mday = day;
  tm.tm_hour = h;
  tm.tm_min = m;
  tm.tm_sec = sec;
  return ::timegm(&tm);
}

}  // namespace

std::string format_http_date(std::time_t t) {
  std::tm tm{};
  ::gmtime_r(&t, &tm);
  std::string out;
  out.reserve(29);
  auto two = [&](int v) {
    out += static_cast<char>('0' + v / 10);
    out += static_cast<char>('0' + v % 10);
  };
  out += kDays[static_cast<std::size_t>(tm.tm_wday)];
  out += ", ";
  two(tm.tm_mday);
  out += ' ';
  out += kMonths[static_cast<std::size_t>(tm.tm_mon)];
  out += ' ';
  // Four digits, as the grammar has them (a year before 1000 is zero-padded).
  std::string year = std::to_string(tm.tm_year + 1900);
  if (year.size() < 4) out.append(4 - year.size(), '0');
  out += year;
  out += ' ';
  two(tm.tm_hour);
  out += ':';
  two(tm.tm_min);
  out += ':';
  two(tm.tm_sec);
  out += " GMT";
  return out;
}

std::optional<std::time_t> parse_http_date(std::string_view s) {
  int wday = 0, day = 0, month = 0, year = 0, h = 0, m = 0, sec = 0;
  // IMF-fixdate
  if (Reader r{s}; r.one_of(kDays, wday) && r.take(", ") && r.digits(2, day) && r.take(" ") &&
                   r.one_of(kMonths, month) && r.take(" ") && r.digits(4, year) &&
                   r.take(" ") && r.clock(h, m, sec) && r.take(" GMT") && r.s.empty()) {
    return make(year, month, day, h, m, sec);
  }
  // rfc850-date
  if (Reader r{s}; r.one_of(kLongDays, wday) && r.take(", ") && r.digits(2, day) &&
                   r.take("-") && r.one_of(kMonths, month) && r.take("-") &&
                   r.digits(2, year) && r.take(" ") && r.clock(h, m, sec) && r.take(" GMT") &&
                   r.s.empty()) {
    std::time_t now = std::time(nullptr);
    std::tm tm{};
    ::gmtime_r(&now, &tm);
    int this_year = tm.tm_year + 1900;
    int full = this_year / 100 * 100 + year;
    if (full > this_year + 50) full -= 100;
    return make(full, month, day, h, m, sec);
  }
  // asctime-date: the day of the month is two digits or a space and one digit.
  if (Reader r{s}; r.one_of(kDays, wday) && r.take(" ") && r.one_of(kMonths, month) &&
                   r.take(" ")) {
    bool ok = r.take(" ") ? r.digits(1, day) : r.digits(2, day);
    if (ok && r.take(" ") && r.clock(h, m, sec) && r.take(" ") && r.digits(4, year) &&
        r.s.empty()) {
      return make(year, month, day, h, m, sec);
    }
  }
  return std::nullopt;
}

}  // namespace autotls
