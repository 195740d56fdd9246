// defines: ring attention (see ring_attention.h for the algorithm and its communication).
#include "meshtrain/parallel/ring_attention.h"

#include "meshtrain/core/errors.h"

#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <limits>
#include <utility>

namespace meshtrain {
namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum class PairKind { kFull, kDiagonal, kSkipped };

PairKind pair_kind(int64_t query_chunk, int64_t key_chunk) {
  if (key_chunk < query_chunk) {
    return PairKind::kFull;
  }
  return key_chunk == query_chunk ? PairKind::kDiagonal : PairKind::kSkipped;
}

// The sizes of one call: q [b, h, L, d], k/v [b, hkv, L, d], g = h / hkv query heads per
// key/value head, chunks of c = L / 2 tokens.
struct Dims {
  int64_t b, h, hkv, g, len, c, d;
  double scale;
};

Dims dims_of(const Tensor& q, const Tensor& k, const Tensor& v, double scale) {
  MT_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
           "ring_attention: q, k and v must be [B, heads, L, D]; got sizes ", q.sizes(), ", ",
           k.sizes(), ", ", v.sizes());
  MT_CHECK(k.sizes() == v.sizes(), "ring_attention: k ", k.sizes(), " and v ", v.sizes(),
           " must have the same sizes");
  MT_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3),
           "ring_attention: q ", q.sizes(), " and k ", k.sizes(),
           " must agree in batch, sequence and head size");
  MT_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
           "ring_attention: q, k and v must have one dtype; got ", q.scalar_type(), ", ",
           k.scalar_type(), ", ", v.scalar_type());
  Dims s{};
  s.b = q.size(0);
  s.h = q.size(1);
  s.hkv = k.size(1);
  s.len = q.size(2);
  s.d = q.size(3);
  MT_CHECK(s.hkv >= 1 && s.h % s.hkv == 0, "ring_attention: the key/value heads (", s.hkv,
           ") must divide the query heads (", s.h, ")");
  MT_CHECK(s.len >= 2 && s.len % 2 == 0, "ring_attention: the local sequence (", s.len,
           " tokens) must be this rank's two equal chunks (even)");
  s.g = s.h / s.hkv;
  s.c = s.len / 2;
  s.scale = scale > 0 ? scale : 1.0 / std::sqrt(static_cast<double>(s.d));
  return s;
}

// [b, h, L, d] -> local chunk x of every head, grouped by key/value head: [b, hkv, g*c, d],
// contiguous (row (i, t) is query head kv*g + i at chunk position t).
Tensor query_chunk(const Tensor& x, int64_t chunk, const Dims& s) {
  return x.reshape({s.b, s.hkv, s.g, 2, s.c, s.d})
      .select(3, chunk)
      .reshape({s.b, s.hkv, s.g * s.c, s.d})
      .contiguous();
}

// The inverse for both chunks: two [b, hkv, g*c, ...] -> [b, h, L, ...] (... = d, or nothing).
Tensor from_query_chunks(const Tensor& c0, const Tensor& c1, const Dims& s, bool has_d) {
  if (has_d) {
    return torch::stack(
               {c0.view({s.b, s.hkv, s.g, s.c, s.d}), c1.view({s.b, s.hkv, s.g, s.c, s.d})}, 3)
        .reshape({s.b, s.h, s.len, s.d});
  }
  return torch::stack({c0.view({s.b, s.hkv, s.g, s.c}), c1.view({s.b, s.hkv, s.g, s.c})}, 3)
      .reshape({s.b, s.h, s.len});
}

// k, v [b, hkv, L, d] -> one block [2 (k|v), 2 (chunks), b, hkv, c, d]: what travels the ring.
Tensor pack_key_value(const Tensor& k, const Tensor& v, const Dims& s) {
  auto block = torch::empty({2, 2, s.b, s.hkv, s.c, s.d}, k.options());
  block[0].copy_(k.reshape({s.b, s.hkv, 2, s.c, s.d}).permute({2, 0, 1, 3, 4}));
  block[1].copy_(v.reshape({s.b, s.hkv, 2, s.c, s.d}).permute({2, 0, 1, 3, 4}));
  return block;
}

// [2 (chunks), b, hkv, c, d] -> [b, hkv, L, d].
Tensor unpack_chunks(const Tensor& chunks, const Dims& s) {
  return chunks.permute({1, 2, 0, 3, 4}).reshape({s.b, s.hkv, s.len, s.d});
}

