// defines: bench_pipeline — the step time and the measured bubble of each pipeline schedule
// on real ranks, beside the checker's simulation of the same schedule (the theory), as one
// Markdown table (rank 0).
//
//   mpirun -np 4 --oversubscribe bench_pipeline [--schedules gpipe,1f1b,interleaved,zb-h1]
//          [--micro-batches 8] [--virtual-stages 2] [--cost-ms 20] [--message-kib 256]
//          [--steps 3]
//   mpirun -np 2 bench_pipeline --mode compute [--n-layer 8 --n-embd 128 --n-head 4
//          --block-size 64 --micro-batch-size 2]
//
// Compute mode: the GPT example's model laid out by parallelize() with pp = the ranks, each
// step the real PipelineStage::train (forward and backward of every micro-batch of random
// tokens; no optimizer step). Each rank should have a core of its own (pp <= cores), or the
// figures show contention rather than the schedule. The theory column is the simulation with
// equal F, I and W costs (a real backward costs about twice a forward, so it is a guide).
//
// Stage-cost mode (the default): each compute action sleeps instead of computing —
// F, I and W `cost-ms` each, a whole backward 2 x cost-ms; with v virtual stages each chunk's
// action takes cost-ms / v (the same model cut finer) — while the schedule, the runner and the
// messages (`message-kib` of fp32 per activation and per gradient, over the MPI backend) are
// the real ones. A 2-core machine cannot run 4 computing stages side by side; sleeping stages
// it can, so the figures show the schedule's bubble and the runtime's overhead, not compute.
//
// Bubble (idle fraction) of a step: 1 - (time all ranks spent in compute actions) / (ranks x
// span), span = the earliest begin to the latest end over all ranks (steady clock: one clock
// for all processes of a host). Reported: the median step of --steps, after one warm-up step.
#include "meshtrain/core/communicator.h"
#include "meshtrain/core/cpu_features.h"
#include "meshtrain/core/errors.h"
#include "meshtrain/core/runtime.h"
#include "meshtrain/launch/cli.h"
#include "meshtrain/launch/parallelize.h"
#include "meshtrain/parallel/pipeline_runner.h"

#include "examples/gpt/gpt_model.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace meshtrain;
namespace cli = meshtrain::cli;

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("model name", 0) == 0) {
      return line.substr(line.find(':') + 2);
    }
  }
  return "unknown CPU";
}

struct StepFigures {
  double span_s = 0;
  double idle_fraction = 0;
  std::vector<double> rank_idle; // per rank
};

// The figures of one step from every rank's record (collective over `pp`; the same on every
// rank).
StepFigures step_figures(const PipelineRunRecord& record, Communicator& pp) {
  // [begin, end, busy] of this rank -> every rank's.
  double begin = record.compute.front().begin;
  double end = 0;
  double busy = 0;
  for (const auto& t : record.compute) {
    begin = std::min(begin, t.begin);
    end = std::max(end, t.end);
    busy += t.end - t.begin;
  }
  auto mine = at::tensor({begin, end, busy}, at::kDouble);
  auto all = at::empty({3 * pp.size()}, at::kDouble);
  pp.all_gather(mine, all);
  auto rows = all.view({pp.size(), 3});
  const double first = rows.select(1, 0).min().item<double>();
  const double last = rows.select(1, 1).max().item<double>();
  StepFigures figures;
  figures.span_s = last - first;
  double total_busy = 0;
  for (int r = 0; r < pp.size(); ++r) {
    const double b = rows[r][2].item<double>();
    total_busy += b;
    figures.rank_idle.push_back(1.0 - b / figures.span_s);
  }
  figures.idle_fraction = 1.0 - total_busy / (pp.size() * figures.span_s);
  return figures;
}

// One stage-cost step of `lists` on `pp`; every rank returns the same figures.
StepFigures run_step(const PipelineScheduleSpec& spec, const std::vector<PipelineActions>& lists,
                     Communicator& pp, double cost_s, int64_t message_floats) {
  const auto sleep = [](double seconds) {
    std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  };
  const double chunk_cost = cost_s / spec.virtual_stages;
  PipelineStageFunctions stage;
  stage.forward = [&](int, int, const at::Tensor&) {
    sleep(chunk_cost);
    return at::zeros({message_floats});
  };
  stage.backward = [&](int, int, const at::Tensor&, bool weights) {
    sleep(weights ? 2 * chunk_cost : chunk_cost);
    return at::zeros({message_floats});
  };
  stage.backward_weight = [&](int, int) { sleep(chunk_cost); };
  stage.message_buffer = [&](int, int) { return at::empty({message_floats}); };

  pp.barrier();
  return step_figures(run_pipeline_actions(spec, lists[pp.rank()], pp, stage), pp);
}

