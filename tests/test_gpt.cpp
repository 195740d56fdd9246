// Tests of the GPT example (examples/gpt/gpt_model.h) and the Trainer (launch/trainer.h):
// nanoGPT's parameter names and shapes, the forward against a hand-written plain-LibTorch
// nanoGPT, init invariance (every tp holds the shards of the serial model), per-step loss
// parity of the Trainer across layouts (dp, tp, dp x tp, ZeRO 1/2, sequence parallelism,
// accumulation) against a serial run on a group of one, and fit()'s metrics, validation
// cadence, checkpoint hook and time budget.
#include <catch2/catch.hpp>

#include "meshtrain/core/mesh.h"
#include "meshtrain/core/token_file.h"
#include "meshtrain/launch/parallelize.h"
#include "meshtrain/launch/trainer.h"
#include "meshtrain/parallel/shard_tensor.h"
#include "meshtrain/parallel/sharding.h"
#include "meshtrain/parallel/tensor_parallel_layer.h"
#include "tests/gpt_fixtures.h"
#include "tests/harness.h"

#include "examples/gpt/gpt_model.h"

#include <nlohmann/json.hpp>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>

using namespace meshtrain;
using meshtrain::testing::rank_tag;
using namespace meshtrain::testing;
namespace F = torch::nn::functional;
namespace fs = std::filesystem;

namespace {

// nanoGPT's forward in plain LibTorch from the named parameters of a tp = 1 GPT:
// logits [B, T, V] (padding columns dropped).
torch::Tensor reference_logits(const gpt::GPT& model, const torch::Tensor& idx) {
  const auto& c = model->config();
  const int64_t B = idx.size(0), T = idx.size(1), C = c.n_embd(), H = c.n_head(), D = C / H;
  const auto p = model->named_parameters();
  const auto get = [&](const std::string& name) { return p[name]; };
  const auto wte = get("transformer.wte.weight").narrow(0, 0, c.vocab_size()); // [V, C]
  const auto ln = [&](const torch::Tensor& x, const std::string& prefix) {
    return F::layer_norm(x, F::LayerNormFuncOptions({C})
                                .weight(get(prefix + ".weight"))
                                .bias(get(prefix + ".bias"))
                                .eps(1e-5));
  };
  const auto linear = [&](const torch::Tensor& x, const std::string& prefix) {
    return F::linear(x, get(prefix + ".weight"), get(prefix + ".bias"));
  };
  auto x = F::embedding(idx, wte) + get("transformer.wpe.weight").narrow(0, 0, T); // [B, T, C]
  for (int64_t i = 0; i < c.n_layer(); ++i) {
    const std::string h = "transformer.h." + std::to_string(i);
    const auto qkv = linear(ln(x, h + ".ln_1"), h + ".attn.c_attn").split(C, -1); // 3 x [B,T,C]
    const auto heads = [&](const torch::Tensor& m) { return m.view({B, T, H, D}).transpose(1, 2); };
    auto att = torch::matmul(heads(qkv[0]), heads(qkv[1]).transpose(-2, -1)) / std::sqrt(double(D));
    const auto future = torch::ones({T, T}, torch::kBool).triu(1);
    att = att.masked_fill(future, -INFINITY).softmax(-1); // [B, H, T, T]
    const auto y = torch::matmul(att, heads(qkv[2])).transpose(1, 2).reshape({B, T, C});
    x = x + linear(y, h + ".attn.c_proj");
    x = x + linear(F::gelu(linear(ln(x, h + ".ln_2"), h + ".mlp.c_fc")), h + ".mlp.c_proj");
  }
  return F::linear(ln(x, "transformer.ln_f"), wte); // [B, T, V]
}

using Run = TrainedRun;

Run train_run(const Mesh& mesh, const TokenFiles& files, bool sequence_parallel, int zero,
              int64_t micro_batch, Precision precision = Precision::kFp32) {
  auto plan = test_plan(mesh, zero, sequence_parallel, micro_batch);
  plan.precision = precision;
  Trainer trainer(tiny_gpt(mesh, plan), files.train, files.val, quiet_options());
  return train_steps(trainer);
}

} // namespace

