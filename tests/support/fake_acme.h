#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "acme/transport.h"

namespace autotls::testing {

// FakeAcmeServer is a small in-process ACME CA for unit tests and for what Pebble 2.4.0 lacks
// (ARI, profiles). It checks what a real CA checks: every POST is a JWS whose signature
// verifies, whose nonce was issued by this server and is used once, whose "url" is the URL
// requested, and which uses "jwk" only for newAccount/revokeCert. Validation is simulated: a
// challenge the client responded to turns valid (unless told to fail) after
// `authz_pending_polls` polls. Certificates are issued by a throw-away CA.
//
// Tests inject faults through `intercept`, which sees each request first and may answer it.
class FakeAcmeServer {
 public:
  struct Options {
    std::string base = "https://ca.test";
    bool ari = true;
    std::map<std::string, std::string> profiles;  // empty: no "profiles" in meta
    bool external_account_required = false;
    std::string eab_kid, eab_hmac_b64url;  // checked when external_account_required
    int authz_pending_polls = 1;           // polls an authorization stays "pending" after respond
    int order_processing_polls = 1;        // polls an order stays "processing" after finalize
    // An order turns "ready" only when polled (a CA that updates it later), unless this is
    // set: then finalize works its status out too, as Boulder and Pebble do at every request.
    bool order_ready_at_finalize = false;
    std::optional<int> poll_retry_after;   // Retry-After seconds on pending/processing replies
    std::set<std::string> failing_identifiers;  // challenges for these end "invalid"
    bool alternate_chain = true;
    std::string renewal_window_start = "2030-01-01T00:00:00Z";
    std::string renewal_window_end = "2030-01-02T00:00:00Z";
    int renewal_retry_after = 21600;
  };

  explicit FakeAcmeServer(Options options);
  ~FakeAcmeServer();

  acme::HttpResponse handle(const acme::HttpRequest& request);

  std::string directory_url() const { return options_.base + "/directory"; }
  const Options& options() const { return options_; }

  // intercept answers a request before the server does, when it returns a response.
  std::function<std::optional<acme::HttpResponse>(const acme::HttpRequest&)> intercept;

  // Observations for assertions.
  struct OrderRecord {
    nlohmann::json payload;  // the newOrder payload as received
    std::string url;
  };
  std::vector<OrderRecord> orders() const;
  std::vector<std::string> revoked_serials() const;
  size_t accounts() const;
  int nonce_errors() const;   // requests refused for a bad or reused nonce
  int jws_errors() const;     // requests refused for a bad signature/header
  std::string root_pem() const;
  // issue_nonce mints a nonce this server will accept once (for injected replies).
  std::string issue_nonce();  // the default chain's root
  std::string alternate_root_cn() const;

 private:
  struct Impl;
  Options options_;
  std::unique_ptr<Impl> impl_;
};

// problem_reply is an ACME problem answer (type "urn:ietf:params:acme:error:<type>") carrying
// a nonce `ca` accepts, for `intercept` to return.
acme::HttpResponse problem_reply(FakeAcmeServer& ca, int status, const std::string& type,
                                 acme::HttpHeaders extra = {});

// FakeAcmeTransport adapts a FakeAcmeServer to the transport seam.
class FakeAcmeTransport : public acme::HttpTransport {
 public:
  explicit FakeAcmeTransport(std::shared_ptr<FakeAcmeServer> server) : server_(std::move(server)) {}
  Result<acme::HttpResponse> send(const acme::HttpRequest& request) override {
    if (fail_next_ > 0) {
      --fail_next_;
      return tl::unexpected(Error(Errc::transport, "connection reset (injected)"));
    }
    return server_->handle(request);
  }
  // fail_next makes the next n sends fail with a transport error.
  void fail_next(int n) { fail_next_ = n; }
  // fail_pending is how many of those failures are still to come (so n minus it were sent).
  int fail_pending() const { return fail_next_; }

 private:
  std::shared_ptr<FakeAcmeServer> server_;
  std::atomic<int> fail_next_{0};
};

}  // namespace autotls::testing
