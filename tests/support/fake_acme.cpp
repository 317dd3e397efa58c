#include "tests/support/fake_acme.h"

#include <arpa/inet.h>
#include <strings.h>

#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/hmac.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <openssl/rand.h>

#include "acme/ari.h"
#include "acme/util/base64.h"
#include "acme/util/openssl.h"

namespace autotls::testing {

using nlohmann::json;
using namespace autotls::ossl;

namespace {

struct ParamBldFree {
  void operator()(OSSL_PARAM_BLD* b) const { OSSL_PARAM_BLD_free(b); }
};
struct ParamFree {
  void operator()(OSSL_PARAM* p) const { OSSL_PARAM_free(p); }
};

std::string random_token(size_t bytes = 16) {
  std::string raw(bytes, '\0');
  RAND_bytes(reinterpret_cast<unsigned char*>(raw.data()), static_cast<int>(raw.size()));
  return base64url_encode(raw);
}

EvpPkeyPtr new_p256() {
  return EvpPkeyPtr(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"));
}

// jwk_to_pkey builds a public key from a JWK (EC P-256/P-384 or RSA).
EvpPkeyPtr jwk_to_pkey(const json& jwk) {
  if (!jwk.is_object()) return nullptr;
  std::string kty = jwk.value("kty", "");
  std::unique_ptr<OSSL_PARAM_BLD, ParamBldFree> bld(OSSL_PARAM_BLD_new());
  BignumPtr n, e;
  std::string point;
  const char* type = nullptr;
  if (kty == "EC") {
    std::string crv = jwk.value("crv", "");
    auto x = base64url_decode(jwk.value("x", ""));
    auto y = base64url_decode(jwk.value("y", ""));
    if (!x || !y) return nullptr;
    const char* group = crv == "P-256" ? "prime256v1" : crv == "P-384" ? "secp384r1" : nullptr;
    size_t width = crv == "P-256" ? 32 : 48;
    if (!group || x->size() != width || y->size() != width) return nullptr;
    point = std::string(1, '\x04') + *x + *y;
    OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME, group, 0);
    OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY, point.data(), point.size());
    type = "EC";
  } else if (kty == "RSA") {
    auto nb = base64url_decode(jwk.value("n", ""));
    auto eb = base64url_decode(jwk.value("e", ""));
    if (!nb || !eb) return nullptr;
    n.reset(BN_bin2bn(reinterpret_cast<const unsigned char*>(nb->data()), static_cast<int>(nb->size()), nullptr));
    e.reset(BN_bin2bn(reinterpret_cast<const unsigned char*>(eb->data()), static_cast<int>(eb->size()), nullptr));
    OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_N, n.get());
    OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_E, e.get());
    type = "RSA";
  } else {
    return nullptr;
  }
  std::unique_ptr<OSSL_PARAM, ParamFree> params(OSSL_PARAM_BLD_to_param(bld.get()));
  EvpPkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_name(nullptr, type, nullptr));
  EVP_PKEY* out = nullptr;
  if (!ctx || EVP_PKEY_fromdata_init(ctx.get()) <= 0 ||
      EVP_PKEY_fromdata(ctx.get(), &out, EVP_PKEY_PUBLIC_KEY, params.get()) <= 0) {
    drain_errors();
    return nullptr;
  }
  return EvpPkeyPtr(out);
}

bool verify_jws_signature(const std::string& alg, EVP_PKEY* key, const std::string& input,
                          const std::string& sig) {
  const EVP_MD* md = nullptr;
  std::string der_sig = sig;
  if (alg == "ES256" || alg == "ES384") {
    size_t width = alg == "ES256" ? 32 : 48;
    if (sig.size() != 2 * width || EVP_PKEY_get_base_id(key) != EVP_PKEY_EC) return false;
    md = alg == "ES256" ? EVP_sha256() : EVP_sha384();
    EcdsaSigPtr es(ECDSA_SIG_new());
    BIGNUM* r = BN_bin2bn(reinterpret_cast<const unsigned char*>(sig.data()), static_cast<int>(width), nullptr);
    BIGNUM* s = BN_bin2bn(reinterpret_cast<const unsigned char*>(sig.data() + width), static_cast<int>(width), nullptr);
    ECDSA_SIG_set0(es.get(), r, s);
    unsigned char* der = nullptr;
    int len = i2d_ECDSA_SIG(es.get(), &der);
    if (len <= 0) return false;
    der_sig.assign(reinterpret_cast<char*>(der), static_cast<size_t>(len));
    OPENSSL_free(der);
  } else if (alg == "RS256") {
    if (EVP_PKEY_get_base_id(key) != EVP_PKEY_RSA) return false;
    md = EVP_sha256();
  } else {
    return false;
  }
  EvpMdCtxPtr ctx(EVP_MD_CTX_new());
  bool ok = EVP_DigestVerifyInit(ctx.get(), nullptr, md, nullptr, key) == 1 &&
            EVP_DigestVerify(ctx.get(), reinterpret_cast<const unsigned char*>(der_sig.data()), der_sig.size(),
                             reinterpret_cast<const unsigned char*>(input.data()), input.size()) == 1;
  drain_errors();
  return ok;
}

