// Mutated certificates and keys must never crash the parser, in the deferred (own DER reader)
// mode or the full OpenSSL mode, and a mutated chain must never be reported as verified. Run
// under ASan/UBSan by tools/sanitize, this is where memory errors in the DER reader show.

#include <doctest/doctest.h>

#include <random>

#include "acme/util/base64.h"
#include "tests/unit/tlsreload/test_ca.h"
#include "tlsreload/certificate.h"
#include "tlsreload/loader.h"

using namespace autotls;
using namespace autotls::tlsreload;
using autotls::testing::TestCa;

namespace {

// der_of returns the DER bytes of each PEM block.
std::vector<std::string> der_blocks(const std::string& pem) {
  std::vector<std::string> out;
  size_t pos = 0;
  while ((pos = pem.find("-----BEGIN ", pos)) != std::string::npos) {
    size_t body = pem.find('\n', pos) + 1;
    size_t end = pem.find("-----END ", body);
    std::string b64;
    for (size_t i = body; i < end; ++i) {
      if (pem[i] != '\n' && pem[i] != '\r') b64 += pem[i];
    }
    out.push_back(base64_decode(b64).value_or(""));
    pos = end + 1;
  }
  return out;
}

std::string pem_block(const std::string& label, const std::string& der) {
  std::string b64 = base64_encode(der), out = "-----BEGIN " + label + "-----\n";
  for (size_t i = 0; i < b64.size(); i += 64) out += b64.substr(i, 64) + "\n";
  return out + "-----END " + label + "-----\n";
}

void mutate(std::string& der, std::mt19937& rng) {
  int edits = 1 + static_cast<int>(rng() % 4);
  for (int e = 0; e < edits && !der.empty(); ++e) {
    size_t at = rng() % der.size();
    switch (rng() % 4) {
      case 0: der[at] = static_cast<char>(rng()); break;                 // flip a byte
      case 1: der[at] = static_cast<char>(der[at] ^ (1 << (rng() % 8))); break;
      case 2: der.resize(at); break;                                     // truncate
      case 3: der.insert(at, 1, static_cast<char>(rng())); break;        // insert
    }
  }
}

}  // namespace

TEST_SUITE("tlsreload.certificate_fuzz") {

TEST_CASE("mutated leaf intermediate and key never crash and never verify") {
  TestCa ca{"Fuzz"};
  auto spec = ca.spec({"fuzz.example.test", "*.fuzz.example.test"});
  spec.ips = {"192.0.2.1"};
  auto leaf = ca.issue(spec);
  std::string chain = ca.chain_pem(leaf);
  auto certs = der_blocks(chain);
  auto key = der_blocks(leaf.key_pem);
  REQUIRE(certs.size() >= 2);
  REQUIRE(key.size() == 1);

  std::mt19937 rng(20261125);
  int accepted = 0;
  for (int i = 0; i < 3000; ++i) {
    auto c = certs;
    auto k = key;
    int target = static_cast<int>(rng() % 3);
    if (target == 2) mutate(k[0], rng);
    else mutate(c[static_cast<size_t>(target)], rng);
    std::string chain_pem;
    for (const auto& d : c) chain_pem += pem_block("CERTIFICATE", d);
    std::string key_pem = pem_block("PRIVATE KEY", k[0]);
    for (auto mode : {LoadOptions::ChainCheck::deferred, LoadOptions::ChainCheck::at_load}) {
      LoadOptions o;
      o.chain_check = mode;
      auto cert = Certificate::from_pem(chain_pem, key_pem, o);
      if (!cert) continue;
      // A mutation that still loads must either be harmless (a byte the signature does not
      // cover, such as in the outer signature's unused bits) or fail its deferred check.
      if ((*cert)->verify()) ++accepted;
    }
  }
  // Almost every mutation breaks a signature or the structure: only a few may pass.
  CHECK(accepted < 300);
}

}  // TEST_SUITE
