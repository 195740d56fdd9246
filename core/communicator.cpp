// defines: the backend-independent half of Communicator: argument checks, the group-of-one
// short cut, the across-rank agreement check and the counting log.
#include "meshtrain/core/communicator.h"

#include "meshtrain/core/comm_status.h"
#include "meshtrain/core/comm_watchdog.h"
#include "meshtrain/core/errors.h"
#include "meshtrain/core/trace.h"

#include <c10/util/irange.h>

#include <cstdio>
#include <cstdlib>
#include <limits>
#include <optional>
#include <sstream>

namespace meshtrain {

const char* to_string(ReduceOp op) {
  switch (op) {
  case ReduceOp::kSum:
    return "sum";
  case ReduceOp::kAvg:
    return "avg";
  case ReduceOp::kMax:
    return "max";
  case ReduceOp::kMin:
    return "min";
  }
  return "unknown";
}

namespace {

class CompletedWork final : public Work {
public:
  bool is_completed() override { return true; }
  bool wait(std::chrono::milliseconds /*timeout*/) override { return true; }
};

bool is_supported_dtype(at::ScalarType t) {
  switch (t) {
  case at::kFloat:
  case at::kDouble:
  case at::kBFloat16:
  case at::kHalf:
  case at::kInt:
  case at::kLong:
  case at::kByte:
    return true;
  default:
    return false;
  }
}

class SelfCommunicator final : public Communicator {
public:
  explicit SelfCommunicator(const std::string& name) : Communicator(name, 0, 1) {}

protected:
  // A group of one never reaches the transport: the public calls return first, and
  // check_peer rejects every peer of send/recv.
  WorkPtr do_all_reduce(const at::Tensor&, ReduceOp) override { return unreachable(); }
  WorkPtr do_reduce_scatter(const at::Tensor&, const at::Tensor&, ReduceOp) override {
    return unreachable();
  }
  WorkPtr do_all_gather(const at::Tensor&, const at::Tensor&) override { return unreachable(); }
  WorkPtr do_broadcast(const at::Tensor&, int) override { return unreachable(); }
  WorkPtr do_send(const at::Tensor&, int, int) override { return unreachable(); }
  WorkPtr do_recv(const at::Tensor&, int, int) override { return unreachable(); }
  WorkPtr do_send_recv(const at::Tensor&, int, const at::Tensor&, int, int) override {
    return unreachable();
  }
  WorkPtr do_barrier() override { return unreachable(); }
  std::shared_ptr<Communicator> do_split(int, int, const std::string& name) override {
    return std::make_shared<SelfCommunicator>(name);
  }
  void check_device(const char*, const at::Tensor&) const override {}

private:
  static WorkPtr unreachable() {
    MT_ASSERT(false, "a one-rank communicator reached a transport call");
    return nullptr;
  }
};

// How many blocking calls the current thread is inside (see Communicator::caller_waits).
thread_local int t_blocking_depth = 0;

class BlockingScope {
public:
  BlockingScope() { ++t_blocking_depth; }
  ~BlockingScope() { --t_blocking_depth; }
  BlockingScope(const BlockingScope&) = delete;
  BlockingScope& operator=(const BlockingScope&) = delete;
};

int64_t nbytes(const at::Tensor& t) {
  return t.numel() * static_cast<int64_t>(t.element_size());
}

// Adds the scope's duration to the blocked-communication clock (core/trace.h), however the
// scope is left.
class BlockedTimer {
public:
  BlockedTimer() : begin_(std::chrono::steady_clock::now()) {}
  ~BlockedTimer() {
    add_comm_blocked_ns(std::chrono::duration_cast<std::chrono::nanoseconds>(
                            std::chrono::steady_clock::now() - begin_)
                            .count());
  }
  BlockedTimer(const BlockedTimer&) = delete;
  BlockedTimer& operator=(const BlockedTimer&) = delete;

private:
  const std::chrono::steady_clock::time_point begin_;
};

// "all_reduce dp 1.50 MiB": a collective's name in the trace.
std::string collective_label(CollectiveKind kind, const std::string& group, int64_t bytes) {
  char size[32];
  if (bytes >= (1 << 20)) {
    std::snprintf(size, sizeof(size), "%.2f MiB", static_cast<double>(bytes) / (1 << 20));
  } else {
    std::snprintf(size, sizeof(size), "%.1f KiB", static_cast<double>(bytes) / 1024);
  }
  return std::string(to_string(kind)) + " " + group + " " + size;
}

// Where a collective's completion is published (core/comm_status.h); empty: nowhere.
struct StatusRef {
  std::shared_ptr<CommStatusBoard> board; // keeps the slot's mapping alive
  CommStatusSlot* slot = nullptr;
  uint64_t id = 0;
  int64_t sequence = 0;
  CollectiveKind kind = CollectiveKind::kBarrier;
  void completed() const { CommStatusBoard::completed(slot, id, sequence, kind); }
};

// Counts the time a caller spends waiting on the backend's Work as blocked communication
// (core/trace.h) and, when tracing, records each wait that blocked as a "wait" span; publishes
// the completion on the status board.
class TimedWork final : public Work {
public:
  TimedWork(WorkPtr inner, std::string label, StatusRef status)
      : inner_(std::move(inner)), label_(std::move(label)), status_(std::move(status)) {}
  bool is_completed() override {
    const bool done = inner_->is_completed();
    if (done) {
      status_.completed();
    }
    return done;
  }
  bool wait(std::chrono::milliseconds timeout) override {
    auto* tracer = Tracer::get();
    const int64_t begin_us = tracer != nullptr ? tracer->now_us() : 0;
    bool done = false;
    {
      const BlockedTimer blocked;
      done = inner_->wait(timeout);
    }
    if (tracer != nullptr) {
      const int64_t end_us = tracer->now_us();
      if (end_us > begin_us) {
        tracer->complete("wait " + label_, "wait", begin_us, end_us);
      }
    }
    if (done) {
      status_.completed();
    }
    return done;
  }

private:
  WorkPtr inner_;
  std::string label_;
  StatusRef status_;
};

} // namespace

CommunicatorPtr make_self_communicator(const std::string& name) {
  return std::make_shared<SelfCommunicator>(name);
}

bool Communicator::caller_waits() {
  return t_blocking_depth > 0;
}

WorkPtr completed_work() {
  return std::make_shared<CompletedWork>();
}

Communicator::Communicator(std::string name, int rank, int size)
    : name_(std::move(name)), rank_(rank), size_(size), log_(std::make_shared<CommLog>()) {
  const char* env = std::getenv("MESHTRAIN_COMM_CHECK");
  check_across_ranks_ = env != nullptr && std::string(env) == "1";
}

Communicator::~Communicator() {
  if (status_board_) {
    status_board_->release(status_slot_);
  }
}

void Communicator::publish_status(std::shared_ptr<CommStatusBoard> board) {
  if (status_board_) {
    status_board_->release(status_slot_);
    status_slot_ = nullptr;
  }
  status_board_ = std::move(board);
  if (status_board_ && size_ > 1) {
    status_slot_ = status_board_->acquire(id_, name_, rank_, size_);
  }
}

void Communicator::check_tensor(const char* call, const char* what,
                                const at::Tensor& tensor) const {
  MT_CHECK(tensor.defined(), call, " on group '", name_, "': ", what, " is an undefined tensor");
  MT_CHECK(tensor.is_contiguous(), call, " on group '", name_, "': ", what,
           " must be contiguous (got sizes ", tensor.sizes(), ", strides ", tensor.strides(),
           "); call .contiguous() first");
  MT_CHECK(is_supported_dtype(tensor.scalar_type()), call, " on group '", name_, "': ", what,
           " has dtype ", tensor.scalar_type(),
           "; supported: Float, Double, BFloat16, Half, Int, Long, Byte");
  MT_CHECK(tensor.numel() <= std::numeric_limits<int>::max(), call, " on group '", name_,
           "': ", what, " has ", tensor.numel(), " elements; at most ",
           std::numeric_limits<int>::max(), " per call");
  check_device(call, tensor);
}

void Communicator::check_peer(const char* call, const char* what, int peer) const {
  MT_CHECK(peer >= 0 && peer < size_, call, " on group '", name_, "': ", what, " ", peer,
           " is not a rank of this group (size ", size_, ")");
}

WorkPtr Communicator::issue(CollectiveKind kind, int64_t bytes, const std::function<WorkPtr()>& run,
                            bool counted, int peer) {
  if (log_ && counted) {
    log_->record(kind, name_, bytes);
  }
  const bool message = peer >= 0;
  const int64_t sequence = message ? ++messages_ : ++sequence_;
  // Published before the backend runs it: a rank stuck inside it shows it as issued.
  StatusRef status;
  if (!message) {
    CommStatusBoard::issued(status_slot_, sequence, kind);
    status = StatusRef{status_board_, status_slot_, id_, sequence, kind};
  }
  // Tracing: the backend names the span it runs (on its worker, or inline here) by this label.
  std::optional<CollectiveLabelScope> label;
  if (Tracer::get() != nullptr) {
    label.emplace(collective_label(kind, name_, bytes));
  }
  // Issuing a blocking call the backend runs inline is blocked time too.
  const BlockedTimer blocked;
  auto* watchdog = CommWatchdog::get();
  if (watchdog == nullptr) {
    return std::make_shared<TimedWork>(
        run(), label ? CollectiveLabelScope::current() : std::string(), std::move(status));
  }
  // Registered before the backend runs it: a blocking backend call may be what hangs.
  const uint64_t token = watchdog->begin(kind, name_, id_, sequence, bytes, peer);
  WorkPtr work;
  try {
    work = run();
  } catch (...) {
    watchdog->attach(token, completed_work());
    throw;
  }
  watchdog->attach(token, work);
  return std::make_shared<TimedWork>(
      std::move(work), label ? CollectiveLabelScope::current() : std::string(), std::move(status));
}

void Communicator::check_agreement(CollectiveKind kind, int64_t numel, at::ScalarType dtype,
                                   int64_t extra) {
  if (!check_across_ranks_ || size_ == 1) {
    return;
  }
  // The call itself is part of the descriptor: all_reduce(sum) and broadcast(root 0) of the
  // same tensor would otherwise look alike, and the two would then run mismatched.
  constexpr int kFields = 4; // (kind, numel, dtype, op or root)
  auto mine = at::tensor({static_cast<int64_t>(kind), numel, static_cast<int64_t>(dtype), extra},
                         at::kLong);
  auto all = at::empty({size_ * kFields}, at::kLong);
  {
    // Watched like the collective it precedes (a rank that never gets here hangs it), not
    // counted by the log.
    const BlockingScope blocking;
    issue(
        CollectiveKind::kArgumentCheck, nbytes(all), [&] { return do_all_gather(mine, all); },
        /*counted=*/false)
        ->wait();
  }
  auto rows = all.view({size_, kFields});
  auto acc = rows.accessor<int64_t, 2>();
  bool mismatch = false;
  for (const auto r : c10::irange(size_)) {
    for (const auto f : c10::irange(kFields)) {
      mismatch = mismatch || acc[r][f] != acc[0][f];
    }
  }
  std::ostringstream differ;
  if (mismatch) {
    for (const auto r : c10::irange(size_)) {
      const auto k = static_cast<CollectiveKind>(acc[r][0]);
      differ << " rank " << r << ": " << to_string(k) << " numel " << acc[r][1] << " dtype "
             << static_cast<at::ScalarType>(acc[r][2]);
      if (k == CollectiveKind::kBroadcast) {
        differ << " root " << acc[r][3];
      } else if (k == CollectiveKind::kAllReduce || k == CollectiveKind::kReduceScatter) {
        differ << " op " << to_string(static_cast<ReduceOp>(acc[r][3]));
      }
      differ << ";";
    }
  }
  MT_CHECK(!mismatch, to_string(kind), " on group '", name_,
           "': ranks disagree on the arguments:", differ.str());
}

WorkPtr Communicator::all_reduce_async(const at::Tensor& tensor, ReduceOp op) {
  check_tensor("all_reduce", "tensor", tensor);
  MT_CHECK(op != ReduceOp::kAvg || at::isFloatingType(tensor.scalar_type()),
           "all_reduce on group '", name_, "': op avg needs a floating dtype, got ",
           tensor.scalar_type());
  if (size_ == 1) {
    return completed_work();
  }
  check_agreement(CollectiveKind::kAllReduce, tensor.numel(), tensor.scalar_type(),
                  static_cast<int>(op));
  return issue(CollectiveKind::kAllReduce, nbytes(tensor),
               [&] { return do_all_reduce(tensor, op); });
}

WorkPtr Communicator::reduce_scatter_async(const at::Tensor& input, const at::Tensor& output,
                                           ReduceOp op) {
  check_tensor("reduce_scatter", "input", input);
  check_tensor("reduce_scatter", "output", output);
  MT_CHECK(input.scalar_type() == output.scalar_type(), "reduce_scatter on group '", name_,
           "': input dtype ", input.scalar_type(), " differs from output dtype ",
           output.scalar_type());
  MT_CHECK(input.numel() == output.numel() * size_, "reduce_scatter on group '", name_,
           "': input has ", input.numel(), " elements, expected group size ", size_,
           " x output elements ", output.numel(), " = ", output.numel() * size_);
  MT_CHECK(op != ReduceOp::kAvg || at::isFloatingType(input.scalar_type()),
           "reduce_scatter on group '", name_, "': op avg needs a floating dtype, got ",
           input.scalar_type());
  if (size_ == 1) {
    if (!input.is_same(output)) {
      output.view(-1).copy_(input.view(-1));
    }
    return completed_work();
  }
  check_agreement(CollectiveKind::kReduceScatter, input.numel(), input.scalar_type(),
                  static_cast<int>(op));
  return issue(CollectiveKind::kReduceScatter, nbytes(input),
               [&] { return do_reduce_scatter(input, output, op); });
}

WorkPtr Communicator::all_gather_async(const at::Tensor& input, const at::Tensor& output) {
  check_tensor("all_gather", "input", input);
  check_tensor("all_gather", "output", output);
  MT_CHECK(input.scalar_type() == output.scalar_type(), "all_gather on group '", name_,
           "': input dtype ", input.scalar_type(), " differs from output dtype ",
           output.scalar_type());
  MT_CHECK(output.numel() == input.numel() * size_, "all_gather on group '", name_,
           "': output has ", output.numel(), " elements, expected group size ", size_,
           " x input elements ", input.numel(), " = ", input.numel() * size_);
  if (size_ == 1) {
    if (!input.is_same(output)) {
      output.view(-1).copy_(input.view(-1));
    }
    return completed_work();
  }
  check_agreement(CollectiveKind::kAllGather, input.numel(), input.scalar_type(), 0);
  return issue(CollectiveKind::kAllGather, nbytes(output),
               [&] { return do_all_gather(input, output); });
}

WorkPtr Communicator::broadcast_async(const at::Tensor& tensor, int root) {
  check_tensor("broadcast", "tensor", tensor);
  check_peer("broadcast", "root", root);
  if (size_ == 1) {
    return completed_work();
  }
  check_agreement(CollectiveKind::kBroadcast, tensor.numel(), tensor.scalar_type(), root);
  return issue(CollectiveKind::kBroadcast, nbytes(tensor),
               [&] { return do_broadcast(tensor, root); });
}

WorkPtr Communicator::send_async(const at::Tensor& tensor, int dst, int tag) {
  check_tensor("send", "tensor", tensor);
  check_peer("send", "destination", dst);
  MT_CHECK(dst != rank_, "send on group '", name_, "': rank ", rank_, " cannot send to itself");
  // MPI rejects negative tags deep inside the transport; say so where the caller can act.
  MT_CHECK(tag >= 0, "send on group '", name_, "': tag ", tag, " must be >= 0");
  return issue(
      CollectiveKind::kSend, nbytes(tensor), [&] { return do_send(tensor, dst, tag); }, true, dst);
}

WorkPtr Communicator::recv_async(const at::Tensor& tensor, int src, int tag) {
  check_tensor("recv", "tensor", tensor);
  check_peer("recv", "source", src);
  MT_CHECK(src != rank_, "recv on group '", name_, "': rank ", rank_,
           " cannot receive from itself");
  MT_CHECK(tag >= 0, "recv on group '", name_, "': tag ", tag, " must be >= 0");
  return issue(
      CollectiveKind::kRecv, nbytes(tensor), [&] { return do_recv(tensor, src, tag); }, true, src);
}

WorkPtr Communicator::send_recv_async(const at::Tensor& send, int dst, const at::Tensor& recv,
                                      int src, int tag) {
  check_tensor("send_recv", "send tensor", send);
  check_tensor("send_recv", "receive tensor", recv);
  check_peer("send_recv", "destination", dst);
  check_peer("send_recv", "source", src);
  MT_CHECK(send.scalar_type() == recv.scalar_type() && send.numel() == recv.numel(),
           "send_recv on group '", name_, "': the send tensor (", send.scalar_type(), ", ",
           send.numel(), " elements) and the receive tensor (", recv.scalar_type(), ", ",
           recv.numel(), " elements) must have the same dtype and size");
  MT_CHECK(tag >= 0, "send_recv on group '", name_, "': tag ", tag, " must be >= 0");
  MT_CHECK(!send.is_same(recv) && send.data_ptr() != recv.data_ptr(), "send_recv on group '", name_,
           "': the send and receive tensors must not share memory");
  if (size_ == 1) {
    recv.view(-1).copy_(send.view(-1));
    return completed_work();
  }
  return issue(CollectiveKind::kSendRecv, nbytes(send),
               [&] { return do_send_recv(send, dst, recv, src, tag); });
}

WorkPtr Communicator::barrier_async() {
  if (size_ == 1) {
    return completed_work();
  }
  return issue(CollectiveKind::kBarrier, 0, [&] { return do_barrier(); });
}

void Communicator::all_reduce(const at::Tensor& tensor, ReduceOp op) {
  const BlockingScope blocking;
  all_reduce_async(tensor, op)->wait();
}
void Communicator::reduce_scatter(const at::Tensor& input, const at::Tensor& output, ReduceOp op) {
  const BlockingScope blocking;
  reduce_scatter_async(input, output, op)->wait();
}
void Communicator::all_gather(const at::Tensor& input, const at::Tensor& output) {
  const BlockingScope blocking;
  all_gather_async(input, output)->wait();
}
void Communicator::broadcast(const at::Tensor& tensor, int root) {
  const BlockingScope blocking;
  broadcast_async(tensor, root)->wait();
}
void Communicator::send(const at::Tensor& tensor, int dst, int tag) {
  const BlockingScope blocking;
  send_async(tensor, dst, tag)->wait();
}
void Communicator::recv(const at::Tensor& tensor, int src, int tag) {
  const BlockingScope blocking;
  recv_async(tensor, src, tag)->wait();
}
void Communicator::send_recv(const at::Tensor& send, int dst, const at::Tensor& recv, int src,
                             int tag) {
  const BlockingScope blocking;
  send_recv_async(send, dst, recv, src, tag)->wait();
}
void Communicator::barrier() {
  const BlockingScope blocking;
  barrier_async()->wait();
}

std::shared_ptr<Communicator> Communicator::split(int color, int key, const std::string& name) {
  MT_CHECK(color >= 0, "split of group '", name_, "': color must be >= 0, got ", color);
  const BlockingScope blocking; // do_split waits for its collective
  const int64_t index = ++splits_;
  std::shared_ptr<Communicator> child;
  // Watched and numbered like every exchange (a rank that never splits hangs the others), not
  // counted by the log.
  issue(
      CollectiveKind::kSplit, 0,
      [&] {
        child = do_split(color, key, name);
        return completed_work();
      },
      /*counted=*/false)
      ->wait();
  child->id_ = split_comm_id(id_, index, color);
  child->set_log(log_);
  child->set_check_across_ranks(check_across_ranks_);
  child->publish_status(status_board_);
  return child;
}

} // namespace meshtrain
