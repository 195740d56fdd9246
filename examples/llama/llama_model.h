// defines: LlamaConfig, LlamaOutput, LlamaDecoderLayerImpl (LlamaDecoderLayer), LlamaImpl
// (Llama), config_to_json, config_from_json — a Llama-architecture decoder (DESIGN §4b) built
// only from the installed package's public parallel/ layers, serially; parallelize()
// (<meshtrain/launch/parallelize.h>) lays it out through the ParallelModel interface. No
// communication and no layout flags here.
//
// Parameters once laid out — Hugging Face LlamaForCausalLM's names (L = n_layer, C = n_embd,
// H = n_head, Hkv = n_kv_head, D = C/H, F = ffn_dim, V = vocab_size, Vp = V padded to a
// multiple of lcm(64, tp), tp = TP group size; serially tp = 1):
//   model.embed_tokens.weight                          [Vp/tp, C]   vocab rows of this rank
//   model.layers.<i>.input_layernorm.weight            [C]
//   model.layers.<i>.self_attn.q_proj.weight          [H*D/tp, C]  this rank's query heads
//   model.layers.<i>.self_attn.k_proj.weight          [Hkv*D/tp, C] its key/value heads
//   model.layers.<i>.self_attn.v_proj.weight          [Hkv*D/tp, C]
//   model.layers.<i>.self_attn.o_proj.weight          [C, H*D/tp]
//   model.layers.<i>.post_attention_layernorm.weight   [C]
//   model.layers.<i>.mlp.gate_proj.weight              [F/tp, C]
//   model.layers.<i>.mlp.up_proj.weight                [F/tp, C]
//   model.layers.<i>.mlp.down_proj.weight              [C, F/tp]
//   model.norm.weight                                  [C]
//   lm_head.weight                                     [Vp/tp, C]   untied only (the default)
// With tie_embeddings the logits are embed_tokens.logits(x) and there is no lm_head.weight
// (Hugging Face's tie_word_embeddings). An export (meshtrain-export) drops the vocab padding.
//
// Init (DESIGN §4b): every matrix and embedding ~ N(0, init_std), o_proj and down_proj
// N(0, init_std/sqrt(2L)), norms 1; each value a function of (seed, name, element index)
// (<meshtrain/parallel/param_init.h>). Declared inside a meshtrain::DeferredInit(seed) scope
// the model holds no storage and parallelize gives each rank only its part; built outside one
// it takes its values at once under torch::manual_seed's seed. Every layout starts from the
// same serial values bit for bit.
//
// Forward, idx [B, T'] int64 with T' <= block_size:
//   x = embed_tokens(idx)                  [B, T', C] (sequence parallel: [B, T'/tp, C])
//   x = layers[L-1](...layers[0](x))       each: h = x + self_attn(input_layernorm(x))
//                                                 x = h + mlp(post_attention_layernorm(h))
//   logits = lm_head(norm(x))              [B, T', Vp/tp], this rank's vocab columns
//   loss = vocab-parallel cross-entropy(logits, targets), identical on every TP rank.
#pragma once

#include <meshtrain/parallel/grouped_query_attention.h>
#include <meshtrain/parallel/parallel_model.h>
#include <meshtrain/parallel/parallel_rms_norm.h>
#include <meshtrain/parallel/parallel_swiglu.h>
#include <meshtrain/parallel/param_init.h>
#include <meshtrain/parallel/tensor_parallel_layer.h>
#include <meshtrain/parallel/vocab_parallel_embedding.h>
#include <meshtrain/parallel/vocab_parallel_head.h>

#include <torch/torch.h>

#include <cstdint>
#include <optional>
#include <string>

