// defines: RowParallelLinearOptions, RowParallelLinearImpl, RowParallelLinear —
// y = x W^T + b with W [out, in] cut along in (columns) over the TP group: each rank
// multiplies its slice of the input features and the partial outputs are summed.
//
// Shapes (tp = group size):
//   weight [out, in/tp] (sharded, ShardSpec dim 1), bias [out] (replicated)
//   input  [B, T, in/tp] (input_is_parallel) or [B, T, in] replicated (split here)
//   output [B, T, out] replicated: all-reduce of the partial products
//          [B, T/tp, out] under sequence_parallel: reduce-scatter along T instead
// The bias is added after the reduction (once, not tp times). Under sequence parallelism it
// meets only this rank's tokens, so its gradient is all-reduced over TP inside autograd
// (ShardSpec::sequence_parallel = true).
//
// Init: the full master weight [out, in] ~ normal(0, init_std) on every rank (one normal_
// call), this rank keeps its columns. Bias 0, no draw.
#pragma once

#include "meshtrain/core/communicator.h"
#include "meshtrain/parallel/sharding.h"
#include "meshtrain/parallel/tensor_parallel_layer.h"

#include <torch/torch.h>

namespace meshtrain {

struct RowParallelLinearOptions {
  RowParallelLinearOptions(int64_t in_features, int64_t out_features)
      : in_features_(in_features), out_features_(out_features) {}
  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(int64_t, out_features);
  TORCH_ARG(bool, bias) = true;
  // The input is already cut along its last dim ([.., in/tp], e.g. a column-parallel
  // output); otherwise the full input is split here.
  TORCH_ARG(bool, input_is_parallel) = false;
  // Reduce-scatter the output along the sequence ([B, T/tp, out]); needs input_is_parallel.
  TORCH_ARG(bool, sequence_parallel) = false;
  TORCH_ARG(double, init_std) = 0.02;
};

class RowParallelLinearImpl : public torch::nn::Cloneable<RowParallelLinearImpl>,
                              public ShardedModule,
                              public TensorParallelLayer {
public:
  // Without a group: the serial layer (full weight), until apply_tensor_parallel.
  explicit RowParallelLinearImpl(RowParallelLinearOptions options,
                                 CommunicatorPtr tp_group = make_self_communicator());

  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  // Keeps this rank's shard of the full weights (see tensor_parallel_layer.h).
  void apply_tensor_parallel(const TensorParallelism& tp) override;

  // [B, T, in/tp] (or [B, T, in]) -> [B, T, out] (or [B, T/tp, out] under sequence
  // parallelism).
  torch::Tensor forward(const torch::Tensor& x);

  const RowParallelLinearOptions& options() const { return options_; }
  const CommunicatorPtr& tp_group() const { return tp_group_; }

  torch::Tensor weight; // [out, in/tp]
  torch::Tensor bias;   // [out], undefined without bias

private:
  RowParallelLinearOptions options_;
  CommunicatorPtr tp_group_;
};

TORCH_MODULE(RowParallelLinear);

} // namespace meshtrain
