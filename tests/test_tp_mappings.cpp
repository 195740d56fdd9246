// The autograd-aware communication of parallel/mappings.h: closed-form, rank-valued checks of
// each function's forward and backward, and the group-of-one short cut.
#include <catch2/catch.hpp>

#include "meshtrain/parallel/mappings.h"
#include "tests/test_tp_helpers.h"

using namespace meshtrain;
using namespace meshtrain::testing;

namespace {

// 1 + 2 + ... + n: the sum over ranks of (rank + 1).
double triangle(int n) {
  return n * (n + 1) / 2.0;
}

// [2, L, 3] with x[:, t, :] = t + 1.
torch::Tensor position_valued(int64_t length) {
  return (torch::arange(length, torch::kFloat) + 1).view({1, length, 1}).expand({2, length, 3});
}

} // namespace

TEST_CASE("TP mappings: copy_to_tp_region <-> reduce_from_tp_region", "[mpi][tp]") {
  const auto mesh = tp_mesh();
  const auto& tp = mesh.group("tp");
  const int r = tp_rank(mesh), n = tp_size(mesh);
  const double mine = r + 1;

  auto x = torch::ones({3}, torch::requires_grad());
  auto y = copy_to_tp_region(x, tp);
  check_equal("copy forward", y, torch::ones({3}));
  (y * mine).sum().backward(); // backward all-reduces: sum over ranks of (r + 1)
  check_equal("copy backward", x.grad(), torch::full({3}, triangle(n)));

  auto z = torch::full({3}, mine, torch::requires_grad());
  auto s = reduce_from_tp_region(z, tp);
  check_equal("reduce forward", s, torch::full({3}, triangle(n)));
  (s * mine).sum().backward(); // identity backward
  check_equal("reduce backward", z.grad(), torch::full({3}, mine));
  check_equal("reduce leaves its input alone", z.detach(), torch::full({3}, mine));
}

TEST_CASE("TP mappings: scatter_to_tp_region <-> gather_from_tp_region (last dim)", "[mpi][tp]") {
  const auto mesh = tp_mesh();
  const auto& tp = mesh.group("tp");
  const int r = tp_rank(mesh), n = tp_size(mesh);

  auto full = torch::arange(2 * 2 * n, torch::kFloat).view({2, 2 * n}).requires_grad_();
  auto part = scatter_to_tp_region(full, tp); // [2, 2]: columns [2r, 2r+2)
  check_equal("scatter forward", part, full.detach().narrow(1, 2 * r, 2));
  (part * (r + 1)).sum().backward(); // backward all-gathers: column block b holds b + 1
  const auto expected =
      (torch::arange(n, torch::kFloat) + 1).repeat_interleave(2).expand({2, 2 * n});
  check_equal("scatter backward", full.grad(), expected);

  auto mine = torch::full({2, 2}, static_cast<double>(r), torch::requires_grad());
  auto gathered = gather_from_tp_region(mine, tp); // [2, 2n]: block b holds b
  check_equal("gather forward", gathered,
              torch::arange(n, torch::kFloat).repeat_interleave(2).expand({2, 2 * n}));
  const auto weights = torch::arange(2 * 2 * n, torch::kFloat).view({2, 2 * n});
  (gathered * weights).sum().backward(); // backward keeps this rank's columns
  check_equal("gather backward", mine.grad(), weights.narrow(1, 2 * r, 2));
}

