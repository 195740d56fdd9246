// defines: GPTConfig::validate, GPTImpl (see gpt_model.h).
#include "examples/gpt/gpt_model.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/parallel/param_init.h"
#include "meshtrain/parallel/vocab_parallel_cross_entropy.h"

#include <utility>

namespace meshtrain::gpt {

void GPTConfig::validate() const {
  MT_CHECK(vocab_size() >= 1 && vocab_size() <= 65536, "GPT: vocab_size (", vocab_size(),
           ") must be in [1, 65536] (token files hold uint16 tokens)");
  MT_CHECK(block_size() >= 1, "GPT: block_size (", block_size(), ") must be >= 1");
  MT_CHECK(n_layer() >= 1, "GPT: n_layer (", n_layer(), ") must be >= 1");
  MT_CHECK(n_head() >= 1 && n_embd() >= 1, "GPT: n_head (", n_head(), ") and n_embd (", n_embd(),
           ") must be >= 1");
  MT_CHECK(n_embd() % n_head() == 0, "GPT: n_embd (", n_embd(), ") must be divisible by n_head (",
           n_head(), ")");
  MT_CHECK(dropout() >= 0.0 && dropout() < 1.0, "GPT: dropout (", dropout(), ") must be in [0, 1)");
  MT_CHECK(pad_vocab_to_multiple_of() >= 1, "GPT: pad_vocab_to_multiple_of (",
           pad_vocab_to_multiple_of(), ") must be >= 1");
}

GPTImpl::GPTImpl(GPTConfig config, RngTrackerPtr rng)
    : config_(std::move(config)), rng_(std::move(rng)) {
  const auto& c = config_;
  c.validate();
  ModelDeclaration declaration; // deferred under the caller's DeferredInit, else eager
  if (rng_ == nullptr && c.dropout() > 0.0) {
    rng_ = std::make_shared<RngTracker>(RngTrackerOptions(c.dropout_seed()), tp_.group);
  }

  // Construction order = draw order (see the header): wte, wpe, h.0 .. h.<L-1>, ln_f.
  wte = VocabParallelEmbedding(VocabParallelEmbeddingOptions(c.vocab_size(), c.n_embd())
                                   .pad_to_multiple_of(c.pad_vocab_to_multiple_of())
                                   .init_std(c.init_std()));
  wpe = PositionEmbedding(
      PositionEmbeddingOptions(c.block_size(), c.n_embd()).init_std(c.init_std()));
  h = torch::nn::ModuleList();
  for (int64_t i = 0; i < c.n_layer(); ++i) {
    h->push_back(ParallelTransformerBlock(ParallelTransformerBlockOptions(c.n_embd(), c.n_head())
                                              .n_layer(c.n_layer())
                                              .dropout(c.dropout())
                                              .layer_norm_eps(c.layer_norm_eps()),
                                          make_self_communicator(), rng_));
  }
  ln_f = ParallelLayerNorm(ParallelLayerNormOptions(c.n_embd()).eps(c.layer_norm_eps()));

  torch::OrderedDict<std::string, std::shared_ptr<torch::nn::Module>> transformer;
  transformer.insert("wte", wte.ptr());
  transformer.insert("wpe", wpe.ptr());
  transformer.insert("h", h.ptr());
  transformer.insert("ln_f", ln_f.ptr());
  register_module("transformer", torch::nn::ModuleDict(transformer));
  declaration.finish(*this);
}

void GPTImpl::apply_tensor_parallel(const TensorParallelism& tp) {
  MT_CHECK(tp.group != nullptr, "GPT: the tp communicator is null");
  tp_ = tp;
}

ModelShape GPTImpl::shape() const {
  ModelShape shape;
  shape.n_layer = config_.n_layer();
  shape.n_head = config_.n_head();
  shape.seq_len = config_.block_size();
  shape.n_embd = config_.n_embd();
  shape.attention_dropout = config_.dropout();
  return shape;
}

torch::Tensor GPTImpl::embed(const torch::Tensor& idx) {
  const auto& c = config_;
  MT_CHECK(idx.dim() == 2 && idx.scalar_type() == torch::kLong,
           "GPT: idx must be int64 [B, T], got ", idx.scalar_type(), " of sizes ", idx.sizes());
  const int64_t t = idx.size(1);
  MT_CHECK(t >= 1 && t <= c.block_size(), "GPT: sequence length ", t,
           " must be in [1, block_size = ", c.block_size(), "]");
  MT_CHECK(!tp_.sequence_parallel || t % tp_.group->size() == 0,
           "GPT: with sequence parallelism tp (", tp_.group->size(),
           ") must divide the sequence length (", t, ")");
  auto x = wte(idx) + wpe(t); // [B, T, C] (sequence parallel: [B, T/tp, C])
  if (rng_) {
    x = rng_->dropout(x, c.dropout(), is_training(), residual_stream(tp_.sequence_parallel));
  }
  return x;
}

std::vector<std::shared_ptr<torch::nn::Module>> GPTImpl::blocks() {
  return h->children();
}

torch::Tensor GPTImpl::logits(const torch::Tensor& x) {
  return wte->logits(ln_f(x)); // [B, T, Vp/tp]: full sequence, this rank's vocab columns
}

torch::Tensor GPTImpl::head_loss(const torch::Tensor& x, const torch::Tensor& targets) {
  return vocab_parallel_cross_entropy(logits(x), targets, tp_.group,
                                      VocabParallelCrossEntropyOptions(config_.vocab_size()))
      .sum;
}

GPTOutput GPTImpl::forward(const torch::Tensor& idx, const std::optional<torch::Tensor>& targets) {
  auto x = embed(idx);
  for (const auto& module : *h) {
    x = module->as<ParallelTransformerBlockImpl>()->forward(x);
  }
  GPTOutput out;
  out.logits = logits(x);
  if (targets.has_value()) {
    MT_CHECK(targets->sizes() == idx.sizes(), "GPT: targets of sizes ", targets->sizes(),
             " must match idx of sizes ", idx.sizes());
    const auto loss = vocab_parallel_cross_entropy(
        out.logits, *targets, tp_.group, VocabParallelCrossEntropyOptions(config_.vocab_size()));
    out.loss = loss.mean;
    out.loss_sum = loss.sum;
    out.token_count = loss.count;
  }
  return out;
}

int64_t GPTImpl::num_parameters() const {
  const auto& c = config_;
  const int64_t C = c.n_embd();
  const int64_t per_block = 2 * C               // ln_1
                            + 3 * C * C + 3 * C // attn.c_attn
                            + C * C + C         // attn.c_proj
                            + 2 * C             // ln_2
                            + 4 * C * C + 4 * C // mlp.c_fc
                            + 4 * C * C + C;    // mlp.c_proj
  return c.vocab_size() * C + c.block_size() * C + c.n_layer() * per_block + 2 * C;
}

void GPTImpl::pretty_print(std::ostream& stream) const {
  const auto& c = config_;
  stream << "meshtrain::gpt::GPT(vocab_size=" << c.vocab_size()
         << ", padded_vocab=" << padded_vocab_size() << ", block_size=" << c.block_size()
         << ", n_layer=" << c.n_layer() << ", n_head=" << c.n_head() << ", n_embd=" << c.n_embd()
         << ", dropout=" << c.dropout() << ", tp=" << tp_.group->size()
         << ", sequence_parallel=" << (tp_.sequence_parallel ? "true" : "false") << ")";
}

} // namespace meshtrain::gpt
