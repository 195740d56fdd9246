// Tests of the layout as one value (parallel/parallel_plan.h): validate() resolves the
// inferred dim and the micro-batch and refuses every bad layout with one message naming the
// value and what is allowed; and of how parallelize() applies it: a serial layer laid out
// over tp (parallel/tensor_parallel_layer.h) holds exactly the shard of a layer built on tp.
#include <catch2/catch.hpp>

#include "meshtrain/launch/parallelize.h"
#include "meshtrain/parallel/column_parallel_linear.h"
#include "meshtrain/parallel/parallel_plan.h"
#include "meshtrain/parallel/parallel_transformer_block.h"
#include "meshtrain/parallel/position_embedding.h"
#include "meshtrain/parallel/row_parallel_linear.h"
#include "meshtrain/parallel/tensor_parallel_layer.h"
#include "meshtrain/parallel/vocab_parallel_embedding.h"
#include "tests/gpt_fixtures.h"
#include "tests/harness.h"

using namespace meshtrain;
using meshtrain::testing::rank_tag;

namespace {

// The default GPT's shape (4 layers, 4 heads, T 64, C 128).
ModelShape gpt_shape() {
  ModelShape shape;
  shape.n_layer = 4;
  shape.n_head = 4;
  shape.seq_len = 64;
  shape.n_embd = 128;
  return shape;
}

ParallelPlan plan_with(int tp, int64_t batch = 16) {
  ParallelPlan plan;
  plan.dims.tp = tp;
  plan.global_batch = batch;
  return plan;
}

} // namespace

TEST_CASE("ParallelPlan: validate infers dp and the micro-batch", "[plan]") {
  auto plan = plan_with(2);
  const auto resolved = plan.validate(8, gpt_shape());
  CHECK(resolved.dims.dp == 4);
  CHECK(resolved.dims.tp == 2);
  CHECK(resolved.micro_batch == 4); // B / dp: no accumulation
  CHECK(resolved.accumulation_steps() == 1);
  plan.micro_batch = 2;
  CHECK(plan.validate(8, gpt_shape()).accumulation_steps() == 2);
  // Validating a validated plan changes nothing.
  const auto again = resolved.validate(8, gpt_shape());
  CHECK(again.fields() == resolved.fields());
  CHECK(
      resolved.describe() ==
      "dp 4 x tp 2, ZeRO 0, recompute none, fp32, batch 16 (micro-batch 4 x 1 micro-step x dp 4)");
  // Without a known batch (meshrun), the batch is not checked.
  CHECK(plan_with(2, 0).validate(4).micro_batch == 0);
}

