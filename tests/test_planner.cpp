// Tests of the memory planner (memory/planner.h): its parameter count is the GPT's, serial
// and on every tensor-parallel rank; its formulas move the way the layout says they must
// (ZeRO shards, recomputation, sequence parallelism, bf16); bad layouts are refused naming
// the value; the budget search returns only layouts that fit, fastest first; under pipeline
// parallelism each stage holds the parameters its rank keeps and the micro-batches its
// schedule has in flight. How close the estimates come to the allocation tracker's measured
// peaks (per pipeline stage too) is checked end to end by
// examples/benchmarks/bench_memory_plan.py (CTest "planner matches the tracker").
#include <catch2/catch.hpp>

#include "meshtrain/memory/planner.h"
#include "meshtrain/parallel/pipeline_stage.h"
#include "meshtrain/parallel/tensor_parallel_layer.h"
#include "tests/gpt_fixtures.h"
#include "tests/harness.h"

using namespace meshtrain;
using namespace meshtrain::testing;

namespace {

PlanModel plan_model_of(const gpt::GPTConfig& c) {
  PlanModel m;
  m.vocab_size = c.vocab_size();
  m.block_size = c.block_size();
  m.n_layer = c.n_layer();
  m.n_head = c.n_head();
  m.n_embd = c.n_embd();
  m.pad_vocab_to_multiple_of = c.pad_vocab_to_multiple_of();
  return m;
}

// train_gpt's default batch on dp x tp ranks.
ParallelPlan layout_of(int dp = 1, int tp = 1) {
  ParallelPlan plan;
  plan.dims = ParallelDims{dp, 1, tp, 1};
  plan.global_batch = 16;
  return plan;
}

int64_t numel_of(const torch::nn::Module& module) {
  int64_t n = 0;
  for (const auto& p : module.parameters()) {
    n += p.numel();
  }
  return n;
}

} // namespace

TEST_CASE("planner: parameters per rank are the GPT's", "[planner]") {
  for (const int64_t vocab : {256, 100}) { // 100 pads to 128 rows
    const auto config = tiny_config().vocab_size(vocab);
    gpt::GPT model(config);
    auto layout = layout_of();
    const auto estimate = estimate_memory(plan_model_of(config), layout);
    CHECK(estimate.parameters_per_rank == numel_of(*model));
    CHECK(estimate.parameters == 4 * numel_of(*model));
    layout.precision = Precision::kBf16;
    CHECK(estimate_memory(plan_model_of(config), layout).parameters == 2 * numel_of(*model));
  }
}

TEST_CASE("planner: parameters per rank are the GPT's on every TP rank", "[planner][mpi]") {
  const auto& world = test_runtime().world();
  const auto config = tiny_config().vocab_size(100);
  gpt::GPT model(config);
  apply_tensor_parallel(*model, TensorParallelism{world, false});
  const auto layout = layout_of(1, world->size());
  // Vocab rows split evenly after padding, so every rank holds the same count.
  CHECK(estimate_memory(plan_model_of(config), layout).parameters_per_rank == numel_of(*model));
}

