#pragma once

// Streaming reverse proxy over httplib 0.11.4's client: request bodies are pulled from the
// client connection and pushed to the upstream as they arrive, response bodies go back through
// a bounded queue; upstream connections are kept alive in a small pool per upstream.
// Internal to server/ (used by server.cpp).

#include <httplib.h>

#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "acme/util/logger.h"
#include "server/config.h"

namespace autotls::server::detail {

// UpstreamPool keeps idle keep-alive httplib::Clients per upstream URL (at most kMaxIdle each).
// A client is reused only after a response that was read to its end.
class UpstreamPool {
 public:
  static constexpr std::size_t kMaxIdle = 32;
  std::unique_ptr<httplib::Client> acquire(const ProxySite& site);
  void release(const std::string& upstream, std::unique_ptr<httplib::Client> client);
  std::size_t idle(const std::string& upstream) const;

 private:
  mutable std::mutex mu_;
  std::map<std::string, std::vector<std::unique_ptr<httplib::Client>>> idle_;
};

// kResponseQueueBytes bounds the response bytes held between upstream and client.
inline constexpr std::size_t kResponseQueueBytes = 1 << 20;

// proxy forwards req to site and fills res. reader (may be null) streams the request body;
// without it req.body is sent. A body over max_body answers 413. Answers 502 when the upstream cannot be reached or fails before
// its response header, 504 on a connect or response timeout; a failure after the header was
// forwarded aborts the client connection (the status line is already gone).
void proxy(const ProxySite& site, const httplib::Request& req,
           const httplib::ContentReader* reader, httplib::Response& res, bool tls,
           std::size_t max_body, UpstreamPool& pool, Logger& log);

}  // namespace autotls::server::detail
