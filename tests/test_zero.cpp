// Layout-invariance tests of data parallelism + ZeRO (DESIGN §3): for dp in {1, 2, 4}, ZeRO
// stage in {0, 1, 2} and accumulation in {1, 4}, the parameters after 5 clipped AdamW (and
// SGD-momentum) steps equal a single-process full-batch run of plain LibTorch
// (torch::optim::AdamW / SGD with two param groups, torch::nn::utils::clip_grad_norm_, a
// hand-written LR schedule) within 1e-5 relative. Also: per-rank state and gradient bytes
// against the ZeRO formulas, communication volume against theory (counting mode), and the
// optimizer state dict round trip.
#include <catch2/catch.hpp>

#include "meshtrain/core/mesh.h"
#include "meshtrain/optim/lr_schedule.h"
#include "meshtrain/optim/zero.h"
#include "meshtrain/parallel/data_parallel.h"
#include "tests/harness.h"

#include <cmath>
#include <optional>
#include <sstream>

using namespace meshtrain;
using meshtrain::testing::all_close;
using meshtrain::testing::rank_tag;
using meshtrain::testing::relative_change;
namespace F = torch::nn::functional;

namespace {

constexpr int64_t kVocab = 13;
constexpr int64_t kEmbed = 8;
constexpr int64_t kHidden = 16;
constexpr int64_t kSeq = 4;          // tokens per sample
constexpr int64_t kGlobalBatch = 16; // samples per optimizer step
constexpr int kSteps = 5;

// A tiny LM from plain torch modules: embedding -> MLP -> LayerNorm -> head. It has 2-D
// (decayed) and 1-D (not decayed) parameters and an embedding whose unused rows get zero
// gradients.
struct TinyLMImpl : torch::nn::Module {
  TinyLMImpl() {
    wte = register_module("wte", torch::nn::Embedding(kVocab, kEmbed));
    fc = register_module("fc", torch::nn::Linear(kEmbed, kHidden));
    proj = register_module("proj", torch::nn::Linear(kHidden, kEmbed));
    ln = register_module("ln", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kEmbed})));
    head = register_module("head", torch::nn::Linear(kEmbed, kVocab));
  }
  // [B, T] int64 -> [B, T, V]
  torch::Tensor forward(const torch::Tensor& tokens) {
    auto x = wte(tokens);
    x = x + proj(F::gelu(fc(x)));
    return head(ln(x));
  }
  torch::nn::Embedding wte{nullptr};
  torch::nn::Linear fc{nullptr}, proj{nullptr}, head{nullptr};
  torch::nn::LayerNorm ln{nullptr};
};
TORCH_MODULE(TinyLM);

TinyLM make_model() {
  torch::manual_seed(1234); // init invariance: every rank and the reference draw the same
  return TinyLM();
}

// Sample g: T + 1 tokens; inputs are the first T, targets the last T (DESIGN §3 data order).
torch::Tensor sample_tokens(int64_t g) {
  auto t = torch::empty({kSeq + 1}, torch::kLong);
  for (int64_t i = 0; i <= kSeq; ++i) {
    t[i] = (g * 7 + i * 3 + g * i * 5 + (g / 3)) % kVocab;
  }
  return t;
}

// Samples [first, first + count) of step `step`: [count, T + 1].
torch::Tensor batch(int step, int64_t first, int64_t count) {
  std::vector<torch::Tensor> rows;
  for (int64_t i = 0; i < count; ++i) {
    rows.push_back(sample_tokens(step * kGlobalBatch + first + i));
  }
  return torch::stack(rows);
}

torch::Tensor token_loss_sum(TinyLM& model, const torch::Tensor& tokens) {
  auto inputs = tokens.narrow(1, 0, kSeq);
  auto targets = tokens.narrow(1, 1, kSeq);
  auto logits = model->forward(inputs);
  return F::cross_entropy(logits.reshape({-1, kVocab}), targets.reshape({-1}),
                          F::CrossEntropyFuncOptions().reduction(torch::kSum));
}

// The hand-written schedule of the reference (DESIGN §3).
double reference_lr(int s, double lr, double min_lr, int warmup, int total) {
  if (s < warmup) {
    return lr * (s + 1) / warmup;
  }
  const double q = static_cast<double>(s - warmup) / (total - warmup);
  return min_lr + (lr - min_lr) * 0.5 * (1 + std::cos(M_PI * q));
}

