#include "acme/transport.h"

#include <cstddef>

namespace autotls::acme {

namespace {

// HTTP field names are case-insensitive (RFC 9110 §5.1); compare in ASCII only, never by locale.
bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    auto lower = [](char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; };
    if (lower(a[i]) != lower(b[i])) return false;
  }
  return true;
}

}  // namespace

std::optional<std::string> HttpResponse::header(std::string_view name) const {
  for (const auto& [key, value] : headers) {
    if (iequals(key, name)) return value;
  }
  return std::nullopt;
}

std::vector<std::string> HttpResponse::headers_named(std::string_view name) const {
  std::vector<std::string> out;
  for (const auto& [key, value] : headers) {
    if (iequals(key, name)) out.push_back(value);
  }
  return out;
}

std::string_view version() { return AUTOTLS_VERSION; }

}  // namespace autotls::acme
