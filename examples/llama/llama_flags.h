// defines: add_llama_flags, read_llama_flags, llama_fields — the Llama's shape flags, next to
// the flags every training program shares (<meshtrain/launch/training_flags.h>):
//   --block-size --n-layer --n-head --n-kv-head --n-embd --ffn-dim --vocab-size --rope-theta
//   --tie-embeddings
// Defaults: the Llama of about the default GPT's parameter count (docs/llama.md).
#pragma once

#include "llama_model.h"

#include <meshtrain/launch/cli.h>

#include <string>
#include <utility>
#include <vector>

namespace llama {

void add_llama_flags(cxxopts::Options& options);
// The config the flags describe (validated; --ffn-dim 0 resolves to default_ffn_dim). Throws
// cli::UsageError naming the flag.
LlamaConfig read_llama_flags(const meshtrain::cli::ParsedFlags& flags);
// The model flags as (flag, value): for the start-up agreement.
std::vector<std::pair<std::string, std::string>> llama_fields(const LlamaConfig& config);

} // namespace llama
