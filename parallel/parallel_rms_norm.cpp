// defines: ParallelRMSNormImpl (see parallel_rms_norm.h).
#include "meshtrain/parallel/parallel_rms_norm.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/parallel/mappings.h"

namespace meshtrain {

ParallelRMSNormImpl::ParallelRMSNormImpl(ParallelRMSNormOptions options, CommunicatorPtr tp_group)
    : options_(std::move(options)), tp_group_(std::move(tp_group)) {
  MT_CHECK(tp_group_ != nullptr, "ParallelRMSNorm: the tp communicator is null");
  MT_CHECK(options_.normalized_size() > 0, "ParallelRMSNorm: normalized_size (",
           options_.normalized_size(), ") must be positive");
  MT_CHECK(options_.eps() >= 0.0, "ParallelRMSNorm: eps (", options_.eps(), ") must be >= 0");
  reset();
}

void ParallelRMSNormImpl::reset() {
  ShardSpec spec = ShardSpec::replicated();
  spec.sequence_parallel = options_.sequence_parallel();
  weight = declare_parameter(*this, "weight", {options_.normalized_size()}, InitRule::ones(), spec);
}

void ParallelRMSNormImpl::pretty_print(std::ostream& stream) const {
  stream << "meshtrain::ParallelRMSNorm(" << options_.normalized_size()
         << ", eps=" << options_.eps()
         << ", sequence_parallel=" << (options_.sequence_parallel() ? "true" : "false") << ")";
}

torch::Tensor ParallelRMSNormImpl::forward(const torch::Tensor& x) {
  MT_CHECK(x.dim() >= 1 && x.size(-1) == options_.normalized_size(),
           "ParallelRMSNorm: input has sizes ", x.sizes(), "; its last dim must be ",
           options_.normalized_size());
  const auto w = options_.sequence_parallel()
                     ? copy_params_to_sequence_parallel_region({weight}, tp_group_)[0]
                     : weight;
  const auto xf = x.to(torch::kFloat); // [.., C] fp32
  const auto inv_rms = torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + options_.eps());
  return w * (xf * inv_rms).to(x.scalar_type()); // [.., C]
}

void ParallelRMSNormImpl::apply_tensor_parallel(const TensorParallelism& tp) {
  MT_CHECK(tp_group_->size() == 1, "ParallelRMSNorm: already laid out over a group of ",
           tp_group_->size(), " ranks; apply_tensor_parallel takes a serial layer");
  MT_CHECK(tp.group != nullptr, "ParallelRMSNorm: the tp communicator is null");
  options_.sequence_parallel(tp.sequence_parallel);
  tp_group_ = tp.group;
  ShardSpec spec = ShardSpec::replicated();
  spec.sequence_parallel = tp.sequence_parallel;
  set_shard_spec("weight", spec);
}

} // namespace meshtrain
