#include "tlsreload/dns_update.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include "acme/challenge.h"
#include "acme/util/base64.h"

namespace autotls::tlsreload::dns {

namespace {

using Clock = std::chrono::steady_clock;

void put16(std::string& out, uint16_t v) {
  out.push_back(static_cast<char>(v >> 8));
  out.push_back(static_cast<char>(v & 0xff));
}
void put32(std::string& out, uint32_t v) {
  put16(out, static_cast<uint16_t>(v >> 16));
  put16(out, static_cast<uint16_t>(v & 0xffff));
}
void put48(std::string& out, uint64_t v) {
  put16(out, static_cast<uint16_t>((v >> 32) & 0xffff));
  put32(out, static_cast<uint32_t>(v & 0xffffffff));
}
uint16_t get16(std::string_view b, size_t at) {
  return static_cast<uint16_t>((static_cast<uint8_t>(b[at]) << 8) | static_cast<uint8_t>(b[at + 1]));
}
uint32_t get32(std::string_view b, size_t at) {
  return (static_cast<uint32_t>(get16(b, at)) << 16) | get16(b, at + 2);
}

std::string lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return out;
}

std::string trim(std::string_view s) {
  size_t a = 0, b = s.size();
  while (a < b && std::isspace(static_cast<unsigned char>(s[a]))) ++a;
  while (b > a && std::isspace(static_cast<unsigned char>(s[b - 1]))) --b;
  return std::string(s.substr(a, b - a));
}

std::string fqdn(std::string_view name) {
  std::string n = lower(name);
  if (n.empty() || n.back() != '.') n += '.';
  return n;
}

const EVP_MD* digest_for(std::string_view algorithm) {
  std::string a = lower(algorithm);
  if (!a.empty() && a.back() == '.') a.pop_back();
  if (a == "hmac-sha256") return EVP_sha256();
  if (a == "hmac-sha384") return EVP_sha384();
  if (a == "hmac-sha512") return EVP_sha512();
  if (a == "hmac-sha224") return EVP_sha224();
  if (a == "hmac-sha1") return EVP_sha1();
  return nullptr;
}

Result<std::string> hmac(const TsigKey& key, std::string_view data) {
  const EVP_MD* md = digest_for(key.algorithm);
  if (!md) return fail(Errc::invalid_input, "TSIG algorithm \"" + key.algorithm + "\" is not supported");
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (!HMAC(md, key.secret.data(), static_cast<int>(key.secret.size()), reinterpret_cast<const unsigned char*>(data.data()),
            data.size(), out, &len)) {
    return fail(Errc::crypto, "TSIG: HMAC failed");
  }
  return std::string(reinterpret_cast<char*>(out), len);
}

// read_name reads a possibly compressed name at pos; pos moves past it in the message.
Result<std::string> read_name(std::string_view b, size_t& pos) {
  std::string name;
  size_t at = pos;
  bool jumped = false;
  int jumps = 0;
  for (;;) {
    if (at >= b.size()) return fail(Errc::bad_response, "DNS: name runs past the end of the message");
    auto len = static_cast<uint8_t>(b[at]);
    if ((len & 0xc0) == 0xc0) {
      if (at + 1 >= b.size()) return fail(Errc::bad_response, "DNS: truncated compression pointer");
      if (++jumps > 64) return fail(Errc::bad_response, "DNS: compression pointer loop");
      size_t target = ((len & 0x3f) << 8) | static_cast<uint8_t>(b[at + 1]);
      if (!jumped) pos = at + 2;
      jumped = true;
      at = target;
      continue;
    }
    if (len & 0xc0) return fail(Errc::bad_response, "DNS: unsupported label type");
    if (len == 0) {
      if (!jumped) pos = at + 1;
      break;
    }
    if (at + 1 + len > b.size()) return fail(Errc::bad_response, "DNS: label runs past the end of the message");
    name.append(b.substr(at + 1, len));
    name += '.';
    if (name.size() > 255) return fail(Errc::bad_response, "DNS: name longer than 255 octets");
    at += 1 + len;
  }
  return name.empty() ? std::string(".") : lower(name);
}

Result<wire::Record> read_record(std::string_view b, size_t& pos) {
  wire::Record r;
  r.offset = pos;
  auto name = read_name(b, pos);
  if (!name) return fail(name.error());
  r.name = *name;
  if (pos + 10 > b.size()) return fail(Errc::bad_response, "DNS: truncated resource record");
  r.type = get16(b, pos);
  r.klass = get16(b, pos + 2);
  r.ttl = get32(b, pos + 4);
  uint16_t rdlen = get16(b, pos + 8);
  pos += 10;
  if (pos + rdlen > b.size()) return fail(Errc::bad_response, "DNS: RDATA runs past the end of the message");
  r.rdata_offset = pos;
  r.rdata.assign(b.substr(pos, rdlen));
  pos += rdlen;
  return r;
}

// TsigRdata is the RDATA of a TSIG record (RFC 8945 §4.2).
struct TsigRdata {
  std::string algorithm;  // presentation form with trailing dot
  std::string algorithm_wire;
  uint64_t time_signed = 0;
  uint16_t fudge = 0;
  std::string mac;
  uint16_t original_id = 0;
  uint16_t error = 0;
  std::string other;
};

Result<TsigRdata> parse_tsig_rdata(std::string_view rd) {
  TsigRdata t;
  size_t pos = 0;
  // The algorithm name is never compressed (RFC 8945 §4.2).
  auto alg = read_name(rd, pos);
  if (!alg) return fail(alg.error());
  t.algorithm = *alg;
  t.algorithm_wire.assign(rd.substr(0, pos));
  if (pos + 10 > rd.size()) return fail(Errc::bad_response, "TSIG: truncated RDATA");
  t.time_signed = (static_cast<uint64_t>(get16(rd, pos)) << 32) | get32(rd, pos + 2);
  t.fudge = get16(rd, pos + 6);
  uint16_t mac_size = get16(rd, pos + 8);
  pos += 10;
  if (pos + mac_size + 6 > rd.size()) return fail(Errc::bad_response, "TSIG: truncated MAC");
  t.mac.assign(rd.substr(pos, mac_size));
  pos += mac_size;
  t.original_id = get16(rd, pos);
  t.error = get16(rd, pos + 2);
  uint16_t other_len = get16(rd, pos + 4);
  pos += 6;
  if (pos + other_len != rd.size()) return fail(Errc::bad_response, "TSIG: bad other-data length");
  t.other.assign(rd.substr(pos, other_len));
  return t;
}

// tsig_variables are the TSIG fields covered by the MAC (RFC 8945 §4.3.3).
std::string tsig_variables(const std::string& key_name_wire, const std::string& algorithm_wire, uint64_t time_signed,
                           uint16_t fudge, uint16_t error, std::string_view other) {
  std::string v = key_name_wire;
  put16(v, wire::kClassAny);
  put32(v, 0);
  v += algorithm_wire;
  put48(v, time_signed);
  put16(v, fudge);
  put16(v, error);
  put16(v, static_cast<uint16_t>(other.size()));
  v.append(other);
  return v;
}

std::string tsig_error_name(uint16_t e) {
  switch (e) {
    case 16: return "BADSIG";
    case 17: return "BADKEY";
    case 18: return "BADTIME";
    case 22: return "BADTRUNC";
    default: return "TSIG error " + std::to_string(e);
  }
}

uint16_t random_id() {
  uint16_t id = 0;
  if (RAND_bytes(reinterpret_cast<unsigned char*>(&id), sizeof id) != 1) id = static_cast<uint16_t>(::getpid());
  return id;
}

std::string server_text(const Server& s) {
  return (s.host.find(':') != std::string::npos ? "[" + s.host + "]" : s.host) + ":" + std::to_string(s.port);
}

// Fd closes a socket.
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
};

