// defines: main of meshtrain-export — a checkpoint of any layout -> one safetensors file of
// the full, unpadded weights with the model's own names (nanoGPT's for the GPT, DESIGN §4),
// which PyTorch code (and train_gpt --init, sample_gpt --weights) loads as it is.
//
//   meshtrain-export checkpoints/gpt out/gpt.safetensors            (the latest checkpoint)
//   meshtrain-export checkpoints/gpt/step_00004500 out/gpt.safetensors
//
// No MPI launch needed: it reads every TP shard itself. The output is written to a temporary
// name and renamed (complete or absent). Exit codes: 0 done, 1 failure, 2 bad command line.
#include "meshtrain/core/safetensors.h"
#include "meshtrain/launch/checkpoint.h"
#include "meshtrain/launch/cli.h"

#include <c10/util/Exception.h>

#include <cstdio>
#include <exception>
#include <filesystem>
#include <iostream>
#include <string>

namespace {

namespace cli = meshtrain::cli;

constexpr const char* kUsage =
    "usage: meshtrain-export CHECKPOINT OUT.safetensors\n"
    "  CHECKPOINT  a step directory (step_<N>/ with meta.json), or a checkpoint directory\n"
    "              (its latest complete checkpoint)\n"
    "  OUT         the safetensors file to write: full, unpadded weights, the model's names,\n"
    "              metadata {format: pt, step, model: <the checkpoint's model config>}\n";

} // namespace

int main(int argc, char** argv) {
  const std::string first = argc > 1 ? argv[1] : "";
  if (first == "-h" || first == "--help") {
    std::cout << kUsage;
    return 0;
  }
  if (argc != 3) {
    std::cerr << "meshtrain-export: expected 2 arguments, got " << argc - 1 << "\n" << kUsage;
    return cli::kExitUsage;
  }
  const std::string source = argv[1];
  const std::string out = argv[2];
  namespace fs = std::filesystem;
  const fs::path parent = fs::absolute(out).parent_path();
  if (!fs::is_directory(parent)) {
    std::cerr << "meshtrain-export: " << out << ": directory " << parent.string()
              << " does not exist\n";
    return cli::kExitUsage;
  }
  try {
    const auto info = meshtrain::read_checkpoint_info(meshtrain::resolve_checkpoint(source));
    const auto weights = meshtrain::load_consolidated_weights(info);
    int64_t parameters = 0;
    for (const auto& [name, tensor] : weights) {
      parameters += tensor.numel();
    }
    meshtrain::save_safetensors(out, weights,
                                {{"format", "pt"},
                                 {"step", std::to_string(info.step)},
                                 {"model", info.model_json},
                                 {"source", info.path}});
    std::printf("meshtrain-export: %s (step %lld, dp %d x tp %d, ZeRO %d) -> %s: %zu tensors, "
                "%lld parameters\n",
                info.path.c_str(), static_cast<long long>(info.step), info.dp, info.tp,
                info.zero_stage, out.c_str(), weights.size(), static_cast<long long>(parameters));
  } catch (const c10::Error& e) {
    std::cerr << "meshtrain-export: error: " << e.what_without_backtrace() << "\n";
    return cli::kExitFailure;
  } catch (const std::exception& e) {
    std::cerr << "meshtrain-export: error: " << e.what() << "\n";
    return cli::kExitFailure;
  }
  return 0;
}
