// defines: DataParallelOptions, DataParallelReducer, NoSyncGuard, global_mean_loss,
// global_token_count — data parallelism: gradients reduced over the mesh's "dp_cp" group (the
// dp group; with context parallelism every dp x cp rank, each holding gradients of its own
// tokens) in the
// flat buckets of a BucketLayout (parallel/bucket_layout.h), launched from autograd hooks
// while backward still runs.
//
// Overlap. A hook on every parameter copies (or, when accumulating, adds) the incoming
// gradient into its bucket slot. When every parameter of a bucket has delivered in the
// current synchronising backward pass, the bucket's collective is issued asynchronously on
// the dp communicator, whose worker thread runs it while autograd continues. Buckets are
// issued strictly in bucket order (a later bucket that is ready first waits), so every rank
// issues the same sequence of collectives. finish() issues what is left, waits, and hands
// out the reduced gradients.
//
// Reduction: SUM over dp by default (op kSum). Normalise the loss by the global token count
// of the step (global_mean_loss below), so the summed gradient is the gradient of the
// global-batch mean whatever dp and the accumulation are. op kAvg divides by dp instead, for
// losses that are already means over the local micro-batch (PyTorch DDP's convention).
//
// Gradient storage and param.grad (the layout decides which):
//   - unsharded (layout stage 0, 1): one persistent flat buffer holds all buckets; the
//     reduction is an all-reduce; after finish() each param.grad is a view into its bucket
//     (a cast copy when the reduce dtype differs from the parameter's dtype).
//   - sharded (layout stage 2, shards_gradients()): the persistent buffer holds only this
//     rank's 1/dp of every bucket; a bucket's full-size staging tensor is allocated when its
//     first gradient arrives and freed once its reduce-scatter has completed. param.grad is
//     undefined after finish(); the optimizer reads the shards from finish()'s result.
//   During backward, autograd's own gradient tensor of each parameter stays in param.grad
//   until the no_sync scope ends or finish() runs (like DDP without gradient_as_bucket_view).
//
// A step:
//   reducer.zero_grad();                                  // forget the last step's gradients
//   for (m = 0; m < M; ++m) {
//     std::optional<NoSyncGuard> guard;
//     if (m + 1 < M) guard.emplace(reducer.no_sync());    // accumulate locally, no comm
//     global_mean_loss(loss_sum(m), global_tokens).backward();
//   }
//   std::vector<torch::Tensor> grads = reducer.finish();  // per bucket, full or shard
// With sharded gradients, accumulation may also run every micro-step synchronised (backward +
// finish() per micro-step, no no_sync): each reduce-scatter is added to the shard, so the
// full-size staging never outlives a micro-step, at M times the communication.
//
// Unused parameters: one that received no gradient since zero_grad() makes finish() throw,
// naming it, unless allow_unused (its gradient is then zero). The check is local: a
// parameter unused on some dp ranks only is a programming error that hangs the other ranks
// in their collective, as with DDP.
// Hooks run on the autograd thread; the reducer is neither copyable nor movable (hooks point
// at it) and removes its hooks when destroyed.
#pragma once

#include "meshtrain/core/mesh.h"
#include "meshtrain/parallel/bucket_layout.h"

#include <torch/torch.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace meshtrain {

struct DataParallelOptions {
  // false: every bucket is reduced in finish() (for measuring what overlap buys).
  TORCH_ARG(bool, overlap) = true;
  // kSum (default, with global_mean_loss) or kAvg (local-mean losses).
  TORCH_ARG(ReduceOp, op) = ReduceOp::kSum;
  // Treat parameters without a gradient as zero instead of failing in finish().
  TORCH_ARG(bool, allow_unused) = false;
  // Broadcast the parameters from dp rank 0 at construction, so replicas start identical.
  TORCH_ARG(bool, broadcast_parameters) = true;
};

class DataParallelReducer;

// While alive, backward passes accumulate into the buckets without communicating. Leaving
// the scope drops autograd's per-parameter gradient copies (the buckets keep the sums).
class NoSyncGuard {
public:
  NoSyncGuard(NoSyncGuard&& other) noexcept;
  NoSyncGuard(const NoSyncGuard&) = delete;
  NoSyncGuard& operator=(const NoSyncGuard&) = delete;
  NoSyncGuard& operator=(NoSyncGuard&&) = delete;
  ~NoSyncGuard();

private:
  friend class DataParallelReducer;
  explicit NoSyncGuard(DataParallelReducer* reducer) : reducer_(reducer) {}
  DataParallelReducer* reducer_;
};