TEST_CASE("ParallelPlan: every bad layout is refused in one place, naming the value", "[plan]") {
  struct Case {
    const char* what;
    ParallelPlan plan;
    int world;
    std::string message;
  };
  std::vector<Case> cases;
  cases.push_back({"tp not dividing the world", plan_with(3), 4,
                   "cannot infer dp: the world size 4 is not divisible by cp x tp x pp = 3 (tp "
                   "3); with 4 ranks, cp x tp x pp may be 1, 2 or 4"});
  cases.push_back({"tp not dividing the heads", plan_with(3), 3,
                   "tp (3) must divide n_head (4): each tp rank takes whole heads; with 4 heads "
                   "tp may be 1, 2 or 4"});
  auto zero4 = plan_with(1);
  zero4.zero_stage = 4;
  cases.push_back({"ZeRO 4", zero4, 2, "ZeRO stage (4) must be 0, 1, 2 or 3"});
  auto prefetch = plan_with(1);
  prefetch.zero_stage = 3;
  prefetch.prefetch = -1;
  cases.push_back({"a negative prefetch", prefetch, 2,
                   "the ZeRO-3 prefetch depth (-1 blocks) must be in 0..64"});
  auto keep = plan_with(1);
  keep.zero_stage = 2;
  keep.reshard_after_forward = false;
  cases.push_back({"a ZeRO-3 setting at ZeRO 2", keep, 2,
                   "reshard-after-forward and the prefetch depth are ZeRO-3 settings; got ZeRO 2"});
  auto micro = plan_with(1);
  micro.micro_batch = 3;
  cases.push_back({"a micro-batch not dividing", micro, 2,
                   "the global batch (16 sequences) is not divisible by micro-batch (3) x dp (2) "
                   "= 6: accumulation = B / (b x dp) must be a whole number of micro-steps; e.g. "
                   "global batch 12"});
  cases.push_back({"a batch not dividing dp", plan_with(1, 10), 4,
                   "the global batch (10 sequences) is not divisible by dp (4)"});
  auto sp = plan_with(1);
  sp.sequence_parallel = true;
  cases.push_back({"sequence parallel without tp", sp, 2,
                   "sequence parallelism needs tp > 1 (it splits the sequence over the tp ranks); "
                   "got tp 1"});
  auto dims = plan_with(2);
  dims.dims.dp = 3;
  cases.push_back({"dims not matching the world", dims, 4,
                   "dp (3) x cp (1) x tp (2) x pp (1) = 6 must equal the world size 4"});
  auto cp = plan_with(1);
  cp.dims.cp = 5; // gpt_shape's T = 64 is not divisible by 2 x 5
  cases.push_back({"context parallelism not cutting the sequence", cp, 5,
                   "context parallelism cp (5) needs the sequence length (64) divisible by 2 x "
                   "cp = 10: the sequence is cut into 2 x cp chunks, 2 per cp rank; cp may be "
                   "1, 2, 4, 8, 16 or 32"});
  auto pp = plan_with(1);
  pp.dims.pp = 2;
  auto pp_zero3 = pp;
  pp_zero3.zero_stage = 3;
  cases.push_back({"pipeline with ZeRO-3", pp_zero3, 2,
                   "ZeRO-3 with pipeline parallelism (pp 2) is not available yet"});
  auto pp_virtual = pp;
  pp_virtual.virtual_stages = 2;
  cases.push_back({"virtual stages without interleaving", pp_virtual, 2,
                   "2 virtual stages need the interleaved schedule (got 1f1b)"});
  auto pp_groups = pp_virtual;
  pp_groups.pp_schedule = PipelineSchedule::kInterleaved1F1B;
  pp_groups.dims.pp = 4;
  pp_groups.micro_batch = 8; // 16 / 8 = 2 micro-batches, not a multiple of pp 4
  cases.push_back({"interleaved micro-batches not in groups of pp", pp_groups, 4,
                   "2 micro-batches per step is not a multiple of 4"});
  auto pp_layout = pp;
  pp_layout.pp_layout = {1, 2, 1};
  cases.push_back({"a layout of the wrong length", pp_layout, 2,
                   "the pipeline layout gives 3 stages; pp (2) x virtual stages (1) = 2 are "
                   "needed"});
  pp_layout.pp_layout = {1, 2};
  cases.push_back({"a layout not adding up", pp_layout, 2,
                   "the pipeline layout's blocks add up to 3; the model has 4"});
  auto pp_uneven = pp;
  pp_uneven.dims.pp = 3;
  pp_uneven.global_batch = 15;
  cases.push_back({"an uneven split", pp_uneven, 3,
                   "4 blocks do not split evenly into pp (3) x virtual stages (1) = 3 stages; "
                   "give the blocks of each stage (--pp-layout"});
  auto pp_zb_full = pp;
  pp_zb_full.pp_schedule = PipelineSchedule::kZeroBubbleH1;
  pp_zb_full.recompute = RecomputeMode::kFull;
  cases.push_back({"zb-h1 with full recomputation", pp_zb_full, 2,
                   "zb-h1 with full recomputation is not available yet"});
  auto pp_cp = pp;
  pp_cp.dims.cp = 2;
  cases.push_back({"pipeline with context parallelism", pp_cp, 4,
                   "context parallelism (cp 2) with pipeline parallelism (pp 2) is not "
                   "available yet"});
  auto bucket = plan_with(1);
  bucket.bucket_bytes = 0;
  cases.push_back({"empty buckets", bucket, 1, "the bucket size (0 bytes) must be >= 1"});
  for (const auto& c : cases) {
    INFO(c.what);
    REQUIRE_THROWS_AS(c.plan.validate(c.world, gpt_shape()), LayoutError);
    REQUIRE_THROWS_WITH(c.plan.validate(c.world, gpt_shape()), Catch::Contains(c.message));
  }
  // What needs the model: sequence parallelism needs tp | T, grouped-query attention tp | kv.
  auto sp_t = plan_with(2);
  sp_t.sequence_parallel = true;
  auto odd = gpt_shape();
  odd.seq_len = 63;
  REQUIRE_THROWS_WITH(sp_t.validate(2, odd),
                      Catch::Contains("with sequence parallelism tp (2) must divide the sequence "
                                      "length (63); tp may be 1, 3, 7, 9, 21 or 63"));
  // Context parallelism with sequence parallelism: tp divides the T / cp local tokens.
  auto cp_sp = plan_with(4);
  cp_sp.dims.cp = 2;
  cp_sp.sequence_parallel = true;
  auto t20 = gpt_shape();
  t20.seq_len = 20;
  REQUIRE_THROWS_WITH(cp_sp.validate(8, t20),
                      Catch::Contains("with sequence parallelism tp (4) must divide the sequence "
                                      "length (20) / cp (2) = 10; tp may be 1, 2, 5 or 10"));
  t20.seq_len = 24; // 12 local tokens: 3 per tp rank
  CHECK(cp_sp.validate(8, t20).dims.dp == 1);
  auto gqa = gpt_shape();
  gqa.n_kv_head = 1;
  REQUIRE_THROWS_WITH(plan_with(2).validate(2, gqa),
                      Catch::Contains("tp (2) must divide n_kv_head (1)"));
  REQUIRE_THROWS_WITH(parse_recompute_mode("some"),
                      Catch::Contains("recompute mode 'some': must be none, selective or full"));
  // Pipeline layouts that fit: an even split, an explicit uneven one, interleaved.
  auto pp_ok = plan_with(1);
  pp_ok.dims.pp = 2;
  pp_ok.micro_batch = 4;
  const auto pp_resolved = pp_ok.validate(4, gpt_shape());
  CHECK(pp_resolved.dims.dp == 2);
  CHECK(pp_resolved.stage_layers(4) == std::vector<int64_t>{2, 2});
  CHECK(pp_resolved.describe() == "dp 2 x pp 2 (1f1b), ZeRO 0, recompute none, fp32, batch 16 "
                                  "(micro-batch 4 x 2 micro-steps x dp 2)");
  pp_ok.dims.pp = 3;
  pp_ok.pp_layout = {2, 1, 1};
  pp_ok.global_batch = 12;
  CHECK(pp_ok.validate(3, gpt_shape()).stage_layers(4) == std::vector<int64_t>{2, 1, 1});
  // Interleaved with one chunk per rank is 1F1B: any number of micro-batches.
  auto one_chunk = plan_with(1);
  one_chunk.dims.pp = 4;
  one_chunk.pp_schedule = PipelineSchedule::kInterleaved1F1B;
  one_chunk.micro_batch = 8; // 2 micro-batches
  CHECK(one_chunk.validate(4, gpt_shape()).accumulation_steps() == 2);
  auto no_width = gpt_shape();
  no_width.n_embd = 0;
  REQUIRE_THROWS_WITH(pp_ok.validate(3, no_width),
                      Catch::Contains("pipeline parallelism needs the model's width"));
  REQUIRE_THROWS_WITH(parse_pipeline_schedule("zb"),
                      Catch::Contains("must be gpipe, 1f1b, interleaved or zb-h1"));
}

