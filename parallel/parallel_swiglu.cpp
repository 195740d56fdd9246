// defines: ParallelSwiGLUImpl (see parallel_swiglu.h).
#include "meshtrain/parallel/parallel_swiglu.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/parallel/column_parallel_fanout.h"

#include <cmath>

namespace meshtrain {
namespace {

void check_split(const ParallelSwiGLUOptions& o, int tp) {
  MT_CHECK(o.n_embd() > 0 && o.ffn_dim() > 0, "ParallelSwiGLU: n_embd (", o.n_embd(),
           ") and ffn_dim (", o.ffn_dim(), ") must be positive");
  MT_CHECK(o.ffn_dim() % tp == 0, "ParallelSwiGLU: ffn_dim (", o.ffn_dim(),
           ") must be divisible by tp (", tp, ")");
  MT_CHECK(o.n_layer() >= 1, "ParallelSwiGLU: n_layer (", o.n_layer(), ") must be >= 1");
}

} // namespace

ParallelSwiGLUImpl::ParallelSwiGLUImpl(ParallelSwiGLUOptions options, CommunicatorPtr tp_group)
    : options_(std::move(options)), tp_group_(std::move(tp_group)) {
  MT_CHECK(tp_group_ != nullptr, "ParallelSwiGLU: the tp communicator is null");
  check_split(options_, tp_group_->size());
  reset();
}

void ParallelSwiGLUImpl::reset() {
  const auto& o = options_;
  const auto column = [&]() {
    return ColumnParallelLinear(ColumnParallelLinearOptions(o.n_embd(), o.ffn_dim())
                                    .bias(false)
                                    .gather_output(false)
                                    .sequence_parallel(o.sequence_parallel())
                                    .init_std(o.init_std()),
                                tp_group_);
  };
  // Draw order: gate_proj, up_proj, down_proj.
  gate_proj = register_module("gate_proj", column());
  up_proj = register_module("up_proj", column());
  down_proj = register_module(
      "down_proj",
      RowParallelLinear(
          RowParallelLinearOptions(o.ffn_dim(), o.n_embd())
              .bias(false)
              .input_is_parallel(true)
              .sequence_parallel(o.sequence_parallel())
              .init_std(o.init_std() / std::sqrt(2.0 * static_cast<double>(o.n_layer()))),
          tp_group_));
}

void ParallelSwiGLUImpl::apply_tensor_parallel(const TensorParallelism& tp) {
  MT_CHECK(tp_group_->size() == 1, "ParallelSwiGLU: already laid out over a group of ",
           tp_group_->size(), " ranks; apply_tensor_parallel takes a serial layer");
  MT_CHECK(tp.group != nullptr, "ParallelSwiGLU: the tp communicator is null");
  check_split(options_, tp.group->size());
  options_.sequence_parallel(tp.sequence_parallel);
  tp_group_ = tp.group;
}

void ParallelSwiGLUImpl::pretty_print(std::ostream& stream) const {
  stream << "meshtrain::ParallelSwiGLU(n_embd=" << options_.n_embd()
         << ", ffn_dim=" << options_.ffn_dim() << ", tp=" << tp_group_->size()
         << ", sequence_parallel=" << (options_.sequence_parallel() ? "true" : "false") << ")";
}

torch::Tensor ParallelSwiGLUImpl::forward(const torch::Tensor& x) {
  const auto gate_up = column_parallel_fanout({gate_proj, up_proj}, x); // [B, T, F/tp] each
  return down_proj(torch::silu(gate_up[0]) * gate_up[1]);               // [B, T, C] or [B, T/tp, C]
}

} // namespace meshtrain
