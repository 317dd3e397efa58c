#pragma once

// TempDir: a fresh directory under the system temp directory, removed with its contents when
// the object goes away.

#include <stdlib.h>

#include <filesystem>
#include <stdexcept>
#include <string>
#include <system_error>

namespace autotls::testing {

struct TempDir {
  std::filesystem::path path;
  // base: where to create it; empty means the system temp directory.
  explicit TempDir(const std::string& prefix = "autotls-test", std::filesystem::path base = {}) {
    if (base.empty()) base = std::filesystem::temp_directory_path();
    std::string tmpl = (base / (prefix + "-XXXXXX")).string();
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp " + tmpl + " failed");
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
};

}  // namespace autotls::testing