Result<std::vector<addrinfo>> resolve(const Server& s, int socktype, std::unique_ptr<addrinfo, void (*)(addrinfo*)>& holder) {
  addrinfo hints{};
  hints.ai_socktype = socktype;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  int rc = ::getaddrinfo(s.host.c_str(), std::to_string(s.port).c_str(), &hints, &res);
  if (rc != 0) return fail(Errc::transport, "DNS server " + server_text(s) + ": cannot resolve: " + gai_strerror(rc));
  holder.reset(res);
  std::vector<addrinfo> out;
  for (addrinfo* a = res; a; a = a->ai_next) out.push_back(*a);
  return out;
}

// wait_for polls fd for events until deadline; false on timeout.
Result<bool> wait_for(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) return false;
    pollfd p{fd, events, 0};
    int rc = ::poll(&p, 1, static_cast<int>(left));
    if (rc > 0) return true;
    if (rc == 0) return false;
    if (errno != EINTR) return fail(Errc::io, std::string("DNS: poll: ") + std::strerror(errno));
  }
}

// udp_exchange sends message and returns the first answer carrying id, or nullopt on timeout.
Result<std::optional<std::string>> udp_exchange(const Server& s, const std::string& message, uint16_t id,
                                                std::chrono::milliseconds timeout) {
  std::unique_ptr<addrinfo, void (*)(addrinfo*)> holder(nullptr, ::freeaddrinfo);
  auto addrs = resolve(s, SOCK_DGRAM, holder);
  if (!addrs) return fail(addrs.error());
  const addrinfo& a = addrs->front();
  Fd fd(::socket(a.ai_family, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (fd.fd < 0) return fail(Errc::io, std::string("DNS: socket: ") + std::strerror(errno));
  if (::connect(fd.fd, a.ai_addr, a.ai_addrlen) != 0) {
    return fail(Errc::transport, "DNS server " + server_text(s) + ": " + std::strerror(errno));
  }
  if (::send(fd.fd, message.data(), message.size(), 0) != static_cast<ssize_t>(message.size())) {
    return fail(Errc::transport, "DNS server " + server_text(s) + ": send: " + std::strerror(errno));
  }
  auto deadline = Clock::now() + timeout;
  std::string buf(65535, '\0');
  for (;;) {
    auto ready = wait_for(fd.fd, POLLIN, deadline);
    if (!ready) return fail(ready.error());
    if (!*ready) return std::optional<std::string>();
    ssize_t n = ::recv(fd.fd, buf.data(), buf.size(), 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      // ECONNREFUSED: nothing listens on UDP; TCP may still answer.
      if (errno == ECONNREFUSED) return std::optional<std::string>();
      return fail(Errc::transport, "DNS server " + server_text(s) + ": recv: " + std::strerror(errno));
    }
    if (n >= 12 && get16(buf, 0) == id) return std::optional<std::string>(buf.substr(0, static_cast<size_t>(n)));
  }
}

Status write_all(int fd, std::string_view data, Clock::time_point deadline, const Server& s) {
  size_t done = 0;
  while (done < data.size()) {
    auto ready = wait_for(fd, POLLOUT, deadline);
    if (!ready) return fail(ready.error());
    if (!*ready) return fail(Errc::timeout, "DNS server " + server_text(s) + ": TCP write timed out");
    ssize_t n = ::send(fd, data.data() + done, data.size() - done, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return fail(Errc::transport, "DNS server " + server_text(s) + ": TCP send: " + std::strerror(errno));
    }
    done += static_cast<size_t>(n);
  }
  return {};
}

Result<std::string> read_exact(int fd, size_t len, Clock::time_point deadline, const Server& s) {
  std::string out;
  out.resize(len);
  size_t done = 0;
  while (done < len) {
    auto ready = wait_for(fd, POLLIN, deadline);
    if (!ready) return fail(ready.error());
    if (!*ready) return fail(Errc::timeout, "DNS server " + server_text(s) + ": no answer over TCP in time");
    ssize_t n = ::recv(fd, out.data() + done, len - done, 0);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return fail(Errc::transport, "DNS server " + server_text(s) + ": TCP recv: " + std::strerror(errno));
    }
    if (n == 0) return fail(Errc::transport, "DNS server " + server_text(s) + ": closed the TCP connection");
    done += static_cast<size_t>(n);
  }
  return out;
}

Result<std::string> tcp_exchange(const Server& s, const std::string& message, std::chrono::milliseconds timeout) {
  std::unique_ptr<addrinfo, void (*)(addrinfo*)> holder(nullptr, ::freeaddrinfo);
  auto addrs = resolve(s, SOCK_STREAM, holder);
  if (!addrs) return fail(addrs.error());
  const addrinfo& a = addrs->front();
  Fd fd(::socket(a.ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (fd.fd < 0) return fail(Errc::io, std::string("DNS: socket: ") + std::strerror(errno));
  auto deadline = Clock::now() + timeout;
  if (::connect(fd.fd, a.ai_addr, a.ai_addrlen) != 0) {
    if (errno != EINPROGRESS) return fail(Errc::transport, "DNS server " + server_text(s) + ": TCP connect: " + std::strerror(errno));
    auto ready = wait_for(fd.fd, POLLOUT, deadline);
    if (!ready) return fail(ready.error());
    if (!*ready) return fail(Errc::timeout, "DNS server " + server_text(s) + ": TCP connect timed out");
    int err = 0;
    socklen_t len = sizeof err;
    ::getsockopt(fd.fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) return fail(Errc::transport, "DNS server " + server_text(s) + ": TCP connect: " + std::strerror(err));
  }
  std::string framed;
  put16(framed, static_cast<uint16_t>(message.size()));
  framed += message;
  if (auto st = write_all(fd.fd, framed, deadline, s); !st) return fail(st.error());
  auto head = read_exact(fd.fd, 2, deadline, s);
  if (!head) return fail(head.error());
  return read_exact(fd.fd, get16(*head, 0), deadline, s);
}

}  // namespace

// ---------------------------------------------------------------- keys

Result<TsigKey> parse_bind_key_text(std::string_view text) {
  // key "name" { algorithm hmac-sha256; secret "base64"; };  (comments: //, #, /* */)
  // Comment markers inside a quoted string are text: a base64 secret may hold "//".
  std::string t;
  bool quoted = false;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '"') quoted = !quoted;
    if (quoted) {
      t += text[i];
    } else if (text[i] == '#' || (text[i] == '/' && i + 1 < text.size() && text[i + 1] == '/')) {
      while (i < text.size() && text[i] != '\n') ++i;
      t += '\n';
    } else if (text[i] == '/' && i + 1 < text.size() && text[i + 1] == '*') {
      auto end = text.find("*/", i + 2);
      i = end == std::string_view::npos ? text.size() : end + 1;
      t += ' ';
    } else {
      t += text[i];
    }
  }
  auto k = t.find("key");
  if (k == std::string::npos) return fail(Errc::invalid_input, "no `key \"name\" { ... };` statement");
  auto open = t.find('{', k);
  auto close = t.find('}', open == std::string::npos ? k : open);
  if (open == std::string::npos || close == std::string::npos) return fail(Errc::invalid_input, "unbalanced braces in the key statement");
  std::string name = trim(std::string_view(t).substr(k + 3, open - k - 3));
  if (name.size() >= 2 && name.front() == '"' && name.back() == '"') name = name.substr(1, name.size() - 2);
  if (name.empty()) return fail(Errc::invalid_input, "the key statement has no name");
  TsigKey key;
  key.name = name;
  key.algorithm.clear();
  std::string secret_b64;
  std::stringstream body(t.substr(open + 1, close - open - 1));
  std::string stmt;
  while (std::getline(body, stmt, ';')) {
    std::istringstream s(stmt);
    std::string word, value;
    s >> word;
    std::getline(s, value);
    value = trim(value);
    if (value.size() >= 2 && value.front() == '"' && value.back() == '"') value = value.substr(1, value.size() - 2);
    if (word == "algorithm") key.algorithm = lower(value);
    if (word == "secret") secret_b64 = value;
  }
  if (key.algorithm.empty()) return fail(Errc::invalid_input, "key \"" + name + "\" has no algorithm");
  if (secret_b64.empty()) return fail(Errc::invalid_input, "key \"" + name + "\" has no secret");
  if (!digest_for(key.algorithm)) {
    return fail(Errc::invalid_input, "key \"" + name + "\": algorithm \"" + key.algorithm +
                                         "\" is not supported (hmac-sha256, hmac-sha384, hmac-sha512, hmac-sha224, hmac-sha1)");
  }
  auto secret = autotls::base64_decode(secret_b64);
  if (!secret || secret->empty()) return fail(Errc::invalid_input, "key \"" + name + "\": the secret is not valid base64");
  key.secret = std::move(*secret);
  return key;
}

