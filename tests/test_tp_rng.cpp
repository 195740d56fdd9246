// RngTracker: deterministic streams, per-TP-rank vs shared masks, replay for recomputation,
// fork() over the default generator, and dropout inside a TP block.
#include <catch2/catch.hpp>

#include "meshtrain/parallel/parallel_transformer_block.h"
#include "meshtrain/parallel/rng_tracker.h"
#include "tests/test_tp_helpers.h"

using namespace meshtrain;
using namespace meshtrain::testing;

namespace {

torch::Tensor mask_of(RngTracker& rng, RngStream stream) {
  return rng.dropout(torch::ones({64, 16}), 0.5, /*training=*/true, stream) != 0;
}

// This rank's mask next to every TP rank's: [tp, ...].
torch::Tensor gather_masks(const torch::Tensor& mask, const CommunicatorPtr& tp) {
  const auto mine = mask.to(torch::kByte).contiguous();
  auto all = torch::empty({tp->size(), mine.numel()}, torch::kByte);
  tp->all_gather(mine.view({1, -1}), all);
  return all;
}

} // namespace

TEST_CASE("TP RngTracker: same seed gives same masks, per-rank masks differ, shared are equal",
          "[mpi][tp]") {
  const auto mesh = tp_mesh();
  const auto& tp = mesh.group("tp");
  const int r = tp_rank(mesh), n = tp_size(mesh);
  RngTracker a(RngTrackerOptions(1234), tp);
  RngTracker b(RngTrackerOptions(1234), tp);
  CHECK(a.seed(RngStream::kShared) == 1234);
  CHECK(a.seed(RngStream::kTensorParallel) == 1234 + 2718 + static_cast<uint64_t>(r));
  for (const auto stream : {RngStream::kShared, RngStream::kTensorParallel}) {
    const auto ma = mask_of(a, stream);
    const auto mb = mask_of(b, stream);
    check_equal("same seed, same stream", ma, mb);
    // Roughly half kept: a mask of all ones or all zeros would make the comparisons empty.
    const double kept = ma.to(torch::kFloat).mean().item<double>();
    INFO(rank_tag() << "kept fraction " << kept);
    CHECK(kept > 0.3);
    CHECK(kept < 0.7);
  }
  const auto shared = gather_masks(mask_of(a, RngStream::kShared), tp);
  const auto per_rank = gather_masks(mask_of(a, RngStream::kTensorParallel), tp);
  for (int other = 0; other < n; ++other) {
    check_equal("shared mask of tp rank " + std::to_string(other), shared[other], shared[r]);
    if (other != r) {
      INFO(rank_tag() << "per-TP-rank mask equals the one of tp rank " << other);
      CHECK_FALSE(torch::equal(per_rank[other], per_rank[r]));
    }
  }
  RngTracker c(RngTrackerOptions(1235), tp);
  INFO(rank_tag() << "seeds 1234 and 1235 gave the same shared mask");
  RngTracker d(RngTrackerOptions(1234), tp);
  CHECK_FALSE(torch::equal(mask_of(c, RngStream::kShared), mask_of(d, RngStream::kShared)));
}

TEST_CASE("TP RngTracker: replay reproduces masks, fork leaves the default generator alone",
          "[mpi][tp]") {
  const auto mesh = tp_mesh();
  const auto& tp = mesh.group("tp");
  RngTracker rng(RngTrackerOptions(77), tp);
  (void)mask_of(rng, RngStream::kTensorParallel); // not at the start of the stream
  const auto saved = rng.get_state();
  const auto first = mask_of(rng, RngStream::kTensorParallel);
  const auto first_shared = mask_of(rng, RngStream::kShared);
  const auto next = mask_of(rng, RngStream::kTensorParallel);
  rng.set_state(saved);
  check_equal("replayed per-rank mask", mask_of(rng, RngStream::kTensorParallel), first);
  check_equal("replayed shared mask", mask_of(rng, RngStream::kShared), first_shared);
  check_equal("stream continues after replay", mask_of(rng, RngStream::kTensorParallel), next);
  INFO(rank_tag() << "consecutive masks were equal");
  CHECK_FALSE(torch::equal(first, next));

  torch::manual_seed(5);
  const auto default_before = at::globalContext().defaultGenerator(torch::kCPU).get_state();
  const auto state = rng.get_state();
  const auto forked = rng.fork(RngStream::kShared, [] {
    return torch::dropout(torch::ones({64, 16}), 0.5, /*train=*/true) != 0;
  });
  check_equal("default generator after fork",
              at::globalContext().defaultGenerator(torch::kCPU).get_state(), default_before);
  rng.set_state(state);
  const auto again = rng.fork(RngStream::kShared, [] {
    return torch::dropout(torch::ones({64, 16}), 0.5, /*train=*/true) != 0;
  });
  check_equal("fork replays from the stream", again, forked);
  const auto after_fork = rng.get_state();
  INFO(rank_tag() << "fork did not advance the stream");
  CHECK_FALSE(torch::equal(after_fork.shared, state.shared));
}

TEST_CASE("TP block with dropout: replicated output stays identical on TP ranks, replays",
          "[mpi][tp]") {
  const auto mesh = tp_mesh();
  const auto& tp = mesh.group("tp");
  const int n = tp_size(mesh);
  auto rng = std::make_shared<RngTracker>(RngTrackerOptions(3), tp);
  torch::manual_seed(9);
  ParallelTransformerBlock block(ParallelTransformerBlockOptions(32, 8).dropout(0.2), tp, rng);
  torch::manual_seed(10);
  const auto x = torch::randn({2, 8, 32});
  const auto saved = rng->get_state();
  const auto y = block(x).detach();
  const auto y_next = block(x).detach();
  rng->set_state(saved);
  check_equal("recomputed block output", block(x).detach(), y);
  INFO(rank_tag() << "two forwards drew the same masks");
  CHECK_FALSE(torch::equal(y, y_next));
  // Without sequence parallelism the block output is replicated: every TP rank agrees.
  const auto all = gather_masks(y.view({-1}).view(torch::kByte), tp);
  for (int other = 0; other < n; ++other) {
    check_equal("block output bytes of tp rank " + std::to_string(other), all[other],
                all[tp_rank(mesh)]);
  }
  block->eval();
  const auto e1 = block(x).detach();
  const auto e2 = block(x).detach();
  check_equal("eval mode draws nothing", e1, e2);
}
