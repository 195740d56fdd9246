// defines: the memory planner (see planner.h). The formulas, term by term, are in
// docs/memory.md#memory-planner; the comments here say which tensor each term is.
#include "meshtrain/memory/planner.h"

#include "meshtrain/parallel/pipeline_schedule.h"

#include <algorithm>
#include <map>
#include <numeric>
#include <optional>
#include <tuple>

namespace meshtrain {

namespace {

constexpr int64_t kFp32 = 4;

// A validated plan under the short names the formulas use.
struct Layout {
  explicit Layout(const ParallelPlan& p)
      : dp(p.dims.dp), cp(p.dims.cp), tp(p.dims.tp), zero(p.zero_stage),
        sequence_parallel(p.sequence_parallel), recompute(p.recompute), precision(p.precision),
        global_batch(p.global_batch), micro_batch(p.micro_batch), bucket_bytes(p.bucket_bytes),
        reshard_after_forward(p.reshard_after_forward), prefetch(p.prefetch), pp(p.dims.pp) {}
  int64_t dp, cp, tp;
  int zero;
  bool sequence_parallel;
  RecomputeMode recompute;
  Precision precision;
  int64_t global_batch, micro_batch, bucket_bytes;
  bool reshard_after_forward;
  int64_t prefetch;
  int64_t pp;
};

// Vp: the vocab padded to a multiple of lcm(pad, tp) (VocabParallelEmbedding).
int64_t padded_vocab(const PlanModel& m, int64_t tp) {
  const int64_t multiple = std::lcm(m.pad_vocab_to_multiple_of, tp);
  return (m.vocab_size + multiple - 1) / multiple * multiple;
}

// Elements of one block's parameters on this rank (gpt_model.h's table, sharded by tp).
int64_t block_parameters(const PlanModel& m, int64_t tp) {
  const int64_t c = m.n_embd;
  return 12 * c * c / tp // c_attn, attn.c_proj, c_fc, mlp.c_proj weights
         + 7 * c / tp    // c_attn (3C) and c_fc (4C) biases
         + 6 * c;        // ln_1, ln_2, both c_proj biases (replicated)
}

// Elements of this rank's parameters outside the blocks: wte (tied to the head), wpe, ln_f.
int64_t root_parameters(const PlanModel& m, int64_t tp) {
  return padded_vocab(m, tp) * m.n_embd / tp + m.block_size * m.n_embd + 2 * m.n_embd;
}

// Elements of this rank's parameters.
int64_t parameters_per_rank(const PlanModel& m, int64_t tp) {
  return root_parameters(m, tp) + m.n_layer * block_parameters(m, tp);
}

} // namespace

ModelShape shape_of(const PlanModel& m) {
  ModelShape shape;
  shape.n_layer = m.n_layer;
  shape.n_head = m.n_head;
  shape.seq_len = m.block_size;
  shape.n_embd = m.n_embd;
  shape.attention_dropout = m.dropout;
  return shape;
}

ParallelPlan validate_plan(const PlanModel& m, const ParallelPlan& plan) {
  const auto fail = [](const std::string& message) { throw LayoutError("planner: " + message); };
  if (m.vocab_size < 1 || m.block_size < 1 || m.n_layer < 1 || m.n_head < 1 || m.n_embd < 1) {
    fail("model sizes must be >= 1 (vocab " + std::to_string(m.vocab_size) + ", block " +
         std::to_string(m.block_size) + ", layers " + std::to_string(m.n_layer) + ", heads " +
         std::to_string(m.n_head) + ", embd " + std::to_string(m.n_embd) + ")");
  }
  if (m.n_embd % m.n_head != 0) {
    fail("n_embd (" + std::to_string(m.n_embd) + ") must be divisible by n_head (" +
         std::to_string(m.n_head) + ")");
  }
  if (!(m.dropout >= 0.0 && m.dropout < 1.0)) {
    fail("dropout (" + std::to_string(m.dropout) + ") must be in [0, 1)");
  }
  const auto& d = plan.dims;
  if (d.dp < 1 || d.cp < 1 || d.tp < 1 || d.pp < 1) {
    fail("give every dim of the layout (dp " + std::to_string(d.dp) + ", cp " +
         std::to_string(d.cp) + ", tp " + std::to_string(d.tp) + ", pp " + std::to_string(d.pp) +
         "): the planner has no world size to infer one from");
  }
  return plan.validate(d.dp * d.cp * d.tp * d.pp, shape_of(m));
}

namespace {

// One micro-batch's activation terms on one rank, from which the serial estimate and each
// pipeline stage's are assembled (docs/memory.md#the-formulas names each).
struct ActivationTerms {
  int64_t e = 0;      // bytes of an activation element
  int64_t n = 0;      // tokens of one micro-batch on this rank
  int64_t stream = 0; // elements of the residual stream [n, C / sigma] of this rank
  int64_t scores = 0; // elements of one block's [b, a/t, T, T] probabilities (0 under the ring)
  int64_t block = 0;  // elements one block saves in the activation dtype (the mode's)
  int64_t block_bytes = 0;     // what one block saves without full recomputation, stats and mask in
  int64_t kept_per_block = 0;  // what one block keeps under the mode (full: only its input)
  int64_t embedding_saved = 0; // the embedding dropout mask (dropout > 0)
  int64_t head_saved = 0;      // ln_f's input and statistics, the logits input, exp()'s output
  int64_t logits = 0;          // elements of this rank's logits [n, vp / t]
  int64_t loss_end = 0;        // transient (1) below
  int64_t wte_gradient = 0;    // autograd's gradient of wte [vp / t, C]
  int64_t backward_start = 0;  // transient (2) below, without the staging bucket
  int64_t replayed_block = 0;  // one block run again under full recomputation
  int64_t block_gradients = 0; // the gradients flowing through a block's backward
  // The attention core's backward: the gradients of the probabilities and of the scores
  // [b, a/t, T, T], of q, k and v, and the stream's.
  int64_t attention_gradients = 0;
};

ActivationTerms activation_terms(const PlanModel& m, const Layout& l) {
  ActivationTerms a;
  const int64_t e = element_bytes(l.precision);
  const int64_t t = l.tp;
  const int64_t sigma = l.sequence_parallel ? t : 1; // the residual stream is [b, T/sigma, C]
  const int64_t b = l.micro_batch;
  const int64_t T = m.block_size, C = m.n_embd, heads = m.n_head;
  const bool ring = l.cp > 1;     // context parallelism: ring attention over this rank's T/cp
  const int64_t n = b * T / l.cp; // tokens of one micro-batch on this rank
  const int64_t vp = padded_vocab(m, t); // the logits of this rank: [n, vp / t]
  const bool dropout = m.dropout > 0.0;
  const bool padded_columns = vp > m.vocab_size; // the last rank masks its padding columns
  a.e = e;
  a.n = n;

  // ---- saved for backward, one transformer block (elements in the activation dtype) ----
  const int64_t stream = n * C / sigma; // the residual stream of this rank
  a.stream = stream;
  // The standard core keeps the [b, a/t, T, T] probabilities; ring attention never forms them.
  const int64_t scores = ring ? 0 : heads / t * b * T * T;
  a.scores = scores;
  // ln_1 and ln_2 inputs (the residual stream); the c_attn and c_fc inputs, full [n, C]
  // (gathered under sequence parallelism); contiguous copies of q, k, v that the batched
  // matmuls keep; the attention output (c_proj's input); GELU's input and output.
  int64_t block = 2 * stream + 2 * n * C + 3 * n * C / t + n * C / t + 2 * 4 * n * C / t;
  if (l.recompute == RecomputeMode::kNone) {
    block += scores; // softmax output [b, a/t, T, T]
    if (dropout) {
      block += 2 * scores; // its dropout mask, and the dropped probabilities matmul keeps
    }
    if (ring) {
      block += n * C / t; // ring attention's own copy of its output (for rowsum(dout * out))
    }
  }
  if (dropout) {
    block += 2 * stream; // masks of the attention and MLP residual dropouts
  }
  a.block = block;
  // LayerNorm means and reciprocal std (fp32), the causal mask (bool [T, T]); the ring keeps
  // instead its fp32 log-sum-exp [b, a/t, T/cp] (recomputation replays it).
  const int64_t mask =
      ring ? (l.recompute == RecomputeMode::kNone ? n * heads / t * kFp32 : 0) : T * T;
  a.block_bytes = block * e + 2 * 2 * (n / sigma) * kFp32 + mask;
  const int64_t kept_input = stream * e; // full recomputation keeps only the block input
  a.kept_per_block = l.recompute == RecomputeMode::kFull ? kept_input : a.block_bytes;

  // ---- the head: embedding dropout mask, ln_f input and statistics, the logits matmul's
  // (gathered) input, and the cross-entropy's exp() output [n, vp/t] in fp32.
  a.logits = n * (vp / t);
  a.embedding_saved = dropout ? stream * e : 0;
  a.head_saved = stream * e + 2 * (n / sigma) * kFp32 + n * C * e + a.logits * kFp32;

  // (1) the end of the loss: the logits (model dtype), the fp32 copy of bf16 logits, the
  // padding-masked copy, and the shifted logits.
  a.loss_end = a.logits * (e + (e != kFp32 ? kFp32 : 0) + (padded_columns ? kFp32 : 0) + kFp32);
  // (2) the first steps of backward: the gradient of exp()'s output and of the logits, the
  // logits matmul's input gradient, wte's gradient (and the staging bucket, added by the caller).
  a.wte_gradient = vp / t * C * e;
  a.backward_start = a.logits * (kFp32 + e) + n * C * e + a.wte_gradient;
  // (3) full recomputation: a block runs again with everything it saves; the gradients flowing
  // through a block's backward (the MLP's [n, 4C/t] and the stream's).
  a.replayed_block =
      (block + scores + (dropout ? 2 * scores : 0)) * e + 2 * 2 * (n / sigma) * kFp32;
  a.block_gradients = (2 * 4 * n * C / t + 2 * stream) * e;
  a.attention_gradients = (2 * scores + 3 * n * C / t + 2 * stream) * e;
  return a;
}

// The most a rank holds during start-up (parallel/param_init.h: a declared model; launch/
// parallelize.h's order): it gets the values of its parameters (a bf16 parameter's are made in
// fp32 first, one parameter at a time: `largest_param` elements), then the reducer's gradient
// buffers, at ZeRO-3 every unit's full buffer in turn while its shard is cut (`largest_unit`
// elements), then the optimizer's state. The optimizer step itself adds nothing: AdamW runs as
// one fused loop in place (optim/adamw_kernel.h; the CUDA tensor-op path would hold two
// temporaries of a bucket's owned elements: the planner models the CPU backend).
int64_t startup_peak(const MemoryEstimate& r, int64_t e, bool full_sharding, int64_t largest_param,
                     int64_t largest_unit) {
  if (full_sharding) {
    return r.parameters + r.gradients + std::max(largest_unit * e, r.optimizer);
  }
  const int64_t fp32_values = e == kFp32 ? 0 : largest_param * kFp32;
  return r.parameters + std::max(fp32_values, r.gradients + r.optimizer);
}

// The estimate of one rank without pipeline parallelism (every rank alike).
MemoryEstimate estimate_one_rank(const PlanModel& m, const Layout& l) {
  const ActivationTerms a = activation_terms(m, l);
  const int64_t e = a.e;
  const int64_t t = l.tp;
  const int64_t b = l.micro_batch;
  const int64_t T = m.block_size, C = m.n_embd, L = m.n_layer;
  const bool ring = l.cp > 1;
  const int64_t n = a.n;
  const int64_t stream = a.stream;

  MemoryEstimate r;
  const int64_t psi = parameters_per_rank(m, t);
  r.parameters_per_rank = psi;
  r.blocks = L;
  // Gradients and optimizer state (and at ZeRO-3 the parameters) are sharded over the dp x cp
  // ranks.
  const int64_t shards = l.dp * l.cp;
  r.parameters = (l.zero == 3 ? psi / shards : psi) * e;
  // The reducer's persistent buckets, fp32 (reduce dtype); ZeRO-2 keeps this rank's 1/dp.
  r.gradients = (l.zero >= 2 ? psi / shards : psi) * kFp32;
  // fp32 master weights and the two AdamW moments of the owned elements.
  r.optimizer = 3 * (l.zero >= 1 ? psi / shards : psi) * kFp32;
  // Inputs and targets of every micro-batch of the step, int64 [b, T] each.
  r.data = 2 * (l.global_batch / l.dp) * T * 8;
  r.state = r.parameters + r.gradients + r.optimizer + r.data;

  r.saved_layers = L * a.kept_per_block;
  r.saved_head = a.embedding_saved + a.head_saved;

  // ---- ZeRO-3 (parallel/parameter_shards.h): the units gathered at the activation peak, the
  // start of backward: the root (embedding and head, kept since the head ran), the last
  // block gathered again and the prefetched ones; every block without resharding.
  const int64_t block_params = block_parameters(m, t);
  const int64_t root_params = root_parameters(m, t);
  if (l.zero == 3) {
    const int64_t blocks = l.reshard_after_forward ? std::min(1 + l.prefetch, L) : L;
    r.gathered = (root_params + blocks * block_params) * e;
  }

  // ---- transients on top of what is saved; the largest of these moments.
  // ZeRO-2: a bucket's full-size fp32 staging lives from its first gradient to its
  // reduce-scatter; the wte gradient arrives first, so one bucket is already there. ZeRO-3:
  // the buckets are the units: the root's (from ln_f's gradient to the end of backward) and
  // the running block's.
  // Accumulating under no_sync (ZeRO 0-2), every bucket's staging is alive from the first
  // micro-step's backward on.
  const bool accumulating = l.global_batch / (l.dp * l.micro_batch) > 1;
  int64_t staging = 0;
  if (l.zero == 3) {
    staging = (root_params + block_params) * kFp32;
  } else if (l.zero == 2) {
    staging = accumulating ? psi * kFp32 : std::min(psi * kFp32, l.bucket_bytes);
  }
  // (1) the end of the loss; (2) the first steps of backward, with the staging bucket.
  const int64_t loss_end = a.loss_end;
  const int64_t backward_start = a.backward_start + staging;
  // (3) full recomputation: the last block runs again with everything it saves, while the
  // inputs of all blocks are still kept; plus the gradients flowing through it and wte's
  // gradient (the head's saved tensors are freed by then).
  const int64_t replayed_block = a.replayed_block;
  int64_t replay = 0;
  if (l.recompute == RecomputeMode::kFull) {
    replay = replayed_block + a.block_gradients + a.wte_gradient + staging - r.saved_head;
  }
  // (5) ZeRO-3 in the middle of backward (the head freed): autograd's gradients of two blocks
  // (the finished unit's are dropped only when the next one finishes) and of wte (alive from
  // the head's backward to the embedding's), and the staging; under full recomputation the
  // replayed block besides. What dominates when activations are small.
  // Accumulating (every micro-step reduce-scatters), a block's reduce-scatter lands in a
  // temporary [P / D] that is then added into the shard.
  int64_t sharded_backward = 0;
  if (l.zero == 3) {
    sharded_backward = (l.recompute == RecomputeMode::kFull ? replayed_block : 0) +
                       2 * block_params * e + a.wte_gradient + staging - r.saved_head +
                       (accumulating ? block_params / shards * kFp32 : 0);
  }
  // (4) ring attention's backward in the last block (cp > 1): the head's saved tensors and
  // the block's MLP part (ln_2 and c_fc inputs, GELU's input and output) are freed by then;
  // alive are one block pair's fp32 probabilities and their gradient [b, a/t, c, c]
  // (c = T / (2 cp)), the fp32 dq, the pair's dk/dv and the dk/dv accumulators arriving and
  // leaving ([n, C/t] each: 1 + 2 + 2 + 2), the k/v blocks held and arriving and the chunked
  // output gradient (2 + 2 + 1, activation dtype), and the stream's gradient flowing in.
  // Under full recomputation the block is being replayed: its saved tensors are alive too.
  int64_t ring_backward = 0;
  if (ring) {
    const int64_t c = T / (2 * l.cp);
    const int64_t local = n * C / t; // [b, a/t, T/cp, D]: this rank's q (or k, or v)
    const int64_t mlp_saved = (stream + n * C + 2 * 4 * n * C / t) * e;
    const int64_t replayed = l.recompute == RecomputeMode::kFull ? a.block * e : 0;
    ring_backward = replayed + 2 * b * (m.n_head / t) * c * c * kFp32 + 7 * local * kFp32 +
                    5 * local * e + 2 * stream * e - mlp_saved - r.saved_head;
  }
  // (6) the end of a backward (ZeRO 0-2): autograd's own gradient of every parameter is alive
  // until finish() or the end of no_sync, beside the staging; the activations are freed by
  // then. The peak when activations are small (full recomputation, small micro-batches).
  const int64_t backward_end = l.zero == 3 ? 0 : psi * e + staging - r.saved_layers - r.saved_head;
  r.transient = std::max({loss_end, backward_start, replay, ring_backward, sharded_backward,
                          backward_end, int64_t{0}});
  r.activation_peak = r.saved_layers + r.saved_head + r.transient + r.gathered;
  r.startup = startup_peak(r, e, l.zero == 3, padded_vocab(m, t) * C / t,
                           std::max(block_params, root_params));
  r.peak = std::max(r.state + r.activation_peak, r.startup);
  return r;
}

// The schedule a validated pipeline plan runs, simulated with equal F, I and W costs.
struct PipelineRun {
  PipelineScheduleSpec spec;
  ScheduleSimulation sim;
  std::vector<int64_t> layers; // blocks of each stage
};

PipelineRun pipeline_run(const PlanModel& m, const ParallelPlan& plan) {
  PipelineRun run;
  run.spec = PipelineScheduleSpec{plan.pp_schedule, plan.dims.pp,
                                  static_cast<int>(plan.accumulation_steps()), plan.virtual_stages};
  run.sim = check_pipeline_schedule(run.spec, make_pipeline_schedule(run.spec));
  run.layers = plan.stage_layers(m.n_layer);
  return run;
}

// Under pipeline parallelism, pp rank `rank`'s estimate. The state is the serial formulas'
// over this rank's parameters: its blocks, and on the first and the last rank the parameters
// outside the blocks (both hold them). The activation peak is found by walking the rank's
// compute actions in the order it runs them (the simulation's timeline): a micro-batch's
// forward on stage s adds what it saves until its backward (its blocks' tensors; on stage 0
// the embedding's, on the last stage the head's, elsewhere the stage's output, kept as the
// root of backward; a received activation is the first block's saved input), a backward
// (B, or ZB-H1's W) drops it; each action's moment adds its transient, autograd's gradients
// of the stage's parameters (kept from the first backward to the end of the schedule: one
// no_sync scope) and the message buffers alive. The largest moment is the activation peak.
MemoryEstimate estimate_stage(const PlanModel& m, const Layout& l, const PipelineRun& run,
                              int rank) {
  const ActivationTerms a = activation_terms(m, l);
  const int64_t e = a.e;
  const auto& spec = run.spec;
  const int last = spec.stages() - 1;
  MemoryEstimate r;
  r.pp_rank = rank;
  r.blocks = 0;
  for (int s = rank; s < spec.stages(); s += spec.ranks) {
    r.blocks += run.layers[s];
  }
  r.holds_outside_blocks = rank == spec.rank_of(0) || rank == spec.rank_of(last);
  r.micro_batches_in_flight = run.sim.peak_in_flight[rank];
  const int64_t block_params = block_parameters(m, l.tp);
  const int64_t root_params = root_parameters(m, l.tp);
  const int64_t psi = r.blocks * block_params + (r.holds_outside_blocks ? root_params : 0);
  r.parameters_per_rank = psi;
  const int64_t shards = l.dp; // no context parallelism with a pipeline; ZeRO 0-2
  r.parameters = psi * e;
  r.gradients = (l.zero >= 2 ? psi / shards : psi) * kFp32;
  r.optimizer = 3 * (l.zero >= 1 ? psi / shards : psi) * kFp32;
  r.data = 2 * (l.global_batch / l.dp) * m.block_size * 8; // every stage loads the batches
  r.state = r.parameters + r.gradients + r.optimizer + r.data;

  // Saved until its backward by one micro-batch on stage s: {blocks, the rest}.
  const int64_t stream_bytes = a.stream * e; // one message [b, T / sigma, C]
  const auto saved_of = [&](int s) {
    const int64_t blocks = run.layers[s] * a.kept_per_block;
    const int64_t rest =
        (s == 0 ? a.embedding_saved : 0) + (s == last ? a.head_saved : stream_bytes);
    return std::make_pair(blocks, rest);
  };
  // ZeRO-2 accumulates the whole schedule under no_sync: every bucket's full-size fp32
  // staging is alive from the first backward on (ZeRO 0-1: the persistent buffer, in state).
  const int64_t staging = l.zero == 2 ? psi * kFp32 : 0;
  const bool full = l.recompute == RecomputeMode::kFull;

  int64_t held_blocks = 0; // saved by the micro-batches in flight
  int64_t held_rest = 0;
  int64_t seeds = 0;   // ZB-H1: the output gradients kept from I for W
  int64_t sending = 0; // an input gradient whose send may still be in flight
  bool have_gradients = false;
  const auto moment = [&](int64_t blocks, int64_t rest, int64_t transient, int64_t messages,
                          bool gradients) {
    const int64_t held = gradients ? psi * e : 0;
    const int64_t total = blocks + rest + transient + messages + held;
    if (total > r.activation_peak) {
      r.activation_peak = total;
      r.saved_layers = blocks;
      r.saved_head = rest;
      r.transient = transient;
      r.messages = messages;
      r.held_gradients = held;
    }
  };
  for (const auto& timed : run.sim.timeline[rank]) {
    const auto& action = timed.action;
    const int s = action.stage;
    const auto [blocks, rest] = saved_of(s);
    const int64_t staged = have_gradients ? staging : 0;
    if (action.kind == PipelineActionKind::kForward) {
      // The end of the forward (on the last stage, the end of the loss on top).
      moment(held_blocks + blocks, held_rest + rest, (s == last ? a.loss_end : 0) + staged,
             seeds + sending, have_gradients);
      held_blocks += blocks;
      held_rest += rest;
      sending = 0; // an activation is sent from the saved output itself: nothing extra
      continue;
    }
    const bool weights = action.kind != PipelineActionKind::kBackwardInput;
    const bool replays = action.kind != PipelineActionKind::kBackwardWeight;
    // The received gradient of the stage's output (under W: the seed kept since I).
    const int64_t received = s < last && replays ? stream_bytes : 0;
    // The start of the backward: on the last stage the head's first steps (wte's gradient
    // only when the weights' gradients are computed); elsewhere the last block's gradients;
    // under full recomputation the last block runs again first (the head's tensors freed).
    int64_t start =
        s == last ? a.backward_start - (weights ? 0 : a.wte_gradient) : a.block_gradients;
    if (full) {
      start = std::max(start, a.replayed_block + a.block_gradients +
                                  (s == last ? a.wte_gradient - a.head_saved : 0));
    }
    if (action.kind == PipelineActionKind::kBackwardInput) {
      // ZB-H1's I keeps the graph (retain_graph): what a plain backward frees block by block
      // stays, so the gradients deep inside the stage (the attention core's) pile on top too.
      // Stage 0's I sends nothing back: its W runs the whole backward.
      start = s == 0 ? 0 : std::max(start, a.attention_gradients);
    }
    moment(held_blocks, held_rest, start + (weights ? staging : staged), seeds + received + sending,
           have_gradients);
    if (!weights) { // ZB-H1's I: the graph and the received gradient stay for W
      seeds += received;
      sending = s > 0 ? stream_bytes : 0;
      continue;
    }
    held_blocks -= blocks;
    held_rest -= rest;
    if (action.kind == PipelineActionKind::kBackwardWeight) {
      seeds -= s < last ? stream_bytes : 0;
    }
    have_gradients = true;
    // The end of the backward: every parameter's gradient (stage 0: wte's new one from the
    // embedding beside the last), the input gradient to send.
    sending = s > 0 && action.kind == PipelineActionKind::kBackward ? stream_bytes : 0;
    moment(held_blocks, held_rest, (s == 0 ? a.wte_gradient : 0) + staging, seeds + sending, true);
  }
  // After the schedule (autograd's gradients dropped with the no_sync scope): the first and
  // the last stage sum their shared gradients in one fp32 buffer (torch::cat).
  if (r.holds_outside_blocks) {
    moment(0, 0, root_params * kFp32 + staging, 0, false);
  }
  r.startup = startup_peak(r, e, /*full_sharding=*/false,
                           r.holds_outside_blocks ? padded_vocab(m, l.tp) * m.n_embd / l.tp
                                                  : 4 * m.n_embd * m.n_embd / l.tp,
                           0);
  r.peak = std::max(r.state + r.activation_peak, r.startup);
  return r;
}

// The worst of per-stage estimates: the largest peak (the first such rank).
MemoryEstimate worst_of(const std::vector<MemoryEstimate>& stages) {
  return *std::max_element(
      stages.begin(), stages.end(),
      [](const MemoryEstimate& x, const MemoryEstimate& y) { return x.peak < y.peak; });
}

// The simulations of a budget search by (schedule, pp, micro-batches, virtual stages): ZeRO,
// recomputation, tp and sequence parallelism do not change a schedule, so many candidates share
// one (the search leaves --pp-layout empty: the stages' blocks follow from pp and v too).
class PipelineRuns {
public:
  const PipelineRun& of(const PlanModel& m, const ParallelPlan& plan) {
    const auto key = std::make_tuple(static_cast<int>(plan.pp_schedule), plan.dims.pp,
                                     plan.accumulation_steps(), plan.virtual_stages);
    auto found = runs_.find(key);
    if (found == runs_.end()) {
      found = runs_.emplace(key, pipeline_run(m, plan)).first;
    }
    return found->second;
  }

private:
  std::map<std::tuple<int, int, int64_t, int>, PipelineRun> runs_;
};

std::vector<MemoryEstimate> stages_of(const PlanModel& m, const ParallelPlan& resolved,
                                      const PipelineRun* simulated = nullptr) {
  const Layout l(resolved);
  if (l.pp == 1) {
    return {estimate_one_rank(m, l)};
  }
  std::optional<PipelineRun> own;
  const PipelineRun& run =
      simulated != nullptr ? *simulated : own.emplace(pipeline_run(m, resolved));
  std::vector<MemoryEstimate> out;
  for (int r = 0; r < run.spec.ranks; ++r) {
    out.push_back(estimate_stage(m, l, run, r));
  }
  return out;
}

} // namespace

MemoryEstimate estimate_memory(const PlanModel& m, const ParallelPlan& plan) {
  return worst_of(stages_of(m, validate_plan(m, plan)));
}

MemoryEstimate estimate_memory(const PlanModel& m, const ParallelPlan& plan, int pp_rank) {
  const ParallelPlan resolved = validate_plan(m, plan);
  if (pp_rank < 0 || pp_rank >= resolved.dims.pp) {
    throw LayoutError("planner: pp rank (" + std::to_string(pp_rank) + ") must be in [0, " +
                      std::to_string(resolved.dims.pp) + ")");
  }
  if (resolved.dims.pp == 1) {
    return estimate_one_rank(m, Layout(resolved));
  }
  return estimate_stage(m, Layout(resolved), pipeline_run(m, resolved), pp_rank);
}

std::vector<MemoryEstimate> estimate_memory_per_stage(const PlanModel& m,
                                                      const ParallelPlan& plan) {
  return stages_of(m, validate_plan(m, plan));
}

namespace {

// Ring collectives' bytes per rank: all-reduce 2 (n-1)/n S, all-gather / reduce-scatter
// (n-1)/n S.
double all_reduce_bytes(double ranks, double bytes) {
  return 2.0 * (ranks - 1.0) / ranks * bytes;
}

// The cost of a pipeline layout: each rank computes its stages' share of every micro-batch
// (the head on the last stage; ZB-H1's W runs a stage's backward again: 4 forwards' work per
// micro-batch instead of 3), the step lasts the slowest rank's compute stretched by the
// simulated bubble; the busiest rank's bytes: its activations and gradients sent to the
// neighbouring stages, tensor parallelism's collectives over its blocks, the dp reduction of
// its gradients and the first and last stage's sum of their shared gradients.
PlanCost pipeline_cost(const PlanModel& m, const ParallelPlan& plan, const PlanHardware& hw,
                       const PipelineRun& run) {
  const Layout l(plan);
  const auto& spec = run.spec;
  const int last = spec.stages() - 1;
  const int64_t e = element_bytes(l.precision);
  const double t = static_cast<double>(l.tp);
  const double dp = static_cast<double>(l.dp);
  const double T = static_cast<double>(m.block_size), C = static_cast<double>(m.n_embd);
  const double vp = static_cast<double>(padded_vocab(m, l.tp));
  const double tokens = static_cast<double>(l.global_batch) * T / dp; // through every stage
  const double micro_steps = static_cast<double>(spec.micro_batches);
  const double stream = static_cast<double>(l.micro_batch) * T * C * static_cast<double>(e);
  const double message = stream / (l.sequence_parallel ? t : 1.0); // [b, T / sigma, C]
  const double root_params = static_cast<double>(root_parameters(m, l.tp));
  const double work = plan.pp_schedule == PipelineSchedule::kZeroBubbleH1 ? 4.0 : 3.0;

  PlanCost cost;
  double slowest_compute = 0;
  for (int r = 0; r < spec.ranks; ++r) {
    int64_t blocks = 0;
    int sends_forward = 0; // local stages that send an activation on, and a gradient back
    int sends_back = 0;
    for (int s = r; s < spec.stages(); s += spec.ranks) {
      blocks += run.layers[s];
      sends_forward += s < last ? 1 : 0;
      sends_back += s > 0 ? 1 : 0;
    }
    const bool first = r == spec.rank_of(0);
    const bool ends = first || r == spec.rank_of(last);
    const double L = static_cast<double>(blocks);
    const double linear = 2.0 * 12.0 * C * C / t * L;
    const double attention = 2.0 * 2.0 * T * C / t * L;
    const double head = r == spec.rank_of(last) ? 2.0 * C * vp / t : 0.0;
    double flops = work * (linear + head + attention);
    if (l.recompute == RecomputeMode::kFull) {
      flops += linear + attention;
    } else if (l.recompute == RecomputeMode::kSelective) {
      flops += attention;
    }
    slowest_compute = std::max(slowest_compute, flops * tokens / hw.flops_per_s);

    const double p2p = micro_steps * (sends_forward + sends_back) * message;
    double bytes = p2p;
    if (l.tp > 1) {
      // As without a pipeline, over this rank's blocks; the embedding's output on the first
      // stage, the logits' input on the last.
      const double per_block =
          (l.recompute == RecomputeMode::kFull ? 6.0 : 4.0) * 2.0 * (t - 1) / t * stream;
      const double ends_count = (first ? 1.0 : 0.0) + (r == spec.rank_of(last) ? 1.0 : 0.0);
      bytes += micro_steps * (L * per_block + ends_count * 2.0 * (t - 1) / t * stream);
    }
    const double psi =
        static_cast<double>(blocks * block_parameters(m, l.tp)) + (ends ? root_params : 0.0);
    if (l.dp > 1) {
      const double grads = psi * kFp32;
      bytes += (l.zero >= 2 ? 0.5 : 1.0) * all_reduce_bytes(dp, grads); // all-reduce or r-s
      if (l.zero >= 1) {
        bytes += (dp - 1) / dp * psi * static_cast<double>(e); // the parameter all-gather
      }
    }
    if (ends && spec.ranks > 1) {
      bytes += all_reduce_bytes(2.0, root_params * kFp32); // the shared gradients, fp32
    }
    if (bytes > static_cast<double>(cost.comm_bytes)) {
      cost.comm_bytes = static_cast<int64_t>(bytes);
    }
    cost.p2p_bytes = std::max(cost.p2p_bytes, static_cast<int64_t>(p2p));
  }
  cost.bubble = run.sim.idle_fraction;
  cost.compute_s = slowest_compute / std::max(1.0 - cost.bubble, 1e-9);
  cost.comm_s = static_cast<double>(cost.comm_bytes) / hw.bytes_per_s;
  cost.step_s = cost.compute_s + cost.comm_s;
  return cost;
}

} // namespace

PlanCost estimate_cost(const PlanModel& m, const ParallelPlan& plan, const PlanHardware& hw) {
  const ParallelPlan resolved = validate_plan(m, plan);
  if (resolved.dims.pp > 1) {
    return pipeline_cost(m, resolved, hw, pipeline_run(m, resolved));
  }
  const Layout l(resolved);
  const int64_t e = element_bytes(l.precision);
  const double t = static_cast<double>(l.tp);
  const double dp = static_cast<double>(l.dp);
  const int64_t b = l.micro_batch;
  const double T = static_cast<double>(m.block_size), C = static_cast<double>(m.n_embd);
  const double L = static_cast<double>(m.n_layer);
  const double cp = static_cast<double>(l.cp);
  const double tokens = static_cast<double>(l.global_batch) * T / dp / cp; // per dp x cp rank
  const double vp = static_cast<double>(padded_vocab(m, l.tp));

  // Forward matmul FLOPs per token of one rank: the block's linears, q k^T and att v, the
  // logits; backward doubles it; recomputation adds the forward part it replays. Ring
  // attention (cp > 1) computes 2cp+1 of the (2cp)^2 chunk pairs of a sequence on each rank
  // (parallel/ring_attention.h): (2cp+1) T / (4 cp) keys per local query; its backward runs
  // five products per pair against forward's two.
  const double linear = 2.0 * 12.0 * C * C / t * L;
  const double keys = l.cp > 1 ? (2.0 * cp + 1.0) * T / (4.0 * cp) : T;
  const double attention = 2.0 * 2.0 * keys * C / t * L;
  const double head = 2.0 * C * vp / t;
  double flops = 3.0 * (linear + head) + (l.cp > 1 ? 3.5 : 3.0) * attention;
  if (l.recompute == RecomputeMode::kFull) {
    flops += linear + attention;
  } else if (l.recompute == RecomputeMode::kSelective) {
    flops += attention;
  }
  PlanCost cost;
  cost.compute_s = flops * tokens / hw.flops_per_s;

  // Bytes each rank moves (ring algorithms): all-reduce 2 (n-1)/n S, all-gather and
  // reduce-scatter (n-1)/n S of the full size S.
  const int64_t micro_steps = l.global_batch / l.dp / b;
  const double stream = static_cast<double>(b) * T / cp * C * static_cast<double>(e);
  double bytes = 0;
  if (l.tp > 1) {
    // Per block and micro-step: forward 2 all-reduces (or 2 all-gathers + 2 reduce-scatters
    // under sequence parallelism: the same bytes), backward the same again; full
    // recomputation replays the forward's. Plus the embedding's and the logits' input.
    const double per_block =
        (l.recompute == RecomputeMode::kFull ? 6.0 : 4.0) * 2.0 * (t - 1) / t * stream;
    bytes += static_cast<double>(micro_steps) * (L * per_block + 2.0 * 2.0 * (t - 1) / t * stream);
  }
  if (l.cp > 1) {
    // Ring attention per block and micro-step: forward passes cp-1 key/value blocks
    // (2 [b, T/cp, C/t] in the activation dtype); backward passes them again plus cp fp32
    // dk/dv accumulators; recomputation replays the forward's.
    const double kv = 2.0 * static_cast<double>(b) * T / cp * C / t;
    const double forward = (cp - 1.0) * kv * static_cast<double>(e);
    const double backward = forward + cp * kv * kFp32;
    const double replay = l.recompute == RecomputeMode::kNone ? 0.0 : forward;
    bytes += static_cast<double>(micro_steps) * L * (forward + backward + replay);
  }
  const double shards = dp * cp; // gradients are reduced over dp x cp
  if (shards > 1) {
    const double psi = static_cast<double>(parameters_per_rank(m, l.tp));
    const double grads = psi * kFp32;
    const double gather = (shards - 1) / shards * psi * static_cast<double>(e);
    if (l.zero == 3) {
      // Every micro-step: the gradients reduce-scattered, the parameters gathered for forward
      // and (resharded after it) again for backward.
      const double gathers = l.reshard_after_forward ? 2.0 : 1.0;
      bytes +=
          static_cast<double>(micro_steps) * ((shards - 1) / shards * grads + gathers * gather);
    } else {
      bytes += (l.zero >= 2 ? 1.0 : 2.0) * (shards - 1) / shards * grads; // all-reduce or r-s
      if (l.zero >= 1) {
        bytes += gather; // parameter all-gather after the update
      }
    }
  }
  cost.comm_bytes = static_cast<int64_t>(bytes);
  cost.comm_s = bytes / hw.bytes_per_s;
  cost.step_s = cost.compute_s + cost.comm_s;
  return cost;
}

std::vector<RankedLayout> plan_layouts(const PlanModel& m, int64_t world, const ParallelPlan& fixed,
                                       int64_t budget_bytes, const PlanHardware& hw) {
  if (world < 1) {
    throw LayoutError("planner: world size (" + std::to_string(world) + ") must be >= 1");
  }
  std::vector<RankedLayout> out;
  for (int cp = 1; cp <= world; ++cp) {
    for (int tp = 1; tp <= world; ++tp) {
      for (int zero = 0; zero <= 3; ++zero) {
        for (bool sp : {false, true}) {
          for (auto mode :
               {RecomputeMode::kNone, RecomputeMode::kSelective, RecomputeMode::kFull}) {
            for (int64_t b = 1; b <= fixed.global_batch; ++b) {
              ParallelPlan candidate = fixed;
              candidate.dims = ParallelDims{-1, cp, tp, 1};
              candidate.zero_stage = zero;
              if (zero < 3) { // the ZeRO-3 settings of `fixed` do not apply below stage 3
                candidate.reshard_after_forward = true;
                candidate.prefetch = 1;
              }
              candidate.sequence_parallel = sp;
              candidate.recompute = mode;
              candidate.micro_batch = b;
              ParallelPlan plan;
              try {
                plan = candidate.validate(static_cast<int>(world), shape_of(m));
              } catch (const LayoutError&) {
                continue; // not a layout of this world and model
              }
              if (zero > 0 && plan.dims.dp * plan.dims.cp == 1) {
                continue; // the same layout as stage 0
              }
              const auto memory = estimate_memory(m, plan);
              if (memory.peak <= budget_bytes) {
                out.push_back({plan, memory, estimate_cost(m, plan, hw)});
              }
            }
          }
        }
      }
    }
  }
  // Pipeline layouts: pp stages of dp x tp ranks (ZeRO 0-2 and no context parallelism with a
  // pipeline; validate refuses the rest, and blocks that do not split evenly: interleaved has
  // 2 chunks per rank). The estimate is the largest stage's.
  const std::pair<PipelineSchedule, int> schedules[] = {{PipelineSchedule::kGPipe, 1},
                                                        {PipelineSchedule::k1F1B, 1},
                                                        {PipelineSchedule::kInterleaved1F1B, 2},
                                                        {PipelineSchedule::kZeroBubbleH1, 1}};
  PipelineRuns runs;
  for (int pp = 2; pp <= world && pp <= m.n_layer; ++pp) {
    if (world % pp != 0) {
      continue;
    }
    for (int tp = 1; tp * pp <= world; ++tp) {
      for (int zero = 0; zero <= 2; ++zero) {
        for (bool sp : {false, true}) {
          for (auto mode :
               {RecomputeMode::kNone, RecomputeMode::kSelective, RecomputeMode::kFull}) {
            for (int64_t b = 1; b <= fixed.global_batch; ++b) {
              for (const auto& [schedule, virtual_stages] : schedules) {
                ParallelPlan candidate = fixed;
                candidate.dims = ParallelDims{-1, 1, tp, pp};
                candidate.zero_stage = zero;
                candidate.reshard_after_forward = true;
                candidate.prefetch = 1;
                candidate.sequence_parallel = sp;
                candidate.recompute = mode;
                candidate.micro_batch = b;
                candidate.pp_schedule = schedule;
                candidate.virtual_stages = virtual_stages;
                candidate.pp_layout.clear();
                ParallelPlan plan;
                try {
                  plan = candidate.validate(static_cast<int>(world), shape_of(m));
                } catch (const LayoutError&) {
                  continue; // not a layout of this world and model
                }
                if (zero > 0 && plan.dims.dp == 1) {
                  continue; // the same layout as stage 0
                }
                const auto& run = runs.of(m, plan);
                const auto memory = worst_of(stages_of(m, plan, &run));
                if (memory.peak <= budget_bytes) {
                  out.push_back({plan, memory, pipeline_cost(m, plan, hw, run)});
                }
              }
            }
          }
        }
      }
    }
  }
  std::stable_sort(out.begin(), out.end(), [](const RankedLayout& x, const RankedLayout& y) {
    return std::tie(x.cost.step_s, x.memory.peak) < std::tie(y.cost.step_s, y.memory.peak);
  });
  return out;
}

} // namespace meshtrain
