// defines: ParallelLayerNormImpl (see parallel_layer_norm.h).
#include "meshtrain/parallel/parallel_layer_norm.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/parallel/mappings.h"

namespace meshtrain {
namespace {

// The mixed-precision policy's LayerNorm (DESIGN §3): x, weight, bias in the compute dtype
// (bf16/fp16) -> the output in that dtype, with the statistics, the affine and the backward
// computed in fp32 from the saved compute-dtype input (an fp32 copy of x is not kept).
// LibTorch's own bf16 layer_norm on CPU is also ~13x slower than fp32 at [8, 64, 128].
struct Fp32LayerNorm : torch::autograd::Function<Fp32LayerNorm> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& weight, const torch::Tensor& bias, double eps) {
    const auto shape = weight.sizes();
    auto [out, mean, rstd] = at::native_layer_norm(
        x.to(torch::kFloat), shape, weight.to(torch::kFloat), bias.to(torch::kFloat), eps);
    ctx->save_for_backward({x, weight, bias, mean, rstd}); // mean, rstd: [.., 1] fp32
    return out.to(x.scalar_type());
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& weight = saved[1];
    auto [dx, dw, db] = at::native_layer_norm_backward(
        grads[0].to(torch::kFloat), x.to(torch::kFloat), weight.sizes(), saved[3], saved[4],
        weight.to(torch::kFloat), saved[2].to(torch::kFloat), {true, true, true});
    return {dx.to(x.scalar_type()), dw.to(weight.scalar_type()), db.to(weight.scalar_type()),
            torch::Tensor()};
  }
};

} // namespace

ParallelLayerNormImpl::ParallelLayerNormImpl(ParallelLayerNormOptions options,
                                             CommunicatorPtr tp_group)
    : options_(std::move(options)), tp_group_(std::move(tp_group)) {
  MT_CHECK(tp_group_ != nullptr, "ParallelLayerNorm: the tp communicator is null");
  MT_CHECK(options_.normalized_size() > 0, "ParallelLayerNorm: normalized_size (",
           options_.normalized_size(), ") must be positive");
  reset();
}

void ParallelLayerNormImpl::reset() {
  ShardSpec spec = ShardSpec::replicated();
  spec.sequence_parallel = options_.sequence_parallel();
  weight = declare_parameter(*this, "weight", {options_.normalized_size()}, InitRule::ones(), spec);
  bias = declare_parameter(*this, "bias", {options_.normalized_size()}, InitRule::zeros(), spec);
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
  if (x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kDouble) {
    return torch::layer_norm(x, {options_.normalized_size()}, w, b, options_.eps());
  }
  return Fp32LayerNorm::apply(x, w, b, options_.eps());
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
