// defines: the MPI backend (CPU tensors). Each MpiCommunicator owns a duplicate MPI
// communicator and a worker thread; async operations are queued to that thread and run in
// issue order, so they overlap with the caller's compute and the issue order is the
// execution order (the same contract the NCCL backend keeps with its stream). A blocking call
// made while nothing is queued or running runs on the caller's thread instead (see enqueue):
// same order, same result, no thread hand-off. Point-to-point is the exception to "runs on the
// worker": the worker posts it (MPI_Isend / MPI_Irecv) in issue order and goes on; the Work
// finishes when the request does (see enqueue_request).
#include "meshtrain/core/backend.h"
#include "meshtrain/core/errors.h"
#include "meshtrain/core/trace.h"

#include <mpi.h>

#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

#define MT_MPI_CHECK(call)                                                                         \
  do {                                                                                             \
    const int mt_rc_ = (call);                                                                     \
    if (mt_rc_ != MPI_SUCCESS) {                                                                   \
      char mt_msg_[MPI_MAX_ERROR_STRING];                                                          \
      int mt_len_ = 0;                                                                             \
      MPI_Error_string(mt_rc_, mt_msg_, &mt_len_);                                                 \
      std::ostringstream mt_os_;                                                                   \
      mt_os_ << #call << " failed at " << __FILE__ << ":" << __LINE__ << ": "                      \
             << std::string(mt_msg_, mt_len_);                                                     \
      throw ::meshtrain::CommError(mt_os_.str());                                                  \
    }                                                                                              \
  } while (0)

namespace meshtrain {
namespace {

bool mpi_alive() {
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized != 0 && finalized == 0;
}

// Wire datatype. bf16/fp16 travel as 16-bit words when no arithmetic is needed.
MPI_Datatype wire_type(at::ScalarType t) {
  switch (t) {
  case at::kFloat:
    return MPI_FLOAT;
  case at::kDouble:
    return MPI_DOUBLE;
  case at::kBFloat16:
  case at::kHalf:
    return MPI_UINT16_T;
  case at::kInt:
    return MPI_INT32_T;
  case at::kLong:
    return MPI_INT64_T;
  case at::kByte:
    return MPI_UINT8_T;
  default:
    MT_ASSERT(false, "unsupported dtype reached the MPI backend: ", t);
  }
  return MPI_DATATYPE_NULL;
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
  case ReduceOp::kSum:
  case ReduceOp::kAvg: // sum, then divided by the group size
    return MPI_SUM;
  case ReduceOp::kMax:
    return MPI_MAX;
  case ReduceOp::kMin:
    return MPI_MIN;
  }
  return MPI_OP_NULL;
}

bool is_half_precision(at::ScalarType t) {
  return t == at::kBFloat16 || t == at::kHalf;
}

// The element-wise steps the worker does itself (bf16/fp16 <-> fp32, avg's division, the
// aliased reduce_scatter copy) are plain loops, not ATen kernels: an ATen kernel would make
// the worker start an OpenMP team of its own beside the caller's compute threads, and the
// only ATen knob against that, at::set_num_threads, is process-wide (it used to be called
// here and reset the intra-op thread count every thread started later picks up).

// bf16/fp16 [n] -> fp32 [n], exact.
at::Tensor widen(const at::Tensor& narrow) {
  auto wide = at::empty({narrow.numel()}, at::kFloat);
  float* out = wide.data_ptr<float>();
  const int64_t n = narrow.numel();
  if (narrow.scalar_type() == at::kBFloat16) {
    const auto* in = narrow.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < n; ++i) {
      out[i] = static_cast<float>(in[i]);
    }
  } else {
    const auto* in = narrow.data_ptr<at::Half>();
    for (int64_t i = 0; i < n; ++i) {
      out[i] = static_cast<float>(in[i]);
    }
  }
  return wide;
}

// fp32 [n] -> bf16/fp16 [n] in `narrow`, rounded to nearest even once.
void round_into(const at::Tensor& wide, const at::Tensor& narrow) {
  const float* in = wide.data_ptr<float>();
  const int64_t n = narrow.numel();
  if (narrow.scalar_type() == at::kBFloat16) {
    auto* out = narrow.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < n; ++i) {
      out[i] = at::BFloat16(in[i]);
    }
  } else {
    auto* out = narrow.data_ptr<at::Half>();
    for (int64_t i = 0; i < n; ++i) {
      out[i] = at::Half(in[i]);
    }
  }
}

