#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "acme/client.h"
#include "tests/support/http01_responder.h"
#include "tests/support/pebble_env.h"
#include "tests/support/tls_alpn_responder.h"

namespace autotls::testing {

// PebbleSolver answers every challenge type against a PebbleEnv: http-01 and tls-alpn-01
// through responders on the ports Pebble validates, dns-01 through challtestsrv's TXT API.
// Responders start on first use. It counts presents and cleanups for assertions.
class PebbleSolver : public acme::Solver {
 public:
  explicit PebbleSolver(PebbleEnv& env) : env_(env) {}

  Status present(const acme::Identifier& identifier, const acme::Challenge& challenge,
                 std::string_view key_authorization) override;
  void cleanup(const acme::Identifier& identifier, const acme::Challenge& challenge,
               std::string_view key_authorization) override;

  int presented() const;
  int cleaned() const;

 private:
  PebbleEnv& env_;
  mutable std::mutex mu_;
  std::unique_ptr<Http01Responder> http_;
  std::unique_ptr<TlsAlpnResponder> tls_;
  int presented_ = 0;
  int cleaned_ = 0;
};

}  // namespace autotls::testing
