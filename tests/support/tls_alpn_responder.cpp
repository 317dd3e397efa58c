#include "tests/support/tls_alpn_responder.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstring>
#include <mutex>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/tls1.h>

#include "acme/util/openssl.h"

namespace autotls::testing {

namespace {

constexpr unsigned char kAcmeTls1[] = "acme-tls/1";
constexpr size_t kAcmeTls1Len = sizeof kAcmeTls1 - 1;

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

struct Entry {
  ossl::X509Ptr cert;
  ossl::EvpPkeyPtr key;
};

}  // namespace

struct TlsAlpnResponder::Impl {
  std::mutex mu;
  std::map<std::string, std::shared_ptr<const Entry>> certs;
  ossl::SslCtxPtr ctx;

  std::shared_ptr<const Entry> find(const std::string& name) {
    std::lock_guard lock(mu);
    auto it = certs.find(lower(name));
    return it == certs.end() ? nullptr : it->second;
  }

  // RFC 8737 §3: the certificate is chosen by SNI, and "acme-tls/1" must be the negotiated
  // protocol. The servername callback runs before certificate selection, so the SSL object
  // can still be given its certificate here.
  static int on_servername(SSL* ssl, int* alert, void* arg) {
    auto* self = static_cast<Impl*>(arg);
    const char* name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    if (name == nullptr) {
      *alert = SSL_AD_UNRECOGNIZED_NAME;
      return SSL_TLSEXT_ERR_ALERT_FATAL;
    }
    auto entry = self->find(name);
    if (!entry || SSL_use_certificate(ssl, entry->cert.get()) != 1 ||
        SSL_use_PrivateKey(ssl, entry->key.get()) != 1) {
      *alert = SSL_AD_UNRECOGNIZED_NAME;
      return SSL_TLSEXT_ERR_ALERT_FATAL;
    }
    return SSL_TLSEXT_ERR_OK;
  }

  static int on_alpn(SSL*, const unsigned char** out, unsigned char* outlen, const unsigned char* in,
                     unsigned int inlen, void*) {
    // in is a list of length-prefixed protocol names.
    for (unsigned int i = 0; i < inlen;) {
      unsigned int len = in[i];
      if (i + 1 + len > inlen) break;
      if (len == kAcmeTls1Len && std::memcmp(in + i + 1, kAcmeTls1, len) == 0) {
        *out = in + i + 1;
        *outlen = static_cast<unsigned char>(len);
        return SSL_TLSEXT_ERR_OK;
      }
      i += 1 + len;
    }
    return SSL_TLSEXT_ERR_ALERT_FATAL;  // no_application_protocol
  }
};

TlsAlpnResponder::TlsAlpnResponder() : impl_(std::make_unique<Impl>()) {}

Result<std::unique_ptr<TlsAlpnResponder>> TlsAlpnResponder::start(int port) {
  // OpenSSL writes to the socket with write(2): a peer that hung up would raise SIGPIPE and
  // kill the whole test binary.
  static std::once_flag ignore_sigpipe;
  std::call_once(ignore_sigpipe, [] { ::signal(SIGPIPE, SIG_IGN); });
  std::unique_ptr<TlsAlpnResponder> r(new TlsAlpnResponder());
  r->impl_->ctx.reset(SSL_CTX_new(TLS_server_method()));
  SSL_CTX* ctx = r->impl_->ctx.get();
  if (ctx == nullptr) return fail(ossl::error("TlsAlpnResponder: SSL_CTX_new"));
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  SSL_CTX_set_tlsext_servername_callback(ctx, &Impl::on_servername);
  SSL_CTX_set_tlsext_servername_arg(ctx, r->impl_.get());
  SSL_CTX_set_alpn_select_cb(ctx, &Impl::on_alpn, nullptr);

  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return fail(Errc::io, std::string("TlsAlpnResponder: socket: ") + std::strerror(errno));
  r->listen_fd_ = fd;
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(fd, 64) != 0) {
    return fail(Errc::io, "TlsAlpnResponder: bind 127.0.0.1:" + std::to_string(port) + ": " +
                              std::strerror(errno));
  }
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  r->port_ = ntohs(a.sin_port);
  TlsAlpnResponder* self = r.get();
  r->thread_ = std::thread([self] { self->run(); });
  return r;
}

TlsAlpnResponder::~TlsAlpnResponder() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
  if (listen_fd_ >= 0) ::close(listen_fd_);
}

Status TlsAlpnResponder::set(const std::string& server_name, const std::string& cert_pem,
                             const std::string& key_pem) {
  auto entry = std::make_shared<Entry>();
  ossl::BioPtr cbio(BIO_new_mem_buf(cert_pem.data(), static_cast<int>(cert_pem.size())));
  entry->cert.reset(PEM_read_bio_X509(cbio.get(), nullptr, nullptr, nullptr));
  if (!entry->cert) return fail(ossl::error("TlsAlpnResponder: certificate PEM"));
  ossl::BioPtr kbio(BIO_new_mem_buf(key_pem.data(), static_cast<int>(key_pem.size())));
  entry->key.reset(PEM_read_bio_PrivateKey(kbio.get(), nullptr, nullptr, nullptr));
  if (!entry->key) return fail(ossl::error("TlsAlpnResponder: key PEM"));
  if (X509_check_private_key(entry->cert.get(), entry->key.get()) != 1) {
    return fail(ossl::error("TlsAlpnResponder: key does not match certificate"));
  }
  std::lock_guard lock(impl_->mu);
  impl_->certs[lower(server_name)] = std::move(entry);
  return {};
}

void TlsAlpnResponder::remove(const std::string& server_name) {
  std::lock_guard lock(impl_->mu);
  impl_->certs.erase(lower(server_name));
}

void TlsAlpnResponder::run() {
  while (!stop_) {
    pollfd p{listen_fd_, POLLIN, 0};
    // A short poll bounds how long the destructor waits for this loop.
    int n = ::poll(&p, 1, 100);
    if (n <= 0) continue;
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    timeval tv{5, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    ossl::SslPtr ssl(SSL_new(impl_->ctx.get()));
    bool ok = false;
    if (ssl && SSL_set_fd(ssl.get(), fd) == 1 && SSL_accept(ssl.get()) == 1) {
      const unsigned char* proto = nullptr;
      unsigned int proto_len = 0;
      SSL_get0_alpn_selected(ssl.get(), &proto, &proto_len);
      ok = proto_len == kAcmeTls1Len && std::memcmp(proto, kAcmeTls1, kAcmeTls1Len) == 0;
      SSL_shutdown(ssl.get());
    }
    // Errors belong to this connection only; leave no stale entries for the next one.
    ERR_clear_error();
    ++(ok ? handshakes_ : failures_);
    ssl.reset();
    ::close(fd);
  }
}

}  // namespace autotls::testing
