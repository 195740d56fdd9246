// defines: ParallelLayerNormOptions, ParallelLayerNormImpl, ParallelLayerNorm — LayerNorm
// over the last dim with replicated weight/bias (the names and math of torch::nn::LayerNorm),
// aware of sequence parallelism.
//
// bf16/fp16 input: the statistics and affine are computed in fp32 and the output rounded
// back to the input dtype (DESIGN §3 "Mixed precision").
//
// Shapes: weight [C] = 1, bias [C] = 0 (no draws); input/output [B, T, C], or [B, T/tp, C]
// under sequence parallelism. There each rank normalises its own tokens, so the gradients
// of weight and bias cover only those tokens: they pass through
// copy_params_to_sequence_parallel_region, whose backward all-reduces them over TP (one call
// for both), and param.grad is the full gradient, identical on every TP rank, when backward
// returns. ShardSpec: replicated, sequence_parallel = the option.
#pragma once

#include "meshtrain/core/communicator.h"
#include "meshtrain/parallel/sharding.h"
#include "meshtrain/parallel/tensor_parallel_layer.h"

#include <torch/torch.h>

namespace meshtrain {

struct ParallelLayerNormOptions {
  explicit ParallelLayerNormOptions(int64_t normalized_size) : normalized_size_(normalized_size) {}
  TORCH_ARG(int64_t, normalized_size);
  TORCH_ARG(double, eps) = 1e-5;
  TORCH_ARG(bool, sequence_parallel) = false;
};

class ParallelLayerNormImpl : public torch::nn::Cloneable<ParallelLayerNormImpl>,
                              public ShardedModule,
                              public TensorParallelLayer {
public:
  explicit ParallelLayerNormImpl(ParallelLayerNormOptions options,
                                 CommunicatorPtr tp_group = make_self_communicator());

  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  // Replicated weights: records the group and whether the input is a sequence shard.
  void apply_tensor_parallel(const TensorParallelism& tp) override;

  // [.., C] -> [.., C]
  torch::Tensor forward(const torch::Tensor& x);

  const ParallelLayerNormOptions& options() const { return options_; }

  torch::Tensor weight; // [C]
  torch::Tensor bias;   // [C]

private:
  ParallelLayerNormOptions options_;
  CommunicatorPtr tp_group_;
};

TORCH_MODULE(ParallelLayerNorm);

} // namespace meshtrain
