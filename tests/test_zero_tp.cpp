// Data parallelism + ZeRO composed with tensor parallelism: an MLP LayerNorm ->
// ColumnParallelLinear -> GELU -> RowParallelLinear on a dp x tp mesh (np 4: dp 2 x tp 2;
// np 2: dp 1 x tp 2) trains for 5 clipped AdamW steps and ends equal, cut by cut, to the
// single-process full-batch run of plain LibTorch. The clipping norm spans tp partitions
// (summed), replicated parameters (counted once) and, at ZeRO-2, dp shards (summed).
#include <catch2/catch.hpp>

#include "meshtrain/core/mesh.h"
#include "meshtrain/optim/lr_schedule.h"
#include "meshtrain/optim/zero.h"
#include "meshtrain/parallel/column_parallel_linear.h"
#include "meshtrain/parallel/data_parallel.h"
#include "meshtrain/parallel/row_parallel_linear.h"
#include "tests/harness.h"

#include <cmath>
#include <optional>

using namespace meshtrain;
using meshtrain::testing::all_close;
using meshtrain::testing::rank_tag;
namespace F = torch::nn::functional;

namespace {

constexpr int64_t kIn = 8;
constexpr int64_t kHidden = 16;
constexpr int64_t kClasses = 6;
constexpr int64_t kSeq = 3;
constexpr int64_t kGlobalBatch = 8;
constexpr int kSteps = 5;
constexpr double kInitStd = 0.3;

struct TpMlpImpl : torch::nn::Module {
  explicit TpMlpImpl(const CommunicatorPtr& tp) {
    ln = register_module("ln", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kIn})));
    fc = register_module(
        "fc",
        ColumnParallelLinear(
            ColumnParallelLinearOptions(kIn, kHidden).gather_output(false).init_std(kInitStd), tp));
    proj = register_module(
        "proj",
        RowParallelLinear(
            RowParallelLinearOptions(kHidden, kClasses).input_is_parallel(true).init_std(kInitStd),
            tp));
  }
  // [B, T, in] -> [B, T, classes], replicated over tp
  torch::Tensor forward(const torch::Tensor& x) { return proj(F::gelu(fc(ln(x)))); }
  torch::nn::LayerNorm ln{nullptr};
  ColumnParallelLinear fc{nullptr};
  RowParallelLinear proj{nullptr};
};
TORCH_MODULE(TpMlp);

// The serial twin, with the same parameter names and the same draws: the TP layers cut
// their weights from full masters drawn in this order from the default generator.
struct MlpImpl : torch::nn::Module {
  MlpImpl() {
    ln = register_module("ln", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kIn})));
    fc = register_module("fc", torch::nn::Linear(kIn, kHidden));
    proj = register_module("proj", torch::nn::Linear(kHidden, kClasses));
    torch::NoGradGuard no_grad;
    torch::manual_seed(99);
    fc->weight.copy_(torch::empty({kHidden, kIn}).normal_(0.0, kInitStd));
    proj->weight.copy_(torch::empty({kClasses, kHidden}).normal_(0.0, kInitStd));
    fc->bias.zero_();
    proj->bias.zero_();
  }
  torch::Tensor forward(const torch::Tensor& x) { return proj(F::gelu(fc(ln(x)))); }
  torch::nn::LayerNorm ln{nullptr};
  torch::nn::Linear fc{nullptr}, proj{nullptr};
};
TORCH_MODULE(Mlp);

TpMlp make_tp_model(const Mesh& mesh) {
  torch::manual_seed(99);
  return TpMlp(mesh.group("tp"));
}

// Samples [first, first + count) of step `step`: inputs [count, T, in], targets [count, T].
std::pair<torch::Tensor, torch::Tensor> batch(int step, int64_t first, int64_t count) {
  std::vector<torch::Tensor> xs, ys;
  for (int64_t i = 0; i < count; ++i) {
    const auto g = static_cast<uint64_t>(step * kGlobalBatch + first + i);
    auto gen = at::detail::createCPUGenerator(500 + g);
    xs.push_back(at::randn({kSeq, kIn}, gen) * 2.0);
    ys.push_back(at::randint(kClasses, {kSeq}, gen, torch::kLong));
  }
  return {torch::stack(xs), torch::stack(ys)};
}

template <typename Model>
torch::Tensor loss_sum(Model& model, const std::pair<torch::Tensor, torch::Tensor>& b) {
  auto logits = model->forward(b.first);
  return F::cross_entropy(logits.reshape({-1, kClasses}), b.second.reshape({-1}),
                          F::CrossEntropyFuncOptions().reduction(torch::kSum));
}

double schedule_lr(int s) {
  const double lr = 2e-2, min_lr = 2e-3;
  const int warmup = 2;
  if (s < warmup) {
    return lr * (s + 1) / warmup;
  }
  return min_lr + (lr - min_lr) * 0.5 * (1 + std::cos(M_PI * (s - warmup) / (kSteps - warmup)));
}

