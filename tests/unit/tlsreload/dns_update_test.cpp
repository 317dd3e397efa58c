// RFC 2136 UPDATE encoding and RFC 8945 TSIG signing/verification (tlsreload/dns_update.h).
// The MAC checks build the signed data by hand from the RFC's layout and compute the HMAC
// independently, so a mistake in the module's layout fails them. The end-to-end proof against
// a real BIND 9 is cli.dns-01 by RFC 2136 against BIND with a TSIG key.

#include <doctest/doctest.h>

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "acme/util/base64.h"
#include "tlsreload/dns_update.h"

using namespace autotls;
using namespace autotls::tlsreload::dns;
namespace fs = std::filesystem;

namespace {

std::string bytes(std::initializer_list<int> b) {
  std::string s;
  for (int c : b) s.push_back(static_cast<char>(c));
  return s;
}

std::string hmac_sha256(std::string_view key, std::string_view data) {
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), reinterpret_cast<const unsigned char*>(data.data()),
       data.size(), out, &len);
  return std::string(reinterpret_cast<char*>(out), len);
}

std::string hex(std::string_view s) {
  static const char* d = "0123456789abcdef";
  std::string out;
  for (unsigned char c : s) out += {d[c >> 4], d[c & 15]};
  return out;
}

TsigKey test_key() {
  TsigKey k;
  k.name = "acme-key.";
  k.algorithm = "hmac-sha256";
  k.secret = std::string(32, '\x5a');
  return k;
}