TEST_CASE("apply_tensor_parallel: a serial layer laid out over tp holds the shard of a layer "
          "built on tp",
          "[mpi][plan][tp]") {
  const auto& world = meshtrain::testing::test_runtime().world();
  const TensorParallelism tp{world, true};
  {
    torch::manual_seed(7);
    ColumnParallelLinear direct(ColumnParallelLinearOptions(8, 12).gather_output(false).blocks(3),
                                world);
    torch::manual_seed(7);
    ColumnParallelLinear laid(ColumnParallelLinearOptions(8, 12).gather_output(false).blocks(3));
    laid->apply_tensor_parallel(tp);
    INFO(rank_tag() << "column-parallel q|k|v weight");
    CHECK(torch::equal(laid->weight, direct->weight));
    CHECK(torch::equal(laid->bias, direct->bias));
    CHECK(laid->shard_specs().at("weight").offset == direct->shard_specs().at("weight").offset);
    CHECK(laid->options().sequence_parallel());
    REQUIRE_THROWS_WITH(laid->apply_tensor_parallel(tp),
                        Catch::Contains("already laid out over a group of"));
  }
  {
    torch::manual_seed(8);
    RowParallelLinear direct(RowParallelLinearOptions(8, 6).input_is_parallel(true), world);
    torch::manual_seed(8);
    RowParallelLinear laid(RowParallelLinearOptions(8, 6).input_is_parallel(true));
    laid->apply_tensor_parallel(tp);
    INFO(rank_tag() << "row-parallel weight");
    CHECK(torch::equal(laid->weight, direct->weight));
    CHECK(laid->shard_specs().at("bias").sequence_parallel);
  }
  {
    // 250 rows pad to 256 for one rank and for 2 or 4: the laid-out rows are the direct ones.
    torch::manual_seed(9);
    VocabParallelEmbedding direct(VocabParallelEmbeddingOptions(250, 8), world);
    torch::manual_seed(9);
    VocabParallelEmbedding laid(VocabParallelEmbeddingOptions(250, 8));
    laid->apply_tensor_parallel(tp);
    INFO(rank_tag() << "vocab-parallel rows [" << laid->vocab_start() << ", " << laid->vocab_end()
                    << ")");
    CHECK(torch::equal(laid->weight, direct->weight));
    CHECK(laid->vocab_start() == direct->vocab_start());
    CHECK(laid->padded_num_embeddings() == direct->padded_num_embeddings());
  }
  {
    // A whole block: same output on the same sequence shard, in both directions of the walk.
    const auto options = ParallelTransformerBlockOptions(16, 4).sequence_parallel(true);
    torch::manual_seed(10);
    ParallelTransformerBlock direct(options, world);
    torch::manual_seed(10);
    ParallelTransformerBlock laid(ParallelTransformerBlockOptions(16, 4));
    apply_tensor_parallel(*laid, tp);
    torch::manual_seed(11);
    const auto x = torch::randn({2, 4 * world->size(), 16});
    const auto shard = x.narrow(1, world->rank() * 4, 4); // this rank's tokens
    INFO(rank_tag() << "transformer block output");
    CHECK(torch::allclose(laid->forward(shard), direct->forward(shard), 0, 1e-6));
  }
}
