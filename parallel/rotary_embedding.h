// defines: RotaryEmbeddingOptions, RotaryEmbeddingImpl, RotaryEmbedding — rotary position
// embedding (RoPE, Su et al. 2021) in the "rotate half" convention of Hugging Face's Llama:
// dimension j of a head is paired with dimension j + D/2.
//
//   inv_freq[i] = 1 / theta^(2i / D)            i in [0, D/2), fp32
//   angle[t, j] = position[t] * inv_freq[j mod D/2]            [T, D]
//   rope(x)     = x * cos(angle) + rotate_half(x) * sin(angle),
//   rotate_half([x1 | x2]) = [-x2 | x1]         (x1, x2: the halves of the head dim)
// The angles, cos and sin are computed in fp32 and rounded to x's dtype before the product
// (as Hugging Face does), so bf16 activations see the same tables.
//
// No parameters, no buffers (nothing to checkpoint, shard or convert to bf16) and no
// communication: a head never spans ranks, so tensor and sequence parallelism leave it alone
// (under sequence parallelism attention gathers the full sequence before it). Under context
// parallelism (parallel/context_parallel.h) a rank holds two chunks of every sequence:
// positions() then gives the global positions of those chunks, so the angles are those of the
// cp = 1 model.
#pragma once

#include "meshtrain/parallel/context_parallel.h"

#include <torch/torch.h>

namespace meshtrain {

struct RotaryEmbeddingOptions {
  explicit RotaryEmbeddingOptions(int64_t head_dim) : head_dim_(head_dim) {}
  TORCH_ARG(int64_t, head_dim); // D, even
  TORCH_ARG(double, theta) = 10000.0;
};

class RotaryEmbeddingImpl : public torch::nn::Cloneable<RotaryEmbeddingImpl>,
                            public ContextParallelLayer {
public:
  explicit RotaryEmbeddingImpl(RotaryEmbeddingOptions options);

  // From now on a sequence of t local tokens is this cp rank's two chunks of t x cp.
  void apply_context_parallel(const ContextParallelism& cp) override;

  void reset() override {}
  void pretty_print(std::ostream& stream) const override;

  // x [.., T, D] with positions [T] int64 -> [.., T, D], x's dtype. Without positions (an
  // undefined tensor): positions(T), this rank's tokens.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& positions = {});

  // The global positions of a local sequence of t tokens, int64 [t]: 0 .. t-1, or under
  // context parallelism those of this rank's two chunks of t x cp (context_positions).
  torch::Tensor positions(int64_t t, const torch::Device& device) const;

  // cos and sin of the angles, [T, D] fp32 each, for positions [T].
  std::pair<torch::Tensor, torch::Tensor> cos_sin(const torch::Tensor& positions) const;

  const RotaryEmbeddingOptions& options() const { return options_; }

private:
  RotaryEmbeddingOptions options_;
  ContextParallelism cp_{make_self_communicator()};
};

TORCH_MODULE(RotaryEmbedding);

// [x1 | x2] -> [-x2 | x1] along the last dim (its halves).
torch::Tensor rotate_half(const torch::Tensor& x);
// x [.., T, D] rotated by the angles whose cos and sin [T, D] (RotaryEmbedding::cos_sin) are
// given: x * cos + rotate_half(x) * sin, in x's dtype. For q and k of one sequence, which
// share the tables.
torch::Tensor apply_rotary(const torch::Tensor& x, const torch::Tensor& cos,
                           const torch::Tensor& sin);

} // namespace meshtrain
