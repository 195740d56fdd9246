// Tests of parallel/data_parallel.h: bucket packing (pure), closed-form reduced gradients
// over dp, overlap observed through the counting log (collectives issued during backward),
// no_sync accumulation, sharded (ZeRO-2) reduction, unused parameters, bf16 and avg
// reductions, and misuse errors.
#include <catch2/catch.hpp>

#include "meshtrain/core/mesh.h"
#include "meshtrain/parallel/data_parallel.h"
#include "tests/harness.h"

#include <optional>
#include <sstream>

using namespace meshtrain;
using meshtrain::testing::all_close;
using meshtrain::testing::rank_tag;

namespace {

// Parameters of several sizes; loss(weight) = sum_i weight * <p_i, c_i> with fixed c_i, so
// grad p_i = weight * c_i in closed form.
struct PlainImpl : torch::nn::Module {
  PlainImpl() {
    a = register_parameter("a", torch::zeros({3, 5}));
    b = register_parameter("b", torch::zeros({7}));
    c = register_parameter("c", torch::zeros({4, 4}));
    d = register_parameter("d", torch::zeros({2}));
    unused = register_parameter("unused", torch::zeros({3}));
  }
  std::vector<torch::Tensor> used() const { return {a, b, c, d}; }
  torch::Tensor a, b, c, d, unused;
};
TORCH_MODULE(Plain);

torch::Tensor coefficient(int i, torch::IntArrayRef sizes) {
  auto n = 1;
  for (auto s : sizes) {
    n *= static_cast<int>(s);
  }
  return (torch::arange(n, torch::kFloat) * 0.25 + i + 1).reshape(sizes);
}

torch::Tensor loss_of(const Plain& model, double weight, bool with_unused = false) {
  auto loss = torch::zeros({});
  const auto params = model->used();
  for (size_t i = 0; i < params.size(); ++i) {
    loss = loss + (params[i] * coefficient(static_cast<int>(i), params[i].sizes())).sum();
  }
  if (with_unused) {
    loss = loss + model->unused.sum();
  }
  return loss * weight;
}

// The bucket layout of `model` for the mesh's dp group.
BucketLayoutPtr layout_for(const Plain& model, const Mesh& mesh, BucketLayoutOptions options = {}) {
  return std::make_shared<const BucketLayout>(*model, mesh.group("dp")->size(), options);
}

Mesh dp_mesh() {
  return Mesh(ParallelDims{-1, 1, 1, 1}, meshtrain::testing::test_runtime().world());
}

// Sum over ranks r of (r + 1) = D (D + 1) / 2.
double rank_weight_sum(int64_t dp) {
  return static_cast<double>(dp * (dp + 1)) / 2.0;
}

} // namespace

TEST_CASE("assign_buckets: reverse order, byte cap, oversized parameters alone", "[dp]") {
  using Buckets = std::vector<std::vector<int64_t>>;
  // 4-byte elements, cap 40 bytes (10 elements).
  CHECK(assign_buckets({4, 4, 4, 4}, 4, 40) == Buckets{{3, 2}, {1, 0}});
  CHECK(assign_buckets({3, 20, 3}, 4, 40) == Buckets{{2}, {1}, {0}});
  CHECK(assign_buckets({1, 2, 3}, 4, 1 << 20) == Buckets{{2, 1, 0}});
  CHECK(assign_buckets({10, 10}, 4, 40) == Buckets{{1}, {0}});
  REQUIRE_THROWS_WITH(assign_buckets({1}, 4, 0),
                      Catch::Contains("bucket_bytes must be > 0, got 0"));
}

