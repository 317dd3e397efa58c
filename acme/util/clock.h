#pragma once

#include <chrono>

namespace autotls {

// Clock is the only source of time and waiting in the libraries, so tests can inject a fake.
// Implementations MUST be safe to call from several threads.
class Clock {
 public:
  using time_point = std::chrono::system_clock::time_point;
  virtual ~Clock() = default;
  // now returns wall-clock time (certificate validity and ACME timestamps are wall time).
  virtual time_point now() const = 0;
  // sleep_for waits for d. It returns false when the wait was cut short by cancellation, in
  // which case the caller must abandon what it was doing.
  virtual bool sleep_for(std::chrono::milliseconds d) = 0;
};

// system_clock returns the process-wide real clock; its sleep is never cancelled.
Clock& system_clock();

}  // namespace autotls
