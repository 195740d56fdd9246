// defines: CommStatusBoard, CommStatusSlot — every rank's progress on each of its
// communicators, published where the other ranks of the job can read it without this rank's
// help, so that the collective watchdog (core/comm_watchdog.h) can name the rank that holds a
// timed-out collective up, its host and its last collective.
//
// Per communicator of more than one rank, a rank publishes the sequence number, kind and wall
// time of the last collective it issued and of the last one it saw complete (the same numbers
// the watchdog reports: the n-th call on a communicator is #n on every rank). They live in one
// small file per rank, mapped shared:
//
//   <dir>/meshtrain-status-<job>.rank<R>     dir: MESHTRAIN_COMM_STATUS_DIR, else /dev/shm
//
// The job key comes from rank 0 (broadcast once by the Runtime), so concurrent jobs never share
// files. Updates are plain atomic stores into the mapping, no locks and no system call: a rank
// that is stopped (SIGSTOP, a debugger), spinning or killed leaves its last values readable.
// /dev/shm is one node's memory: ranks on other nodes are invisible there, and
// MESHTRAIN_COMM_STATUS_DIR=<a directory on a shared file system> publishes across nodes (the
// watchdog's thread then msyncs the file every poll, so a stuck rank's values are at most one
// poll old). MESHTRAIN_COMM_STATUS_DIR=off publishes nothing.
//
// A file is removed when its Runtime ends; files of processes that died on this host are
// removed by the next job that starts there.
#pragma once

#include "meshtrain/core/comm_log.h"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

namespace meshtrain {

// One communicator's entry in a rank's file. `id` is the same on every member of the
// communicator and different for every other communicator of the job (the world's is 1; a
// split's is derived from its parent's id, the parent's split count and its color).
struct CommStatusSlot {
  std::atomic<uint64_t> id;  // 0: free; stored last when taken (release), first when freed
  char name[32];             // the group's name ("dp", "tp", ...), written before `id`
  std::atomic<int32_t> rank; // this rank's index in the group
  std::atomic<int32_t> size;
  std::atomic<int64_t> issued;    // sequence number of the last collective issued (0: none)
  std::atomic<int64_t> completed; // of the last one seen completed
  std::atomic<int32_t> issued_kind;
  std::atomic<int32_t> completed_kind;
  std::atomic<int64_t> issued_ns; // wall clock (Unix ns) of those two events
  std::atomic<int64_t> completed_ns;
};

class CommStatusBoard {
public:
  // Creates this rank's file in `dir` (removing stale files there of dead processes on this
  // host). Throws naming the file when it cannot be created or mapped.
  static std::shared_ptr<CommStatusBoard> create(const std::string& dir, const std::string& job,
                                                 int world_rank, int world_size);
  // MESHTRAIN_COMM_STATUS_DIR, "" for off, else /dev/shm when it is a writable directory.
  static std::string default_dir();

  ~CommStatusBoard(); // unmaps and removes this rank's file
  CommStatusBoard(const CommStatusBoard&) = delete;
  CommStatusBoard& operator=(const CommStatusBoard&) = delete;

  // A slot for a communicator; null when all slots are taken (it is then not published).
  CommStatusSlot* acquire(uint64_t id, const std::string& name, int rank, int size);
  void release(CommStatusSlot* slot);
  // Lock-free; `slot` may be null. completed() writes only while the slot still holds `id` (a
  // Work may outlive its communicator, whose slot may have been taken again).
  static void issued(CommStatusSlot* slot, int64_t sequence, CollectiveKind kind);
  static void completed(CommStatusSlot* slot, uint64_t id, int64_t sequence, CollectiveKind kind);
  // A sign of life, and flush(): the watchdog's thread calls it at every poll (`period`), so
  // that a process stopped or dead — also one stopped inside a collective it has issued —
  // shows as silent after three polls and a second.
  void beat(std::chrono::nanoseconds period);
  // Makes the file's contents visible to other nodes (msync) in a shared directory; nothing in
  // /dev/shm.
  void flush() const;

  // Lines for the watchdog's report of collective #sequence on the group `group_id` (named
  // `group`, this rank waiting in it): which ranks hold it up (have not issued it, or issued it
  // and stopped responding), what each of those waits in itself, following the chain to the
  // rank(s) that stopped responding or wait in no collective another rank holds up — the ones
  // holding the job up — with their host, pid, process state (same host) and last collective.
  // `culprits` gets "rank R on host H" of those (empty when none was found).
  // peer >= 0: the wait is a send or receive with rank `peer` of the group (sequence unused):
  // the peer is the one to explain.
  std::string explain(uint64_t group_id, const std::string& group, int64_t sequence,
                      std::string* culprits, int peer = -1) const;

  const std::string& path() const { return path_; }
  int world_rank() const { return world_rank_; }

private:
  CommStatusBoard() = default;
  std::string file_of(int world_rank) const;

  std::string dir_;
  std::string job_;
  std::string path_;
  bool shared_dir_ = false; // not /dev/shm: flush() msyncs
  int world_rank_ = 0;
  int world_size_ = 1;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  std::mutex mutex_; // slot allocation
};

// The id of the world communicator; a split's id from its parent's (see CommStatusSlot::id).
constexpr uint64_t kWorldCommId = 1;
uint64_t split_comm_id(uint64_t parent, int64_t split_index, int color);

} // namespace meshtrain
