// defines: GradAverager (see grad_averager.h).
#include "examples/mnist/grad_averager.h"

#include "core/errors.h"

namespace meshtrain::mnist {

GradAverager::GradAverager(std::vector<torch::Tensor> params, CommunicatorPtr group)
    : params_(std::move(params)), group_(std::move(group)) {
  int64_t total = 0;
  for (const auto& p : params_) {
    MT_CHECK(p.scalar_type() == torch::kFloat, "GradAverager: parameters must be float32, got ",
             p.scalar_type());
    total += p.numel();
  }
  flat_ = torch::empty({total}, torch::kFloat);
}

void GradAverager::average() {
  if (group_->size() == 1) {
    return;
  }
  torch::NoGradGuard no_grad;
  int64_t offset = 0;
  for (const auto& p : params_) {
    MT_CHECK(p.grad().defined(), "GradAverager: a parameter of shape ", p.sizes(),
             " has no gradient; call backward() first");
    flat_.narrow(0, offset, p.numel()).copy_(p.grad().reshape({-1}));
    offset += p.numel();
  }
  group_->all_reduce(flat_, ReduceOp::kAvg);
  offset = 0;
  for (auto& p : params_) {
    p.mutable_grad().copy_(flat_.narrow(0, offset, p.numel()).view_as(p));
    offset += p.numel();
  }
}

} // namespace meshtrain::mnist
