// CurlTransport: the production HttpTransport over libcurl's easy interface. This is the only
// file in the project that includes <curl/curl.h> (STYLE.md §1, after uacme's curlwrap.c).

#include "acme/transport.h"

#include <array>
#include <cstddef>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <curl/curl.h>

namespace autotls::acme {

namespace {

// Idle easy handles kept for reuse. Each keeps its own live connections; a manager issuing
// with 16 workers would otherwise close and re-open TLS connections (measured by
// tools/bench/run issuance), so keep enough for that. Extra handles are cleaned up.
constexpr size_t kMaxIdleHandles = 32;

void global_init_once() {
  static std::once_flag once;
  // curl_global_init is not thread-safe before 7.84 and must run before any other curl call.
  // It is never paired with curl_global_cleanup: other code in the process may still use curl.
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r' || s.back() == '\n')) {
    s.remove_suffix(1);
  }
  return s;
}

// Transfer is the per-request state the C callbacks write into. Callbacks never throw: an
// allocation failure would crash anyway, and nothing else in them can fail.
struct Transfer {
  size_t max_body = 0;
  bool body_too_large = false;
  HttpHeaders headers;
  std::string body;
};

size_t on_body(char* data, size_t size, size_t nmemb, void* user) {
  auto* t = static_cast<Transfer*>(user);
  const size_t n = size * nmemb;
  if (t->body.size() + n > t->max_body) {
    t->body_too_large = true;
    return 0;  // anything but n makes curl abort with CURLE_WRITE_ERROR
  }
  t->body.append(data, n);
  return n;
}

size_t on_header(char* data, size_t size, size_t nmemb, void* user) {
  auto* t = static_cast<Transfer*>(user);
  const size_t n = size * nmemb;
  std::string_view line(data, n);
  if (line.starts_with("HTTP/")) {
    // curl also reports the headers of 1xx and redirect responses; only the final response's
    // headers belong in the result, and each response starts with its status line.
    t->headers.clear();
    return n;
  }
  if (!line.empty() && (line.front() == ' ' || line.front() == '\t')) {
    // RFC 9112 §5.2 obsolete line folding: the line continues the previous field's value.
    if (!t->headers.empty()) {
      auto rest = trim(line);
      if (!rest.empty()) {
        auto& value = t->headers.back().second;
        if (!value.empty()) value += ' ';
        value += rest;
      }
    }
    return n;
  }
  auto colon = line.find(':');
  if (colon == std::string_view::npos) return n;  // the blank line that ends the headers
  auto name = trim(line.substr(0, colon));
  if (name.empty()) return n;
  t->headers.emplace_back(std::string(name), std::string(trim(line.substr(colon + 1))));
  return n;
}

class CurlTransport final : public HttpTransport {
 public:
  explicit CurlTransport(CurlOptions options) : options_(std::move(options)) {
    global_init_once();
    if (options_.user_agent.empty()) options_.user_agent = "autotls/" + std::string(version());
    share_ = curl_share_init();
    if (share_ != nullptr) {
      curl_share_setopt(share_, CURLSHOPT_LOCKFUNC, &CurlTransport::lock);
      curl_share_setopt(share_, CURLSHOPT_UNLOCKFUNC, &CurlTransport::unlock);
      curl_share_setopt(share_, CURLSHOPT_USERDATA, this);
      // The DNS cache and TLS sessions may be shared between threads. The connection cache may
      // not ("It is not supported to share connections between multiple concurrent threads",
      // CURLSHOPT_SHARE(3)), so connections are reused per pooled easy handle instead.
      curl_share_setopt(share_, CURLSHOPT_SHARE, CURL_LOCK_DATA_DNS);
      curl_share_setopt(share_, CURLSHOPT_SHARE, CURL_LOCK_DATA_SSL_SESSION);
    }
  }

  ~CurlTransport() override {
    // Easy handles must leave the share before it is cleaned up.
    for (CURL* h : idle_) curl_easy_cleanup(h);
    if (share_ != nullptr) curl_share_cleanup(share_);
  }

  CurlTransport(const CurlTransport&) = delete;
  CurlTransport& operator=(const CurlTransport&) = delete;

