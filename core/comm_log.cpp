// defines: CommLog (see comm_log.h).
#include "meshtrain/core/comm_log.h"

namespace meshtrain {

const char* to_string(CollectiveKind kind) {
  switch (kind) {
  case CollectiveKind::kAllReduce:
    return "all_reduce";
  case CollectiveKind::kReduceScatter:
    return "reduce_scatter";
  case CollectiveKind::kAllGather:
    return "all_gather";
  case CollectiveKind::kBroadcast:
    return "broadcast";
  case CollectiveKind::kSend:
    return "send";
  case CollectiveKind::kRecv:
    return "recv";
  case CollectiveKind::kBarrier:
    return "barrier";
  case CollectiveKind::kSplit:
    return "split";
  case CollectiveKind::kArgumentCheck:
    return "argument check";
  case CollectiveKind::kSendRecv:
    return "send_recv";
  }
  return "unknown";
}

void CommLog::enable(bool on) {
  std::lock_guard<std::mutex> lock(mutex_);
  enabled_ = on;
}

bool CommLog::enabled() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return enabled_;
}

void CommLog::record(CollectiveKind kind, const std::string& group, int64_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (enabled_) {
    records_.push_back({kind, group, bytes});
  }
}

void CommLog::clear() {
  std::lock_guard<std::mutex> lock(mutex_);
  records_.clear();
}

std::vector<CommRecord> CommLog::records() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return records_;
}

int64_t CommLog::count(CollectiveKind kind, const std::string& group) const {
  std::lock_guard<std::mutex> lock(mutex_);
  int64_t n = 0;
  for (const auto& r : records_) {
    n += (r.kind == kind && (group.empty() || r.group == group)) ? 1 : 0;
  }
  return n;
}

int64_t CommLog::bytes(CollectiveKind kind, const std::string& group) const {
  std::lock_guard<std::mutex> lock(mutex_);
  int64_t n = 0;
  for (const auto& r : records_) {
    n += (r.kind == kind && (group.empty() || r.group == group)) ? r.bytes : 0;
  }
  return n;
}

} // namespace meshtrain
