// Tests of dynamic loss scaling (optim/grad_scaler.h) and its use by the Trainer: an inf on
// one rank only makes every rank skip the step and halve the scale; the scale grows after the
// configured clean steps; scaling by powers of two leaves a clean run's losses bit-identical.
#include <catch2/catch.hpp>

#include "meshtrain/optim/grad_scaler.h"
#include "tests/gpt_fixtures.h"
#include "tests/harness.h"

#include <limits>

using namespace meshtrain;
using namespace meshtrain::testing;

TEST_CASE("GradScaler: one rank's inf skips the step everywhere; growth after clean steps",
          "[mpi][scaler]") {
  auto& rt = test_runtime();
  GradScaler scaler(GradScalerOptions().init_scale(1024).growth_interval(3), rt.world());
  const auto grads = [&](bool poison) {
    auto g = torch::full({4}, 2048.0);
    if (poison) {
      g[1] = std::numeric_limits<float>::infinity();
    }
    return std::vector<torch::Tensor>{g, torch::ones({2}) * 1024};
  };
  // Clean: unscaled, no skip.
  auto clean = grads(false);
  CHECK_FALSE(scaler.unscale_and_check(clean));
  CHECK(torch::equal(clean[0], torch::full({4}, 2.0)));
  CHECK(torch::equal(clean[1], torch::ones({2})));
  CHECK(scaler.clean_steps() == 1);
  // An inf on the last rank only: every rank skips and halves.
  auto poisoned = grads(rt.rank() == rt.world_size() - 1);
  CHECK(scaler.unscale_and_check(poisoned));
  CHECK(scaler.scale() == 512);
  CHECK(scaler.clean_steps() == 0);
  CHECK(scaler.skipped_steps() == 1);
  // Three clean steps in a row double it.
  for (int i = 0; i < 3; ++i) {
    auto g = grads(false);
    CHECK_FALSE(scaler.unscale_and_check(g));
  }
  CHECK(scaler.scale() == 1024);
  REQUIRE_THROWS_WITH(GradScaler(GradScalerOptions().backoff_factor(1.5), rt.world()),
                      Catch::Contains("backoff_factor (1.5) in (0, 1)"));
}

TEST_CASE("Trainer with loss scaling: bit-identical clean steps, agreed skip of a poisoned one",
          "[mpi][scaler][gpt]") {
  auto& rt = test_runtime();
  const TokenFiles files;
  const Mesh mesh(ParallelDims{-1, 1, 1, 1}, rt.world());
  constexpr int kPoisonStep = 3; // 0-based step whose loss is inf on the last rank
  struct Run {
    std::vector<StepStats> stats;
    std::vector<torch::Tensor> params_after; // wte after each step
  };
  const auto run = [&](bool scaling, bool poison) {
    Trainer trainer(tiny_gpt(mesh, test_plan(mesh, 2)), files.train, nullptr,
                    quiet_options().loss_scaling(scaling));
    TrainerHooks hooks;
    hooks.on_loss = [&](int64_t step, const torch::Tensor& loss) {
      const bool due = poison && step == kPoisonStep + 1 && rt.rank() == rt.world_size() - 1;
      return due ? loss * std::numeric_limits<float>::infinity() : loss;
    };
    trainer.set_hooks(hooks);
    Run r;
    for (int step = 0; step < 6; ++step) {
      r.stats.push_back(trainer.train_step());
      r.params_after.push_back(
          trainer.model().named_parameters()["transformer.wte.weight"].clone());
    }
    return r;
  };
  const auto plain = run(false, false);
  const auto scaled = run(true, false);
  for (int s = 0; s < 6; ++s) {
    INFO(rank_tag() << "step " << s + 1);
    CHECK(scaled.stats[s].loss == plain.stats[s].loss); // x2^16 and back is exact
    CHECK(scaled.stats[s].loss_scale == 65536);
    CHECK_FALSE(scaled.stats[s].skipped);
  }
  const auto poisoned = run(true, true);
  for (int s = 0; s < 6; ++s) {
    INFO(rank_tag() << "step " << s + 1);
    CHECK(poisoned.stats[s].skipped == (s == kPoisonStep));
  }
  // Skipped everywhere: the weights after the poisoned step are those before it.
  CHECK(torch::equal(poisoned.params_after[kPoisonStep], poisoned.params_after[kPoisonStep - 1]));
  CHECK(poisoned.stats[kPoisonStep + 1].loss_scale == 32768);
  CHECK(std::isfinite(poisoned.stats.back().loss));
}
