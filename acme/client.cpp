#include "acme/client.h"

#include <algorithm>

#include "acme/challenge.h"
#include "acme/csr.h"
#include "acme/problem.h"
#include "acme/util/base64.h"
#include "acme/util/openssl.h"

namespace autotls::acme {
namespace {

using nlohmann::json;
using std::chrono::milliseconds;
using std::chrono::seconds;

constexpr size_t kMaxPooledNonces = 32;

std::string str(const json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
}

std::vector<std::string> str_array(const json& j, const char* key) {
  std::vector<std::string> out;
  auto it = j.find(key);
  if (it == j.end() || !it->is_array()) return out;
  for (const auto& v : *it) {
    if (v.is_string()) out.push_back(v.get<std::string>());
  }
  return out;
}

std::optional<Clock::time_point> time_member(const json& j, const char* key) {
  auto s = str(j, key);
  if (s.empty()) return std::nullopt;
  return parse_rfc3339(s);
}

std::optional<Problem> problem_member(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_object()) return std::nullopt;
  return parse_problem(it->dump(), 0);
}

// parse_json_body checks the media type and parses a JSON object. RFC 8555 §6.2 resources are
// "application/json"; problem documents are "application/problem+json".
Result<json> parse_json_body(std::string_view op, const HttpResponse& response) {
  if (auto ct = response.header("Content-Type")) {
    if (ct->find("json") == std::string::npos) {
      return fail(Errc::bad_response,
                  std::string(op) + ": expected a JSON reply, got Content-Type " + *ct);
    }
  }
  auto j = json::parse(response.body, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) {
    return fail(Errc::bad_response, std::string(op) + ": reply is not a JSON object");
  }
  return j;
}

Result<Identifier> parse_identifier(std::string_view op, const json& j) {
  if (!j.is_object()) return fail(Errc::bad_response, std::string(op) + ": identifier is not an object");
  Identifier id{str(j, "type"), str(j, "value")};
  if (id.type.empty() || id.value.empty()) {
    return fail(Errc::bad_response, std::string(op) + ": identifier lacks type or value");
  }
  return id;
}

Result<Account> parse_account(std::string_view op, const json& j, std::string url) {
  Account a;
  a.url = std::move(url);
  a.status = str(j, "status");
  if (a.status.empty()) return fail(Errc::bad_response, std::string(op) + ": account has no status");
  a.contact = str_array(j, "contact");
  a.orders = str(j, "orders");
  auto tos = j.find("termsOfServiceAgreed");
  a.terms_of_service_agreed = tos != j.end() && tos->is_boolean() && tos->get<bool>();
  return a;
}

Result<Challenge> parse_challenge(std::string_view op, const json& j) {
  if (!j.is_object()) return fail(Errc::bad_response, std::string(op) + ": challenge is not an object");
  Challenge c;
  c.type = str(j, "type");
  c.url = str(j, "url");
  c.status = str(j, "status");
  c.token = str(j, "token");
  c.error = problem_member(j, "error");
  if (c.type.empty() || c.url.empty() || c.status.empty()) {
    return fail(Errc::bad_response, std::string(op) + ": challenge lacks type, url or status");
  }
  // RFC 8555 §8.1: tokens are base64url; anything else could inject into paths or DNS.
  for (char ch : c.token) {
    if (!(std::isalnum(static_cast<unsigned char>(ch)) || ch == '-' || ch == '_')) {
      return fail(Errc::bad_response, std::string(op) + ": challenge token is not base64url");
    }
  }
  return c;
}

Result<Authorization> parse_authorization(std::string_view op, const json& j, std::string url) {
  Authorization a;
  a.url = std::move(url);
  a.status = str(j, "status");
  if (a.status.empty()) return fail(Errc::bad_response, std::string(op) + ": authorization has no status");
  auto id = j.find("identifier");
  if (id == j.end()) return fail(Errc::bad_response, std::string(op) + ": authorization has no identifier");
  auto ident = parse_identifier(op, *id);
  if (!ident) return fail(ident.error());
  a.identifier = std::move(*ident);
  auto wc = j.find("wildcard");
  a.wildcard = wc != j.end() && wc->is_boolean() && wc->get<bool>();
  a.expires = time_member(j, "expires");
  if (auto cs = j.find("challenges"); cs != j.end() && cs->is_array()) {
    for (const auto& c : *cs) {
      auto ch = parse_challenge(op, c);
      if (!ch) return fail(ch.error());
      a.challenges.push_back(std::move(*ch));
    }
  } else {
    return fail(Errc::bad_response, std::string(op) + ": authorization has no challenges");
  }
  return a;
}

Result<Order> parse_order(std::string_view op, const json& j, std::string url) {
  Order o;
  o.url = std::move(url);
  o.status = str(j, "status");
  if (o.status.empty()) return fail(Errc::bad_response, std::string(op) + ": order has no status");
  if (auto ids = j.find("identifiers"); ids != j.end() && ids->is_array()) {
    for (const auto& i : *ids) {
      auto ident = parse_identifier(op, i);
      if (!ident) return fail(ident.error());
      o.identifiers.push_back(std::move(*ident));
    }
  }
  o.authorizations = str_array(j, "authorizations");
  o.finalize = str(j, "finalize");
  o.certificate = str(j, "certificate");
  o.profile = str(j, "profile");
  o.replaces = str(j, "replaces");
  o.error = problem_member(j, "error");
  o.expires = time_member(j, "expires");
  if (o.finalize.empty()) return fail(Errc::bad_response, std::string(op) + ": order has no finalize URL");
  return o;
}

json identifiers_json(const std::vector<Identifier>& ids) {
  json arr = json::array();
  for (const auto& id : ids) arr.push_back({{"type", id.type}, {"value", id.value}});
  return arr;
}

// issuer_common_name returns the issuer CN of the last certificate of a PEM chain: the name
// certbot's --preferred-chain matches against.
std::string top_issuer_cn(std::string_view chain_pem) {
  auto certs = split_pem_chain(chain_pem);
  std::vector<std::string> names;
  for (const auto& pem : certs) {
    ossl::BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
    ossl::X509Ptr x(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
    if (!x) continue;
    X509_NAME* issuer = X509_get_issuer_name(x.get());
    char buf[256] = {0};
    if (X509_NAME_get_text_by_NID(issuer, NID_commonName, buf, sizeof buf) > 0) names.push_back(buf);
  }
  ossl::drain_errors();
  return names.empty() ? std::string() : names.back();
}

}  // namespace

const Challenge* Authorization::find(std::string_view type) const {
  for (const auto& c : challenges) {
    if (c.type == type) return &c;
  }
  return nullptr;
}

std::string_view to_string(ProgressEvent::Step step) {
  switch (step) {
    case ProgressEvent::Step::directory: return "directory";
    case ProgressEvent::Step::account: return "account";
    case ProgressEvent::Step::order: return "order";
    case ProgressEvent::Step::authorization: return "authorization";
    case ProgressEvent::Step::presented: return "presented";
    case ProgressEvent::Step::validating: return "validating";
    case ProgressEvent::Step::validated: return "validated";
    case ProgressEvent::Step::finalizing: return "finalizing";
    case ProgressEvent::Step::issuing: return "issuing";
    case ProgressEvent::Step::downloaded: return "downloaded";
  }
  return "unknown";
}

std::optional<RevocationReason> parse_revocation_reason(std::string_view name) {
  if (name == "unspecified" || name == "0") return RevocationReason::unspecified;
  if (name == "keyCompromise" || name == "key-compromise" || name == "1") return RevocationReason::key_compromise;
  if (name == "affiliationChanged" || name == "affiliation-changed" || name == "3")
    return RevocationReason::affiliation_changed;
  if (name == "superseded" || name == "4") return RevocationReason::superseded;
  if (name == "cessationOfOperation" || name == "cessation-of-operation" || name == "5")
    return RevocationReason::cessation_of_operation;
  return std::nullopt;
}

Result<Directory> Directory::parse(std::string_view body) {
  auto j = json::parse(body, nullptr, false);
  if (!j.is_object()) return fail(Errc::bad_response, "directory: reply is not a JSON object");
  Directory d;
  d.new_nonce = str(j, "newNonce");
  d.new_account = str(j, "newAccount");
  d.new_order = str(j, "newOrder");
  d.new_authz = str(j, "newAuthz");
  d.revoke_cert = str(j, "revokeCert");
  d.key_change = str(j, "keyChange");
  d.renewal_info = str(j, "renewalInfo");
  if (d.new_nonce.empty() || d.new_account.empty() || d.new_order.empty()) {
    return fail(Errc::bad_response, "directory: newNonce, newAccount or newOrder is missing");
  }
  if (auto meta = j.find("meta"); meta != j.end() && meta->is_object()) {
    d.terms_of_service = str(*meta, "termsOfService");
    d.website = str(*meta, "website");
    d.caa_identities = str_array(*meta, "caaIdentities");
    auto ear = meta->find("externalAccountRequired");
    d.external_account_required = ear != meta->end() && ear->is_boolean() && ear->get<bool>();
    if (auto profiles = meta->find("profiles"); profiles != meta->end() && profiles->is_object()) {
      for (const auto& [name, desc] : profiles->items()) {
        d.profiles[name] = desc.is_string() ? desc.get<std::string>() : std::string();
      }
    }
  }
  return d;
}

Client::Client(ClientOptions options)
    : options_(std::move(options)),
      clock_(options_.clock ? options_.clock : &system_clock()),
      logger_(options_.logger ? options_.logger : &null_logger()) {}

Result<std::unique_ptr<Client>> Client::create(ClientOptions options) {
  if (!options.transport) return fail(Errc::invalid_input, "acme client: no HTTP transport");
  if (options.directory_url.empty()) return fail(Errc::invalid_input, "acme client: no directory URL");
  std::unique_ptr<Client> c(new Client(std::move(options)));
  auto resp = c->get("directory", c->options_.directory_url, c->options_.max_directory_transport_retries);
  if (!resp) return fail(resp.error());
  auto body = parse_json_body("directory", *resp);
  if (!body) return fail(body.error());
  auto dir = Directory::parse(resp->body);
  if (!dir) return fail(dir.error());
  c->directory_ = std::move(*dir);
  return c;
}

void Client::set_account(std::shared_ptr<const Signer> signer, std::string account_url) {
  std::lock_guard lock(mu_);
  signer_ = std::move(signer);
  account_url_ = std::move(account_url);
}

std::string Client::account_url() const {
  std::lock_guard lock(mu_);
  return account_url_;
}

std::shared_ptr<const Signer> Client::signer() const {
  std::lock_guard lock(mu_);
  return signer_;
}

Client::Stats Client::stats() const {
  std::lock_guard lock(mu_);
  return stats_;
}

bool Client::wait(milliseconds d) const { return clock_->sleep_for(d); }

void Client::keep_nonce(const HttpResponse& response) {
  auto n = response.header("Replay-Nonce");
  if (!n || n->empty()) return;
  // RFC 8555 §6.5.1: the value MUST be base64url; ignore anything else.
  for (char ch : *n) {
    if (!(std::isalnum(static_cast<unsigned char>(ch)) || ch == '-' || ch == '_')) return;
  }
  std::lock_guard lock(mu_);
  if (nonces_.size() >= kMaxPooledNonces) nonces_.erase(nonces_.begin());
  nonces_.push_back(*n);
}

Result<HttpResponse> Client::send_once(const HttpRequest& request) {
  auto resp = options_.transport->send(request);
  {
    std::lock_guard lock(mu_);
    ++stats_.requests;
  }
  if (resp) keep_nonce(*resp);
  return resp;
}

std::optional<milliseconds> Client::server_retry_delay(const Error& e, bool server_fault, int attempt) {
  if (!server_fault || attempt >= options_.max_server_retries) return std::nullopt;
  milliseconds delay = milliseconds(500) * (1 << attempt);
  if (e.retry_after) {
    // A long Retry-After is for the caller to schedule: holding a worker that long is worse.
    if (*e.retry_after > options_.max_retry_wait) return std::nullopt;
    delay = *e.retry_after;
  }
  std::lock_guard lock(mu_);
  ++stats_.server_retries;
  return delay;
}

Result<std::string> Client::take_nonce(std::string_view op) {
  HttpRequest req{"HEAD", directory_.new_nonce, {}, {}};
  for (int attempt = 0;; ++attempt) {
    {
      std::lock_guard lock(mu_);
      if (!nonces_.empty()) {
        std::string n = std::move(nonces_.back());
        nonces_.pop_back();
        return n;
      }
    }
    // RFC 8555 §7.2: a HEAD to newNonce answers with a fresh Replay-Nonce; send_once pools it.
    auto resp = send_once(req);
    if (resp && resp->status >= 200 && resp->status < 300) {
      if (!resp->header("Replay-Nonce")) {
        return fail(Errc::bad_response, std::string(op) + ": newNonce reply has no Replay-Nonce");
      }
      continue;
    }
    Error e = resp ? error_from_response("newNonce", *resp, clock_->now()) : resp.error();
    auto delay = server_retry_delay(e, !resp || resp->status >= 500, attempt);
    if (!delay) return fail(e.with_context(op));
    if (!wait(*delay)) return fail(Errc::cancelled, std::string(op) + ": cancelled");
  }
}

Result<HttpResponse> Client::get(std::string_view op, const std::string& url, int max_transport_retries) {
  HttpRequest req{"GET", url, {}, {}};
  for (int attempt = 0;; ++attempt) {
    auto resp = send_once(req);
    if (resp && resp->status >= 200 && resp->status < 300) return resp;
    Error e = resp ? error_from_response(op, *resp, clock_->now()) : resp.error().with_context(op);
    if (!resp && max_transport_retries >= 0 && attempt >= max_transport_retries) return fail(e);
    auto delay = server_retry_delay(e, !resp || resp->status >= 500, attempt);
    if (!delay) return fail(e);
    if (!wait(*delay)) return fail(Errc::cancelled, std::string(op) + ": cancelled");
  }
}

Result<HttpResponse> Client::post(std::string_view op, const std::string& url, std::string_view payload,
                                  const Signer* signer_override, bool use_jwk) {
  return post_impl(op, url, payload, signer_override, use_jwk, {});
}

Result<HttpResponse> Client::post_impl(std::string_view op, const std::string& url,
                                       std::string_view payload, const Signer* signer_override,
                                       bool use_jwk, std::string_view accept) {
  std::shared_ptr<const Signer> held;
  const Signer* signer = signer_override;
  if (!signer) {
    held = this->signer();
    signer = held.get();
  }
  if (!signer) return fail(Errc::invalid_input, std::string(op) + ": no account key set");
  std::string kid;
  if (!use_jwk) {
    kid = account_url();
    if (kid.empty()) {
      return fail(Errc::invalid_input,
                  std::string(op) + ": no account URL; register or look up the account first");
    }
  }

  int bad_nonces = 0;
  int server_faults = 0;
  for (;;) {
    auto nonce = take_nonce(op);
    if (!nonce) return fail(nonce.error());
    auto jws = sign_jws(*signer, JwsHeader{url, *nonce, kid}, payload);
    if (!jws) return fail(jws.error().with_context(op));
    HttpRequest req{"POST", url, {{"Content-Type", "application/jose+json"}}, jws->dump()};
    if (!accept.empty()) req.headers.emplace_back("Accept", std::string(accept));

    auto resp = send_once(req);
    if (logger_->enabled(LogLevel::debug)) {
      logger_->log(LogLevel::debug, "acme.request", "POST",
                   {{"op", std::string(op)}, {"url", url},
                    {"status", resp ? std::to_string(resp->status) : resp.error().message}});
    }
    if (resp && resp->status >= 200 && resp->status < 300) return resp;

    Error e = resp ? error_from_response(op, *resp, clock_->now()) : resp.error().with_context(op);
    // RFC 8555 §6.5: "When a server rejects a request because its nonce value was unacceptable
    // (or not present), it MUST provide HTTP status code 400 (Bad Request), and indicate the
    // ACME error type urn:ietf:params:acme:error:badNonce. An error response with the badNonce
    // error type MUST include the Replay-Nonce header field with a fresh nonce [...]. On
    // receiving such a response, a client SHOULD retry the request using the new nonce".
    if (e.problem && e.problem->is(problem_type::kBadNonce)) {
      if (bad_nonces >= options_.max_bad_nonce_retries) {
        e.message += " (after " + std::to_string(bad_nonces) + " retries)";
        return fail(e);
      }
      ++bad_nonces;
      std::lock_guard lock(mu_);
      ++stats_.bad_nonce_retries;
      continue;
    }
    // rateLimited is for the caller to schedule: waiting here would hold a worker for hours.
    if (e.problem && e.problem->is(problem_type::kRateLimited)) return fail(e);
    auto delay = server_retry_delay(e, !resp || resp->status >= 500, server_faults++);
    if (!delay) return fail(e);
    if (!wait(*delay)) return fail(Errc::cancelled, std::string(op) + ": cancelled");
  }
}

Result<Account> Client::account_post(std::string_view op, const std::string& url,
                                     std::string_view payload, bool use_jwk) {
  auto resp = post(op, url, payload, nullptr, use_jwk);
  if (!resp) return fail(resp.error());
  auto body = parse_json_body(op, *resp);
  if (!body) return fail(body.error());
  std::string account_url = use_jwk ? resp->header("Location").value_or("") : url;
  if (account_url.empty()) {
    return fail(Errc::bad_response, std::string(op) + ": reply has no Location header");
  }
  return parse_account(op, *body, std::move(account_url));
}

Result<Account> Client::register_account(const NewAccountOptions& opts) {
  auto signer = this->signer();
  if (!signer) return fail(Errc::invalid_input, "newAccount: no account key set");
  if (directory_.external_account_required && !opts.eab) {
    return fail(Errc::invalid_input,
                "newAccount: this CA requires External Account Binding (--eab-kid and --eab-hmac)");
  }
  json payload = {{"termsOfServiceAgreed", opts.agree_to_terms}};
  if (!opts.contact.empty()) payload["contact"] = opts.contact;
  if (opts.eab) {
    auto eab = eab_jws(opts.eab->kid, opts.eab->hmac_key, signer->jwk(), directory_.new_account,
                       opts.eab->alg);
    if (!eab) return fail(eab.error().with_context("newAccount: externalAccountBinding"));
    payload["externalAccountBinding"] = std::move(*eab);
  }
  auto acct = account_post("newAccount", directory_.new_account, payload.dump(), /*use_jwk=*/true);
  if (!acct) return acct;
  std::lock_guard lock(mu_);
  if (signer_ == signer) account_url_ = acct->url;
  return acct;
}

Result<Account> Client::find_account() {
  auto signer = this->signer();
  json payload = {{"onlyReturnExisting", true}};
  auto acct = account_post("newAccount", directory_.new_account, payload.dump(), /*use_jwk=*/true);
  if (!acct) return acct;
  std::lock_guard lock(mu_);
  if (signer_ == signer) account_url_ = acct->url;
  return acct;
}

Result<Account> Client::fetch_account() {
  return account_post("account", account_url(), "", false);
}

Result<Account> Client::update_account(const std::vector<std::string>& contact) {
  json payload = {{"contact", contact}};
  return account_post("updateAccount", account_url(), payload.dump(), false);
}

Result<Account> Client::deactivate_account() {
  json payload = {{"status", "deactivated"}};
  return account_post("deactivateAccount", account_url(), payload.dump(), false);
}

Status Client::change_key(std::shared_ptr<const Signer> new_signer) {
  if (!new_signer) return fail(Errc::invalid_input, "keyChange: no new key");
  if (directory_.key_change.empty()) return fail(Errc::invalid_input, "keyChange: the CA has no keyChange URL");
  auto old_signer = this->signer();
  std::string kid = account_url();
  if (!old_signer || kid.empty()) return fail(Errc::invalid_input, "keyChange: no account selected");
  // RFC 8555 §7.3.5: the inner JWS is signed by the new key, carries "jwk" and "url" but no
  // nonce; its payload names the account and the old key.
  json inner_payload = {{"account", kid}, {"oldKey", old_signer->jwk()}};
  auto inner = sign_jws(*new_signer, JwsHeader{directory_.key_change, "", ""}, inner_payload.dump());
  if (!inner) return fail(inner.error().with_context("keyChange"));
  auto resp = post("keyChange", directory_.key_change, inner->dump());
  if (!resp) return fail(resp.error());
  std::lock_guard lock(mu_);
  signer_ = std::move(new_signer);
  return {};
}

Result<Order> Client::new_order(const NewOrderOptions& opts) {
  if (opts.identifiers.empty()) return fail(Errc::invalid_input, "newOrder: no identifiers");
  json payload = {{"identifiers", identifiers_json(opts.identifiers)}};
  if (!opts.profile.empty()) {
    if (!directory_.profiles.empty() && !directory_.profiles.count(opts.profile)) {
      std::string known;
      for (const auto& [name, _] : directory_.profiles) known += (known.empty() ? "" : ", ") + name;
      return fail(Errc::invalid_input,
                  "newOrder: the CA has no profile \"" + opts.profile + "\" (it offers: " + known + ")");
    }
    payload["profile"] = opts.profile;
  }
  if (!opts.replaces.empty()) payload["replaces"] = opts.replaces;
  auto resp = post("newOrder", directory_.new_order, payload.dump());
  if (!resp && !opts.replaces.empty() && resp.error().problem) {
    // RFC 9773 §5: a CA refuses "replaces" for a certificate already replaced (409
    // alreadyReplaced) or not issued to this account (403). Neither makes the new
    // certificate unobtainable, so ask once more without it.
    const Problem& p = *resp.error().problem;
    bool refused = (p.status == 409 && p.is(problem_type::kAlreadyReplaced)) ||
                   (p.status == 403 && (p.detail.find(opts.replaces) != std::string::npos ||
                                        p.detail.find("replace") != std::string::npos));
    if (refused) {
      logger_->log(LogLevel::warn, "acme.order", "CA refused replaces; ordering without it",
                   {{"detail", p.detail}});
      payload.erase("replaces");
      resp = post("newOrder", directory_.new_order, payload.dump());
    }
  }
  if (!resp) return fail(resp.error());
  auto body = parse_json_body("newOrder", *resp);
  if (!body) return fail(body.error());
  auto loc = resp->header("Location");
  if (!loc || loc->empty()) return fail(Errc::bad_response, "newOrder: reply has no Location header");
  return parse_order("newOrder", *body, *loc);
}

Result<Order> Client::fetch_order(const std::string& url) {
  auto resp = post("order", url, "");
  if (!resp) return fail(resp.error());
  auto body = parse_json_body("order", *resp);
  if (!body) return fail(body.error());
  return parse_order("order", *body, url);
}

Result<Authorization> Client::fetch_authorization(const std::string& url) {
  auto resp = post("authorization", url, "");
  if (!resp) return fail(resp.error());
  auto body = parse_json_body("authorization", *resp);
  if (!body) return fail(body.error());
  return parse_authorization("authorization", *body, url);
}

Result<Authorization> Client::deactivate_authorization(const std::string& url) {
  auto resp = post("deactivateAuthorization", url, R"({"status":"deactivated"})");
  if (!resp) return fail(resp.error());
  auto body = parse_json_body("deactivateAuthorization", *resp);
  if (!body) return fail(body.error());
  return parse_authorization("deactivateAuthorization", *body, url);
}

Result<Challenge> Client::respond(const Challenge& challenge) {
  // RFC 8555 §7.5.1: "The client indicates to the server that it is ready for the challenge
  // validation by sending an empty JSON body ("{}")".
  auto resp = post("challenge", challenge.url, "{}");
  if (!resp) return fail(resp.error());
  auto body = parse_json_body("challenge", *resp);
  if (!body) return fail(body.error());
  return parse_challenge("challenge", *body);
}

template <class T, class Parse>
Result<T> Client::poll(std::string_view op, const std::string& url, Parse parse,
                       bool (*done)(const T&), const PollTick& on_poll) {
  const auto start = clock_->now();
  milliseconds delay = options_.poll_initial;
  for (;;) {
    auto resp = post(op, url, "");
    if (!resp) return fail(resp.error());
    auto body = parse_json_body(op, *resp);
    if (!body) return fail(body.error());
    auto value = parse(op, *body, url);
    if (!value) return fail(value.error());
    if (done(*value)) return value;
    if (on_poll) on_poll(value->status);

    milliseconds next = delay;
    // RFC 8555 §7.5.1 / §7.4: the server may say how long to wait with Retry-After.
    if (auto ra = resp->header("Retry-After")) {
      if (auto secs = parse_retry_after(*ra, clock_->now())) {
        next = std::min<milliseconds>(std::max<milliseconds>(*secs, options_.poll_initial),
                                      options_.max_retry_wait);
      }
    }
    auto elapsed = clock_->now() - start;
    if (elapsed + next > options_.poll_timeout) {
      Error e(Errc::timeout, std::string(op) + ": still \"" + value->status + "\" after " +
                                 std::to_string(std::chrono::duration_cast<seconds>(elapsed).count()) + " s");
      return fail(e);
    }
    if (!wait(next)) return fail(Errc::cancelled, std::string(op) + ": cancelled");
    delay = std::min(delay * 2, options_.poll_max);
  }
}

Result<Authorization> Client::poll_authorization(const std::string& url, const PollTick& on_poll) {
  return poll<Authorization>(
      "authorization", url,
      [](std::string_view op, const json& j, const std::string& u) { return parse_authorization(op, j, u); },
      +[](const Authorization& a) { return a.status != "pending"; }, on_poll);
}

Result<Order> Client::poll_order(const std::string& url, const PollTick& on_poll) {
  return poll<Order>(
      "order", url,
      [](std::string_view op, const json& j, const std::string& u) { return parse_order(op, j, u); },
      +[](const Order& o) { return o.status != "pending" && o.status != "processing"; }, on_poll);
}

Result<Order> Client::finalize(const Order& order, std::string_view csr_der) {
  json payload = {{"csr", base64url_encode(csr_der)}};
  auto resp = post("finalize", order.finalize, payload.dump());
  if (!resp) return fail(resp.error());
  auto body = parse_json_body("finalize", *resp);
  if (!body) return fail(body.error());
  return parse_order("finalize", *body, order.url);
}

Result<CertificateChain> Client::download_certificate(const std::string& url) {
  auto resp = post_impl("certificate", url, "", nullptr, false, "application/pem-certificate-chain");
  if (!resp) return fail(resp.error());
  CertificateChain chain;
  auto certs = split_pem_chain(resp->body);
  if (certs.empty()) {
    return fail(Errc::bad_response, "certificate: reply holds no PEM certificate");
  }
  for (const auto& c : certs) chain.pem += c;
  chain.alternates = parse_link_headers(*resp, "alternate");
  return chain;
}

Status Client::revoke(std::string_view certificate_der, std::optional<RevocationReason> reason,
                      const Signer* cert_key) {
  if (directory_.revoke_cert.empty()) return fail(Errc::invalid_input, "revokeCert: the CA has no revokeCert URL");
  json payload = {{"certificate", base64url_encode(certificate_der)}};
  if (reason) payload["reason"] = static_cast<int>(*reason);
  auto resp = post("revokeCert", directory_.revoke_cert, payload.dump(), cert_key, cert_key != nullptr);
  if (!resp) return fail(resp.error());
  return {};
}

Result<RenewalInfo> Client::renewal_info(std::string_view cert_id) {
  if (directory_.renewal_info.empty()) {
    return fail(Errc::invalid_input, "renewalInfo: the CA does not offer ARI");
  }
  std::string url = directory_.renewal_info;
  if (!url.ends_with('/')) url += '/';
  url += cert_id;
  auto resp = get("renewalInfo", url);
  if (!resp) return fail(resp.error());
  auto body = parse_json_body("renewalInfo", *resp);
  if (!body) return fail(body.error());
  auto info = parse_renewal_info(resp->body);
  if (!info) return fail(info.error().with_context("renewalInfo"));
  if (auto ra = resp->header("Retry-After")) info->retry_after = parse_retry_after(*ra, clock_->now());
  return info;
}

std::string Client::key_authorization(const Challenge& challenge) const {
  auto s = signer();
  return acme::key_authorization(challenge.token, s ? s->thumbprint() : std::string());
}

std::vector<std::string> split_pem_chain(std::string_view pem) {
  constexpr std::string_view kBegin = "-----BEGIN CERTIFICATE-----";
  constexpr std::string_view kEnd = "-----END CERTIFICATE-----";
  std::vector<std::string> out;
  size_t pos = 0;
  for (;;) {
    size_t b = pem.find(kBegin, pos);
    if (b == std::string_view::npos) break;
    size_t e = pem.find(kEnd, b);
    if (e == std::string_view::npos) break;
    out.emplace_back(pem.substr(b, e + kEnd.size() - b));
    out.back() += '\n';
    pos = e + kEnd.size();
  }
  return out;
}

std::vector<std::string> parse_link_headers(const HttpResponse& response, std::string_view rel) {
  std::vector<std::string> out;
  for (const auto& value : response.headers_named("Link")) {
    // A header may hold several comma-separated links: <url>;rel="x", <url2>;rel="y".
    size_t pos = 0;
    while (pos < value.size()) {
      size_t lt = value.find('<', pos);
      if (lt == std::string::npos) break;
      size_t gt = value.find('>', lt);
      if (gt == std::string::npos) break;
      std::string target = value.substr(lt + 1, gt - lt - 1);
      size_t next = value.find('<', gt);
      std::string params = value.substr(gt + 1, next == std::string::npos ? std::string::npos : next - gt - 1);
      std::string want1 = "rel=\"" + std::string(rel) + "\"";
      std::string want2 = "rel=" + std::string(rel);
      auto matches = [&](const std::string& w) {
        size_t at = params.find(w);
        if (at == std::string::npos) return false;
        size_t after = at + w.size();
        return after == params.size() || params[after] == ';' || params[after] == ',' ||
               params[after] == ' ';
      };
      if (matches(want1) || matches(want2)) out.push_back(target);
      pos = next == std::string::npos ? value.size() : next;
    }
  }
  return out;
}

namespace {

struct PresentedChallenge {
  Identifier identifier;
  Challenge challenge;
  std::string key_authorization;
  std::string authz_url;
};

// CleanupGuard removes presented material on every path out of obtain().
class CleanupGuard {
 public:
  explicit CleanupGuard(Solver& solver) : solver_(solver) {}
  ~CleanupGuard() {
    for (const auto& p : presented_) solver_.cleanup(p.identifier, p.challenge, p.key_authorization);
  }
  std::vector<PresentedChallenge>& presented() { return presented_; }

