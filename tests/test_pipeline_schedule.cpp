// Pipeline schedules as data (parallel/pipeline_schedule.h): every generated schedule passes
// the checker, its simulated bubble and in-flight peak are the papers', and the checker
// refuses the faults it exists for.
#include "meshtrain/parallel/pipeline_schedule.h"

#include <catch2/catch.hpp>

#include <algorithm>

using namespace meshtrain;

namespace {

using Kind = PipelineActionKind;

PipelineScheduleSpec spec_of(PipelineSchedule schedule, int p, int m, int v = 1) {
  PipelineScheduleSpec spec;
  spec.schedule = schedule;
  spec.ranks = p;
  spec.micro_batches = m;
  spec.virtual_stages = v;
  return spec;
}

int count(const PipelineActions& list, Kind kind) {
  return static_cast<int>(
      std::count_if(list.begin(), list.end(), [&](const auto& a) { return a.kind == kind; }));
}

} // namespace

TEST_CASE("pipeline schedules: the checker accepts every generated schedule for p in {2,4,8}, "
          "m in {p,2p,4p}, v in {1,2}") {
  for (const auto schedule :
       {PipelineSchedule::kGPipe, PipelineSchedule::k1F1B, PipelineSchedule::kInterleaved1F1B,
        PipelineSchedule::kZeroBubbleH1}) {
    for (const int p : {2, 4, 8}) {
      for (const int factor : {1, 2, 4}) {
        for (const int v : {1, 2}) {
          if (v == 2 && schedule != PipelineSchedule::kInterleaved1F1B) {
            continue;
          }
          const auto spec = spec_of(schedule, p, factor * p, v);
          INFO(spec.describe());
          const auto lists = make_pipeline_schedule(spec);
          ScheduleSimulation sim;
          REQUIRE_NOTHROW(sim = check_pipeline_schedule(spec, lists));
          // Every micro-batch of every stage runs forward and has its weight gradient.
          int forwards = 0;
          int weight_gradients = 0;
          for (const auto& list : lists) {
            forwards += count(list, Kind::kForward);
            weight_gradients += count(list, Kind::kBackward) + count(list, Kind::kBackwardWeight);
          }
          CHECK(forwards == spec.micro_batches * spec.stages());
          CHECK(weight_gradients == spec.micro_batches * spec.stages());
          // F = I = W = 1: the bubble (idle over p x span) is the papers' closed form,
          // (p-1)/(m+p-1) for GPipe and 1F1B, (p-1)/(vm+p-1) interleaved, (p-1)/(3m+p-1) for
          // ZB-H1, for every p, m and v.
          const double ramp = p - 1;
          const double work = schedule == PipelineSchedule::kZeroBubbleH1 ? 3.0 * spec.micro_batches
                              : schedule == PipelineSchedule::kInterleaved1F1B
                                  ? static_cast<double>(v * spec.micro_batches)
                                  : static_cast<double>(spec.micro_batches);
          CHECK(sim.idle_fraction == Approx(ramp / (work + ramp)));
        }
      }
    }
  }
}

TEST_CASE("pipeline schedules: simulated bubbles and in-flight peaks are the papers' for equal "
          "F, I and W costs") {
  const int p = 4;
  const int m = 8;
  // The bubble on p stages of m micro-batches, as a fraction of p x span (F = I = W = 1):
  // GPipe and 1F1B (p-1)(F+B) / (m(F+B) + (p-1)(F+B)) = 3/11; interleaved v = 2 divides the
  // bubble by v: 3/19; ZB-H1 leaves (p-1)(F+I-W) = (p-1) F: 3/27.
  const auto sim = [&](PipelineSchedule schedule, int v = 1) {
    const auto spec = spec_of(schedule, p, m, v);
    return check_pipeline_schedule(spec, make_pipeline_schedule(spec));
  };
  const auto gpipe = sim(PipelineSchedule::kGPipe);
  const auto one_f_one_b = sim(PipelineSchedule::k1F1B);
  const auto interleaved = sim(PipelineSchedule::kInterleaved1F1B, 2);
  const auto zb_h1 = sim(PipelineSchedule::kZeroBubbleH1);
  CHECK(gpipe.idle_fraction == Approx(3.0 / 11));
  CHECK(one_f_one_b.idle_fraction == Approx(3.0 / 11));
  CHECK(interleaved.idle_fraction == Approx(3.0 / 19));
  CHECK(zb_h1.idle_fraction == Approx(3.0 / 27));
  // Memory: GPipe holds all m on stage 0; 1F1B at most p - s on stage s; ZB-H1 at most p.
  CHECK(gpipe.peak_in_flight[0] == m);
  for (int s = 0; s < p; ++s) {
    CHECK(one_f_one_b.peak_in_flight[s] == p - s);
    CHECK(zb_h1.peak_in_flight[s] <= p);
  }
  // Interleaved (chunk-micro-batches): Megatron's warm-up of 2(p-1) + (v-1)p on rank 0, + 1.
  CHECK(interleaved.peak_in_flight[0] == 2 * (p - 1) + p + 1);
  // Interleaved with one chunk per rank is 1F1B.
  CHECK(make_pipeline_schedule(spec_of(PipelineSchedule::kInterleaved1F1B, p, m)) ==
        make_pipeline_schedule(spec_of(PipelineSchedule::k1F1B, p, m)));
}