Result<TsigKey> parse_tsig_key(const std::string& text) {
  // NAME:ALGORITHM:SECRET when the middle field is an algorithm (a base64 secret may contain
  // '/', so the presence of a slash says nothing); anything else is a key file. Messages never
  // repeat text that may hold a secret.
  auto a = text.find(':');
  auto b = a == std::string::npos ? std::string::npos : text.find(':', a + 1);
  bool inline_form = b != std::string::npos && digest_for(text.substr(a + 1, b - a - 1)) != nullptr;
  if (!inline_form) {
    bool may_hold_secret = b != std::string::npos;
    std::string what = may_hold_secret ? std::string("--tsig-key") : "--tsig-key file " + text;
    std::ifstream in(text, std::ios::binary);
    if (!in) {
      if (may_hold_secret) {
        return fail(Errc::invalid_input,
                    "--tsig-key is neither NAME:ALGORITHM:BASE64SECRET with a supported algorithm (hmac-sha256, "
                    "hmac-sha384, hmac-sha512, hmac-sha224, hmac-sha1) nor a readable BIND key file");
      }
      return fail(Errc::invalid_input, what + ": cannot read (" + std::strerror(errno) +
                                           "); expected a BIND key file or NAME:ALGORITHM:BASE64SECRET");
    }
    std::stringstream ss;
    ss << in.rdbuf();
    auto k = parse_bind_key_text(ss.str());
    if (!k) return fail(Errc::invalid_input, what + ": " + k.error().message);
    return k;
  }
  TsigKey key;
  key.name = text.substr(0, a);
  key.algorithm = lower(text.substr(a + 1, b - a - 1));
  if (key.name.empty()) return fail(Errc::invalid_input, "--tsig-key: the key name is empty");
  auto secret = autotls::base64_decode(text.substr(b + 1));
  if (!secret || secret->empty()) return fail(Errc::invalid_input, "--tsig-key: the secret of key \"" + key.name + "\" is not valid base64");
  key.secret = std::move(*secret);
  return key;
}

