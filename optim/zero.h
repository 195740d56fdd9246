// defines: ZeroOptions, ZeroStateDict, OwnedRange, ZeroOptimizer — AdamW or SGD on flat fp32
// buffers, with optimizer state sharded over the data-parallel group (ZeRO stages 0-3,
// Rajbhandari et al. 2020; DESIGN §3). Composes with tensor parallelism: it works on this
// rank's (TP-local) parameters and shards within the mesh's "dp_cp" group (the dp group; with
// context parallelism the dp x cp ranks, which all hold the same parameters); the gradient
// norm also spans the "tp" group.
//
// Layout: the BucketLayout (parallel/bucket_layout.h) the reducer uses, which also says the
// ZeRO stage and which range of every bucket this rank owns. The parameters become views into
// one flat buffer per bucket (param dtype), so the final all-gather writes them in place. The
// optimizer keeps, for its owned ranges only:
//   master  fp32 copy of the parameters (exact even when the model runs in bf16)
//   exp_avg, exp_avg_sq (AdamW) or momentum_buffer (SGD with momentum), fp32.
//
// Per-rank bytes, Psi = parameters of this TP rank, P = sum of padded_b (Psi plus < dp
// elements per bucket), D = dp, K = 12 for AdamW (4 master + 4 + 4 moments), 8 for SGD:
//   stage 0: state K*P        gradients (reducer) r*P
//   stage 1: state K*P/D      gradients          r*P
//   stage 2: state K*P/D      gradients          r*P/D   (+ transient staging, see reducer)
//   stage 3: state K*P/D      gradients          r*P/D   parameters p*P/D (+ gathered units)
// with r the reduce dtype's size and p the parameters'. At stage 3 the parameters are
// parallel/parameter_shards.h's: the buckets are its units, the owned range of each is its
// persistent shard, and a step writes the shard (the next forward gathers it) instead of
// all-gathering the whole bucket.
//
// A step, given the reduced gradients of DataParallelReducer::finish() (stage 0/1: full
// buckets [padded_b]; stage 2: this rank's shards [padded_b / D]):
//   double norm = opt.clip_grad_norm(grads, max_norm);   // global norm before clipping
//   opt.set_lr(schedule.lr(step));
//   opt.step(grads);                                      // update, then all-gather (stage >= 1)
// Weight decay: decoupled (AdamW) or L2 (SGD) on parameters selected by decay_filter
// (default: dim >= 2); the others are never decayed.
#pragma once

#include "meshtrain/core/mesh.h"
#include "meshtrain/optim/adamw.h"
#include "meshtrain/optim/sgd.h"
#include "meshtrain/parallel/bucket_layout.h"
#include "meshtrain/parallel/sharding.h"

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <variant>
#include <vector>

namespace meshtrain {

struct ZeroOptions {
  // Which parameters get weight decay (default: decays_by_default, dim >= 2).
  TORCH_ARG(std::function<bool(const std::string&, const torch::Tensor&)>, decay_filter);

public:
  // The update rule; AdamW with its defaults unless set.
  ZeroOptions& adamw(AdamWOptions options) {
    rule_ = options;
    return *this;
  }
  ZeroOptions& sgd(SGDOptions options) {
    rule_ = options;
    return *this;
  }
  const std::variant<AdamWOptions, SGDOptions>& rule() const { return rule_; }

private:
  std::variant<AdamWOptions, SGDOptions> rule_ = AdamWOptions();
};

// A checkpointable view of the optimizer. Keys are "<param>.<state>" with state one of
// master, exp_avg, exp_avg_sq (AdamW) or master, momentum_buffer (SGD with momentum).
// state_dict(): 1-D pieces, this rank's owned range of each flattened parameter (see
// owned_ranges(); a parameter this rank owns nothing of is absent). gathered_state_dict():
// full tensors shaped like the parameters. load_state_dict() accepts either form.
struct ZeroStateDict {
  int64_t step = 0;
  std::map<std::string, torch::Tensor> tensors;
};

// Elements [begin, end) of the flattened (TP-local) parameter `name` this rank owns.
struct OwnedRange {
  std::string name;
  int64_t begin = 0;
  int64_t end = 0;
};

class ParameterShards;

class ZeroOptimizer {
public:
  // Packs the parameters of `model` into `layout`'s buckets (the reducer's) and keeps the
  // state of the ranges this rank of mesh.group("dp_cp") owns at the layout's ZeRO stage.
  // Turns the parameters into views of the flat parameter buffers (set_data): construct it
  // after loading weights, or call sync_master_from_params() after changing them.
  // Stage 3: `shards` (required there, refused below) holds the parameters; the optimizer
  // keeps the master weights and moments of its shards.
  ZeroOptimizer(const torch::nn::Module& model, const Mesh& mesh, BucketLayoutPtr layout,
                ZeroOptions options = {}, std::shared_ptr<ParameterShards> shards = nullptr);

