#include "tools/progress.h"

#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include <nlohmann/json.hpp>

#include "tools/cli.h"

namespace autotls::cli {

namespace {

using Step = acme::ProgressEvent::Step;

std::string seconds_text(std::chrono::milliseconds ms) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%6.1fs", static_cast<double>(ms.count()) / 1000.0);
  return buf;
}

}  // namespace

ProgressPrinter::Mode ProgressPrinter::mode_for(const Options& o) {
  if (o.quiet) return Mode::off;
  if (o.json) return Mode::json;
  const char* term = std::getenv("TERM");
  bool dumb = term && std::strcmp(term, "dumb") == 0;
  // --verbose logs go to stderr too; a line redrawn in place would mangle them.
  if (::isatty(STDERR_FILENO) && !dumb && !o.verbose) return Mode::terminal;
  return Mode::plain;
}

ProgressPrinter::ProgressPrinter(Mode mode, std::FILE* out) : mode_(mode), out_(out) {}

ProgressPrinter::~ProgressPrinter() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
    clear_spinner_locked();
    spinning_ = false;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

std::string ProgressPrinter::describe(const acme::ProgressEvent& e) {
  switch (e.step) {
    case Step::directory: return "CA directory fetched: " + e.detail;
    case Step::account: return "ACME account ready: " + e.detail;
    case Step::order: return "order created for " + e.subject + ": " + e.detail;
    case Step::authorization:
      if (e.status == "valid") return e.identifier + " is already authorized";
      return "authorization for " + e.identifier + ": using " + e.challenge_type;
    case Step::presented: return e.challenge_type + " challenge presented for " + e.identifier;
    case Step::validating: return "waiting for the CA to validate " + e.identifier + " (" + e.challenge_type + ")";
    case Step::validated: return e.identifier + " validated";
    case Step::finalizing: return "finalizing the order (CSR sent)";
    case Step::issuing: return "waiting for the CA to issue the certificate";
    case Step::downloaded: return "certificate downloaded: " + e.detail;
  }
  return std::string(acme::to_string(e.step));
}

void ProgressPrinter::operator()(const acme::ProgressEvent& e) {
  if (mode_ == Mode::off) return;
  if (mode_ == Mode::json) {
    nlohmann::json j = {{"event", "progress"},
                        {"step", acme::to_string(e.step)},
                        {"elapsed_ms", e.elapsed.count()},
                        {"subject", e.subject},
                        {"waiting", e.waiting},
                        {"tick", e.tick}};
    if (!e.identifier.empty()) j["identifier"] = e.identifier;
    if (!e.challenge_type.empty()) j["challenge"] = e.challenge_type;
    if (!e.status.empty()) j["status"] = e.status;
    if (!e.detail.empty()) j["detail"] = e.detail;
    std::string line = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
    std::lock_guard lock(mu_);
    std::fputs(line.c_str(), out_);
    std::fflush(out_);
    return;
  }
  if (mode_ == Mode::plain) {
    if (e.tick > 0) return;  // one line per step: the polling ticks are for spinners
    std::string line = seconds_text(e.elapsed) + "  " + describe(e) + "\n";
    std::lock_guard lock(mu_);
    std::fputs(line.c_str(), out_);
    std::fflush(out_);
    return;
  }
  // Terminal.
  std::unique_lock lock(mu_);
  if (e.waiting) {
    if (e.tick > 0 && spinning_) return;  // the spinner thread redraws on its own
    clear_spinner_locked();
    waiting_text_ = describe(e);
    base_ = std::chrono::steady_clock::now() - e.elapsed;
    spinning_ = true;
    draw_spinner_locked();
    if (!thread_.joinable()) thread_ = std::thread([this] { spin_loop(); });
    return;
  }
  // A completed step ends any wait: the wait's line is replaced by the step that ended it.
  clear_spinner_locked();
  spinning_ = false;
  std::string line = seconds_text(e.elapsed) + "  " + describe(e) + "\n";
  std::fputs(line.c_str(), out_);
  std::fflush(out_);
}

void ProgressPrinter::spin_loop() {
  std::unique_lock lock(mu_);
  while (!stopping_) {
    cv_.wait_for(lock, std::chrono::milliseconds(100));
    if (stopping_) break;
    if (spinning_) draw_spinner_locked();
  }
}

void ProgressPrinter::draw_spinner_locked() {
  static constexpr char kFrames[] = {'|', '/', '-', '\\'};
  auto elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - base_);
  std::string line = "\r\033[K" + seconds_text(elapsed) + "  " + kFrames[frame_++ % 4] + " " + waiting_text_;
  std::fputs(line.c_str(), out_);
  std::fflush(out_);
  drawn_ = true;
}

void ProgressPrinter::clear_spinner_locked() {
  if (!drawn_) return;
  std::fputs("\r\033[K", out_);
  std::fflush(out_);
  drawn_ = false;
}

}  // namespace autotls::cli
