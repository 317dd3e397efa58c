#pragma once

// Pure helpers of the frontend (no sockets, no threads), kept apart so unit tests reach them.

#include <sys/stat.h>

#include <cstddef>
#include <cstdint>
#include <ctime>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace autotls::server::detail {

// host_of returns the lower-cased host part of a Host header ("Example.COM:8443" ->
// "example.com", "[::1]:443" -> "::1", "[0:0::ABCD]" -> "::abcd": an IPv6 literal in its
// canonical RFC 5952 text), or nullopt when the value is empty, has characters no host name or
// IP literal contains (so it is safe to put into a Location header), or brackets no IPv6 address.
std::optional<std::string> host_of(std::string_view host_header);

// AbsoluteTarget is an absolute-form request target (RFC 9112 §3.2.2, "GET http://host/path
// HTTP/1.1", what a client sends to a proxy) taken apart: authority is what the URL names
// between "//" and the path ("host[:port]"; empty when it holds user info, which no host may),
// origin the origin-form target ("/path?query"; "/" when the URL has no path).
struct AbsoluteTarget {
  std::string authority;
  std::string origin;
};
// absolute_target takes target apart when it is absolute-form with the scheme http or https
// (in any case); nullopt for any other target.
std::optional<AbsoluteTarget> absolute_target(std::string_view target);

// redirect_location builds the https URL for a plain-HTTP request: the Host header's host,
// ":port" unless port is 443, then target (path and query, as received).
std::string redirect_location(std::string_view host, std::string_view target, int port);

// redirect_to_error is empty when to is a usable RedirectSite::to (config.h): an absolute
// "http://" or "https://" URL with a host, or a path beginning with "/", with no space, control
// character, '\\' or '#', and "{" only as part of "{uri}". Otherwise one line saying why.
std::string redirect_to_error(std::string_view to);

// redirect_site_location builds the Location of a RedirectSite answer: to with each "{uri}"
// replaced by target (the request target as received; "/" when it is not origin-form), and
// target appended when to is an absolute URL without a path. A result that would begin with
// "//" (a path-only to whose "{uri}" supplied a second slash) keeps one slash, so that it stays
// on this host instead of naming another.
std::string redirect_site_location(std::string_view to, std::string_view target);

// acme_challenge_token returns the token of "/.well-known/acme-challenge/<token>" when the
// token is non-empty base64url (RFC 8555 §8.3: "token ... MUST NOT contain any characters
// outside the base64url alphabet"), nullopt for any other path.
std::optional<std::string_view> acme_challenge_token(std::string_view path);

// content_type_for maps a file extension (case-insensitive) to a media type;
// "application/octet-stream" when unknown.
std::string_view content_type_for(const std::filesystem::path& file);

// StaticLookup is the outcome of resolving a URL path below a static root. add_slash: the path
// names a directory but does not end in '/'; the answer is a redirect to the path with one
// (as Caddy's and nginx's file servers do), so that the index file's relative links resolve
// inside the directory.
enum class StaticLookup { found, bad_request, not_found, add_slash };

// resolve_static maps an already URL-decoded path to a regular file below root, which MUST be
// canonical (std::filesystem::canonical). A NUL byte, a backslash or a "." / ".." segment is a
// bad_request; a file that resolves (through symlinks) outside root, or does not exist, or a
// file named with a trailing '/', is not_found; a directory resolves to its index file when
// the path ends in '/', else add_slash (not_found when index is empty).
StaticLookup resolve_static(const std::filesystem::path& root, std::string_view url_path,
                            std::string_view index, std::filesystem::path& out);

// FileValidators are a static file's validators (RFC 9110 §8.8): a strong entity tag made of
// its modification time (to the nanosecond) and size, as nginx makes its own, and its
// Last-Modified in whole seconds.
struct FileValidators {
  std::string etag;           // "\"<mtime s hex>.<mtime ns hex>-<size hex>\""
  std::string last_modified;  // IMF-fixdate
  std::time_t mtime = 0;      // whole seconds
};
FileValidators file_validators(const struct stat& st);

// Preconditions are the conditional fields of a GET or HEAD request (null: absent).
struct Preconditions {
  const std::string* if_match = nullptr;
  const std::string* if_none_match = nullptr;
  const std::string* if_modified_since = nullptr;
  const std::string* if_unmodified_since = nullptr;
};

// evaluate_preconditions applies RFC 9110 §13.2.2 to a GET or HEAD of a file that exists:
// If-Match (strong comparison) or else If-Unmodified-Since failing gives 412; then
// If-None-Match (weak comparison) or else If-Modified-Since holding gives 304; otherwise 200
// (serve it). A date that is not an HTTP-date is ignored, as the RFC asks.
int evaluate_preconditions(const Preconditions& p, const FileValidators& v);

// if_range_holds tells whether a Range request with this If-Range value may be served as a
// range (RFC 9110 §13.1.5): an entity tag that matches strongly, or a date equal to
// Last-Modified. Otherwise the whole file is sent (200).
bool if_range_holds(std::string_view if_range, const FileValidators& v);

// RangePlan is how a static file answers a Range field (RFC 9110 §14.2): whole (200, the
// field ignored), unsatisfiable (416 with "Content-Range: bytes */size"), or parts (206), each
// {first, last} with last < size.
struct RangePlan {
  enum class Kind { whole, unsatisfiable, parts };
  Kind kind = Kind::whole;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> parts;
};

// kMaxRanges bounds the parts of one answer.
inline constexpr std::size_t kMaxRanges = 100;

