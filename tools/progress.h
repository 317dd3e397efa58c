#pragma once

// ProgressPrinter shows the steps of an ACME issuance (acme::ProgressEvent) as they happen:
//  - on a terminal (stderr is a tty, not --verbose): one line per completed step and, while
//    waiting on the CA, a single line redrawn in place with a spinner and the seconds elapsed;
//  - not on a terminal (or --verbose): one plain line per step, no control characters, no
//    lines for the polling ticks;
//  - with --json: one JSON object per event (ticks included) on stderr, each with
//    "event":"progress"; stdout keeps only the command's result objects;
//  - with --quiet: nothing.

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>

#include "acme/client.h"

namespace autotls::cli {

struct Options;

class ProgressPrinter {
 public:
  enum class Mode { off, terminal, plain, json };
  // mode_for picks the mode from --quiet, --json, --verbose and whether stderr is a terminal.
  static Mode mode_for(const Options& o);

  // out is where lines go (stderr in the CLI; a file in tests).
  explicit ProgressPrinter(Mode mode, std::FILE* out = stderr);
  ~ProgressPrinter();  // clears the spinner line
  ProgressPrinter(const ProgressPrinter&) = delete;
  ProgressPrinter& operator=(const ProgressPrinter&) = delete;

  void operator()(const acme::ProgressEvent& e);
  acme::ProgressCallback callback() {
    return [this](const acme::ProgressEvent& e) { (*this)(e); };
  }

  // describe is the human text of a step ("order created for a.test", ...).
  static std::string describe(const acme::ProgressEvent& e);

 private:
  void spin_loop();
  void draw_spinner_locked();
  void clear_spinner_locked();

  Mode mode_;
  std::FILE* out_;
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
