#include "server/proxy.h"

#include <algorithm>
#include <charconv>
#include <atomic>
#include <optional>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <system_error>
#include <thread>

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "server/detail/http_util.h"

namespace autotls::server::detail {
namespace {
using SteadyClock = std::chrono::steady_clock;

// body_framing reads the response's Content-Length; false when its framing is ambiguous:
// Content-Length with Transfer-Encoding (RFC 9112 6.1: a server MUST NOT send both; httplib
// then reads chunks and ignores the length, while we would forward the length), several
// Content-Length values that differ (httplib reads the first, we forwarded the last), or one
// that is not a number. A proxy must not forward such a response (RFC 9112 6.3): 502.
bool body_framing(const httplib::Headers& headers, std::optional<std::uint64_t>& length) {
  bool te = false;
  for (const auto& [k, v] : headers) {
    if (iequals(k, "transfer-encoding")) {
      te = true;
    } else if (iequals(k, "content-length")) {
      std::uint64_t n = 0;
      auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
      if (ec != std::errc() || end != v.data() + v.size() || v.empty()) return false;
      if (length && *length != n) return false;
      length = n;
    }
  }
  return !(te && length);
}
}  // namespace

// Bridge joins the upstream thread (httplib client: sends the request, receives the response)
// and the worker (httplib server: writes our response to the client).
struct Bridge {
  std::mutex mu;
  std::condition_variable cv;
  bool headers_ready = false;
  bool done = false;       // upstream exchange over (ok or not)
  bool ok = false;         // send() succeeded: the whole response body was received
  bool cancelled = false;  // the client side gave up, or abort_all: stop receiving
  bool aborted = false;    // abort_all cut the exchange (the drain deadline passed)
  bool bad_framing = false;  // the response's Content-Length/Transfer-Encoding were refused
  bool overflow = false;     // the body ran past its Content-Length: refused
  std::optional<std::uint64_t> length;  // the response's Content-Length (body_framing)
  httplib::Error error = httplib::Error::Success;
  int status = 0;
  httplib::Headers headers;
  std::deque<std::string> chunks;
  std::size_t queued = 0;
  std::uint64_t received = 0;  // response body bytes queued so far
  std::atomic<bool> reader_used{false};    // the request body was (partly) consumed
  std::atomic<bool> body_complete{false};  // ... and read to its end
  // client is used by the upstream thread; client_mu guards its lifetime against stop_client()
  // from other threads (httplib's Client::stop() is the one call safe during a send()).
  std::mutex client_mu;
  std::unique_ptr<httplib::Client> client;
  UpstreamPool* pool = nullptr;  // set by UpstreamPool::enter
  // connect_fd is our duplicate of the upstream socket while send() runs on a new connection
  // (under connect_mu; -1 otherwise): httplib holds the client's lock while it connects, so
  // Client::stop() cannot cut a connect; shutdown(2) on our duplicate can, and since we own the
  // duplicate until we close it (under connect_mu) it never names a reused descriptor.
  // connect_mu is never held while another lock is taken (httplib's hook runs under its lock).
  std::mutex connect_mu;
  int connect_fd = -1;
  bool connected = false;  // watch_connect ran: a send() opened a new socket (under connect_mu)
  SteadyClock::time_point started = SteadyClock::now();

  Bridge() = default;
  Bridge(const Bridge&) = delete;
  Bridge& operator=(const Bridge&) = delete;
  ~Bridge() {
    if (pool) pool->leave(this);
  }

