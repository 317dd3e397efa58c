#pragma once

// RecordingLogger: a Logger that keeps every message, for assertions on what was logged.

#include <mutex>
#include <string>
#include <vector>

#include "acme/util/logger.h"

namespace autotls::testing {

// Each line is "LEVEL message key=value ...", the fields in the order given.
class RecordingLogger : public Logger {
 public:
  bool enabled(LogLevel) const override { return true; }
  void log(LogLevel level, std::string_view, std::string_view message, std::initializer_list<LogField> fields) override {
    std::string line = std::string(to_string(level)) + " " + std::string(message);
    for (const auto& f : fields) line += " " + std::string(f.key) + "=" + f.value;
    std::lock_guard lock(mu_);
    lines_.push_back(std::move(line));
  }
  std::vector<std::string> lines() const {
    std::lock_guard lock(mu_);
    return lines_;
  }
  // has is true when some line contains text.
  bool has(std::string_view text) const {
    std::lock_guard lock(mu_);
    for (const auto& l : lines_) {
      if (l.find(text) != std::string::npos) return true;
    }
    return false;
  }

 private:
  mutable std::mutex mu_;
  std::vector<std::string> lines_;
};

}  // namespace autotls::testing
