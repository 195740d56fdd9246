// defines: TensorParallelism, TensorParallelLayer, apply_tensor_parallel, keep_shard — how a
// model built serially is laid out over a tensor-parallel group after construction
// (torchtitan's parallelize_module, done by each layer on itself).
//
// Every parallel/ layer is built serially by default (a group of one, the full weights) and
// implements TensorParallelLayer: apply_tensor_parallel keeps this rank's shard of its OWN
// parameters (the children are laid out by their own calls) and communicates over the group
// from then on. Because every layer draws the full "master" weights at construction, a
// serial model laid out over tp holds exactly the shards a model built directly on tp would
// (DESIGN §3 init invariance). launch/parallelize.h calls apply_tensor_parallel once, before
// the optimizer flattens the parameters.
#pragma once

#include "meshtrain/core/communicator.h"

#include <torch/torch.h>

namespace meshtrain {

struct TensorParallelism {
  CommunicatorPtr group;          // the tp group (a group of one: serial)
  bool sequence_parallel = false; // activations between the TP regions are [B, T/tp, C]
};

class TensorParallelLayer {
public:
  virtual ~TensorParallelLayer() = default;
  // Lays this module out over `tp` (see above). Throws when it was already laid out over a
  // group of more than one rank, or when its sizes do not split over tp.
  virtual void apply_tensor_parallel(const TensorParallelism& tp) = 0;
};

// Calls apply_tensor_parallel on every module of `root` (the root included) that is a
// TensorParallelLayer, parents before children (named_modules() order).
void apply_tensor_parallel(torch::nn::Module& root, const TensorParallelism& tp);

// Replaces the data of `param` (a full tensor) by this rank's shard along `dim` (cut_shard:
// `blocks` equal blocks, each cut over `size` ranks), in place: the module's registration and
// every reference see the new shape. No autograd.
void keep_shard(torch::Tensor& param, int64_t dim, int rank, int size, int64_t blocks = 1);

// The same for a serial vocabulary table [Vp1, C] padded for one rank: the first `vocab` rows
// padded to `padded` (for `size` ranks), then this rank's rows.
void keep_vocab_shard(torch::Tensor& param, int64_t vocab, int64_t padded, int rank, int size);

// Both keep a deferred parameter (parallel/param_init.h) deferred: a placeholder of the
// shard's sizes, nothing allocated.

} // namespace meshtrain