  // stop_client shuts down the upstream socket of a send() in progress, so it fails at once
  // instead of at its read timeout.
  void stop_client() {
    {
      std::lock_guard lock(connect_mu);
      if (connect_fd >= 0) ::shutdown(connect_fd, SHUT_RDWR);
    }
    std::lock_guard lock(client_mu);
    if (client) client->stop();
  }
  // cancel tells the upstream thread to stop receiving; abort (abort_all) also shuts its socket
  // down at once.
  void cancel(bool abort = false) {
    {
      std::lock_guard lock(mu);
      cancelled = true;
      if (abort) aborted = true;
    }
    cv.notify_all();
    if (abort) stop_client();
  }
  // finish cancels the exchange and waits until the upstream thread is done with it. An exchange that is not over
  // within 20 ms (an upstream that sends nothing) gets its socket shut down. A stop() that came
  // before send() had its socket finds nothing to shut down, so it is repeated until the thread
  // is done (httplib holds the client's lock while it connects: a connect in progress ends at
  // its connect_timeout at worst). A complete exchange ends at once, so its connection, already
  // back in the pool or about to be, is never stopped.
  void finish() {
    cancel();
    std::unique_lock lock(mu);
    while (!cv.wait_for(lock, std::chrono::milliseconds(20), [&] { return done; })) {
      lock.unlock();
      stop_client();
      lock.lock();
    }
  }
  // worker_has_work (under mu): there are response bytes the worker may write now. A body with
  // a Content-Length keeps its last bytes back until the exchange is done (see pull in proxy()),
  // unless the queue is full. The upstream thread wakes the worker only when this (or done, or
  // aborted) turns true: each wake is a context switch, and a spurious one (the response header
  // alone, the last bytes of a body) cost more than the rest of a small exchange.
  bool worker_has_work() const {
    return !chunks.empty() && (!length || received < *length || queued >= kResponseQueueBytes);
  }
  // join waits until the upstream thread is done with the exchange (it may still be dropping
  // its copies of the Bridge and the request: they are shared, and harmless).
  void join() {
    std::unique_lock lock(mu);
    cv.wait(lock, [&] { return done; });
  }
};

UpstreamPool::~UpstreamPool() {
  std::vector<std::unique_ptr<Runner>> runners;
  {
    std::lock_guard lock(run_mu_);
    runners = std::move(runners_);
  }
  for (auto& r : runners) {
    {
      std::lock_guard lock(r->mu);
      r->stop = true;
    }
    r->cv.notify_one();
  }
  // A runner still finishing its last job parks itself (parked_, under run_mu_) first.
  for (auto& r : runners) r->thread.join();
}

void UpstreamPool::run(std::function<void()> job) {
  Runner* r = nullptr;
  {
    std::lock_guard lock(run_mu_);
    if (parked_.empty()) {
      // The thread comes first: if it cannot be created (std::system_error), the job is
      // dropped with the new Runner, never run (its request reader points into the caller's
      // frame, which unwinds).
      if (fail_next_thread_for_test.exchange(false)) {
        throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again),
                                "exchange thread (test)");
      }
      runners_.reserve(runners_.size() + 1);
      auto owned = std::make_unique<Runner>();
      owned->job = std::move(job);  // taken by the new thread as it starts
      Runner* fresh = owned.get();
      owned->thread = std::thread([this, fresh] { runner(*fresh); });
      runners_.push_back(std::move(owned));
      return;
    }
    r = parked_.back();
    parked_.pop_back();
  }
  {
    std::lock_guard lock(r->mu);
    r->job = std::move(job);
  }
  r->cv.notify_one();
}

void UpstreamPool::runner(Runner& r) {
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock lock(r.mu);
      // A job handed over before stop is still run (every exchange is over by ~UpstreamPool).
      r.cv.wait(lock, [&] { return r.stop || r.job; });
      if (!r.job) return;
      job = std::move(r.job);
      r.job = nullptr;
    }
    job();
    job = nullptr;  // the exchange's last references go before this thread parks again
    std::lock_guard lock(run_mu_);
    parked_.push_back(&r);
  }
}

