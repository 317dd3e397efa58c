// The `autotls` binary against a real Pebble: issue by http-01, tls-alpn-01 and dns-01, list,
// renew, revoke, accounts, usage and config errors with their exit codes, serve as a child
// process (HTTPS checked with libcurl, SIGTERM exits 0), and tools/quickstart --check.

#include <doctest/doctest.h>

#include <fcntl.h>
#include <poll.h>
#include <pty.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <curl/curl.h>
#include <httplib.h>
#include <nlohmann/json.hpp>
#include <openssl/pem.h>

#include "acme/client.h"
#include "acme/jws.h"
#include "acme/key.h"
#include "acme/transport.h"
#include "acme/util/openssl.h"
#include "tests/support/fake_ca_endpoint.h"
#include "tests/support/json_events.h"
#include "tests/support/net.h"
#include "tests/support/pebble_env.h"
#include "tests/support/sni_handshake.h"
#include "tests/support/temp_dir.h"

using autotls::testing::free_port;
using autotls::testing::PebbleEnv;
using autotls::testing::PebbleOptions;
using json = nlohmann::json;
namespace fs = std::filesystem;
using namespace std::chrono_literals;

extern char** environ;

namespace {

// TempDir is a fresh temporary directory (tests/support TempDir).
struct TempDir : autotls::testing::TempDir {
  TempDir() : autotls::testing::TempDir("autotls-cli") {}
};

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_file(const fs::path& p, const std::string& text, bool executable = false) {
  std::ofstream(p, std::ios::binary) << text;
  if (executable) fs::permissions(p, fs::perms::owner_all | fs::perms::group_read | fs::perms::others_read);
}

struct Run {
  int code = -1;
  std::string out, err;
};

// spawn_as_is starts argv with stdout/stderr to files and extra environment entries.
pid_t spawn_as_is(const std::vector<std::string>& args, const fs::path& out, const fs::path& err,
                  const std::vector<std::string>& env_extra) {
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) env.emplace_back(*e);
  for (const auto& e : env_extra) env.push_back(e);
  std::vector<char*> argv, envp;
  std::vector<std::string> a = args;
  for (auto& s : a) argv.push_back(s.data());
  argv.push_back(nullptr);
  for (auto& s : env) envp.push_back(s.data());
  envp.push_back(nullptr);
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    int o = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int e = ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int n = ::open("/dev/null", O_RDONLY);
    ::dup2(n, 0);
    ::dup2(o, 1);
    ::dup2(e, 2);
    ::setpgid(0, 0);
    ::execve(argv[0], argv.data(), envp.data());
    ::_exit(127);
  }
  return pid;
}

// spawn is spawn_as_is, except that `autotls serve` without --json or --log-format gets
// --log-format text: its output goes to files here, where the default (auto) would print JSON
// lines, and these tests read the text lines. The log format tests call spawn_as_is.
pid_t spawn(const std::vector<std::string>& args, const fs::path& out, const fs::path& err,
            const std::vector<std::string>& env_extra) {
  std::vector<std::string> a = args;
  auto has = [&](const std::string& flag) {
    return std::find_if(a.begin(), a.end(), [&](const std::string& s) {
             return s == flag || s.starts_with(flag + "=");
           }) != a.end();
  };
  if (a.size() >= 2 && a[0] == AUTOTLS_BINARY && a[1] == "serve" && !has("--json") && !has("--log-format")) {
    a.insert(a.end(), {"--log-format", "text"});
  }
  return spawn_as_is(a, out, err, env_extra);
}

// wait_exit waits up to timeout for pid; on timeout it kills it and returns -1.
int wait_exit(pid_t pid, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    int status = 0;
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(-pid, SIGKILL);
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(20ms);
  }
}

Run run(const std::vector<std::string>& args, const std::vector<std::string>& env = {},
        std::chrono::milliseconds timeout = 120s, const std::vector<std::string>& program = {AUTOTLS_BINARY}) {
  TempDir io;
  std::vector<std::string> argv = program;
  argv.insert(argv.end(), args.begin(), args.end());
  pid_t pid = spawn(argv, io.path / "out", io.path / "err", env);
  Run r;
  r.code = wait_exit(pid, timeout);
  r.out = read_file(io.path / "out");
  r.err = read_file(io.path / "err");
  return r;
}

std::string show(const Run& r) { return "exit " + std::to_string(r.code) + "\nstdout:\n" + r.out + "\nstderr:\n" + r.err; }


// Cli holds a Pebble and the flags every command needs against it.
struct Cli {
  std::unique_ptr<PebbleEnv> env;
  TempDir dir;
  fs::path storage() const { return dir.path / "storage"; }
  std::vector<std::string> common() const {
    return {"--ca", env->directory_url(), "--ca-bundle", env->ca_bundle_path(), "--storage", storage().string()};
  }
  std::vector<std::string> args(std::initializer_list<std::string> cmd, std::initializer_list<std::string> more = {}) const {
    std::vector<std::string> a(cmd);
    auto c = common();
    a.insert(a.end(), c.begin(), c.end());
    a.insert(a.end(), more);
    return a;
  }
  std::string http() const { return "127.0.0.1:" + std::to_string(env->http_port()); }
};

json last_json_line(const std::string& out) {
  std::istringstream in(out);
  std::string line, last;
  while (std::getline(in, line)) {
    if (!line.empty()) last = line;
  }
  auto j = json::parse(last, nullptr, false);
  return j;
}

size_t append_cb(char* p, size_t s, size_t n, void* ud) {
  static_cast<std::string*>(ud)->append(p, s * n);
  return s * n;
}

// https_get fetches url with host resolved to 127.0.0.1, verifying against ca_file.
std::pair<long, std::string> https_get(const std::string& host, int port, const fs::path& ca_file) {
  CURL* h = curl_easy_init();
  std::string body;
  std::string url = "https://" + host + ":" + std::to_string(port) + "/";
  std::string res = host + ":" + std::to_string(port) + ":127.0.0.1";
  curl_slist* resolve = curl_slist_append(nullptr, res.c_str());
  curl_easy_setopt(h, CURLOPT_URL, url.c_str());
  curl_easy_setopt(h, CURLOPT_RESOLVE, resolve);
  curl_easy_setopt(h, CURLOPT_CAINFO, ca_file.c_str());
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, append_cb);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &body);
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 5000L);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  long status = 0;
  if (curl_easy_perform(h) == CURLE_OK) curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
  curl_slist_free_all(resolve);
  curl_easy_cleanup(h);
  return {status, body};
}

// HttpsAnswer is what https_get_with read: the status, the body as sent, and the header.
struct HttpsAnswer {
  long status = 0;
  std::string body;
  std::string head;
};

// https_get_with is https_get of path with extra request fields ("Name: value"), keeping the
// answer's header. curl decodes no content coding it did not ask for itself.
HttpsAnswer https_get_with(const std::string& host, int port, const fs::path& ca_file, const std::string& path,
                           const std::vector<std::string>& fields) {
  CURL* h = curl_easy_init();
  HttpsAnswer a;
  std::string url = "https://" + host + ":" + std::to_string(port) + path;
  std::string res = host + ":" + std::to_string(port) + ":127.0.0.1";
  curl_slist* resolve = curl_slist_append(nullptr, res.c_str());
  curl_slist* extra = nullptr;
  for (const auto& f : fields) extra = curl_slist_append(extra, f.c_str());
  curl_easy_setopt(h, CURLOPT_URL, url.c_str());
  curl_easy_setopt(h, CURLOPT_RESOLVE, resolve);
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, extra);
  curl_easy_setopt(h, CURLOPT_CAINFO, ca_file.c_str());
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, append_cb);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &a.body);
  curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, append_cb);
  curl_easy_setopt(h, CURLOPT_HEADERDATA, &a.head);
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 5000L);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  if (curl_easy_perform(h) == CURLE_OK) curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &a.status);
  curl_slist_free_all(extra);
  curl_slist_free_all(resolve);
  curl_easy_cleanup(h);
  return a;
}

// https_get_when_served polls https_get (every 100 ms, 30 s at most, once ca_file exists)
// until it answers want, or the serve process pid has exited; it returns the last answer
// ({0, ""} when no TLS connection ever completed).
std::pair<long, std::string> https_get_when_served(const std::string& host, int port, const fs::path& ca_file,
                                                   pid_t pid, long want) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  std::pair<long, std::string> got;
  while (std::chrono::steady_clock::now() < deadline) {
    if (fs::exists(ca_file)) got = https_get(host, port, ca_file);
    if (got.first == want) break;
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return got;
}



// spawn_on_pty starts argv (argv[0] a path) in its own process group with stdout and stderr,
// and stdin too when with_stdin, on a new pseudo-terminal; it returns the child and the
// terminal's master side (the caller closes it).
std::pair<pid_t, int> spawn_on_pty(std::vector<std::string> a, bool with_stdin) {
  int master = -1, slave = -1;
  REQUIRE(::openpty(&master, &slave, nullptr, nullptr, nullptr) == 0);
  std::vector<char*> argv;
  for (auto& s : a) argv.push_back(s.data());
  argv.push_back(nullptr);
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::close(master);
    if (with_stdin) ::dup2(slave, 0);
    ::dup2(slave, 1);
    ::dup2(slave, 2);
    if (slave > 2) ::close(slave);
    ::setpgid(0, 0);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(slave);
  return {pid, master};
}

// PtyRun is a command run with stdin, stdout and stderr on one pseudo-terminal: its exit code
// (-1 if killed at the limit) and everything it wrote (CRLF line ends, the echo of the input).
struct PtyRun {
  int code = -1;
  std::string out;
};

// run_on_pty runs autotls args on a pseudo-terminal and types input once the output holds
// prompt (at once when prompt is empty; never when input is empty). Every wait is bounded by
// limit: the child is killed then.
PtyRun run_on_pty(const std::vector<std::string>& args, const std::string& prompt, const std::string& input,
                  std::chrono::seconds limit = 20s) {
  std::vector<std::string> a = {AUTOTLS_BINARY};
  a.insert(a.end(), args.begin(), args.end());
  auto [pid, master] = spawn_on_pty(a, true);
  PtyRun r;
  bool sent = input.empty();
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < deadline) {
    if (!sent && (prompt.empty() || r.out.find(prompt) != std::string::npos)) {
      REQUIRE(::write(master, input.data(), input.size()) == static_cast<ssize_t>(input.size()));
      sent = true;
    }
    pollfd p{master, POLLIN, 0};
    if (::poll(&p, 1, 50) <= 0) continue;
    char buf[4096];
    ssize_t n = ::read(master, buf, sizeof buf);
    if (n <= 0) break;  // EIO: every copy of the slave side is closed (the child exited)
    r.out.append(buf, static_cast<size_t>(n));
  }
  r.code = wait_exit(pid, std::max<std::chrono::milliseconds>(
                              std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()),
                              1000ms));
  ::close(master);
  return r;
}

}  // namespace

TEST_SUITE("cli.usage") {
  TEST_CASE("version help and usage errors have documented exit codes") {
    auto v = run({"version"});
    CHECK_MESSAGE(v.code == 0, show(v));
    CHECK(v.out.find("autotls 0.1.0") != std::string::npos);

    auto h = run({"--help"});
    CHECK_MESSAGE(h.code == 0, show(h));
    CHECK(h.out.find("Exit codes") != std::string::npos);
    for (const char* sub : {"issue", "renew", "revoke", "list", "account", "serve"}) {
      auto sh = run({sub, "--help"});
      CHECK_MESSAGE(sh.code == 0, show(sh));
      CHECK_MESSAGE(sh.out.find("Examples") != std::string::npos, sub);
    }
    // serve's exit statuses on signals, as in docs/cli.md "Exit codes".
    auto serve_help = run({"serve", "--help"});
    CHECK_MESSAGE(serve_help.out.find("drain then exit 0 (a second one exits at once, status 6)") != std::string::npos,
                  show(serve_help));

    TempDir d;
    std::string storage = (d.path / "s").string();
    CHECK(run({}).code == 2);
    CHECK(run({"frobnicate"}).code == 2);
    CHECK(run({"list", "--no-such-flag"}).code == 2);
    auto no_names = run({"issue", "--storage", storage});
    CHECK_MESSAGE(no_names.code == 2, show(no_names));
    CHECK(no_names.err.find("-d NAME") != std::string::npos);
    auto bad_ca = run({"issue", "-d", "a.test", "--ca", "nonsense", "--storage", storage});
    CHECK_MESSAGE(bad_ca.code == 2, show(bad_ca));
    auto bad_key = run({"issue", "-d", "a.test", "--key-type", "dsa", "--storage", storage});
    CHECK_MESSAGE(bad_key.code == 2, show(bad_key));
    auto bad_ch = run({"issue", "-d", "a.test", "--challenge", "carrier-pigeon", "--storage", storage});
    CHECK_MESSAGE(bad_ch.code == 2, show(bad_ch));
    auto dns_no_hook = run({"issue", "-d", "a.test", "--challenge", "dns-01", "--storage", storage});
    CHECK_MESSAGE(dns_no_hook.code == 2, show(dns_no_hook));
    auto bad_name = run({"issue", "-d", "bad name!", "--storage", storage});
    CHECK_MESSAGE(bad_name.code == 2, show(bad_name));
    auto revoke_nothing = run({"revoke", "--storage", storage});
    CHECK_MESSAGE(revoke_nothing.code == 2, show(revoke_nothing));
    auto renew_unknown = run({"renew", "nothere.test", "--storage", storage, "--no-random-sleep"});
    CHECK_MESSAGE(renew_unknown.code == 2, show(renew_unknown));
    auto eab_no_key = run({"account", "register", "--eab-kid", "k", "--storage", storage});
    CHECK_MESSAGE(eab_no_key.code == 2, show(eab_no_key));
    auto serve_nothing = run({"serve", "-d", "a.test", "--storage", storage});
    CHECK_MESSAGE(serve_nothing.code == 2, show(serve_nothing));

    // renew --json with nothing stored: exit 1 and still one JSON object to parse.
    auto renew_none = run({"renew", "--json", "--storage", storage, "--no-random-sleep"});
    CHECK_MESSAGE(renew_none.code == 1, show(renew_none));
    auto rj = last_json_line(renew_none.out);
    REQUIRE_MESSAGE(rj.is_object(), show(renew_none));
    CHECK(rj["status"] == "nothing to do");

    auto empty = run({"list", "--json", "--storage", storage});
    CHECK_MESSAGE(empty.code == 0, show(empty));
    auto j = last_json_line(empty.out);
    REQUIRE(j.is_object());
    CHECK(j["certificates"].empty());
  }

  TEST_CASE("serve refuses on-demand without a policy") {
    TempDir d;
    std::string storage = (d.path / "s").string();
    auto no_policy = run({"serve", "--on-demand", "--root", d.path.string(), "--storage", storage});
    CHECK_MESSAGE(no_policy.code == 2, show(no_policy));
    CHECK(no_policy.err.find("without a policy") != std::string::npos);
    CHECK(std::count(no_policy.err.begin(), no_policy.err.end(), '\n') == 1);  // one line
    std::string cfg = (d.path / "od.json").string();
    std::ofstream(cfg) << R"({"on-demand": true, "on-demand-rate": "10/1m", "root": "/tmp"})";
    auto from_file = run({"serve", "--config", cfg, "--storage", storage});
    CHECK_MESSAGE(from_file.code == 2, show(from_file));
    CHECK(from_file.err.find("without a policy") != std::string::npos);
    auto bad_rate = run({"serve", "--on-demand", "--on-demand-allow", "*.a.test", "--on-demand-rate", "ten",
                         "--root", d.path.string(), "--storage", storage});
    CHECK_MESSAGE(bad_rate.code == 2, show(bad_rate));
    auto bad_pattern = run({"serve", "--on-demand", "--on-demand-allow", "a/b.test", "--root", d.path.string(),
                            "--storage", storage});
    CHECK_MESSAGE(bad_pattern.code == 2, show(bad_pattern));
    auto stray = run({"serve", "-d", "a.test", "--on-demand-ask", "http://127.0.0.1:1/", "--root", d.path.string(),
                      "--storage", storage});
    CHECK_MESSAGE(stray.code == 2, show(stray));
  }

  TEST_CASE("unreachable CA exits 4") {
    TempDir d;
    int port = free_port();
    auto r = run({"account", "register", "--agree-tos", "--ca", "https://127.0.0.1:" + std::to_string(port) + "/dir",
                  "--storage", (d.path / "s").string()});
    CHECK_MESSAGE(r.code == 4, show(r));
  }
}

TEST_SUITE("cli.config") {
  TEST_CASE("config file keys apply and flags override them") {
    TempDir d;
    fs::path a = d.path / "a", b = d.path / "b";
    write_file(d.path / "good.json", json{{"storage", a.string()}, {"json", true}}.dump());
    auto r = run({"list", "--config", (d.path / "good.json").string()});
    CHECK_MESSAGE(r.code == 0, show(r));
    auto j = last_json_line(r.out);
    REQUIRE(j.is_object());
    CHECK(j["storage"] == a.string());

    auto o = run({"list", "--config", (d.path / "good.json").string(), "--storage", b.string()});
    CHECK_MESSAGE(o.code == 0, show(o));
    CHECK(last_json_line(o.out)["storage"] == b.string());
  }

  TEST_CASE("bad issuer lists are usage errors naming the entry") {
    TempDir d;
    fs::path www = d.path / "www";
    fs::create_directories(www);
    auto serve = [&](const json& cfg, std::vector<std::string> extra = {}) {
      write_file(d.path / "c.json", cfg.dump());
      std::vector<std::string> a = {"serve", "--config", (d.path / "c.json").string(), "--storage", (d.path / "s").string(),
                                    "-d", "x.test", "--root", www.string(), "--admin-address", "off"};
      a.insert(a.end(), extra.begin(), extra.end());
      return run(a, {}, 20s);
    };
    auto r1 = serve({{"issuers", {{{"ca", "nope"}}}}});
    CHECK_MESSAGE(r1.code == 2, show(r1));
    CHECK(r1.err.find("issuers[0].ca") != std::string::npos);
    auto r2 = serve({{"issuers", {{{"ca", "internal"}}, {{"ca", "zerossl"}, {"bogus", "1"}}}}});
    CHECK_MESSAGE(r2.code == 2, show(r2));
    CHECK(r2.err.find("issuers[1]: unknown key \"bogus\"") != std::string::npos);
    auto r3 = serve({{"issuers", {{{"ca", "zerossl"}, {"eab-kid", "kid"}}}}});
    CHECK_MESSAGE(r3.code == 2, show(r3));
    CHECK(r3.err.find("eab-kid needs eab-hmac-file") != std::string::npos);
    auto r4 = serve({{"issuers", {{{"ca", "internal"}}}}}, {"--issuer", "letsencrypt"});
    CHECK_MESSAGE(r4.code == 2, show(r4));
    CHECK(r4.err.find("not both") != std::string::npos);
    auto r5 = serve(json::object(), {"--issuer", "bogus"});
    CHECK_MESSAGE(r5.code == 2, show(r5));
    CHECK(r5.err.find("--issuer must be") != std::string::npos);
  }

  TEST_CASE("bad per-site key-type profile and preferred-chain values are usage errors naming the site and key") {
    TempDir d;
    fs::path www = d.path / "www";
    fs::create_directories(www);
    fs::path cfg = d.path / "sites.json";
    auto serve = [&](const json& site) {
      json c = {{"sites", {{"good.test", {{"root", www.string()}}}, {"shop.test", site}}}};
      write_file(cfg, c.dump());
      return run({"serve", "--config", cfg.string(), "--storage", (d.path / "s").string(), "--admin-address", "off",
                  "--ca", "internal", "--https-address", "127.0.0.1:0", "--http-address", "off",
                  "--challenge", "tls-alpn-01"},
                 {}, 20s);
    };
    auto expect = [&](const json& site, const std::vector<std::string>& parts) {
      auto r = serve(site);
      CHECK_MESSAGE(r.code == 2, show(r));
      CHECK_MESSAGE(r.err.find(cfg.string()) != std::string::npos, show(r));
      for (const auto& p : parts) CHECK_MESSAGE(r.err.find(p) != std::string::npos, (p + "\n" + show(r)));
      CHECK(r.out.find("listening") == std::string::npos);  // refused before anything started
    };
    const std::string root = www.string();
    expect({{"root", root}, {"key-type", "rsa1024"}}, {"sites.shop.test.key-type", "\"rsa1024\"", "rsa2048"});
    expect({{"root", root}, {"key_type", "dsa"}}, {"sites.shop.test.key_type", "\"dsa\""});
    expect({{"root", root}, {"key-type", 2048}}, {"sites.shop.test.key-type: expected a string"});
    expect({{"root", root}, {"key-type", "ec256"}, {"key_type", "ec384"}}, {"sites.shop.test", "not both"});
    expect({{"root", root}, {"profile", ""}}, {"sites.shop.test.profile", "not a profile name"});
    expect({{"root", root}, {"profile", "short lived"}}, {"sites.shop.test.profile", "\"short lived\""});
    expect({{"root", root}, {"profile", true}}, {"sites.shop.test.profile: expected a string"});
    expect({{"root", root}, {"preferred-chain", ""}}, {"sites.shop.test.preferred-chain"});
    expect({{"root", root}, {"preferred_chain", "Root\nX"}}, {"sites.shop.test.preferred_chain"});
    expect({{"root", root}, {"key-typ", "rsa2048"}}, {"sites.shop.test: unknown key \"key-typ\"", "key-type"});
    expect({{"proxy", "http://127.0.0.1:9"}, {"upstream-keepalive", -1}}, {"sites.shop.test.upstream-keepalive", "0-1024"});
    expect({{"proxy", "http://127.0.0.1:9"}, {"upstream-idle-timeout", 0}}, {"sites.shop.test.upstream-idle-timeout"});
    expect({{"root", root}, {"upstream-keepalive", 8}}, {"sites.shop.test", "need \"proxy\""});
    expect({{"proxy", "http://127.0.0.1:9"}, {"tunnel-idle-timeout", 0}}, {"sites.shop.test.tunnel-idle-timeout", "0.001-604800"});
    expect({{"proxy", "http://127.0.0.1:9"}, {"tunnel-idle-timeout", "1h"}}, {"sites.shop.test.tunnel-idle-timeout", "expected seconds"});
    expect({{"root", root}, {"tunnel-idle-timeout", 60}}, {"sites.shop.test", "need \"proxy\""});
    expect({{"proxy", "http://127.0.0.1:9"}, {"upstream-fail-timeout", -1}}, {"sites.shop.test.upstream-fail-timeout", "0-86400"});
    expect({{"root", root}, {"upstream-fail-timeout", 5}}, {"sites.shop.test", "need \"proxy\""});
    expect({{"proxy", json::array()}}, {"sites.shop.test.proxy", "non-empty list of URLs"});
    expect({{"proxy", json::array({"http://127.0.0.1:9", 5})}}, {"sites.shop.test.proxy", "list of URLs"});
    expect({{"proxy", json::array({"http://127.0.0.1:9", "http://127.0.0.1:9"})}},
           {"sites.shop.test.proxy: \"http://127.0.0.1:9\" is listed twice"});
    expect({{"proxy", json::array({"http://127.0.0.1:9", "ftp://x"})}}, {"sites.shop.test.proxy: upstream \"ftp://x\""});
    expect({{"root", root}, {"redirect", "https://x.test"}}, {"sites.shop.test: give exactly one of \"root\", \"proxy\" and \"redirect\""});
    expect({{"redirect", "x.test"}}, {"sites.shop.test: redirect \"x.test\"", "http:// or https://"});
    expect({{"redirect", 5}}, {"sites.shop.test.redirect: expected a string"});
    expect({{"redirect", "https://x.test/{host}"}}, {"sites.shop.test: redirect", "{uri}"});
    expect({{"redirect", "https://x.test"}, {"redirect-code", 200}}, {"sites.shop.test.redirect-code: 200 is not a redirect status"});
    expect({{"redirect", "https://x.test"}, {"redirect-code", "301"}}, {"sites.shop.test.redirect-code: expected 301"});
    expect({{"root", root}, {"redirect-code", 301}}, {"sites.shop.test: redirect-code needs \"redirect\""});
    expect({{"redirect", "https://x.test"}, {"upstream-keepalive", 1}}, {"sites.shop.test", "need \"proxy\""});
    expect({{"proxy", "http://127.0.0.1:9"}, {"index", "a.html"}}, {"sites.shop.test: index needs \"root\""});
    expect({{"root", root}, {"index", 1}}, {"sites.shop.test.index: expected a file name"});
    expect({{"root", root}, {"headers", json::array()}}, {"sites.shop.test.headers: expected an object"});
    expect({{"root", root}, {"headers", {{"X-A", 1}}}}, {"sites.shop.test.headers.X-A: expected a string (or null, to remove the field)"});
    expect({{"root", root}, {"headers", {{"Content-Length", "1"}}}}, {"sites.shop.test.headers: header \"Content-Length\": set by the server"});
    expect({{"root", root}, {"headers", {{"Content-Length", nullptr}}}}, {"sites.shop.test.headers: header \"Content-Length\": set by the server"});
    expect({{"root", root}, {"headers", {{"X A", nullptr}}}}, {"sites.shop.test.headers: header \"X A\": not a field name"});
    expect({{"root", root}, {"headers", {{"X-A", "a\nb"}}}}, {"sites.shop.test.headers: header \"X-A\"", "control character"});
    expect({{"root", root}, {"headers", {{"x-a", "1"}, {"X-A", "2"}}}}, {"sites.shop.test.headers:", "are the same field"});
  }

  TEST_CASE("a bad upstream URL is refused when the configuration is read naming the site and the fault") {
    // Before: accepted at load; a site with such an upstream answered 502 on every request
    // (or the server refused it later, without the config file's site key).
    TempDir d;
    fs::path www = d.path / "www";
    fs::create_directories(www);
    fs::path cfg = d.path / "sites.json";
    auto serve = [&](const json& c, std::vector<std::string> extra = {}) {
      write_file(cfg, c.dump());
      std::vector<std::string> args = {"serve", "--config", cfg.string(), "--storage", (d.path / "s").string(),
                                       "--admin-address", "off", "--ca", "internal", "--https-address",
                                       "127.0.0.1:0", "--http-address", "off", "--challenge", "tls-alpn-01"};
      args.insert(args.end(), extra.begin(), extra.end());
      return run(args, {}, 20s);
    };
    auto expect = [&](const std::string& url, const std::string& fault) {
      json c = {{"sites", {{"good.test", {{"root", www.string()}}}, {"shop.test", {{"proxy", url}}}}}};
      auto r = serve(c);
      CHECK_MESSAGE(r.code == 2, show(r));
      CHECK_MESSAGE(r.err.find("sites.shop.test.proxy: upstream \"" + url + "\": " + fault) != std::string::npos,
                    show(r));
      CHECK_MESSAGE(r.err.find("expected http://host[:port] or https://host[:port]") != std::string::npos, show(r));
      CHECK(r.out.find("listening") == std::string::npos);  // refused before anything started
    };
    expect("ftp://127.0.0.1:21", "scheme \"ftp\" is not http or https");
    expect("127.0.0.1:8080", "no scheme");
    expect("http://", "no host");
    expect("http://:8080", "no host");
    expect("http://127.0.0.1:80x", "port \"80x\" is not 1-65535");
    expect("http://127.0.0.1:0", "port \"0\" is not 1-65535");
    expect("http://127.0.0.1:65536", "port \"65536\" is not 1-65535");
    expect("http://127.0.0.1:", "port \"\" is not 1-65535");
    expect("http://127.0.0.1:8080/app", "a path is not supported");
    expect("https://127.0.0.1:8443/", "a path is not supported");
    expect("http://[::1:8080", "no ']' after the IPv6 address");

    // --proxy on the command line: the same check.
    auto r = serve(json::object(), {"-d", "shop.test", "--proxy", "gopher://127.0.0.1:70"});
    CHECK_MESSAGE(r.code == 2, show(r));
    CHECK_MESSAGE(r.err.find("--proxy: upstream \"gopher://127.0.0.1:70\": scheme \"gopher\" is not http or https") !=
                      std::string::npos,
                  show(r));
    CHECK(r.out.find("listening") == std::string::npos);

    // --redirect: the same checks as a redirect site's, and one kind of default site only.
    for (const auto& [args, says] :
         {std::pair{std::vector<std::string>{"--redirect", "ftp://127.0.0.1"}, std::string("--redirect: redirect \"ftp://127.0.0.1\"")},
          std::pair{std::vector<std::string>{"--redirect", "https://x.test", "--redirect-code", "200"},
                    std::string("--redirect: redirect status 200")},
          std::pair{std::vector<std::string>{"--redirect", "//x.test"}, std::string("another host")},
          std::pair{std::vector<std::string>{"--redirect-code", "301", "--root", www.string()},
                    std::string("--redirect-code needs --redirect")},
          std::pair{std::vector<std::string>{"--redirect", "https://x.test", "--root", www.string()},
                    std::string("give one of --root, --proxy and --redirect")}}) {
      std::vector<std::string> extra = {"-d", "shop.test"};
      extra.insert(extra.end(), args.begin(), args.end());
      auto rr = serve(json::object(), extra);
      CHECK_MESSAGE(rr.code == 2, show(rr));
      CHECK_MESSAGE(rr.err.find(says) != std::string::npos, (says + "\n" + show(rr)));
      CHECK(rr.out.find("listening") == std::string::npos);
    }
  }

  TEST_CASE("bad JSON unknown keys and wrong types are errors naming the file") {
    TempDir d;
    fs::path bad = d.path / "bad.json", unknown = d.path / "unknown.json", type = d.path / "type.json";
    write_file(bad, "{\"storage\": ");
    write_file(unknown, R"({"storage": "/tmp/x", "colour": "blue"})");
    write_file(type, R"({"json": "yes please"})");
    auto r1 = run({"list", "--config", bad.string()});
    CHECK_MESSAGE(r1.code == 2, show(r1));
    CHECK(r1.err.find(bad.string()) != std::string::npos);
    CHECK(r1.err.find("invalid JSON") != std::string::npos);
    auto r2 = run({"list", "--config", unknown.string()});
    CHECK_MESSAGE(r2.code == 2, show(r2));
    CHECK(r2.err.find(unknown.string()) != std::string::npos);
    CHECK(r2.err.find("colour") != std::string::npos);
    auto r3 = run({"list", "--config", type.string()});
    CHECK_MESSAGE(r3.code == 2, show(r3));
    CHECK(r3.err.find(type.string()) != std::string::npos);
    auto r4 = run({"list", "--config", (d.path / "missing.json").string()});
    CHECK_MESSAGE(r4.code == 2, show(r4));
    CHECK(r4.err.find("missing.json") != std::string::npos);
  }
}

