// defines: main of sample_llama — prints text sampled from a trained Llama (a checkpoint of
// any layout, or a safetensors file with Hugging Face's names, e.g. meshtrain-export's),
// tensor-parallel over the MPI ranks (tp = world size): each rank holds its heads and its
// vocab columns of the logits; the ranks gather the last position's logits and draw the same
// token from the same seeded generator. Byte-level text (vocab 256): tokens are printed as
// bytes. Built against the installed package only; see docs/llama.md.
//
//   sample_llama --checkpoint checkpoints/llama
//   mpirun -np 2 sample_llama --weights out/llama.safetensors --prompt "The " --temperature 0.7
//
// Exit codes: 0 done, 1 runtime failure, 2 bad command line.
#include "llama_model.h"

#include <meshtrain/core/errors.h>
#include <meshtrain/core/runtime.h>
#include <meshtrain/core/safetensors.h>
#include <meshtrain/launch/checkpoint.h>
#include <meshtrain/launch/cli.h>
#include <meshtrain/launch/job_exit.h>
#include <meshtrain/launch/parallelize.h>
#include <meshtrain/parallel/shard_tensor.h>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace {

namespace cli = meshtrain::cli;
using cli::UsageError;

constexpr const char* kProgram = "sample_llama";

struct Flags {
  std::string checkpoint;
  std::string weights;
  std::string prompt;
  int64_t tokens = 0;
  double temperature = 0;
  int64_t top_k = 0;
  uint64_t seed = 0;
};

cxxopts::Options make_options() {
  cxxopts::Options options(kProgram, "Prints text sampled from a trained Llama, tensor-parallel "
                                     "over the MPI ranks (tp = world size).");
  // clang-format off
  options.add_options()
    ("checkpoint", "a checkpoint: a step directory, or a checkpoint directory (its latest)",
     cli::text(""))
    ("weights", "or: a safetensors file of full weights (meshtrain-export's)", cli::text(""))
    ("prompt", "text the sample continues", cli::text("\n"))
    ("tokens", "tokens (bytes) to generate", cli::text("400"))
    ("temperature", "softmax temperature; 0: always the most likely token", cli::text("0.8"))
    ("top-k", "sample among the k most likely tokens; 0: all", cli::text("40"))
    ("seed", "seed of the sampling", cli::text("1337"))
    ("h,help", "print this help");
  // clang-format on
  return options;
}

// nullopt: --help was asked for.
std::optional<Flags> parse_flags(int argc, char** argv) {
  auto options = make_options();
  const cli::ParsedFlags parsed(options, argc, argv);
  if (parsed.help()) {
    return std::nullopt;
  }
  Flags f;
  f.checkpoint = parsed.str("checkpoint");
  f.weights = parsed.str("weights");
  f.prompt = parsed.str("prompt");
  f.tokens = parsed.integer("tokens", 0, 1 << 20);
  f.temperature = parsed.number("temperature", 0.0, 1e6);
  f.top_k = parsed.integer("top-k", 0, int64_t{1} << 40);
  f.seed = cli::parse_uint64("seed", parsed.str("seed"));
  if (f.checkpoint.empty() == f.weights.empty()) {
    throw UsageError("give one of --checkpoint DIR or --weights FILE.safetensors");
  }
  if (!f.weights.empty() && !std::filesystem::is_regular_file(f.weights)) {
    throw UsageError("--weights " + f.weights + ": no such file");
  }
  if (f.prompt.empty()) {
    throw UsageError("--prompt: give at least one character");
  }
  return f;
}

// The model config and full weights, from a checkpoint or an export (whose "model" metadata
// meshtrain-export copied from the checkpoint).
struct Source {
  llama::LlamaConfig config;
  meshtrain::NamedTensors weights;
  std::string name;
};

Source load_source(const Flags& f) {
  Source s;
  std::string model_json;
  if (!f.checkpoint.empty()) {
    const auto info = meshtrain::read_checkpoint_info(meshtrain::resolve_checkpoint(f.checkpoint));
    model_json = info.model_json;
    s.weights = meshtrain::load_consolidated_weights(info);
    s.name = info.path;
  } else {
    auto file = meshtrain::load_safetensors(f.weights);
    MT_CHECK(file.metadata.count("model") > 0, f.weights,
             ": no \"model\" metadata (the model config); export it with meshtrain-export");
    model_json = file.metadata.at("model");
    s.weights = std::move(file.tensors);
    s.name = f.weights;
  }
  s.config = llama::config_from_json(model_json, s.name);
  return s;
}

