// defines: GPTConfig::validate, GPTImpl (see gpt_model.h).
#include "examples/gpt/gpt_model.h"

#include "core/errors.h"
#include "parallel/mappings.h"
#include "parallel/parallel_self_attention.h"
#include "parallel/vocab_parallel_cross_entropy.h"

#include <utility>

namespace meshtrain::gpt {

void GPTConfig::validate(int tp) const {
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
  MT_CHECK(tp >= 1, "GPT: tp (", tp, ") must be >= 1");
  check_attention_split(
      ParallelSelfAttentionOptions(n_embd(), n_head()).n_layer(n_layer()).dropout(dropout()), tp);
  MT_CHECK(!sequence_parallel() || block_size() % tp == 0, "GPT: with sequence parallelism tp (",
           tp, ") must divide block_size (", block_size(), ")");
}

GPTImpl::GPTImpl(GPTConfig config, CommunicatorPtr tp_group, RngTrackerPtr rng)
    : config_(std::move(config)), tp_group_(std::move(tp_group)), rng_(std::move(rng)) {
  MT_CHECK(tp_group_ != nullptr, "GPT: the tp communicator is null");
  const auto& c = config_;
  c.validate(tp_group_->size());
  if (rng_ == nullptr && c.dropout() > 0.0) {
    rng_ = std::make_shared<RngTracker>(RngTrackerOptions(c.dropout_seed()), tp_group_);
  }

  // Construction order = draw order (see the header): wte, wpe, h.0 .. h.<L-1>, ln_f.
  wte = VocabParallelEmbedding(VocabParallelEmbeddingOptions(c.vocab_size(), c.n_embd())
                                   .pad_to_multiple_of(c.pad_vocab_to_multiple_of())
                                   .sequence_parallel(c.sequence_parallel())
                                   .init_std(c.init_std()),
                               tp_group_);
  torch::Tensor wpe_master; // [T, C]
  {
    torch::NoGradGuard no_grad;
    wpe_master = torch::empty({c.block_size(), c.n_embd()}).normal_(0.0, c.init_std());
  }
  // _weight: the module adopts the drawn tensor instead of drawing N(0, 1) itself.
  wpe = torch::nn::Embedding(
      torch::nn::EmbeddingOptions(c.block_size(), c.n_embd())._weight(wpe_master));
  h = torch::nn::ModuleList();
  for (int64_t i = 0; i < c.n_layer(); ++i) {
    h->push_back(ParallelTransformerBlock(ParallelTransformerBlockOptions(c.n_embd(), c.n_head())
                                              .n_layer(c.n_layer())
                                              .dropout(c.dropout())
                                              .layer_norm_eps(c.layer_norm_eps())
                                              .sequence_parallel(c.sequence_parallel()),
                                          tp_group_, rng_));
    if (c.recompute() == RecomputeMode::kSelective) {
      // The core's [B, h, T, T] scores and probabilities are recomputed in backward.
      RngTracker* rng = rng_.get();
      h->ptr<ParallelTransformerBlockImpl>(i)->attn->set_core_wrapper(
          [rng](const ParallelSelfAttentionImpl::CoreFn& core, const torch::Tensor& q,
                const torch::Tensor& k, const torch::Tensor& v) {
            return recompute(
                [core](const std::vector<torch::Tensor>& in) -> std::vector<torch::Tensor> {
                  return {core(in[0], in[1], in[2])};
                },
                {q, k, v}, rng)[0];
          });
    }
  }
  ln_f = ParallelLayerNorm(ParallelLayerNormOptions(c.n_embd())
                               .eps(c.layer_norm_eps())
                               .sequence_parallel(c.sequence_parallel()),
                           tp_group_);

  torch::OrderedDict<std::string, std::shared_ptr<torch::nn::Module>> transformer;
  transformer.insert("wte", wte.ptr());
  transformer.insert("wpe", wpe.ptr());
  transformer.insert("h", h.ptr());
  transformer.insert("ln_f", ln_f.ptr());
  register_module("transformer", torch::nn::ModuleDict(transformer));
}

GPTOutput GPTImpl::forward(const torch::Tensor& idx, const std::optional<torch::Tensor>& targets) {
  const auto& c = config_;
  const int tp = tp_group_->size();
  MT_CHECK(idx.dim() == 2 && idx.scalar_type() == torch::kLong,
           "GPT: idx must be int64 [B, T], got ", idx.scalar_type(), " of sizes ", idx.sizes());
  const int64_t t = idx.size(1);
  MT_CHECK(t >= 1 && t <= c.block_size(), "GPT: sequence length ", t,
           " must be in [1, block_size = ", c.block_size(), "]");
  MT_CHECK(!c.sequence_parallel() || t % tp == 0, "GPT: with sequence parallelism tp (", tp,
           ") must divide the sequence length (", t, ")");

  auto tok = wte(idx);                                 // [B, T, C] (sp: [B, T/tp, C])
  auto pos = wpe->weight.narrow(0, 0, t).unsqueeze(0); // [1, T, C]
  if (c.sequence_parallel()) {
    // This rank's positions; the backward all-gathers wpe's gradient rows, so every rank
    // ends with the full (replicated) gradient of wpe.
    pos = scatter_to_sequence_parallel_region(pos, tp_group_); // [1, T/tp, C]
  }
  auto x = tok + pos;
  if (rng_) {
    x = rng_->dropout(x, c.dropout(), is_training(), residual_stream(c.sequence_parallel()));
  }
  for (const auto& module : *h) {
    auto* block = module->as<ParallelTransformerBlockImpl>();
    if (c.recompute() == RecomputeMode::kFull) {
      x = recompute(
          [block](const std::vector<torch::Tensor>& in) -> std::vector<torch::Tensor> {
            return {block->forward(in[0])};
          },
          {x}, rng_.get())[0];
    } else {
      x = block->forward(x);
    }
  }
  x = ln_f(x);

  GPTOutput out;
  out.logits = wte->logits(x); // [B, T, Vp/tp]: full sequence, this rank's vocab columns
  if (targets.has_value()) {
    MT_CHECK(targets->sizes() == idx.sizes(), "GPT: targets of sizes ", targets->sizes(),
             " must match idx of sizes ", idx.sizes());
    const auto loss = vocab_parallel_cross_entropy(
        out.logits, *targets, tp_group_, VocabParallelCrossEntropyOptions(c.vocab_size()));
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
         << ", dropout=" << c.dropout() << ", tp=" << tp_group_->size()
         << ", sequence_parallel=" << (c.sequence_parallel() ? "true" : "false") << ")";
}

} // namespace meshtrain::gpt
