// defines: the Catch2 tests of the MNIST example's data layer: the IDX reader's checks
// (each malformed file is rejected with the file and the reason), load_split's pairing and
// label checks, and the data order (epoch_order, even_slice). Files are written with zlib
// into a fresh temporary directory.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

#include "examples/mnist/idx_file.h"
#include "examples/mnist/mnist_dataset.h"

#include <zlib.h>

#include <unistd.h>

#include <filesystem>
#include <set>
#include <string>
#include <system_error>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace mnist = meshtrain::mnist;
using Catch::Matchers::Contains;
using Bytes = std::vector<unsigned char>;

// A fresh directory per process, removed again when the test binary exits.
struct ScratchDir {
  fs::path path = fs::temp_directory_path() / ("mnist_data_test_" + std::to_string(::getpid()));
  ScratchDir() {
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~ScratchDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
};

fs::path scratch_dir() {
  static const ScratchDir dir;
  return dir.path;
}

// Writes `bytes` gzip-compressed (as the Debian package ships them) and returns the path.
std::string write_gz(const std::string& name, const Bytes& bytes) {
  auto path = (scratch_dir() / name).string();
  gzFile f = gzopen(path.c_str(), "wb");
  REQUIRE(f != nullptr);
  if (!bytes.empty()) {
    REQUIRE(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())) ==
            static_cast<int>(bytes.size()));
  }
  REQUIRE(gzclose(f) == Z_OK);
  return path;
}

void put_u32(Bytes& out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) {
    out.push_back(static_cast<unsigned char>(v >> shift));
  }
}

// An unsigned-byte IDX file: magic, sizes, then `data` (any length, to make bad files).
Bytes idx(const std::vector<uint32_t>& sizes, const Bytes& data) {
  Bytes out{0, 0, 0x08, static_cast<unsigned char>(sizes.size())};
  for (const uint32_t s : sizes) {
    put_u32(out, s);
  }
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

Bytes iota_bytes(size_t n, int mod = 256) {
  Bytes b(n);
  for (size_t i = 0; i < n; ++i) {
    b[i] = static_cast<unsigned char>(i % mod);
  }
  return b;
}

// A split of `n` 2x3 images with labels i % 10 under `dir`.
void write_split(const std::string& dir, const std::string& split, uint32_t n, uint32_t n_labels) {
  fs::create_directories(scratch_dir() / dir);
  write_gz(dir + "/" + split + "-images-idx3-ubyte.gz", idx({n, 2, 3}, iota_bytes(size_t{n} * 6)));
  write_gz(dir + "/" + split + "-labels-idx1-ubyte.gz", idx({n_labels}, iota_bytes(n_labels, 10)));
}

} // namespace

TEST_CASE("idx: a well-formed file reads back with its sizes and bytes", "[mnist]") {
  const auto path = write_gz("good.gz", idx({4, 2, 3}, iota_bytes(24)));
  const auto a = mnist::read_idx(path, 3);
  CHECK((a.dims == std::vector<int64_t>{4, 2, 3}));
  REQUIRE(a.data.sizes().vec() == std::vector<int64_t>{4, 2, 3});
  CHECK(a.data.scalar_type() == torch::kUInt8);
  CHECK(a.data[3][1][2].item<int>() == 23);
}