// ---------------------------------------------------------------- wire

namespace wire {

Result<std::string> encode_name(std::string_view name) {
  std::string n = lower(name);
  if (!n.empty() && n.back() == '.') n.pop_back();
  std::string out;
  if (!n.empty()) {
    size_t start = 0;
    for (;;) {
      auto dot = n.find('.', start);
      std::string_view label = std::string_view(n).substr(start, dot == std::string::npos ? std::string::npos : dot - start);
      if (label.empty()) return fail(Errc::invalid_input, "DNS name \"" + std::string(name) + "\" has an empty label");
      if (label.size() > 63) return fail(Errc::invalid_input, "DNS name \"" + std::string(name) + "\" has a label over 63 octets");
      out.push_back(static_cast<char>(label.size()));
      out.append(label);
      if (dot == std::string::npos) break;
      start = dot + 1;
    }
  }
  out.push_back('\0');
  if (out.size() > 255) return fail(Errc::invalid_input, "DNS name \"" + std::string(name) + "\" is longer than 255 octets");
  return out;
}

Result<Message> parse(std::string_view b) {
  if (b.size() < 12) return fail(Errc::bad_response, "DNS: message shorter than its header");
  Message m;
  m.id = get16(b, 0);
  m.flags = get16(b, 2);
  uint16_t qd = get16(b, 4), an = get16(b, 6), ns = get16(b, 8), ar = get16(b, 10);
  size_t pos = 12;
  for (int i = 0; i < qd; ++i) {
    auto n = read_name(b, pos);
    if (!n) return fail(n.error());
    if (pos + 4 > b.size()) return fail(Errc::bad_response, "DNS: truncated question");
    pos += 4;
    m.questions.push_back(*n);
  }
  for (auto [count, section] : {std::pair{an, &m.answers}, std::pair{ns, &m.authority}, std::pair{ar, &m.additional}}) {
    for (int i = 0; i < count; ++i) {
      auto r = read_record(b, pos);
      if (!r) return fail(r.error());
      section->push_back(std::move(*r));
    }
  }
  if (pos != b.size()) return fail(Errc::bad_response, "DNS: trailing bytes after the last record");
  return m;
}

std::string rcode_name(int rcode) {
  static const char* names[] = {"NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED",
                                "YXDOMAIN", "YXRRSET", "NXRRSET", "NOTAUTH", "NOTZONE"};
  if (rcode >= 0 && rcode <= 10) return names[rcode];
  return "RCODE " + std::to_string(rcode);
}

}  // namespace wire

