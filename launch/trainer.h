// defines: NanPolicy, parse_nan_policy, TrainerOptions, TrainerHooks, CheckpointEvent,
// CheckpointHook, FitResult, Trainer — the training loop of a token language model on what
// parallelize() built (launch/parallelize.h): micro-batches from the DESIGN §3 data order,
// gradient accumulation through the reducer, the optimizer with clipping and the
// warmup-cosine schedule, validation, a wall-clock budget, and the point where a checkpoint
// manager is called. Progress, metrics and the Prometheus file are launch/reporting.h's.
//
// One optimizer step s (0-based) with global batch B, micro-batch b per DP rank, D DP ranks
// and M = B / (D b) micro-steps (all from the plan):
//   reducer.zero_grad()
//   for m < M:  (no_sync for m < M-1: accumulate locally, communicate once)
//     global_mean_loss(loss(micro-batch m), B*T).backward()
//   grads = reducer.finish()                   // SUM over dp of the accumulated gradients
//   norm = optimizer.clip_grad_norm(grads, grad_clip)
//   optimizer.set_lr(schedule.lr(s)); optimizer.step(grads)
// The loss returns the SUM of the token cross-entropies of its micro-batch; dividing every
// micro-batch by the step's global token count B*T makes the summed gradient that of the
// mean token loss over the whole global batch (DESIGN §3 "Loss"), whatever D, M and b are.
// ZeRO-3 (parallel/parameter_shards.h) synchronises every micro-step instead (no no_sync:
// backward + finish() each time, the reduce-scatters adding into the gradient shards).
// Pipeline parallelism (pp > 1, parallel/pipeline_stage.h) runs the M micro-batches through
// the schedule inside one no_sync scope instead of the loop, sums the first and last stage's
// shared gradients, then finish(); the loss is the last stage's, summed over pp too.
// The reported loss is the same quantity: the sum over micro-steps and DP ranks (one
// all-reduce over dp per step). Under context parallelism (cp > 1) the cp ranks of a group
// take the same sequences, loss() sums each rank's chunks of them (launch/parallelize.h),
// and the gradients and the loss are summed over the dp x cp ranks ("dp_cp").
//
// Validation: the first val_batches global batches of the validation file in DESIGN §3
// order (step k takes samples k*B .. k*B+B-1, each DP rank its micro-batches, wrapping around
// a short file), model.eval() and no grad; the mean token loss over all of them.
//
// Collectives: every rank of the mesh must call train_step / validate / fit together.
#pragma once

#include "meshtrain/core/mesh.h"
#include "meshtrain/core/token_file.h"
#include "meshtrain/launch/parallelize.h"
#include "meshtrain/launch/reporting.h"
#include "meshtrain/launch/token_loader.h"
#include "meshtrain/optim/grad_scaler.h"
#include "meshtrain/optim/lr_schedule.h"

#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace meshtrain {

enum class NanPolicy { kStop, kSkip };
// "stop" or "skip"; throws naming the value otherwise.
NanPolicy parse_nan_policy(const std::string& text);

struct TrainerOptions {
  // Optimizer steps of the run; also where the cosine reaches min_lr.
  TORCH_ARG(int64_t, steps) = 1000;
  TORCH_ARG(int64_t, seq_len) = 128; // T
  // Seeded per-epoch permutation of the training samples (DESIGN §3 --shuffle).
  TORCH_ARG(bool, shuffle) = false;
  TORCH_ARG(uint64_t, data_seed) = 1337;

  // The schedule of the optimizer's learning rate: linear warmup to lr, cosine to min_lr at
  // `steps` (the update rule itself is parallelize's, ParallelizeOptions::optimizer).
  TORCH_ARG(double, lr) = 1e-3;
  TORCH_ARG(double, min_lr) = 1e-4;
  TORCH_ARG(int64_t, warmup_steps) = 50;
  // Clip the global gradient norm to this; <= 0 only measures it.
  TORCH_ARG(double, grad_clip) = 1.0;
  // Dynamic loss scaling (optim/grad_scaler.h; what fp16 training needs): the loss is scaled
  // before backward, a step with an inf/NaN gradient on any rank is skipped by all ranks.
  TORCH_ARG(bool, loss_scaling) = false;
  TORCH_ARG(GradScalerOptions, scaler);
  // A step whose global gradient norm is inf or NaN (without loss scaling): kStop ends fit()
  // before the update (StopReason::kNonFinite; parameters and optimizer state are the last
  // good step's), kSkip drops the update and goes on. The norm is global, so every rank
  // decides the same.
  TORCH_ARG(NanPolicy, nan_policy) = NanPolicy::kStop;

  // Validation every val_every steps (0: only at the end of fit), over val_batches global
  // batches of the validation file. val_batches 0 (or no validation file): no validation.
  TORCH_ARG(int64_t, val_every) = 100;
  TORCH_ARG(int64_t, val_batches) = 20;

