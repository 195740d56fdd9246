// defines: IdxArray, read_idx — the IDX format of (Fashion-)MNIST, plain or gzip-compressed.
//
// Layout (big-endian): bytes 0-1 are zero, byte 2 is the element type (0x08 = unsigned byte,
// the only one these data sets use), byte 3 the number of dimensions d; then d uint32 sizes;
// then prod(sizes) elements in row-major order and nothing after them.
// Images are [N, rows, cols] (magic 0x00000803), labels [N] (magic 0x00000801).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

namespace meshtrain::mnist {

struct IdxArray {
  std::vector<int64_t> dims; // e.g. {60000, 28, 28}
  torch::Tensor data;        // uint8, shape `dims`, owned and contiguous
};

// Reads `path` (gzip or plain: zlib reads both) and checks that it is an unsigned-byte IDX
// array with `expected_ndims` dimensions, every size >= 1, and exactly prod(sizes) data
// bytes. Throws c10::Error naming the file and what was wrong (bad magic, wrong number of
// dimensions, zero size, truncated header or data, trailing bytes, unreadable gzip).
IdxArray read_idx(const std::string& path, int expected_ndims);

} // namespace meshtrain::mnist
