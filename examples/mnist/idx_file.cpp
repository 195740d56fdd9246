// defines: read_idx (see idx_file.h).
#include "examples/mnist/idx_file.h"

#include "meshtrain/core/errors.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>

namespace meshtrain::mnist {
namespace {

// No IDX file of these data sets comes near this; a corrupt size must not make us allocate
// terabytes before the truncation check could fire.
constexpr int64_t kMaxElements = int64_t{1} << 32;
constexpr uint8_t kTypeUnsignedByte = 0x08;

struct GzCloser {
  void operator()(gzFile_s* f) const { gzclose(f); }
};
using GzFile = std::unique_ptr<gzFile_s, GzCloser>;

// Reads up to `n` bytes; returns how many were read (fewer only at the end of the stream).
int64_t read_some(gzFile f, const std::string& path, void* dst, int64_t n) {
  auto* out = static_cast<unsigned char*>(dst);
  int64_t done = 0;
  while (done < n) {
    // gzread takes an unsigned and returns an int: read in chunks well below INT_MAX.
    const auto chunk =
        static_cast<unsigned>(std::min<int64_t>(n - done, std::numeric_limits<int>::max() / 2));
    const int got = gzread(f, out + done, chunk);
    if (got < 0) {
      int code = 0;
      const char* why = gzerror(f, &code);
      MT_CHECK(false, path, ": cannot decompress (", why, "); is it a gzip or plain IDX file?");
    }
    if (got == 0) {
      break;
    }
    done += got;
  }
  return done;
}

// "0x00000803": magic numbers are documented in this form.
std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

uint32_t big_endian_u32(const unsigned char* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

} // namespace

IdxArray read_idx(const std::string& path, int expected_ndims) {
  MT_ASSERT(expected_ndims >= 1 && expected_ndims <= 255);
  GzFile file(gzopen(path.c_str(), "rb"));
  MT_CHECK(file != nullptr, path, ": cannot open (", std::strerror(errno), ")");

  unsigned char magic[4];
  const int64_t got_magic = read_some(file.get(), path, magic, 4);
  MT_CHECK(got_magic == 4, path, ": truncated: the 4-byte magic number is missing (file has ",
           got_magic, " bytes)");
  const uint32_t magic_value = big_endian_u32(magic);
  const uint32_t expected_magic = (uint32_t{kTypeUnsignedByte} << 8) | uint32_t(expected_ndims);
  MT_CHECK(magic[0] == 0 && magic[1] == 0 && magic[2] == kTypeUnsignedByte, path,
           ": bad magic number ", hex32(magic_value), ": not an unsigned-byte IDX file (expected ",
           hex32(expected_magic), ")");
  MT_CHECK(magic[3] == expected_ndims, path, ": magic number ", hex32(magic_value), " says ",
           int(magic[3]), " dimensions, expected ", expected_ndims, " (magic ",
           hex32(expected_magic), ")");

  std::vector<unsigned char> header(4 * static_cast<size_t>(expected_ndims));
  const int64_t got_header = read_some(file.get(), path, header.data(), int64_t(header.size()));
  MT_CHECK(got_header == int64_t(header.size()), path, ": truncated header: ", expected_ndims,
           " dimension sizes need ", header.size(), " bytes, found ", got_header);

  IdxArray out;
  int64_t elements = 1;
  for (int d = 0; d < expected_ndims; ++d) {
    const int64_t size = big_endian_u32(&header[size_t{4} * d]);
    MT_CHECK(size >= 1, path, ": dimension ", d, " has size 0");
    out.dims.push_back(size);
    elements *= size; // cannot overflow: each factor < 2^32 and we stop at kMaxElements
    MT_CHECK(elements <= kMaxElements, path, ": sizes ", c10::IntArrayRef(out.dims),
             "... describe more than ", kMaxElements, " elements; the header is corrupt");
  }

  out.data = torch::empty(out.dims, torch::kUInt8);
  const int64_t got_data = read_some(file.get(), path, out.data.data_ptr<uint8_t>(), elements);
  MT_CHECK(got_data == elements, path, ": truncated: sizes ", c10::IntArrayRef(out.dims), " need ",
           elements, " data bytes, found ", got_data);
  unsigned char extra = 0;
  MT_CHECK(read_some(file.get(), path, &extra, 1) == 0, path, ": has bytes after the ", elements,
           " data bytes of sizes ", c10::IntArrayRef(out.dims), "; the file is not one IDX array");
  return out;
}

} // namespace meshtrain::mnist
