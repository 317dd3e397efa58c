#pragma once

// Http01Responder: the client side of an http-01 challenge for tests (RFC 8555 §8.3).

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "acme/util/error.h"

namespace httplib {
class Server;
}

namespace autotls::testing {

// Http01Responder serves GET /.well-known/acme-challenge/<token> on 127.0.0.1:<port> with the
// key authorization set for that token (text/plain), 404 for anything else. Tokens may be set
// and removed from any thread while it runs. The destructor stops the server and joins its
// thread.
class Http01Responder {
 public:
  // start binds 127.0.0.1:port (0: any free port) and starts serving; Errc::io when the port
  // cannot be bound.
  static Result<std::unique_ptr<Http01Responder>> start(int port);

  ~Http01Responder();
  Http01Responder(const Http01Responder&) = delete;
  Http01Responder& operator=(const Http01Responder&) = delete;

  int port() const { return port_; }
  // set serves key_authorization at the token's path; remove stops serving it.
  void set(const std::string& token, const std::string& key_authorization);
  void remove(const std::string& token);
  // hits counts challenge requests answered with 200; misses those answered with 404.
  size_t hits() const { return hits_.load(); }
  size_t misses() const { return misses_.load(); }

 private:
  Http01Responder() = default;
  std::optional<std::string> lookup(const std::string& token) const;

  mutable std::mutex mu_;
  std::map<std::string, std::string> tokens_;
  std::atomic<size_t> hits_{0};
  std::atomic<size_t> misses_{0};
  int port_ = 0;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
};

}  // namespace autotls::testing
