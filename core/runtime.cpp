// defines: Runtime (see runtime.h).
#include "meshtrain/core/runtime.h"

#include "meshtrain/core/backend.h"
#include "meshtrain/core/comm_status.h"
#include "meshtrain/core/comm_watchdog.h"
#include "meshtrain/core/errors.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>

#ifdef __GLIBC__
#include <malloc.h>
#endif

namespace meshtrain {
namespace {

// MPI can be initialised once per process; a second Runtime is a programming error.
std::atomic<bool> g_runtime_alive{false};

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') {
    return fallback;
  }
  char* end = nullptr;
  const long parsed = std::strtol(v, &end, 10);
  MT_CHECK(end != nullptr && *end == '\0' && parsed > 0 && parsed < 4096, name, "='", v,
           "' must be a positive integer");
  return static_cast<int>(parsed);
}

// MESHTRAIN_COMM_TIMEOUT in seconds (>= 0), else `fallback`.
double env_seconds(const char* name, double fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') {
    return fallback;
  }
  char* end = nullptr;
  const double parsed = std::strtod(v, &end);
  MT_CHECK(end != nullptr && *end == '\0' && std::isfinite(parsed) && parsed >= 0, name, "='", v,
           "' must be a number of seconds >= 0 (0: no deadline)");
  return parsed;
}

// Keeps freed host memory in the process for the next allocation, as a caching allocator does.
// glibc's default hands blocks above its mmap threshold back to the kernel on free, and trims
// the heap's top; a training step frees and re-allocates the same activations every step, so
// every step then re-faults them page by page (train_gpt's default GPT: ~6,600 faults and
// 20-25% of a step). Blocks up to 32 MiB (glibc's largest mmap threshold) now come from the
// heap, which is never trimmed: resident memory stays at the peak, which a job needs again at
// its next step anyway. MESHTRAIN_HOST_MEMORY_CACHE=0 keeps glibc's defaults.
void cache_host_memory() {
#ifdef __GLIBC__
  const char* env = std::getenv("MESHTRAIN_HOST_MEMORY_CACHE");
  if (env != nullptr && std::string(env) == "0") {
    return;
  }
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, INT_MAX);
#endif
}

} // namespace

int default_threads_per_rank(int cores, int ranks_on_node) {
  MT_CHECK(ranks_on_node >= 1, "ranks on node must be >= 1, got ", ranks_on_node);
  return std::max(1, cores / ranks_on_node);
}

const char* Runtime::backend_name() {
  return backend::name();
}

Runtime::Runtime(int* argc, char*** argv, RuntimeOptions options) {
  MT_CHECK(!g_runtime_alive.exchange(true), "only one meshtrain::Runtime may exist per process");
  try {
    backend::init(argc, argv);
    world_ = backend::make_world();
    backend::node_local(world_, &local_rank_, &local_size_);
  } catch (...) {
    world_.reset();
    g_runtime_alive = false;
    throw;
  }
  if (world_->size() > 1) {
    // One key for the whole job, from rank 0: the ranks' status files are named by it.
    auto key = torch::zeros({2}, torch::kLong);
    if (world_->rank() == 0) {
      key[0] = static_cast<int64_t>(::getpid());
      key[1] = static_cast<int64_t>(std::random_device()() ^
                                    std::chrono::steady_clock::now().time_since_epoch().count());
    }
    world_->broadcast(key, 0);
    char job[48];
    std::snprintf(job, sizeof(job), "%llx-%llx",
                  static_cast<unsigned long long>(key[0].item<int64_t>()),
                  static_cast<unsigned long long>(key[1].item<int64_t>()));
    const std::string dir = CommStatusBoard::default_dir();
    if (dir.empty()) {
      status_error_ = "MESHTRAIN_COMM_STATUS_DIR=off, or no writable /dev/shm";
    } else {
      try {
        status_ = CommStatusBoard::create(dir, job, world_->rank(), world_->size());
        world_->publish_status(status_);
      } catch (const c10::Error& e) {
        status_error_ = e.what_without_backtrace();
      }
    }
  }
  const int cores = static_cast<int>(std::max(1U, std::thread::hardware_concurrency()));
  const int fallback = options.threads_per_rank > 0 ? options.threads_per_rank
                                                    : default_threads_per_rank(cores, local_size_);
  threads_ = env_int("MESHTRAIN_THREADS", fallback);
  torch::set_num_threads(threads_);
  cache_host_memory();
  const auto gpus = static_cast<int>(torch::cuda::device_count());
  if (options.allow_cuda && gpus > 0) {
    device_ = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(local_rank_ % gpus));
  }
  set_comm_timeout(options.comm_timeout_s >= 0
                       ? options.comm_timeout_s
                       : env_seconds("MESHTRAIN_COMM_TIMEOUT", kDefaultCommTimeout));
}

void Runtime::set_comm_timeout(double seconds) {
  MT_CHECK(std::isfinite(seconds) && seconds >= 0, "comm timeout (", seconds,
           " s) must be >= 0 (0: no deadline)");
  comm_timeout_s_ = seconds;
  CommWatchdog::stop();
  if (seconds > 0 && world_->size() > 1) {
    CommWatchdogOptions watchdog;
    watchdog.timeout = std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
    watchdog.rank = world_->rank();
    watchdog.status = status_;
    CommWatchdog::start(watchdog);
  }
}

Runtime::~Runtime() {
  CommWatchdog::stop();
  world_.reset();  // joins the world's worker before the transport goes away
  status_.reset(); // removes this rank's status file (once no communicator holds it)
  backend::finalize();
  g_runtime_alive = false;
}

} // namespace meshtrain