std::string to_pem(X509* x) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  PEM_write_bio_X509(bio.get(), x);
  char* data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(len));
}

std::string to_der(X509* x) {
  unsigned char* der = nullptr;
  int len = i2d_X509(x, &der);
  std::string out(reinterpret_cast<char*>(der), static_cast<size_t>(len));
  OPENSSL_free(der);
  return out;
}

void add_ext(X509* cert, X509* issuer, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509ExtPtr ext(X509V3_EXT_conf_nid(nullptr, &ctx, nid, value));
  if (ext) X509_add_ext(cert, ext.get(), -1);
}

// make_cert issues a certificate for pubkey; issuer == nullptr makes it self-signed.
X509Ptr make_cert(const std::string& cn, EVP_PKEY* pubkey, X509* issuer, EVP_PKEY* issuer_key, bool ca,
                  const std::string& san, long serial) {
  X509Ptr x(X509_new());
  X509_set_version(x.get(), 2);
  ASN1_INTEGER_set(X509_get_serialNumber(x.get()), serial);
  X509_gmtime_adj(X509_getm_notBefore(x.get()), -3600);
  X509_gmtime_adj(X509_getm_notAfter(x.get()), 90L * 24 * 3600);
  X509_NAME* name = X509_get_subject_name(x.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
  X509_set_issuer_name(x.get(), issuer ? X509_get_subject_name(issuer) : name);
  X509_set_pubkey(x.get(), pubkey);
  X509* iss = issuer ? issuer : x.get();
  add_ext(x.get(), iss, NID_subject_key_identifier, "hash");
  add_ext(x.get(), iss, NID_authority_key_identifier, "keyid:always");
  if (ca) {
    add_ext(x.get(), iss, NID_basic_constraints, "critical,CA:TRUE");
    add_ext(x.get(), iss, NID_key_usage, "critical,keyCertSign,cRLSign");
  } else {
    add_ext(x.get(), iss, NID_basic_constraints, "critical,CA:FALSE");
    add_ext(x.get(), iss, NID_ext_key_usage, "serverAuth");
    if (!san.empty()) add_ext(x.get(), iss, NID_subject_alt_name, san.c_str());
  }
  X509_sign(x.get(), issuer_key, EVP_sha256());
  return x;
}

std::string serial_hex(X509* x) {
  BignumPtr bn(ASN1_INTEGER_to_BN(X509_get_serialNumber(x), nullptr));
  char* hex = BN_bn2hex(bn.get());
  std::string out = hex;
  OPENSSL_free(hex);
  return out;
}

acme::HttpResponse problem(int status, std::string_view type, const std::string& detail) {
  acme::HttpResponse r;
  r.status = status;
  r.headers.emplace_back("Content-Type", "application/problem+json");
  r.body = json{{"type", "urn:ietf:params:acme:error:" + std::string(type)}, {"detail", detail}, {"status", status}}.dump();
  return r;
}

acme::HttpResponse json_reply(int status, const json& body) {
  acme::HttpResponse r;
  r.status = status;
  r.headers.emplace_back("Content-Type", "application/json");
  r.body = body.dump();
  return r;
}

}  // namespace

struct FakeAcmeServer::Impl {
  std::mutex mu;
  std::set<std::string> nonces;
  int nonce_errors = 0;
  int jws_errors = 0;

  struct Account {
    json jwk;
    std::string status = "valid";
    std::vector<std::string> contact;
  };
  std::map<std::string, Account> accounts;  // url -> account

