// defines: PositionEmbeddingImpl (see position_embedding.h).
#include "meshtrain/parallel/position_embedding.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/core/text.h"
#include "meshtrain/parallel/mappings.h"

namespace meshtrain {

PositionEmbeddingImpl::PositionEmbeddingImpl(PositionEmbeddingOptions options,
                                             CommunicatorPtr tp_group)
    : options_(std::move(options)), tp_group_(std::move(tp_group)) {
  MT_CHECK(tp_group_ != nullptr, "PositionEmbedding: the tp communicator is null");
  MT_CHECK(options_.num_positions() > 0 && options_.embedding_dim() > 0,
           "PositionEmbedding: num_positions (", options_.num_positions(), ") and embedding_dim (",
           options_.embedding_dim(), ") must be positive");
  reset();
}

void PositionEmbeddingImpl::reset() {
  weight = declare_parameter(*this, "weight", {options_.num_positions(), options_.embedding_dim()},
                             InitRule::normal(options_.init_std())); // [T, C]
}

void PositionEmbeddingImpl::apply_tensor_parallel(const TensorParallelism& tp) {
  MT_CHECK(tp.group != nullptr, "PositionEmbedding: the tp communicator is null");
  options_.sequence_parallel(tp.sequence_parallel);
  tp_group_ = tp.group;
}

void PositionEmbeddingImpl::apply_context_parallel(const ContextParallelism& cp) {
  MT_CHECK(cp.group != nullptr, "PositionEmbedding: the cp communicator is null");
  cp_ = cp;
}

void PositionEmbeddingImpl::pretty_print(std::ostream& stream) const {
  stream << "meshtrain::PositionEmbedding(num_positions=" << options_.num_positions()
         << ", embedding_dim=" << options_.embedding_dim()
         << ", sequence_parallel=" << (options_.sequence_parallel() ? "true" : "false") << ")";
}

torch::Tensor PositionEmbeddingImpl::forward(int64_t t) {
  const int64_t cp = cp_.size();
  MT_CHECK(t >= 1 && t * cp <= options_.num_positions(), "PositionEmbedding: sequence length ",
           t * cp, cp > 1 ? cat(" (", t, " local tokens x cp ", cp, ")") : std::string(),
           " must be in [1, num_positions = ", options_.num_positions(), "]");
  torch::Tensor pos;
  if (cp > 1) {
    // The rows of this rank's two chunks of the t x cp positions.
    pos = weight.index_select(0, context_positions(t, cp, cp_.rank(), cp_.split))
              .unsqueeze(0); // [1, t, C]
  } else {
    pos = weight.narrow(0, 0, t).unsqueeze(0); // [1, t, C]
  }
  if (options_.sequence_parallel()) {
    MT_CHECK(t % tp_group_->size() == 0, "PositionEmbedding: with sequence parallelism tp (",
             tp_group_->size(), ") must divide the sequence length (", t, ")");
    pos = scatter_to_sequence_parallel_region(pos, tp_group_); // [1, t/tp, C]
  }
  return pos;
}

} // namespace meshtrain