 private:
  Solver& solver_;
  std::vector<PresentedChallenge> presented_;
};

std::string offered_types(const Authorization& a) {
  std::string s;
  for (const auto& c : a.challenges) s += (s.empty() ? "" : ", ") + c.type;
  return s;
}

ProgressEvent progress_event(ProgressEvent::Step step, std::string identifier, std::string challenge_type,
                             std::string status, std::string detail) {
  ProgressEvent e;
  e.step = step;
  e.identifier = std::move(identifier);
  e.challenge_type = std::move(challenge_type);
  e.status = std::move(status);
  e.detail = std::move(detail);
  return e;
}

// Progress sends ProgressEvents for one obtain() call; it does nothing without a callback.
class Progress {
 public:
  Progress(const Client& client, const ObtainRequest& request)
      : cb_(request.progress),
        clock_(client.options().clock ? *client.options().clock : system_clock()),
        start_(request.progress_start ? *request.progress_start : clock_.now()),
        subject_(request.identifiers.empty() ? std::string() : request.identifiers.front().value) {}
  explicit operator bool() const { return static_cast<bool>(cb_); }
  void operator()(ProgressEvent e) const {
    if (!cb_) return;
    e.subject = subject_;
    e.waiting = e.step == ProgressEvent::Step::validating || e.step == ProgressEvent::Step::issuing;
    e.elapsed = std::chrono::duration_cast<milliseconds>(clock_.now() - start_);
    cb_(e);
  }
  // ticker returns a poll callback that reports repeated ticks of a waiting step.
  Client::PollTick ticker(ProgressEvent base) const {
    if (!cb_) return {};
    return [this, base, n = 0](const std::string& status) mutable {
      ProgressEvent e = base;
      e.tick = ++n;
      e.status = status;
      (*this)(e);
    };
  }

