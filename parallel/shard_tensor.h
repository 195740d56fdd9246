// defines: cut_shard (this rank's piece of a full "master" tensor), pad_dim (zero padding
// along a dim, for vocab padding), assemble_unsharded (the full, unpadded tensor from every
// rank's shard, without communication — checkpoints and export) and gather_unsharded (the
// same from the shards of a group, collectively — for checks and tests).
//
// Block layout (ShardSpec::blocks): a dim of size N made of k equal blocks of N/k is cut
// block by block: rank r of `size` keeps rows [b*N/k + r*N/(k*size), +N/(k*size)) of every
// block b, concatenated in block order. c_attn's [3C, C] weight (q|k|v) uses k = 3, so a
// rank holds q, k and v rows of its own heads.
#pragma once

#include "meshtrain/core/communicator.h"
#include "meshtrain/parallel/sharding.h"

#include <torch/torch.h>

#include <vector>

namespace meshtrain {

// This rank's shard of `full` along `dim` (contiguous, a copy): the cut of each of `blocks`
// equal blocks. Throws unless blocks * size divides full.size(dim).
torch::Tensor cut_shard(const torch::Tensor& full, int64_t dim, int rank, int size,
                        int64_t blocks = 1);

// `t` extended with zeros along `dim` to `size` (>= t.size(dim)); `t` itself when equal.
torch::Tensor pad_dim(const torch::Tensor& t, int64_t dim, int64_t size);

// The spec of a shard cut by cut_shard from a tensor of `global_size` along `dim`
// (`unpadded_size` of it real, the rest padding).
ShardSpec partitioned_spec(int dim, int64_t global_size, int rank, int size,
                           int64_t unpadded_size = -1, int64_t blocks = 1);

// The full tensor, unpadded, from the shards of ranks 0..size-1 (shards[r] is rank r's
// local tensor; all cut with `spec`'s dim, blocks and global size): the inverse of
// pad_dim + cut_shard. A replicated spec returns shards[0]. No communication, no autograd.
torch::Tensor assemble_unsharded(const std::vector<torch::Tensor>& shards, const ShardSpec& spec);

// Collective over `group` (the group the spec names): all-gathers the shards along
// spec.dim, puts blocks back in order and drops padding. A replicated spec returns a copy
// of `local`. No autograd.
torch::Tensor gather_unsharded(const torch::Tensor& local, const ShardSpec& spec,
                               const CommunicatorPtr& group);

} // namespace meshtrain
