#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "acme/ari.h"
#include "acme/jws.h"
#include "acme/transport.h"
#include "acme/types.h"
#include "acme/util/clock.h"
#include "acme/util/error.h"
#include "acme/util/logger.h"

namespace autotls::acme {

// Directory is the CA's directory object (RFC 8555 §7.1.1) with its meta fields.
struct Directory {
  std::string new_nonce, new_account, new_order, new_authz, revoke_cert, key_change;
  std::string renewal_info;  // RFC 9773 §4; empty when the CA has no ARI
  std::string terms_of_service, website;
  std::vector<std::string> caa_identities;
  bool external_account_required = false;
  std::map<std::string, std::string> profiles;  // name -> description (draft-aaron-acme-profiles)

  static Result<Directory> parse(std::string_view body);
};

struct Account {
  std::string url;     // the account URL, used as "kid"
  std::string status;  // "valid", "deactivated" or "revoked"
  std::vector<std::string> contact;
  std::string orders;
  bool terms_of_service_agreed = false;
};

struct ExternalAccountBinding {
  std::string kid;
  std::string hmac_key;        // base64url as the CA hands it out
  std::string alg = "HS256";   // "HS256", "HS384" or "HS512"
};

struct NewAccountOptions {
  std::vector<std::string> contact;  // "mailto:..." URLs
  bool agree_to_terms = false;
  std::optional<ExternalAccountBinding> eab;
};

struct Challenge {
  std::string type;  // "http-01", "dns-01", "tls-alpn-01", ...
  std::string url;
  std::string status;
  std::string token;
  std::optional<Problem> error;
};

struct Authorization {
  std::string url;
  std::string status;  // pending, valid, invalid, deactivated, expired, revoked
  Identifier identifier;
  bool wildcard = false;
  std::vector<Challenge> challenges;
  std::optional<std::chrono::system_clock::time_point> expires;

  const Challenge* find(std::string_view type) const;
};

struct Order {
  std::string url;
  std::string status;  // pending, ready, processing, valid, invalid
  std::vector<Identifier> identifiers;
  std::vector<std::string> authorizations;
  std::string finalize;
  std::string certificate;
  std::string profile;
  std::string replaces;
  std::optional<Problem> error;
  std::optional<std::chrono::system_clock::time_point> expires;
};

struct NewOrderOptions {
  std::vector<Identifier> identifiers;
  std::string profile;   // empty: the CA's default
  std::string replaces;  // ARI certificate identifier of the certificate being renewed
};

// CertificateChain is a downloaded certificate: leaf first, then the chain, in PEM.
struct CertificateChain {
  std::string pem;
  std::vector<std::string> alternates;  // URLs from Link: rel="alternate" (RFC 8555 §7.4.2)
};

// Revocation reasons (RFC 5280 §5.3.1) that ACME CAs accept.
enum class RevocationReason {
  unspecified = 0,
  key_compromise = 1,
  affiliation_changed = 3,
  superseded = 4,
  cessation_of_operation = 5,
};
std::optional<RevocationReason> parse_revocation_reason(std::string_view name);

struct ClientOptions {
  std::string directory_url;
  std::shared_ptr<HttpTransport> transport;
  Clock* clock = nullptr;    // nullptr: system_clock()
  Logger* logger = nullptr;  // nullptr: null_logger()
  // badNonce: how many times one request is re-sent with a fresh nonce (RFC 8555 §6.5).
  int max_bad_nonce_retries = 10;
  // HTTP 5xx and transport faults: how many times one request is re-sent.
  int max_server_retries = 3;
  // How many times the first request, the directory GET of create(), is re-sent after a
  // transport fault (no reply: connection refused, reset, timeout); -1: max_server_retries.
  // The Manager sets 1 for an issuer that has another after it in its list: nothing answering
  // there is better met by the next CA than by 3.5 s of backoff (docs/cli.md). A 5xx reply
  // (the CA is up) keeps max_server_retries.
  int max_directory_transport_retries = -1;
  // The longest Retry-After the client waits out inside one call; longer ones end the call
  // with the error and its retry_after, for the caller to schedule.
  std::chrono::seconds max_retry_wait{30};
  // Polling of authorizations and orders: first delay, growth cap, and overall deadline.
  // obtain() sends the first poll poll_initial after responding to the challenges (or after
  // finalizing), then waits poll_initial, doubling each time up to poll_max. 2 ms first: a CA
  // that validates at once (Pebble takes 1-5 ms) is seen at the first or second poll; the
  // doubling (2, 4, 8, 16 ms ...) costs a CA that takes seconds three requests more per wait
  // than a 20 ms start, and a Retry-After on the reply always wins over this schedule.
  std::chrono::milliseconds poll_initial{2};
  std::chrono::milliseconds poll_max{2000};
  std::chrono::seconds poll_timeout{120};
};

// Client speaks RFC 8555 to one CA. Construct with create(), which fetches the directory.
// Methods are safe to call from several threads at once.
class Client {
 public:
  static Result<std::unique_ptr<Client>> create(ClientOptions options);

