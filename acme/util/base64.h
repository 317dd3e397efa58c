#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace autotls {

// base64url_encode encodes without padding (RFC 7515 §2).
std::string base64url_encode(std::string_view data);
// base64url_decode accepts input with or without padding; nullopt on any invalid character.
std::optional<std::string> base64url_decode(std::string_view text);
// base64_encode is standard base64 with padding (RFC 4648 §4).
std::string base64_encode(std::string_view data);
std::optional<std::string> base64_decode(std::string_view text);

}  // namespace autotls
