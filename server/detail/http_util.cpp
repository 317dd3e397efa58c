#include "server/detail/http_util.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <charconv>
#include <system_error>
#include <utility>

#include "acme/types.h"
#include "acme/util/http_date.h"

namespace autotls::server::detail {
namespace {

// ASCII only, inline (std::tolower is a call per byte and showed in the keep-alive profile); the
// same as std::tolower in the "C" locale the server runs in.
char lower(char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c; }

bool is_base64url(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_';
}

}  // namespace

namespace {
// next_etag takes the next entity-tag off a comma-separated If-Match / If-None-Match / If-Range
// list: its opaque tag (quotes included) and whether it was weak. False at the end of the list
// or on a malformed element (the rest of the list is then ignored).
bool next_etag(std::string_view& list, std::string_view& tag, bool& weak) {
  auto skip = [&] {
    while (!list.empty() && (list.front() == ' ' || list.front() == '\t' || list.front() == ',')) {
      list.remove_prefix(1);
    }
  };
  skip();
  weak = list.substr(0, 2) == "W/";
  if (weak) list.remove_prefix(2);
  if (list.empty() || list.front() != '"') return false;
  auto close = list.find('"', 1);
  if (close == std::string_view::npos) return false;
  tag = list.substr(0, close + 1);
  list.remove_prefix(close + 1);
  return true;
}

// etag_matches: does the list (or "*") hold etag (a strong tag)? Weak comparison ignores W/;
// strong comparison lets no weak tag match.
bool etag_matches(std::string_view list, std::string_view etag, bool weak_comparison) {
  auto t = list;
  while (!t.empty() && (t.front() == ' ' || t.front() == '\t')) t.remove_prefix(1);
  while (!t.empty() && (t.back() == ' ' || t.back() == '\t')) t.remove_suffix(1);
  if (t == "*") return true;
  std::string_view tag;
  bool weak = false;
  while (next_etag(list, tag, weak)) {
    if (tag == etag && (weak_comparison || !weak)) return true;
  }
  return false;
}
}  // namespace

FileValidators file_validators(const struct stat& st) {
  FileValidators v;
  v.mtime = st.st_mtim.tv_sec;
  v.last_modified = format_http_date(v.mtime);
  auto hex = [&](unsigned long long n) {
    char buf[16];
    auto r = std::to_chars(buf, buf + sizeof buf, n, 16);
    v.etag.append(buf, r.ptr);
  };
  v.etag.reserve(40);
  v.etag += '"';
  hex(static_cast<unsigned long long>(st.st_mtim.tv_sec));
  v.etag += '.';
  hex(static_cast<unsigned long long>(st.st_mtim.tv_nsec));
  v.etag += '-';
  hex(static_cast<unsigned long long>(st.st_size));
  v.etag += '"';
  return v;
}

int evaluate_preconditions(const Preconditions& p, const FileValidators& v) {
  if (p.if_match) {
    if (!etag_matches(*p.if_match, v.etag, false)) return 412;
  } else if (p.if_unmodified_since) {
    auto date = parse_http_date(*p.if_unmodified_since);
    if (date && v.mtime > *date) return 412;
  }
  if (p.if_none_match) {
    if (etag_matches(*p.if_none_match, v.etag, true)) return 304;
  } else if (p.if_modified_since) {
    auto date = parse_http_date(*p.if_modified_since);
    if (date && v.mtime <= *date) return 304;
  }
  return 200;
}

bool if_range_holds(std::string_view if_range, const FileValidators& v) {
  std::string_view list = if_range;
  std::string_view tag;
  bool weak = false;
  if (next_etag(list, tag, weak)) return !weak && tag == v.etag;
  auto date = parse_http_date(if_range);
  return date && *date == v.mtime;
}

std::optional<AbsoluteTarget> absolute_target(std::string_view target) {
  std::size_t scheme = 0;
  for (std::string_view s : {std::string_view("http://"), std::string_view("https://")}) {
    if (target.size() >= s.size() && iequals(target.substr(0, s.size()), s)) scheme = s.size();
  }
  if (scheme == 0) return std::nullopt;
  std::string_view rest = target.substr(scheme);
  std::size_t end = std::min(rest.find_first_of("/?#"), rest.size());
  AbsoluteTarget out;
  std::string_view authority = rest.substr(0, end);
  if (authority.find('@') == std::string_view::npos) out.authority = authority;
  std::string_view origin = rest.substr(end);
  origin = origin.substr(0, std::min(origin.find('#'), origin.size()));
  if (origin.empty() || origin.front() != '/') out.origin = "/";
  out.origin += origin;
  return out;
}

std::optional<std::string> host_of(std::string_view h) {
  if (h.empty()) return std::nullopt;
  std::string_view host = h;
  if (h.front() == '[') {
    auto close = h.find(']');
    if (close == std::string_view::npos) return std::nullopt;
    host = h.substr(1, close - 1);
    auto rest = h.substr(close + 1);
    if (!rest.empty() && rest.front() != ':') return std::nullopt;
    for (char c : host) {
      if (!std::isxdigit(static_cast<unsigned char>(c)) && c != ':' && c != '.') {
        return std::nullopt;
      }
    }
    // An IPv6 literal is one address however it is written: its canonical text (RFC 5952:
    // lower case, the longest run of zero groups as "::"), as sites and certificates name it.
    // Brackets hold an IPv6 address only: an IPv4 one has no ':' in its text.
    auto ip = acme::canonical_ip(host);
    if (!ip || ip->find(':') == std::string::npos) return std::nullopt;
    return ip;
  } else {
    auto colon = h.find(':');
    if (colon != std::string_view::npos) host = h.substr(0, colon);
    for (char c : host) {
      if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '.' && c != '_') {
        return std::nullopt;
      }
    }
  }
  if (auto colon = h.rfind(':'); colon != std::string_view::npos && h.front() != '[') {
    for (char c : h.substr(colon + 1)) {
      if (!std::isdigit(static_cast<unsigned char>(c))) return std::nullopt;
    }
  }
  if (host.empty()) return std::nullopt;
  std::string out(host);
  std::transform(out.begin(), out.end(), out.begin(), lower);
  // RFC 4343: a trailing dot names the same host. One only: "a.." ends in an empty label.
  if (out.size() > 1 && out.back() == '.') out.pop_back();
  if (out.size() > 1 && out.back() == '.') return std::nullopt;
  return out;
}

