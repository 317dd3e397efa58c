#pragma once

#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "acme/transport.h"

namespace autotls::testing {

// FakeTransport answers requests from a script. A handler may match on method and URL;
// unmatched requests get 599 so a test notices. Every request is recorded.
class FakeTransport : public acme::HttpTransport {
 public:
  using Handler = std::function<Result<acme::HttpResponse>(const acme::HttpRequest&)>;

  // on adds a handler for requests whose URL equals url (any method). Handlers for the same
  // URL queue up: each answers once, except the last, which keeps answering.
  void on(const std::string& url, Handler handler);
  // on_json is on() with a fixed response.
  void on_reply(const std::string& url, int status, std::string body,
                acme::HttpHeaders headers = {});

  Result<acme::HttpResponse> send(const acme::HttpRequest& request) override;

  std::vector<acme::HttpRequest> requests() const;
  size_t count(const std::string& url) const;

 private:
  mutable std::mutex mu_;
  std::vector<std::pair<std::string, std::deque<Handler>>> handlers_;
  std::vector<acme::HttpRequest> requests_;
};

// reply builds a response; a JSON body gets Content-Type application/json unless given.
acme::HttpResponse reply(int status, std::string body, acme::HttpHeaders headers = {});

}  // namespace autotls::testing