TEST_CASE("GPT: nanoGPT parameter names and shapes, init draws, loss at init", "[gpt]") {
  torch::manual_seed(kSeed);
  gpt::GPT model(tiny_config().block_size(24));
  const int64_t C = 32;
  std::vector<std::pair<std::string, std::vector<int64_t>>> expected = {
      {"transformer.wte.weight", {256, C}}, {"transformer.wpe.weight", {24, C}}};
  for (int i = 0; i < 2; ++i) {
    const std::string h = "transformer.h." + std::to_string(i) + ".";
    const std::vector<std::pair<std::string, std::vector<int64_t>>> block = {
        {h + "ln_1.weight", {C}},
        {h + "ln_1.bias", {C}},
        {h + "attn.c_attn.weight", {3 * C, C}},
        {h + "attn.c_attn.bias", {3 * C}},
        {h + "attn.c_proj.weight", {C, C}},
        {h + "attn.c_proj.bias", {C}},
        {h + "ln_2.weight", {C}},
        {h + "ln_2.bias", {C}},
        {h + "mlp.c_fc.weight", {4 * C, C}},
        {h + "mlp.c_fc.bias", {4 * C}},
        {h + "mlp.c_proj.weight", {C, 4 * C}},
        {h + "mlp.c_proj.bias", {C}}};
    expected.insert(expected.end(), block.begin(), block.end());
  }
  expected.push_back({"transformer.ln_f.weight", {C}});
  expected.push_back({"transformer.ln_f.bias", {C}});

  const auto params = model->named_parameters();
  REQUIRE(params.size() == expected.size());
  int64_t total = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    INFO("parameter " << i << ": " << params[i].key() << " " << params[i].value().sizes());
    CHECK(params[i].key() == expected[i].first);
    CHECK(params[i].value().sizes().vec() == expected[i].second);
    total += params[i].value().numel();
  }
  CHECK(model->num_parameters() == total);

  // The documented init (gpt_model.h): each value by (seed, name, index); c_proj weights
  // scaled by 1/sqrt(2L), biases 0, LayerNorm weights 1.
  for (const auto& [name, shape] : expected) {
    INFO("init of " << name);
    const auto& p = params[name];
    if (ends_with(name, "bias")) {
      CHECK(torch::equal(p, torch::zeros(shape)));
    } else if (name.find("ln_") != std::string::npos) {
      CHECK(torch::equal(p, torch::ones(shape)));
    } else {
      const double std = ends_with(name, "c_proj.weight") ? 0.02 / std::sqrt(4.0) : 0.02;
      CHECK(torch::equal(p, normal_init(name, shape, std)));
    }
  }

  // Small weights: the logits start near 0, the loss near ln(V).
  auto gen = at::detail::createCPUGenerator(7);
  const auto idx = at::randint(256, {4, 24}, gen, torch::kLong);
  const auto targets = at::randint(256, {4, 24}, gen, torch::kLong);
  const auto out = model->forward(idx, targets);
  CHECK(std::abs(out.loss.item<double>() - std::log(256.0)) < 0.05);
  CHECK(out.token_count.item<int64_t>() == 4 * 24);
  CHECK(std::abs(out.loss_sum.item<double>() / (4 * 24) - out.loss.item<double>()) < 1e-5);
}

