// defines: bench_dp — data-parallel training step time and throughput of a small token model
// (embedding -> L pre-LayerNorm MLP blocks -> LayerNorm -> head), printed as a Markdown table.
//
// It measures, at the world size it is started with (dp = world size):
//   - step time with the gradient reduction overlapped with backward vs done after it
//     (--overlap on,off), and how long finish() still waited for communication;
//   - tokens/s of the same global batch, to compare dp=2 (2 ranks x 1 thread) with dp=1
//     (1 rank x 2 threads):
//       mpirun --allow-run-as-root -np 2 bench_dp          # dp=2, overlap on and off
//       MESHTRAIN_THREADS=2 bench_dp --overlap on          # dp=1, 2 threads
// Every rank times each step; a step's time is the slowest rank's; the table shows the
// median over the measured steps (after --warmup untimed steps). The overlap modes train
// separate copies of the model, interleaved step by step.
#include "meshtrain/core/cpu_features.h"
#include "meshtrain/core/mesh.h"
#include "meshtrain/core/runtime.h"
#include "meshtrain/launch/cli.h"
#include "meshtrain/optim/lr_schedule.h"
#include "meshtrain/optim/zero.h"
#include "meshtrain/parallel/data_parallel.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <optional>
#include <sstream>

using namespace meshtrain;
namespace F = torch::nn::functional;

namespace {

struct Config {
  int64_t vocab = 1024;
  int64_t embed = 256;
  int64_t layers = 4;
  int64_t seq = 64;
  int64_t global_batch = 16; // samples per step
  int64_t accumulation = 1;
  int steps = 10;
  int warmup = 2;
  int zero = 0;
  double bucket_mb = 1; // the default model has 10 MiB of gradients: 25 MiB would be one bucket
  std::vector<std::string> overlap{"on", "off"};
};

struct BlockImpl : torch::nn::Module {
  explicit BlockImpl(int64_t c) {
    ln = register_module("ln", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c})));
    fc = register_module("fc", torch::nn::Linear(c, 4 * c));
    proj = register_module("proj", torch::nn::Linear(4 * c, c));
  }
  // [B, T, C] -> [B, T, C]
  torch::Tensor forward(const torch::Tensor& x) { return x + proj(F::gelu(fc(ln(x)))); }
  torch::nn::LayerNorm ln{nullptr};
  torch::nn::Linear fc{nullptr}, proj{nullptr};
};
TORCH_MODULE(Block);