std::optional<FastRequest> parse_fast_request(std::string_view head, std::size_t max_line) {
  constexpr auto npos = std::string_view::npos;
  std::string_view h = head;
  std::size_t eol = h.find("\r\n");
  if (eol == npos) return std::nullopt;
  std::string_view line = h.substr(0, eol);
  bool is_head = false;
  if (line.starts_with("GET ")) {
    line.remove_prefix(4);
  } else if (line.starts_with("HEAD ")) {
    is_head = true;
    line.remove_prefix(5);
  } else {
    return std::nullopt;
  }
  std::size_t sp = line.find(' ');
  if (sp == npos) return std::nullopt;
  std::string_view target = line.substr(0, sp);
  std::string_view version = line.substr(sp + 1);
  bool http10 = version == "HTTP/1.0";
  if (!http10 && version != "HTTP/1.1") return std::nullopt;
  // httplib URL-decodes the path and splits off a query: only targets it keeps as they are.
  if (target.empty() || target.front() != '/' || target.size() > 2048) return std::nullopt;
  for (char ch : target) {
    if (ch <= ' ' || ch >= 0x7f || ch == '%' || ch == '?' || ch == '#' || ch == '\\') return std::nullopt;
  }
  std::string_view host_value, conn_value;
  bool have_host = false, have_conn = false;
  for (std::size_t pos = eol + 2;;) {
    std::size_t e = h.find('\n', pos);
    // Every line ends in CRLF (httplib skips a bare-LF line; leave those to it).
    if (e == npos || e == pos || h[e - 1] != '\r') return std::nullopt;
    // httplib refuses (400) a field line longer than its limit, CRLF included.
    if (e + 1 - pos > max_line) return std::nullopt;
    std::string_view field = h.substr(pos, e - 1 - pos);
    pos = e + 1;
    if (field.empty()) {
      if (pos != h.size()) return std::nullopt;
      break;
    }
    std::size_t colon = field.find(':');
    if (colon == npos || colon == 0) return std::nullopt;
    std::string_view name = field.substr(0, colon);
    std::string_view value = field.substr(colon + 1);
    while (!value.empty() && (value.front() == ' ' || value.front() == '\t')) value.remove_prefix(1);
    while (!value.empty() && (value.back() == ' ' || value.back() == '\t')) value.remove_suffix(1);
    // httplib drops a field with an empty value and URL-decodes values.
    if (value.empty() || value.find('%') != npos) return std::nullopt;
    if (iequals(name, "host")) {
      if (have_host) return std::nullopt;
      have_host = true;
      host_value = value;
    } else if (iequals(name, "connection")) {
      if (have_conn) return std::nullopt;
      have_conn = true;
      conn_value = value;
    } else if (iequals(name, "range") || iequals(name, kRangeField) ||
               iequals(name, "content-length") ||
               iequals(name, "transfer-encoding") || iequals(name, "expect") ||
               (name.size() > 3 && iequals(name.substr(0, 3), "if-"))) {
      return std::nullopt;
    }
  }
  if (!have_host) return std::nullopt;
  FastRequest out;
  out.target = target;
  out.host = host_value;
  out.connection = conn_value;
  out.head = is_head;
  out.http10 = http10;
  return out;
}