  struct Challenge {
    std::string type, token, status = "pending", authz;
  };
  struct Authz {
    std::string id_type, id_value;
    bool wildcard = false;
    std::string status = "pending";
    std::vector<std::string> challenges;
    int polls_left = -1;  // -1: not responded yet
    std::string account;
  };
  struct Order {
    std::vector<std::string> authzs;
    json identifiers;
    std::string status = "pending";
    std::string account, profile, replaces;
    int polls_left = -1;
    std::string cert;
  };
  struct Cert {
    std::string chain, alt_chain, serial, account, ari_id;
    EvpPkeyPtr pubkey;
    bool replaced = false;
  };
  std::map<std::string, Challenge> challenges;
  std::map<std::string, Authz> authzs;
  std::map<std::string, Order> orders;
  std::map<std::string, Cert> certs;  // url -> cert
  std::vector<OrderRecord> order_log;
  std::vector<std::string> revoked;
  int counter = 0;
  long serial = 1000;

  EvpPkeyPtr root_key, alt_root_key, inter_key;
  X509Ptr root, alt_root, inter, alt_inter;

  std::string next_id() { return std::to_string(++counter); }
};

FakeAcmeServer::FakeAcmeServer(Options options) : options_(std::move(options)), impl_(std::make_unique<Impl>()) {
  auto& m = *impl_;
  m.root_key = new_p256();
  m.alt_root_key = new_p256();
  m.inter_key = new_p256();
  m.root = make_cert("Fake Root A", m.root_key.get(), nullptr, m.root_key.get(), true, "", 1);
  m.alt_root = make_cert("Fake Root B", m.alt_root_key.get(), nullptr, m.alt_root_key.get(), true, "", 2);
  m.inter = make_cert("Fake Intermediate", m.inter_key.get(), m.root.get(), m.root_key.get(), true, "", 3);
  m.alt_inter = make_cert("Fake Intermediate", m.inter_key.get(), m.alt_root.get(), m.alt_root_key.get(), true, "", 4);
}

FakeAcmeServer::~FakeAcmeServer() = default;

std::vector<FakeAcmeServer::OrderRecord> FakeAcmeServer::orders() const {
  std::lock_guard lock(impl_->mu);
  return impl_->order_log;
}
std::vector<std::string> FakeAcmeServer::revoked_serials() const {
  std::lock_guard lock(impl_->mu);
  return impl_->revoked;
}
size_t FakeAcmeServer::accounts() const {
  std::lock_guard lock(impl_->mu);
  return impl_->accounts.size();
}
int FakeAcmeServer::nonce_errors() const {
  std::lock_guard lock(impl_->mu);
  return impl_->nonce_errors;
}
int FakeAcmeServer::jws_errors() const {
  std::lock_guard lock(impl_->mu);
  return impl_->jws_errors;
}
std::string FakeAcmeServer::issue_nonce() {
  std::lock_guard lock(impl_->mu);
  std::string n = random_token();
  impl_->nonces.insert(n);
  return n;
}
std::string FakeAcmeServer::root_pem() const { return to_pem(impl_->root.get()); }
std::string FakeAcmeServer::alternate_root_cn() const { return "Fake Root B"; }

