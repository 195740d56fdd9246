// defines: PlanModel, validate_plan, MemoryEstimate, estimate_memory, estimate_memory_per_stage,
// PlanCost, estimate_cost, RankedLayout, plan_layouts — the memory planner: per-rank bytes of a
// GPT (examples/gpt) in a layout (a ParallelPlan), from formulas that count what this
// implementation keeps (docs/memory.md#memory-planner), and the layouts that fit a budget.
//
// Under pipeline parallelism (pp > 1) the ranks of a pp group hold different things, so the
// estimate is per pp rank ("stage"; with virtual stages rank r holds stages r, r + pp, ...):
// its blocks' state, the parameters outside the blocks on the first and the last rank, and
// the micro-batches in flight as the schedule's simulation (parallel/pipeline_schedule.h)
// runs this rank's list. The one-estimate overload returns the worst stage.
//
// Pure arithmetic (no tensors, no communication). The activation terms follow Korthikanti
// et al. 2022 ("Reducing activation recomputation in large transformer models"), adjusted
// to what our layers save for backward: e.g. the linear layers after a sequence-parallel
// all-gather keep the gathered [b, T, C] input (Megatron keeps the shard and gathers again),
// batched matmuls keep contiguous copies of q, k, v, and dropout keeps a mask in the
// activation dtype. Checked against memory/alloc_tracker.h's measured peaks:
// tests/test_planner.cpp and examples/benchmarks/bench_memory_plan.py.
#pragma once

#include "meshtrain/parallel/parallel_plan.h"

#include <cstdint>
#include <string>
#include <vector>

namespace meshtrain {

// The GPT's shape (examples/gpt/gpt_model.h's GPTConfig, the fields memory depends on).
struct PlanModel {
  int64_t vocab_size = 256;
  int64_t block_size = 64;
  int64_t n_layer = 4;
  int64_t n_head = 4;
  int64_t n_embd = 128;
  double dropout = 0.0;
  int64_t pad_vocab_to_multiple_of = 64;
};

// The plan's model shape of `model` (what ParallelPlan::validate checks).
ModelShape shape_of(const PlanModel& model);

// Checks the model's own sizes (n_head | n_embd, dropout in [0, 1), ...) and the layout
// against it with ParallelPlan::validate, on the world the plan's dims make (every dim must be
// given: dp -1 cannot be inferred here). Returns the resolved plan (micro_batch set). Throws
// LayoutError naming the value.
ParallelPlan validate_plan(const PlanModel& model, const ParallelPlan& plan);

// Per-rank bytes. `state` = parameters + gradients + optimizer + data: what lives between
// steps. `activation_peak`: how far a step's forward + backward rises above that (what the
// Trainer reports as mem_activation_peak_bytes). `startup`: the most held before the first
// step. `peak` = the larger of state + activation_peak and startup (the Trainer's
// mem_tensor_peak_bytes, counted from process start).
struct MemoryEstimate {
  int64_t parameters = 0; // ZeRO-3: this rank's shards
  int64_t gradients = 0;  // the reducer's persistent buffer (fp32)
  int64_t optimizer = 0;  // fp32 master weights + AdamW moments of the owned shard
  int64_t data = 0;       // the step's token batches (int64 inputs and targets)
  int64_t state = 0;
  // Parts of activation_peak: saved for backward at the end of forward (layers, then the
  // embedding / final LayerNorm / loss head), and the largest transient on top of them.
  int64_t saved_layers = 0;
  int64_t saved_head = 0;
  int64_t transient = 0;
  int64_t gathered = 0; // ZeRO-3: parameters gathered at the activation peak
  // Pipeline only (0 otherwise), at the activation peak: autograd's gradient of every
  // parameter of the stage, kept from its first backward to the end of the schedule (one
  // no_sync scope; the reducer's buckets hold the sums), and the message buffers alive (a
  // received output gradient, an input gradient being sent).
  int64_t held_gradients = 0;
  int64_t messages = 0;
  // = saved_layers + saved_head + transient + gathered + held_gradients + messages.
  int64_t activation_peak = 0;
  // The most held during start-up (a declared model given its values, then the reducer's
  // buffers, ZeRO-3's units cut one at a time, the optimizer's state; planner.cpp's
  // startup_peak): at most the state plus one block, so rarely the peak.
  int64_t startup = 0;
  // = max(state + activation_peak, startup). The optimizer step adds nothing on CPU (AdamW
  // fused in place).
  int64_t peak = 0;
  int64_t parameters_per_rank = 0; // element count
  // This estimate's pp rank, the blocks it holds (all its stages; all L without a pipeline),
  // whether it holds the parameters outside the blocks (wte, wpe, ln_f: under a pipeline the
  // first and the last stage, both), and the most chunk-micro-batches it holds at once (the
  // schedule's simulation; 1 without a pipeline).
  int pp_rank = 0;
  int64_t blocks = 0;
  bool holds_outside_blocks = true;
  int micro_batches_in_flight = 1;
};

// The estimate of one rank; under pipeline parallelism the worst pp rank's (the largest peak).
MemoryEstimate estimate_memory(const PlanModel& model, const ParallelPlan& plan);
// The estimate of pp rank `pp_rank` (0 .. pp-1; 0 without a pipeline). Throws LayoutError
// naming the value when it is out of range.
MemoryEstimate estimate_memory(const PlanModel& model, const ParallelPlan& plan, int pp_rank);
// One estimate per pp rank, in rank order (one element without a pipeline).
std::vector<MemoryEstimate> estimate_memory_per_stage(const PlanModel& model,
                                                      const ParallelPlan& plan);

// A simple cost model to order layouts: matmul FLOPs at a sustained rate plus the bytes each
// rank moves, at a bus bandwidth (ring algorithms; overlap ignored). Seconds per step.
struct PlanHardware {
  double flops_per_s = 5e10; // per rank
  double bytes_per_s = 5e9;  // bus bandwidth per rank
};
// Under pipeline parallelism: compute is the slowest stage's, stretched by the schedule's
// simulated bubble (the idle fraction of its timeline); communication the busiest rank's,
// its point-to-point activations and gradients included.
struct PlanCost {
  double compute_s = 0;
  double comm_s = 0;
  double step_s = 0;
  int64_t comm_bytes = 0; // per rank and step (pipeline: the busiest rank's)
  double bubble = 0;      // pipeline: the simulated idle fraction (0 without)
  int64_t p2p_bytes = 0;  // pipeline: activations and gradients one rank sends (busiest)
};
PlanCost estimate_cost(const PlanModel& model, const ParallelPlan& plan,
                       const PlanHardware& hardware = {});

struct RankedLayout {
  ParallelPlan layout; // validated
  MemoryEstimate memory;
  PlanCost cost;
};
// Every layout of `world` ranks (dp x cp x tp, ZeRO 0-3, sequence parallel, recompute modes,
// micro-batch sizes dividing B / dp) with the precision and global batch of `fixed` whose estimated
// peak fits `budget_bytes`, fastest first (ties: smaller peak). Also the pipeline layouts
// (pp > 1 dividing the world and at most n_layer, dp x tp x pp; ZeRO 0-2, no cp; the schedules
// gpipe, 1f1b, zb-h1 and interleaved with 2 virtual stages where the blocks split so), whose
// largest stage must fit.
std::vector<RankedLayout> plan_layouts(const PlanModel& model, int64_t world,
                                       const ParallelPlan& fixed, int64_t budget_bytes,
                                       const PlanHardware& hardware = {});

} // namespace meshtrain
