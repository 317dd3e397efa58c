#pragma once

// The event lines a child `autotls serve --json` writes to its stdout file, read while it runs:
// one JSON object a line with an "event" key (a line being written, or not JSON, is skipped).

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

namespace autotls::testing {

// json_events returns the objects among the lines of file whose "event" is event.
inline std::vector<nlohmann::json> json_events(const std::filesystem::path& file, const std::string& event) {
  std::vector<nlohmann::json> out;
  std::ifstream in(file, std::ios::binary);
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_object() && j.value("event", "") == event) out.push_back(std::move(j));
  }
  return out;
}

inline int count_events(const std::filesystem::path& file, const std::string& event) {
  return static_cast<int>(json_events(file, event).size());
}

// last_event is the last such object, null when there is none.
inline nlohmann::json last_event(const std::filesystem::path& file, const std::string& event) {
  auto all = json_events(file, event);
  return all.empty() ? nlohmann::json() : all.back();
}

// wait_event waits up to limit for file to hold n such lines; false if it never did.
inline bool wait_event(const std::filesystem::path& file, const std::string& event, int n,
                       std::chrono::milliseconds limit) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < deadline && count_events(file, event) < n) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return count_events(file, event) >= n;
}

// admin_port is the admin listener's port from the last "listening" line (0 when none yet).
inline int admin_port(const std::filesystem::path& file) {
  auto j = last_event(file, "listening");
  return j.is_object() ? j.value("admin_port", 0) : 0;
}

}  // namespace autotls::testing
