#pragma once

// Issuers: the certificate authorities a Manager may ask, in order, and the rule for when a
// failure at one of them moves on to the next.

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "acme/client.h"
#include "acme/key.h"
#include "acme/transport.h"
#include "acme/util/error.h"

namespace autotls::tlsreload {

// IssuerConfig is one CA of ManagerOptions::issuers. Empty fields take the ManagerOptions
// value of the same name (email, ca_bundle, eab, profile, preferred_chain, key_type, transport).
struct IssuerConfig {
  // name labels the issuer in logs, events and meta.json ("letsencrypt", "zerossl",
  // "internal"); empty: the directory URL.
  std::string name;
  // internal selects the local CA (tlsreload/internal_ca.h) instead of an ACME directory.
  bool internal = false;
  std::string directory_url;  // the CA's ACME directory (unused when internal)
  std::string ca_bundle;      // PEM roots for the CA's HTTPS
  std::string email;
  std::optional<acme::ExternalAccountBinding> eab;
  std::string profile;
  std::string preferred_chain;
  std::optional<acme::KeyType> key_type;
  std::shared_ptr<acme::HttpTransport> transport;  // tests inject a fake CA here

  // label is name, or the directory URL, or "internal".
  std::string label() const;
  // account_id is what accounts and meta.json record for this issuer: the directory URL, or
  // "internal" for the local CA.
  std::string account_id() const;
};

// kInternalIssuer is the directory_url / --ca value naming the internal CA.
inline constexpr std::string_view kInternalIssuer = "internal";

// falls_through reports whether an issuance that failed with e at one issuer should be tried
// at the next one. Yes for what is the CA's own doing or reach: transport failures and
// timeouts, HTTP 5xx, an answer we cannot parse, rateLimited, an order that went invalid
// (the CA gave up on it), a refusal of the account or of an identifier by that CA's policy
// (rejectedIdentifier, caa: another CA may be allowed by the domain's CAA records, and that
// CA checks CAA itself). No for what would fail the same way everywhere or must stop now:
// cancellation (shutdown), local errors (storage, keys: Errc::io, crypto), a bad request
// from us (Errc::invalid_input), and failed challenge validation (the name does not point at
// us, or the DNS hook is broken: another CA would fail the same way and count it against our
// failed-validation limits there too).
bool falls_through(const Error& e);

}  // namespace autotls::tlsreload
