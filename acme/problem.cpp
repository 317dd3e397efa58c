#include "acme/problem.h"

#include <algorithm>
#include <charconv>
#include <ctime>

#include <nlohmann/json.hpp>

#include "acme/util/http_date.h"

namespace autotls::acme {
namespace {

std::string string_member(const nlohmann::json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
}

std::string_view short_type(std::string_view type) {
  constexpr std::string_view kPrefix = "urn:ietf:params:acme:error:";
  if (type.starts_with(kPrefix)) type.remove_prefix(kPrefix.size());
  return type;
}

}  // namespace

std::optional<Problem> parse_problem(std::string_view body, int status) {
  auto j = nlohmann::json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return std::nullopt;
  auto type = j.find("type");
  if (type == j.end() || !type->is_string()) return std::nullopt;
  Problem p;
  p.type = type->get<std::string>();
  p.detail = string_member(j, "detail");
  p.instance = string_member(j, "instance");
  p.status = status;
  // RFC 8555 §6.7: the "status" member, when present, echoes the HTTP status.
  if (auto s = j.find("status"); s != j.end() && s->is_number_integer()) {
    p.status = s->get<int>();
  }
  if (auto subs = j.find("subproblems"); subs != j.end() && subs->is_array()) {
    for (const auto& s : *subs) {
      if (!s.is_object()) continue;
      Subproblem sp;
      sp.type = string_member(s, "type");
      sp.detail = string_member(s, "detail");
      if (auto id = s.find("identifier"); id != s.end() && id->is_object()) {
        sp.identifier_type = string_member(*id, "type");
        sp.identifier_value = string_member(*id, "value");
      }
      p.subproblems.push_back(std::move(sp));
    }
  }
  return p;
}

std::optional<std::chrono::seconds> parse_retry_after(std::string_view value,
                                                      std::chrono::system_clock::time_point now) {
  while (!value.empty() && (value.front() == ' ' || value.front() == '\t')) value.remove_prefix(1);
  while (!value.empty() && (value.back() == ' ' || value.back() == '\t' || value.back() == '\r'))
    value.remove_suffix(1);
  if (value.empty()) return std::nullopt;
  // Arithmetic in whole seconds, clamped to kMaxRetryAfter: a date thousands of years ahead (or
  // a delay as long) would overflow the clock's nanoseconds here, and in every caller that adds
  // the result to a time.
  const long long max_secs = kMaxRetryAfter.count();
  if (value.front() >= '0' && value.front() <= '9') {
    long long secs = 0;
    auto [p, ec] = std::from_chars(value.data(), value.data() + value.size(), secs);
    if (ec == std::errc::result_out_of_range && p == value.data() + value.size()) return kMaxRetryAfter;
    if (ec != std::errc() || p != value.data() + value.size()) return std::nullopt;
    return std::chrono::seconds(std::min(secs, max_secs));
  }
  // An HTTP-date (RFC 9110 §5.6.7), IMF-fixdate or one of the obsolete forms.
  auto date = parse_http_date(value);
  if (!date) return std::nullopt;
  const long long when = static_cast<long long>(*date);
  const long long at = static_cast<long long>(std::chrono::system_clock::to_time_t(now));
  if (when <= at) return std::chrono::seconds(0);
  return std::chrono::seconds(when - at > max_secs ? max_secs : when - at);
}

std::string describe(const Problem& problem) {
  std::string out(short_type(problem.type));
  if (!problem.detail.empty()) out += ": " + problem.detail;
  for (const auto& sp : problem.subproblems) {
    out += "; ";
    if (!sp.identifier_value.empty()) out += sp.identifier_value + ": ";
    out += std::string(short_type(sp.type));
    if (!sp.detail.empty()) out += ": " + sp.detail;
  }
  return out;
}

Error error_from_response(std::string_view op, const HttpResponse& response,
                          std::chrono::system_clock::time_point now) {
  Error e(Errc::protocol, {});
  e.http_status = response.status;
  e.message = std::string(op) + ": HTTP " + std::to_string(response.status);
  if (auto ra = response.header("Retry-After")) e.retry_after = parse_retry_after(*ra, now);
  if (auto p = parse_problem(response.body, response.status)) {
    e.message += ": " + describe(*p);
    if (p->is(problem_type::kUserActionRequired) && !p->instance.empty()) {
      e.message += " (see " + p->instance + ")";
    }
    e.problem = std::move(*p);
  } else if (!response.body.empty()) {
    // Not a problem document: show a bounded, printable excerpt.
    std::string excerpt;
    for (char c : response.body.substr(0, 200)) excerpt += (c >= 0x20 && c < 0x7f) ? c : '?';
    e.message += ": " + excerpt;
  }
  return e;
}

}  // namespace autotls::acme