TEST_CASE("planner: terms follow the layout", "[planner]") {
  PlanModel m; // train_gpt's default GPT
  const auto base = layout_of(2);
  const auto plain = estimate_memory(m, base);
  CHECK(plain.optimizer == 3 * 4 * plain.parameters_per_rank);
  CHECK(plain.gradients == 4 * plain.parameters_per_rank);
  CHECK(plain.peak == std::max(plain.state + plain.activation_peak, plain.startup));
  // Start-up: the parameters, then the reducer's gradients and the optimizer's state.
  CHECK(plain.startup == plain.parameters + plain.gradients + plain.optimizer);

  auto zero1 = base;
  zero1.zero_stage = 1;
  CHECK(estimate_memory(m, zero1).optimizer == plain.optimizer / 2);
  CHECK(estimate_memory(m, zero1).gradients == plain.gradients);
  auto zero2 = base;
  zero2.zero_stage = 2;
  CHECK(estimate_memory(m, zero2).gradients == plain.gradients / 2);
  // ZeRO-3 shards the parameters too, and gathers the root and 1 + prefetch blocks.
  auto zero3 = base;
  zero3.zero_stage = 3;
  const auto sharded = estimate_memory(m, zero3);
  CHECK(sharded.parameters == plain.parameters_per_rank / 2 * 4);
  CHECK(sharded.gradients == plain.gradients / 2);
  zero3.prefetch = 2;
  const int64_t block = (12 * m.n_embd * m.n_embd + 13 * m.n_embd) * 4; // one block's bytes
  CHECK(estimate_memory(m, zero3).gathered - sharded.gathered == block);
  zero3.reshard_after_forward = false;
  CHECK(estimate_memory(m, zero3).gathered - sharded.gathered == (m.n_layer - 2) * block);
  CHECK(plain.gathered == 0);

  auto selective = base;
  selective.recompute = RecomputeMode::kSelective;
  auto full = base;
  full.recompute = RecomputeMode::kFull;
  // Selective drops exactly the softmax output [b, h, T, T] of every block.
  const int64_t b = 8, scores = m.n_head * b * m.block_size * m.block_size;
  CHECK(plain.saved_layers - estimate_memory(m, selective).saved_layers == m.n_layer * scores * 4);
  CHECK(estimate_memory(m, full).saved_layers == m.n_layer * b * m.block_size * m.n_embd * 4);
  CHECK(estimate_memory(m, full).activation_peak < plain.activation_peak / 2);

  const auto tp2 = layout_of(1, 2);
  auto sp = tp2;
  sp.sequence_parallel = true;
  CHECK(estimate_memory(m, sp).saved_layers < estimate_memory(m, tp2).saved_layers);
  auto bf16 = base;
  bf16.precision = Precision::kBf16;
  CHECK(estimate_memory(m, bf16).saved_layers < plain.saved_layers * 6 / 10);
}

TEST_CASE("planner: context parallelism cuts the activations, shards the state over dp x cp",
          "[planner][cp]") {
  PlanModel m;
  m.n_layer = 2;
  m.n_embd = 64;
  m.n_head = 4;
  m.block_size = 1024;
  const auto plan_with = [](int cp) {
    ParallelPlan p = layout_of();
    p.dims.cp = cp;
    return p.validate(cp, ModelShape{2, 4, 0, 1024});
  };
  const auto one = estimate_memory(m, plan_with(1));
  const auto four = estimate_memory(m, plan_with(4));
  // T = 1024: no [T, T] probabilities under ring attention, and T/4 tokens per rank (the
  // tracker measures 0.044x, docs/context-parallel.md).
  INFO("activation peak cp4 / cp1 = " << static_cast<double>(four.activation_peak) /
                                             static_cast<double>(one.activation_peak));
  CHECK(four.activation_peak <= 0.3 * static_cast<double>(one.activation_peak));
  CHECK(four.saved_layers < one.saved_layers / 4);
  // The state is sharded over the dp x cp ranks like over dp.
  auto zero1 = plan_with(4);
  zero1.zero_stage = 1;
  auto dp4 = layout_of(4);
  dp4.zero_stage = 1;
  CHECK(estimate_memory(m, zero1).optimizer == estimate_memory(m, dp4.validate(4)).optimizer);
  // The ring moves key/value blocks: cp 4 communicates, cp 1 on one rank does not.
  CHECK(estimate_cost(m, plan_with(4)).comm_bytes > 0);
  CHECK(estimate_cost(m, plan_with(1)).comm_bytes == 0);
}

