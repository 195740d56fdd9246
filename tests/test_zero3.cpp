// ZeRO-3 (parallel/parameter_shards.h): the GPT trained with its parameters sharded over dp
// equals the ZeRO-0 run of the same layout step by step; per-rank state follows the formula;
// at most 1 + prefetch blocks are gathered at once; the bytes moved per step are 1.5x (1.0x
// without resharding) the all-reduce's; a rank that skips a block is named instead of hanging.
#include "tests/gpt_fixtures.h"

#include "meshtrain/memory/alloc_tracker.h"

#include <cmath>
#include <map>
#include <sstream>
#include <string>
#include <vector>

using namespace meshtrain;
using namespace meshtrain::testing;

namespace {

struct Variant {
  std::string name;
  int tp = 1;
  bool sp = false;
  int64_t accumulation = 1;
  RecomputeMode recompute = RecomputeMode::kNone;
  bool reshard = true;
  int prefetch = 1;
  int cp = 1;
};

ParallelPlan variant_plan(const Mesh& mesh, const Variant& v, int zero) {
  auto plan =
      test_plan(mesh, zero, v.sp, kGlobalBatch / (mesh.group("dp")->size() * v.accumulation));
  plan.recompute = v.recompute;
  if (zero == 3) {
    plan.reshard_after_forward = v.reshard;
    plan.prefetch = v.prefetch;
  }
  return plan;
}

std::vector<StepStats> train_steps(Trainer& trainer, int steps) {
  std::vector<StepStats> out;
  for (int s = 0; s < steps; ++s) {
    out.push_back(trainer.train_step());
  }
  return out;
}

gpt::GPTConfig four_layer_config() {
  return tiny_config().n_layer(4).n_embd(64);
}

} // namespace

TEST_CASE("ZeRO-3: per-step losses of every layout equal the ZeRO-0 run", "[mpi][zero3]") {
  auto& rt = test_runtime();
  const int world = rt.world_size();
  const TokenFiles files;
  std::vector<Variant> variants = {
      {"dp"},
      {"dp, accumulation 4", 1, false, 4},
      {"dp, full recompute", 1, false, 1, RecomputeMode::kFull},
      {"dp, selective recompute", 1, false, 1, RecomputeMode::kSelective},
      {"dp, reshard_after_forward off", 1, false, 1, RecomputeMode::kNone, false},
      {"dp, prefetch 0", 1, false, 1, RecomputeMode::kNone, true, 0},
      {"dp, prefetch 2", 1, false, 1, RecomputeMode::kNone, true, 2},
  };
  if (world % 2 == 0) {
    Variant cp{"cp2 (shards over dp x cp)"};
    cp.cp = 2;
    variants.push_back(cp);
  }
  if (world % 4 == 0) {
    variants.push_back({"dp2 x tp2", 2});
    variants.push_back({"dp2 x tp2, sequence parallel", 2, true});
  }
  for (const auto& v : variants) {
    const Mesh mesh(ParallelDims{-1, v.cp, v.tp, 1}, rt.world());
    std::vector<double> want, got;
    double want_val = 0, got_val = 0;
    for (const int zero : {0, 3}) {
      Trainer trainer(tiny_gpt(mesh, variant_plan(mesh, v, zero)), files.train, files.val,
                      quiet_options());
      auto& losses = zero == 0 ? want : got;
      for (const auto& stats : train_steps(trainer, kSteps)) {
        losses.push_back(stats.loss);
      }
      (zero == 0 ? want_val : got_val) = trainer.validate();
    }
    CHECK(want.back() < want.front()); // it learns
    for (int s = 0; s < kSteps; ++s) {
      INFO(rank_tag() << v.name << " (dp " << mesh.group("dp")->size() << "), step " << s + 1
                      << ": ZeRO-3 " << got[s] << " vs ZeRO-0 " << want[s]);
      CHECK(std::abs(got[s] - want[s]) <= 1e-5 * std::abs(want[s]));
    }
    INFO(rank_tag() << v.name << ": val_loss " << got_val << " vs " << want_val);
    CHECK(std::abs(got_val - want_val) <= 1e-5 * want_val);
  }
}

TEST_CASE("ZeRO-3 memory: per-rank state follows the formula; at most 1 + prefetch blocks "
          "gathered",
          "[mpi][zero3]") {
  auto& tracker = AllocationTracker::install(); // before the model: its tensors are counted
  auto& rt = test_runtime();
  const TokenFiles files;
  const Mesh mesh(ParallelDims{-1, 1, 1, 1}, rt.world());
  const int64_t d = mesh.group("dp")->size();
  for (const int prefetch : {0, 1, 2}) {
    Variant v{"dp"};
    v.prefetch = prefetch;
    const int64_t before = tracker.current_bytes();
    Trainer trainer(tiny_gpt(mesh, variant_plan(mesh, v, 3), four_layer_config()), files.train,
                    files.val, quiet_options());
    const auto stats = train_steps(trainer, 3);
    // What lives between steps, per rank, P = the padded parameter count (all units):
    //   fp32 master + AdamW moments 12 P / D, parameter shards 4 P / D, gradient shards 4 P / D.
    const double p = static_cast<double>(trainer.optimizer().padded_numel());
    const double formula = (12 + 4 + 4) * p / static_cast<double>(d);
    const double state = static_cast<double>(stats.back().state_bytes - before);
    const double unsharded = (12 + 4 + 4) * p;
    std::ostringstream line;
    line << rank_tag() << "dp " << d << ", prefetch " << prefetch << ": P " << p
         << ", state between steps " << state << " B (tracker) vs formula " << formula
         << " B; unsharded " << unsharded << " B; peak gathered blocks "
         << trainer.shards()->peak_gathered_blocks();
    INFO(line.str());
    CHECK(std::abs(state - formula) <= 0.02 * formula);
    CHECK(trainer.shards()->shard_bytes() == static_cast<int64_t>(4 * p / d));
    // The whole step: never more than the running block and the prefetched ones.
    CHECK(trainer.shards()->peak_gathered_blocks() <= 1 + prefetch);
    CHECK(trainer.shards()->peak_gathered_blocks() >= 1);
  }
}

