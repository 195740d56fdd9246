// defines: CommWatchdog (see comm_watchdog.h).
#include "meshtrain/core/comm_watchdog.h"

#include "meshtrain/core/communicator.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <sstream>

namespace meshtrain {
namespace {

std::unique_ptr<CommWatchdog> g_watchdog;
std::atomic<CommWatchdog*> g_current{nullptr};

double seconds_between(std::chrono::steady_clock::time_point a,
                       std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

std::string describe(const PendingCollective& c) {
  std::ostringstream s;
  s << to_string(c.kind) << " #" << c.sequence;
  if (c.peer >= 0) { // numbered among this rank's messages, not the group's collectives
    s << (c.kind == CollectiveKind::kRecv ? " from" : " to") << " rank " << c.peer;
  }
  s << " on group '" << c.group << "' (" << c.bytes << " bytes)";
  return s.str();
}

} // namespace

void CommWatchdog::start(CommWatchdogOptions options) {
  stop();
  g_watchdog.reset(new CommWatchdog(std::move(options)));
  g_current.store(g_watchdog.get());
}

void CommWatchdog::stop() {
  g_current.store(nullptr);
  g_watchdog.reset();
}

CommWatchdog* CommWatchdog::get() {
  return g_current.load();
}

CommWatchdog::CommWatchdog(CommWatchdogOptions options) : options_(std::move(options)) {
  thread_ = std::thread([this] { run(); });
}

CommWatchdog::~CommWatchdog() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

uint64_t CommWatchdog::begin(CollectiveKind kind, const std::string& group, uint64_t group_id,
                             int64_t sequence, int64_t bytes, int peer) {
  std::lock_guard<std::mutex> lock(mutex_);
  const uint64_t token = next_token_++;
  pending_[token] = PendingCollective{
      kind, group, group_id, sequence, bytes, peer, std::chrono::steady_clock::now(), nullptr};
  return token;
}

void CommWatchdog::attach(uint64_t token, std::shared_ptr<Work> work) {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = pending_.find(token);
  if (it != pending_.end()) {
    it->second.work = std::move(work);
  }
}

const PendingCollective* CommWatchdog::sweep_locked() {
  const PendingCollective* oldest = nullptr;
  for (auto it = pending_.begin(); it != pending_.end();) {
    if (it->second.work != nullptr && it->second.work->is_completed()) {
      completed_.push_back(std::move(it->second));
      completed_.back().work = nullptr;
      while (completed_.size() > options_.flight_recorder) {
        completed_.pop_front();
      }
      it = pending_.erase(it);
      continue;
    }
    if (oldest == nullptr || it->second.start < oldest->start) {
      oldest = &it->second;
    }
    ++it;
  }
  return oldest;
}

std::string CommWatchdog::report_locked(const PendingCollective& late) const {
  const auto now = std::chrono::steady_clock::now();
  std::ostringstream s;
  s.precision(3);
  // Who holds it up, from the ranks' published progress (none: the old guess).
  std::string culprits;
  const std::string chain =
      options_.status
          ? options_.status->explain(late.group_id, late.group, late.sequence, &culprits, late.peer)
          : std::string();
  s << "meshtrain: rank " << options_.rank << ": collective watchdog: " << describe(late)
    << " has not completed after " << seconds_between(late.start, now) << " s (timeout "
    << std::chrono::duration<double>(options_.timeout).count()
    << " s, --comm-timeout / MESHTRAIN_COMM_TIMEOUT): ";
  if (!culprits.empty()) {
    s << "held up by " << culprits << "\n" << chain;
  } else if (late.peer >= 0) {
    s << "rank " << late.peer << " of '" << late.group
      << "' never issued the matching call, or died\n"
      << chain;
  } else {
    s << "a rank of '" << late.group << "' never issued it, issued another collective, or died\n"
      << chain;
  }
  for (const auto& [token, other] : pending_) {
    if (&other != &late) {
      s << "  also in flight: " << describe(other) << ", for " << seconds_between(other.start, now)
        << " s\n";
    }
  }
  s << "  last completed collectives on this rank (oldest first):";
  if (completed_.empty()) {
    s << " none";
  }
  s << "\n";
  for (const auto& done : completed_) {
    s << "    " << describe(done) << "\n";
  }
  return s.str();
}

std::string CommWatchdog::report() {
  std::lock_guard<std::mutex> lock(mutex_);
  const PendingCollective* oldest = sweep_locked();
  return oldest == nullptr ? std::string() : report_locked(*oldest);
}

void CommWatchdog::run() {
  // Poll often enough that a hang is reported within ~10% of the timeout.
  const auto period = std::clamp(options_.timeout / 10, std::chrono::milliseconds(10),
                                 std::chrono::milliseconds(1000));
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stopping_) {
    wake_.wait_for(lock, period, [&] { return stopping_; });
    if (options_.status) {
      options_.status->beat(period); // alive, also while waiting in a collective
    }
    if (stopping_ || fired_) {
      continue;
    }
    const PendingCollective* oldest = sweep_locked();
    if (oldest == nullptr || std::chrono::steady_clock::now() - oldest->start < options_.timeout) {
      continue;
    }
    fired_ = true;
    const std::string text = report_locked(*oldest);
    const auto handler = options_.on_expiry;
    lock.unlock();
    if (handler) {
      handler(text);
    } else {
      std::fprintf(stderr, "%s  aborting: exit code 3\n", text.c_str());
      std::fflush(stderr);
      std::fflush(stdout);
      // Without MPI_Finalize: the launcher sees a rank die and ends the whole job.
      std::_Exit(3);
    }
    lock.lock();
  }
}

} // namespace meshtrain