// plan_ranges reads a Range value for a file of size bytes. A unit other than bytes, a
// range-set that does not parse (first > last among them) and an empty file give whole; so do
// more than kMaxRanges parts, or parts whose lengths add up to more than the file (as Go's
// file server; before, 200 x "0-99999" of a 100 KB file answered 20 MB to 1.4 KB of
// request). Ends past the file are cut to it (httplib wrote "bytes 0-1000000/6" for a 6-byte
// file), a suffix range takes the file's last bytes, and a range starting past the end is
// dropped; none left: unsatisfiable.
RangePlan plan_ranges(std::string_view value, std::uint64_t size);

// Byteranges is the layout of a multipart/byteranges body (RFC 9110 §14.6) for parts of a
// file of size bytes: part i is heads[i] then the file's bytes parts[i], and tail ends the
// body; length is the whole body's. (httplib 0.11 wrote "Content-Range: bytes 0-1/0" in the
// parts of a file it streamed, so we lay out the body ourselves.)
struct Byteranges {
  std::vector<std::string> heads;
  std::string tail;
  std::uint64_t length = 0;
};
Byteranges byteranges_layout(const std::vector<std::pair<std::uint64_t, std::uint64_t>>& parts,
                             std::uint64_t size, std::string_view content_type,
                             std::string_view boundary);

// iequals compares two ASCII strings ignoring case (header field names).
bool iequals(std::string_view a, std::string_view b);

// has_token reports whether a comma-separated header value (Connection: keep-alive, close)
// holds token, ignoring case and the spaces around each element.
bool has_token(std::string_view value, std::string_view token);

// is_hop_by_hop reports whether a header field is connection-specific (RFC 9110 §7.6.1) and so
// must not be forwarded by a proxy, plus the ones we always set ourselves.
bool is_hop_by_hop(std::string_view name);

// header_end returns the offset just past the blank line that ends a request header in buf
// (CRLF CRLF, or a bare LF LF), or 0 when the header is not complete yet.
std::size_t header_end(std::string_view buf);

// HeadCheck is what check_request_head found in a complete request head.
struct HeadCheck {
  int status = 0;         // 0: acceptable; else 400, 501 or 505, to answer before closing
  std::string_view why;   // the fault in a few words (static text), for the answer's body
  bool rewrite = false;   // httplib must read normalize_request_head(head), not head
  // The body's framing, when acceptable: chunked (Transfer-Encoding), else content_length
  // bytes (0 without a Content-Length).
  bool chunked = false;
  std::uint64_t content_length = 0;
};

// check_request_head reads a complete request head (request line, field lines, the blank line:
// head as header_end delimits it) before anything else does, and refuses what would let two
// readers disagree on where the request ends or what it says (RFC 9112):
// - 400: a request line that is not "token SP target SP HTTP/d.d"; a field line that begins
//   with whitespace (obs-fold, §5.2), has no name, whitespace or another non-token character
//   in its name (§5.1), or a control character other than HT in its value (a bare CR
//   included); a second Host (§3.2); a second Content-Length, or one that is not 1*DIGIT
//   (up to 18 digits); Transfer-Encoding beside Content-Length, in an HTTP/1.0 request, or
//   whose final coding is not chunked, or with chunked twice (§6.1, §6.3).
// - 501: a transfer coding other than chunked before the final chunked (§6.1).
// - 505: a major version other than 1.
// rewrite is set for what is accepted but must reach httplib in another form (a Range field
// among them): normalize_request_head.
HeadCheck check_request_head(std::string_view head);

// kRangeField is the name a request's Range field has once normalized: httplib never sees a
// Range. It parsed one itself (a std::regex), answered 416 before any handler ran for one it
// could not parse (another unit, "0-1 ,2-3", a 20-digit number), even on a proxy site whose
// upstream was to answer it, and applied the ranges it parsed to every answer. Static files
// plan their own from this field (plan_ranges); the proxy forwards it as Range. (A client
// sending a field of this name is read as having sent a Range: nothing it could not do.)
inline constexpr std::string_view kRangeField = "X-Autotls-Range";

// normalize_request_head returns head (accepted by check_request_head) as httplib 0.11 must
// read it to see what the client sent: each '%' in a field value as "%25" (httplib URL-decodes
// field values, so "%0d%0a" in a value forwarded upstream became a line break there, and a
// Cookie's "%3D" an '='), each line ending in a bare LF with CRLF (§2.2 lets a recipient accept
// it), a version "HTTP/1.x" with x > 1 as "HTTP/1.1" (RFC 9110 §2.5: processed as the highest
// minor version implemented), and a Range field named kRangeField.
std::string normalize_request_head(std::string_view head);

// head_fault_response is the whole answer to a refused head: its status line, a text body
// with check.why, and Connection: close.
std::string head_fault_response(const HeadCheck& check);

// FastRequest is what serve_fast needs of a request head it can answer itself: GET or HEAD
// of a plain path (no query, no percent-encoding), HTTP/1.0 or 1.1, exactly one Host, at most
// one Connection, and none of the fields that change the answer (Range as sent or as
// kRangeField, Content-Length, Transfer-Encoding, Expect, and the conditional If-* fields;
// Accept-Encoding changes nothing: nothing is compressed). The views point into the head parsed.
struct FastRequest {
  std::string_view target, host, connection;  // host and connection: the field values
  bool head = false;                          // HEAD (else GET)
  bool http10 = false;
};

// parse_fast_request reads a complete request head (request line, fields, the blank line; the
// whole of head, as header_end delimits it) and returns the request when it is one of those,
// written so that httplib would read the same: every line ends in CRLF, no field line is
// longer than max_line (CRLF included), no field value is empty or holds '%'. Anything else
// gives nullopt, for httplib to answer.
std::optional<FastRequest> parse_fast_request(std::string_view head, std::size_t max_line);

// format_endpoint renders "0.0.0.0:443" or "[::]:443".
std::string format_endpoint(std::string_view address, int port);

}  // namespace autotls::server::detail
