#include <doctest/doctest.h>

#include <chrono>
#include <string>

#include <nlohmann/json.hpp>

#include "server/detail/access_log.h"
#include "server/detail/tickets.h"

using namespace autotls::server::detail;
using namespace std::chrono_literals;

TEST_SUITE("server.access_log") {
  TEST_CASE("latency histogram buckets are cumulative with sum and count") {
    LatencyHistogram h;
    h.observe(500us);   // <= 0.001
    h.observe(3ms);     // <= 0.005
    h.observe(3ms);
    h.observe(20s);     // +Inf only
    auto text = h.render("x_seconds", "help text");
    INFO(text);
    CHECK(text.find("# HELP x_seconds help text\n# TYPE x_seconds histogram\n") == 0);
    CHECK(text.find("x_seconds_bucket{le=\"0.001\"} 1\n") != std::string::npos);
    CHECK(text.find("x_seconds_bucket{le=\"0.0025\"} 1\n") != std::string::npos);
    CHECK(text.find("x_seconds_bucket{le=\"0.005\"} 3\n") != std::string::npos);
    CHECK(text.find("x_seconds_bucket{le=\"10\"} 3\n") != std::string::npos);
    CHECK(text.find("x_seconds_bucket{le=\"+Inf\"} 4\n") != std::string::npos);
    CHECK(text.find("x_seconds_sum 20.006500\n") != std::string::npos);
    CHECK(text.find("x_seconds_count 4\n") != std::string::npos);
  }

  TEST_CASE("access lines in json and combined formats escape client bytes") {
    AccessEntry e;
    e.time = std::chrono::system_clock::time_point(std::chrono::seconds(971185536));  // 2000-10-10T13:45:36Z
    e.remote = "192.0.2.7";
    e.host = "example.com";
    e.method = "GET";
    e.target = "/a?b=\"c\"";
    e.version = "HTTP/1.1";
    e.user_agent = "curl/8\x01";
    e.status = 200;
    e.bytes = 1234;
    e.duration = 1500us;
    e.tls = true;
    auto j = nlohmann::json::parse(format_access_json(e));
    CHECK(j["time"] == "2000-10-10T13:45:36Z");
    CHECK(j["target"] == "/a?b=\"c\"");
    CHECK(j["status"] == 200);
    CHECK(j["bytes"] == 1234);
    CHECK(j["duration_ms"].get<double>() == doctest::Approx(1.5));
    CHECK(j["tls"] == true);
    CHECK(format_access_combined(e) ==
          "192.0.2.7 - - [10/Oct/2000:13:45:36 +0000] \"GET /a?b=\\x22c\\x22 HTTP/1.1\" 200 1234 "
          "\"-\" \"curl/8\\x01\"");
    e.user_agent = "\xff\xfe";  // not UTF-8: replaced, never an exception
    CHECK_NOTHROW(nlohmann::json::parse(format_access_json(e)));
  }
}

TEST_SUITE("server.tickets") {
  TEST_CASE("the key ring holds the current key and lifetime over rotate_every retired ones") {
    auto now = std::chrono::steady_clock::time_point{} + 1000h;
    auto clock = [&now] { return now; };
    // Keys rotate hourly and open tickets for 2 h: at most 1 + 2 keys.
    TicketKeyRing ring(1h, 2h, clock);
    CHECK(ring.size() == 1);
    CHECK(ring.rotations() == 1);
    for (int i = 0; i < 5; ++i) ring.rotate_now();
    CHECK(ring.size() == 3);
    CHECK(ring.rotations() == 6);
  }
}
