// defines: Runtime — one per process. Starts the communication backend (MPI_Init_thread with
// MPI_THREAD_MULTIPLE: every communicator runs its operations on its own worker thread),
// finds the node-local rank, picks the device and sets torch's intra-op threads.
//
// Threads per rank: MESHTRAIN_THREADS if set (meshrun sets it), else the options value,
// else cores on the node / ranks on the node (at least 1).
// Device: cuda:(local_rank % n_gpus) when LibTorch sees CUDA devices, else cpu.
// Collective watchdog: started here (RuntimeOptions::comm_timeout_s), stopped before the
// backend finalizes. Status board (core/comm_status.h): with more than one rank, every
// communicator publishes its progress there (rank 0 broadcasts the job key once, at start-up),
// so that a watchdog report names the rank holding a collective up.
#pragma once

#include "meshtrain/core/communicator.h"

#include <memory>
#include <string>

#include <torch/torch.h>

namespace meshtrain {

struct RuntimeOptions {
  int threads_per_rank = 0; // 0 = automatic (see above)
  bool allow_cuda = true;   // false forces the CPU even when GPUs are visible
  // Deadline of every collective in seconds (core/comm_watchdog.h); negative: the
  // MESHTRAIN_COMM_TIMEOUT environment variable if set, else kDefaultCommTimeout; 0: none.
  double comm_timeout_s = -1;
};

constexpr double kDefaultCommTimeout = 300;

class Runtime {
public:
  Runtime(int* argc, char*** argv, RuntimeOptions options = {});
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  int rank() const { return world_->rank(); }
  int world_size() const { return world_->size(); }
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  int threads() const { return threads_; }
  const torch::Device& device() const { return device_; }
  double comm_timeout() const { return comm_timeout_s_; }
  // (Re)starts the collective watchdog with this deadline in seconds (0: stops it). A world
  // of one rank has no collectives to watch.
  void set_comm_timeout(double seconds);
  const CommunicatorPtr& world() const { return world_; }
  // The ranks' status board (null with one rank, MESHTRAIN_COMM_STATUS_DIR=off, or when it
  // could not be created: comm_status_error() says why).
  const std::shared_ptr<CommStatusBoard>& comm_status() const { return status_; }
  const std::string& comm_status_error() const { return status_error_; }
  // "mpi" or "single" (MESHTRAIN_WITH_MPI=OFF).
  static const char* backend_name();

private:
  CommunicatorPtr world_;
  std::shared_ptr<CommStatusBoard> status_;
  std::string status_error_;
  int local_rank_ = 0;
  int local_size_ = 1;
  int threads_ = 1;
  double comm_timeout_s_ = 0;
  torch::Device device_{torch::kCPU};
};

// Threads per rank for `cores` cores shared by `ranks_on_node` ranks (pure; unit-tested).
int default_threads_per_rank(int cores, int ranks_on_node);

} // namespace meshtrain
