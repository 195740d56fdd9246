// defines: apply_tensor_parallel, keep_shard (see tensor_parallel_layer.h).
#include "meshtrain/parallel/tensor_parallel_layer.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/parallel/param_init.h"
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
  if (is_deferred_placeholder(param)) {
    auto sizes = param.sizes().vec();
    MT_CHECK(sizes[dim] % (blocks * size) == 0, "keep_shard: size ", sizes[dim], " of dim ", dim,
             " must be divisible by blocks (", blocks, ") x group size (", size, ")");
    sizes[dim] /= size;
    param.set_data(deferred_placeholder(sizes, param.scalar_type()));
    return;
  }
  param.set_data(cut_shard(param.detach(), dim, rank, size, blocks));
}

void keep_vocab_shard(torch::Tensor& param, int64_t vocab, int64_t padded, int rank, int size) {
  torch::NoGradGuard no_grad;
  if (is_deferred_placeholder(param)) {
    param.set_data(deferred_placeholder({padded / size, param.size(1)}, param.scalar_type()));
    return;
  }
  param.set_data(cut_shard(pad_dim(param.detach().narrow(0, 0, vocab), 0, padded), 0, rank, size));
}

} // namespace meshtrain