struct Hyper {
  bool adamw = true;
  double lr = 2e-2;
  double min_lr = 2e-3;
  int warmup = 2;
  double weight_decay = 0.1;
  double clip = 0.05; // well below the gradient norms of this model: clipping always acts
};

struct RunResult {
  std::map<std::string, torch::Tensor> params;
  std::vector<double> norms;
};

std::map<std::string, torch::Tensor> snapshot(const torch::nn::Module& model) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& p : model.named_parameters()) {
    out[p.key()] = p.value().detach().clone();
  }
  return out;
}

// Single process, full batch, plain LibTorch.
RunResult run_reference(const Hyper& h) {
  auto model = make_model();
  std::vector<torch::Tensor> decay, no_decay;
  for (const auto& p : model->parameters()) {
    (p.dim() >= 2 ? decay : no_decay).push_back(p);
  }
  std::unique_ptr<torch::optim::Optimizer> opt;
  if (h.adamw) {
    auto base = torch::optim::AdamWOptions(h.lr).betas({0.9, 0.95}).eps(1e-8);
    std::vector<torch::optim::OptimizerParamGroup> groups;
    groups.emplace_back(decay, std::make_unique<torch::optim::AdamWOptions>(
                                   torch::optim::AdamWOptions(base).weight_decay(h.weight_decay)));
    groups.emplace_back(no_decay, std::make_unique<torch::optim::AdamWOptions>(
                                      torch::optim::AdamWOptions(base).weight_decay(0)));
    opt = std::make_unique<torch::optim::AdamW>(std::move(groups), base);
  } else {
    auto base = torch::optim::SGDOptions(h.lr).momentum(0.9).dampening(0.1);
    std::vector<torch::optim::OptimizerParamGroup> groups;
    groups.emplace_back(decay, std::make_unique<torch::optim::SGDOptions>(
                                   torch::optim::SGDOptions(base).weight_decay(h.weight_decay)));
    groups.emplace_back(no_decay, std::make_unique<torch::optim::SGDOptions>(
                                      torch::optim::SGDOptions(base).weight_decay(0)));
    opt = std::make_unique<torch::optim::SGD>(std::move(groups), base);
  }
  RunResult result;
  for (int s = 0; s < kSteps; ++s) {
    opt->zero_grad();
    auto loss = token_loss_sum(model, batch(s, 0, kGlobalBatch)) / (kGlobalBatch * kSeq);
    loss.backward();
    result.norms.push_back(torch::nn::utils::clip_grad_norm_(model->parameters(), h.clip));
    const double lr = reference_lr(s, h.lr, h.min_lr, h.warmup, kSteps);
    for (auto& group : opt->param_groups()) {
      group.options().set_lr(lr);
    }
    opt->step();
  }
  result.params = snapshot(*model);
  return result;
}

struct ParallelRun {
  int stage = 0;
  int accumulation = 1;
  bool sync_every_micro_step = false; // stage 2: backward + finish() per micro-step
  int64_t bucket_bytes = int64_t{25} * 1024 * 1024;
};

ZeroOptions zero_options(const Hyper& h) {
  ZeroOptions o;
  if (h.adamw) {
    o.adamw(AdamWOptions(h.lr).beta1(0.9).beta2(0.95).eps(1e-8).weight_decay(h.weight_decay));
  } else {
    o.sgd(SGDOptions(h.lr).momentum(0.9).dampening(0.1).weight_decay(h.weight_decay));
  }
  return o;
}

