// defines: ParallelTransformerBlockOptions, ParallelTransformerBlockImpl,
// ParallelTransformerBlock — nanoGPT's pre-LayerNorm block on tensor-parallel layers:
//   x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
//
// Parameter names (so a GPT gets transformer.h.<i>.<name>): ln_1.{weight,bias},
// attn.c_attn.{weight,bias}, attn.c_proj.{weight,bias}, ln_2.{weight,bias},
// mlp.c_fc.{weight,bias}, mlp.c_proj.{weight,bias}.
//
// Activations: [B, T, C] replicated over TP, or [B, T/tp, C] sequence shards with
// sequence_parallel (the caller scatters the sequence before the first block and gathers
// after the last). Communication per block (tp > 1):
//   plain:    forward 2 all-reduce (attn.c_proj, mlp.c_proj), backward 2 all-reduce
//             (input grads of attn.c_attn, mlp.c_fc)
//   sequence: forward 2 all-gather + 2 reduce-scatter, backward 2 reduce-scatter +
//             2 all-gather, plus 4 small all-reduces of parameter gradients (ln_1, ln_2
//             weight+bias packed, attn.c_proj.bias, mlp.c_proj.bias)
//
// Init: every rank draws the full master weights from the default generator in the serial
// parameter order — attn.c_attn.weight [3C, C], attn.c_proj.weight [C, C],
// mlp.c_fc.weight [4C, C], mlp.c_proj.weight [C, 4C] — one normal_ each (std 0.02, c_proj
// 0.02/sqrt(2*n_layer)) and keeps its shard; LayerNorms and biases draw nothing. After
// torch::manual_seed(s) the block therefore holds the shards of the serial block built
// after the same seed, for any tp.
#pragma once

#include "meshtrain/core/communicator.h"
#include "meshtrain/parallel/parallel_layer_norm.h"
#include "meshtrain/parallel/parallel_mlp.h"
#include "meshtrain/parallel/parallel_model.h"
#include "meshtrain/parallel/parallel_self_attention.h"
#include "meshtrain/parallel/rng_tracker.h"
#include "meshtrain/parallel/tensor_parallel_layer.h"

#include <torch/torch.h>

namespace meshtrain {

struct ParallelTransformerBlockOptions {
  ParallelTransformerBlockOptions(int64_t n_embd, int64_t n_head)
      : n_embd_(n_embd), n_head_(n_head) {}
  TORCH_ARG(int64_t, n_embd);
  TORCH_ARG(int64_t, n_head);
  TORCH_ARG(int64_t, n_layer) = 1;
  // Attention-probability and residual dropout, as nanoGPT's `dropout`.
  TORCH_ARG(double, dropout) = 0.0;
  TORCH_ARG(double, layer_norm_eps) = 1e-5;
  TORCH_ARG(bool, sequence_parallel) = false;
};

class ParallelTransformerBlockImpl : public torch::nn::Cloneable<ParallelTransformerBlockImpl>,
                                     public ParallelBlock,
                                     public TensorParallelLayer {
public:
  // Serial until apply_tensor_parallel. `rng` may be null when dropout is 0.
  explicit ParallelTransformerBlockImpl(ParallelTransformerBlockOptions options,
                                        CommunicatorPtr tp_group = make_self_communicator(),
                                        RngTrackerPtr rng = nullptr);

  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  // Records the layout; its layers lay themselves out.
  void apply_tensor_parallel(const TensorParallelism& tp) override;

  // [B, T, C] -> [B, T, C]; under sequence parallelism [B, T/tp, C] -> [B, T/tp, C].
  torch::Tensor forward(const torch::Tensor& x) override;

  const ParallelTransformerBlockOptions& options() const { return options_; }

  ParallelLayerNorm ln_1{nullptr};
  ParallelSelfAttention attn{nullptr};
  ParallelLayerNorm ln_2{nullptr};
  ParallelMLP mlp{nullptr};

private:
  ParallelTransformerBlockOptions options_;
  CommunicatorPtr tp_group_;
  RngTrackerPtr rng_;
};

TORCH_MODULE(ParallelTransformerBlock);

} // namespace meshtrain
