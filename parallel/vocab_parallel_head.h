// defines: VocabParallelHeadOptions, VocabParallelHeadImpl, VocabParallelHead — an untied
// output projection (lm_head) whose vocabulary rows are cut over the TP group, padded like
// VocabParallelEmbedding so that its logits feed vocab_parallel_cross_entropy directly.
//
// Padding: V is padded to Vp, the next multiple of lcm(pad_to_multiple_of, tp)
// (padded_vocab_size). Rank r holds rows [r*Vp/tp, (r+1)*Vp/tp) of the padded weight:
// weight [Vp/tp, C]. Padded rows are 0; their logits are excluded from the loss, so they get
// no gradient and stay 0 (ShardSpec unpadded_size = V: export cuts them off).
//
// Forward: x [B, T, C] replicated (sequence_parallel: [B, T/tp, C], all-gathered first)
// -> [B, T, Vp/tp], this rank's vocab columns, never gathered. Backward: one all-reduce of
// x's gradient (sequence parallel: one reduce-scatter).
//
// Init: the unpadded master [V, C] ~ normal(0, init_std) (one normal_, a serial nn::Linear
// weight's shape), padded with zero rows to Vp, then cut.
#pragma once

#include "meshtrain/core/communicator.h"
#include "meshtrain/parallel/sharding.h"
#include "meshtrain/parallel/tensor_parallel_layer.h"

#include <torch/torch.h>

namespace meshtrain {

struct VocabParallelHeadOptions {
  VocabParallelHeadOptions(int64_t embedding_dim, int64_t vocab_size)
      : embedding_dim_(embedding_dim), vocab_size_(vocab_size) {}
  TORCH_ARG(int64_t, embedding_dim); // C
  TORCH_ARG(int64_t, vocab_size);    // V, unpadded
  TORCH_ARG(int64_t, pad_to_multiple_of) = 64;
  // The input is a sequence shard [B, T/tp, C].
  TORCH_ARG(bool, sequence_parallel) = false;
  TORCH_ARG(double, init_std) = 0.02;
};

class VocabParallelHeadImpl : public torch::nn::Cloneable<VocabParallelHeadImpl>,
                              public ShardedModule,
                              public TensorParallelLayer {
public:
  // Without a group: the serial layer (the whole padded weight), until apply_tensor_parallel
  // (which re-pads the vocab for tp and keeps this rank's rows).
  explicit VocabParallelHeadImpl(VocabParallelHeadOptions options,
                                 CommunicatorPtr tp_group = make_self_communicator());

  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  // Keeps this rank's shard of the full weight (see tensor_parallel_layer.h).
  void apply_tensor_parallel(const TensorParallelism& tp) override;

  // [B, T, C] (or [B, T/tp, C]) -> [B, T, Vp/tp].
  torch::Tensor forward(const torch::Tensor& x);

  const VocabParallelHeadOptions& options() const { return options_; }
  const CommunicatorPtr& tp_group() const { return tp_group_; }
  int64_t padded_vocab_size() const { return padded_; }

  torch::Tensor weight; // [Vp/tp, C]

private:
  VocabParallelHeadOptions options_;
  CommunicatorPtr tp_group_;
  int64_t padded_ = 0;
};

TORCH_MODULE(VocabParallelHead);

} // namespace meshtrain
