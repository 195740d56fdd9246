// defines: LlamaConfig::validate, default_ffn_dim, config_to_json, config_from_json,
// LlamaDecoderLayerImpl, LlamaImpl (see llama_model.h).
#include "llama_model.h"

#include <meshtrain/core/errors.h>
#include <meshtrain/parallel/vocab_parallel_cross_entropy.h>

#include <nlohmann/json.hpp>

#include <utility>

namespace llama {

using nlohmann::json;

void LlamaConfig::validate() const {
  MT_CHECK(vocab_size() >= 1 && vocab_size() <= 65536, "Llama: vocab_size (", vocab_size(),
           ") must be in [1, 65536] (token files hold uint16 tokens)");
  MT_CHECK(block_size() >= 1, "Llama: block_size (", block_size(), ") must be >= 1");
  MT_CHECK(n_layer() >= 1, "Llama: n_layer (", n_layer(), ") must be >= 1");
  MT_CHECK(n_head() >= 1 && n_kv_head() >= 1 && n_embd() >= 1 && ffn_dim() >= 1, "Llama: n_head (",
           n_head(), "), n_kv_head (", n_kv_head(), "), n_embd (", n_embd(), ") and ffn_dim (",
           ffn_dim(), ") must be >= 1");
  MT_CHECK(n_embd() % n_head() == 0, "Llama: n_embd (", n_embd(), ") must be divisible by n_head (",
           n_head(), ")");
  MT_CHECK((n_embd() / n_head()) % 2 == 0,
           "Llama: the head dim n_embd / n_head = ", n_embd() / n_head(),
           " must be even (rotary embeddings pair dimension j with j + D/2)");
  MT_CHECK(n_head() % n_kv_head() == 0, "Llama: n_kv_head (", n_kv_head(), ") must divide n_head (",
           n_head(), ")");
  MT_CHECK(rope_theta() > 1.0, "Llama: rope_theta (", rope_theta(), ") must be > 1");
  MT_CHECK(rms_norm_eps() > 0.0, "Llama: rms_norm_eps (", rms_norm_eps(), ") must be > 0");
  MT_CHECK(pad_vocab_to_multiple_of() >= 1, "Llama: pad_vocab_to_multiple_of (",
           pad_vocab_to_multiple_of(), ") must be >= 1");
}

int64_t default_ffn_dim(int64_t n_embd, int64_t multiple) {
  const int64_t f = (8 * n_embd + 2) / 3; // ceil(8C/3)
  return (f + multiple - 1) / multiple * multiple;
}

std::string config_to_json(const LlamaConfig& c) {
  return json{{"architecture", "llama"},
              {"vocab_size", c.vocab_size()},
              {"block_size", c.block_size()},
              {"n_layer", c.n_layer()},
              {"n_head", c.n_head()},
              {"n_kv_head", c.n_kv_head()},
              {"n_embd", c.n_embd()},
              {"ffn_dim", c.ffn_dim()},
              {"rope_theta", c.rope_theta()},
              {"rms_norm_eps", c.rms_norm_eps()},
              {"tie_embeddings", c.tie_embeddings()}}
      .dump();
}

LlamaConfig config_from_json(const std::string& json_text, const std::string& source) {
  LlamaConfig c;
  try {
    const json m = json::parse(json_text);
    const auto architecture = m.value("architecture", std::string());
    MT_CHECK(architecture == "llama", source, ": the model is '", architecture,
             "', not a Llama (\"architecture\": \"llama\")");
    c.vocab_size(m.at("vocab_size").get<int64_t>())
        .block_size(m.at("block_size").get<int64_t>())
        .n_layer(m.at("n_layer").get<int64_t>())
        .n_head(m.at("n_head").get<int64_t>())
        .n_kv_head(m.at("n_kv_head").get<int64_t>())
        .n_embd(m.at("n_embd").get<int64_t>())
        .ffn_dim(m.at("ffn_dim").get<int64_t>())
        .rope_theta(m.at("rope_theta").get<double>())
        .rms_norm_eps(m.at("rms_norm_eps").get<double>())
        .tie_embeddings(m.at("tie_embeddings").get<bool>());
  } catch (const json::exception& e) {
    MT_CHECK(false, source, ": the model config is incomplete or malformed (", e.what(), ")");
  }
  c.validate();
  return c;
}

// ---- LlamaDecoderLayer -------------------------------------------------------------------

LlamaDecoderLayerImpl::LlamaDecoderLayerImpl(LlamaConfig config) : config_(std::move(config)) {
  reset();
}

void LlamaDecoderLayerImpl::reset() {
  const auto& c = config_;
  // Registration order = draw order = Hugging Face's parameter order.
  input_layernorm = register_module(
      "input_layernorm", meshtrain::ParallelRMSNorm(
                             meshtrain::ParallelRMSNormOptions(c.n_embd()).eps(c.rms_norm_eps())));
  self_attn = register_module(
      "self_attn", meshtrain::GroupedQueryAttention(meshtrain::GroupedQueryAttentionOptions(
                                                        c.n_embd(), c.n_head(), c.n_kv_head())
                                                        .rope_theta(c.rope_theta())
                                                        .n_layer(c.n_layer())
                                                        .init_std(c.init_std())));
  post_attention_layernorm =
      register_module("post_attention_layernorm",
                      meshtrain::ParallelRMSNorm(
                          meshtrain::ParallelRMSNormOptions(c.n_embd()).eps(c.rms_norm_eps())));
  mlp = register_module(
      "mlp", meshtrain::ParallelSwiGLU(meshtrain::ParallelSwiGLUOptions(c.n_embd(), c.ffn_dim())
                                           .n_layer(c.n_layer())
                                           .init_std(c.init_std())));
}

torch::Tensor LlamaDecoderLayerImpl::forward(const torch::Tensor& x) {
  const auto h = x + self_attn(input_layernorm(x)); // [B, T, C] or [B, T/tp, C]
  return h + mlp(post_attention_layernorm(h));
}

// ---- Llama -------------------------------------------------------------------------------

LlamaImpl::LlamaImpl(LlamaConfig config) : config_(std::move(config)) {
  const auto& c = config_;
  c.validate();
  meshtrain::ModelDeclaration declaration; // deferred under the caller's DeferredInit
  // Construction order = draw order (see the header).
  embed_tokens = meshtrain::VocabParallelEmbedding(
      meshtrain::VocabParallelEmbeddingOptions(c.vocab_size(), c.n_embd())
          .pad_to_multiple_of(c.pad_vocab_to_multiple_of())
          .init_std(c.init_std()));
  layers = torch::nn::ModuleList();
  for (int64_t i = 0; i < c.n_layer(); ++i) {
    layers->push_back(LlamaDecoderLayer(c));
  }
  norm = meshtrain::ParallelRMSNorm(
      meshtrain::ParallelRMSNormOptions(c.n_embd()).eps(c.rms_norm_eps()));
  torch::OrderedDict<std::string, std::shared_ptr<torch::nn::Module>> model;
  model.insert("embed_tokens", embed_tokens.ptr());
  model.insert("layers", layers.ptr());
  model.insert("norm", norm.ptr());
  register_module("model", torch::nn::ModuleDict(model));
  if (!c.tie_embeddings()) {
    lm_head = register_module(
        "lm_head",
        meshtrain::VocabParallelHead(meshtrain::VocabParallelHeadOptions(c.n_embd(), c.vocab_size())
                                         .pad_to_multiple_of(c.pad_vocab_to_multiple_of())
                                         .init_std(c.init_std())));
  }
  declaration.finish(*this);
}

void LlamaImpl::apply_tensor_parallel(const meshtrain::TensorParallelism& tp) {
  MT_CHECK(tp.group != nullptr, "Llama: the tp communicator is null");
  tp_ = tp;
}

meshtrain::ModelShape LlamaImpl::shape() const {
  meshtrain::ModelShape shape;
  shape.n_layer = config_.n_layer();
  shape.n_head = config_.n_head();
  shape.n_kv_head = config_.n_kv_head();
  shape.seq_len = config_.block_size();
  shape.n_embd = config_.n_embd();
  return shape;
}

torch::Tensor LlamaImpl::embed(const torch::Tensor& idx) {
  MT_CHECK(idx.dim() == 2 && idx.scalar_type() == torch::kLong,
           "Llama: idx must be int64 [B, T], got ", idx.scalar_type(), " of sizes ", idx.sizes());
  const int64_t t = idx.size(1);
  MT_CHECK(t >= 1 && t <= config_.block_size(), "Llama: sequence length ", t,
           " must be in [1, block_size = ", config_.block_size(), "]");
  MT_CHECK(!tp_.sequence_parallel || t % tp_.group->size() == 0,
           "Llama: with sequence parallelism tp (", tp_.group->size(),
           ") must divide the sequence length (", t, ")");
  return embed_tokens(idx); // [B, T, C] (sequence parallel: [B, T/tp, C])
}

std::vector<std::shared_ptr<torch::nn::Module>> LlamaImpl::blocks() {
  return layers->children();
}

torch::Tensor LlamaImpl::logits(const torch::Tensor& x) {
  const auto normed = norm(x);
  // [B, T, Vp/tp]: the full sequence, this rank's vocab columns.
  return lm_head.is_empty() ? embed_tokens->logits(normed) : lm_head(normed);
}

torch::Tensor LlamaImpl::head_loss(const torch::Tensor& x, const torch::Tensor& targets) {
  return meshtrain::vocab_parallel_cross_entropy(
             logits(x), targets, tp_.group,
             meshtrain::VocabParallelCrossEntropyOptions(config_.vocab_size()))
      .sum;
}

LlamaOutput LlamaImpl::forward(const torch::Tensor& idx,
                               const std::optional<torch::Tensor>& targets) {
  auto x = embed(idx);
  for (const auto& layer : *layers) {
    x = layer->as<LlamaDecoderLayerImpl>()->forward(x);
  }
  LlamaOutput out;
  out.logits = logits(x);
  if (targets.has_value()) {
    MT_CHECK(targets->sizes() == idx.sizes(), "Llama: targets of sizes ", targets->sizes(),
             " must match idx of sizes ", idx.sizes());
    const auto loss = meshtrain::vocab_parallel_cross_entropy(
        out.logits, *targets, tp_.group,
        meshtrain::VocabParallelCrossEntropyOptions(config_.vocab_size()));
    out.loss = loss.mean;
    out.loss_sum = loss.sum;
    out.token_count = loss.count;
  }
  return out;
}

int64_t LlamaImpl::num_parameters() const {
  const auto& c = config_;
  const int64_t C = c.n_embd();
  const int64_t D = C / c.n_head();
  const int64_t per_layer = 2 * C                       // the two norms
                            + C * c.n_head() * D * 2    // q_proj, o_proj
                            + C * c.n_kv_head() * D * 2 // k_proj, v_proj
                            + 3 * C * c.ffn_dim();      // gate, up, down
  const int64_t embeddings = c.vocab_size() * C * (c.tie_embeddings() ? 1 : 2);
  return embeddings + c.n_layer() * per_layer + C;
}

void LlamaImpl::pretty_print(std::ostream& stream) const {
  const auto& c = config_;
  stream << "llama::Llama(vocab_size=" << c.vocab_size() << ", padded_vocab=" << padded_vocab_size()
         << ", block_size=" << c.block_size() << ", n_layer=" << c.n_layer()
         << ", n_head=" << c.n_head() << ", n_kv_head=" << c.n_kv_head()
         << ", n_embd=" << c.n_embd() << ", ffn_dim=" << c.ffn_dim()
         << ", rope_theta=" << c.rope_theta()
         << ", tie_embeddings=" << (c.tie_embeddings() ? "true" : "false")
         << ", tp=" << tp_.group->size()
         << ", sequence_parallel=" << (tp_.sequence_parallel ? "true" : "false") << ")";
}

} // namespace llama
