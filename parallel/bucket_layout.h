// defines: BucketLayoutOptions, BucketSlot, Bucket, BucketLayout (BucketLayoutPtr),
// assign_buckets — how the trainable parameters are packed into flat buckets for the
// data-parallel reduction and the ZeRO optimizer, built ONCE and read by both
// (parallel/data_parallel.h, optim/zero.h), so they cannot disagree.
//
// Packing. The trainable parameters (each tensor once, under its first name) are packed in
// REVERSE registration order (backward produces the last layers' gradients first) into
// buckets of at most bucket_bytes elements of the reduce dtype (a larger parameter gets a
// bucket of its own). Bucket b is one flat run [padded_b], padded_b = round_up(numel_b, dp):
// its parameters' flattened elements end to end in packing order, then zeros.
//
// Ownership (ZeRO, Rajbhandari et al. 2020). Rank r of the dp group owns
//   stage 0:   all of every bucket (nothing sharded)
//   stage >=1: elements [r * padded_b / dp, (r + 1) * padded_b / dp) of every bucket
// and at stage >= 2 the gradients themselves are reduce-scattered to that range
// (shards_gradients()). At stage 3 the parameters are sharded too (parallel/parameter_shards.h)
// and gathered a unit at a time (a block, or the parameters outside every block), so each
// bucket is one such unit, given by BucketLayoutOptions::units instead of packed by size:
// reduce-scatters then free a block's gradients as soon as its backward is done.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace meshtrain {

struct BucketLayoutOptions {
  // Upper bound of a bucket's gradient bytes (in reduce_dtype). Smaller buckets start
  // communicating earlier; larger ones make fewer, more efficient calls.
  TORCH_ARG(int64_t, bucket_bytes) = int64_t{25} * 1024 * 1024;
  // Dtype of the gradient buckets: gradients are accumulated, summed and sent in it.
  // kBFloat16 halves the traffic; the MPI backend still sums in fp32 and rounds once.
  TORCH_ARG(torch::Dtype, reduce_dtype) = torch::kFloat;
  // 0: nothing sharded; 1: optimizer state sharded over dp; 2: also the gradients; 3: also
  // the parameters.
  TORCH_ARG(int, zero_stage) = 0;
  // Stage 3 only (and required there): the parameter names of each bucket, in bucket order;
  // every trainable parameter in exactly one. Within a bucket they are packed in reverse
  // registration order, as by size.
  TORCH_ARG(std::vector<std::vector<std::string>>, units);
};

// One parameter's place in its bucket.
struct BucketSlot {
  std::string name;
  size_t param = 0;   // index into BucketLayout::parameter_names()
  int64_t offset = 0; // first element in the bucket
  int64_t numel = 0;
};

struct Bucket {
  std::vector<BucketSlot> slots; // in packing order
  int64_t numel = 0;             // sum of the slots' numels
  int64_t padded = 0;            // round_up(max(numel, 1), dp)
};

// Greedy reverse-order packing (pure): walks numels from the last entry to the first and
// starts a new bucket when adding the next would pass bucket_bytes. Returns the indices into
// `numels` of each bucket, in packing order.
std::vector<std::vector<int64_t>> assign_buckets(const std::vector<int64_t>& numels,
                                                 int64_t element_size, int64_t bucket_bytes);

class BucketLayout {
public:
  // Packs the trainable parameters of `model` for a dp group of `dp` ranks. No
  // communication. Throws naming the value on a bad option (zero_stage outside 0..3, units
  // missing at stage 3 or not covering the parameters exactly once, ...).
  BucketLayout(const torch::nn::Module& model, int dp, BucketLayoutOptions options = {});

  const BucketLayoutOptions& options() const { return options_; }
  int dp() const { return dp_; }
  int zero_stage() const { return options_.zero_stage(); }
  // Stage >= 1: the optimizer keeps master weights and moments of its owned ranges only.
  bool shards_optimizer_state() const { return zero_stage() >= 1; }
  // Stage >= 2: gradients are reduce-scattered; each rank keeps its owned ranges only.
  bool shards_gradients() const { return zero_stage() >= 2; }
  // Stage 3: the parameters themselves are kept as the owned ranges (parameter_shards.h).
  bool shards_parameters() const { return zero_stage() == 3; }

  const std::vector<Bucket>& buckets() const { return buckets_; }
  int64_t num_buckets() const { return static_cast<int64_t>(buckets_.size()); }
  // The trainable parameters in registration order (what BucketSlot::param indexes).
  const std::vector<std::string>& parameter_names() const { return names_; }
  // First element and length of the part of bucket b that dp rank `rank` owns.
  int64_t owned_begin(int64_t b, int rank) const;
  int64_t owned_size(int64_t b) const;
  // Parameter elements (Psi) and the padded total (sum of padded_b).
  int64_t numel() const { return numel_; }
  int64_t padded_numel() const { return padded_numel_; }

  // Throws unless `model`'s trainable parameters are the ones this layout was built from
  // (same names, order and sizes): the reducer and the optimizer check it.
  void check_model(const torch::nn::Module& model, const char* who) const;

private:
  std::vector<std::vector<int64_t>>
  unit_packing(const std::vector<std::vector<std::string>>& units) const;

  BucketLayoutOptions options_;
  int dp_ = 1;
  std::vector<std::string> names_;
  std::vector<int64_t> numels_;
  std::vector<Bucket> buckets_;
  int64_t numel_ = 0;
  int64_t padded_numel_ = 0;
};

using BucketLayoutPtr = std::shared_ptr<const BucketLayout>;

// The trainable parameters of `model`, each tensor once (a tied weight keeps its first name),
// in named_parameters() order.
std::vector<std::pair<std::string, torch::Tensor>>
unique_trainable_parameters(const torch::nn::Module& model);

} // namespace meshtrain
