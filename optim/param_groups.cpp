// defines: the parameter-selection helpers of param_groups.h.
#include "meshtrain/optim/param_groups.h"

namespace meshtrain {

bool decays_by_default(const torch::Tensor& param) {
  return param.dim() >= 2;
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
