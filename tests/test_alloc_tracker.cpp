// Tests of the counting CPU allocator (memory/alloc_tracker.h) and, through it, that
// recomputation really drops the activations a forward keeps for backward.
#include <catch2/catch.hpp>

#include "meshtrain/memory/alloc_tracker.h"
#include "tests/gpt_fixtures.h"

using namespace meshtrain;
using namespace meshtrain::testing;

TEST_CASE("AllocationTracker: counts live CPU tensor bytes, peaks and tags", "[memory]") {
  auto& tracker = AllocationTracker::install();
  CHECK(AllocationTracker::get() == &tracker);
  CHECK(&AllocationTracker::install() == &tracker);

  const int64_t before = tracker.current_bytes();
  tracker.reset_peaks();
  {
    auto a = torch::empty({1000}, torch::kFloat); // 4000 bytes
    CHECK(tracker.current_bytes() - before == 4000);
    {
      MemoryTagScope scope(MemoryTag::kActivations);
      CHECK(MemoryTagScope::current() == MemoryTag::kActivations);
      auto b = torch::empty({250}, torch::kDouble); // 2000 bytes, tagged
      CHECK(tracker.current(MemoryTag::kActivations) >= 2000);
      CHECK(tracker.current_bytes() - before == 6000);
    }
    CHECK(MemoryTagScope::current() == MemoryTag::kOther);
    CHECK(tracker.current_bytes() - before == 4000);
  }
  CHECK(tracker.current_bytes() == before);
  CHECK(tracker.peak_bytes() - before == 6000);
  tracker.reset_peaks();
  CHECK(tracker.peak_bytes() == before);
}

TEST_CASE("AllocationTracker: full recomputation keeps a fraction of the activations",
          "[memory][recompute]") {
  auto& tracker = AllocationTracker::install();
  torch::manual_seed(5);
  const auto idx = torch::randint(0, 256, {8, kBlock}, torch::kLong);
  std::map<RecomputeMode, int64_t> kept;
  for (auto mode : {RecomputeMode::kNone, RecomputeMode::kSelective, RecomputeMode::kFull}) {
    const Mesh mesh(ParallelDims{1, 1, 1, 1}, self_group());
    torch::manual_seed(kSeed);
    auto plan = test_plan(mesh);
    plan.recompute = mode;
    const auto parallel = parallelize(std::make_shared<gpt::GPTImpl>(tiny_config().n_layer(4)),
                                      mesh, plan, ParallelizeOptions().training(false));
    const int64_t before = tracker.current_bytes();
    // Everything the graph holds between forward and backward (logits included).
    const auto loss = parallel.loss(MicroBatch{idx, idx});
    kept[mode] = tracker.current_bytes() - before;
    loss.backward();
  }
  INFO("bytes kept for backward: none " << kept[RecomputeMode::kNone] << ", selective "
                                        << kept[RecomputeMode::kSelective] << ", full "
                                        << kept[RecomputeMode::kFull]);
  CHECK(kept[RecomputeMode::kSelective] < kept[RecomputeMode::kNone]);
  CHECK(kept[RecomputeMode::kFull] < kept[RecomputeMode::kNone] / 2);
}
