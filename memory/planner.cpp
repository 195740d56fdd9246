// defines: the memory planner (see planner.h). The formulas, term by term, are in
// docs/memory.md#memory-planner; the comments here say which tensor each term is.
#include "meshtrain/memory/planner.h"

#include <algorithm>
#include <numeric>
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
        reshard_after_forward(p.reshard_after_forward), prefetch(p.prefetch) {}
  int64_t dp, cp, tp;
  int zero;
  bool sequence_parallel;
  RecomputeMode recompute;
  Precision precision;
  int64_t global_batch, micro_batch, bucket_bytes;
  bool reshard_after_forward;
  int64_t prefetch;
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

MemoryEstimate estimate_memory(const PlanModel& m, const ParallelPlan& plan) {
  const Layout l(validate_plan(m, plan));
  const int64_t e = element_bytes(l.precision);
  const int64_t t = l.tp;
  const int64_t sigma = l.sequence_parallel ? t : 1; // the residual stream is [b, T/sigma, C]
  const int64_t b = l.micro_batch;
  const int64_t T = m.block_size, C = m.n_embd, a = m.n_head, L = m.n_layer;
  const bool ring = l.cp > 1;     // context parallelism: ring attention over this rank's T/cp
  const int64_t n = b * T / l.cp; // tokens of one micro-batch on this rank
  const int64_t vp = padded_vocab(m, t); // the logits of this rank: [n, vp / t]
  const bool dropout = m.dropout > 0.0;
  const bool padded_columns = vp > m.vocab_size; // the last rank masks its padding columns

  MemoryEstimate r;
  const int64_t psi = parameters_per_rank(m, t);
  r.parameters_per_rank = psi;
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

  // ---- saved for backward, one transformer block (elements in the activation dtype) ----
  const int64_t stream = n * C / sigma; // the residual stream of this rank
  // The standard core keeps the [b, a/t, T, T] probabilities; ring attention never forms them.
  const int64_t scores = ring ? 0 : a / t * b * T * T;
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
  // LayerNorm means and reciprocal std (fp32), the causal mask (bool [T, T]); the ring keeps
  // instead its fp32 log-sum-exp [b, a/t, T/cp] (recomputation replays it).
  const int64_t mask = ring ? (l.recompute == RecomputeMode::kNone ? n * a / t * kFp32 : 0) : T * T;
  const int64_t block_bytes = block * e + 2 * 2 * (n / sigma) * kFp32 + mask;
  const int64_t kept_input = stream * e; // full recomputation keeps only the block input
  r.saved_layers = L * (l.recompute == RecomputeMode::kFull ? kept_input : block_bytes);

  // ---- the head: embedding dropout mask, ln_f input and statistics, the logits matmul's
  // (gathered) input, and the cross-entropy's exp() output [n, vp/t] in fp32.
  const int64_t logits = n * (vp / t);
  r.saved_head = (dropout ? stream * e : 0) + stream * e + 2 * (n / sigma) * kFp32 + n * C * e +
                 logits * kFp32;

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
  // (1) the end of the loss: the logits (model dtype), the fp32 copy of bf16 logits, the
  // padding-masked copy, and the shifted logits.
  const int64_t loss_end =
      logits * (e + (e != kFp32 ? kFp32 : 0) + (padded_columns ? kFp32 : 0) + kFp32);
  // (2) the first steps of backward: the gradient of exp()'s output and of the logits, the
  // logits matmul's input gradient, wte's gradient, and the staging bucket.
  const int64_t backward_start = logits * (kFp32 + e) + n * C * e + vp / t * C * e + staging;
  // (3) full recomputation: the last block runs again with everything it saves, while the
  // inputs of all blocks are still kept; plus the gradients flowing through it (the MLP's
  // [n, 4C/t] and the stream's) and wte's gradient.
  const int64_t replayed_block =
      (block + scores + (dropout ? 2 * scores : 0)) * e + 2 * 2 * (n / sigma) * kFp32;
  int64_t replay = 0;
  if (l.recompute == RecomputeMode::kFull) {
    replay = replayed_block + (2 * 4 * n * C / t + 2 * stream) * e + vp / t * C * e + staging -
             r.saved_head;
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
                       2 * block_params * e + vp / t * C * e + staging - r.saved_head +
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
    const int64_t replayed = l.recompute == RecomputeMode::kFull ? block * e : 0;
    ring_backward = replayed + 2 * b * (a / t) * c * c * kFp32 + 7 * local * kFp32 + 5 * local * e +
                    2 * stream * e - mlp_saved - r.saved_head;
  }
  // (6) the end of a backward (ZeRO 0-2): autograd's own gradient of every parameter is alive
  // until finish() or the end of no_sync, beside the staging; the activations are freed by
  // then. The peak when activations are small (full recomputation, small micro-batches).
  const int64_t backward_end = l.zero == 3 ? 0 : psi * e + staging - r.saved_layers - r.saved_head;
  r.transient = std::max({loss_end, backward_start, replay, ring_backward, sharded_backward,
                          backward_end, int64_t{0}});
  r.activation_peak = r.saved_layers + r.saved_head + r.transient + r.gathered;
  // ---- the optimizer step, after backward: AdamW's update of a bucket's owned fp32 elements
  // holds two temporaries of their size at once (sqrt(v) and its bias-corrected quotient,
  // optim/adamw.cpp). With small micro-batches this, not the activations, is the peak.
  const int64_t bucket_elements = std::max<int64_t>(l.bucket_bytes / kFp32, 1);
  const int64_t largest_bucket =
      l.zero == 3 ? std::max(root_params, block_params) : std::min(psi, bucket_elements);
  const int64_t owned_per_bucket = l.zero >= 1 ? largest_bucket / shards : largest_bucket;
  r.optimizer_transient = 2 * owned_per_bucket * kFp32;
  r.peak = r.state + std::max(r.activation_peak, r.optimizer_transient);
  return r;
}

PlanCost estimate_cost(const PlanModel& m, const ParallelPlan& plan, const PlanHardware& hw) {
  const Layout l(validate_plan(m, plan));
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
  std::stable_sort(out.begin(), out.end(), [](const RankedLayout& x, const RankedLayout& y) {
    return std::tie(x.cost.step_s, x.memory.peak) < std::tie(y.cost.step_s, y.memory.peak);
  });
  return out;
}

} // namespace meshtrain
