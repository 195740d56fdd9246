// defines: ContextSplit, context_chunks, context_positions, take_context_chunks,
// gather_context_chunks, ContextParallelism, ContextParallelLayer, apply_context_parallel —
// how a sequence is cut over the ranks of a context-parallel ("cp") group (DESIGN §3
// "Context parallelism") and how layers that depend on token positions learn their cut.
//
// A sequence of T tokens is cut into 2*cp chunks of c = T / (2 cp) tokens. Each cp rank holds
// two chunks, in increasing order, as its local sequence of T / cp tokens:
//   balanced    rank r holds chunks r and 2cp-1-r (torchtitan's head-tail split). Under causal
//               attention query chunk i attends to key chunks 0..i, so every rank has the same
//               work: 2cp-1 full chunk pairs and 2 diagonal ones (parallel/ring_attention.h).
//   contiguous  rank r holds chunks 2r and 2r+1 (the plain split; rank cp-1 then does ~2cp-1
//               times the causal work of rank 0). Only for comparison (tests, benchmarks).
// Example, T = 16, cp = 2 (chunks of 4): rank 0 holds positions 0-3 and 12-15, rank 1 holds
// 4-7 and 8-11.
//
// Everything but attention is local to a rank's tokens. parallelize() (launch/parallelize.h)
// cuts every micro-batch with take_context_chunks before the model sees it, installs ring
// attention as every AttentionCore's core, and calls apply_context_parallel on the model so
// that layers which use absolute positions (PositionEmbedding; a rotary embedding) select the
// positions of their rank's chunks (context_positions).
#pragma once

#include "meshtrain/core/communicator.h"

#include <torch/torch.h>

#include <array>
#include <cstdint>

namespace meshtrain {

enum class ContextSplit { kBalanced, kContiguous };
const char* to_string(ContextSplit split);

// The two chunks (of 2 cp) that cp rank `rank` holds, in its local order.
std::array<int64_t, 2> context_chunks(int cp, int rank,
                                      ContextSplit split = ContextSplit::kBalanced);

// The global positions of this rank's local tokens: int64 [local_len], local_len = T / cp
// (even: two chunks of local_len / 2).
torch::Tensor context_positions(int64_t local_len, int cp, int rank,
                                ContextSplit split = ContextSplit::kBalanced);

// This rank's tokens of a full-sequence tensor: its two chunks along `dim` (full.size(dim) = T,
// divisible by 2 cp), concatenated -> size T / cp along dim. No communication, no autograd
// across ranks (a plain index: its backward scatters into the full tensor's gradient).
torch::Tensor take_context_chunks(const torch::Tensor& full, int64_t dim, int cp, int rank,
                                  ContextSplit split = ContextSplit::kBalanced);

// The inverse over a cp group: every rank's local tensor (size T / cp along dim) gathered and
// put back in sequence order -> size T along dim, on every rank. Collective over `group`; no
// autograd (for tests, evaluation and sampling).
torch::Tensor gather_context_chunks(const torch::Tensor& local, int64_t dim,
                                    const CommunicatorPtr& group,
                                    ContextSplit split = ContextSplit::kBalanced);

// The context-parallel layout a layer is given.
struct ContextParallelism {
  CommunicatorPtr group; // the cp group (a group of one: no context parallelism)
  ContextSplit split = ContextSplit::kBalanced;
  int size() const { return group->size(); }
  int rank() const { return group->rank(); }
};

// A layer whose forward depends on the absolute positions of its tokens (mixed into the
// layer's module class).
class ContextParallelLayer {
public:
  virtual ~ContextParallelLayer() = default;
  // From now on the layer's input is this rank's local sequence (see above).
  virtual void apply_context_parallel(const ContextParallelism& cp) = 0;
};

// Calls apply_context_parallel on every module of `root` (the root included) that is a
// ContextParallelLayer.
void apply_context_parallel(torch::nn::Module& root, const ContextParallelism& cp);

} // namespace meshtrain