// The scores of one pair in fp32, scaled, with the causal triangle masked on a diagonal pair:
// [b, hkv, g*c, c].
Tensor pair_scores(const Tensor& qx, const Tensor& kj, bool diagonal, const Tensor& future,
                   const Dims& s) {
  auto scores = torch::matmul(qx, kj.transpose(-2, -1)).to(torch::kFloat).mul_(s.scale);
  if (diagonal) {
    scores.view({s.b, s.hkv, s.g, s.c, s.c})
        .masked_fill_(future, -std::numeric_limits<float>::infinity());
  }
  return scores;
}

// The online-softmax state of one local query chunk, fp32.
struct Running {
  Tensor max; // [b, hkv, g*c]
  Tensor sum; // [b, hkv, g*c]
  Tensor acc; // [b, hkv, g*c, d]
};

void forward_pair(const Tensor& qx, const Tensor& kj, const Tensor& vj, bool diagonal,
                  const Tensor& future, const Dims& s, Running& run) {
  auto p = pair_scores(qx, kj, diagonal, future, s);
  const auto new_max = torch::maximum(run.max, std::get<0>(p.max(-1)));
  p.sub_(new_max.unsqueeze(-1)).exp_();          // exp(s - m_new); masked scores give 0
  const auto alpha = (run.max - new_max).exp_(); // rescales what was summed so far (0 at first)
  run.sum.mul_(alpha).add_(p.sum(-1));
  run.acc.mul_(alpha.unsqueeze(-1)).add_(torch::matmul(p.to(vj.scalar_type()), vj));
  run.max = new_max;
}

void backward_pair(const Tensor& qx, const Tensor& dox, const Tensor& delta, const Tensor& lse,
                   const Tensor& kj, const Tensor& vj, bool diagonal, const Tensor& future,
                   const Dims& s, Tensor& dqx, Tensor dkj, Tensor dvj) {
  const auto dtype = qx.scalar_type();
  auto p = pair_scores(qx, kj, diagonal, future, s).sub_(lse.unsqueeze(-1)).exp_(); // probabilities
  dvj.add_(torch::matmul(p.transpose(-2, -1).to(dtype), dox)); // [b, hkv, c, d]
  auto dp = torch::matmul(dox, vj.transpose(-2, -1)).to(torch::kFloat);
  auto ds = p.mul_(dp.sub_(delta.unsqueeze(-1))).mul_(s.scale); // [b, hkv, g*c, c]
  const auto ds_low = ds.to(dtype);
  dqx.add_(torch::matmul(ds_low, kj));
  dkj.add_(torch::matmul(ds_low.transpose(-2, -1), qx));
}

struct RingState : torch::CustomClassHolder {
  CommunicatorPtr group;
  RingAttentionOptions options;
};

