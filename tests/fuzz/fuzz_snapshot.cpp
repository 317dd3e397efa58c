// libFuzzer target: the store snapshot reader (tlsreload/snapshot.h), which a start reads
// before anything else. Its checksum stops a torn or foreign file at the door, so this target
// first makes the header agree with the input (magic, version, sizes, SHA-256) and leaves the
// counts and the body as the input has them: what read_snapshot parses behind a valid checksum
// must fail cleanly too, never crash, over-read or over-allocate. tools/fuzz runs it.

#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>

#include <openssl/evp.h>

#include "tlsreload/snapshot.h"

using namespace autotls;

namespace {

constexpr std::size_t kHeaderSize = 72;  // tlsreload/snapshot.cpp
constexpr std::size_t kSummed = 40;

const std::filesystem::path& snapshot_path() {
  static const std::filesystem::path p = [] {
    static char dir[] = "/tmp/autotls-fuzz-snapshot-XXXXXX";
    if (!::mkdtemp(dir)) std::abort();
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
    });
    return std::filesystem::path(dir) / "store.snapshot";
  }();
  return p;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string file(reinterpret_cast<const char*>(data), size);
  if (file.size() >= kHeaderSize) {
    std::memcpy(file.data(), "ATLSSNAP", 8);
    const std::uint32_t version = tlsreload::kSnapshotFormatVersion, header = kHeaderSize;
    const std::uint64_t body = file.size() - kHeaderSize;
    std::memcpy(file.data() + 8, &version, 4);
    std::memcpy(file.data() + 12, &header, 4);
    std::memcpy(file.data() + 32, &body, 8);
    unsigned int len = 0;
    EVP_MD_CTX* md = EVP_MD_CTX_new();
    EVP_DigestInit_ex(md, EVP_sha256(), nullptr);
    EVP_DigestUpdate(md, file.data(), kSummed);
    EVP_DigestUpdate(md, file.data() + kHeaderSize, file.size() - kHeaderSize);
    EVP_DigestFinal_ex(md, reinterpret_cast<unsigned char*>(file.data() + kSummed), &len);
    EVP_MD_CTX_free(md);
  }
  const auto& path = snapshot_path();
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) std::abort();
  if (::write(fd, file.data(), file.size()) != static_cast<ssize_t>(file.size())) std::abort();
  ::close(fd);
  auto contents = tlsreload::read_snapshot(path, tlsreload::bulk_load_options(), true);
  if (contents) {
    contents->make_source_paths();
    for (const auto& c : contents->certificates) (void)c->names();
  }
  return 0;
}
