// defines: RecomputeFn, recompute — activation recomputation (Chen et al. 2016; Korthikanti
// et al. 2022; DESIGN §3). The modes (RecomputeMode) are part of the layout
// (parallel/parallel_plan.h); launch/parallelize.h applies them.
//
// recompute(fn, inputs) runs fn(inputs) without recording its graph: only `inputs` are kept
// for backward, none of fn's intermediate activations. In backward it restores the random
// state fn started from (the default CPU generator and, when given, an RngTracker's dropout
// streams), runs fn again with grad enabled on detached copies of the inputs, and
// backpropagates the output gradients through that graph: the inputs get their gradients,
// and the parameters fn uses accumulate theirs (with the same hooks firing, so the
// data-parallel reducer sees them as without recomputation). Recomputed collectives (a
// tensor-parallel fn all-reduces or all-gathers) run again in backward, in the same order on
// every rank because backward visits the blocks in the same order everywhere.
//
// The modes (ParallelPlan::recompute, `train_gpt --recompute`):
//   none       everything kept for backward
//   selective  only the attention core — softmax(q k^T / sqrt(D)) v with its dropout — is
//              recomputed: the [B, h, T, T] scores and probabilities, the largest activations
//              at long sequence lengths, are never stored (Korthikanti et al.)
//   full       each transformer block keeps only its input [B, T, C] (or [B, T/tp, C])
#pragma once

#include "meshtrain/parallel/rng_tracker.h"

#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

namespace meshtrain {

using RecomputeFn = std::function<std::vector<torch::Tensor>(const std::vector<torch::Tensor>&)>;

// Runs fn(inputs) (see above) and returns its outputs. `rng` may be null (fn draws no dropout
// masks from a tracker); the default CPU generator is always restored. Without grad mode, or
// when no input requires grad, this is just fn(inputs).
std::vector<torch::Tensor> recompute(const RecomputeFn& fn,
                                     const std::vector<torch::Tensor>& inputs,
                                     RngTracker* rng = nullptr);

} // namespace meshtrain
