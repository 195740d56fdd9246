// defines: ParallelRMSNormOptions, ParallelRMSNormImpl, ParallelRMSNorm — RMSNorm over the last
// dim with a replicated weight (Llama's; Zhang & Sennrich 2019), computed in fp32 whatever the
// input dtype, aware of sequence parallelism like ParallelLayerNorm.
//
//   y = weight * (x / sqrt(mean(x^2 over C) + eps))
// The normalisation runs in fp32 and is rounded to the input dtype before the weight is
// applied, as Hugging Face's LlamaRMSNorm does (DESIGN §3 "Mixed precision": norms in fp32).
//
// Shapes: weight [C] = 1 (no draw); input/output [.., C], or [B, T/tp, C] under sequence
// parallelism. There each rank normalises its own tokens, so the weight's gradient covers
// only those: it passes through copy_params_to_sequence_parallel_region, whose backward
// all-reduces it over TP, and weight.grad is the full gradient, identical on every TP rank,
// when backward returns. ShardSpec: replicated, sequence_parallel = the option.
#pragma once

#include "meshtrain/core/communicator.h"
#include "meshtrain/parallel/sharding.h"
#include "meshtrain/parallel/tensor_parallel_layer.h"

#include <torch/torch.h>

namespace meshtrain {

struct ParallelRMSNormOptions {
  explicit ParallelRMSNormOptions(int64_t normalized_size) : normalized_size_(normalized_size) {}
  TORCH_ARG(int64_t, normalized_size);
  TORCH_ARG(double, eps) = 1e-5;
  TORCH_ARG(bool, sequence_parallel) = false;
};

class ParallelRMSNormImpl : public torch::nn::Cloneable<ParallelRMSNormImpl>,
                            public ShardedModule,
                            public TensorParallelLayer {
public:
  explicit ParallelRMSNormImpl(ParallelRMSNormOptions options,
                               CommunicatorPtr tp_group = make_self_communicator());

  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  // Replicated weight: records the group and whether the input is a sequence shard.
  void apply_tensor_parallel(const TensorParallelism& tp) override;

  // [.., C] -> [.., C], in the input's dtype.
  torch::Tensor forward(const torch::Tensor& x);

  const ParallelRMSNormOptions& options() const { return options_; }

  torch::Tensor weight; // [C]

private:
  ParallelRMSNormOptions options_;
  CommunicatorPtr tp_group_;
};

TORCH_MODULE(ParallelRMSNorm);

} // namespace meshtrain