std::string redirect_location(std::string_view host, std::string_view target, int port) {
  std::string url = "https://";
  bool v6 = host.find(':') != std::string_view::npos;
  if (v6) url += '[';
  url += host;
  if (v6) url += ']';
  if (port != 443) url += ":" + std::to_string(port);
  if (target.empty() || target.front() != '/') url += '/';
  url += target;
  return url;
}

namespace {
constexpr std::string_view kUriPlaceholder = "{uri}";

// origin_end returns where the path of an absolute http(s) URL begins (its length when it has
// none), or npos when to is not one.
std::size_t origin_end(std::string_view to) {
  std::size_t scheme = 0;
  if (to.substr(0, 7) == "http://") scheme = 7;
  else if (to.substr(0, 8) == "https://") scheme = 8;
  else return std::string_view::npos;
  std::size_t end = to.find_first_of("/?{", scheme);
  return end == std::string_view::npos ? to.size() : end;
}
}  // namespace

std::string redirect_to_error(std::string_view to) {
  auto quoted = "redirect \"" + std::string(to) + "\": ";
  if (to.empty()) return "redirect: expected a URL or a path, got an empty string";
  for (std::size_t i = 0; i < to.size(); ++i) {
    auto c = static_cast<unsigned char>(to[i]);
    if (c <= 0x20 || c == 0x7f || c == '\\' || c == '#' || c == '"' || c == '<' || c == '>') {
      return quoted + "spaces, control characters, quotes, '<', '>', '\\' and '#' are not allowed";
    }
    if (c == '{') {
      if (to.substr(i, kUriPlaceholder.size()) != kUriPlaceholder) {
        return quoted + "'{' only as part of {uri}";
      }
      i += kUriPlaceholder.size() - 1;
    } else if (c == '}') {
      return quoted + "'}' only as part of {uri}";
    }
  }
  if (to.front() == '/') {
    if (to.size() > 1 && to[1] == '/') {
      return quoted + "a path must not begin with \"//\" (that names another host)";
    }
    return {};
  }
  std::size_t end = origin_end(to);
  if (end == std::string_view::npos) {
    return quoted + "expected an http:// or https:// URL, or a path beginning with /";
  }
  std::size_t start = to.find("//") + 2;
  auto authority = to.substr(start, end - start);
  if (authority.empty() || authority.front() == ':') return quoted + "no host";
  bool ok = std::all_of(authority.begin(), authority.end(), [](char ch) {
    return std::isalnum(static_cast<unsigned char>(ch)) || ch == '.' || ch == '-' || ch == ':' ||
           ch == '[' || ch == ']' || ch == '_';
  });
  if (!ok) return quoted + "the host part holds characters no host name, address or port has";
  return {};
}

