// defines: ParallelMLPImpl (see parallel_mlp.h).
#include "meshtrain/parallel/parallel_mlp.h"

#include "meshtrain/core/errors.h"

#include <cmath>

namespace meshtrain {

ParallelMLPImpl::ParallelMLPImpl(ParallelMLPOptions options, CommunicatorPtr tp_group,
                                 RngTrackerPtr rng)
    : options_(std::move(options)), tp_group_(std::move(tp_group)), rng_(std::move(rng)) {
  MT_CHECK(tp_group_ != nullptr, "ParallelMLP: the tp communicator is null");
  const int tp = tp_group_->size();
  MT_CHECK(options_.n_embd() > 0, "ParallelMLP: n_embd (", options_.n_embd(), ") must be positive");
  MT_CHECK(options_.n_embd() % tp == 0, "ParallelMLP: n_embd (", options_.n_embd(),
           ") must be divisible by tp (", tp, ")");
  MT_CHECK(options_.n_layer() >= 1, "ParallelMLP: n_layer (", options_.n_layer(), ") must be >= 1");
  MT_CHECK(options_.dropout() >= 0.0 && options_.dropout() < 1.0, "ParallelMLP: dropout (",
           options_.dropout(), ") must be in [0, 1)");
  MT_CHECK(options_.dropout() == 0.0 || rng_ != nullptr, "ParallelMLP: dropout (",
           options_.dropout(), ") > 0 needs an RngTracker");
  reset();
}

void ParallelMLPImpl::reset() {
  const auto& o = options_;
  const int64_t c = o.n_embd();
  // Draw order: c_fc.weight, then c_proj.weight.
  c_fc = register_module(
      "c_fc", ColumnParallelLinear(
                  ColumnParallelLinearOptions(c, 4 * c).gather_output(false).sequence_parallel(
                      o.sequence_parallel()),
                  tp_group_));
  c_proj = register_module(
      "c_proj",
      RowParallelLinear(RowParallelLinearOptions(4 * c, c)
                            .input_is_parallel(true)
                            .sequence_parallel(o.sequence_parallel())
                            .init_std(0.02 / std::sqrt(2.0 * static_cast<double>(o.n_layer()))),
                        tp_group_));
}

void ParallelMLPImpl::apply_tensor_parallel(const TensorParallelism& tp) {
  MT_CHECK(tp_group_->size() == 1, "ParallelMLP: already laid out over a group of ",
           tp_group_->size(), " ranks; apply_tensor_parallel takes a serial layer");
  MT_CHECK(tp.group != nullptr, "ParallelMLP: the tp communicator is null");
  MT_CHECK(options_.n_embd() % tp.group->size() == 0, "ParallelMLP: n_embd (", options_.n_embd(),
           ") must be divisible by tp (", tp.group->size(), ")");
  options_.sequence_parallel(tp.sequence_parallel);
  tp_group_ = tp.group;
}

void ParallelMLPImpl::pretty_print(std::ostream& stream) const {
  stream << "meshtrain::ParallelMLP(n_embd=" << options_.n_embd() << ", tp=" << tp_group_->size()
         << ", dropout=" << options_.dropout()
         << ", sequence_parallel=" << (options_.sequence_parallel() ? "true" : "false") << ")";
}

torch::Tensor ParallelMLPImpl::forward(const torch::Tensor& x) {
  auto h = torch::gelu(c_fc(x)); // [B, T, 4C/tp], exact erf GELU (approximate = "none")
  auto y = c_proj(h);            // [B, T, C] or [B, T/tp, C]
  if (rng_) {
    y = rng_->dropout(y, options_.dropout(), is_training(),
                      residual_stream(options_.sequence_parallel()));
  }
  return y;
}

} // namespace meshtrain
