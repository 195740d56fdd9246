// Tests of the pure grid arithmetic (no MPI) and of the Mesh's real sub-communicators.
#include <catch2/catch.hpp>

#include "meshtrain/core/mesh.h"
#include "tests/harness.h"

using meshtrain::MeshGrid;
using meshtrain::ParallelDims;

TEST_CASE("MeshGrid: Megatron's 16 ranks, tp=2, pp=4 example", "[mesh]") {
  const auto grid = MeshGrid::create(ParallelDims{-1, 1, 2, 4}, 16);
  CHECK(grid.dp() == 2);
  using Groups = std::vector<std::vector<int>>;
  CHECK(grid.groups("tp") ==
        Groups{{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}, {12, 13}, {14, 15}});
  CHECK(grid.groups("pp") == Groups{{0, 4, 8, 12}, {1, 5, 9, 13}, {2, 6, 10, 14}, {3, 7, 11, 15}});
  CHECK(grid.groups("dp") ==
        Groups{{0, 2}, {1, 3}, {4, 6}, {5, 7}, {8, 10}, {9, 11}, {12, 14}, {13, 15}});
}

TEST_CASE("MeshGrid: rank <-> coordinate round trip, tp fastest, then cp, dp, pp", "[mesh]") {
  const auto grid = MeshGrid::create(ParallelDims{3, 1, 2, 2}, 12);
  for (int r = 0; r < 12; ++r) {
    const auto c = grid.coord(r);
    CHECK(grid.rank(c) == r);
    CHECK(r == c.tp + c.dp * 2 + c.pp * 6);
  }
  CHECK(grid.coord(5).tp == 1);
  CHECK(grid.coord(5).dp == 2);
  CHECK(grid.coord(7).pp == 1);
  CHECK(grid.group_ranks("world", 3) == std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11});
  CHECK(grid.size("world") == 12);

  // DESIGN §2: rank = tp + cp*TP + dp*TP*CP + pp*TP*CP*DP.
  const auto four = MeshGrid::create(ParallelDims{2, 2, 2, 2}, 16);
  for (int r = 0; r < 16; ++r) {
    const auto c = four.coord(r);
    CHECK(r == c.tp + c.cp * 2 + c.dp * 4 + c.pp * 8);
    CHECK(four.rank(c) == r);
  }
  using Groups = std::vector<std::vector<int>>;
  CHECK(four.groups("cp").front() == std::vector<int>{0, 2});
  CHECK(four.groups("dp").front() == std::vector<int>{0, 4});
  // Gradients are reduced over dp x cp: the ranks that share tp and pp.
  CHECK(four.groups("dp_cp") ==
        Groups{{0, 2, 4, 6}, {1, 3, 5, 7}, {8, 10, 12, 14}, {9, 11, 13, 15}});
  CHECK(four.index("dp_cp", 6) == 3);
  CHECK(four.size("dp_cp") == 4);
}

TEST_CASE("MeshGrid: -1 infers the missing dimension", "[mesh]") {
  CHECK(MeshGrid::create(ParallelDims{-1, 1, 4, 1}, 8).dp() == 2);
  CHECK(MeshGrid::create(ParallelDims{2, 1, -1, 1}, 8).tp() == 4);
  CHECK(MeshGrid::create(ParallelDims{2, 1, 2, -1}, 8).pp() == 2);
  CHECK(MeshGrid::create(ParallelDims{}, 5).dp() == 5);
}

