// defines: main of sample_gpt — prints text sampled from a trained GPT (a checkpoint of any
// layout, or an exported safetensors file), tensor-parallel over the MPI ranks (tp = world
// size): each rank holds its shard of the model and computes its vocab columns of the logits;
// the ranks gather the last position's logits and draw the same token from the same seeded
// generator. Byte-level text (vocab 256): the tokens are printed as bytes.
//
//   sample_gpt --checkpoint checkpoints/gpt
//   mpirun -np 2 sample_gpt --weights out/gpt.safetensors --prompt "The " --temperature 0.7
//
// Exit codes: 0 done, 1 runtime failure, 2 bad command line.
#include "core/errors.h"
#include "core/runtime.h"
#include "core/safetensors.h"
#include "examples/gpt/gpt_model.h"
#include "launch/checkpoint.h"
#include "launch/job_exit.h"
#include "parallel/shard_tensor.h"

#include <ATen/CPUGeneratorImpl.h>
#include <cxxopts.hpp>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

namespace gpt = meshtrain::gpt;
using nlohmann::json;

constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;

class UsageError : public std::runtime_error {
public:
  using std::runtime_error::runtime_error;
};

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
  cxxopts::Options options("sample_gpt", "Prints text sampled from a trained GPT, tensor-parallel "
                                         "over the MPI ranks (tp = world size).");
  // clang-format off
  options.add_options()
    ("checkpoint", "a checkpoint: a step directory, or a checkpoint directory (its latest)",
     cxxopts::value<std::string>()->default_value(""))
    ("weights", "or: a safetensors file of full weights from meshtrain-export",
     cxxopts::value<std::string>()->default_value(""))
    ("prompt", "text the sample continues", cxxopts::value<std::string>()->default_value("\n"))
    ("tokens", "tokens (bytes) to generate", cxxopts::value<int64_t>()->default_value("400"))
    ("temperature", "softmax temperature; 0: always the most likely token",
     cxxopts::value<double>()->default_value("0.8"))
    ("top-k", "sample among the k most likely tokens; 0: all",
     cxxopts::value<int64_t>()->default_value("40"))
    ("seed", "seed of the sampling", cxxopts::value<uint64_t>()->default_value("1337"))
    ("h,help", "print this help");
  // clang-format on
  return options;
}

// nullopt: --help was printed.
std::optional<Flags> parse_flags(int argc, char** argv) {
  auto options = make_options();
  cxxopts::ParseResult r;
  try {
    r = options.parse(argc, argv);
  } catch (const cxxopts::exceptions::exception& e) {
    throw UsageError(std::string(e.what()) + " (see --help)");
  }
  if (r.count("help") > 0) {
    return std::nullopt;
  }
  if (!r.unmatched().empty()) {
    throw UsageError("unexpected argument '" + r.unmatched().front() + "' (see --help)");
  }
  Flags f;
  f.checkpoint = r["checkpoint"].as<std::string>();
  f.weights = r["weights"].as<std::string>();
  f.prompt = r["prompt"].as<std::string>();
  f.tokens = r["tokens"].as<int64_t>();
  f.temperature = r["temperature"].as<double>();
  f.top_k = r["top-k"].as<int64_t>();
  f.seed = r["seed"].as<uint64_t>();
  if (f.checkpoint.empty() == f.weights.empty()) {
    throw UsageError("give one of --checkpoint DIR or --weights FILE.safetensors");
  }
  if (!f.weights.empty() && !std::filesystem::is_regular_file(f.weights)) {
    throw UsageError("--weights " + f.weights + ": no such file");
  }
  if (f.prompt.empty()) {
    throw UsageError("--prompt: give at least one character");
  }
  if (f.tokens < 0 || f.tokens > (1 << 20)) {
    throw UsageError("--tokens " + std::to_string(f.tokens) + ": must be in [0, 1048576]");
  }
  if (!std::isfinite(f.temperature) || f.temperature < 0) {
    throw UsageError("--temperature " + std::to_string(f.temperature) + ": must be >= 0");
  }
  if (f.top_k < 0) {
    throw UsageError("--top-k " + std::to_string(f.top_k) + ": must be >= 0");
  }
  return f;
}

