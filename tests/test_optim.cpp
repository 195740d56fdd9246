// Serial tests of optim/: the LR schedule in closed form, AdamW and SGD against LibTorch's
// optimizers on the same gradients, clip_grad_norm_ against torch's, parameter groups and
// option checks.
#include <catch2/catch.hpp>

#include "meshtrain/core/mesh.h"
#include "meshtrain/optim/adamw.h"
#include "meshtrain/optim/clip.h"
#include "meshtrain/optim/lr_schedule.h"
#include "meshtrain/optim/param_groups.h"
#include "meshtrain/optim/sgd.h"
#include "tests/harness.h"

#include <cmath>

using namespace meshtrain;
using meshtrain::testing::all_close;
using meshtrain::testing::relative_change;

namespace {

torch::nn::Sequential make_mlp() {
  torch::manual_seed(7);
  return torch::nn::Sequential(torch::nn::Linear(6, 10), torch::nn::Tanh(),
                               torch::nn::Linear(10, 4),
                               torch::nn::LayerNorm(torch::nn::LayerNormOptions({4})));
}

// The same pseudo-random gradients for both copies at step s.
void set_grads(const std::vector<torch::Tensor>& params, int s) {
  for (size_t i = 0; i < params.size(); ++i) {
    auto gen = at::detail::createCPUGenerator(1000 + 31 * s + static_cast<uint64_t>(i));
    params[i].mutable_grad() = at::randn(params[i].sizes(), gen);
  }
}

std::vector<torch::optim::OptimizerParamGroup>
torch_groups(torch::nn::Sequential& m, const torch::optim::AdamWOptions& o, double wd) {
  std::vector<torch::Tensor> decay, no_decay;
  for (const auto& p : m->parameters()) {
    (p.dim() >= 2 ? decay : no_decay).push_back(p);
  }
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, std::make_unique<torch::optim::AdamWOptions>(
                                 torch::optim::AdamWOptions(o).weight_decay(wd)));
  groups.emplace_back(no_decay, std::make_unique<torch::optim::AdamWOptions>(
                                    torch::optim::AdamWOptions(o).weight_decay(0)));
  return groups;
}

} // namespace

TEST_CASE("WarmupCosineSchedule: warmup, cosine and floor in closed form", "[optim]") {
  WarmupCosineSchedule s(WarmupCosineOptions(1.0).min_lr(0.1).warmup_steps(4).total_steps(12));
  CHECK(s.lr(0) == Approx(0.25));
  CHECK(s.lr(2) == Approx(0.75));
  CHECK(s.lr(3) == Approx(1.0));
  CHECK(s.lr(4) == Approx(1.0));  // cosine starts at the full lr
  CHECK(s.lr(8) == Approx(0.55)); // halfway: min + (lr - min) / 2
  CHECK(s.lr(11) == Approx(0.1 + 0.45 * (1 + std::cos(M_PI * 7.0 / 8.0))));
  CHECK(s.lr(12) == Approx(0.1));
  CHECK(s.lr(1000) == Approx(0.1));
  WarmupCosineSchedule no_warmup(WarmupCosineOptions(2.0).total_steps(10));
  CHECK(no_warmup.lr(0) == Approx(2.0));
  CHECK(no_warmup.lr(5) == Approx(1.0));
  REQUIRE_THROWS_WITH(WarmupCosineSchedule(WarmupCosineOptions(1.0).warmup_steps(5).total_steps(3)),
                      Catch::Contains("warmup_steps (5) must be in [0, total_steps (3)]"));
  REQUIRE_THROWS_WITH(WarmupCosineSchedule(WarmupCosineOptions(1.0).min_lr(2.0)),
                      Catch::Contains("min_lr (2) must be in [0, lr (1)]"));
  REQUIRE_THROWS_WITH(s.lr(-1), Catch::Contains("step must be >= 0, got -1"));
}

