// defines: CommWatchdog, CommWatchdogOptions, PendingCollective — the collective watchdog:
// every collective a Communicator issues (on a group of more than one rank) gets a deadline.
// A thread of its own checks the collectives in flight; when one has waited longer than the
// timeout it reports which one (kind, group, sequence number on that group, bytes, seconds
// waited) and the last collectives that completed (a small flight recorder), then calls the
// expiry handler — by default: print the report to stderr and end the process at once with
// exit code 3, so that mpirun/srun stop the whole job instead of hanging (like NCCL's
// watchdog with TORCH_NCCL_ASYNC_ERROR_HANDLING).
//
// One per process, started by the Runtime (RuntimeOptions::comm_timeout,
// MESHTRAIN_COMM_TIMEOUT, train_gpt --comm-timeout) and stopped before MPI_Finalize.
// The sequence number counts the calls issued on that communicator, so it is the same on
// every rank for the same call. Every exchange is watched: the collectives and send/recv, a
// communicator split and the across-rank argument check (MESHTRAIN_COMM_CHECK).
//
// With the ranks' status board (core/comm_status.h, which the Runtime publishes) the report
// also names the rank(s) holding the collective up: the ranks that have not issued it, what
// each of them waits in, and at the end of that chain the rank waiting in no collective of a
// laggard (computing, stopped or dead), with its host, pid, process state and last collective.
// A send or receive (pipeline parallelism) is held up by its peer: the report names the peer
// and follows the chain from there.
#pragma once

#include "meshtrain/core/comm_log.h"
#include "meshtrain/core/comm_status.h"

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

namespace meshtrain {

class Work;

struct CommWatchdogOptions {
  std::chrono::milliseconds timeout{300'000};
  int rank = 0;               // named in the report
  size_t flight_recorder = 8; // completed collectives kept for the report
  // Called once, on the watchdog thread, with the report. Default (empty): print it to stderr
  // and std::_Exit(3). A handler that returns lets the process go on (tests).
  std::function<void(const std::string& report)> on_expiry;
  // The ranks' published progress, to name the rank holding a collective up (optional).
  std::shared_ptr<CommStatusBoard> status;
};

struct PendingCollective {
  CollectiveKind kind;
  std::string group;
  uint64_t group_id = 0; // the communicator's id on the status board
  int64_t sequence = 0;  // a send or receive: its number among this rank's messages on the group
  int64_t bytes = 0;
  int peer = -1; // a send or receive: the other rank (in the group)
  std::chrono::steady_clock::time_point start;
  std::shared_ptr<Work> work; // null while the issuing call has not returned
};

class CommWatchdog {
public:
  // Starts the process's watchdog (replacing a running one); stop() ends it.
  static void start(CommWatchdogOptions options);
  static void stop();
  // The running watchdog, or null.
  static CommWatchdog* get();

  ~CommWatchdog();
  CommWatchdog(const CommWatchdog&) = delete;
  CommWatchdog& operator=(const CommWatchdog&) = delete;

  // Called by Communicator around issuing a collective: begin() before the backend runs it
  // (a blocking backend call may itself hang), attach() with its Work once issued.
  uint64_t begin(CollectiveKind kind, const std::string& group, uint64_t group_id, int64_t sequence,
                 int64_t bytes, int peer = -1);
  void attach(uint64_t token, std::shared_ptr<Work> work);

  const CommWatchdogOptions& options() const { return options_; }
  // The report as it would be printed now for the oldest pending collective ("" if none).
  std::string report();

private:
  explicit CommWatchdog(CommWatchdogOptions options);
  void run();
  // Moves completed collectives to the flight recorder; returns the oldest still pending.
  const PendingCollective* sweep_locked();
  std::string report_locked(const PendingCollective& late) const;

  CommWatchdogOptions options_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  bool fired_ = false;
  uint64_t next_token_ = 0;
  std::map<uint64_t, PendingCollective> pending_;
  std::deque<PendingCollective> completed_;
  std::thread thread_;
};

} // namespace meshtrain
