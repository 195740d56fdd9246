// defines: parallel_blocks, causal_softmax (see parallel_model.h).
#include "meshtrain/parallel/parallel_model.h"

#include "meshtrain/core/errors.h"

#include <limits>

namespace meshtrain {

torch::Tensor causal_softmax(const torch::Tensor& scores, double scale) {
  const int64_t t = scores.size(-1);
  // -inf above the diagonal, 0 elsewhere: adding it gives masked_fill's exact result, and the
  // add and its backward are faster than masked_fill's on CPU (bench_ops' softmax rows).
  const auto future =
      torch::full({t, t}, -std::numeric_limits<float>::infinity(), scores.options()).triu(1);
  // future + scale * scores in one pass (add's alpha), forward and backward: the same values
  // as scaling first, since adding 0 or -inf to the rounded product rounds nothing more.
  // LibTorch's softmax kernels accumulate bf16/fp16 in fp32 (acc_type) and round once: on
  // CPU a bf16 softmax equals the fp32 softmax of the same input rounded to bf16.
  return torch::add(future, scores, scale).softmax(-1); // [.., T, T]
}

std::vector<ParallelBlock*> parallel_blocks(ParallelModel& model) {
  std::vector<ParallelBlock*> out;
  const auto modules = model.blocks();
  for (size_t i = 0; i < modules.size(); ++i) {
    auto* block = dynamic_cast<ParallelBlock*>(modules[i].get());
    MT_CHECK(block != nullptr, "model block ", i, " (", modules[i]->name(),
             ") is not a ParallelBlock: derive its module class from meshtrain::ParallelBlock "
             "(parallel/parallel_model.h)");
    out.push_back(block);
  }
  return out;
}

} // namespace meshtrain
