// Tests of context parallelism's pieces (parallel/context_parallel.h, parallel/
// ring_attention.h): the chunk split and positions, ring attention against full causal
// attention (outputs and q/k/v gradients, fp32, multi-head and grouped-query, balanced and
// contiguous splits) on real cp groups of 2 and 4 ranks, its counted block-pair work against
// the closed form, and the load balance of the two splits.
#include <catch2/catch.hpp>

#include "meshtrain/core/mesh.h"
#include "meshtrain/parallel/context_parallel.h"
#include "meshtrain/parallel/ring_attention.h"
#include "tests/harness.h"

#include <algorithm>
#include <cmath>
#include <limits>

using namespace meshtrain;
using meshtrain::testing::all_close;
using meshtrain::testing::Closeness;
using meshtrain::testing::rank_tag;

namespace {

// Within `tol` relative per element, with an absolute floor of `tol` times the largest element
// of `expected` (an element near zero is a difference of O(max) terms in fp32).
Closeness close_to(const torch::Tensor& actual, const torch::Tensor& expected, double tol) {
  return all_close(actual, expected, tol, tol * expected.abs().max().item<double>());
}

// softmax(q k^T / sqrt(D), causal) v with k, v repeated to q's heads (grouped-query attention
// as Hugging Face's repeat_kv does it): q [B, h, T, D], k, v [B, hkv, T, D].
torch::Tensor full_causal_attention(const torch::Tensor& q, const torch::Tensor& k,
                                    const torch::Tensor& v) {
  const int64_t groups = q.size(1) / k.size(1);
  const auto kk = k.repeat_interleave(groups, 1);
  const auto vv = v.repeat_interleave(groups, 1);
  const int64_t t = q.size(2);
  auto att = torch::matmul(q, kk.transpose(-2, -1)) / std::sqrt(static_cast<double>(q.size(3)));
  const auto future = torch::ones({t, t}, torch::kBool).triu(1);
  att = att.masked_fill(future, -std::numeric_limits<float>::infinity()).softmax(-1);
  return torch::matmul(att, vv);
}

double max_over_min(const std::vector<double>& values) {
  return *std::max_element(values.begin(), values.end()) /
         *std::min_element(values.begin(), values.end());
}

} // namespace

TEST_CASE("Context split: chunks, positions and the local cut of a sequence", "[cp]") {
  // T = 16, cp = 2: chunks of 4; rank 0 holds 0-3 and 12-15, rank 1 holds 4-7 and 8-11.
  CHECK(context_chunks(2, 0) == std::array<int64_t, 2>{0, 3});
  CHECK(context_chunks(2, 1) == std::array<int64_t, 2>{1, 2});
  CHECK(context_chunks(4, 1, ContextSplit::kContiguous) == std::array<int64_t, 2>{2, 3});
  const auto pos = context_positions(8, 2, 0);
  CHECK(torch::equal(pos, torch::tensor({0, 1, 2, 3, 12, 13, 14, 15}, torch::kLong)));
  const auto seq = torch::arange(32, torch::kLong).view({2, 16}); // [b, T]
  const auto local = take_context_chunks(seq, 1, 2, 1);
  CHECK(torch::equal(local[1], torch::tensor({20, 21, 22, 23, 24, 25, 26, 27}, torch::kLong)));
  // Every position is held by exactly one rank.
  for (const int cp : {1, 2, 4}) {
    for (const auto split : {ContextSplit::kBalanced, ContextSplit::kContiguous}) {
      std::vector<torch::Tensor> all;
      for (int r = 0; r < cp; ++r) {
        all.push_back(context_positions(32 / cp, cp, r, split));
      }
      CHECK(torch::equal(std::get<0>(torch::cat(all).sort()), torch::arange(32, torch::kLong)));
    }
  }
  REQUIRE_THROWS_WITH(take_context_chunks(seq, 1, 3, 0),
                      Catch::Contains("the sequence (16 tokens) must be divisible by 2 x cp = 6"));
  REQUIRE_THROWS_WITH(context_chunks(2, 2), Catch::Contains("rank 2 is outside a cp group of 2"));
}

