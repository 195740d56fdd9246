// defines: GroupedQueryAttentionImpl, check_grouped_attention_split (see
// grouped_query_attention.h).
#include "meshtrain/parallel/grouped_query_attention.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/parallel/column_parallel_fanout.h"

#include <cmath>

namespace meshtrain {

void check_grouped_attention_split(const GroupedQueryAttentionOptions& o, int tp) {
  MT_CHECK(o.n_embd() > 0 && o.n_head() > 0 && o.n_kv_head() > 0, "GroupedQueryAttention: n_embd (",
           o.n_embd(), "), n_head (", o.n_head(), ") and n_kv_head (", o.n_kv_head(),
           ") must be positive");
  MT_CHECK(o.n_embd() % o.n_head() == 0, "GroupedQueryAttention: n_embd (", o.n_embd(),
           ") must be divisible by n_head (", o.n_head(), ")");
  MT_CHECK((o.n_embd() / o.n_head()) % 2 == 0, "GroupedQueryAttention: the head dim (n_embd ",
           o.n_embd(), " / n_head ", o.n_head(), " = ", o.n_embd() / o.n_head(),
           ") must be even for rotary embeddings");
  MT_CHECK(o.n_head() % o.n_kv_head() == 0, "GroupedQueryAttention: n_kv_head (", o.n_kv_head(),
           ") must divide n_head (", o.n_head(), "): each key/value head serves a whole group");
  MT_CHECK(o.n_head() % tp == 0, "GroupedQueryAttention: n_head (", o.n_head(),
           ") must be divisible by tp (", tp, "): each TP rank computes whole heads");
  MT_CHECK(o.n_kv_head() % tp == 0, "GroupedQueryAttention: n_kv_head (", o.n_kv_head(),
           ") must be divisible by tp (", tp, "): each TP rank holds whole key/value heads");
  MT_CHECK(o.n_layer() >= 1, "GroupedQueryAttention: n_layer (", o.n_layer(), ") must be >= 1");
}

GroupedQueryAttentionImpl::GroupedQueryAttentionImpl(GroupedQueryAttentionOptions options,
                                                     CommunicatorPtr tp_group)
    : options_(std::move(options)), tp_group_(std::move(tp_group)) {
  MT_CHECK(tp_group_ != nullptr, "GroupedQueryAttention: the tp communicator is null");
  check_grouped_attention_split(options_, tp_group_->size());
  reset();
}

void GroupedQueryAttentionImpl::reset() {
  const auto& o = options_;
  const int64_t c = o.n_embd();
  const int64_t d = head_dim();
  const auto column = [&](int64_t out) {
    return ColumnParallelLinear(ColumnParallelLinearOptions(c, out)
                                    .bias(o.qkv_bias())
                                    .gather_output(false)
                                    .sequence_parallel(o.sequence_parallel())
                                    .init_std(o.init_std()),
                                tp_group_);
  };
  // Draw order: q_proj, k_proj, v_proj, o_proj (the serial model's parameter order).
  q_proj = register_module("q_proj", column(o.n_head() * d));
  k_proj = register_module("k_proj", column(o.n_kv_head() * d));
  v_proj = register_module("v_proj", column(o.n_kv_head() * d));
  o_proj = register_module(
      "o_proj", RowParallelLinear(
                    RowParallelLinearOptions(o.n_head() * d, c)
                        .bias(false)
                        .input_is_parallel(true)
                        .sequence_parallel(o.sequence_parallel())
                        .init_std(o.init_std() / std::sqrt(2.0 * static_cast<double>(o.n_layer()))),
                    tp_group_));
  rotary =
      register_module("rotary", RotaryEmbedding(RotaryEmbeddingOptions(d).theta(o.rope_theta())));
}

void GroupedQueryAttentionImpl::apply_tensor_parallel(const TensorParallelism& tp) {
  MT_CHECK(tp_group_->size() == 1, "GroupedQueryAttention: already laid out over a group of ",
           tp_group_->size(), " ranks; apply_tensor_parallel takes a serial layer");
  MT_CHECK(tp.group != nullptr, "GroupedQueryAttention: the tp communicator is null");
  check_grouped_attention_split(options_, tp.group->size());
  options_.sequence_parallel(tp.sequence_parallel);
  tp_group_ = tp.group;
}

void GroupedQueryAttentionImpl::pretty_print(std::ostream& stream) const {
  stream << "meshtrain::GroupedQueryAttention(n_embd=" << options_.n_embd()
         << ", n_head=" << options_.n_head() << ", n_kv_head=" << options_.n_kv_head()
         << ", rope_theta=" << options_.rope_theta() << ", tp=" << tp_group_->size()
         << ", sequence_parallel=" << (options_.sequence_parallel() ? "true" : "false") << ")";
}

torch::Tensor GroupedQueryAttentionImpl::forward(const torch::Tensor& x) {
  const int64_t c = options_.n_embd();
  const int64_t h = local_heads();
  const int64_t hkv = local_kv_heads();
  const int64_t d = head_dim();
  MT_CHECK(x.dim() == 3 && x.size(2) == c, "GroupedQueryAttention: expects [B, T, C=", c,
           "] input, got sizes ", x.sizes());

  // [B, T, h*D], [B, T, hkv*D], [B, T, hkv*D]: the full sequence (gathered under sequence
  // parallelism) of this rank's heads.
  const auto qkv = column_parallel_fanout({q_proj, k_proj, v_proj}, x);
  const int64_t b = qkv[0].size(0);
  const int64_t t = qkv[0].size(1);
  // Contiguous heads: the batched matrix products run several times faster on them than on
  // strided views, in fp32 most of all (ParallelSelfAttention's forward).
  const auto heads = [&](const torch::Tensor& m, int64_t n) {
    return m.view({b, t, n, d}).transpose(1, 2).contiguous(); // [B, n, T, D]
  };
  // This rank's positions (under context parallelism its two chunks of the sequence).
  const auto [cos, sin] = rotary->cos_sin(rotary->positions(t, x.device()));
  const auto q = apply_rotary(heads(qkv[0], h), cos, sin);   // [B, h, T, D]
  const auto k = apply_rotary(heads(qkv[1], hkv), cos, sin); // [B, hkv, T, D]
  const auto v = heads(qkv[2], hkv);                         // [B, hkv, T, D]

  const AttentionCoreFn core = [d](const torch::Tensor& q, const torch::Tensor& k,
                                   const torch::Tensor& v) {
    const int64_t heads = q.size(1);
    const int64_t groups = heads / k.size(1);
    // Query head i reads key/value head i / groups (Hugging Face's repeat_kv).
    const auto repeat = [&](const torch::Tensor& m) {
      return m.unsqueeze(2)
          .expand({m.size(0), m.size(1), groups, m.size(2), m.size(3)})
          .reshape({m.size(0), heads, m.size(2), m.size(3)}); // [B, h, T, D]
    };
    const auto att = causal_softmax(torch::matmul(q, repeat(k).transpose(-2, -1)),
                                    1.0 / std::sqrt(static_cast<double>(d))); // [B, h, T, T]
    return torch::matmul(att, repeat(v));                                     // [B, h, T, D]
  };
  const auto y = (core_wrapper_ ? core_wrapper_(core, q, k, v) : core(q, k, v))
                     .transpose(1, 2)
                     .contiguous()
                     .view({b, t, h * d}); // [B, T, h*D]
  return o_proj(y);                        // [B, T, C] or [B, T/tp, C]
}

} // namespace meshtrain
