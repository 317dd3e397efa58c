#pragma once

// Streaming reverse proxy over httplib 0.11.4's client: request bodies are pulled from the
// client connection and pushed to the upstream as they arrive, response bodies go back through
// a bounded queue; upstream connections are kept alive in a small pool per upstream.
// Internal to server/ (used by server.cpp).

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "acme/util/logger.h"
#include "server/config.h"

namespace autotls::server::detail {

struct Bridge;  // one exchange with an upstream (proxy.cpp)

// UpstreamPool keeps idle keep-alive httplib::Clients per upstream URL (at most the site's
// max_idle each, none older than its idle_timeout). A client goes back only after a response
// that was read to its end and did not ask to close (Connection: close in any case, HTTP/1.0);
// a failed or cancelled exchange closes its connection. It also runs the exchanges: each one
// needs a thread of its own (httplib's client blocks), and a parked thread is reused instead
// of starting one per request (thread creation was a third of the proxy's CPU). It knows every
// exchange in flight, so that abort_all can cut them at the end of a drain. Thread-safe.
class UpstreamPool {
 public:
  UpstreamPool() = default;
  UpstreamPool(const UpstreamPool&) = delete;
  UpstreamPool& operator=(const UpstreamPool&) = delete;
  ~UpstreamPool();  // joins the exchange threads (every exchange is over by then)

  // acquire returns an idle client for site.upstream, or a new one (reused: it holds a
  // connection opened for an earlier request). fresh always makes a new one.
  std::unique_ptr<httplib::Client> acquire(const ProxySite& site, bool& reused);
  static std::unique_ptr<httplib::Client> fresh(const ProxySite& site);
  void release(const ProxySite& site, std::unique_ptr<httplib::Client> client);
  std::size_t idle(const std::string& upstream) const;
  // retain closes the idle connections of every upstream not in keep (a reload changed or
  // removed the sites that used them); clear closes all of them (shutdown).
  void retain(const std::vector<std::string>& keep);
  void clear();

  // run starts job on a parked exchange thread, or on a new one when none is free. Threads
  // are never more than the exchanges in flight at the busiest moment (one per worker).
  // Throws std::system_error when a thread is needed and cannot be created; the job is then
  // dropped, never run.
  void run(std::function<void()> job);
  // Test hook: the next thread run() would create fails as if std::thread had thrown.
  std::atomic<bool> fail_next_thread_for_test{false};

  // abort_all cuts every exchange in flight: its upstream socket is shut down and the worker
  // waiting on it (for the response header or the next body bytes) returns at once, so the
  // client connection is closed without a complete response. Every later proxy() call fails at
  // once, and no connection goes back to the pool. Server::shutdown calls it when the drain
  // deadline has passed. Idempotent.
  void abort_all();

  // enter registers an exchange for abort_all (false: aborting, do not start it); leave is
  // called by the exchange's destructor. Used by proxy() only.
  bool enter(const std::shared_ptr<Bridge>& b);
  void leave(const Bridge* b);

 private:
  struct Idle {
    std::unique_ptr<httplib::Client> client;
    std::chrono::steady_clock::time_point since;
  };
  // Runner is one exchange thread with its own mailbox: run() hands a job to one parked
  // runner directly, so the workers and the exchange threads never queue on one shared lock and
  // condition variable (their contention cost more CPU than the hand-off itself).
  struct Runner {
    std::mutex mu;
    std::condition_variable cv;
    std::function<void()> job;  // under mu: the next job (empty: none)
    bool stop = false;          // under mu: the pool is being destroyed
    std::thread thread;
  };
  void runner(Runner& r);

  mutable std::mutex mu_;
  std::map<std::string, std::vector<Idle>> idle_;  // oldest first
  bool aborting_ = false;
  std::unordered_map<const Bridge*, std::weak_ptr<Bridge>> active_;

  std::mutex run_mu_;  // guards the two vectors below, held only to pick or park a runner
  std::vector<Runner*> parked_;  // runners waiting for a job, the most recently parked last
  std::vector<std::unique_ptr<Runner>> runners_;
};

// kResponseQueueBytes bounds the response bytes held between upstream and client.
inline constexpr std::size_t kResponseQueueBytes = 1 << 20;

// proxy forwards req to site and fills res. reader (may be null) streams the request body;
// without it req.body is sent. A body over max_body answers 413. Answers 502 when the upstream
// cannot be reached, fails before its response header or sends an ambiguous body length (both
// Content-Length and Transfer-Encoding, or differing Content-Lengths), 504 on a connect or
// response timeout;
// a failure after the header was forwarded aborts the client connection (the status line is
// already gone: the response's content provider fails, so httplib reports the write failed).
// Returns false when the client connection is out of step and MUST be closed after res is
// written ("Connection: close"): the request body was not read to its end (the upstream failed
// while it was being streamed, or the client's body broke off), or abort_all cut the exchange.
// After a 502/504 whose request body was fully consumed it returns true: keep-alive may stay.
// A GET/HEAD/OPTIONS/PUT/DELETE whose request body (if any) was not streamed, sent on a pooled
// connection that fails before the response header, is sent once more on a new connection
// (the upstream closed an idle connection as we reused it), provided it failed quickly (under
// min(1 s, read_timeout / 2): never a read timeout) and on the reused socket itself; any other
// method or failure answers 502 (504 for a timeout).
// client_read_timed_out (may be null) is the client connection's flag that a read of its
// request body waited past the server's read timeout (set by the connection stream, possibly
// on the exchange thread). A request whose body stopped coming is the client's fault, not the
// upstream's: it answers 408 and returns false (the rest of the body is not on the
// connection); the upstream, which got a request cut short, sees its connection closed.
[[nodiscard]] bool proxy(const ProxySite& site, const httplib::Request& req,
           const httplib::ContentReader* reader, httplib::Response& res, bool tls,
           std::size_t max_body, UpstreamPool& pool, Logger& log,
           const std::atomic<bool>* client_read_timed_out = nullptr);

}  // namespace autotls::server::detail
