#include "tests/support/test_solver.h"

#include "acme/challenge.h"

namespace autotls::testing {

Status PebbleSolver::present(const acme::Identifier& identifier, const acme::Challenge& challenge,
                             std::string_view key_authorization) {
  std::lock_guard lock(mu_);
  ++presented_;
  std::string ka(key_authorization);
  if (challenge.type == "http-01") {
    if (!http_) {
      auto r = Http01Responder::start(env_.http_port());
      if (!r) return tl::unexpected(r.error());
      http_ = std::move(*r);
    }
    http_->set(challenge.token, ka);
    return {};
  }
  if (challenge.type == "tls-alpn-01") {
    if (!tls_) {
      auto r = TlsAlpnResponder::start(env_.tls_port());
      if (!r) return tl::unexpected(r.error());
      tls_ = std::move(*r);
    }
    auto cert = acme::tls_alpn01_certificate(identifier, ka);
    if (!cert) return tl::unexpected(cert.error());
    auto sni = acme::tls_alpn01_sni(identifier);
    if (!sni) return tl::unexpected(sni.error());
    return tls_->set(*sni, cert->cert_pem, cert->key_pem);
  }
  if (challenge.type == "dns-01") {
    return env_.set_txt(acme::dns01_record_name(identifier.value), acme::dns01_txt_value(ka));
  }
  return tl::unexpected(Error(Errc::invalid_input, "PebbleSolver: unsupported " + challenge.type));
}

void PebbleSolver::cleanup(const acme::Identifier& identifier, const acme::Challenge& challenge,
                           std::string_view) {
  std::lock_guard lock(mu_);
  ++cleaned_;
  if (challenge.type == "http-01" && http_) http_->remove(challenge.token);
  if (challenge.type == "tls-alpn-01" && tls_) {
    if (auto sni = acme::tls_alpn01_sni(identifier)) tls_->remove(*sni);
  }
  if (challenge.type == "dns-01") (void)env_.clear_txt(acme::dns01_record_name(identifier.value));
}

int PebbleSolver::presented() const {
  std::lock_guard lock(mu_);
  return presented_;
}
int PebbleSolver::cleaned() const {
  std::lock_guard lock(mu_);
  return cleaned_;
}

}  // namespace autotls::testing
