// Pipeline schedules run on real ranks (parallel/pipeline_runner.h): every stage of every
// schedule receives exactly the tensors its neighbours computed for that micro-batch, and
// every weight gradient runs once, after its input gradient.
#include "meshtrain/parallel/pipeline_runner.h"
#include "tests/harness.h"

#include <map>
#include <set>

using namespace meshtrain;
using namespace meshtrain::testing;

namespace {

using Kind = PipelineActionKind;

// A toy stage s: output = input * (s + 2) + 1; stage 0's input is [mb + 1, mb + 1, mb + 1].
// Its input gradient = output gradient * (s + 2); the last stage's output gradient is
// [mb + 1, ...] times -1. Values are exact in double.
double stage_input(int mb, int s) {
  double x = mb + 1;
  for (int k = 0; k < s; ++k) {
    x = x * (k + 2) + 1;
  }
  return x;
}
double stage_output_grad(int mb, int s, int stages) {
  double g = -(mb + 1);
  for (int k = stages - 1; k > s; --k) {
    g *= k + 2;
  }
  return g;
}

} // namespace

TEST_CASE("pipeline: every schedule moves each micro-batch's activations and gradients between "
          "the right stages on real ranks",
          "[mpi][pipeline]") {
  const auto& world = test_runtime().world();
  const int p = world->size();
  const auto pp = world->split(0, world->rank(), "pp");
  for (const auto schedule :
       {PipelineSchedule::kGPipe, PipelineSchedule::k1F1B, PipelineSchedule::kInterleaved1F1B,
        PipelineSchedule::kZeroBubbleH1}) {
    PipelineScheduleSpec spec;
    spec.schedule = schedule;
    spec.ranks = p;
    spec.micro_batches = 2 * p;
    spec.virtual_stages = schedule == PipelineSchedule::kInterleaved1F1B ? 2 : 1;
    INFO(spec.describe() << " on rank " << pp->rank());
    const auto lists = make_pipeline_schedule(spec);
    check_pipeline_schedule(spec, lists);

    std::map<std::pair<int, int>, double> seen_input;
    std::map<std::pair<int, int>, double> seen_output_grad;
    std::set<std::pair<int, int>> input_grad_done;
    std::map<std::pair<int, int>, int> weight_grads;
    PipelineStageFunctions stage;
    stage.forward = [&](int mb, int s, const at::Tensor& input) {
      auto x = s == 0 ? at::full({3}, mb + 1.0, at::kDouble) : input;
      REQUIRE(x.defined());
      seen_input[{mb, s}] = x[0].item<double>();
      CHECK(x.eq(x[0]).all().item<bool>());
      return x * (s + 2) + 1;
    };
    stage.backward = [&](int mb, int s, const at::Tensor& output_grad, bool weights) {
      auto g = s == spec.stages() - 1 ? at::full({3}, -(mb + 1.0), at::kDouble) : output_grad;
      REQUIRE(g.defined());
      seen_output_grad[{mb, s}] = g[0].item<double>();
      input_grad_done.insert({mb, s});
      if (weights) {
        ++weight_grads[{mb, s}];
      }
      return g * (s + 2);
    };
    stage.backward_weight = [&](int mb, int s) {
      CHECK(input_grad_done.count({mb, s}) == 1);
      ++weight_grads[{mb, s}];
    };
    stage.message_buffer = [](int, int) { return at::empty({3}, at::kDouble); };
    const auto record = run_pipeline_actions(spec, lists[pp->rank()], *pp, stage);

    int mine = 0;
    for (int s = pp->rank(); s < spec.stages(); s += p) {
      for (int mb = 0; mb < spec.micro_batches; ++mb, ++mine) {
        CHECK(seen_input[{mb, s}] == stage_input(mb, s));
        CHECK(seen_output_grad[{mb, s}] == stage_output_grad(mb, s, spec.stages()));
        CHECK(weight_grads[{mb, s}] == 1);
      }
    }
    CHECK(static_cast<int>(seen_input.size()) == mine);
    // The record has each compute action once, in list order, with its times.
    size_t compute = 0;
    for (const auto& a : lists[pp->rank()]) {
      compute += is_compute(a.kind) ? 1 : 0;
    }
    REQUIRE(record.compute.size() == compute);
    for (const auto& t : record.compute) {
      CHECK(t.end >= t.begin);
    }
  }
}
