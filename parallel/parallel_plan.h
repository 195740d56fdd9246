// defines: RecomputeMode, PipelineSchedule (and their parse_/to_string), ModelShape,
// ParallelPlan — the whole layout of a job as one value (DESIGN §2): the mesh dims, sequence
// parallelism, the pipeline schedule, the ZeRO stage, recomputation, the precision, the batch
// split and the bucket size. ParallelPlan::validate is the ONE place a layout is checked:
// programs, meshrun, the planner, checkpoints and the start-up agreement take a validated
// plan and never re-check its fields.
//
// Pure C++ (no tensors, no MPI), so meshrun checks a layout before launch with this code.
//
//   ParallelPlan plan;
//   plan.dims.tp = 2;
//   plan.sequence_parallel = true;
//   plan.global_batch = 16;
//   const ParallelPlan resolved = plan.validate(world_size, model->shape());
//   // resolved.dims.dp is inferred (world / (cp tp pp)), resolved.micro_batch is B / dp when 0
#pragma once

#include "meshtrain/core/mesh_grid.h"
#include "meshtrain/parallel/precision.h"

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace meshtrain {

// Activation recomputation (memory/recompute.h; Korthikanti et al. 2022): none; selective
// (the attention core of every block); full (every block keeps only its input).
enum class RecomputeMode { kNone, kSelective, kFull };
// "none", "selective" or "full"; throws LayoutError naming the value otherwise.
RecomputeMode parse_recompute_mode(const std::string& text);
const char* to_string(RecomputeMode mode);

// Pipeline schedules (DESIGN §3 "Pipeline"; parallel/pipeline_schedule.h).
enum class PipelineSchedule { kGPipe, k1F1B, kInterleaved1F1B, kZeroBubbleH1 };
// "gpipe", "1f1b", "interleaved" or "zb-h1"; throws LayoutError naming the value otherwise.
PipelineSchedule parse_pipeline_schedule(const std::string& text);
const char* to_string(PipelineSchedule schedule);

// What a layout must fit of the model (any family): ParallelModel::shape() returns it.
struct ModelShape {
  int64_t n_layer = 0;   // blocks (pipeline stages cut between them)
  int64_t n_head = 0;    // attention heads (split over tp)
  int64_t n_kv_head = 0; // key/value heads of grouped-query attention; 0: n_head
  int64_t seq_len = 0;   // T of a training sample (split over tp under sequence parallelism)
  int64_t n_embd = 0;    // C, the width of the residual stream (pipeline messages [b, T, C])
  // Dropout on the attention probabilities: context parallelism (ring attention) has none.
  double attention_dropout = 0.0;
};

struct ParallelPlan {
  // Mesh dims; one may be -1 (inferred from the world size). Rank order: core/mesh_grid.h.
  // cp > 1: context parallelism (parallel/context_parallel.h): each cp rank holds 2 of the
  // 2 cp chunks of every sequence; attention is ring attention over the cp group; gradients
  // are reduced (and ZeRO shards) over the dp x cp ranks ("dp_cp").
  ParallelDims dims;
  // Activations between the tensor-parallel regions are sequence shards [b, T/tp, C].
  bool sequence_parallel = false;
  // Pipeline (pp > 1; parallel/pipeline_stage.h): schedule, virtual stages per rank, and an
  // explicit per-stage block count (empty: n_layer / (pp x virtual_stages) each). A step's
  // micro-steps are the schedule's micro-batches.
  PipelineSchedule pp_schedule = PipelineSchedule::k1F1B;
  int virtual_stages = 1;
  std::vector<int64_t> pp_layout;
  // 0: replicated state; 1: optimizer state sharded over dp; 2: also the gradients; 3: also
  // the parameters (parallel/parameter_shards.h: gathered per block, freed after use).
  int zero_stage = 0;
  // ZeRO-3 only. Free a block's gathered parameters after its forward and gather them again
  // for its backward (false: keep them until the backward; one gather per micro-batch fewer,
  // every block's parameters alive at the end of forward). And how many blocks ahead of the
  // running one are gathered (0: none; each one more costs a block's parameters in memory).
  bool reshard_after_forward = true;
  int prefetch = 1;
  RecomputeMode recompute = RecomputeMode::kNone;
  Precision precision = Precision::kFp32;
  // Sequences per optimizer step over all dp ranks (B) and per forward on one dp rank (b;
  // 0: B / dp, no accumulation). B = 0: not known (meshrun); the batch is then not checked.
  int64_t global_batch = 0;
  int64_t micro_batch = 0;
  // Upper bound of a gradient bucket (parallel/bucket_layout.h).
  int64_t bucket_bytes = int64_t{25} * 1024 * 1024;

  // Checks the layout against `world_size` ranks (and the model's shape) and returns it
  // resolved: the inferred dim filled in and, when the global batch is known, micro_batch
  // set. Throws LayoutError naming the value and what is allowed. The overload without a
  // model checks what can be known before launch (meshrun).
  ParallelPlan validate(int world_size, const ModelShape& model) const;
  ParallelPlan validate(int world_size) const;

  // Of a validated plan: micro-steps per optimizer step (B / (b x dp); the cp ranks of a
  // group take their chunks of the same sequences).
  int64_t accumulation_steps() const;
  // Of a validated plan: the blocks of each of the pp x virtual_stages stages, in stage
  // order (stage s on pp rank s % pp). Throws LayoutError when n_layer does not split so.
  std::vector<int64_t> stage_layers(int64_t n_layer) const;
  // One line for banners and messages: "dp 2 x tp 2, ZeRO 1, sequence parallel, recompute
  // none, fp32, batch 16 (micro-batch 4 x 2 micro-steps)".
  std::string describe() const;
  // Every field as (name, value) text, in a fixed order: the start-up agreement compares
  // them across ranks and checkpoints record them.
  std::vector<std::pair<std::string, std::string>> fields() const;
};

} // namespace meshtrain