TEST_CASE("GPT: tp=1 forward equals a plain LibTorch nanoGPT", "[gpt]") {
  torch::manual_seed(kSeed);
  // Larger weights than the init so that every term of the forward matters; a padded vocab
  // (200 -> 256) so that padding is seen to stay out of the loss.
  gpt::GPT model(tiny_config().vocab_size(200).init_std(0.3));
  {
    torch::NoGradGuard no_grad;
    for (auto& p : model->parameters()) {
      if (p.dim() == 1) {
        p.normal_(0.5, 0.2);
      }
    }
  }
  REQUIRE(model->padded_vocab_size() == 256);
  auto gen = at::detail::createCPUGenerator(11);
  const auto idx = at::randint(200, {3, 12}, gen, torch::kLong);
  const auto targets = at::randint(200, {3, 12}, gen, torch::kLong);
  const auto out = model->forward(idx, targets);
  const auto expected = reference_logits(model, idx); // [B, T, V]
  REQUIRE(out.logits.sizes() == torch::IntArrayRef({3, 12, 256}));
  const auto logits = out.logits.narrow(-1, 0, 200);
  CHECK(all_close(logits, expected, 1e-5, 1e-6)); // fp32 rounding of O(1) sums: ~1e-7 absolute
  const auto loss = F::cross_entropy(expected.reshape({-1, 200}), targets.reshape({-1}));
  INFO("loss " << out.loss.item<double>() << " vs reference " << loss.item<double>());
  CHECK(all_close(out.loss, loss, 1e-5, 0));
  // Bad inputs are named.
  REQUIRE_THROWS_WITH(model->forward(at::randint(200, {2, 17}, gen, torch::kLong)),
                      Catch::Contains("sequence length 17 must be in [1, block_size = 16]"));
  REQUIRE_THROWS_WITH(gpt::GPT(tiny_config().n_head(5)),
                      Catch::Contains("n_embd (32) must be divisible by n_head (5)"));
}

TEST_CASE("GPT: every tp holds the shards of the serial model", "[mpi][gpt]") {
  auto& rt = meshtrain::testing::test_runtime();
  const Mesh mesh(ParallelDims{1, 1, rt.world_size(), 1}, rt.world()); // tp = world (2 or 4)
  const auto config = tiny_config().vocab_size(250);                   // padded to 256 on every tp
  torch::manual_seed(kSeed);
  gpt::GPT serial(config);
  torch::manual_seed(kSeed);
  gpt::GPT model(config);
  apply_tensor_parallel(*model, TensorParallelism{mesh.group("tp"), false});
  const auto serial_params = serial->named_parameters();
  for (const auto& [name, spec] : named_shard_specs(*model)) {
    const auto local = model->named_parameters()[name];
    const auto full =
        spec.is_partitioned() ? gather_unsharded(local, spec, mesh.group(spec.group)) : local;
    auto want = serial_params[name];
    if (name == "transformer.wte.weight") {
      want = want.narrow(0, 0, 250); // export drops the padding rows
    }
    INFO(rank_tag() << name << ": " << full.sizes() << " vs serial " << want.sizes());
    REQUIRE(full.sizes() == want.sizes());
    CHECK(torch::equal(full, want));
  }
}