TEST_CASE("AdamW equals torch::optim::AdamW with two param groups", "[optim]") {
  auto ours = make_mlp();
  auto theirs = make_mlp();
  const double wd = 0.1;
  AdamW opt(decay_param_groups(*ours, wd), AdamWOptions(1e-2));
  REQUIRE(opt.param_groups().size() == 2);
  CHECK(opt.param_groups()[0].params.size() == 2); // the two Linear weights
  CHECK(opt.param_groups()[1].params.size() == 4); // two biases, LayerNorm weight and bias
  const auto torch_options = torch::optim::AdamWOptions(1e-2).betas({0.9, 0.95}).eps(1e-8);
  torch::optim::AdamW ref(torch_groups(theirs, torch_options, wd), torch_options);
  const auto p_ours = ours->parameters();
  const auto p_theirs = theirs->parameters();
  for (int s = 0; s < 5; ++s) {
    const double lr = 1e-2 * (s + 1);
    set_grads(p_ours, s);
    set_grads(p_theirs, s);
    opt.set_lr(lr);
    for (auto& g : ref.param_groups()) {
      g.options().set_lr(lr);
    }
    opt.step();
    ref.step();
  }
  for (size_t i = 0; i < p_ours.size(); ++i) {
    INFO("parameter " << i);
    CHECK(all_close(p_ours[i], p_theirs[i], 1e-7, 1e-9));
    CHECK(relative_change(p_ours[i], make_mlp()->parameters()[i]) > 1e-3);
  }
  CHECK(opt.state(0, 0).step == 5);
  opt.zero_grad();
  CHECK_FALSE(p_ours[0].grad().defined());
}

TEST_CASE("fused_adamw_ equals the decay and the AdamW update as tensor ops, bit for bit",
          "[optim]") {
  // Odd lengths run the vector loop's tail too; zeros, tiny and huge gradients the corners of
  // sqrt and division; several steps the bias corrections.
  const AdamWOptions options = AdamWOptions(3e-3).beta1(0.9).beta2(0.95).eps(1e-8);
  for (const int64_t n : {1, 7, 16, 1000, 4099}) {
    for (const double wd : {0.0, 0.1}) {
      INFO("n " << n << ", weight decay " << wd);
      torch::manual_seed(n);
      const auto p0 = torch::randn({n});
      torch::Tensor fused[3] = {p0.clone(), torch::zeros({n}), torch::zeros({n})};
      torch::Tensor ops[3] = {p0.clone(), torch::zeros({n}), torch::zeros({n})};
      for (int64_t step = 1; step <= 6; ++step) {
        auto g = torch::randn({n}) * std::pow(10.0, static_cast<double>(step % 3) * 4 - 4);
        g.index_put_({torch::randint(n, {n / 5})}, 0.0); // a fifth of the gradient is zero
        fused_adamw_(fused[0], g, fused[1], fused[2], step, 1e-2 * step, wd, options);
        decoupled_weight_decay_(ops[0], 1e-2 * step, wd);
        adamw_update_(ops[0], g, ops[1], ops[2], step, 1e-2 * step, options);
      }
      for (int i = 0; i < 3; ++i) {
        INFO("tensor " << i << " (param, exp_avg, exp_avg_sq): max difference "
                       << (fused[i] - ops[i]).abs().max().item<float>());
        CHECK(torch::equal(fused[i], ops[i]));
      }
      CHECK(relative_change(fused[0], p0) > 1e-3);
    }
  }
  // A tensor the loop does not take (not contiguous) runs the tensor ops.
  const auto base = torch::randn({8, 2});
  auto p = base.clone().t(); // [2, 8], strided
  auto m = torch::zeros({2, 8}).t().contiguous().t();
  auto v = torch::zeros({2, 8}).t().contiguous().t();
  const auto g = torch::randn({2, 8});
  fused_adamw_(p, g, m, v, 1, 1e-2, 0.1, options);
  auto q = base.clone().t().contiguous();
  auto mq = torch::zeros({2, 8});
  auto vq = torch::zeros({2, 8});
  decoupled_weight_decay_(q, 1e-2, 0.1);
  adamw_update_(q, g, mq, vq, 1, 1e-2, options);
  CHECK(torch::equal(p, q));
}