Result<std::string> build_query(uint16_t id, std::string_view name, uint16_t type) {
  auto n = wire::encode_name(name);
  if (!n) return fail(n.error());
  std::string m;
  put16(m, id);
  put16(m, 0);  // QUERY, no recursion wanted: the server is asked about its own zones
  put16(m, 1);
  put16(m, 0);
  put16(m, 0);
  put16(m, 0);
  m += *n;
  put16(m, type);
  put16(m, wire::kClassIn);
  return m;
}

Result<std::string> build_update(uint16_t id, std::string_view zone, const std::vector<TxtChange>& changes) {
  auto z = wire::encode_name(zone);
  if (!z) return fail(z.error());
  std::string m;
  put16(m, id);
  put16(m, static_cast<uint16_t>(wire::kOpcodeUpdate << 11));
  put16(m, 1);  // ZOCOUNT
  put16(m, 0);  // PRCOUNT
  put16(m, static_cast<uint16_t>(changes.size()));  // UPCOUNT
  put16(m, 0);  // ADCOUNT
  m += *z;
  put16(m, wire::kTypeSoa);
  put16(m, wire::kClassIn);
  for (const auto& c : changes) {
    auto n = wire::encode_name(c.name);
    if (!n) return fail(n.error());
    if (c.value.size() > 255) return fail(Errc::invalid_input, "TXT value longer than 255 octets");
    m += *n;
    put16(m, wire::kTypeTxt);
    // RFC 2136 §2.5.1 adds to an RRset (class IN); §2.5.4 deletes one RR (class NONE, TTL 0).
    put16(m, c.add ? wire::kClassIn : wire::kClassNone);
    put32(m, c.add ? c.ttl : 0);
    put16(m, static_cast<uint16_t>(c.value.size() + 1));
    m.push_back(static_cast<char>(c.value.size()));
    m += c.value;
  }
  return m;
}

