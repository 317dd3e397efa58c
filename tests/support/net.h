#pragma once

// Loopback networking for tests: a free port, a raw TCP connection, and a plain-HTTP client
// connection that reads one response at a time with bounded waits.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>

namespace autotls::testing {

// claim_port records that this process hands port out (free_port, PebbleEnv's ports) and
// reports whether it was new. A port that was bound, read back and closed is free again for the
// kernel, whose next bind(0) picks a random port of the same range: two free_port() calls in
// one test returned the same port about 1 time in 14,000 (Linux, 28,000 ephemeral ports, bind(0)
// takes the odd ones first), and then the server given both failed to bind its second listener.
inline bool claim_port(int port) {
  static std::mutex mu;
  static std::set<int> claimed;
  std::lock_guard lock(mu);
  return claimed.insert(port).second;
}

// free_port returns a loopback port nobody listens on now (bound to port 0, read back,
// closed): for a child process or a server that must be told its port before it binds. Never
// the same port twice in one process (claim_port), nor one of a PebbleEnv's.
inline int free_port() {
  for (int attempt = 0; attempt < 1000; ++attempt) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
      if (fd >= 0) ::close(fd);
      throw std::runtime_error("free_port: no loopback port to bind");
    }
    ::close(fd);
    if (claim_port(ntohs(a.sin_port))) return ntohs(a.sin_port);
  }
  throw std::runtime_error("free_port: every port the kernel offered was handed out before");
}

// bind_claimed binds server (an httplib::Server) to a loopback port that free_port handed
// out, and returns it. bind_to_any_port may pick a port that free_port or a PebbleEnv already
// gave to someone who has not bound it yet (Pebble's http-01 port waits for the solver's
// responder), who would then fail to bind it; a claimed port cannot be such a port. A port
// that another process bound meanwhile is skipped.
template <typename Server>
int bind_claimed(Server& server, const char* host = "127.0.0.1") {
  for (int attempt = 0; attempt < 100; ++attempt) {
    const int port = free_port();
    if (server.bind_to_port(host, port)) return port;
  }
  throw std::runtime_error("bind_claimed: no loopback port could be bound");
}

// wait_until polls done every 5 ms until it holds (true) or bound passes (false): for a test
// waiting on something another thread or process does.
template <class F>
bool wait_until(F done, std::chrono::milliseconds bound = std::chrono::milliseconds(3'000)) {
  auto deadline = std::chrono::steady_clock::now() + bound;
  while (!done()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

// listen_loopback returns a socket listening on 127.0.0.1 at a port the kernel picks (set in
// port), for a test's own bare-socket server; throws when it cannot.
inline int listen_loopback(int& port, int backlog = 64) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      ::listen(fd, backlog) != 0 || ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    if (fd >= 0) ::close(fd);
    throw std::runtime_error("listen_loopback: cannot listen on a loopback port");
  }
  port = ntohs(a.sin_port);
  return fd;
}

// RefusedPort is a loopback port that refuses connections: bound (so no other socket, in this
// process or another, gets it from bind(0) meanwhile) but not listening, until the end of the
// object. Its port is recorded with claim_port, so it is never one free_port or a PebbleEnv
// handed out (such a port is closed until its user binds it, and bind(0) may pick it), and
// neither hands it out later.
class RefusedPort {
 public:
  RefusedPort() {
    for (int attempt = 0; attempt < 1000; ++attempt) {
      fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      socklen_t len = sizeof a;
      if (fd_ < 0 || ::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
          ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
        close();
        throw std::runtime_error("RefusedPort: no loopback port to bind");
      }
      if (claim_port(ntohs(a.sin_port))) {
        port_ = ntohs(a.sin_port);
        return;
      }
      close();  // handed out before: its user may bind it any moment
    }
    throw std::runtime_error("RefusedPort: every port the kernel offered was handed out before");
  }
  ~RefusedPort() { close(); }
  RefusedPort(const RefusedPort&) = delete;
  RefusedPort& operator=(const RefusedPort&) = delete;

  int port() const { return port_; }

 private:
  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  int fd_ = -1;
  int port_ = 0;
};

// BusyPort is a loopback port in use: a socket listens on it and never accepts, until close()
// or the end of the object.
class BusyPort {
 public:
  BusyPort() {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    ::setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (fd_ < 0 || ::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(fd_, 1) != 0 ||
        ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
      close();
      throw std::runtime_error("BusyPort: cannot listen on a loopback port");
    }
    port_ = ntohs(a.sin_port);
  }
  ~BusyPort() { close(); }
  BusyPort(const BusyPort&) = delete;
  BusyPort& operator=(const BusyPort&) = delete;

  int port() const { return port_; }
  // close frees the port.
  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
  int port_ = 0;
};

// connect_to opens a TCP connection to 127.0.0.1:port; -1 when it is refused. With
// io_timeout > 0 every blocking send and recv on it gives up after that long
// (SO_SNDTIMEO/SO_RCVTIMEO); with 0 they block as long as the peer lets them.
inline int connect_to(int port, std::chrono::seconds io_timeout = std::chrono::seconds(0)) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    return -1;
  }
  if (io_timeout.count() > 0) {
    timeval tv{static_cast<time_t>(io_timeout.count()), 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  }
  return fd;
}