  // Pipeline parallelism: the gradient norm also spans the pp stages (their squared norms
  // summed over `pp`), and the parameters named in `counted_elsewhere` — a shared parameter
  // another stage holds too, a tied embedding on the last stage — are left out of this
  // stage's share so each is counted once.
  void set_pipeline_norm(CommunicatorPtr pp, std::vector<std::string> counted_elsewhere);
  // Global L2 norm of the gradients (whole model, all tp partitions, replicated parameters
  // once) before clipping; scales `grads` in place by clip_coefficient(norm, max_norm).
  // max_norm <= 0 only measures. Collective over tp, and over dp at stage 2.
  double clip_grad_norm(const std::vector<torch::Tensor>& grads, double max_norm);
  // One update with the current lr. grads: per bucket, [padded_b] at stage 0/1 or
  // [padded_b / dp] at stage 2/3 (any floating dtype; read as fp32). Collective over dp at
  // stage 1/2 (all-gather of the updated parameters).
  void step(const std::vector<torch::Tensor>& grads);

  void set_lr(double lr);
  double lr() const { return lr_; }
  int64_t step_count() const { return step_; }
  const ZeroOptions& options() const { return options_; }
  const BucketLayout& layout() const { return *layout_; }
  int stage() const { return layout_->zero_stage(); }

  // Bytes of optimizer state on this rank: fp32 master + exp_avg + exp_avg_sq (AdamW) or
  // master + momentum_buffer (SGD).
  int64_t state_bytes() const;
  // Trainable (TP-local) parameter count Psi, and P = sum of padded bucket sizes.
  int64_t num_parameters() const { return num_parameters_; }
  int64_t padded_numel() const { return padded_numel_; }
  int64_t num_buckets() const { return static_cast<int64_t>(buckets_.size()); }
  int64_t bucket_numel(int64_t b) const;

  ZeroStateDict state_dict() const;
  // Collective over dp at stage >= 1.
  ZeroStateDict gathered_state_dict() const;
  // Loads pieces or full tensors (see ZeroStateDict), then rewrites the parameters from
  // the loaded master weights. Collective over dp at stage >= 1.
  void load_state_dict(const ZeroStateDict& state);
  std::vector<OwnedRange> owned_ranges() const;
  // Re-reads this rank's master weights from the parameters (after loading model weights).
  // Stage 3 reads the parameter shards: load weights into the model before parallelize().
  void sync_master_from_params();

private:
  struct Slot {
    std::string name;
    torch::Tensor param;
    bool partitioned = false; // over tp (ShardSpec)
    bool decay = false;
    int64_t offset = 0; // in the bucket
    int64_t numel = 0;
  };
  // The part of one parameter inside this rank's owned range of its bucket.
  struct Segment {
    size_t slot = 0;
    int64_t shard_offset = 0; // in the bucket's owned range
    int64_t param_offset = 0; // in the flattened parameter
    int64_t length = 0;
  };
  struct Bucket {
    std::vector<Slot> slots;
    std::vector<Segment> segments;
    int64_t padded = 0;
    int64_t own_begin = 0;
    int64_t own_size = 0;
    torch::Tensor params; // [padded], param dtype; the parameters are views of it (stage < 3)
    torch::Tensor own;    // [own_size], param dtype: params' owned range, or the stage-3 shard
    torch::Tensor master; // [own_size] fp32, view of master_
    std::map<std::string, torch::Tensor> state; // [own_size] fp32 views
  };

  std::vector<std::string> state_names() const; // without "master"
  std::vector<torch::Tensor> owned_grads(const std::vector<torch::Tensor>& grads) const;
  void check_params_in_place() const;
  void write_params_and_gather();

  BucketLayoutPtr layout_;
  ZeroOptions options_;
  CommunicatorPtr dp_;
  CommunicatorPtr tp_;
  CommunicatorPtr pp_;                         // null: no pipeline
  std::vector<std::string> counted_elsewhere_; // by another pp stage
  std::shared_ptr<ParameterShards> shards_;
  std::vector<Bucket> buckets_;
  torch::Tensor master_;                       // [sum own_size] fp32
  std::map<std::string, torch::Tensor> state_; // [sum own_size] fp32 each
  double lr_ = 0;
  int64_t step_ = 0;
  int64_t num_parameters_ = 0;
  int64_t padded_numel_ = 0;
};

} // namespace meshtrain
