#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "acme/util/error.h"

namespace autotls::acme {

using HttpHeaders = std::vector<std::pair<std::string, std::string>>;

struct HttpRequest {
  std::string method;  // "GET", "HEAD" or "POST"
  std::string url;
  HttpHeaders headers;
  std::string body;
};

struct HttpResponse {
  int status = 0;
  HttpHeaders headers;  // in the order received; names as the server sent them
  std::string body;

  // header returns the first header with this name (case-insensitive), if any.
  std::optional<std::string> header(std::string_view name) const;
  // headers_named returns every header with this name (case-insensitive), in order.
  std::vector<std::string> headers_named(std::string_view name) const;
};

// HttpTransport sends one whole request and returns one whole response. It is the only seam
// between the ACME protocol and the network. An HTTP error status is NOT an Error here: only a
// failure to obtain a response is (Errc::transport, Errc::timeout, Errc::bad_response for an
// oversized or truncated body). Implementations MUST be safe to call from several threads.
class HttpTransport {
 public:
  virtual ~HttpTransport() = default;
  virtual Result<HttpResponse> send(const HttpRequest& request) = 0;
};

struct CurlOptions {
  std::string ca_bundle;  // PEM file of trusted roots; empty: the system store
  std::chrono::milliseconds connect_timeout{10'000};
  std::chrono::milliseconds total_timeout{60'000};
  size_t max_body_bytes = 1 << 20;  // larger bodies are refused with Errc::bad_response
  std::string user_agent;           // empty: "autotls/<version>"
  // Proxies come from the usual environment variables (https_proxy, HTTPS_PROXY, no_proxy),
  // as libcurl reads them.
};

// make_curl_transport returns the production transport (libcurl, connections reused).
std::unique_ptr<HttpTransport> make_curl_transport(const CurlOptions& options = {});

// version returns the library version, e.g. "0.1.0".
std::string_view version();

}  // namespace autotls::acme
