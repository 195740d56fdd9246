// defines: ParallelTransformerBlockImpl (see parallel_transformer_block.h).
#include "meshtrain/parallel/parallel_transformer_block.h"

#include "meshtrain/core/errors.h"

namespace meshtrain {

ParallelTransformerBlockImpl::ParallelTransformerBlockImpl(ParallelTransformerBlockOptions options,
                                                           CommunicatorPtr tp_group,
                                                           RngTrackerPtr rng)
    : options_(std::move(options)), tp_group_(std::move(tp_group)), rng_(std::move(rng)) {
  MT_CHECK(tp_group_ != nullptr, "ParallelTransformerBlock: the tp communicator is null");
  reset();
}

void ParallelTransformerBlockImpl::reset() {
  const auto& o = options_;
  const bool sp = o.sequence_parallel();
  // Registration order = draw order = the serial block's parameter order.
  ln_1 = register_module(
      "ln_1",
      ParallelLayerNorm(
          ParallelLayerNormOptions(o.n_embd()).eps(o.layer_norm_eps()).sequence_parallel(sp),
          tp_group_));
  attn = register_module("attn",
                         ParallelSelfAttention(ParallelSelfAttentionOptions(o.n_embd(), o.n_head())
                                                   .n_layer(o.n_layer())
                                                   .dropout(o.dropout())
                                                   .sequence_parallel(sp),
                                               tp_group_, rng_));
  ln_2 = register_module(
      "ln_2",
      ParallelLayerNorm(
          ParallelLayerNormOptions(o.n_embd()).eps(o.layer_norm_eps()).sequence_parallel(sp),
          tp_group_));
  mlp = register_module("mlp", ParallelMLP(ParallelMLPOptions(o.n_embd())
                                               .n_layer(o.n_layer())
                                               .dropout(o.dropout())
                                               .sequence_parallel(sp),
                                           tp_group_, rng_));
}

void ParallelTransformerBlockImpl::apply_tensor_parallel(const TensorParallelism& tp) {
  MT_CHECK(tp.group != nullptr, "ParallelTransformerBlock: the tp communicator is null");
  options_.sequence_parallel(tp.sequence_parallel);
  tp_group_ = tp.group;
}

void ParallelTransformerBlockImpl::pretty_print(std::ostream& stream) const {
  stream << "meshtrain::ParallelTransformerBlock(n_embd=" << options_.n_embd()
         << ", n_head=" << options_.n_head() << ", tp=" << tp_group_->size()
         << ", sequence_parallel=" << (options_.sequence_parallel() ? "true" : "false") << ")";
}

torch::Tensor ParallelTransformerBlockImpl::forward(const torch::Tensor& x) {
  auto h = x + attn(ln_1(x)); // [B, T, C] or [B, T/tp, C]
  return h + mlp(ln_2(h));
}

} // namespace meshtrain
