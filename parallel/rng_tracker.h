// defines: RngStream, RngTrackerOptions, RngTrackerState, RngTracker (RngTrackerPtr) — the
// random streams dropout draws from under tensor parallelism; default_cpu_generator_state and
// set_default_cpu_generator_state (what checkpoints and recomputation save and restore).
//
// Two streams per rank, each its own generator seeded once:
//   kShared          seed                          identical on every rank of the TP group
//   kTensorParallel  seed + tp_offset + tp_rank    different on every rank of the TP group
// (tp_offset defaults to 2718, the offset Megatron-LM uses.)
//
// Which stream a dropout uses depends on what its activations are:
// - sharded over TP (attention probabilities of this rank's heads [B, H/tp, T, T]):
//   kTensorParallel, so different heads get independent masks;
// - replicated over TP (residual dropout on [B, T, C] without sequence parallelism):
//   kShared, so every rank drops the same elements and the copies stay identical;
// - sequence shards (residual dropout on [B, T/tp, C] under sequence parallelism):
//   kTensorParallel, as Megatron-LM does: each rank owns different tokens, and a shared
//   stream would repeat one mask pattern on every shard. residual_stream() picks this.
// The masks are not those of a serial run (a serial model has one stream), so layouts
// agree bit for bit only with dropout 0 (the default); each stream is deterministic for a
// seed and the order of draws.
//
// Give every data-parallel replica (or pipeline stage) its own seed when it should draw
// different masks: the tracker only knows the TP group.
//
// Replay (activation recomputation): get_state() before the forward, set_state() before
// recomputing it; the same masks come out. fork() runs code that draws from the device's
// default generator (torch::dropout, bernoulli_ without a generator) on a stream instead.
#pragma once

#include "meshtrain/core/communicator.h"

#include <torch/torch.h>

#include <cstdint>
#include <memory>

namespace meshtrain {

enum class RngStream { kShared, kTensorParallel };

// The state of LibTorch's default CPU generator (a ByteTensor), under its lock.
torch::Tensor default_cpu_generator_state();
void set_default_cpu_generator_state(const torch::Tensor& state);

// The stream for a residual / hidden dropout outside the TP region: its activations are
// replicated without sequence parallelism and sequence shards with it.
inline RngStream residual_stream(bool sequence_parallel) {
  return sequence_parallel ? RngStream::kTensorParallel : RngStream::kShared;
}

struct RngTrackerOptions {
  explicit RngTrackerOptions(uint64_t seed) : seed_(seed) {}
  TORCH_ARG(uint64_t, seed);
  // Added (with the TP rank) to the seed of the per-TP-rank stream.
  TORCH_ARG(uint64_t, tp_offset) = 2718;
  // Device whose generators the streams are (masks are drawn where the activations live).
  TORCH_ARG(torch::Device, device) = torch::kCPU;
};

// A snapshot of both streams (ByteTensor generator states).
struct RngTrackerState {
  torch::Tensor shared;
  torch::Tensor tensor_parallel;
};

class RngTracker {
public:
  // Reads the TP rank from `tp_group`; no communication.
  RngTracker(RngTrackerOptions options, const CommunicatorPtr& tp_group);

  // Restarts both streams from `seed` for this rank of `tp_group`: what parallelize() does
  // when it lays a model out (each data-parallel replica its own seed, each tp rank its own
  // per-rank stream). No communication.
  void reseed(uint64_t seed, const CommunicatorPtr& tp_group);

  const RngTrackerOptions& options() const { return options_; }
  int tp_rank() const { return tp_rank_; }
  // The seed a stream was started from.
  uint64_t seed(RngStream stream) const;
  at::Generator& generator(RngStream stream);

  // Inverted dropout with a mask drawn from `stream`: x * mask / (1 - p), mask ~
  // Bernoulli(1 - p). Returns x itself when !training or p == 0.
  torch::Tensor dropout(const torch::Tensor& x, double p, bool training, RngStream stream);

  RngTrackerState get_state() const;
  void set_state(const RngTrackerState& state);

  // Runs fn() with the device's default generator set to `stream`; afterwards the stream
  // keeps what fn() consumed and the default generator is back where it was.
  template <typename Fn> auto fork(RngStream stream, Fn&& fn) -> decltype(fn()) {
    ForkGuard guard(*this, stream);
    return fn();
  }

private:
  class ForkGuard {
  public:
    ForkGuard(RngTracker& tracker, RngStream stream);
    ~ForkGuard();
    ForkGuard(const ForkGuard&) = delete;
    ForkGuard& operator=(const ForkGuard&) = delete;

  private:
    at::Generator& stream_;
    at::Generator default_;
    torch::Tensor saved_default_;
  };

  RngTrackerOptions options_;
  int tp_rank_ = 0;
  at::Generator shared_;
  at::Generator tensor_parallel_;
};

using RngTrackerPtr = std::shared_ptr<RngTracker>;

} // namespace meshtrain