std::string redirect_site_location(std::string_view to, std::string_view target) {
  if (target.empty() || target.front() != '/') target = "/";
  std::string out;
  out.reserve(to.size() + target.size());
  bool substituted = false;
  for (std::size_t i = 0; i < to.size();) {
    if (to.substr(i, kUriPlaceholder.size()) == kUriPlaceholder) {
      out += target;
      i += kUriPlaceholder.size();
      substituted = true;
    } else {
      out += to[i++];
    }
  }
  if (!substituted && to.front() != '/' && origin_end(to) == to.size()) out += target;
  if (out.size() > 1 && out[0] == '/' && out[1] == '/') {
    auto k = out.find_first_not_of('/');
    out.erase(0, (k == std::string::npos ? out.size() : k) - 1);
  }
  return out;
}

std::optional<std::string_view> acme_challenge_token(std::string_view path) {
  constexpr std::string_view kPrefix = "/.well-known/acme-challenge/";
  if (path.substr(0, kPrefix.size()) != kPrefix) return std::nullopt;
  auto token = path.substr(kPrefix.size());
  if (token.empty() || !std::all_of(token.begin(), token.end(), is_base64url)) {
    return std::nullopt;
  }
  return token;
}

std::string_view content_type_for(const std::filesystem::path& file) {
  static constexpr std::array<std::pair<std::string_view, std::string_view>, 30> kTypes = {{
      {".html", "text/html; charset=utf-8"},
      {".htm", "text/html; charset=utf-8"},
      {".css", "text/css; charset=utf-8"},
      {".js", "text/javascript; charset=utf-8"},
      {".mjs", "text/javascript; charset=utf-8"},
      {".json", "application/json"},
      {".map", "application/json"},
      {".txt", "text/plain; charset=utf-8"},
      {".csv", "text/csv; charset=utf-8"},
      {".xml", "application/xml"},
      {".svg", "image/svg+xml"},
      {".png", "image/png"},
      {".jpg", "image/jpeg"},
      {".jpeg", "image/jpeg"},
      {".gif", "image/gif"},
      {".webp", "image/webp"},
      {".avif", "image/avif"},
      {".ico", "image/x-icon"},
      {".wasm", "application/wasm"},
      {".pdf", "application/pdf"},
      {".zip", "application/zip"},
      {".gz", "application/gzip"},
      {".woff", "font/woff"},
      {".woff2", "font/woff2"},
      {".ttf", "font/ttf"},
      {".otf", "font/otf"},
      {".mp4", "video/mp4"},
      {".webm", "video/webm"},
      {".mp3", "audio/mpeg"},
      {".ogg", "audio/ogg"},
  }};
  std::string ext = file.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), lower);
  for (const auto& [e, type] : kTypes) {
    if (e == ext) return type;
  }
  return "application/octet-stream";
}

StaticLookup resolve_static(const std::filesystem::path& root, std::string_view url_path,
                            std::string_view index, std::filesystem::path& out) {
  namespace fs = std::filesystem;
  if (url_path.empty() || url_path.front() != '/') return StaticLookup::bad_request;
  if (url_path.find('\0') != std::string_view::npos ||
      url_path.find('\\') != std::string_view::npos) {
    return StaticLookup::bad_request;
  }
  // Refuse dot segments outright rather than normalizing them: no legitimate client sends them
  // (RFC 3986 §5.2.4 has clients remove them), so they are probes.
  fs::path rel;
  std::size_t pos = 1;
  while (pos <= url_path.size()) {
    auto slash = url_path.find('/', pos);
    if (slash == std::string_view::npos) slash = url_path.size();
    auto seg = url_path.substr(pos, slash - pos);
    if (seg == "." || seg == "..") return StaticLookup::bad_request;
    if (!seg.empty()) rel /= std::string(seg);
    pos = slash + 1;
  }
  std::error_code ec;
  fs::path candidate = fs::canonical(root / rel, ec);
  if (ec) return StaticLookup::not_found;
  // The check that matters: symlinks may point anywhere, so compare the resolved path
  // component by component with the root.
  auto [root_end, cand_it] = std::mismatch(root.begin(), root.end(), candidate.begin(),
                                           candidate.end());
  if (root_end != root.end()) return StaticLookup::not_found;
  bool slash_last = url_path.back() == '/';
  if (fs::is_directory(candidate, ec)) {
    if (index.empty()) return StaticLookup::not_found;
    if (!slash_last) return StaticLookup::add_slash;
    slash_last = false;  // the index file's name has none
    fs::path idx = fs::canonical(candidate / std::string(index), ec);
    if (ec) return StaticLookup::not_found;
    auto [r2, c2] = std::mismatch(root.begin(), root.end(), idx.begin(), idx.end());
    if (r2 != root.end()) return StaticLookup::not_found;
    candidate = std::move(idx);
  }
  if (!fs::is_regular_file(candidate, ec) || slash_last) return StaticLookup::not_found;
  out = std::move(candidate);
  return StaticLookup::found;
}

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() &&
         std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) { return lower(x) == lower(y); });
}