TEST_CASE("MeshGrid: bad layouts name the numbers", "[mesh]") {
  REQUIRE_THROWS_WITH(MeshGrid::create(ParallelDims{-1, 1, 2, 1}, 3),
                      Catch::Contains("cannot infer dp: the world size 3 is not divisible by "
                                      "cp x tp x pp = 2 (tp 2)") &&
                          Catch::Contains("may be 1 or 3"));
  REQUIRE_THROWS_WITH(MeshGrid::create(ParallelDims{2, 1, 2, 1}, 8),
                      Catch::Contains("dp (2) x cp (1) x tp (2) x pp (1) = 4") &&
                          Catch::Contains("world size 8"));
  REQUIRE_THROWS_WITH(MeshGrid::create(ParallelDims{-1, 1, -1, 1}, 8),
                      Catch::Contains("at most one of dp, cp, tp, pp may be -1"));
  REQUIRE_THROWS_WITH(MeshGrid::create(ParallelDims{0, 1, 1, 1}, 8),
                      Catch::Contains("must be >= 1 or -1"));
  REQUIRE_THROWS_AS(MeshGrid::create(ParallelDims{0, 1, 1, 1}, 8), meshtrain::LayoutError);
  const auto grid = MeshGrid::create(ParallelDims{-1, 1, 2, 1}, 4);
  REQUIRE_THROWS_WITH(grid.coord(4), Catch::Contains("rank 4 is outside the mesh of 4 ranks"));
  REQUIRE_THROWS_WITH(grid.size("ep"), Catch::Contains("unknown mesh dimension 'ep'"));
}

TEST_CASE("Runtime: threads per rank share the node's cores", "[runtime]") {
  CHECK(meshtrain::default_threads_per_rank(16, 4) == 4);
  CHECK(meshtrain::default_threads_per_rank(2, 4) == 1);
  CHECK(meshtrain::default_threads_per_rank(2, 1) == 2);
  REQUIRE_THROWS_WITH(meshtrain::default_threads_per_rank(2, 0),
                      Catch::Contains("ranks on node must be >= 1"));
}

TEST_CASE("Mesh: sub-communicators hold the grid's groups", "[mpi][mesh]") {
  auto& rt = meshtrain::testing::test_runtime();
  const int world = rt.world_size();
  const int tp = world % 2 == 0 ? 2 : 1;
  meshtrain::Mesh mesh(ParallelDims{-1, 1, tp, 1}, rt.world());
  const auto expected_tp = mesh.grid().group_ranks("tp", rt.rank());
  const auto expected_dp = mesh.grid().group_ranks("dp", rt.rank());
  REQUIRE(mesh.group("tp")->size() == tp);
  REQUIRE(mesh.group("dp")->size() == world / tp);
  REQUIRE(mesh.group("cp")->size() == 1);
  REQUIRE(mesh.group("dp_cp")->size() == world / tp); // cp = 1: the dp group
  CHECK(mesh.group("dp_cp") == mesh.group("dp"));     // ... itself: its traffic is "dp"
  CHECK(mesh.group("tp")->rank() == mesh.index("tp"));
  CHECK(mesh.group("dp")->rank() == mesh.index("dp"));
  // Gathering world ranks over each group reproduces the grid's member lists.
  for (const auto& [dim, expected] :
       {std::pair{std::string("tp"), expected_tp}, std::pair{std::string("dp"), expected_dp}}) {
    const auto& g = mesh.group(dim);
    auto mine = torch::tensor({rt.rank()}, torch::kInt);
    auto all = torch::empty({g->size()}, torch::kInt);
    g->all_gather(mine, all);
    std::vector<int> got(all.data_ptr<int>(), all.data_ptr<int>() + g->size());
    CHECK(got == expected);
  }
}

TEST_CASE("Mesh: with cp > 1 the cp and dp x cp groups are the grid's", "[mpi][mesh][cp]") {
  auto& rt = meshtrain::testing::test_runtime();
  const int world = rt.world_size();
  if (world % 2 != 0) {
    return;
  }
  meshtrain::Mesh mesh(ParallelDims{-1, 2, 1, 1}, rt.world());
  CHECK(mesh.group("cp")->size() == 2);
  CHECK(mesh.group("dp")->size() == world / 2);
  CHECK(mesh.group("dp_cp")->size() == world);
  CHECK(mesh.group("dp_cp")->name() == "dp_cp");
  CHECK(mesh.group("dp_cp")->rank() == mesh.index("dp_cp"));
  for (const std::string dim : {"cp", "dp_cp"}) {
    const auto& g = mesh.group(dim);
    auto mine = torch::tensor({rt.rank()}, torch::kInt);
    auto all = torch::empty({g->size()}, torch::kInt);
    g->all_gather(mine, all);
    std::vector<int> got(all.data_ptr<int>(), all.data_ptr<int>() + g->size());
    INFO(dim);
    CHECK(got == mesh.grid().group_ranks(dim, rt.rank()));
  }
}
