// defines: column_parallel_fanout — several ColumnParallelLinear layers of any output widths
// applied to ONE input with one entry into the tensor-parallel region: q, k and v of
// grouped-query attention ([H*D], [Hkv*D], [Hkv*D] rows), the gate and up projections of a
// SwiGLU MLP. Each layer keeps its own weight (and name: q_proj.weight, k_proj.weight, ...)
// and its own ShardSpec, cut over tp on its own, so widths need not be equal or fused.
//
//   x [B, T, in] replicated (sequence parallel: [B, T/tp, in])
//   -> enter the region once: copy_to_tp_region (sequence parallel:
//      gather_from_sequence_parallel_region)                         [B, T, in]
//   -> y_i = x W_i^T (+ b_i)                                          [B, T, out_i/tp] each
//
// Communication (tp > 1), whatever the number of layers: forward nothing (sequence parallel:
// one all-gather of x), backward one all-reduce of x's gradient (sequence parallel: one
// reduce-scatter) — the sum of every layer's contribution — instead of one per layer, as
// torchtitan's PrepareModuleInput in front of wq/wk/wv does.
#pragma once

#include "meshtrain/parallel/column_parallel_linear.h"

#include <torch/torch.h>

#include <vector>

namespace meshtrain {

// The outputs of `layers` on `x`, in order. The layers must share their tp group,
// in_features and sequence_parallel (true for all or none), and none may gather its output
// (gather_output(false)); throws naming the layer and the value otherwise.
std::vector<torch::Tensor> column_parallel_fanout(const std::vector<ColumnParallelLinear>& layers,
                                                  const torch::Tensor& x);

} // namespace meshtrain