bool has_token(std::string_view value, std::string_view token) {
  while (!value.empty()) {
    auto comma = value.find(',');
    auto item = value.substr(0, comma);
    while (!item.empty() && (item.front() == ' ' || item.front() == '\t')) item.remove_prefix(1);
    while (!item.empty() && (item.back() == ' ' || item.back() == '\t')) item.remove_suffix(1);
    if (iequals(item, token)) return true;
    if (comma == std::string_view::npos) break;
    value.remove_prefix(comma + 1);
  }
  return false;
}

bool is_hop_by_hop(std::string_view name) {
  static constexpr std::array<std::string_view, 16> kHop = {
      "connection",        "keep-alive",       "proxy-connection", "proxy-authenticate",
      "proxy-authorization", "te",             "trailer",          "transfer-encoding",
      "upgrade",           "content-length",   "remote_addr",      "remote_port",
      "local_addr",        "local_port",       "x-forwarded-for",  "x-forwarded-proto",
  };
  std::string n(name);
  std::transform(n.begin(), n.end(), n.begin(), lower);
  if (n == "x-forwarded-host") return true;
  return std::find(kHop.begin(), kHop.end(), n) != kHop.end();
}

std::size_t header_end(std::string_view buf) {
  for (std::size_t i = 0; i < buf.size(); ++i) {
    if (buf[i] != '\n') continue;
    // "\n\n" or "\n\r\n" ends the header.
    if (i + 1 < buf.size() && buf[i + 1] == '\n') return i + 2;
    if (i + 2 < buf.size() && buf[i + 1] == '\r' && buf[i + 2] == '\n') return i + 3;
  }
  return 0;
}

namespace {
struct HeadChars {
  bool tchar[256] = {};      // RFC 9110 §5.6.2 token characters
  bool value_bad[256] = {};  // control characters other than HT (CR and LF included), DEL
};
constexpr HeadChars make_head_chars() {
  HeadChars t;
  for (int c = 0; c < 256; ++c) {
    t.tchar[c] = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
    t.value_bad[c] = (c < 0x20 && c != '\t') || c == 0x7f;
  }
  for (char c : std::string_view("!#$%&'*+-.^_`|~")) t.tchar[static_cast<unsigned char>(c)] = true;
  return t;
}
constexpr HeadChars kHeadChars = make_head_chars();

bool all_tchar(std::string_view s) {
  for (char c : s) {
    if (!kHeadChars.tchar[static_cast<unsigned char>(c)]) return false;
  }
  return !s.empty();
}

std::string_view trim_ows(std::string_view v) {
  while (!v.empty() && (v.front() == ' ' || v.front() == '\t')) v.remove_prefix(1);
  while (!v.empty() && (v.back() == ' ' || v.back() == '\t')) v.remove_suffix(1);
  return v;
}

// next_head_line takes the line at pos off head (its CR, if any, dropped); bare tells whether
// it ended in LF alone. False when no LF is left.
bool next_head_line(std::string_view head, std::size_t& pos, std::string_view& line, bool& bare) {
  std::size_t e = head.find('\n', pos);
  if (e == std::string_view::npos) return false;
  line = head.substr(pos, e - pos);
  pos = e + 1;
  bare = line.empty() || line.back() != '\r';
  if (!bare) line.remove_suffix(1);
  return true;
}
}  // namespace

