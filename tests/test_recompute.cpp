// Tests of activation recomputation (memory/recompute.h): the function runs once in forward
// and again in backward, with the random state of the first run; gradients of inputs and of
// the parameters inside equal those without recomputation; a GPT's loss and every parameter
// gradient are the same with recompute none, selective and full — serial, and tensor-parallel
// with sequence parallelism and dropout.
#include <catch2/catch.hpp>

#include "meshtrain/memory/recompute.h"
#include "meshtrain/parallel/rng_tracker.h"
#include "tests/gpt_fixtures.h"
#include "tests/harness.h"

using namespace meshtrain;
using namespace meshtrain::testing;

TEST_CASE("recompute: runs fn again in backward with the same random state", "[recompute]") {
  torch::manual_seed(7);
  torch::nn::Linear linear(8, 8);
  const auto x = torch::randn({4, 8}, torch::requires_grad());
  int calls = 0;
  // Dropout from the default generator: the replay must draw the same mask.
  const RecomputeFn fn = [&](const std::vector<torch::Tensor>& in) -> std::vector<torch::Tensor> {
    ++calls;
    return {torch::dropout(torch::gelu(linear(in[0])), 0.5, /*train=*/true)};
  };

  torch::manual_seed(11);
  const auto want = fn({x})[0];
  want.sum().backward();
  const auto want_x = x.grad().clone();
  const auto want_w = linear->weight.grad().clone();
  x.mutable_grad().reset();
  linear->zero_grad();
  calls = 0;

  torch::manual_seed(11);
  const auto got = recompute(fn, {x})[0];
  CHECK(calls == 1);
  CHECK_FALSE(got.grad_fn() == nullptr);
  const auto after_forward = torch::rand({1}); // the generator moved on past fn's draws
  got.sum().backward();
  CHECK(calls == 2);
  CHECK(torch::equal(got, want));
  CHECK(torch::equal(x.grad(), want_x));
  CHECK(torch::equal(linear->weight.grad(), want_w));
  // Backward put the generator back where it was: the next draw is the one after forward.
  torch::manual_seed(11);
  fn({x});
  CHECK(torch::equal(torch::rand({1}), after_forward));

  // No grad needed: plain fn, nothing recorded.
  calls = 0;
  {
    torch::NoGradGuard no_grad;
    recompute(fn, {x});
  }
  CHECK(calls == 1);

  CHECK(parse_recompute_mode("selective") == RecomputeMode::kSelective);
  REQUIRE_THROWS_WITH(parse_recompute_mode("some"),
                      Catch::Contains("recompute mode 'some': must be none, selective or full"));
}

TEST_CASE("recompute: GPT gradients with selective and full recompute equal none",
          "[mpi][recompute]") {
  auto& rt = test_runtime();
  struct Layout {
    std::string name;
    CommunicatorPtr group; // the mesh's world: tp over all of it
    bool sp;
  };
  std::vector<Layout> layouts = {{"serial", self_group(), false}};
  if (rt.world_size() > 1) {
    layouts.push_back(
        {"tp " + std::to_string(rt.world_size()) + " + sequence parallel", rt.world(), true});
  }
  torch::manual_seed(3);
  const auto idx = torch::randint(0, 256, {4, kBlock}, torch::kLong);
  const auto targets = torch::randint(0, 256, {4, kBlock}, torch::kLong);
  for (const auto& layout : layouts) {
    const Mesh mesh(ParallelDims{1, 1, layout.group->size(), 1}, layout.group);
    for (double dropout : {0.0, 0.1}) {
      struct Result {
        double loss = 0;
        std::map<std::string, torch::Tensor> grads;
      };
      // The library's composition of the model (parallelize's loss), recomputed as `mode`.
      const auto run = [&](RecomputeMode mode) {
        torch::manual_seed(kSeed);
        auto model = std::make_shared<gpt::GPTImpl>(tiny_config().dropout(dropout));
        auto plan = test_plan(mesh, 0, layout.sp);
        plan.recompute = mode;
        const auto parallel = parallelize(model, mesh, plan, ParallelizeOptions().training(false));
        model->train();
        const auto loss = parallel.loss(MicroBatch{idx, targets}) / idx.numel(); // mean
        loss.backward();
        Result r;
        r.loss = loss.item<double>();
        for (const auto& p : model->named_parameters()) {
          r.grads[p.key()] = p.value().grad().clone();
        }
        return r;
      };
      const auto none = run(RecomputeMode::kNone);
      for (auto mode : {RecomputeMode::kSelective, RecomputeMode::kFull}) {
        const auto got = run(mode);
        INFO(rank_tag() << layout.name << ", dropout " << dropout << ", recompute "
                        << to_string(mode) << ": loss " << got.loss << " vs " << none.loss);
        CHECK(got.loss == none.loss);
        for (const auto& [name, grad] : none.grads) {
          INFO(name << ": max |difference| "
                    << (got.grads.at(name) - grad).abs().max().item<double>());
          CHECK(torch::allclose(got.grads.at(name), grad, /*rtol=*/0, /*atol=*/1e-6));
        }
      }
    }
  }
}