TEST_SUITE("cli.issue") {
  TEST_CASE("http-01 standalone then reuse list renew and revoke") {
    Cli c;
    AUTOTLS_START_PEBBLE(env, PebbleOptions{});
    c.env = std::move(env);
    fs::path hook_out = c.dir.path / "hook.txt";
    std::string hook = "printf '%s|%s|%s|%s' \"$AUTOTLS_NAMES\" \"$AUTOTLS_CERT_PATH\" \"$AUTOTLS_KEY_PATH\" "
                       "\"$AUTOTLS_FULLCHAIN_PATH\" > " + hook_out.string();
    auto r = run(c.args({"issue", "-d", "www.cli.test", "-d", "cli.test"},
                        {"--agree-tos", "--email", "cli@example.com", "--http-address", c.http(), "--deploy-hook", hook}));
    REQUIRE_MESSAGE(r.code == 0, show(r));
    fs::path live = c.storage() / "live" / "www.cli.test";
    for (const char* f : {"fullchain.pem", "privkey.pem", "cert.pem", "chain.pem", "meta.json", "renewal.json"}) {
      CHECK_MESSAGE(fs::exists(live / f), f);
    }
    CHECK(r.out.find((live / "fullchain.pem").string()) != std::string::npos);
    // The renewal settings are stored with the certificate, in its version directory.
    CHECK(fs::read_symlink(live) == fs::path("../archive/www.cli.test/1"));
    auto settings = json::parse(read_file(c.storage() / "archive" / "www.cli.test" / "1" / "renewal.json"));
    CHECK(settings["http-address"] == c.http());
    CHECK(settings["deploy-hook"] == hook);
    CHECK(read_file(hook_out) == "www.cli.test cli.test|" + (live / "cert.pem").string() + "|" +
                                     (live / "privkey.pem").string() + "|" + (live / "fullchain.pem").string());
    auto first = read_file(live / "cert.pem");

    // A valid certificate that is not due is reused: nothing to do.
    auto again = run(c.args({"issue", "-d", "www.cli.test", "-d", "cli.test"}, {"--http-address", c.http()}));
    CHECK_MESSAGE(again.code == 1, show(again));
    CHECK(again.out.find("nothing to do") != std::string::npos);
    CHECK(read_file(live / "cert.pem") == first);

    auto l = run(c.args({"list"}, {"--json"}));
    REQUIRE_MESSAGE(l.code == 0, show(l));
    auto j = last_json_line(l.out);
    REQUIRE(j.is_object());
    REQUIRE(j["certificates"].size() == 1);
    auto cert = j["certificates"][0];
    CHECK(cert["name"] == "www.cli.test");
    CHECK(cert["names"] == json::array({"www.cli.test", "cli.test"}));
    CHECK(cert["key_type"] == "ec256");
    CHECK(cert["days_left"].get<int>() >= 1);
    CHECK(cert["due"] == false);
    CHECK(cert["issuer"].get<std::string>().find("Pebble") != std::string::npos);
    CHECK(!cert["renewal_time"].get<std::string>().empty());
    CHECK(!cert["renewal_reason"].get<std::string>().empty());
    CHECK(cert["last_error"] == "");
    auto human = run(c.args({"list"}));
    CHECK_MESSAGE(human.code == 0, show(human));
    CHECK(human.out.find("days left") != std::string::npos);

    auto not_due = run(c.args({"renew"}, {"--no-random-sleep"}));
    CHECK_MESSAGE(not_due.code == 1, show(not_due));
    CHECK(not_due.out.find("skipped www.cli.test: not due until") != std::string::npos);

    // Forced: the settings saved at issue time (http address, deploy hook) are reused.
    fs::remove(hook_out);
    auto forced = run(c.args({"renew", "www.cli.test"}, {"--force", "--json"}));
    REQUIRE_MESSAGE(forced.code == 0, show(forced));
    auto fj = last_json_line(forced.out);
    CHECK(fj["action"] == "renewed");
    CHECK(read_file(live / "cert.pem") != first);
    CHECK(fs::exists(hook_out));
    CHECK(json::parse(read_file(live / "renewal.json")) == settings);  // carried over

    // Issued again with other settings: the new renewal.json comes with the new certificate.
    auto other = run(c.args({"issue", "-d", "www.cli.test", "-d", "cli.test"},
                            {"--http-address", c.http(), "--key-type", "ec384"}));
    REQUIRE_MESSAGE(other.code == 0, show(other));
    CHECK(fs::read_symlink(live) == fs::path("../archive/www.cli.test/3"));
    auto changed = json::parse(read_file(live / "renewal.json"));
    CHECK(changed["key-type"] == "ec384");
    CHECK_FALSE(changed.contains("deploy-hook"));

    auto rv = run(c.args({"revoke", "www.cli.test"}, {"--reason", "superseded"}));
    CHECK_MESSAGE(rv.code == 0, show(rv));
    // Revoking twice: the CA refuses (alreadyRevoked), exit 3 with the problem printed.
    auto rv2 = run(c.args({"revoke", "www.cli.test"}));
    CHECK_MESSAGE(rv2.code == 3, show(rv2));
    CHECK(rv2.err.find("alreadyRevoked") != std::string::npos);
  }

  TEST_CASE("delete and revoke --delete-after-revoke remove a stored certificate and its versions") {
    Cli c;
    AUTOTLS_START_PEBBLE(env, PebbleOptions{});
    c.env = std::move(env);
    for (const char* name : {"a.del.cli.test", "b.del.cli.test", "c.del.cli.test"}) {
      auto r = run(c.args({"issue", "-d", name}, {"--agree-tos", "--http-address", c.http()}));
      REQUIRE_MESSAGE(r.code == 0, show(r));
    }
    fs::path live = c.storage() / "live", archive = c.storage() / "archive";

    auto d = run(c.args({"delete", "a.del.cli.test"}, {"--json"}));
    REQUIRE_MESSAGE(d.code == 0, show(d));
    auto dj = last_json_line(d.out);
    CHECK(dj["status"] == "deleted");
    CHECK(dj["names"] == json::array({"a.del.cli.test"}));
    CHECK_FALSE(fs::exists(fs::symlink_status(live / "a.del.cli.test")));
    CHECK_FALSE(fs::exists(archive / "a.del.cli.test"));
    CHECK(fs::exists(live / "b.del.cli.test" / "privkey.pem"));
    auto l = run(c.args({"list"}, {"--json"}));
    REQUIRE_MESSAGE(l.code == 0, show(l));
    auto certs = last_json_line(l.out)["certificates"];
    REQUIRE(certs.size() == 2);
    CHECK(certs[0]["name"] == "b.del.cli.test");
    // Twice, or a name never stored: a usage error naming it.
    auto again = run(c.args({"delete", "a.del.cli.test"}));
    CHECK_MESSAGE(again.code == 2, show(again));
    CHECK(again.err.find("no stored certificate named a.del.cli.test") != std::string::npos);
    CHECK(run(c.args({"delete"})).code == 2);

    // A renewal holding the certificate's storage lock: delete waits, then gives up and deletes nothing.
    fs::create_directories(c.storage() / "locks");
    write_file(c.storage() / "locks" / "cert%c.del.cli.test.lock",
               json({{"owner", "another-process"}, {"expires", ::time(nullptr) + 3600}}).dump());
    auto locked = run(c.args({"delete", "c.del.cli.test"}));
    CHECK_MESSAGE(locked.code == 6, show(locked));
    CHECK(locked.err.find("holds the storage lock of c.del.cli.test") != std::string::npos);
    CHECK(fs::exists(live / "c.del.cli.test" / "privkey.pem"));

    // --delete-after-revoke: revoked at the CA, then deleted; --cert cannot be deleted.
    std::string b_cert = read_file(live / "b.del.cli.test" / "cert.pem");
    write_file(c.dir.path / "b.pem", b_cert);
    auto bad = run(c.args({"revoke", "--cert", (c.dir.path / "b.pem").string()}, {"--delete-after-revoke"}));
    CHECK_MESSAGE(bad.code == 2, show(bad));
    CHECK(bad.err.find("--delete-after-revoke needs a stored NAME") != std::string::npos);
    auto rv = run(c.args({"revoke", "b.del.cli.test"}, {"--delete-after-revoke", "--json"}));
    REQUIRE_MESSAGE(rv.code == 0, show(rv));
    CHECK(last_json_line(rv.out)["status"] == "deleted");
    CHECK_FALSE(fs::exists(fs::symlink_status(live / "b.del.cli.test")));
    CHECK_FALSE(fs::exists(archive / "b.del.cli.test"));
    // It was revoked: the CA refuses it a second time.
    auto rv2 = run(c.args({"revoke", "--cert", (c.dir.path / "b.pem").string()}));
    CHECK_MESSAGE(rv2.code == 3, show(rv2));
    CHECK(rv2.err.find("alreadyRevoked") != std::string::npos);
  }

  TEST_CASE("delete asks on a terminal, and not with --yes, --json or without a terminal") {
    // The internal CA: no network, so this runs without Pebble.
    TempDir d;
    const std::string storage = (d.path / "s").string();
    const fs::path live = d.path / "s" / "live", archive = d.path / "s" / "archive";
    for (const char* name : {"a.ask.test", "b.ask.test", "c.ask.test", "d.ask.test", "e.ask.test", "f.ask.test"}) {
      auto r = run({"issue", "-d", name, "--ca", "internal", "--storage", storage});
      REQUIRE_MESSAGE(r.code == 0, show(r));
    }
    const std::string prompt = "[y/N]";

    // No terminal (stdin /dev/null, output to files): no question, deleted, as before.
    auto plain = run({"delete", "a.ask.test", "--storage", storage});
    CHECK_MESSAGE(plain.code == 0, show(plain));
    CHECK(plain.err.find(prompt) == std::string::npos);
    CHECK_FALSE(fs::exists(fs::symlink_status(live / "a.ask.test")));
    // -y and --yes parse.
    auto y = run({"delete", "-y", "b.ask.test", "--storage", storage});
    CHECK_MESSAGE(y.code == 0, show(y));
    CHECK_FALSE(fs::exists(fs::symlink_status(live / "b.ask.test")));
    auto yes = run({"delete", "c.ask.test", "--yes", "--storage", storage});
    CHECK_MESSAGE(yes.code == 0, show(yes));
    CHECK_FALSE(fs::exists(fs::symlink_status(live / "c.ask.test")));

    // On a terminal: the question names the certificate and its files; "n" deletes nothing.
    auto no = run_on_pty({"delete", "d.ask.test", "--storage", storage}, prompt, "n\n");
    CHECK_MESSAGE(no.code == 1, no.out);
    CHECK(no.out.find("Delete the certificate d.ask.test and its files (" + (live / "d.ask.test").string() + ", " +
                      (archive / "d.ask.test").string() + ")? [y/N]") != std::string::npos);
    CHECK_MESSAGE(no.out.find("nothing deleted") != std::string::npos, no.out);
    CHECK(fs::exists(live / "d.ask.test" / "privkey.pem"));
    // The end of input (Ctrl-D) is a no too.
    auto eof = run_on_pty({"delete", "d.ask.test", "--storage", storage}, prompt, "\x04");
    CHECK_MESSAGE(eof.code == 1, eof.out);
    CHECK(fs::exists(live / "d.ask.test" / "privkey.pem"));
    // "YES" deletes.
    auto ok = run_on_pty({"delete", "d.ask.test", "--storage", storage}, prompt, "YES\n");
    CHECK_MESSAGE(ok.code == 0, ok.out);
    CHECK(ok.out.find("deleted d.ask.test") != std::string::npos);
    CHECK_FALSE(fs::exists(fs::symlink_status(live / "d.ask.test")));
    CHECK_FALSE(fs::exists(archive / "d.ask.test"));
    // --yes and --json on a terminal: no question (nothing typed; a question would wait for
    // the limit and be killed).
    auto forced = run_on_pty({"delete", "e.ask.test", "--yes", "--storage", storage}, "", "", 15s);
    CHECK_MESSAGE(forced.code == 0, forced.out);
    CHECK(forced.out.find(prompt) == std::string::npos);
    CHECK_FALSE(fs::exists(fs::symlink_status(live / "e.ask.test")));
    auto js = run_on_pty({"delete", "f.ask.test", "--json", "--storage", storage}, "", "", 15s);
    CHECK_MESSAGE(js.code == 0, js.out);
    CHECK(js.out.find(prompt) == std::string::npos);
    CHECK(js.out.find("\"status\":\"deleted\"") != std::string::npos);
    CHECK_FALSE(fs::exists(fs::symlink_status(live / "f.ask.test")));
  }

  TEST_CASE("progress is plain lines off a terminal and JSON events with --json") {
    Cli c;
    AUTOTLS_START_PEBBLE(env, PebbleOptions{});
    c.env = std::move(env);
    const std::string name = "progress.cli.test";
    // stderr is a file here: one plain line per step, no control characters.
    auto r = run(c.args({"issue", "-d", name}, {"--agree-tos", "--http-address", c.http()}));
    REQUIRE_MESSAGE(r.code == 0, show(r));
    CHECK(r.err.find('\r') == std::string::npos);
    CHECK(r.err.find('\033') == std::string::npos);
    size_t at = 0;
    for (std::string want : {"CA directory fetched: " + c.env->directory_url(), std::string("ACME account ready: "),
                             "order created for " + name, "authorization for " + name + ": using http-01",
                             "http-01 challenge presented for " + name,
                             "waiting for the CA to validate " + name + " (http-01)", name + " validated",
                             std::string("finalizing the order"), std::string("certificate downloaded: ")}) {
      auto found = r.err.find(want, at);
      CHECK_MESSAGE(found != std::string::npos, (want + "\n" + show(r)));
      if (found != std::string::npos) at = found;
    }
    // Each progress line starts with the elapsed seconds ("   0.1s  ").
    CHECK(r.err.find("s  order created for " + name) != std::string::npos);

    // --json: progress as JSON lines on stderr, stdout holds only the result objects. Another
    // name, so that Pebble has no valid authorization to reuse and every step happens.
    const std::string name2 = "json.progress.cli.test";
    auto j = run(c.args({"issue", "-d", name2}, {"--http-address", c.http(), "--json"}));
    REQUIRE_MESSAGE(j.code == 0, show(j));
    CHECK(last_json_line(j.out)["status"] == "obtained");
    CHECK(j.out.find("\"progress\"") == std::string::npos);
    std::vector<std::string> steps;
    long last_ms = -1;
    std::istringstream err(j.err);
    for (std::string line; std::getline(err, line);) {
      if (line.empty()) continue;
      auto e = json::parse(line, nullptr, false);
      REQUIRE_MESSAGE(e.is_object(), line);
      CHECK(e["event"] == "progress");
      CHECK(e["subject"] == name2);
      long ms = e["elapsed_ms"].get<long>();
      CHECK(ms >= last_ms);
      last_ms = ms;
      if (e["tick"].get<int>() == 0) steps.push_back(e["step"].get<std::string>());
      if (e["step"] == "presented") CHECK(e["challenge"] == "http-01");
    }
    std::vector<std::string> want = {"directory", "account", "order", "authorization", "presented",
                                     "validating", "validated", "finalizing"};
    REQUIRE_MESSAGE(steps.size() >= want.size() + 1, j.err);
    CHECK(std::vector<std::string>(steps.begin(), steps.begin() + want.size()) == want);
    CHECK(steps.back() == "downloaded");

    // --quiet: no progress at all.
    auto q = run(c.args({"issue", "-d", name}, {"--http-address", c.http(), "--force", "--quiet"}));
    REQUIRE_MESSAGE(q.code == 0, show(q));
    CHECK_MESSAGE(q.err.empty(), show(q));
  }

  TEST_CASE("progress on a terminal redraws a spinner line while waiting on the CA") {
    Cli c;
    AUTOTLS_START_PEBBLE(env, PebbleOptions{});
    c.env = std::move(env);
    const std::string name = "tty.cli.test";
    // util-linux script(1) runs the command on a pseudo-terminal and copies what it writes.
    std::string cmd = AUTOTLS_BINARY;
    for (const auto& a : c.args({"issue", "-d", name}, {"--agree-tos", "--http-address", c.http()})) cmd += " '" + a + "'";
    auto r = run({"-q", "-e", "-c", cmd, "/dev/null"}, {"TERM=xterm"}, 60s, {"/usr/bin/script"});
    REQUIRE_MESSAGE(r.code == 0, show(r));
    // The waiting step is drawn in place (carriage return, erase line) with a spinner frame...
    auto spin = r.out.find("\r\033[K");
    CHECK_MESSAGE(spin != std::string::npos, show(r));
    CHECK_MESSAGE(r.out.find("waiting for the CA to validate " + name + " (http-01)") != std::string::npos, show(r));
    bool framed = false;
    for (const char* f : {"| waiting", "/ waiting", "- waiting", "\\ waiting"}) framed = framed || r.out.find(f) != std::string::npos;
    CHECK_MESSAGE(framed, show(r));
    // ...and completed steps are printed as lines of their own.
    CHECK_MESSAGE(r.out.find(name + " validated") != std::string::npos, show(r));
    CHECK_MESSAGE(r.out.find("certificate downloaded: ") != std::string::npos, show(r));
    // The spinner line is erased before the result is printed.
    auto result = r.out.find("Certificate obtained for " + name);
    CHECK_MESSAGE(result != std::string::npos, show(r));
    CHECK(r.out.rfind("\r\033[K") < result);
  }

  TEST_CASE("tls-alpn-01 standalone with an rsa key and revoke by certificate key") {
    Cli c;
    AUTOTLS_START_PEBBLE(env, PebbleOptions{});
    c.env = std::move(env);
    auto r = run(c.args({"issue", "-d", "alpn.cli.test"},
                        {"--agree-tos", "--challenge", "tls-alpn-01", "--key-type", "rsa2048", "--tls-address",
                         "127.0.0.1:" + std::to_string(c.env->tls_port()), "--json"}));
    REQUIRE_MESSAGE(r.code == 0, show(r));
    auto j = last_json_line(r.out);
    CHECK(j["status"] == "obtained");
    CHECK(j["key_type"] == "rsa2048");
    fs::path live = c.storage() / "live" / "alpn.cli.test";
    auto rv = run(c.args({"revoke"}, {"--cert", (live / "cert.pem").string(), "--key", (live / "privkey.pem").string(),
                                      "--reason", "keyCompromise"}));
    CHECK_MESSAGE(rv.code == 0, show(rv));
  }

  TEST_CASE("dns-01 through a hook script that calls challtestsrv") {
    Cli c;
    AUTOTLS_START_PEBBLE(env, PebbleOptions{});
    c.env = std::move(env);
    fs::path hook = c.dir.path / "dns-hook.sh";
    std::string mgmt = c.env->challtestsrv_management_url();
    write_file(hook,
               "#!/bin/sh\n"
               "# dns-hook add|del <record> <value>\n"
               "set -e\n"
               "echo \"$1 $2\" >> " + (c.dir.path / "dns-hook.log").string() + "\n"
               "if [ \"$1\" = add ]; then\n"
               "  curl -fsS -X POST -d \"{\\\"host\\\":\\\"$2.\\\",\\\"value\\\":\\\"$3\\\"}\" " + mgmt + "/set-txt\n"
               "else\n"
               "  curl -fsS -X POST -d \"{\\\"host\\\":\\\"$2.\\\"}\" " + mgmt + "/clear-txt\n"
               "fi\n",
               true);
    auto r = run(c.args({"issue", "-d", "*.wild.cli.test", "-d", "wild.cli.test"},
                        {"--agree-tos", "--challenge", "dns-01", "--dns-hook", hook.string()}));
    REQUIRE_MESSAGE(r.code == 0, show(r));
    CHECK(fs::exists(c.storage() / "live" / "_wildcard_.wild.cli.test" / "fullchain.pem"));
    auto log = read_file(c.dir.path / "dns-hook.log");
    CHECK(log.find("add _acme-challenge.wild.cli.test") != std::string::npos);
    CHECK(log.find("del _acme-challenge.wild.cli.test") != std::string::npos);
  }

  TEST_CASE("dns-01 by RFC 2136 against BIND with a TSIG key") {
    if (!autotls::testing::BindEnv::available()) {
      if (PebbleEnv::required_by_ci()) FAIL("named not installed and CI=true: install Debian package bind9 (tools/setup)");
      MESSAGE("SKIPPED: named not installed (Debian package bind9)");
      return;
    }
    auto bind_result = autotls::testing::BindEnv::start("cli.test");
    REQUIRE_MESSAGE(bind_result.has_value(), bind_result.error().message);
    auto bind = std::move(*bind_result);
    PebbleOptions po;
    po.dns_server = bind->address();  // Pebble looks up _acme-challenge TXT records at BIND
    po.authz_reuse_percent = 0;       // almost every order, the renewal's too, is validated again
    Cli c;
    AUTOTLS_START_PEBBLE(env, po);
    c.env = std::move(env);
    auto no_secret = [&](const Run& r) {
      return r.out.find(bind->secret_base64()) == std::string::npos && r.err.find(bind->secret_base64()) == std::string::npos;
    };

    // A secret BIND does not have: it answers BADSIG, the command names it and fails.
    std::string wrong = "acme-key:hmac-sha256:" + std::string("c2VjcmV0LXRoYXQtYmluZC1kb2VzLW5vdC1rbm93Cg==");
    auto bad = run(c.args({"issue", "-d", "bad.cli.test"},
                          {"--agree-tos", "--challenge", "dns-01", "--dns-server", bind->address(), "--tsig-key", wrong}),
                   {}, 60s);
    CHECK_MESSAGE(bad.code == 6, show(bad));
    CHECK_MESSAGE(bad.err.find("BADSIG") != std::string::npos, show(bad));
    CHECK(bad.err.find("c2VjcmV0LXRoYXQtYmluZC1kb2VzLW5vdC1rbm93") == std::string::npos);
    // A key name BIND does not know: BADKEY.
    auto unknown = run(c.args({"issue", "-d", "bad.cli.test"},
                              {"--agree-tos", "--challenge", "dns-01", "--dns-server", bind->address(), "--tsig-key",
                               "other-key:hmac-sha256:" + bind->secret_base64()}),
                       {}, 60s);
    CHECK_MESSAGE(unknown.code == 6, show(unknown));
    CHECK_MESSAGE(unknown.err.find("BADKEY") != std::string::npos, show(unknown));
    CHECK(no_secret(unknown));

    // The key in BIND's file format; a wildcard and its apex share one record name.
    auto r = run(c.args({"issue", "-d", "*.bind.cli.test", "-d", "bind.cli.test"},
                        {"--agree-tos", "--challenge", "dns-01", "--dns-server", bind->address(), "--tsig-key",
                         bind->key_file().string()}));
    REQUIRE_MESSAGE(r.code == 0, (show(r) + "\n" + bind->log_tail()));
    CHECK(fs::exists(c.storage() / "live" / "_wildcard_.bind.cli.test" / "fullchain.pem"));
    auto log = read_file(bind->dir() / "named.log");
    CHECK_MESSAGE(log.find("adding an RR at '_acme-challenge.bind.cli.test' TXT") != std::string::npos, log);
    CHECK_MESSAGE(log.find("deleting an RR at _acme-challenge.bind.cli.test TXT") != std::string::npos, log);

    // The inline form, then renew --force reusing it from renewal.json (kept 0600).
    auto r2 = run(c.args({"issue", "-d", "inline.cli.test"},
                         {"--agree-tos", "--challenge", "dns-01", "--dns-server", bind->address(), "--tsig-key",
                          bind->tsig_key(), "--json"}));
    REQUIRE_MESSAGE(r2.code == 0, show(r2));
    CHECK(no_secret(r2));
    struct stat st{};
    REQUIRE(::stat((c.storage() / "live" / "inline.cli.test" / "renewal.json").c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0600);
    // Pebble reuses a valid authorization 1 time in 100 even with PEBBLE_AUTHZREUSE=0 (it makes
    // a new one when rand.Intn(100) > 0), and then the renewal presents no challenge. Count the
    // dns-01 challenges each renewal presented (its --json progress on stderr) and renew again,
    // a bounded number of times, until one did.
    size_t presented = 0;
    for (int attempt = 0; attempt < 4 && presented == 0; ++attempt) {
      auto rn = run(c.args({"renew", "inline.cli.test"}, {"--force", "--json"}));
      REQUIRE_MESSAGE(rn.code == 0, show(rn));
      CHECK(last_json_line(rn.out).value("action", "") == "renewed");
      CHECK(no_secret(rn));
      std::istringstream err(rn.err);
      for (std::string line; std::getline(err, line);) {
        auto e = json::parse(line, nullptr, false);
        if (e.is_object() && e.value("event", "") == "progress" && e.value("step", "") == "presented" &&
            e.value("tick", 1) == 0) {
          CHECK(e.value("challenge", "") == "dns-01");
          ++presented;
        }
      }
    }
    CHECK(presented == 1);
    // The issue and the renewal that presented a challenge went through BIND (renew took dns-01
    // from renewal.json): one TXT record added for each.
    auto full_log = read_file(bind->dir() / "named.log");
    size_t adds = 0;
    for (size_t at = 0; (at = full_log.find("adding an RR at '_acme-challenge.inline.cli.test' TXT", at)) != std::string::npos; ++at) {
      ++adds;
    }
    CHECK_MESSAGE(adds == 1 + presented, full_log);

    // serve takes the same dns-01 settings, here from its config file: a wildcard and its apex
    // through BIND, then SIGTERM exits 0.
    fs::path www = c.dir.path / "www";
    fs::create_directories(www);
    fs::path config = c.dir.path / "serve-dns.json";
    write_file(config, json{{"challenge", "dns-01"}, {"dns-server", bind->address()},
                            {"tsig-key", bind->key_file().string()}}.dump());
    std::vector<std::string> argv = {AUTOTLS_BINARY, "serve"};
    for (const auto& a : c.common()) argv.push_back(a);
    for (const auto& a : std::vector<std::string>{
             "--config", config.string(), "-d", "*.serve.cli.test", "-d", "serve.cli.test", "--agree-tos",
             "--https-address", "127.0.0.1:" + std::to_string(free_port()), "--http-address",
             "127.0.0.1:" + std::to_string(free_port()), "--root", www.string(), "--drain", "1", "--admin-address", "off"}) {
      argv.push_back(a);
    }
    pid_t pid = spawn(argv, c.dir.path / "serve.out", c.dir.path / "serve.err", {});
    auto out = [&] { return read_file(c.dir.path / "serve.out"); };
    auto deadline = std::chrono::steady_clock::now() + 60s;
    bool exited = false;
    while (std::chrono::steady_clock::now() < deadline && out().find(" obtained ") == std::string::npos) {
      int status = 0;
      if (::waitpid(pid, &status, WNOHANG) == pid) {
        exited = true;
        break;
      }
      std::this_thread::sleep_for(100ms);
    }
    if (!exited) ::kill(pid, SIGTERM);
    int code = exited ? -1 : wait_exit(pid, 20s);
    std::string err = read_file(c.dir.path / "serve.err");
    CHECK_MESSAGE(code == 0, (out() + err + bind->log_tail()));
    CHECK_MESSAGE(fs::exists(c.storage() / "live" / "_wildcard_.serve.cli.test" / "fullchain.pem"), (out() + err));
    auto serve_log = read_file(bind->dir() / "named.log");
    CHECK_MESSAGE(serve_log.find("adding an RR at '_acme-challenge.serve.cli.test' TXT") != std::string::npos, serve_log);
    CHECK(out().find(bind->secret_base64()) == std::string::npos);
    CHECK(err.find(bind->secret_base64()) == std::string::npos);
  }

  TEST_CASE("serve refuses incomplete dns-01 settings before listening") {
    TempDir d;
    fs::create_directories(d.path / "www");
    auto serve = [&](std::vector<std::string> extra) {
      std::vector<std::string> a = {"serve", "-d", "a.test", "--storage", (d.path / "s").string(), "--root",
                                    (d.path / "www").string(), "--https-address", "127.0.0.1:0", "--http-address",
                                    "127.0.0.1:0", "--challenge", "dns-01"};
      a.insert(a.end(), extra.begin(), extra.end());
      return run(a, {}, 20s);
    };
    auto none = serve({});
    CHECK_MESSAGE(none.code == 2, show(none));
    CHECK_MESSAGE(none.err.find("--dns-server HOST[:PORT] with --tsig-key") != std::string::npos, show(none));
    auto no_key = serve({"--dns-server", "127.0.0.1:1"});
    CHECK_MESSAGE(no_key.code == 2, show(no_key));
    CHECK_MESSAGE(no_key.err.find("--dns-server needs --tsig-key") != std::string::npos, show(no_key));
    auto both = serve({"--dns-server", "127.0.0.1:1", "--dns-hook", "/bin/true"});
    CHECK_MESSAGE(both.code == 2, show(both));
    CHECK_MESSAGE(both.err.find("not both") != std::string::npos, show(both));
    auto zone_alone = serve({"--dns-hook", "/bin/true", "--dns-zone", "a.test"});
    CHECK_MESSAGE(zone_alone.code == 2, show(zone_alone));
    CHECK_MESSAGE(zone_alone.err.find("need --dns-server") != std::string::npos, show(zone_alone));
    // A malformed key from the config file: exit 2, and the secret is not repeated.
    fs::path config = d.path / "dns.json";
    write_file(config, R"({"dns-server": "127.0.0.1:1", "tsig-key": "k:hmac-md99:c2VjcmV0c2VjcmV0"})");
    auto bad_key = serve({"--config", config.string()});
    CHECK_MESSAGE(bad_key.code == 2, show(bad_key));
    CHECK(bad_key.err.find("c2VjcmV0c2VjcmV0") == std::string::npos);
  }

  TEST_CASE("renew off a terminal waits a random delay unless told not to") {
    PebbleOptions po;
    po.certificate_validity_seconds = 6;  // due once half of this short lifetime has passed
    Cli c;
    AUTOTLS_START_PEBBLE(env, po);
    c.env = std::move(env);
    auto r = run(c.args({"issue", "-d", "cron.cli.test"}, {"--agree-tos", "--http-address", c.http()}));
    REQUIRE_MESSAGE(r.code == 0, show(r));
    std::this_thread::sleep_for(3500ms);
    // stdout is a file here, as under cron: renew sleeps (at most 1 s) before renewing.
    auto rn = run(c.args({"renew"}, {"--max-random-sleep", "1", "--http-address", c.http()}));
    CHECK_MESSAGE(rn.code == 0, show(rn));
    CHECK_MESSAGE(rn.err.find("not on a terminal: sleeping") != std::string::npos, show(rn));
    CHECK_MESSAGE(rn.out.find("renewed cron.cli.test") != std::string::npos, show(rn));
    std::this_thread::sleep_for(3500ms);
    auto quiet = run(c.args({"renew"}, {"--no-random-sleep", "--http-address", c.http()}));
    CHECK_MESSAGE(quiet.code == 0, show(quiet));
    CHECK(quiet.err.find("sleeping") == std::string::npos);
  }

  TEST_CASE("unicode names are issued as punycode and shown both ways") {
    Cli c;
    AUTOTLS_START_PEBBLE(env, PebbleOptions{});
    c.env = std::move(env);
    // An invalid IDN is a usage error before anything is contacted.
    auto bad = run(c.args({"issue", "-d", "\xe2\x98\x83.cli.test"}, {"--agree-tos", "--http-address", c.http()}));
    CHECK_MESSAGE(bad.code == 2, show(bad));
    CHECK_MESSAGE(bad.err.find("not a valid internationalized domain name") != std::string::npos, show(bad));
    CHECK_FALSE(fs::exists(c.storage() / "accounts"));
    auto bad_puny = run(c.args({"issue", "-d", "xn--zz.cli.test"}, {"--agree-tos", "--http-address", c.http()}));
    CHECK_MESSAGE(bad_puny.code == 2, show(bad_puny));

    // "bücher" in UTF-8; NFC and TR46 mapping lower-case "B".
    auto r = run(c.args({"issue", "-d", "Bücher.cli.test"}, {"--agree-tos", "--http-address", c.http()}));
    REQUIRE_MESSAGE(r.code == 0, show(r));
    CHECK(fs::exists(c.storage() / "live" / "xn--bcher-kva.cli.test" / "fullchain.pem"));
    CHECK_MESSAGE(r.out.find("xn--bcher-kva.cli.test (bücher.cli.test)") != std::string::npos, show(r));
    CHECK_MESSAGE(r.err.find("xn--bcher-kva.cli.test (bücher.cli.test)") != std::string::npos, show(r));
    // The punycode form names the same certificate; --json has both forms.
    auto again = run(c.args({"issue", "-d", "xn--bcher-kva.cli.test"}, {"--http-address", c.http(), "--force", "--json"}));
    REQUIRE_MESSAGE(again.code == 0, show(again));
    auto j = last_json_line(again.out);
    CHECK(j["names"] == json::array({"xn--bcher-kva.cli.test"}));
    CHECK(j["unicode_names"] == json::array({"bücher.cli.test"}));
    auto rn = run(c.args({"renew", "bücher.cli.test"}, {"--no-random-sleep"}));
    CHECK_MESSAGE(rn.code == 1, show(rn));
    CHECK_MESSAGE(rn.out.find("skipped xn--bcher-kva.cli.test (bücher.cli.test): not due") != std::string::npos, show(rn));
    // list shows both forms too: the certificate's line and its names; --json has unicode_names.
    auto ls = run(c.args({"list"}, {}));
    REQUIRE_MESSAGE(ls.code == 0, show(ls));
    CHECK_MESSAGE(ls.out.find("xn--bcher-kva.cli.test (bücher.cli.test)\n") != std::string::npos, show(ls));
    CHECK_MESSAGE(ls.out.find("names:         xn--bcher-kva.cli.test (bücher.cli.test)") != std::string::npos, show(ls));
    auto lj = run(c.args({"list", "--json"}, {}));
    REQUIRE_MESSAGE(lj.code == 0, show(lj));
    auto certs = last_json_line(lj.out)["certificates"];
    REQUIRE(certs.size() == 1);
    CHECK(certs[0]["names"] == json::array({"xn--bcher-kva.cli.test"}));
    CHECK(certs[0]["unicode_names"] == json::array({"bücher.cli.test"}));
  }

  TEST_CASE("issue refuses a wildcard an ACME CA would be asked to validate without dns-01, the internal CA issues it") {
    TempDir d;
    std::string storage = (d.path / "s").string();
    // No CA is asked: the address below is never connected to (exit 2, not 4).
    for (const auto& extra : std::vector<std::vector<std::string>>{
             {"--ca", "https://127.0.0.1:1/dir"},
             {"--ca", "https://127.0.0.1:1/dir", "--challenge", "tls-alpn-01"},
             {"--issuer", "internal", "--issuer", "https://127.0.0.1:1/dir"}}) {
      std::vector<std::string> args = {"issue", "-d", "*.Wild.test", "-d", "wild.test", "--storage", storage};
      args.insert(args.end(), extra.begin(), extra.end());
      auto r = run(args);
      CHECK_MESSAGE(r.code == 2, show(r));
      CHECK_MESSAGE(r.err.find("issue: *.wild.test: a wildcard certificate needs --challenge dns-01") != std::string::npos, show(r));
    }
    auto ok = run({"issue", "-d", "*.wild.test", "--ca", "internal", "--storage", storage});
    CHECK_MESSAGE(ok.code == 0, show(ok));
    CHECK(fs::exists(d.path / "s" / "live" / "_wildcard_.wild.test" / "fullchain.pem"));
  }

  TEST_CASE("issue takes an IPv6 address in any spelling as its canonical text") {
    TempDir d;
    std::string storage = (d.path / "s").string();
    auto r = run({"issue", "--ip", "0:0:0:0:0:0:0:1", "-d", "ip6.test", "--ca", "internal", "--storage", storage, "--json"});
    REQUIRE_MESSAGE(r.code == 0, show(r));
    CHECK_MESSAGE(last_json_line(r.out)["unicode_names"] == json::array({"ip6.test", "::1"}), show(r));
    // Written another way, the same certificate: nothing issued.
    auto again = run({"issue", "--ip", "::1", "-d", "IP6.test", "--ca", "internal", "--storage", storage, "--json"});
    CHECK_MESSAGE(last_json_line(again.out).value("status", "") == "nothing to do", show(again));
  }

  TEST_CASE("issue --out writes the certificate files into a directory and renew keeps it current") {
    // The internal CA: no network, so this runs without Pebble.
    TempDir d;
    std::string storage = (d.path / "s").string();
    fs::path out = d.path / "etc" / "ssl" / "site";
    // A file where the directory should be: a usage error before anything is issued.
    write_file(d.path / "plain", "x");
    auto not_dir = run({"issue", "-d", "out.test", "--ca", "internal", "--storage", storage, "--out",
                        (d.path / "plain").string()});
    CHECK_MESSAGE(not_dir.code == 2, show(not_dir));
    CHECK(not_dir.err.find("not a directory") != std::string::npos);

    auto r = run({"issue", "-d", "out.test", "--ca", "internal", "--storage", storage, "--out", out.string()});
    REQUIRE_MESSAGE(r.code == 0, show(r));
    CHECK_MESSAGE(r.out.find("copied to:     " + out.string()) != std::string::npos, show(r));
    fs::path live = d.path / "s" / "live" / "out.test";
    for (const char* f : {"fullchain.pem", "privkey.pem", "cert.pem", "chain.pem"}) {
      CHECK_MESSAGE(read_file(out / f) == read_file(live / f), f);
    }
    CHECK((fs::status(out / "privkey.pem").permissions() & (fs::perms::group_all | fs::perms::others_all)) ==
          fs::perms::none);
    // Nothing to do (exit 1) still fills a directory that lost its files.
    fs::remove(out / "fullchain.pem");
    auto again = run({"issue", "-d", "out.test", "--ca", "internal", "--storage", storage, "--out", out.string()});
    CHECK_MESSAGE(again.code == 1, show(again));
    CHECK(read_file(out / "fullchain.pem") == read_file(live / "fullchain.pem"));
    // renew takes --out from renewal.json: the new certificate lands there too.
    auto first = read_file(out / "cert.pem");
    auto rn = run({"renew", "--force", "--ca", "internal", "--storage", storage, "--no-random-sleep"});
    REQUIRE_MESSAGE(rn.code == 0, show(rn));
    CHECK(read_file(out / "cert.pem") != first);
    CHECK(read_file(out / "cert.pem") == read_file(live / "cert.pem"));
    CHECK(read_file(out / "privkey.pem") == read_file(live / "privkey.pem"));
  }

  TEST_CASE("--storage-sync per-file and the storage-sync key store a certificate, another value is a usage error") {
    // The internal CA: no network. What each mode syncs is tested on FileStorage
    // (tlsreload.storage); here, that the flag and the key reach it and the files land.
    TempDir d;
    std::string storage = (d.path / "s").string();
    auto bad = run({"issue", "-d", "sync.test", "--ca", "internal", "--storage", storage, "--storage-sync", "never"});
    CHECK_MESSAGE(bad.code == 2, show(bad));
    CHECK_MESSAGE(bad.err.find("--storage-sync") != std::string::npos, show(bad));
    CHECK_FALSE(fs::exists(d.path / "s" / "live" / "sync.test"));

    auto r = run({"issue", "-d", "sync.test", "--ca", "internal", "--storage", storage, "--storage-sync", "per-file"});
    REQUIRE_MESSAGE(r.code == 0, show(r));
    for (const char* f : {"fullchain.pem", "privkey.pem", "cert.pem", "chain.pem", "meta.json"}) {
      CHECK_MESSAGE(fs::is_regular_file(d.path / "s" / "live" / "sync.test" / f), f);
    }

    const fs::path config = d.path / "autotls.json";
    write_file(config, "{\"storage-sync\": \"per-file\"}\n");
    auto rn = run({"renew", "--force", "--ca", "internal", "--storage", storage, "--config", config.string(),
                   "--no-random-sleep"});
    CHECK_MESSAGE(rn.code == 0, show(rn));
    write_file(config, "{\"storage-sync\": \"sometimes\"}\n");
    auto bad_key = run({"list", "--storage", storage, "--config", config.string()});
    CHECK_MESSAGE(bad_key.code == 2, show(bad_key));
    CHECK_MESSAGE(bad_key.err.find("storage-sync") != std::string::npos, show(bad_key));
  }

  TEST_CASE("http-01 through a webroot served by another web server") {
    Cli c;
    AUTOTLS_START_PEBBLE(env, PebbleOptions{});
    c.env = std::move(env);
    fs::path webroot = c.dir.path / "webroot";
    fs::create_directories(webroot);
    httplib::Server web;
    std::atomic<int> hits{0};
    web.set_pre_routing_handler([&](const httplib::Request& req, httplib::Response&) {
      if (req.path.starts_with("/.well-known/acme-challenge/")) ++hits;
      return httplib::Server::HandlerResponse::Unhandled;
    });
    REQUIRE(web.set_mount_point("/", webroot.string()));
    REQUIRE(web.bind_to_port("127.0.0.1", c.env->http_port()));
    std::thread t([&] { web.listen_after_bind(); });
    auto r = run(c.args({"issue", "-d", "webroot.cli.test"}, {"--agree-tos", "--webroot", webroot.string()}));
    web.stop();
    t.join();
    CHECK_MESSAGE(r.code == 0, show(r));
    CHECK(hits.load() >= 1);
    CHECK(fs::exists(c.storage() / "live" / "webroot.cli.test" / "fullchain.pem"));
    // The challenge files are removed afterwards.
    CHECK(fs::is_empty(webroot / ".well-known" / "acme-challenge"));
  }

  TEST_CASE("failures map to exit codes 5 and 6") {
    Cli c;
    AUTOTLS_START_PEBBLE(env, PebbleOptions{});
    c.env = std::move(env);
    // Nobody answers where Pebble validates: the challenge is invalid, exit 5.
    auto v = run(c.args({"issue", "-d", "nobody.cli.test"},
                        {"--agree-tos", "--http-address", "127.0.0.1:" + std::to_string(free_port())}));
    CHECK_MESSAGE(v.code == 5, show(v));
    CHECK(v.err.find("validation of nobody.cli.test") != std::string::npos);
    auto l = run(c.args({"list"}, {"--json"}));
    CHECK(last_json_line(l.out)["certificates"].empty());

    // The standalone port is taken: a clear message, exit 6.
    autotls::testing::BusyPort taken;
    int busy = taken.port();
    auto p = run(c.args({"issue", "-d", "busy.cli.test"}, {"--agree-tos", "--http-address", "127.0.0.1:" + std::to_string(busy)}));
    taken.close();
    CHECK_MESSAGE(p.code == 6, show(p));
    CHECK(p.err.find("port " + std::to_string(busy) + " is in use by another process: use --webroot or --http-address") !=
          std::string::npos);
  }
}

TEST_SUITE("cli.account") {
  TEST_CASE("exit codes 3 and 5 from a fake CA over HTTP with the problem document") {
    // The test tree's fake CA on loopback: it never connects back, so validation results and
    // problem documents are chosen by the test.
    autotls::testing::FakeAcmeServer::Options o;
    o.failing_identifiers = {"bad.cli.test"};
    autotls::testing::FakeCaEndpoint ep(o);
    REQUIRE(ep.port() > 0);
    TempDir dir;
    auto args = [&](std::initializer_list<std::string> more) {
      std::vector<std::string> a = {"issue", "--ca", ep.directory_url(), "--storage", (dir.path / "storage").string(),
                                    "--agree-tos", "--http-address", "127.0.0.1:" + std::to_string(free_port())};
      a.insert(a.end(), more);
      return a;
    };
    auto ok = run(args({"-d", "good.cli.test"}));
    REQUIRE_MESSAGE(ok.code == 0, show(ok));

    // Validation failed: 5, with the challenge's error.
    auto v = run(args({"-d", "bad.cli.test"}));
    CHECK_MESSAGE(v.code == 5, show(v));
    CHECK_MESSAGE(v.err.find("incorrectResponse") != std::string::npos, show(v));

    // rateLimited with Retry-After: 3, the problem type and detail, and when to retry.
    std::atomic<bool> limit{true};
    ep.ca().intercept = [&](const autotls::acme::HttpRequest& req) -> std::optional<autotls::acme::HttpResponse> {
      if (limit && req.method == "POST" && req.url.ends_with("/new-order")) {
        return autotls::testing::make_problem(ep.ca(), 429, "rateLimited",
                                              "too many certificates (5) already issued for this exact set of identifiers",
                                              {{"Retry-After", "7200"}});
      }
      return std::nullopt;
    };
    auto rl = run(args({"-d", "limited.cli.test"}));
    CHECK_MESSAGE(rl.code == 3, show(rl));
    CHECK_MESSAGE(rl.err.find("urn:ietf:params:acme:error:rateLimited") != std::string::npos, show(rl));
    CHECK_MESSAGE(rl.err.find("too many certificates (5)") != std::string::npos, show(rl));
    auto at = rl.err.find("retry after ");
    REQUIRE_MESSAGE(at != std::string::npos, show(rl));
    // About two hours from now, as an RFC 3339 UTC time.
    std::string when = rl.err.substr(at + 12, 19);
    std::tm tm{};
    REQUIRE_MESSAGE(::strptime(when.c_str(), "%Y-%m-%dT%H:%M:%S", &tm) != nullptr, when);
    auto delta = ::timegm(&tm) - std::time(nullptr);
    CHECK_MESSAGE((delta > 7000 && delta <= 7200), when);
    auto rlj = run(args({"-d", "limited.cli.test", "--json"}));
    CHECK(rlj.code == 3);
    auto j = last_json_line(rlj.out);
    CHECK(j.value("exit_code", 0) == 3);
    CHECK(j["error"]["problem"]["type"] == "urn:ietf:params:acme:error:rateLimited");
    CHECK(j["error"].contains("retry_after"));

    // Any other refusal: 3 with the problem document.
    limit = false;
    ep.ca().intercept = [&](const autotls::acme::HttpRequest& req) -> std::optional<autotls::acme::HttpResponse> {
      if (req.method == "POST" && req.url.ends_with("/new-order")) {
        return autotls::testing::make_problem(ep.ca(), 400, "rejectedIdentifier", "cli.test is on a block list");
      }
      return std::nullopt;
    };
    auto rej = run(args({"-d", "rejected.cli.test"}));
    CHECK_MESSAGE(rej.code == 3, show(rej));
    CHECK_MESSAGE(rej.err.find("problem: urn:ietf:params:acme:error:rejectedIdentifier") != std::string::npos, show(rej));
    CHECK_MESSAGE(rej.err.find("detail: cli.test is on a block list") != std::string::npos, show(rej));
    ep.ca().intercept = nullptr;
  }

  TEST_CASE("revoke records revoked and serve renews it and runs the event hook for every event") {
    autotls::testing::FakeAcmeServer::Options o;
    o.failing_identifiers = {"bad.cli.test"};
    autotls::testing::FakeCaEndpoint ep(o);
    REQUIRE(ep.port() > 0);
    TempDir dir;
    const std::string storage = (dir.path / "storage").string();
    fs::path hook_out = dir.path / "events.txt";
    // Names, paths and errors reach the hook only in its environment.
    std::string hook = "printf '%s|%s|%s|%s\\n' \"$AUTOTLS_EVENT\" \"$AUTOTLS_NAMES\" \"$AUTOTLS_META_PATH\" "
                       "\"$AUTOTLS_ERROR\" >> " + hook_out.string();
    auto ok = run({"issue", "--ca", ep.directory_url(), "--storage", storage, "--agree-tos", "--http-address",
                   "127.0.0.1:" + std::to_string(free_port()), "-d", "good.cli.test"});
    REQUIRE_MESSAGE(ok.code == 0, show(ok));
    fs::path meta = fs::path(storage) / "live" / "good.cli.test" / "meta.json";

    auto rv = run({"revoke", "good.cli.test", "--ca", ep.directory_url(), "--storage", storage, "--reason",
                   "keyCompromise", "--json", "--event-hook", hook});
    REQUIRE_MESSAGE(rv.code == 0, show(rv));
    CHECK(ep.ca().revoked_serials().size() == 1);
    auto rj = last_json_line(rv.out);
    CHECK(rj.value("event", "") == "revoked");
    CHECK(!rj.value("revoked_at", "").empty());
    auto mj = json::parse(read_file(meta), nullptr, false);
    REQUIRE(mj.is_object());
    CHECK(mj["revoked"]["reason"] == "keyCompromise");
    CHECK(read_file(hook_out) == "revoked|good.cli.test|" + meta.string() + "|\n");
    fs::remove(hook_out);

    // serve starts on the revoked certificate: revoked, then renewed at once; the name the CA
    // refuses gives a failed event with the error.
    fs::path www = dir.path / "www";
    fs::create_directories(www);
    std::vector<std::string> argv = {AUTOTLS_BINARY, "serve", "--ca", ep.directory_url(), "--storage", storage,
                                     "-d", "good.cli.test", "-d", "bad.cli.test", "--https-address",
                                     "127.0.0.1:" + std::to_string(free_port()), "--http-address",
                                     "127.0.0.1:" + std::to_string(free_port()), "--root", www.string(), "--json",
                                     "--drain", "1", "--admin-address", "off", "--event-hook", hook};
    pid_t pid = spawn(argv, dir.path / "serve.out", dir.path / "serve.err", {});
    auto deadline = std::chrono::steady_clock::now() + 30s;
    auto has = [&](const std::string& what) { return read_file(hook_out).find(what) != std::string::npos; };
    while (std::chrono::steady_clock::now() < deadline && !(has("renewed|good.cli.test|") && has("failed|bad.cli.test|"))) {
      int status = 0;
      if (::waitpid(pid, &status, WNOHANG) == pid) break;
      std::this_thread::sleep_for(100ms);
    }
    REQUIRE(::kill(pid, SIGTERM) == 0);
    int code = wait_exit(pid, 20s);
    std::string events = read_file(hook_out);
    std::string logs = read_file(dir.path / "serve.out") + read_file(dir.path / "serve.err");
    CHECK_MESSAGE(code == 0, logs);
    CHECK_MESSAGE(events.find("revoked|good.cli.test|" + meta.string() + "|\n") != std::string::npos, (events + logs));
    CHECK_MESSAGE(events.find("renewed|good.cli.test|") != std::string::npos, (events + logs));
    CHECK_MESSAGE(events.find("revoked|") < events.find("renewed|"), events);
    auto failed = events.find("failed|bad.cli.test|");
    REQUIRE_MESSAGE(failed != std::string::npos, (events + logs));
    CHECK_MESSAGE(events.find("incorrectResponse", failed) != std::string::npos, events);
    // The renewed certificate is no longer marked revoked.
    auto after = json::parse(read_file(meta), nullptr, false);
    REQUIRE(after.is_object());
    CHECK_FALSE(after.contains("revoked"));
  }

  TEST_CASE("serve gives an issuance in flight the drain period then abandons it and frees its lock") {
    autotls::testing::FakeAcmeServer::Options o;
    o.order_processing_polls = 4;  // about 4 s in "processing" after finalize
    o.poll_retry_after = 1;
    autotls::testing::FakeCaEndpoint ep(o);
    REQUIRE(ep.port() > 0);
    std::atomic<bool> finalized{false};
    ep.ca().intercept = [&](const autotls::acme::HttpRequest& req) -> std::optional<autotls::acme::HttpResponse> {
      if (req.url.find("/finalize/") != std::string::npos) finalized = true;
      return std::nullopt;
    };
    TempDir dir;
    const std::string storage = (dir.path / "storage").string();
    fs::create_directories(dir.path / "www");
    // serve_until_finalize starts serve for name, sends SIGTERM once the order is finalized
    // (in processing) and returns the exit code.
    auto serve_until_finalize = [&](const std::string& name, const std::string& drain) {
      finalized = false;
      std::vector<std::string> argv = {AUTOTLS_BINARY, "serve", "--ca", ep.directory_url(), "--storage", storage,
                                       "--agree-tos", "-d", name, "--https-address",
                                       "127.0.0.1:" + std::to_string(free_port()), "--http-address",
                                       "127.0.0.1:" + std::to_string(free_port()), "--root", (dir.path / "www").string(),
                                       "--json", "--drain", drain, "--admin-address", "off"};
      pid_t pid = spawn(argv, dir.path / "serve.out", dir.path / "serve.err", {});
      auto deadline = std::chrono::steady_clock::now() + 20s;
      while (!finalized && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(10ms);
      CHECK(finalized);
      REQUIRE(::kill(pid, SIGTERM) == 0);
      return wait_exit(pid, 30s);
    };
    auto logs = [&] { return read_file(dir.path / "serve.out") + read_file(dir.path / "serve.err"); };

    // A drain longer than the order: the certificate is obtained and written before exit.
    int a = serve_until_finalize("drained.cli.test", "10");
    CHECK_MESSAGE(a == 0, logs());
    CHECK_MESSAGE(fs::exists(fs::path(storage) / "live" / "drained.cli.test" / "fullchain.pem"), logs());
    CHECK_MESSAGE(read_file(dir.path / "serve.out").find("\"obtained\"") != std::string::npos, logs());

    // A drain shorter than the order: abandoned at its end, nothing written, exit 0.
    auto t0 = std::chrono::steady_clock::now();
    int b = serve_until_finalize("abandoned.cli.test", "1");
    CHECK_MESSAGE(b == 0, logs());
    CHECK(std::chrono::steady_clock::now() - t0 < 25s);
    CHECK_MESSAGE(!fs::exists(fs::path(storage) / "live" / "abandoned.cli.test" / "fullchain.pem"), logs());
    CHECK(read_file(dir.path / "serve.out").find("\"obtained\"") == std::string::npos);
    // Its storage lock was released: the next process issues the name at once instead of
    // waiting for the lock to go stale (60 s, beyond this run's timeout).
    auto next = run({"issue", "--ca", ep.directory_url(), "--storage", storage, "--http-address",
                     "127.0.0.1:" + std::to_string(free_port()), "-d", "abandoned.cli.test"},
                    {}, 20s);
    CHECK_MESSAGE(next.code == 0, show(next));
    ep.ca().intercept = nullptr;
  }

  TEST_CASE("register show update rollover deactivate") {
    Cli c;
    AUTOTLS_START_PEBBLE(env, PebbleOptions{});
    c.env = std::move(env);
    auto none = run(c.args({"account", "show"}));
    CHECK_MESSAGE(none.code == 2, show(none));

    auto reg = run(c.args({"account", "register"}, {"--agree-tos", "--email", "a@example.com", "--json"}));
    REQUIRE_MESSAGE(reg.code == 0, show(reg));
    auto rj = last_json_line(reg.out)["account"];
    std::string url = rj["url"];
    CHECK(!url.empty());
    CHECK(rj["contact"] == json::array({"mailto:a@example.com"}));
    CHECK(fs::exists(c.storage() / "accounts"));

    auto shown = run(c.args({"account", "show"}, {"--json"}));
    REQUIRE_MESSAGE(shown.code == 0, show(shown));
    CHECK(last_json_line(shown.out)["account"]["url"] == url);

    auto upd = run(c.args({"account", "update"}, {"--email", "b@example.com", "--json"}));
    REQUIRE_MESSAGE(upd.code == 0, show(upd));
    CHECK(last_json_line(upd.out)["account"]["contact"] == json::array({"mailto:b@example.com"}));
    auto upd_none = run(c.args({"account", "update"}));
    CHECK_MESSAGE(upd_none.code == 2, show(upd_none));

    std::string thumb = rj["key_thumbprint"];
    auto roll = run(c.args({"account", "rollover"}, {"--json"}));
    REQUIRE_MESSAGE(roll.code == 0, show(roll));
    auto roj = last_json_line(roll.out)["account"];
    CHECK(roj["url"] == url);
    CHECK(roj["key_thumbprint"] != thumb);
    auto after = run(c.args({"account", "show"}, {"--json"}));
    REQUIRE_MESSAGE(after.code == 0, show(after));
    CHECK(last_json_line(after.out)["account"]["key_thumbprint"] == roj["key_thumbprint"]);

    auto deact = run(c.args({"account", "deactivate"}, {"--json"}));
    REQUIRE_MESSAGE(deact.code == 0, show(deact));
    CHECK(last_json_line(deact.out)["account"]["status"] == "deactivated");
    auto gone = run(c.args({"account", "show"}));
    CHECK_MESSAGE(gone.code == 2, show(gone));
  }

  TEST_CASE("external account binding from the environment is never echoed") {
    const std::string hmac = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    PebbleOptions po;
    po.eab_required = true;
    po.eab_mac_keys = {{"kid-1", hmac}};
    Cli c;
    AUTOTLS_START_PEBBLE(env, po);
    c.env = std::move(env);
    auto without = run(c.args({"account", "register"}, {"--agree-tos"}));
    // The directory says externalAccountRequired: a configuration error, found before asking.
    CHECK_MESSAGE(without.code == 2, show(without));
    CHECK(without.err.find("External Account Binding") != std::string::npos);
    auto with = run(c.args({"account", "register"}, {"--agree-tos", "--eab-kid", "kid-1", "--verbose"}),
                    {"AUTOTLS_EAB_HMAC=" + hmac});
    CHECK_MESSAGE(with.code == 0, show(with));
    CHECK(with.out.find(hmac) == std::string::npos);
    CHECK(with.err.find(hmac) == std::string::npos);
  }
}

TEST_SUITE("cli.serve") {
  TEST_CASE("serve obtains a certificate serves HTTPS and exits 0 on SIGTERM") {
    Cli c;
    AUTOTLS_START_PEBBLE(env, PebbleOptions{});
    c.env = std::move(env);
    fs::path www = c.dir.path / "www";
    fs::create_directories(www);
    write_file(www / "index.html", "hello from autotls serve\n");
    auto root = c.env->pebble_root_pem();
    REQUIRE_MESSAGE(root, root.error().message);
    fs::path root_file = c.dir.path / "pebble-root.pem";
    write_file(root_file, *root);
    int https = free_port();
    std::vector<std::string> argv = {AUTOTLS_BINARY, "serve"};
    for (const auto& a : c.common()) argv.push_back(a);
    for (const auto& a : {std::string("-d"), std::string("serve.cli.test"), std::string("--agree-tos"),
                          std::string("--https-address"), "127.0.0.1:" + std::to_string(https), std::string("--http-address"),
                          c.http(), std::string("--root"), www.string(), std::string("--json"), std::string("--drain"),
                          std::string("2"), std::string("--admin-address"), std::string("127.0.0.1:0")}) {
      argv.push_back(a);
    }
    pid_t pid = spawn(argv, c.dir.path / "serve.out", c.dir.path / "serve.err", {});
    auto deadline = std::chrono::steady_clock::now() + 60s;
    std::pair<long, std::string> got;
    while (std::chrono::steady_clock::now() < deadline) {
      got = https_get("serve.cli.test", https, root_file);
      if (got.first == 200) break;
      int status = 0;
      if (::waitpid(pid, &status, WNOHANG) == pid) break;
      std::this_thread::sleep_for(200ms);
    }
    CHECK_MESSAGE(got.first == 200, (read_file(c.dir.path / "serve.err") + read_file(c.dir.path / "serve.out")));
    CHECK(got.second == "hello from autotls serve\n");
    CHECK(fs::exists(c.storage() / "live" / "serve.cli.test" / "fullchain.pem"));
    // Nothing is compressed: httplib, as the serve binary links it, gzipped a text answer for an
    // Accept-Encoding naming gzip (a refusal, "gzip;q=0", too), a 206 included, whose
    // Content-Range then named bytes the client never got. (The in-process server tests do not
    // see it: which copy of httplib's inline code runs differs between the two binaries.)
    for (const std::string accept : {"gzip", "gzip;q=0"}) {
      CAPTURE(accept);
      auto whole = https_get_with("serve.cli.test", https, root_file, "/index.html", {"Accept-Encoding: " + accept});
      CHECK(whole.status == 200);
      CHECK(whole.head.find("Content-Encoding") == std::string::npos);
      CHECK(whole.body == "hello from autotls serve\n");
      auto part = https_get_with("serve.cli.test", https, root_file, "/index.html",
                                 {"Accept-Encoding: " + accept, "Range: bytes=0-4"});
      CHECK(part.status == 206);
      CHECK(part.head.find("Content-Encoding") == std::string::npos);
      CHECK(part.head.find("Content-Range: bytes 0-4/25") != std::string::npos);
      CHECK(part.body == "hello");
    }

    // The admin listener's ephemeral port is in the "listening" line.
    int admin = autotls::testing::admin_port(c.dir.path / "serve.out");
    REQUIRE_MESSAGE(admin > 0, read_file(c.dir.path / "serve.out"));
    {
      httplib::Client adm("127.0.0.1", admin);
      adm.set_read_timeout(std::chrono::seconds(5));
      auto h = adm.Get("/healthz");
      REQUIRE(h);
      CHECK(h->status == 200);
      CHECK(h->body == "ok\n");
      // Ready once the served name has a certificate (it has: HTTPS answered above).
      auto r = adm.Get("/readyz");
      REQUIRE(r);
      CHECK(r->status == 200);
      auto m = adm.Get("/metrics");
      REQUIRE(m);
      CHECK(m->status == 200);
      INFO(m->body);
      CHECK(m->body.find("# TYPE autotls_certificate_not_after_seconds gauge\n") != std::string::npos);
      CHECK(m->body.find("\nautotls_certificate_not_after_seconds{name=\"serve.cli.test\"} ") != std::string::npos);
      CHECK(m->body.find("\nautotls_certificates_obtained_total 1\n") != std::string::npos);
      CHECK(m->body.find("\nautotls_certificates_failed_total 0\n") != std::string::npos);
      CHECK(m->body.find("\nautotls_server_requests_total ") != std::string::npos);
      auto certs = adm.Get("/certificates");
      REQUIRE(certs);
      CHECK(certs->status == 200);
      auto j = json::parse(certs->body, nullptr, false);
      REQUIRE_MESSAGE(j.is_array(), certs->body);
      REQUIRE(j.size() == 1);
      CHECK(j[0]["name"] == "serve.cli.test");
      CHECK(j[0]["managed"] == true);
      CHECK(j[0]["names"] == json::array({"serve.cli.test"}));
      CHECK(j[0]["issuer"].get<std::string>().find("Pebble") != std::string::npos);
      CHECK(j[0]["not_after"].is_string());
      CHECK(j[0]["next_renewal"].is_string());
      CHECK(j[0]["last_error"].is_null());
    }

    // SIGHUP re-reads certificates from storage and keeps serving. The "loaded" line comes
    // after the "reload" one, from the manage() pass that follows it, which a SIGTERM sent in
    // between skips: wait for both, or a worker thread descheduled there loses the line.
    REQUIRE(::kill(pid, SIGHUP) == 0);
    auto hup_deadline = std::chrono::steady_clock::now() + 10s;
    auto reloaded = [&] {
      auto out = read_file(c.dir.path / "serve.out");
      return out.find("\"event\":\"reload\"") != std::string::npos && out.find("\"event\":\"loaded\"") != std::string::npos;
    };
    while (std::chrono::steady_clock::now() < hup_deadline && !reloaded()) std::this_thread::sleep_for(50ms);
    CHECK(read_file(c.dir.path / "serve.out").find("\"event\":\"reload\"") != std::string::npos);
    CHECK(https_get("serve.cli.test", https, root_file).first == 200);

    REQUIRE(::kill(pid, SIGTERM) == 0);
    int code = wait_exit(pid, 20s);
    auto out = read_file(c.dir.path / "serve.out");
    CHECK_MESSAGE(code == 0, (out + read_file(c.dir.path / "serve.err")));
    // One JSON object per line: listening, obtained, ready, shutdown, stopped.
    std::istringstream lines(out);
    std::string line;
    std::vector<std::string> events;
    while (std::getline(lines, line)) {
      auto j = json::parse(line, nullptr, false);
      REQUIRE_MESSAGE(j.is_object(), line);
      events.push_back(j.value("event", ""));
    }
    for (const char* e : {"listening", "obtained", "ready", "reload", "loaded", "shutdown", "stopped"}) {
      CHECK_MESSAGE(std::find(events.begin(), events.end(), e) != events.end(), (std::string(e) + "\n" + out));
    }
    // The issuance's ACME steps are JSON progress lines on stderr, naming the certificate.
    bool downloaded = false;
    std::istringstream err_lines(read_file(c.dir.path / "serve.err"));
    while (std::getline(err_lines, line)) {
      auto j = json::parse(line, nullptr, false);
      if (!j.is_object() || j.value("event", "") != "progress") continue;
      CHECK(j.value("subject", "") == "serve.cli.test");
      downloaded = downloaded || j.value("step", "") == "downloaded";
    }
    CHECK_MESSAGE(downloaded, read_file(c.dir.path / "serve.err"));
  }

  TEST_CASE("serve validates tls-alpn-01 on its live https listener against Pebble") {
    // Pebble validates tls-alpn-01 at its tlsPort: serve's https listener is there, with no
    // http listener at all, so only tls-alpn-01 on the serving listener can obtain the
    // certificate that listener then serves.
    Cli c;
    AUTOTLS_START_PEBBLE(env, PebbleOptions{});
    c.env = std::move(env);
    fs::path www = c.dir.path / "www";
    fs::create_directories(www);
    write_file(www / "index.html", "hello over tls-alpn-01\n");
    auto root = c.env->pebble_root_pem();
    REQUIRE_MESSAGE(root, root.error().message);
    fs::path root_file = c.dir.path / "pebble-root.pem";
    write_file(root_file, *root);
    int https = c.env->tls_port();
    std::vector<std::string> argv = {AUTOTLS_BINARY, "serve"};
    for (const auto& a : c.common()) argv.push_back(a);
    for (const auto& a : {std::string("-d"), std::string("alpn-serve.cli.test"), std::string("--agree-tos"),
                          std::string("--challenge"), std::string("tls-alpn-01"),
                          std::string("--https-address"), "127.0.0.1:" + std::to_string(https),
                          std::string("--http-address"), std::string("off"), std::string("--root"),
                          www.string(), std::string("--json"), std::string("--drain"), std::string("2"),
                          std::string("--admin-address"), std::string("off")}) {
      argv.push_back(a);
    }
    pid_t pid = spawn(argv, c.dir.path / "serve.out", c.dir.path / "serve.err", {});
    auto deadline = std::chrono::steady_clock::now() + 60s;
    std::pair<long, std::string> got;
    bool exited = false;
    while (std::chrono::steady_clock::now() < deadline) {
      got = https_get("alpn-serve.cli.test", https, root_file);
      if (got.first == 200) break;
      int status = 0;
      if (::waitpid(pid, &status, WNOHANG) == pid) {
        exited = true;
        break;
      }
      std::this_thread::sleep_for(200ms);
    }
    CHECK_MESSAGE(got.first == 200, (read_file(c.dir.path / "serve.err") + read_file(c.dir.path / "serve.out")));
    CHECK(got.second == "hello over tls-alpn-01\n");
    CHECK(fs::exists(c.storage() / "live" / "alpn-serve.cli.test" / "fullchain.pem"));
    // The progress lines say Pebble validated the tls-alpn-01 challenge, and no other.
    auto err = read_file(c.dir.path / "serve.err");
    int validated_alpn = 0, other_challenges = 0;
    std::istringstream err_lines(err);
    std::string line;
    while (std::getline(err_lines, line)) {
      auto j = json::parse(line, nullptr, false);
      if (!j.is_object() || !j.contains("challenge")) continue;
      if (j["challenge"] != "tls-alpn-01") ++other_challenges;
      if (j["challenge"] == "tls-alpn-01" && j.value("step", "") == "validated") ++validated_alpn;
    }
    CHECK_MESSAGE(validated_alpn == 1, err);
    CHECK_MESSAGE(other_challenges == 0, err);
    if (!exited) {
      REQUIRE(::kill(pid, SIGTERM) == 0);
      int code = wait_exit(pid, 20s);
      CHECK_MESSAGE(code == 0, (read_file(c.dir.path / "serve.out") + err));
    }
    auto out = read_file(c.dir.path / "serve.out");
    CHECK_MESSAGE(out.find("\"event\":\"obtained\"") != std::string::npos, out);
  }

  TEST_CASE("serve with the internal issuer prints its root and runs the deploy hook") {
    TempDir d;
    fs::path storage = d.path / "storage";
    fs::path www = d.path / "www";
    fs::create_directories(www);
    write_file(www / "index.html", "internal hello\n");
    fs::path hook_out = d.path / "hook.txt";
    std::string hook = "printf '%s|%s|%s\\n' \"$AUTOTLS_EVENT\" \"$AUTOTLS_NAMES\" \"$AUTOTLS_FULLCHAIN_PATH\" >> " +
                       hook_out.string();
    int https = free_port();
    std::vector<std::string> argv = {AUTOTLS_BINARY, "serve", "--ca", "internal", "--storage", storage.string(),
                                     "-d", "internal.cli.test", "--https-address", "127.0.0.1:" + std::to_string(https),
                                     "--http-address", "127.0.0.1:" + std::to_string(free_port()), "--root", www.string(),
                                     "--json", "--drain", "1", "--admin-address", "off", "--deploy-hook", hook};
    pid_t pid = spawn(argv, d.path / "serve.out", d.path / "serve.err", {});
    fs::path root = storage / "internal" / "root.pem";
    auto got = https_get_when_served("internal.cli.test", https, root, pid, 200);
    CHECK_MESSAGE(got.first == 200, (read_file(d.path / "serve.err") + read_file(d.path / "serve.out")));
    CHECK(got.second == "internal hello\n");
    REQUIRE(::kill(pid, SIGTERM) == 0);
    int code = wait_exit(pid, 20s);
    auto out = read_file(d.path / "serve.out");
    CHECK_MESSAGE(code == 0, (out + read_file(d.path / "serve.err")));
    // The root's path is printed, and the hook saw the event, the names and the paths.
    bool printed = false;
    std::istringstream lines(out);
    std::string line;
    while (std::getline(lines, line)) {
      auto j = json::parse(line, nullptr, false);
      if (j.is_object() && j.value("event", "") == "internal_ca") printed = j.value("root", "") == root.string();
    }
    CHECK_MESSAGE(printed, out);
    CHECK(read_file(hook_out) ==
          "obtained|internal.cli.test|" + (storage / "live" / "internal.cli.test" / "fullchain.pem").string() + "\n");
  }

  TEST_CASE("serve spreads a proxy site over the upstreams its config lists") {
    TempDir d;
    // Two upstreams that answer their name.
    struct Named {
      httplib::Server svr;
      std::thread thread;
      int port = 0;
      explicit Named(const std::string& name) {
        svr.Get("/", [name](const httplib::Request&, httplib::Response& res) { res.set_content(name, "text/plain"); });
        port = autotls::testing::bind_claimed(svr);
        thread = std::thread([this] { svr.listen_after_bind(); });
      }
      ~Named() {
        svr.stop();
        thread.join();
      }
    } a("upstream a"), b("upstream b");
    fs::path cfg = d.path / "serve.json";
    write_file(cfg, json({{"sites", {{"lb.cli.test", {{"proxy", json::array({"http://127.0.0.1:" + std::to_string(a.port),
                                                                               "http://127.0.0.1:" + std::to_string(b.port)})},
                                                      {"upstream-fail-timeout", 5}}}}}})
                        .dump());
    fs::path storage = d.path / "storage";
    int https = free_port();
    pid_t pid = spawn({AUTOTLS_BINARY, "serve", "--ca", "internal", "--storage", storage.string(), "--config", cfg.string(),
                       "--https-address", "127.0.0.1:" + std::to_string(https), "--http-address", "off", "--challenge",
                       "tls-alpn-01", "--drain", "1", "--admin-address", "off"},
                      d.path / "serve.out", d.path / "serve.err", {});
    fs::path root = storage / "internal" / "root.pem";
    auto first = https_get_when_served("lb.cli.test", https, root, pid, 200);
    auto logs = [&] { return read_file(d.path / "serve.err") + read_file(d.path / "serve.out"); };
    REQUIRE_MESSAGE(first.first == 200, logs());
    auto second = https_get("lb.cli.test", https, root);
    auto third = https_get("lb.cli.test", https, root);
    CHECK(second.first == 200);
    // In turn: the second answer is the other upstream, the third the first again.
    CHECK((first.second == "upstream a" || first.second == "upstream b"));
    CHECK(second.second == (first.second == "upstream a" ? "upstream b" : "upstream a"));
    CHECK(third.second == first.second);
    REQUIRE(::kill(pid, SIGTERM) == 0);
    CHECK_MESSAGE(wait_exit(pid, 20s) == 0, logs());
  }

  TEST_CASE("serve answers a redirect site and --redirect with their status over their own certificates") {
    TempDir d;
    fs::path www = d.path / "www";
    fs::create_directories(www);
    write_file(www / "index.html", "the new home\n");
    fs::path cfg = d.path / "serve.json";
    write_file(cfg, json({{"domain", json::array({"new.cli.test", "www.new.cli.test", "parked.cli.test"})},
                          {"redirect", "https://new.cli.test/parked{uri}"},
                          {"redirect-code", 308},
                          {"sites", {{"new.cli.test", {{"root", www.string()}}},
                                     {"www.new.cli.test", {{"redirect", "https://new.cli.test"}, {"redirect-code", 301},
                                                           {"headers", {{"X-Frame-Options", "DENY"}, {"X-Powered-By", nullptr}}}}}}}})
                        .dump());
    fs::path storage = d.path / "storage";
    int https = free_port();
    pid_t pid = spawn({AUTOTLS_BINARY, "serve", "--ca", "internal", "--storage", storage.string(), "--config", cfg.string(),
                       "--https-address", "127.0.0.1:" + std::to_string(https), "--http-address", "off", "--challenge",
                       "tls-alpn-01", "--drain", "1", "--admin-address", "off"},
                      d.path / "serve.out", d.path / "serve.err", {});
    fs::path root = storage / "internal" / "root.pem";
    auto logs = [&] { return read_file(d.path / "serve.err") + read_file(d.path / "serve.out"); };
    auto got = https_get_when_served("www.new.cli.test", https, root, pid, 301);
    // Verified against the internal root: the redirect site has a certificate of its own.
    CHECK_MESSAGE(got.first == 301, logs());
    CHECK(got.second.empty());
    auto home = https_get("new.cli.test", https, root);
    CHECK_MESSAGE(home.first == 200, logs());
    CHECK(home.second == "the new home\n");
    // A name no site takes gets the top-level "redirect" (--redirect), with its code.
    auto parked = https_get_when_served("parked.cli.test", https, root, pid, 308);
    CHECK_MESSAGE(parked.first == 308, logs());
    REQUIRE(::kill(pid, SIGTERM) == 0);
    CHECK_MESSAGE(wait_exit(pid, 20s) == 0, logs());
  }

  TEST_CASE("serve takes site names as issue does: Unicode, upper case, a trailing dot and a wildcard") {
    TempDir d;
    fs::path storage = d.path / "storage";
    for (const char* site : {"idn", "upper", "wild"}) {
      fs::create_directories(d.path / site);
      write_file(d.path / site / "index.html", std::string(site) + " site\n");
    }
    fs::path cfg = d.path / "serve.json";
    // "bücher" in UTF-8: served and issued as xn--bcher-kva, the name clients send.
    write_file(cfg, json({{"sites",
                           {{"Bücher.cli.test", {{"root", (d.path / "idn").string()}}},
                            {"Upper.CLI.test.", {{"root", (d.path / "upper").string()}}},
                            {"*.Wild.CLI.test", {{"root", (d.path / "wild").string()}}}}}})
                        .dump());
    int https = free_port();
    std::vector<std::string> argv = {AUTOTLS_BINARY, "serve", "--ca", "internal", "--storage", storage.string(),
                                     "--config", cfg.string(), "--https-address", "127.0.0.1:" + std::to_string(https),
                                     "--http-address", "127.0.0.1:" + std::to_string(free_port()),
                                     "--json", "--drain", "1", "--admin-address", "off"};
    pid_t pid = spawn(argv, d.path / "serve.out", d.path / "serve.err", {});
    fs::path root = storage / "internal" / "root.pem";
    auto deadline = std::chrono::steady_clock::now() + 30s;
    std::pair<long, std::string> idn, upper, wild;
    while (std::chrono::steady_clock::now() < deadline) {
      if (fs::exists(root)) {
        idn = https_get("xn--bcher-kva.cli.test", https, root);
        upper = https_get("upper.cli.test", https, root);
        // Any one label under the wildcard, with its wildcard certificate verified for the name.
        wild = https_get("any.wild.cli.test", https, root);
      }
      if (idn.first == 200 && upper.first == 200 && wild.first == 200) break;
      int status = 0;
      if (::waitpid(pid, &status, WNOHANG) == pid) break;
      std::this_thread::sleep_for(100ms);
    }
    auto logs = [&] { return read_file(d.path / "serve.err") + read_file(d.path / "serve.out"); };
    CHECK_MESSAGE(idn.first == 200, logs());
    CHECK(idn.second == "idn site\n");
    CHECK_MESSAGE(upper.first == 200, logs());
    CHECK(upper.second == "upper site\n");
    CHECK_MESSAGE(wild.first == 200, logs());
    CHECK(wild.second == "wild site\n");
    CHECK(https_get("other.wild.cli.test", https, root) == std::pair<long, std::string>{200, "wild site\n"});
    CHECK(fs::exists(storage / "live" / "_wildcard_.wild.cli.test" / "fullchain.pem"));
    CHECK(fs::exists(storage / "live" / "xn--bcher-kva.cli.test" / "fullchain.pem"));
    CHECK(fs::exists(storage / "live" / "upper.cli.test" / "fullchain.pem"));
    REQUIRE(::kill(pid, SIGTERM) == 0);
    CHECK_MESSAGE(wait_exit(pid, 20s) == 0, logs());
    // "ready" lists the names as managed, each once.
    json ready;
    std::istringstream lines(read_file(d.path / "serve.out"));
    for (std::string line; std::getline(lines, line);) {
      auto j = json::parse(line, nullptr, false);
      if (j.is_object() && j.value("event", "") == "ready") ready = j["names"];
    }
    CHECK_MESSAGE(ready == json::array({"*.wild.cli.test", "xn--bcher-kva.cli.test", "upper.cli.test"}), logs());
  }
}

TEST_SUITE("cli.serve") {
  TEST_CASE("sighup applies a changed config file and keeps an open connection") {
    Cli c;
    AUTOTLS_START_PEBBLE(env, PebbleOptions{});
    c.env = std::move(env);
    for (const char* s : {"a", "b"}) {
      fs::create_directories(c.dir.path / s);
      write_file(c.dir.path / s / "index.html", std::string("site ") + s + "\n");
    }
    auto root = c.env->pebble_root_pem();
    REQUIRE_MESSAGE(root, root.error().message);
    fs::path root_file = c.dir.path / "pebble-root.pem";
    write_file(root_file, *root);
    int https = free_port();
    fs::path config = c.dir.path / "serve.json";
    auto write_config = [&](bool with_b) {
      json sites = {{"a.cli.test", {{"root", (c.dir.path / "a").string()}}}};
      if (with_b) sites["b.cli.test"] = {{"root", (c.dir.path / "b").string()}};
      json j = {{"agree-tos", true}, {"https-address", {"127.0.0.1:" + std::to_string(https)}},
                {"http-address", {c.http()}}, {"admin-address", "off"}, {"drain", 2},
                {"sites", sites}};
      write_file(config, j.dump());
    };
    write_config(false);
    std::vector<std::string> argv = {AUTOTLS_BINARY, "serve", "--config", config.string(), "--json"};
    for (const auto& a : c.common()) argv.push_back(a);
    pid_t pid = spawn(argv, c.dir.path / "serve.out", c.dir.path / "serve.err", {});
    auto logs = [&] { return read_file(c.dir.path / "serve.out") + read_file(c.dir.path / "serve.err"); };
    auto wait_200 = [&](const std::string& host) {
      auto deadline = std::chrono::steady_clock::now() + 60s;
      std::pair<long, std::string> got;
      while (std::chrono::steady_clock::now() < deadline) {
        got = https_get(host, https, root_file);
        if (got.first == 200) break;
        std::this_thread::sleep_for(200ms);
      }
      return got;
    };
    REQUIRE_MESSAGE(wait_200("a.cli.test").first == 200, logs());

    // One connection kept open from before the reload (libcurl reuses it: no new connect).
    CURL* h = curl_easy_init();
    std::string res = "a.cli.test:" + std::to_string(https) + ":127.0.0.1";
    curl_slist* resolve = curl_slist_append(nullptr, res.c_str());
    std::string body;
    std::string url = "https://a.cli.test:" + std::to_string(https) + "/";
    curl_easy_setopt(h, CURLOPT_URL, url.c_str());
    curl_easy_setopt(h, CURLOPT_RESOLVE, resolve);
    curl_easy_setopt(h, CURLOPT_CAINFO, root_file.c_str());
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, append_cb);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &body);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 5000L);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    auto kept_get = [&](long& new_connects) {
      body.clear();
      long status = 0;
      if (curl_easy_perform(h) == CURLE_OK) curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
      curl_easy_getinfo(h, CURLINFO_NUM_CONNECTS, &new_connects);
      return status;
    };
    long connects = -1;
    REQUIRE(kept_get(connects) == 200);
    CHECK(connects == 1);
    CHECK(https_get("b.cli.test", https, root_file).first != 200);

    auto wait_event = [&](const std::string& event, int n) {
      return autotls::testing::wait_event(c.dir.path / "serve.out", event, n, 10s);
    };

    write_config(true);
    REQUIRE(::kill(pid, SIGHUP) == 0);
    REQUIRE_MESSAGE(wait_event("reload", 1), logs());
    auto b = wait_200("b.cli.test");
    CHECK_MESSAGE(b.first == 200, logs());
    CHECK(b.second == "site b\n");
    CHECK(kept_get(connects) == 200);
    CHECK(connects == 0);  // the connection from before the reload answered
    CHECK(body == "site a\n");
    CHECK(logs().find("\"added\":[\"b.cli.test\"]") != std::string::npos);

    // A broken file is refused with one line; the running configuration stays.
    write_file(config, "{\"sites\": ");
    REQUIRE(::kill(pid, SIGHUP) == 0);
    REQUIRE_MESSAGE(wait_event("reload_failed", 1), logs());
    CHECK(logs().find("invalid JSON") != std::string::npos);
    CHECK(https_get("b.cli.test", https, root_file).first == 200);
    CHECK(kept_get(connects) == 200);
    CHECK(connects == 0);
    curl_slist_free_all(resolve);
    curl_easy_cleanup(h);

    REQUIRE(::kill(pid, SIGTERM) == 0);
    CHECK_MESSAGE(wait_exit(pid, 20s) == 0, logs());
  }
}

