// defines: RotaryEmbeddingImpl, rotate_half (see rotary_embedding.h).
#include "meshtrain/parallel/rotary_embedding.h"

#include "meshtrain/core/errors.h"

namespace meshtrain {

RotaryEmbeddingImpl::RotaryEmbeddingImpl(RotaryEmbeddingOptions options)
    : options_(std::move(options)) {
  MT_CHECK(options_.head_dim() > 0 && options_.head_dim() % 2 == 0, "RotaryEmbedding: head_dim (",
           options_.head_dim(), ") must be positive and even (dimension j pairs with j + D/2)");
  MT_CHECK(options_.theta() > 1.0, "RotaryEmbedding: theta (", options_.theta(), ") must be > 1");
}

void RotaryEmbeddingImpl::pretty_print(std::ostream& stream) const {
  stream << "meshtrain::RotaryEmbedding(head_dim=" << options_.head_dim()
         << ", theta=" << options_.theta() << ")";
}

void RotaryEmbeddingImpl::apply_context_parallel(const ContextParallelism& cp) {
  MT_CHECK(cp.group != nullptr, "RotaryEmbedding: the cp communicator is null");
  cp_ = cp;
}

torch::Tensor RotaryEmbeddingImpl::positions(int64_t t, const torch::Device& device) const {
  if (cp_.size() == 1) {
    return torch::arange(t, torch::TensorOptions().dtype(torch::kLong).device(device));
  }
  return context_positions(t, cp_.size(), cp_.rank(), cp_.split).to(device);
}

std::pair<torch::Tensor, torch::Tensor>
RotaryEmbeddingImpl::cos_sin(const torch::Tensor& positions) const {
  MT_CHECK(positions.dim() == 1 && !positions.is_floating_point(),
           "RotaryEmbedding: positions must be an integer [T] tensor, got ",
           positions.scalar_type(), " of sizes ", positions.sizes());
  const int64_t d = options_.head_dim();
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat).device(positions.device());
  const auto exponent = torch::arange(0, d, 2, f32.dtype(torch::kLong)).to(torch::kFloat) /
                        static_cast<double>(d);                           // [D/2]
  const auto inv_freq = 1.0 / torch::pow(options_.theta(), exponent);     // [D/2]
  const auto freqs = positions.to(torch::kFloat).unsqueeze(1) * inv_freq; // [T, D/2]
  const auto angles = torch::cat({freqs, freqs}, -1);                     // [T, D]
  return {angles.cos(), angles.sin()};
}

torch::Tensor RotaryEmbeddingImpl::forward(const torch::Tensor& x, const torch::Tensor& positions) {
  MT_CHECK(x.dim() >= 2 && x.size(-1) == options_.head_dim(), "RotaryEmbedding: input has sizes ",
           x.sizes(), "; expected [.., T, D = ", options_.head_dim(), "]");
  const auto pos = positions.defined() ? positions : this->positions(x.size(-2), x.device());
  MT_CHECK(pos.dim() == 1 && pos.size(0) == x.size(-2), "RotaryEmbedding: ", pos.numel(),
           " positions for a sequence of ", x.size(-2));
  const auto [cos, sin] = cos_sin(pos);
  return apply_rotary(x, cos, sin);
}

torch::Tensor rotate_half(const torch::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

torch::Tensor apply_rotary(const torch::Tensor& x, const torch::Tensor& cos,
                           const torch::Tensor& sin) {
  MT_CHECK(x.dim() >= 2, "apply_rotary: x has sizes ", x.sizes(), "; expected [.., T, D]");
  MT_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == x.size(-2) &&
               cos.size(1) == x.size(-1),
           "apply_rotary: x of sizes ", x.sizes(), " needs cos and sin of [T, D] = [", x.size(-2),
           ", ", x.size(-1), "], got ", cos.sizes(), " and ", sin.sizes());
  return x * cos.to(x.scalar_type()) + rotate_half(x) * sin.to(x.scalar_type());
}

} // namespace meshtrain
