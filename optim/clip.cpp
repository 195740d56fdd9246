// defines: the global gradient norm and clipping of clip.h.
#include "meshtrain/optim/clip.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/optim/param_groups.h"

#include <cmath>
#include <map>

namespace meshtrain {

void GradNormParts::add(const torch::Tensor& grad, const ShardSpec& spec) {
  MT_CHECK(!spec.is_partitioned() || spec.group == "tp",
           "GradNormParts: parameters partitioned over '", spec.group,
           "' are not supported; only 'tp' partitions are summed");
  add(grad, spec.is_partitioned());
}

void GradNormParts::add(const torch::Tensor& grad, bool partitioned) {
  if (!grad.defined() || grad.numel() == 0) {
    return;
  }
  (partitioned ? partitioned_ : replicated_).push_back(grad.detach().norm().to(torch::kDouble));
}

std::pair<double, double> GradNormParts::squared_sums() const {
  auto sum_sq = [](const std::vector<torch::Tensor>& norms) {
    return norms.empty() ? 0.0 : torch::stack(norms).square().sum().item<double>();
  };
  return {sum_sq(partitioned_), sum_sq(replicated_)};
}

double global_grad_norm(const GradNormParts& local, const CommunicatorPtr& tp,
                        const CommunicatorPtr& dp_sharded) {
  auto [partitioned, replicated] = local.squared_sums();
  const auto& dp = dp_sharded;
  if (dp && dp->size() > 1) {
    auto sums = torch::tensor({partitioned, replicated}, torch::kDouble);
    dp->all_reduce(sums, ReduceOp::kSum);
    partitioned = sums[0].item<double>();
    replicated = sums[1].item<double>();
  }
  if (tp && tp->size() > 1) {
    auto sum = torch::tensor({partitioned}, torch::kDouble);
    tp->all_reduce(sum, ReduceOp::kSum);
    partitioned = sum[0].item<double>();
  }
  return std::sqrt(partitioned + replicated);
}

double global_grad_norm(const GradNormParts& local, const Mesh& mesh, bool dp_sharded) {
  return global_grad_norm(local, mesh.group("tp"), dp_sharded ? mesh.group("dp_cp") : nullptr);
}

double clip_coefficient(double total_norm, double max_norm) {
  if (max_norm <= 0 || !std::isfinite(total_norm)) {
    return 1.0;
  }
  return std::min(1.0, max_norm / (total_norm + 1e-6));
}

double clip_grad_norm_(const torch::nn::Module& model, double max_norm, const Mesh& mesh) {
  std::map<std::string, ShardSpec> specs;
  for (auto& [name, spec] : named_shard_specs(model)) {
    specs.emplace(name, spec);
  }
  GradNormParts parts;
  std::vector<torch::Tensor> grads;
  for (const auto& [name, p] : unique_trainable_parameters(model)) {
    if (p.grad().defined()) {
      parts.add(p.grad(), specs.at(name));
      grads.push_back(p.grad());
    }
  }
  const double norm = global_grad_norm(parts, mesh, /*dp_sharded=*/false);
  const double coef = clip_coefficient(norm, max_norm);
  if (coef < 1.0) {
    torch::NoGradGuard no_grad;
    for (auto& g : grads) {
      g.mul_(coef);
    }
  }
  return norm;
}

} // namespace meshtrain
