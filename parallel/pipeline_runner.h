// defines: PipelineStageFunctions, PipelineRunRecord, run_pipeline_actions — one pp rank runs
// its list of a pipeline schedule (parallel/pipeline_schedule.h): compute actions call the
// stage's functions, messages move tensors to and from the neighbouring stages' ranks over
// the pp communicator (non-blocking sends, receives waited for where the list needs them).
//
// Tags: stage s's activation travels with tag 2s, the gradient stage s sends back with tag
// 2s + 1, so each stage boundary and direction is its own FIFO channel — the property the
// checker verified for the list.
//
//   PipelineStageFunctions stage;
//   stage.forward = [&](int mb, int s, const at::Tensor& input) { ...; return output; };
//   stage.backward = [&](int mb, int s, const at::Tensor& output_grad, bool weights) {...};
//   stage.backward_weight = [&](int mb, int s) { ... };
//   stage.message_buffer = [&](int mb, int boundary) { return at::empty({b, T, C}); };
//   run_pipeline_actions(spec, lists[pp->rank()], *pp, stage);
#pragma once

#include "meshtrain/core/communicator.h"
#include "meshtrain/parallel/pipeline_schedule.h"

#include <functional>
#include <vector>

namespace meshtrain {

struct PipelineStageFunctions {
  // Micro-batch `mb` through stage `stage`. input: stage - 1's output (undefined on stage 0).
  // Returns the output sent to stage + 1 (ignored on the last stage).
  std::function<at::Tensor(int mb, int stage, const at::Tensor& input)> forward;
  // Its backward. output_grad: from stage + 1 (undefined on the last stage). weights: also
  // the weight gradients (false under ZB-H1's split: backward_weight follows later). Returns
  // the gradient of the stage's input (ignored on stage 0).
  std::function<at::Tensor(int mb, int stage, const at::Tensor& output_grad, bool weights)>
      backward;
  std::function<void(int mb, int stage)> backward_weight;
  // A tensor to receive into: the shape and dtype of stage `boundary`'s output (= the input of
  // stage boundary + 1, and the gradient stage boundary + 1 sends back).
  std::function<at::Tensor(int mb, int boundary)> message_buffer;
};

// When each compute action of the list ran (steady-clock seconds; one clock for all processes
// of a host), in list order.
struct PipelineRunRecord {
  std::vector<TimedAction> compute;
};

// Runs `actions` (this rank's list of a schedule `check_pipeline_schedule` accepted) on the
// pp communicator `pp` (its rank r holds stages r, r + pp, ...). Returns after every send has
// completed.
PipelineRunRecord run_pipeline_actions(const PipelineScheduleSpec& spec,
                                       const PipelineActions& actions, Communicator& pp,
                                       const PipelineStageFunctions& stage);

} // namespace meshtrain
