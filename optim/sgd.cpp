// defines: SGD and its update kernel (see sgd.h), in torch's operation order.
#include "meshtrain/optim/sgd.h"

#include "meshtrain/core/errors.h"

namespace meshtrain {

void SGDOptions::validate() const {
  MT_CHECK(lr() >= 0, "SGDOptions: lr must be >= 0, got ", lr());
  MT_CHECK(momentum() >= 0, "SGDOptions: momentum must be >= 0, got ", momentum());
  MT_CHECK(weight_decay() >= 0, "SGDOptions: weight_decay must be >= 0, got ", weight_decay());
  MT_CHECK(!nesterov() || (momentum() > 0 && dampening() == 0),
           "SGDOptions: nesterov needs momentum > 0 and dampening 0, got momentum ", momentum(),
           " and dampening ", dampening());
}

void sgd_update_(const torch::Tensor& param, const torch::Tensor& d_p,
                 const torch::Tensor& momentum_buffer, bool first, double lr,
                 const SGDOptions& options) {
  auto step = d_p;
  if (options.momentum() != 0) {
    if (first) {
      momentum_buffer.copy_(d_p);
    } else {
      momentum_buffer.mul_(options.momentum()).add_(d_p, 1 - options.dampening());
    }
    step = options.nesterov() ? d_p.add(momentum_buffer, options.momentum()) : momentum_buffer;
  }
  param.add_(step, -lr);
}

SGD::SGD(std::vector<ParamGroup> groups, SGDOptions options)
    : groups_(std::move(groups)), options_(options) {
  options_.validate();
  for (const auto& g : groups_) {
    momentum_.emplace_back(g.params.size());
  }
}

void SGD::step() {
  torch::NoGradGuard no_grad;
  for (size_t g = 0; g < groups_.size(); ++g) {
    const double wd = groups_[g].weight_decay.value_or(options_.weight_decay());
    for (size_t i = 0; i < groups_[g].params.size(); ++i) {
      const auto& p = groups_[g].params[i];
      if (!p.grad().defined()) {
        continue;
      }
      auto d_p = wd != 0 ? p.grad().add(p, wd) : p.grad();
      auto& buf = momentum_[g][i];
      const bool first = !buf.defined();
      if (first && options_.momentum() != 0) {
        buf = torch::empty_like(p, torch::MemoryFormat::Preserve);
      }
      sgd_update_(p, d_p, buf, first, options_.lr(), options_);
    }
  }
}

void SGD::zero_grad() {
  for (auto& g : groups_) {
    for (auto& p : g.params) {
      p.mutable_grad().reset();
    }
  }
}

void SGD::set_lr(double lr) {
  MT_CHECK(lr >= 0, "SGD::set_lr: lr must be >= 0, got ", lr);
  options_.lr(lr);
}

} // namespace meshtrain
