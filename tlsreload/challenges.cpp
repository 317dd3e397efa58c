#include "tlsreload/challenges.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>
#include <vector>

#include "acme/challenge.h"

extern char** environ;

namespace autotls::tlsreload {

namespace {

// sni_key lower-cases and drops a trailing dot, as CertStore does for SNI (RFC 4343).
std::string sni_key(std::string_view sni) {
  if (sni.ends_with('.')) sni.remove_suffix(1);
  std::string out(sni);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}

std::string exit_description(int status) {
  if (WIFEXITED(status)) return "exit status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return "killed by signal " + std::to_string(WTERMSIG(status));
  return "wait status " + std::to_string(status);
}

}  // namespace

void ChallengeStore::put_http01(std::string token, std::string key_authorization) {
  std::lock_guard lock(mu_);
  http01_fetched_.erase(token);
  http01_[std::move(token)] = std::move(key_authorization);
}

void ChallengeStore::remove_http01(std::string_view token) {
  std::lock_guard lock(mu_);
  http01_.erase(std::string(token));
  http01_fetched_.erase(std::string(token));
}

std::optional<std::string> ChallengeStore::http01(std::string_view token) const {
  std::lock_guard lock(mu_);
  auto it = http01_.find(std::string(token));
  if (it == http01_.end()) return std::nullopt;
  http01_fetched_[it->first] = std::chrono::steady_clock::now();
  fetched_cv_.notify_all();
  return it->second;
}

bool ChallengeStore::wait_http01_fetched(std::string_view token, std::chrono::milliseconds timeout,
                                         std::chrono::milliseconds quiet) const {
  using clock = std::chrono::steady_clock;
  std::unique_lock lock(mu_);
  const std::string key(token);
  const auto deadline = clock::now() + timeout;
  for (;;) {
    const auto now = clock::now();
    auto it = http01_fetched_.find(key);
    if (it == http01_fetched_.end()) {
      if (now >= deadline) return false;
      fetched_cv_.wait_until(lock, deadline);
      continue;
    }
    // Fetched: wait until the latest lookup is quiet old (a later lookup moves it on).
    const auto settled = it->second + quiet;
    if (now >= settled || now >= deadline) return true;
    fetched_cv_.wait_until(lock, std::min(settled, deadline));
  }
}

Status ChallengeStore::put_tls_alpn(const acme::Identifier& identifier, std::string_view key_authorization) {
  auto sni = acme::tls_alpn01_sni(identifier);
  if (!sni) return fail(sni.error());
  auto made = acme::tls_alpn01_certificate(identifier, key_authorization);
  if (!made) return fail(made.error());
  // Built and validated here, off the handshake path, so the acme-tls/1 hook only looks up.
  auto cert = Certificate::from_pem(made->cert_pem, made->key_pem);
  if (!cert) return fail(cert.error().with_context("tls-alpn-01 certificate"));
  std::lock_guard lock(mu_);
  tls_alpn_[sni_key(*sni)] = std::move(*cert);
  return {};
}

void ChallengeStore::remove_tls_alpn(const acme::Identifier& identifier) {
  auto sni = acme::tls_alpn01_sni(identifier);
  if (!sni) return;
  std::lock_guard lock(mu_);
  tls_alpn_.erase(sni_key(*sni));
}

std::shared_ptr<const Certificate> ChallengeStore::tls_alpn(std::string_view sni) const {
  std::string key = sni_key(sni);
  std::lock_guard lock(mu_);
  auto it = tls_alpn_.find(key);
  return it == tls_alpn_.end() ? nullptr : it->second;
}

size_t ChallengeStore::size() const {
  std::lock_guard lock(mu_);
  return http01_.size() + tls_alpn_.size();
}

Status ChallengeSolver::present(const acme::Identifier& identifier, const acme::Challenge& challenge,
                                std::string_view key_authorization) {
  if (challenge.type == "http-01") {
    // RFC 8555 §8.3: the resource at /.well-known/acme-challenge/<token> holds the key
    // authorization.
    store_->put_http01(challenge.token, std::string(key_authorization));
    return {};
  }
  if (challenge.type == "tls-alpn-01") return store_->put_tls_alpn(identifier, key_authorization);
  if (challenge.type == "dns-01") {
    if (dns_hook_.empty()) return fail(Errc::invalid_input, "dns-01: no DNS hook configured");
    // RFC 8555 §8.4: a TXT record at _acme-challenge.<domain> holding
    // base64url(SHA-256(key authorization)).
    return run_dns_hook(dns_hook_, "add", acme::dns01_record_name(identifier.value),
                        acme::dns01_txt_value(key_authorization), hook_timeout_);
  }
  return fail(Errc::invalid_input, "unsupported challenge type " + challenge.type);
}

void ChallengeSolver::cleanup(const acme::Identifier& identifier, const acme::Challenge& challenge,
                              std::string_view key_authorization) {
  if (challenge.type == "http-01") {
    store_->remove_http01(challenge.token);
  } else if (challenge.type == "tls-alpn-01") {
    store_->remove_tls_alpn(identifier);
  } else if (challenge.type == "dns-01" && !dns_hook_.empty()) {
    // Best effort: a record left behind is harmless to the next validation, which adds its own.
    (void)run_dns_hook(dns_hook_, "del", acme::dns01_record_name(identifier.value),
                       acme::dns01_txt_value(key_authorization), hook_timeout_);
  }
}

bool ChallengeSolver::await_fetch(const acme::Identifier&, const acme::Challenge& challenge,
                                  std::chrono::milliseconds timeout, std::chrono::milliseconds quiet) {
  return challenge.type == "http-01" && store_->wait_http01_fetched(challenge.token, timeout, quiet);
}

Status run_dns_hook(const std::string& hook, std::string_view action, std::string_view record_name,
                    std::string_view value, std::chrono::milliseconds timeout) {
  std::string op = "dns hook " + std::string(action) + " " + std::string(record_name);
  std::vector<std::string> args{hook, std::string(action), std::string(record_name), std::string(value)};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);

  // The hook gets no stdin (it must not wait for input); stdout and stderr are inherited so
  // its messages reach the operator's log.
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  // The hook starts with no signal blocked and default dispositions: a server that takes its
  // signals with sigwait blocks them in every thread, and a child would inherit that mask.
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &all);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  pid_t pid = -1;
  // posix_spawn, not system(): the arguments never pass through a shell, so a record value can
  // never be interpreted as shell syntax.
  int rc = ::posix_spawn(&pid, hook.c_str(), &actions, &attr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) return fail(Errc::io, op + ": cannot run " + hook + ": " + std::strerror(rc));

  // The wait is bounded in real time (it is a real process): a hung hook must not hold up an
  // issuance, or a shutdown, forever.
  auto deadline = std::chrono::steady_clock::now() + timeout;
  auto pause = std::chrono::milliseconds(2);
  for (;;) {
    int status = 0;
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) {
      if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return {};
      return fail(Errc::io, op + ": " + hook + " failed with " + exit_description(status));
    }
    if (r < 0 && errno != EINTR) return fail(Errc::io, op + ": waitpid: " + std::strerror(errno));
    if (std::chrono::steady_clock::now() >= deadline) {
      ::kill(pid, SIGKILL);
      while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
      return fail(Errc::timeout, op + ": " + hook + " did not finish within " +
                                     std::to_string(timeout.count()) + " ms and was killed");
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::milliseconds(50));
  }
}

}  // namespace autotls::tlsreload
