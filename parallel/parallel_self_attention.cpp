// defines: ParallelSelfAttentionImpl, check_attention_split (see parallel_self_attention.h).
#include "meshtrain/parallel/parallel_self_attention.h"

#include "meshtrain/core/errors.h"

#include <cmath>

namespace meshtrain {

void check_attention_split(const ParallelSelfAttentionOptions& o, int tp) {
  MT_CHECK(o.n_embd() > 0 && o.n_head() > 0, "ParallelSelfAttention: n_embd (", o.n_embd(),
           ") and n_head (", o.n_head(), ") must be positive");
  MT_CHECK(o.n_embd() % o.n_head() == 0, "ParallelSelfAttention: n_embd (", o.n_embd(),
           ") must be divisible by n_head (", o.n_head(), ")");
  MT_CHECK(o.n_embd() % tp == 0, "ParallelSelfAttention: n_embd (", o.n_embd(),
           ") must be divisible by tp (", tp, ")");
  MT_CHECK(o.n_head() % tp == 0, "ParallelSelfAttention: n_head (", o.n_head(),
           ") must be divisible by tp (", tp, "): each TP rank computes whole heads");
  MT_CHECK(o.n_layer() >= 1, "ParallelSelfAttention: n_layer (", o.n_layer(), ") must be >= 1");
  MT_CHECK(o.dropout() >= 0.0 && o.dropout() < 1.0, "ParallelSelfAttention: dropout (", o.dropout(),
           ") must be in [0, 1)");
}

ParallelSelfAttentionImpl::ParallelSelfAttentionImpl(ParallelSelfAttentionOptions options,
                                                     CommunicatorPtr tp_group, RngTrackerPtr rng)
    : options_(std::move(options)), tp_group_(std::move(tp_group)), rng_(std::move(rng)) {
  MT_CHECK(tp_group_ != nullptr, "ParallelSelfAttention: the tp communicator is null");
  check_attention_split(options_, tp_group_->size());
  MT_CHECK(options_.dropout() == 0.0 || rng_ != nullptr, "ParallelSelfAttention: dropout (",
           options_.dropout(), ") > 0 needs an RngTracker");
  reset();
}

void ParallelSelfAttentionImpl::reset() {
  const auto& o = options_;
  const int64_t c = o.n_embd();
  // Draw order: c_attn.weight, then c_proj.weight (the serial model's parameter order).
  c_attn = register_module(
      "c_attn",
      ColumnParallelLinear(
          ColumnParallelLinearOptions(c, 3 * c).gather_output(false).blocks(3).sequence_parallel(
              o.sequence_parallel()),
          tp_group_));
  c_proj = register_module(
      "c_proj",
      RowParallelLinear(RowParallelLinearOptions(c, c)
                            .input_is_parallel(true)
                            .sequence_parallel(o.sequence_parallel())
                            .init_std(0.02 / std::sqrt(2.0 * static_cast<double>(o.n_layer()))),
                        tp_group_));
}

void ParallelSelfAttentionImpl::apply_tensor_parallel(const TensorParallelism& tp) {
  MT_CHECK(tp_group_->size() == 1, "ParallelSelfAttention: already laid out over a group of ",
           tp_group_->size(), " ranks; apply_tensor_parallel takes a serial layer");
  MT_CHECK(tp.group != nullptr, "ParallelSelfAttention: the tp communicator is null");
  check_attention_split(options_, tp.group->size());
  options_.sequence_parallel(tp.sequence_parallel);
  tp_group_ = tp.group;
}

void ParallelSelfAttentionImpl::pretty_print(std::ostream& stream) const {
  stream << "meshtrain::ParallelSelfAttention(n_embd=" << options_.n_embd()
         << ", n_head=" << options_.n_head() << ", tp=" << tp_group_->size()
         << ", dropout=" << options_.dropout()
         << ", sequence_parallel=" << (options_.sequence_parallel() ? "true" : "false") << ")";
}

torch::Tensor ParallelSelfAttentionImpl::forward(const torch::Tensor& x) {
  const int64_t c = options_.n_embd();
  const int64_t tp = tp_group_->size();
  const int64_t h = local_heads();
  const int64_t d = c / options_.n_head();
  MT_CHECK(x.dim() == 3 && x.size(2) == c, "ParallelSelfAttention: expects [B, T, C=", c,
           "] input, got sizes ", x.sizes());

  // q, k, v [B, h, T, D] each, copied out of c_attn's [B, T, 3C/tp] (q | k | v of the local
  // heads): the batched matrix products and their backward run several times faster on
  // contiguous heads than on strided views of the fused output, in fp32 most of all.
  torch::Tensor q, k, v;
  int64_t b = 0, t = 0;
  {
    const auto qkv = c_attn(x);
    b = qkv.size(0);
    t = qkv.size(1); // full sequence, gathered under sequence parallelism
    const auto parts = qkv.split(c / tp, /*dim=*/-1);
    const auto heads = [&](const torch::Tensor& m) {
      return m.view({b, t, h, d}).transpose(1, 2).contiguous();
    };
    q = heads(parts[0]);
    k = heads(parts[1]);
    v = heads(parts[2]);
  } // the fused output is freed here: nothing saves it for backward

  const CoreFn core = [this, d](const torch::Tensor& q, const torch::Tensor& k,
                                const torch::Tensor& v) {
    auto att = causal_softmax(torch::matmul(q, k.transpose(-2, -1)),
                              1.0 / std::sqrt(static_cast<double>(d))); // [B, h, T, T]
    if (rng_) {
      att = rng_->dropout(att, options_.dropout(), is_training(), RngStream::kTensorParallel);
    }
    return torch::matmul(att, v); // [B, h, T, D]
  };
  auto y = (core_wrapper_ ? core_wrapper_(core, q, k, v) : core(q, k, v))
               .transpose(1, 2)
               .contiguous()
               .view({b, t, h * d}); // [B, T, C/tp]
  y = c_proj(y);                     // [B, T, C] or [B, T/tp, C]
  if (rng_) {
    y = rng_->dropout(y, options_.dropout(), is_training(),
                      residual_stream(options_.sequence_parallel()));
  }
  return y;
}

} // namespace meshtrain
