// defines: CheckpointInfo, read_checkpoint_info, parse_checkpoint_info, latest_checkpoint,
// resolve_checkpoint, load_consolidated_weights, load_full_weights, CheckpointOptions,
// CheckpointManager — distributed checkpoints (DESIGN §5; the format is docs/checkpoints.md):
//
//   <dir>/step_00000100/
//     meta.json                  layout, step, data position, model config, every parameter's
//                                global shape and TP shard spec, every file's size + checksum
//     model-tp00.safetensors     TP rank t's parameters as the model holds them (written by
//                                DP rank 0 of that TP rank); nanoGPT names, TP-local shapes.
//                                Under pipeline parallelism model-pp01-tp00 etc.: each stage
//                                its parameters, the ones the first and the last stage share
//                                (outside the blocks) in the first stage's files only
//     optim-dp00-tp00.safetensors  every rank's ZeRO state: its owned range of each
//                                flattened parameter for master, exp_avg, exp_avg_sq (1-D),
//                                the ranges in the header metadata; RNG states. "dp" is the
//                                rank's index in the group the optimizer shards over, dp x cp
//                                (dp * cp_size + cp; the dp index when cp = 1);
//                                optim-pp01-dp00-tp00 under pipeline parallelism
//
// A save writes into <dir>/.step_00000100.partial and renames it to step_00000100 only after
// every rank's files and meta.json are on disk (fsync'ed): a crash at any point leaves the
// previous checkpoint as the latest complete one. A load verifies sizes and checksums, and
// reshards: the state of any dp x cp x tp x pp x ZeRO layout loads into any other (same model,
// global batch and sequence length), bit-exact in fp32.
//
// All ranks must see the same directory (one machine, or a shared file system).
#pragma once

#include "meshtrain/core/safetensors.h"
#include "meshtrain/launch/trainer.h"
#include "meshtrain/parallel/rng_tracker.h"
#include "meshtrain/parallel/sharding.h"

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace meshtrain {

// What a checkpoint's meta.json says (the parts a reader needs).
struct CheckpointInfo {
  std::string path; // the step directory
  int64_t step = 0; // optimizer steps done
  int dp = 1;
  int cp = 1; // context parallelism: the optimizer files are per dp x cp rank
  int tp = 1;
  int pp = 1; // pipeline stages: the model and optimizer files are per pp stage when > 1
  int zero_stage = 0;
  int64_t global_batch = 0; // B and T: the data position is step x B samples of T tokens
  int64_t seq_len = 0;
  std::string model_json; // the "model" object its writer stored (a JSON text)
  // Every parameter in the model's order with the spec of its TP shards (global_size and
  // unpadded_size along dim) and its full, padded shape.
  std::vector<std::pair<std::string, ShardSpec>> params;
  std::vector<std::vector<int64_t>> global_shapes;
};

// Reads and checks <step_dir>/meta.json; throws naming the file and the bad field.
CheckpointInfo read_checkpoint_info(const std::string& step_dir);
// The same checks on a meta.json text already in memory (what read_checkpoint_info reads from
// <step_dir>/meta.json); `step_dir` is the result's path and names the file in errors. Any
// input either parses or throws c10::Error (tests/fuzz/fuzz_checkpoint_meta.cpp).
CheckpointInfo parse_checkpoint_info(const std::string& json_text, const std::string& step_dir);

// The complete checkpoint (a step_<N> directory holding meta.json) with the largest N under
// `root`; nullopt when there is none (or no `root`). Partial saves are never returned.
std::optional<std::string> latest_checkpoint(const std::string& root);

// A user-given path: a step directory, or a checkpoint directory (then its latest). Throws
// naming the path when it holds no complete checkpoint.
std::string resolve_checkpoint(const std::string& path);

// The full, unpadded weights of the model files (checksums verified), in the model's order
// and with its names: what an export writes. No communication.
NamedTensors load_consolidated_weights(const CheckpointInfo& info);

// Copies full, unpadded weights (an export, or load_consolidated_weights) into `model`,
// cutting each parameter for this TP rank by its ShardSpec and padding the vocab. Every
// parameter must be present with its full shape; "lm_head.weight" (tied to
// transformer.wte.weight) may be present and must then equal it. Throws naming `source`, the
// tensor and the shapes. No communication.
void load_full_weights(torch::nn::Module& model, const NamedTensors& weights, int tp_rank,
                       int tp_size, const std::string& source);

struct CheckpointOptions {
  // Where save() writes (a load-only manager may leave it empty).
  TORCH_ARG(std::string, dir);
  // Save after every save_every-th step (0: only at the end and on a signal).
  TORCH_ARG(int64_t, save_every) = 0;
  // Keep only the newest keep_last checkpoints of this run (0: keep all): the one just saved
  // and older ones. Never the one just saved; checkpoints newer than it (left by a run this
  // one branched off, by resuming from an earlier step) are kept and named on stderr.
  TORCH_ARG(int64_t, keep_last) = 0;
  // Stored as meta.json's "model" (a JSON object text); a load refuses a checkpoint whose
  // "model" differs in any key.
  TORCH_ARG(std::string, model_json) = "{}";
  // Dropout streams to save and restore (optional).
  TORCH_ARG(RngTrackerPtr, rng_tracker) = nullptr;
  // Called on every rank with (step, world rank) once its shards of a save are written and
  // before the checkpoint is completed (launch/fault_injection.h's kill-in-save).
  TORCH_ARG(std::function<void(int64_t, int)>, before_publish);
  // A load refuses a checkpoint written with another data order: another training file (its
  // token count, or a checksum of its first and last MiB), another shuffle setting or, when
  // shuffling, another data seed. true: continue anyway, with a warning naming the changes.
  TORCH_ARG(bool, allow_data_change) = false;
};

class CheckpointManager {
public:
  explicit CheckpointManager(CheckpointOptions options);

  // Writes <dir>/step_<trainer.step()> (replacing one of that step). Collective over the
  // trainer's mesh; returns the directory. Throws on every rank when any rank fails; the
  // previous checkpoints are untouched then.
  std::string save(Trainer& trainer);
  // Restores the model, the optimizer state, the step and the data position from a step
  // directory written in any layout (and, in the same layout, the RNG states). Collective.
  // Every rank reads and verifies its part before anything changes; a failure on any rank
  // throws on every rank with the message of the lowest failing rank, the trainer untouched.
  void load(const std::string& step_dir, Trainer& trainer);
  // load() of the newest complete checkpoint under `root` that verifies: a damaged one (a
  // checksum or size that differs from meta.json, an unreadable meta.json or file) is skipped
  // with a warning on stderr naming it and why, and the next older one is tried. Returns the
  // step directory loaded; nullopt when `root` holds no complete checkpoint. Throws when none
  // verifies (naming each), or at once when the checkpoint does not fit this run (another
  // model, batch or data: no older checkpoint would either). Collective.
  std::optional<std::string> load_latest(const std::string& root, Trainer& trainer);

  // For trainer.set_checkpoint_hook: saves after every save_every-th step, at the end and on
  // a signal (never twice for one step).
  CheckpointHook hook();

  const CheckpointOptions& options() const { return options_; }

private:
  CheckpointOptions options_;
  int64_t last_saved_step_ = -1;
  bool warned_newer_ = false; // about checkpoints newer than this run's (once)
};

} // namespace meshtrain