// RawConn is one plain TCP client connection to 127.0.0.1:port, for HTTP/1.1 written by hand
// (keep-alive across requests, requests a library client would not send). Every wait is
// bounded.
class RawConn {
 public:
  explicit RawConn(int port) : fd_(connect_to(port)) {}
  ~RawConn() {
    if (fd_ >= 0) ::close(fd_);
  }
  RawConn(const RawConn&) = delete;
  RawConn& operator=(const RawConn&) = delete;

  bool connected() const { return fd_ >= 0; }
  bool send(const std::string& s) {
    return fd_ >= 0 && ::send(fd_, s.data(), s.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(s.size());
  }
  // closed_within: the server closed the connection (EOF or reset) within d, with no byte sent.
  bool closed_within(std::chrono::milliseconds d) {
    if (fd_ < 0) return true;  // never connected
    if (!pending_.empty()) return false;
    pollfd p{fd_, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(d.count())) <= 0) return false;
    char c;
    return ::recv(fd_, &c, 1, MSG_PEEK) <= 0;
  }
  // get sends "GET / HTTP/1.1" for host and reads one response: {status, body}, {0, ""} if the
  // connection is gone or nothing complete arrives within 5 s.
  std::pair<int, std::string> get(const std::string& host) {
    if (!send("GET / HTTP/1.1\r\nHost: " + host + "\r\n\r\n")) return {0, ""};
    return response();
  }
  // response reads one response (its body by Content-Length), as get does. Bytes after it
  // (pipelined responses that came in the same read) are kept for the next call.
  std::pair<int, std::string> response() {
    std::string& in = pending_;
    std::size_t head = in.find("\r\n\r\n"), need = 0;
    auto length = [&] {
      auto cl = in.find("Content-Length: ");
      if (cl != std::string::npos && cl < head) need = std::stoul(in.substr(cl + 16));
    };
    if (head != std::string::npos) length();
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (head == std::string::npos || in.size() < head + 4 + need) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      pollfd p{fd_, POLLIN, 0};
      if (left.count() <= 0 || ::poll(&p, 1, static_cast<int>(left.count())) <= 0) return {0, ""};
      char buf[4096];
      ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
      if (n <= 0) return {0, ""};
      in.append(buf, static_cast<std::size_t>(n));
      if (head == std::string::npos && (head = in.find("\r\n\r\n")) != std::string::npos) length();
    }
    last_head_ = in.substr(0, head);
    std::pair<int, std::string> r{std::stoi(in.substr(9, 3)), in.substr(head + 4, need)};
    in.erase(0, head + 4 + need);
    return r;
  }
  // read_until reads until marker has arrived (5 s at most) and returns what came up to and
  // including it ("" when it did not come), keeping the rest for the next read: for an answer
  // response() cannot frame (chunked).
  std::string read_until(const std::string& marker) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    std::size_t at;
    while ((at = pending_.find(marker)) == std::string::npos) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      pollfd p{fd_, POLLIN, 0};
      if (left.count() <= 0 || ::poll(&p, 1, static_cast<int>(left.count())) <= 0) return "";
      char buf[4096];
      ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
      if (n <= 0) return "";
      pending_.append(buf, static_cast<std::size_t>(n));
    }
    std::string got = pending_.substr(0, at + marker.size());
    pending_.erase(0, at + marker.size());
    return got;
  }
  // last_head is the status line and headers of the last response read.
  const std::string& last_head() const { return last_head_; }

 private:
  int fd_ = -1;
  std::string last_head_;
  std::string pending_;  // received after the last response read
};

}  // namespace autotls::testing
