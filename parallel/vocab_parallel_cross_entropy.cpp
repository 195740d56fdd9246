// defines: vocab_parallel_cross_entropy (see vocab_parallel_cross_entropy.h).
#include "meshtrain/parallel/vocab_parallel_cross_entropy.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/parallel/mappings.h"

#include <limits>

namespace meshtrain {

VocabParallelLoss vocab_parallel_cross_entropy(const torch::Tensor& logits,
                                               const torch::Tensor& targets,
                                               const CommunicatorPtr& tp_group,
                                               const VocabParallelCrossEntropyOptions& options) {
  MT_CHECK(tp_group != nullptr, "vocab_parallel_cross_entropy: the tp communicator is null");
  MT_CHECK(logits.dim() >= 1 && logits.is_floating_point(),
           "vocab_parallel_cross_entropy: logits must be a floating tensor [..., Vp/tp], got ",
           logits.scalar_type(), " of sizes ", logits.sizes());
  MT_CHECK(targets.scalar_type() == torch::kLong,
           "vocab_parallel_cross_entropy: targets must be int64, got ", targets.scalar_type());
  MT_CHECK(targets.sizes() == logits.sizes().slice(0, logits.dim() - 1),
           "vocab_parallel_cross_entropy: targets of sizes ", targets.sizes(),
           " do not match logits of sizes ", logits.sizes(), " without the vocab dim");
  const int tp = tp_group->size();
  const int64_t local_v = logits.size(-1);
  const int64_t padded = local_v * tp;
  const int64_t vocab = options.vocab_size();
  MT_CHECK(vocab > 0 && vocab <= padded, "vocab_parallel_cross_entropy: vocab_size (", vocab,
           ") must be in [1, tp (", tp, ") x local vocab (", local_v, ") = ", padded, "]");
  const int64_t start = tp_group->rank() * local_v;

  const auto tgt = targets.reshape({-1}); // [N]
  const auto kept = tgt != options.ignore_index();
  {
    const bool bad = (kept & ((tgt < 0) | (tgt >= vocab))).any().item<bool>();
    MT_CHECK(!bad, "vocab_parallel_cross_entropy: a target is outside [0, ", vocab,
             ") and is not ignore_index (", options.ignore_index(), ")");
  }

  // Softmax math in at least fp32.
  auto z = logits.reshape({-1, local_v}); // [N, Vp/tp]
  if (z.scalar_type() != torch::kDouble) {
    z = z.to(torch::kFloat);
  }
  // Padding columns are -inf: no share of the softmax, no gradient.
  const auto column = torch::arange(start, start + local_v, tgt.options()); // [Vp/tp]
  if (start + local_v > vocab) {
    z = z.masked_fill(column >= vocab, -std::numeric_limits<float>::infinity());
  }

  // The max only stabilises exp(); it cancels in the loss, so it carries no gradient.
  auto max = std::get<0>(z.detach().max(-1)).contiguous(); // [N]
  tp_group->all_reduce(max, ReduceOp::kMax);
  const auto shifted = z - max.unsqueeze(-1); // [N, Vp/tp]

  const auto mine = (tgt >= start) & (tgt < start + local_v); // [N]
  const auto local_index = (tgt - start).masked_fill(~mine, 0).unsqueeze(-1);
  const auto target_logit = shifted.gather(-1, local_index).squeeze(-1).masked_fill(~mine, 0.0);
  // [2, N]: local sum-exp and target logit, summed over the group in one call.
  const auto totals =
      reduce_from_tp_region(torch::stack({shifted.exp().sum(-1), target_logit}), tp_group);

  const auto per_token = (totals[0].log() - totals[1]).masked_fill(~kept, 0.0); // [N]
  VocabParallelLoss out;
  out.sum = per_token.sum();
  out.count = kept.sum();
  out.mean = out.sum / out.count;
  return out;
}

} // namespace meshtrain