TEST_CASE("TP mappings: sequence scatter, all-gather and reduce-scatter along dim 1", "[mpi][tp]") {
  const auto mesh = tp_mesh();
  const auto& tp = mesh.group("tp");
  const int r = tp_rank(mesh), n = tp_size(mesh);
  const int64_t t = 2 * n; // two tokens per rank

  SECTION("scatter_to_sequence_parallel_region") {
    auto x = position_valued(t).clone().requires_grad_();
    auto y = scatter_to_sequence_parallel_region(x, tp); // [2, 2, 3]: tokens [2r, 2r+2)
    check_equal("sequence scatter forward", y, position_valued(t).narrow(1, 2 * r, 2));
    (y * (r + 1)).sum().backward(); // all-gather: token block b holds b + 1
    const auto expected = (torch::arange(n, torch::kFloat) + 1)
                              .repeat_interleave(2)
                              .view({1, t, 1})
                              .expand({2, t, 3});
    check_equal("sequence scatter backward", x.grad(), expected);
  }
  SECTION("gather_from_sequence_parallel_region") {
    auto x = torch::full({2, 2, 3}, static_cast<double>(r), torch::requires_grad());
    auto y = gather_from_sequence_parallel_region(x, tp); // [2, 2n, 3]: token block b holds b
    check_equal(
        "sequence gather forward", y,
        torch::arange(n, torch::kFloat).repeat_interleave(2).view({1, t, 1}).expand({2, t, 3}));
    // Backward reduce-scatters: this rank's tokens get the sum over ranks of (r' + 1) * pos.
    (y * (r + 1) * position_valued(t)).sum().backward();
    check_equal("sequence gather backward", x.grad(),
                triangle(n) * position_valued(t).narrow(1, 2 * r, 2));
  }
  SECTION("reduce_scatter_to_sequence_parallel_region") {
    auto x = ((r + 1) * position_valued(t)).clone().requires_grad_();
    auto y = reduce_scatter_to_sequence_parallel_region(x, tp); // [2, 2, 3]
    check_equal("sequence reduce-scatter forward", y,
                triangle(n) * position_valued(t).narrow(1, 2 * r, 2));
    (y * (r + 1)).sum().backward(); // all-gather: token block b holds b + 1
    const auto expected = (torch::arange(n, torch::kFloat) + 1)
                              .repeat_interleave(2)
                              .view({1, t, 1})
                              .expand({2, t, 3});
    check_equal("sequence reduce-scatter backward", x.grad(), expected);
  }
}

TEST_CASE("TP mappings: copy_params_to_sequence_parallel_region sums grads in one call",
          "[mpi][tp]") {
  const auto mesh = tp_mesh();
  const auto& tp = mesh.group("tp");
  const int r = tp_rank(mesh), n = tp_size(mesh);
  auto w = torch::ones({3}, torch::requires_grad());
  auto b = torch::zeros({2, 2}, torch::requires_grad());
  mesh.comm_log().clear();
  mesh.comm_log().enable();
  auto out = copy_params_to_sequence_parallel_region({w, b}, tp);
  check_equal("params forward w", out[0], w.detach());
  check_equal("params forward b", out[1], b.detach());
  ((out[0] * (r + 1)).sum() + (out[1] * 2 * (r + 1)).sum()).backward();
  mesh.comm_log().enable(false);
  check_equal("params backward w", w.grad(), torch::full({3}, triangle(n)));
  check_equal("params backward b", b.grad(), torch::full({2, 2}, 2 * triangle(n)));
  INFO(rank_tag() << "all-reduces on tp: "
                  << mesh.comm_log().count(CollectiveKind::kAllReduce, "tp"));
  CHECK(mesh.comm_log().count(CollectiveKind::kAllReduce, "tp") == 1);
  CHECK(mesh.comm_log().bytes(CollectiveKind::kAllReduce, "tp") == 7 * 4);
  mesh.comm_log().clear();
}

TEST_CASE("TP mappings are no-ops on a group of one", "[tp]") {
  Mesh mesh(ParallelDims{-1, 1, 1, 1}, test_runtime().world());
  const auto& tp = mesh.group("tp");
  REQUIRE(tp->size() == 1);
  auto x = torch::randn({2, 4, 6}, torch::requires_grad());
  CHECK(copy_to_tp_region(x, tp).is_same(x));
  CHECK(reduce_from_tp_region(x, tp).is_same(x));
  CHECK(scatter_to_tp_region(x, tp).is_same(x));
  CHECK(gather_from_tp_region(x, tp).is_same(x));
  CHECK(scatter_to_sequence_parallel_region(x, tp).is_same(x));
  CHECK(gather_from_sequence_parallel_region(x, tp).is_same(x));
  CHECK(reduce_scatter_to_sequence_parallel_region(x, tp).is_same(x));
  const auto params = copy_params_to_sequence_parallel_region({x}, tp);
  CHECK(params[0].is_same(x));
}
