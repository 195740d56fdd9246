// defines: CollectiveKind, CommRecord, CommLog — the counting mode. When enabled, every
// collective issued on a communicator that shares this log is recorded (kind, group, bytes)
// so tests can pin down a communication pattern and benchmarks can compare volumes with
// theory. Groups of one rank move nothing and are not recorded.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace meshtrain {

enum class CollectiveKind {
  kAllReduce,
  kReduceScatter,
  kAllGather,
  kBroadcast,
  kSend,
  kRecv,
  kBarrier,
  kSendRecv, // one exchange: send to one peer while receiving from another (a ring step)
  // Watched (core/comm_watchdog.h) and published (core/comm_status.h), never counted:
  kSplit,         // Communicator::split
  kArgumentCheck, // the across-rank argument check before a collective (MESHTRAIN_COMM_CHECK)
};

const char* to_string(CollectiveKind kind);

// bytes: the payload of the call as seen by this rank — the tensor for all_reduce, broadcast,
// send and recv (send_recv: the tensor it sends); the full (size × shard) tensor for all_gather's
// output and reduce_scatter's input, as nccl-tests counts them; 0 for barrier.
struct CommRecord {
  CollectiveKind kind;
  std::string group;
  int64_t bytes;
};

class CommLog {
public:
  void enable(bool on = true);
  bool enabled() const;
  void record(CollectiveKind kind, const std::string& group, int64_t bytes);
  void clear();

  std::vector<CommRecord> records() const;
  // Number of calls and summed bytes, optionally restricted to one group ("" = all groups).
  int64_t count(CollectiveKind kind, const std::string& group = "") const;
  int64_t bytes(CollectiveKind kind, const std::string& group = "") const;

private:
  mutable std::mutex mutex_;
  bool enabled_ = false;
  std::vector<CommRecord> records_;
};

} // namespace meshtrain