namespace {

// OnDemandServe runs `autotls serve --on-demand --on-demand-allow *.od.cli.test` (plus `more`
// flags) against a fresh Pebble, serving a static page over HTTPS on 127.0.0.1, with the admin
// listener on a port it reads from the "listening" event.
struct OnDemandServe {
  Cli c;
  fs::path root_file;  // Pebble's root: what verifies the issued certificates
  int https = 0;
  int admin = 0;
  pid_t pid = -1;

  explicit OnDemandServe(std::unique_ptr<PebbleEnv> env, const std::vector<std::string>& more = {}) {
    c.env = std::move(env);
    fs::path www = c.dir.path / "www";
    fs::create_directories(www);
    write_file(www / "index.html", "on demand\n");
    auto root = c.env->pebble_root_pem();
    REQUIRE_MESSAGE(root, root.error().message);
    root_file = c.dir.path / "pebble-root.pem";
    write_file(root_file, *root);
    https = free_port();
    std::vector<std::string> argv = {AUTOTLS_BINARY, "serve"};
    for (const auto& a : c.common()) argv.push_back(a);
    for (const auto& a : {std::string("--on-demand"), std::string("--on-demand-allow"), std::string("*.od.cli.test"),
                          std::string("--agree-tos"), std::string("--https-address"),
                          "127.0.0.1:" + std::to_string(https), std::string("--http-address"), c.http(),
                          std::string("--root"), www.string(), std::string("--json"), std::string("--drain"),
                          std::string("1"), std::string("--admin-address"), std::string("127.0.0.1:0")}) {
      argv.push_back(a);
    }
    argv.insert(argv.end(), more.begin(), more.end());
    pid = spawn(argv, c.dir.path / "serve.out", c.dir.path / "serve.err", {});
    auto deadline = std::chrono::steady_clock::now() + 20s;
    while (admin == 0 && std::chrono::steady_clock::now() < deadline) {
      admin = autotls::testing::admin_port(c.dir.path / "serve.out");
      int status = 0;
      if (admin == 0 && ::waitpid(pid, &status, WNOHANG) == pid) {
        pid = -1;
        break;
      }
      if (admin == 0) std::this_thread::sleep_for(50ms);
    }
    REQUIRE_MESSAGE(admin > 0, logs());
  }
  ~OnDemandServe() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }
  std::string logs() const { return read_file(c.dir.path / "serve.err") + read_file(c.dir.path / "serve.out"); }

