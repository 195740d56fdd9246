// defines: main of meshtrain-plan — per-rank memory of a GPT in a layout (memory/planner.h),
// or, given a world size and a budget, the layouts that fit, fastest first.
//
//   meshtrain-plan --dp 2 --zero 1                       one layout: the table of bytes
//   meshtrain-plan --world 4 --budget 64MiB              every layout of 4 ranks that fits
//   meshtrain-plan --cp 4 --block-size 1024              one context-parallel layout
//   meshtrain-plan --pp 4 --micro-batch-size 2 --pp-schedule zb-h1 [--timeline-json F]
//                                                        a pipeline: memory per stage and the
//                                                        schedule's timeline
//   meshtrain-plan --n-layer 12 --n-embd 768 --n-head 12 --vocab-size 50257
//                  --block-size 1024 --batch-size 32 --world 8 --budget 40GiB --precision bf16
//
// Model and layout flags are train_gpt's (launch/cli.h), --dp included. No MPI, no tensors:
// it runs anywhere. Exit codes: 0 done, 1 no layout fits the budget, 2 bad command line or
// layout.
#include "meshtrain/core/file_io.h"
#include "meshtrain/launch/cli.h"
#include "meshtrain/memory/planner.h"
#include "meshtrain/parallel/pipeline_schedule.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

namespace {

namespace cli = meshtrain::cli;
using meshtrain::MemoryEstimate;
using meshtrain::ParallelPlan;
using meshtrain::PlanModel;

std::string mib(int64_t bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.2f", static_cast<double>(bytes) / (1024.0 * 1024.0));
  return text;
}

nlohmann::json to_json(const MemoryEstimate& m) {
  return {{"parameters", m.parameters},
          {"gradients", m.gradients},
          {"optimizer", m.optimizer},
          {"data", m.data},
          {"state", m.state},
          {"saved_layers", m.saved_layers},
          {"saved_head", m.saved_head},
          {"transient", m.transient},
          {"gathered", m.gathered},
          {"held_gradients", m.held_gradients},
          {"messages", m.messages},
          {"activation_peak", m.activation_peak},
          {"startup", m.startup},
          {"peak", m.peak},
          {"parameters_per_rank", m.parameters_per_rank}};
}

// A pipeline layout's estimate: the worst stage's fields at the top level (what a caller that
// knows no pipelines reads), each pp rank's under "stages", and the schedule's cost.
nlohmann::json pipeline_json(const std::vector<MemoryEstimate>& stages, const MemoryEstimate& worst,
                             const meshtrain::PlanCost& cost) {
  auto out = to_json(worst);
  out["pp_rank"] = worst.pp_rank;
  out["stages"] = nlohmann::json::array();
  for (const auto& m : stages) {
    auto stage = to_json(m);
    stage["pp_rank"] = m.pp_rank;
    stage["blocks"] = m.blocks;
    stage["holds_outside_blocks"] = m.holds_outside_blocks;
    stage["micro_batches_in_flight"] = m.micro_batches_in_flight;
    out["stages"].push_back(stage);
  }
  out["bubble"] = cost.bubble;
  out["p2p_bytes"] = cost.p2p_bytes;
  out["step_s"] = cost.step_s;
  return out;
}

void print_estimate(const PlanModel& model, const ParallelPlan& layout) {
  const auto m = meshtrain::estimate_memory(model, layout);
  const auto cost = meshtrain::estimate_cost(model, layout);
  std::cout << "GPT L=" << model.n_layer << " C=" << model.n_embd << " heads=" << model.n_head
            << " T=" << model.block_size << " V=" << model.vocab_size << "; "
            << meshtrain::validate_plan(model, layout).describe() << "\n\n"
            << "per rank                      MiB\n"
            << "  parameters           " << mib(m.parameters) << "   (" << m.parameters_per_rank
            << " elements" << (layout.zero_stage == 3 ? "; ZeRO-3: this rank's shards" : "")
            << ")\n"
            << "  gradients            " << mib(m.gradients) << "   (fp32 reducer buckets)\n"
            << "  optimizer state      " << mib(m.optimizer) << "   (fp32 master + AdamW moments)\n"
            << "  token batches        " << mib(m.data) << "\n"
            << "  = between steps      " << mib(m.state) << "\n"
            << "  activations, peak    " << mib(m.activation_peak) << "   (blocks "
            << mib(m.saved_layers) << ", head " << mib(m.saved_head) << ", transient "
            << mib(m.transient)
            << (m.gathered > 0 ? ", gathered parameters " + mib(m.gathered) : "") << ")\n"
            << "  start-up             " << mib(m.startup)
            << "   (values of this rank's part, buffers, ZeRO-3 units one at a time)\n"
            << "  = peak               " << mib(m.peak)
            << "   (the larger of state + activations and start-up)\n\n"
            << "estimated step: " << cost.step_s * 1e3 << " ms (compute " << cost.compute_s * 1e3
            << " ms, communication " << cost.comm_s * 1e3 << " ms, " << mib(cost.comm_bytes)
            << " MiB per rank)\n";
}

int print_fitting(const PlanModel& model, int64_t world, const ParallelPlan& fixed, int64_t budget,
                  int64_t top) {
  const auto ranked = meshtrain::plan_layouts(model, world, fixed, budget);
  if (ranked.empty()) {
    std::cout << "meshtrain-plan: no layout of " << world << " ranks fits " << mib(budget)
              << " MiB per rank (try recompute, ZeRO, more ranks or a smaller micro-batch)\n";
    return 1;
  }
  std::cout << ranked.size() << " layouts of " << world << " ranks fit " << mib(budget)
            << " MiB per rank; the " << std::min<int64_t>(top, ranked.size())
            << " fastest by the cost model:\n\n"
            << "| # | dp | cp | tp | pp | ZeRO | seq par | recompute | micro-batch | peak MiB | "
               "state MiB "
               "| activations MiB | est. step ms | comm MiB |\n"
            << "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  for (int64_t i = 0; i < static_cast<int64_t>(ranked.size()) && i < top; ++i) {
    const auto& r = ranked[i];
    const auto& l = r.layout;
    char ms[32];
    std::snprintf(ms, sizeof ms, "%.1f", r.cost.step_s * 1e3);
    // A pipeline: "2 1f1b", "2 interleaved v2"; its memory columns are the largest stage's.
    std::string pp = std::to_string(l.dims.pp);
    if (l.dims.pp > 1) {
      pp += std::string(" ") + meshtrain::to_string(l.pp_schedule) +
            (l.virtual_stages > 1 ? " v" + std::to_string(l.virtual_stages) : "");
    }
    std::cout << "| " << i + 1 << " | " << l.dims.dp << " | " << l.dims.cp << " | " << l.dims.tp
              << " | " << pp << " | " << l.zero_stage << " | "
              << (l.sequence_parallel ? "yes" : "no") << " | " << meshtrain::to_string(l.recompute)
              << " | " << l.micro_batch << " | " << mib(r.memory.peak) << " | "
              << mib(r.memory.state) << " | " << mib(r.memory.activation_peak) << " | " << ms
              << " | " << mib(r.cost.comm_bytes) << " |\n";
  }
  return 0;
}

