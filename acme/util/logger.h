#pragma once

#include <initializer_list>
#include <string>
#include <string_view>

namespace autotls {

enum class LogLevel { debug, info, warn, error };
std::string_view to_string(LogLevel level);

struct LogField {
  std::string_view key;
  std::string value;
};

// Logger receives structured events. Libraries log through one they were given and are silent
// by default. Implementations MUST be thread-safe. Never pass keys, JWS bodies or EAB MACs.
class Logger {
 public:
  virtual ~Logger() = default;
  virtual bool enabled(LogLevel level) const = 0;
  virtual void log(LogLevel level, std::string_view subsystem, std::string_view message,
                   std::initializer_list<LogField> fields = {}) = 0;
};

// null_logger drops everything.
Logger& null_logger();

}  // namespace autotls