// The GPT of compute mode and its batch shape.
struct ComputeModel {
  gpt::GPTConfig config;
  int64_t micro_batch = 2;
};

// A compute step's runner: the GPT laid out for `spec` on the world (pp = world), random
// token micro-batches. Each call runs one step and returns its figures.
std::function<StepFigures()> compute_steps(const PipelineScheduleSpec& spec, const ComputeModel& m,
                                           const CommunicatorPtr& world) {
  ParallelPlan plan;
  plan.dims = ParallelDims{1, 1, 1, spec.ranks};
  plan.pp_schedule = spec.schedule;
  plan.virtual_stages = spec.virtual_stages;
  plan.micro_batch = m.micro_batch;
  plan.global_batch = m.micro_batch * spec.micro_batches;
  const Mesh mesh(plan.dims, world);
  torch::manual_seed(1);
  auto parallel = std::make_shared<Parallelized>(parallelize(
      std::make_shared<gpt::GPTImpl>(m.config), mesh, plan, ParallelizeOptions().training(false)));
  std::vector<torch::Tensor> inputs;
  std::vector<torch::Tensor> targets;
  for (int i = 0; i < spec.micro_batches; ++i) {
    inputs.push_back(torch::randint(m.config.vocab_size(), {m.micro_batch, m.config.block_size()}));
    targets.push_back(
        torch::randint(m.config.vocab_size(), {m.micro_batch, m.config.block_size()}));
  }
  return [parallel, inputs, targets, world] {
    auto& stage = *parallel->pipeline;
    for (auto& p : parallel->model->parameters()) {
      p.mutable_grad() = torch::Tensor(); // no optimizer: each step starts afresh
    }
    const double tokens = static_cast<double>(inputs.size() * inputs[0].numel());
    world->barrier();
    stage.train(inputs, targets, [tokens](const torch::Tensor& loss) { return loss / tokens; });
    return step_figures(stage.last_record(), *world);
  };
}

} // namespace