// The model config and full weights, from a checkpoint or an export (whose "model" metadata
// meshtrain-export copied from the checkpoint).
struct Source {
  gpt::GPTConfig config;
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
  try {
    const json m = json::parse(model_json);
    s.config.vocab_size(m.at("vocab_size").get<int64_t>())
        .block_size(m.at("block_size").get<int64_t>())
        .n_layer(m.at("n_layer").get<int64_t>())
        .n_head(m.at("n_head").get<int64_t>())
        .n_embd(m.at("n_embd").get<int64_t>());
  } catch (const json::exception& e) {
    MT_CHECK(false, s.name, ": the model config is incomplete (", e.what(), ")");
  }
  return s;
}

// Appends `count` sampled tokens to `tokens`. Collective over the TP group.
void generate(gpt::GPT& model, std::vector<int64_t>& tokens, const Flags& f) {
  torch::NoGradGuard no_grad;
  model->eval();
  const auto& tp = model->tp_group();
  const int64_t vocab = model->config().vocab_size();
  const auto vocab_spec = meshtrain::partitioned_spec(
      /*dim=*/1, model->padded_vocab_size(), tp->rank(), tp->size(), vocab);
  auto generator = at::make_generator<at::CPUGeneratorImpl>(f.seed);
  const int64_t block = model->config().block_size();
  for (int64_t i = 0; i < f.tokens; ++i) {
    const int64_t start = std::max<int64_t>(0, static_cast<int64_t>(tokens.size()) - block);
    const auto context =
        torch::tensor(std::vector<int64_t>(tokens.begin() + start, tokens.end())).unsqueeze(0);
    const auto local = model->forward(context).logits.select(1, -1); // [1, Vp/tp]
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
  std::unique_ptr<meshtrain::Runtime> runtime;
  try {
    runtime = std::make_unique<meshtrain::Runtime>(&argc, &argv);
  } catch (const std::exception& e) {
    std::cerr << "sample_gpt: error: " << meshtrain::message_of(e) << "\n";
    return kExitFailure;
  }
  const auto& world = runtime->world();
  const int tp = runtime->world_size();
  std::optional<Flags> flags;
  Source source;
  int code = 0;
  std::string message;
  try {
    flags = parse_flags(argc, argv);
    if (flags) {
      source = load_source(*flags);
      try {
        source.config.validate(tp);
      } catch (const c10::Error& e) {
        throw UsageError(source.name + " on " + std::to_string(tp) +
                         " ranks (tp = world size): " + e.what_without_backtrace());
      }
      for (unsigned char c : flags->prompt) {
        if (c >= source.config.vocab_size()) {
          throw UsageError("--prompt: byte " + std::to_string(c) + " is outside the vocab of " +
                           std::to_string(source.config.vocab_size()));
        }
      }
    }
  } catch (const UsageError& e) {
    code = kExitUsage;
    message = e.what();
  } catch (const std::exception& e) {
    code = kExitFailure;
    message = meshtrain::message_of(e);
  }
  if ((code = meshtrain::agree_on_exit(world, code, message, "sample_gpt")) != 0) {
    return code;
  }
  if (!flags) {
    if (runtime->rank() == 0) {
      std::cout << make_options().help() << "\n";
    }
    return 0;
  }
  try {
    gpt::GPT model(source.config, world);
    meshtrain::load_full_weights(*model, source.weights, world->rank(), tp, source.name);
    std::vector<int64_t> tokens(flags->prompt.begin(), flags->prompt.end());
    for (auto& t : tokens) {
      t = static_cast<unsigned char>(t);
    }
    generate(model, tokens, *flags);
    if (runtime->rank() == 0) {
      std::string text(tokens.begin(), tokens.end());
      std::fwrite(text.data(), 1, text.size(), stdout);
      std::printf("\n");
      std::fflush(stdout);
    }
  } catch (const std::exception& e) {
    return meshtrain::exit_after_failure("sample_gpt", world, e, kExitFailure);
  }
  return 0;
}
