// defines: GradScaler (see grad_scaler.h).
#include "meshtrain/optim/grad_scaler.h"

#include "meshtrain/core/errors.h"

#include <utility>

namespace meshtrain {

GradScaler::GradScaler(GradScalerOptions options, CommunicatorPtr group)
    : options_(std::move(options)), group_(std::move(group)), scale_(options_.init_scale()) {
  MT_CHECK(options_.init_scale() > 0 && options_.growth_factor() > 1 &&
               options_.backoff_factor() > 0 && options_.backoff_factor() < 1 &&
               options_.growth_interval() >= 1,
           "GradScaler: init_scale (", options_.init_scale(), ") must be > 0, growth_factor (",
           options_.growth_factor(), ") > 1, backoff_factor (", options_.backoff_factor(),
           ") in (0, 1), growth_interval (", options_.growth_interval(), ") >= 1");
}

bool GradScaler::unscale_and_check(const std::vector<torch::Tensor>& grads) {
  torch::NoGradGuard no_grad;
  bool found = false;
  for (const auto& g : grads) {
    g.mul_(1.0 / scale_);
    found = found || !torch::isfinite(g).all().item<bool>();
  }
  auto flag = torch::tensor({found ? 1 : 0}, torch::kInt);
  group_->all_reduce(flag, ReduceOp::kMax);
  if (flag.item<int>() != 0) {
    scale_ *= options_.backoff_factor();
    clean_steps_ = 0;
    ++skipped_;
    return true;
  }
  if (++clean_steps_ >= options_.growth_interval()) {
    scale_ *= options_.growth_factor();
    clean_steps_ = 0;
  }
  return false;
}

void GradScaler::set_state(double scale, int64_t clean_steps) {
  MT_CHECK(scale > 0 && clean_steps >= 0, "GradScaler::set_state: scale (", scale,
           ") must be > 0 and clean_steps (", clean_steps, ") >= 0");
  scale_ = scale;
  clean_steps_ = clean_steps;
}

} // namespace meshtrain
