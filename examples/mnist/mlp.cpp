// defines: MlpImpl (see mlp.h).
#include "examples/mnist/mlp.h"

#include "meshtrain/core/errors.h"

namespace meshtrain::mnist {

MlpImpl::MlpImpl(MlpOptions options_) : options(std::move(options_)) {
  MT_CHECK(options.in_features() >= 1, "Mlp: in_features must be >= 1, got ",
           options.in_features());
  MT_CHECK(options.out_features() >= 1, "Mlp: out_features must be >= 1, got ",
           options.out_features());
  for (const int64_t width : options.hidden()) {
    MT_CHECK(width >= 1, "Mlp: hidden widths must be >= 1, got ",
             c10::IntArrayRef(options.hidden()));
  }
  reset();
}

void MlpImpl::reset() {
  layers_ = register_module("layers", torch::nn::ModuleList());
  linears_.clear();
  int64_t in = options.in_features();
  for (const int64_t width : options.hidden()) {
    linears_.emplace_back(in, width);
    in = width;
  }
  linears_.emplace_back(in, options.out_features());
  for (const auto& linear : linears_) {
    layers_->push_back(linear);
  }
}

torch::Tensor MlpImpl::forward(torch::Tensor x) {
  const size_t last = linears_.size() - 1;
  for (size_t i = 0; i < linears_.size(); ++i) {
    x = linears_[i]->forward(x); // [B, width_i]
    if (i != last) {
      x = torch::relu(x);
    }
  }
  return x; // [B, out_features]
}

void MlpImpl::pretty_print(std::ostream& stream) const {
  stream << "Mlp(" << options.in_features();
  for (const int64_t width : options.hidden()) {
    stream << "-" << width;
  }
  stream << "-" << options.out_features() << ", ReLU)";
}

int64_t MlpImpl::parameter_count() const {
  int64_t count = 0;
  for (const auto& p : parameters()) {
    count += p.numel();
  }
  return count;
}

} // namespace meshtrain::mnist
