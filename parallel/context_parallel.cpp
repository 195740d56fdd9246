// defines: the context-parallel sequence split (see context_parallel.h).
#include "meshtrain/parallel/context_parallel.h"

#include "meshtrain/core/errors.h"

namespace meshtrain {

const char* to_string(ContextSplit split) {
  return split == ContextSplit::kBalanced ? "balanced" : "contiguous";
}

std::array<int64_t, 2> context_chunks(int cp, int rank, ContextSplit split) {
  MT_CHECK(cp >= 1 && rank >= 0 && rank < cp, "context_chunks: rank ", rank,
           " is outside a cp group of ", cp);
  if (split == ContextSplit::kContiguous) {
    return {2 * int64_t{rank}, 2 * int64_t{rank} + 1};
  }
  return {int64_t{rank}, 2 * int64_t{cp} - 1 - rank};
}

torch::Tensor context_positions(int64_t local_len, int cp, int rank, ContextSplit split) {
  MT_CHECK(local_len >= 2 && local_len % 2 == 0, "context_positions: the local sequence (",
           local_len, " tokens) must be two equal chunks (even, >= 2)");
  const int64_t c = local_len / 2;
  const auto chunks = context_chunks(cp, rank, split);
  return torch::cat({torch::arange(chunks[0] * c, (chunks[0] + 1) * c, torch::kLong),
                     torch::arange(chunks[1] * c, (chunks[1] + 1) * c, torch::kLong)});
}

torch::Tensor take_context_chunks(const torch::Tensor& full, int64_t dim, int cp, int rank,
                                  ContextSplit split) {
  const int64_t t = full.size(dim);
  MT_CHECK(t % (2 * cp) == 0, "context parallelism: the sequence (", t,
           " tokens) must be divisible by 2 x cp = ", 2 * cp, " (2 chunks per cp rank)");
  if (cp == 1) {
    return full;
  }
  const int64_t c = t / (2 * cp);
  const auto chunks = context_chunks(cp, rank, split);
  return torch::cat({full.narrow(dim, chunks[0] * c, c), full.narrow(dim, chunks[1] * c, c)}, dim);
}

torch::Tensor gather_context_chunks(const torch::Tensor& local, int64_t dim,
                                    const CommunicatorPtr& group, ContextSplit split) {
  MT_CHECK(group != nullptr, "gather_context_chunks: the cp communicator is null");
  const int cp = group->size();
  const int64_t local_len = local.size(dim);
  MT_CHECK(local_len % 2 == 0, "gather_context_chunks: the local sequence (", local_len,
           " tokens) must be two equal chunks");
  if (cp == 1) {
    return local;
  }
  torch::NoGradGuard no_grad;
  // [cp, ...local] with the sequence first, so each rank's part is one contiguous block.
  const auto moved = local.detach().movedim(dim, 0).contiguous();
  auto sizes = moved.sizes().vec();
  sizes.insert(sizes.begin(), cp);
  auto gathered = torch::empty(sizes, moved.options()); // [cp, T/cp, ...]
  group->all_gather(moved, gathered);
  const int64_t c = local_len / 2;
  std::vector<torch::Tensor> chunks(2 * cp);
  for (int r = 0; r < cp; ++r) {
    const auto ids = context_chunks(cp, r, split);
    chunks[ids[0]] = gathered[r].narrow(0, 0, c);
    chunks[ids[1]] = gathered[r].narrow(0, c, c);
  }
  return torch::cat(chunks, 0).movedim(0, dim).contiguous();
}

void apply_context_parallel(torch::nn::Module& root, const ContextParallelism& cp) {
  MT_CHECK(cp.group != nullptr, "apply_context_parallel: the cp communicator is null");
  for (const auto& module : root.modules(/*include_self=*/true)) {
    if (auto* layer = dynamic_cast<ContextParallelLayer*>(module.get())) {
      layer->apply_context_parallel(cp);
    }
  }
}

} // namespace meshtrain
