#include "acme/util/clock.h"

#include <thread>

namespace autotls {
namespace {
class SystemClock final : public Clock {
 public:
  time_point now() const override { return std::chrono::system_clock::now(); }
  bool sleep_for(std::chrono::milliseconds d) override {
    std::this_thread::sleep_for(d);
    return true;
  }
};
}  // namespace

Clock& system_clock() {
  static SystemClock clock;
  return clock;
}

}  // namespace autotls
