#pragma once

// ProgressPrinter shows the steps of an ACME issuance (acme::ProgressEvent), and the steps of
// the other commands that talk to a CA (account, revoke: step()), as they happen:
//  - on a terminal (stderr is a tty, not --verbose): one line per completed step and, while
//    waiting on the CA, a single line redrawn in place with a spinner and the seconds elapsed;
//  - not on a terminal (or --verbose): one plain line per step, no control characters, no
//    lines for the polling ticks;
//  - with --json: one JSON object per event (ticks included) on stderr, each with
//    "event":"progress"; stdout keeps only the command's result objects;
//  - with --quiet: nothing.
// serve uses mode_for_log (never a spinner: issuances overlap) with subjects shown, so each
// line says which certificate it is about.

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "acme/client.h"

namespace autotls::cli {

struct Options;

class ProgressPrinter {
 public:
  enum class Mode { off, terminal, plain, json };
  // mode_for picks the mode from --quiet, --json, --verbose and whether stderr is a terminal.
  static Mode mode_for(const Options& o);
  // mode_for_log is mode_for without the terminal mode (serve: concurrent issuances and event
  // lines on stdout would break a line redrawn in place).
  static Mode mode_for_log(const Options& o);

  // out is where lines go (stderr in the CLI; a file in tests). show_subject prefixes plain
  // and terminal lines with "<subject>: " (serve, where issuances overlap).
  explicit ProgressPrinter(Mode mode, std::FILE* out = stderr, bool show_subject = false);
  ~ProgressPrinter();  // clears the spinner line
  ProgressPrinter(const ProgressPrinter&) = delete;
  ProgressPrinter& operator=(const ProgressPrinter&) = delete;

  void operator()(const acme::ProgressEvent& e);
  acme::ProgressCallback callback() {
    return [this](const acme::ProgressEvent& e) { (*this)(e); };
  }

  // step reports one step of a command that is not an issuance (account, revoke): name is the
  // JSON "step" ("directory", "account", "register", "revoke", ...), text the human line,
  // subject what it is about. waiting marks a request to the CA in flight: a spinner on a
  // terminal until the next step or note. Elapsed time counts from the printer's construction.
  // JSON: {"event":"progress","step":name,"elapsed_ms","subject","waiting","tick":0,"detail"?}.
  void step(const std::string& name, const std::string& text, bool waiting = false, const std::string& subject = "",
            const std::string& detail = "");
  // wait runs f (a request to the CA) with a waiting step shown (a spinner on a terminal) and
  // clears it when f returns, so that what follows (a result, an error) starts a clean line.
  template <class F>
  auto wait(const std::string& name, const std::string& text, const std::string& subject, F&& f) {
    step(name, text, true, subject);
    auto r = f();
    finish();
    return r;
  }
  // finish clears a spinner line left by a waiting step (the destructor does it too).
  void finish();
  // note reports something that is not a step but belongs with them (an issuer failed and the
  // next one is tried): a plain line "   1.2s  text", or with --json {"event":event, fields...}.
  void note(const std::string& event, const nlohmann::json& fields, const std::string& text);

  // describe is the human text of a step ("order created for a.test", ...).
  static std::string describe(const acme::ProgressEvent& e);

 private:
  // emit prints one event: json_line with --json, else text (waiting: spinner on a terminal).
  void emit(const nlohmann::json& json_line, const std::string& text, bool waiting, int tick,
            std::chrono::milliseconds elapsed);
  void spin_loop();
  void draw_spinner_locked();
  void clear_spinner_locked();

  Mode mode_;
  std::FILE* out_;
  bool show_subject_;
  const std::chrono::steady_clock::time_point created_ = std::chrono::steady_clock::now();
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  bool spinning_ = false;     // a waiting step is on screen
  bool drawn_ = false;        // the spinner line is on screen
  std::string waiting_text_;  // the waiting step's text
  std::chrono::steady_clock::time_point base_;  // steady time of elapsed 0
  int frame_ = 0;
  std::thread thread_;
};

}  // namespace autotls::cli
