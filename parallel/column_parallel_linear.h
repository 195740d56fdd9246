// defines: ColumnParallelLinearOptions, ColumnParallelLinearImpl, ColumnParallelLinear —
// y = x W^T + b with W [out, in] cut along out (rows) over the TP group.
//
// Shapes (tp = group size):
//   weight [out/tp, in], bias [out/tp] (both sharded, ShardSpec dim 0)
//   input  [B, T, in] replicated      (sequence_parallel: [B, T/tp, in], all-gathered first)
//   output [B, T, out/tp]             (gather_output: [B, T, out], replicated)
// Any leading dims work without sequence parallelism; with it the input must be [B, T, C].
//
// blocks(k): the out dim is k equal blocks laid end to end (c_attn: q|k|v, k = 3) and each
// block is cut over the group, so the local output is [.., k*out/(k*tp)] = this rank's cut of
// block 0, then of block 1, ... (see shard_tensor.h). Not combinable with gather_output.
//
// Init: draws the full master weight [out, in] ~ normal(0, init_std) from the default
// generator on every rank (one normal_ call, the same as a serial nn::Linear-shaped tensor),
// then keeps its rows. The bias starts at 0 and draws nothing.
#pragma once

#include "meshtrain/core/communicator.h"
#include "meshtrain/parallel/sharding.h"
#include "meshtrain/parallel/tensor_parallel_layer.h"

#include <torch/torch.h>

namespace meshtrain {

struct ColumnParallelLinearOptions {
  ColumnParallelLinearOptions(int64_t in_features, int64_t out_features)
      : in_features_(in_features), out_features_(out_features) {}
  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(int64_t, out_features);
  TORCH_ARG(bool, bias) = true;
  // All-gather the output along the last dim so every rank has [.., out].
  TORCH_ARG(bool, gather_output) = true;
  // The input is a sequence shard [B, T/tp, in]: all-gather it along T instead of copying.
  TORCH_ARG(bool, sequence_parallel) = false;
  // Number of equal blocks the out dim is made of, each cut over the group.
  TORCH_ARG(int64_t, blocks) = 1;
  // Std of the normal init of the master weight.
  TORCH_ARG(double, init_std) = 0.02;
};

class ColumnParallelLinearImpl : public torch::nn::Cloneable<ColumnParallelLinearImpl>,
                                 public ShardedModule,
                                 public TensorParallelLayer {
public:
  // Without a group: the serial layer (full weight), until apply_tensor_parallel.
  explicit ColumnParallelLinearImpl(ColumnParallelLinearOptions options,
                                    CommunicatorPtr tp_group = make_self_communicator());

  // Draws the master weight (see above) and registers weight and bias.
  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  // Keeps this rank's shard of the full weights (see tensor_parallel_layer.h).
  void apply_tensor_parallel(const TensorParallelism& tp) override;

  // [B, T, in] (or [B, T/tp, in] under sequence parallelism) -> [B, T, out/tp]
  // (or [B, T, out] with gather_output).
  torch::Tensor forward(const torch::Tensor& x);

  const ColumnParallelLinearOptions& options() const { return options_; }
  const CommunicatorPtr& tp_group() const { return tp_group_; }

  torch::Tensor weight; // [out/tp, in]
  torch::Tensor bias;   // [out/tp], undefined without bias

private:
  ColumnParallelLinearOptions options_;
  CommunicatorPtr tp_group_;
};

TORCH_MODULE(ColumnParallelLinear);

} // namespace meshtrain