// ---------------------------------------------------------------- TSIG

Result<std::string> sign(std::string& message, const TsigKey& key, std::chrono::system_clock::time_point now,
                         std::string_view request_mac, uint16_t fudge) {
  if (message.size() < 12) return fail(Errc::invalid_input, "TSIG: message shorter than a header");
  auto key_name = wire::encode_name(key.name);
  if (!key_name) return fail(key_name.error());
  auto alg = wire::encode_name(key.algorithm);
  if (!alg) return fail(alg.error());
  auto t = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::seconds>(now.time_since_epoch()).count());
  std::string data;
  if (!request_mac.empty()) {
    put16(data, static_cast<uint16_t>(request_mac.size()));
    data.append(request_mac);
  }
  data += message;
  data += tsig_variables(*key_name, *alg, t, fudge, 0, {});
  auto mac = hmac(key, data);
  if (!mac) return fail(mac.error());
  uint16_t id = get16(message, 0);
  std::string rd = *alg;
  put48(rd, t);
  put16(rd, fudge);
  put16(rd, static_cast<uint16_t>(mac->size()));
  rd += *mac;
  put16(rd, id);
  put16(rd, 0);  // error
  put16(rd, 0);  // other len
  message += *key_name;
  put16(message, wire::kTypeTsig);
  put16(message, wire::kClassAny);
  put32(message, 0);
  put16(message, static_cast<uint16_t>(rd.size()));
  message += rd;
  uint16_t ar = get16(message, 10) + 1;
  message[10] = static_cast<char>(ar >> 8);
  message[11] = static_cast<char>(ar & 0xff);
  return *mac;
}

