// defines: VocabParallelEmbeddingOptions, VocabParallelEmbeddingImpl, VocabParallelEmbedding —
// a token embedding whose vocabulary rows are cut over the TP group (nanoGPT's wte).
//
// Padding (DESIGN §4): the vocab V is padded to Vp, the next multiple of
// lcm(pad_to_multiple_of, tp) (64 by default, so a multiple of 64 and of tp). Rank r holds rows
// [r*Vp/tp, (r+1)*Vp/tp) of the padded table: weight [Vp/tp, C]. Padded rows are 0, are never
// looked up by valid ids (ids must be in [0, V)) and are cut off by export (ShardSpec
// unpadded_size = V).
//
// Forward: ids [B, T] (int64) -> each rank looks up the ids in its range (others give 0)
// -> [B, T, C] partial -> all-reduce: [B, T, C] replicated; or, with sequence_parallel,
// reduce-scatter along T: [B, T/tp, C] (T must be divisible by tp).
// logits(): the tied output projection (lm_head = wte): x [B, T, C] replicated (or
// [B, T/tp, C] sequence shards, all-gathered) -> [B, T, Vp/tp], this rank's vocab columns,
// ready for vocab_parallel_cross_entropy (never gathered).
//
// Init: the unpadded master [V, C] ~ normal(0, init_std) (one normal_, as a serial
// nn::Embedding-shaped tensor), padded with zero rows to Vp, then cut.
#pragma once

#include "meshtrain/core/communicator.h"
#include "meshtrain/parallel/sharding.h"
#include "meshtrain/parallel/tensor_parallel_layer.h"

#include <torch/torch.h>

namespace meshtrain {

struct VocabParallelEmbeddingOptions {
  VocabParallelEmbeddingOptions(int64_t num_embeddings, int64_t embedding_dim)
      : num_embeddings_(num_embeddings), embedding_dim_(embedding_dim) {}
  TORCH_ARG(int64_t, num_embeddings); // V, unpadded
  TORCH_ARG(int64_t, embedding_dim);  // C
  TORCH_ARG(int64_t, pad_to_multiple_of) = 64;
  // Output (and logits() input) are sequence shards [B, T/tp, C].
  TORCH_ARG(bool, sequence_parallel) = false;
  TORCH_ARG(double, init_std) = 0.02;
};

// Vp for V rows over `tp` ranks: the next multiple of lcm(multiple, tp).
int64_t padded_vocab_size(int64_t vocab_size, int64_t multiple, int tp);

class VocabParallelEmbeddingImpl : public torch::nn::Cloneable<VocabParallelEmbeddingImpl>,
                                   public ShardedModule,
                                   public TensorParallelLayer {
public:
  // Without a group: the serial layer (the whole padded table), until apply_tensor_parallel
  // (which re-pads the vocab for tp and keeps this rank's rows).
  explicit VocabParallelEmbeddingImpl(VocabParallelEmbeddingOptions options,
                                      CommunicatorPtr tp_group = make_self_communicator());

  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  // Keeps this rank's shard of the full weights (see tensor_parallel_layer.h).
  void apply_tensor_parallel(const TensorParallelism& tp) override;

  // ids [B, T] -> [B, T, C] (sequence_parallel: [B, T/tp, C]).
  torch::Tensor forward(const torch::Tensor& ids);
  // Tied output projection: [B, T, C] (or [B, T/tp, C]) -> [B, T, Vp/tp].
  torch::Tensor logits(const torch::Tensor& x);

  const VocabParallelEmbeddingOptions& options() const { return options_; }
  int64_t padded_num_embeddings() const { return padded_; }
  // This rank's rows [vocab_start, vocab_end) of the padded table.
  int64_t vocab_start() const { return start_; }
  int64_t vocab_end() const { return start_ + padded_ / tp_group_->size(); }

  torch::Tensor weight; // [Vp/tp, C]

private:
  VocabParallelEmbeddingOptions options_;
  CommunicatorPtr tp_group_;
  int64_t padded_ = 0;
  int64_t start_ = 0;
};

TORCH_MODULE(VocabParallelEmbedding);

} // namespace meshtrain