class RingAttentionFunction : public torch::autograd::Function<RingAttentionFunction> {
public:
  static Tensor forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                        c10::IValue capsule) {
    auto* state = static_cast<RingState*>(capsule.toCapsule().get());
    const auto& group = state->group;
    const auto& options = state->options;
    const Dims s = dims_of(q, k, v, options.scale());
    const int cp = group->size();
    const int rank = group->rank();
    const auto mine = context_chunks(cp, rank, options.split());
    const auto future = torch::ones({s.c, s.c}, torch::kBool).triu(1); // [c, c]

    const std::array<Tensor, 2> qx = {query_chunk(q, 0, s), query_chunk(q, 1, s)};
    const Tensor own = pack_key_value(k, v, s);
    const auto f32 = q.options().dtype(torch::kFloat);
    std::array<Running, 2> run;
    for (auto& r : run) {
      r.max = torch::full({s.b, s.hkv, s.g * s.c}, -std::numeric_limits<float>::infinity(), f32);
      r.sum = torch::zeros({s.b, s.hkv, s.g * s.c}, f32);
      r.acc = torch::zeros({s.b, s.hkv, s.g * s.c, s.d}, f32);
    }
    RingAttentionWork work;
    const int64_t bh = s.b * s.h;
    Tensor block = own; // the block of rank (rank - step) mod cp
    for (int step = 0; step < cp; ++step) {
      WorkPtr exchange;
      Tensor next;
      if (step + 1 < cp) {
        // The next block arrives while this one is computed on.
        next = torch::empty_like(block);
        exchange = group->send_recv_async(block, (rank + 1) % cp, next, (rank + cp - 1) % cp);
      }
      const int src = (rank - step + cp) % cp;
      const auto theirs = context_chunks(cp, src, options.split());
      for (int x = 0; x < 2; ++x) {
        for (int y = 0; y < 2; ++y) {
          const auto kind = pair_kind(mine[x], theirs[y]);
          if (kind == PairKind::kSkipped) {
            ++work.skipped_pairs;
            continue;
          }
          const bool diagonal = kind == PairKind::kDiagonal;
          forward_pair(qx[x], block[0][y], block[1][y], diagonal, future, s, run[x]);
          const double computed = 4.0 * bh * s.c * s.c * s.d;
          work.computed_flops += computed;
          if (diagonal) {
            ++work.diagonal_pairs;
            work.causal_flops += 4.0 * bh * (s.c * (s.c + 1) / 2) * s.d;
          } else {
            ++work.full_pairs;
            work.causal_flops += computed;
          }
        }
      }
      if (exchange) {
        exchange->wait();
        block = next;
      }
    }
    if (options.work()) {
      *options.work() += work;
    }

    std::array<Tensor, 2> out_chunks, lse;
    for (int x = 0; x < 2; ++x) {
      out_chunks[x] = run[x].acc.div_(run[x].sum.unsqueeze(-1)); // [b, hkv, g*c, d]
      lse[x] = run[x].max.add_(run[x].sum.log());                // [b, hkv, g*c]
    }
    const Tensor out = from_query_chunks(out_chunks[0], out_chunks[1], s, true).to(q.scalar_type());
    ctx->saved_data["state"] = capsule;
    ctx->saved_data["q0"] = qx[0];
    ctx->saved_data["q1"] = qx[1];
    ctx->saved_data["kv"] = own;
    ctx->saved_data["lse"] = torch::stack({lse[0], lse[1]}); // [2, b, hkv, g*c]
    // Detached: an output saved with its grad_fn would keep its own node alive.
    ctx->saved_data["out"] = out.detach();
    ctx->saved_data["sizes"] = std::vector<int64_t>{s.b, s.h, s.hkv, s.len, s.d};
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto* state = static_cast<RingState*>(ctx->saved_data["state"].toCapsule().get());
    const auto& group = state->group;
    const auto& options = state->options;
    const auto sizes = ctx->saved_data["sizes"].toIntVector();
    Dims s{};
    s.b = sizes[0];
    s.h = sizes[1];
    s.hkv = sizes[2];
    s.len = sizes[3];
    s.d = sizes[4];
    s.g = s.h / s.hkv;
    s.c = s.len / 2;
    s.scale = options.scale() > 0 ? options.scale() : 1.0 / std::sqrt(static_cast<double>(s.d));
    const std::array<Tensor, 2> qx = {ctx->saved_data["q0"].toTensor(),
                                      ctx->saved_data["q1"].toTensor()};
    const Tensor own = ctx->saved_data["kv"].toTensor();
    const Tensor lse = ctx->saved_data["lse"].toTensor();
    const Tensor out = ctx->saved_data["out"].toTensor();
    const auto dtype = qx[0].scalar_type();
    const Tensor dout = grads[0].to(dtype);

    const int cp = group->size();
    const int rank = group->rank();
    const auto mine = context_chunks(cp, rank, options.split());
    const auto future = torch::ones({s.c, s.c}, torch::kBool).triu(1);
    const auto f32 = qx[0].options().dtype(torch::kFloat);
    std::array<Tensor, 2> dox, delta, dq;
    for (int x = 0; x < 2; ++x) {
      dox[x] = query_chunk(dout, x, s);
      // rowsum(dout * out) in fp32: [b, hkv, g*c]
      delta[x] = (dox[x].to(torch::kFloat) * query_chunk(out, x, s).to(torch::kFloat)).sum(-1);
      dq[x] = torch::zeros({s.b, s.hkv, s.g * s.c, s.d}, f32);
    }

    Tensor block = own;
    Tensor incoming;   // the dk/dv accumulator of the block held at this step, from rank - 1
    Tensor outgoing;   // the accumulator sent to rank + 1 (kept until its exchange is done)
    WorkPtr gradients; // that exchange
    for (int step = 0; step < cp; ++step) {
      WorkPtr exchange;
      Tensor next;
      if (step + 1 < cp) {
        next = torch::empty_like(block);
        exchange = group->send_recv_async(block, (rank + 1) % cp, next, (rank + cp - 1) % cp);
      }
      const int src = (rank - step + cp) % cp;
      const auto theirs = context_chunks(cp, src, options.split());
      // This rank's contribution to the held block's [dk | dv] x [chunk 0 | chunk 1].
      auto partial = torch::zeros({2, 2, s.b, s.hkv, s.c, s.d}, f32);
      for (int x = 0; x < 2; ++x) {
        for (int y = 0; y < 2; ++y) {
          const auto kind = pair_kind(mine[x], theirs[y]);
          if (kind == PairKind::kSkipped) {
            continue;
          }
          backward_pair(qx[x], dox[x], delta[x], lse[x], block[0][y], block[1][y],
                        kind == PairKind::kDiagonal, future, s, dq[x], partial[0][y],
                        partial[1][y]);
        }
      }
      if (gradients) {
        gradients->wait(); // the accumulator of this block from the ranks before
        partial.add_(incoming);
      }
      outgoing = partial;
      incoming = torch::empty_like(partial);
      gradients = group->send_recv_async(outgoing, (rank + 1) % cp, incoming, (rank + cp - 1) % cp);
      if (exchange) {
        exchange->wait();
        block = next;
      }
    }
    gradients->wait(); // this rank's own block, with every rank's contribution
    const Tensor dq_full = from_query_chunks(dq[0], dq[1], s, true).to(dtype);
    const auto kv_type = own.scalar_type();
    return {dq_full, unpack_chunks(incoming[0], s).to(kv_type),
            unpack_chunks(incoming[1], s).to(kv_type), Tensor()};
  }
};

} // namespace

