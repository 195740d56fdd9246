// defines: bench_startup — what a rank holds from process start to the end of a few training
// steps of the GPT (examples/gpt), with the model declared and laid out (sharded start-up,
// parallel/param_init.h) or built whole on every rank first (--whole: how every rank started
// before); with --init FILE from a safetensors file's weights (mapped and read per rank, or
// with --whole read whole into the whole model):
//   mpirun -np 8 bench_startup --n-layer 24 --n-embd 512 --n-head 8 --block-size 64 --zero 3
// Prints one JSON line per rank (rank 0 gathers them; bench_startup.py reads them):
//   {"rank", "peak_rss_bytes" (getrusage ru_maxrss since process start), "tensor_peak_bytes"
//    (the counting allocator's peak since process start), "startup_s" (construction +
//    parallelize on this rank), "model_bytes" (the whole model's fp32 bytes, unpadded)}
// The peak RSS includes the process's libraries and MPI buffers: compare against the same
// layout with a one-layer model (bench_startup.py does) to see the model's part.
#include "meshtrain/core/runtime.h"
#include "meshtrain/core/token_file.h"
#include "meshtrain/launch/checkpoint.h"
#include "meshtrain/launch/cli.h"
#include "meshtrain/launch/parallelize.h"
#include "meshtrain/launch/trainer.h"
#include "meshtrain/memory/alloc_tracker.h"
#include "meshtrain/parallel/param_init.h"

#include "examples/gpt/gpt_model.h"

#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>

using namespace meshtrain;

namespace {

// Resident pages of this process mapped from files (a mapped --init file's among them), now.
int64_t rss_file_bytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("RssFile:", 0) == 0) {
      return std::stoll(line.substr(8)) * 1024; // "RssFile:   1234 kB"
    }
  }
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  // First, so that every tensor of the process is counted.
  auto& tracker = AllocationTracker::install();
  Runtime runtime(&argc, &argv);
  cxxopts::Options options("bench_startup", "Per-rank memory from start-up through training");
  // clang-format off
  options.add_options()
    ("n-layer", "transformer blocks", cli::text("24"))
    ("n-embd", "width C", cli::text("512"))
    ("n-head", "heads", cli::text("8"))
    ("block-size", "sequence length T", cli::text("64"))
    ("tp", "tensor-parallel ranks (dp = the rest)", cli::text("1"))
    ("zero", "ZeRO stage", cli::text("3"))
    ("recompute", "none, selective or full", cli::text("none"))
    ("batch", "global batch (sequences per step)", cli::text("8"))
    ("steps", "training steps", cli::text("2"))
    ("data", "llm.c token file", cli::text("data/fortunes_train.bin"))
    ("whole", "build the whole model on every rank, then lay it out", cli::boolean())
    ("init", "start from this safetensors file's weights (mapped; with --whole: read whole)",
     cli::text(""))
    ("h,help", "print this help");
  // clang-format on
  const auto& world = runtime.world();
  gpt::GPTConfig config;
  ParallelPlan plan;
  int64_t steps = 0;
  bool whole = false;
  std::string data;
  std::string init;
  try {
    const cli::ParsedFlags flags(options, argc, argv);
    if (flags.help()) {
      std::cout << options.help() << "\n";
      return 0;
    }
    config.n_layer(flags.integer("n-layer", 1, 1 << 12))
        .n_embd(flags.integer("n-embd", 1, 1 << 16))
        .n_head(flags.integer("n-head", 1, 1 << 12))
        .block_size(flags.integer("block-size", 1, 1 << 20));
    const int tp = static_cast<int>(flags.integer("tp", 1, 1 << 12));
    plan.dims = ParallelDims{-1, 1, tp, 1};
    plan.zero_stage = static_cast<int>(flags.integer("zero", 0, 3));
    plan.global_batch = flags.integer("batch", 1, 1 << 20);
    plan.recompute =
        cli::parse_choice<RecomputeMode>("recompute", flags.str("recompute"), parse_recompute_mode);
    steps = flags.integer("steps", 1, 1 << 20);
    whole = flags.flag("whole");
    data = flags.str("data");
    init = flags.str("init");
    ModelShape shape;
    shape.n_layer = config.n_layer();
    shape.n_head = config.n_head();
    shape.seq_len = config.block_size();
    shape.n_embd = config.n_embd();
    plan = cli::validate_layout(plan, world->size(), shape);
  } catch (const cli::UsageError& e) {
    std::cerr << "bench_startup: " << e.what() << "\n";
    return cli::kExitUsage;
  }
  const Mesh mesh(plan.dims, world);
  const auto tokens = std::make_shared<const TokenFile>(data, config.vocab_size());

  world->barrier();
  const auto t0 = std::chrono::steady_clock::now();
  std::shared_ptr<gpt::GPTImpl> model;
  ParallelizeOptions parallelize_options;
  if (whole) {
    // How every rank started before sharded start-up (and --init with it).
    torch::manual_seed(1337);
    model = std::make_shared<gpt::GPTImpl>(config);
    if (!init.empty()) {
      load_full_weights(*model, load_safetensors(init).tensors, 0, 1, init);
    }
  } else {
    DeferredInit deferred(1337);
    model = std::make_shared<gpt::GPTImpl>(config);
    if (!init.empty()) {
      parallelize_options.initial_weights(
          std::make_shared<const SafetensorsFile>(map_safetensors(init)));
    }
  }
  const int64_t model_bytes = model->num_parameters() * 4;
  auto parallel = parallelize(model, mesh, plan, parallelize_options);
  const double startup_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const int64_t startup_rss = peak_rss_bytes();
  const int64_t startup_tensors = tracker.peak_bytes();
  const int64_t startup_file = rss_file_bytes();
  {
    Trainer trainer(parallel, tokens, nullptr,
                    TrainerOptions()
                        .steps(steps)
                        .warmup_steps(0)
                        .seq_len(config.block_size())
                        .progress(ProgressStyle::kOff));
    for (int64_t s = 0; s < steps; ++s) {
      trainer.train_step();
    }
  }
  // Per rank: [rss, tensor peak, the same two at the end of start-up, start-up microseconds],
  // on rank 0.
  constexpr int kFigures = 6;
  auto mine = torch::tensor({peak_rss_bytes(), tracker.peak_bytes(), startup_rss, startup_tensors,
                             static_cast<int64_t>(startup_s * 1e6), startup_file},
                            torch::kLong);
  auto all = torch::empty({world->size() * kFigures}, torch::kLong);
  world->all_gather(mine, all);
  if (runtime.rank() == 0) {
    for (int r = 0; r < world->size(); ++r) {
      const auto figure = [&](int i) {
        return static_cast<long long>(all[kFigures * r + i].item<int64_t>());
      };
      std::printf("{\"rank\": %d, \"peak_rss_bytes\": %lld, \"tensor_peak_bytes\": %lld, "
                  "\"startup_rss_bytes\": %lld, \"startup_tensor_bytes\": %lld, "
                  "\"startup_s\": %.3f, \"startup_rss_file_bytes\": %lld, \"model_bytes\": %lld}\n",
                  r, figure(0), figure(1), figure(2), figure(3),
                  static_cast<double>(figure(4)) / 1e6, figure(5),
                  static_cast<long long>(model_bytes));
    }
  }
  return 0;
}
