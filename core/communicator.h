// defines: ReduceOp, Work, WorkPtr, Communicator — the interface every communication backend
// implements (MPI for CPU tensors in comm_mpi.cpp, a single-process one in comm_single.cpp,
// NCCL for CUDA tensors later).
//
// Semantics shared by all backends:
// - Every call checks its arguments on the calling rank (contiguity, dtype, device, shapes)
//   and throws c10::Error naming the call, the group and the offending values. With
//   set_check_across_ranks(true) (or MESHTRAIN_COMM_CHECK=1) every collective first agrees
//   on (call, numel, dtype, op/root) across the group and throws on every rank, naming the
//   ranks that differ. The agreement exchange is not recorded by the counting log.
// - Operations on one communicator run in the order they were issued, on the
//   communicator's own execution context: a worker thread for MPI; for NCCL, a dedicated
//   CUDA stream that first waits on an event recorded on the caller's current stream.
//   The async variants return a Work at once; tensors must stay untouched until it is done.
//   Work::wait() blocks the host until the result is in the tensor (MPI); for NCCL it
//   makes the caller's current stream wait on the communication stream, so later kernels
//   see the result.
// - Sync variants are the async ones followed by wait(); a backend may run them on the
//   calling thread when nothing else of the communicator is pending (MPI does).
// - A group of one rank is free: every call is a local no-op (after the argument checks)
//   and is not recorded by the counting log.
// - Shapes: all_gather's output is size() inputs concatenated along dim 0; reduce_scatter's
//   input is size() chunks along dim 0 and rank r receives chunk r.
// - bf16/fp16 reductions are computed in fp32 (the chunk is upcast, reduced, rounded once),
//   so sums are exact up to the final rounding; the wire carries fp32 for those calls.
#pragma once

#include "meshtrain/core/comm_log.h"

#include <ATen/ATen.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>

namespace meshtrain {

class CommStatusBoard; // core/comm_status.h
struct CommStatusSlot;

enum class ReduceOp { kSum, kAvg, kMax, kMin };
const char* to_string(ReduceOp op);

class Work {
public:
  static constexpr std::chrono::milliseconds kNoTimeout{-1};
  virtual ~Work() = default;
  virtual bool is_completed() = 0;
  // Blocks until the operation is done or `timeout` elapses (kNoTimeout: forever). Returns
  // true when done, false on timeout (the operation is still pending; wait again).
  // Rethrows the operation's failure.
  virtual bool wait(std::chrono::milliseconds timeout = kNoTimeout) = 0;
};
using WorkPtr = std::shared_ptr<Work>;

// A Work that is already finished (groups of one, single-process backend).
WorkPtr completed_work();

class Communicator {
public:
  virtual ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  const std::string& name() const { return name_; }
  // The same on every member, different for every other communicator of the job: the world's
  // is 1 (kWorldCommId), a split's derives from its parent's (core/comm_status.h).
  uint64_t id() const { return id_; }

  // Counting mode: collectives are recorded into `log` while it is enabled.
  void set_log(std::shared_ptr<CommLog> log) { log_ = std::move(log); }
  const std::shared_ptr<CommLog>& log() const { return log_; }
  void set_check_across_ranks(bool on) { check_across_ranks_ = on; }
  // Publishes this communicator's progress (the last collective issued and completed) on
  // `board`, as will every communicator split from it. A group of one publishes nothing.
  void publish_status(std::shared_ptr<CommStatusBoard> board);

  // In place on `tensor`.
  WorkPtr all_reduce_async(const at::Tensor& tensor, ReduceOp op = ReduceOp::kSum);
  // input: [size() * n, ...], output: [n, ...]; rank r gets the reduction of chunk r.
  WorkPtr reduce_scatter_async(const at::Tensor& input, const at::Tensor& output,
                               ReduceOp op = ReduceOp::kSum);
  // input: [n, ...], output: [size() * n, ...]; chunk r of output is rank r's input.
  WorkPtr all_gather_async(const at::Tensor& input, const at::Tensor& output);
  // In place: every rank ends with `root`'s tensor.
  WorkPtr broadcast_async(const at::Tensor& tensor, int root);
  WorkPtr send_async(const at::Tensor& tensor, int dst, int tag = 0);
  WorkPtr recv_async(const at::Tensor& tensor, int src, int tag = 0);
  // Sends `send` to `dst` and receives `recv` from `src` as one operation (MPI_Sendrecv), so
  // that every rank of a ring may exchange at once without a send waiting for a receive that
  // is queued behind it. dst and src may be equal; on a group of one, recv = send.
  WorkPtr send_recv_async(const at::Tensor& send, int dst, const at::Tensor& recv, int src,
                          int tag = 0);
  WorkPtr barrier_async();

