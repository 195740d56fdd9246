// defines: ParallelPlan::validate and the plan's enums (see parallel_plan.h). Every layout
// message of the project comes from here (or from MeshGrid::create, which validate calls).
#include "meshtrain/parallel/parallel_plan.h"

#include "meshtrain/core/text.h"

#include <algorithm>

namespace meshtrain {
namespace {

[[noreturn]] void refuse(const std::string& message) {
  throw LayoutError(message);
}

void check_batch(ParallelPlan& plan) {
  const int64_t dp = plan.dims.dp;
  const int64_t b = plan.micro_batch;
  if (plan.global_batch < 0 || b < 0) {
    refuse(cat("the global batch (", plan.global_batch, ") and the micro-batch (", b,
               ") must be >= 0"));
  }
  if (plan.global_batch == 0) {
    return; // not known yet (meshrun): nothing to check
  }
  if (b == 0) {
    if (plan.global_batch % dp != 0) {
      refuse(cat("the global batch (", plan.global_batch, " sequences) is not divisible by dp (",
                 dp, "): each dp rank takes B / dp sequences; use a multiple of ", dp));
    }
    plan.micro_batch = plan.global_batch / dp;
    return;
  }
  if (plan.global_batch % (b * dp) != 0) {
    refuse(cat("the global batch (", plan.global_batch,
               " sequences) is not divisible by micro-batch (", b, ") x dp (", dp, ") = ", b * dp,
               ": accumulation = B / (b x dp) must be a whole number of "
               "micro-steps; e.g. global batch ",
               std::max<int64_t>(1, plan.global_batch / (b * dp)) * b * dp));
  }
}

void check_pipeline(const ParallelPlan& plan) {
  const auto& d = plan.dims;
  const bool interleaved = plan.pp_schedule == PipelineSchedule::kInterleaved1F1B;
  if (plan.virtual_stages > 1 && !interleaved) {
    refuse(cat(plan.virtual_stages, " virtual stages need the interleaved schedule (got ",
               to_string(plan.pp_schedule), ")"));
  }
  if (plan.zero_stage == 3) {
    refuse(cat("ZeRO-3 with pipeline parallelism (pp ", d.pp,
               ") is not available yet; use ZeRO 0, 1 or 2 with pp, or pp 1"));
  }
  if (d.cp > 1) {
    refuse(cat("context parallelism (cp ", d.cp, ") with pipeline parallelism (pp ", d.pp,
               ") is not available yet; use one of them"));
  }
  const auto stages = static_cast<size_t>(d.pp) * plan.virtual_stages;
  if (!plan.pp_layout.empty() && plan.pp_layout.size() != stages) {
    refuse(cat("the pipeline layout gives ", plan.pp_layout.size(), " stages; pp (", d.pp,
               ") x virtual stages (", plan.virtual_stages, ") = ", stages, " are needed"));
  }
  for (const auto n : plan.pp_layout) {
    if (n < 1) {
      refuse(cat("every pipeline stage needs >= 1 block; the layout has ", n));
    }
  }
  if (plan.pp_schedule == PipelineSchedule::kZeroBubbleH1 &&
      plan.recompute == RecomputeMode::kFull) {
    // A recomputed block's backward runs a whole backward of its forward: ZB-H1's input
    // gradient would already accumulate the block's weight gradients, and W add them again.
    refuse("zb-h1 with full recomputation is not available yet (its input-gradient pass would "
           "also compute the recomputed blocks' weight gradients); use 1f1b, or recompute "
           "selective or none");
  }
  if (plan.global_batch > 0 && interleaved && plan.virtual_stages > 1 &&
      plan.accumulation_steps() % d.pp != 0) {
    refuse(cat("interleaved 1F1B runs the micro-batches in groups of pp (", d.pp, "); ",
               plan.accumulation_steps(), " micro-batches per step is not a multiple of ", d.pp,
               ": choose the batch and micro-batch so that B / (b x dp) is"));
  }
}

} // namespace

std::vector<int64_t> ParallelPlan::stage_layers(int64_t n_layer) const {
  const int64_t stages = static_cast<int64_t>(dims.pp) * virtual_stages;
  if (!pp_layout.empty()) {
    int64_t sum = 0;
    for (const auto n : pp_layout) {
      sum += n;
    }
    if (sum != n_layer) {
      refuse(cat("the pipeline layout's blocks add up to ", sum, "; the model has ", n_layer));
    }
    return pp_layout;
  }
  if (n_layer % stages != 0) {
    refuse(cat(n_layer, " blocks do not split evenly into pp (", dims.pp, ") x virtual stages (",
               virtual_stages, ") = ", stages,
               " stages; give the blocks of each stage (--pp-layout, ", stages,
               " numbers adding up to ", n_layer, ") or choose pp x virtual stages dividing ",
               n_layer));
  }
  return std::vector<int64_t>(stages, n_layer / stages);
}

RecomputeMode parse_recompute_mode(const std::string& text) {
  if (text == "none") {
    return RecomputeMode::kNone;
  }
  if (text == "selective") {
    return RecomputeMode::kSelective;
  }
  if (text == "full") {
    return RecomputeMode::kFull;
  }
  refuse("recompute mode '" + text + "': must be none, selective or full");
}

const char* to_string(RecomputeMode mode) {
  switch (mode) {
  case RecomputeMode::kNone:
    return "none";
  case RecomputeMode::kSelective:
    return "selective";
  case RecomputeMode::kFull:
    return "full";
  }
  return "?";
}

PipelineSchedule parse_pipeline_schedule(const std::string& text) {
  if (text == "gpipe") {
    return PipelineSchedule::kGPipe;
  }
  if (text == "1f1b") {
    return PipelineSchedule::k1F1B;
  }
  if (text == "interleaved") {
    return PipelineSchedule::kInterleaved1F1B;
  }
  if (text == "zb-h1") {
    return PipelineSchedule::kZeroBubbleH1;
  }
  refuse("pipeline schedule '" + text + "': must be gpipe, 1f1b, interleaved or zb-h1");
}

const char* to_string(PipelineSchedule schedule) {
  switch (schedule) {
  case PipelineSchedule::kGPipe:
    return "gpipe";
  case PipelineSchedule::k1F1B:
    return "1f1b";
  case PipelineSchedule::kInterleaved1F1B:
    return "interleaved";
  case PipelineSchedule::kZeroBubbleH1:
    return "zb-h1";
  }
  return "?";
}

ParallelPlan ParallelPlan::validate(int world_size) const {
  ParallelPlan plan = *this;
  plan.dims = MeshGrid::create(dims, world_size).dims();
  const auto& d = plan.dims;
  if (plan.virtual_stages < 1) {
    refuse(cat("virtual stages (", plan.virtual_stages, ") must be >= 1"));
  }
  if (d.pp == 1 && (plan.virtual_stages != 1 || !plan.pp_layout.empty())) {
    refuse("virtual stages and a pipeline layout need pp > 1");
  }
  if (plan.zero_stage < 0 || plan.zero_stage > 3) {
    refuse(cat("ZeRO stage (", plan.zero_stage, ") must be 0, 1, 2 or 3"));
  }
  if (plan.prefetch < 0 || plan.prefetch > 64) {
    refuse(cat("the ZeRO-3 prefetch depth (", plan.prefetch, " blocks) must be in 0..64"));
  }
  if (plan.zero_stage != 3 && (!plan.reshard_after_forward || plan.prefetch != 1)) {
    refuse(cat("reshard-after-forward and the prefetch depth are ZeRO-3 settings; got ZeRO ",
               plan.zero_stage, " (use --zero 3, or leave them at their defaults)"));
  }
  if (plan.sequence_parallel && d.tp == 1) {
    refuse("sequence parallelism needs tp > 1 (it splits the sequence over the tp ranks); "
           "got tp 1");
  }
  if (plan.bucket_bytes < 1) {
    refuse(cat("the bucket size (", plan.bucket_bytes, " bytes) must be >= 1"));
  }
  check_batch(plan);
  if (d.pp > 1) {
    check_pipeline(plan);
  }
  return plan;
}

ParallelPlan ParallelPlan::validate(int world_size, const ModelShape& model) const {
  ParallelPlan plan = validate(world_size);
  const int64_t tp = plan.dims.tp;
  if (model.n_layer < 1 || model.n_head < 1 || model.n_kv_head < 0 || model.seq_len < 1) {
    refuse(cat("the model's shape must have n_layer (", model.n_layer, "), n_head (", model.n_head,
               ") and seq_len (", model.seq_len, ") >= 1 and n_kv_head (", model.n_kv_head,
               ") >= 0"));
  }
  if (model.n_head % tp != 0) {
    refuse(cat("tp (", tp, ") must divide n_head (", model.n_head,
               "): each tp rank takes whole heads; with ", model.n_head, " heads tp may be ",
               divisors_text(model.n_head)));
  }
  const int64_t kv = model.n_kv_head == 0 ? model.n_head : model.n_kv_head;
  if (kv % tp != 0) {
    refuse(cat("tp (", tp, ") must divide n_kv_head (", kv,
               "): each tp rank takes whole key/value heads; with ", kv,
               " key/value heads tp may be ", divisors_text(kv)));
  }
  const int64_t cp = plan.dims.cp;
  if (cp > 1 && model.seq_len % (2 * cp) != 0) {
    refuse(cat("context parallelism cp (", cp, ") needs the sequence length (", model.seq_len,
               ") divisible by 2 x cp = ", 2 * cp,
               ": the sequence is cut into 2 x cp chunks, 2 per cp rank; cp may be ",
               model.seq_len % 2 == 0 ? divisors_text(model.seq_len / 2) : std::string("1"),
               model.seq_len % 2 == 0 ? "" : " (the sequence length is odd)"));
  }
  if (plan.sequence_parallel && (model.seq_len / cp) % tp != 0) {
    refuse(cat("with sequence parallelism tp (", tp, ") must divide the sequence length (",
               model.seq_len, cp > 1 ? cat(") / cp (", cp, ") = ", model.seq_len / cp) : ")",
               "; tp may be ", divisors_text(model.seq_len / cp)));
  }
  if (plan.dims.pp > 1) {
    plan.stage_layers(model.n_layer); // refuses a split that does not fit
    if (model.n_embd < 1) {
      refuse(cat("pipeline parallelism needs the model's width (ModelShape::n_embd, got ",
                 model.n_embd, "): the stages exchange [b, T, n_embd] activations"));
    }
  }
  if (cp > 1 && model.attention_dropout > 0.0) {
    refuse(cat("context parallelism (cp ", cp,
               ") computes attention without dropout; the model "
               "has attention dropout ",
               model.attention_dropout, ": use dropout 0 or cp 1"));
  }
  return plan;
}

int64_t ParallelPlan::accumulation_steps() const {
  const int64_t per_step = micro_batch * dims.dp;
  return per_step > 0 ? global_batch / per_step : 1;
}

std::string ParallelPlan::describe() const {
  std::string out = describe_dims(dims);
  if (dims.pp > 1) {
    out += cat(" (", to_string(pp_schedule),
               virtual_stages > 1 ? cat(", ", virtual_stages, " virtual stages") : "", ")");
  }
  out += ", ZeRO " + std::to_string(zero_stage);
  if (zero_stage == 3) {
    out += cat(" (prefetch ", prefetch, reshard_after_forward ? ", reshard after forward)" : ")");
  }
  if (sequence_parallel) {
    out += ", sequence parallel";
  }
  out += std::string(", recompute ") + to_string(recompute) + ", " + to_string(precision);
  if (global_batch > 0) {
    out += cat(", batch ", global_batch, " (micro-batch ", micro_batch, " x ", accumulation_steps(),
               " micro-step", accumulation_steps() == 1 ? "" : "s", " x dp ", dims.dp, ")");
  }
  return out;
}

std::vector<std::pair<std::string, std::string>> ParallelPlan::fields() const {
  std::string layout;
  for (const auto n : pp_layout) {
    layout += (layout.empty() ? "" : ",") + std::to_string(n);
  }
  return {{"dp", std::to_string(dims.dp)},
          {"cp", std::to_string(dims.cp)},
          {"tp", std::to_string(dims.tp)},
          {"pp", std::to_string(dims.pp)},
          {"sequence_parallel", sequence_parallel ? "true" : "false"},
          {"pp_schedule", to_string(pp_schedule)},
          {"virtual_stages", std::to_string(virtual_stages)},
          {"pp_layout", layout},
          {"zero", std::to_string(zero_stage)},
          {"reshard_after_forward", reshard_after_forward ? "true" : "false"},
          {"prefetch", std::to_string(prefetch)},
          {"recompute", to_string(recompute)},
          {"precision", to_string(precision)},
          {"global_batch", std::to_string(global_batch)},
          {"micro_batch", std::to_string(micro_batch)},
          {"bucket_bytes", std::to_string(bucket_bytes)}};
}

} // namespace meshtrain
