// defines: ParameterShardsOptions, ParameterShards, GatheredParameters, full_sharding_units —
// full parameter sharding (ZeRO stage 3; DESIGN §3 "Full sharding"): every trainable (TP-local)
// parameter is kept as this rank's 1/D of a flat buffer over mesh.group("dp_cp"), and gathered
// a unit at a time just before the unit runs.
//
// Units. One per block of the model (blocks() of parallel/parallel_model.h, in forward order)
// and one "root" unit of the parameters outside every block (embedding, final norm, head; a
// tied weight is there once). Unit u's parameters are bucket b of the stage-3 BucketLayout
// (parallel/bucket_layout.h), the reducer's and the optimizer's, with
//   block i -> bucket L-1-i (backward delivers the last block's gradients first), root -> L
// so the reducer reduce-scatters a block's gradients as soon as its backward is done.
//
// Storage of unit u, D = dp x cp ranks, P_u = the bucket's padded size (a multiple of D):
//   shard  [P_u / D] param dtype, persistent: elements [r P_u / D, (r+1) P_u / D) of the
//          unit's flat parameters (the same range the optimizer owns; it writes it each step)
//   full   [P_u] param dtype; the parameters are views of it. Its memory exists only while
//          the unit is gathered: the storage is freed in place (the views, and the tensors
//          autograd saved of them, keep pointing at it) and re-allocated for the next gather.
//
// One micro-batch, L blocks, prefetch depth k, with gradients:
//   forward   root: gather, embed, free (reshard_after_forward)
//             block i: gather (issued k blocks earlier), issue the gathers of i+1..i+k, run,
//             free (reshard_after_forward); the root's gather is prefetched after the last block
//             root: gather, head and loss; kept until its gradients are in
//   backward  block i (first thing of its backward, a hook on its output): gather again
//             (if freed), issue the gathers of i-1..i-k; once every parameter of the unit has
//             its gradient: free, and the reducer reduce-scatters the bucket
// Per parameter and micro-batch: 2 all-gathers and 1 reduce-scatter of its bytes (1 and 1
// without reshard_after_forward). Gathered at once: at most 1 + k blocks (plus the root).
// Without gradients (validation) every unit is freed after its use.
//
// Order agreement. Before a unit is used (forward, and backward), the ranks exchange what
// they are about to run (unit, phase, how many times so far): a rank that runs a block a
// different number of times than the others (a data-dependent skip in a hand-written loop)
// makes every rank throw, naming the block and the ranks, instead of gathering another
// rank's block or waiting forever. The exchange is one all-gather of 3 int64 per rank on
// dp_cp. (On a communicator of its own it would not wait behind the reduce-scatters, but its
// extra thread made steps 55% slower on a 2-core CPU: docs/benchmarks.md.)
//
// Collectives: every call that gathers is collective over dp_cp, in the same order on every
// rank (forward and backward run the same units in the same order everywhere).
#pragma once