// One optimizer step of the data-parallel loop (the Trainer's shape).
double train_step(TinyLM& model, DataParallelReducer& reducer, ZeroOptimizer& opt,
                  const WarmupCosineSchedule& schedule, const Mesh& mesh, const Hyper& h,
                  const ParallelRun& run, int s) {
  const int64_t dp = mesh.group("dp")->size();
  const int64_t r = mesh.group("dp")->rank();
  const int64_t micro = kGlobalBatch / (dp * run.accumulation);
  reducer.zero_grad();
  for (int m = 0; m < run.accumulation; ++m) {
    std::optional<NoSyncGuard> guard;
    if (m + 1 < run.accumulation && !run.sync_every_micro_step) {
      guard.emplace(reducer.no_sync());
    }
    // DESIGN §3: dp rank r, micro-step m takes samples m*D*b + r*b + j.
    auto tokens = batch(s, m * dp * micro + r * micro, micro);
    global_mean_loss(token_loss_sum(model, tokens), kGlobalBatch * kSeq).backward();
    if (run.sync_every_micro_step && m + 1 < run.accumulation) {
      reducer.finish();
    }
  }
  const auto grads = reducer.finish();
  const double norm = opt.clip_grad_norm(grads, h.clip);
  opt.set_lr(schedule.lr(s));
  opt.step(grads);
  return norm;
}

// The one bucket layout the reducer and the optimizer share.
BucketLayoutPtr zero_layout(const torch::nn::Module& model, const Mesh& mesh, int stage,
                            int64_t bucket_bytes = int64_t{25} * 1024 * 1024) {
  return std::make_shared<const BucketLayout>(
      model, mesh.group("dp")->size(),
      BucketLayoutOptions().bucket_bytes(bucket_bytes).zero_stage(stage));
}

RunResult run_parallel(const Mesh& mesh, const Hyper& h, const ParallelRun& run) {
  auto model = make_model();
  const auto layout = zero_layout(*model, mesh, run.stage, run.bucket_bytes);
  DataParallelReducer reducer(*model, mesh, layout);
  ZeroOptimizer opt(*model, mesh, layout, zero_options(h));
  WarmupCosineSchedule schedule(
      WarmupCosineOptions(h.lr).min_lr(h.min_lr).warmup_steps(h.warmup).total_steps(kSteps));
  RunResult result;
  for (int s = 0; s < kSteps; ++s) {
    result.norms.push_back(train_step(model, reducer, opt, schedule, mesh, h, run, s));
  }
  result.params = snapshot(*model);
  return result;
}

void check_parity(const Mesh& mesh, const Hyper& h, const ParallelRun& run) {
  const auto expected = run_reference(h);
  const auto actual = run_parallel(mesh, h, run);
  const auto dp = mesh.group("dp")->size();
  for (int s = 0; s < kSteps; ++s) {
    INFO(rank_tag() << "dp " << dp << ", stage " << run.stage << ", accumulation "
                    << run.accumulation << ", step " << s << ": norm " << actual.norms[s]
                    << ", reference " << expected.norms[s] << ", clip " << h.clip);
    CHECK(expected.norms[s] > h.clip); // clipping really acted in the reference
    CHECK(actual.norms[s] > h.clip);
    CHECK(std::abs(actual.norms[s] - expected.norms[s]) <= 1e-5 * expected.norms[s]);
  }
  for (const auto& [name, want] : expected.params) {
    INFO(rank_tag() << "dp " << dp << ", stage " << run.stage << ", accumulation "
                    << run.accumulation << (h.adamw ? ", AdamW" : ", SGD") << ": parameter '"
                    << name << "'");
    CHECK(all_close(actual.params.at(name), want, 1e-5, 1e-7));
    // The update moved the parameter (a parity of untouched weights would prove nothing).
    CHECK(relative_change(want, make_model()->named_parameters()[name]) > 1e-4);
  }
}

Mesh dp_mesh() {
  return Mesh(ParallelDims{-1, 1, 1, 1}, meshtrain::testing::test_runtime().world());
}

void parity_matrix(bool adamw) {
  const auto mesh = dp_mesh();
  Hyper h;
  h.adamw = adamw;
  const int stage = GENERATE(0, 1, 2);
  const int accumulation = GENERATE(1, 4);
  SECTION("stage " + std::to_string(stage) + ", accumulation " + std::to_string(accumulation)) {
    ParallelRun run;
    run.stage = stage;
    run.accumulation = accumulation;
    check_parity(mesh, h, run);
  }
}

int64_t param_count(const torch::nn::Module& model) {
  int64_t n = 0;
  for (const auto& p : model.parameters()) {
    n += p.numel();
  }
  return n;
}

bool within(double actual, double expected, double rel) {
  return std::abs(actual - expected) <= rel * expected;
}

} // namespace

