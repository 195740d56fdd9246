// defines: TrainingFlags, add_training_flags, read_training_flags, check_training_paths,
// trainer_options, optimizer_options, training_fields — the flags every training program
// (train_gpt, and later model families) shares beyond the model's shape: data,
// optimization, the layout (launch/cli.h), reporting, checkpoints, threads and the watchdog,
// with train_gpt's defaults (docs/gpt.md).
#pragma once

#include "meshtrain/core/cpu_features.h"
#include "meshtrain/launch/cli.h"
#include "meshtrain/launch/reporting.h"
#include "meshtrain/launch/trainer.h"
#include "meshtrain/optim/zero.h"

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace meshtrain::cli {

struct TrainingFlags {
  std::string data;
  std::string val_data; // empty: no validation
  bool shuffle = true;
  int64_t steps = 0;
  double lr = 0;
  double min_lr = 0;
  int64_t warmup = 0;
  double weight_decay = 0;
  double grad_clip = 0;
  uint64_t seed = 0;
  ParallelPlan plan; // the layout flags, not yet validated
  int threads = 0;   // 0: the runtime's choice
  std::string metrics;
  std::string prometheus;
  std::string trace; // directory of per-rank Chrome traces; empty: none
  bool count_comm = false;
  int64_t val_every = 0;
  int64_t val_batches = 0;
  int64_t log_every = 0;
  double max_time = 0;
  double comm_timeout = 0;
  ProgressStyle progress = ProgressStyle::kAuto;
  NanPolicy nan_policy = NanPolicy::kStop;
  std::string checkpoint_dir; // empty: no checkpoints
  int64_t save_every = 0;
  int64_t keep_checkpoints = 0;
  bool save_at_start = false;
  bool allow_data_change = false; // resume on another data order on purpose
  std::string resume; // empty: none; "latest": the newest in checkpoint_dir; else a path
  std::string init;   // safetensors file of full weights
  // What was adjusted rather than refused (e.g. --warmup above --steps), for rank 0 to print.
  std::vector<std::string> notices;
};

// Data, optimization, layout, reporting and checkpoint flags with train_gpt's defaults
// (docs/gpt.md).
void add_training_flags(cxxopts::Options& options);
// Parses and cross-checks them (no file system, no communication: the same verdict on every
// rank). Throws UsageError.
TrainingFlags read_training_flags(const ParsedFlags& flags);
// Checks the flags against the file system: --init exists, --resume-from names a complete
// checkpoint, the token files exist (and are files), the checkpoint and trace directories can
// be made (by rank 0), the metrics files' folders exist.
// `hint`: how to make the default data (appended to a missing-file message).
void check_training_paths(const TrainingFlags& flags, bool rank0, const std::string& hint);
// The line --precision bf16 prints on a CPU without native bf16 (CpuInfo::native_bf16), saying
// it will be slower than fp32 there and why; "" on one with it.
std::string bf16_notice(const CpuInfo& cpu);
// The Trainer's options and the optimizer's update rule (AdamW, betas 0.9 / 0.95).
TrainerOptions trainer_options(const TrainingFlags& flags, int64_t seq_len);
ZeroOptions optimizer_options(const TrainingFlags& flags);
// Every field that shapes the collectives or the run, as (flag, value) for the start-up
// agreement (launch/startup_check.h); not the rank-0-only reporting files or the threads.
std::vector<std::pair<std::string, std::string>> training_fields(const TrainingFlags& flags);

} // namespace meshtrain::cli