TEST_CASE("Ring attention: the balanced split evens the causal work, the contiguous one does not",
          "[cp]") {
  // cp = 4, T = 1024, the per-rank block-pair FLOPs of one forward (B x h = 8, D = 64).
  for (const auto split : {ContextSplit::kBalanced, ContextSplit::kContiguous}) {
    std::vector<double> causal, computed;
    int64_t pairs = 0;
    for (int r = 0; r < 4; ++r) {
      const auto w = ring_attention_work(8, 1024, 64, 4, r, split);
      causal.push_back(w.causal_flops);
      computed.push_back(w.computed_flops);
      pairs += w.full_pairs + w.diagonal_pairs + w.skipped_pairs;
      if (split == ContextSplit::kBalanced) {
        // Query chunk i attends to key chunks 0..i: 2cp-1 = 7 full pairs and 2 diagonal ones.
        CHECK(w.full_pairs == 7);
        CHECK(w.diagonal_pairs == 2);
        CHECK(w.skipped_pairs == 7);
      }
    }
    CHECK(pairs == 4 * 16); // every rank meets all 4 x 4 chunk pairs
    // Summed over ranks: the causal triangle of T x T scores, 4 D FLOPs each.
    double total = 0;
    for (const double f : causal) {
      total += f;
    }
    CHECK(total == Approx(4.0 * 8 * 64 * (1024.0 * 1025.0 / 2)).epsilon(1e-12));
    INFO(to_string(split) << ": causal max/min " << max_over_min(causal) << ", computed max/min "
                          << max_over_min(computed));
    if (split == ContextSplit::kBalanced) {
      CHECK(max_over_min(causal) <= 1.05);
      CHECK(max_over_min(causal) == 1.0);
      CHECK(max_over_min(computed) == 1.0);
    } else {
      // Rank 3 holds chunks 6 and 7: 13 full pairs and 2 diagonal ones; rank 0 (chunks 0
      // and 1) 1 full and 2 diagonal: (14 c^2 + c) / (2 c^2 + c) ~ 7 for c = 128. Computed
      // pairs (a diagonal one computes all c^2 scores): 15 against 3.
      CHECK(max_over_min(causal) > 6.9);
      CHECK(max_over_min(causal) < 7.0);
      CHECK(max_over_min(computed) == 5.0);
    }
  }
}