TEST_CASE("ZeRO parity: dp x stage x accumulation equals the serial AdamW run", "[mpi][zero]") {
  parity_matrix(/*adamw=*/true);
}

TEST_CASE("ZeRO parity: dp=1, every stage and accumulation, AdamW", "[zero]") {
  parity_matrix(/*adamw=*/true);
}

TEST_CASE("ZeRO parity: SGD with momentum equals torch::optim::SGD", "[mpi][zero]") {
  parity_matrix(/*adamw=*/false);
}

TEST_CASE("ZeRO parity: dp=1 SGD with momentum", "[zero]") {
  parity_matrix(/*adamw=*/false);
}

TEST_CASE("ZeRO-2 parity: synchronised accumulation and several buckets", "[mpi][zero]") {
  const auto mesh = dp_mesh();
  Hyper h;
  ParallelRun run;
  run.stage = 2;
  run.accumulation = 4;
  run.bucket_bytes = 256; // several buckets, each padded to a multiple of dp
  SECTION("reduce-scatter every micro-step, adding into the shard") {
    run.sync_every_micro_step = true;
    check_parity(mesh, h, run);
  }
  SECTION("no_sync accumulation across buckets") {
    check_parity(mesh, h, run);
  }
  SECTION("stage 1 across buckets") {
    run.stage = 1;
    check_parity(mesh, h, run);
  }
}

TEST_CASE("ZeRO memory: per-rank state and gradient bytes follow the ZeRO formulas",
          "[mpi][zero]") {
  const auto mesh = dp_mesh();
  const int64_t dp = mesh.group("dp")->size();
  const int stage = GENERATE(0, 1, 2);
  auto model = make_model();
  const double psi = static_cast<double>(param_count(*model));
  const auto layout = zero_layout(*model, mesh, stage);
  DataParallelReducer reducer(*model, mesh, layout);
  ZeroOptimizer opt(*model, mesh, layout);
  // AdamW: fp32 master + exp_avg + exp_avg_sq = 12 bytes per parameter, split over dp from
  // stage 1; fp32 gradients = 4 bytes per parameter, split over dp at stage 2.
  const double state_expected = 12 * psi / (stage >= 1 ? dp : 1);
  const double grad_expected = 4 * psi / (stage == 2 ? dp : 1);
  const auto state = static_cast<double>(opt.state_bytes());
  const auto grad = static_cast<double>(reducer.grad_buffer_bytes());
  std::ostringstream line;
  line << rank_tag() << "dp " << dp << " stage " << stage << ": Psi " << psi
       << " params; optimizer state " << state << " B (formula " << state_expected
       << "), gradient buffer " << grad << " B (formula " << grad_expected << "); unsharded state "
       << 12 * psi << " B, gradients " << 4 * psi << " B";
  INFO(line.str());
  CHECK(within(state, state_expected, 0.01));
  CHECK(within(grad, grad_expected, 0.01));
  if (stage >= 1 && dp > 1) {
    CHECK(state < 12 * psi / dp * 1.01); // really sharded, not just close by accident
  }
}

