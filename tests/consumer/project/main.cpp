// defines: main of the out-of-tree consumer — starts a Runtime, builds the rank grid and a
// Mesh from the installed headers and library, and checks an all_reduce over the world and
// over the tp groups against their closed forms. Exit status 0 only when both are right.
#include <core/mesh.h>
#include <core/runtime.h>

#include <torch/torch.h>

#include <exception>
#include <iostream>

int main(int argc, char** argv) {
  try {
    meshtrain::Runtime runtime(&argc, &argv);
    const int world = runtime.world_size();
    const int rank = runtime.rank();
    // tp=2 whenever the world allows it, so dp is inferred (-1) and the groups differ.
    const int tp = world % 2 == 0 ? 2 : 1;
    const auto grid = meshtrain::MeshGrid::create(meshtrain::ParallelDims{-1, tp, 1}, world);
    meshtrain::Mesh mesh(meshtrain::ParallelDims{-1, tp, 1}, runtime.world());

    // Rank r contributes r+1: the world sums to W(W+1)/2, a tp group to the sum over its ranks.
    auto world_sum = torch::full({4}, static_cast<float>(rank + 1));
    mesh.group("world")->all_reduce(world_sum);
    auto tp_sum = torch::full({4}, static_cast<float>(rank + 1));
    mesh.group("tp")->all_reduce(tp_sum);

    const float expected_world = world * (world + 1) / 2.0F;
    float expected_tp = 0;
    for (const int r : grid.group_ranks("tp", rank)) {
      expected_tp += static_cast<float>(r + 1);
    }
    const bool ok = world_sum.eq(expected_world).all().item<bool>() &&
                    tp_sum.eq(expected_tp).all().item<bool>() && grid.dp() * tp == world;
    std::cout << "consumer rank " << rank << "/" << world << " ("
              << meshtrain::Runtime::backend_name() << ", dp=" << grid.dp() << " tp=" << grid.tp()
              << "): world sum " << world_sum[0].item<float>() << " (expected " << expected_world
              << "), tp sum " << tp_sum[0].item<float>() << " (expected " << expected_tp << ") "
              << (ok ? "OK" : "WRONG") << std::endl;
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "consumer: " << e.what() << std::endl;
    return 1;
  }
}