TEST_CASE("SGD equals torch::optim::SGD", "[optim]") {
  struct Case {
    double momentum, dampening, weight_decay;
    bool nesterov;
  };
  const auto c = GENERATE(Case{0.9, 0.0, 0.0, false}, Case{0.9, 0.1, 0.01, false},
                          Case{0.9, 0.0, 0.01, true}, Case{0.0, 0.0, 0.01, false});
  auto ours = make_mlp();
  auto theirs = make_mlp();
  SGD opt({ParamGroup{ours->parameters(), std::nullopt}}, SGDOptions(0.1)
                                                              .momentum(c.momentum)
                                                              .dampening(c.dampening)
                                                              .weight_decay(c.weight_decay)
                                                              .nesterov(c.nesterov));
  torch::optim::SGD ref(theirs->parameters(), torch::optim::SGDOptions(0.1)
                                                  .momentum(c.momentum)
                                                  .dampening(c.dampening)
                                                  .weight_decay(c.weight_decay)
                                                  .nesterov(c.nesterov));
  const auto p_ours = ours->parameters();
  const auto p_theirs = theirs->parameters();
  for (int s = 0; s < 4; ++s) {
    set_grads(p_ours, s);
    set_grads(p_theirs, s);
    opt.step();
    ref.step();
  }
  for (size_t i = 0; i < p_ours.size(); ++i) {
    INFO("momentum " << c.momentum << " dampening " << c.dampening << " wd " << c.weight_decay
                     << " nesterov " << c.nesterov << ": parameter " << i);
    CHECK(all_close(p_ours[i], p_theirs[i], 1e-7, 1e-9));
  }
}

TEST_CASE("clip_grad_norm_ equals torch::nn::utils::clip_grad_norm_", "[optim]") {
  const Mesh mesh(ParallelDims{1, 1, 1, 1}, meshtrain::testing::test_runtime().world());
  auto ours = make_mlp();
  auto theirs = make_mlp();
  set_grads(ours->parameters(), 0);
  set_grads(theirs->parameters(), 0);
  const double max_norm = GENERATE(0.5, 1e6);
  const double norm = clip_grad_norm_(*ours, max_norm, mesh);
  const double expected = torch::nn::utils::clip_grad_norm_(theirs->parameters(), max_norm);
  CHECK(norm == Approx(expected).epsilon(1e-6));
  CHECK(norm > 1.0); // the generated gradients are far from tiny
  for (size_t i = 0; i < ours->parameters().size(); ++i) {
    INFO("max_norm " << max_norm << ", parameter " << i);
    CHECK(all_close(ours->parameters()[i].grad(), theirs->parameters()[i].grad(), 1e-6, 1e-8));
  }
  CHECK(clip_coefficient(2.0, 1.0) == Approx(1.0 / (2.0 + 1e-6)));
  CHECK(clip_coefficient(0.5, 1.0) == 1.0);
  CHECK(clip_coefficient(5.0, 0.0) == 1.0); // 0: clipping off
  CHECK(clip_coefficient(std::nan(""), 1.0) == 1.0);
}

TEST_CASE("Parameter groups: dim >= 2 decays, tied weights counted once", "[optim]") {
  // One tensor under two names, as GPT's lm_head.weight and transformer.wte.weight.
  struct TiedImpl : torch::nn::Module {
    TiedImpl() {
      auto w = torch::randn({5, 3});
      register_parameter("emb_weight", w);
      register_parameter("head_bias", torch::zeros({5}));
      register_parameter("head_weight", w);
    }
  };
  TiedImpl model;
  const auto params = unique_trainable_parameters(model);
  REQUIRE(params.size() == 2);
  CHECK(params[0].first == "emb_weight");
  CHECK(params[1].first == "head_bias");
  const auto groups = decay_param_groups(model, 0.5);
  REQUIRE(groups.size() == 2);
  CHECK(groups[0].weight_decay.value() == 0.5);
  CHECK(groups[1].weight_decay.value() == 0.0);
  CHECK(groups[0].params.size() == 1);
}

TEST_CASE("Optimizer options are validated with the offending value", "[optim]") {
  REQUIRE_THROWS_WITH(AdamW({}, AdamWOptions(1e-3).beta2(1.0)),
                      Catch::Contains("beta2 must be in [0, 1), got 1"));
  REQUIRE_THROWS_WITH(AdamW({}, AdamWOptions(-1.0)), Catch::Contains("lr must be >= 0, got -1"));
  REQUIRE_THROWS_WITH(SGD({}, SGDOptions(0.1).nesterov(true)),
                      Catch::Contains("nesterov needs momentum > 0 and dampening 0"));
  const AdamWOptions defaults;
  CHECK(defaults.beta1() == 0.9);
  CHECK(defaults.beta2() == 0.95);
  CHECK(defaults.eps() == 1e-8);
}