HeadCheck check_request_head(std::string_view head) {
  HeadCheck r;
  auto fault = [&r](int status, std::string_view why) {
    r.status = status;
    r.why = why;
    r.rewrite = false;
    return r;
  };
  std::size_t pos = 0;
  std::string_view line;
  bool bare = false;
  if (!next_head_line(head, pos, line, bare)) return fault(400, "incomplete request head");
  r.rewrite = bare;
  // method SP request-target SP HTTP-version, one space each (a target holds no space).
  std::size_t sp1 = line.find(' ');
  std::size_t sp2 = line.rfind(' ');
  if (sp1 == std::string_view::npos || sp1 == sp2 || !all_tchar(line.substr(0, sp1))) {
    return fault(400, "bad request line");
  }
  std::string_view target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  if (target.empty()) return fault(400, "bad request line");
  for (char c : target) {
    if (static_cast<unsigned char>(c) <= ' ' || c == 0x7f) return fault(400, "bad request line");
  }
  std::string_view version = line.substr(sp2 + 1);
  auto digit = [](char c) { return c >= '0' && c <= '9'; };
  if (version.size() != 8 || version.substr(0, 5) != "HTTP/" || !digit(version[5]) ||
      version[6] != '.' || !digit(version[7])) {
    return fault(400, "bad request line");
  }
  if (version[5] != '1') return fault(505, "HTTP version not supported");
  const bool http10 = version[7] == '0';
  if (version[7] > '1') r.rewrite = true;

  int hosts = 0, lengths = 0;
  bool te = false, te_chunked_last = false;
  int te_codings = 0, te_chunked = 0;
  while (next_head_line(head, pos, line, bare)) {
    if (bare) r.rewrite = true;
    if (line.empty()) break;
    if (line.front() == ' ' || line.front() == '\t') {
      return fault(400, "field line begins with whitespace (obs-fold)");
    }
    std::size_t colon = line.find(':');
    if (colon == std::string_view::npos || colon == 0) return fault(400, "field line without a name");
    std::string_view name = line.substr(0, colon);
    if (!all_tchar(name)) return fault(400, "bad field name");
    std::string_view value = line.substr(colon + 1);
    for (char c : value) {
      if (kHeadChars.value_bad[static_cast<unsigned char>(c)]) {
        return fault(400, "control character in a field value");
      }
      if (c == '%') r.rewrite = true;
    }
    value = trim_ows(value);
    if (iequals(name, "range")) r.rewrite = true;
    if (iequals(name, "host")) {
      if (++hosts > 1) return fault(400, "more than one Host field");
    } else if (iequals(name, "content-length")) {
      if (++lengths > 1) return fault(400, "more than one Content-Length field");
      if (value.empty() || value.size() > 18 ||
          !std::all_of(value.begin(), value.end(), digit)) {
        return fault(400, "bad Content-Length");
      }
      std::from_chars(value.data(), value.data() + value.size(), r.content_length);
    } else if (iequals(name, "transfer-encoding")) {
      te = true;
      while (!value.empty()) {
        std::size_t comma = value.find(',');
        std::string_view coding = trim_ows(value.substr(0, comma));
        value = comma == std::string_view::npos ? std::string_view() : value.substr(comma + 1);
        if (coding.empty()) continue;
        ++te_codings;
        te_chunked_last = iequals(coding, "chunked");
        if (te_chunked_last) ++te_chunked;
      }
    }
  }
  if (te) {
    if (http10) return fault(400, "Transfer-Encoding in an HTTP/1.0 request");
    if (lengths > 0) return fault(400, "both Content-Length and Transfer-Encoding");
    if (!te_chunked_last || te_chunked > 1) {
      return fault(400, "chunked is not the final transfer coding, once");
    }
    if (te_codings > 1) return fault(501, "transfer coding not implemented");
    r.chunked = true;
  }
  return r;
}

std::string normalize_request_head(std::string_view head) {
  std::string out;
  out.reserve(head.size() + 32);
  std::size_t pos = 0;
  std::string_view line;
  bool bare = false;
  if (!next_head_line(head, pos, line, bare)) return std::string(head);
  out.append(line);
  // "HTTP/1.x": the last character is the minor version.
  if (!out.empty() && out.back() > '1' && out.back() <= '9') out.back() = '1';
  out.append("\r\n");
  while (next_head_line(head, pos, line, bare)) {
    if (line.empty()) break;
    std::size_t colon = line.find(':');
    if (iequals(line.substr(0, colon), "range")) {
      out.append(kRangeField).append(":");
    } else {
      out.append(line.substr(0, colon + 1));
    }
    for (char c : line.substr(colon + 1)) {
      if (c == '%') {
        out.append("%25");
      } else {
        out.push_back(c);
      }
    }
    out.append("\r\n");
  }
  out.append("\r\n");
  return out;
}