template <typename T> void divide_in_place(T* data, int64_t n, int divisor) {
  const T d = static_cast<T>(divisor);
  for (int64_t i = 0; i < n; ++i) {
    data[i] /= d; // a true division, as torch's avg: x * (1/d) would round differently
  }
}

// Completion state shared between the caller and the worker thread.
class MpiWork final : public Work {
public:
  // The trace's name of the operation (empty when not tracing; core/trace.h).
  explicit MpiWork(std::string label) : label_(std::move(label)) {}
  const std::string& label() const { return label_; }

  bool is_completed() override {
    std::lock_guard<std::mutex> lock(mutex_);
    return done_;
  }

  bool wait(std::chrono::milliseconds timeout) override {
    std::unique_lock<std::mutex> lock(mutex_);
    if (timeout.count() < 0) {
      cv_.wait(lock, [&] { return done_; });
    } else if (!cv_.wait_for(lock, timeout, [&] { return done_; })) {
      return false;
    }
    if (error_) {
      std::rethrow_exception(error_);
    }
    return true;
  }

  void finish(std::exception_ptr error) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      done_ = true;
      error_ = std::move(error);
    }
    cv_.notify_all();
  }

private:
  const std::string label_;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool done_ = false;
  std::exception_ptr error_;
};

class MpiCommunicator final : public Communicator {
public:
  MpiCommunicator(MPI_Comm comm, const std::string& name)
      : Communicator(name, comm_rank(comm), comm_size(comm)), comm_(comm) {
    MT_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
    worker_ = std::thread([this] { run_worker(); });
  }

  ~MpiCommunicator() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    cv_.notify_all();
    worker_.join();
    if (mpi_alive()) {
      MPI_Comm_free(&comm_);
    }
  }

