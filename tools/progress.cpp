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

ProgressPrinter::Mode ProgressPrinter::mode_for_log(const Options& o) {
  if (o.quiet) return Mode::off;
  if (o.json) return Mode::json;
  return Mode::plain;
}

ProgressPrinter::ProgressPrinter(Mode mode, std::FILE* out, bool show_subject)
    : mode_(mode), out_(out), show_subject_(show_subject) {}

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
  nlohmann::json j;
  if (mode_ == Mode::json) {
    j = {{"event", "progress"},
         {"step", acme::to_string(e.step)},
         {"elapsed_ms", e.elapsed.count()},
         {"subject", e.subject},
         {"waiting", e.waiting},
         {"tick", e.tick}};
    if (!e.identifier.empty()) j["identifier"] = e.identifier;
    if (!e.challenge_type.empty()) j["challenge"] = e.challenge_type;
    if (!e.status.empty()) j["status"] = e.status;
    if (!e.detail.empty()) j["detail"] = e.detail;
  }
  std::string text = describe(e);
  if (show_subject_ && !e.subject.empty()) text = e.subject + ": " + text;
  emit(j, text, e.waiting, e.tick, e.elapsed);
}

void ProgressPrinter::step(const std::string& name, const std::string& text, bool waiting, const std::string& subject,
                           const std::string& detail) {
  if (mode_ == Mode::off) return;
  auto elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - created_);
  nlohmann::json j;
  if (mode_ == Mode::json) {
    j = {{"event", "progress"}, {"step", name},   {"elapsed_ms", elapsed.count()},
         {"subject", subject},  {"waiting", waiting}, {"tick", 0}};
    if (!detail.empty()) j["detail"] = detail;
  }
  std::string line = show_subject_ && !subject.empty() ? subject + ": " + text : text;
  emit(j, line, waiting, 0, elapsed);
}

void ProgressPrinter::note(const std::string& event, const nlohmann::json& fields, const std::string& text) {
  if (mode_ == Mode::off) return;
  auto elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - created_);
  nlohmann::json j;
  if (mode_ == Mode::json) {
    j = {{"event", event}, {"elapsed_ms", elapsed.count()}};
    if (fields.is_object()) j.update(fields);
  }
  emit(j, text, false, 0, elapsed);
}

void ProgressPrinter::emit(const nlohmann::json& json_line, const std::string& text, bool waiting, int tick,
                           std::chrono::milliseconds elapsed) {
  if (mode_ == Mode::off) return;
  if (mode_ == Mode::json) {
    std::string line = json_line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
    std::lock_guard lock(mu_);
    std::fputs(line.c_str(), out_);
    std::fflush(out_);
    return;
  }
  if (mode_ == Mode::plain) {
    if (tick > 0) return;  // one line per step: the polling ticks are for spinners
    std::string line = seconds_text(elapsed) + "  " + text + "\n";
    std::lock_guard lock(mu_);
    std::fputs(line.c_str(), out_);
    std::fflush(out_);
    return;
  }
  // Terminal.
  std::unique_lock lock(mu_);
  if (waiting) {
    if (tick > 0 && spinning_) return;  // the spinner thread redraws on its own
    clear_spinner_locked();
    waiting_text_ = text;
    base_ = std::chrono::steady_clock::now() - elapsed;
    spinning_ = true;
    draw_spinner_locked();
    if (!thread_.joinable()) thread_ = std::thread([this] { spin_loop(); });
    return;
  }
  // A completed step ends any wait: the wait's line is replaced by the step that ended it.
  clear_spinner_locked();
  spinning_ = false;
  std::string line = seconds_text(elapsed) + "  " + text + "\n";
  std::fputs(line.c_str(), out_);
  std::fflush(out_);
}

void ProgressPrinter::finish() {
  std::lock_guard lock(mu_);
  clear_spinner_locked();
  spinning_ = false;
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