namespace {
// The exchange the calling exchange thread runs (set around its send() calls), for the socket
// options hook below, which httplib calls on that thread for each new upstream socket.
thread_local Bridge* t_exchange = nullptr;

// watch_connect records a duplicate of a new upstream socket in the running exchange, so that
// abort_all can cut its connect; an exchange already aborted has it cut at once.
void watch_connect(int fd) {
  Bridge* b = t_exchange;
  if (!b) return;
  {
    std::lock_guard lock(b->connect_mu);
    if (b->connect_fd >= 0) ::close(b->connect_fd);  // the retry's second socket
    b->connect_fd = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
    b->connected = true;
  }
  // Checked after the duplicate is visible: a cancel that came before it is seen here, one
  // that comes after finds the duplicate.
  bool cancelled;
  {
    std::lock_guard lock(b->mu);
    cancelled = b->cancelled;
  }
  if (cancelled) ::shutdown(fd, SHUT_RDWR);
}

// unwatch_connect closes the duplicate once send() is over (the socket is pooled or closed).
void unwatch_connect(Bridge& b) {
  std::lock_guard lock(b.connect_mu);
  if (b.connect_fd >= 0) ::close(b.connect_fd);
  b.connect_fd = -1;
}
}  // namespace

std::unique_ptr<httplib::Client> UpstreamPool::fresh(const ProxySite& site) {
  auto cli = std::make_unique<httplib::Client>(site.upstream);
  cli->set_socket_options(watch_connect);
  cli->set_keep_alive(site.max_idle > 0);
  cli->set_follow_location(false);
  cli->set_decompress(false);
  cli->set_connection_timeout(site.connect_timeout);
  cli->set_read_timeout(site.read_timeout);
  cli->set_write_timeout(site.write_timeout);
  return cli;
}

std::unique_ptr<httplib::Client> UpstreamPool::acquire(const ProxySite& site, bool& reused) {
  std::unique_ptr<httplib::Client> cli;
  std::vector<Idle> expired;  // closed outside mu_
  {
    std::lock_guard lock(mu_);
    auto it = idle_.find(site.upstream);
    if (it != idle_.end() && !it->second.empty()) {
      auto& list = it->second;
      // The newest is the likeliest still open; everything idle for too long is closed.
      auto cutoff = SteadyClock::now() - site.idle_timeout;
      auto keep = std::partition_point(list.begin(), list.end(),
                                       [&](const Idle& i) { return i.since <= cutoff; });
      expired.insert(expired.end(), std::make_move_iterator(list.begin()),
                     std::make_move_iterator(keep));
      list.erase(list.begin(), keep);
      if (!list.empty()) {
        cli = std::move(list.back().client);
        list.pop_back();
      }
    }
  }
  reused = cli && cli->is_socket_open();
  if (!cli) return fresh(site);
  // The site's timeouts may have changed since the client was made (a reload).
  cli->set_connection_timeout(site.connect_timeout);
  cli->set_read_timeout(site.read_timeout);
  cli->set_write_timeout(site.write_timeout);
  return cli;
}

void UpstreamPool::release(const ProxySite& site, std::unique_ptr<httplib::Client> client) {
  if (!client->is_socket_open() || site.max_idle == 0) return;  // closed: nothing to keep
  std::unique_ptr<httplib::Client> dropped;
  std::lock_guard lock(mu_);
  if (aborting_) return;
  auto& list = idle_[site.upstream];
  list.push_back({std::move(client), SteadyClock::now()});
  if (list.size() > site.max_idle) {
    dropped = std::move(list.front().client);  // the oldest: the likeliest to be closed soon
    list.erase(list.begin());
  }
}

void UpstreamPool::retain(const std::vector<std::string>& keep) {
  std::map<std::string, std::vector<Idle>> gone;
  {
    std::lock_guard lock(mu_);
    for (auto it = idle_.begin(); it != idle_.end();) {
      if (std::find(keep.begin(), keep.end(), it->first) == keep.end()) {
        gone.insert(idle_.extract(it++));
      } else {
        ++it;
      }
    }
  }
}

void UpstreamPool::clear() {
  std::map<std::string, std::vector<Idle>> gone;
  std::lock_guard lock(mu_);
  gone.swap(idle_);
}

std::size_t UpstreamPool::idle(const std::string& upstream) const {
  std::lock_guard lock(mu_);
  auto it = idle_.find(upstream);
  return it == idle_.end() ? 0 : it->second.size();
}

bool UpstreamPool::enter(const std::shared_ptr<Bridge>& b) {
  std::lock_guard lock(mu_);
  if (aborting_) return false;
  active_.emplace(b.get(), b);
  b->pool = this;
  return true;
}