  // get_until_served repeats an HTTPS GET for host until it answers 200 (the first handshake
  // starts the issuance; curl's 5 s may end before Pebble is done) or 60 s pass.
  std::pair<long, std::string> get_until_served(const std::string& host) {
    auto deadline = std::chrono::steady_clock::now() + 60s;
    std::pair<long, std::string> got;
    while (std::chrono::steady_clock::now() < deadline) {
      got = https_get(host, https, root_file);
      if (got.first == 200) break;
      int status = 0;
      if (::waitpid(pid, &status, WNOHANG) == pid) {
        pid = -1;
        break;
      }
      std::this_thread::sleep_for(200ms);
    }
    return got;
  }

  std::string metrics() const {
    httplib::Client adm("127.0.0.1", admin);
    adm.set_read_timeout(std::chrono::seconds(5));
    auto m = adm.Get("/metrics");
    return m ? m->body : std::string();
  }

  // stop sends SIGTERM and returns the exit code.
  int stop() {
    REQUIRE(::kill(pid, SIGTERM) == 0);
    int code = wait_exit(pid, 20s);
    pid = -1;
    return code;
  }
};

// metric returns the value of the sample named exactly `sample` (with its labels) in a
// Prometheus text body, or -1 when it is missing.
long metric(const std::string& body, const std::string& sample) {
  std::istringstream in(body);
  std::string line;
  while (std::getline(in, line)) {
    if (line.size() > sample.size() && line.compare(0, sample.size(), sample) == 0 && line[sample.size()] == ' ') {
      return std::stol(line.substr(sample.size() + 1));
    }
  }
  return -1;
}

// pebble_orders counts the orders Pebble holds for the account autotls stored under `storage`,
// asked at the CA itself: the account's orders list (RFC 8555 §7.1.2.1), POST-as-GET with the
// stored account key, following Link rel="next" pages.
autotls::Result<size_t> pebble_orders(const PebbleEnv& env, const fs::path& storage) {
  using autotls::Errc;
  using autotls::fail;
  fs::path key_file, account_file;
  std::error_code ec;
  for (const auto& d : fs::directory_iterator(storage / "accounts", ec)) {
    if (fs::exists(d.path() / "account.key")) {
      key_file = d.path() / "account.key";
      account_file = d.path() / "account.json";
    }
  }
  if (key_file.empty()) return fail(Errc::io, "no account stored under " + storage.string());
  auto key = autotls::acme::PrivateKey::from_pem(read_file(key_file));
  if (!key) return fail(key.error());
  auto account = json::parse(read_file(account_file), nullptr, false);
  if (!account.is_object() || !account.contains("url")) return fail(Errc::bad_response, "bad " + account_file.string());
  autotls::acme::ClientOptions o;
  o.directory_url = env.directory_url();
  o.transport = std::shared_ptr<autotls::acme::HttpTransport>(autotls::acme::make_curl_transport(env.curl_options()));
  auto client = autotls::acme::Client::create(o);
  if (!client) return fail(client.error());
  (*client)->set_account(std::make_shared<autotls::acme::KeySigner>(std::move(*key)), account["url"].get<std::string>());
  auto acct = (*client)->fetch_account();
  if (!acct) return fail(acct.error());
  if (acct->orders.empty()) return fail(Errc::bad_response, "the account has no orders URL");
  size_t n = 0;
  std::string url = acct->orders;
  for (int page = 0; !url.empty() && page < 1000; ++page) {
    auto r = (*client)->post("orders", url, "");
    if (!r) return fail(r.error());
    auto j = json::parse(r->body, nullptr, false);
    if (!j.is_object() || !j.contains("orders") || !j["orders"].is_array()) {
      return fail(Errc::bad_response, "orders list: " + r->body);
    }
    n += j["orders"].size();
    url.clear();
    for (const auto& link : r->headers_named("Link")) {
      if (link.find("rel=\"next\"") == std::string::npos) continue;
      auto lt = link.find('<'), gt = link.find('>');
      if (lt != std::string::npos && gt != std::string::npos && gt > lt) url = link.substr(lt + 1, gt - lt - 1);
    }
  }
  return n;
}

}  // namespace

TEST_SUITE("cli.serve") {
  TEST_CASE("serve on-demand issues an allowed name at its handshake against Pebble and refuses others") {
    AUTOTLS_START_PEBBLE(env, PebbleOptions{});
    OnDemandServe s(std::move(env));
    auto got = s.get_until_served("shop.od.cli.test");
    CHECK_MESSAGE(got.first == 200, s.logs());
    CHECK(got.second == "on demand\n");
    CHECK(fs::exists(s.c.storage() / "live" / "shop.od.cli.test" / "fullchain.pem"));
    // Names outside the policy: a failed handshake, nothing stored.
    CHECK(https_get("evil.example.org", s.https, s.root_file).first == 0);
    CHECK(https_get("a.b.od.cli.test", s.https, s.root_file).first == 0);
    CHECK_FALSE(fs::exists(s.c.storage() / "live" / "evil.example.org"));
    CHECK_FALSE(fs::exists(s.c.storage() / "live" / "a.b.od.cli.test"));
    auto m = s.metrics();
    INFO(m);
    CHECK(m.find("autotls_on_demand_total{outcome=\"obtained\"} 1\n") != std::string::npos);
    CHECK(m.find("autotls_on_demand_total{outcome=\"denied\"} 2\n") != std::string::npos);
    CHECK(m.find("\nautotls_certificates_obtained_total 1\n") != std::string::npos);
    // Handshakes served the on-demand certificate are counted. The first one may have come
    // before the name joined the on-demand LRU (the store has it a moment earlier), so retry.
    CHECK(m.find("\n# TYPE autotls_on_demand_touched_total counter\n") != std::string::npos);
    auto touch_deadline = std::chrono::steady_clock::now() + 10s;
    while (metric(m, "autotls_on_demand_touched_total") < 1 && std::chrono::steady_clock::now() < touch_deadline) {
      CHECK(https_get("shop.od.cli.test", s.https, s.root_file).first == 200);
      m = s.metrics();
    }
    CHECK_MESSAGE(metric(m, "autotls_on_demand_touched_total") >= 1, m);
    // SIGHUP with the same configuration: nothing to restart for (the on-demand handshake
    // timeout is kept as at start, not reported as a changed timeout).
    REQUIRE(::kill(s.pid, SIGHUP) == 0);
    json reload;
    auto deadline = std::chrono::steady_clock::now() + 10s;
    while (reload.is_null() && std::chrono::steady_clock::now() < deadline) {
      std::istringstream lines(read_file(s.c.dir.path / "serve.out"));
      std::string line;
      while (std::getline(lines, line)) {
        auto j = json::parse(line, nullptr, false);
        if (j.is_object() && j.value("event", "").rfind("reload", 0) == 0) reload = j;
      }
      if (reload.is_null()) std::this_thread::sleep_for(50ms);
    }
    REQUIRE_MESSAGE(reload.is_object(), s.logs());
    CHECK(reload.value("event", "") == "reload");
    CHECK(reload.value("not_applied", json::array()) == json::array());
    CHECK(https_get("shop.od.cli.test", s.https, s.root_file).first == 200);
    CHECK(s.stop() == 0);
  }

  TEST_CASE("serve on-demand against Pebble orders nothing for 1000 random SNI names or a throttled name") {
    AUTOTLS_START_PEBBLE(env, PebbleOptions{});
    OnDemandServe s(std::move(env), {"--on-demand-rate", "1/1h"});
    autotls::ossl::SslCtxPtr ctx(SSL_CTX_new(TLS_client_method()));
    REQUIRE(ctx);
    // 1000 names outside the policy from 8 client threads, while the rate still allows an
    // issuance: every handshake fails.
    auto names = autotls::testing::random_sni_names(1000);
    CHECK(autotls::testing::tls_handshakes(s.https, names, 8, ctx.get()) == 0);
    // An allowed name is issued at its handshake: the one issuance the rate allows.
    auto got = s.get_until_served("first.od.cli.test");
    REQUIRE_MESSAGE(got.first == 200, s.logs());
    // Counted at the CA: the account holds that one order and none for the 1000 names.
    auto before = pebble_orders(*s.c.env, s.c.storage());
    REQUIRE_MESSAGE(before, before.error().message);
    CHECK(*before == 1);
    // A second allowed name over the rate: refused at once, no certificate, no order.
    auto second = autotls::testing::tls_handshake(s.https, "second.od.cli.test", ctx.get());
    CHECK_FALSE(second.ok);
    CHECK(second.took < 10s);
    CHECK_FALSE(fs::exists(s.c.storage() / "live" / "second.od.cli.test"));
    auto after = pebble_orders(*s.c.env, s.c.storage());
    REQUIRE_MESSAGE(after, after.error().message);
    CHECK(*after == *before);
    auto m = s.metrics();
    INFO(m);
    CHECK(metric(m, "autotls_on_demand_total{outcome=\"denied\"}") + metric(m, "autotls_on_demand_total{outcome=\"invalid\"}") == 1000);
    CHECK(metric(m, "autotls_on_demand_total{outcome=\"throttled\"}") == 1);
    CHECK(metric(m, "autotls_on_demand_total{outcome=\"obtained\"}") == 1);
    CHECK(metric(m, "autotls_certificates_obtained_total") == 1);
    CHECK_MESSAGE(s.stop() == 0, s.logs());
  }
}