acme::HttpResponse FakeAcmeServer::handle(const acme::HttpRequest& req) {
  if (intercept) {
    if (auto r = intercept(req)) return *r;
  }
  auto& m = *impl_;
  std::lock_guard lock(m.mu);
  const std::string& base = options_.base;
  auto with_nonce = [&](acme::HttpResponse r) {
    std::string n = random_token();
    m.nonces.insert(n);
    r.headers.emplace_back("Replay-Nonce", n);
    return r;
  };
  if (!req.url.starts_with(base)) return problem(404, "malformed", "unknown host");
  std::string path = req.url.substr(base.size());

  if (path == "/directory" && req.method == "GET") {
    json meta = {{"termsOfService", base + "/terms"}, {"website", base}, {"caaIdentities", {"ca.test"}},
                 {"externalAccountRequired", options_.external_account_required}};
    if (!options_.profiles.empty()) meta["profiles"] = options_.profiles;
    json dir = {{"newNonce", base + "/new-nonce"}, {"newAccount", base + "/new-account"},
                {"newOrder", base + "/new-order"}, {"revokeCert", base + "/revoke-cert"},
                {"keyChange", base + "/key-change"}, {"meta", meta}};
    if (options_.ari) dir["renewalInfo"] = base + "/renewal-info";
    return json_reply(200, dir);
  }
  if (path == "/new-nonce") {
    acme::HttpResponse r;
    r.status = req.method == "HEAD" ? 200 : 204;
    r.headers.emplace_back("Cache-Control", "no-store");
    return with_nonce(r);
  }
  if (path.starts_with("/renewal-info/") && req.method == "GET") {
    std::string id = path.substr(std::string("/renewal-info/").size());
    bool known = false;
    for (auto& [_, c] : m.certs) known |= c.ari_id == id;
    if (!known) return problem(404, "malformed", "no certificate with that identifier");
    auto r = json_reply(200, {{"suggestedWindow", {{"start", options_.renewal_window_start},
                                                   {"end", options_.renewal_window_end}}},
                              {"explanationURL", base + "/why"}});
    r.headers.emplace_back("Retry-After", std::to_string(options_.renewal_retry_after));
    return r;
  }
  if (req.method != "POST") return problem(405, "malformed", "method not allowed");

  // ---- JWS checks (RFC 8555 §6.2, §6.4, §6.5) ----
  bool jose = false;
  for (auto& [k, v] : req.headers) {
    if (strcasecmp(k.c_str(), "Content-Type") == 0 && v == "application/jose+json") jose = true;
  }
  if (!jose) return with_nonce(problem(415, "malformed", "Content-Type must be application/jose+json"));
  auto body = json::parse(req.body, nullptr, false);
  if (!body.is_object() || !body.contains("protected") || !body.contains("payload") || !body.contains("signature")) {
    ++m.jws_errors;
    return with_nonce(problem(400, "malformed", "not a flattened JWS"));
  }
  auto prot_raw = base64url_decode(body["protected"].get<std::string>());
  auto payload_raw = base64url_decode(body["payload"].get<std::string>());
  auto sig_raw = base64url_decode(body["signature"].get<std::string>());
  if (!prot_raw || !payload_raw || !sig_raw) {
    ++m.jws_errors;
    return with_nonce(problem(400, "malformed", "bad base64url"));
  }
  auto prot = json::parse(*prot_raw, nullptr, false);
  if (!prot.is_object()) {
    ++m.jws_errors;
    return with_nonce(problem(400, "malformed", "bad protected header"));
  }
  std::string nonce = prot.value("nonce", "");
  if (!m.nonces.erase(nonce)) {
    ++m.nonce_errors;
    return with_nonce(problem(400, "badNonce", "JWS has an invalid anti-replay nonce"));
  }
  if (prot.value("url", "") != req.url) {
    ++m.jws_errors;
    return with_nonce(problem(400, "unauthorized", "JWS url does not match the request URL"));
  }
  bool has_jwk = prot.contains("jwk"), has_kid = prot.contains("kid");
  if (has_jwk == has_kid) {
    ++m.jws_errors;
    return with_nonce(problem(400, "malformed", "exactly one of jwk and kid is required"));
  }
  json key_jwk;
  std::string kid;
  if (has_jwk) {
    if (path != "/new-account" && path != "/revoke-cert") {
      ++m.jws_errors;
      return with_nonce(problem(400, "malformed", "jwk is only for newAccount and revokeCert"));
    }
    key_jwk = prot["jwk"];
  } else {
    kid = prot.value("kid", "");
    auto it = m.accounts.find(kid);
    if (it == m.accounts.end()) return with_nonce(problem(400, "accountDoesNotExist", "no such account"));
    if (it->second.status != "valid") return with_nonce(problem(403, "unauthorized", "account is " + it->second.status));
    key_jwk = it->second.jwk;
  }
  auto pkey = jwk_to_pkey(key_jwk);
  std::string input = body["protected"].get<std::string>() + "." + body["payload"].get<std::string>();
  if (!pkey || !verify_jws_signature(prot.value("alg", ""), pkey.get(), input, *sig_raw)) {
    ++m.jws_errors;
    return with_nonce(problem(400, "malformed", "JWS signature does not verify"));
  }
  const bool post_as_get = payload_raw->empty();
  json payload = post_as_get ? json::object() : json::parse(*payload_raw, nullptr, false);
  if (!payload.is_object()) return with_nonce(problem(400, "malformed", "payload is not a JSON object"));

  auto account_json = [&](const Impl::Account& a) {
    return json{{"status", a.status}, {"contact", a.contact}, {"orders", kid + "/orders"}};
  };
  auto authz_json = [&](const std::string& url) {
    auto& a = m.authzs[url];
    json chs = json::array();
    for (auto& cu : a.challenges) {
      auto& c = m.challenges[cu];
      json cj = {{"type", c.type}, {"url", cu}, {"status", c.status}, {"token", c.token}};
      if (c.status == "invalid") {
        cj["error"] = {{"type", "urn:ietf:params:acme:error:incorrectResponse"}, {"detail", "fake validation failed"}};
      }
      chs.push_back(cj);
    }
    json j = {{"status", a.status}, {"identifier", {{"type", a.id_type}, {"value", a.id_value}}},
              {"challenges", chs}, {"expires", "2030-01-01T00:00:00Z"}};
    if (a.wildcard) j["wildcard"] = true;
    return j;
  };
  auto order_json = [&](const std::string& url) {
    auto& o = m.orders[url];
    std::string id = url.substr(url.rfind('/') + 1);
    json j = {{"status", o.status}, {"identifiers", o.identifiers}, {"authorizations", o.authzs},
              {"finalize", base + "/finalize/" + id}, {"expires", "2030-01-01T00:00:00Z"}};
    if (!o.cert.empty()) j["certificate"] = o.cert;
    if (!o.profile.empty()) j["profile"] = o.profile;
    if (!o.replaces.empty()) j["replaces"] = o.replaces;
    return j;
  };
  auto maybe_retry_after = [&](acme::HttpResponse r) {
    if (options_.poll_retry_after) r.headers.emplace_back("Retry-After", std::to_string(*options_.poll_retry_after));
    return r;
  };

  if (path == "/new-account") {
    for (auto& [url, a] : m.accounts) {
      if (a.jwk == key_jwk) {
        auto r = json_reply(200, account_json(a));
        r.headers.emplace_back("Location", url);
        return with_nonce(r);
      }
    }
    if (payload.value("onlyReturnExisting", false)) {
      return with_nonce(problem(400, "accountDoesNotExist", "no account for this key"));
    }
    if (options_.external_account_required) {
      auto eab = payload.find("externalAccountBinding");
      if (eab == payload.end()) return with_nonce(problem(400, "externalAccountRequired", "EAB required"));
      auto eprot = json::parse(base64url_decode((*eab)["protected"].get<std::string>()).value_or(""), nullptr, false);
      auto epayload = json::parse(base64url_decode((*eab)["payload"].get<std::string>()).value_or(""), nullptr, false);
      auto esig = base64url_decode((*eab)["signature"].get<std::string>()).value_or("");
      auto key = base64url_decode(options_.eab_hmac_b64url).value_or("");
      std::string ein = (*eab)["protected"].get<std::string>() + "." + (*eab)["payload"].get<std::string>();
      unsigned char mac[EVP_MAX_MD_SIZE];
      unsigned int mac_len = 0;
      HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), reinterpret_cast<const unsigned char*>(ein.data()),
           ein.size(), mac, &mac_len);
      if (!eprot.is_object() || eprot.value("alg", "") != "HS256" || eprot.value("kid", "") != options_.eab_kid ||
          eprot.value("url", "") != req.url || epayload != key_jwk ||
          esig != std::string(reinterpret_cast<char*>(mac), mac_len)) {
        return with_nonce(problem(403, "unauthorized", "external account binding does not verify"));
      }
    }
    if (!payload.value("termsOfServiceAgreed", false)) {
      return with_nonce(problem(403, "userActionRequired", "you must agree to the terms of service"));
    }
    std::string url = base + "/acct/" + m.next_id();
    Impl::Account a;
    a.jwk = key_jwk;
    if (payload.contains("contact")) a.contact = payload["contact"].get<std::vector<std::string>>();
    m.accounts[url] = a;
    auto r = json_reply(201, account_json(a));
    r.headers.emplace_back("Location", url);
    return with_nonce(r);
  }
  if (path.starts_with("/acct/")) {
    if (kid != req.url) return with_nonce(problem(403, "unauthorized", "not your account"));
    auto& a = m.accounts[kid];
    if (payload.contains("contact")) a.contact = payload["contact"].get<std::vector<std::string>>();
    if (payload.value("status", "") == "deactivated") a.status = "deactivated";
    return with_nonce(json_reply(200, account_json(a)));
  }
  if (path == "/key-change") {
    auto inner = payload;
    auto iprot = json::parse(base64url_decode(inner.value("protected", "")).value_or(""), nullptr, false);
    auto ipay = json::parse(base64url_decode(inner.value("payload", "")).value_or(""), nullptr, false);
    auto isig = base64url_decode(inner.value("signature", "")).value_or("");
    if (!iprot.is_object() || !ipay.is_object() || iprot.contains("nonce") || iprot.value("url", "") != req.url) {
      return with_nonce(problem(400, "malformed", "bad inner JWS header"));
    }
    auto new_key = jwk_to_pkey(iprot["jwk"]);
    std::string iin = inner.value("protected", "") + "." + inner.value("payload", "");
    if (!new_key || !verify_jws_signature(iprot.value("alg", ""), new_key.get(), iin, isig)) {
      return with_nonce(problem(400, "malformed", "inner JWS signature does not verify"));
    }
    if (ipay.value("account", "") != kid || ipay["oldKey"] != m.accounts[kid].jwk) {
      return with_nonce(problem(400, "malformed", "inner payload does not match"));
    }
    m.accounts[kid].jwk = iprot["jwk"];
    return with_nonce(json_reply(200, account_json(m.accounts[kid])));
  }
  if (path == "/new-order") {
    m.order_log.push_back({payload, ""});
    if (!payload.contains("identifiers") || !payload["identifiers"].is_array() || payload["identifiers"].empty()) {
      return with_nonce(problem(400, "malformed", "no identifiers"));
    }
    std::string profile = payload.value("profile", "");
    if (!profile.empty() && !options_.profiles.count(profile)) {
      return with_nonce(problem(400, "invalidProfile", "unknown profile " + profile));
    }
    std::string replaces = payload.value("replaces", "");
    if (!replaces.empty()) {
      Impl::Cert* old = nullptr;
      for (auto& [_, c] : m.certs) {
        if (c.ari_id == replaces) old = &c;
      }
      if (!old) return with_nonce(problem(404, "malformed", "replaces names no known certificate"));
      if (old->account != kid) {
        return with_nonce(problem(403, "unauthorized", "the certificate being replaced was not issued to this account"));
      }
      if (old->replaced) return with_nonce(problem(409, "alreadyReplaced", "certificate already replaced"));
    }
    std::string oid = m.next_id();
    std::string ourl = base + "/order/" + oid;
    Impl::Order o;
    o.identifiers = payload["identifiers"];
    o.account = kid;
    o.profile = profile;
    o.replaces = replaces;
    for (auto& id : o.identifiers) {
      std::string value = id.value("value", "");
      std::string type = id.value("type", "");
      Impl::Authz a;
      a.id_type = type;
      a.account = kid;
      if (value.starts_with("*.")) {
        a.wildcard = true;
        value = value.substr(2);
      }
      a.id_value = value;
      std::string aurl = base + "/authz/" + m.next_id();
      std::vector<std::string> types = a.wildcard ? std::vector<std::string>{"dns-01"}
                                       : type == "ip" ? std::vector<std::string>{"http-01", "tls-alpn-01"}
                                                      : std::vector<std::string>{"http-01", "dns-01", "tls-alpn-01"};
      for (auto& t : types) {
        std::string curl = base + "/chall/" + m.next_id();
        m.challenges[curl] = {t, random_token(), "pending", aurl};
        a.challenges.push_back(curl);
      }
      m.authzs[aurl] = a;
      o.authzs.push_back(aurl);
    }
    m.orders[ourl] = o;
    m.order_log.back().url = ourl;
    auto r = json_reply(201, order_json(ourl));
    r.headers.emplace_back("Location", ourl);
    return with_nonce(r);
  }
  // update_order works a pending order's status out from its authorizations.
  auto update_order = [&](auto& o) {
    if (o.status != "pending") return;
    bool all_valid = true, any_invalid = false;
    for (auto& au : o.authzs) {
      all_valid &= m.authzs[au].status == "valid";
      any_invalid |= m.authzs[au].status == "invalid";
    }
    if (any_invalid) o.status = "invalid";
    else if (all_valid) o.status = "ready";
  };
  if (path.starts_with("/order/")) {
    auto it = m.orders.find(req.url);
    if (it == m.orders.end()) return with_nonce(problem(404, "malformed", "no such order"));
    auto& o = it->second;
    update_order(o);
    if (o.status == "processing" && --o.polls_left <= 0) o.status = "valid";
    auto r = json_reply(200, order_json(req.url));
    if (o.status == "processing" || o.status == "pending") r = maybe_retry_after(r);
    return with_nonce(r);
  }
  if (path.starts_with("/authz/")) {
    auto it = m.authzs.find(req.url);
    if (it == m.authzs.end()) return with_nonce(problem(404, "malformed", "no such authorization"));
    auto& a = it->second;
    if (payload.value("status", "") == "deactivated") {
      a.status = "deactivated";
      return with_nonce(json_reply(200, authz_json(req.url)));
    }
    if (a.status == "pending" && a.polls_left >= 0) {
      if (a.polls_left-- <= 0) {
        bool failing = options_.failing_identifiers.count(a.id_value) > 0;
        a.status = failing ? "invalid" : "valid";
        for (auto& cu : a.challenges) {
          if (m.challenges[cu].status == "processing") m.challenges[cu].status = a.status;
        }
      }
    }
    auto r = json_reply(200, authz_json(req.url));
    if (a.status == "pending") r = maybe_retry_after(r);
    return with_nonce(r);
  }
  if (path.starts_with("/chall/")) {
    auto it = m.challenges.find(req.url);
    if (it == m.challenges.end()) return with_nonce(problem(404, "malformed", "no such challenge"));
    auto& c = it->second;
    if (!post_as_get && c.status == "pending") {
      c.status = "processing";
      m.authzs[c.authz].polls_left = options_.authz_pending_polls;
    }
    return with_nonce(json_reply(200, {{"type", c.type}, {"url", req.url}, {"status", c.status}, {"token", c.token}}));
  }
  if (path.starts_with("/finalize/")) {
    std::string ourl = base + "/order/" + path.substr(std::string("/finalize/").size());
    auto it = m.orders.find(ourl);
    if (it == m.orders.end()) return with_nonce(problem(404, "malformed", "no such order"));
    auto& o = it->second;
    if (options_.order_ready_at_finalize) update_order(o);
    if (o.status != "ready") return with_nonce(problem(403, "orderNotReady", "order is " + o.status));
    auto der = base64url_decode(payload.value("csr", ""));
    if (!der) return with_nonce(problem(400, "badCSR", "csr is not base64url"));
    const unsigned char* p = reinterpret_cast<const unsigned char*>(der->data());
    X509ReqPtr csr(d2i_X509_REQ(nullptr, &p, static_cast<long>(der->size())));
    if (!csr) return with_nonce(problem(400, "badCSR", "csr does not parse"));
    EvpPkeyPtr csr_key(X509_REQ_get_pubkey(csr.get()));
    if (!csr_key || X509_REQ_verify(csr.get(), csr_key.get()) != 1) {
      drain_errors();
      return with_nonce(problem(400, "badCSR", "csr signature does not verify"));
    }
    // The CSR's SANs must be exactly the order's identifiers.
    std::set<std::string> want, got;
    for (auto& id : o.identifiers) want.insert(id.value("value", ""));
    std::string san;
    STACK_OF(X509_EXTENSION)* exts = X509_REQ_get_extensions(csr.get());
    GeneralNamesPtr names(exts ? static_cast<GENERAL_NAMES*>(X509V3_get_d2i(exts, NID_subject_alt_name, nullptr, nullptr)) : nullptr);
    if (exts) sk_X509_EXTENSION_pop_free(exts, X509_EXTENSION_free);
    for (int i = 0; names && i < sk_GENERAL_NAME_num(names.get()); ++i) {
      GENERAL_NAME* gn = sk_GENERAL_NAME_value(names.get(), i);
      if (gn->type == GEN_DNS) {
        std::string v(reinterpret_cast<const char*>(ASN1_STRING_get0_data(gn->d.dNSName)), ASN1_STRING_length(gn->d.dNSName));
        got.insert(v);
        san += (san.empty() ? "" : ",") + std::string("DNS:") + v;
      } else if (gn->type == GEN_IPADD) {
        const unsigned char* b = ASN1_STRING_get0_data(gn->d.iPAddress);
        int len = ASN1_STRING_length(gn->d.iPAddress);
        char buf[64] = {0};
        inet_ntop(len == 4 ? AF_INET : AF_INET6, b, buf, sizeof buf);
        got.insert(buf);
        san += (san.empty() ? "" : ",") + std::string("IP:") + buf;
      }
    }
    if (want != got) return with_nonce(problem(400, "badCSR", "CSR names do not match the order"));
    X509Ptr leaf = make_cert(*got.begin(), csr_key.get(), m.inter.get(), m.inter_key.get(), false, san, ++m.serial);
    X509Ptr alt_leaf = ossl::up_ref(leaf.get());
    Impl::Cert c;
    c.chain = to_pem(leaf.get()) + to_pem(m.inter.get());
    c.alt_chain = to_pem(leaf.get()) + to_pem(m.alt_inter.get());
    c.serial = serial_hex(leaf.get());
    c.account = kid;
    c.ari_id = acme::ari_cert_id(to_der(leaf.get())).value_or("");
    c.pubkey = std::move(csr_key);
    std::string curl = base + "/cert/" + m.next_id();
    if (!o.replaces.empty()) {
      for (auto& [_, old] : m.certs) {
        if (old.ari_id == o.replaces) old.replaced = true;
      }
    }
    m.certs[curl] = std::move(c);
    o.cert = curl;
    o.status = options_.order_processing_polls > 0 ? "processing" : "valid";
    o.polls_left = options_.order_processing_polls;
    return with_nonce(maybe_retry_after(json_reply(200, order_json(ourl))));
  }
  if (path.starts_with("/cert/")) {
    bool alt = path.ends_with("/alt");
    std::string curl = alt ? req.url.substr(0, req.url.size() - 4) : req.url;
    auto it = m.certs.find(curl);
    if (it == m.certs.end()) return with_nonce(problem(404, "malformed", "no such certificate"));
    acme::HttpResponse r;
    r.status = 200;
    r.headers.emplace_back("Content-Type", "application/pem-certificate-chain");
    r.body = alt ? it->second.alt_chain : it->second.chain;
    if (!alt && options_.alternate_chain) r.headers.emplace_back("Link", "<" + curl + "/alt>;rel=\"alternate\"");
    return with_nonce(r);
  }
  if (path == "/revoke-cert") {
    auto der = base64url_decode(payload.value("certificate", ""));
    if (!der) return with_nonce(problem(400, "malformed", "bad certificate"));
    const unsigned char* p = reinterpret_cast<const unsigned char*>(der->data());
    X509Ptr x(d2i_X509(nullptr, &p, static_cast<long>(der->size())));
    if (!x) return with_nonce(problem(400, "malformed", "certificate does not parse"));
    std::string serial = serial_hex(x.get());
    Impl::Cert* cert = nullptr;
    for (auto& [_, c] : m.certs) {
      if (c.serial == serial) cert = &c;
    }
    if (!cert) return with_nonce(problem(404, "malformed", "unknown certificate"));
    bool allowed = has_kid ? cert->account == kid : EVP_PKEY_eq(cert->pubkey.get(), pkey.get()) == 1;
    if (!allowed) return with_nonce(problem(403, "unauthorized", "not authorized to revoke"));
    int reason = payload.value("reason", 0);
    if (reason == 2 || reason < 0 || reason > 10) return with_nonce(problem(400, "badRevocationReason", "bad reason"));
    for (auto& s : m.revoked) {
      if (s == serial) return with_nonce(problem(400, "alreadyRevoked", "certificate already revoked"));
    }
    m.revoked.push_back(serial);
    acme::HttpResponse r;
    r.status = 200;
    return with_nonce(r);
  }
  return with_nonce(problem(404, "malformed", "no such resource: " + path));
}

acme::HttpResponse problem_reply(FakeAcmeServer& ca, int status, const std::string& type, acme::HttpHeaders extra) {
  acme::HttpResponse r;
  r.status = status;
  r.headers = std::move(extra);
  r.headers.emplace_back("Content-Type", "application/problem+json");
  r.headers.emplace_back("Replay-Nonce", ca.issue_nonce());
  r.body = nlohmann::json{{"type", "urn:ietf:params:acme:error:" + type}, {"detail", "injected"}}.dump();
  return r;
}

}  // namespace autotls::testing