  const Directory& directory() const { return directory_; }
  const ClientOptions& options() const { return options_; }

  // set_account selects the key (and, once known, the account URL) used to sign requests.
  void set_account(std::shared_ptr<const Signer> signer, std::string account_url = {});
  std::string account_url() const;
  std::shared_ptr<const Signer> signer() const;

  // register_account creates an account or, if the key already has one, returns it
  // (RFC 8555 §7.3). Sets the account URL on success.
  Result<Account> register_account(const NewAccountOptions& options);
  // find_account looks the key's account up with onlyReturnExisting (RFC 8555 §7.3.1).
  Result<Account> find_account();
  Result<Account> fetch_account();
  Result<Account> update_account(const std::vector<std::string>& contact);
  // change_key rolls the account over to new_signer (RFC 8555 §7.3.5); on success the client
  // signs with the new key from then on.
  Status change_key(std::shared_ptr<const Signer> new_signer);
  Result<Account> deactivate_account();

  // new_order opens an order (RFC 8555 §7.4). When options.replaces is refused with 409
  // alreadyReplaced, or a 403 that names the replaced certificate, it retries once without
  // "replaces" (RFC 9773 §5).
  Result<Order> new_order(const NewOrderOptions& options);
  Result<Order> fetch_order(const std::string& url);
  Result<Authorization> fetch_authorization(const std::string& url);
  // respond tells the CA the challenge is ready to be validated (RFC 8555 §7.5.1).
  Result<Challenge> respond(const Challenge& challenge);
  // poll_authorization waits until the authorization leaves "pending".
  // on_poll, when set, is called after each reply that is still pending, with its status.
  using PollTick = std::function<void(const std::string& status)>;
  Result<Authorization> poll_authorization(const std::string& url, const PollTick& on_poll = {});
  // deactivate_authorization relinquishes an authorization (RFC 8555 §7.5.2).
  Result<Authorization> deactivate_authorization(const std::string& url);
  // finalize submits the DER CSR (RFC 8555 §7.4) and returns the order as answered.
  Result<Order> finalize(const Order& order, std::string_view csr_der);
  // poll_order waits until the order leaves "pending" and "processing" (that is, until it is
  // "ready", "valid" or "invalid").
  Result<Order> poll_order(const std::string& url, const PollTick& on_poll = {});
  Result<CertificateChain> download_certificate(const std::string& url);

  // revoke revokes a DER certificate (RFC 8555 §7.6). With cert_key, the request is signed by
  // the certificate's key (jwk); otherwise by the account.
  Status revoke(std::string_view certificate_der, std::optional<RevocationReason> reason,
                const Signer* cert_key = nullptr);

  // renewal_info fetches the ARI window for a certificate identifier (RFC 9773 §4.2).
  Result<RenewalInfo> renewal_info(std::string_view cert_id);

  // key_authorization is token.thumbprint for the current account key.
  std::string key_authorization(const Challenge& challenge) const;

  // Counters, for tests and metrics.
  struct Stats {
    uint64_t requests = 0;
    uint64_t bad_nonce_retries = 0;
    uint64_t server_retries = 0;
  };
  Stats stats() const;

  // Low level: a signed POST (payload empty = POST-as-GET) with nonce handling and retries.
  // use_jwk signs with the key instead of the account URL. A non-2xx answer is an Error.
  Result<HttpResponse> post(std::string_view op, const std::string& url, std::string_view payload,
                            const Signer* signer_override = nullptr, bool use_jwk = false);

 private:
  explicit Client(ClientOptions options);
  // get re-sends after a server fault (server_retry_delay); max_transport_retries >= 0 caps
  // the re-sends after a transport fault.
  Result<HttpResponse> get(std::string_view op, const std::string& url, int max_transport_retries = -1);
  Result<HttpResponse> post_impl(std::string_view op, const std::string& url,
                                 std::string_view payload, const Signer* signer_override,
                                 bool use_jwk, std::string_view accept);
  Result<std::string> take_nonce(std::string_view op);
  // send_once sends one request, counts it, and pools the reply's Replay-Nonce.
  Result<HttpResponse> send_once(const HttpRequest& request);
  // server_retry_delay says how long to wait before re-sending after a server fault (HTTP 5xx
  // or no reply) on the given attempt, or nullopt to give up.
  std::optional<std::chrono::milliseconds> server_retry_delay(const Error& e, bool server_fault,
                                                              int attempt);
  void keep_nonce(const HttpResponse& response);
  bool wait(std::chrono::milliseconds d) const;
  Result<Account> account_post(std::string_view op, const std::string& url, std::string_view payload,
                               bool use_jwk);
  template <class T, class Parse>
  Result<T> poll(std::string_view op, const std::string& url, Parse parse,
                 bool (*done)(const T&), const PollTick& on_poll);