namespace {

// top_issuer_cn is the issuer commonName of the last certificate in a PEM chain.
std::string top_issuer_cn(const std::string& chain_pem) {
  auto parts = autotls::acme::split_pem_chain(chain_pem);
  if (parts.empty()) return {};
  autotls::ossl::BioPtr bio(BIO_new_mem_buf(parts.back().data(), static_cast<int>(parts.back().size())));
  autotls::ossl::X509Ptr x(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (!x) return {};
  char cn[256] = {};
  if (X509_NAME_get_text_by_NID(X509_get_issuer_name(x.get()), NID_commonName, cn, sizeof cn) < 0) return {};
  return cn;
}

}  // namespace

TEST_SUITE("cli.serve") {
  TEST_CASE("serve gives each site its key type profile and preferred chain and reissues a site whose key type changed") {
    autotls::testing::FakeAcmeServer::Options o;
    o.profiles = {{"classic", "90 days"}, {"shortlived", "6 days"}, {"tlsserver", "server auth only"}};
    autotls::testing::FakeCaEndpoint ep(o);
    REQUIRE(ep.port() > 0);
    TempDir dir;
    const fs::path storage = dir.path / "storage";
    fs::create_directories(dir.path / "www");
    const std::string www = (dir.path / "www").string();
    fs::path config = dir.path / "serve.json";
    auto write_config = [&](const std::string& ec_key_type) {
      json ec_site = {{"root", www}};
      if (!ec_key_type.empty()) ec_site["key_type"] = ec_key_type;
      json j = {{"agree-tos", true},
                {"profile", "classic"},
                {"https-address", {"127.0.0.1:" + std::to_string(free_port())}},
                {"http-address", {"127.0.0.1:" + std::to_string(free_port())}},
                {"admin-address", "off"},
                {"drain", 1},
                {"sites",
                 {{"rsa.cli.test",
                   {{"root", www}, {"key-type", "rsa2048"}, {"profile", "shortlived"}, {"preferred-chain", "Fake Root B"}}},
                  {"ec.cli.test", ec_site}}}};
      write_file(config, j.dump());
    };
    write_config("");
    pid_t pid = spawn({AUTOTLS_BINARY, "serve", "--config", config.string(), "--ca", ep.directory_url(), "--storage",
                       storage.string(), "--json"},
                      dir.path / "serve.out", dir.path / "serve.err", {});
    auto logs = [&] { return read_file(dir.path / "serve.out") + read_file(dir.path / "serve.err"); };
    auto wait_event = [&](const std::string& event, int n) {
      return autotls::testing::wait_event(dir.path / "serve.out", event, n, 30s);
    };
    auto key_type_of = [&](const std::string& name) {
      auto k = autotls::acme::PrivateKey::from_pem(read_file(storage / "live" / name / "privkey.pem"));
      return k ? std::string(autotls::acme::to_string(k->type())) : "unreadable";
    };
    auto profile_of_order = [&](const std::string& name) {
      std::string found = "no order";
      for (const auto& order : ep.ca().orders()) {
        if (order.payload["identifiers"][0].value("value", "") == name) found = order.payload.value("profile", "");
      }
      return found;
    };
    REQUIRE_MESSAGE(wait_event("ready", 1), logs());
    CHECK(ep.ca().orders().size() == 2);
    CHECK_MESSAGE(key_type_of("rsa.cli.test") == "rsa2048", logs());
    CHECK(key_type_of("ec.cli.test") == "ec256");
    CHECK(profile_of_order("rsa.cli.test") == "shortlived");
    CHECK(profile_of_order("ec.cli.test") == "classic");  // the top-level profile
    CHECK(top_issuer_cn(read_file(storage / "live" / "rsa.cli.test" / "fullchain.pem")) == "Fake Root B");
    CHECK(top_issuer_cn(read_file(storage / "live" / "ec.cli.test" / "fullchain.pem")) == "Fake Root A");
    auto meta = json::parse(read_file(storage / "live" / "rsa.cli.test" / "meta.json"), nullptr, false);
    CHECK(meta.value("profile", "") == "shortlived");

    // SIGHUP with ec.cli.test now ec384: that site is reissued at once, the other is not.
    write_config("ec384");
    REQUIRE(::kill(pid, SIGHUP) == 0);
    REQUIRE_MESSAGE(wait_event("reload", 1), logs());
    REQUIRE_MESSAGE(wait_event("renewed", 1), logs());
    CHECK(key_type_of("ec.cli.test") == "ec384");
    CHECK(key_type_of("rsa.cli.test") == "rsa2048");
    CHECK(ep.ca().orders().size() == 3);
    CHECK(logs().find("renewed\",\"name\":\"rsa.cli.test") == std::string::npos);

    REQUIRE(::kill(pid, SIGTERM) == 0);
    CHECK_MESSAGE(wait_exit(pid, 30s) == 0, logs());
  }
}

TEST_SUITE("cli.quickstart") {
  TEST_CASE("tools quickstart check serves the demo page over HTTPS") {
    AUTOTLS_REQUIRE_PEBBLE();
    // README's commands run from a clean clone of the committed tree (no build directory, no
    // local files), with AUTOTLS_BIN pointing at the binary already built so that there is no
    // second full build: tools/quickstart --check end to end, and tools/test up to its CMake
    // configure step (--configure-only; running the suite from inside the suite would recurse).
    TempDir clean;
    fs::path src = clean.path / "autotls";
    auto clone = run({"clone", "--quiet", AUTOTLS_SOURCE_DIR, src.string()}, {}, 60s, {"/usr/bin/git"});
    REQUIRE_MESSAGE(clone.code == 0, show(clone));
    CHECK_FALSE(fs::exists(src / "build"));
    auto configure = run({"--configure-only"}, {"BUILD_DIR=" + (clean.path / "build").string()}, 120s,
                         {"/bin/bash", (src / "tools" / "test").string()});
    CHECK_MESSAGE(configure.code == 0, show(configure));
    CHECK(fs::exists(clean.path / "build" / "build.ninja"));
    auto r = run({"--check"}, {std::string("AUTOTLS_BIN=") + AUTOTLS_BINARY}, 180s,
                 {"/bin/bash", (src / "tools" / "quickstart").string()});
    CHECK_MESSAGE(r.code == 0, show(r));
    CHECK(r.err.find("OK: https://demo.autotls.test:") != std::string::npos);
    CHECK(r.err.find("exited 0 after SIGTERM") != std::string::npos);
  }
}

namespace {

// put writes text to p by a temporary file and a rename (as deploy tools replace files), with
// mode (0600 for keys).
void put(const fs::path& p, const std::string& text, fs::perms mode = fs::perms::owner_read | fs::perms::owner_write) {
  fs::path tmp = p.string() + ".tmp";
  write_file(tmp, text);
  fs::permissions(tmp, mode);
  fs::rename(tmp, p);
}

// one_line is the first line of stderr and whether it was the only one.
bool one_line(const std::string& err) { return std::count(err.begin(), err.end(), '\n') == 1; }

}  // namespace

TEST_SUITE("cli.serve_files") {
  TEST_CASE("serve refuses bad certificate files and config with one line and exit 2") {
    using autotls::testing::make_test_ca;
    using autotls::testing::make_test_leaf;
    TempDir d;
    auto ca = make_test_ca("autotls cli files CA");
    REQUIRE_MESSAGE(ca, ca.error().message);
    auto good = make_test_leaf({"files.cli.test"}, *ca);
    auto other = make_test_leaf({"files.cli.test"}, *ca);
    auto expired = make_test_leaf({"files.cli.test"}, *ca, -std::chrono::hours(24));
    REQUIRE(good);
    REQUIRE(other);
    REQUIRE(expired);
    fs::path cert = d.path / "cert.pem", key = d.path / "key.pem";
    put(cert, good->cert_pem + ca->cert_pem, fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read |
                                                 fs::perms::others_read);
    put(key, good->key_pem);
    fs::path other_key = d.path / "other.key", exp_cert = d.path / "expired.pem", exp_key = d.path / "expired.key";
    put(other_key, other->key_pem);
    put(exp_cert, expired->cert_pem + ca->cert_pem);
    put(exp_key, expired->key_pem);
    fs::create_directories(d.path / "www");
    std::string storage = (d.path / "s").string();
    auto serve = [&](std::vector<std::string> more) {
      std::vector<std::string> a = {"serve", "--root", (d.path / "www").string(), "--https-address",
                                    "127.0.0.1:" + std::to_string(free_port()), "--http-address", "off",
                                    "--admin-address", "off", "--storage", storage};
      a.insert(a.end(), more.begin(), more.end());
      return run(a, {}, 20s);
    };
    auto expect = [&](const Run& r, const std::vector<std::string>& needles) {
      CHECK_MESSAGE(r.code == 2, show(r));
      CHECK_MESSAGE(one_line(r.err), show(r));
      for (const auto& needle : needles) {
        std::string why = needle + "\n" + show(r);
        CHECK_MESSAGE(r.err.find(needle) != std::string::npos, why);
      }
    };

    // A missing certificate file, named.
    expect(serve({"--cert", (d.path / "nope.pem").string(), "--key", key.string()}),
           {(d.path / "nope.pem").string(), "No such file or directory"});
    // An unreadable key. root reads any file whatever its mode: then a directory stands where
    // the key file should be (the same open-and-read failure path).
    if (::geteuid() == 0) {
      MESSAGE("running as root: chmod 000 does not stop root; checking a directory in place of the key instead");
      fs::create_directories(d.path / "keydir");
      expect(serve({"--cert", cert.string(), "--key", (d.path / "keydir").string()}),
             {(d.path / "keydir").string(), "directory"});
    } else {
      fs::path locked = d.path / "locked.key";
      put(locked, good->key_pem, fs::perms::none);
      expect(serve({"--cert", cert.string(), "--key", locked.string()}), {locked.string(), "Permission denied"});
    }
    // A key that does not belong to the certificate.
    expect(serve({"--cert", cert.string(), "--key", other_key.string()}),
           {cert.string(), "private key does not match"});
    // An expired certificate.
    expect(serve({"--cert", exp_cert.string(), "--key", exp_key.string()}), {exp_cert.string(), "expired"});
    // A key readable by others: refused like ssh does, naming the file and the fix.
    fs::permissions(key, fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read | fs::perms::others_read);
    expect(serve({"--cert", cert.string(), "--key", key.string()}), {key.string(), "0644", "chmod 600 " + key.string()});
    fs::permissions(key, fs::perms::owner_read | fs::perms::owner_write);
    // Pairs must be pairs; an empty --cert-dir is named.
    expect(serve({"--cert", cert.string()}), {"--cert and --key in pairs"});
    fs::create_directories(d.path / "empty");
    expect(serve({"--cert-dir", (d.path / "empty").string()}), {(d.path / "empty").string(), "no certificates found"});
    // A certbot-style directory with a bad pair fails the start naming the file.
    fs::create_directories(d.path / "live" / "live" / "files.cli.test");
    put(d.path / "live" / "live" / "files.cli.test" / "fullchain.pem", good->cert_pem);
    put(d.path / "live" / "live" / "files.cli.test" / "privkey.pem", other->key_pem);
    expect(serve({"--cert-dir", (d.path / "live").string()}), {"files.cli.test", "does not match"});

    // The config file: its keys are the flag names; bad JSON and unknown keys are named.
    fs::path cfg = d.path / "serve.json";
    write_file(cfg, json({{"cert", {cert.string()}}, {"key", {other_key.string()}}}).dump());
    expect(serve({"--config", cfg.string()}), {"private key does not match"});
    write_file(cfg, R"({"cert": [")" + cert.string() + R"("], "key": )");
    expect(serve({"--config", cfg.string()}), {cfg.string(), "invalid JSON"});
    write_file(cfg, json({{"cert", {cert.string()}}, {"key", {key.string()}}, {"certs-dir", "/tmp"}}).dump());
    expect(serve({"--config", cfg.string()}), {cfg.string(), "unknown key \"certs-dir\""});
    // Names a certificate cannot hold are refused before anything listens, where they are
    // written: -d, --ip, a site's host.
    expect(serve({"-d", "two words.cli.test"}), {"\"two words.cli.test\" is not a valid DNS name or IP address"});
    expect(serve({"-d", "xn--zz.cli.test"}), {"xn--zz.cli.test", "not a valid internationalized domain name"});
    expect(serve({"--ip", "10.0.0"}), {"--ip 10.0.0: not an IP address"});
    auto sites = [&](const json& s) {
      write_file(cfg, json({{"sites", s}}).dump());
      return serve({"--config", cfg.string()});
    };
    const json www = {{"root", (d.path / "www").string()}};
    // A wildcard site is over a host name; its certificate needs dns-01 from an ACME CA (the
    // default challenge here is http-01), as -d with a wildcard does, and as issue says.
    expect(sites({{"*.10.0.0.1", www}}), {cfg.string(), "sites.*.10.0.0.1: a wildcard is over a host name, not an address"});
    expect(sites({{"*.cli.test", www}}),
           {"serve: *.cli.test: a wildcard certificate needs --challenge dns-01 (CAs validate wildcard names only over DNS, not http-01)"});
    expect(serve({"-d", "*.Cli.test", "--challenge", "tls-alpn-01"}), {"serve: *.cli.test: a wildcard certificate needs --challenge dns-01", "not tls-alpn-01"});
    expect(sites({{"two words.cli.test", www}}), {"sites.two words.cli.test: not a valid DNS name or IP address"});
    expect(sites({{"Same.cli.test", www}, {"same.cli.test.", www}}),
           {"sites.Same.cli.test and sites.same.cli.test. are the same host (same.cli.test)"});
    // Seconds out of range, NaN and values too large for a duration included, name the flag.
    expect(serve({"-d", "a.cli.test", "--challenge", "tls-alpn-01", "--drain", "1e300"}), {"--drain must be between 0 and 86400 seconds"});
    expect(serve({"-d", "a.cli.test", "--challenge", "tls-alpn-01", "--drain", "nan"}), {"--drain must be between 0 and 86400 seconds"});
    write_file(cfg, json({{"on-demand", true}, {"on-demand-allow", {"*.cli.test"}}, {"on-demand-wait", 1e300}}).dump());
    expect(serve({"--config", cfg.string()}), {"--on-demand-wait must be between 0.001 and 86400 seconds"});
    expect(serve({"-d", "a.cli.test", "--on-demand", "--on-demand-allow", "*.cli.test", "--on-demand-ask-timeout", "-1"}),
           {"--on-demand-ask-timeout must be between 0.001 and 86400 seconds"});
    CHECK_FALSE(fs::exists(fs::path(storage) / "accounts"));
    CHECK_FALSE(fs::exists(d.path / "core"));
  }

  TEST_CASE("serve listens on an IPv6 address given as --https-address [::1]:PORT") {
    // Skip when this machine has no IPv6 loopback.
    {
      int probe = ::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_in6 a{};
      a.sin6_family = AF_INET6;
      a.sin6_addr = in6addr_loopback;
      bool ok = probe >= 0 && ::bind(probe, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
      if (probe >= 0) ::close(probe);
      if (!ok) {
        MESSAGE("SKIP: ::1 cannot be bound on this machine");
        return;
      }
    }
    using autotls::testing::make_test_ca;
    using autotls::testing::make_test_leaf;
    TempDir d;
    auto ca = make_test_ca("autotls cli v6 CA");
    REQUIRE(ca);
    auto leaf = make_test_leaf({"v6.cli.test"}, *ca);
    REQUIRE(leaf);
    fs::path ca_file = d.path / "ca.pem", cert = d.path / "site.pem", key = d.path / "site.key";
    write_file(ca_file, ca->cert_pem);
    put(cert, leaf->cert_pem + ca->cert_pem);
    put(key, leaf->key_pem);
    fs::path www = d.path / "www";
    fs::create_directories(www);
    write_file(www / "index.html", "from v6\n");
    // A bracketed address without a port is a usage error saying the form (CLI11 hands it
    // over as "::1", brackets stripped).
    auto bad = run({"serve", "--cert", cert.string(), "--key", key.string(), "--root", www.string(), "--https-address", "[::1]",
                    "--http-address", "off", "--storage", (d.path / "s").string()});
    CHECK_MESSAGE(bad.code == 2, show(bad));
    CHECK_MESSAGE(bad.err.find("::1") != std::string::npos, show(bad));
    CHECK_MESSAGE(bad.err.find("[V6]:PORT") != std::string::npos, show(bad));
    // Port 0: the kernel's choice, read back from the "listening" line.
    std::vector<std::string> argv = {AUTOTLS_BINARY, "serve", "-d", "v6.cli.test", "--cert", cert.string(), "--key", key.string(),
                                     "--root", www.string(), "--https-address", "[::1]:0",
                                     "--http-address", "off", "--admin-address", "off", "--json",
                                     "--drain", "1", "--storage", (d.path / "s").string(), "--ca",
                                     "https://127.0.0.1:1/unreachable"};
    fs::path out = d.path / "serve.out", err = d.path / "serve.err";
    pid_t pid = spawn(argv, out, err, {});
    bool listening = autotls::testing::wait_event(out, "listening", 1, 20'000ms);
    CHECK_MESSAGE(listening, (read_file(out) + read_file(err)));
    int port = listening ? autotls::testing::last_event(out, "listening").value("https_port", 0) : 0;
    CHECK(port > 0);
    std::string body;
    long status = 0;
    if (port > 0) {
      CURL* h = curl_easy_init();
      std::string url = "https://v6.cli.test:" + std::to_string(port) + "/";
      curl_slist* resolve = curl_slist_append(nullptr, ("v6.cli.test:" + std::to_string(port) + ":[::1]").c_str());
      curl_easy_setopt(h, CURLOPT_URL, url.c_str());
      curl_easy_setopt(h, CURLOPT_RESOLVE, resolve);
      curl_easy_setopt(h, CURLOPT_CAINFO, ca_file.c_str());
      curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, append_cb);
      curl_easy_setopt(h, CURLOPT_WRITEDATA, &body);
      curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 5000L);
      curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
      if (curl_easy_perform(h) == CURLE_OK) curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
      curl_slist_free_all(resolve);
      curl_easy_cleanup(h);
    }
    CHECK_MESSAGE(status == 200, (read_file(out) + read_file(err)));
    CHECK(body == "from v6\n");
    ::kill(pid, SIGTERM);
    CHECK(wait_exit(pid, 20s) == 0);
  }

  TEST_CASE("serve reloads replaced certificate files without restart and keeps the old on a bad pair") {
    using autotls::testing::make_test_ca;
    using autotls::testing::make_test_leaf;
    TempDir d;
    auto ca1 = make_test_ca("autotls cli files CA one");
    auto ca2 = make_test_ca("autotls cli files CA two");
    REQUIRE(ca1);
    REQUIRE(ca2);
    auto a = make_test_leaf({"files.cli.test"}, *ca1);
    auto b = make_test_leaf({"files.cli.test"}, *ca2);
    auto c = make_test_leaf({"files.cli.test"}, *ca1);
    REQUIRE(a);
    REQUIRE(b);
    REQUIRE(c);
    fs::path ca1_file = d.path / "ca1.pem", ca2_file = d.path / "ca2.pem";
    write_file(ca1_file, ca1->cert_pem);
    write_file(ca2_file, ca2->cert_pem);
    fs::path certs = d.path / "certs";
    fs::create_directories(certs);
    fs::path cert = certs / "site.pem", key = certs / "site.key";
    put(cert, a->cert_pem + ca1->cert_pem);
    put(key, a->key_pem);
    fs::path www = d.path / "www";
    fs::create_directories(www);
    write_file(www / "index.html", "from files\n");
    int https = free_port();
    // A -d name the files cover is not issued: the CA (unreachable) is never contacted, or
    // serve would exit 4 at its terms check.
    std::vector<std::string> argv = {AUTOTLS_BINARY, "serve", "-d", "FILES.cli.test", "--cert", cert.string(), "--key", key.string(),
                                     "--root", www.string(), "--https-address", "127.0.0.1:" + std::to_string(https),
                                     "--http-address", "off", "--admin-address", "127.0.0.1:0", "--json",
                                     "--drain", "1", "--storage", (d.path / "s").string(), "--ca",
                                     "https://127.0.0.1:1/unreachable"};
    fs::path out = d.path / "serve.out", err = d.path / "serve.err";
    pid_t pid = spawn(argv, out, err, {});
    auto logs = [&] { return read_file(out) + read_file(err); };
    auto wait_for = [&](const std::function<bool()>& ok, std::chrono::seconds limit) {
      auto deadline = std::chrono::steady_clock::now() + limit;
      while (std::chrono::steady_clock::now() < deadline) {
        if (ok()) return true;
        int status = 0;
        if (::waitpid(pid, &status, WNOHANG) == pid) return false;
        std::this_thread::sleep_for(100ms);
      }
      return ok();
    };
    auto served_by = [&](const fs::path& ca_file) { return https_get("files.cli.test", https, ca_file); };
    REQUIRE_MESSAGE(wait_for([&] { return served_by(ca1_file).first == 200; }, 10s), logs());
    CHECK(served_by(ca1_file).second == "from files\n");
    CHECK(served_by(ca2_file).first == 0);  // not trusted: the certificate is from CA one

    // Replace the pair on disk: the new certificate is served within a bounded wait.
    put(cert, b->cert_pem + ca2->cert_pem);
    put(key, b->key_pem);
    CHECK_MESSAGE(wait_for([&] { return served_by(ca2_file).first == 200; }, 10s), logs());
    CHECK(served_by(ca1_file).first == 0);
    CHECK(read_file(out).find("\"event\":\"cert_file_reloaded\"") != std::string::npos);

    // A bad pair (certificate and key that do not belong together): logged naming the file, and
    // the last good certificate keeps serving.
    put(cert, c->cert_pem + ca1->cert_pem);
    CHECK_MESSAGE(wait_for([&] { return read_file(out).find("\"event\":\"cert_file_failed\"") != std::string::npos; }, 12s),
                  logs());
    {
      std::istringstream lines(read_file(out));
      std::string line;
      bool named = false;
      while (std::getline(lines, line)) {
        auto j = json::parse(line, nullptr, false);
        if (!j.is_object() || j.value("event", "") != "cert_file_failed") continue;
        named = j.value("path", "") == cert.string() &&
                j["error"].dump().find("private key does not match") != std::string::npos;
      }
      CHECK_MESSAGE(named, read_file(out));
    }
    CHECK(served_by(ca2_file).first == 200);
    CHECK(served_by(ca1_file).first == 0);

    // SIGHUP rescans the files; the metrics count what the watcher did.
    REQUIRE(::kill(pid, SIGHUP) == 0);
    CHECK(wait_for([&] { return read_file(out).find("\"event\":\"reload\"") != std::string::npos; }, 10s));
    CHECK(served_by(ca2_file).first == 200);
    int admin = autotls::testing::admin_port(out);
    REQUIRE_MESSAGE(admin > 0, logs());
    httplib::Client adm("127.0.0.1", admin);
    adm.set_read_timeout(std::chrono::seconds(5));
    auto m = adm.Get("/metrics");
    REQUIRE(m);
    INFO(m->body);
    CHECK(m->body.find("\nautotls_cert_files_total{event=\"loaded\"} 1\n") != std::string::npos);
    CHECK(m->body.find("\nautotls_cert_files_total{event=\"reloaded\"} 1\n") != std::string::npos);
    CHECK(m->body.find("\nautotls_cert_files_total{event=\"failed\"} 1\n") != std::string::npos);
    CHECK(m->body.find("\nautotls_cert_files_failing 1\n") != std::string::npos);
    // What the checks cost: the pair was checked in full when added and at SIGHUP, and parsed
    // at least at start, after the replacement and for the bad pair (more if the writes fell
    // into two debounce windows); every parse follows a stat.
    CHECK(m->body.find("\n# TYPE autotls_cert_files_full_checks_total counter\n") != std::string::npos);
    CHECK(metric(m->body, "autotls_cert_files_full_checks_total") >= 2);
    CHECK(metric(m->body, "autotls_cert_files_pairs_parsed_total") >= 3);
    CHECK(metric(m->body, "autotls_cert_files_pairs_checked_total") >= metric(m->body, "autotls_cert_files_pairs_parsed_total"));
    CHECK(m->body.find("autotls_certificate_not_after_seconds{name=\"files.cli.test\"} ") != std::string::npos);
    auto ready = adm.Get("/readyz");
    REQUIRE(ready);
    CHECK(ready->status == 200);

    REQUIRE(::kill(pid, SIGTERM) == 0);
    int code = wait_exit(pid, 15s);
    CHECK_MESSAGE(code == 0, logs());
  }
}

TEST_SUITE("cli.serve_files") {
  TEST_CASE("serve serves a certbot directory from its live symlinks") {
    using autotls::testing::make_test_ca;
    using autotls::testing::make_test_leaf;
    TempDir d;
    auto ca = make_test_ca("autotls cli certbot CA");
    REQUIRE(ca);
    auto one = make_test_leaf({"one.cli.test"}, *ca);
    auto wild = make_test_leaf({"*.two.cli.test"}, *ca);
    REQUIRE(one);
    REQUIRE(wild);
    fs::path ca_file = d.path / "ca.pem";
    write_file(ca_file, ca->cert_pem);
    // certbot's layout: live/<name>/*.pem are symlinks into archive/<name>/*1.pem.
    fs::path le = d.path / "letsencrypt";
    for (const auto& [name, pair] : {std::pair{std::string("one.cli.test"), *one}, std::pair{std::string("two.cli.test"), *wild}}) {
      fs::create_directories(le / "archive" / name);
      fs::create_directories(le / "live" / name);
      put(le / "archive" / name / "fullchain1.pem", pair.cert_pem + ca->cert_pem);
      put(le / "archive" / name / "privkey1.pem", pair.key_pem);
      fs::create_symlink("../../archive/" + name + "/fullchain1.pem", le / "live" / name / "fullchain.pem");
      fs::create_symlink("../../archive/" + name + "/privkey1.pem", le / "live" / name / "privkey.pem");
    }
    fs::path www = d.path / "www";
    fs::create_directories(www);
    write_file(www / "index.html", "certbot\n");
    int https = free_port();
    std::vector<std::string> argv = {AUTOTLS_BINARY, "serve", "--cert-dir", le.string(), "--root", www.string(),
                                     "--https-address", "127.0.0.1:" + std::to_string(https), "--http-address", "off",
                                     "--admin-address", "off", "--json", "--drain", "1",
                                     "--storage", (d.path / "s").string(), "--ca", "https://127.0.0.1:1/unreachable"};
    fs::path out = d.path / "serve.out", err = d.path / "serve.err";
    pid_t pid = spawn(argv, out, err, {});
    auto deadline = std::chrono::steady_clock::now() + 10s;
    std::pair<long, std::string> got;
    while (std::chrono::steady_clock::now() < deadline) {
      got = https_get("one.cli.test", https, ca_file);
      if (got.first == 200) break;
      std::this_thread::sleep_for(100ms);
    }
    CHECK_MESSAGE(got.first == 200, (read_file(out) + read_file(err)));
    CHECK(got.second == "certbot\n");
    CHECK(https_get("a.two.cli.test", https, ca_file).first == 200);
    CHECK_MESSAGE(read_file(out).find("\"event\":\"cert_files\"") != std::string::npos, read_file(out));
    REQUIRE(::kill(pid, SIGTERM) == 0);
    CHECK(wait_exit(pid, 15s) == 0);
  }
}

namespace {

// events_named is every JSON line of out whose "event" is name.
std::vector<json> events_named(const std::string& out, const std::string& name) {
  std::vector<json> found;
  std::istringstream lines(out);
  std::string line;
  while (std::getline(lines, line)) {
    auto j = json::parse(line, nullptr, false);
    if (j.is_object() && j.value("event", "") == name) found.push_back(std::move(j));
  }
  return found;
}

}  // namespace

TEST_SUITE("cli.serve_files") {
  TEST_CASE("serve starts a --cert-dir from its store snapshot and verifies the directory behind it") {
    using autotls::testing::make_test_ca;
    using autotls::testing::make_test_leaf;
    TempDir d;
    auto ca1 = make_test_ca("autotls cli snapshot CA one");
    auto ca2 = make_test_ca("autotls cli snapshot CA two");
    REQUIRE(ca1);
    REQUIRE(ca2);
    auto one1 = make_test_leaf({"one.snap.cli.test"}, *ca1);
    auto one2 = make_test_leaf({"one.snap.cli.test"}, *ca2);
    auto two1 = make_test_leaf({"two.snap.cli.test"}, *ca1);
    auto two2 = make_test_leaf({"two.snap.cli.test"}, *ca2);
    REQUIRE(one1);
    REQUIRE(one2);
    REQUIRE(two1);
    REQUIRE(two2);
    fs::path ca1_file = d.path / "ca1.pem", ca2_file = d.path / "ca2.pem";
    write_file(ca1_file, ca1->cert_pem);
    write_file(ca2_file, ca2->cert_pem);
    fs::path certs = d.path / "certs";
    auto put_pair = [&](const std::string& name, const autotls::testing::PemPair& leaf, const std::string& ca_pem) {
      fs::create_directories(certs / name);
      put(certs / name / "fullchain.pem", leaf.cert_pem + ca_pem);
      put(certs / name / "privkey.pem", leaf.key_pem);
    };
    put_pair("one", *one1, ca1->cert_pem);
    put_pair("two", *two1, ca1->cert_pem);
    fs::path www = d.path / "www";
    fs::create_directories(www);
    write_file(www / "index.html", "snapshot\n");
    fs::path storage = d.path / "s";
    fs::path snapshots = storage / "snapshots";

    struct Serve {
      pid_t pid = -1;
      int https = 0;
      fs::path out, err;
    };
    int run_no = 0;
    // A failed REQUIRE leaves the test early: whatever serve still runs is killed then.
    struct Reaper {
      std::vector<pid_t> pids;
      ~Reaper() {
        for (pid_t pid : pids) {
          int status = 0;
          if (::waitpid(pid, &status, WNOHANG) != 0) continue;  // reaped already, or not ours
          ::kill(pid, SIGKILL);
          ::waitpid(pid, &status, 0);
        }
      }
    } reaper;
    auto start = [&](const std::vector<std::string>& more) {
      Serve s;
      s.https = free_port();
      ++run_no;
      s.out = d.path / ("serve" + std::to_string(run_no) + ".out");
      s.err = d.path / ("serve" + std::to_string(run_no) + ".err");
      std::vector<std::string> argv = {AUTOTLS_BINARY, "serve", "--cert-dir", certs.string(), "--root", www.string(),
                                       "--https-address", "127.0.0.1:" + std::to_string(s.https), "--http-address",
                                       "off", "--admin-address", "127.0.0.1:0", "--json", "--drain", "1",
                                       "--storage", storage.string(), "--ca", "https://127.0.0.1:1/unreachable"};
      argv.insert(argv.end(), more.begin(), more.end());
      s.pid = spawn(argv, s.out, s.err, {});
      reaper.pids.push_back(s.pid);
      return s;
    };
    auto logs = [](const Serve& s) { return read_file(s.out) + read_file(s.err); };
    auto wait_for = [](const Serve& s, const std::function<bool()>& ok, std::chrono::seconds limit) {
      auto deadline = std::chrono::steady_clock::now() + limit;
      while (std::chrono::steady_clock::now() < deadline) {
        if (ok()) return true;
        int status = 0;
        if (::waitpid(s.pid, &status, WNOHANG) == s.pid) return false;
        std::this_thread::sleep_for(100ms);
      }
      return ok();
    };
    auto has_event = [](const Serve& s, const std::string& name) {
      return !events_named(read_file(s.out), name).empty();
    };
    auto stop = [&](const Serve& s) {
      REQUIRE(::kill(s.pid, SIGTERM) == 0);
      CHECK_MESSAGE(wait_exit(s.pid, 15s) == 0, logs(s));
    };
    auto snapshot_files = [&] {
      std::vector<fs::path> found;
      std::error_code ec;
      for (fs::directory_iterator it(snapshots, ec), end; !ec && it != end; it.increment(ec)) found.push_back(it->path());
      return found;
    };

    // First start: the directory is loaded in full, then its snapshot written, 0600 in a 0700
    // directory under the storage directory.
    {
      Serve s = start({});
      REQUIRE_MESSAGE(wait_for(s, [&] { return https_get("one.snap.cli.test", s.https, ca1_file).first == 200; }, 15s),
                      logs(s));
      REQUIRE_MESSAGE(wait_for(s, [&] { return has_event(s, "cert_dir_snapshot_written"); }, 15s), logs(s));
      auto files = snapshot_files();
      REQUIRE_MESSAGE(files.size() == 1, logs(s));
      CHECK(files[0].filename().string().starts_with("certs-"));
      CHECK(files[0].extension() == ".snap");
      struct stat st {};
      REQUIRE(::stat(files[0].c_str(), &st) == 0);
      CHECK((st.st_mode & 0777) == 0600);
      REQUIRE(::stat(snapshots.c_str(), &st) == 0);
      CHECK((st.st_mode & 0777) == 0700);
      auto ev = events_named(read_file(s.out), "cert_dir_snapshot_written");
      CHECK(ev[0].value("loaded", 0) == 2);
      CHECK(ev[0].value("snapshot", "") == files[0].string());
      CHECK(events_named(read_file(s.out), "cert_files")[0].value("from_snapshot", -1) == 0);
      stop(s);
    }

    // While it is down, one pair changes (now from CA two). The second start serves from the
    // snapshot; the verification behind it finds the changed pair, and then the new
    // certificate is served.
    put_pair("one", *one2, ca2->cert_pem);
    {
      Serve s = start({});
      REQUIRE_MESSAGE(wait_for(s, [&] { return https_get("two.snap.cli.test", s.https, ca1_file).first == 200; }, 15s),
                      logs(s));
      CHECK_MESSAGE(events_named(read_file(s.out), "cert_files")[0].value("from_snapshot", -1) == 1, logs(s));
      // Servable from the snapshot is ready.
      int admin = autotls::testing::admin_port(s.out);
      REQUIRE_MESSAGE(admin > 0, logs(s));
      httplib::Client adm("127.0.0.1", admin);
      adm.set_read_timeout(std::chrono::seconds(5));
      auto ready = adm.Get("/readyz");
      REQUIRE(ready);
      CHECK(ready->status == 200);
      REQUIRE_MESSAGE(wait_for(s, [&] { return has_event(s, "cert_dir_verified"); }, 30s), logs(s));
      auto ev = events_named(read_file(s.out), "cert_dir_verified")[0];
      INFO(ev.dump());
      CHECK(ev.value("loaded", 0) == 2);
      CHECK(ev.value("changed", 0) == 1);
      CHECK(ev.value("added", -1) == 0);
      CHECK(ev.value("removed", -1) == 0);
      CHECK(ev.value("failed", -1) == 0);
      CHECK(ev["changed_paths"].dump().find((certs / "one" / "fullchain.pem").string()) != std::string::npos);
      CHECK(https_get("one.snap.cli.test", s.https, ca2_file).first == 200);
      CHECK(https_get("one.snap.cli.test", s.https, ca1_file).first == 0);
      CHECK_FALSE(has_event(s, "cert_dir_snapshot_ignored"));
      {
        // The verification compared the files with the identities the snapshot recorded and
        // parsed only the changed pair, not every pair.
        auto m = adm.Get("/metrics");
        REQUIRE(m);
        CHECK_MESSAGE(m->body.find("\nautotls_cert_files_pairs_parsed_total 1\n") != std::string::npos, m->body);
      }
      // The watcher watches the directory after the verification: a later change is served.
      put_pair("two", *two2, ca2->cert_pem);
      CHECK_MESSAGE(wait_for(s, [&] { return https_get("two.snap.cli.test", s.https, ca2_file).first == 200; }, 15s),
                    logs(s));
      CHECK(has_event(s, "cert_file_reloaded"));
      auto m = adm.Get("/metrics");
      REQUIRE(m);
      CHECK(m->body.find("\nautotls_cert_dir_snapshot_verifying 0\n") != std::string::npos);
      stop(s);
    }

    // A corrupt snapshot is ignored with one warning; the directory is loaded as without one
    // and the snapshot written anew.
    {
      auto files = snapshot_files();
      REQUIRE(files.size() == 1);
      std::string bytes = read_file(files[0]);
      REQUIRE(bytes.size() > 200);
      bytes[bytes.size() / 2] = static_cast<char>(bytes[bytes.size() / 2] ^ 0x5a);
      {
        std::ofstream(files[0], std::ios::binary | std::ios::trunc) << bytes;
      }
      Serve s = start({});
      REQUIRE_MESSAGE(wait_for(s, [&] { return has_event(s, "cert_dir_snapshot_written"); }, 15s), logs(s));
      auto ignored = events_named(read_file(s.out), "cert_dir_snapshot_ignored");
      REQUIRE_MESSAGE(ignored.size() == 1, logs(s));
      CHECK(ignored[0].value("snapshot", "") == files[0].string());
      CHECK(ignored[0]["error"].dump().find("checksum") != std::string::npos);
      CHECK(events_named(read_file(s.out), "cert_files")[0].value("from_snapshot", -1) == 0);
      CHECK(https_get("one.snap.cli.test", s.https, ca2_file).first == 200);
      CHECK(https_get("two.snap.cli.test", s.https, ca2_file).first == 200);
      CHECK_FALSE(has_event(s, "cert_dir_verified"));
      stop(s);
    }
    // ... and the one written instead is used by the next start.
    {
      Serve s = start({});
      REQUIRE_MESSAGE(wait_for(s, [&] { return has_event(s, "cert_dir_verified"); }, 30s), logs(s));
      CHECK(events_named(read_file(s.out), "cert_files")[0].value("from_snapshot", -1) == 1);
      CHECK(events_named(read_file(s.out), "cert_dir_verified")[0].value("changed", -1) == 0);
      stop(s);
    }

    // While it is down: one pair's chain replaced by a bad file, another pair removed, a new
    // one added. The verification (which compares file identities and parses only what
    // differs) reports each: the bad pair keeps serving its snapshot certificate, the removed
    // one leaves the store, the new one is served. Then everything is put back as it was.
    {
      auto good_one = read_file(certs / "one" / "fullchain.pem");
      put(certs / "one" / "fullchain.pem", "not a certificate\n");
      fs::remove_all(certs / "two");
      auto three = make_test_leaf({"three.snap.cli.test"}, *ca2);
      REQUIRE(three);
      put_pair("three", *three, ca2->cert_pem);
      Serve s = start({});
      REQUIRE_MESSAGE(wait_for(s, [&] { return has_event(s, "cert_dir_verified"); }, 30s), logs(s));
      auto ev = events_named(read_file(s.out), "cert_dir_verified")[0];
      INFO(ev.dump());
      CHECK(events_named(read_file(s.out), "cert_files")[0].value("from_snapshot", -1) == 1);
      CHECK(ev.value("loaded", 0) == 1);  // three (the snapshot certificate of one is kept, not loaded)
      CHECK(ev.value("changed", -1) == 0);
      CHECK(ev.value("added", -1) == 1);
      CHECK(ev.value("removed", -1) == 1);
      CHECK(ev.value("failed", -1) == 1);
      CHECK(ev.value("kept", -1) == 1);
      auto failed = events_named(read_file(s.out), "cert_file_failed");
      REQUIRE_MESSAGE(failed.size() == 1, logs(s));
      CHECK(failed[0].value("path", "") == (certs / "one" / "fullchain.pem").string());
      CHECK(https_get("one.snap.cli.test", s.https, ca2_file).first == 200);
      CHECK(https_get("three.snap.cli.test", s.https, ca2_file).first == 200);
      CHECK(https_get("two.snap.cli.test", s.https, ca2_file).first == 0);
      stop(s);
      put(certs / "one" / "fullchain.pem", good_one);
      fs::remove_all(certs / "three");
      put_pair("two", *two2, ca2->cert_pem);
    }

    // A snapshot others may read, or another user's, is not trusted either (one warning each).
    {
      auto files = snapshot_files();
      REQUIRE(files.size() == 1);
      std::vector<std::pair<std::string, std::function<void()>>> spoil = {
          {"permission bits", [&] { fs::permissions(files[0], fs::perms::group_read, fs::perm_options::add); }}};
      if (::geteuid() == 0) {
        spoil.push_back({"owned by uid 65534", [&] { REQUIRE(::chown(files[0].c_str(), 65534, 65534) == 0); }});
      }
      for (const auto& [why, act] : spoil) {
        act();
        Serve s = start({});
        REQUIRE_MESSAGE(wait_for(s, [&] { return has_event(s, "cert_dir_snapshot_written"); }, 15s), logs(s));
        auto ignored = events_named(read_file(s.out), "cert_dir_snapshot_ignored");
        REQUIRE_MESSAGE(ignored.size() == 1, logs(s));
        CHECK_MESSAGE(ignored[0]["error"].dump().find(why) != std::string::npos, ignored[0].dump());
        CHECK(events_named(read_file(s.out), "cert_files")[0].value("from_snapshot", -1) == 0);
        stop(s);
        struct stat st {};
        REQUIRE(::stat(files[0].c_str(), &st) == 0);  // rewritten: ours, 0600
        CHECK((st.st_mode & 0777) == 0600);
        CHECK(st.st_uid == ::geteuid());
      }
    }

    // Disabled by the config key: no snapshot is read or written.
    {
      fs::remove_all(snapshots);
      fs::path cfg = d.path / "serve.json";
      write_file(cfg, json({{"cert-dir-snapshots", "off"}}).dump());
      Serve s = start({"--config", cfg.string()});
      REQUIRE_MESSAGE(wait_for(s, [&] { return https_get("one.snap.cli.test", s.https, ca2_file).first == 200; }, 15s),
                      logs(s));
      CHECK_FALSE(has_event(s, "cert_dir_snapshot_written"));
      stop(s);
      CHECK_FALSE(fs::exists(snapshots));
    }

    // Moved by the config key, but never into the directory it mirrors (a bad config: exit 2).
    {
      fs::path cfg = d.path / "serve.json";
      write_file(cfg, json({{"cert-dir-snapshots", (certs / "snapshots").string()}}).dump());
      Serve s = start({"--config", cfg.string()});
      int code = wait_exit(s.pid, 20s);
      CHECK_MESSAGE(code == 2, logs(s));
      CHECK_MESSAGE(logs(s).find("must not live in the directory") != std::string::npos, logs(s));
      CHECK_FALSE(fs::exists(certs / "snapshots"));
      fs::path elsewhere = d.path / "elsewhere";
      write_file(cfg, json({{"cert-dir-snapshots", elsewhere.string()}}).dump());
      Serve t = start({"--config", cfg.string()});
      REQUIRE_MESSAGE(wait_for(t, [&] { return has_event(t, "cert_dir_snapshot_written"); }, 15s), logs(t));
      CHECK(events_named(read_file(t.out), "cert_dir_snapshot_written")[0].value("snapshot", "").starts_with(elsewhere.string() + "/"));
      stop(t);
    }
  }

  TEST_CASE("serve loads a --cert-dir without snapshot in bulk and its watcher parses no unchanged pair") {
    using autotls::testing::make_test_ca;
    using autotls::testing::make_test_leaf;
    TempDir d;
    auto ca1 = make_test_ca("autotls cli bulk CA one");
    auto ca2 = make_test_ca("autotls cli bulk CA two");
    REQUIRE(ca1);
    REQUIRE(ca2);
    fs::path ca1_file = d.path / "ca1.pem", ca2_file = d.path / "ca2.pem";
    write_file(ca1_file, ca1->cert_pem);
    write_file(ca2_file, ca2->cert_pem);
    fs::path certs = d.path / "certs";
    // More pairs than a log line names (20), for the reload line below.
    constexpr int kPairs = 25;
    for (int i = 0; i < kPairs; ++i) {
      std::string name = "b" + std::to_string(i) + ".bulk.cli.test";
      auto leaf = make_test_leaf({name}, *ca1);
      REQUIRE(leaf);
      fs::create_directories(certs / "live" / name);
      put(certs / "live" / name / "fullchain.pem", leaf->cert_pem + ca1->cert_pem);
      put(certs / "live" / name / "privkey.pem", leaf->key_pem);
    }
    fs::path www = d.path / "www";
    fs::create_directories(www);
    write_file(www / "index.html", "bulk\n");
    auto argv_for = [&](int https) {
      return std::vector<std::string>{"serve", "--cert-dir", certs.string(), "--root", www.string(),
                                      "--https-address", "127.0.0.1:" + std::to_string(https), "--http-address",
                                      "off", "--admin-address", "127.0.0.1:0", "--json", "--drain", "1",
                                      "--storage", (d.path / "s").string(), "--ca", "https://127.0.0.1:1/unreachable",
                                      "--cert-dir-snapshots", "off"};
    };

    // The start checks what the pair-by-pair start checked: a key open to others, named with
    // the fix, and a bad pair among good ones, naming its file and reason.
    fs::path loose = certs / "live" / "b2.bulk.cli.test" / "privkey.pem";
    fs::permissions(loose, fs::perms::owner_read | fs::perms::owner_write | fs::perms::others_read);
    {
      auto r = run(argv_for(free_port()), {}, 20s);
      CHECK_MESSAGE(r.code == 2, show(r));
      CHECK_MESSAGE((r.out + r.err).find(loose.string() + " is accessible by group or others") != std::string::npos, show(r));
      CHECK_MESSAGE((r.out + r.err).find("chmod 600 " + loose.string()) != std::string::npos, show(r));
    }
    fs::permissions(loose, fs::perms::owner_read | fs::perms::owner_write);
    {
      auto other = make_test_leaf({"b3.bulk.cli.test"}, *ca1);
      REQUIRE(other);
      fs::path key = certs / "live" / "b3.bulk.cli.test" / "privkey.pem";
      std::string good_key = read_file(key);
      put(key, other->key_pem);
      auto r = run(argv_for(free_port()), {}, 20s);
      CHECK_MESSAGE(r.code == 2, show(r));
      CHECK_MESSAGE((r.out + r.err).find((certs / "live" / "b3.bulk.cli.test" / "fullchain.pem").string()) != std::string::npos, show(r));
      CHECK_MESSAGE((r.out + r.err).find("does not match") != std::string::npos, show(r));
      put(key, good_key);
    }

    int https = free_port();
    std::vector<std::string> argv = argv_for(https);
    argv.insert(argv.begin(), AUTOTLS_BINARY);
    fs::path out = d.path / "serve.out", err = d.path / "serve.err";
    pid_t pid = spawn(argv, out, err, {});
    struct Reaper {
      pid_t pid;
      ~Reaper() {
        int status = 0;
        if (::waitpid(pid, &status, WNOHANG) != 0) return;
        ::kill(pid, SIGKILL);
        ::waitpid(pid, &status, 0);
      }
    } reaper{pid};
    auto logs = [&] { return read_file(out) + read_file(err); };
    auto wait_until = [&](const std::function<bool()>& ok, std::chrono::seconds limit) {
      auto deadline = std::chrono::steady_clock::now() + limit;
      while (std::chrono::steady_clock::now() < deadline) {
        if (ok()) return true;
        std::this_thread::sleep_for(100ms);
      }
      return ok();
    };
    REQUIRE_MESSAGE(wait_until([&] { return https_get("b0.bulk.cli.test", https, ca1_file).first == 200; }, 15s), logs());
    int admin = autotls::testing::admin_port(out);
    REQUIRE_MESSAGE(admin > 0, logs());
    httplib::Client adm("127.0.0.1", admin);
    adm.set_read_timeout(std::chrono::seconds(5));
    CHECK(adm.Get("/readyz")->status == 200);
    auto metrics = [&] {
      auto m = adm.Get("/metrics");
      return m ? m->body : std::string();
    };
    // The watcher's first check (behind the start) is over once its full check is counted.
    REQUIRE_MESSAGE(wait_until([&] { return metrics().find("\nautotls_cert_files_full_checks_total 1\n") != std::string::npos &&
                                            metrics().find("\nautotls_cert_dir_snapshot_verifying 0\n") != std::string::npos; },
                               15s),
                    (metrics() + logs()));
    std::string m = metrics();
    INFO(m);
    // Every pair was loaded once, by the start: the watcher stat()ed them and parsed none.
    CHECK(m.find("autotls_cert_files_total{event=\"loaded\"} " + std::to_string(kPairs) + "\n") != std::string::npos);
    CHECK(m.find("\nautotls_cert_files_pairs_parsed_total 0\n") != std::string::npos);
    CHECK(m.find("\nautotls_cert_files_failing 0\n") != std::string::npos);
    CHECK(events_named(read_file(out), "cert_file_loaded").empty());

    // It watches: a replaced pair is served without a restart, and parsed alone.
    auto next = make_test_leaf({"b4.bulk.cli.test"}, *ca2);
    REQUIRE(next);
    put(certs / "live" / "b4.bulk.cli.test" / "privkey.pem", next->key_pem);
    put(certs / "live" / "b4.bulk.cli.test" / "fullchain.pem", next->cert_pem + ca2->cert_pem);
    CHECK_MESSAGE(wait_until([&] { return https_get("b4.bulk.cli.test", https, ca2_file).first == 200; }, 15s), logs());
    CHECK(https_get("b1.bulk.cli.test", https, ca1_file).first == 200);

    // A SIGHUP's reload line names the first 20 names and counts them all.
    REQUIRE(::kill(pid, SIGHUP) == 0);
    REQUIRE_MESSAGE(wait_until([&] { return !events_named(read_file(out), "reload").empty(); }, 15s), logs());
    auto reload = events_named(read_file(out), "reload").front();
    CHECK_MESSAGE(reload.value("names", json::array()).size() == 20, reload.dump());
    CHECK_MESSAGE(reload.value("names_count", 0) == kPairs, reload.dump());
    CHECK_MESSAGE(reload.value("added_count", -1) == 0, reload.dump());
    REQUIRE(::kill(pid, SIGTERM) == 0);
    CHECK_MESSAGE(wait_exit(pid, 15s) == 0, logs());
  }
}

namespace {

// NamesServe runs `autotls serve` on a --cert-dir (and any more arguments) for the tests of
// the names that follow the files, and reads its admin listener.
struct NamesServe {
  fs::path out, err;
  pid_t pid = -1;
  int https = 0;
  int admin = 0;