TEST_CASE("idx: malformed files are rejected naming the file and the reason", "[mnist]") {
  SECTION("missing file") {
    const auto path = (scratch_dir() / "absent.gz").string();
    REQUIRE_THROWS_WITH(mnist::read_idx(path, 1), Contains(path) && Contains("cannot open"));
  }
  SECTION("empty file") {
    const auto path = write_gz("empty.gz", {});
    REQUIRE_THROWS_WITH(mnist::read_idx(path, 1),
                        Contains(path) && Contains("magic number is missing"));
  }
  SECTION("bad magic: not unsigned bytes") {
    Bytes b = idx({4}, iota_bytes(4));
    b[2] = 0x0D; // float32 elements
    const auto path = write_gz("float.gz", b);
    REQUIRE_THROWS_WITH(mnist::read_idx(path, 1), Contains(path) &&
                                                      Contains("bad magic number 0x00000d01") &&
                                                      Contains("expected 0x00000801"));
  }
  SECTION("labels where images are expected") {
    const auto path = write_gz("labels.gz", idx({4}, iota_bytes(4)));
    REQUIRE_THROWS_WITH(mnist::read_idx(path, 3),
                        Contains(path) && Contains("says 1 dimensions, expected 3"));
  }
  SECTION("a zero size") {
    const auto path = write_gz("zero.gz", idx({4, 0, 3}, {}));
    REQUIRE_THROWS_WITH(mnist::read_idx(path, 3),
                        Contains(path) && Contains("dimension 1 has size 0"));
  }
  SECTION("truncated header") {
    Bytes b = idx({4, 2, 3}, {});
    b.resize(9); // magic + 1 size + 1 byte of the second
    const auto path = write_gz("short_header.gz", b);
    REQUIRE_THROWS_WITH(mnist::read_idx(path, 3),
                        Contains(path) && Contains("truncated header") && Contains("found 5"));
  }
  SECTION("truncated data") {
    const auto path = write_gz("short_data.gz", idx({4, 2, 3}, iota_bytes(20)));
    REQUIRE_THROWS_WITH(mnist::read_idx(path, 3), Contains(path) && Contains("truncated") &&
                                                      Contains("need 24") && Contains("found 20"));
  }
  SECTION("trailing bytes") {
    const auto path = write_gz("long.gz", idx({4}, iota_bytes(5)));
    REQUIRE_THROWS_WITH(mnist::read_idx(path, 1),
                        Contains(path) && Contains("bytes after the 4 data bytes"));
  }
  SECTION("corrupt gzip stream") {
    // A valid gzip header followed by garbage deflate data.
    const auto path = (scratch_dir() / "corrupt.gz").string();
    {
      std::FILE* f = std::fopen(path.c_str(), "wb");
      REQUIRE(f != nullptr);
      const unsigned char bytes[] = {0x1f, 0x8b, 0x08, 0,    0,    0,    0,    0,    0,
                                     0x03, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
      std::fwrite(bytes, 1, sizeof bytes, f);
      std::fclose(f);
    }
    REQUIRE_THROWS_WITH(mnist::read_idx(path, 1), Contains(path) && Contains("cannot decompress"));
  }
}

TEST_CASE("load_split: pairs images with labels, checks counts, labels and limit", "[mnist]") {
  const auto dir = (scratch_dir() / "ok").string();
  write_split("ok", "train", 12, 12);
  const auto all = mnist::load_split(dir, "train");
  CHECK(all.size() == 12);
  CHECK(all.rows == 2);
  CHECK(all.cols == 3);
  CHECK((all.images.sizes().vec() == std::vector<int64_t>{12, 6}));
  CHECK(all.images.scalar_type() == torch::kFloat);
  CHECK(all.labels[11].item<int64_t>() == 1);
  CHECK(mnist::load_split(dir, "train", 5).size() == 5);
  REQUIRE_THROWS_WITH(mnist::load_split(dir, "train", 13),
                      Contains("first 13 samples") && Contains("which holds 12"));

  write_split("mismatch", "train", 12, 11);
  REQUIRE_THROWS_WITH(mnist::load_split((scratch_dir() / "mismatch").string(), "train"),
                      Contains("has 12 images but") && Contains("has 11 labels"));

  fs::create_directories(scratch_dir() / "badlabel");
  write_gz("badlabel/train-images-idx3-ubyte.gz", idx({3, 2, 3}, iota_bytes(18)));
  write_gz("badlabel/train-labels-idx1-ubyte.gz", idx({3}, {1, 10, 2}));
  REQUIRE_THROWS_WITH(mnist::load_split((scratch_dir() / "badlabel").string(), "train"),
                      Contains("label 10 at index 1") && Contains("outside [0, 10)"));
}

TEST_CASE("epoch_order: a permutation fixed by (seed, epoch) alone", "[mnist]") {
  const auto a = mnist::epoch_order(1000, 7, 0);
  REQUIRE(a.numel() == 1000);
  CHECK(std::get<0>(a.sort()).equal(torch::arange(1000, torch::kLong)));
  CHECK(a.equal(mnist::epoch_order(1000, 7, 0)));
  CHECK_FALSE(a.equal(mnist::epoch_order(1000, 7, 1)));
  CHECK_FALSE(a.equal(mnist::epoch_order(1000, 8, 0)));
  // Pinned values: the order must not change across compilers, platforms or LibTorch versions
  // (a saved run's data position would otherwise point at different samples).
  const auto small = mnist::epoch_order(8, 1234, 0);
  INFO("epoch_order(8, 1234, 0) = " << small);
  CHECK(small.equal(torch::tensor({3, 0, 6, 7, 4, 2, 1, 5}, torch::kLong)));
}

TEST_CASE("even_slice: contiguous, covering, sizes within one", "[mnist]") {
  for (const int64_t parts : {1, 2, 3, 4, 7}) {
    int64_t expected_begin = 0;
    for (int64_t r = 0; r < parts; ++r) {
      const auto s = mnist::even_slice(10000, parts, r);
      CHECK(s.begin == expected_begin);
      CHECK(s.end - s.begin >= 10000 / parts);
      CHECK(s.end - s.begin <= 10000 / parts + 1);
      expected_begin = s.end;
    }
    CHECK(expected_begin == 10000);
  }
}
