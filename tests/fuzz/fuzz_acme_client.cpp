// libFuzzer target: the ACME client against a CA whose replies are corrupted. A FakeAcmeServer
// (tests/support/fake_acme.h) answers every request as a real CA would; the fuzz input then
// decides, reply by reply, whether to pass it on or to change its status, a header (Location,
// Link, Replay-Nonce, Retry-After, Content-Type), its body (replaced, truncated, bytes
// overwritten or inserted), or to fail the request at the transport. The client runs the
// whole path: directory, nonce, account, order, authorizations, challenge, polls, finalize,
// download, then ARI. Any reply may give an error; none may crash the client, hang it (the
// clock is fake: waits cost nothing, and the poll deadline ends every loop) or trip ASan or
// UBSan. tools/fuzz runs it.

#include <fuzzer/FuzzedDataProvider.h>
#include <strings.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "acme/client.h"
#include "acme/jws.h"
#include "acme/key.h"
#include "tests/support/fake_acme.h"
#include "tests/support/fake_clock.h"

using namespace autotls;

namespace {

struct NullSolver : acme::Solver {
  Status present(const acme::Identifier&, const acme::Challenge&, std::string_view) override { return {}; }
  void cleanup(const acme::Identifier&, const acme::Challenge&, std::string_view) override {}
};

// FuzzTransport passes each request to the fake CA and then lets the input change its reply.
class FuzzTransport : public acme::HttpTransport {
 public:
  FuzzTransport(std::shared_ptr<testing::FakeAcmeServer> ca, FuzzedDataProvider& in) : ca_(std::move(ca)), in_(in) {}

  Result<acme::HttpResponse> send(const acme::HttpRequest& request) override {
    acme::HttpResponse r = ca_->handle(request);
    if (in_.remaining_bytes() == 0) return r;
    const auto mode = in_.ConsumeIntegral<std::uint8_t>();
    if (mode < 96) return r;  // most replies pass untouched, so the path goes deep
    switch (mode % 8) {
      case 0: r.body = in_.ConsumeRandomLengthString(4096); break;
      case 1: r.status = in_.ConsumeIntegralInRange<int>(0, 999); break;
      case 2: {
        static const char* const kNames[] = {"Location", "Link", "Replay-Nonce", "Retry-After", "Content-Type"};
        std::string name = kNames[in_.ConsumeIntegralInRange<int>(0, 4)];
        std::string value = in_.ConsumeRandomLengthString(256);
        bool replaced = false;
        for (auto& [k, v] : r.headers) {
          if (!replaced && strcasecmp(k.c_str(), name.c_str()) == 0) {
            v = value;
            replaced = true;
          }
        }
        if (!replaced || in_.ConsumeBool()) r.headers.emplace_back(name, value);
        break;
      }
      case 3: {
        for (int n = in_.ConsumeIntegralInRange<int>(1, 8); n > 0 && !r.body.empty(); --n) {
          r.body[in_.ConsumeIntegralInRange<std::size_t>(0, r.body.size() - 1)] = static_cast<char>(in_.ConsumeIntegral<std::uint8_t>());
        }
        break;
      }
      case 4: r.body.resize(in_.ConsumeIntegralInRange<std::size_t>(0, r.body.size())); break;
      case 5: {
        std::size_t at = in_.ConsumeIntegralInRange<std::size_t>(0, r.body.size());
        r.body.insert(at, in_.ConsumeRandomLengthString(512));
        break;
      }
      case 6: r.headers.clear(); break;
      case 7: return tl::unexpected(Error(Errc::transport, "connection reset (fuzz)"));
    }
    return r;
  }

 private:
  std::shared_ptr<testing::FakeAcmeServer> ca_;
  FuzzedDataProvider& in_;
};

// Made once: a CA (its key and root), the account key and the certificate key.
struct Shared {
  std::shared_ptr<testing::FakeAcmeServer> ca;
  std::shared_ptr<const acme::Signer> account;
  acme::PrivateKey cert_key;
};

Shared& shared() {
  static Shared* s = [] {
    testing::FakeAcmeServer::Options o;
    o.profiles = {{"classic", "the usual"}, {"shortlived", "six days"}};
    o.poll_retry_after = 1;
    auto* out = new Shared{std::make_shared<testing::FakeAcmeServer>(o), nullptr,
                           std::move(*acme::PrivateKey::generate(acme::KeyType::ec256))};
    out->account = std::make_shared<acme::KeySigner>(std::move(*acme::PrivateKey::generate(acme::KeyType::ec256)));
    return out;
  }();
  return *s;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Shared& s = shared();
  FuzzedDataProvider in(data, size);
  testing::FakeClock clock;
  acme::ClientOptions opts;
  opts.directory_url = s.ca->directory_url();
  opts.transport = std::make_shared<FuzzTransport>(s.ca, in);
  opts.clock = &clock;
  auto client = acme::Client::create(opts);
  if (!client) return 0;
  (*client)->set_account(s.account);
  if (!(*client)->register_account({{"mailto:fuzz@example.test"}, true, std::nullopt})) return 0;
  acme::ObtainRequest req;
  req.identifiers = {{"dns", "a.fuzz.test"}, {"ip", "192.0.2.7"}};
  req.key = s.cert_key;
  req.profile = "classic";
  NullSolver solver;
  (void)acme::obtain(**client, req, solver);
  (void)(*client)->renewal_info("aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE");
  return 0;
}
