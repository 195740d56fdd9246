// defines: SGDOptions, sgd_update_ (the kernel shared with ZeroOptimizer), SGD —
// torch.optim.SGD's semantics over parameter groups.
//
// One step (weight decay is classic L2, folded into the gradient, unlike AdamW's):
//   d   <- g + wd * p
//   buf <- d                                   first step
//   buf <- momentum * buf + (1 - dampening) * d later steps
//   d   <- d + momentum * buf  (nesterov)  or  buf
//   p   <- p - lr * d
// With momentum == 0 there is no buffer and d is applied directly.
#pragma once

#include <torch/torch.h>

#include "meshtrain/optim/param_groups.h"

#include <vector>

namespace meshtrain {

struct SGDOptions {
  /* implicit */ SGDOptions(double lr = 1e-2) : lr_(lr) {}
  TORCH_ARG(double, lr) = 1e-2;
  TORCH_ARG(double, momentum) = 0.0;
  TORCH_ARG(double, dampening) = 0.0;
  // Applied to the groups without their own weight_decay.
  TORCH_ARG(double, weight_decay) = 0.0;
  TORCH_ARG(bool, nesterov) = false;

public:
  // Throws naming the bad value; nesterov needs momentum > 0 and dampening == 0 (as torch).
  void validate() const;
};

// The momentum step and the parameter update, given d = g + wd * p already formed.
// `momentum_buffer` is ignored (may be undefined) when momentum == 0; `first` makes the
// buffer a copy of d instead of a running average.
void sgd_update_(const torch::Tensor& param, const torch::Tensor& d_p,
                 const torch::Tensor& momentum_buffer, bool first, double lr,
                 const SGDOptions& options);

class SGD {
public:
  SGD(std::vector<ParamGroup> groups, SGDOptions options = {});

  void step();
  void zero_grad();
  void set_lr(double lr);
  double lr() const { return options_.lr(); }
  const SGDOptions& options() const { return options_; }

private:
  std::vector<ParamGroup> groups_;
  SGDOptions options_;
  std::vector<std::vector<torch::Tensor>> momentum_; // undefined until the first step
};

} // namespace meshtrain
