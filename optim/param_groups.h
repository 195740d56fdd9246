// defines: ParamGroup, decays_by_default, unique_trainable_parameters, decay_param_groups —
// which parameters an optimizer updates and which of them get weight decay.
//
// DESIGN §3: weight decay applies only to parameters with dim >= 2 (matmul weights and
// embeddings); biases and LayerNorm gains (dim 1) are never decayed. Tied weights (one tensor
// registered under two names, e.g. lm_head.weight = transformer.wte.weight) are updated once,
// under the first name named_parameters() lists.
#pragma once

#include <torch/torch.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace meshtrain {

struct ParamGroup {
  std::vector<torch::Tensor> params;
  // Overrides the optimizer's default weight decay for this group when set.
  std::optional<double> weight_decay;
};

// DESIGN §3's rule: decay when dim >= 2.
bool decays_by_default(const torch::Tensor& param);

// The parameters of `model` that require grad, in named_parameters() order, each tensor once
// (a tied weight keeps its first name).
std::vector<std::pair<std::string, torch::Tensor>>
unique_trainable_parameters(const torch::nn::Module& model);

// Two groups, as nanoGPT and Megatron build them: {params with dim >= 2, weight_decay} and
// {the rest, 0}. An empty group is left out.
std::vector<ParamGroup> decay_param_groups(const torch::nn::Module& model, double weight_decay);

} // namespace meshtrain
