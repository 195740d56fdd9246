// defines: TrainerOptions, LossFunction, StepStats, StopReason, CheckpointEvent,
// CheckpointHook, FitResult, Trainer — the training loop of a token language model on a
// dp x tp mesh: micro-batches from the DESIGN §3 data order, gradient accumulation, the
// data-parallel reducer, ZeRO-sharded AdamW with clipping and the warmup-cosine schedule,
// validation, rank-0 progress, JSON Lines metrics (DESIGN §5), a wall-clock budget, and the
// point where a checkpoint manager is called.
//
// Parallelism is applied in DESIGN §1's order: the caller builds the model with its TP
// layout (and recompute), the Trainer wraps it with a DataParallelReducer over the mesh's
// "dp" group and a ZeroOptimizer that shards optimizer state over it.
//
// One optimizer step s (0-based) with global batch B, micro-batch b per DP rank, D DP ranks
// and M = B / (D b) micro-steps:
//   reducer.zero_grad()
//   for m < M:  (no_sync for m < M-1: accumulate locally, communicate once)
//     global_mean_loss(loss_fn(micro-batch m), B*T).backward()
//   grads = reducer.finish()                   // SUM over dp of the accumulated gradients
//   norm = optimizer.clip_grad_norm(grads, grad_clip)
//   optimizer.set_lr(schedule.lr(s)); optimizer.step(grads)
// loss_fn returns the SUM of the token cross-entropies of its micro-batch; dividing every
// micro-batch by the step's global token count B*T makes the summed gradient that of the
// mean token loss over the whole global batch (DESIGN §3 "Loss"), whatever D, M and b are.
// The reported loss is the same quantity: the sum over micro-steps and DP ranks (one
// all-reduce over dp per step).
//
// Validation: the first val_batches global batches of the validation file in DESIGN §3
// order (step k takes samples k*B .. k*B+B-1, each DP rank its micro-batches, wrapping around
// a short file), model.eval() and no grad; the mean token loss over all of them.
//
// Collectives: every rank of the mesh must call train_step / validate / fit together.
#pragma once

#include "core/mesh.h"
#include "core/token_file.h"
#include "launch/token_loader.h"
#include "optim/grad_scaler.h"
#include "optim/lr_schedule.h"
#include "optim/zero.h"
#include "parallel/data_parallel.h"

#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace meshtrain {

// How rank 0 shows progress. kRedraw: one line redrawn in place every step (\r), for a
// terminal. kLines: a line every log_every steps, for logs. kAuto: MESHTRAIN_PROGRESS
// ("redraw" or "lines") when set, else kRedraw when stdout is a terminal — except under
// OpenMPI's mpirun, which gives every rank a pseudo-terminal even when its own output goes to
// a file, so there kLines (a launcher that knows better exports MESHTRAIN_PROGRESS=redraw).
enum class ProgressStyle { kAuto, kRedraw, kLines, kOff };

enum class NanPolicy { kStop, kSkip };
// "stop" or "skip"; throws naming the value otherwise.
NanPolicy parse_nan_policy(const std::string& text);

struct TrainerOptions {
  // Optimizer steps of the run; also where the cosine reaches min_lr.
  TORCH_ARG(int64_t, steps) = 1000;
  TORCH_ARG(int64_t, global_batch) = 32; // B, sequences per step over all DP ranks
  TORCH_ARG(int64_t, micro_batch) = 16;  // b, sequences per forward on one DP rank
  TORCH_ARG(int64_t, seq_len) = 128;     // T
  // Seeded per-epoch permutation of the training samples (DESIGN §3 --shuffle).
  TORCH_ARG(bool, shuffle) = false;
  TORCH_ARG(uint64_t, data_seed) = 1337;

  // AdamW (DESIGN §3) and its schedule: linear warmup to lr, cosine to min_lr at `steps`.
  TORCH_ARG(double, lr) = 1e-3;
  TORCH_ARG(double, min_lr) = 1e-4;
  TORCH_ARG(int64_t, warmup_steps) = 50;
  TORCH_ARG(double, weight_decay) = 0.1;
  TORCH_ARG(double, beta1) = 0.9;
  TORCH_ARG(double, beta2) = 0.95;
  // Clip the global gradient norm to this; <= 0 only measures it.
  TORCH_ARG(double, grad_clip) = 1.0;
  // ZeRO stage 0 (replicated state), 1 (optimizer state sharded over dp), 2 (+ gradients).
  TORCH_ARG(int, zero_stage) = 0;
  TORCH_ARG(int64_t, bucket_bytes) = int64_t{25} * 1024 * 1024;
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

