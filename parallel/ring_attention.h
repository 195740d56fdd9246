// defines: RingAttentionWork, RingAttentionOptions, ring_attention, ring_attention_work,
// ring_attention_core — exact causal softmax attention over a context-parallel group (DESIGN
// §3 "Context parallelism"; Liu et al. 2023 "Ring Attention", with the online softmax of
// Milakov & Gimelshein 2018 / FlashAttention).
//
// Each rank of the cp group holds its local sequence of two chunks (parallel/
// context_parallel.h): q [B, h, L, D] and k, v [B, hkv, L, D] with L = T / cp = 2c and
// hkv | h (grouped-query attention: query head i uses key/value head i / (h / hkv)).
//
// Forward. The key/value block of every rank travels once around the ring: at step s
// (0 <= s < cp) a rank holds the block of rank (r - s) mod cp; it sends that block on to
// rank r+1 and receives the next one from rank r-1 (Communicator::send_recv_async) WHILE it
// computes on the block it holds. For every (query chunk i, key chunk j) pair:
//   j <  i   full      every score counts
//   j == i   diagonal  the causal triangle (the upper part masked)
//   j >  i   skipped   nothing is computed
// Partial results are combined with an fp32 online softmax: per query row a running max m,
// a running sum l of exp(s - m) and an fp32 accumulator of exp(s - m) v, rescaled by
// exp(m_old - m_new) when the max grows; the output is acc / l. Scores and products run in
// the input dtype (bf16 under the bf16 policy), the statistics and accumulators in fp32, so
// the result does not drift with cp (torchtitan notes bf16 accumulation does).
// Saved for backward: q, the rank's own k/v block, the output and the fp32 log-sum-exp
// m + log(l) [B, h, L]; never a [T, T] score matrix.
//
// Backward (FlashAttention-2's recurrence). With delta = rowsum(dout * out), a pair's
// p = exp(s - lse), dv_j += p^T dout, ds = p * (dout v_j^T - delta), dq_i += ds k_j * scale,
// dk_j += ds^T q_i * scale. The key/value blocks travel around the ring again (overlapped
// with compute, as in forward), and with them fp32 accumulators of their dk/dv: a rank
// computes its contribution to the block it holds, adds the accumulator arriving from rank
// r-1 (received while it computed) and sends the sum on to rank r+1; after cp steps every
// block's dk/dv has visited every rank and arrives at its owner.
//
// Communication per call and rank (E = element bytes of k/v, the fp32 accumulators 4):
// forward (cp-1) exchanges of 2 B hkv L D E; backward (cp-1) of those plus cp of 2 B hkv L D 4.
// Collective over the group: every rank calls it with the same shapes, in the same order.
// A group of one is plain (chunked) causal attention.
#pragma once

#include "meshtrain/core/communicator.h"
#include "meshtrain/parallel/context_parallel.h"
#include "meshtrain/parallel/parallel_model.h"

#include <torch/torch.h>

#include <cstdint>
#include <memory>

namespace meshtrain {

// The attention work of block pairs on one rank (the load balance of a split). FLOPs count a
// multiply-add as 2 and both products (q k^T and p v) of every pair, summed over batch and
// heads.
struct RingAttentionWork {
  int64_t full_pairs = 0;
  int64_t diagonal_pairs = 0;
  int64_t skipped_pairs = 0;
  // 4 D per score the causal mask keeps: the attention work itself.
  double causal_flops = 0;
  // 4 D per score computed: a diagonal pair computes all c^2 scores, then masks the triangle.
  double computed_flops = 0;

  RingAttentionWork& operator+=(const RingAttentionWork& other);
};

struct RingAttentionOptions {
  // Which chunks each rank holds (context_parallel.h); must match how the sequence was cut.
  TORCH_ARG(ContextSplit, split) = ContextSplit::kBalanced;
  // Softmax scale; 0: 1 / sqrt(D).
  TORCH_ARG(double, scale) = 0.0;
  // When set, every forward adds the block pairs it computed here (not thread-safe: the
  // calls of one process must not overlap).
  TORCH_ARG(std::shared_ptr<RingAttentionWork>, work) = nullptr;
};

// Causal attention of this rank's queries over the whole sequence (see above): q [B, h, L, D],
// k, v [B, hkv, L, D] (any strides; k and v of one dtype) -> [B, h, L, D] in q's dtype.
// Differentiable in q, k and v. Throws naming the sizes when L is odd or hkv does not
// divide h.
torch::Tensor ring_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             const CommunicatorPtr& group,
                             const RingAttentionOptions& options = {});

// The block-pair work of one forward on cp rank `rank`, without running it (pure): for
// printing the load balance of a split. batch_heads = B * h, seq_len = T (divisible by 2 cp).
RingAttentionWork ring_attention_work(int64_t batch_heads, int64_t seq_len, int64_t head_dim,
                                      int cp, int rank,
                                      ContextSplit split = ContextSplit::kBalanced);

// An AttentionCoreWrapper (parallel/parallel_model.h) that runs ring attention over `group`
// instead of the layer's own core: what parallelize installs in every AttentionCore when
// cp > 1 (the layer's core must be causal softmax(q k^T / sqrt(D)) v without dropout).
AttentionCoreWrapper ring_attention_core(CommunicatorPtr group, RingAttentionOptions options = {});

} // namespace meshtrain