TEST_CASE("GPT + Trainer: per-step losses of every layout equal the serial run", "[mpi][gpt]") {
  auto& rt = meshtrain::testing::test_runtime();
  const int world = rt.world_size();
  const TokenFiles files;

  struct Layout {
    std::string name;
    int tp;
    bool sp;
    int zero;
    int64_t accumulation;
  };
  std::vector<Layout> layouts = {
      {"dp", 1, false, 0, 1},       {"dp zero1", 1, false, 1, 1},
      {"dp zero2", 1, false, 2, 1}, {"dp accumulation 4", 1, false, 0, 4},
      {"tp", world, false, 0, 1},   {"tp + sequence parallel", world, true, 0, 1},
  };
  if (world % 4 == 0) {
    layouts.push_back({"dp2 x tp2", 2, false, 0, 1});
    layouts.push_back({"dp2 x tp2, sequence parallel, zero2, accumulation 2", 2, true, 2, 2});
  }
  // fp32: the same model up to summation order. bf16 (the mixed-precision policy): every
  // layout rounds its matrix products' inputs alike, but a TP shard or a micro-batch sums
  // in a different order before the bf16 rounding, so the runs drift apart by roundings, most
  // at a loss spike: tp 2 and 4 were 2.1% off the serial run at step 6 (the spike of this
  // tiny model at lr 1e-2 from the counter-based init) and 0.75% on average over the 20
  // steps; the default GPT's tp 2 drifts up to 2.9% at its spike, before and after that init
  // (train_gpt, 40 steps). So each step within 3e-2 and the mean within 1e-2. The gradient norms,
  // dominated by a few bf16-rounded extreme elements, differ by up to 40% at the spikes and are
  // compared in fp32 only.
  const std::vector<std::pair<Precision, double>> precisions = {{Precision::kFp32, 1e-5},
                                                                {Precision::kBf16, 3e-2}};
  for (const auto& [precision, tolerance] : precisions) {
    // The serial run, on this rank alone.
    const Mesh serial_mesh(ParallelDims{1, 1, 1, 1}, self_group());
    const auto serial = train_run(serial_mesh, files, false, 0, kGlobalBatch, precision);
    CHECK(serial.losses.back() < serial.losses.front()); // it learns
    CHECK(serial.norms.front() > 0.5);                   // clipping is exercised
    for (const auto& l : layouts) {
      const Mesh mesh(ParallelDims{-1, 1, l.tp, 1}, rt.world());
      const int64_t dp = mesh.group("dp")->size();
      const auto run =
          train_run(mesh, files, l.sp, l.zero, kGlobalBatch / (dp * l.accumulation), precision);
      double mean_drift = 0;
      for (int s = 0; s < kSteps; ++s) {
        INFO(rank_tag() << to_string(precision) << " " << l.name << " (dp " << dp << " x tp "
                        << l.tp << "), step " << s << ": loss " << run.losses[s] << " vs serial "
                        << serial.losses[s] << ", grad norm " << run.norms[s] << " vs "
                        << serial.norms[s]);
        const double drift =
            std::abs(run.losses[s] - serial.losses[s]) / std::abs(serial.losses[s]);
        mean_drift += drift / kSteps;
        CHECK(drift <= tolerance);
        if (precision == Precision::kFp32) {
          CHECK(std::abs(run.norms[s] - serial.norms[s]) <= tolerance * std::abs(serial.norms[s]));
        }
      }
      INFO(rank_tag() << to_string(precision) << " " << l.name << ": mean drift " << mean_drift);
      CHECK(mean_drift <= (precision == Precision::kFp32 ? 1e-5 : 1e-2));
      INFO(rank_tag() << to_string(precision) << " " << l.name << ": val_loss " << run.val_loss
                      << " vs serial " << serial.val_loss);
      CHECK(std::abs(run.val_loss - serial.val_loss) <= tolerance * serial.val_loss);
    }
  }
}

