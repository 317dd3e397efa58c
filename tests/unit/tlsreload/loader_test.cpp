#include <doctest/doctest.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <thread>

#include <fcntl.h>
#include <signal.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tests/support/fake_clock.h"
#include "tests/support/temp_dir.h"
#include "tests/unit/tlsreload/test_ca.h"
#include "tlsreload/loader.h"
#include "tlsreload/store.h"

using namespace autotls;
using namespace autotls::tlsreload;
namespace fs = std::filesystem;

namespace {

struct TempDir : testing::TempDir {
  TempDir() : testing::TempDir("tlsreload-loader") {}
};

void write(const fs::path& p, const std::string& data) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << data;
}

// evict writes p to disk and drops it from the page cache, so the next read is a cold one;
// false if the page cache still holds it (tmpfs, for one).
bool evict(const fs::path& p) {
  int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  bool cold = false;
  struct stat st{};
  if (::fdatasync(fd) == 0 && ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0 && ::fstat(fd, &st) == 0 &&
      st.st_size > 0) {
    void* m = ::mmap(nullptr, static_cast<std::size_t>(st.st_size), PROT_READ, MAP_SHARED, fd, 0);
    unsigned char in_core = 1;
    if (m != MAP_FAILED) {
      cold = ::mincore(m, 1, &in_core) == 0 && (in_core & 1) == 0;
      ::munmap(m, static_cast<std::size_t>(st.st_size));
    }
  }
  ::close(fd);
  return cold;
}

}  // namespace