Status verify(std::string_view response, const TsigKey& key, std::string_view request_mac,
              std::chrono::system_clock::time_point now) {
  auto m = wire::parse(response);
  if (!m) return fail(m.error());
  if (m->additional.empty() || m->additional.back().type != wire::kTypeTsig) {
    std::string why = m->rcode() != 0 ? " (" + wire::rcode_name(m->rcode()) + ")" : "";
    return fail(Errc::protocol, "the DNS server's answer" + why + " is not signed with TSIG key \"" + key.name +
                                    "\": is the key configured on the server?");
  }
  const wire::Record& rec = m->additional.back();
  auto t = parse_tsig_rdata(rec.rdata);
  if (!t) return fail(t.error());
  if (t->error != 0) {
    std::string err = tsig_error_name(t->error);
    std::string fix = t->error == 17   ? "the server does not know a key of this name and algorithm"
                      : t->error == 16 ? "the secret does not match the server's"
                      : t->error == 18 ? "the clocks differ by more than the fudge; check the time on both hosts"
                                       : "see RFC 8945";
    return fail(Errc::protocol, "the DNS server refused TSIG key \"" + key.name + "\" (" + err + "): " + fix);
  }
  if (fqdn(rec.name) != fqdn(key.name)) {
    return fail(Errc::protocol, "the DNS server signed its answer with key \"" + rec.name + "\", not \"" + key.name + "\"");
  }
  if (fqdn(t->algorithm) != fqdn(key.algorithm)) {
    return fail(Errc::protocol, "the DNS server signed its answer with " + t->algorithm + ", not " + key.algorithm);
  }
  // The MAC covers the message as it was before the TSIG record was added: original ID,
  // ARCOUNT one less, and nothing from the TSIG record on.
  std::string body(response.substr(0, rec.offset));
  body[0] = static_cast<char>(t->original_id >> 8);
  body[1] = static_cast<char>(t->original_id & 0xff);
  uint16_t ar = get16(body, 10) - 1;
  body[10] = static_cast<char>(ar >> 8);
  body[11] = static_cast<char>(ar & 0xff);
  auto key_name = wire::encode_name(rec.name);
  if (!key_name) return fail(key_name.error());
  std::string data;
  if (!request_mac.empty()) {
    put16(data, static_cast<uint16_t>(request_mac.size()));
    data.append(request_mac);
  }
  data += body;
  auto alg = wire::encode_name(t->algorithm);
  if (!alg) return fail(alg.error());
  data += tsig_variables(*key_name, *alg, t->time_signed, t->fudge, t->error, t->other);
  auto mac = hmac(key, data);
  if (!mac) return fail(mac.error());
  if (mac->size() != t->mac.size() || CRYPTO_memcmp(mac->data(), t->mac.data(), mac->size()) != 0) {
    return fail(Errc::protocol, "the DNS server's answer has a bad TSIG signature for key \"" + key.name +
                                    "\": it was changed on the way, or the server has another secret");
  }
  auto now_s = std::chrono::duration_cast<std::chrono::seconds>(now.time_since_epoch()).count();
  auto diff = now_s > static_cast<long long>(t->time_signed) ? now_s - static_cast<long long>(t->time_signed)
                                                             : static_cast<long long>(t->time_signed) - now_s;
  if (diff > t->fudge) {
    return fail(Errc::protocol, "the DNS server's signed answer is " + std::to_string(diff) +
                                    " s away from this host's clock (fudge " + std::to_string(t->fudge) + " s): check the time");
  }
  return {};
}

// ---------------------------------------------------------------- client

Result<Server> parse_server(const std::string& text) {
  Server s;
  std::string port;
  if (text.starts_with("[")) {
    auto close = text.find(']');
    if (close == std::string::npos) return fail(Errc::invalid_input, "--dns-server \"" + text + "\": missing ]");
    s.host = text.substr(1, close - 1);
    if (close + 1 < text.size()) {
      if (text[close + 1] != ':') return fail(Errc::invalid_input, "--dns-server \"" + text + "\": expected [V6]:PORT");
      port = text.substr(close + 2);
    }
  } else if (std::count(text.begin(), text.end(), ':') == 1) {
    auto colon = text.find(':');
    s.host = text.substr(0, colon);
    port = text.substr(colon + 1);
  } else {
    s.host = text;  // a name, an IPv4 address or a bare IPv6 address
  }
  if (s.host.empty()) return fail(Errc::invalid_input, "--dns-server \"" + text + "\": no host (HOST[:PORT])");
  if (!port.empty() || text.ends_with(":")) {
    char* end = nullptr;
    long p = std::strtol(port.c_str(), &end, 10);
    if (port.empty() || *end != '\0' || p < 1 || p > 65535) {
      return fail(Errc::invalid_input, "--dns-server \"" + text + "\": bad port (HOST[:PORT], port 1-65535)");
    }
    s.port = static_cast<int>(p);
  }
  return s;
}