RingAttentionWork& RingAttentionWork::operator+=(const RingAttentionWork& o) {
  full_pairs += o.full_pairs;
  diagonal_pairs += o.diagonal_pairs;
  skipped_pairs += o.skipped_pairs;
  causal_flops += o.causal_flops;
  computed_flops += o.computed_flops;
  return *this;
}

torch::Tensor ring_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             const CommunicatorPtr& group, const RingAttentionOptions& options) {
  MT_CHECK(group != nullptr, "ring_attention: the cp communicator is null");
  (void)dims_of(q, k, v, options.scale()); // the checks, on the caller's sizes
  auto state = c10::make_intrusive<RingState>();
  state->group = group;
  state->options = options;
  return RingAttentionFunction::apply(q, k, v, c10::IValue::make_capsule(state));
}

RingAttentionWork ring_attention_work(int64_t batch_heads, int64_t seq_len, int64_t head_dim,
                                      int cp, int rank, ContextSplit split) {
  MT_CHECK(cp >= 1 && seq_len % (2 * cp) == 0, "ring_attention_work: the sequence (", seq_len,
           " tokens) must be divisible by 2 x cp = ", 2 * cp);
  const double c = static_cast<double>(seq_len / (2 * cp));
  const double per_score = 4.0 * static_cast<double>(batch_heads * head_dim);
  const auto mine = context_chunks(cp, rank, split);
  RingAttentionWork work;
  for (int step = 0; step < cp; ++step) {
    const auto theirs = context_chunks(cp, (rank - step + cp) % cp, split);
    for (const auto i : mine) {
      for (const auto j : theirs) {
        switch (pair_kind(i, j)) {
        case PairKind::kSkipped:
          ++work.skipped_pairs;
          break;
        case PairKind::kDiagonal:
          ++work.diagonal_pairs;
          work.computed_flops += per_score * c * c;
          work.causal_flops += per_score * c * (c + 1) / 2;
          break;
        case PairKind::kFull:
          ++work.full_pairs;
          work.computed_flops += per_score * c * c;
          work.causal_flops += per_score * c * c;
          break;
        }
      }
    }
  }
  return work;
}

AttentionCoreWrapper ring_attention_core(CommunicatorPtr group, RingAttentionOptions options) {
  MT_CHECK(group != nullptr, "ring_attention_core: the cp communicator is null");
  return [group = std::move(group), options = std::move(options)](
             const AttentionCoreFn& /*the layer's own core: replaced*/, const torch::Tensor& q,
             const torch::Tensor& k,
             const torch::Tensor& v) { return ring_attention(q, k, v, group, options); };
}

} // namespace meshtrain