// Appends `count` sampled tokens to `tokens`. Collective over the TP group.
void generate(llama::LlamaImpl& model, std::vector<int64_t>& tokens, const Flags& f) {
  torch::NoGradGuard no_grad;
  model.eval();
  const auto& tp = model.tp_group();
  const int64_t vocab = model.config().vocab_size();
  const auto vocab_spec = meshtrain::partitioned_spec(
      /*dim=*/1, model.padded_vocab_size(), tp->rank(), tp->size(), vocab);
  auto generator = at::make_generator<at::CPUGeneratorImpl>(f.seed);
  const int64_t block = model.config().block_size();
  for (int64_t i = 0; i < f.tokens; ++i) {
    const int64_t start = std::max<int64_t>(0, static_cast<int64_t>(tokens.size()) - block);
    const auto context =
        torch::tensor(std::vector<int64_t>(tokens.begin() + start, tokens.end())).unsqueeze(0);
    const auto local = model.forward(context).logits.select(1, -1); // [1, Vp/tp]
    // [1, V]: the same bits on every rank, so every rank draws the same token.
    auto logits = meshtrain::gather_unsharded(local, vocab_spec, tp);
    int64_t next = 0;
    if (f.temperature == 0) {
      next = logits.argmax(-1).item<int64_t>();
    } else {
      logits = logits / f.temperature;
      if (f.top_k > 0 && f.top_k < vocab) {
        const auto kth = std::get<0>(logits.topk(f.top_k, -1)).select(-1, -1);
        logits = logits.masked_fill(logits < kth.unsqueeze(-1), -INFINITY);
      }
      next = at::multinomial(logits.softmax(-1), 1, false, generator).item<int64_t>();
    }
    tokens.push_back(next);
  }
}

} // namespace

int main(int argc, char** argv) {
  const auto runtime = meshtrain::start_runtime(&argc, &argv, kProgram);
  if (!runtime) {
    return cli::kExitFailure;
  }
  const auto& world = runtime->world();
  std::optional<Flags> flags;
  Source source;
  meshtrain::ParallelPlan plan; // tp = world size
  int code = 0;
  std::string message;
  try {
    flags = parse_flags(argc, argv);
    if (flags) {
      source = load_source(*flags);
      plan.dims = meshtrain::ParallelDims{1, 1, runtime->world_size(), 1};
      meshtrain::ModelShape shape;
      shape.n_layer = source.config.n_layer();
      shape.n_head = source.config.n_head();
      shape.n_kv_head = source.config.n_kv_head();
      shape.seq_len = source.config.block_size();
      plan = cli::validate_layout(plan, runtime->world_size(), shape);
      for (unsigned char c : flags->prompt) {
        if (c >= source.config.vocab_size()) {
          throw UsageError("--prompt: byte " + std::to_string(c) + " is outside the vocab of " +
                           std::to_string(source.config.vocab_size()));
        }
      }
    }
  } catch (const UsageError& e) {
    code = cli::kExitUsage;
    message = e.what();
  } catch (const std::exception& e) {
    code = cli::kExitFailure;
    message = meshtrain::message_of(e);
  }
  if ((code = meshtrain::agree_on_exit(world, code, message, kProgram)) != 0) {
    return code;
  }
  if (!flags) {
    if (runtime->rank() == 0) {
      std::cout << make_options().help() << "\n";
    }
    return 0;
  }
  try {
    const meshtrain::Mesh mesh(plan.dims, world);
    auto model = std::make_shared<llama::LlamaImpl>(source.config);
    meshtrain::load_full_weights(*model, source.weights, 0, 1, source.name);
    meshtrain::parallelize(model, mesh, plan, meshtrain::ParallelizeOptions().training(false));
    std::vector<int64_t> tokens(flags->prompt.begin(), flags->prompt.end());
    for (auto& t : tokens) {
      t = static_cast<unsigned char>(t);
    }
    generate(*model, tokens, *flags);
    if (runtime->rank() == 0) {
      std::string text(tokens.begin(), tokens.end());
      std::fwrite(text.data(), 1, text.size(), stdout);
      std::printf("\n");
      std::fflush(stdout);
    }
  } catch (const std::exception& e) {
    return meshtrain::exit_after_failure(kProgram, world, e, cli::kExitFailure);
  }
  return 0;
}
