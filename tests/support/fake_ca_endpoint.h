#pragma once

// FakeCaEndpoint serves a FakeAcmeServer over plain HTTP on 127.0.0.1 (cpp-httplib), so the
// production libcurl transport, or the autotls binary, can talk to the test tree's fake CA.

#include <memory>
#include <string>
#include <thread>

#include <httplib.h>

#include "tests/support/fake_acme.h"

namespace autotls::testing {

class FakeCaEndpoint {
 public:
  // The constructor binds an ephemeral loopback port (port() is 0 when that failed) and
  // serves options (with base set to this endpoint) until destruction.
  explicit FakeCaEndpoint(FakeAcmeServer::Options options);
  ~FakeCaEndpoint();
  FakeCaEndpoint(const FakeCaEndpoint&) = delete;
  FakeCaEndpoint& operator=(const FakeCaEndpoint&) = delete;

  int port() const { return port_; }
  FakeAcmeServer& ca() { return *ca_; }
  std::string directory_url() const { return ca_->directory_url(); }

 private:
  httplib::Server server_;
  std::shared_ptr<FakeAcmeServer> ca_;
  int port_ = 0;
  std::thread thread_;
};

// make_problem builds an error reply carrying a nonce the fake CA will accept, as RFC 8555
// §6.5 requires of badNonce replies.
acme::HttpResponse make_problem(FakeAcmeServer& ca, int status, const std::string& type, const std::string& detail,
                                acme::HttpHeaders extra = {});

}  // namespace autotls::testing
