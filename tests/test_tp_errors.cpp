// Errors a user can act on: each tensor-parallel constraint fails with the values in the
// message, on every rank, before any communication.
#include <catch2/catch.hpp>

#include "meshtrain/parallel/column_parallel_linear.h"
#include "meshtrain/parallel/mappings.h"
#include "meshtrain/parallel/parallel_mlp.h"
#include "meshtrain/parallel/parallel_self_attention.h"
#include "meshtrain/parallel/parallel_transformer_block.h"
#include "meshtrain/parallel/row_parallel_linear.h"
#include "meshtrain/parallel/vocab_parallel_embedding.h"
#include "tests/test_tp_helpers.h"

using namespace meshtrain;
using namespace meshtrain::testing;
using Catch::Contains;

TEST_CASE("TP errors name the values: heads, embedding, sequence length", "[mpi][tp]") {
  const auto mesh = tp_mesh();
  const auto& tp = mesh.group("tp");
  const std::string n = std::to_string(tp_size(mesh)); // 2 or 4
  const std::string tp_is = "tp (" + n + ")";

  REQUIRE_THROWS_WITH(ParallelSelfAttention(ParallelSelfAttentionOptions(12, 5), tp),
                      Contains("n_embd (12) must be divisible by n_head (5)"));
  // 9 is odd: divisible by neither 2 nor 4.
  REQUIRE_THROWS_WITH(ParallelSelfAttention(ParallelSelfAttentionOptions(9, 3), tp),
                      Contains("n_embd (9) must be divisible by " + tp_is));
  // 12 is divisible by 2 and 4, 3 heads by neither.
  REQUIRE_THROWS_WITH(ParallelTransformerBlock(ParallelTransformerBlockOptions(12, 3), tp),
                      Contains("n_head (3) must be divisible by " + tp_is));
  REQUIRE_THROWS_WITH(ParallelMLP(ParallelMLPOptions(9), tp),
                      Contains("n_embd (9) must be divisible by " + tp_is));
  REQUIRE_THROWS_WITH(ColumnParallelLinear(ColumnParallelLinearOptions(8, 9), tp),
                      Contains("out_features (9) must be divisible by blocks (1) x " + tp_is));
  REQUIRE_THROWS_WITH(RowParallelLinear(RowParallelLinearOptions(9, 8), tp),
                      Contains("in_features (9) must be divisible by " + tp_is));
  REQUIRE_THROWS_WITH(ParallelSelfAttention(ParallelSelfAttentionOptions(32, 8).dropout(0.1), tp),
                      Contains("dropout (0.1) > 0 needs an RngTracker"));

  // Under sequence parallelism the sequence length must split evenly over tp.
  const int64_t t = 2 * tp_size(mesh) + 1;
  const std::string seq_is =
      "sequence length T (" + std::to_string(t) + ") must be divisible by " + tp_is;
  REQUIRE_THROWS_WITH(scatter_to_sequence_parallel_region(torch::randn({2, t, 8}), tp),
                      Contains(seq_is));
  REQUIRE_THROWS_WITH(reduce_scatter_to_sequence_parallel_region(torch::randn({2, t, 8}), tp),
                      Contains(seq_is));
  VocabParallelEmbedding wte(VocabParallelEmbeddingOptions(100, 8).sequence_parallel(true), tp);
  REQUIRE_THROWS_WITH(wte(torch::zeros({2, t}, torch::kLong)), Contains(seq_is));
}
