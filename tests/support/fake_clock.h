#pragma once

#include <atomic>
#include <chrono>
#include <mutex>
#include <vector>

#include "acme/util/clock.h"

namespace autotls::testing {

// FakeClock never really sleeps: sleep_for advances its time and records the delay.
class FakeClock : public Clock {
 public:
  explicit FakeClock(time_point start = time_point(std::chrono::seconds(1'800'000'000)))
      : now_(start) {}
  time_point now() const override {
    std::lock_guard lock(mu_);
    return now_;
  }
  bool sleep_for(std::chrono::milliseconds d) override {
    std::lock_guard lock(mu_);
    now_ += d;
    sleeps_.push_back(d);
    return !cancelled_;
  }
  void advance(std::chrono::milliseconds d) {
    std::lock_guard lock(mu_);
    now_ += d;
  }
  void cancel() {
    std::lock_guard lock(mu_);
    cancelled_ = true;
  }
  std::vector<std::chrono::milliseconds> sleeps() const {
    std::lock_guard lock(mu_);
    return sleeps_;
  }

 private:
  mutable std::mutex mu_;
  time_point now_;
  std::vector<std::chrono::milliseconds> sleeps_;
  bool cancelled_ = false;
};

}  // namespace autotls::testing