  ClientOptions options_;
  Directory directory_;
  Clock* clock_;
  Logger* logger_;

  mutable std::mutex mu_;
  std::vector<std::string> nonces_;
  std::shared_ptr<const Signer> signer_;
  std::string account_url_;
  Stats stats_;
};

// Solver presents and removes challenge material. present MUST return quickly (it publishes
// material; it does not wait for propagation unless its type needs to, like dns-01).
class Solver {
 public:
  virtual ~Solver() = default;
  virtual Status present(const Identifier& identifier, const Challenge& challenge,
                         std::string_view key_authorization) = 0;
  virtual void cleanup(const Identifier& identifier, const Challenge& challenge,
                       std::string_view key_authorization) = 0;
  // await_fetch waits up to timeout until the CA has fetched the material presented for the
  // challenge (its validation request reached our responder) and then made no further fetch
  // for quiet, and says whether it fetched at all (at the timeout, fetches may still be coming).
  // A CA may fetch once from each of several vantage points (Pebble makes 3 concurrent
  // requests, Let's Encrypt validates from several perspectives) and decides only when all
  // have answered. A solver that cannot tell returns false at once (the default). obtain()
  // uses it to send its first authorization poll when validation is over, not on a blind
  // schedule.
  virtual bool await_fetch(const Identifier& identifier, const Challenge& challenge,
                           std::chrono::milliseconds timeout, std::chrono::milliseconds quiet) {
    (void)identifier, (void)challenge, (void)timeout, (void)quiet;
    return false;
  }
};

// ProgressEvent reports one step of an issuance as it happens (for progress displays). The
// steps come in this order: directory, account (both from the caller that sets up the client,
// e.g. tlsreload::Manager), order, then per identifier authorization and presented, then per
// identifier validating (with repeated ticks while polling) and validated, then finalizing,
// issuing (with ticks) and downloaded. Authorizations the CA already holds as valid report
// authorization with status "valid" and nothing more.
struct ProgressEvent {
  enum class Step { directory, account, order, authorization, presented, validating, validated, finalizing, issuing, downloaded };
  Step step;
  // waiting is true for validating and issuing: the client is waiting on the CA until the next
  // step. tick is 0 for the first event of a step and counts the polls after it.
  bool waiting = false;
  int tick = 0;
  std::string subject;         // the order's first identifier (names the certificate)
  std::string identifier;      // authorization, presented, validating, validated
  std::string challenge_type;  // authorization, presented, validating
  std::string status;          // the CA's status of what was fetched or polled, when known
  std::string detail;          // directory and account URL, order URL, certificate URL
  std::chrono::milliseconds elapsed{0};  // since ObtainRequest::progress_start
};
std::string_view to_string(ProgressEvent::Step step);
using ProgressCallback = std::function<void(const ProgressEvent&)>;

struct ObtainRequest {
  std::vector<Identifier> identifiers;
  std::string challenge_type = "http-01";
  KeyType key_type = KeyType::ec256;
  std::string profile;
  std::string replaces;
  std::string preferred_chain;  // issuer common name of the chain's top certificate; empty: default
  std::optional<PrivateKey> key;  // reuse this certificate key instead of generating one
  // progress, when set, is called from obtain's thread at each step; elapsed counts from
  // progress_start (default: when obtain starts) on the client's clock.
  ProgressCallback progress;
  std::optional<Clock::time_point> progress_start;
};

struct IssuedCertificate {
  std::string chain_pem;  // leaf first
  std::string key_pem;    // PKCS#8
  std::string url;        // certificate URL (for revocation and logs)
  Order order;
};

// obtain runs one whole issuance: order, every authorization through solver, finalize with a
// CSR from a fresh key, poll, download, alternate-chain choice. Authorizations already valid
// are skipped. The solver's material is cleaned up on every path.
Result<IssuedCertificate> obtain(Client& client, const ObtainRequest& request, Solver& solver);

// split_pem_chain returns each "-----BEGIN CERTIFICATE-----" block of a PEM text.
std::vector<std::string> split_pem_chain(std::string_view pem);

// parse_link_headers returns the targets of Link headers with the given rel.
std::vector<std::string> parse_link_headers(const HttpResponse& response, std::string_view rel);

}  // namespace autotls::acme