TEST_CASE("ZeRO communication: bytes per step equal theory", "[mpi][zero]") {
  const auto mesh = dp_mesh();
  const int64_t dp = mesh.group("dp")->size();
  const int stage = GENERATE(0, 1, 2);
  const int accumulation = GENERATE(1, 4);
  Hyper h;
  ParallelRun run;
  run.stage = stage;
  run.accumulation = accumulation;
  run.bucket_bytes = 512;
  auto model = make_model();
  const auto layout = zero_layout(*model, mesh, stage, run.bucket_bytes);
  DataParallelReducer reducer(*model, mesh, layout);
  ZeroOptimizer opt(*model, mesh, layout, zero_options(h));
  WarmupCosineSchedule schedule(
      WarmupCosineOptions(h.lr).min_lr(h.min_lr).warmup_steps(h.warmup).total_steps(kSteps));
  // Padded bucket bytes P*4: what every gradient collective and every all-gather moves.
  int64_t padded_bytes = 0;
  for (int64_t b = 0; b < reducer.num_buckets(); ++b) {
    padded_bytes += reducer.bucket_numel(b) * 4;
    CHECK(reducer.bucket_numel(b) == opt.bucket_numel(b));
  }
  const int64_t buckets = reducer.num_buckets();
  REQUIRE(buckets > 1);
  auto& log = mesh.comm_log();
  log.clear();
  log.enable();
  train_step(model, reducer, opt, schedule, mesh, h, run, 0);
  log.enable(false);
  // Theory per step (bytes as counted by CommLog: all-reduce the tensor, reduce-scatter the
  // full input, all-gather the full output):
  //   plain DP (stage 0): all-reduce P*4
  //   ZeRO-1:             all-reduce P*4 + all-gather P*4
  //   ZeRO-2:             reduce-scatter P*4 + all-gather P*4 + all-reduce 16 (the two
  //                       squared-norm partial sums, fp64, of the sharded gradient)
  // independent of the accumulation (no_sync micro-steps move nothing); 0 on a group of one.
  const int64_t moves = dp > 1 ? 1 : 0;
  const int64_t ar = moves * (stage == 2 ? 16 : padded_bytes);
  const int64_t rs = moves * (stage == 2 ? padded_bytes : 0);
  const int64_t ag = moves * (stage >= 1 ? padded_bytes : 0);
  const auto got_ar = log.bytes(CollectiveKind::kAllReduce, "dp");
  const auto got_rs = log.bytes(CollectiveKind::kReduceScatter, "dp");
  const auto got_ag = log.bytes(CollectiveKind::kAllGather, "dp");
  std::ostringstream line;
  line << rank_tag() << "dp " << dp << " stage " << stage << " accumulation " << accumulation
       << " buckets " << buckets << ": all_reduce " << got_ar << " B (theory " << ar
       << "), reduce_scatter " << got_rs << " B (theory " << rs << "), all_gather " << got_ag
       << " B (theory " << ag << ")";
  INFO(line.str());
  auto near = [](int64_t got, int64_t want) {
    return std::abs(static_cast<double>(got - want)) <= 0.01 * static_cast<double>(want);
  };
  CHECK(near(got_ar, ar));
  CHECK(near(got_rs, rs));
  CHECK(near(got_ag, ag));
  // One gradient collective per bucket per step, whatever the accumulation.
  const auto grad_calls =
      log.count(stage == 2 ? CollectiveKind::kReduceScatter : CollectiveKind::kAllReduce, "dp");
  CHECK(grad_calls == moves * buckets);
  CHECK(log.count(CollectiveKind::kAllGather, "dp") == moves * (stage >= 1 ? buckets : 0));
}

TEST_CASE("ZeRO state dict: save, reload into a fresh optimizer and continue", "[mpi][zero]") {
  const auto mesh = dp_mesh();
  const int stage = GENERATE(1, 2);
  Hyper h;
  ParallelRun run;
  run.stage = stage;
  run.accumulation = 2;
  WarmupCosineSchedule schedule(
      WarmupCosineOptions(h.lr).min_lr(h.min_lr).warmup_steps(h.warmup).total_steps(kSteps));

  // Uninterrupted: 5 steps.
  auto model_a = make_model();
  const auto layout_a = zero_layout(*model_a, mesh, stage, 256);
  DataParallelReducer reducer_a(*model_a, mesh, layout_a);
  ZeroOptimizer opt_a(*model_a, mesh, layout_a, zero_options(h));
  ZeroStateDict saved;
  ZeroStateDict gathered;
  for (int s = 0; s < kSteps; ++s) {
    if (s == 2) {
      saved = opt_a.state_dict();
      for (auto& [k, t] : saved.tensors) {
        t = t.clone(); // the dict holds views of live state
      }
      gathered = opt_a.gathered_state_dict();
    }
    train_step(model_a, reducer_a, opt_a, schedule, mesh, h, run, s);
  }
  // A checkpoint with every owned range present, sized as owned_ranges() says.
  for (const auto& range : opt_a.owned_ranges()) {
    for (const char* state : {".master", ".exp_avg", ".exp_avg_sq"}) {
      INFO(rank_tag() << "key " << range.name << state);
      REQUIRE(saved.tensors.count(range.name + state) == 1);
      CHECK(saved.tensors.at(range.name + state).numel() == range.end - range.begin);
    }
  }
  CHECK(saved.step == 2);

  auto resume = [&](const ZeroStateDict& state, int load_stage) {
    // A fresh model whose weights come only from the state dict's master copy.
    auto model = make_model();
    const auto layout = zero_layout(*model, mesh, load_stage, 256);
    DataParallelReducer reducer(*model, mesh, layout);
    ZeroOptimizer opt(*model, mesh, layout, zero_options(h));
    opt.load_state_dict(state);
    CHECK(opt.step_count() == 2);
    ParallelRun r = run;
    r.stage = load_stage;
    for (int s = 2; s < kSteps; ++s) {
      train_step(model, reducer, opt, schedule, mesh, h, r, s);
    }
    return snapshot(*model);
  };
  const auto expected = snapshot(*model_a);
  SECTION("this rank's pieces into the same layout: bit-identical continuation") {
    const auto got = resume(saved, stage);
    for (const auto& [name, want] : expected) {
      INFO(rank_tag() << "stage " << stage << ": parameter '" << name << "'");
      CHECK(torch::equal(got.at(name), want));
    }
  }
  SECTION("gathered full tensors into another stage (resharding)") {
    const int other = stage == 1 ? 2 : 0;
    const auto got = resume(gathered, other);
    for (const auto& [name, want] : expected) {
      INFO(rank_tag() << "stage " << stage << " -> " << other << ": parameter '" << name << "'");
      CHECK(all_close(got.at(name), want, 1e-6, 1e-8));
    }
  }
}