#include "meshtrain/core/communicator.h"
#include "meshtrain/core/mesh.h"
#include "meshtrain/parallel/bucket_layout.h"

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace meshtrain {

struct ParameterShardsOptions {
  // Free a block's parameters after its forward (gather them again for backward).
  TORCH_ARG(bool, reshard_after_forward) = true;
  // Blocks gathered ahead of the one running (forward: the next ones; backward: the previous).
  TORCH_ARG(int, prefetch) = 1;
  // Sharded start-up (parallel/param_init.h): at construction, called for every parameter
  // with its name, the part of this rank's shard that holds it (`out`, 1-D, maybe empty) and
  // where that part starts in the parameter's flat elements; it writes the initial values
  // into `out` and returns true, or returns false and the parameter's own values are copied.
  // So a deferred parameter's values are made only for this rank's shard, never whole.
  using FillFn =
      std::function<bool(const std::string& name, const torch::Tensor& out, int64_t first)>;
  TORCH_ARG(FillFn, fill) = nullptr;
};

// The units of `model` for the stage-3 BucketLayoutOptions::units, in bucket order: the
// trainable parameter names of blocks L-1 .. 0, then of the root (absent when empty). Throws
// naming the block when one has no trainable parameter or shares one with another unit.
std::vector<std::vector<std::string>>
full_sharding_units(const torch::nn::Module& model,
                    const std::vector<std::shared_ptr<torch::nn::Module>>& blocks);

class ParameterShards {
public:
  using BlockFn = std::function<torch::Tensor(const torch::Tensor&)>;
  using RootFn = std::function<torch::Tensor()>;

  // Shards the trainable parameters of `model` (already identical on the dp_cp ranks, e.g.
  // after the reducer's broadcast) into `layout`'s buckets (stage 3, units from
  // full_sharding_units(model, blocks)) and frees their full storage. No communication.
  ParameterShards(const torch::nn::Module& model,
                  const std::vector<std::shared_ptr<torch::nn::Module>>& blocks, const Mesh& mesh,
                  BucketLayoutPtr layout, ParameterShardsOptions options = {});
  ~ParameterShards();
  ParameterShards(const ParameterShards&) = delete;
  ParameterShards& operator=(const ParameterShards&) = delete;

  // fn(x) with block i's parameters gathered (see the schedule above). Collective.
  torch::Tensor run_block(int64_t block, const BlockFn& fn, const torch::Tensor& x);
  // fn() with the root unit gathered: the embedding (freed after, when resharding) or the
  // head and loss (kept until the root's gradients are in). Collective.
  torch::Tensor run_embedding(const RootFn& fn);
  torch::Tensor run_head(const RootFn& fn);
  // Gathers block i if it is not (inside a recomputed forward: a no-op, its backward hook
  // already gathered it). Collective only when it gathers.
  void ensure_gathered(int64_t block);

  // All units gathered (collective), or freed (local): for checkpoints, which write whole
  // parameters, and after every micro-step's backward (a unit one of whose parameters got
  // no gradient stays gathered until then; freeing everything keeps the ranks' states equal).
  // The optimizer frees everything before it writes the shards (a gathered copy would be
  // stale).
  void gather_all();
  void release_all();

  // This rank's persistent shard of bucket b: [padded_b / D], param dtype. The optimizer
  // reads and writes it (optim/zero.h).
  const torch::Tensor& shard(int64_t bucket) const;
  const BucketLayout& layout() const { return *layout_; }
  const ParameterShardsOptions& options() const { return options_; }
  int64_t num_blocks() const { return num_blocks_; }

  // Bytes of every shard of this rank, and of one block's gathered parameters (the largest).
  int64_t shard_bytes() const;
  int64_t max_block_bytes() const;
  // Most blocks gathered at once since reset_peak() (the root not counted).
  int64_t peak_gathered_blocks() const { return peak_gathered_blocks_; }
  void reset_peak() { peak_gathered_blocks_ = gathered_blocks_; }

private:
  enum class State { kFreed, kGathering, kGathered };
  enum Phase : int64_t { kForward = 0, kBackward = 1 };
  struct Unit {
    std::string name; // "block 3 (transformer.h.3)", "the root (embedding, head)"
    int64_t bucket = 0;
    bool is_block = false;
    torch::Tensor full;  // [padded] param dtype; storage freed while not gathered
    torch::Tensor shard; // [padded / D] param dtype
    std::vector<torch::Tensor> params;
    State state = State::kGathered;
    WorkPtr work;
    int64_t pending = 0;       // parameters whose gradient this backward has not delivered
    std::vector<bool> arrived; // per parameter: its gradient came (a second one is ignored)
    int64_t uses[2] = {0, 0};  // forward and backward uses, for the order agreement
  };
  friend class PreBackwardGather;

  Unit& unit_of_block(int64_t block);
  Unit* root() { return root_ < 0 ? nullptr : &units_[root_]; }
  void agree_on_use(Unit& unit, Phase phase);
  void issue_gather(Unit& unit);
  void wait_gathered(Unit& unit);
  void release(Unit& unit);
  void prefetch_blocks(int64_t first, int64_t step);
  void before_backward(int64_t block);
  void on_gradient(size_t unit, size_t param);
  void expect_gradients(Unit& unit);

  BucketLayoutPtr layout_;
  ParameterShardsOptions options_;
  CommunicatorPtr dp_;
  std::vector<Unit> units_; // blocks 0..L-1 in forward order, then the root
  int64_t num_blocks_ = 0;
  int64_t root_ = -1;
  std::vector<std::pair<torch::Tensor, unsigned>> hooks_;
  int64_t last_done_ = -1; // the unit whose parameters' autograd gradients are dropped next
  int64_t gathered_blocks_ = 0;
  int64_t peak_gathered_blocks_ = 0;
  std::mutex mutex_;
};

// Every unit gathered while alive (collective at construction); freed again at the end. A
// null `shards` does nothing (stages 0-2 keep whole parameters). Writes into the gathered
// parameters are not kept: the shards are the weights. When the ParameterShards is
// destroyed the model's parameters stay without memory (gather them first to keep them).
class GatheredParameters {
public:
  explicit GatheredParameters(ParameterShards* shards);
  ~GatheredParameters();
  GatheredParameters(const GatheredParameters&) = delete;
  GatheredParameters& operator=(const GatheredParameters&) = delete;

private:
  ParameterShards* shards_;
};

} // namespace meshtrain
