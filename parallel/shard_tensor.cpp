// defines: cut_shard, pad_dim, partitioned_spec, gather_unsharded (see shard_tensor.h).
#include "parallel/shard_tensor.h"

#include "core/errors.h"

namespace meshtrain {

torch::Tensor cut_shard(const torch::Tensor& full, int64_t dim, int rank, int size,
                        int64_t blocks) {
  MT_CHECK(dim >= 0 && dim < full.dim(), "cut_shard: dim ", dim,
           " is out of range for a tensor of sizes ", full.sizes());
  MT_CHECK(blocks >= 1 && size >= 1 && rank >= 0 && rank < size, "cut_shard: bad blocks (", blocks,
           "), rank (", rank, ") or size (", size, ")");
  const int64_t n = full.size(dim);
  MT_CHECK(n % (blocks * size) == 0, "cut_shard: size ", n, " of dim ", dim,
           " must be divisible by blocks (", blocks, ") x group size (", size, ")");
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
  auto all = torch::empty(sizes, front.options()); // [size, blocks, piece, ...] rank-major
  group->all_gather(front, all);
  const int64_t piece = spec.global_size / spec.blocks / size;
  auto rest = front.sizes().slice(1).vec();
  std::vector<int64_t> split{size, spec.blocks, piece};
  split.insert(split.end(), rest.begin(), rest.end());
  // [size, blocks, piece, ...] -> [blocks, size, piece, ...]: block-major, the master order.
  auto ordered = all.view(split).transpose(0, 1).reshape(sizes);
  return ordered.narrow(0, 0, spec.unpadded_size).movedim(0, dim).contiguous();
}

} // namespace meshtrain
