// defines: GradNormParts, global_grad_norm, clip_coefficient, clip_grad_norm_ — the L2 norm
// of the full, de-duplicated gradient of a model spread over a dp x tp mesh, and
// torch.nn.utils.clip_grad_norm_'s scaling (DESIGN §3).
//
// What each rank holds and how the global norm is assembled:
//   - a parameter partitioned over tp (ShardSpec::is_partitioned): each tp rank holds a
//     disjoint cut, so its squared norms are summed over the tp group;
//   - a parameter replicated over tp: every tp rank holds the same full gradient (the TP
//     layers make it so, also under sequence parallelism), so it is counted once, locally;
//   - a gradient sharded over dp (ZeRO-2): each dp rank holds a disjoint 1/dp of every
//     bucket, so both sums are first added up over the dp group. Unsharded gradients are
//     identical on every dp rank after the reduction and need no dp communication.
// Sums are accumulated in double.
#pragma once

#include "meshtrain/core/mesh.h"
#include "meshtrain/parallel/sharding.h"

#include <torch/torch.h>

#include <vector>

namespace meshtrain {

class GradNormParts {
public:
  // Adds ||grad||^2 to the partitioned or the replicated sum, by `spec`.
  void add(const torch::Tensor& grad, const ShardSpec& spec);
  void add(const torch::Tensor& grad, bool partitioned);
  // {partitioned, replicated} squared sums of what was added (one host sync).
  std::pair<double, double> squared_sums() const;

private:
  std::vector<torch::Tensor> partitioned_; // 0-d norms
  std::vector<torch::Tensor> replicated_;
};

// sqrt(tp_sum(partitioned) + replicated), both first summed over `dp` when it is given
// (gradients sharded over dp; nullptr: complete on every dp rank). Collective over `dp`
// (when given) and `tp`; free on groups of one.
double global_grad_norm(const GradNormParts& local, const CommunicatorPtr& tp,
                        const CommunicatorPtr& dp_sharded);
// The same with the mesh's "tp" and (when dp_sharded) "dp_cp" groups (gradients are sharded
// over the dp x cp ranks).
double global_grad_norm(const GradNormParts& local, const Mesh& mesh, bool dp_sharded);

// torch's clip coefficient: min(1, max_norm / (total_norm + 1e-6)); 1 when max_norm <= 0
// (clipping off) or the norm is not finite (the caller decides to skip the step).
double clip_coefficient(double total_norm, double max_norm);

// Clips param.grad of every trainable parameter of `model` in place and returns the norm
// before clipping. For gradients complete on every dp rank (no DP, or after
// DataParallelReducer::finish() without sharding). max_norm <= 0 only measures.
double clip_grad_norm_(const torch::nn::Module& model, double max_norm, const Mesh& mesh);

} // namespace meshtrain
