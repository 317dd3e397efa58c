#include "acme/util/logger.h"

namespace autotls {

std::string_view to_string(LogLevel level) {
  switch (level) {
    case LogLevel::debug: return "debug";
    case LogLevel::info: return "info";
    case LogLevel::warn: return "warn";
    case LogLevel::error: return "error";
  }
  return "info";
}

namespace {
class NullLogger final : public Logger {
 public:
  bool enabled(LogLevel) const override { return false; }
  void log(LogLevel, std::string_view, std::string_view, std::initializer_list<LogField>) override {}
};
}  // namespace

Logger& null_logger() {
  static NullLogger logger;
  return logger;
}

}  // namespace autotls
