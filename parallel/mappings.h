// defines: the autograd-aware communication of tensor and sequence parallelism, as conjugate
// pairs (the backward of one is the forward of the other):
//   copy_to_tp_region                     <-> reduce_from_tp_region
//   scatter_to_tp_region                  <-> gather_from_tp_region          (last dim)
//   scatter_to_sequence_parallel_region   <-> gather_from_sequence_parallel_region (dim 1)
//   gather_from_sequence_parallel_region  <-> reduce_scatter_to_sequence_parallel_region
// and copy_params_to_sequence_parallel_region for replicated parameters used on sequence
// shards (LayerNorm, row-parallel bias).
//
// Layout: activations are [B, T, C] (batch, sequence, channels); the sequence dim is 1
// (kSequenceDim) and "the last dim" is the channel dim. A sequence shard of rank r is
// tokens [r*T/tp, (r+1)*T/tp) of every sample: [B, T/tp, C].
//
// Every function is a no-op on a group of one rank: it returns its input (the same tensor,
// no autograd node). On larger groups, each collective is issued by forward or backward in
// the same order on every rank of the group (the graphs are identical), so the collectives
// match up. The communicator moves contiguous buffers along dim 0; these functions move the
// target dim to the front and back as needed.
#pragma once

#include "meshtrain/core/communicator.h"

#include <torch/torch.h>

#include <vector>

namespace meshtrain {

// Sequence dim of the [B, T, C] activation layout.
constexpr int64_t kSequenceDim = 1;

// forward: identity, backward: all-reduce (sum) of the gradient over `group`.
// Entry of a tensor-parallel region whose input is replicated (before a column-parallel
// linear): each rank's branch contributes part of the input's gradient.
torch::Tensor copy_to_tp_region(const torch::Tensor& x, const CommunicatorPtr& group);

// forward: all-reduce (sum) over `group`, backward: identity.
// Exit of a tensor-parallel region (after a row-parallel linear): sums the partial outputs.
torch::Tensor reduce_from_tp_region(const torch::Tensor& x, const CommunicatorPtr& group);

// forward: keep this rank's chunk of the last dim ([..., N] -> [..., N/tp]),
// backward: all-gather of the gradient along the last dim.
torch::Tensor scatter_to_tp_region(const torch::Tensor& x, const CommunicatorPtr& group);

// forward: all-gather along the last dim ([..., N/tp] -> [..., N]),
// backward: keep this rank's chunk of the gradient's last dim.
torch::Tensor gather_from_tp_region(const torch::Tensor& x, const CommunicatorPtr& group);

// forward: keep this rank's sequence shard ([B, T, C] -> [B, T/tp, C]),
// backward: all-gather of the gradient along the sequence dim.
// Entry of a sequence-parallel region from a replicated tensor.
torch::Tensor scatter_to_sequence_parallel_region(const torch::Tensor& x,
                                                  const CommunicatorPtr& group);

// forward: all-gather along the sequence dim ([B, T/tp, C] -> [B, T, C]),
// backward: reduce-scatter (sum) of the gradient along the sequence dim.
// Before a column-parallel linear under sequence parallelism: the gathered tensor feeds a
// tensor-parallel branch on every rank, so each rank's gradient is partial.
torch::Tensor gather_from_sequence_parallel_region(const torch::Tensor& x,
                                                   const CommunicatorPtr& group);

// forward: reduce-scatter (sum) along the sequence dim ([B, T, C] -> [B, T/tp, C]),
// backward: all-gather of the gradient along the sequence dim.
// After a row-parallel linear under sequence parallelism (replaces reduce_from_tp_region).
torch::Tensor reduce_scatter_to_sequence_parallel_region(const torch::Tensor& x,
                                                         const CommunicatorPtr& group);

// forward: identity on every tensor, backward: all-reduce (sum) of their gradients over
// `group`, in one call (the gradients are packed into one flat buffer).
// For replicated parameters applied to sequence shards (LayerNorm weight/bias, a
// row-parallel bias): each rank's gradient covers only its tokens; the sum is the full
// gradient, identical on every rank, and is already in param.grad when backward returns.
std::vector<torch::Tensor>
copy_params_to_sequence_parallel_region(const std::vector<torch::Tensor>& params,
                                        const CommunicatorPtr& group);

} // namespace meshtrain