TEST_SUITE("tlsreload.loader") {

TEST_CASE("loader reads a certbot directory and reports each bad file") {
  testing::FakeClock clock;
  testing::TestCa ca("Loader", clock.now());
  TempDir dir;
  auto good1 = ca.issue({"good1.test"});
  auto good2 = ca.issue({"good2.test"}, testing::TestKeyType::rsa2048);
  auto bad = ca.issue({"bad.test"});
  write(dir.path / "good1.test" / "fullchain.pem", ca.chain_pem(good1));
  write(dir.path / "good1.test" / "privkey.pem", good1.key_pem);
  write(dir.path / "live" / "good2.test" / "fullchain.pem", ca.chain_pem(good2));
  write(dir.path / "live" / "good2.test" / "privkey.pem", testing::key_to_pem_traditional(good2.key.get()));
  write(dir.path / "live" / "README", "certbot readme");
  write(dir.path / "bad-key.test" / "fullchain.pem", ca.chain_pem(bad));
  write(dir.path / "bad-key.test" / "privkey.pem", "not a key");
  write(dir.path / "mismatch.test" / "fullchain.pem", ca.chain_pem(bad));
  write(dir.path / "mismatch.test" / "privkey.pem", good1.key_pem);
  write(dir.path / "no-key.test" / "fullchain.pem", ca.chain_pem(bad));
  fs::create_directories(dir.path / "archive");
  fs::create_directories(dir.path / "renewal");

  LoadOptions o;
  o.clock = &clock;
  auto report = load_directory(dir.path, o);
  REQUIRE_MESSAGE(report, report.error().message);
  REQUIRE(report->certificates.size() == 2);
  std::vector<std::string> names;
  for (const auto& c : report->certificates) names.push_back(c->names().front());
  std::sort(names.begin(), names.end());
  CHECK(names == std::vector<std::string>{"good1.test", "good2.test"});

  REQUIRE(report->failures.size() == 3);
  auto failure_for = [&](const fs::path& p) -> const LoadFailure* {
    for (const auto& f : report->failures) {
      if (f.path == p) return &f;
    }
    return nullptr;
  };
  const LoadFailure* f1 = failure_for(dir.path / "no-key.test" / "privkey.pem");
  REQUIRE(f1);
  CHECK(f1->error.message.ends_with("privkey.pem: missing"));
  const LoadFailure* f2 = failure_for(dir.path / "bad-key.test" / "privkey.pem");
  REQUIRE(f2);
  CHECK(f2->error.message == (dir.path / "bad-key.test" / "privkey.pem").string() +
                                 ": private key: no PEM block found (not PEM, or truncated before "
                                 "the first -----END line)");
  const LoadFailure* f3 = failure_for(dir.path / "mismatch.test" / "fullchain.pem");
  REQUIRE(f3);
  CHECK(f3->error.message.ends_with("private key does not match the leaf certificate"));

  CertStore store;
  CHECK(publish_all(store, *report) == 2);
  CHECK(store.lookup("good1.test") != nullptr);
  CHECK(store.lookup("good2.test", false) != nullptr);
  CHECK(store.lookup("bad.test") == nullptr);
}

TEST_CASE("loader follows certbot's symbolic links and reports a directory or oversized file") {
  testing::FakeClock clock;
  testing::TestCa ca("Loader", clock.now());
  TempDir dir;
  auto a = ca.issue({"a.test"});
  auto b = ca.issue({"b.test"});
  // certbot: live/<name>/*.pem are links into archive/<name>/; here also a linked pair directory.
  write(dir.path / "archive" / "a.test" / "fullchain1.pem", ca.chain_pem(a));
  write(dir.path / "archive" / "a.test" / "privkey1.pem", a.key_pem);
  fs::create_directories(dir.path / "live" / "a.test");
  fs::create_symlink("../../archive/a.test/fullchain1.pem", dir.path / "live" / "a.test" / "fullchain.pem");
  fs::create_symlink("../../archive/a.test/privkey1.pem", dir.path / "live" / "a.test" / "privkey.pem");
  write(dir.path / "elsewhere" / "b" / "fullchain.pem", ca.chain_pem(b));
  write(dir.path / "elsewhere" / "b" / "privkey.pem", b.key_pem);
  fs::create_directory_symlink(dir.path / "elsewhere" / "b", dir.path / "live" / "b.test");
  fs::create_directories(dir.path / "live" / "dir.test" / "fullchain.pem");  // a directory
  write(dir.path / "live" / "dir.test" / "privkey.pem", a.key_pem);
  write(dir.path / "live" / "big.test" / "fullchain.pem", std::string((1 << 20) + 1, 'A'));
  write(dir.path / "live" / "big.test" / "privkey.pem", a.key_pem);
  write(dir.path / "live" / "empty.test" / "fullchain.pem", "");
  write(dir.path / "live" / "empty.test" / "privkey.pem", a.key_pem);

  LoadOptions o = bulk_load_options();
  o.clock = &clock;
  auto report = load_directory(dir.path, o);
  REQUIRE_MESSAGE(report, report.error().message);
  std::vector<std::string> names;
  for (const auto& c : report->certificates) names.push_back(c->names().front());
  CHECK(names == std::vector<std::string>{"a.test", "b.test"});
  REQUIRE(report->failures.size() == 3);  // in name order: big, dir, empty
  CHECK(report->failures[0].path == dir.path / "live" / "big.test" / "fullchain.pem");
  CHECK(report->failures[0].error.message ==
        (dir.path / "live" / "big.test" / "fullchain.pem").string() + ": larger than 1 MiB, not a PEM file");
  CHECK(report->failures[1].path == dir.path / "live" / "dir.test" / "fullchain.pem");
  CHECK(report->failures[1].error.message ==
        (dir.path / "live" / "dir.test" / "fullchain.pem").string() + ": Is a directory");
  CHECK(report->failures[2].path == dir.path / "live" / "empty.test" / "fullchain.pem");
  CHECK(report->failures[2].error.message.ends_with("certificate chain: empty PEM input"));
}

TEST_CASE("loader explicit pairs and unreadable inputs") {
  testing::FakeClock clock;
  testing::TestCa ca("Loader", clock.now());
  TempDir dir;
  auto leaf = ca.issue({"pair.test"});
  write(dir.path / "c.pem", ca.chain_pem(leaf));
  write(dir.path / "k.pem", leaf.key_pem);
  LoadOptions o;
  o.clock = &clock;
  auto report = load_pairs({{dir.path / "c.pem", dir.path / "k.pem"},
                            {dir.path / "missing.pem", dir.path / "k.pem"}},
                           o);
  REQUIRE(report.certificates.size() == 1);
  REQUIRE(report.failures.size() == 1);
  CHECK(report.failures[0].path == dir.path / "missing.pem");
  CHECK(report.failures[0].error.code == Errc::io);

  CHECK_FALSE(load_directory(dir.path / "does-not-exist", o));
  write(dir.path / "big.pem", std::string((1 << 20) + 1, 'A'));
  auto big = load_pair({dir.path / "big.pem", dir.path / "k.pem"}, o);
  REQUIRE_FALSE(big);
  CHECK(big.error().message.ends_with("larger than 1 MiB, not a PEM file"));
}


TEST_CASE("loader loads many pairs in parallel, in order, and reports each bad file") {
  testing::FakeClock clock;
  testing::TestCa ca("Loader", clock.now());
  testing::TestCa impostor("Loader", clock.now());  // same names, other keys
  TempDir dir;
  constexpr int kGood = 150;
  auto name = [](int i) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "n%03d.test", i);
    return std::string(buf);
  };
  for (int i = 0; i < kGood; ++i) {
    auto leaf = ca.issue({name(i)});
    write(dir.path / "live" / name(i) / "fullchain.pem", ca.chain_pem(leaf));
    write(dir.path / "live" / name(i) / "privkey.pem", leaf.key_pem);
  }
  auto a = ca.issue({"bad-a.test"});
  write(dir.path / "live" / "bad-a.test" / "fullchain.pem", "garbage");
  write(dir.path / "live" / "bad-a.test" / "privkey.pem", a.key_pem);
  write(dir.path / "live" / "bad-b.test" / "privkey.pem", a.key_pem);  // no chain
  auto forged = ca.issue({"forged.test"});
  write(dir.path / "live" / "zz-forged.test" / "fullchain.pem", forged.cert_pem + impostor.intermediate().cert_pem);
  write(dir.path / "live" / "zz-forged.test" / "privkey.pem", forged.key_pem);

  LoadOptions o = bulk_load_options();
  o.clock = &clock;
  auto report = load_directory(dir.path, o);
  REQUIRE_MESSAGE(report, report.error().message);
  REQUIRE(report->certificates.size() == kGood + 1);  // forged passes the load-time checks
  for (int i = 0; i < kGood; ++i) {
    CHECK(report->certificates[static_cast<std::size_t>(i)]->names().front() == name(i));
  }
  REQUIRE(report->failures.size() == 2);
  CHECK(report->failures[0].path == dir.path / "live" / "bad-b.test" / "fullchain.pem");  // scan first
  CHECK(report->failures[0].error.message.ends_with("fullchain.pem: missing"));
  CHECK(report->failures[1].path == dir.path / "live" / "bad-a.test" / "fullchain.pem");

  // The deferred chain check finds the forged chain; the store never serves it.
  auto pending = verify_pending(report->certificates);
  REQUIRE(pending.size() == 1);
  CHECK_MESSAGE(pending[0].error.message.find("signature does not verify") != std::string::npos,
                pending[0].error.message);
  CertStore store;
  CHECK(publish_all(store, *report) == kGood + 1);
  CHECK(store.version() == 2);  // one snapshot for the whole load
  CHECK(store.lookup("forged.test") == nullptr);
  CHECK(store.lookup(name(7)) != nullptr);
  CHECK(store.lookup(name(7))->openssl());

  // With full validation at load, the forged chain is a load failure instead.
  LoadOptions full;
  full.clock = &clock;
  auto strict = load_directory(dir.path, full);
  REQUIRE(strict);
  CHECK(strict->certificates.size() == kGood);
  CHECK(strict->failures.size() == 3);
}

