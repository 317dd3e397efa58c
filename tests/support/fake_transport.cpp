#include "tests/support/fake_transport.h"

namespace autotls::testing {

void FakeTransport::on(const std::string& url, Handler handler) {
  std::lock_guard lock(mu_);
  for (auto& [u, q] : handlers_) {
    if (u == url) {
      q.push_back(std::move(handler));
      return;
    }
  }
  handlers_.push_back({url, std::deque<Handler>{std::move(handler)}});
}

void FakeTransport::on_reply(const std::string& url, int status, std::string body,
                             acme::HttpHeaders headers) {
  on(url, [r = reply(status, std::move(body), std::move(headers))](const acme::HttpRequest&) {
    return Result<acme::HttpResponse>(r);
  });
}

Result<acme::HttpResponse> FakeTransport::send(const acme::HttpRequest& request) {
  Handler h;
  {
    std::lock_guard lock(mu_);
    requests_.push_back(request);
    for (auto& [u, q] : handlers_) {
      if (u == request.url && !q.empty()) {
        h = q.front();
        if (q.size() > 1) q.pop_front();
        break;
      }
    }
  }
  if (!h) return reply(599, "no handler for " + request.method + " " + request.url);
  return h(request);
}

std::vector<acme::HttpRequest> FakeTransport::requests() const {
  std::lock_guard lock(mu_);
  return requests_;
}

size_t FakeTransport::count(const std::string& url) const {
  std::lock_guard lock(mu_);
  size_t n = 0;
  for (auto& r : requests_) n += r.url == url;
  return n;
}

acme::HttpResponse reply(int status, std::string body, acme::HttpHeaders headers) {
  acme::HttpResponse r;
  r.status = status;
  bool has_ct = false;
  for (auto& [k, v] : headers) has_ct |= (k == "Content-Type");
  if (!has_ct && !body.empty() && body[0] == '{') {
    headers.emplace_back("Content-Type", status >= 400 ? "application/problem+json" : "application/json");
  }
  r.headers = std::move(headers);
  r.body = std::move(body);
  return r;
}

}  // namespace autotls::testing
