#pragma once

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>

#include "acme/client.h"
#include "acme/util/error.h"
#include "tlsreload/certificate.h"

namespace autotls::tlsreload {

// ChallengeStore holds the challenge material live listeners serve: http-01 key
// authorizations by token, and tls-alpn-01 certificates by SNI. The manager writes it (through
// ChallengeSolver); the HTTP listener and the acme-tls/1 hook read it. Thread-safe. Reads take
// a short mutex: they happen only during validations, never on the ordinary handshake path.
class ChallengeStore {
 public:
  void put_http01(std::string token, std::string key_authorization);
  void remove_http01(std::string_view token);
  // http01 returns the key authorization for a token, if one is presented. A lookup that finds
  // one counts as the CA fetching it (only listeners answering validation requests call this).
  std::optional<std::string> http01(std::string_view token) const;
  // wait_http01_fetched waits up to timeout until the key authorization presented for token has
  // been looked up through http01 (the CA's validation request reached a listener) and then not
  // looked up again for quiet, and says whether it was looked up at all (at the timeout, the
  // lookups may still be coming). A token put again counts afresh.
  bool wait_http01_fetched(std::string_view token, std::chrono::milliseconds timeout,
                           std::chrono::milliseconds quiet = std::chrono::milliseconds(0)) const;

  // put_tls_alpn builds (and validates) the RFC 8737 certificate for the identifier and
  // serves it for sni (for an IP identifier, the reverse-DNS name RFC 8738 §6 gives).
  Status put_tls_alpn(const acme::Identifier& identifier, std::string_view key_authorization);
  void remove_tls_alpn(const acme::Identifier& identifier);
  std::shared_ptr<const Certificate> tls_alpn(std::string_view sni) const;

  size_t size() const;

 private:
  mutable std::mutex mu_;
  mutable std::condition_variable fetched_cv_;
  std::unordered_map<std::string, std::string> http01_;
  // The tokens looked up since put, with the time of the latest lookup.
  mutable std::unordered_map<std::string, std::chrono::steady_clock::time_point> http01_fetched_;
  std::unordered_map<std::string, std::shared_ptr<const Certificate>> tls_alpn_;
};

// ChallengeSolver presents http-01 and tls-alpn-01 through a ChallengeStore, and dns-01
// through a hook command, when one is set: `<hook> add <record name> <value>` on present and
// `<hook> del <record name> <value>` on cleanup, run directly (posix_spawn, no shell), e.g.
// `hook add _acme-challenge.example.com <base64url digest>`. The hook must return once the
// record is visible to the CA; it is killed after hook_timeout. dns-01 without a hook, a hook
// that cannot be started, exits non-zero or times out fail present() (Errc::io / timeout).
class ChallengeSolver : public acme::Solver {
 public:
  explicit ChallengeSolver(std::shared_ptr<ChallengeStore> store, std::string dns_hook = {},
                           std::chrono::milliseconds hook_timeout = std::chrono::seconds(60))
      : store_(std::move(store)), dns_hook_(std::move(dns_hook)), hook_timeout_(hook_timeout) {}
  Status present(const acme::Identifier& identifier, const acme::Challenge& challenge,
                 std::string_view key_authorization) override;
  void cleanup(const acme::Identifier& identifier, const acme::Challenge& challenge,
               std::string_view key_authorization) override;
  // await_fetch tells when the CA has fetched an http-01 key authorization from a listener
  // serving the store; for other types it cannot tell (false at once).
  bool await_fetch(const acme::Identifier& identifier, const acme::Challenge& challenge,
                   std::chrono::milliseconds timeout, std::chrono::milliseconds quiet) override;

 private:
  std::shared_ptr<ChallengeStore> store_;
  std::string dns_hook_;
  std::chrono::milliseconds hook_timeout_;
};

// run_dns_hook runs `hook action record_name value` and waits up to timeout for it. Errc::io
// when it cannot start or exits non-zero (the status is in the message), Errc::timeout when it
// had to be killed.
Status run_dns_hook(const std::string& hook, std::string_view action, std::string_view record_name,
                    std::string_view value, std::chrono::milliseconds timeout);

}  // namespace autotls::tlsreload