std::string head_fault_response(const HeadCheck& check) {
  std::string_view reason = check.status == 505   ? "HTTP Version Not Supported"
                            : check.status == 501 ? "Not Implemented"
                                                  : "Bad Request";
  std::string body = std::string(check.why) + "\n";
  std::string out = "HTTP/1.1 " + std::to_string(check.status) + " ";
  out.append(reason)
      .append("\r\nContent-Type: text/plain\r\nContent-Length: ")
      .append(std::to_string(body.size()))
      .append("\r\nConnection: close\r\n\r\n")
      .append(body);
  return out;
}

RangePlan plan_ranges(std::string_view value, std::uint64_t size) {
  RangePlan plan;
  auto whole = [] { return RangePlan{}; };
  value = trim_ows(value);
  if (value.size() < 6 || !iequals(value.substr(0, 6), "bytes=") || size == 0) return whole();
  value.remove_prefix(6);
  // A number of up to 18 digits (more: not a length any file has; read as such a length).
  auto number = [](std::string_view s, std::uint64_t& n) {
    if (s.empty()) return false;
    n = 0;
    for (char c : s) {
      if (c < '0' || c > '9') return false;
      if (n < 1'000'000'000'000'000'000ULL) n = n * 10 + static_cast<std::uint64_t>(c - '0');
    }
    return true;
  };
  std::uint64_t total = 0;
  std::size_t specs = 0;
  while (!value.empty()) {
    std::size_t comma = value.find(',');
    std::string_view spec = trim_ows(value.substr(0, comma));
    value = comma == std::string_view::npos ? std::string_view() : value.substr(comma + 1);
    if (spec.empty()) continue;  // "1#" lists may hold empty elements
    ++specs;
    std::size_t dash = spec.find('-');
    if (dash == std::string_view::npos) return whole();
    std::uint64_t first = 0, last = 0;
    if (dash == 0) {
      // suffix-range: the last N bytes
      if (!number(spec.substr(1), last)) return whole();
      if (last == 0) continue;  // unsatisfiable
      first = last >= size ? 0 : size - last;
      last = size - 1;
    } else {
      if (!number(spec.substr(0, dash), first)) return whole();
      std::string_view end = spec.substr(dash + 1);
      if (end.empty()) {
        last = size - 1;
      } else if (!number(end, last) || last < first) {
        return whole();
      }
      if (first >= size) continue;  // unsatisfiable
      last = std::min(last, size - 1);
    }
    total += last - first + 1;
    if (plan.parts.size() == kMaxRanges || total > size) return whole();
    plan.parts.emplace_back(first, last);
  }
  if (specs == 0) return whole();
  plan.kind = plan.parts.empty() ? RangePlan::Kind::unsatisfiable : RangePlan::Kind::parts;
  return plan;
}

Byteranges byteranges_layout(const std::vector<std::pair<std::uint64_t, std::uint64_t>>& parts,
                             std::uint64_t size, std::string_view content_type,
                             std::string_view boundary) {
  Byteranges b;
  for (const auto& [first, last] : parts) {
    // The CRLF before a delimiter belongs to it (RFC 2046 §5.1.1).
    std::string head = b.heads.empty() ? "--" : "\r\n--";
    head.append(boundary).append("\r\nContent-Type: ").append(content_type);
    head.append("\r\nContent-Range: bytes ").append(std::to_string(first)).append("-");
    head.append(std::to_string(last)).append("/").append(std::to_string(size)).append("\r\n\r\n");
    b.length += head.size() + (last - first + 1);
    b.heads.push_back(std::move(head));
  }
  b.tail.append("\r\n--").append(boundary).append("--\r\n");
  b.length += b.tail.size();
  return b;
}

std::string format_endpoint(std::string_view address, int port) {
  if (address.find(':') != std::string_view::npos) {
    return "[" + std::string(address) + "]:" + std::to_string(port);
  }
  return std::string(address) + ":" + std::to_string(port);
}

}  // namespace autotls::server::detail
