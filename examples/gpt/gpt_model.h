// defines: GPTConfig, GPTOutput, GPTImpl, GPT — nanoGPT's language model (DESIGN §4) built
// only from parallel/ layers, serially; parallelize() (launch/parallelize.h) lays it out
// (tensor and sequence parallelism, recomputation, precision) through the ParallelModel
// interface. No communication and no layout flags here: the layers and mappings of
// parallel/ carry them.
//
// Parameters once laid out (named_parameters(), nanoGPT's names; L = n_layer, C = n_embd,
// T = block_size, V = vocab_size, Vp = V padded to a multiple of lcm(64, tp), tp = TP group
// size; serially tp = 1):
//   transformer.wte.weight            [Vp/tp, C]  vocab rows of this rank (VocabParallelEmbedding)
//   transformer.wpe.weight            [T, C]      replicated
//   transformer.h.<i>.ln_1.{weight,bias}          [C]
//   transformer.h.<i>.attn.c_attn.{weight,bias}   [3C/tp, C], [3C/tp]  (q|k|v of local heads)
//   transformer.h.<i>.attn.c_proj.{weight,bias}   [C, C/tp], [C]
//   transformer.h.<i>.ln_2.{weight,bias}          [C]
//   transformer.h.<i>.mlp.c_fc.{weight,bias}      [4C/tp, C], [4C/tp]
//   transformer.h.<i>.mlp.c_proj.{weight,bias}    [C, 4C/tp], [C]
//   transformer.ln_f.{weight,bias}                [C]
// lm_head is tied to wte and is not a parameter of its own: the logits are
// wte.logits(x) = x wte^T, this rank's vocab columns [B, T, Vp/tp], fed to the vocab-parallel
// cross-entropy without ever gathering the full logits (as PyTorch's named_parameters()
// lists a nanoGPT model: the tied lm_head.weight is de-duplicated away).
//
// Init (DESIGN §3 "Sharded start-up and init invariance", §4): wte [V, C] and wpe [T, C] ~
// N(0, 0.02), every block's c_attn.weight [3C, C] and c_fc.weight [4C, C] ~ N(0, 0.02), its
// attn.c_proj.weight and mlp.c_proj.weight ~ N(0, 0.02/sqrt(2L)), biases 0, LayerNorm weights
// 1; vocabulary padding rows 0. Each value is a function of (seed, name, element index)
// (parallel/param_init.h). Declared inside a DeferredInit(seed) scope the model holds no
// storage and parallelize gives each rank only its part; built outside one, it takes its values
// at once under torch's default seed (torch::manual_seed). Either way every layout starts from
// the same serial values bit for bit.
//
// Forward, idx [B, T'] int64 with T' <= block_size (ParallelModel's parts: embed, blocks,
// head_loss):
//   x = drop(wte(idx) + wpe(T'))    [B, T', C]  (sequence parallel: [B, T'/tp, C]; wte then
//                                   reduce-scatters and wpe's rows are scattered likewise)
//   x = h[L-1](...h[0](x)); x = ln_f(x)
//   logits = wte.logits(x)          [B, T', Vp/tp] (this rank's vocab shard)
//   loss = vocab-parallel cross-entropy(logits, targets), identical on every TP rank.
#pragma once

#include "meshtrain/parallel/parallel_layer_norm.h"
#include "meshtrain/parallel/parallel_model.h"
#include "meshtrain/parallel/parallel_transformer_block.h"
#include "meshtrain/parallel/position_embedding.h"
#include "meshtrain/parallel/rng_tracker.h"
#include "meshtrain/parallel/tensor_parallel_layer.h"
#include "meshtrain/parallel/vocab_parallel_embedding.h"

#include <torch/torch.h>

#include <cstdint>
#include <optional>