TEST_CASE("Trainer: fit writes metrics, validates on schedule, calls the hook, keeps the budget",
          "[mpi][gpt]") {
  auto& rt = meshtrain::testing::test_runtime();
  const TokenFiles files;
  const Mesh mesh(ParallelDims{-1, 1, 1, 1}, rt.world());
  const auto metrics = files.dir / "metrics.jsonl"; // only rank 0 writes it

  Trainer trainer(tiny_gpt(mesh, test_plan(mesh)), files.train, files.val,
                  quiet_options()
                      .steps(4)
                      .val_every(2)
                      .metrics_path(metrics.string())
                      .prometheus_path((files.dir / "metrics.prom").string()));
  std::vector<std::pair<int64_t, CheckpointEvent>> events;
  trainer.set_checkpoint_hook(
      [&](Trainer& t, CheckpointEvent e) { events.emplace_back(t.step(), e); });
  const auto result = trainer.fit();
  CHECK(result.steps == 4);
  CHECK(result.reason == StopReason::kCompleted);
  REQUIRE(result.history.size() == 4);
  // Every 2 steps; the end coincides with step 4, so no extra validation.
  REQUIRE(result.val_losses.size() == 2);
  CHECK(result.val_losses[0].first == 2);
  CHECK(result.val_losses[1].first == 4);
  REQUIRE(events.size() == 5);
  for (int i = 0; i < 4; ++i) {
    CHECK(events[i].first == i + 1);
    CHECK(events[i].second == CheckpointEvent::kStep);
  }
  CHECK(events[4].second == CheckpointEvent::kEnd);

  if (rt.rank() == 0) {
    std::ifstream in(metrics);
    std::vector<nlohmann::json> lines;
    for (std::string line; std::getline(in, line);) {
      lines.push_back(nlohmann::json::parse(line));
    }
    // step 1, 2, val 2, step 3, 4, val 4
    REQUIRE(lines.size() == 6);
    for (const char* key :
         {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_ms", "mem_peak_bytes"}) {
      INFO("key " << key);
      CHECK(lines[0].contains(key));
    }
    CHECK(lines[0]["step"] == 1);
    CHECK(std::abs(lines[0]["loss"].get<double>() - result.history[0].loss) < 1e-12);
    CHECK(lines[0]["mem_peak_bytes"].get<int64_t>() > 0);
    CHECK(lines[2]["step"] == 2);
    CHECK(std::abs(lines[2]["val_loss"].get<double>() - result.val_losses[0].second) < 1e-12);
    CHECK(lines[5]["step"] == 4);
    CHECK(lines[5].contains("val_loss"));

    // The Prometheus file holds the last step's and the last validation's values.
    std::ifstream prom(files.dir / "metrics.prom");
    std::map<std::string, double> samples;
    for (std::string line; std::getline(prom, line);) {
      if (!line.empty() && line[0] != '#') {
        std::istringstream fields(line);
        std::string name;
        double value = 0;
        fields >> name >> value;
        samples[name] = value;
      }
    }
    CHECK(samples["meshtrain_step"] == 4);
    CHECK(samples["meshtrain_tokens_total"] == 4 * kGlobalBatch * kBlock);
    CHECK(samples["meshtrain_loss"] == result.history.back().loss);
    CHECK(samples["meshtrain_val_loss"] == result.val_losses.back().second);
    CHECK(samples.count("meshtrain_tokens_per_second") == 1);
  }

  // A budget smaller than one step: one step, then every rank stops together.
  Trainer budgeted(tiny_gpt(mesh, test_plan(mesh)), files.train, nullptr,
                   quiet_options().steps(50).max_time(1e-6));
  const auto short_run = budgeted.fit();
  CHECK(short_run.steps == 1);
  CHECK(short_run.reason == StopReason::kTimeBudget);
  CHECK(short_run.val_losses.empty());

  // A layout that does not divide the global batch is refused with the numbers (by the
  // plan, before any model is laid out).
  const int64_t dp = mesh.group("dp")->size();
  auto bad = test_plan(mesh, 0, false, 4);
  bad.global_batch = 10;
  REQUIRE_THROWS_WITH(tiny_gpt(mesh, bad),
                      Catch::Contains("the global batch (10 sequences) is not divisible by "
                                      "micro-batch (4) x dp (" +
                                      std::to_string(dp) + ")"));
}

TEST_CASE("GPT + Trainer: bf16 parameters with fp32 master weights follow the fp32 run",
          "[mpi][gpt]") {
  auto& rt = meshtrain::testing::test_runtime();
  const TokenFiles files;
  const Mesh mesh(ParallelDims{-1, 1, 1, 1}, rt.world());
  std::vector<double> fp32, bf16;
  for (bool use_bf16 : {false, true}) {
    auto plan = test_plan(mesh, 1);
    plan.precision = use_bf16 ? Precision::kBf16 : Precision::kFp32;
    Trainer trainer(tiny_gpt(mesh, plan), files.train, files.val, quiet_options());
    auto& model = trainer.model();
    auto& losses = use_bf16 ? bf16 : fp32;
    for (int s = 0; s < kSteps; ++s) {
      losses.push_back(trainer.train_step().loss);
    }
    if (use_bf16) {
      CHECK(model.named_parameters()["transformer.h.0.mlp.c_fc.weight"].scalar_type() ==
            torch::kBFloat16);
      for (const auto& [key, t] : trainer.optimizer().state_dict().tensors) {
        INFO(key);
        CHECK(t.scalar_type() == torch::kFloat); // master and moments stay fp32
      }
    }
  }
  for (int s = 0; s < kSteps; ++s) {
    INFO(rank_tag() << "step " << s + 1 << ": bf16 " << bf16[s] << " vs fp32 " << fp32[s]);
    CHECK(std::isfinite(bf16[s]));
    CHECK(std::abs(bf16[s] - fp32[s]) <= 0.02 * fp32[s]);
  }
  CHECK(bf16.back() < bf16.front()); // it learns
}

TEST_CASE("Trainer: a step reports its compute split, exposed communication and bytes by group",
          "[mpi][gpt]") {
  auto& rt = meshtrain::testing::test_runtime();
  const TokenFiles files;
  const Mesh mesh(ParallelDims{-1, 1, 1, 1}, rt.world());
  const int64_t dp = mesh.group("dp")->size();
  torch::manual_seed(kSeed);
  int64_t params = 0; // this rank's parameter elements (tp = 1: all of them)
  int64_t tensors = 0;
  for (const auto& p : gpt::GPT(tiny_config())->parameters()) {
    params += p.numel();
    tensors += 1;
  }

  const auto& log = mesh.group("world")->log();
  for (const int zero : {0, 2}) {
    Trainer trainer(tiny_gpt(mesh, test_plan(mesh, zero)), files.train, files.val, quiet_options());
    log->enable();
    const auto stats = trainer.train_step();
    log->enable(false);
    INFO(rank_tag() << "zero " << zero << ": step " << stats.step_ms << " ms = forward "
                    << stats.forward_ms << " + backward " << stats.backward_ms << " + optimizer "
                    << stats.optimizer_ms << " + comm " << stats.comm_ms);
    CHECK(stats.forward_ms > 0);
    CHECK(stats.backward_ms > 0);
    CHECK(stats.optimizer_ms > 0);
    CHECK(stats.comm_ms >= 0);
    CHECK(stats.forward_ms + stats.backward_ms + stats.optimizer_ms + stats.comm_ms <=
          stats.step_ms * 1.001);

    // Buckets of 16 KiB are padded to a multiple of dp: less than dp elements each, and there
    // are at most as many buckets as parameter tensors.
    const auto padding = tensors * (dp - 1) * 4;
    const auto bytes = [&](const std::string& key) {
      const auto it = stats.comm_bytes.find(key);
      return it == stats.comm_bytes.end() ? int64_t{0} : it->second;
    };
    if (dp == 1) {
      CHECK(stats.comm_bytes.empty()); // a group of one moves nothing
    } else if (zero == 0) {
      CHECK(stats.comm_bytes.size() == 1);
      CHECK(bytes("dp all_reduce") >= 4 * params + 8); // the gradients and the loss (a double)
      CHECK(bytes("dp all_reduce") <= 4 * params + 8 + padding);
    } else {
      CHECK(stats.comm_bytes.size() == 3);
      CHECK(bytes("dp reduce_scatter") >= 4 * params);
      CHECK(bytes("dp reduce_scatter") <= 4 * params + padding);
      CHECK(bytes("dp all_gather") == bytes("dp reduce_scatter")); // fp32 parameters
      CHECK(bytes("dp all_reduce") == 24); // the norm (two doubles) and the loss
    }
  }
}
