// defines: GroupedQueryAttentionOptions, GroupedQueryAttentionImpl, GroupedQueryAttention —
// causal self-attention with grouped-query attention (Ainslie et al. 2023) and rotary
// position embedding, in Hugging Face's Llama names and conventions, with its query heads and
// its key/value heads split over the TP group.
//
// Parameters (H heads of size D = C/H, Hkv key/value heads, tp = TP group size; no biases
// unless qkv_bias):
//   q_proj.weight [H*D/tp, C]     column-parallel: this rank's query heads
//   k_proj.weight [Hkv*D/tp, C]   column-parallel: this rank's key/value heads
//   v_proj.weight [Hkv*D/tp, C]
//   o_proj.weight [C, H*D/tp]     row-parallel (its input is this rank's heads)
// Rank r holds query heads [r*H/tp, (r+1)*H/tp) and key/value heads [r*Hkv/tp, (r+1)*Hkv/tp):
// query head i reads key/value head i / (H/Hkv), so a rank's query heads read only its own
// key/value heads (tp must divide Hkv; ParallelPlan::validate checks it first).
//
// Forward, h = H/tp and hkv = Hkv/tp local heads:
//   x [B, T, C] (sequence_parallel: [B, T/tp, C])
//   q, k, v = column_parallel_fanout(q_proj, k_proj, v_proj)(x)   one entry into the region
//       -> [B, h, T, D], [B, hkv, T, D], [B, hkv, T, D]
//   q, k = rope(q), rope(k)        positions 0..T-1 of the full sequence (rotary_embedding.h)
//   core: k, v repeated to h heads; softmax(q k^T / sqrt(D), causal) v -> [B, h, T, D]
//   o_proj -> [B, T, C] (all-reduce) or [B, T/tp, C] (reduce-scatter)
// The core (q, k, v) -> out is an AttentionCore: selective recomputation wraps it, and it
// keeps only the small k and v (the repetition happens inside it).
//
// Init draws, in order: q_proj [H*D, C], k_proj [Hkv*D, C], v_proj [Hkv*D, C] ~ N(0, init_std),
// o_proj [C, H*D] ~ N(0, init_std/sqrt(2*n_layer)); biases 0.
#pragma once

#include "meshtrain/core/communicator.h"
#include "meshtrain/parallel/column_parallel_linear.h"
#include "meshtrain/parallel/parallel_model.h"
#include "meshtrain/parallel/rotary_embedding.h"
#include "meshtrain/parallel/row_parallel_linear.h"
#include "meshtrain/parallel/tensor_parallel_layer.h"

#include <torch/torch.h>

namespace meshtrain {

struct GroupedQueryAttentionOptions {
  GroupedQueryAttentionOptions(int64_t n_embd, int64_t n_head, int64_t n_kv_head)
      : n_embd_(n_embd), n_head_(n_head), n_kv_head_(n_kv_head) {}
  TORCH_ARG(int64_t, n_embd);    // C
  TORCH_ARG(int64_t, n_head);    // H
  TORCH_ARG(int64_t, n_kv_head); // Hkv, divides H (H: multi-head attention, 1: multi-query)
  // RoPE base.
  TORCH_ARG(double, rope_theta) = 10000.0;
  // Layers of the model: o_proj's init std is init_std / sqrt(2 * n_layer).
  TORCH_ARG(int64_t, n_layer) = 1;
  TORCH_ARG(double, init_std) = 0.02;
  // Biases on q_proj, k_proj and v_proj (Qwen2's); Llama has none.
  TORCH_ARG(bool, qkv_bias) = false;
  // Input and output are sequence shards [B, T/tp, C].
  TORCH_ARG(bool, sequence_parallel) = false;
};

class GroupedQueryAttentionImpl : public torch::nn::Cloneable<GroupedQueryAttentionImpl>,
                                  public TensorParallelLayer,
                                  public AttentionCore {
public:
  // Serial (all heads) until apply_tensor_parallel.
  explicit GroupedQueryAttentionImpl(GroupedQueryAttentionOptions options,
                                     CommunicatorPtr tp_group = make_self_communicator());

  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  // Keeps this rank's heads (the projections cut their own weights).
  void apply_tensor_parallel(const TensorParallelism& tp) override;

  // [B, T, C] -> [B, T, C]; under sequence parallelism [B, T/tp, C] -> [B, T/tp, C].
  torch::Tensor forward(const torch::Tensor& x);

  // Selective recomputation installs a wrapper (parallel_model.h); empty: the core runs as is.
  void set_core_wrapper(AttentionCoreWrapper wrapper) override {
    core_wrapper_ = std::move(wrapper);
  }

  const GroupedQueryAttentionOptions& options() const { return options_; }
  int64_t head_dim() const { return options_.n_embd() / options_.n_head(); }
  int64_t local_heads() const { return options_.n_head() / tp_group_->size(); }
  int64_t local_kv_heads() const { return options_.n_kv_head() / tp_group_->size(); }

  ColumnParallelLinear q_proj{nullptr};
  ColumnParallelLinear k_proj{nullptr};
  ColumnParallelLinear v_proj{nullptr};
  RowParallelLinear o_proj{nullptr};
  RotaryEmbedding rotary{nullptr}; // no parameters

private:
  GroupedQueryAttentionOptions options_;
  CommunicatorPtr tp_group_;
  AttentionCoreWrapper core_wrapper_;
};

TORCH_MODULE(GroupedQueryAttention);

// Throws unless `options` can be split over `tp` ranks; the messages name the values.
void check_grouped_attention_split(const GroupedQueryAttentionOptions& options, int tp);

} // namespace meshtrain