  NamesServe(const fs::path& dir, const fs::path& certs, const fs::path& www, const std::string& tag,
             const std::vector<std::string>& more) {
    out = dir / ("serve-" + tag + ".out");
    err = dir / ("serve-" + tag + ".err");
    https = free_port();
    std::vector<std::string> argv = {AUTOTLS_BINARY, "serve", "--cert-dir", certs.string(), "--https-address",
                                     "127.0.0.1:" + std::to_string(https), "--http-address", "off",
                                     "--admin-address", "127.0.0.1:0", "--json", "--drain", "1", "--storage",
                                     (dir / "s").string()};
    if (std::find(more.begin(), more.end(), "--ca") == more.end()) {
      argv.insert(argv.end(), {"--ca", "https://127.0.0.1:1/unreachable"});
    }
    if (std::find(more.begin(), more.end(), "--config") == more.end()) argv.insert(argv.end(), {"--root", www.string()});
    argv.insert(argv.end(), more.begin(), more.end());
    pid = spawn(argv, out, err, {});
  }
  // A failed REQUIRE leaves the test early: serve is killed then.
  ~NamesServe() {
    int status = 0;
    if (pid <= 0 || ::waitpid(pid, &status, WNOHANG) != 0) return;
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
  }
  std::string logs() const { return read_file(out) + read_file(err); }
  bool wait_for(const std::function<bool()>& ok, std::chrono::seconds limit) const {
    auto deadline = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < deadline) {
      if (ok()) return true;
      int status = 0;
      if (::waitpid(pid, &status, WNOHANG) == pid) return false;
      std::this_thread::sleep_for(100ms);
    }
    return ok();
  }
  std::vector<json> events(const std::string& name) const { return events_named(read_file(out), name); }
  // get is an admin GET: {status, body}, {0, ""} when it failed.
  std::pair<int, std::string> get(const std::string& path) {
    if (admin == 0) admin = autotls::testing::admin_port(out);
    if (admin == 0) return {0, ""};
    httplib::Client adm("127.0.0.1", admin);
    adm.set_read_timeout(std::chrono::seconds(5));
    auto r = adm.Get(path);
    return r ? std::pair{r->status, r->body} : std::pair{0, std::string()};
  }
  // certificate is the /certificates entry for name (null when it is not listed).
  json certificate(const std::string& name) {
    auto list = json::parse(get("/certificates").second, nullptr, false);
    if (!list.is_array()) return nullptr;
    for (const auto& j : list) {
      if (j.value("name", "") == name) return j;
    }
    return nullptr;
  }
  bool expiry_metric(const std::string& name) {
    return get("/metrics").second.find("autotls_certificate_not_after_seconds{name=\"" + name + "\"} ") != std::string::npos;
  }
  // watching: the watcher took the directory over from the start's load (or verification).
  bool watching() {
    auto m = get("/metrics").second;
    return m.find("\nautotls_cert_files_full_checks_total ") != std::string::npos &&
           m.find("\nautotls_cert_files_full_checks_total 0\n") == std::string::npos &&
           m.find("\nautotls_cert_dir_snapshot_verifying 0\n") != std::string::npos;
  }
  // loaded_event: a cert_file_<type> line names the chain file path.
  bool file_event(const std::string& type, const fs::path& chain) const {
    for (const auto& j : events("cert_file_" + type)) {
      if (j.value("path", "") == chain.string()) return true;
    }
    return false;
  }
  void stop() {
    REQUIRE(::kill(pid, SIGTERM) == 0);
    CHECK_MESSAGE(wait_exit(pid, 15s) == 0, logs());
  }
};

// NamesFiles is what the cli.serve_files tests serve: a test CA (its certificate in ca_file),
// a --cert-dir (certs) of pairs it signs, and a web root (www) with an index.
struct NamesFiles {
  TempDir d;
  autotls::testing::PemPair ca;
  fs::path ca_file = d.path / "ca.pem";
  fs::path certs = d.path / "certs";
  fs::path www = d.path / "www";

  NamesFiles() {
    auto made = autotls::testing::make_test_ca("autotls cli names CA");
    REQUIRE(made);
    ca = *made;
    write_file(ca_file, ca.cert_pem);
    fs::create_directories(www);
    write_file(www / "index.html", "names\n");
  }
  // leaf is a certificate for name signed by the CA.
  autotls::testing::PemPair leaf(const std::string& name) const {
    auto l = autotls::testing::make_test_leaf({name}, ca);
    REQUIRE(l);
    return *l;
  }
  // put_pair writes leaf as the pair certs/<dir>/ (privkey.pem, fullchain.pem with the CA).
  void put_pair(const std::string& dir, const autotls::testing::PemPair& leaf) const {
    fs::create_directories(certs / dir);
    put(certs / dir / "privkey.pem", leaf.key_pem);
    put(certs / dir / "fullchain.pem", leaf.cert_pem + ca.cert_pem);
  }
};

}  // namespace