TEST_CASE("planner: bad layouts are refused naming the value", "[planner]") {
  // The planner checks layouts with ParallelPlan::validate: the same messages as train_gpt.
  PlanModel m;
  auto l = layout_of(1, 3);
  REQUIRE_THROWS_WITH(estimate_memory(m, l), Catch::Contains("tp (3) must divide n_head (4)"));
  l = layout_of();
  l.zero_stage = 4;
  REQUIRE_THROWS_WITH(estimate_memory(m, l),
                      Catch::Contains("ZeRO stage (4) must be 0, 1, 2 or 3"));
  l = layout_of();
  l.sequence_parallel = true;
  REQUIRE_THROWS_WITH(estimate_memory(m, l),
                      Catch::Contains("needs tp > 1") && Catch::Contains("got tp 1"));
  l = layout_of();
  l.micro_batch = 5;
  REQUIRE_THROWS_WITH(estimate_memory(m, l),
                      Catch::Contains("global batch (16 sequences) is not divisible by "
                                      "micro-batch (5) x dp (1)"));
  l = layout_of(-1);
  REQUIRE_THROWS_WITH(estimate_memory(m, l), Catch::Contains("give every dim of the layout"));
  m.n_embd = 130;
  REQUIRE_THROWS_WITH(estimate_memory(m, layout_of()),
                      Catch::Contains("n_embd (130) must be divisible by n_head (4)"));
  REQUIRE_THROWS_WITH(parse_precision("fp8"), Catch::Contains("precision 'fp8': must be"));
}

TEST_CASE("planner: the budget search lists what fits, fastest first", "[planner]") {
  PlanModel m;
  const auto fixed = layout_of();
  const auto everything = plan_layouts(m, 4, fixed, int64_t{1} << 40);
  std::vector<RankedLayout> all; // without a pipeline (the pipelines: the next test case)
  for (const auto& r : everything) {
    if (r.layout.dims.pp == 1) {
      all.push_back(r);
    }
  }
  // dp 4 x tp 1: ZeRO 0-3 x 3 modes x micro-batches {1, 2, 4}; dp 2 x tp 2: ZeRO 0-3 x
  // sequence parallel or not x 3 modes x {1, 2, 4, 8}; dp 1 x tp 4: ZeRO 0 x 2 x 3 x
  // {1, 2, 4, 8, 16}. Context parallelism (ZeRO shards over dp x cp): dp 2 x cp 2: ZeRO 0-3 x
  // 3 modes x {1, 2, 4, 8}; cp 2 x tp 2: ZeRO 0-3 x 2 x 3 x {1, 2, 4, 8, 16}; cp 4: ZeRO 0-3 x
  // 3 x {1, 2, 4, 8, 16}.
  CHECK(all.size() ==
        4 * 3 * 3 + 4 * 2 * 3 * 4 + 1 * 2 * 3 * 5 + 4 * 3 * 4 + 4 * 2 * 3 * 5 + 4 * 3 * 5);
  for (size_t i = 1; i < everything.size(); ++i) {
    CHECK(everything[i - 1].cost.step_s <= everything[i].cost.step_s);
  }
  // Half-way between the smallest and the largest peak: some fit, some do not.
  int64_t lo = all.front().memory.peak, hi = lo;
  for (const auto& r : all) {
    lo = std::min(lo, r.memory.peak);
    hi = std::max(hi, r.memory.peak);
  }
  const auto some = plan_layouts(m, 4, fixed, (lo + hi) / 2);
  CHECK(!some.empty());
  CHECK(some.size() < everything.size());
  for (const auto& r : some) {
    CHECK(r.memory.peak <= (lo + hi) / 2);
  }
  for (const auto& r : everything) {
    lo = std::min(lo, r.memory.peak);
  }
  CHECK(plan_layouts(m, 4, fixed, lo - 1).empty());
}

namespace {

// train_gpt's default GPT and batch in a pipeline of pp stages, m micro-batches.
ParallelPlan pipeline_of(int pp, PipelineSchedule schedule, int64_t micro_batches,
                         int virtual_stages = 1, int dp = 1) {
  ParallelPlan plan = layout_of(dp);
  plan.dims.pp = pp;
  plan.pp_schedule = schedule;
  plan.virtual_stages = virtual_stages;
  plan.micro_batch = plan.global_batch / dp / micro_batches;
  return plan;
}

std::vector<int> in_flight(const std::vector<MemoryEstimate>& stages) {
  std::vector<int> out;
  for (const auto& s : stages) {
    out.push_back(s.micro_batches_in_flight);
  }
  return out;
}

} // namespace

