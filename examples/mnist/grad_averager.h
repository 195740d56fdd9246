// defines: GradAverager — plain data parallelism's one collective: after backward, every
// parameter's gradient becomes the average over the data-parallel group.
//
// The gradients are packed into one flat fp32 buffer [sum of numel] in parameters() order,
// reduced with a single all_reduce(kAvg) and unpacked: one message per step instead of one
// per parameter (6 for the default MLP), which is what latency-bound small models need.
// With equal local batch sizes, the average of the ranks' local-mean-loss gradients is the
// gradient of the mean loss over the global batch.
#pragma once

#include "core/communicator.h"

#include <torch/torch.h>

#include <vector>

namespace meshtrain::mnist {

class GradAverager {
public:
  // `params` must be the same list, in the same order, on every rank of `group`.
  GradAverager(std::vector<torch::Tensor> params, CommunicatorPtr group);

  // Collective over the group. Every parameter must have a gradient. On a group of one it
  // returns at once (nothing to average).
  void average();

  int64_t numel() const { return flat_.numel(); }

private:
  std::vector<torch::Tensor> params_;
  CommunicatorPtr group_;
  torch::Tensor flat_; // float32 [sum of numel], allocated once
};

} // namespace meshtrain::mnist
