// defines: bench_recompute — what activation recomputation costs and saves on a GPT
// (examples/gpt), per mode (none, selective, full), printed as a Markdown table:
//   kept MiB   bytes a forward leaves alive for backward (the activations, logits included),
//              measured by the counting allocator (memory/alloc_tracker.h)
//   peak MiB   peak bytes above the step's start during forward + backward
//   forward ms, step ms   median forward and forward + backward time over --steps timed
//              steps (after --warmup)
// The Runtime keeps freed host memory in the heap (core/runtime.cpp), so re-allocated
// activations do not fault their pages in again every step and the times compare the
// computation.
// The model is tensor-parallel over the ranks it is started with (tp = world size; 1 rank:
// serial), optionally with sequence parallelism:
//   bench_recompute                                  # serial, 8 layers
//   mpirun -np 2 bench_recompute --sequence-parallel # tp 2
// Each mode runs its own copy of the model (same seed); the modes are interleaved step by step
// so that machine noise falls on all of them alike.
#include "meshtrain/core/cpu_features.h"
#include "meshtrain/core/runtime.h"
#include "meshtrain/launch/cli.h"
#include "meshtrain/launch/parallelize.h"
#include "meshtrain/memory/alloc_tracker.h"

#include "examples/gpt/gpt_model.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <map>
#include <vector>

using namespace meshtrain;

int main(int argc, char** argv) {
  // First, so that every tensor of the benchmark is counted.
  auto& tracker = AllocationTracker::install();
  Runtime runtime(&argc, &argv);
  cxxopts::Options options("bench_recompute", "Cost and savings of activation recomputation");
  // clang-format off
  options.add_options()
    ("n-layer", "transformer blocks", cli::text("8"))
    ("n-embd", "width C", cli::text("128"))
    ("n-head", "heads", cli::text("4"))
    ("block-size", "sequence length T", cli::text("256"))
    ("batch", "sequences per step", cli::text("8"))
    ("steps", "timed steps per mode", cli::text("10"))
    ("warmup", "untimed steps per mode first", cli::text("2"))
    ("sequence-parallel", "sequence parallelism (tp = the ranks)", cli::boolean())
    ("h,help", "print this help");
  // clang-format on
  const auto& world = runtime.world();
  gpt::GPTConfig config;
  ParallelPlan plan; // tp = the ranks
  int64_t batch = 0;
  int steps = 0;
  int warmup = 0;
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
    batch = flags.integer("batch", 1, 1 << 20);
    steps = static_cast<int>(flags.integer("steps", 1, 1 << 20));
    warmup = static_cast<int>(flags.integer("warmup", 0, 1 << 20));
    plan.dims = ParallelDims{1, 1, world->size(), 1};
    plan.sequence_parallel = flags.flag("sequence-parallel");
    plan.global_batch = batch;
    ModelShape shape;
    shape.n_layer = config.n_layer();
    shape.n_head = config.n_head();
    shape.seq_len = config.block_size();
    plan = cli::validate_layout(plan, world->size(), shape);
  } catch (const cli::UsageError& e) {
    std::cerr << "bench_recompute: " << e.what() << "\n";
    return cli::kExitUsage;
  }
  const Mesh mesh(plan.dims, world);

  const std::vector<RecomputeMode> modes = {RecomputeMode::kNone, RecomputeMode::kSelective,
                                            RecomputeMode::kFull};
  // One GPT per mode, laid out by parallelize (no optimizer: forward and backward only).
  std::map<RecomputeMode, Parallelized> models;
  for (auto mode : modes) {
    torch::manual_seed(1337);
    auto mode_plan = plan;
    mode_plan.recompute = mode;
    models.emplace(mode, parallelize(std::make_shared<gpt::GPTImpl>(config), mesh, mode_plan,
                                     ParallelizeOptions().training(false)));
  }
  torch::manual_seed(7);
  const auto idx = torch::randint(0, config.vocab_size(), {batch, config.block_size()});
  std::map<RecomputeMode, std::vector<double>> ms, fwd;
  std::map<RecomputeMode, int64_t> kept, peak;
  for (int s = 0; s < warmup + steps; ++s) {
    for (auto mode : modes) {
      auto& model = models.at(mode);
      model.model->zero_grad();
      world->barrier();
      const int64_t start_bytes = tracker.current_bytes();
      tracker.reset_peaks();
      const auto t0 = std::chrono::steady_clock::now();
      const auto loss = model.loss(MicroBatch{idx, idx}) / idx.numel(); // mean token loss
      const int64_t after_forward = tracker.current_bytes() - start_bytes;
      const double forward_ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      loss.backward();
      world->barrier();
      const double elapsed =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      if (s >= warmup) {
        ms[mode].push_back(elapsed);
        fwd[mode].push_back(forward_ms);
        kept[mode] = after_forward;
        peak[mode] = tracker.peak_bytes() - start_bytes;
      }
    }
  }
  if (runtime.rank() != 0) {
    return 0;
  }
  const auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const double base_ms = median(ms.at(RecomputeMode::kNone));
  const double base_kept = static_cast<double>(kept.at(RecomputeMode::kNone));
  const double base_peak = static_cast<double>(peak.at(RecomputeMode::kNone));
  std::printf("%s\n", describe_cpu().c_str());
  std::printf("bench_recompute: GPT %lld layers, C %lld, %lld heads, T %lld, batch %lld; tp %d%s; "
              "%d thread(s)/rank; median of %d steps\n\n",
              static_cast<long long>(config.n_layer()), static_cast<long long>(config.n_embd()),
              static_cast<long long>(config.n_head()), static_cast<long long>(config.block_size()),
              static_cast<long long>(batch), world->size(),
              plan.sequence_parallel ? " sequence parallel" : "", torch::get_num_threads(), steps);
  std::printf("| recompute | kept MiB | vs none | peak MiB | vs none | forward ms | step ms | "
              "vs none |\n");
  std::printf("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  for (auto mode : modes) {
    const double k = static_cast<double>(kept.at(mode));
    const double p = static_cast<double>(peak.at(mode));
    const double t = median(ms.at(mode));
    std::printf("| %s | %.1f | %+.0f%% | %.1f | %+.0f%% | %.1f | %.1f | %+.0f%% |\n",
                to_string(mode), k / (1 << 20), 100 * (k / base_kept - 1), p / (1 << 20),
                100 * (p / base_peak - 1), median(fwd.at(mode)), t, 100 * (t / base_ms - 1));
  }
  return 0;
}