TEST_CASE("ZeroOptimizer: layout and stage errors name the problem", "[zero]") {
  const auto mesh = dp_mesh();
  auto model = make_model();
  const int dp = mesh.group("dp")->size();
  REQUIRE_THROWS_WITH(BucketLayout(*model, dp, BucketLayoutOptions().zero_stage(4)),
                      Catch::Contains("ZeRO stage (4) must be 0, 1, 2 or 3"));
  REQUIRE_THROWS_WITH(BucketLayout(*model, dp, BucketLayoutOptions().zero_stage(3)),
                      Catch::Contains("ZeRO stage 3 packs one bucket per block") &&
                          Catch::Contains("units"));
  std::vector<std::string> names;
  for (const auto& [name, p] : unique_trainable_parameters(*model)) {
    names.push_back(name);
  }
  const auto stage3 = std::make_shared<const BucketLayout>(
      *model, dp, BucketLayoutOptions().zero_stage(3).units({names}));
  REQUIRE_THROWS_WITH(ZeroOptimizer(*model, mesh, stage3),
                      Catch::Contains("ZeRO stage 3 needs the ParameterShards"));
  REQUIRE_THROWS_WITH(
      BucketLayout(*model, dp, BucketLayoutOptions().zero_stage(3).units({names, {names[0]}})),
      Catch::Contains("' is in units 0 and 1"));
  // A layout built for another model (or another dp) is refused naming the difference.
  torch::nn::Linear other(3, 3);
  const auto foreign = std::make_shared<const BucketLayout>(*other, dp);
  REQUIRE_THROWS_WITH(ZeroOptimizer(*model, mesh, foreign),
                      Catch::Contains("ZeroOptimizer: ") &&
                          Catch::Contains("build the layout from this model"));
  REQUIRE_THROWS_WITH(
      ZeroOptimizer(*model, mesh, std::make_shared<const BucketLayout>(*model, dp + 1)),
      Catch::Contains("the bucket layout is for dp " + std::to_string(dp + 1)));
  ZeroOptimizer opt(*model, mesh, zero_layout(*model, mesh, 2));
  REQUIRE_THROWS_WITH(opt.step({torch::zeros({opt.bucket_numel(0) + 1})}),
                      Catch::Contains("gradient of bucket 0 has") &&
                          Catch::Contains("(this rank's shard)"));
  // A parameter swapped out of the flat buffer would silently stop training.
  {
    torch::NoGradGuard no_grad;
    model->fc->weight.set_data(torch::zeros_like(model->fc->weight));
  }
  REQUIRE_THROWS_WITH(
      opt.step({torch::zeros({opt.bucket_numel(0) / dp})}),
      Catch::Contains("'fc.weight' no longer lives in the optimizer's flat buffer"));
}
