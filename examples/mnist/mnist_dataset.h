// defines: MnistSplit, split_paths, load_split — one split ("train" or "t10k") of an
// MNIST-format data set as model-ready tensors; epoch_order, even_slice — the data order of
// data-parallel training (which sample each rank takes at each step).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>

namespace meshtrain::mnist {

constexpr int64_t kClasses = 10;
// Debian's dataset-fashion-mnist package.
constexpr const char* kDefaultDataDir = "/usr/share/datasets/fashion-mnist";

struct MnistSplit {
  torch::Tensor images; // float32 [N, rows*cols], pixel/255 normalised by kPixelMean/Std
  torch::Tensor labels; // int64 [N], each in [0, kClasses)
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t size() const { return labels.size(0); }
};

struct SplitPaths {
  std::string images; // <dir>/<split>-images-idx3-ubyte.gz
  std::string labels; // <dir>/<split>-labels-idx1-ubyte.gz
};
SplitPaths split_paths(const std::string& dir, const std::string& split);

// Loads <split>-images-idx3 and <split>-labels-idx1 from `dir`, keeping the first `limit`
// samples (0: all). Throws naming the file on a malformed IDX file, on image/label counts
// that differ, on a label outside [0, kClasses) and on a `limit` above the file's count.
MnistSplit load_split(const std::string& dir, const std::string& split, int64_t limit = 0);

// The sample order of one epoch: a permutation of [0, n) (int64 [n]) that depends only on
// (seed, epoch), not on the number of ranks or threads, so every rank computes the same one
// without communicating. Uses the standard's exactly specified mt19937_64 and seed_seq (and
// our own Fisher-Yates), so it is also the same across compilers and LibTorch versions.
torch::Tensor epoch_order(int64_t n, uint64_t seed, int64_t epoch);

// Part `index` of [0, n) cut into `parts` contiguous pieces whose sizes differ by at most 1.
struct Range {
  int64_t begin = 0;
  int64_t end = 0;
};
Range even_slice(int64_t n, int64_t parts, int64_t index);

} // namespace meshtrain::mnist
