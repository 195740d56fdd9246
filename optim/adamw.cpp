// defines: AdamW and its update kernel (see adamw.h). The kernel follows torch's operation
// order so results agree bit for bit with torch::optim::AdamW on equal gradients.
#include "meshtrain/optim/adamw.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/optim/adamw_kernel.h"

#include <cmath>

namespace meshtrain {

void AdamWOptions::validate() const {
  MT_CHECK(lr() >= 0, "AdamWOptions: lr must be >= 0, got ", lr());
  MT_CHECK(beta1() >= 0 && beta1() < 1, "AdamWOptions: beta1 must be in [0, 1), got ", beta1());
  MT_CHECK(beta2() >= 0 && beta2() < 1, "AdamWOptions: beta2 must be in [0, 1), got ", beta2());
  MT_CHECK(eps() >= 0, "AdamWOptions: eps must be >= 0, got ", eps());
  MT_CHECK(weight_decay() >= 0, "AdamWOptions: weight_decay must be >= 0, got ", weight_decay());
}

void decoupled_weight_decay_(const torch::Tensor& param, double lr, double weight_decay) {
  if (weight_decay != 0.0) {
    param.mul_(1 - lr * weight_decay);
  }
}

void adamw_update_(const torch::Tensor& param, const torch::Tensor& grad,
                   const torch::Tensor& exp_avg, const torch::Tensor& exp_avg_sq, int64_t step,
                   double lr, const AdamWOptions& options) {
  MT_ASSERT(step >= 1, "adamw_update_: step is 1-based, got ", step);
  const double beta1 = options.beta1();
  const double beta2 = options.beta2();
  const double bias_correction1 = 1 - std::pow(beta1, static_cast<double>(step));
  const double bias_correction2 = 1 - std::pow(beta2, static_cast<double>(step));
  exp_avg.mul_(beta1).add_(grad, 1 - beta1);
  exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2);
  // eps outside the sqrt, after the bias correction of v (torch's order, not the paper's).
  const auto denom = (exp_avg_sq.sqrt() / std::sqrt(bias_correction2)).add_(options.eps());
  param.addcdiv_(exp_avg, denom, -lr / bias_correction1);
}

void fused_adamw_(const torch::Tensor& param, const torch::Tensor& grad,
                  const torch::Tensor& exp_avg, const torch::Tensor& exp_avg_sq, int64_t step,
                  double lr, double weight_decay, const AdamWOptions& options) {
  const auto fits = [&](const torch::Tensor& t) {
    return t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous() &&
           t.numel() == param.numel();
  };
  if (!(fits(param) && fits(grad) && fits(exp_avg) && fits(exp_avg_sq))) {
    decoupled_weight_decay_(param, lr, weight_decay);
    adamw_update_(param, grad, exp_avg, exp_avg_sq, step, lr, options);
    return;
  }
  MT_ASSERT(step >= 1, "fused_adamw_: step is 1-based, got ", step);
  // The scalars as adamw_update_ computes them in double, rounded to fp32 where torch's
  // kernels take them.
  const double bias_correction1 = 1 - std::pow(options.beta1(), static_cast<double>(step));
  const double bias_correction2 = 1 - std::pow(options.beta2(), static_cast<double>(step));
  detail::AdamWScalars s;
  s.decay = weight_decay != 0.0 ? static_cast<float>(1 - lr * weight_decay) : 1.0f;
  s.beta1 = static_cast<float>(options.beta1());
  s.one_minus_beta1 = static_cast<float>(1 - options.beta1());
  s.beta2 = static_cast<float>(options.beta2());
  s.one_minus_beta2 = static_cast<float>(1 - options.beta2());
  s.sqrt_bias_correction2 = static_cast<float>(std::sqrt(bias_correction2));
  s.eps = static_cast<float>(options.eps());
  s.step_size = static_cast<float>(-lr / bias_correction1);
  detail::adamw_kernel(param.data_ptr<float>(), grad.data_ptr<float>(), exp_avg.data_ptr<float>(),
                       exp_avg_sq.data_ptr<float>(), param.numel(), s);
}

AdamW::AdamW(std::vector<ParamGroup> groups, AdamWOptions options)
    : groups_(std::move(groups)), options_(options) {
  options_.validate();
  for (size_t g = 0; g < groups_.size(); ++g) {
    MT_CHECK(!groups_[g].weight_decay || *groups_[g].weight_decay >= 0, "AdamW: group ", g,
             " has weight_decay ", groups_[g].weight_decay.value_or(0), "; must be >= 0");
    state_.emplace_back(groups_[g].params.size());
  }
}

void AdamW::step() {
  torch::NoGradGuard no_grad;
  for (size_t g = 0; g < groups_.size(); ++g) {
    const double wd = groups_[g].weight_decay.value_or(options_.weight_decay());
    for (size_t i = 0; i < groups_[g].params.size(); ++i) {
      const auto& p = groups_[g].params[i];
      const auto& grad = p.grad();
      if (!grad.defined()) {
        continue;
      }
      auto& s = state_[g][i];
      if (s.step == 0) {
        s.exp_avg = torch::zeros_like(p, torch::MemoryFormat::Preserve);
        s.exp_avg_sq = torch::zeros_like(p, torch::MemoryFormat::Preserve);
      }
      s.step += 1;
      fused_adamw_(p, grad, s.exp_avg, s.exp_avg_sq, s.step, options_.lr(), wd, options_);
    }
  }
}

void AdamW::zero_grad() {
  for (auto& g : groups_) {
    for (auto& p : g.params) {
      p.mutable_grad().reset();
    }
  }
}

void AdamW::set_lr(double lr) {
  MT_CHECK(lr >= 0, "AdamW::set_lr: lr must be >= 0, got ", lr);
  options_.lr(lr);
}

const AdamW::State& AdamW::state(size_t group, size_t index) const {
  MT_CHECK(group < state_.size() && index < state_[group].size(), "AdamW::state: (group ", group,
           ", index ", index, ") is out of range");
  return state_[group][index];
}

} // namespace meshtrain
