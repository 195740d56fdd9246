// defines: the fixtures shared by the GPT, Trainer and checkpoint tests — a tiny GPT config,
// a communicator of this rank alone, per-process token files with a learnable pattern, a
// checkpoint directory all ranks share, a tiny GPT laid out by parallelize() in a test layout,
// and quiet Trainer options of kSteps steps.
#pragma once

#include "meshtrain/core/mesh.h"
#include "meshtrain/core/token_file.h"
#include "meshtrain/launch/parallelize.h"
#include "meshtrain/launch/trainer.h"
#include "meshtrain/parallel/param_init.h"
#include "tests/harness.h"

#include "examples/gpt/gpt_model.h"

#include <unistd.h>

#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace meshtrain::testing {

constexpr uint64_t kSeed = 4242;
constexpr int64_t kBlock = 16;
constexpr int64_t kGlobalBatch = 16;
constexpr int kSteps = 20;

inline gpt::GPTConfig tiny_config() {
  return gpt::GPTConfig().vocab_size(256).block_size(kBlock).n_layer(2).n_head(4).n_embd(32);
}

// A communicator holding only this rank (collective over the world).
inline CommunicatorPtr self_group() {
  const auto& world = test_runtime().world();
  return world->split(world->rank(), 0, "self");
}

// Token files private to this process (ranks of concurrent CTest runs never share one):
// a learnable byte pattern with 20% noise, so the loss falls within a few steps.
struct TokenFiles {
  std::filesystem::path dir;
  std::shared_ptr<const TokenFile> train, val;

  TokenFiles() {
    const auto& rt = test_runtime();
    dir = std::filesystem::temp_directory_path() /
          ("meshtrain_test_gpt_" + std::to_string(getpid()) + "_r" + std::to_string(rt.rank()));
    std::filesystem::create_directories(dir);
    train = std::make_shared<const TokenFile>(write("train.bin", 1, 4000), 256);
    val = std::make_shared<const TokenFile>(write("val.bin", 2, 1000), 256);
  }
  ~TokenFiles() {
    train.reset();
    val.reset();
    std::error_code ignored;
    std::filesystem::remove_all(dir, ignored);
  }
  std::string write(const std::string& name, uint32_t seed, int64_t n) const {
    std::mt19937 engine(seed);
    std::uniform_int_distribution<int> noise(0, 255), coin(0, 4);
    std::vector<uint16_t> tokens(n);
    for (int64_t i = 0; i < n; ++i) {
      tokens[i] = static_cast<uint16_t>(coin(engine) == 0 ? noise(engine) : 97 + (i * 7) % 26);
    }
    const auto path = (dir / name).string();
    write_token_file(path, tokens);
    return path;
  }
};

// A directory every rank of the world shares (named by rank 0's pid), removed at the end.
struct SharedDir {
  std::filesystem::path path;
  SharedDir() {
    const auto& world = test_runtime().world();
    auto pid = torch::tensor({static_cast<int64_t>(getpid())}, torch::kLong);
    world->broadcast(pid, 0);
    path = std::filesystem::temp_directory_path() /
           ("meshtrain_test_ckpt_" + std::to_string(pid.item<int64_t>()));
    if (world->rank() == 0) {
      std::filesystem::remove_all(path);
      std::filesystem::create_directories(path);
    }
    world->barrier();
  }
  ~SharedDir() {
    test_runtime().world()->barrier();
    if (test_runtime().rank() == 0) {
      std::error_code ignored;
      std::filesystem::remove_all(path, ignored);
    }
  }
};

// The plan of a test layout on `mesh`: the fixtures' global batch, small buckets (several
// per model), micro-batch `micro_batch` (0: B / dp).
inline ParallelPlan test_plan(const Mesh& mesh, int zero = 0, bool sequence_parallel = false,
                              int64_t micro_batch = 0) {
  ParallelPlan plan;
  plan.dims = mesh.grid().dims();
  plan.zero_stage = zero;
  plan.sequence_parallel = sequence_parallel;
  plan.global_batch = kGlobalBatch;
  plan.micro_batch = micro_batch;
  plan.bucket_bytes = 16 * 1024;
  return plan;
}

// AdamW as the tests train with it (lr from the schedule; weight decay 0.1).
inline ParallelizeOptions test_optimizer() {
  return ParallelizeOptions().optimizer(ZeroOptions().adamw(AdamWOptions(1e-2).weight_decay(0.1)));
}

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// What a parameter `name` of `sizes` (whole, unpadded) starts as under `seed` with
// normal(0, std) (parallel/param_init.h): the documented init of the GPT and the Llama.
inline torch::Tensor normal_init(const std::string& name, std::vector<int64_t> sizes, double std,
                                 uint64_t seed = kSeed) {
  auto out = torch::empty(sizes);
  fill_initial_values(out.view({-1}), 0, sizes, name, InitRule::normal(std),
                      ShardSpec::replicated(), seed);
  return out;
}

// A GPT of `config` declared under kSeed and laid out by parallelize() with `plan` on `mesh`
// (each rank makes only its part's values: sharded start-up).
inline Parallelized tiny_gpt(const Mesh& mesh, const ParallelPlan& plan,
                             const gpt::GPTConfig& config = tiny_config()) {
  torch::manual_seed(kSeed);
  std::shared_ptr<gpt::GPTImpl> model;
  {
    DeferredInit deferred(kSeed);
    model = std::make_shared<gpt::GPTImpl>(config);
  }
  return parallelize(model, mesh, plan, test_optimizer());
}

// What the parity tests compare: kSteps steps' losses and gradient norms, then the validation
// loss.
struct TrainedRun {
  std::vector<double> losses;
  std::vector<double> norms;
  double val_loss = 0;
};

inline TrainedRun train_steps(Trainer& trainer) {
  TrainedRun run;
  for (int s = 0; s < kSteps; ++s) {
    const auto stats = trainer.train_step();
    run.losses.push_back(stats.loss);
    run.norms.push_back(stats.grad_norm);
  }
  run.val_loss = trainer.validate();
  return run;
}

inline TrainerOptions quiet_options() {
  return TrainerOptions()
      .steps(kSteps)
      .seq_len(kBlock)
      .lr(1e-2)
      .min_lr(1e-3)
      .warmup_steps(2)
      .grad_clip(0.5)
      .val_every(0)
      .val_batches(2)
      .progress(ProgressStyle::kOff);
}

} // namespace meshtrain::testing