TEST_CASE("Ring attention: outputs and q/k/v gradients equal full causal attention in fp32",
          "[mpi][cp]") {
  auto& rt = meshtrain::testing::test_runtime();
  const int world = rt.world_size();
  for (const int cp : {2, 4}) {
    if (world % cp != 0) {
      continue; // cp 4 needs 4 ranks
    }
    const Mesh mesh(ParallelDims{-1, cp, 1, 1}, rt.world()); // dp = world / cp
    const auto& group = mesh.group("cp");
    const int rank = group->rank();
    for (const auto split : {ContextSplit::kBalanced, ContextSplit::kContiguous}) {
      for (const int64_t hkv : {4, 2}) { // multi-head, and grouped-query (2 query heads a group)
        const int64_t B = 2, H = 4, T = 32, D = 8;
        auto gen = at::detail::createCPUGenerator(1234 + hkv);
        const auto q = at::randn({B, H, T, D}, gen) * 1.5;
        const auto k = at::randn({B, hkv, T, D}, gen) * 1.5;
        const auto v = at::randn({B, hkv, T, D}, gen);
        const auto grad_out = at::randn({B, H, T, D}, gen);

        // The serial twin: full attention over the whole sequence, on every rank.
        const auto fq = q.clone().requires_grad_();
        const auto fk = k.clone().requires_grad_();
        const auto fv = v.clone().requires_grad_();
        const auto want = full_causal_attention(fq, fk, fv);
        want.backward(grad_out);

        const auto local = [&](const torch::Tensor& t) {
          return take_context_chunks(t, 2, cp, rank, split).detach().requires_grad_();
        };
        const auto lq = local(q), lk = local(k), lv = local(v);
        auto work = std::make_shared<RingAttentionWork>();
        const auto out =
            ring_attention(lq, lk, lv, group, RingAttentionOptions().split(split).work(work));
        out.backward(take_context_chunks(grad_out, 2, cp, rank, split));

        const auto mine = [&](const torch::Tensor& t) {
          return take_context_chunks(t, 2, cp, rank, split);
        };
        const std::string what = rank_tag() + "cp " + std::to_string(cp) + " " + to_string(split) +
                                 ", kv heads " + std::to_string(hkv);
        INFO(what);
        CHECK(out.scalar_type() == torch::kFloat);
        CHECK(close_to(out, mine(want), 1e-6));
        // The gradients sum chunk pairs in the ring's order, the twin's matmuls in the BLAS
        // kernel's: with OpenBLAS's AVX-512 kernel (SkylakeX, chosen on an AVX-512 EPYC when
        // OPENBLAS_CORETYPE is unset) one dq element of 1024 differed by 1.2e-6 of the largest
        // (2.4e-6 on 0.16); 2e-6 bounds that order, a wrong chunk or mask is 1e-1 off.
        CHECK(close_to(lq.grad(), mine(fq.grad()), 2e-6));
        CHECK(close_to(lk.grad(), mine(fk.grad()), 2e-6));
        CHECK(close_to(lv.grad(), mine(fv.grad()), 2e-6));
        // The cp ranks' outputs put back in sequence order are the full output.
        CHECK(close_to(gather_context_chunks(out, 2, group, split), want, 1e-6));
        // The pairs the ring computed are the closed form's.
        const auto expect = ring_attention_work(B * H, T, D, cp, rank, split);
        CHECK(work->full_pairs == expect.full_pairs);
        CHECK(work->diagonal_pairs == expect.diagonal_pairs);
        CHECK(work->skipped_pairs == expect.skipped_pairs);
        CHECK(work->causal_flops == expect.causal_flops);
      }
    }

    // bf16 inputs: products in bf16, statistics and accumulators in fp32.
    auto gen = at::detail::createCPUGenerator(99);
    const auto q = at::randn({2, 4, 32, 8}, gen);
    const auto k = at::randn({2, 4, 32, 8}, gen);
    const auto v = at::randn({2, 4, 32, 8}, gen);
    const auto want = take_context_chunks(full_causal_attention(q, k, v), 2, cp, rank);
    const auto low = [&](const torch::Tensor& t) {
      return take_context_chunks(t, 2, cp, rank).to(torch::kBFloat16).requires_grad_();
    };
    const auto lq = low(q), lk = low(k), lv = low(v);
    const auto out = ring_attention(lq, lk, lv, group);
    out.sum().backward();
    INFO(rank_tag() << "cp " << cp << " bf16");
    CHECK(out.scalar_type() == torch::kBFloat16);
    CHECK(lk.grad().scalar_type() == torch::kBFloat16);
    CHECK(close_to(out.to(torch::kFloat), want, 2e-2));
  }
}

TEST_CASE("Ring attention: bad shapes are named", "[cp]") {
  const auto group = make_self_communicator();
  const auto q = torch::randn({1, 4, 8, 4});
  REQUIRE_THROWS_WITH(
      ring_attention(q, torch::randn({1, 3, 8, 4}), torch::randn({1, 3, 8, 4}), group),
      Catch::Contains("the key/value heads (3) must divide the query heads (4)"));
  REQUIRE_THROWS_WITH(ring_attention(torch::randn({1, 4, 7, 4}), torch::randn({1, 4, 7, 4}),
                                     torch::randn({1, 4, 7, 4}), group),
                      Catch::Contains("the local sequence (7 tokens) must be this rank's two"));
  // A group of one: plain causal attention, chunk by chunk.
  const auto k = torch::randn({1, 4, 8, 4});
  const auto v = torch::randn({1, 4, 8, 4});
  CHECK(close_to(ring_attention(q, k, v, group), full_causal_attention(q, k, v), 1e-6));
}