int main(int argc, char** argv) {
  Runtime runtime(&argc, &argv);
  const auto& world = runtime.world();
  const bool printer = world->rank() == 0;

  cxxopts::Options options("bench_pipeline",
                           "pipeline schedules: step time and bubble, measured and simulated");
  // clang-format off
  options.add_options()
    ("mode", "stage-cost (actions sleep) or compute (the GPT, computing)",
     cli::text("stage-cost"))
    ("schedules", "comma-separated: gpipe, 1f1b, interleaved, zb-h1",
     cli::text("gpipe,1f1b,interleaved,zb-h1"))
    ("micro-batches", "micro-batches per step (m)", cli::text("8"))
    ("virtual-stages", "model chunks per rank of the interleaved schedule (v)", cli::text("2"))
    ("cost-ms", "stage-cost mode: milliseconds each F, I and W action sleeps", cli::text("20"))
    ("message-kib", "fp32 KiB of each activation and gradient message", cli::text("256"))
    ("steps", "timed steps per schedule (the median is reported)", cli::text("3"))
    ("n-layer", "compute mode: GPT blocks", cli::text("8"))
    ("n-embd", "compute mode: GPT width", cli::text("128"))
    ("n-head", "compute mode: attention heads", cli::text("4"))
    ("block-size", "compute mode: sequence length", cli::text("64"))
    ("micro-batch-size", "compute mode: sequences per micro-batch", cli::text("2"))
    ("h,help", "print this help");
  // clang-format on
  std::vector<PipelineSchedule> schedules;
  int micro_batches = 0;
  int virtual_stages = 0;
  double cost_ms = 0;
  int64_t message_kib = 0;
  int steps = 0;
  bool compute = false;
  ComputeModel model;
  try {
    const cli::ParsedFlags flags(options, argc, argv);
    if (flags.help()) {
      if (printer) {
        std::cout << options.help() << "\n";
      }
      return 0;
    }
    std::stringstream list(flags.str("schedules"));
    for (std::string name; std::getline(list, name, ',');) {
      schedules.push_back(
          cli::parse_choice<PipelineSchedule>("schedules", name, parse_pipeline_schedule));
    }
    micro_batches = static_cast<int>(flags.integer("micro-batches", 1, 4096));
    virtual_stages = static_cast<int>(flags.integer("virtual-stages", 1, 64));
    cost_ms = flags.number("cost-ms", 0.1, 10000);
    message_kib = flags.integer("message-kib", 1, 1 << 20);
    steps = static_cast<int>(flags.integer("steps", 1, 1000));
    compute = cli::parse_choice<bool>("mode", flags.str("mode"), [](const std::string& m) {
      MT_CHECK(m == "stage-cost" || m == "compute", "must be stage-cost or compute");
      return m == "compute";
    });
    model.config.n_layer(flags.integer("n-layer", 1, 1024))
        .n_embd(flags.integer("n-embd", 1, 1 << 16))
        .n_head(flags.integer("n-head", 1, 1024))
        .block_size(flags.integer("block-size", 1, 1 << 16));
    model.micro_batch = flags.integer("micro-batch-size", 1, 1 << 16);
  } catch (const cli::UsageError& e) {
    if (printer) {
      std::cerr << "bench_pipeline: " << e.what() << "\n";
    }
    return cli::kExitUsage;
  }

  const int p = world->size();
  if (printer) {
    std::printf("%s\n", describe_cpu().c_str());
  }
  if (printer && compute) {
    const auto& c = model.config;
    std::printf("bench_pipeline: compute mode, pp %d (one process per stage), %d micro-batches "
                "of %lld x %lld tokens, GPT L %lld C %lld H %lld, forward and backward (no "
                "optimizer), median of %d steps; theory: equal F, I, W costs; %s, %u hardware "
                "threads\n\n",
                p, micro_batches, static_cast<long long>(model.micro_batch),
                static_cast<long long>(c.block_size()), static_cast<long long>(c.n_layer()),
                static_cast<long long>(c.n_embd()), static_cast<long long>(c.n_head()), steps,
                cpu_model().c_str(), std::thread::hardware_concurrency());
  } else if (printer) {
    std::printf("bench_pipeline: stage-cost mode, pp %d (one process per stage), %d "
                "micro-batches, F = I = W = %.1f ms (sleep), %lld KiB messages, median of %d "
                "steps; %s, %u hardware threads\n\n",
                p, micro_batches, cost_ms, static_cast<long long>(message_kib), steps,
                cpu_model().c_str(), std::thread::hardware_concurrency());
  }
  if (printer) {
    std::printf("| schedule | step (ms) | theory step (ms) | bubble | theory bubble | "
                "per-rank bubble |\n| --- | ---: | ---: | ---: | ---: | --- |\n");
  }
  int status = 0;
  for (const auto schedule : schedules) {
    PipelineScheduleSpec spec;
    spec.schedule = schedule;
    spec.ranks = p;
    spec.micro_batches = micro_batches;
    spec.virtual_stages = schedule == PipelineSchedule::kInterleaved1F1B ? virtual_stages : 1;
    std::vector<PipelineActions> lists;
    ScheduleSimulation theory;
    try {
      lists = make_pipeline_schedule(spec);
      PipelineCosts costs;
      costs.forward = costs.backward_input = costs.backward_weight = cost_ms / spec.virtual_stages;
      theory = check_pipeline_schedule(spec, lists, costs);
    } catch (const ScheduleError& e) {
      if (printer) {
        std::cerr << "bench_pipeline: " << e.what() << "\n";
      }
      status = cli::kExitUsage;
      continue;
    }
    const int64_t floats = message_kib * 1024 / 4;
    std::function<StepFigures()> step = [&] {
      return run_step(spec, lists, *world, cost_ms / 1000, floats);
    };
    if (compute) {
      try {
        step = compute_steps(spec, model, world);
      } catch (const std::exception& e) { // a layout the model does not divide into
        if (printer) {
          std::cerr << "bench_pipeline: " << spec.describe() << ": " << e.what() << "\n";
        }
        status = cli::kExitUsage;
        continue;
      }
    }
    step(); // warm-up
    std::vector<StepFigures> measured;
    for (int i = 0; i < steps; ++i) {
      measured.push_back(step());
    }
    std::sort(measured.begin(), measured.end(),
              [](const auto& a, const auto& b) { return a.span_s < b.span_s; });
    const auto& median = measured[measured.size() / 2];
    if (printer) {
      std::string per_rank;
      for (const auto idle : median.rank_idle) {
        char cell[16];
        std::snprintf(cell, sizeof cell, "%s%.3f", per_rank.empty() ? "" : " ", idle);
        per_rank += cell;
      }
      // Compute mode has no cost per action to simulate a step time with.
      char theory_step[32] = "-";
      if (!compute) {
        std::snprintf(theory_step, sizeof theory_step, "%.1f", theory.span);
      }
      std::printf("| %s | %.1f | %s | %.3f | %.3f | %s |\n", spec.describe().c_str(),
                  median.span_s * 1000, theory_step, median.idle_fraction, theory.idle_fraction,
                  per_rank.c_str());
    }
  }
  return status;
}