protected:
  WorkPtr do_all_reduce(const at::Tensor& tensor, ReduceOp op) override {
    return enqueue([this, tensor, op] {
      if (is_half_precision(tensor.scalar_type())) {
        auto wide = widen(tensor); // [numel] fp32
        MT_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, wide.data_ptr(), count(wide), MPI_FLOAT,
                                   mpi_op(op), comm_));
        finish_avg(wide, op);
        round_into(wide, tensor);
        return;
      }
      MT_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, tensor.data_ptr(), count(tensor),
                                 wire_type(tensor.scalar_type()), mpi_op(op), comm_));
      finish_avg(tensor, op);
    });
  }

  WorkPtr do_reduce_scatter(const at::Tensor& input, const at::Tensor& output,
                            ReduceOp op) override {
    return enqueue([this, input, output, op] {
      if (is_half_precision(input.scalar_type())) {
        // [size * n] -> [n], both fp32; widening first also makes an aliased output harmless.
        auto wide_in = widen(input);
        auto wide_out = at::empty({output.numel()}, at::kFloat);
        MT_MPI_CHECK(MPI_Reduce_scatter_block(wide_in.data_ptr(), wide_out.data_ptr(),
                                              count(wide_out), MPI_FLOAT, mpi_op(op), comm_));
        finish_avg(wide_out, op);
        round_into(wide_out, output);
        return;
      }
      // MPI forbids aliased send and receive buffers; callers (ZeRO-2) may pass their own
      // chunk of the input as output, so that case goes through a temporary.
      const auto* in_begin = static_cast<const char*>(input.data_ptr());
      const auto* out_begin = static_cast<const char*>(output.data_ptr());
      const bool aliased = out_begin >= in_begin && out_begin < in_begin + input.nbytes();
      auto target = aliased ? at::empty_like(output) : output;
      MT_MPI_CHECK(MPI_Reduce_scatter_block(input.data_ptr(), target.data_ptr(), count(output),
                                            wire_type(output.scalar_type()), mpi_op(op), comm_));
      finish_avg(target, op);
      if (aliased) {
        std::memcpy(output.data_ptr(), target.data_ptr(), output.nbytes());
      }
    });
  }

  WorkPtr do_all_gather(const at::Tensor& input, const at::Tensor& output) override {
    return enqueue([this, input, output] {
      const auto type = wire_type(input.scalar_type());
      const char* own_chunk = static_cast<const char*>(output.data_ptr()) +
                              static_cast<int64_t>(rank()) * input.numel() * input.element_size();
      // Gathering in place (input is already this rank's chunk of output) is MPI_IN_PLACE.
      const void* send = input.data_ptr() == own_chunk ? MPI_IN_PLACE : input.data_ptr();
      MT_MPI_CHECK(
          MPI_Allgather(send, count(input), type, output.data_ptr(), count(input), type, comm_));
    });
  }

  WorkPtr do_broadcast(const at::Tensor& tensor, int root) override {
    return enqueue([this, tensor, root] {
      MT_MPI_CHECK(MPI_Bcast(tensor.data_ptr(), count(tensor), wire_type(tensor.scalar_type()),
                             root, comm_));
    });
  }

  WorkPtr do_send(const at::Tensor& tensor, int dst, int tag) override {
    return enqueue_request("MPI_Isend", tensor, [this, tensor, dst, tag] {
      MPI_Request request = MPI_REQUEST_NULL;
      MT_MPI_CHECK(MPI_Isend(tensor.data_ptr(), count(tensor), wire_type(tensor.scalar_type()), dst,
                             tag, comm_, &request));
      return request;
    });
  }

  WorkPtr do_recv(const at::Tensor& tensor, int src, int tag) override {
    return enqueue_request("MPI_Irecv", tensor, [this, tensor, src, tag] {
      MPI_Request request = MPI_REQUEST_NULL;
      MT_MPI_CHECK(MPI_Irecv(tensor.data_ptr(), count(tensor), wire_type(tensor.scalar_type()), src,
                             tag, comm_, &request));
      return request;
    });
  }

  WorkPtr do_send_recv(const at::Tensor& send, int dst, const at::Tensor& recv, int src,
                       int tag) override {
    return enqueue([this, send, dst, recv, src, tag] {
      MT_MPI_CHECK(MPI_Sendrecv(send.data_ptr(), count(send), wire_type(send.scalar_type()), dst,
                                tag, recv.data_ptr(), count(recv), wire_type(recv.scalar_type()),
                                src, tag, comm_, MPI_STATUS_IGNORE));
    });
  }

  WorkPtr do_barrier() override {
    return enqueue([this] { MT_MPI_CHECK(MPI_Barrier(comm_)); });
  }

  std::shared_ptr<Communicator> do_split(int color, int key, const std::string& name) override {
    MPI_Comm child = MPI_COMM_NULL;
    // Split is a collective on comm_: it goes through the queue like every other operation.
    enqueue([this, color, key, &child] {
      MT_MPI_CHECK(MPI_Comm_split(comm_, color, key, &child));
    })->wait();
    return std::make_shared<MpiCommunicator>(child, name);
  }

  void check_device(const char* call, const at::Tensor& tensor) const override {
    MT_CHECK(tensor.device().is_cpu(), call, " on group '", name(),
             "': the MPI backend moves CPU tensors, got a tensor on ", tensor.device());
  }