 private:
  const ProgressCallback& cb_;
  const Clock& clock_;
  Clock::time_point start_;
  std::string subject_;
};

}  // namespace

Result<IssuedCertificate> obtain(Client& client, const ObtainRequest& request, Solver& solver) {
  using Step = ProgressEvent::Step;
  const Progress progress(client, request);
  auto order = client.new_order({request.identifiers, request.profile, request.replaces});
  if (!order) return fail(order.error());
  progress(progress_event(Step::order, {}, {}, order->status, order->url));

  Clock& clock = client.options().clock ? *client.options().clock : system_clock();
  // settle waits until one poll step has passed since `since`.
  auto settle = [&](Clock::time_point since) -> Status {
    auto left = client.options().poll_initial - std::chrono::duration_cast<milliseconds>(clock.now() - since);
    if (left > milliseconds(0) && !clock.sleep_for(left)) return fail(Errc::cancelled, "obtain: cancelled");
    return {};
  };
  auto settle_half = [&](Clock::time_point since) -> Status {
    auto left = client.options().poll_initial / 2 - std::chrono::duration_cast<milliseconds>(clock.now() - since);
    if (left > milliseconds(0) && !clock.sleep_for(left)) return fail(Errc::cancelled, "obtain: cancelled");
    return {};
  };
  std::optional<PrivateKey> key = request.key;
  std::string key_pem;
  std::optional<std::string> csr;
  auto make_key_and_csr = [&]() -> Status {
    if (!key) {
      auto k = PrivateKey::generate(request.key_type);
      if (!k) return fail(k.error());
      key = std::move(*k);
    }
    auto pem = key->to_pem();
    if (!pem) return fail(pem.error());
    key_pem = std::move(*pem);
    auto der = make_csr(*key, request.identifiers);
    if (!der) return fail(der.error());
    csr = std::move(*der);
    return {};
  };

  {
    CleanupGuard guard(solver);
    for (const auto& url : order->authorizations) {
      auto authz = client.fetch_authorization(url);
      if (!authz) return fail(authz.error());
      progress(progress_event(Step::authorization, authz->identifier.value,
                              authz->status == "valid" ? std::string() : request.challenge_type, authz->status, url));
      if (authz->status == "valid") continue;
      if (authz->status != "pending") {
        return fail(Errc::protocol, "authorization for " + authz->identifier.value + " is " + authz->status);
      }
      const Challenge* ch = authz->find(request.challenge_type);
      if (!ch) {
        return fail(Errc::invalid_input, "the CA offers no " + request.challenge_type + " challenge for " +
                                             authz->identifier.value + " (it offers: " + offered_types(*authz) + ")");
      }
      std::string ka = client.key_authorization(*ch);
      Identifier id = authz->identifier;
      if (authz->wildcard) id.value = "*." + id.value;
      if (auto st = solver.present(id, *ch, ka); !st) {
        return fail(st.error().with_context("presenting " + ch->type + " for " + id.value));
      }
      guard.presented().push_back({id, *ch, ka, url});
      progress(progress_event(Step::presented, id.value, ch->type, {}, {}));
    }
    // Respond to every challenge before polling any: the CA validates them in parallel.
    for (const auto& p : guard.presented()) {
      auto r = client.respond(p.challenge);
      if (!r) return fail(r.error());
    }
    const auto responded = clock.now();
    // The certificate key and CSR are made while the CA validates (instead of after): for an
    // RSA key that is most of a second the polls would otherwise spend waiting.
    if (auto st = make_key_and_csr(); !st) return fail(st.error());
    bool first = true;
    for (const auto& p : guard.presented()) {
      ProgressEvent waiting = progress_event(Step::validating, p.identifier.value, p.challenge.type, "pending", {});
      progress(waiting);
      // No CA has validated at the instant it was told to. When the solver can tell that the
      // CA fetched the material (our own http-01 responder served it), validation is under way:
      // the first poll goes out once the fetches have stopped for half a poll step. Pebble
      // fetches 3 times, concurrently but spread over ~2 ms on 2 cores, and marks the
      // authorization valid only when all 3 have answered; a poll half a step after the first
      // fetch mostly came too early and then waited a whole step more (traced). A blind first
      // poll one step after responding came too early as well. Waiting is bounded by four poll
      // steps; without a fetch by then, or from a solver that cannot tell, the first poll is
      // one poll step after responding (less the time the key took), not at once.
      if (first) {
        const milliseconds step = client.options().poll_initial;
        auto left = 4 * step - std::chrono::duration_cast<milliseconds>(clock.now() - responded);
        if (left > milliseconds(0) && solver.await_fetch(p.identifier, p.challenge, left, step / 2)) {
          // Fetched, and quiet since (or the bound ran out): poll now.
        } else if (auto st = settle(responded); !st) {
          return fail(st.error());
        }
        first = false;
      }
      auto a = client.poll_authorization(p.authz_url, progress.ticker(waiting));
      if (!a) return fail(a.error());
      if (a->status != "valid") {
        Error e(Errc::protocol, "validation of " + p.identifier.value + " by " + p.challenge.type +
                                    " failed: authorization is " + a->status);
        e.validation_failed = true;
        if (const Challenge* c = a->find(p.challenge.type); c && c->error) {
          e.message += ": " + describe(*c->error);
          e.problem = c->error;
        }
        return fail(e);
      }
      progress(progress_event(Step::validated, p.identifier.value, p.challenge.type, a->status, {}));
    }
  }

  if (!csr) {
    // Every authorization was valid already: nothing was presented.
    if (auto st = make_key_and_csr(); !st) return fail(st.error());
  }

  // The order may still read "pending" for a moment after its last authorization turned
  // valid. CAs that work its status out at each request (Boulder, Pebble) take the finalize at
  // once, so it is sent without polling the order first; an orderNotReady answer (a CA that
  // updates the order later) makes us poll until it is ready and finalize then.
  progress(progress_event(Step::finalizing, {}, {}, order->status, order->url));
  Result<Order> done = fail(Errc::protocol, "order not finalized");
  bool finalized = false;
  if (order->status == "ready" || order->status == "pending") {
    done = client.finalize(*order, *csr);
    finalized = done || !done.error().problem || !done.error().problem->is(problem_type::kOrderNotReady) ||
                order->status == "ready";
  }
  if (!finalized) {
    order = client.poll_order(order->url);
    if (!order) return fail(order.error());
    if (order->status != "ready") {
      Error e(Errc::protocol, "order is " + order->status + ", not ready to finalize");
      if (order->error) {
        e.message += ": " + describe(*order->error);
        e.problem = order->error;
      }
      return fail(e);
    }
    done = client.finalize(*order, *csr);
  }
  if (!done) return fail(done.error());
  if (done->status != "valid") {
    const auto submitted = clock.now();
    ProgressEvent waiting = progress_event(Step::issuing, {}, {}, done->status, order->url);
    progress(waiting);
    // Nor has a CA issued at the instant it got the CSR: the first poll is one step later.
    if (auto st = settle_half(submitted); !st) return fail(st.error());
    done = client.poll_order(order->url, progress.ticker(waiting));
    if (!done) return fail(done.error());
  }
  if (done->status != "valid" || done->certificate.empty()) {
    Error e(Errc::protocol, "order ended " + done->status + " without a certificate");
    if (done->error) {
      e.message += ": " + describe(*done->error);
      e.problem = done->error;
    }
    return fail(e);
  }

  auto chain = client.download_certificate(done->certificate);
  if (!chain) return fail(chain.error());
  std::string chosen = chain->pem;
  std::string chosen_url = done->certificate;
  if (!request.preferred_chain.empty() && top_issuer_cn(chosen) != request.preferred_chain) {
    for (const auto& alt_url : chain->alternates) {
      auto alt = client.download_certificate(alt_url);
      if (!alt) continue;  // an alternate that fails is no reason to give up the default
      if (top_issuer_cn(alt->pem) == request.preferred_chain) {
        chosen = alt->pem;
        chosen_url = alt_url;
        break;
      }
    }
  }
  progress(progress_event(Step::downloaded, {}, {}, done->status, chosen_url));
  return IssuedCertificate{std::move(chosen), std::move(key_pem), std::move(chosen_url), std::move(*done)};
}

}  // namespace autotls::acme
