// defines: Tracer, TraceSpan, CollectiveLabelScope, comm_blocked_ns — the timeline of one
// rank and the time its threads spent blocked in communication.
//
// Tracer records complete events ("ph": "X") of the Chrome Trace Event Format, which
// Perfetto (ui.perfetto.dev) and chrome://tracing open: pid = the world rank, tid = a small
// number per thread (the training thread, each communicator's worker), named by metadata
// events. It is off unless Tracer::start() was called; then TraceSpan and the communicator
// record into it. Times are microseconds of a steady clock since start().
//
// comm_blocked_ns() is on always: nanoseconds the calling threads spent inside a collective
// that had not finished — issuing a blocking call that the backend runs inline, or waiting on
// a Work. Communication that finishes behind compute costs nothing here; what is counted is
// the "exposed" communication of a step (the Trainer reports the difference per step).
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace meshtrain {

class Tracer {
public:
  // Starts recording for this process (rank: the trace's pid). Later calls return the same
  // tracer. At most `max_events` are kept; later ones are counted as dropped.
  static Tracer& start(int rank, int64_t max_events = 2'000'000);
  // The tracer, or null when not started (the cheap check every hook makes first).
  static Tracer* get();

  // Microseconds since start().
  int64_t now_us() const;
  // One complete event on the calling thread. category: "step", "compute", "comm", "wait".
  void complete(std::string name, const char* category, int64_t begin_us, int64_t end_us);
  // Names the calling thread in the trace ("train", "comm dp", ...).
  void name_thread(const std::string& name);

  int64_t dropped() const;
  // {"traceEvents": [...], "displayTimeUnit": "ms"}.
  std::string to_json() const;
  // Written completely or not at all (core/file_io.h).
  void write(const std::string& path) const;

private:
  explicit Tracer(int rank, int64_t max_events);
  int thread_index(); // caller holds mutex_

  struct Event {
    std::string name;
    const char* category;
    int64_t begin_us;
    int64_t duration_us;
    int tid;
  };

  const int rank_;
  const int64_t max_events_;
  const std::chrono::steady_clock::time_point origin_;
  mutable std::mutex mutex_;
  std::vector<Event> events_;
  std::unordered_map<std::thread::id, int> tids_;
  std::unordered_map<int, std::string> thread_names_;
  int64_t dropped_ = 0;
};

// Records [construction, destruction) as one event when tracing is on; free otherwise.
class TraceSpan {
public:
  TraceSpan(const char* name, const char* category);
  ~TraceSpan();
  TraceSpan(const TraceSpan&) = delete;
  TraceSpan& operator=(const TraceSpan&) = delete;

private:
  Tracer* tracer_;
  const char* name_;
  const char* category_;
  int64_t begin_us_ = 0;
};

// The label of the collective being issued on this thread ("all_reduce dp 1.5 MiB"), set by
// the communicator around the backend call so that a backend can name the span it runs on
// its own thread. Empty outside a collective.
class CollectiveLabelScope {
public:
  explicit CollectiveLabelScope(std::string label);
  ~CollectiveLabelScope();
  CollectiveLabelScope(const CollectiveLabelScope&) = delete;
  CollectiveLabelScope& operator=(const CollectiveLabelScope&) = delete;
  static const std::string& current();

private:
  std::string previous_;
};

// Nanoseconds this process's threads have been blocked in collectives (see the top).
int64_t comm_blocked_ns();
void add_comm_blocked_ns(int64_t ns);

} // namespace meshtrain