TEST_CASE("pipeline schedules: the checker rejects a deadlock, a backward before its forward, a "
          "missing weight gradient and out-of-order messages") {
  const auto spec = spec_of(PipelineSchedule::k1F1B, 2, 2);
  const auto good = make_pipeline_schedule(spec);

  SECTION("both ranks receive before they send") {
    // Rank 0 waits for micro-batch 0's gradient before sending its activation; rank 1 waits
    // for that activation: each waits for the other.
    std::vector<PipelineActions> lists(2);
    lists[0] = {{Kind::kForward, 0, 0},        {Kind::kRecvGradient, 0, 0},
                {Kind::kSendActivation, 0, 0}, {Kind::kBackward, 0, 0},
                {Kind::kForward, 1, 0},        {Kind::kSendActivation, 1, 0},
                {Kind::kRecvGradient, 1, 0},   {Kind::kBackward, 1, 0}};
    lists[1] = good[1];
    CHECK_THROWS_WITH(check_pipeline_schedule(spec, lists),
                      Catch::Contains("deadlock") &&
                          Catch::Contains("rank 0 waits at RecvGradient 0@s0") &&
                          Catch::Contains("rank 1 waits at RecvActivation 0@s1"));
  }
  SECTION("a backward before its forward") {
    auto lists = good;
    auto& last = lists[1];
    // Rank 1 (the last stage): RecvActivation 0, F0, B0, SendGradient 0, then micro-batch 1.
    const auto f0 = std::find(last.begin(), last.end(), PipelineAction{Kind::kForward, 0, 1});
    const auto b0 = std::find(last.begin(), last.end(), PipelineAction{Kind::kBackward, 0, 1});
    REQUIRE(f0 != last.end());
    REQUIRE(b0 != last.end());
    std::iter_swap(f0, b0);
    CHECK_THROWS_WITH(check_pipeline_schedule(spec, lists),
                      Catch::Contains("runs B0@s1 before F0@s1"));
  }
  SECTION("a weight gradient left out") {
    const auto zb = spec_of(PipelineSchedule::kZeroBubbleH1, 2, 4);
    auto lists = make_pipeline_schedule(zb);
    auto& list = lists[1];
    list.erase(std::find(list.begin(), list.end(), PipelineAction{Kind::kBackwardWeight, 3, 1}));
    CHECK_THROWS_WITH(check_pipeline_schedule(zb, lists), Catch::Contains("lacks W3@s1"));
  }
  SECTION("messages received in another order than sent") {
    // Rank 1 runs micro-batch 1 first; rank 0 sends micro-batch 0's activation first, on the
    // same tag, so rank 1 would take micro-batch 0's tensor as micro-batch 1's.
    auto lists = good;
    lists[1] = {{Kind::kRecvActivation, 1, 1}, {Kind::kForward, 1, 1},
                {Kind::kBackward, 1, 1},       {Kind::kSendGradient, 1, 1},
                {Kind::kRecvActivation, 0, 1}, {Kind::kForward, 0, 1},
                {Kind::kBackward, 0, 1},       {Kind::kSendGradient, 0, 1}};
    CHECK_THROWS_WITH(check_pipeline_schedule(spec, lists),
                      Catch::Contains("rank 1 waits at RecvActivation 1@s1, but the first "
                                      "activation stage 0 sends it is micro-batch 0"));
  }
  SECTION("an action on the wrong rank") {
    auto lists = good;
    lists[0].push_back({Kind::kForward, 0, 1});
    CHECK_THROWS_WITH(check_pipeline_schedule(spec, lists),
                      Catch::Contains("stage 1 lives on rank 1"));
  }
}

TEST_CASE("pipeline schedules: specs that cannot be scheduled are refused naming the values") {
  CHECK_THROWS_WITH(make_pipeline_schedule(spec_of(PipelineSchedule::kInterleaved1F1B, 4, 6, 2)),
                    Catch::Contains("6 micro-batches is not a multiple of 4"));
  CHECK_THROWS_WITH(make_pipeline_schedule(spec_of(PipelineSchedule::k1F1B, 4, 8, 2)),
                    Catch::Contains("2 virtual stages need the interleaved schedule"));
  CHECK_THROWS_WITH(make_pipeline_schedule(spec_of(PipelineSchedule::kGPipe, 2, 0)),
                    Catch::Contains("must be >= 1"));
}

TEST_CASE("pipeline schedules: the timeline shows each rank's actions and idle time") {
  const auto spec = spec_of(PipelineSchedule::k1F1B, 2, 2);
  const auto text =
      render_timeline(spec, check_pipeline_schedule(spec, make_pipeline_schedule(spec)));
  // Rank 1 runs F0 when rank 0 has sent it, then B0 (2 units), F1, B1; rank 0 waits for each
  // gradient. A whole backward costs I + W = 2 units.
  CHECK_THAT(text, Catch::Contains("rank 0 |F0 F1 .  .  B0 B0 .  B1 B1 |"));
  CHECK_THAT(text, Catch::Contains("rank 1 |.  F0 B0 B0 F1 B1 B1 .  .  |"));
  const auto json =
      timeline_json(spec, check_pipeline_schedule(spec, make_pipeline_schedule(spec)));
  CHECK_THAT(json, Catch::Contains("{\"kind\": \"F\", \"micro_batch\": 0, \"stage\": 0, "
                                   "\"begin\": 0, \"end\": 1}"));
}
