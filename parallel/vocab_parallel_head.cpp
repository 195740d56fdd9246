// defines: VocabParallelHeadImpl (see vocab_parallel_head.h).
#include "meshtrain/parallel/vocab_parallel_head.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/parallel/mappings.h"
#include "meshtrain/parallel/shard_tensor.h"
#include "meshtrain/parallel/vocab_parallel_embedding.h"

namespace meshtrain {

VocabParallelHeadImpl::VocabParallelHeadImpl(VocabParallelHeadOptions options,
                                             CommunicatorPtr tp_group)
    : options_(std::move(options)), tp_group_(std::move(tp_group)) {
  MT_CHECK(tp_group_ != nullptr, "VocabParallelHead: the tp communicator is null");
  MT_CHECK(options_.embedding_dim() > 0, "VocabParallelHead: embedding_dim (",
           options_.embedding_dim(), ") must be positive");
  padded_ = meshtrain::padded_vocab_size(options_.vocab_size(), options_.pad_to_multiple_of(),
                                         tp_group_->size());
  reset();
}

void VocabParallelHeadImpl::reset() {
  const int tp = tp_group_->size();
  const int rank = tp_group_->rank();
  // Rows of the whole [V, C] weight padded to [Vp, C] (padding rows 0).
  weight = declare_parameter(*this, "weight", {options_.vocab_size(), options_.embedding_dim()},
                             InitRule::normal(options_.init_std()),
                             partitioned_spec(0, padded_, rank, tp, options_.vocab_size()), tp);
}

void VocabParallelHeadImpl::pretty_print(std::ostream& stream) const {
  stream << "meshtrain::VocabParallelHead(embedding_dim=" << options_.embedding_dim()
         << ", vocab_size=" << options_.vocab_size() << ", padded=" << padded_
         << ", tp=" << tp_group_->size()
         << ", sequence_parallel=" << (options_.sequence_parallel() ? "true" : "false") << ")";
}

torch::Tensor VocabParallelHeadImpl::forward(const torch::Tensor& x) {
  MT_CHECK(x.dim() >= 1 && x.size(-1) == options_.embedding_dim(),
           "VocabParallelHead: input has sizes ", x.sizes(),
           "; its last dim must be embedding_dim (", options_.embedding_dim(), ")");
  const auto input = options_.sequence_parallel()
                         ? gather_from_sequence_parallel_region(x, tp_group_) // [B, T, C]
                         : copy_to_tp_region(x, tp_group_);
  return torch::nn::functional::linear(input, weight); // [B, T, Vp/tp]
}

void VocabParallelHeadImpl::apply_tensor_parallel(const TensorParallelism& tp) {
  MT_CHECK(tp_group_->size() == 1, "VocabParallelHead: already laid out over a group of ",
           tp_group_->size(), " ranks; apply_tensor_parallel takes a serial layer");
  MT_CHECK(tp.group != nullptr, "VocabParallelHead: the tp communicator is null");
  const int size = tp.group->size();
  const int rank = tp.group->rank();
  const int64_t vocab = options_.vocab_size();
  // The serial weight is padded for one rank; pad it for `size` ranks, then keep this rank's
  // rows (the shard a layer built on the group would have drawn).
  padded_ = meshtrain::padded_vocab_size(vocab, options_.pad_to_multiple_of(), size);
  keep_vocab_shard(weight, vocab, padded_, rank, size);
  set_shard_spec("weight", partitioned_spec(0, padded_, rank, size, vocab));
  options_.sequence_parallel(tp.sequence_parallel);
  tp_group_ = tp.group;
}

} // namespace meshtrain
