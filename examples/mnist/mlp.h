// defines: MlpOptions, MlpImpl, Mlp — the multi-layer perceptron of the MNIST example:
// Linear -> ReLU -> ... -> Linear, logits out. Plain model code: no communication (data
// parallelism is applied by the training loop, DESIGN §1).
//
// Parameters are named as a PyTorch nn.ModuleList of nn.Linear called "layers" would name
// them: layers.<i>.weight [out_i, in_i], layers.<i>.bias [out_i].
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <vector>

namespace meshtrain::mnist {

struct MlpOptions {
  MlpOptions(int64_t in_features, std::vector<int64_t> hidden, int64_t out_features)
      : in_features_(in_features), hidden_(std::move(hidden)), out_features_(out_features) {}
  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(std::vector<int64_t>, hidden); // widths of the hidden layers, may be empty
  TORCH_ARG(int64_t, out_features);
};

class MlpImpl : public torch::nn::Cloneable<MlpImpl> {
public:
  explicit MlpImpl(MlpOptions options);
  // Default init of torch::nn::Linear (kaiming-uniform weights, uniform biases) from the
  // global generator: seed it with torch::manual_seed first for a reproducible model.
  void reset() override;
  // x: [B, in_features] -> logits [B, out_features]
  torch::Tensor forward(torch::Tensor x);
  void pretty_print(std::ostream& stream) const override;
  int64_t parameter_count() const;

  MlpOptions options;

private:
  torch::nn::ModuleList layers_{nullptr};
  std::vector<torch::nn::Linear> linears_; // the same modules, typed: no cast per forward
};
TORCH_MODULE(Mlp);

} // namespace meshtrain::mnist
