// defines: apply_tensor_parallel, keep_shard (see tensor_parallel_layer.h).
#include "meshtrain/parallel/tensor_parallel_layer.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/parallel/shard_tensor.h"

namespace meshtrain {

void apply_tensor_parallel(torch::nn::Module& root, const TensorParallelism& tp) {
  MT_CHECK(tp.group != nullptr, "apply_tensor_parallel: the tp communicator is null");
  for (const auto& module : root.modules(/*include_self=*/true)) {
    if (auto* layer = dynamic_cast<TensorParallelLayer*>(module.get())) {
      layer->apply_tensor_parallel(tp);
    }
  }
}

void keep_shard(torch::Tensor& param, int64_t dim, int rank, int size, int64_t blocks) {
  torch::NoGradGuard no_grad;
  param.set_data(cut_shard(param.detach(), dim, rank, size, blocks));
}

} // namespace meshtrain