TEST_CASE("planner: each pipeline stage holds the parameters its rank keeps", "[planner][pp]") {
  // 8 blocks in 4 stages of 2 (pp 2 x 2 virtual stages: rank 0 holds blocks 0-1 and 4-5):
  // the planner's parameter count of each pp rank is what drop_other_stages leaves that rank
  // of the real GPT, the parameters outside the blocks on the first and the last rank only.
  const auto config = tiny_config().n_layer(8);
  for (const int pp : {2, 4}) {
    const int v = pp == 2 ? 2 : 1;
    const auto plan =
        pipeline_of(pp, v > 1 ? PipelineSchedule::kInterleaved1F1B : PipelineSchedule::k1F1B, 4, v);
    const auto stages = estimate_memory_per_stage(plan_model_of(config), plan);
    REQUIRE(stages.size() == static_cast<size_t>(pp));
    const auto layers = validate_plan(plan_model_of(config), plan).stage_layers(8);
    for (int rank = 0; rank < pp; ++rank) {
      gpt::GPT model(config);
      std::vector<bool> keep;
      for (int s = 0; s < pp * v; ++s) {
        keep.insert(keep.end(), static_cast<size_t>(layers[s]), s % pp == rank);
      }
      const bool ends = rank == 0 || rank == pp - 1;
      drop_other_stages(*model, model->blocks(), keep, ends);
      INFO("pp " << pp << ", rank " << rank);
      CHECK(stages[rank].parameters_per_rank == numel_of(*model));
      CHECK(stages[rank].parameters == 4 * numel_of(*model));
      CHECK(stages[rank].holds_outside_blocks == ends);
      CHECK(stages[rank].blocks == 8 / pp);
      CHECK(stages[rank].pp_rank == rank);
    }
  }
}

TEST_CASE("planner: a pipeline stage holds the micro-batches its schedule has in flight",
          "[planner][pp]") {
  PlanModel m; // 4 blocks
  // 1F1B: p - s on stage s; GPipe: all m; ZB-H1: p on every stage (rank r defers r weight
  // gradients); interleaved v 2, p 2, m 4 (chunk-micro-batches): Megatron's warm-up.
  const auto one_f_one_b = estimate_memory_per_stage(m, pipeline_of(4, PipelineSchedule::k1F1B, 8));
  const auto gpipe = estimate_memory_per_stage(m, pipeline_of(4, PipelineSchedule::kGPipe, 8));
  const auto zb = estimate_memory_per_stage(m, pipeline_of(4, PipelineSchedule::kZeroBubbleH1, 8));
  CHECK(in_flight(one_f_one_b) == std::vector<int>{4, 3, 2, 1});
  CHECK(in_flight(gpipe) == std::vector<int>{8, 8, 8, 8});
  CHECK(in_flight(zb) == std::vector<int>{4, 4, 4, 4});
  const auto interleaved =
      estimate_memory_per_stage(m, pipeline_of(2, PipelineSchedule::kInterleaved1F1B, 4, 2));
  CHECK(in_flight(interleaved) == std::vector<int>{5, 3});

  // At the peak each micro-batch in flight keeps its blocks' tensors (one block per stage
  // here): GPipe's middle stages hold 8 micro-batches of what 1F1B's last stage holds 1 of.
  CHECK(gpipe[1].saved_layers == 8 * one_f_one_b[3].saved_layers);
  CHECK(gpipe[2].saved_layers == gpipe[1].saved_layers);
  CHECK(one_f_one_b[0].saved_layers == 4 * one_f_one_b[3].saved_layers);
  CHECK(one_f_one_b[0].activation_peak > one_f_one_b[1].activation_peak);
  for (const auto& stages : {one_f_one_b, gpipe, zb, interleaved}) {
    for (const auto& s : stages) {
      CHECK(s.activation_peak == s.saved_layers + s.saved_head + s.transient + s.gathered +
                                     s.held_gradients + s.messages);
      CHECK(s.peak == std::max(s.state + s.activation_peak, s.startup));
    }
  }
  // After the first backward autograd's gradient of every parameter of the stage stays (one
  // no_sync scope over the schedule): the 1F1B peak on stage 0 is in the steady phase.
  CHECK(one_f_one_b[0].held_gradients == one_f_one_b[0].parameters);
  // The one-estimate overload is the worst stage; a rank is asked for by number.
  const auto plan = pipeline_of(4, PipelineSchedule::k1F1B, 8);
  CHECK(estimate_memory(m, plan).pp_rank == 0);
  CHECK(estimate_memory(m, plan).peak == one_f_one_b[0].peak);
  CHECK(estimate_memory(m, plan, 2).peak == one_f_one_b[2].peak);
  REQUIRE_THROWS_WITH(estimate_memory(m, plan, 4),
                      Catch::Contains("pp rank (4) must be in [0, 4)"));
  // Without a pipeline: one stage, the serial estimate.
  CHECK(estimate_memory_per_stage(m, layout_of(2)).size() == 1);
  CHECK(estimate_memory_per_stage(m, layout_of(2))[0].peak ==
        estimate_memory(m, layout_of(2)).peak);
}