private:
  struct QueueItem {
    std::function<void()> fn;          // a collective (or split) run to completion
    std::function<MPI_Request()> post; // or a point-to-point request posted and kept pending
    std::shared_ptr<MpiWork> work;
    const char* call = nullptr; // point-to-point: the MPI call, for errors
    at::Tensor buffer;          // point-to-point: alive until the request completes
  };
  struct PendingRequest {
    MPI_Request request;
    std::shared_ptr<MpiWork> work;
    const char* call;
    at::Tensor buffer;
    int64_t begin_us; // trace
  };
  // How often the worker tests pending point-to-point requests while it has nothing queued.
  static constexpr std::chrono::microseconds kRequestPollInterval{50};

  static int comm_rank(MPI_Comm comm) {
    int r = 0;
    MT_MPI_CHECK(MPI_Comm_rank(comm, &r));
    return r;
  }
  static int comm_size(MPI_Comm comm) {
    int s = 0;
    MT_MPI_CHECK(MPI_Comm_size(comm, &s));
    return s;
  }
  static int count(const at::Tensor& t) { return static_cast<int>(t.numel()); }

  // avg is a sum divided by the group size; only floating dtypes get here (checked earlier).
  void finish_avg(const at::Tensor& t, ReduceOp op) const {
    if (op != ReduceOp::kAvg) {
      return;
    }
    if (t.scalar_type() == at::kDouble) {
      divide_in_place(t.data_ptr<double>(), t.numel(), size());
    } else {
      MT_ASSERT(t.scalar_type() == at::kFloat, "avg reached the MPI backend for ", t.scalar_type());
      divide_in_place(t.data_ptr<float>(), t.numel(), size());
    }
  }

  // Runs `fn` in issue order and returns its Work. A caller that waits at once (a blocking
  // call: caller_waits()) runs it on its own thread when nothing of this communicator is
  // queued or running; everything else goes to the worker. The inline path saves two thread
  // hand-offs per blocking call: ~7 us of a 1 KiB all_reduce on an idle machine, and on a
  // loaded one a scheduler slice (ms) for each wake-up of a sleeping thread, which raw MPI,
  // spinning on the caller's thread, never pays (see docs/benchmarks.md).
  WorkPtr enqueue(std::function<void()> fn) {
    auto work = std::make_shared<MpiWork>(CollectiveLabelScope::current());
    {
      std::unique_lock<std::mutex> lock(mutex_);
      if (!caller_waits() || busy_ || !queue_.empty()) {
        queue_.push_back(QueueItem{std::move(fn), nullptr, work});
        lock.unlock();
        cv_.notify_one();
        return work;
      }
      busy_ = true; // the worker starts nothing until this operation is done
    }
    run(fn, *work);
    bool queued = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      busy_ = false;
      queued = !queue_.empty();
    }
    // Wake the worker only for work queued meanwhile by another thread: a needless wake-up
    // is a context switch on the caller's core (~5 us per call with --bind-to core).
    if (queued) {
      cv_.notify_one();
    }
    return work;
  }

  // Point-to-point: the worker posts the request in issue order, keeps it pending and goes on
  // with the queue; the Work finishes when the request completes (the worker tests pending
  // requests between operations). A blocking MPI_Send on the worker would hold every later
  // operation of this communicator until the peer posted the matching receive, so two ranks
  // sending to each other before receiving (a pipeline's activations one way and gradients the
  // other) would deadlock. Never inline: a blocking send/recv waits on the Work like any other.
  // `call` names the MPI call in errors; `buffer` is kept alive until the request completes.
  WorkPtr enqueue_request(const char* call, const at::Tensor& buffer,
                          std::function<MPI_Request()> post) {
    auto work = std::make_shared<MpiWork>(CollectiveLabelScope::current());
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(QueueItem{nullptr, std::move(post), work, call, buffer});
    }
    cv_.notify_one();
    return work;
  }

  // Runs `fn` on this thread (the worker, or a caller inline) and records it in the trace.
  void run(const std::function<void()>& fn, MpiWork& work) const {
    auto* tracer = work.label().empty() ? nullptr : Tracer::get();
    const int64_t begin_us = tracer != nullptr ? tracer->now_us() : 0;
    std::exception_ptr error;
    try {
      fn();
    } catch (...) {
      error = std::current_exception();
    }
    if (tracer != nullptr) {
      tracer->complete(work.label(), "comm", begin_us, tracer->now_us());
    }
    work.finish(error);
  }

  void run_worker() {
    // No at::set_num_threads here: it is process-wide. The worker runs no ATen kernels (see
    // widen / round_into / divide_in_place), so it never starts compute threads of its own.
    for (;;) {
      QueueItem item;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        const auto ready = [&] {
          return (stopping_ && queue_.empty()) || (!queue_.empty() && !busy_);
        };
        if (pending_.empty()) {
          cv_.wait(lock, ready);
        } else if (!cv_.wait_for(lock, kRequestPollInterval, ready)) {
          lock.unlock();
          test_pending();
          continue;
        }
        if (queue_.empty()) {
          lock.unlock();
          if (!pending_.empty()) {
            abandon_pending();
          }
          return; // stopping and drained
        }
        item = std::move(queue_.front());
        queue_.pop_front();
        busy_ = true;
      }
      if (!worker_named_ && Tracer::get() != nullptr) {
        Tracer::get()->name_thread("comm " + name());
        worker_named_ = true;
      }
      if (item.post) {
        post_request(item);
      } else {
        run(item.fn, *item.work);
      }
      {
        std::lock_guard<std::mutex> lock(mutex_);
        busy_ = false;
      }
      if (!pending_.empty()) {
        test_pending();
      }
    }
  }

  void post_request(QueueItem& item) {
    auto* tracer = item.work->label().empty() ? nullptr : Tracer::get();
    PendingRequest pending{MPI_REQUEST_NULL, std::move(item.work), item.call,
                           std::move(item.buffer), tracer != nullptr ? tracer->now_us() : 0};
    try {
      pending.request = item.post();
    } catch (...) {
      pending.work->finish(std::current_exception());
      return;
    }
    pending_.push_back(std::move(pending));
  }

  // Finishes the Work of every pending request that has completed (worker thread only).
  void test_pending() {
    std::vector<PendingRequest> still;
    for (auto& pending : pending_) {
      int done = 0;
      std::exception_ptr error;
      try {
        MT_MPI_CHECK(MPI_Test(&pending.request, &done, MPI_STATUS_IGNORE));
      } catch (const CommError& e) {
        error = std::make_exception_ptr(CommError(std::string(pending.call) + " of " +
                                                  std::to_string(pending.buffer.nbytes()) +
                                                  " bytes failed: " + e.what()));
        done = 1;
      }
      if (done == 0) {
        still.push_back(std::move(pending));
        continue;
      }
      auto* tracer = pending.work->label().empty() ? nullptr : Tracer::get();
      if (tracer != nullptr) {
        tracer->complete(pending.work->label(), "comm", pending.begin_us, tracer->now_us());
      }
      pending.work->finish(error);
    }
    pending_ = std::move(still);
  }

  // At destruction: a request nobody matched (its peer gone) must not hold the worker forever.
  void abandon_pending() {
    for (auto& pending : pending_) {
      if (mpi_alive()) {
        MPI_Cancel(&pending.request);
        MPI_Request_free(&pending.request);
      }
      pending.work->finish(std::make_exception_ptr(
          CommError("point-to-point operation on group '" + name() +
                    "' was still pending when its communicator was destroyed")));
    }
    pending_.clear();
  }

  MPI_Comm comm_;
  std::thread worker_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<QueueItem> queue_;
  std::vector<PendingRequest> pending_; // worker thread only
  bool stopping_ = false;
  bool busy_ = false;         // an operation is running (on the worker or inline on a caller)
  bool worker_named_ = false; // in the trace; touched by the worker thread only
};

} // namespace

namespace backend {

const char* name() {
  return "mpi";
}

void init(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  int provided = 0;
  if (initialized == 0) {
    MT_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided));
  } else {
    MT_MPI_CHECK(MPI_Query_thread(&provided));
  }
  if (provided < MPI_THREAD_MULTIPLE) {
    throw CommError(
        "meshtrain needs MPI_THREAD_MULTIPLE (each communicator runs on its own thread); this "
        "MPI library provides only level " +
        std::to_string(provided));
  }
}

void finalize() {
  if (mpi_alive()) {
    MPI_Finalize();
  }
}

CommunicatorPtr make_world() {
  MPI_Comm dup = MPI_COMM_NULL;
  MT_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &dup));
  return std::make_shared<MpiCommunicator>(dup, "world");
}

void node_local(const CommunicatorPtr& world, int* local_rank, int* local_size) {
  MPI_Comm node = MPI_COMM_NULL;
  MT_MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, world->rank(),
                                   MPI_INFO_NULL, &node));
  MT_MPI_CHECK(MPI_Comm_rank(node, local_rank));
  MT_MPI_CHECK(MPI_Comm_size(node, local_size));
  MPI_Comm_free(&node);
}

} // namespace backend
} // namespace meshtrain
