// defines: add_llama_flags, read_llama_flags, llama_fields (see llama_flags.h).
#include "llama_flags.h"

#include <c10/util/Exception.h>

#include <sstream>

namespace llama {

namespace cli = meshtrain::cli;

void add_llama_flags(cxxopts::Options& options) {
  // clang-format off
  options.add_options("model")
    ("block-size", "sequence length T (training, and the longest context when sampling)",
     cli::text("64"))
    ("n-layer", "decoder layers", cli::text("4"))
    ("n-head", "query heads", cli::text("4"))
    ("n-kv-head", "key/value heads of grouped-query attention (divides --n-head; tp must "
                  "divide it)", cli::text("2"))
    ("n-embd", "model width C", cli::text("128"))
    ("ffn-dim", "SwiGLU hidden width; 0: 8C/3 rounded up to a multiple of 64", cli::text("0"))
    ("vocab-size", "vocabulary V (byte-level text: 256); every token must be < V", cli::text("256"))
    ("rope-theta", "base of the rotary position embedding", cli::text("10000"))
    ("tie-embeddings", "logits through embed_tokens (no lm_head): true or false",
     cli::boolean(false));
  // clang-format on
}

LlamaConfig read_llama_flags(const cli::ParsedFlags& flags) {
  LlamaConfig c;
  c.block_size(flags.integer("block-size", 1, 1 << 20))
      .n_layer(flags.integer("n-layer", 1, 1 << 12))
      .n_head(flags.integer("n-head", 1, 1 << 12))
      .n_kv_head(flags.integer("n-kv-head", 1, 1 << 12))
      .n_embd(flags.integer("n-embd", 1, 1 << 20))
      .vocab_size(flags.integer("vocab-size", 1, 65536))
      .rope_theta(flags.number("rope-theta", 1.0, 1e12))
      .tie_embeddings(flags.flag("tie-embeddings"));
  const int64_t ffn = flags.integer("ffn-dim", 0, 1 << 24);
  c.ffn_dim(ffn == 0 ? default_ffn_dim(c.n_embd()) : ffn);
  const auto n = [](int64_t v) { return std::to_string(v); };
  if (c.n_embd() % c.n_head() != 0) {
    throw cli::UsageError("--n-embd " + n(c.n_embd()) + " must be divisible by --n-head " +
                          n(c.n_head()) + " (heads of equal width)");
  }
  if ((c.n_embd() / c.n_head()) % 2 != 0) {
    throw cli::UsageError("--n-embd " + n(c.n_embd()) + " / --n-head " + n(c.n_head()) + " = " +
                          n(c.n_embd() / c.n_head()) +
                          ": the head dim must be even (rotary embeddings pair its halves)");
  }
  if (c.n_head() % c.n_kv_head() != 0) {
    throw cli::UsageError("--n-kv-head " + n(c.n_kv_head()) + " must divide --n-head " +
                          n(c.n_head()) + " (each key/value head serves a whole group of heads)");
  }
  if (c.rope_theta() <= 1.0) {
    throw cli::UsageError("--rope-theta " + flags.str("rope-theta") + ": must be > 1");
  }
  return c;
}

std::vector<std::pair<std::string, std::string>> llama_fields(const LlamaConfig& c) {
  std::ostringstream theta;
  theta << c.rope_theta();
  return {{"--block-size", std::to_string(c.block_size())},
          {"--n-layer", std::to_string(c.n_layer())},
          {"--n-head", std::to_string(c.n_head())},
          {"--n-kv-head", std::to_string(c.n_kv_head())},
          {"--n-embd", std::to_string(c.n_embd())},
          {"--ffn-dim", std::to_string(c.ffn_dim())},
          {"--vocab-size", std::to_string(c.vocab_size())},
          {"--rope-theta", theta.str()},
          {"--tie-embeddings", c.tie_embeddings() ? "true" : "false"}};
}

} // namespace llama
