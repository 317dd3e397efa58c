#include "tests/support/http01_responder.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <chrono>

#include <httplib.h>

#include "tests/support/net.h"

namespace autotls::testing {

Result<std::unique_ptr<Http01Responder>> Http01Responder::start(int port) {
  std::unique_ptr<Http01Responder> r(new Http01Responder());
  r->server_ = std::make_unique<httplib::Server>();
  // One request per connection: stop() then never waits for an idle keep-alive connection.
  r->server_->set_keep_alive_max_count(1);
  r->server_->set_read_timeout(5, 0);
  r->server_->set_write_timeout(5, 0);
  // httplib's default adds SO_REUSEPORT, which would let two responders (say, from parallel
  // test processes) share a port silently; a taken port must be an error instead. TCP_NODELAY
  // (inherited by accepted sockets) avoids a 40 ms Nagle/delayed-ACK stall per response.
  r->server_->set_socket_options([](socket_t sock) {
    int one = 1;
    ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    ::setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  });
  Http01Responder* self = r.get();
  r->server_->Get(R"(/\.well-known/acme-challenge/([^/]+))",
                  [self](const httplib::Request& req, httplib::Response& res) {
                    auto value = self->lookup(req.matches[1]);
                    if (!value) {
                      ++self->misses_;
                      res.status = 404;
                      res.set_content("no such token", "text/plain");
                      return;
                    }
                    ++self->hits_;
                    res.status = 200;
                    res.set_content(*value, "text/plain");
                  });
  if (port == 0) {
    try {
      port = bind_claimed(*r->server_);  // never a port a PebbleEnv handed out and has not bound
    } catch (const std::runtime_error& e) {
      return fail(Errc::io, std::string("Http01Responder: ") + e.what());
    }
  } else if (!r->server_->bind_to_port("127.0.0.1", port)) {
    return fail(Errc::io, "Http01Responder: cannot bind 127.0.0.1:" + std::to_string(port));
  }
  r->port_ = port;
  r->thread_ = std::thread([self] { self->server_->listen_after_bind(); });
  // The socket already listens, so clients can connect now; wait for the accept loop anyway
  // so that stop() cannot race with its start.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (!r->server_->is_running() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return r;
}

Http01Responder::~Http01Responder() {
  if (server_) server_->stop();
  if (thread_.joinable()) thread_.join();
}

void Http01Responder::set(const std::string& token, const std::string& key_authorization) {
  std::lock_guard lock(mu_);
  tokens_[token] = key_authorization;
}

void Http01Responder::remove(const std::string& token) {
  std::lock_guard lock(mu_);
  tokens_.erase(token);
}

std::optional<std::string> Http01Responder::lookup(const std::string& token) const {
  std::lock_guard lock(mu_);
  auto it = tokens_.find(token);
  if (it == tokens_.end()) return std::nullopt;
  return it->second;
}

}  // namespace autotls::testing
