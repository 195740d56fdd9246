// defines: PipelineAction (+ kinds), PipelineScheduleSpec, make_pipeline_schedule,
// check_pipeline_schedule, ScheduleSimulation, PipelineCosts, render_timeline — pipeline
// schedules as data (DESIGN §3 "Pipeline").
//
// A schedule is one list of actions per pp rank: compute actions (forward, backward, or the
// backward split into its input-gradient and weight-gradient halves) and the sends and
// receives between neighbouring stages. The model is cut into S = pp x virtual stages ("model
// chunks"); stage s lives on pp rank s % pp, so with virtual stages each rank holds every
// pp-th chunk (Megatron's interleaving). The generators below write the lists; the checker
// simulates every rank's list together and refuses a schedule before it runs when it could
// deadlock, runs a backward before its forward, or leaves a weight gradient out. The
// simulation also gives each rank's timeline, idle fraction and in-flight micro-batches for
// chosen action costs — the theory that bench_pipeline measures against and the planner reads.
//
// Point-to-point semantics assumed (core/comm_mpi.cpp): a send is posted and never blocks the
// list; a receive blocks the list until its message arrives; messages from one rank with one
// tag (one stage boundary and direction) arrive in the order they were sent.
//
// Pure C++ (no tensors, no MPI): meshtrain-plan prints schedules with it.
//
//   PipelineScheduleSpec spec{PipelineSchedule::k1F1B, /*stages=*/4, /*micro_batches=*/8, 1};
//   auto lists = make_pipeline_schedule(spec);        // lists[r]: pp rank r's actions
//   auto sim = check_pipeline_schedule(spec, lists);  // throws ScheduleError when unsafe
//   std::cout << render_timeline(spec, sim);
#pragma once

#include "meshtrain/parallel/parallel_plan.h"

#include <iosfwd>
#include <stdexcept>
#include <string>
#include <vector>

namespace meshtrain {

class ScheduleError : public std::invalid_argument {
public:
  using std::invalid_argument::invalid_argument;
};

enum class PipelineActionKind {
  kForward,        // F: the stage's forward of one micro-batch
  kBackward,       // B: its whole backward (input and weight gradients)
  kBackwardInput,  // I: only the input gradient (ZB-H1), sent on at once
  kBackwardWeight, // W: the deferred weight gradient of an earlier I
  kSendActivation, // the stage's output to stage + 1
  kRecvActivation, // the stage's input from stage - 1
  kSendGradient,   // the gradient of the stage's input to stage - 1
  kRecvGradient,   // the gradient of the stage's output from stage + 1
};

struct PipelineAction {
  PipelineActionKind kind;
  int micro_batch;
  int stage; // the model chunk the action is for (0 .. S-1)
  bool operator==(const PipelineAction& other) const {
    return kind == other.kind && micro_batch == other.micro_batch && stage == other.stage;
  }
};
// "F3@s1", "RecvGradient 2@s0": for messages and tests.
std::string to_string(const PipelineAction& action);
std::ostream& operator<<(std::ostream& out, const PipelineAction& action);
bool is_compute(PipelineActionKind kind);

struct PipelineScheduleSpec {
  PipelineSchedule schedule = PipelineSchedule::k1F1B;
  int ranks = 1;          // pp
  int micro_batches = 1;  // m: a step's micro-batches (DESIGN §3 micro-steps)
  int virtual_stages = 1; // v: model chunks per rank (interleaved only; 1 for the others)
  int stages() const { return ranks * virtual_stages; }
  int rank_of(int stage) const { return stage % ranks; }
  // Whether pp rank `rank` holds the first or the last stage (the embedding, or the head).
  bool holds_ends(int rank) const { return rank == rank_of(0) || rank == rank_of(stages() - 1); }
  // "1f1b, pp 4, 8 micro-batches" (+ ", 2 virtual stages").
  std::string describe() const;
};

using PipelineActions = std::vector<PipelineAction>;

// The generated lists, one per pp rank. Throws ScheduleError naming the value when the spec
// cannot be scheduled (m < 1, v > 1 outside interleaved, interleaved with m not a multiple
// of pp).
//  - gpipe: every forward, then every backward.
//  - 1f1b: pp - r - 1 warm-up forwards on rank r, then one forward and one backward in turn
//    (at most pp - r micro-batches in flight), then the remaining backwards.
//  - interleaved: Megatron's interleaved 1F1B over v chunks per rank (micro-batches in
//    groups of pp per chunk); the bubble shrinks by v.
//  - zb-h1: Qi et al. 2023's ZB-H1: the backward split into I and W; I goes first (the
//    gradient travels on sooner) and W fills what would be idle, keeping 1F1B's peak of pp
//    micro-batches in flight.
std::vector<PipelineActions> make_pipeline_schedule(const PipelineScheduleSpec& spec);

// Forward passes only (validation): micro-batch by micro-batch, each rank's chunks in stage
// order — a topological order of the forwards every rank follows, so none waits in a cycle —
// with their messages.
std::vector<PipelineActions> forward_only_schedule(const PipelineScheduleSpec& spec);

// Time each compute action takes in the simulation (any unit); a whole backward costs
// input + weight. Messages take no time.
struct PipelineCosts {
  double forward = 1.0;
  double backward_input = 1.0;
  double backward_weight = 1.0;
};

struct TimedAction {
  PipelineAction action;
  double begin;
  double end;
};

struct ScheduleSimulation {
  std::vector<std::vector<TimedAction>> timeline; // per rank: its compute actions
  double span = 0;                                // first begin to last end, all ranks
  std::vector<double> busy;                       // per rank: time computing
  double idle_fraction = 0; // 1 - sum(busy) / (ranks x span): the pipeline bubble
  // Per rank: the most micro-batches whose activations are held at once (forwarded, weight
  // gradient not yet computed), summed over the rank's chunks (with v virtual stages a chunk
  // holds 1/v of a rank's blocks, so v chunk-micro-batches weigh one micro-batch).
  std::vector<int> peak_in_flight;
};

// Simulates every rank's list and returns the timeline, or throws ScheduleError saying what
// is wrong: an action on the wrong rank, a compute action missing or repeated, a backward
// before its forward, a send before its compute or a receive after it, a message with no
// match or out of order, a weight gradient left out, or a deadlock (naming what each stuck
// rank waits for).
ScheduleSimulation check_pipeline_schedule(const PipelineScheduleSpec& spec,
                                           const std::vector<PipelineActions>& lists,
                                           const PipelineCosts& costs = {});

// The simulation as text, one row per rank, one column per `resolution` of time:
//   rank 0 |F0 F1 F2 F3 .  .  .  B0 B0 F4 ...
// F/B/I/W and the micro-batch; a later chunk of interleaved in lower case; '.' is idle.
std::string render_timeline(const PipelineScheduleSpec& spec, const ScheduleSimulation& sim,
                            double resolution = 1.0);
// The simulation as JSON ({"ranks": [[{"kind", "micro_batch", "stage", "begin", "end"}...]]})
// for scripts/plot_schedule.py, which draws the PNG chart.
std::string timeline_json(const PipelineScheduleSpec& spec, const ScheduleSimulation& sim);

} // namespace meshtrain