  void all_reduce(const at::Tensor& tensor, ReduceOp op = ReduceOp::kSum);
  void reduce_scatter(const at::Tensor& input, const at::Tensor& output,
                      ReduceOp op = ReduceOp::kSum);
  void all_gather(const at::Tensor& input, const at::Tensor& output);
  void broadcast(const at::Tensor& tensor, int root);
  void send(const at::Tensor& tensor, int dst, int tag = 0);
  void recv(const at::Tensor& tensor, int src, int tag = 0);
  void send_recv(const at::Tensor& send, int dst, const at::Tensor& recv, int src, int tag = 0);
  void barrier();

  // Collective over this communicator: ranks passing the same `color` form a new
  // communicator named `name`, ordered by `key`. It shares this communicator's log and status
  // board.
  std::shared_ptr<Communicator> split(int color, int key, const std::string& name);

protected:
  Communicator(std::string name, int rank, int size);

  // Backends implement these; arguments are already checked and size() > 1.
  virtual WorkPtr do_all_reduce(const at::Tensor& tensor, ReduceOp op) = 0;
  virtual WorkPtr do_reduce_scatter(const at::Tensor& input, const at::Tensor& output,
                                    ReduceOp op) = 0;
  virtual WorkPtr do_all_gather(const at::Tensor& input, const at::Tensor& output) = 0;
  virtual WorkPtr do_broadcast(const at::Tensor& tensor, int root) = 0;
  virtual WorkPtr do_send(const at::Tensor& tensor, int dst, int tag) = 0;
  virtual WorkPtr do_recv(const at::Tensor& tensor, int src, int tag) = 0;
  virtual WorkPtr do_send_recv(const at::Tensor& send, int dst, const at::Tensor& recv, int src,
                               int tag) = 0;
  virtual WorkPtr do_barrier() = 0;
  virtual std::shared_ptr<Communicator> do_split(int color, int key, const std::string& name) = 0;
  // Throws when the backend cannot move tensors on this device.
  virtual void check_device(const char* call, const at::Tensor& tensor) const = 0;
  // True while the calling thread is inside a blocking call (the sync variants, split, the
  // agreement check): it waits for the Work at once, so a backend may run the operation on
  // this thread when that keeps the issue order (nothing of the communicator pending).
  static bool caller_waits();

private:
  void check_tensor(const char* call, const char* what, const at::Tensor& tensor) const;
  void check_peer(const char* call, const char* what, int peer) const;
  // Agrees on a small descriptor (call, numel, dtype, op or root) across the group; throws on
  // every rank on a mismatch.
  void check_agreement(CollectiveKind kind, int64_t numel, at::ScalarType dtype, int64_t extra);
  // Records the call (counting mode, when `counted`), numbers it, publishes it on the status
  // board and has the watchdog (core/comm_watchdog.h) watch `run`, which issues it on the
  // backend. A send or receive (`peer`: the other rank, >= 0) is numbered apart from the
  // collectives and not published: the n-th collective must be #n on every rank of the group,
  // and the ranks of a group exchange different numbers of messages.
  WorkPtr issue(CollectiveKind kind, int64_t bytes, const std::function<WorkPtr()>& run,
                bool counted = true, int peer = -1);

  std::string name_;
  int rank_;
  int size_;
  std::shared_ptr<CommLog> log_;
  bool check_across_ranks_ = false;
  std::atomic<int64_t> sequence_{0}; // collectives issued, the watchdog's sequence numbers
  std::atomic<int64_t> messages_{0}; // sends and receives issued (their own numbers)
  uint64_t id_ = 1;                  // kWorldCommId
  std::atomic<int64_t> splits_{0};   // splits of this communicator: part of a child's id
  std::shared_ptr<CommStatusBoard> status_board_;
  CommStatusSlot* status_slot_ = nullptr; // null: not published
};

using CommunicatorPtr = std::shared_ptr<Communicator>;

// A communicator of this process alone (no communication to make one; every call on it is
// the local no-op of a group of one). Layers built without a group use one: the serial
// layout, until parallelize() applies another.
CommunicatorPtr make_self_communicator(const std::string& name = "self");

} // namespace meshtrain
