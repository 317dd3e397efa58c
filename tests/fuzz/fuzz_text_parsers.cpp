// libFuzzer target: the parsers of text that comes from a peer or a file: an ACME problem
// document, Retry-After, ARI renewal info, RFC 3339 times, Link headers and PEM chains from a
// CA's reply; the Host header, the request target, the header block of an HTTP request (its
// end, and check_request_head / normalize_request_head on it) and
// the request head the server answers without httplib (parse_fast_request); HTTP-dates and
// the conditional request fields and Range values of static files.
// The first byte picks the parser, the rest is its input. No input may crash one or read
// outside it (ASan, UBSan). tools/fuzz runs it.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "acme/ari.h"
#include "acme/client.h"
#include "acme/key.h"
#include "acme/problem.h"
#include "acme/types.h"
#include "acme/util/http_date.h"
#include "server/detail/http_util.h"

using namespace autotls;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::uint8_t which = data[0];
  // A heap copy of exactly the input, so ASan sees a read one byte past it.
  std::string text(reinterpret_cast<const char*>(data + 1), size - 1);
  std::string_view in(text);
  const auto now = std::chrono::system_clock::time_point(std::chrono::seconds(1'800'000'000));
  switch (which % 14) {
    case 0: {
      auto p = acme::parse_problem(in, 400);
      if (p) (void)acme::describe(*p);
      break;
    }
    case 1: (void)acme::parse_retry_after(in, now); break;
    case 2: (void)acme::parse_renewal_info(in); break;
    case 3: (void)acme::parse_rfc3339(in); break;
    case 4: {
      // Each line a Link header value.
      acme::HttpResponse r;
      r.status = 200;
      std::size_t pos = 0;
      while (pos <= text.size()) {
        std::size_t e = text.find('\n', pos);
        if (e == std::string::npos) e = text.size();
        r.headers.emplace_back("Link", text.substr(pos, e - pos));
        pos = e + 1;
      }
      (void)acme::parse_link_headers(r, "up");
      (void)acme::parse_link_headers(r, "alternate");
      break;
    }
    case 5: (void)acme::split_pem_chain(in); break;
    case 6: {
      // What it yields is a key sites are looked up by: read again (an IPv6 one in brackets)
      // it is itself, and an address is in its canonical text.
      auto h = server::detail::host_of(in);
      if (!h) break;
      const bool v6 = h->find(':') != std::string::npos;
      if (server::detail::host_of(v6 ? "[" + *h + "]" : *h) != h) __builtin_trap();
      if (auto ip = acme::canonical_ip(*h); ip && *ip != *h && v6) __builtin_trap();
      break;
    }
    case 7: {
      (void)server::detail::acme_challenge_token(in);
      // An absolute-form target becomes an origin-form one (a path the static lookup and a
      // redirect's {uri} take) and an authority with nothing of the path or user info in it.
      if (auto t = server::detail::absolute_target(in)) {
        if (t->origin.empty() || t->origin.front() != '/' || t->origin.find('#') != std::string::npos ||
            t->authority.find_first_of("/?#@") != std::string::npos) {
          __builtin_trap();
        }
      }
      break;
    }
    case 8: {
      // A head the server takes is still taken once normalized, with every line ending in
      // CRLF and every '%' of a field value written as "%25" (httplib decodes it back to the
      // '%' sent); a refused one says why, with one of the three statuses.
      std::size_t end = server::detail::header_end(in);
      if (end == 0) break;
      std::string_view head = in.substr(0, end);
      auto check = server::detail::check_request_head(head);
      if (check.status != 0) {
        if (check.why.empty() || check.rewrite ||
            (check.status != 400 && check.status != 501 && check.status != 505)) {
          __builtin_trap();
        }
        break;
      }
      std::string n = server::detail::normalize_request_head(head);
      if (server::detail::check_request_head(n).status != 0 ||
          server::detail::header_end(n) != n.size()) {
        __builtin_trap();
      }
      bool request_line = true;
      for (std::size_t at = 0; at < n.size();) {
        std::size_t eol = n.find('\n', at);
        if (eol == std::string::npos || eol == at || n[eol - 1] != '\r') __builtin_trap();
        std::string_view line(n.data() + at, eol - 1 - at);
        at = eol + 1;
        if (request_line) {
          request_line = false;
          continue;
        }
        // httplib never sees a Range field (kRangeField instead).
        if (server::detail::iequals(line.substr(0, line.find(':')), "range")) __builtin_trap();
        std::string_view value = line.substr(line.find(':') + 1);
        for (std::size_t i = value.find('%'); i != std::string_view::npos; i = value.find('%', i + 1)) {
          if (value.substr(i, 3) != "%25") __builtin_trap();
        }
      }
      break;
    }
    case 9: {
      std::size_t cut = in.find('\n');
      std::string_view a = in.substr(0, cut), b = cut == std::string_view::npos ? "" : in.substr(cut + 1);
      (void)server::detail::has_token(a, b);
      (void)server::detail::redirect_location(a, b, 8443);
      // A redirect site's Location: a path stays a path on this host (never "//host"); a URL
      // keeps the scheme and host it was given.
      if (server::detail::redirect_to_error(a).empty()) {
        auto loc = server::detail::redirect_site_location(a, b);
        if (loc.empty()) __builtin_trap();
        if (a.front() == '/' && (loc.front() != '/' || loc.starts_with("//"))) __builtin_trap();
        auto origin = a.substr(0, a.find_first_of("/?{", a.find("//") + 2));
        if (a.front() != '/' && !loc.starts_with(origin)) __builtin_trap();
      }
      break;
    }
    case 10: (void)acme::parse_key_type(in); break;
    case 11: {
      acme::HttpResponse r;
      r.status = 429;
      r.headers.emplace_back("Content-Type", "application/problem+json");
      std::size_t cut = in.find('\n');
      r.headers.emplace_back("Retry-After", std::string(in.substr(0, cut)));
      r.body = cut == std::string_view::npos ? "" : std::string(in.substr(cut + 1));
      (void)acme::error_from_response("fuzz", r, now);
      break;
    }
    case 12: {
      // What it accepts, the server answers itself: the views must lie inside the head, the
      // target be an origin-form path, the head end with its blank line.
      auto r = server::detail::parse_fast_request(in, 8192);
      if (!r) break;
      auto inside = [&](std::string_view v) {
        return v.empty() || (v.data() >= in.data() && v.data() + v.size() <= in.data() + in.size());
      };
      if (!inside(r->target) || !inside(r->host) || !inside(r->connection) || r->host.empty() ||
          r->target.empty() || r->target.front() != '/' || !in.ends_with("\r\n\r\n") ||
          r->target.find_first_of("?%#\\ ") != std::string_view::npos) {
        __builtin_trap();
      }
      break;
    }
    case 13: {
      // A date it reads, written again, reads as the same instant; any text as any of the
      // conditional fields decides without crashing.
      if (auto t = parse_http_date(in)) {
        if (parse_http_date(format_http_date(*t)) != t) __builtin_trap();
      }
      struct stat st {};
      st.st_mtim.tv_sec = 784111777;
      st.st_size = 10;
      auto v = server::detail::file_validators(st);
      (void)server::detail::evaluate_preconditions({&text, nullptr, nullptr, &text}, v);
      (void)server::detail::evaluate_preconditions({nullptr, &text, &text, nullptr}, v);
      (void)server::detail::if_range_holds(in, v);
      // As a Range value for files of a few sizes: parts inside the file, in number and in
      // bytes no more than it; the multipart body's length is what its layout holds.
      for (std::uint64_t size : {std::uint64_t{0}, std::uint64_t{1}, std::uint64_t{10}, std::uint64_t{100'000}}) {
        auto plan = server::detail::plan_ranges(in, size);
        std::uint64_t total = 0;
        for (auto [first, last] : plan.parts) {
          if (first > last || last >= size) __builtin_trap();
          total += last - first + 1;
        }
        if (total > size || plan.parts.size() > server::detail::kMaxRanges ||
            (plan.kind == server::detail::RangePlan::Kind::parts) == plan.parts.empty()) {
          __builtin_trap();
        }
        auto layout = server::detail::byteranges_layout(plan.parts, size, "text/plain", "b");
        std::uint64_t length = layout.tail.size() + total;
        for (const auto& h : layout.heads) length += h.size();
        if (layout.heads.size() != plan.parts.size() || layout.length != length) __builtin_trap();
      }
      break;
    }
  }
  return 0;
}