TEST_CASE("DataParallelReducer: buckets sum gradients over dp while backward runs", "[mpi][dp]") {
  const auto mesh = dp_mesh();
  const auto& group = mesh.group("dp");
  const int64_t dp = group->size();
  const bool overlap = GENERATE(true, false);
  Plain model;
  // 64-byte buckets: a [3,5] (60 B) | b [7] | c [4,4] | d [2] land in several buckets.
  DataParallelReducer reducer(*model, mesh,
                              layout_for(model, mesh, BucketLayoutOptions().bucket_bytes(64)),
                              DataParallelOptions().overlap(overlap));
  REQUIRE(reducer.num_buckets() >= 3);
  // Reverse registration order: the last parameter is packed first.
  CHECK(reducer.layout().buckets().front().slots.front().name == "unused");
  CHECK(reducer.layout().buckets().back().slots.back().name == "a");
  for (int64_t b = 0; b < reducer.num_buckets(); ++b) {
    CHECK(reducer.bucket_numel(b) % dp == 0);
  }

  auto& log = mesh.comm_log();
  log.clear();
  log.enable();
  reducer.zero_grad();
  loss_of(model, group->rank() + 1, /*with_unused=*/true).backward();
  const auto issued_in_backward = log.count(CollectiveKind::kAllReduce, "dp");
  const auto grads = reducer.finish();
  const auto issued_total = log.count(CollectiveKind::kAllReduce, "dp");
  log.enable(false);

  INFO(rank_tag() << "overlap " << overlap << ": " << issued_in_backward
                  << " all-reduces issued during backward, " << issued_total << " in total, "
                  << reducer.num_buckets() << " buckets");
  const int64_t moves = dp > 1 ? 1 : 0;
  CHECK(issued_total == moves * reducer.num_buckets());
  // With overlap every bucket is issued from the hook of its last gradient, before
  // backward returns; without, all wait for finish().
  CHECK(issued_in_backward == (overlap ? moves * reducer.num_buckets() : 0));

  const auto params = model->used();
  for (size_t i = 0; i < params.size(); ++i) {
    const auto expected = coefficient(static_cast<int>(i), params[i].sizes()) * rank_weight_sum(dp);
    INFO(rank_tag() << "parameter " << i);
    CHECK(all_close(params[i].grad(), expected, 1e-6, 1e-8));
  }
  CHECK(all_close(model->unused.grad(), torch::full({3}, rank_weight_sum(dp)), 1e-7, 0));
  // param.grad is a view into the returned bucket tensors.
  bool found = false;
  for (const auto& g : grads) {
    const auto* begin = static_cast<const char*>(g.data_ptr());
    const auto* p = static_cast<const char*>(model->a.grad().data_ptr());
    found = found || (p >= begin && p < begin + g.numel() * 4);
  }
  CHECK(found);
}

TEST_CASE("DataParallelReducer: no_sync accumulates locally and communicates once", "[mpi][dp]") {
  const auto mesh = dp_mesh();
  const auto& group = mesh.group("dp");
  const int64_t dp = group->size();
  const bool sharded = GENERATE(false, true);
  Plain model;
  DataParallelReducer reducer(
      *model, mesh,
      layout_for(model, mesh, BucketLayoutOptions().bucket_bytes(64).zero_stage(sharded ? 2 : 0)),
      DataParallelOptions().allow_unused(true));
  auto& log = mesh.comm_log();
  log.clear();
  log.enable();
  const auto kind = sharded ? CollectiveKind::kReduceScatter : CollectiveKind::kAllReduce;
  reducer.zero_grad();
  for (int m = 0; m < 3; ++m) {
    std::optional<NoSyncGuard> guard;
    if (m < 2) {
      guard.emplace(reducer.no_sync());
    }
    loss_of(model, (group->rank() + 1) * (m + 1)).backward();
    if (m < 2) {
      INFO(rank_tag() << "micro-step " << m);
      CHECK(log.count(kind, "dp") == 0);
    }
  }
  auto grads = reducer.finish();
  log.enable(false);
  CHECK(log.count(kind, "dp") == (dp > 1 ? reducer.num_buckets() : 0));
  // Sum over micro-steps (1 + 2 + 3) and ranks.
  const double weight = 6 * rank_weight_sum(dp);
  const auto params = model->used();
  if (sharded) {
    CHECK_FALSE(model->a.grad().defined());
    int64_t shard_bytes = 0;
    for (int64_t b = 0; b < reducer.num_buckets(); ++b) {
      CHECK(grads[b].numel() == reducer.bucket_numel(b) / dp);
      shard_bytes += grads[b].numel() * 4;
    }
    CHECK(reducer.grad_buffer_bytes() == shard_bytes);
    CHECK(reducer.peak_staging_bytes() > 0);
    // Reassemble the full buckets to check every value.
    std::map<std::string, torch::Tensor> full_grads;
    for (int64_t b = 0; b < reducer.num_buckets(); ++b) {
      auto full = torch::empty({reducer.bucket_numel(b)});
      group->all_gather(grads[b], full);
      for (const auto& slot : reducer.layout().buckets()[b].slots) {
        const torch::Tensor p =
            model->named_parameters()[slot.name]; // a copy: the dict is a temporary
        full_grads[slot.name] = full.narrow(0, slot.offset, slot.numel).view(p.sizes());
      }
    }
    const char* names[] = {"a", "b", "c", "d"};
    for (size_t i = 0; i < params.size(); ++i) {
      const auto expected = coefficient(static_cast<int>(i), params[i].sizes()) * weight;
      INFO(rank_tag() << "sharded, parameter " << names[i]);
      CHECK(all_close(full_grads.at(names[i]), expected, 1e-6, 1e-8));
    }
  } else {
    for (size_t i = 0; i < params.size(); ++i) {
      const auto expected = coefficient(static_cast<int>(i), params[i].sizes()) * weight;
      INFO(rank_tag() << "parameter " << i);
      CHECK(all_close(params[i].grad(), expected, 1e-6, 1e-8));
    }
  }
  // The next step starts from zero.
  reducer.zero_grad();
  loss_of(model, group->rank() + 1).backward();
  grads = reducer.finish();
  if (!sharded) {
    const auto expected = coefficient(0, {3, 5}) * rank_weight_sum(dp);
    CHECK(all_close(model->a.grad(), expected, 1e-6, 1e-8));
  }
}

