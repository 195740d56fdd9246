// defines: RowParallelLinearImpl (see row_parallel_linear.h).
#include "meshtrain/parallel/row_parallel_linear.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/parallel/mappings.h"
#include "meshtrain/parallel/shard_tensor.h"

namespace meshtrain {

RowParallelLinearImpl::RowParallelLinearImpl(RowParallelLinearOptions options,
                                             CommunicatorPtr tp_group)
    : options_(std::move(options)), tp_group_(std::move(tp_group)) {
  MT_CHECK(tp_group_ != nullptr, "RowParallelLinear: the tp communicator is null");
  const int tp = tp_group_->size();
  const auto& o = options_;
  MT_CHECK(o.in_features() > 0 && o.out_features() > 0, "RowParallelLinear: in_features (",
           o.in_features(), ") and out_features (", o.out_features(), ") must be positive");
  MT_CHECK(o.in_features() % tp == 0, "RowParallelLinear: in_features (", o.in_features(),
           ") must be divisible by tp (", tp, ")");
  MT_CHECK(!o.sequence_parallel() || o.input_is_parallel(),
           "RowParallelLinear: sequence_parallel needs input_is_parallel (the input must be "
           "the output of a column-parallel layer)");
  reset();
}

void RowParallelLinearImpl::reset() {
  const auto& o = options_;
  const int tp = tp_group_->size();
  const int rank = tp_group_->rank();
  // Columns of the whole [out, in] weight; the bias is whole on every rank.
  weight = declare_parameter(*this, "weight", {o.out_features(), o.in_features()},
                             InitRule::normal(o.init_std()),
                             partitioned_spec(1, o.in_features(), rank, tp), tp);
  if (o.bias()) {
    ShardSpec spec = ShardSpec::replicated();
    spec.sequence_parallel = o.sequence_parallel();
    bias = declare_parameter(*this, "bias", {o.out_features()}, InitRule::zeros(), spec);
  } else {
    bias = register_parameter("bias", torch::Tensor(), /*requires_grad=*/false);
  }
}

void RowParallelLinearImpl::pretty_print(std::ostream& stream) const {
  stream << "meshtrain::RowParallelLinear(in_features=" << options_.in_features()
         << ", out_features=" << options_.out_features() << ", tp=" << tp_group_->size()
         << ", bias=" << (options_.bias() ? "true" : "false")
         << ", input_is_parallel=" << (options_.input_is_parallel() ? "true" : "false")
         << ", sequence_parallel=" << (options_.sequence_parallel() ? "true" : "false") << ")";
}

torch::Tensor RowParallelLinearImpl::forward(const torch::Tensor& x) {
  const int64_t tp = tp_group_->size();
  const int64_t expected =
      options_.input_is_parallel() ? options_.in_features() / tp : options_.in_features();
  MT_CHECK(x.dim() >= 1 && x.size(-1) == expected, "RowParallelLinear: input has sizes ", x.sizes(),
           "; its last dim must be ", expected,
           options_.input_is_parallel() ? " (in_features / tp)" : " (in_features)");
  const auto input = options_.input_is_parallel() ? x : scatter_to_tp_region(x, tp_group_);
  const auto partial = torch::nn::functional::linear(input, weight); // [B, T, out], partial sum
  auto y = options_.sequence_parallel()
               ? reduce_scatter_to_sequence_parallel_region(partial, tp_group_) // [B, T/tp, out]
               : reduce_from_tp_region(partial, tp_group_);                     // [B, T, out]
  if (!bias.defined()) {
    return y;
  }
  if (options_.sequence_parallel()) {
    return y + copy_params_to_sequence_parallel_region({bias}, tp_group_)[0];
  }
  return y + bias;
}

void RowParallelLinearImpl::apply_tensor_parallel(const TensorParallelism& tp) {
  MT_CHECK(tp_group_->size() == 1, "RowParallelLinear: already laid out over a group of ",
           tp_group_->size(), " ranks; apply_tensor_parallel takes a serial layer");
  MT_CHECK(tp.group != nullptr, "RowParallelLinear: the tp communicator is null");
  const int size = tp.group->size();
  const int rank = tp.group->rank();
  const auto& o = options_;
  MT_CHECK(o.in_features() % size == 0, "RowParallelLinear: in_features (", o.in_features(),
           ") must be divisible by tp (", size, ")");
  MT_CHECK(!tp.sequence_parallel || o.input_is_parallel(),
           "RowParallelLinear: sequence parallelism needs input_is_parallel (the input must be "
           "the output of a column-parallel layer)");
  keep_shard(weight, 1, rank, size);
  set_shard_spec("weight", partitioned_spec(1, o.in_features(), rank, size));
  if (bias.defined()) {
    ShardSpec spec = ShardSpec::replicated();
    spec.sequence_parallel = tp.sequence_parallel;
    set_shard_spec("bias", spec);
  }
  options_.sequence_parallel(tp.sequence_parallel);
  tp_group_ = tp.group;
}

} // namespace meshtrain
