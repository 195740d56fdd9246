// defines: PositionEmbeddingOptions, PositionEmbeddingImpl, PositionEmbedding — learned
// absolute position embeddings (GPT-2's wpe), aware of sequence parallelism.
//
// weight [T, C] replicated over tp (ShardSpec replicated), drawn at construction as one
// normal_(0, init_std) of the full [T, C] tensor.
// forward(t): the first t rows as [1, t, C], to add to a [B, t, C] token embedding; under
// sequence parallelism this rank's rows [1, t/tp, C] (scatter_to_sequence_parallel_region:
// its backward all-gathers the gradient rows, so every tp rank ends with the full,
// identical gradient of the replicated weight).
// Under context parallelism (apply_context_parallel, parallel/context_parallel.h) t is the
// length of this rank's local sequence (T / cp tokens of a T-token sequence): forward(t)
// returns the rows of this rank's two chunks, context_positions(t, cp, rank), [1, t, C]
// (then scattered over tp under sequence parallelism). Their gradient lands on those rows
// only; the reduction over dp x cp sums the cp ranks' rows into the full gradient.
#pragma once

#include "meshtrain/core/communicator.h"
#include "meshtrain/parallel/context_parallel.h"
#include "meshtrain/parallel/sharding.h"
#include "meshtrain/parallel/tensor_parallel_layer.h"

#include <torch/torch.h>

namespace meshtrain {

struct PositionEmbeddingOptions {
  PositionEmbeddingOptions(int64_t num_positions, int64_t embedding_dim)
      : num_positions_(num_positions), embedding_dim_(embedding_dim) {}
  TORCH_ARG(int64_t, num_positions); // T, the longest sequence
  TORCH_ARG(int64_t, embedding_dim); // C
  TORCH_ARG(double, init_std) = 0.02;
  TORCH_ARG(bool, sequence_parallel) = false;
};

class PositionEmbeddingImpl : public torch::nn::Cloneable<PositionEmbeddingImpl>,
                              public ShardedModule,
                              public TensorParallelLayer,
                              public ContextParallelLayer {
public:
  explicit PositionEmbeddingImpl(PositionEmbeddingOptions options,
                                 CommunicatorPtr tp_group = make_self_communicator());

  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  // Replicated weight: records the group and whether the output is a sequence shard.
  void apply_tensor_parallel(const TensorParallelism& tp) override;
  // From now on forward(t) takes this rank's local sequence length (see above).
  void apply_context_parallel(const ContextParallelism& cp) override;

  // t in [1, num_positions] -> [1, t, C] (sequence parallel: [1, t/tp, C]); under context
  // parallelism t is the local length (t x cp <= num_positions).
  torch::Tensor forward(int64_t t);

  const PositionEmbeddingOptions& options() const { return options_; }

  torch::Tensor weight; // [T, C]

private:
  PositionEmbeddingOptions options_;
  CommunicatorPtr tp_group_;
  ContextParallelism cp_{make_self_communicator()};
};

TORCH_MODULE(PositionEmbedding);

} // namespace meshtrain