TEST_SUITE("cli.serve_files") {
  TEST_CASE("serve re-executes itself with the heap on huge pages for a --cert-dir of 1000 pair directories") {
    using autotls::testing::make_test_ca;
    using autotls::testing::make_test_leaf;
    TempDir d;
    auto ca = make_test_ca("autotls cli huge pages CA");
    REQUIRE(ca);
    fs::path ca_file = d.path / "ca.pem";
    write_file(ca_file, ca->cert_pem);
    fs::path small = d.path / "small", large = d.path / "large";
    for (const fs::path& dir : {small, large}) {
      for (int i = 0; i < 3; ++i) {
        std::string name = "h" + std::to_string(i) + ".huge.cli.test";
        auto leaf = make_test_leaf({name}, *ca);
        REQUIRE(leaf);
        fs::create_directories(dir / "live" / name);
        put(dir / "live" / name / "fullchain.pem", leaf->cert_pem + ca->cert_pem);
        put(dir / "live" / name / "privkey.pem", leaf->key_pem);
      }
    }
    // 1000 pair directories in all (a subdirectory with neither file is skipped by the load,
    // but counts: the estimate is one stat of the directory, its link count).
    for (int i = 0; i < 997; ++i) fs::create_directories(large / "live" / ("empty" + std::to_string(i)));
    fs::path www = d.path / "www";
    fs::create_directories(www);
    write_file(www / "index.html", "huge\n");
    // environ_of is the environment pid's program image started with (/proc/PID/environ: what
    // its last exec passed, not what it changed since).
    auto environ_of = [](pid_t pid) {
      std::string e = read_file("/proc/" + std::to_string(pid) + "/environ");
      std::replace(e.begin(), e.end(), '\0', '\n');
      return "\n" + e;
    };
    std::string out_text, err_text;  // the last start's stdout and stderr
    auto start = [&](const fs::path& dir, const std::vector<std::string>& env,
                     const std::vector<std::string>& more_args = {}) {
      int https = free_port();
      std::vector<std::string> argv{AUTOTLS_BINARY, "serve", "--cert-dir", dir.string(), "--root", www.string(),
                                    "--https-address", "127.0.0.1:" + std::to_string(https), "--http-address", "off",
                                    "--admin-address", "off", "--json", "--drain", "0",
                                    "--storage", (d.path / ("s-" + dir.filename().string())).string(),
                                    "--ca", "https://127.0.0.1:1/unreachable"};
      argv.insert(argv.end(), more_args.begin(), more_args.end());
      fs::path out = d.path / "serve.out", err = d.path / "serve.err";
      pid_t pid = spawn(argv, out, err, env);
      auto logs = [&] { return read_file(out) + read_file(err); };
      bool served = false;
      for (int i = 0; i < 150 && !served; ++i) {
        served = https_get("h1.huge.cli.test", https, ca_file).first == 200;
        if (!served) std::this_thread::sleep_for(100ms);
      }
      std::string environ_text = environ_of(pid);
      std::string log = logs();
      ::kill(pid, SIGTERM);
      CHECK(wait_exit(pid, 20s) == 0);
      CHECK_MESSAGE(served, log);
      out_text = read_file(out);
      err_text = read_file(err);
      return environ_text;
    };
    // 1000 pair directories: the process (same pid) runs with glibc.malloc.hugetlb=1, and
    // remembers how the environment was, to give its children that.
    std::string e = start(large, {});
    CHECK_MESSAGE(e.find("\nGLIBC_TUNABLES=glibc.malloc.hugetlb=1\n") != std::string::npos, e);
    CHECK_MESSAGE(e.find("\nAUTOTLS_REEXEC_TUNABLES=-\n") != std::string::npos, e);
    // Other tunables given are kept, the huge pages added. (glibc 2.36 ends each value it
    // parsed with a NUL in the environment's own memory: the ':' shows as a line break here.)
    e = start(large, {"GLIBC_TUNABLES=glibc.malloc.arena_max=4"});
    CHECK_MESSAGE(e.find("\nGLIBC_TUNABLES=glibc.malloc.arena_max=4") != std::string::npos, e);
    CHECK_MESSAGE(e.find("glibc.malloc.hugetlb=1\n") != std::string::npos, e);
    CHECK_MESSAGE(e.find("\nAUTOTLS_REEXEC_TUNABLES==glibc.malloc.arena_max=4\n") != std::string::npos, e);
    // A given glibc.malloc.hugetlb (=0: the opt-out) is left alone, and so is a small directory.
    e = start(large, {"GLIBC_TUNABLES=glibc.malloc.hugetlb=0"});
    CHECK_MESSAGE(e.find("\nGLIBC_TUNABLES=glibc.malloc.hugetlb=0\n") != std::string::npos, e);
    CHECK_MESSAGE(e.find("AUTOTLS_REEXEC_TUNABLES") == std::string::npos, e);
    e = start(small, {});
    CHECK_MESSAGE(e.find("glibc.malloc.hugetlb") == std::string::npos, e);
    CHECK_MESSAGE(e.find("AUTOTLS_REEXEC_TUNABLES") == std::string::npos, e);

    // Every line is printed once although main runs twice: the first image prints nothing but,
    // with --verbose, the line that announces the exec (options from a config file too, which
    // is read by both images).
    fs::path config = d.path / "verbose.json";
    write_file(config, R"({"verbose": true})");
    e = start(large, {}, {"--config", config.string()});
    CHECK_MESSAGE(e.find("\nAUTOTLS_REEXEC_TUNABLES=-\n") != std::string::npos, e);
    // count_lines counts the JSON lines of text whose key is value.
    auto count_lines = [](const std::string& text, const std::string& key, const std::string& value) {
      int n = 0;
      std::istringstream lines(text);
      for (std::string line; std::getline(lines, line);) {
        auto j = json::parse(line, nullptr, false);
        if (j.is_object() && j.value(key, "") == value) ++n;
      }
      return n;
    };
    INFO("stdout:\n" << out_text << "stderr:\n" << err_text);
    CHECK(count_lines(err_text, "message", "re-executing with the heap on huge pages") == 1);
    CHECK(err_text.find("\"GLIBC_TUNABLES\":\"glibc.malloc.hugetlb=1\"") != std::string::npos);
    for (const char* event : {"cert_files", "listening", "ready"}) CHECK(count_lines(out_text, "event", event) == 1);
    // And no line twice on either stream (their times aside).
    for (const std::string* text : {&out_text, &err_text}) {
      std::set<std::string> seen;
      std::istringstream lines(*text);
      for (std::string line; std::getline(lines, line);) {
        auto j = json::parse(line, nullptr, false);
        if (j.is_object()) j.erase("time");
        std::string key = j.is_object() ? j.dump() : line;
        CHECK_MESSAGE(seen.insert(key).second, "printed twice: " << line);
      }
    }
  }

  TEST_CASE("serve's hooks get the environment as it was given when serve re-executed itself for huge pages") {
    TempDir d;
    auto ca = autotls::testing::make_test_ca("autotls cli reexec hooks CA");
    REQUIRE(ca);
    // A --cert-dir of 1000 pair directories (one pair, 999 empty): serve re-executes itself.
    fs::path certs = d.path / "certs";
    auto leaf = autotls::testing::make_test_leaf({"file.reexec.cli.test"}, *ca);
    REQUIRE(leaf);
    fs::create_directories(certs / "live" / "file");
    put(certs / "live" / "file" / "fullchain.pem", leaf->cert_pem + ca->cert_pem);
    put(certs / "live" / "file" / "privkey.pem", leaf->key_pem);
    for (int i = 0; i < 999; ++i) fs::create_directories(certs / "live" / ("empty" + std::to_string(i)));
    fs::path www = d.path / "www";
    fs::create_directories(www);
    write_file(www / "index.html", "hooks\n");
    // run starts serve with the internal issuer for a name no file covers, so it obtains a
    // certificate at once and runs the deploy hook, which writes its environment to a file;
    // returns that environment and the one serve's image started with (/proc/PID/environ).
    int runs = 0;
    auto run = [&](const std::vector<std::string>& env) -> std::pair<std::string, std::string> {
      std::string n = std::to_string(++runs);
      fs::path hook_env = d.path / ("hook-" + n + ".env");
      std::string hook = "env > " + hook_env.string() + ".tmp && mv " + hook_env.string() + ".tmp " + hook_env.string();
      std::vector<std::string> argv{AUTOTLS_BINARY, "serve", "--ca", "internal", "--storage", (d.path / ("s" + n)).string(),
                                    "-d", "hook.reexec.cli.test", "--cert-dir", certs.string(), "--root", www.string(),
                                    "--https-address", "127.0.0.1:" + std::to_string(free_port()),
                                    "--http-address", "off", "--admin-address", "off", "--json", "--drain", "0",
                                    "--deploy-hook", hook};
      fs::path out = d.path / ("serve-" + n + ".out"), err = d.path / ("serve-" + n + ".err");
      pid_t pid = spawn(argv, out, err, env);
      bool ran = false;
      for (int i = 0; i < 300 && !ran; ++i) {
        ran = fs::exists(hook_env);
        int status = 0;
        if (!ran && ::waitpid(pid, &status, WNOHANG) == pid) break;
        if (!ran) std::this_thread::sleep_for(100ms);
      }
      // The serving image's (it ran the hook, so it is past any exec).
      std::string image = read_file("/proc/" + std::to_string(pid) + "/environ");
      ::kill(pid, SIGTERM);
      CHECK(wait_exit(pid, 20s) == 0);
      CHECK_MESSAGE(ran, (read_file(out) + read_file(err)));
      std::replace(image.begin(), image.end(), '\0', '\n');
      return {"\n" + read_file(hook_env), "\n" + image};
    };
    // GLIBC_TUNABLES given: serve ran with the huge pages added, the hook sees it as given and
    // no marker.
    auto [hook, image] = run({"GLIBC_TUNABLES=glibc.malloc.arena_max=4"});
    CHECK_MESSAGE(image.find("\nAUTOTLS_REEXEC_TUNABLES==glibc.malloc.arena_max=4\n") != std::string::npos, image);
    CHECK_MESSAGE(hook.find("\nAUTOTLS_EVENT=obtained\n") != std::string::npos, hook);
    CHECK_MESSAGE(hook.find("\nGLIBC_TUNABLES=glibc.malloc.arena_max=4\n") != std::string::npos, hook);
    CHECK_MESSAGE(hook.find("hugetlb") == std::string::npos, hook);
    CHECK_MESSAGE(hook.find("AUTOTLS_REEXEC_TUNABLES") == std::string::npos, hook);
    // Not given: the hook has none either.
    std::tie(hook, image) = run({});
    CHECK_MESSAGE(image.find("\nAUTOTLS_REEXEC_TUNABLES=-\n") != std::string::npos, image);
    CHECK_MESSAGE(hook.find("\nAUTOTLS_EVENT=obtained\n") != std::string::npos, hook);
    CHECK_MESSAGE(hook.find("GLIBC_TUNABLES") == std::string::npos, hook);
    CHECK_MESSAGE(hook.find("AUTOTLS_REEXEC_TUNABLES") == std::string::npos, hook);
  }

  TEST_CASE("serve lists a pair added to its --cert-dir after start, and keeps it over SIGHUP") {
    NamesFiles f;
    TempDir& d = f.d;
    const fs::path &ca_file = f.ca_file, &certs = f.certs, &www = f.www;
    const auto one = f.leaf("one.names.cli.test");
    const auto two = f.leaf("two.names.cli.test");
    f.put_pair("one", one);
    // The configured site is the file's name: nothing to issue (the CA is unreachable).
    fs::path config = d.path / "serve.json";
    auto sites = [&](const std::vector<std::string>& names) {
      json s = json::object();
      for (const auto& n : names) s[n] = {{"root", www.string()}};
      write_file(config, json({{"sites", s}}).dump());
    };
    sites({"one.names.cli.test"});
    NamesServe s(d.path, certs, www, "added", {"--config", config.string(), "--cert-dir-snapshots", "off"});
    REQUIRE_MESSAGE(s.wait_for([&] { return https_get("one.names.cli.test", s.https, ca_file).first == 200; }, 15s),
                    s.logs());
    REQUIRE_MESSAGE(s.wait_for([&] { return s.watching(); }, 15s), s.logs());
    CHECK(s.get("/readyz").first == 200);
    CHECK(s.certificate("two.names.cli.test").is_null());

    // A pair added after start is served, and its name joins the names served.
    f.put_pair("two", two);
    REQUIRE_MESSAGE(s.wait_for([&] { return s.file_event("loaded", certs / "two" / "fullchain.pem"); }, 15s), s.logs());
    // Its certificate verifies (421: no site for it yet; 0 would be a failed handshake).
    CHECK(https_get("two.names.cli.test", s.https, ca_file).first == 421);
    CHECK(s.get("/readyz").first == 200);
    auto entry = s.certificate("two.names.cli.test");
    CHECK_MESSAGE(entry.value("source", "") == "files", s.get("/certificates").second);
    CHECK(entry.value("managed", true) == false);
    CHECK_MESSAGE(s.expiry_metric("two.names.cli.test"), s.get("/metrics").second);
    CHECK(s.expiry_metric("one.names.cli.test"));

    // A SIGHUP with the same configuration: the name is neither new nor removed, and stays.
    REQUIRE(::kill(s.pid, SIGHUP) == 0);
    REQUIRE_MESSAGE(s.wait_for([&] { return s.events("reload").size() == 1; }, 15s), s.logs());
    {
      auto reload = s.events("reload")[0];
      INFO(reload.dump());
      CHECK(reload.value("removed_count", -1) == 0);
      CHECK(reload.value("added_count", -1) == 0);
      CHECK(reload.value("names_count", 0) == 2);
    }
    CHECK_MESSAGE(s.certificate("two.names.cli.test").value("source", "") == "files", s.get("/certificates").second);
    CHECK(s.expiry_metric("two.names.cli.test"));
    CHECK(s.get("/readyz").first == 200);

    // The name made a site too: still served from its file, not issued (the start-time list of
    // file names did not cover it).
    sites({"one.names.cli.test", "two.names.cli.test"});
    REQUIRE(::kill(s.pid, SIGHUP) == 0);
    REQUIRE_MESSAGE(s.wait_for([&] { return s.events("reload").size() == 2; }, 15s), s.logs());
    {
      auto reload = s.events("reload")[1];
      INFO(reload.dump());
      CHECK(reload.value("removed_count", -1) == 0);
      CHECK(reload.value("added_count", -1) == 0);
    }
    entry = s.certificate("two.names.cli.test");
    CHECK_MESSAGE(entry.value("source", "") == "files", s.get("/certificates").second);
    CHECK(entry.value("managed", true) == false);
    CHECK(https_get("two.names.cli.test", s.https, ca_file).first == 200);
    CHECK(s.get("/readyz").first == 200);
    s.stop();
  }

  TEST_CASE("serve issues a site name at once when its file certificate stops covering it") {
    NamesFiles f;
    TempDir& d = f.d;
    const fs::path &ca_file = f.ca_file, &certs = f.certs, &www = f.www;
    const auto site = f.leaf("site.names.cli.test");
    const auto other = f.leaf("other.names.cli.test");
    f.put_pair("pair", site);
    fs::path config = d.path / "serve.json";
    write_file(config, json({{"sites", {{"site.names.cli.test", {{"root", www.string()}}}}}}).dump());
    // The internal CA: an issuance needs no network, and none happens while the file covers the name.
    NamesServe s(d.path, certs, www, "uncovered",
                 {"--config", config.string(), "--cert-dir-snapshots", "off", "--ca", "internal"});
    REQUIRE_MESSAGE(s.wait_for([&] { return https_get("site.names.cli.test", s.https, ca_file).first == 200; }, 15s),
                    s.logs());
    REQUIRE_MESSAGE(s.wait_for([&] { return s.watching(); }, 15s), s.logs());
    CHECK(s.certificate("site.names.cli.test").value("source", "") == "files");
    CHECK(s.events("obtained").empty());

    // The pair now holds another name: the site's name is issued without a SIGHUP.
    f.put_pair("pair", other);
    REQUIRE_MESSAGE(s.wait_for([&] { return s.file_event("reloaded", certs / "pair" / "fullchain.pem"); }, 15s), s.logs());
    REQUIRE_MESSAGE(s.wait_for([&] { return !s.events("obtained").empty(); }, 15s), s.logs());
    CHECK(s.events("obtained")[0]["names"] == json::array({"site.names.cli.test"}));
    CHECK(s.events("reload").empty());
    fs::path internal_root = d.path / "s" / "internal" / "root.pem";
    CHECK_MESSAGE(s.wait_for([&] { return https_get("site.names.cli.test", s.https, internal_root).first == 200; }, 15s),
                  s.logs());
    auto entry = s.certificate("site.names.cli.test");
    CHECK_MESSAGE(entry.value("managed", false) == true, s.get("/certificates").second);
    CHECK(s.get("/readyz").first == 200);
    s.stop();
  }

  TEST_CASE("serve stops managing a site name a file certificate starts covering, and manages it again after") {
    NamesFiles f;
    TempDir& d = f.d;
    const fs::path &ca_file = f.ca_file, &certs = f.certs, &www = f.www;
    const std::string site = "site.names.cli.test";
    const auto other = f.leaf("other.names.cli.test");
    const auto wildcard = f.leaf("*.names.cli.test");
    f.put_pair("pair", other);
    fs::path config = d.path / "serve.json";
    write_file(config, json({{"sites", {{site, {{"root", www.string()}}}}}}).dump());
    NamesServe s(d.path, certs, www, "handed",
                 {"--config", config.string(), "--cert-dir-snapshots", "off", "--ca", "internal"});
    fs::path internal_root = d.path / "s" / "internal" / "root.pem";
    REQUIRE_MESSAGE(s.wait_for([&] { return https_get(site, s.https, internal_root).first == 200; }, 15s), s.logs());
    REQUIRE_MESSAGE(s.wait_for([&] { return s.watching(); }, 15s), s.logs());
    REQUIRE(s.events("obtained").size() == 1);
    const std::string acme_id = s.events("obtained")[0].value("cert_id", "");
    CHECK(s.certificate(site).value("managed", false) == true);

    // The pair now holds a wildcard that covers the site's name. The file wins at once: the
    // ACME certificate (an exact name, which the store would prefer to the wildcard) leaves the
    // store and the name is no longer managed.
    f.put_pair("pair", wildcard);
    REQUIRE_MESSAGE(s.wait_for([&] { return s.file_event("reloaded", certs / "pair" / "fullchain.pem"); }, 15s), s.logs());
    CHECK_MESSAGE(s.wait_for([&] { return https_get(site, s.https, ca_file).first == 200; }, 10s), s.logs());
    REQUIRE_MESSAGE(s.wait_for([&] { return !s.events("unmanaged").empty(); }, 15s), s.logs());
    {
      auto e = s.events("unmanaged")[0];
      INFO(e.dump());
      CHECK(e.value("name", "") == site);
      CHECK(e.value("cert_id", "") == acme_id);
      CHECK(e.value("removed", false) == true);
    }
    CHECK(https_get(site, s.https, internal_root).first != 200);
    CHECK(s.certificate(site).value("source", "") == "files");
    // The wildcard name and the site it covers both count as served: ready, with an expiry
    // each (a lookup of "*.names.cli.test" as an SNI name would find nothing).
    CHECK_MESSAGE(s.get("/readyz").first == 200, s.get("/certificates").second);
    CHECK_MESSAGE(s.expiry_metric("*.names.cli.test"), s.get("/metrics").second);
    CHECK(s.expiry_metric(site));
    {
      auto e = s.certificate("*.names.cli.test");
      INFO(s.get("/certificates").second);
      CHECK(e.value("source", "") == "files");
      CHECK(e.contains("not_after"));
      CHECK(e.value("names", json::array()) == json::array({"*.names.cli.test"}));
    }

    // A pass over the names (SIGHUP) issues and loads nothing for it: the file keeps winning.
    REQUIRE(::kill(s.pid, SIGHUP) == 0);
    REQUIRE_MESSAGE(s.wait_for([&] { return s.events("reload").size() == 1; }, 15s), s.logs());
    CHECK(https_get(site, s.https, ca_file).first == 200);
    CHECK(s.events("obtained").size() == 1);
    CHECK(s.events("renewed").empty());
    CHECK(s.events("loaded").empty());

    // The pair stops covering it: managed again at once, from storage (no new issuance).
    f.put_pair("pair", other);
    REQUIRE_MESSAGE(s.wait_for([&] { return !s.events("loaded").empty(); }, 15s), s.logs());
    CHECK(s.events("loaded")[0]["names"] == json::array({site}));
    CHECK(s.events("loaded")[0].value("cert_id", "") == acme_id);
    CHECK_MESSAGE(s.wait_for([&] { return https_get(site, s.https, internal_root).first == 200; }, 15s), s.logs());
    CHECK(s.events("obtained").size() == 1);
    CHECK_MESSAGE(s.certificate(site).value("managed", false) == true, s.get("/certificates").second);
    CHECK(s.get("/readyz").first == 200);
    s.stop();
  }

  TEST_CASE("serve hands a site name over to a file certificate of the other key type") {
    NamesFiles f;
    TempDir& d = f.d;
    const fs::path &ca_file = f.ca_file, &certs = f.certs, &www = f.www;
    const std::string site = "rsa.names.cli.test";
    f.put_pair("pair", f.leaf("other.names.cli.test"));
    fs::path config = d.path / "serve.json";
    write_file(config, json({{"sites", {{site, {{"root", www.string()}}}}}}).dump());
    // The site's ACME certificate is RSA; the file's (make_test_leaf) is P-256.
    NamesServe s(d.path, certs, www, "rsa",
                 {"--config", config.string(), "--cert-dir-snapshots", "off", "--ca", "internal", "--key-type",
                  "rsa2048"});
    fs::path internal_root = d.path / "s" / "internal" / "root.pem";
    // A client that offers RSA signatures only: the store gives it the RSA slot's certificate.
    autotls::ossl::SslCtxPtr rsa_only(SSL_CTX_new(TLS_client_method()));
    REQUIRE(rsa_only);
    REQUIRE(SSL_CTX_set1_sigalgs_list(rsa_only.get(), "rsa_pss_rsae_sha256:rsa_pkcs1_sha256") == 1);
    // The internal root is written at start, before the site is obtained.
    REQUIRE_MESSAGE(s.wait_for([&] { return !s.events("obtained").empty(); }, 15s), s.logs());
    REQUIRE(SSL_CTX_load_verify_locations(rsa_only.get(), internal_root.c_str(), nullptr) == 1);
    auto acme_rsa = [&] {
      auto r = autotls::testing::tls_handshake(s.https, site, rsa_only.get());
      return r.ok && r.verified;
    };
    REQUIRE_MESSAGE(s.wait_for(acme_rsa, 15s), s.logs());
    REQUIRE_MESSAGE(s.wait_for([&] { return s.watching(); }, 15s), s.logs());

    // The pair now holds the site's name, as P-256: the RSA certificate would keep serving
    // RSA-only clients (the file fills only the ECDSA slot). It leaves the store.
    f.put_pair("pair", f.leaf(site));
    REQUIRE_MESSAGE(s.wait_for([&] { return s.file_event("reloaded", certs / "pair" / "fullchain.pem"); }, 15s), s.logs());
    CHECK_MESSAGE(s.wait_for([&] { return !acme_rsa(); }, 10s), s.logs());
    REQUIRE_MESSAGE(s.wait_for([&] { return !s.events("unmanaged").empty(); }, 15s), s.logs());
    CHECK(s.events("unmanaged")[0].value("removed", false) == true);
    CHECK(https_get(site, s.https, ca_file).first == 200);
    s.stop();
  }

  TEST_CASE("serve stops managing and serving a site removed on SIGHUP, and manages it again from storage when added back") {
    NamesFiles f;
    TempDir& d = f.d;
    const fs::path &ca_file = f.ca_file, &certs = f.certs, &www = f.www;
    const std::string gone = "gone.names.cli.test", kept = "kept.names.cli.test", file = "file.names.cli.test";
    f.put_pair("pair", f.leaf(file));
    fs::path config = d.path / "serve.json";
    auto sites = [&](const std::vector<std::string>& names) {
      json j = json::object();
      for (const auto& n : names) j[n] = {{"root", www.string()}};
      write_file(config, json({{"sites", j}}).dump());
    };
    sites({gone, kept, file});
    NamesServe s(d.path, certs, www, "removed",
                 {"--config", config.string(), "--cert-dir-snapshots", "off", "--ca", "internal"});
    fs::path internal_root = d.path / "s" / "internal" / "root.pem";
    REQUIRE_MESSAGE(s.wait_for([&] { return s.events("obtained").size() == 2; }, 15s), s.logs());
    REQUIRE_MESSAGE(s.wait_for([&] { return https_get(gone, s.https, internal_root).first == 200; }, 15s), s.logs());
    REQUIRE_MESSAGE(s.wait_for([&] { return s.watching(); }, 15s), s.logs());
    std::string gone_id;
    for (const auto& e : s.events("obtained")) {
      if (e["names"] == json::array({gone})) gone_id = e.value("cert_id", "");
    }
    REQUIRE(!gone_id.empty());
    CHECK(s.certificate(gone).value("managed", false) == true);

    // gone's site and file's site removed: gone is no longer managed and its certificate is no
    // longer served (still in storage); file's name is still the file's; kept is untouched.
    sites({kept});
    REQUIRE(::kill(s.pid, SIGHUP) == 0);
    REQUIRE_MESSAGE(s.wait_for([&] { return s.events("reload").size() == 1; }, 15s), s.logs());
    {
      auto reload = s.events("reload")[0];
      INFO(reload.dump());
      CHECK(reload["removed"] == json::array({gone}));
    }
    REQUIRE_MESSAGE(s.events("unmanaged").size() == 1, s.logs());
    {
      auto e = s.events("unmanaged")[0];
      INFO(e.dump());
      CHECK(e.value("name", "") == gone);
      CHECK(e.value("cert_id", "") == gone_id);
      CHECK(e.value("removed", false) == true);
      CHECK(e.value("reason", "") == "site_removed");
    }
    CHECK(https_get(gone, s.https, internal_root).first != 200);
    CHECK(s.certificate(gone).is_null());
    CHECK_FALSE(s.expiry_metric(gone));
    CHECK(https_get(kept, s.https, internal_root).first == 200);
    CHECK(s.certificate(kept).value("managed", false) == true);
    CHECK(https_get(file, s.https, ca_file).first == 421);  // served from its file, no site
    CHECK(s.certificate(file).value("source", "") == "files");
    CHECK(s.get("/readyz").first == 200);

    // Added back: managed again from storage (the same certificate, no new order).
    sites({gone, kept, file});
    REQUIRE(::kill(s.pid, SIGHUP) == 0);
    // (Each pass over the names also says `loaded` for kept, as every SIGHUP does.)
    auto loaded_gone = [&] {
      json found;
      for (const auto& e : s.events("loaded")) {
        if (e["names"] == json::array({gone})) found = e;
      }
      return found;
    };
    REQUIRE_MESSAGE(s.wait_for([&] { return !loaded_gone().is_null(); }, 15s), s.logs());
    CHECK(loaded_gone().value("cert_id", "") == gone_id);
    CHECK_MESSAGE(s.wait_for([&] { return https_get(gone, s.https, internal_root).first == 200; }, 15s), s.logs());
    CHECK(s.events("obtained").size() == 2);
    CHECK(s.events("unmanaged").size() == 1);
    CHECK_MESSAGE(s.certificate(gone).value("managed", false) == true, s.get("/certificates").second);
    CHECK(https_get(file, s.https, ca_file).first == 200);
    CHECK(s.get("/readyz").first == 200);
    s.stop();
  }

  TEST_CASE("serve's on-demand serves a removed site's name from storage when its policy allows it, and keeps it once it is a site again") {
    NamesFiles f;
    TempDir& d = f.d;
    const fs::path &certs = f.certs, &www = f.www;
    const std::string gone = "gone.names.cli.test", kept = "kept.names.cli.test", other = "other.names.cli.test",
                      third = "third.names.cli.test";
    f.put_pair("pair", f.leaf("file.names.cli.test"));
    fs::path config = d.path / "serve.json";
    auto sites = [&](const std::vector<std::string>& names) {
      json j = json::object();
      for (const auto& n : names) j[n] = {{"root", www.string()}};
      write_file(config, json({{"sites", j},
                               {"on-demand", true},
                               {"on-demand-allow", json::array({gone, other, third})},
                               {"on-demand-max-cached", 1},
                               {"on-demand-max-concurrent", 1}})
                             .dump());
    };
    sites({gone, kept});
    NamesServe s(d.path, certs, www, "od-removed",
                 {"--config", config.string(), "--cert-dir-snapshots", "off", "--ca", "internal", "--challenge",
                  "tls-alpn-01"});
    fs::path internal_root = d.path / "s" / "internal" / "root.pem";
    REQUIRE_MESSAGE(s.wait_for([&] { return s.events("obtained").size() == 2; }, 15s), s.logs());
    REQUIRE_MESSAGE(s.wait_for([&] { return https_get(gone, s.https, internal_root).first == 200; }, 15s), s.logs());
    std::string gone_id;
    for (const auto& e : s.events("obtained")) {
      if (e["names"] == json::array({gone})) gone_id = e.value("cert_id", "");
    }
    REQUIRE(!gone_id.empty());

    // The site removed: withdrawn (its certificate out of the store). A handshake for the name,
    // which the on-demand policy allows, gets the stored certificate back (loaded, no order);
    // no site serves it any more (421).
    sites({kept});
    REQUIRE(::kill(s.pid, SIGHUP) == 0);
    REQUIRE_MESSAGE(s.wait_for([&] { return s.events("unmanaged").size() == 1; }, 15s), s.logs());
    CHECK(s.events("unmanaged")[0].value("reason", "") == "site_removed");
    auto loaded_gone = [&] {
      json found;
      for (const auto& e : s.events("loaded")) {
        if (e["names"] == json::array({gone})) found = e;
      }
      return found;
    };
    CHECK_MESSAGE(s.wait_for([&] { return https_get(gone, s.https, internal_root).first == 421; }, 15s), s.logs());
    CHECK_MESSAGE(!loaded_gone().is_null(), s.logs());
    CHECK(loaded_gone().value("cert_id", "") == gone_id);
    CHECK(s.events("obtained").size() == 2);
    CHECK(https_get(kept, s.https, internal_root).first == 200);

    // Configured again: served by its site, still the same certificate, nothing resumed twice.
    sites({gone, kept});
    REQUIRE(::kill(s.pid, SIGHUP) == 0);
    REQUIRE_MESSAGE(s.wait_for([&] { return s.events("reload").size() == 2; }, 15s), s.logs());
    CHECK_MESSAGE(s.wait_for([&] { return https_get(gone, s.https, internal_root).first == 200; }, 15s), s.logs());
    CHECK(s.events("obtained").size() == 2);
    CHECK(s.events("unmanaged").size() == 1);
    // A site again, it left on-demand's LRU (one entry at most here): other on-demand names
    // do not evict it (forget it: no longer managed, out of the store). One on-demand job at a
    // time: once third is served, other's job (and its eviction) is over.
    CHECK_MESSAGE(s.wait_for([&] { return https_get(other, s.https, internal_root).first == 421; }, 15s), s.logs());
    CHECK_MESSAGE(s.wait_for([&] { return https_get(third, s.https, internal_root).first == 421; }, 15s), s.logs());
    CHECK(s.events("obtained").size() == 4);
    CHECK_MESSAGE(s.certificate(gone).value("managed", false) == true, s.get("/certificates").second);
    CHECK_MESSAGE(https_get(gone, s.https, internal_root).first == 200, s.logs());
    s.stop();
  }

  TEST_CASE("serve follows a --cert-dir pair reloaded with another name") {
    NamesFiles f;
    TempDir& d = f.d;
    const fs::path &ca_file = f.ca_file, &certs = f.certs, &www = f.www;
    const auto before = f.leaf("before.names.cli.test");
    const auto after = f.leaf("after.names.cli.test");
    const auto kept = f.leaf("kept.names.cli.test");
    f.put_pair("site", before);
    f.put_pair("kept", kept);
    NamesServe s(d.path, certs, www, "reloaded", {"--cert-dir-snapshots", "off"});
    REQUIRE_MESSAGE(s.wait_for([&] { return https_get("before.names.cli.test", s.https, ca_file).first == 200; }, 15s),
                    s.logs());
    REQUIRE_MESSAGE(s.wait_for([&] { return s.watching(); }, 15s), s.logs());
    CHECK(!s.certificate("before.names.cli.test").is_null());

    // The pair now holds another name: the new name is listed, the old one (no longer served)
    // is not, and the service stays ready.
    f.put_pair("site", after);
    REQUIRE_MESSAGE(s.wait_for([&] { return s.file_event("reloaded", certs / "site" / "fullchain.pem"); }, 15s), s.logs());
    CHECK(https_get("after.names.cli.test", s.https, ca_file).first == 200);
    CHECK(https_get("before.names.cli.test", s.https, ca_file).first != 200);
    CHECK_MESSAGE(s.certificate("after.names.cli.test").value("source", "") == "files", s.get("/certificates").second);
    CHECK_MESSAGE(s.certificate("before.names.cli.test").is_null(), s.get("/certificates").second);
    CHECK(!s.certificate("kept.names.cli.test").is_null());
    CHECK(s.expiry_metric("after.names.cli.test"));
    CHECK_FALSE(s.expiry_metric("before.names.cli.test"));
    CHECK(s.get("/readyz").first == 200);

    // Removed files keep serving their last good certificate: the name stays.
    fs::remove_all(certs / "site");
    REQUIRE_MESSAGE(s.wait_for([&] { return s.file_event("removed", certs / "site" / "fullchain.pem"); }, 15s), s.logs());
    CHECK(https_get("after.names.cli.test", s.https, ca_file).first == 200);
    CHECK(!s.certificate("after.names.cli.test").is_null());
    CHECK(s.get("/readyz").first == 200);
    s.stop();
  }

  TEST_CASE("serve follows what the verification behind a --cert-dir snapshot added and removed") {
    NamesFiles f;
    TempDir& d = f.d;
    const fs::path &ca_file = f.ca_file, &certs = f.certs, &www = f.www;
    const auto one = f.leaf("one.verify.cli.test");
    const auto two = f.leaf("two.verify.cli.test");
    const auto three = f.leaf("three.verify.cli.test");
    f.put_pair("one", one);
    f.put_pair("two", two);
    {
      NamesServe s(d.path, certs, www, "first", {});
      REQUIRE_MESSAGE(s.wait_for([&] { return !s.events("cert_dir_snapshot_written").empty(); }, 15s), s.logs());
      s.stop();
    }
    // While it is down, a pair goes and another comes: served from the snapshot at start, then
    // the verification removes the one and publishes the other, and the names follow.
    fs::remove_all(certs / "two");
    f.put_pair("three", three);
    NamesServe s(d.path, certs, www, "second", {});
    REQUIRE_MESSAGE(s.wait_for([&] { return !s.events("cert_dir_verified").empty(); }, 15s), s.logs());
    {
      auto ev = s.events("cert_dir_verified")[0];
      INFO(ev.dump());
      CHECK(ev.value("added", -1) == 1);
      CHECK(ev.value("removed", -1) == 1);
    }
    CHECK(https_get("three.verify.cli.test", s.https, ca_file).first == 200);
    CHECK_MESSAGE(!s.certificate("three.verify.cli.test").is_null(), s.get("/certificates").second);
    CHECK_MESSAGE(s.certificate("two.verify.cli.test").is_null(), s.get("/certificates").second);
    CHECK(!s.certificate("one.verify.cli.test").is_null());
    CHECK(s.expiry_metric("three.verify.cli.test"));
    CHECK(s.get("/readyz").first == 200);

    // The removed pair comes back as it was (the watcher still held its certificate as the
    // pair's last good one; the verification had taken it out of the store): served and listed
    // again.
    f.put_pair("two", two);
    REQUIRE_MESSAGE(s.wait_for([&] { return s.file_event("reloaded", certs / "two" / "fullchain.pem"); }, 15s),
                    s.logs());
    CHECK(https_get("two.verify.cli.test", s.https, ca_file).first == 200);
    CHECK_MESSAGE(!s.certificate("two.verify.cli.test").is_null(), s.get("/certificates").second);
    CHECK(s.get("/readyz").first == 200);
    // ... and again with a new certificate: listed once, still ready.
    const auto two_again = f.leaf("two.verify.cli.test");
    const auto reloads = s.events("cert_file_reloaded").size();
    f.put_pair("two", two_again);
    REQUIRE_MESSAGE(s.wait_for([&] { return s.events("cert_file_reloaded").size() > reloads; }, 15s), s.logs());
    CHECK(s.get("/readyz").first == 200);
    {
      auto list = json::parse(s.get("/certificates").second, nullptr, false);
      int listed = 0;
      for (const auto& j : list) listed += j.value("name", "") == "two.verify.cli.test";
      CHECK(listed == 1);
    }
    CHECK(!s.certificate("two.verify.cli.test").is_null());
    s.stop();
  }
}

namespace {

// lines_of splits a text into its non-empty lines.
std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (!line.empty()) out.push_back(line);
  }
  return out;
}

// in_order checks that every string of want appears in text, each after the previous one.
void check_in_order(const std::string& text, const std::vector<std::string>& want) {
  size_t at = 0;
  for (const auto& w : want) {
    auto found = text.find(w, at);
    CHECK_MESSAGE(found != std::string::npos, (w + "\n---\n" + text));
    if (found != std::string::npos) at = found + w.size();
  }
}

// progress_steps parses --json progress on stderr: every line must be a JSON object; returns
// the "step" of each "event":"progress" line that is not a polling tick, with ":wait" added
// for waiting steps.
std::vector<std::string> progress_steps(const std::string& err) {
  std::vector<std::string> steps;
  for (const auto& line : lines_of(err)) {
    auto j = json::parse(line, nullptr, false);
    REQUIRE_MESSAGE(j.is_object(), line);
    if (j.value("event", "") != "progress" || j.value("tick", 0) > 0) continue;
    steps.push_back(j.value("step", "") + (j.value("waiting", false) ? ":wait" : ""));
  }
  return steps;
}

}  // namespace