const auto kTime = std::chrono::system_clock::time_point(std::chrono::seconds(1'700'000'000));

// tsig_vars builds the RFC 8945 §4.3.3 "TSIG variables" for acme-key./hmac-sha256.
std::string tsig_vars(uint64_t t, uint16_t fudge) {
  std::string v = bytes({8}) + "acme-key" + bytes({0});
  v += bytes({0, 255, 0, 0, 0, 0});  // class ANY, TTL 0
  v += bytes({11}) + "hmac-sha256" + bytes({0});
  for (int shift = 40; shift >= 0; shift -= 8) v.push_back(static_cast<char>((t >> shift) & 0xff));
  v += bytes({fudge >> 8, fudge & 0xff, 0, 0, 0, 0});  // fudge, error 0, other len 0
  return v;
}

}  // namespace

TEST_SUITE("tlsreload") {
  TEST_CASE("dns update hmac-sha256 matches the RFC 4231 test vector") {
    // RFC 4231 §4.3, test case 2: anchors the independent HMAC the other checks rely on.
    CHECK(hex(hmac_sha256("Jefe", "what do ya want for nothing?")) ==
          "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
  }

  TEST_CASE("dns update names encode lower-case and refuse bad labels") {
    auto n = wire::encode_name("_ACME-challenge.Example.COM.");
    REQUIRE(n);
    CHECK(*n == bytes({15}) + "_acme-challenge" + bytes({7}) + "example" + bytes({3}) + "com" + bytes({0}));
    CHECK(*wire::encode_name("example.com") == *wire::encode_name("example.com."));
    CHECK(*wire::encode_name(".") == bytes({0}));
    CHECK_FALSE(wire::encode_name("a..b"));
    CHECK_FALSE(wire::encode_name(std::string(64, 'a') + ".com"));
  }

  TEST_CASE("dns update message has the RFC 2136 layout") {
    auto m = build_update(0x1234, "example.com", {{true, "_acme-challenge.example.com", "abc", 60},
                                                  {false, "_acme-challenge.example.com", "xyz", 60}});
    REQUIRE(m);
    std::string zone = bytes({7}) + "example" + bytes({3}) + "com" + bytes({0});
    std::string owner = bytes({15}) + "_acme-challenge" + zone;
    std::string want = bytes({0x12, 0x34, 0x28, 0x00, 0, 1, 0, 0, 0, 2, 0, 0});  // opcode 5; ZO 1, PR 0, UP 2, AD 0
    want += zone + bytes({0, 6, 0, 1});                                            // zone SOA IN
    want += owner + bytes({0, 16, 0, 1, 0, 0, 0, 60, 0, 4, 3}) + "abc";           // add TXT IN ttl 60
    want += owner + bytes({0, 16, 0, 254, 0, 0, 0, 0, 0, 4, 3}) + "xyz";          // delete RR: class NONE ttl 0
    CHECK(hex(*m) == hex(want));
    auto parsed = wire::parse(*m);
    REQUIRE(parsed);
    CHECK(parsed->opcode() == wire::kOpcodeUpdate);
    CHECK(parsed->questions == std::vector<std::string>{"example.com."});
    REQUIRE(parsed->authority.size() == 2);  // the update section sits where authority does
    CHECK(parsed->authority[1].klass == wire::kClassNone);
    CHECK_FALSE(build_update(1, "example.com", {{true, "x.example.com", std::string(256, 'v'), 60}}));
  }

  TEST_CASE("dns update tsig signature covers the message and the tsig variables") {
    auto m = build_update(0xbeef, "example.com", {{true, "_acme-challenge.example.com", "abc", 60}});
    REQUIRE(m);
    const std::string unsigned_msg = *m;
    std::string msg = *m;
    auto mac = sign(msg, test_key(), kTime, {}, 300);
    REQUIRE(mac);
    // RFC 8945 §4.3.3: HMAC(message without TSIG, then the TSIG variables).
    CHECK(hex(*mac) == hex(hmac_sha256(test_key().secret, unsigned_msg + tsig_vars(1'700'000'000, 300))));
    auto parsed = wire::parse(msg);
    REQUIRE(parsed);
    REQUIRE(parsed->additional.size() == 1);
    const auto& t = parsed->additional[0];
    CHECK(t.name == "acme-key.");
    CHECK(t.type == wire::kTypeTsig);
    CHECK(t.klass == wire::kClassAny);
    // RDATA: algorithm, time (48 bits), fudge, MAC size, MAC, original ID, error, other len.
    std::string rd = bytes({11}) + "hmac-sha256" + bytes({0});
    rd += bytes({0, 0, 0x65, 0x53, 0xf1, 0x00, 1, 44, 0, 32}) + *mac + bytes({0xbe, 0xef, 0, 0, 0, 0});
    CHECK(hex(t.rdata) == hex(rd));
  }

  TEST_CASE("dns update verifies signed answers and refuses bad ones") {
    auto req = build_update(7, "example.com", {{true, "_acme-challenge.example.com", "abc", 60}});
    REQUIRE(req);
    auto req_mac = sign(*req, test_key(), kTime);
    REQUIRE(req_mac);
    // A server's NOERROR answer: the header with QR set and the zone section, signed over the
    // request MAC (RFC 8945 §4.3.1).
    std::string answer = bytes({0, 7, 0xa8, 0x00, 0, 1, 0, 0, 0, 0, 0, 0}) + bytes({7}) + "example" + bytes({3}) +
                         "com" + bytes({0, 0, 6, 0, 1});
    std::string good = answer;
    auto resp_mac = sign(good, test_key(), kTime, *req_mac);
    REQUIRE(resp_mac);
    CHECK(hex(*resp_mac) == hex(hmac_sha256(test_key().secret, bytes({0, 32}) + *req_mac + answer +
                                                                    tsig_vars(1'700'000'000, 300))));
    CHECK(verify(good, test_key(), *req_mac, kTime));

    SUBCASE("a changed byte") {
      std::string bad = good;
      bad[3] ^= 0x05;  // rcode
      auto st = verify(bad, test_key(), *req_mac, kTime);
      REQUIRE_FALSE(st);
      CHECK(st.error().message.find("bad TSIG signature") != std::string::npos);
    }
    SUBCASE("another secret") {
      TsigKey other = test_key();
      other.secret[0] ^= 1;
      CHECK_FALSE(verify(good, other, *req_mac, kTime));
    }
    SUBCASE("another request") {
      std::string other_mac = *req_mac;
      other_mac[0] ^= 1;
      CHECK_FALSE(verify(good, test_key(), other_mac, kTime));
    }
    SUBCASE("outside the fudge") {
      auto st = verify(good, test_key(), *req_mac, kTime + std::chrono::seconds(301));
      REQUIRE_FALSE(st);
      CHECK(st.error().message.find("check the time") != std::string::npos);
    }
    SUBCASE("unsigned") {
      auto st = verify(answer, test_key(), *req_mac, kTime);
      REQUIRE_FALSE(st);
      CHECK(st.error().message.find("not signed") != std::string::npos);
    }
    SUBCASE("BADKEY from the server") {
      // NOTAUTH with a TSIG record carrying error 17 and no MAC (RFC 8945 §5.2.1).
      std::string refused = bytes({0, 7, 0xa8, 0x09, 0, 1, 0, 0, 0, 0, 0, 1}) + bytes({7}) + "example" + bytes({3}) +
                            "com" + bytes({0, 0, 6, 0, 1});
      std::string rd = bytes({11}) + "hmac-sha256" + bytes({0}) + bytes({0, 0, 0x65, 0x53, 0xf1, 0x00, 1, 44, 0, 0}) +
                       bytes({0, 7, 0, 17, 0, 0});
      refused += bytes({8}) + "acme-key" + bytes({0, 0, 250, 0, 255, 0, 0, 0, 0, 0, static_cast<int>(rd.size())}) + rd;
      auto st = verify(refused, test_key(), *req_mac, kTime);
      REQUIRE_FALSE(st);
      CHECK(st.error().message.find("BADKEY") != std::string::npos);
      CHECK(st.error().message.find("acme-key") != std::string::npos);
    }
  }

  TEST_CASE("dns update parses compressed names and refuses pointer loops") {
    // One answer whose owner is a pointer to the question name.
    std::string m = bytes({0, 1, 0x84, 0, 0, 1, 0, 1, 0, 0, 0, 0}) + bytes({1}) + "a" + bytes({2}) + "bc" +
                    bytes({0, 0, 6, 0, 1}) + bytes({0xc0, 12, 0, 6, 0, 1, 0, 0, 0, 5, 0, 0});
    auto p = wire::parse(m);
    REQUIRE(p);
    REQUIRE(p->answers.size() == 1);
    CHECK(p->answers[0].name == "a.bc.");
    std::string loop = bytes({0, 1, 0x84, 0, 0, 1, 0, 0, 0, 0, 0, 0}) + bytes({0xc0, 12, 0, 6, 0, 1});
    CHECK_FALSE(wire::parse(loop));
    CHECK_FALSE(wire::parse(m.substr(0, m.size() - 1)));
  }

  TEST_CASE("dns update parser and verifier survive mutated answers") {
    // Seeded byte flips, truncations and length changes of a signed answer: every result is
    // an error or a parse, never a crash or an over-read (run under ASan in tools/sanitize).
    auto req = build_update(9, "example.com", {{true, "_acme-challenge.example.com", "abc", 60}});
    REQUIRE(req);
    auto req_mac = sign(*req, test_key(), kTime);
    REQUIRE(req_mac);
    std::string good = *req;
    good[2] = static_cast<char>(good[2] | 0x80);
    REQUIRE(sign(good, test_key(), kTime, *req_mac));
    std::mt19937 rng(20261125);
    int accepted = 0;
    for (int i = 0; i < 3000; ++i) {
      std::string m = good;
      int edits = 1 + static_cast<int>(rng() % 4);
      for (int e = 0; e < edits; ++e) {
        switch (rng() % 3) {
          case 0: m[rng() % m.size()] = static_cast<char>(rng()); break;
          case 1: m.resize(rng() % (m.size() + 1)); break;
          default: m.insert(rng() % (m.size() + 1), 1, static_cast<char>(rng())); break;
        }
        if (m.empty()) m = "x";
      }
      (void)wire::parse(m);
      if (verify(m, test_key(), *req_mac, kTime)) ++accepted;
    }
    // Only edits the MAC does not cover (the header ID, which TSIG restores from Original ID;
    // letter case of the key name) or edits that left the message as it was may still verify:
    // a few out of 3000. A verifier that accepted changed answers would pass thousands.
    CHECK(accepted < 30);
  }

  TEST_CASE("dns update keys parse from the command line form and BIND key files") {
    auto k = parse_tsig_key("acme-key:hmac-sha256:" + autotls::base64_encode("0123456789abcdef"));
    REQUIRE(k);
    CHECK(k->name == "acme-key");
    CHECK(k->algorithm == "hmac-sha256");
    CHECK(k->secret == "0123456789abcdef");

    auto bad_alg = parse_tsig_key("acme-key:hmac-md4:" + autotls::base64_encode("0123456789abcdef"));
    REQUIRE_FALSE(bad_alg);
    CHECK(bad_alg.error().message.find("supported algorithm") != std::string::npos);
    CHECK(bad_alg.error().message.find(autotls::base64_encode("0123456789abcdef")) == std::string::npos);
    // A secret with '/' in it is still the inline form, not a path.
    auto slash = parse_tsig_key("k:hmac-sha256:" + autotls::base64_encode("\xff\xff\xff\xfe"));
    REQUIRE(slash);
    CHECK(slash->secret == "\xff\xff\xff\xfe");
    std::string secret_text = "c2VjcmV0IQ=!!";
    auto bad_secret = parse_tsig_key("acme-key:hmac-sha256:" + secret_text);
    REQUIRE_FALSE(bad_secret);
    CHECK(bad_secret.error().message.find(secret_text) == std::string::npos);
    CHECK_FALSE(parse_tsig_key("just-a-name"));

    // tsig-keygen's output.
    std::string tmpl = (fs::temp_directory_path() / "autotls-tsig-XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    fs::path file = fs::path(tmpl) / "acme.key";
    std::ofstream(file) << "// made by tsig-keygen\nkey \"acme-key\" {\n\talgorithm hmac-sha512;\n\tsecret \""
                        << autotls::base64_encode("topsecret-topsecret") << "\";\n};\n";
    auto f = parse_tsig_key(file.string());
    REQUIRE(f);
    CHECK(f->name == "acme-key");
    CHECK(f->algorithm == "hmac-sha512");
    CHECK(f->secret == "topsecret-topsecret");
    // A secret holding "//" (about one tsig-keygen key in a hundred) is not cut as a comment.
    std::string slashes = "\xff\xff\xff\xfb\xef\xbf-secret";
    REQUIRE(autotls::base64_encode(slashes).find("//") != std::string::npos);
    std::ofstream(file) << "key \"acme-key\" { // a comment\n algorithm hmac-sha256; # another\n secret \""
                        << autotls::base64_encode(slashes) << "\"; /* and a block */ };\n";
    auto with_slashes = parse_tsig_key(file.string());
    REQUIRE_MESSAGE(with_slashes, with_slashes.error().message);
    CHECK(with_slashes->secret == slashes);
    std::ofstream(file) << "key \"acme-key\" { algorithm hmac-sha256; };\n";
    auto no_secret = parse_tsig_key(file.string());
    REQUIRE_FALSE(no_secret);
    CHECK(no_secret.error().message.find("no secret") != std::string::npos);
    CHECK(no_secret.error().message.find(file.string()) != std::string::npos);
    fs::remove_all(tmpl);
    CHECK_FALSE(parse_tsig_key(file.string()));
  }

  TEST_CASE("dns update server addresses") {
    auto a = parse_server("127.0.0.1:5353");
    REQUIRE(a);
    CHECK(a->host == "127.0.0.1");
    CHECK(a->port == 5353);
    CHECK(parse_server("ns1.example.com")->port == 53);
    CHECK(parse_server("[::1]:5300")->host == "::1");
    CHECK(parse_server("::1")->host == "::1");
    CHECK_FALSE(parse_server("127.0.0.1:0"));
    CHECK_FALSE(parse_server("127.0.0.1:x"));
    CHECK_FALSE(parse_server(":53"));
  }
}
