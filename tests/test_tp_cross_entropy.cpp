// vocab_parallel_cross_entropy against torch::nn::functional::cross_entropy on the full
// logits: mean, sum and count, and the gradient wrt the logits — for a vocab divisible by
// tp and for one that is not (padded columns filled with large garbage to show they are
// ignored).
#include <catch2/catch.hpp>

#include "meshtrain/parallel/vocab_parallel_cross_entropy.h"
#include "meshtrain/parallel/vocab_parallel_embedding.h"
#include "tests/test_tp_helpers.h"

using namespace meshtrain;
using namespace meshtrain::testing;

TEST_CASE("TP vocab-parallel cross-entropy equals cross_entropy, padded or not", "[mpi][tp]") {
  const auto mesh = tp_mesh();
  const auto& tp = mesh.group("tp");
  const int r = tp_rank(mesh), n = tp_size(mesh);
  for (const int64_t vocab : {int64_t{75}, int64_t{128}}) {
    const std::string what = "vocab " + std::to_string(vocab);
    const int64_t padded = padded_vocab_size(vocab, 64, n);
    torch::manual_seed(11); // the same logits and targets on every rank
    const auto logits = 3 * torch::randn({2, 8, vocab});
    auto targets = torch::randint(0, vocab, {2, 8}, torch::kLong);
    targets[0][1] = -1; // ignored
    targets[1][5] = -1;
    targets[1][6] = vocab - 1;
    // Padding columns hold garbage far above every real logit: it must not count.
    auto padded_logits = torch::cat({logits, torch::full({2, 8, padded - vocab}, 50.0)}, 2);
    auto local = chunk_of(padded_logits, -1, r, n).requires_grad_();

    const auto opts = VocabParallelCrossEntropyOptions(vocab).ignore_index(-1);
    const auto loss = vocab_parallel_cross_entropy(local, targets, tp, opts);
    loss.mean.backward();

    auto full = logits.clone().requires_grad_();
    namespace F = torch::nn::functional;
    const auto expected = F::cross_entropy(full.view({-1, vocab}), targets.view({-1}),
                                           F::CrossEntropyFuncOptions().ignore_index(-1));
    expected.backward();
    const auto expected_sum =
        F::cross_entropy(full.detach().view({-1, vocab}), targets.view({-1}),
                         F::CrossEntropyFuncOptions().ignore_index(-1).reduction(torch::kSum));

    check_rel(what + " mean", loss.mean, expected.detach());
    check_rel(what + " sum", loss.sum, expected_sum);
    INFO(rank_tag() << what << ": count " << loss.count.item<int64_t>());
    CHECK(loss.count.item<int64_t>() == 14);
    // Gradient: gathered over the vocab dim, padding dropped; padding columns get exactly 0.
    ShardSpec spec = partitioned_spec(2, padded, r, n, vocab);
    check_rel(what + " grad", gather_unsharded(local.grad(), spec, tp), full.grad());
    const int64_t first_pad = std::max<int64_t>(0, vocab - r * (padded / n));
    if (first_pad < local.size(2)) {
      const auto pad_grad = local.grad().narrow(2, first_pad, local.size(2) - first_pad);
      check_equal(what + " padding grad", pad_grad, torch::zeros_like(pad_grad));
    }
  }
}

TEST_CASE("TP vocab-parallel cross-entropy: sum/count for a global normalisation", "[mpi][tp]") {
  const auto mesh = tp_mesh();
  const auto& tp = mesh.group("tp");
  const int r = tp_rank(mesh), n = tp_size(mesh);
  const int64_t vocab = 64 * n;
  torch::manual_seed(12);
  const auto logits = torch::randn({4, vocab});
  const auto targets = torch::randint(0, vocab, {4}, torch::kLong);
  auto local = chunk_of(logits, -1, r, n).requires_grad_();
  const auto loss =
      vocab_parallel_cross_entropy(local, targets, tp, VocabParallelCrossEntropyOptions(vocab));
  // A trainer divides the summed loss by a global token count (here 2 x the local count).
  const double global_count = 2.0 * loss.count.item<double>();
  (loss.sum / global_count).backward();
  auto full = logits.clone().requires_grad_();
  (torch::nn::functional::cross_entropy(
       full, targets, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum)) /
   global_count)
      .backward();
  check_rel("sum/global count grad",
            gather_unsharded(local.grad(), partitioned_spec(1, vocab, r, n), tp), full.grad());
  REQUIRE_THROWS_WITH(vocab_parallel_cross_entropy(local, torch::full({4}, vocab, torch::kLong), tp,
                                                   VocabParallelCrossEntropyOptions(vocab)),
                      Catch::Contains("a target is outside [0, " + std::to_string(vocab) + ")"));
}