TEST_SUITE("cli.issue") {
  TEST_CASE("issue and renew run the deploy hook and the event hook with the documented environment") {
    Cli c;
    AUTOTLS_START_PEBBLE(env, PebbleOptions{});
    c.env = std::move(env);
    fs::path deploy_out = c.dir.path / "deploy.txt";
    fs::path events_out = c.dir.path / "events.txt";
    const std::string deploy =
        "env | grep -E '^AUTOTLS_(NAMES|CERT_PATH|KEY_PATH|FULLCHAIN_PATH|CHAIN_PATH|META_PATH|EVENT|ERROR)=' | sort > " +
        deploy_out.string();
    const std::string event =
        "printf '%s|%s|%s\\n' \"$AUTOTLS_EVENT\" \"$AUTOTLS_NAMES\" \"$AUTOTLS_ERROR\" >> " + events_out.string();
    auto r = run(c.args({"issue", "-d", "hook.cli.test", "-d", "www.hook.cli.test"},
                        {"--agree-tos", "--http-address", c.http(), "--deploy-hook", deploy, "--event-hook", event}));
    REQUIRE_MESSAGE(r.code == 0, show(r));
    fs::path live = c.storage() / "live" / "hook.cli.test";
    auto env_for = [&](const std::string& ev) {
      return "AUTOTLS_CERT_PATH=" + (live / "cert.pem").string() + "\nAUTOTLS_CHAIN_PATH=" + (live / "chain.pem").string() +
             "\nAUTOTLS_EVENT=" + ev + "\nAUTOTLS_FULLCHAIN_PATH=" + (live / "fullchain.pem").string() +
             "\nAUTOTLS_KEY_PATH=" + (live / "privkey.pem").string() + "\nAUTOTLS_META_PATH=" + (live / "meta.json").string() +
             "\nAUTOTLS_NAMES=hook.cli.test www.hook.cli.test\n";
    };
    CHECK(read_file(deploy_out) == env_for("obtained"));
    CHECK(read_file(events_out) == "obtained|hook.cli.test www.hook.cli.test|\n");

    // renew --force reuses both hooks from renewal.json.
    fs::remove(deploy_out);
    auto first = read_file(live / "cert.pem");
    auto rn = run(c.args({"renew", "hook.cli.test"}, {"--force", "--http-address", c.http()}));
    REQUIRE_MESSAGE(rn.code == 0, show(rn));
    CHECK(read_file(live / "cert.pem") != first);
    CHECK(read_file(deploy_out) == env_for("renewed"));
    CHECK(read_file(events_out) == "obtained|hook.cli.test www.hook.cli.test|\nrenewed|hook.cli.test www.hook.cli.test|\n");

    // A failing deploy hook: the renewed certificate is saved, a warning, exit 6; with --json
    // the last line says which hook failed.
    auto second = read_file(live / "cert.pem");
    // What the hook prints goes to stderr: stdout stays one JSON object per line.
    auto bad = run(c.args({"renew", "hook.cli.test"}, {"--force", "--json", "--deploy-hook", "echo hook-noise; exit 3"}));
    CHECK_MESSAGE(bad.code == 6, show(bad));
    CHECK(read_file(live / "cert.pem") != second);
    bool renewed_line = false;
    for (const auto& line : lines_of(bad.out)) {
      auto j = json::parse(line, nullptr, false);
      REQUIRE_MESSAGE(j.is_object(), line);
      renewed_line = renewed_line || j.value("action", "") == "renewed";
    }
    CHECK_MESSAGE(renewed_line, show(bad));
    auto last = last_json_line(bad.out);
    CHECK(last.value("event", "") == "deploy_hook_failed");
    CHECK(last.value("name", "") == "hook.cli.test");
    CHECK(last.value("exit_code", 0) == 6);
    CHECK(last["error"].value("message", "").find("exited with status 3") != std::string::npos);
    CHECK(bad.err.find("hook-noise") != std::string::npos);
    // The event hook saved at issue time still ran.
    CHECK(read_file(events_out).find("renewed|hook.cli.test www.hook.cli.test|\nrenewed|") != std::string::npos);

    // issue: the same warning for people.
    auto third = read_file(live / "cert.pem");
    auto bad2 = run(c.args({"issue", "-d", "hook.cli.test", "-d", "www.hook.cli.test"},
                           {"--force", "--http-address", c.http(), "--deploy-hook", "exit 4"}));
    CHECK_MESSAGE(bad2.code == 6, show(bad2));
    CHECK(read_file(live / "cert.pem") != third);
    CHECK(bad2.out.find("Certificate obtained for hook.cli.test") != std::string::npos);
    CHECK_MESSAGE(bad2.err.find("warning: deploy hook `exit 4` exited with status 4") != std::string::npos, show(bad2));
    CHECK(bad2.err.find("the certificate stays saved") != std::string::npos);

    // A failed issuance is an event too: the event hook hears it with the error.
    auto v = run(c.args({"issue", "-d", "nobody.hook.cli.test"},
                        {"--http-address", "127.0.0.1:" + std::to_string(free_port()), "--event-hook", event}));
    CHECK_MESSAGE(v.code == 5, show(v));
    auto events = read_file(events_out);
    auto failed = events.find("failed|nobody.hook.cli.test|");
    REQUIRE_MESSAGE(failed != std::string::npos, (events + show(v)));
    CHECK_MESSAGE(events.find("nobody.hook.cli.test", failed + 30) != std::string::npos, events);
  }

  TEST_CASE("issue falls back to the next issuer when the first is unreachable and renew keeps the list") {
    Cli c;
    AUTOTLS_START_PEBBLE(env, PebbleOptions{});
    c.env = std::move(env);
    const std::string dead = "https://127.0.0.1:" + std::to_string(free_port()) + "/dir";
    const std::string pebble = c.env->directory_url();
    // No --ca: the issuers are the CAs.
    std::vector<std::string> base = {"--ca-bundle", c.env->ca_bundle_path(), "--storage", c.storage().string(),
                                     "--http-address", c.http()};
    auto with = [&](std::vector<std::string> a) {
      a.insert(a.end(), base.begin(), base.end());
      return a;
    };
    auto r = run(with({"issue", "-d", "fallback.cli.test", "--issuer", dead, "--issuer", pebble, "--agree-tos"}));
    REQUIRE_MESSAGE(r.code == 0, show(r));
    CHECK_MESSAGE(r.err.find("from " + dead + ", then " + pebble) != std::string::npos, show(r));
    check_in_order(r.err, {"issuer " + dead + " failed for fallback.cli.test: ", "; trying the next issuer, " + pebble,
                           "CA directory fetched: " + pebble, "certificate downloaded: "});
    CHECK_MESSAGE(r.out.find("issued by:     " + pebble + " (fallback: " + dead + " failed)") != std::string::npos, show(r));
    auto rs = json::parse(read_file(c.storage() / "live" / "fallback.cli.test" / "renewal.json"), nullptr, false);
    REQUIRE(rs.is_object());
    CHECK(rs["issuer"] == json::array({dead, pebble}));

    // renew uses the saved list: the same fallback, said in JSON on stderr and in the result.
    auto rn = run(with({"renew", "fallback.cli.test", "--force", "--json"}));
    REQUIRE_MESSAGE(rn.code == 0, show(rn));
    auto j = last_json_line(rn.out);
    CHECK(j.value("action", "") == "renewed");
    CHECK(j.value("fallback", false) == true);
    CHECK(j.value("issuer_name", "") == pebble);
    bool noted = false;
    for (const auto& line : lines_of(rn.err)) {
      auto e = json::parse(line, nullptr, false);
      REQUIRE_MESSAGE(e.is_object(), line);
      if (e.value("event", "") == "issuer_fallback") {
        noted = true;
        CHECK(e.value("issuer", "") == dead);
        CHECK(e.value("next", "") == pebble);
        CHECK(!e.value("error", "").empty());
      }
    }
    CHECK_MESSAGE(noted, show(rn));

    // The config file's "issuers" does the same for issue.
    fs::path cfg = c.dir.path / "issuers.json";
    write_file(cfg, json{{"issuers", json::array({{{"ca", dead}}, {{"ca", pebble}}})}}.dump());
    auto fromfile = run(with({"issue", "-d", "file.fallback.cli.test", "--config", cfg.string(), "--json"}));
    REQUIRE_MESSAGE(fromfile.code == 0, show(fromfile));
    auto fj = last_json_line(fromfile.out);
    CHECK(fj.value("status", "") == "obtained");
    CHECK(fj.value("fallback", false) == true);
    CHECK(fj.value("issuer_name", "") == pebble);

    // A second issue of the first name reuses the fallback CA's certificate: nothing to do.
    auto again = run(with({"issue", "-d", "fallback.cli.test", "--issuer", dead, "--issuer", pebble}));
    CHECK_MESSAGE(again.code == 1, show(again));
  }
}

TEST_SUITE("cli.account") {
  TEST_CASE("account and revoke print progress lines off a terminal and JSON with --json") {
    Cli c;
    AUTOTLS_START_PEBBLE(env, PebbleOptions{});
    c.env = std::move(env);
    const std::string dir = c.env->directory_url();
    auto plain = [](const Run& r) {
      CHECK(r.err.find('\r') == std::string::npos);
      CHECK(r.err.find('\033') == std::string::npos);
    };
    auto reg = run(c.args({"account", "register"}, {"--agree-tos", "--email", "p@example.com"}));
    REQUIRE_MESSAGE(reg.code == 0, show(reg));
    plain(reg);
    check_in_order(reg.err, {"fetching the CA directory " + dir, "CA directory fetched: " + dir, "account key generated (ec256)",
                             "registering the account at the CA", "s  account registered: https://"});

    auto shown = run(c.args({"account", "show"}, {"--json"}));
    REQUIRE_MESSAGE(shown.code == 0, show(shown));
    CHECK(last_json_line(shown.out).value("status", "") == "found");
    CHECK(shown.out.find("\"progress\"") == std::string::npos);
    CHECK(progress_steps(shown.err) == std::vector<std::string>{"directory:wait", "directory", "account:wait", "account"});

    auto upd = run(c.args({"account", "update"}, {"--email", "q@example.com"}));
    REQUIRE_MESSAGE(upd.code == 0, show(upd));
    plain(upd);
    check_in_order(upd.err, {"CA directory fetched: ", "updating the account contact to mailto:q@example.com",
                             "account contact updated: "});

    auto roll = run(c.args({"account", "rollover"}, {"--json"}));
    REQUIRE_MESSAGE(roll.code == 0, show(roll));
    CHECK(progress_steps(roll.err) == std::vector<std::string>{"directory:wait", "directory", "key", "rollover:wait",
                                                               "rollover", "account:wait", "account"});

    // revoke, plain and JSON.
    for (const char* n : {"rv1.cli.test", "rv2.cli.test"}) {
      auto i = run(c.args({"issue", "-d", n}, {"--http-address", c.http(), "--quiet"}));
      REQUIRE_MESSAGE(i.code == 0, show(i));
    }
    auto rv = run(c.args({"revoke", "rv1.cli.test"}, {"--reason", "superseded"}));
    REQUIRE_MESSAGE(rv.code == 0, show(rv));
    plain(rv);
    check_in_order(rv.err, {"CA directory fetched: " + dir, "ACME account ready: https://",
                            "asking the CA to revoke rv1.cli.test", "certificate revoked: rv1.cli.test (superseded)"});
    auto rvj = run(c.args({"revoke", "rv2.cli.test"}, {"--json"}));
    REQUIRE_MESSAGE(rvj.code == 0, show(rvj));
    CHECK(last_json_line(rvj.out).value("event", "") == "revoked");
    CHECK(progress_steps(rvj.err) ==
          std::vector<std::string>{"directory:wait", "directory", "account", "revoke:wait", "revoke"});
    for (const auto& line : lines_of(rvj.err)) CHECK(json::parse(line).value("subject", "") == "rv2.cli.test");
    // A refusal after the wait: the error is printed on a clean line, exit 3.
    auto again = run(c.args({"revoke", "rv2.cli.test"}));
    CHECK_MESSAGE(again.code == 3, show(again));
    check_in_order(again.err, {"asking the CA to revoke rv2.cli.test\n", "autotls: error: "});

    auto quiet = run(c.args({"account", "show"}, {"--quiet"}));
    CHECK_MESSAGE(quiet.code == 0, show(quiet));
    CHECK_MESSAGE(quiet.err.empty(), show(quiet));

    auto deact = run(c.args({"account", "deactivate"}));
    REQUIRE_MESSAGE(deact.code == 0, show(deact));
    plain(deact);
    check_in_order(deact.err, {"deactivating the account https://", "account deactivated: https://"});
  }
}

TEST_SUITE("cli.serve") {
  TEST_CASE("serve logs each ACME step of each name as a plain line naming it") {
    Cli c;
    AUTOTLS_START_PEBBLE(env, PebbleOptions{});
    c.env = std::move(env);
    fs::path www = c.dir.path / "www";
    fs::create_directories(www);
    std::vector<std::string> argv = {AUTOTLS_BINARY, "serve"};
    for (const auto& a : c.common()) argv.push_back(a);
    for (const auto& a : std::vector<std::string>{"-d", "a.steps.cli.test", "-d", "b.steps.cli.test", "--agree-tos",
                                                  "--https-address", "127.0.0.1:" + std::to_string(free_port()),
                                                  "--http-address", c.http(), "--root", www.string(), "--drain", "1",
                                                  "--admin-address", "off"}) {
      argv.push_back(a);
    }
    pid_t pid = spawn(argv, c.dir.path / "serve.out", c.dir.path / "serve.err", {});
    auto deadline = std::chrono::steady_clock::now() + 60s;
    auto out = [&] { return read_file(c.dir.path / "serve.out"); };
    while (std::chrono::steady_clock::now() < deadline &&
           !(out().find(" obtained a.steps.cli.test") != std::string::npos &&
             out().find(" obtained b.steps.cli.test") != std::string::npos)) {
      int status = 0;
      if (::waitpid(pid, &status, WNOHANG) == pid) break;
      std::this_thread::sleep_for(100ms);
    }
    REQUIRE(::kill(pid, SIGTERM) == 0);
    int code = wait_exit(pid, 20s);
    std::string err = read_file(c.dir.path / "serve.err");
    CHECK_MESSAGE(code == 0, (out() + err));
    CHECK(err.find('\r') == std::string::npos);
    for (const std::string n : {"a.steps.cli.test", "b.steps.cli.test"}) {
      // Issuances may overlap: the lines of one name are in order among themselves.
      std::string mine;
      for (const auto& line : lines_of(err)) {
        if (line.find("  " + n + ": ") != std::string::npos) mine += line + "\n";
      }
      check_in_order(mine, {n + ": CA directory fetched: ", n + ": order created for " + n, n + ": " + n + " validated",
                            n + ": certificate downloaded: "});
    }
  }
}

TEST_SUITE("cli.account") {
  TEST_CASE("account register on a terminal draws a spinner while the CA is asked and erases it") {
    Cli c;
    AUTOTLS_START_PEBBLE(env, PebbleOptions{});
    c.env = std::move(env);
    std::string cmd = AUTOTLS_BINARY;
    for (const auto& a : c.args({"account", "register"}, {"--agree-tos"})) cmd += " '" + a + "'";
    auto r = run({"-q", "-e", "-c", cmd, "/dev/null"}, {"TERM=xterm"}, 60s, {"/usr/bin/script"});
    REQUIRE_MESSAGE(r.code == 0, show(r));
    CHECK_MESSAGE(r.out.find("\r\033[K") != std::string::npos, show(r));
    bool framed = false;
    for (const char* f : {"| registering", "/ registering", "- registering", "\\ registering"}) {
      framed = framed || r.out.find(f) != std::string::npos;
    }
    CHECK_MESSAGE(framed, show(r));
    // The completed step is a line of its own after the erased spinner, before the result.
    auto step = r.out.find("s  account registered: https://");
    auto result = r.out.find("\naccount registered: https://");
    REQUIRE_MESSAGE(step != std::string::npos, show(r));
    REQUIRE_MESSAGE(result != std::string::npos, show(r));
    CHECK(r.out.rfind("\r\033[K", step) != std::string::npos);
    CHECK(step < result);
  }
}

TEST_SUITE("cli.serve") {
  TEST_CASE("sighup opens and closes listeners reopens the access log and reports reactor threads") {
    // The internal CA: no Pebble; the test speaks plain HTTP (no-redirect) to the listeners.
    TempDir d;
    fs::path www = d.path / "www";
    fs::create_directories(www);
    write_file(www / "index.html", "reload hello\n");
    fs::path config = d.path / "serve.json";
    fs::path access = d.path / "access.log";
    int https = free_port(), p1 = free_port(), p2 = free_port();
    auto write_config = [&](std::vector<int> http_ports, int reactors) {
      json http = json::array();
      for (int p : http_ports) http.push_back("127.0.0.1:" + std::to_string(p));
      json j = {{"ca", "internal"},
                {"storage", (d.path / "storage").string()},
                {"domain", {"reload.cli.test"}},
                {"https-address", {"127.0.0.1:" + std::to_string(https)}},
                {"http-address", http},
                {"no-redirect", true},
                {"root", www.string()},
                {"admin-address", "off"},
                {"drain", 1},
                {"access-log", "json"},
                {"access-log-file", access.string()},
                {"reactor-threads", reactors},
                {"worker-threads", 2},
                {"ticket-rotation", 600}};
      write_file(config, j.dump());
    };
    // Limits out of range stop the start with one line naming the key.
    auto bad_start = run({"serve", "--ca", "internal", "--storage", (d.path / "st0").string(), "-d", "x.cli.test",
                          "--root", www.string(), "--header-timeout", "0"});
    CHECK(bad_start.code == 2);
    CHECK_MESSAGE(bad_start.err.find("--header-timeout must be between 0.01 and 86400 seconds, not 0\n") !=
                      std::string::npos,
                  show(bad_start));
    auto bad_rotation = run({"serve", "--ca", "internal", "--storage", (d.path / "st0").string(), "-d", "x.cli.test",
                             "--root", www.string(), "--ticket-rotation", "7200", "--ticket-lifetime", "3600"});
    CHECK(bad_rotation.code == 2);
    CHECK_MESSAGE(bad_rotation.err.find("--ticket-rotation (7200 s) must not exceed --ticket-lifetime (3600 s)") !=
                      std::string::npos,
                  show(bad_rotation));

    write_config({p1}, 2);
    pid_t pid = spawn({AUTOTLS_BINARY, "serve", "--config", config.string(), "--json", "--verbose"}, d.path / "serve.out",
                      d.path / "serve.err", {});
    auto logs = [&] { return read_file(d.path / "serve.out") + read_file(d.path / "serve.err"); };
    auto wait_event = [&](const std::string& event, int n) {
      return autotls::testing::wait_event(d.path / "serve.out", event, n, 15s);
    };
    auto last_event = [&](const std::string& event) { return autotls::testing::last_event(d.path / "serve.out", event); };
    // get fetches http://reload.cli.test:port/ on handle h (kept alive between calls).
    std::string body;
    auto get = [&](CURL* h, int port, long* new_connects = nullptr) {
      body.clear();
      std::string url = "http://reload.cli.test:" + std::to_string(port) + "/";
      std::string res = "reload.cli.test:" + std::to_string(port) + ":127.0.0.1";
      curl_slist* resolve = curl_slist_append(nullptr, res.c_str());
      curl_easy_setopt(h, CURLOPT_URL, url.c_str());
      curl_easy_setopt(h, CURLOPT_RESOLVE, resolve);
      curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, append_cb);
      curl_easy_setopt(h, CURLOPT_WRITEDATA, &body);
      curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 5000L);
      curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
      long status = 0;
      if (curl_easy_perform(h) == CURLE_OK) curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
      if (new_connects) curl_easy_getinfo(h, CURLINFO_NUM_CONNECTS, new_connects);
      curl_slist_free_all(resolve);
      return status;
    };
    auto lines_in = [](const fs::path& p) {
      std::istringstream in(read_file(p));
      std::string l;
      int n = 0;
      while (std::getline(in, l)) ++n;
      return n;
    };
    auto eventually = [](const std::function<bool()>& ok) {
      auto deadline = std::chrono::steady_clock::now() + 10s;
      while (std::chrono::steady_clock::now() < deadline && !ok()) std::this_thread::sleep_for(50ms);
      return ok();
    };

    REQUIRE_MESSAGE(wait_event("listening", 1), logs());
    CURL* kept = curl_easy_init();
    long connects = -1;
    REQUIRE_MESSAGE(get(kept, p1, &connects) == 200, logs());
    CHECK(body == "reload hello\n");
    CHECK(eventually([&] { return lines_in(access) == 1; }));

    // logrotate: rename, then SIGHUP; a second listener and a reactor count in the new file.
    fs::rename(access, d.path / "access.log.1");
    write_config({p1, p2}, 3);
    REQUIRE(::kill(pid, SIGHUP) == 0);
    REQUIRE_MESSAGE(wait_event("reload", 1), logs());
    auto reload = last_event("reload");
    CHECK_MESSAGE(reload.value("not_applied", json::array()) == json::array({"reactor_threads"}), logs());
    CHECK(reload.value("failed", json::array()) == json::array());
    CHECK(logs().find("reactor_threads change needs a restart to take effect") != std::string::npos);
    CURL* fresh = curl_easy_init();
    CHECK_MESSAGE(get(fresh, p2) == 200, logs());
    curl_easy_cleanup(fresh);
    // The connection from before the reload, on the unchanged listener, answers again.
    CHECK(get(kept, p1, &connects) == 200);
    CHECK(connects == 0);
    CHECK(eventually([&] { return lines_in(access) == 2; }));
    CHECK(lines_in(d.path / "access.log.1") == 1);
    CHECK(read_file(access).find("\"host\":\"reload.cli.test") != std::string::npos);

    // p1 removed: its kept connection is closed, new ones refused; p2 serves on.
    write_config({p2}, 2);
    REQUIRE(::kill(pid, SIGHUP) == 0);
    REQUIRE_MESSAGE(wait_event("reload", 2), logs());
    CHECK(last_event("reload").value("not_applied", json::array()) == json::array());
    // The reactors close a removed listener's idle connections just after the reload: a request
    // that beats that sweep is still answered, with Connection: close. Either way the kept
    // connection ends there, and the next request finds P1 refusing.
    const long beat_sweep = get(kept, p1);
    CHECK((beat_sweep == 0 || beat_sweep == 200));
    CHECK(get(kept, p1) == 0);
    curl_easy_cleanup(kept);
    CURL* after = curl_easy_init();
    CHECK(get(after, p2) == 200);
    curl_easy_cleanup(after);

    // dns-01 settings are read when the manager is made: a changed DNS server, TSIG key or zone
    // is reported as needing a restart, never silently dropped, and p2 serves on.
    json dns = json::parse(read_file(config));
    dns["dns-server"] = "127.0.0.1:" + std::to_string(free_port());
    dns["tsig-key"] = "reload-key:hmac-sha256:" + std::string(44, 'A');
    dns["dns-zone"] = "cli.test";
    write_file(config, dns.dump());
    REQUIRE(::kill(pid, SIGHUP) == 0);
    REQUIRE_MESSAGE(wait_event("reload", 3), logs());
    CHECK_MESSAGE(last_event("reload").value("not_applied", json::array()) ==
                      json::array({"dns-server", "tsig-key", "dns-zone"}),
                  logs());
    CURL* after_dns = curl_easy_init();
    CHECK(get(after_dns, p2) == 200);
    curl_easy_cleanup(after_dns);

    // A ticket rotation out of range is refused by the reload; the running configuration stays.
    json bad = json::parse(read_file(config));
    bad["ticket-rotation"] = 10;
    write_file(config, bad.dump());
    REQUIRE(::kill(pid, SIGHUP) == 0);
    REQUIRE_MESSAGE(wait_event("reload_failed", 1), logs());
    CHECK(logs().find("--ticket-rotation must be between 60 and 86400, not 10") != std::string::npos);

    REQUIRE(::kill(pid, SIGTERM) == 0);
    CHECK_MESSAGE(wait_exit(pid, 20s) == 0, logs());
  }
}

TEST_SUITE("cli.serve") {
  TEST_CASE("serve without agree-tos stops with exit 2 at a CA with terms and exit 4 at an unreachable sole CA") {
    Cli c;
    AUTOTLS_START_PEBBLE(env, PebbleOptions{});
    c.env = std::move(env);
    const std::string dead = "https://127.0.0.1:" + std::to_string(free_port()) + "/dir";
    const std::string pebble = c.env->directory_url();
    std::vector<std::string> base = {"serve", "-d", "tos.cli.test", "--ca-bundle", c.env->ca_bundle_path(),
                                     "--storage", c.storage().string(), "--http-address", c.http(),
                                     "--https-address", "127.0.0.1:" + std::to_string(free_port()),
                                     "--admin-address", "off", "--root", c.dir.path.string()};
    auto with = [&](std::vector<std::string> a) {
      a.insert(a.begin(), base.begin(), base.end());
      return a;
    };
    // Pebble's directory has terms of service and no account is stored: serve stops before
    // listening and names the terms and the flag.
    auto one = run(with({"--ca", pebble}), {}, 60s);
    CHECK_MESSAGE(one.code == 2, show(one));
    CHECK_MESSAGE(one.err.find("no ACME account yet at " + pebble + ": read the CA's terms of service at ") !=
                      std::string::npos, show(one));
    CHECK_MESSAGE(one.err.find("--agree-tos") != std::string::npos, show(one));
    // In an issuer list, a CA that cannot be reached does not stop serve (issuance falls back
    // past it), but the terms of the next one still do.
    auto list = run(with({"--issuer", dead, "--issuer", pebble}), {}, 60s);
    CHECK_MESSAGE(list.code == 2, show(list));
    CHECK_MESSAGE(list.err.find("no ACME account yet at " + pebble) != std::string::npos, show(list));
    CHECK_MESSAGE(list.err.find("no ACME account yet at " + dead) == std::string::npos, show(list));
    // The one CA of serve unreachable: nothing could ever be issued, exit 4.
    auto alone = run(with({"--ca", dead}), {}, 60s);
    CHECK_MESSAGE(alone.code == 4, show(alone));
    CHECK_FALSE(fs::exists(c.storage() / "accounts"));
  }

  TEST_CASE("serve says an issuer fallback as an event line without --verbose") {
    // The internal CA as the second issuer: no Pebble needed.
    TempDir d;
    fs::create_directories(d.path / "www");
    const std::string dead = "https://127.0.0.1:" + std::to_string(free_port()) + "/dir";
    pid_t pid = spawn({AUTOTLS_BINARY, "serve", "-d", "fallback.serve.cli.test", "--issuer", dead, "--issuer", "internal",
                       "--storage", (d.path / "storage").string(), "--root", (d.path / "www").string(),
                       "--https-address", "127.0.0.1:" + std::to_string(free_port()), "--http-address",
                       "127.0.0.1:" + std::to_string(free_port()), "--admin-address", "off", "--json"},
                      d.path / "serve.out", d.path / "serve.err", {});
    auto logs = [&] { return read_file(d.path / "serve.out") + read_file(d.path / "serve.err"); };
    REQUIRE_MESSAGE(autotls::testing::wait_event(d.path / "serve.out", "obtained", 1, 30s), logs());
    auto fb = autotls::testing::last_event(d.path / "serve.out", "issuer_fallback");
    REQUIRE_MESSAGE(fb.is_object(), logs());
    CHECK(fb.value("name", "") == "fallback.serve.cli.test");
    CHECK(fb.value("issuer", "") == dead);
    CHECK(fb.value("next", "") == "internal");
    CHECK(fb.value("error", "").find("Couldn't connect") != std::string::npos);
    CHECK(autotls::testing::last_event(d.path / "serve.out", "obtained").value("issuer", "") == "internal");
    REQUIRE(::kill(pid, SIGTERM) == 0);
    CHECK_MESSAGE(wait_exit(pid, 20s) == 0, logs());
  }
}

namespace {

// LogFormatServe runs `autotls serve` on a certificate file (no CA needed) until its listening
// line, then stops it with SIGTERM; stdout and stderr go to files, or to one pseudo-terminal.
struct LogFormatServe {
  TempDir d;
  fs::path cert = d.path / "c.pem", key = d.path / "k.pem", www = d.path / "www";
  int runs = 0;

  LogFormatServe() {
    auto leaf = autotls::testing::make_test_leaf({"log.cli.test"});
    REQUIRE(leaf);
    put(cert, leaf->cert_pem);
    put(key, leaf->key_pem);
    fs::create_directories(www);
  }
  std::vector<std::string> argv(std::vector<std::string> more) const {
    std::vector<std::string> a = {AUTOTLS_BINARY, "serve", "--cert", cert.string(), "--key", key.string(),
                                  "--root", www.string(), "--https-address", "127.0.0.1:0", "--http-address", "off",
                                  "--admin-address", "off", "--drain", "0", "--storage", (d.path / "s").string(),
                                  "--ca", "https://127.0.0.1:1/unreachable"};
    a.insert(a.end(), more.begin(), more.end());
    return a;
  }
  // stop waits (10 s at most) until text() shows the listening line, then sends SIGTERM and
  // returns the exit status.
  template <class Text>
  int stop(pid_t pid, Text&& text) {
    auto deadline = std::chrono::steady_clock::now() + 10s;
    while (text().find("listening") == std::string::npos && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(50ms);
    }
    ::kill(pid, SIGTERM);
    return wait_exit(pid, 15s);
  }
  // to_files runs serve (exactly argv(more): no --log-format added) with output to files.
  std::string to_files(std::vector<std::string> more) {
    // Fresh files each run: a stale listening line would stop the next run before it starts.
    ++runs;
    fs::path out = d.path / ("out" + std::to_string(runs)), err = d.path / ("err" + std::to_string(runs));
    pid_t pid = spawn_as_is(argv(std::move(more)), out, err, {});
    int code = stop(pid, [&] { return read_file(out); });
    CHECK_MESSAGE(code == 0, (read_file(out) + read_file(err)));
    return read_file(out) + read_file(err);
  }
  // on_terminal runs serve with stdout and stderr on a pseudo-terminal.
  std::string on_terminal(std::vector<std::string> more) {
    auto [pid, master] = spawn_on_pty(argv(std::move(more)), false);
    std::string got;
    auto drain = [&] {
      char buf[4096];
      for (;;) {
        pollfd p{master, POLLIN, 0};
        if (::poll(&p, 1, 0) <= 0) break;
        ssize_t n = ::read(master, buf, sizeof buf);
        if (n <= 0) break;
        got.append(buf, static_cast<size_t>(n));
      }
      return got;
    };
    int code = stop(pid, drain);
    drain();
    ::close(master);
    CHECK_MESSAGE(code == 0, got);
    return got;
  }
};

// json_lines reports whether every non-empty line of text is a JSON object (and there is one).
bool json_lines(const std::string& text) {
  std::istringstream in(text);
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();  // a terminal's CRLF
    if (line.empty()) continue;
    if (!json::parse(line, nullptr, false).is_object()) return false;
    ++n;
  }
  return n > 0;
}

}  // namespace

TEST_SUITE("cli.serve") {
  TEST_CASE("serve logs JSON lines off a terminal and text on one unless --log-format or the config says") {
    LogFormatServe s;
    // auto (the default): JSON lines when stderr is not a terminal (systemd, a pipe, a file).
    auto piped = s.to_files({});
    CHECK_MESSAGE(json_lines(piped), piped);
    CHECK(piped.find("\"event\":\"listening\"") != std::string::npos);
    // auto on a terminal: text.
    auto tty = s.on_terminal({});
    CHECK_MESSAGE(tty.find(" listening ") != std::string::npos, tty);
    CHECK(tty.find("\"event\"") == std::string::npos);
    // Explicit formats win over the terminal test, both ways.
    auto text = s.to_files({"--log-format", "text"});
    CHECK_MESSAGE(text.find(" listening ") != std::string::npos, text);
    CHECK(text.find("\"event\"") == std::string::npos);
    auto forced = s.on_terminal({"--log-format", "json"});
    CHECK_MESSAGE(json_lines(forced), forced);
    // --json keeps meaning JSON, whatever --log-format says.
    CHECK(json_lines(s.on_terminal({"--json", "--log-format", "text"})));
    // The config file key, which the command line overrides.
    fs::path cfg = s.d.path / "c.json";
    write_file(cfg, R"({"log-format": "text"})");
    auto from_file = s.to_files({"--config", cfg.string()});
    CHECK_MESSAGE(from_file.find(" listening ") != std::string::npos, from_file);
    CHECK(from_file.find("\"event\"") == std::string::npos);
    CHECK(json_lines(s.to_files({"--config", cfg.string(), "--log-format", "auto"})));
    // Anything else is a usage error.
    auto bad = run({"serve", "--log-format", "yaml"});
    CHECK_MESSAGE(bad.code == 2, show(bad));
  }
}