Result<wire::Message> Client::exchange(std::string message, uint16_t id) {
  auto mac = sign(message, key_, std::chrono::system_clock::now());
  if (!mac) return fail(mac.error());
  auto udp = udp_exchange(server_, message, id, timeout_);
  if (!udp) return fail(udp.error());
  std::string answer;
  if (*udp) {
    auto parsed = wire::parse(**udp);
    if (parsed && !parsed->truncated()) answer = std::move(**udp);
  }
  if (answer.empty()) {
    // Truncated, or no answer over UDP: the same signed message over TCP (RFC 1035 §4.2.2).
    auto tcp = tcp_exchange(server_, message, timeout_);
    if (!tcp) {
      return fail(tcp.error().with_context(*udp ? "after a truncated UDP answer" : "no answer over UDP in time, then"));
    }
    answer = std::move(*tcp);
  }
  auto parsed = wire::parse(answer);
  if (!parsed) return fail(parsed.error().with_context("DNS server " + server_text(server_)));
  if (parsed->id != id) return fail(Errc::bad_response, "DNS server " + server_text(server_) + ": answer with another ID");
  if (auto st = verify(answer, key_, *mac, std::chrono::system_clock::now()); !st) {
    return fail(st.error().with_context("DNS server " + server_text(server_)));
  }
  return std::move(*parsed);
}

Result<std::string> Client::find_zone(std::string_view name) {
  uint16_t id = random_id();
  auto q = build_query(id, name, wire::kTypeSoa);
  if (!q) return fail(q.error());
  auto m = exchange(std::move(*q), id);
  if (!m) return fail(m.error());
  if (m->rcode() != 0 && m->rcode() != 3) {
    return fail(Errc::protocol, "DNS server " + server_text(server_) + " answered " + wire::rcode_name(m->rcode()) +
                                    " when asked for the zone of " + std::string(name) +
                                    ": it is not authoritative for it; give the primary server with --dns-server or "
                                    "the zone with --dns-zone");
  }
  for (const auto* section : {&m->answers, &m->authority}) {
    for (const auto& r : *section) {
      if (r.type == wire::kTypeSoa) return r.name;
    }
  }
  return fail(Errc::protocol, "DNS server " + server_text(server_) + " gave no SOA for " + std::string(name) +
                                  ": it is not authoritative for it; give --dns-zone");
}

Status Client::update(std::string_view zone, const std::vector<TxtChange>& changes) {
  uint16_t id = random_id();
  auto u = build_update(id, zone, changes);
  if (!u) return fail(u.error());
  auto m = exchange(std::move(*u), id);
  if (!m) return fail(m.error());
  if (m->rcode() == 0) return {};
  std::string rc = wire::rcode_name(m->rcode());
  std::string fix = m->rcode() == 5 ? "the server does not allow this key to update the zone (allow-update / update-policy)"
                    : m->rcode() == 9 ? "the server is not authoritative for the zone or does not accept the key"
                    : m->rcode() == 10 ? "the record is outside the zone: check --dns-zone"
                                       : "see the server's log";
  return fail(Errc::protocol, "DNS UPDATE of zone " + fqdn(zone) + " at " + server_text(server_) + " failed: " + rc + ": " + fix);
}

// ---------------------------------------------------------------- solver

Result<std::string> Rfc2136Solver::zone_for(const std::string& record) {
  if (!zone_.empty()) return fqdn(zone_);
  return client_.find_zone(record);
}

Status Rfc2136Solver::present(const acme::Identifier& identifier, const acme::Challenge& challenge,
                              std::string_view key_authorization) {
  if (challenge.type != "dns-01") return fail(Errc::invalid_input, "RFC 2136 updates answer dns-01 only, not " + challenge.type);
  std::string record = acme::dns01_record_name(identifier.value);
  // A DNS server that refuses the update is a local set-up failure (like a failing hook), not
  // the CA refusing: protocol errors from the DNS exchange become Errc::io.
  auto local = [&](Error e) {
    if (e.code == Errc::protocol || e.code == Errc::bad_response) e.code = Errc::io;
    return fail(e.with_context("dns-01 for " + identifier.value));
  };
  auto zone = zone_for(record);
  if (!zone) return local(zone.error());
  auto st = client_.update(*zone, {{true, record, acme::dns01_txt_value(key_authorization), 60}});
  if (!st) return local(st.error());
  return {};
}

void Rfc2136Solver::cleanup(const acme::Identifier& identifier, const acme::Challenge& challenge,
                            std::string_view key_authorization) {
  if (challenge.type != "dns-01") return;
  std::string record = acme::dns01_record_name(identifier.value);
  auto zone = zone_for(record);
  if (!zone) return;
  // Best effort, like the hook's del: a leftover record does not disturb the next validation.
  (void)client_.update(*zone, {{false, record, acme::dns01_txt_value(key_authorization), 0}});
}

}  // namespace autotls::tlsreload::dns