namespace llama {

struct LlamaConfig {
  TORCH_ARG(int64_t, vocab_size) = 256; // V, unpadded (byte-level text: 256)
  TORCH_ARG(int64_t, block_size) = 64;  // T, the longest sequence (training and sampling)
  TORCH_ARG(int64_t, n_layer) = 4;
  TORCH_ARG(int64_t, n_head) = 4;
  TORCH_ARG(int64_t, n_kv_head) = 2;
  TORCH_ARG(int64_t, n_embd) = 128;
  TORCH_ARG(int64_t, ffn_dim) = 384;
  TORCH_ARG(double, rope_theta) = 10000.0;
  TORCH_ARG(double, rms_norm_eps) = 1e-5;
  // Logits through embed_tokens (no lm_head.weight); Llama's default is untied.
  TORCH_ARG(bool, tie_embeddings) = false;
  TORCH_ARG(double, init_std) = 0.02;
  // The vocab is padded to a multiple of lcm(this, tp) for the vocab-parallel layers.
  TORCH_ARG(int64_t, pad_vocab_to_multiple_of) = 64;

public:
  // Throws naming the bad value (sizes positive, n_head | n_embd, n_kv_head | n_head, even
  // head dim). What a layout needs of the model (tp | n_kv_head, ...) is
  // ParallelPlan::validate's.
  void validate() const;
};

// Llama's MLP width rule for a model width C: 8C/3 rounded up to a multiple of `multiple`
// (C = 128: 384).
int64_t default_ffn_dim(int64_t n_embd, int64_t multiple = 64);

// The config as the JSON object checkpoints and exports store ("architecture": "llama" and
// every field above but init_std and the padding), and back. config_from_json throws naming
// `source` and the missing or bad key.
std::string config_to_json(const LlamaConfig& config);
LlamaConfig config_from_json(const std::string& json_text, const std::string& source);

// What forward() returns. Without targets only `logits` is defined.
struct LlamaOutput {
  torch::Tensor logits;      // [B, T, Vp/tp], this rank's vocab columns
  torch::Tensor loss;        // [] mean token cross-entropy over the batch
  torch::Tensor loss_sum;    // [] summed over the batch's tokens
  torch::Tensor token_count; // [] int64, tokens in the loss
};

// One decoder layer: h = x + self_attn(input_layernorm(x)); h + mlp(post_attention_layernorm(h)).
class LlamaDecoderLayerImpl : public torch::nn::Cloneable<LlamaDecoderLayerImpl>,
                              public meshtrain::ParallelBlock {
public:
  explicit LlamaDecoderLayerImpl(LlamaConfig config);

  void reset() override;
  // [B, T, C] -> [B, T, C]; under sequence parallelism [B, T/tp, C] -> [B, T/tp, C].
  torch::Tensor forward(const torch::Tensor& x) override;

  meshtrain::ParallelRMSNorm input_layernorm{nullptr};
  meshtrain::GroupedQueryAttention self_attn{nullptr};
  meshtrain::ParallelRMSNorm post_attention_layernorm{nullptr};
  meshtrain::ParallelSwiGLU mlp{nullptr};

private:
  LlamaConfig config_;
};

TORCH_MODULE(LlamaDecoderLayer);

class LlamaImpl : public meshtrain::ParallelModel, public meshtrain::TensorParallelLayer {
public:
  // Collective-free construction; declares the weights (see "Init" above).
  explicit LlamaImpl(LlamaConfig config);

  // idx [B, T] int64 -> logits [B, T, Vp/tp]; with targets [B, T] int64 (-1: ignored) also
  // the loss. Under sequence parallelism T must be divisible by tp.
  LlamaOutput forward(const torch::Tensor& idx,
                      const std::optional<torch::Tensor>& targets = std::nullopt);

  // ParallelModel: what parallelize() composes.
  meshtrain::ModelShape shape() const override;
  torch::Tensor embed(const torch::Tensor& idx) override;            // [B, T(/tp), C]
  std::vector<std::shared_ptr<torch::nn::Module>> blocks() override; // model.layers.*
  torch::Tensor head_loss(const torch::Tensor& x, const torch::Tensor& targets) override;
  // The model-level part of the layout: the group the loss is reduced over.
  void apply_tensor_parallel(const meshtrain::TensorParallelism& tp) override;

  const LlamaConfig& config() const { return config_; }
  const meshtrain::CommunicatorPtr& tp_group() const { return tp_.group; }
  // Vp: the padded vocab.
  int64_t padded_vocab_size() const { return embed_tokens->padded_num_embeddings(); }
  // Parameters of the full (serial, unpadded) model: what an export holds.
  int64_t num_parameters() const;

  void pretty_print(std::ostream& stream) const override;

  // The modules, also reachable by name under "model" (and "lm_head").
  meshtrain::VocabParallelEmbedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr}; // of LlamaDecoderLayer
  meshtrain::ParallelRMSNorm norm{nullptr};
  meshtrain::VocabParallelHead lm_head{nullptr}; // null with tie_embeddings

private:
  // norm, then the output projection: [B, T(/tp), C] -> [B, T, Vp/tp].
  torch::Tensor logits(const torch::Tensor& x);

  LlamaConfig config_;
  meshtrain::TensorParallelism tp_{meshtrain::make_self_communicator(), false};
};

TORCH_MODULE(Llama);

} // namespace llama
