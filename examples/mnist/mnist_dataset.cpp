// defines: split_paths, load_split, epoch_order, even_slice (see mnist_dataset.h).
#include "examples/mnist/mnist_dataset.h"

#include "examples/mnist/idx_file.h"
#include "meshtrain/core/errors.h"

#include <random>

namespace meshtrain::mnist {
namespace {

// Mean and standard deviation of the Fashion-MNIST training pixels after /255, rounded.
// Fixed constants (not recomputed from the loaded images) so that --limit-train leaves the
// input transform, and hence the model, the same function of the same pixels.
constexpr double kPixelMean = 0.2860;
constexpr double kPixelStd = 0.3530;

} // namespace

SplitPaths split_paths(const std::string& dir, const std::string& split) {
  return {dir + "/" + split + "-images-idx3-ubyte.gz", dir + "/" + split + "-labels-idx1-ubyte.gz"};
}

MnistSplit load_split(const std::string& dir, const std::string& split, int64_t limit) {
  const SplitPaths paths = split_paths(dir, split);
  IdxArray images = read_idx(paths.images, 3); // [N, rows, cols]
  IdxArray labels = read_idx(paths.labels, 1); // [N]
  const int64_t n = images.dims[0];
  MT_CHECK(labels.dims[0] == n, paths.images, " has ", n, " images but ", paths.labels, " has ",
           labels.dims[0], " labels; they must come in pairs");
  MT_CHECK(limit >= 0 && limit <= n, "asked for the first ", limit, " samples of ", paths.images,
           ", which holds ", n);
  const int64_t kept = limit == 0 ? n : limit;

  auto label_tensor = labels.data.narrow(0, 0, kept).to(torch::kLong); // [kept]
  const auto bad = (label_tensor >= kClasses).nonzero();
  if (bad.numel() > 0) {
    const auto i = bad[0][0].item<int64_t>();
    MT_CHECK(false, paths.labels, ": label ", label_tensor[i].item<int64_t>(), " at index ", i,
             " is outside [0, ", kClasses, ")");
  }

  MnistSplit out;
  out.rows = images.dims[1];
  out.cols = images.dims[2];
  // [kept, rows, cols] uint8 -> [kept, rows*cols] float32, converted once: every epoch then
  // gathers its batches from ready rows.
  out.images = images.data.narrow(0, 0, kept)
                   .reshape({kept, out.rows * out.cols})
                   .to(torch::kFloat)
                   .div_(255.0)
                   .sub_(kPixelMean)
                   .div_(kPixelStd);
  out.labels = std::move(label_tensor);
  return out;
}

torch::Tensor epoch_order(int64_t n, uint64_t seed, int64_t epoch) {
  MT_ASSERT(n >= 1 && epoch >= 0);
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                    static_cast<uint32_t>(epoch), static_cast<uint32_t>(epoch >> 32)};
  std::mt19937_64 rng(seq);
  auto order = torch::arange(n, torch::kLong);
  auto* p = order.data_ptr<int64_t>();
  // Fisher-Yates. std::shuffle and uniform_int_distribution are implementation-defined, so
  // they would break "same order everywhere"; the modulo bias here is below n / 2^64.
  for (int64_t i = n - 1; i > 0; --i) {
    const auto j = static_cast<int64_t>(rng() % static_cast<uint64_t>(i + 1));
    std::swap(p[i], p[j]);
  }
  return order;
}

Range even_slice(int64_t n, int64_t parts, int64_t index) {
  MT_ASSERT(parts >= 1 && index >= 0 && index < parts && n >= 0);
  return {n * index / parts, n * (index + 1) / parts};
}

} // namespace meshtrain::mnist
