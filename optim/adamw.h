// defines: AdamWOptions, adamw_update_ and fused_adamw_ (the update shared with ZeroOptimizer),
// torch.optim.AdamW's semantics (DESIGN §3) over parameter groups.
//
// One step, with t the 1-based step count of the parameter:
//   p   <- p * (1 - lr * wd)                         decoupled decay, before the moments
//   m   <- beta1 * m + (1 - beta1) * g
//   v   <- beta2 * v + (1 - beta2) * g^2
//   p   <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// eps is added outside the square root, after the bias correction of v, exactly as torch
// does, so a run matches torch::optim::AdamW bit for bit on the same gradients.
#pragma once

#include <torch/torch.h>

#include "meshtrain/optim/param_groups.h"

#include <cstdint>
#include <vector>

namespace meshtrain {

struct AdamWOptions {
  /* implicit */ AdamWOptions(double lr = 1e-3) : lr_(lr) {}
  TORCH_ARG(double, lr) = 1e-3;
  TORCH_ARG(double, beta1) = 0.9;
  TORCH_ARG(double, beta2) = 0.95;
  TORCH_ARG(double, eps) = 1e-8;
  // Applied to the groups without their own weight_decay (decay_param_groups sets both).
  TORCH_ARG(double, weight_decay) = 0.1;

public:
  // Throws naming the bad value: lr >= 0, 0 <= beta < 1, eps >= 0, weight_decay >= 0.
  void validate() const;
};

// p <- p * (1 - lr * weight_decay). A no-op for weight_decay == 0.
void decoupled_weight_decay_(const torch::Tensor& param, double lr, double weight_decay);

// The moment update and the bias-corrected step of AdamW (without the decay), in place on
// param, exp_avg and exp_avg_sq (all the same shape, fp32 for the moments). `step` is the
// 1-based count including this update.
void adamw_update_(const torch::Tensor& param, const torch::Tensor& grad,
                   const torch::Tensor& exp_avg, const torch::Tensor& exp_avg_sq, int64_t step,
                   double lr, const AdamWOptions& options);

// decoupled_weight_decay_ then adamw_update_, in one pass over memory instead of ten, with the
// same result bit for bit. Takes that path for contiguous fp32 CPU tensors (optim/
// adamw_kernel.h); others (CUDA, other dtypes) run the two calls.
void fused_adamw_(const torch::Tensor& param, const torch::Tensor& grad,
                  const torch::Tensor& exp_avg, const torch::Tensor& exp_avg_sq, int64_t step,
                  double lr, double weight_decay, const AdamWOptions& options);

// A plain (unsharded, per-tensor) AdamW. Parameters whose grad is undefined are skipped and
// their step count does not advance, as in torch.
class AdamW {
public:
  AdamW(std::vector<ParamGroup> groups, AdamWOptions options = {});

  void step();
  // Sets every parameter's grad to undefined (torch's set_to_none).
  void zero_grad();
  void set_lr(double lr);
  double lr() const { return options_.lr(); }
  const AdamWOptions& options() const { return options_; }
  const std::vector<ParamGroup>& param_groups() const { return groups_; }

  struct State {
    int64_t step = 0;
    torch::Tensor exp_avg;
    torch::Tensor exp_avg_sq;
  };
  // State of group g, parameter i (step 0 and undefined moments before the first update).
  const State& state(size_t group, size_t index) const;

private:
  std::vector<ParamGroup> groups_;
  AdamWOptions options_;
  std::vector<std::vector<State>> state_;
};

} // namespace meshtrain
