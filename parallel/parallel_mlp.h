// defines: ParallelMLPOptions, ParallelMLPImpl, ParallelMLP — nanoGPT's MLP with the hidden
// dim split over the TP group.
//
// Parameters (nanoGPT names):
//   c_fc.weight [4C/tp, C], c_fc.bias [4C/tp]   column-parallel
//   c_proj.weight [C, 4C/tp], c_proj.bias [C]   row-parallel
// Forward: x [B, T, C] (sequence_parallel: [B, T/tp, C]) -> c_fc [B, T, 4C/tp] -> exact (erf)
// GELU -> c_proj [B, T, C] (all-reduce) or [B, T/tp, C] (reduce-scatter) -> residual dropout.
// Init draws, in order: c_fc.weight [4C, C] ~ N(0, 0.02), c_proj.weight [C, 4C] ~
// N(0, 0.02/sqrt(2*n_layer)); biases are 0.
#pragma once

#include "meshtrain/core/communicator.h"
#include "meshtrain/parallel/column_parallel_linear.h"
#include "meshtrain/parallel/rng_tracker.h"
#include "meshtrain/parallel/row_parallel_linear.h"
#include "meshtrain/parallel/tensor_parallel_layer.h"

#include <torch/torch.h>

namespace meshtrain {

struct ParallelMLPOptions {
  explicit ParallelMLPOptions(int64_t n_embd) : n_embd_(n_embd) {}
  TORCH_ARG(int64_t, n_embd);
  // c_proj's init std is 0.02 / sqrt(2 * n_layer).
  TORCH_ARG(int64_t, n_layer) = 1;
  TORCH_ARG(double, dropout) = 0.0;
  TORCH_ARG(bool, sequence_parallel) = false;
};

class ParallelMLPImpl : public torch::nn::Cloneable<ParallelMLPImpl>, public TensorParallelLayer {
public:
  // Serial until apply_tensor_parallel. `rng` may be null when dropout is 0.
  explicit ParallelMLPImpl(ParallelMLPOptions options,
                           CommunicatorPtr tp_group = make_self_communicator(),
                           RngTrackerPtr rng = nullptr);

  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  // Splits the hidden dim (c_fc and c_proj cut their own weights).
  void apply_tensor_parallel(const TensorParallelism& tp) override;

  // [B, T, C] -> [B, T, C]; under sequence parallelism [B, T/tp, C] -> [B, T/tp, C].
  torch::Tensor forward(const torch::Tensor& x);

  const ParallelMLPOptions& options() const { return options_; }

  ColumnParallelLinear c_fc{nullptr};
  RowParallelLinear c_proj{nullptr};

private:
  ParallelMLPOptions options_;
  CommunicatorPtr tp_group_;
  RngTrackerPtr rng_;
};

TORCH_MODULE(ParallelMLP);

} // namespace meshtrain