TEST_CASE("planner: the pipeline cost has the schedule's bubble and its messages",
          "[planner][pp]") {
  PlanModel m;
  // The simulated bubbles at p 4, m 8 (docs/pipeline.md): 3/11 (GPipe, 1F1B), 3/27 (ZB-H1).
  CHECK(estimate_cost(m, pipeline_of(4, PipelineSchedule::k1F1B, 8)).bubble == Approx(3.0 / 11.0));
  CHECK(estimate_cost(m, pipeline_of(4, PipelineSchedule::kGPipe, 8)).bubble == Approx(3.0 / 11.0));
  CHECK(estimate_cost(m, pipeline_of(4, PipelineSchedule::kZeroBubbleH1, 8)).bubble ==
        Approx(3.0 / 27.0));
  // A middle stage sends each micro-batch's activation on and its gradient back:
  // 2 x 8 x [b 2, T 64, C 128] fp32.
  const auto cost = estimate_cost(m, pipeline_of(4, PipelineSchedule::k1F1B, 8));
  CHECK(cost.p2p_bytes == 2 * 8 * 2 * 64 * 128 * 4);
  CHECK(estimate_cost(m, layout_of(1)).bubble == 0);
}

TEST_CASE("planner: the budget search ranks pipeline layouts by their largest stage",
          "[planner][pp]") {
  PlanModel m;
  const auto fixed = layout_of();
  const auto all = plan_layouts(m, 4, fixed, int64_t{1} << 40);
  int pipelines = 0;
  int64_t largest = 0;
  for (const auto& r : all) {
    if (r.layout.dims.pp == 1) {
      continue;
    }
    ++pipelines;
    CHECK(r.layout.zero_stage <= 2);
    CHECK(r.layout.dims.cp == 1);
    int64_t worst = 0;
    for (const auto& stage : estimate_memory_per_stage(m, r.layout)) {
      worst = std::max(worst, stage.peak);
    }
    CHECK(r.memory.peak == worst);
    largest = std::max(largest, worst);
  }
  // pp 2 and pp 4 of the 4 blocks, every schedule (interleaved where 2 x pp chunks split 4).
  CHECK(pipelines > 0);
  const auto has = [&](int pp, PipelineSchedule schedule) {
    return std::any_of(all.begin(), all.end(), [&](const RankedLayout& r) {
      return r.layout.dims.pp == pp && r.layout.pp_schedule == schedule;
    });
  };
  CHECK(has(2, PipelineSchedule::kGPipe));
  CHECK(has(2, PipelineSchedule::kInterleaved1F1B));
  CHECK(has(4, PipelineSchedule::k1F1B));
  CHECK(has(4, PipelineSchedule::kZeroBubbleH1));
  CHECK_FALSE(has(4, PipelineSchedule::kInterleaved1F1B)); // 8 chunks of 4 blocks: no
  // Every pipeline layout fits a budget of its largest stage's peak, none one byte less.
  const auto fitting = plan_layouts(m, 4, fixed, largest - 1);
  for (const auto& r : fitting) {
    CHECK(r.memory.peak <= largest - 1);
  }
}
