#pragma once

// Request accounting shared by the access log and the admin /metrics: a latency histogram and
// the formatting of one access-log line. No sockets, no threads (unit-testable).

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

namespace autotls::server::detail {

// LatencyHistogram is a Prometheus histogram of request durations in seconds, lock-free.
class LatencyHistogram {
 public:
  // Upper bounds in seconds (le labels); +Inf is implicit.
  static constexpr std::array<double, 12> kBounds = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                     0.1,   0.25,   0.5,   1,    2.5,   10};
  void observe(std::chrono::nanoseconds d);
  // render writes # HELP / # TYPE and the _bucket (cumulative), _sum and _count samples.
  std::string render(std::string_view name, std::string_view help) const;

 private:
  std::array<std::atomic<std::uint64_t>, kBounds.size() + 1> buckets_{};
  std::atomic<std::uint64_t> sum_ns_{0};
  std::atomic<std::uint64_t> count_{0};
};

struct AccessEntry {
  std::chrono::system_clock::time_point time;
  std::string_view remote, host, method, target, version, referer, user_agent;
  int status = 0;
  std::uint64_t bytes = 0;
  std::chrono::nanoseconds duration{0};
  bool tls = false;
};

// format_access_json: one JSON object, no newline.
std::string format_access_json(const AccessEntry& e);
// format_access_combined: NCSA combined log format
// (remote - - [10/Oct/2000:13:55:36 +0000] "GET /a HTTP/1.1" 200 2326 "referer" "agent").
std::string format_access_combined(const AccessEntry& e);

}  // namespace autotls::server::detail
