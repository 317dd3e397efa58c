#include "tests/support/fake_ca_endpoint.h"

#include <strings.h>

#include <nlohmann/json.hpp>

#include "tests/support/net.h"

namespace autotls::testing {

FakeCaEndpoint::FakeCaEndpoint(FakeAcmeServer::Options options) {
  try {
    port_ = bind_claimed(server_);  // never a port a PebbleEnv handed out and has not bound
  } catch (const std::runtime_error&) {
    port_ = 0;
  }
  options.base = "http://127.0.0.1:" + std::to_string(port_ > 0 ? port_ : 0);
  ca_ = std::make_shared<FakeAcmeServer>(options);
  if (port_ <= 0) {
    port_ = 0;
    return;
  }
  auto handler = [this](const httplib::Request& req, httplib::Response& res) {
    acme::HttpRequest r{req.method, ca_->options().base + req.target, {}, req.body};
    for (const auto& [k, v] : req.headers) r.headers.emplace_back(k, v);
    acme::HttpResponse out = ca_->handle(r);
    res.status = out.status;
    std::string type = "application/octet-stream";
    for (const auto& [k, v] : out.headers) {
      if (strcasecmp(k.c_str(), "Content-Type") == 0) {
        type = v;
      } else {
        res.set_header(k, v);
      }
    }
    res.set_content(out.body, type);
  };
  server_.Get(".*", handler);
  server_.Post(".*", handler);
  server_.Options(".*", handler);
  // HEAD is answered by httplib from the GET handler.
  server_.set_tcp_nodelay(true);
  // bind_to_any_port already listens: connections queue until the accept loop runs.
  thread_ = std::thread([this] { server_.listen_after_bind(); });
}

FakeCaEndpoint::~FakeCaEndpoint() {
  server_.stop();
  if (thread_.joinable()) thread_.join();
}

acme::HttpResponse make_problem(FakeAcmeServer& ca, int status, const std::string& type, const std::string& detail,
                                acme::HttpHeaders extra) {
  acme::HttpResponse r;
  r.status = status;
  r.headers = std::move(extra);
  r.headers.emplace_back("Content-Type", "application/problem+json");
  r.headers.emplace_back("Replay-Nonce", ca.issue_nonce());
  r.body = nlohmann::json{{"type", "urn:ietf:params:acme:error:" + type}, {"detail", detail}}.dump();
  return r;
}

}  // namespace autotls::testing