namespace meshtrain::gpt {

struct GPTConfig {
  TORCH_ARG(int64_t, vocab_size) = 256; // V, unpadded (byte-level text: 256)
  TORCH_ARG(int64_t, block_size) = 128; // T, longest sequence (rows of wpe)
  TORCH_ARG(int64_t, n_layer) = 4;
  TORCH_ARG(int64_t, n_head) = 4;
  TORCH_ARG(int64_t, n_embd) = 128;
  // Embedding, attention-probability and residual dropout (nanoGPT's single `dropout`).
  TORCH_ARG(double, dropout) = 0.0;
  TORCH_ARG(double, layer_norm_eps) = 1e-5;
  TORCH_ARG(double, init_std) = 0.02;
  // The vocab is padded to a multiple of lcm(this, tp) for the vocab-parallel layers.
  TORCH_ARG(int64_t, pad_vocab_to_multiple_of) = 64;
  // Seed of the dropout streams when the model makes its own RngTracker (see GPTImpl);
  // parallelize gives each data-parallel replica its own streams from it.
  TORCH_ARG(uint64_t, dropout_seed) = 1337;

public:
  // Throws naming the bad value (sizes positive, n_head | n_embd, 0 <= dropout < 1). What a
  // layout needs of the model (tp | n_head, ...) is ParallelPlan::validate's.
  void validate() const;
};

// What forward() returns. Without targets only `logits` is defined.
struct GPTOutput {
  torch::Tensor logits;      // [B, T, Vp/tp], this rank's vocab columns
  torch::Tensor loss;        // [] mean token cross-entropy over the batch
  torch::Tensor loss_sum;    // [] summed over the batch's tokens (for global_mean_loss)
  torch::Tensor token_count; // [] int64, tokens in the loss
};

class GPTImpl : public ParallelModel, public TensorParallelLayer {
public:
  // Collective-free construction; declares the weights (see "Init" above). `rng` supplies the
  // dropout streams; when null and dropout > 0 the model makes one from config.dropout_seed().
  explicit GPTImpl(GPTConfig config, RngTrackerPtr rng = nullptr);

  // idx [B, T] int64 -> logits [B, T, Vp/tp]; with targets [B, T] int64 (-1: ignored) also
  // the loss. Under sequence parallelism T must be divisible by tp.
  GPTOutput forward(const torch::Tensor& idx,
                    const std::optional<torch::Tensor>& targets = std::nullopt);

  // ParallelModel (parallel/parallel_model.h): what parallelize() composes.
  ModelShape shape() const override;
  torch::Tensor embed(const torch::Tensor& idx) override;            // [B, T(/tp), C]
  std::vector<std::shared_ptr<torch::nn::Module>> blocks() override; // h.0 .. h.<L-1>
  torch::Tensor head_loss(const torch::Tensor& x, const torch::Tensor& targets) override;
  RngTrackerPtr rng_tracker() const override { return rng_; }
  // The model-level part of the layout: the embedding dropout's stream.
  void apply_tensor_parallel(const TensorParallelism& tp) override;

  const GPTConfig& config() const { return config_; }
  const CommunicatorPtr& tp_group() const { return tp_.group; }
  bool sequence_parallel() const { return tp_.sequence_parallel; }
  // Vp: the padded vocab (rows of the full wte).
  int64_t padded_vocab_size() const { return wte->padded_num_embeddings(); }
  // Parameters of the full (serial, unpadded) model, as nanoGPT counts them: every weight
  // once, the tied lm_head not again.
  int64_t num_parameters() const;

  void pretty_print(std::ostream& stream) const override;

  // The modules, also reachable by name under "transformer".
  VocabParallelEmbedding wte{nullptr};
  PositionEmbedding wpe{nullptr};
  torch::nn::ModuleList h{nullptr}; // of ParallelTransformerBlock
  ParallelLayerNorm ln_f{nullptr};

private:
  // ln_f, then the tied projection: [B, T(/tp), C] -> [B, T, Vp/tp].
  torch::Tensor logits(const torch::Tensor& x);

  GPTConfig config_;
  TensorParallelism tp_{make_self_communicator(), false};
  RngTrackerPtr rng_;
};

TORCH_MODULE(GPT);

} // namespace meshtrain::gpt
