// defines: ParallelBlock, AttentionCore (AttentionCoreFn, AttentionCoreWrapper),
// ParallelModel — the small interface through which a model opts in to parallelize()
// (launch/parallelize.h; DESIGN §1): its blocks, its embedding, its head and loss, and the
// attention cores selective recomputation wraps. No layout flags reach the model: the
// library lays out its parallel/ layers (tensor_parallel_layer.h), wraps its blocks and
// composes its loss.
//
// A model is a torch::nn::Module built from parallel/ layers (serially: no group needed) that
// derives from ParallelModel; its repeated blocks are modules that also derive from
// ParallelBlock. The library computes a micro-batch's loss as
//   x = embed(inputs)                 [b, T, C]   ([b, T/tp, C] under sequence parallelism)
//   x = block_i(x) for every block    (each maybe wrapped by recompute; under pipeline
//                                     parallelism each rank runs its stages' blocks)
//   loss = head_loss(x, targets)      [] SUM of the token cross-entropies, equal on every
//                                     rank of the tp group
// tests/consumer/project/main.cpp and examples/gpt/gpt_model.h are two such models;
// docs/library.md walks through writing one.
#pragma once

#include "meshtrain/parallel/parallel_plan.h"
#include "meshtrain/parallel/rng_tracker.h"

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <vector>

namespace meshtrain {

// One repeated block of a ParallelModel: [b, T, C] -> [b, T, C] (the residual stream, sequence
// shards under sequence parallelism). Mixed into the block's module class.
class ParallelBlock {
public:
  virtual ~ParallelBlock() = default;
  virtual torch::Tensor forward(const torch::Tensor& x) = 0;
};

// The attention core: q, k, v [B, h, T, D] -> softmax(q k^T / sqrt(D), causal) v, with its
// dropout -> [B, h, T, D]. No parameters, no communication. (Grouped-query attention may pass
// k, v with hkv | h heads, query head i using kv head i / (h / hkv): ring attention, the core
// parallelize installs under context parallelism, takes them so, without repeating them.)
using AttentionCoreFn = std::function<torch::Tensor(const torch::Tensor& q, const torch::Tensor& k,
                                                    const torch::Tensor& v)>;
// softmax(scale * scores, causal) over the last dim: scores [.., T, T] (q k^T, unscaled) in
// the compute dtype -> probabilities in the same dtype, with fp32 statistics (max, sum of
// exponentials) whatever the dtype (DESIGN §3 "Mixed precision").
torch::Tensor causal_softmax(const torch::Tensor& scores, double scale);

// Runs a core in forward (selective recomputation installs one).
using AttentionCoreWrapper =
    std::function<torch::Tensor(const AttentionCoreFn& core, const torch::Tensor& q,
                                const torch::Tensor& k, const torch::Tensor& v)>;

// An attention layer whose core the library may wrap (mixed into the layer's module class).
class AttentionCore {
public:
  virtual ~AttentionCore() = default;
  // Empty: the core runs as is.
  virtual void set_core_wrapper(AttentionCoreWrapper wrapper) = 0;
};

class ParallelModel : public torch::nn::Module {
public:
  // What ParallelPlan::validate checks a layout against.
  virtual ModelShape shape() const = 0;
  // inputs [b, T] int64 -> the residual stream entering the first block.
  virtual torch::Tensor embed(const torch::Tensor& inputs) = 0;
  // The blocks in forward order; every module must also be a ParallelBlock.
  virtual std::vector<std::shared_ptr<torch::nn::Module>> blocks() = 0;
  // The stream after the last block and targets [b, T] int64 -> the SUM of the token
  // cross-entropies ([] tensor), identical on every rank of the tp group.
  virtual torch::Tensor head_loss(const torch::Tensor& x, const torch::Tensor& targets) = 0;
  // The dropout streams of the model's layers (null without dropout): parallelize reseeds
  // them per data-parallel replica and tensor-parallel rank.
  virtual RngTrackerPtr rng_tracker() const { return nullptr; }
};

// model.blocks() as ParallelBlocks (valid while the model lives); throws naming the index and
// the module of a block that is not one.
std::vector<ParallelBlock*> parallel_blocks(ParallelModel& model);

} // namespace meshtrain
