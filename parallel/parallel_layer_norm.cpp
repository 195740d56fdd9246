// defines: ParallelLayerNormImpl (see parallel_layer_norm.h).
#include "meshtrain/parallel/parallel_layer_norm.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/parallel/mappings.h"

namespace meshtrain {

ParallelLayerNormImpl::ParallelLayerNormImpl(ParallelLayerNormOptions options,
                                             CommunicatorPtr tp_group)
    : options_(std::move(options)), tp_group_(std::move(tp_group)) {
  MT_CHECK(tp_group_ != nullptr, "ParallelLayerNorm: the tp communicator is null");
  MT_CHECK(options_.normalized_size() > 0, "ParallelLayerNorm: normalized_size (",
           options_.normalized_size(), ") must be positive");
  reset();
}

void ParallelLayerNormImpl::reset() {
  weight = register_parameter("weight", torch::ones({options_.normalized_size()}));
  bias = register_parameter("bias", torch::zeros({options_.normalized_size()}));
  ShardSpec spec = ShardSpec::replicated();
  spec.sequence_parallel = options_.sequence_parallel();
  set_shard_spec("weight", spec);
  set_shard_spec("bias", spec);
}

void ParallelLayerNormImpl::pretty_print(std::ostream& stream) const {
  stream << "meshtrain::ParallelLayerNorm(" << options_.normalized_size()
         << ", eps=" << options_.eps()
         << ", sequence_parallel=" << (options_.sequence_parallel() ? "true" : "false") << ")";
}

torch::Tensor ParallelLayerNormImpl::forward(const torch::Tensor& x) {
  MT_CHECK(x.dim() >= 1 && x.size(-1) == options_.normalized_size(),
           "ParallelLayerNorm: input has sizes ", x.sizes(), "; its last dim must be ",
           options_.normalized_size());
  auto w = weight;
  auto b = bias;
  if (options_.sequence_parallel()) {
    auto synced = copy_params_to_sequence_parallel_region({weight, bias}, tp_group_);
    w = synced[0];
    b = synced[1];
  }
  return torch::nn::functional::layer_norm(
      x, torch::nn::functional::LayerNormFuncOptions({options_.normalized_size()})
             .weight(w)
             .bias(b)
             .eps(options_.eps()));
}

void ParallelLayerNormImpl::apply_tensor_parallel(const TensorParallelism& tp) {
  MT_CHECK(tp_group_->size() == 1, "ParallelLayerNorm: already laid out over a group of ",
           tp_group_->size(), " ranks; apply_tensor_parallel takes a serial layer");
  MT_CHECK(tp.group != nullptr, "ParallelLayerNorm: the tp communicator is null");
  options_.sequence_parallel(tp.sequence_parallel);
  tp_group_ = tp.group;
  ShardSpec spec = ShardSpec::replicated();
  spec.sequence_parallel = tp.sequence_parallel;
  set_shard_spec("weight", spec);
  set_shard_spec("bias", spec);
}

} // namespace meshtrain