// A pipeline layout: the memory of each pp rank (memory/planner.h: its blocks, the parameters
// outside the blocks on the first and the last rank, the micro-batches it holds at once), then
// the schedule's simulated timeline (unit costs: F = I = W = 1, a whole backward 2) with its
// bubble and in-flight micro-batches per rank.
int print_pipeline(const PlanModel& model, const ParallelPlan& layout, bool json,
                   const std::string& json_path) {
  const auto plan = meshtrain::validate_plan(model, layout);
  const auto stages = meshtrain::estimate_memory_per_stage(model, plan);
  const auto worst = meshtrain::estimate_memory(model, plan);
  const auto cost = meshtrain::estimate_cost(model, plan);
  if (json) {
    std::cout << pipeline_json(stages, worst, cost).dump() << "\n";
    return 0;
  }
  meshtrain::PipelineScheduleSpec spec{plan.pp_schedule, plan.dims.pp,
                                       static_cast<int>(plan.accumulation_steps()),
                                       plan.virtual_stages};
  const auto sim =
      meshtrain::check_pipeline_schedule(spec, meshtrain::make_pipeline_schedule(spec));
  const auto layers = plan.stage_layers(model.n_layer);
  std::cout << "GPT L=" << model.n_layer << " C=" << model.n_embd << " heads=" << model.n_head
            << " T=" << model.block_size << " V=" << model.vocab_size << "; " << plan.describe()
            << "\nstages (blocks):";
  for (size_t s = 0; s < layers.size(); ++s) {
    std::cout << " s" << s << "=" << layers[s] << " (rank " << spec.rank_of(static_cast<int>(s))
              << ")";
  }
  std::cout << "\n\nmemory per pp rank, MiB (outside = wte, wpe, ln_f; in flight = the most "
               "chunk-micro-batches held at once):\n\n"
            << "| pp rank | blocks | outside | in flight | parameters | gradients | optimizer | "
               "batches | state | saved | transient | held grads | messages | activations | "
               "start-up | peak |\n"
            << "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  for (const auto& m : stages) {
    std::cout << "| " << m.pp_rank << " | " << m.blocks << " | "
              << (m.holds_outside_blocks ? "yes" : "no") << " | " << m.micro_batches_in_flight
              << " | " << mib(m.parameters) << " | " << mib(m.gradients) << " | "
              << mib(m.optimizer) << " | " << mib(m.data) << " | " << mib(m.state) << " | "
              << mib(m.saved_layers + m.saved_head) << " | " << mib(m.transient) << " | "
              << mib(m.held_gradients) << " | " << mib(m.messages) << " | "
              << mib(m.activation_peak) << " | " << mib(m.startup) << " | " << mib(m.peak)
              << " |\n";
  }
  std::cout << "\nlargest: pp rank " << worst.pp_rank << ", " << mib(worst.peak)
            << " MiB; estimated step: " << cost.step_s * 1e3 << " ms (compute "
            << cost.compute_s * 1e3 << " ms with the bubble " << cost.bubble << ", communication "
            << cost.comm_s * 1e3 << " ms, " << mib(cost.comm_bytes) << " MiB on the busiest rank, "
            << mib(cost.p2p_bytes) << " MiB of it point to point)\n"
            << "\ntimeline (one column = one chunk's forward; B = I + W takes two; a lower-case "
               "letter is a later virtual stage):\n"
            << meshtrain::render_timeline(spec, sim);
  if (!json_path.empty()) {
    meshtrain::write_file_atomic(json_path, meshtrain::timeline_json(spec, sim));
    std::cout << "timeline: " << json_path << " (python3 scripts/plot_schedule.py " << json_path
              << " OUT.png draws it)\n";
  }
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  cxxopts::Options options("meshtrain-plan", "Per-rank memory of a GPT layout, and the layouts "
                                             "that fit a memory budget (docs/memory.md)");
  cli::add_model_flags(options);
  cli::add_layout_flags(options);
  // clang-format off
  options.add_options("parallelism")
    ("dp", "data-parallel ranks (the one layout's)", cli::text("1"));
  options.add_options("search")
    ("world", "plan for this many ranks: list the layouts that fit --budget", cli::text("0"))
    ("budget", "memory per rank, e.g. 512MiB, 2GiB, 800MB", cli::text(""))
    ("top", "layouts listed", cli::text("15"))
    ("json", "print the one layout's estimate as JSON (bytes; with --pp the largest stage's, "
     "and every stage's under \"stages\")", cli::boolean())
    ("timeline-json", "with --pp: also write the schedule's timeline as JSON to this file",
     cli::text(""))
    ("h,help", "print this help");
  // clang-format on
  try {
    const cli::ParsedFlags flags(options, argc, argv);
    if (flags.help()) {
      std::cout << options.help() << "\n";
      return 0;
    }
    const PlanModel model = cli::read_model_flags(flags);
    ParallelPlan layout = cli::read_layout_flags(flags);
    layout.dims.dp = static_cast<int>(flags.integer("dp", 1, 1 << 20));
    const int64_t world = flags.integer("world", 0, 1 << 20);
    const std::string budget = flags.str("budget");
    if (layout.dims.pp > 1) {
      if (world != 0 || !budget.empty()) {
        throw cli::UsageError("--world/--budget try every pp from 1 to the world size; drop "
                              "--pp " +
                              std::to_string(layout.dims.pp) + " (or plan that one layout alone)");
      }
      return print_pipeline(model, layout, flags.flag("json"), flags.str("timeline-json"));
    }
    if (world != 0 || !budget.empty()) {
      if (world < 1 || budget.empty()) {
        throw cli::UsageError("--world N and --budget SIZE go together (world " +
                              std::to_string(world) + ", budget '" + budget + "')");
      }
      const int64_t top = flags.integer("top", 1, 1 << 20);
      return print_fitting(model, world, layout, cli::parse_size("budget", budget), top);
    }
    if (flags.flag("json")) {
      std::cout << to_json(meshtrain::estimate_memory(model, layout)).dump() << "\n";
    } else {
      print_estimate(model, layout);
    }
    return 0;
  } catch (const cli::UsageError& e) {
    std::cerr << "meshtrain-plan: " << e.what() << "\n";
  } catch (const meshtrain::LayoutError& e) {
    std::cerr << "meshtrain-plan: " << e.what() << "\n";
  } catch (const meshtrain::ScheduleError& e) {
    std::cerr << "meshtrain-plan: " << e.what() << "\n";
  }
  return cli::kExitUsage;
}