TEST_CASE("ZeRO-3 communication: bytes per step are 1.5x ZeRO-0's all-reduce, 1.0x without "
          "resharding",
          "[mpi][zero3]") {
  auto& rt = test_runtime();
  const TokenFiles files;
  const Mesh mesh(ParallelDims{-1, 1, 1, 1}, rt.world());
  const auto& log = mesh.group("world")->log();
  const auto one_step = [&](const ParallelPlan& plan) {
    Trainer trainer(tiny_gpt(mesh, plan), files.train, files.val, quiet_options());
    trainer.train_step(); // the first step allocates; count the second
    log->enable();
    const auto stats = trainer.train_step();
    log->enable(false);
    std::map<std::string, int64_t> bytes;
    for (const auto& [key, b] : stats.comm_bytes) {
      bytes[key.substr(key.find(' ') + 1)] += b; // by kind, over groups
    }
    return bytes;
  };
  Variant v{"dp"};
  // ZeRO-0: the gradients' all-reduce (the loss, one double, is all-reduced besides).
  const double all_reduce =
      static_cast<double>(one_step(variant_plan(mesh, v, 0))["all_reduce"] - 8);
  if (mesh.group("dp")->size() == 1) {
    return;
  }
  // A ring all-reduce moves a reduce-scatter and an all-gather of its tensor: 2x its bytes.
  for (const bool reshard : {true, false}) {
    v.reshard = reshard;
    auto bytes = one_step(variant_plan(mesh, v, 3));
    const double moved = static_cast<double>(bytes["all_gather"] + bytes["reduce_scatter"]);
    const double ratio = moved / (2 * all_reduce);
    INFO(rank_tag() << "reshard_after_forward " << reshard << ": all-gather " << bytes["all_gather"]
                    << " B + reduce-scatter " << bytes["reduce_scatter"] << " B = " << ratio
                    << " x ZeRO-0's all-reduce (" << all_reduce << " B x 2)");
    CHECK(std::abs(ratio - (reshard ? 1.5 : 1.0)) <= 0.02 * (reshard ? 1.5 : 1.0));
    CHECK(bytes["reduce_scatter"] >= all_reduce); // every gradient once
  }
  // bf16 parameters: the gathers move half the bytes; the gradients are still reduced in fp32.
  auto plan = variant_plan(mesh, Variant{"dp"}, 3);
  auto fp32 = one_step(plan);
  plan.precision = Precision::kBf16;
  auto bf16 = one_step(plan);
  INFO(rank_tag() << "all-gather bytes: bf16 " << bf16["all_gather"] << " vs fp32 "
                  << fp32["all_gather"]);
  CHECK(std::abs(static_cast<double>(bf16["all_gather"]) / fp32["all_gather"] - 0.5) <= 0.01);
  CHECK(bf16["reduce_scatter"] == fp32["reduce_scatter"]);
}

TEST_CASE("ZeRO-3: a rank that skips a block fails naming the block and the ranks",
          "[mpi][zero3]") {
  auto& rt = test_runtime();
  const Mesh mesh(ParallelDims{-1, 1, 1, 1}, rt.world());
  if (mesh.group("dp")->size() == 1) {
    return;
  }
  Variant v{"dp"};
  auto parallel = tiny_gpt(mesh, variant_plan(mesh, v, 3), four_layer_config());
  auto& model = *parallel.model;
  auto& shards = *parallel.shards;
  const auto blocks = parallel_blocks(model);
  const auto inputs = torch::randint(0, 256, {2, kBlock}, torch::kLong);
  const auto targets = torch::randint(0, 256, {2, kBlock}, torch::kLong);
  // A hand-written loop where rank 1 skips block 2 (a data-dependent early exit, say).
  const auto forward = [&] {
    auto x = shards.run_embedding([&] { return model.embed(inputs); });
    for (size_t i = 0; i < blocks.size(); ++i) {
      if (rt.rank() == 1 && i == 2) {
        continue;
      }
      x = shards.run_block(
          static_cast<int64_t>(i), [&](const torch::Tensor& in) { return blocks[i]->forward(in); },
          x);
    }
    return shards.run_head([&] { return model.head_loss(x, targets); });
  };
  std::string others; // every rank but 1
  for (int r = 0; r < rt.world_size(); ++r) {
    if (r != 1) {
      others += (others.empty() ? "" : ", ") + std::to_string(r);
    }
  }
  others = (rt.world_size() == 2 ? "rank " : "ranks ") + others;
  REQUIRE_THROWS_WITH(forward(),
                      Catch::Contains("block 2 (transformer.h.2) (forward, use 1) on " + others) &&
                          Catch::Contains("block 3 (transformer.h.3) (forward, use 1) "
                                          "on rank 1") &&
                          Catch::Contains("the same number of times"));
}