  // Rank-0 progress on stdout (launch/reporting.h); one line every log_every steps (and the
  // first and last) in the kLines style.
  TORCH_ARG(ProgressStyle, progress) = ProgressStyle::kAuto;
  TORCH_ARG(int64_t, log_every) = 10;
  // JSON Lines metrics file written by rank 0 (empty: none), truncated at construction.
  TORCH_ARG(std::string, metrics_path) = "";
  // Prometheus text-format file written by rank 0 (empty: none), replaced atomically every
  // log_every steps, after each validation and at the end (for node_exporter's textfile
  // collector, or any scraper that reads a file).
  TORCH_ARG(std::string, prometheus_path) = "";
  // Wall-clock budget of fit() in seconds (0: none): fit() stops before a step that, with
  // the final validation, would end past it. Every rank takes the same decision.
  TORCH_ARG(double, max_time) = 0;
  // fit() turns SIGTERM/SIGINT into a clean stop after the current step (agreed by all ranks;
  // the checkpoint hook then sees kSignal). A second signal acts as usual (kills).
  TORCH_ARG(bool, handle_signals) = false;
};

// Hooks around a step, for tests and tooling (launch/fault_injection.h installs them); unset
// ones cost nothing.
struct TrainerHooks {
  // At the start of step `step` (1-based, the number the progress line will show).
  std::function<void(int64_t step)> at_step_start;
  // May replace a micro-step's loss share before backward.
  std::function<torch::Tensor(int64_t step, const torch::Tensor& loss)> on_loss;
};

// When the checkpoint hook is called: after every optimizer step (the hook decides whether
// this step is one to save, e.g. step % save_every == 0), once at the end of fit(), or once
// when fit() stops on a signal (instead of kEnd).
enum class CheckpointEvent { kStep, kEnd, kSignal };

class Trainer;
// Called on every rank (it may run collectives); trainer.step() is the steps done.
using CheckpointHook = std::function<void(Trainer& trainer, CheckpointEvent event)>;

struct FitResult {
  int64_t steps = 0; // optimizer steps done (trainer.step() at the end)
  StopReason reason = StopReason::kCompleted;
  double seconds = 0;
  std::vector<StepStats> history;                     // the steps this fit() ran
  std::vector<std::pair<int64_t, double>> val_losses; // (step, val_loss)
};

class Trainer {
public:
  // Trains what parallelize() built. Collective over the mesh (the metrics-file check).
  // `val` may be null (no validation). Throws naming the value when an option is out of
  // range or the token files are too short.
  Trainer(Parallelized parallel, std::shared_ptr<const TokenFile> train,
          std::shared_ptr<const TokenFile> val, TrainerOptions options);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  // One optimizer step (step() -> step() + 1). Collective.
  StepStats train_step();
  // Mean token loss over the validation batches. Collective; NaN without validation data.
  double validate();
  // Steps from step() to options.steps with validation, progress, metrics, budget, hooks.
  FitResult fit();

  // Optimizer steps done so far; the next step trains on global step step().
  int64_t step() const { return step_; }
  // Continue from `step` (after a checkpoint manager restored model and optimizer state):
  // the data and the schedule resume there.
  void set_step(int64_t step);
  void set_checkpoint_hook(CheckpointHook hook) { hook_ = std::move(hook); }
  void set_hooks(TrainerHooks hooks) { hooks_ = std::move(hooks); }
  // Prints one line on rank 0 (below an open progress line) unless progress is off.
  void log(const std::string& line);

  int64_t accumulation_steps() const { return loader_->accumulation_steps(); }
  int64_t tokens_per_step() const { return parallel_.plan.global_batch * options_.seq_len(); }
  const TrainerOptions& options() const { return options_; }
  // The validated layout (batch split, ZeRO stage, ...).
  const ParallelPlan& plan() const { return parallel_.plan; }
  const TokenFile& train_data() const { return loader_->file(); }
  const Mesh& mesh() const { return parallel_.mesh; }
  // What parallelize applied (the model, its pipeline stage, ...).
  const Parallelized& parallel() const { return parallel_; }
  ParallelModel& model() { return *parallel_.model; }
  DataParallelReducer& reducer() { return *parallel_.reducer; }
  ZeroOptimizer& optimizer() { return *parallel_.optimizer; }
  // ZeRO-3's parameter shards; null at stages 0-2.
  ParameterShards* shards() { return parallel_.shards.get(); }
  // Null without options.loss_scaling.
  GradScaler* scaler() { return scaler_.get(); }
  const WarmupCosineSchedule& schedule() const { return schedule_; }

private:
  // Agreed over the world: {time budget exceeded, signal received}.
  std::pair<bool, bool> agree_on_stop(double elapsed_s, double next_step_s) const;

  Parallelized parallel_;
  TrainerOptions options_;
  WarmupCosineSchedule schedule_;
  std::unique_ptr<TokenLoader> loader_;
  std::unique_ptr<TokenLoader> val_loader_;
  std::unique_ptr<GradScaler> scaler_;
  Reporter reporter_;
  CheckpointHook hook_;
  TrainerHooks hooks_;
  int64_t step_ = 0;
  double last_val_seconds_ = 0;
};

} // namespace meshtrain