constexpr double kClip = 0.05;
constexpr double kWeightDecay = 0.1;

struct Reference {
  std::map<std::string, torch::Tensor> params;
  std::vector<double> norms;
};

Reference run_reference() {
  Mlp model;
  std::vector<torch::Tensor> decay, no_decay;
  for (const auto& p : model->parameters()) {
    (p.dim() >= 2 ? decay : no_decay).push_back(p);
  }
  auto base = torch::optim::AdamWOptions(2e-2).betas({0.9, 0.95}).eps(1e-8);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, std::make_unique<torch::optim::AdamWOptions>(
                                 torch::optim::AdamWOptions(base).weight_decay(kWeightDecay)));
  groups.emplace_back(no_decay, std::make_unique<torch::optim::AdamWOptions>(
                                    torch::optim::AdamWOptions(base).weight_decay(0)));
  torch::optim::AdamW opt(std::move(groups), base);
  Reference out;
  for (int s = 0; s < kSteps; ++s) {
    opt.zero_grad();
    (loss_sum(model, batch(s, 0, kGlobalBatch)) / (kGlobalBatch * kSeq)).backward();
    out.norms.push_back(torch::nn::utils::clip_grad_norm_(model->parameters(), kClip));
    for (auto& g : opt.param_groups()) {
      g.options().set_lr(schedule_lr(s));
    }
    opt.step();
  }
  for (const auto& p : model->named_parameters()) {
    out.params[p.key()] = p.value().detach().clone();
  }
  return out;
}

// This tp rank's cut of a serial parameter, as the TP layers lay it out.
torch::Tensor cut(const std::string& name, const torch::Tensor& full, int rank, int tp) {
  auto chunk = [&](int64_t dim) {
    const int64_t n = full.size(dim) / tp;
    return full.narrow(dim, rank * n, n);
  };
  if (name == "fc.weight" || name == "fc.bias") {
    return chunk(0);
  }
  if (name == "proj.weight") {
    return chunk(1);
  }
  return full; // ln.*, proj.bias: replicated
}

} // namespace

TEST_CASE("ZeRO x TP: dp x tp=2 MLP equals the serial run, cut by cut", "[mpi][zero][tp]") {
  auto& rt = meshtrain::testing::test_runtime();
  const int tp = rt.world_size() % 2 == 0 ? 2 : 1;
  const Mesh mesh(ParallelDims{-1, 1, tp, 1}, rt.world());
  const int64_t dp = mesh.group("dp")->size();
  const int64_t dp_rank = mesh.group("dp")->rank();
  const int tp_rank = mesh.group("tp")->rank();
  const int stage = GENERATE(0, 1, 2);
  const int accumulation = GENERATE(1, 2);
  const auto expected = run_reference();

  auto model = make_tp_model(mesh);
  const auto layout = std::make_shared<const BucketLayout>(
      *model, static_cast<int>(dp), BucketLayoutOptions().bucket_bytes(200).zero_stage(stage));
  DataParallelReducer reducer(*model, mesh, layout);
  ZeroOptimizer opt(*model, mesh, layout,
                    ZeroOptions().adamw(AdamWOptions(2e-2).weight_decay(kWeightDecay)));
  WarmupCosineSchedule schedule(
      WarmupCosineOptions(2e-2).min_lr(2e-3).warmup_steps(2).total_steps(kSteps));
  const int64_t micro = kGlobalBatch / (dp * accumulation);
  for (int s = 0; s < kSteps; ++s) {
    reducer.zero_grad();
    for (int m = 0; m < accumulation; ++m) {
      std::optional<NoSyncGuard> guard;
      if (m + 1 < accumulation) {
        guard.emplace(reducer.no_sync());
      }
      // The ranks of one tp group see the same samples (DESIGN §3).
      const auto b = batch(s, m * dp * micro + dp_rank * micro, micro);
      global_mean_loss(loss_sum(model, b), kGlobalBatch * kSeq).backward();
    }
    const auto grads = reducer.finish();
    const double norm = opt.clip_grad_norm(grads, kClip);
    INFO(rank_tag() << "dp " << dp << " x tp " << tp << ", stage " << stage << ", accumulation "
                    << accumulation << ", step " << s << ": norm " << norm << ", reference "
                    << expected.norms[s]);
    CHECK(norm > kClip);
    CHECK(std::abs(norm - expected.norms[s]) <= 1e-5 * expected.norms[s]);
    opt.set_lr(schedule.lr(s));
    opt.step(grads);
  }
  for (const auto& p : model->named_parameters()) {
    const auto want = cut(p.key(), expected.params.at(p.key()), tp_rank, tp);
    INFO(rank_tag() << "dp " << dp << " x tp " << tp << ", stage " << stage << ", accumulation "
                    << accumulation << ": parameter '" << p.key() << "' sizes " << p.value().sizes()
                    << " vs " << want.sizes());
    REQUIRE(p.value().sizes() == want.sizes());
    CHECK(all_close(p.value(), want, 1e-5, 1e-7));
  }
}