void UpstreamPool::leave(const Bridge* b) {
  std::lock_guard lock(mu_);
  active_.erase(b);
}

void UpstreamPool::abort_all() {
  std::vector<std::shared_ptr<Bridge>> live;
  std::map<std::string, std::vector<Idle>> gone;
  {
    std::lock_guard lock(mu_);
    aborting_ = true;
    gone.swap(idle_);
    for (auto& [raw, weak] : active_) {
      if (auto b = weak.lock()) live.push_back(std::move(b));
    }
  }
  // Outside mu_: stop() may wait for a connect in progress, and a Bridge dropped here leaves.
  for (auto& b : live) b->cancel(/*abort=*/true);
}

bool proxy(const ProxySite& site, const httplib::Request& req,
           const httplib::ContentReader* reader, httplib::Response& res, bool tls,
           std::size_t max_body, UpstreamPool& pool, Logger& log,
           const std::atomic<bool>* client_read_timed_out) {
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
    return true;  // httplib skipped the body: the connection is still in step
  }
  if (!pool.enter(b)) {
    // The drain deadline has passed: no new exchange starts (the connection is being cut).
    res.status = 503;
    res.set_content("shutting down\n", "text/plain");
    return false;
  }
  bool reused = false;
  {
    // Under client_mu: abort_all (another thread) may already see this Bridge and stop_client.
    auto client = pool.acquire(site, reused);
    std::lock_guard lock(b->client_mu);
    b->client = std::move(client);
  }
  // Sending these twice does no more than sending them once (RFC 9110 9.2.2).
  bool idempotent = req.method == "GET" || req.method == "HEAD" || req.method == "OPTIONS" ||
                    req.method == "PUT" || req.method == "DELETE";
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
      b->body_complete = ok;
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
    std::optional<std::uint64_t> length;
    if (!body_framing(r.headers, length)) {
      {
        std::lock_guard lock(b->mu);
        b->bad_framing = true;
      }
      return false;  // send() fails (Canceled, never retried) and the connection is closed
    }
    // The worker is not woken for the header alone: it waits for body bytes it can write, or
    // for the end of the exchange (worker_has_work). Nothing reaches the client sooner either
    // way: the header is only buffered (ConnStream) until body bytes follow or the response ends.
    std::lock_guard lock(b->mu);
    b->length = length;
    b->status = r.status;
    b->headers = r.headers;
    b->headers_ready = true;
    return true;
  };
  up.content_receiver = [b](const char* data, size_t n, uint64_t, uint64_t) {
    std::unique_lock lock(b->mu);
    // Back-pressure: the upstream waits while the client is slower (bounded by its read
    // timeout on the upstream side, by our write timeout on the client side).
    b->cv.wait(lock, [&] { return b->cancelled || b->queued < kResponseQueueBytes; });
    if (b->cancelled) return false;
    if (b->length && b->received + n > *b->length) {
      // More body than its Content-Length (body_framing refuses the headers that allow it in
      // httplib: kept as a guard). The worker holds the last bytes back until the exchange is
      // done, so it would wait for bytes it must never send: fail the exchange instead.
      b->overflow = true;
      return false;
    }
    b->chunks.emplace_back(data, n);
    b->queued += n;
    b->received += n;
    bool wake = b->worker_has_work();
    lock.unlock();
    if (wake) b->cv.notify_all();
    return true;
  };

  // The pool outlives every exchange: the response's releaser waits until it is done.
  try {
    pool.run([b, up = std::move(up), &pool, site, retry = reused && idempotent]() mutable {
    httplib::Response r;
    httplib::Error err = httplib::Error::Canceled;
    auto going = [&] {
      std::lock_guard lock(b->mu);
      return !b->cancelled;
    };
    t_exchange = b.get();
    auto sent_at = SteadyClock::now();
    bool ok = going() && b->client->send(up, r, err);
    if (!ok && retry && !b->reader_used && err != httplib::Error::Canceled && going()) {
      // The pooled connection failed before a response header (the upstream closed it as we
      // reused it: its keep-alive timeout ran out, or it restarted): once on a new one. Only
      // a failure that came at once on the reused socket itself: a read timeout (httplib says
      // Error::Read for it too) would be waited out twice, and an upstream that took its time
      // before failing may have acted on the request (or crashed on it): not replayed. A send()
      // that opened a socket of its own (the pooled one was found closed) failed on a fresh
      // connection: nothing to blame on the pool.
      auto quick = std::min<SteadyClock::duration>(std::chrono::seconds(1), site.read_timeout / 2);
      bool opened;
      {
        std::lock_guard lock(b->connect_mu);
        opened = b->connected;
      }
      bool headers;
      {
        std::lock_guard lock(b->mu);
        headers = b->headers_ready;
      }
      if (!headers && !opened && SteadyClock::now() - sent_at < quick) {
        auto client = UpstreamPool::fresh(site);
        {
          std::lock_guard lock(b->client_mu);
          std::swap(b->client, client);
        }
        client.reset();
        r = httplib::Response();
        err = httplib::Error::Canceled;
        ok = going() && b->client->send(up, r, err);
      }
    }
    t_exchange = nullptr;
    unwatch_connect(*b);
    // The whole response is in our queue: the connection is free for the next request even
    // before the client has read it all. A failed or cancelled exchange closes it instead, and
    // so does an upstream that asked to close (httplib closes only on an exact "close").
    std::unique_ptr<httplib::Client> client;
    {
      std::lock_guard lock(b->client_mu);
      client = std::move(b->client);
    }
    bool keep = ok && r.version != "HTTP/1.0";
    for (auto [it, end] = r.headers.equal_range("Connection"); keep && it != end; ++it) {
      if (has_token(it->second, "close")) keep = false;
    }
    if (keep) pool.release(site, std::move(client));
    client.reset();
    {
      std::lock_guard lock(b->mu);
      b->ok = ok;
      b->error = err;
      b->done = true;
    }
    b->cv.notify_all();
  });
  } catch (const std::exception& e) {
    // No exchange thread (std::thread threw: out of threads or memory). The job was not
    // queued: answer 502 below as for an upstream that failed before its header.
    log.log(LogLevel::error, "server", "cannot start an upstream exchange",
            {{"upstream", site.upstream}, {"error", e.what()}});
    {
      std::lock_guard lock(b->mu);
      b->error = httplib::Error::Unknown;
      b->done = true;
    }
  }

  bool aborted;
  {
    std::unique_lock lock(b->mu);
    // Woken once the exchange is over, cut, or has body bytes to write (not for the header
    // alone: see response_handler).
    b->cv.wait(lock, [&] {
      return b->done || b->aborted || (b->headers_ready && b->worker_has_work());
    });
    aborted = b->aborted;
  }
  if (aborted || !b->headers_ready) {
    if (aborted) {
      b->finish();
    } else {
      b->join();
    }
    // Never connected: the request body is still on the client connection; read it away so
    // the next request on this keep-alive connection parses from the right place. A body the
    // upstream thread began to stream and did not finish leaves the connection out of step:
    // it is closed after this answer (its remaining bytes must never parse as a request).
    bool in_step = true;
    if (reader && !aborted) {
      in_step = b->reader_used ? b->body_complete.load()
                               : (*reader)([](const char*, size_t) { return true; });
    } else if (reader) {
      in_step = false;
    }
    if (res.status == 413) {
      // A chunked body ran past the payload limit inside httplib's reader.
      res.set_content("request body too large\n", "text/plain");
      return false;
    }
    if (!in_step && client_read_timed_out &&
        client_read_timed_out->load(std::memory_order_acquire)) {
      // The client's body stopped coming (the read timed out: on the exchange thread while
      // it streamed the body, or here while it was read away after an upstream failure). The
      // upstream got a request cut short and its connection closed (the exchange failed, so
      // it never goes back to the pool). Counted by the stream as a read timeout.
      res.status = 408;
      res.set_content("request body timed out\n", "text/plain");
      log.log(LogLevel::info, "server", "client request body timed out",
              {{"upstream", site.upstream},
               {"sent_to_upstream", b->reader_used ? "partly" : "no"},
               // Canceled/Write when the cut-short body ended it; else why the upstream failed
               // before the body was read away.
               {"exchange", httplib::to_string(b->error)},
               {"status", "408"},
               {"connection", "closed"}});
      return false;
    }
    auto elapsed = SteadyClock::now() - b->started;
    auto err = b->error;
    bool timed_out = err == httplib::Error::ConnectionTimeout ||
                     (err == httplib::Error::Read && elapsed >= site.read_timeout * 9 / 10);
    res.status = timed_out ? 504 : 502;
    res.set_content(timed_out ? "upstream timed out\n" : "upstream unavailable\n", "text/plain");
    log.log(LogLevel::warn, "server", "upstream request failed",
            {{"upstream", site.upstream},
             {"error", aborted          ? "cut at the drain deadline"
                       : b->bad_framing ? "ambiguous body length (Content-Length)"
                                        : httplib::to_string(err)},
             {"status", std::to_string(res.status)},
             {"connection", in_step ? "kept" : "closed"}});
    return in_step && !aborted;
  }

  res.status = b->status;
  std::string content_type = "application/octet-stream";
  std::optional<std::uint64_t> length = b->length;  // one value: body_framing checked them
  for (const auto& [k, v] : b->headers) {
    if (iequals(k, "content-type")) {
      content_type = v;
      continue;
    }
    if (iequals(k, "content-length")) continue;
    if (!is_hop_by_hop(k)) res.headers.emplace(k, v);
  }
  bool no_body = req.method == "HEAD" || b->status == 204 || b->status == 304 ||
                 (b->status >= 100 && b->status < 200) || (length && *length == 0);
  // The upstream thread may be blocked in a read (a client that went away, a drain cut):
  // finish() shuts its socket down instead of waiting for its read timeout.
  auto release = [b](bool) { b->finish(); };
  if (no_body) {
    {
      std::unique_lock lock(b->mu);
      b->cv.wait(lock, [&] { return b->done || b->aborted; });
      aborted = b->aborted;
    }
    if (length && req.method == "HEAD") res.set_header("Content-Length", std::to_string(*length));
    if (b->status != 204 && b->status != 304 && req.method != "HEAD") {
      res.set_content("", content_type);
    } else if (b->headers.find("Content-Type") != b->headers.end()) {
      res.set_header("Content-Type", content_type);
    }
    release(true);
    return !aborted;
  }
  // Pull side: the worker writes chunks as the upstream thread queues them.
  // The last body bytes reach the client only once the exchange is done, so its connection is
  // back in the pool before the client can send its next request: a client making sequential
  // requests always finds it there (send() returns right after the last bytes arrive).
  // A full queue is passed on even when held back: the upstream thread waits for room in it,
  // and must never wait on the worker while the worker waits on it.
  auto pull = [b, length](httplib::DataSink& sink, bool chunked_out, std::size_t offset) {
    for (;;) {
      std::string chunk;
      {
        std::unique_lock lock(b->mu);
        // chunked_out is !length: worker_has_work is this wait's condition too.
        b->cv.wait(lock, [&] { return b->done || b->aborted || b->worker_has_work(); });
        if (b->aborted) return false;  // cut at the drain deadline: the response stays short
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
        // Never a byte past the length the client was told (it would read as a next response).
        if (!chunked_out && offset + chunk.size() > *length) return false;
      }
      b->cv.notify_all();
      if (!sink.write(chunk.data(), chunk.size())) return false;
      if (!chunked_out) return true;  // httplib calls again while offset < length
    }
  };
  if (length) {
    res.set_content_provider(
        *length, content_type,
        [pull](size_t offset, size_t, httplib::DataSink& sink) {
          return pull(sink, false, offset);
        },
        release);
  } else {
    res.set_chunked_content_provider(
        content_type, [pull](size_t, httplib::DataSink& sink) { return pull(sink, true, 0); },
        release);
  }
  // The upstream read the whole request before it answered: the client connection is in step.
  // A response that breaks off later fails its content provider, and httplib reports the
  // write as failed, which closes the connection.
  return true;
}

}  // namespace autotls::server::detail
