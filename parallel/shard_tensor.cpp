// defines: cut_shard, pad_dim, partitioned_spec, assemble_unsharded, gather_unsharded (see
// shard_tensor.h).
#include "meshtrain/parallel/shard_tensor.h"

#include "meshtrain/core/errors.h"

#include <algorithm>

namespace meshtrain {

torch::Tensor cut_shard(const torch::Tensor& full, int64_t dim, int rank, int size,
                        int64_t blocks) {
  MT_CHECK(dim >= 0 && dim < full.dim(), "cut_shard: dim ", dim,
           " is out of range for a tensor of sizes ", full.sizes());
  MT_CHECK(blocks >= 1 && size >= 1 && rank >= 0 && rank < size, "cut_shard: bad blocks (", blocks,
           "), rank (", rank, ") or size (", size, ")");
  const int64_t n = full.size(dim);
  // By division (blocks * size may overflow), and at least one row per block.
  MT_CHECK(blocks <= std::max<int64_t>(n, 1) && n % blocks == 0 && n / blocks % size == 0,
           "cut_shard: size ", n, " of dim ", dim, " must be divisible by blocks (", blocks,
           ") x group size (", size, ")");
  const int64_t block = n / blocks;
  const int64_t piece = block / size;
  std::vector<torch::Tensor> pieces;
  pieces.reserve(blocks);
  for (int64_t b = 0; b < blocks; ++b) {
    pieces.push_back(full.narrow(dim, b * block + rank * piece, piece));
  }
  return torch::cat(pieces, dim).contiguous();
}

torch::Tensor pad_dim(const torch::Tensor& t, int64_t dim, int64_t size) {
  MT_CHECK(size >= t.size(dim), "pad_dim: cannot pad dim ", dim, " of size ", t.size(dim),
           " down to ", size);
  if (size == t.size(dim)) {
    return t;
  }
  auto pad_sizes = t.sizes().vec();
  pad_sizes[dim] = size - t.size(dim);
  return torch::cat({t, torch::zeros(pad_sizes, t.options())}, dim);
}

ShardSpec partitioned_spec(int dim, int64_t global_size, int rank, int size, int64_t unpadded_size,
                           int64_t blocks) {
  ShardSpec spec;
  spec.dim = dim;
  spec.global_size = global_size;
  spec.blocks = blocks;
  spec.offset = rank * (global_size / blocks / size);
  spec.unpadded_size = unpadded_size < 0 ? global_size : unpadded_size;
  return spec;
}

torch::Tensor assemble_unsharded(const std::vector<torch::Tensor>& shards, const ShardSpec& spec) {
  MT_CHECK(!shards.empty(), "assemble_unsharded: no shards");
  torch::NoGradGuard no_grad;
  if (!spec.is_partitioned()) {
    return shards.front().detach();
  }
  const int64_t dim = spec.dim;
  const auto size = static_cast<int64_t>(shards.size());
  // By division (blocks * size may overflow), and at least one row per block: an empty dim
  // of 2^48 blocks would otherwise loop 2^48 times below.
  MT_CHECK(spec.blocks >= 1 && spec.blocks <= std::max<int64_t>(spec.global_size, 1) &&
               spec.global_size % spec.blocks == 0 && spec.global_size / spec.blocks % size == 0,
           "assemble_unsharded: global size ", spec.global_size, " is not divisible by blocks (",
           spec.blocks, ") x shards (", size, ")");
  const int64_t piece = spec.global_size / spec.blocks / size;
  for (int64_t r = 0; r < size; ++r) {
    MT_CHECK(dim < shards[r].dim() && shards[r].size(dim) == piece * spec.blocks,
             "assemble_unsharded: shard ", r, " has sizes ", shards[r].sizes(), "; expected ",
             piece * spec.blocks, " along dim ", dim, " (global size ", spec.global_size, " over ",
             size, " shards)");
  }
  // Block-major, then rank: the master order cut_shard cut from.
  std::vector<torch::Tensor> pieces;
  pieces.reserve(spec.blocks * size);
  for (int64_t b = 0; b < spec.blocks; ++b) {
    for (int64_t r = 0; r < size; ++r) {
      pieces.push_back(shards[r].detach().narrow(dim, b * piece, piece));
    }
  }
  return torch::cat(pieces, dim).narrow(dim, 0, spec.unpadded_size).contiguous();
}

torch::Tensor gather_unsharded(const torch::Tensor& local, const ShardSpec& spec,
                               const CommunicatorPtr& group) {
  torch::NoGradGuard no_grad;
  if (!spec.is_partitioned()) {
    return local.detach().clone();
  }
  const int64_t dim = spec.dim;
  const int size = group->size();
  MT_CHECK(local.size(dim) * size == spec.global_size, "gather_unsharded: local size ",
           local.size(dim), " along dim ", dim, " x group size ", size,
           " differs from the spec's global size ", spec.global_size);
  const auto front = local.detach().movedim(dim, 0).contiguous(); // [global/size, ...]
  auto sizes = front.sizes().vec();
  sizes[0] *= size;
  auto all = torch::empty(sizes, front.options()); // rank-major: [size * global/size, ...]
  group->all_gather(front, all);
  auto gathered = all.chunk(size, 0);
  for (auto& shard : gathered) {
    shard = shard.movedim(0, dim);
  }
  return assemble_unsharded(gathered, spec);
}

} // namespace meshtrain
