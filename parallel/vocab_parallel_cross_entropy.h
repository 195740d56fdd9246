// defines: VocabParallelCrossEntropyOptions, VocabParallelLoss, vocab_parallel_cross_entropy —
// token cross-entropy over logits whose vocab dim is cut over the TP group, without ever
// gathering the full logits.
//
// Input: logits [..., Vp/tp] (rank r holds vocab columns [r*Vp/tp, (r+1)*Vp/tp) of the padded
// vocab Vp, as VocabParallelEmbedding::logits returns), targets [...] int64 in [0, V) or
// ignore_index. Columns >= V (padding) are excluded from the softmax and get zero gradient.
// Per token, with m the max logit:
//   loss = log(sum_j exp(z_j - m)) - (z_target - m)
// Communication (tp > 1): forward an all-reduce(max) of [N] (no gradient needed: m cancels)
// and one all-reduce(sum) of [2, N] packing the local sum-exp and the target logit (which
// lives on one rank, 0 elsewhere); backward: none (that sum is reduce_from_tp_region, whose
// backward is the identity), the gradient softmax - onehot is computed locally.
// The result is identical on every TP rank.
#pragma once

#include "meshtrain/core/communicator.h"

#include <torch/torch.h>

namespace meshtrain {

struct VocabParallelCrossEntropyOptions {
  explicit VocabParallelCrossEntropyOptions(int64_t vocab_size) : vocab_size_(vocab_size) {}
  // V, the unpadded vocab size.
  TORCH_ARG(int64_t, vocab_size);
  // Targets equal to this are left out of the loss and of the count (nanoGPT's -1).
  TORCH_ARG(int64_t, ignore_index) = -1;
};

struct VocabParallelLoss {
  torch::Tensor mean;  // [] sum / count, as torch's cross_entropy with reduction "mean"
  torch::Tensor sum;   // [] summed over non-ignored tokens (for normalising by a global count)
  torch::Tensor count; // [] int64, number of non-ignored tokens
};

// logits [..., Vp/tp] float, targets [...] int64 -> the loss; differentiable wrt logits.
VocabParallelLoss vocab_parallel_cross_entropy(const torch::Tensor& logits,
                                               const torch::Tensor& targets,
                                               const CommunicatorPtr& tp_group,
                                               const VocabParallelCrossEntropyOptions& options);

} // namespace meshtrain
