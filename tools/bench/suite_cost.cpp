// suite_cost: the server's CPU for one TLS 1.3 handshake with each suite, with no network, no
// kernel and no other process in the figure (docs/benchmarks.md, session 21). Run by hand:
//
//   suite_cost CERT.pem KEY.pem [HANDSHAKES] [ROUNDS]
//
// A client and a server SSL talk over a BIO pair in one thread. "resumed": as wrk does, each
// connection offers the session the one before it ended with, so every handshake after the
// first is a resumption with a fresh ECDHE share (X25519), and the server seals one new ticket
// per handshake (OpenSSL's own ticket keys). "full": no session offered (certificate and
// ECDSA signature every time). Only the server's calls are timed, by the thread's CPU clock:
// SSL_new, SSL_accept until done, reading a 3-byte request, writing a 2-byte answer, its
// close_notify, SSL_free. Rounds alternate the suites so that drift in the machine hits all.
// Prints one line per suite, kind and round, then a JSON object with the medians.
#include <openssl/err.h>
#include <openssl/ssl.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <map>
#include <string>
#include <vector>

namespace {

double thread_cpu_s() {
  timespec t{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_nsec) * 1e-9;
}

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "suite_cost: %s\n", what.c_str());
  ERR_print_errors_fp(stderr);
  std::exit(1);
}

// run returns the server's mean CPU per handshake, in microseconds, for n handshakes with the
// server's SSL_CTX offering only suite; resume offers each connection the last session.
double run(const char* cert, const char* key, const char* suite, int n, bool resume) {
  SSL_CTX* s = SSL_CTX_new(TLS_server_method());
  SSL_CTX* c = SSL_CTX_new(TLS_client_method());
  if (!s || !c) die("SSL_CTX_new");
  if (SSL_CTX_use_certificate_chain_file(s, cert) != 1) die(std::string("cannot load ") + cert);
  if (SSL_CTX_use_PrivateKey_file(s, key, SSL_FILETYPE_PEM) != 1) die(std::string("cannot load ") + key);
  if (SSL_CTX_set_ciphersuites(s, suite) != 1) die(std::string("unknown suite ") + suite);
  SSL_CTX_set_min_proto_version(s, TLS1_3_VERSION);
  SSL_CTX_set_num_tickets(s, 1);
  SSL_CTX_set_session_cache_mode(s, SSL_SESS_CACHE_OFF);
  SSL_CTX_set_min_proto_version(c, TLS1_3_VERSION);
  SSL_SESSION* session = nullptr;
  double server = 0;
  for (int i = 0; i < n; ++i) {
    SSL* cs = SSL_new(c);
    BIO *a = nullptr, *b = nullptr;
    if (!cs || BIO_new_bio_pair(&a, 0, &b, 0) != 1) die("SSL_new / BIO_new_bio_pair");
    SSL_set_bio(cs, a, a);
    SSL_set_tlsext_host_name(cs, "bench.test");
    if (session) SSL_set_session(cs, session);
    double t0 = thread_cpu_s();
    SSL* ss = SSL_new(s);
    if (!ss) die("SSL_new");
    SSL_set_bio(ss, b, b);
    server += thread_cpu_s() - t0;
    bool done = false;
    for (int step = 0; step < 10 && !done; ++step) {
      int rc = SSL_connect(cs);
      t0 = thread_cpu_s();
      int rs = SSL_accept(ss);
      server += thread_cpu_s() - t0;
      done = rc == 1 && rs == 1;
    }
    if (!done) die("handshake did not complete");
    char buf[16];
    if (SSL_write(cs, "GET", 3) != 3) die("client write");
    t0 = thread_cpu_s();
    int got = SSL_read(ss, buf, sizeof buf);
    int put = SSL_write(ss, "OK", 2);
    server += thread_cpu_s() - t0;
    if (got != 3 || put != 2) die("server read/write");
    if (SSL_read(cs, buf, sizeof buf) != 2) die("client read");  // also takes the ticket
    if (i > 0 && resume && SSL_session_reused(cs) != 1) die("the offered session was not resumed");
    if (!resume && SSL_session_reused(cs) == 1) die("a session was resumed");
    // A clean close on both sides: a client SSL freed without one marks its session not
    // resumable (wrk closes with SSL_shutdown too).
    SSL_shutdown(cs);
    t0 = thread_cpu_s();
    SSL_shutdown(ss);
    SSL_free(ss);
    server += thread_cpu_s() - t0;
    if (resume) {
      if (session) SSL_SESSION_free(session);
      session = SSL_get1_session(cs);
    }
    SSL_free(cs);
  }
  if (session) SSL_SESSION_free(session);
  SSL_CTX_free(s);
  SSL_CTX_free(c);
  return server / n * 1e6;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) die("usage: suite_cost CERT.pem KEY.pem [HANDSHAKES] [ROUNDS]");
  int n = argc > 3 ? std::atoi(argv[3]) : 5000;
  int rounds = argc > 4 ? std::atoi(argv[4]) : 3;
  if (n < 1 || rounds < 1) die("HANDSHAKES and ROUNDS must be positive");
  const std::vector<const char*> suites = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                                           "TLS_CHACHA20_POLY1305_SHA256"};
  std::map<std::string, std::vector<double>> us;
  for (int r = 0; r < rounds; ++r) {
    for (bool resume : {true, false}) {
      for (const char* suite : suites) {
        double v = run(argv[1], argv[2], suite, n, resume);
        std::string kind = std::string(resume ? "resumed_" : "full_") + suite;
        us[kind].push_back(v);
        std::printf("round %d %s: %.1f us per handshake (server CPU)\n", r + 1, kind.c_str(), v);
        std::fflush(stdout);
      }
    }
  }
  std::printf("{\"handshakes_per_round\": %d, \"rounds\": %d", n, rounds);
  for (auto& [suite, v] : us) {
    std::sort(v.begin(), v.end());
    std::printf(", \"%s_us\": %.1f", suite.c_str(), v[v.size() / 2]);
  }
  std::printf("}\n");
}
