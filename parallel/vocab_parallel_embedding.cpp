// defines: VocabParallelEmbeddingImpl, padded_vocab_size (see vocab_parallel_embedding.h).
#include "meshtrain/parallel/vocab_parallel_embedding.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/parallel/mappings.h"
#include "meshtrain/parallel/shard_tensor.h"

#include <numeric>

namespace meshtrain {

int64_t padded_vocab_size(int64_t vocab_size, int64_t multiple, int tp) {
  MT_CHECK(vocab_size > 0 && multiple > 0 && tp > 0, "padded_vocab_size: vocab size (", vocab_size,
           "), multiple (", multiple, ") and tp (", tp, ") must be positive");
  const int64_t step = std::lcm(multiple, static_cast<int64_t>(tp));
  return (vocab_size + step - 1) / step * step;
}

VocabParallelEmbeddingImpl::VocabParallelEmbeddingImpl(VocabParallelEmbeddingOptions options,
                                                       CommunicatorPtr tp_group)
    : options_(std::move(options)), tp_group_(std::move(tp_group)) {
  MT_CHECK(tp_group_ != nullptr, "VocabParallelEmbedding: the tp communicator is null");
  MT_CHECK(options_.embedding_dim() > 0, "VocabParallelEmbedding: embedding_dim (",
           options_.embedding_dim(), ") must be positive");
  padded_ = padded_vocab_size(options_.num_embeddings(), options_.pad_to_multiple_of(),
                              tp_group_->size());
  start_ = tp_group_->rank() * (padded_ / tp_group_->size());
  reset();
}

void VocabParallelEmbeddingImpl::reset() {
  const int tp = tp_group_->size();
  const int rank = tp_group_->rank();
  // Rows of the whole [V, C] table padded to [Vp, C] (padding rows 0).
  weight = declare_parameter(*this, "weight", {options_.num_embeddings(), options_.embedding_dim()},
                             InitRule::normal(options_.init_std()),
                             partitioned_spec(0, padded_, rank, tp, options_.num_embeddings()), tp);
}

void VocabParallelEmbeddingImpl::pretty_print(std::ostream& stream) const {
  stream << "meshtrain::VocabParallelEmbedding(num_embeddings=" << options_.num_embeddings()
         << ", padded=" << padded_ << ", embedding_dim=" << options_.embedding_dim()
         << ", tp=" << tp_group_->size() << ", rows=[" << vocab_start() << ", " << vocab_end()
         << "), sequence_parallel=" << (options_.sequence_parallel() ? "true" : "false") << ")";
}

torch::Tensor VocabParallelEmbeddingImpl::forward(const torch::Tensor& ids) {
  MT_CHECK(ids.scalar_type() == torch::kLong || ids.scalar_type() == torch::kInt,
           "VocabParallelEmbedding: ids must be int64 or int32, got ", ids.scalar_type());
  MT_CHECK(!options_.sequence_parallel() || ids.dim() == 2,
           "VocabParallelEmbedding: with sequence_parallel the ids must be [B, T], got sizes ",
           ids.sizes());
  const auto outside = (ids < start_) | (ids >= vocab_end()); // [B, T] bool
  // Ids of other ranks look up local row 0 and are zeroed below.
  const auto local = (ids - start_).masked_fill(outside, 0);
  auto partial = torch::nn::functional::embedding(local, weight) // [B, T, C]
                     .masked_fill(outside.unsqueeze(-1), 0.0);
  return options_.sequence_parallel()
             ? reduce_scatter_to_sequence_parallel_region(partial, tp_group_) // [B, T/tp, C]
             : reduce_from_tp_region(partial, tp_group_);                     // [B, T, C]
}

torch::Tensor VocabParallelEmbeddingImpl::logits(const torch::Tensor& x) {
  MT_CHECK(x.dim() >= 1 && x.size(-1) == options_.embedding_dim(),
           "VocabParallelEmbedding::logits: input has sizes ", x.sizes(),
           "; its last dim must be embedding_dim (", options_.embedding_dim(), ")");
  const auto input = options_.sequence_parallel()
                         ? gather_from_sequence_parallel_region(x, tp_group_) // [B, T, C]
                         : copy_to_tp_region(x, tp_group_);
  return torch::nn::functional::linear(input, weight); // [B, T, Vp/tp]
}

void VocabParallelEmbeddingImpl::apply_tensor_parallel(const TensorParallelism& tp) {
  MT_CHECK(tp_group_->size() == 1, "VocabParallelEmbedding: already laid out over a group of ",
           tp_group_->size(), " ranks; apply_tensor_parallel takes a serial layer");
  MT_CHECK(tp.group != nullptr, "VocabParallelEmbedding: the tp communicator is null");
  const int size = tp.group->size();
  const int rank = tp.group->rank();
  const int64_t vocab = options_.num_embeddings();
  // The serial table is padded for one rank; pad it for `size` ranks, then keep this rank's
  // rows (the shard a layer built on the group would have drawn).
  padded_ = padded_vocab_size(vocab, options_.pad_to_multiple_of(), size);
  keep_vocab_shard(weight, vocab, padded_, rank, size);
  set_shard_spec("weight", partitioned_spec(0, padded_, rank, size, vocab));
  start_ = rank * (padded_ / size);
  options_.sequence_parallel(tp.sequence_parallel);
  tp_group_ = tp.group;
}

} // namespace meshtrain