TEST_CASE("DataParallelReducer: average, bf16 reduction and unused parameters", "[mpi][dp]") {
  const auto mesh = dp_mesh();
  const auto& group = mesh.group("dp");
  const int64_t dp = group->size();
  Plain model;
  SECTION("op avg divides by dp") {
    DataParallelReducer reducer(*model, mesh, layout_for(model, mesh),
                                DataParallelOptions().op(ReduceOp::kAvg).allow_unused(true));
    reducer.zero_grad();
    loss_of(model, group->rank() + 1).backward();
    reducer.finish();
    const auto expected = coefficient(2, {4, 4}) * (rank_weight_sum(dp) / dp);
    INFO(rank_tag() << "avg");
    CHECK(all_close(model->c.grad(), expected, 1e-6, 1e-8));
  }
  SECTION("bf16 buckets: traffic in bf16, fp32 param.grad") {
    DataParallelReducer reducer(
        *model, mesh, layout_for(model, mesh, BucketLayoutOptions().reduce_dtype(torch::kBFloat16)),
        DataParallelOptions().allow_unused(true));
    CHECK(reducer.grad_buffer_bytes() == reducer.bucket_numel(0) * 2);
    reducer.zero_grad();
    // Weights k/7: the exact sums are not bf16 numbers.
    loss_of(model, (group->rank() + 1) / 7.0).backward();
    const auto grads = reducer.finish();
    CHECK(grads[0].scalar_type() == torch::kBFloat16);
    CHECK(model->c.grad().scalar_type() == torch::kFloat);
    const auto expected = coefficient(2, {4, 4}) * (rank_weight_sum(dp) / 7.0);
    // bf16 has 8 mantissa bits (2^-7 relative per rounding): two roundings per element.
    INFO(rank_tag() << "bf16");
    CHECK(all_close(model->c.grad(), expected, 1.6e-2, 1e-6));
    // The values really went through bf16: every one is a bf16 number.
    const auto& g = model->c.grad();
    CHECK(torch::equal(g, g.to(torch::kBFloat16).to(torch::kFloat)));
    CHECK_FALSE(torch::equal(expected, expected.to(torch::kBFloat16).to(torch::kFloat)));
  }
  SECTION("a parameter without gradient is named by finish()") {
    DataParallelReducer reducer(*model, mesh, layout_for(model, mesh));
    reducer.zero_grad();
    loss_of(model, 1.0).backward();
    REQUIRE_THROWS_WITH(reducer.finish(), Catch::Contains("1 parameter(s) received no gradient") &&
                                              Catch::Contains("'unused'") &&
                                              Catch::Contains("allow_unused(true)"));
  }
  SECTION("a parameter used in some micro-steps only counts where it was used") {
    DataParallelReducer reducer(*model, mesh, layout_for(model, mesh));
    reducer.zero_grad();
    {
      auto guard = reducer.no_sync();
      loss_of(model, 1.0, /*with_unused=*/true).backward();
    }
    loss_of(model, 1.0).backward();
    reducer.finish();
    CHECK(torch::allclose(model->unused.grad(), torch::full({3}, static_cast<double>(dp))));
  }
}

TEST_CASE("DataParallelReducer: misuse is reported", "[mpi][dp]") {
  const auto mesh = dp_mesh();
  Plain model;
  DataParallelReducer reducer(*model, mesh, layout_for(model, mesh),
                              DataParallelOptions().allow_unused(true));
  reducer.zero_grad();
  loss_of(model, 1.0).backward();
  reducer.finish();
  // A second step without zero_grad() would add local gradients to reduced ones.
  REQUIRE_THROWS_WITH(loss_of(model, 1.0).backward(),
                      Catch::Contains("arrived after finish() without zero_grad()"));
  reducer.zero_grad();
  {
    auto guard = reducer.no_sync();
    loss_of(model, 1.0).backward();
    REQUIRE_THROWS_WITH(reducer.finish(), Catch::Contains("inside a no_sync() scope"));
  }
  reducer.finish();
}

TEST_CASE("DataParallelReducer: dp=1 keeps the local gradients", "[dp]") {
  const auto mesh = dp_mesh();
  REQUIRE(mesh.group("dp")->size() == 1);
  Plain model;
  DataParallelReducer reducer(*model, mesh, layout_for(model, mesh),
                              DataParallelOptions().allow_unused(true));
  reducer.zero_grad();
  loss_of(model, 3.0).backward();
  reducer.finish();
  CHECK(all_close(model->b.grad(), coefficient(1, {7}) * 3.0, 1e-7, 0));
  CHECK(global_token_count(17, mesh) == 17);
  CHECK(global_mean_loss(torch::tensor(12.0), 4).item<double>() == 3.0);
  REQUIRE_THROWS_WITH(global_mean_loss(torch::tensor(1.0), 0),
                      Catch::Contains("global_tokens must be > 0, got 0"));
}
