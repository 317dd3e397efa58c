#include "server/proxy.h"

#include <algorithm>
#include <atomic>
#include <optional>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <thread>

#include "server/detail/http_util.h"

namespace autotls::server::detail {
namespace {

using SteadyClock = std::chrono::steady_clock;

// Bridge joins the upstream thread (httplib client: sends the request, receives the response)
// and the worker (httplib server: writes our response to the client).
struct Bridge {
  std::mutex mu;
  std::condition_variable cv;
  bool headers_ready = false;
  bool done = false;       // upstream exchange over (ok or not)
  bool ok = false;         // send() succeeded: the whole response body was received
  bool cancelled = false;  // the client side gave up: stop receiving
  httplib::Error error = httplib::Error::Success;
  int status = 0;
  httplib::Headers headers;
  std::deque<std::string> chunks;
  std::size_t queued = 0;
  std::thread thread;
  std::atomic<bool> reader_used{false};  // the request body was (partly) consumed
  std::unique_ptr<httplib::Client> client;  // used and released by the upstream thread only
  SteadyClock::time_point started = SteadyClock::now();

  void cancel() {
    {
      std::lock_guard lock(mu);
      cancelled = true;
    }
    cv.notify_all();
  }
  void join() {
    if (thread.joinable()) thread.join();
  }
};

}  // namespace

std::unique_ptr<httplib::Client> UpstreamPool::acquire(const ProxySite& site) {
  std::unique_ptr<httplib::Client> cli;
  {
    std::lock_guard lock(mu_);
    auto it = idle_.find(site.upstream);
    if (it != idle_.end() && !it->second.empty()) {
      cli = std::move(it->second.back());
      it->second.pop_back();
    }
  }
  if (!cli) {
    cli = std::make_unique<httplib::Client>(site.upstream);
    cli->set_keep_alive(true);
    cli->set_follow_location(false);
    cli->set_decompress(false);
  }
  cli->set_connection_timeout(site.connect_timeout);
  cli->set_read_timeout(site.read_timeout);
  cli->set_write_timeout(site.write_timeout);
  return cli;
}

void UpstreamPool::release(const std::string& upstream, std::unique_ptr<httplib::Client> client) {
  std::lock_guard lock(mu_);
  auto& list = idle_[upstream];
  if (list.size() < kMaxIdle) list.push_back(std::move(client));
}

std::size_t UpstreamPool::idle(const std::string& upstream) const {
  std::lock_guard lock(mu_);
  auto it = idle_.find(upstream);
  return it == idle_.end() ? 0 : it->second.size();
}

void proxy(const ProxySite& site, const httplib::Request& req,
           const httplib::ContentReader* reader, httplib::Response& res, bool tls,
           std::size_t max_body, UpstreamPool& pool, Logger& log) {
  auto b = std::make_shared<Bridge>();

  httplib::Request up;
  up.method = req.method;
  up.path = req.target;
  for (const auto& [k, v] : req.headers) {
    // Accept-Encoding is dropped so the upstream answers uncompressed and httplib's own
    // compression (negotiated with the client) never encodes twice. Expect: the body follows
    // at once (httplib already answered 100-continue to the client).
    if (is_hop_by_hop(k) || iequals(k, "accept-encoding") || iequals(k, "expect")) continue;
    up.headers.emplace(k, v);
  }
  // Client-supplied X-Forwarded-* were dropped above: we are the edge, nothing before us is
  // trusted.
  up.headers.emplace("X-Forwarded-For", req.remote_addr);
  up.headers.emplace("X-Forwarded-Proto", tls ? "https" : "http");
  up.headers.emplace("X-Forwarded-Host", req.get_header_value("Host"));
  bool has_length = req.has_header("Content-Length");
  bool chunked = iequals(req.get_header_value("Transfer-Encoding"), "chunked");
  if (reader && has_length && req.get_header_value<uint64_t>("Content-Length") > max_body) {
    // httplib's reader refuses it at once and sets 413 on res (its payload limit).
    (*reader)([](const char*, size_t) { return true; });
    res.status = 413;
    res.set_content("request body too large\n", "text/plain");
    return;
  }
  b->client = pool.acquire(site);
  if (reader && (has_length || chunked)) {
    // The body goes from the client socket to the upstream socket in the reader's chunks; it is
    // read on the upstream thread while the worker waits in this handler, so the client stream
    // has one user at a time.
    up.content_length_ = has_length ? req.get_header_value<uint64_t>("Content-Length") : 0;
    up.is_chunked_content_provider_ = !has_length;
    up.content_provider_ = [reader, b, chunked_out = !has_length](size_t, size_t,
                                                                 httplib::DataSink& sink) {
      b->reader_used = true;
      bool ok = (*reader)([&](const char* data, size_t n) { return sink.write(data, n); });
      if (ok && chunked_out) sink.done();
      return ok;
    };
    // httplib's send() frames a chunked provider but leaves the header to its callers.
    if (has_length) {
      up.set_header("Content-Length", std::to_string(up.content_length_));
    } else {
      up.set_header("Transfer-Encoding", "chunked");
    }
  } else {
    up.body = req.body;
  }
  up.response_handler = [b](const httplib::Response& r) {
    {
      std::lock_guard lock(b->mu);
      b->status = r.status;
      b->headers = r.headers;
      b->headers_ready = true;
    }
    b->cv.notify_all();
    return true;
  };
  up.content_receiver = [b](const char* data, size_t n, uint64_t, uint64_t) {
    std::unique_lock lock(b->mu);
    // Back-pressure: the upstream waits while the client is slower (bounded by its read
    // timeout on the upstream side, by our write timeout on the client side).
    b->cv.wait(lock, [&] { return b->cancelled || b->queued < kResponseQueueBytes; });
    if (b->cancelled) return false;
    b->chunks.emplace_back(data, n);
    b->queued += n;
    lock.unlock();
    b->cv.notify_all();
    return true;
  };

  // The pool outlives every exchange: the response's releaser joins this thread.
  b->thread = std::thread([b, up = std::move(up), &pool, upstream = site.upstream]() mutable {
    httplib::Response r;
    httplib::Error err = httplib::Error::Success;
    bool ok = b->client->send(up, r, err);
    // The whole response is in our queue: the connection is free for the next request even
    // before the client has read it all. A failed or cancelled exchange closes it instead.
    if (ok) {
      pool.release(upstream, std::move(b->client));
    } else {
      b->client.reset();
    }
    {
      std::lock_guard lock(b->mu);
      b->ok = ok;
      b->error = err;
      b->done = true;
    }
    b->cv.notify_all();
  });

  {
    std::unique_lock lock(b->mu);
    b->cv.wait(lock, [&] { return b->headers_ready || b->done; });
  }
  if (!b->headers_ready) {
    b->join();
    // Never connected: the request body is still on the client connection; read it away so
    // the next request on this keep-alive connection parses from the right place.
    if (reader && !b->reader_used) (*reader)([](const char*, size_t) { return true; });
    if (res.status == 413) {
      // A chunked body ran past the payload limit inside httplib's reader.
      res.set_content("request body too large\n", "text/plain");
      return;
    }
    auto elapsed = SteadyClock::now() - b->started;
    auto err = b->error;
    bool timed_out = err == httplib::Error::ConnectionTimeout ||
                     (err == httplib::Error::Read && elapsed >= site.read_timeout * 9 / 10);
    res.status = timed_out ? 504 : 502;
    res.set_content(timed_out ? "upstream timed out\n" : "upstream unavailable\n", "text/plain");
    log.log(LogLevel::warn, "server", "upstream request failed",
            {{"upstream", site.upstream}, {"error", httplib::to_string(err)},
             {"status", std::to_string(res.status)}});
    return;
  }

  res.status = b->status;
  std::string content_type = "application/octet-stream";
  std::optional<std::size_t> length;
  for (const auto& [k, v] : b->headers) {
    if (iequals(k, "content-type")) {
      content_type = v;
      continue;
    }
    if (iequals(k, "content-length")) {
      try {
        length = static_cast<std::size_t>(std::stoull(v));
      } catch (...) {
      }
      continue;
    }
    if (!is_hop_by_hop(k)) res.headers.emplace(k, v);
  }
  bool no_body = req.method == "HEAD" || b->status == 204 || b->status == 304 ||
                 (b->status >= 100 && b->status < 200) || (length && *length == 0);
  auto release = [b](bool) {
    b->cancel();
    b->join();
  };
  if (no_body) {
    {
      std::unique_lock lock(b->mu);
      b->cv.wait(lock, [&] { return b->done; });
    }
    if (length && req.method == "HEAD") res.set_header("Content-Length", std::to_string(*length));
    if (b->status != 204 && b->status != 304 && req.method != "HEAD") {
      res.set_content("", content_type);
    } else if (b->headers.find("Content-Type") != b->headers.end()) {
      res.set_header("Content-Type", content_type);
    }
    release(true);
    return;
  }
  // Pull side: the worker writes chunks as the upstream thread queues them.
  auto pull = [b](httplib::DataSink& sink, bool chunked_out) {
    for (;;) {
      std::string chunk;
      {
        std::unique_lock lock(b->mu);
        b->cv.wait(lock, [&] { return !b->chunks.empty() || b->done; });
        if (b->chunks.empty()) {
          // Upstream finished: a complete body ends the response, a broken one aborts it.
          // With a Content-Length httplib only asks while bytes are missing: a short body.
          if (!b->ok || !chunked_out) return false;
          sink.done();
          return true;
        }
        chunk = std::move(b->chunks.front());
        b->chunks.pop_front();
        b->queued -= chunk.size();
      }
      b->cv.notify_all();
      if (!sink.write(chunk.data(), chunk.size())) return false;
      if (!chunked_out) return true;  // httplib calls again while offset < length
    }
  };
  if (length) {
    res.set_content_provider(
        *length, content_type,
        [pull](size_t, size_t, httplib::DataSink& sink) { return pull(sink, false); }, release);
  } else {
    res.set_chunked_content_provider(
        content_type, [pull](size_t, httplib::DataSink& sink) { return pull(sink, true); },
        release);
  }
}

}  // namespace autotls::server::detail