  // Rank-0 progress on stdout (see ProgressStyle); one line every log_every steps (and the
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

// The SUM of the token cross-entropies of one micro-batch ([] tensor, differentiable), over
// its b*T targets, identical on the ranks of a TP group.
using LossFunction = std::function<torch::Tensor(const MicroBatch&)>;

struct StepStats {
  int64_t step = 0;        // optimizer steps done after this one (1-based)
  double loss = 0;         // mean token loss over the global batch
  double lr = 0;           // learning rate the step used
  double grad_norm = 0;    // global gradient norm before clipping
  double step_ms = 0;      // wall time of the step
  double tokens_per_s = 0; // B*T / step time
  // Where the step's wall time went on this rank. The three compute phases exclude the
  // communication they waited on; comm_ms is all exposed communication of the step (the
  // training thread blocked in a collective: bucket waits, ZeRO gathers, the loss and norm
  // reductions; core/trace.h). The rest (data, bookkeeping) is step_ms minus the four.
  double forward_ms = 0;   // forward passes of all micro-steps, loss included
  double backward_ms = 0;  // backward passes (the reducer's hooks issue their buckets here)
  double optimizer_ms = 0; // unscale, clipping, the optimizer step
  double comm_ms = 0;      // exposed communication
  // With the mesh's counting log enabled (core/comm_log.h; train_gpt --count-comm): bytes of
  // the step's collectives on this rank by "<group> <kind>" (e.g. "dp all_reduce"), counted
  // as nccl-tests does. Empty otherwise.
  std::map<std::string, int64_t> comm_bytes;
  int64_t mem_peak_bytes = 0; // peak resident memory of this process so far
  // With memory/alloc_tracker.h's allocator installed (else 0): peak bytes of live CPU
  // tensors during the step; the bytes live at its start, before forward (parameters,
  // gradient buffers, optimizer state, the step's batches); and how far forward + backward
  // rose above that (activations, activation gradients, temporaries). The memory planner's
  // state and activation_peak (memory/planner.h) estimate the last two.
  int64_t tensor_peak_bytes = 0;
  int64_t state_bytes = 0;
  int64_t activation_peak_bytes = 0;
  // With loss scaling: the scale this step used, and whether its update was skipped (an inf
  // or NaN gradient on some rank; parameters and optimizer state unchanged).
  double loss_scale = 0;
  bool skipped = false;
  bool non_finite = false; // the gradient norm was inf or NaN (the update was not applied)
};

// kNonFinite: a non-finite gradient norm under NanPolicy::kStop.
enum class StopReason { kCompleted, kTimeBudget, kSignal, kNonFinite };
const char* to_string(StopReason reason);

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
  // Wraps `model` (already laid out for the mesh's tp group) with the reducer and the
  // optimizer; collective over the mesh (parameter broadcast over dp, metrics-file check).
  // `val` may be null (no validation). Throws naming the values when B is not divisible by
  // b x dp or an option is out of range.
  Trainer(std::shared_ptr<torch::nn::Module> model, LossFunction loss_fn, const Mesh& mesh,
          std::shared_ptr<const TokenFile> train, std::shared_ptr<const TokenFile> val,
          TrainerOptions options);
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
  // Prints one line on rank 0 (below an open progress line) unless progress is off.
  void log(const std::string& line);

  int64_t accumulation_steps() const { return loader_->accumulation_steps(); }
  int64_t tokens_per_step() const { return options_.global_batch() * options_.seq_len(); }
  const TrainerOptions& options() const { return options_; }
  const TokenFile& train_data() const { return loader_->file(); }
  const Mesh& mesh() const { return mesh_; }
  torch::nn::Module& model() { return *model_; }
  DataParallelReducer& reducer() { return *reducer_; }
  ZeroOptimizer& optimizer() { return *optimizer_; }
  // Null without options.loss_scaling.
  GradScaler* scaler() { return scaler_.get(); }
  const WarmupCosineSchedule& schedule() const { return schedule_; }

private:
  // Agreed over the world: {time budget exceeded, signal received}.
  std::pair<bool, bool> agree_on_stop(double elapsed_s, double next_step_s) const;
  void report_step(const StepStats& stats, double eta_s, bool force_line);
  void report_validation(int64_t step, double val_loss, double seconds);
  void write_metrics(const std::string& line);
  void write_prometheus() const;
  void end_progress_line();

  std::shared_ptr<torch::nn::Module> model_;
  LossFunction loss_fn_;
  Mesh mesh_;
  TrainerOptions options_;
  WarmupCosineSchedule schedule_;
  std::unique_ptr<TokenLoader> loader_;
  std::unique_ptr<TokenLoader> val_loader_;
  std::unique_ptr<DataParallelReducer> reducer_;
  std::unique_ptr<ZeroOptimizer> optimizer_;
  std::unique_ptr<GradScaler> scaler_;
  CheckpointHook hook_;
  int64_t step_ = 0;
  bool rank0_ = false;
  bool redraw_ = false;    // rank 0 redraws one progress line
  bool progress_ = false;  // rank 0 prints progress at all
  bool line_open_ = false; // a \r progress line is on the terminal
  std::ofstream metrics_;
  StepStats last_stats_; // for the Prometheus file
  double last_val_loss_ = std::nan("");
  // Progress window (since the last printed line).
  int64_t window_steps_ = 0;
  double window_seconds_ = 0;
  double last_val_seconds_ = 0;
};

} // namespace meshtrain
