// defines: the parameter-selection helpers of param_groups.h.
#include "optim/param_groups.h"

#include <unordered_set>

namespace meshtrain {

bool decays_by_default(const torch::Tensor& param) {
  return param.dim() >= 2;
}

std::vector<std::pair<std::string, torch::Tensor>>
unique_trainable_parameters(const torch::nn::Module& model) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  std::unordered_set<const void*> seen;
  for (const auto& item : model.named_parameters()) {
    const auto& p = item.value();
    if (!p.requires_grad()) {
      continue;
    }
    // Identity of the tensor, not of its storage: two views of one buffer are two params.
    if (!seen.insert(p.unsafeGetTensorImpl()).second) {
      continue;
    }
    out.emplace_back(item.key(), p);
  }
  return out;
}

std::vector<ParamGroup> decay_param_groups(const torch::nn::Module& model, double weight_decay) {
  ParamGroup decay;
  ParamGroup no_decay;
  decay.weight_decay = weight_decay;
  no_decay.weight_decay = 0.0;
  for (const auto& [name, p] : unique_trainable_parameters(model)) {
    (decays_by_default(p) ? decay : no_decay).params.push_back(p);
  }
  std::vector<ParamGroup> groups;
  for (auto* g : {&decay, &no_decay}) {
    if (!g->params.empty()) {
      groups.push_back(std::move(*g));
    }
  }
  return groups;
}

} // namespace meshtrain