class DataParallelReducer {
public:
  // Hooks every trainable parameter of `model` (a tied weight once, under its first name)
  // and reduces its gradients over mesh.group("dp_cp") in `layout`'s buckets (built for this
  // model and that group's size). Collective over dp when broadcast_parameters.
  DataParallelReducer(const torch::nn::Module& model, const Mesh& mesh, BucketLayoutPtr layout,
                      DataParallelOptions options = {});
  ~DataParallelReducer();
  DataParallelReducer(const DataParallelReducer&) = delete;
  DataParallelReducer& operator=(const DataParallelReducer&) = delete;

  // Starts a step: the accumulated gradients are forgotten (lazily, no memset) and every
  // param.grad is reset. Waits for reductions still in flight.
  void zero_grad();
  NoSyncGuard no_sync();
  // Issues the remaining reductions, waits for all, and returns the reduced gradient of
  // every bucket: [padded_b] (unsharded) or this rank's [padded_b / dp] (shard_gradients).
  // The tensors are the reducer's buffers: valid until the next backward or zero_grad().
  // A second call without backward in between returns the same tensors.
  std::vector<torch::Tensor> finish();
  // Between the no_sync backward passes of a step and finish(): the gradient `param` has
  // accumulated since zero_grad() (zeros when none arrived), as the [numel] view of its bucket
  // slot, to be changed in place before finish() reduces it. A pipeline sums a parameter
  // that two stages hold (a tied embedding) here. Throws for a parameter the reducer does not
  // hold, inside no_sync, or after a synchronising pass started.
  torch::Tensor accumulated_grad(const torch::Tensor& param);

  const BucketLayout& layout() const { return *layout_; }
  int64_t num_buckets() const { return static_cast<int64_t>(buckets_.size()); }
  // padded_b of bucket b.
  int64_t bucket_numel(int64_t b) const;
  // Bytes of the persistent gradient storage of this rank: sum of padded_b (unsharded) or of
  // padded_b / dp (sharded), times the reduce dtype's size.
  int64_t grad_buffer_bytes() const;
  // Largest number of bytes the sharded mode's staging buckets took at once (0 unsharded).
  int64_t peak_staging_bytes() const { return peak_staging_bytes_; }
  const DataParallelOptions& options() const { return options_; }
  const CommunicatorPtr& group() const { return dp_; }

private:
  friend class NoSyncGuard;

  struct Slot {
    std::string name;
    torch::Tensor param;
    int64_t bucket = 0;
    int64_t offset = 0; // in the bucket
    int64_t numel = 0;
    unsigned hook = 0;
    bool in_buffer = false; // the bucket slot holds this step's gradient (add, don't copy)
    bool seen = false;      // a gradient arrived since zero_grad()
    bool counted = false;   // delivered in the current synchronising pass
  };
  struct Bucket {
    std::vector<int64_t> slots;
    int64_t padded = 0;
    torch::Tensor grads; // [padded]: view of flat_ (unsharded) or staging (sharded)
    torch::Tensor shard; // [padded / dp] (sharded): view of flat_
    torch::Tensor out;   // reduce-scatter target: shard, or a temporary to add into it
    bool shard_fresh = true;
    int64_t pending = 0; // slots not yet delivered in this synchronising pass
    WorkPtr work;
    bool launched = false;
  };
  enum class Phase { kAccumulating, kReduced };

  void on_grad(int64_t slot, const torch::Tensor& grad);
  void launch_ready();
  void launch(Bucket& bucket);
  void complete(Bucket& bucket);
  void poll_completed();
  void ensure_staging(Bucket& bucket);
  void end_no_sync();
  void wait_in_flight();
  std::vector<torch::Tensor> results() const;

  BucketLayoutPtr layout_;
  DataParallelOptions options_;
  CommunicatorPtr dp_;
  std::vector<Slot> slots_;
  std::vector<Bucket> buckets_;
  torch::Tensor flat_; // unsharded: all buckets; sharded: all shards
  torch::TensorOptions grad_options_;
  Phase phase_ = Phase::kAccumulating;
  int no_sync_depth_ = 0;
  size_t next_launch_ = 0;
  int64_t staging_bytes_ = 0;
  int64_t peak_staging_bytes_ = 0;
  std::mutex mutex_;
};

// The micro-batch loss to call backward on: the sum of its token (or sample) losses divided
// by the number of tokens in the WHOLE optimizer step (all micro-batches of all dp ranks).
// With SUM reduction over dp and gradient accumulation over micro-steps, the gradient is
// then exactly that of the global-batch mean, for any dp x accumulation x micro-batch split.
// The returned value is this micro-batch's share of the global mean loss: summing it over
// micro-steps and dp ranks gives the reported loss.
torch::Tensor global_mean_loss(const torch::Tensor& token_loss_sum, int64_t global_tokens);

// Global token count of a step when it varies (ignored targets, packed sequences): the sum
// over the dp x cp ranks of each rank's count (under context parallelism: of its own tokens).
// Collective over mesh.group("dp_cp").
int64_t global_token_count(int64_t local_tokens, const Mesh& mesh);

} // namespace meshtrain