struct TokenMlpImpl : torch::nn::Module {
  explicit TokenMlpImpl(const Config& c) {
    wte = register_module("wte", torch::nn::Embedding(c.vocab, c.embed));
    blocks = register_module("blocks", torch::nn::ModuleList());
    for (int64_t i = 0; i < c.layers; ++i) {
      blocks->push_back(Block(c.embed));
    }
    ln_f = register_module("ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.embed})));
    head = register_module("head", torch::nn::Linear(c.embed, c.vocab));
  }
  // [B, T] -> [B, T, V]
  torch::Tensor forward(const torch::Tensor& tokens) {
    auto x = wte(tokens);
    for (const auto& block : *blocks) {
      x = block->as<BlockImpl>()->forward(x);
    }
    return head(ln_f(x));
  }
  torch::nn::Embedding wte{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  torch::nn::LayerNorm ln_f{nullptr};
  torch::nn::Linear head{nullptr};
};
TORCH_MODULE(TokenMlp);

// Samples [first, first + count) of step `step`: [count, T + 1] tokens, the same whatever
// the layout.
torch::Tensor batch(const Config& c, int step, int64_t first, int64_t count) {
  std::vector<torch::Tensor> rows;
  for (int64_t i = 0; i < count; ++i) {
    auto gen =
        at::detail::createCPUGenerator(static_cast<uint64_t>(step * c.global_batch + first + i));
    rows.push_back(at::randint(c.vocab, {c.seq + 1}, gen, torch::kLong));
  }
  return torch::stack(rows);
}

struct Result {
  double step_ms = 0;
  double finish_ms = 0;
  double loss = 0;
  int64_t grad_bytes = 0;
  int64_t state_bytes = 0;
  int64_t params = 0;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// One training setup (model, reducer, optimizer) for one overlap mode. The modes are run
// interleaved step by step, so load from other processes on a shared machine hits all alike.
struct Runner {
  Runner(const Config& c, const Mesh& mesh, bool overlap)
      : model((torch::manual_seed(0), TokenMlp(c))),
        layout(std::make_shared<const BucketLayout>(
            *model, mesh.group("dp")->size(),
            BucketLayoutOptions()
                .bucket_bytes(static_cast<int64_t>(c.bucket_mb * 1024 * 1024))
                .zero_stage(c.zero))),
        reducer(*model, mesh, layout, DataParallelOptions().overlap(overlap)),
        opt(*model, mesh, layout, ZeroOptions().adamw(AdamWOptions(1e-3))),
        schedule(WarmupCosineOptions(1e-3).min_lr(1e-4).warmup_steps(2).total_steps(c.warmup +
                                                                                    c.steps)) {}
  TokenMlp model;
  BucketLayoutPtr layout;
  DataParallelReducer reducer;
  ZeroOptimizer opt;
  WarmupCosineSchedule schedule;
  std::vector<double> step_ms, finish_ms;
  double loss = 0;
};

void train_step(const Config& c, const Mesh& mesh, Runner& r, int s) {
  const auto& dp = mesh.group("dp");
  const int64_t micro = c.global_batch / (dp->size() * c.accumulation);
  mesh.group("world")->barrier();
  const auto t0 = std::chrono::steady_clock::now();
  r.reducer.zero_grad();
  double loss_sum = 0;
  for (int64_t m = 0; m < c.accumulation; ++m) {
    std::optional<NoSyncGuard> guard;
    if (m + 1 < c.accumulation) {
      guard.emplace(r.reducer.no_sync());
    }
    // DESIGN §3 data order: dp rank r, micro-step m takes samples m*D*b + r*b + j.
    auto tokens = batch(c, s, m * dp->size() * micro + dp->rank() * micro, micro);
    auto logits = r.model->forward(tokens.narrow(1, 0, c.seq)); // [b, T, V]
    auto loss = global_mean_loss(
        F::cross_entropy(logits.reshape({-1, c.vocab}), tokens.narrow(1, 1, c.seq).reshape({-1}),
                         F::CrossEntropyFuncOptions().reduction(torch::kSum)),
        c.global_batch * c.seq);
    loss.backward();
    loss_sum += loss.item<double>();
  }
  const auto t_finish = std::chrono::steady_clock::now();
  const auto grads = r.reducer.finish();
  const double wait = ms_since(t_finish);
  r.opt.clip_grad_norm(grads, 1.0);
  r.opt.set_lr(r.schedule.lr(s));
  r.opt.step(grads);
  const double total = ms_since(t0);
  // The step takes as long as its slowest rank.
  auto times = torch::tensor({total, wait}, torch::kDouble);
  mesh.group("world")->all_reduce(times, ReduceOp::kMax);
  auto loss_total = torch::tensor({loss_sum}, torch::kDouble);
  dp->all_reduce(loss_total, ReduceOp::kSum);
  if (s >= c.warmup) {
    r.step_ms.push_back(times[0].item<double>());
    r.finish_ms.push_back(times[1].item<double>());
  }
  r.loss = loss_total.item<double>();
}

} // namespace

int main(int argc, char** argv) {
  Runtime rt(&argc, &argv);
  cxxopts::Options options("bench_dp", "data-parallel step time and throughput (Markdown table)");
  // clang-format off
  options.add_options()
    ("vocab", "vocabulary size", cli::text("1024"))
    ("embed", "embedding width C", cli::text("256"))
    ("layers", "MLP blocks (C -> 4C -> C)", cli::text("4"))
    ("seq", "tokens per sample", cli::text("64"))
    ("global-batch", "samples per optimizer step", cli::text("16"))
    ("accumulation", "micro-steps per optimizer step", cli::text("1"))
    ("steps", "timed steps", cli::text("10"))
    ("warmup", "untimed steps first", cli::text("2"))
    ("zero", "ZeRO stage 0, 1 or 2", cli::text("0"))
    ("bucket-mb", "gradient bucket size in MiB", cli::text("1"))
    ("overlap", "comma list of on/off", cli::text("on,off"))
    ("h,help", "print usage");
  // clang-format on
  Config c;
  try {
    const cli::ParsedFlags flags(options, argc, argv);
    if (flags.help()) {
      if (rt.rank() == 0) {
        std::cout << options.help() << "\n";
      }
      return 0;
    }
    c.vocab = flags.integer("vocab", 1, 1 << 20);
    c.embed = flags.integer("embed", 1, 1 << 16);
    c.layers = flags.integer("layers", 1, 1 << 10);
    c.seq = flags.integer("seq", 1, 1 << 16);
    c.global_batch = flags.integer("global-batch", 1, 1 << 20);
    c.accumulation = flags.integer("accumulation", 1, 1 << 20);
    c.steps = static_cast<int>(flags.integer("steps", 1, 1 << 20));
    c.warmup = static_cast<int>(flags.integer("warmup", 0, 1 << 20));
    c.zero = static_cast<int>(flags.integer("zero", 0, 2));
    c.bucket_mb = flags.number("bucket-mb", 1e-6, 1 << 14);
    c.overlap.clear();
    std::stringstream list(flags.str("overlap"));
    for (std::string item; std::getline(list, item, ',');) {
      if (item != "on" && item != "off") {
        throw cli::UsageError("--overlap takes on and/or off, got '" + item + "'");
      }
      c.overlap.push_back(item);
    }
  } catch (const cli::UsageError& e) {
    if (rt.rank() == 0) {
      std::cerr << "bench_dp: " << e.what() << "\n";
    }
    return cli::kExitUsage;
  }
  const Mesh mesh(ParallelDims{-1, 1, 1, 1}, rt.world());
  const int64_t dp = mesh.group("dp")->size();
  if (c.global_batch % (dp * c.accumulation) != 0) {
    if (rt.rank() == 0) {
      std::cerr << "bench_dp: --global-batch " << c.global_batch << " must be a multiple of dp ("
                << dp << ") x accumulation (" << c.accumulation << ")\n";
    }
    return cli::kExitUsage;
  }
  std::vector<std::unique_ptr<Runner>> runners;
  for (const auto& mode : c.overlap) {
    runners.push_back(std::make_unique<Runner>(c, mesh, mode == "on"));
  }
  for (int s = 0; s < c.warmup + c.steps; ++s) {
    for (auto& r : runners) {
      train_step(c, mesh, *r, s);
    }
  }
  std::vector<std::pair<std::string, Result>> rows;
  for (size_t i = 0; i < runners.size(); ++i) {
    const auto& r = *runners[i];
    Result result;
    result.step_ms = median(r.step_ms);
    result.finish_ms = median(r.finish_ms);
    result.loss = r.loss;
    result.grad_bytes = r.reducer.grad_buffer_bytes();
    result.state_bytes = r.opt.state_bytes();
    result.params = r.opt.num_parameters();
    rows.emplace_back(c.overlap[i], result);
  }
  if (rt.rank() == 0) {
    const double tokens = static_cast<double>(c.global_batch * c.seq);
    std::printf("%s\n", describe_cpu().c_str());
    std::printf("model: vocab %lld, C %lld, %lld blocks, %lld parameters; global batch %lld x %lld "
                "tokens, accumulation %lld; ZeRO %d, bucket %.1f MiB; torch %s threads/rank\n\n",
                static_cast<long long>(c.vocab), static_cast<long long>(c.embed),
                static_cast<long long>(c.layers), static_cast<long long>(rows[0].second.params),
                static_cast<long long>(c.global_batch), static_cast<long long>(c.seq),
                static_cast<long long>(c.accumulation), c.zero, c.bucket_mb,
                std::to_string(rt.threads()).c_str());
    std::printf("| dp | ranks x threads | overlap | step ms (median of %d) | finish() wait ms | "
                "tokens/s | grad buffer MiB/rank | optimizer state MiB/rank | loss (last) |\n",
                c.steps);
    std::printf("|---:|---|---|---:|---:|---:|---:|---:|---:|\n");
    for (const auto& [mode, r] : rows) {
      std::printf("| %lld | %lld x %d | %s | %.1f | %.2f | %.0f | %.2f | %.2f | %.4f |\n",
                  static_cast<long long>(dp), static_cast<long long>(rt.world_size()), rt.threads(),
                  dp > 1 ? mode.c_str() : "n/a (no comm)", r.step_ms, r.finish_ms,
                  tokens / (r.step_ms / 1000.0), static_cast<double>(r.grad_bytes) / (1 << 20),
                  static_cast<double>(r.state_bytes) / (1 << 20), r.loss);
    }
  }
  return 0;
}