  Result<HttpResponse> send(const HttpRequest& request) override {
    const std::string what = request.method + " " + request.url;
    if (request.method != "GET" && request.method != "HEAD" && request.method != "POST") {
      return fail(Errc::invalid_input, what + ": unsupported method");
    }
    CURL* h = acquire();
    if (h == nullptr) return fail(Errc::transport, what + ": curl_easy_init failed");

    Transfer t;
    t.max_body = options_.max_body_bytes;
    std::array<char, CURL_ERROR_SIZE> errbuf{};
    curl_slist* headers = nullptr;
    bool headers_ok = true;
    for (const auto& [name, value] : request.headers) {
      // "Name;" is curl's way to send a header with an empty value; "Name:" would remove it.
      std::string line = value.empty() ? name + ";" : name + ": " + value;
      curl_slist* next = curl_slist_append(headers, line.c_str());
      if (next == nullptr) {
        headers_ok = false;
        break;
      }
      headers = next;
    }
    if (headers_ok && request.method == "POST") {
      // Without this curl sends "Expect: 100-continue" for bodies over 1 KiB and may wait for
      // the interim response before sending the JWS.
      curl_slist* next = curl_slist_append(headers, "Expect:");
      if (next == nullptr) headers_ok = false;
      else headers = next;
    }
    if (!headers_ok) {
      curl_slist_free_all(headers);
      release(h);
      return fail(Errc::transport, what + ": out of memory building headers");
    }

    curl_easy_setopt(h, CURLOPT_URL, request.url.c_str());
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);
    // Timeouts must not use signals: several threads may send at once.
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    // HTTP/1.1, not libcurl's default of HTTP/2 over TLS: ACME requests go one at a time (each
    // needs the nonce of the previous reply) and every pooled handle keeps its own connection,
    // so HTTP/2's multiplexing is never used, while its set-up (connection preface and SETTINGS
    // exchange, an nghttp2 session) and framing cost both sides time. Measured with
    // tools/bench/cli_ab.sh against Pebble: one issuance 5-7 % faster (docs/benchmarks.md).
    // certbot (Python requests) speaks HTTP/1.1 to Let's Encrypt too.
    curl_easy_setopt(h, CURLOPT_HTTP_VERSION, static_cast<long>(CURL_HTTP_VERSION_1_1));
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(options_.connect_timeout.count()));
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, static_cast<long>(options_.total_timeout.count()));
    curl_easy_setopt(h, CURLOPT_USERAGENT, options_.user_agent.c_str());
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf.data());
    if (!options_.ca_bundle.empty()) {
      curl_easy_setopt(h, CURLOPT_CAINFO, options_.ca_bundle.c_str());
      // Trust only the given roots, not also the system directory.
      curl_easy_setopt(h, CURLOPT_CAPATH, static_cast<char*>(nullptr));
    }
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, &on_header);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, &t);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, &on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &t);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers);
    if (request.method == "HEAD") {
      curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
    } else if (request.method == "POST") {
      curl_easy_setopt(h, CURLOPT_POST, 1L);
      curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(request.body.size()));
      curl_easy_setopt(h, CURLOPT_POSTFIELDS, request.body.data());
    } else {
      curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);
    }

    const CURLcode rc = curl_easy_perform(h);
    long status = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    // The handle keeps pointers to these; clear them before it goes back to the pool.
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, static_cast<curl_slist*>(nullptr));
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, static_cast<char*>(nullptr));
    curl_slist_free_all(headers);
    release(h);

    if (t.body_too_large) {
      return fail(Errc::bad_response, what + ": response body exceeds " +
                                          std::to_string(options_.max_body_bytes) + " bytes");
    }
    if (rc != CURLE_OK) {
      std::string detail = errbuf[0] != '\0' ? std::string(errbuf.data()) : curl_easy_strerror(rc);
      if (rc == CURLE_OPERATION_TIMEDOUT) return fail(Errc::timeout, what + ": " + detail);
      if (rc == CURLE_PARTIAL_FILE) return fail(Errc::bad_response, what + ": truncated body: " + detail);
      return fail(Errc::transport, what + ": " + detail);
    }
    HttpResponse response;
    response.status = static_cast<int>(status);
    response.headers = std::move(t.headers);
    response.body = std::move(t.body);
    return response;
  }

 private:
  CURL* acquire() {
    {
      std::lock_guard lock(pool_mu_);
      if (!idle_.empty()) {
        // Most recently used first: its connection is the likeliest to still be open.
        CURL* h = idle_.back();
        idle_.pop_back();
        // Reset drops every option but keeps live connections, caches and the share.
        curl_easy_reset(h);
        return h;
      }
    }
    CURL* h = curl_easy_init();
    if (h != nullptr && share_ != nullptr) curl_easy_setopt(h, CURLOPT_SHARE, share_);
    return h;
  }

  void release(CURL* h) {
    {
      std::lock_guard lock(pool_mu_);
      if (idle_.size() < kMaxIdleHandles) {
        idle_.push_back(h);
        return;
      }
    }
    curl_easy_cleanup(h);
  }

  static void lock(CURL*, curl_lock_data data, curl_lock_access, void* user) {
    static_cast<CurlTransport*>(user)->share_mu_[index(data)].lock();
  }
  static void unlock(CURL*, curl_lock_data data, void* user) {
    static_cast<CurlTransport*>(user)->share_mu_[index(data)].unlock();
  }
  static size_t index(curl_lock_data data) {
    auto i = static_cast<size_t>(data);
    return i < kLocks ? i : 0;
  }

  static constexpr size_t kLocks = CURL_LOCK_DATA_LAST;

  CurlOptions options_;
  CURLSH* share_ = nullptr;
  std::array<std::mutex, kLocks> share_mu_;
  std::mutex pool_mu_;
  std::vector<CURL*> idle_;
};

}  // namespace

std::unique_ptr<HttpTransport> make_curl_transport(const CurlOptions& options) {
  return std::make_unique<CurlTransport>(options);
}

}  // namespace autotls::acme
