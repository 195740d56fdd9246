// defines: ColumnParallelLinearImpl (see column_parallel_linear.h).
#include "meshtrain/parallel/column_parallel_linear.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/parallel/mappings.h"
#include "meshtrain/parallel/shard_tensor.h"

namespace meshtrain {

ColumnParallelLinearImpl::ColumnParallelLinearImpl(ColumnParallelLinearOptions options,
                                                   CommunicatorPtr tp_group)
    : options_(std::move(options)), tp_group_(std::move(tp_group)) {
  MT_CHECK(tp_group_ != nullptr, "ColumnParallelLinear: the tp communicator is null");
  const int tp = tp_group_->size();
  const auto& o = options_;
  MT_CHECK(o.in_features() > 0 && o.out_features() > 0, "ColumnParallelLinear: in_features (",
           o.in_features(), ") and out_features (", o.out_features(), ") must be positive");
  MT_CHECK(o.blocks() >= 1, "ColumnParallelLinear: blocks (", o.blocks(), ") must be >= 1");
  MT_CHECK(o.out_features() % (o.blocks() * tp) == 0, "ColumnParallelLinear: out_features (",
           o.out_features(), ") must be divisible by blocks (", o.blocks(), ") x tp (", tp, ")");
  MT_CHECK(!(o.gather_output() && o.blocks() > 1),
           "ColumnParallelLinear: gather_output with blocks (", o.blocks(),
           ") > 1 would interleave the blocks of different ranks; use gather_output(false)");
  reset();
}

void ColumnParallelLinearImpl::reset() {
  const auto& o = options_;
  const int tp = tp_group_->size();
  const int rank = tp_group_->rank();
  // Rows of the whole [out, in] weight and [out] bias, cut block by block.
  const auto spec = partitioned_spec(0, o.out_features(), rank, tp, -1, o.blocks());
  weight = declare_parameter(*this, "weight", {o.out_features(), o.in_features()},
                             InitRule::normal(o.init_std()), spec, tp);
  if (o.bias()) {
    bias = declare_parameter(*this, "bias", {o.out_features()}, InitRule::zeros(), spec, tp);
  } else {
    bias = register_parameter("bias", torch::Tensor(), /*requires_grad=*/false);
  }
}

void ColumnParallelLinearImpl::pretty_print(std::ostream& stream) const {
  stream << "meshtrain::ColumnParallelLinear(in_features=" << options_.in_features()
         << ", out_features=" << options_.out_features() << ", tp=" << tp_group_->size()
         << ", bias=" << (options_.bias() ? "true" : "false")
         << ", gather_output=" << (options_.gather_output() ? "true" : "false")
         << ", sequence_parallel=" << (options_.sequence_parallel() ? "true" : "false");
  if (options_.blocks() > 1) {
    stream << ", blocks=" << options_.blocks();
  }
  stream << ")";
}

torch::Tensor ColumnParallelLinearImpl::forward(const torch::Tensor& x) {
  MT_CHECK(x.dim() >= 1 && x.size(-1) == options_.in_features(),
           "ColumnParallelLinear: input has sizes ", x.sizes(),
           "; its last dim must be in_features (", options_.in_features(), ")");
  // [B, T, in] on every rank; each rank's branch adds part of the input's gradient.
  const auto input = options_.sequence_parallel()
                         ? gather_from_sequence_parallel_region(x, tp_group_)
                         : copy_to_tp_region(x, tp_group_);
  auto y = torch::nn::functional::linear(input, weight, bias); // [B, T, out/tp]
  return options_.gather_output() ? gather_from_tp_region(y, tp_group_) : y;
}

void ColumnParallelLinearImpl::apply_tensor_parallel(const TensorParallelism& tp) {
  MT_CHECK(tp_group_->size() == 1, "ColumnParallelLinear: already laid out over a group of ",
           tp_group_->size(), " ranks; apply_tensor_parallel takes a serial layer");
  MT_CHECK(tp.group != nullptr, "ColumnParallelLinear: the tp communicator is null");
  const int size = tp.group->size();
  const int rank = tp.group->rank();
  const auto& o = options_;
  MT_CHECK(o.out_features() % (o.blocks() * size) == 0, "ColumnParallelLinear: out_features (",
           o.out_features(), ") must be divisible by blocks (", o.blocks(), ") x tp (", size, ")");
  keep_shard(weight, 0, rank, size, o.blocks());
  set_shard_spec("weight", partitioned_spec(0, o.out_features(), rank, size, -1, o.blocks()));
  if (bias.defined()) {
    keep_shard(bias, 0, rank, size, o.blocks());
    set_shard_spec("bias", partitioned_spec(0, o.out_features(), rank, size, -1, o.blocks()));
  }
  options_.sequence_parallel(tp.sequence_parallel);
  tp_group_ = tp.group;
}

} // namespace meshtrain
