// defines: the schedule generators, the checker's simulation and the timeline renderers (see
// pipeline_schedule.h).
#include "meshtrain/parallel/pipeline_schedule.h"

#include "meshtrain/core/text.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <map>
#include <ostream>
#include <sstream>
#include <tuple>

namespace meshtrain {
namespace {

using Kind = PipelineActionKind;

[[noreturn]] void reject(const PipelineScheduleSpec& spec, const std::string& message) {
  throw ScheduleError(cat("pipeline schedule (", spec.describe(), "): ", message));
}

const char* kind_name(Kind kind) {
  switch (kind) {
  case Kind::kForward:
    return "F";
  case Kind::kBackward:
    return "B";
  case Kind::kBackwardInput:
    return "I";
  case Kind::kBackwardWeight:
    return "W";
  case Kind::kSendActivation:
    return "SendActivation ";
  case Kind::kRecvActivation:
    return "RecvActivation ";
  case Kind::kSendGradient:
    return "SendGradient ";
  case Kind::kRecvGradient:
    return "RecvGradient ";
  }
  return "?";
}

// ---- generators: the compute actions of each rank, in order --------------------------------

std::vector<PipelineActions> gpipe(const PipelineScheduleSpec& spec) {
  std::vector<PipelineActions> lists(spec.ranks);
  for (int r = 0; r < spec.ranks; ++r) {
    for (int mb = 0; mb < spec.micro_batches; ++mb) {
      lists[r].push_back({Kind::kForward, mb, r});
    }
    for (int mb = 0; mb < spec.micro_batches; ++mb) {
      lists[r].push_back({Kind::kBackward, mb, r});
    }
  }
  return lists;
}

// 1F1B, and ZB-H1 when `split_backward`: on rank r, I(j) is followed by W(j - r) — the
// rank defers r weight gradients, so the input gradients reach stage 0 sooner and the tail
// that 1F1B leaves idle is filled with the deferred W's. Stage r then holds at most
// (pp - r) + r = pp micro-batches, 1F1B's peak on stage 0.
std::vector<PipelineActions> one_forward_one_backward(const PipelineScheduleSpec& spec,
                                                      bool split_backward) {
  const int p = spec.ranks;
  const int m = spec.micro_batches;
  std::vector<PipelineActions> lists(p);
  for (int r = 0; r < p; ++r) {
    auto& list = lists[r];
    const int deferred = split_backward ? r : 0;
    const auto backward = [&](int mb) {
      if (!split_backward) {
        list.push_back({Kind::kBackward, mb, r});
        return;
      }
      list.push_back({Kind::kBackwardInput, mb, r});
      if (mb - deferred >= 0) {
        list.push_back({Kind::kBackwardWeight, mb - deferred, r});
      }
    };
    const int warmup = std::min(p - r - 1, m);
    int forwards = 0;
    int backwards = 0;
    for (; forwards < warmup; ++forwards) {
      list.push_back({Kind::kForward, forwards, r});
    }
    for (; forwards < m; ++forwards, ++backwards) {
      list.push_back({Kind::kForward, forwards, r});
      backward(backwards);
    }
    for (; backwards < m; ++backwards) {
      backward(backwards);
    }
    for (int mb = std::max(0, m - deferred); mb < m; ++mb) {
      list.push_back({Kind::kBackwardWeight, mb, r});
    }
  }
  return lists;
}

// Megatron-LM's interleaved 1F1B: rank r runs its v chunks (stages r, r + p, ...) in groups of
// p micro-batches per chunk: forward step k is micro-batch (k / (p v)) p + k % p of chunk
// (k / p) % v; backward step k the same micro-batch of chunk v - 1 - (k / p) % v.
// Warm-up: (p - r - 1) 2 + (v - 1) p forward steps.
std::vector<PipelineActions> interleaved(const PipelineScheduleSpec& spec) {
  const int p = spec.ranks;
  const int v = spec.virtual_stages;
  const int m = spec.micro_batches;
  const int steps = m * v;
  std::vector<PipelineActions> lists(p);
  for (int r = 0; r < p; ++r) {
    const auto micro_batch = [&](int k) { return (k / (p * v)) * p + k % p; };
    const auto forward = [&](int k) {
      return PipelineAction{Kind::kForward, micro_batch(k), ((k / p) % v) * p + r};
    };
    const auto backward = [&](int k) {
      return PipelineAction{Kind::kBackward, micro_batch(k), (v - 1 - (k / p) % v) * p + r};
    };
    const int warmup = std::min((p - r - 1) * 2 + (v - 1) * p, steps);
    auto& list = lists[r];
    int forwards = 0;
    int backwards = 0;
    for (; forwards < warmup; ++forwards) {
      list.push_back(forward(forwards));
    }
    for (; forwards < steps; ++forwards, ++backwards) {
      list.push_back(forward(forwards));
      list.push_back(backward(backwards));
    }
    for (; backwards < steps; ++backwards) {
      list.push_back(backward(backwards));
    }
  }
  return lists;
}

// Wraps each compute action in its messages: the receive just before the action that needs
// it, the send just after the action that produced it.
std::vector<PipelineActions> with_messages(const PipelineScheduleSpec& spec,
                                           const std::vector<PipelineActions>& compute) {
  const int last = spec.stages() - 1;
  std::vector<PipelineActions> lists(compute.size());
  for (size_t r = 0; r < compute.size(); ++r) {
    for (const auto& a : compute[r]) {
      auto& list = lists[r];
      const int mb = a.micro_batch;
      const int s = a.stage;
      if (a.kind == Kind::kForward) {
        if (s > 0) {
          list.push_back({Kind::kRecvActivation, mb, s});
        }
        list.push_back(a);
        if (s < last) {
          list.push_back({Kind::kSendActivation, mb, s});
        }
      } else if (a.kind == Kind::kBackward || a.kind == Kind::kBackwardInput) {
        if (s < last) {
          list.push_back({Kind::kRecvGradient, mb, s});
        }
        list.push_back(a);
        if (s > 0) {
          list.push_back({Kind::kSendGradient, mb, s});
        }
      } else {
        list.push_back(a);
      }
    }
  }
  return lists;
}

// ---- the checker ---------------------------------------------------------------------------

// Where each action of (kind, micro-batch, stage) sits in its rank's list.
using ActionKey = std::tuple<int, int, int>; // (kind, micro-batch, stage)
ActionKey key(Kind kind, int mb, int stage) {
  return {static_cast<int>(kind), mb, stage};
}

void check_lists(const PipelineScheduleSpec& spec, const std::vector<PipelineActions>& lists,
                 std::map<ActionKey, size_t>& position) {
  const int last = spec.stages() - 1;
  if (static_cast<int>(lists.size()) != spec.ranks) {
    reject(spec, cat(lists.size(), " action lists for ", spec.ranks, " pp ranks"));
  }
  for (int r = 0; r < spec.ranks; ++r) {
    for (size_t i = 0; i < lists[r].size(); ++i) {
      const auto& a = lists[r][i];
      if (a.stage < 0 || a.stage > last || a.micro_batch < 0 ||
          a.micro_batch >= spec.micro_batches) {
        reject(spec, cat("rank ", r, " has ", to_string(a), ": stages are 0..", last,
                         ", micro-batches 0..", spec.micro_batches - 1));
      }
      if (spec.rank_of(a.stage) != r) {
        reject(spec, cat("rank ", r, " has ", to_string(a), ", but stage ", a.stage,
                         " lives on rank ", spec.rank_of(a.stage)));
      }
      const bool pointless = (a.kind == Kind::kSendActivation && a.stage == last) ||
                             (a.kind == Kind::kRecvGradient && a.stage == last) ||
                             (a.kind == Kind::kRecvActivation && a.stage == 0) ||
                             (a.kind == Kind::kSendGradient && a.stage == 0);
      if (pointless) {
        reject(spec, cat("rank ", r, " has ", to_string(a), ", which has no peer stage"));
      }
      if (!position.emplace(key(a.kind, a.micro_batch, a.stage), i).second) {
        reject(spec, cat("rank ", r, " has ", to_string(a), " twice"));
      }
    }
  }
  const auto at = [&](Kind kind, int mb, int s) -> long {
    const auto found = position.find(key(kind, mb, s));
    return found == position.end() ? -1 : static_cast<long>(found->second);
  };
  // `first` must come before `then` in the list of rank_of(s); both present.
  const auto before = [&](Kind first, Kind then, int mb, int s) {
    const long a = at(first, mb, s);
    const long b = at(then, mb, s);
    if (a < 0 || b < 0) {
      reject(spec, cat("rank ", spec.rank_of(s), " lacks ",
                       to_string(PipelineAction{a < 0 ? first : then, mb, s})));
    }
    if (a > b) {
      reject(spec, cat("rank ", spec.rank_of(s), " runs ", to_string(PipelineAction{then, mb, s}),
                       " before ", to_string(PipelineAction{first, mb, s})));
    }
  };
  for (int s = 0; s <= last; ++s) {
    for (int mb = 0; mb < spec.micro_batches; ++mb) {
      const bool whole = at(Kind::kBackward, mb, s) >= 0;
      const bool split = at(Kind::kBackwardInput, mb, s) >= 0;
      if (whole && (split || at(Kind::kBackwardWeight, mb, s) >= 0)) {
        reject(spec, cat("rank ", spec.rank_of(s), " has both a whole and a split backward of ",
                         "micro-batch ", mb, " on stage ", s));
      }
      if (!whole && !split && at(Kind::kBackwardWeight, mb, s) >= 0) {
        reject(spec, cat("rank ", spec.rank_of(s), " runs W", mb, "@s", s,
                         " without its input gradient I", mb, "@s", s));
      }
      const Kind backward = split ? Kind::kBackwardInput : Kind::kBackward;
      before(Kind::kForward, backward, mb, s);
      if (split) {
        // Without W the weight gradient of this micro-batch is never applied.
        before(Kind::kBackwardInput, Kind::kBackwardWeight, mb, s);
      }
      if (s > 0) {
        before(Kind::kRecvActivation, Kind::kForward, mb, s);
        before(backward, Kind::kSendGradient, mb, s);
      }
      if (s < last) {
        before(Kind::kForward, Kind::kSendActivation, mb, s);
        before(Kind::kRecvGradient, backward, mb, s);
      }
    }
  }
}

double cost_of(Kind kind, const PipelineCosts& costs) {
  switch (kind) {
  case Kind::kForward:
    return costs.forward;
  case Kind::kBackward:
    return costs.backward_input + costs.backward_weight;
  case Kind::kBackwardInput:
    return costs.backward_input;
  case Kind::kBackwardWeight:
    return costs.backward_weight;
  default:
    return 0.0;
  }
}

} // namespace

std::string to_string(const PipelineAction& action) {
  return cat(kind_name(action.kind), action.micro_batch, "@s", action.stage);
}

std::ostream& operator<<(std::ostream& out, const PipelineAction& action) {
  return out << to_string(action);
}

bool is_compute(PipelineActionKind kind) {
  return kind == Kind::kForward || kind == Kind::kBackward || kind == Kind::kBackwardInput ||
         kind == Kind::kBackwardWeight;
}

std::string PipelineScheduleSpec::describe() const {
  std::string text =
      cat(to_string(schedule), ", pp ", ranks, ", ", micro_batches, " micro-batches");
  if (virtual_stages > 1) {
    text += cat(", ", virtual_stages, " virtual stages");
  }
  return text;
}

std::vector<PipelineActions> make_pipeline_schedule(const PipelineScheduleSpec& spec) {
  if (spec.ranks < 1 || spec.micro_batches < 1 || spec.virtual_stages < 1) {
    reject(spec, "pp, the micro-batches and the virtual stages must be >= 1");
  }
  const bool is_interleaved = spec.schedule == PipelineSchedule::kInterleaved1F1B;
  if (spec.virtual_stages > 1 && !is_interleaved) {
    reject(spec, cat(spec.virtual_stages, " virtual stages need the interleaved schedule; ",
                     to_string(spec.schedule), " runs one chunk per rank"));
  }
  if (is_interleaved && spec.virtual_stages > 1 && spec.micro_batches % spec.ranks != 0) {
    reject(spec, cat("interleaved 1F1B runs micro-batches in groups of pp (", spec.ranks, "); ",
                     spec.micro_batches, " micro-batches is not a multiple of ", spec.ranks));
  }
  switch (spec.schedule) {
  case PipelineSchedule::kGPipe:
    return with_messages(spec, gpipe(spec));
  case PipelineSchedule::k1F1B:
    return with_messages(spec, one_forward_one_backward(spec, false));
  case PipelineSchedule::kInterleaved1F1B:
    // One chunk per rank is plain 1F1B (Megatron's interleaved warm-up would hold more).
    return with_messages(spec, spec.virtual_stages == 1 ? one_forward_one_backward(spec, false)
                                                        : interleaved(spec));
  case PipelineSchedule::kZeroBubbleH1:
    return with_messages(spec, one_forward_one_backward(spec, true));
  }
  reject(spec, "unknown schedule");
}

std::vector<PipelineActions> forward_only_schedule(const PipelineScheduleSpec& spec) {
  std::vector<PipelineActions> compute(spec.ranks);
  for (int mb = 0; mb < spec.micro_batches; ++mb) {
    for (int s = 0; s < spec.stages(); ++s) {
      compute[spec.rank_of(s)].push_back({Kind::kForward, mb, s});
    }
  }
  return with_messages(spec, compute);
}

ScheduleSimulation check_pipeline_schedule(const PipelineScheduleSpec& spec,
                                           const std::vector<PipelineActions>& lists,
                                           const PipelineCosts& costs) {
  std::map<ActionKey, size_t> position;
  check_lists(spec, lists, position);

  // Runs every rank's list as far as its receives allow, over and over, until all are done or
  // none can move. A message is (micro-batch, time sent) on the channel of its stage boundary
  // and direction; the channel is FIFO, as one MPI tag between two ranks is.
  const int p = spec.ranks;
  std::map<std::pair<int, bool>, std::deque<std::pair<int, double>>>
      channels; // (from stage, gradient)
  std::vector<size_t> next(p, 0);
  std::vector<double> clock(p, 0.0);
  std::vector<int> in_flight(p, 0);
  ScheduleSimulation sim;
  sim.timeline.resize(p);
  sim.busy.assign(p, 0.0);
  sim.peak_in_flight.assign(p, 0);
  for (bool moved = true; moved;) {
    moved = false;
    for (int r = 0; r < p; ++r) {
      for (; next[r] < lists[r].size(); ++next[r], moved = true) {
        const auto& a = lists[r][next[r]];
        if (a.kind == Kind::kSendActivation || a.kind == Kind::kSendGradient) {
          const bool gradient = a.kind == Kind::kSendGradient;
          channels[{a.stage, gradient}].emplace_back(a.micro_batch, clock[r]);
          continue;
        }
        if (a.kind == Kind::kRecvActivation || a.kind == Kind::kRecvGradient) {
          const bool gradient = a.kind == Kind::kRecvGradient;
          auto& channel = channels[{gradient ? a.stage + 1 : a.stage - 1, gradient}];
          if (channel.empty()) {
            break; // blocked until the peer sends
          }
          if (channel.front().first != a.micro_batch) {
            reject(spec, cat("rank ", r, " waits at ", to_string(a), ", but the first ",
                             gradient ? "gradient" : "activation", " stage ",
                             gradient ? a.stage + 1 : a.stage - 1, " sends it is micro-batch ",
                             channel.front().first,
                             ": messages between two stages must be received in the order sent"));
          }
          clock[r] = std::max(clock[r], channel.front().second);
          channel.pop_front();
          continue;
        }
        const double cost = cost_of(a.kind, costs);
        sim.timeline[r].push_back({a, clock[r], clock[r] + cost});
        clock[r] += cost;
        sim.busy[r] += cost;
        if (a.kind == Kind::kForward) {
          sim.peak_in_flight[r] = std::max(sim.peak_in_flight[r], ++in_flight[r]);
        } else if (a.kind == Kind::kBackward || a.kind == Kind::kBackwardWeight) {
          --in_flight[r];
        }
      }
    }
  }
  std::string stuck;
  for (int r = 0; r < p; ++r) {
    if (next[r] < lists[r].size()) {
      stuck +=
          cat(stuck.empty() ? "" : "; ", "rank ", r, " waits at ", to_string(lists[r][next[r]]));
    }
  }
  if (!stuck.empty()) {
    reject(spec,
           "deadlock: every unfinished rank waits for a message no rank will send (" + stuck + ")");
  }
  for (const auto& row : sim.timeline) {
    if (!row.empty()) {
      sim.span = std::max(sim.span, row.back().end); // every rank starts at time 0
    }
  }
  double busy = 0.0;
  for (const auto b : sim.busy) {
    busy += b;
  }
  sim.idle_fraction = sim.span > 0 ? 1.0 - busy / (p * sim.span) : 0.0;
  return sim;
}

std::string render_timeline(const PipelineScheduleSpec& spec, const ScheduleSimulation& sim,
                            double resolution) {
  const int cells = static_cast<int>(std::ceil(sim.span / resolution - 1e-9));
  const int width = static_cast<int>(cat("F", spec.micro_batches - 1).size()) + 1;
  std::ostringstream out;
  out << spec.describe() << ": idle " << std::round(sim.idle_fraction * 1000) / 1000 << " of "
      << spec.ranks << " x " << sim.span << " time units\n";
  for (int r = 0; r < spec.ranks; ++r) {
    out << "rank " << r << " |";
    size_t i = 0;
    const auto& row = sim.timeline[r];
    for (int c = 0; c < cells; ++c) {
      const double middle = (c + 0.5) * resolution;
      while (i < row.size() && row[i].end <= middle) {
        ++i;
      }
      std::string label = ".";
      if (i < row.size() && row[i].begin <= middle) {
        const auto& a = row[i].action;
        label = cat(kind_name(a.kind), a.micro_batch);
        if ((a.stage / spec.ranks) % 2 == 1) {
          label[0] = static_cast<char>(label[0] - 'A' + 'a'); // a later chunk (interleaved)
        }
      }
      out << label << std::string(width - label.size(), ' ');
    }
    out << "| idle " << std::round((1.0 - sim.busy[r] / sim.span) * 1000) / 1000 << ", peak "
        << sim.peak_in_flight[r] << " micro-batches in flight\n";
  }
  return out.str();
}

std::string timeline_json(const PipelineScheduleSpec& spec, const ScheduleSimulation& sim) {
  std::ostringstream out;
  out << "{\"schedule\": \"" << spec.describe() << "\", \"idle_fraction\": " << sim.idle_fraction
      << ", \"ranks\": [";
  for (size_t r = 0; r < sim.timeline.size(); ++r) {
    out << (r == 0 ? "" : ", ") << "[";
    for (size_t i = 0; i < sim.timeline[r].size(); ++i) {
      const auto& t = sim.timeline[r][i];
      out << (i == 0 ? "" : ", ") << "{\"kind\": \"" << kind_name(t.action.kind)
          << "\", \"micro_batch\": " << t.action.micro_batch << ", \"stage\": " << t.action.stage
          << ", \"begin\": " << t.begin << ", \"end\": " << t.end << "}";
    }
    out << "]";
  }
  out << "]}\n";
  return out.str();
}

} // namespace meshtrain
