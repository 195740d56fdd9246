// defines: the fixtures shared by the GPT, Trainer and checkpoint tests — a tiny GPT config,
// a communicator of this rank alone, per-process token files with a learnable pattern, the
// loss function and quiet Trainer options of kSteps steps.
#pragma once

#include "core/mesh.h"
#include "core/token_file.h"
#include "launch/trainer.h"
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
  const auto& world = meshtrain::testing::test_runtime().world();
  return world->split(world->rank(), 0, "self");
}

// Token files private to this process (ranks of concurrent CTest runs never share one):
// a learnable byte pattern with 20% noise, so the loss falls within a few steps.
struct TokenFiles {
  std::filesystem::path dir;
  std::shared_ptr<const TokenFile> train, val;

  TokenFiles() {
    const auto& rt = meshtrain::testing::test_runtime();
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

inline LossFunction loss_of(gpt::GPT model) {
  return [model](const MicroBatch& mb) mutable {
    return model->forward(mb.inputs, mb.targets).loss_sum;
  };
}

inline TrainerOptions quiet_options() {
  return TrainerOptions()
      .steps(kSteps)
      .global_batch(kGlobalBatch)
      .micro_batch(kGlobalBatch)
      .seq_len(kBlock)
      .lr(1e-2)
      .min_lr(1e-3)
      .warmup_steps(2)
      .weight_decay(0.1)
      .grad_clip(0.5)
      .val_every(0)
      .val_batches(2)
      .bucket_bytes(16 * 1024) // several buckets
      .progress(ProgressStyle::kOff);
}

} // namespace meshtrain::testing
