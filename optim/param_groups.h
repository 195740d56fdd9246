// defines: ParamGroup, decays_by_default, decay_param_groups —
// which parameters an optimizer updates and which of them get weight decay.
//
// DESIGN §3: weight decay applies only to parameters with dim >= 2 (matmul weights and
// embeddings); biases and LayerNorm gains (dim 1) are never decayed. Tied weights (one tensor
// registered under two names, e.g. lm_head.weight = transformer.wte.weight) are updated once,
// under the first name named_parameters() lists.
#pragma once

#include "meshtrain/parallel/bucket_layout.h" // unique_trainable_parameters

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

// Two groups, as nanoGPT and Megatron build them: {params with dim >= 2, weight_decay} and
// {the rest, 0}. An empty group is left out.
std::vector<ParamGroup> decay_param_groups(const torch::nn::Module& model, double weight_decay);

} // namespace meshtrain