TEST_CASE("loader: a cold start (inode order, prefetch) loads the same pairs with the same messages") {
  // load_directory reads the pairs in the inode order of their directories and, when a
  // chunk's first file is not in the page cache, prefetches the chunk's files (loader.cpp,
  // Prefetch). Neither may change what loads, the report's name order or a message. The
  // directories are made in reverse name order (inode order is the reverse of name order)
  // and the files are dropped from the page cache before the first load. Chunks of 32 in
  // inode order start at n099, n067, n035 and n003: those are the bad pairs that a chunk's
  // probe meets first, and n041 is one in the middle of a prefetched chunk.
  testing::FakeClock clock;
  testing::TestCa ca("Loader", clock.now());
  TempDir dir;
  constexpr int kPairs = 100;  // more than one chunk of 32
  auto name = [](int i) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "n%03d.test", i);
    return std::string(buf);
  };
  const fs::path live = dir.path / "live";
  std::vector<fs::path> files;
  for (int i = kPairs - 1; i >= 0; --i) {
    fs::path d = live / name(i);
    if (i == 3) {  // no key
      write(d / "fullchain.pem", ca.chain_pem(ca.issue({name(i)})));
    } else if (i == 35) {  // no chain
      write(d / "privkey.pem", ca.issue({name(i)}).key_pem);
    } else if (i == 41) {  // a directory where the chain should be
      fs::create_directories(d / "fullchain.pem");
      write(d / "privkey.pem", ca.issue({name(i)}).key_pem);
    } else if (i == 67) {  // garbage chain, too big a key
      write(d / "fullchain.pem", "garbage");
      write(d / "privkey.pem", std::string((1 << 20) + 1, 'A'));
    } else if (i == 99) {  // empty chain: the probe does not prefetch this chunk
      write(d / "fullchain.pem", "");
      write(d / "privkey.pem", ca.issue({name(i)}).key_pem);
    } else {
      auto leaf = ca.issue({name(i)});
      write(d / "fullchain.pem", ca.chain_pem(leaf));
      write(d / "privkey.pem", leaf.key_pem);
    }
    for (const char* f : {"fullchain.pem", "privkey.pem"}) {
      if (fs::is_regular_file(d / f)) files.push_back(d / f);
    }
  }
  std::size_t evicted = 0;
  for (const fs::path& f : files) evicted += evict(f) ? 1 : 0;
  if (evicted == 0) MESSAGE("the page cache kept the files (tmpfs?): the cold path is not exercised");

  LoadOptions o = bulk_load_options();
  o.clock = &clock;
  auto cold = load_directory(dir.path, o);
  auto warm = load_directory(dir.path, o);  // every file in the page cache now: no prefetch
  REQUIRE_MESSAGE(cold, cold.error().message);
  REQUIRE_MESSAGE(warm, warm.error().message);

  std::vector<std::string> expected;
  for (int i = 0; i < kPairs; ++i) {
    if (i != 3 && i != 35 && i != 41 && i != 67 && i != 99) expected.push_back(name(i));
  }
  for (const auto* report : {&*cold, &*warm}) {
    std::vector<std::string> names;
    for (const auto& c : report->certificates) names.push_back(c->names().front());
    CHECK(names == expected);
    // Missing files first (the scan), then load failures, each in name order.
    std::vector<std::pair<fs::path, std::string>> failures;
    for (const auto& f : report->failures) failures.emplace_back(f.path, f.error.message);
    auto at = [&](int i, const char* f) { return live / name(i) / f; };
    REQUIRE(failures.size() == 5);
    CHECK(failures[0] == std::pair{at(3, "privkey.pem"), at(3, "privkey.pem").string() + ": missing"});
    CHECK(failures[1] == std::pair{at(35, "fullchain.pem"), at(35, "fullchain.pem").string() + ": missing"});
    CHECK(failures[2] == std::pair{at(41, "fullchain.pem"), at(41, "fullchain.pem").string() + ": Is a directory"});
    CHECK(failures[3] == std::pair{at(67, "privkey.pem"),
                                   at(67, "privkey.pem").string() + ": larger than 1 MiB, not a PEM file"});
    CHECK(failures[4].first == at(99, "fullchain.pem"));
    CHECK(failures[4].second.ends_with("certificate chain: empty PEM input"));
  }
}

