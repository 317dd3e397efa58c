#include "acme/prefetch.h"

#include <condition_variable>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>

#include "acme/client.h"

namespace autotls::acme {

namespace {

class PrefetchingTransport final : public HttpTransport {
 public:
  PrefetchingTransport(std::shared_ptr<HttpTransport> inner, std::string directory_url)
      : inner_(std::move(inner)) {
    slots_[0].method = "GET";
    slots_[0].url = std::move(directory_url);
    slots_[1].method = "HEAD";  // its URL comes from the directory
    thread_ = std::thread([this] { run(); });
  }

  ~PrefetchingTransport() override { thread_.join(); }

  PrefetchingTransport(const PrefetchingTransport&) = delete;
  PrefetchingTransport& operator=(const PrefetchingTransport&) = delete;

  Result<HttpResponse> send(const HttpRequest& request) override {
    if (request.body.empty() && (request.method == "GET" || request.method == "HEAD")) {
      std::unique_lock lock(mu_);
      for (auto& s : slots_) {
        // A slot whose URL is not known yet (the nonce's, while the directory is in flight)
        // cannot match; the client asks for a nonce only after it has the directory anyway.
        if (s.taken || s.method != request.method || s.url.empty() || s.url != request.url) continue;
        s.taken = true;
        cv_.wait(lock, [&] { return s.done; });
        if (s.reply) return std::move(*s.reply);
        break;  // the prefetch failed: send it again below, and report that attempt's error
      }
    }
    return inner_->send(request);
  }

 private:
  struct Slot {
    std::string method, url;
    bool taken = false;  // a caller claimed the reply (or it will never be used)
    bool done = false;   // reply is final (empty when the prefetch failed)
    std::optional<HttpResponse> reply;
  };

  // finish stores a prefetched reply. Only a 2xx is kept: after an error reply or none, the
  // caller sends the request again and its retry logic reports the outcome. next_url, when
  // not empty, is the URL the next slot will fetch: set in the same step, so that a caller
  // woken by this reply never sends that request before the slot can match it.
  void finish(Slot& s, Result<HttpResponse> r, const std::string& next_url = {}) {
    std::lock_guard lock(mu_);
    if (r && r->status >= 200 && r->status < 300) s.reply = std::move(*r);
    s.done = true;
    if (&s == &slots_[0]) {
      if (next_url.empty()) slots_[1].done = true;  // nothing more to fetch
      slots_[1].url = next_url;
    }
    cv_.notify_all();
  }

  void run() {
    auto dir = inner_->send({slots_[0].method, slots_[0].url, {}, {}});
    std::string nonce_url;
    if (dir && dir->status >= 200 && dir->status < 300 && !dir->header("Replay-Nonce")) {
      if (auto d = Directory::parse(dir->body)) nonce_url = d->new_nonce;
    }
    finish(slots_[0], std::move(dir), nonce_url);
    if (nonce_url.empty()) return;
    finish(slots_[1], inner_->send({"HEAD", nonce_url, {}, {}}));
  }

  std::shared_ptr<HttpTransport> inner_;
  std::mutex mu_;
  std::condition_variable cv_;
  Slot slots_[2];
  std::thread thread_;
};

}  // namespace

std::shared_ptr<HttpTransport> make_prefetching_transport(std::shared_ptr<HttpTransport> inner,
                                                          std::string directory_url) {
  return std::make_shared<PrefetchingTransport>(std::move(inner), std::move(directory_url));
}

}  // namespace autotls::acme
