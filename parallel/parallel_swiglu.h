// defines: ParallelSwiGLUOptions, ParallelSwiGLUImpl, ParallelSwiGLU — the gated MLP of Llama
// (Shazeer 2020), down(silu(gate(x)) * up(x)), in Hugging Face's names, with the hidden dim
// split over the TP group.
//
// Parameters (C = n_embd, F = ffn_dim, tp = TP group size; no biases):
//   gate_proj.weight [F/tp, C]   column-parallel
//   up_proj.weight   [F/tp, C]   column-parallel
//   down_proj.weight [C, F/tp]   row-parallel
// Forward: x [B, T, C] (sequence_parallel: [B, T/tp, C])
//   -> gate, up = column_parallel_fanout(gate_proj, up_proj)(x)   [B, T, F/tp] each, one entry
//      into the region (sequence parallel: one all-gather, backward one reduce-scatter)
//   -> silu(gate) * up -> down_proj -> [B, T, C] (all-reduce) or [B, T/tp, C] (reduce-scatter)
// Init draws, in order: gate_proj [F, C], up_proj [F, C] ~ N(0, init_std), down_proj [C, F] ~
// N(0, init_std/sqrt(2*n_layer)).
#pragma once

#include "meshtrain/core/communicator.h"
#include "meshtrain/parallel/column_parallel_linear.h"
#include "meshtrain/parallel/row_parallel_linear.h"
#include "meshtrain/parallel/tensor_parallel_layer.h"

#include <torch/torch.h>

namespace meshtrain {

struct ParallelSwiGLUOptions {
  ParallelSwiGLUOptions(int64_t n_embd, int64_t ffn_dim) : n_embd_(n_embd), ffn_dim_(ffn_dim) {}
  TORCH_ARG(int64_t, n_embd);  // C
  TORCH_ARG(int64_t, ffn_dim); // F, the hidden width
  // down_proj's init std is init_std / sqrt(2 * n_layer).
  TORCH_ARG(int64_t, n_layer) = 1;
  TORCH_ARG(double, init_std) = 0.02;
  TORCH_ARG(bool, sequence_parallel) = false;
};

class ParallelSwiGLUImpl : public torch::nn::Cloneable<ParallelSwiGLUImpl>,
                           public TensorParallelLayer {
public:
  // Serial until apply_tensor_parallel.
  explicit ParallelSwiGLUImpl(ParallelSwiGLUOptions options,
                              CommunicatorPtr tp_group = make_self_communicator());

  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  // Splits the hidden dim (the projections cut their own weights).
  void apply_tensor_parallel(const TensorParallelism& tp) override;

  // [B, T, C] -> [B, T, C]; under sequence parallelism [B, T/tp, C] -> [B, T/tp, C].
  torch::Tensor forward(const torch::Tensor& x);

  const ParallelSwiGLUOptions& options() const { return options_; }

  ColumnParallelLinear gate_proj{nullptr};
  ColumnParallelLinear up_proj{nullptr};
  RowParallelLinear down_proj{nullptr};

private:
  ParallelSwiGLUOptions options_;
  CommunicatorPtr tp_group_;
};

TORCH_MODULE(ParallelSwiGLU);

} // namespace meshtrain
