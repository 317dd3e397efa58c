#include "server/detail/access_log.h"

#include <algorithm>
#include <ctime>
#include <cstdio>

#include <nlohmann/json.hpp>

namespace autotls::server::detail {

void LatencyHistogram::observe(std::chrono::nanoseconds d) {
  double secs = std::chrono::duration<double>(d).count();
  std::size_t i = 0;
  while (i < kBounds.size() && secs > kBounds[i]) ++i;
  buckets_[i].fetch_add(1, std::memory_order_relaxed);
  sum_ns_.fetch_add(static_cast<std::uint64_t>(std::max<long long>(0, d.count())),
                    std::memory_order_relaxed);
  count_.fetch_add(1, std::memory_order_relaxed);
}

std::string LatencyHistogram::render(std::string_view name, std::string_view help) const {
  std::string n(name);
  std::string out = "# HELP " + n + " " + std::string(help) + "\n# TYPE " + n + " histogram\n";
  std::uint64_t cumulative = 0;
  char le[32];
  for (std::size_t i = 0; i <= kBounds.size(); ++i) {
    cumulative += buckets_[i].load(std::memory_order_relaxed);
    if (i < kBounds.size()) {
      std::snprintf(le, sizeof le, "%g", kBounds[i]);
    } else {
      std::snprintf(le, sizeof le, "+Inf");
    }
    out += n + "_bucket{le=\"" + le + "\"} " + std::to_string(cumulative) + "\n";
  }
  char sum[64];
  std::snprintf(sum, sizeof sum, "%.6f", static_cast<double>(sum_ns_.load()) / 1e9);
  out += n + "_sum " + sum + "\n";
  out += n + "_count " + std::to_string(count_.load()) + "\n";
  return out;
}

namespace {

std::string utc_time(std::chrono::system_clock::time_point t, const char* fmt) {
  std::time_t tt = std::chrono::system_clock::to_time_t(t);
  std::tm tm{};
  ::gmtime_r(&tt, &tm);
  char buf[64];
  std::strftime(buf, sizeof buf, fmt, &tm);
  return buf;
}

// quoted escapes a field for the combined format the way nginx does (\" and \xHH).
std::string clf_quoted(std::string_view v) {
  if (v.empty()) return "\"-\"";
  std::string out = "\"";
  for (unsigned char ch : v) {
    if (ch == '"' || ch == '\\' || ch < 0x20 || ch >= 0x7f) {
      char esc[8];
      std::snprintf(esc, sizeof esc, "\\x%02X", ch);
      out += esc;
    } else {
      out += static_cast<char>(ch);
    }
  }
  return out + "\"";
}

}  // namespace

std::string format_access_json(const AccessEntry& e) {
  nlohmann::json j = {
      {"time", utc_time(e.time, "%Y-%m-%dT%H:%M:%SZ")},
      {"remote", e.remote},
      {"host", e.host},
      {"method", e.method},
      {"target", e.target},
      {"status", e.status},
      {"bytes", e.bytes},
      {"duration_ms", std::chrono::duration<double, std::milli>(e.duration).count()},
      {"tls", e.tls},
  };
  if (!e.user_agent.empty()) j["user_agent"] = e.user_agent;
  // Replace invalid UTF-8 (a client's bytes) instead of throwing.
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::string format_access_combined(const AccessEntry& e) {
  std::string request = std::string(e.method) + " " + std::string(e.target) + " " +
                        std::string(e.version.empty() ? "HTTP/1.1" : e.version);
  return std::string(e.remote.empty() ? "-" : e.remote) + " - - [" +
         utc_time(e.time, "%d/%b/%Y:%H:%M:%S +0000") + "] " + clf_quoted(request) + " " +
         std::to_string(e.status) + " " + std::to_string(e.bytes) + " " + clf_quoted(e.referer) +
         " " + clf_quoted(e.user_agent);
}

}  // namespace autotls::server::detail
