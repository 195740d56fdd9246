// defines: ParallelSelfAttentionOptions, ParallelSelfAttentionImpl, ParallelSelfAttention —
// nanoGPT's causal self-attention with its heads split over the TP group.
//
// Parameters (nanoGPT names, DESIGN §4):
//   c_attn.weight [3C/tp, C], c_attn.bias [3C/tp]  column-parallel, blocks = 3: the master
//       [3C, C] is q|k|v; this rank keeps the rows of ITS heads from each block:
//       q rows [r*C/tp, (r+1)*C/tp), the same range of k (offset C) and of v (offset 2C).
//   c_proj.weight [C, C/tp], c_proj.bias [C]       row-parallel (input = this rank's heads)
// Forward, with H heads of size D = C/H and h = H/tp local heads:
//   x [B, T, C] (sequence_parallel: [B, T/tp, C])
//   c_attn -> [B, T, 3C/tp] = q|k|v of the local heads, each viewed [B, T, h, D] -> [B, h, T, D]
//   softmax(q k^T / sqrt(D), causal) -> [B, h, T, T], dropout (per-TP-rank stream)
//   att v -> [B, h, T, D] -> [B, T, C/tp]
//   c_proj -> [B, T, C] (all-reduce) or [B, T/tp, C] (reduce-scatter), residual dropout
//   (shared stream; per-TP-rank under sequence parallelism, see rng_tracker.h)
// Init draws, in order: c_attn.weight [3C, C] ~ N(0, 0.02), c_proj.weight [C, C] ~
// N(0, 0.02/sqrt(2*n_layer)); biases are 0.
#pragma once

#include "meshtrain/core/communicator.h"
#include "meshtrain/parallel/column_parallel_linear.h"
#include "meshtrain/parallel/parallel_model.h"
#include "meshtrain/parallel/rng_tracker.h"
#include "meshtrain/parallel/row_parallel_linear.h"
#include "meshtrain/parallel/tensor_parallel_layer.h"

#include <torch/torch.h>

#include <functional>

namespace meshtrain {

struct ParallelSelfAttentionOptions {
  ParallelSelfAttentionOptions(int64_t n_embd, int64_t n_head) : n_embd_(n_embd), n_head_(n_head) {}
  TORCH_ARG(int64_t, n_embd);
  TORCH_ARG(int64_t, n_head);
  // Layers of the model: c_proj's init std is 0.02 / sqrt(2 * n_layer).
  TORCH_ARG(int64_t, n_layer) = 1;
  // Attention-probability and residual dropout (nanoGPT's single `dropout`).
  TORCH_ARG(double, dropout) = 0.0;
  // Input and output are sequence shards [B, T/tp, C].
  TORCH_ARG(bool, sequence_parallel) = false;
};

class ParallelSelfAttentionImpl : public torch::nn::Cloneable<ParallelSelfAttentionImpl>,
                                  public TensorParallelLayer,
                                  public AttentionCore {
public:
  // Serial (all heads) until apply_tensor_parallel. `rng` may be null when dropout is 0.
  explicit ParallelSelfAttentionImpl(ParallelSelfAttentionOptions options,
                                     CommunicatorPtr tp_group = make_self_communicator(),
                                     RngTrackerPtr rng = nullptr);

  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  // Keeps this rank's heads (c_attn and c_proj cut their own weights).
  void apply_tensor_parallel(const TensorParallelism& tp) override;

  // [B, T, C] -> [B, T, C]; under sequence parallelism [B, T/tp, C] -> [B, T/tp, C].
  torch::Tensor forward(const torch::Tensor& x);

  const ParallelSelfAttentionOptions& options() const { return options_; }
  int64_t local_heads() const { return options_.n_head() / tp_group_->size(); }

  // The attention core (parallel_model.h): q, k, v [B, h, T, D] -> [B, h, T, D].
  using CoreFn = AttentionCoreFn;
  using CoreWrapper = AttentionCoreWrapper;
  // Runs the core through `wrapper` in forward (selective recomputation, installed by
  // parallelize). Empty: the core runs as is.
  void set_core_wrapper(CoreWrapper wrapper) override { core_wrapper_ = std::move(wrapper); }

  ColumnParallelLinear c_attn{nullptr};
  RowParallelLinear c_proj{nullptr};

private:
  ParallelSelfAttentionOptions options_;
  CommunicatorPtr tp_group_;
  RngTrackerPtr rng_;
  CoreWrapper core_wrapper_;
};

TORCH_MODULE(ParallelSelfAttention);

// Throws unless `options` can be split over `tp` ranks; the messages name the values.
void check_attention_split(const ParallelSelfAttentionOptions& options, int tp);

} // namespace meshtrain