TEST_CASE("loader: a FIFO chain in a certbot directory is read by the loading thread alone") {
  // The prefetch's probe (loader.cpp, Prefetch) looks at the first file of each chunk. It must
  // not open a FIFO: opening and closing its read end lets a writer write into a pipe whose
  // data is then lost, and the loading thread's open waits for a writer that is gone.
  testing::FakeClock clock;
  testing::TestCa ca("Loader", clock.now());
  TempDir dir;
  auto leaf = ca.issue({"fifo.test"});
  const fs::path d = dir.path / "live" / "fifo.test";
  fs::create_directories(d);
  write(d / "privkey.pem", leaf.key_pem);
  const fs::path fifo = d / "fullchain.pem";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  ::signal(SIGPIPE, SIG_IGN);  // a write into a pipe whose reader left fails instead
  // Whether the race loses the data depends on scheduling; who opened the FIFO does not:
  // one read end is expected to close, the loading thread's. (inotify merges two identical
  // events in a row, so opens are not counted: the writer's and the reader's would merge;
  // a probe's close and the loading thread's are apart, an open between them.)
  int watch = ::inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  REQUIRE(watch >= 0);
  REQUIRE(::inotify_add_watch(watch, fifo.c_str(), IN_OPEN | IN_CLOSE) >= 0);
  const std::string chain = ca.chain_pem(leaf);
  std::promise<void> loaded;
  auto done = loaded.get_future();
  std::atomic<bool> writer_opened{false};
  std::thread writer([&] {
    int fd = ::open(fifo.c_str(), O_WRONLY | O_CLOEXEC);  // waits for a reader
    writer_opened = true;
    if (fd >= 0) {
      (void)!::write(fd, chain.data(), chain.size());
      ::close(fd);
    }
    // Bound: a reader still waiting after 10 s (the data went to a probe) gets end of file.
    if (done.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
      int again = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
      if (again >= 0) ::close(again);
    }
  });
  LoadOptions o = bulk_load_options();
  o.clock = &clock;
  auto report = load_directory(dir.path, o);
  loaded.set_value();
  if (!writer_opened) {
    // The loader never opened the FIFO for reading (a bug the checks below report): release
    // the writer's open, which would otherwise wait forever.
    int r = ::open(fifo.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (r >= 0) ::close(r);
  }
  writer.join();
  REQUIRE_MESSAGE(report, report.error().message);
  CHECK(report->failures.empty());
  for (const auto& f : report->failures) MESSAGE(f.error.message);
  REQUIRE(report->certificates.size() == 1);
  CHECK(report->certificates[0]->names().front() == "fifo.test");
  int reader_closes = 0;
  alignas(inotify_event) char events[4096];
  for (ssize_t n; (n = ::read(watch, events, sizeof events)) > 0;) {
    for (ssize_t at = 0; at < n;) {
      const auto* e = reinterpret_cast<const inotify_event*>(events + at);
      if (e->mask & IN_CLOSE_NOWRITE) ++reader_closes;
      at += static_cast<ssize_t>(sizeof(inotify_event) + e->len);
    }
  }
  ::close(watch);
  CHECK(reader_closes == 1);
}

}  // TEST_SUITE
