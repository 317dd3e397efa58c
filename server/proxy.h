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
#include <unordered_map>
#include <vector>

#include "acme/util/logger.h"
#include "server/config.h"

namespace autotls::server::detail {

struct Bridge;  // one exchange with an upstream (proxy.cpp)

// UpstreamPool keeps idle keep-alive httplib::Clients per upstream URL (at most kMaxIdle each).
// A client is reused only after a response that was read to its end. It also knows every
// exchange in flight, so that abort_all can cut them at the end of a drain. Thread-safe.
class UpstreamPool {
 public:
  static constexpr std::size_t kMaxIdle = 32;
  std::unique_ptr<httplib::Client> acquire(const ProxySite& site);
  void release(const std::string& upstream, std::unique_ptr<httplib::Client> client);
  std::size_t idle(const std::string& upstream) const;

  // abort_all cuts every exchange in flight: its upstream socket is shut down and the worker
  // waiting on it (for the response header or the next body bytes) returns at once, so the
  // client connection is closed without a complete response. Every later proxy() call fails at
  // once. Server::shutdown calls it when the drain deadline has passed. Idempotent.
  void abort_all();

  // enter registers an exchange for abort_all (false: aborting, do not start it); leave is
  // called by the exchange's destructor. Used by proxy() only.
  bool enter(const std::shared_ptr<Bridge>& b);
  void leave(const Bridge* b);

 private:
  mutable std::mutex mu_;
  std::map<std::string, std::vector<std::unique_ptr<httplib::Client>>> idle_;
  bool aborting_ = false;
  std::unordered_map<const Bridge*, std::weak_ptr<Bridge>> active_;
};

// kResponseQueueBytes bounds the response bytes held between upstream and client.
inline constexpr std::size_t kResponseQueueBytes = 1 << 20;

// proxy forwards req to site and fills res. reader (may be null) streams the request body;
// without it req.body is sent. A body over max_body answers 413. Answers 502 when the upstream
// cannot be reached or fails before its response header, 504 on a connect or response timeout;
// a failure after the header was forwarded aborts the client connection (the status line is
// already gone: the response's content provider fails, so httplib reports the write failed).
// Returns false when the client connection is out of step and MUST be closed after res is
// written ("Connection: close"): the request body was not read to its end (the upstream failed
// while it was being streamed, or the client's body broke off), or abort_all cut the exchange.
// After a 502/504 whose request body was fully consumed it returns true: keep-alive may stay.
[[nodiscard]] bool proxy(const ProxySite& site, const httplib::Request& req,
           const httplib::ContentReader* reader, httplib::Response& res, bool tls,
           std::size_t max_body, UpstreamPool& pool, Logger& log);

}  // namespace autotls::server::detail
