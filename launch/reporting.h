// defines: ProgressStyle, StepStats, StopReason, ReporterOptions, Reporter — what rank 0 shows
// and writes about a run: the progress line, JSON Lines metrics (DESIGN §5) and a Prometheus
// text file. The Trainer measures; the Reporter formats and writes. Only rank 0's Reporter
// writes anything; the others keep the flags so every rank agrees on what happened.
#pragma once

#include <cstdint>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace meshtrain {

// How rank 0 shows progress. kRedraw: one line redrawn in place every step (\r), for a
// terminal. kLines: a line every log_every steps, for logs. kAuto: MESHTRAIN_PROGRESS
// ("redraw", "lines" or "off") when set, else kRedraw when stdout is a terminal — except under
// OpenMPI's mpirun, which gives every rank a pseudo-terminal even when its own output goes to
// a file, so there kLines (a launcher that knows better exports MESHTRAIN_PROGRESS=redraw).
enum class ProgressStyle { kAuto, kRedraw, kLines, kOff };
// "auto", "redraw", "lines" or "off"; throws std::invalid_argument naming the value otherwise.
ProgressStyle parse_progress_style(const std::string& text);

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
  // Under pipeline parallelism, with the tracker (else empty): the same three figures of every
  // rank of this rank's pp group, in pp rank order (the stages hold different blocks and
  // micro-batches; the memory planner estimates each, memory/planner.h).
  std::vector<int64_t> stage_tensor_peak_bytes;
  std::vector<int64_t> stage_state_bytes;
  std::vector<int64_t> stage_activation_peak_bytes;
  // With loss scaling: the scale this step used (0 without), and whether its update was
  // skipped (an inf or NaN gradient on some rank; parameters and optimizer state unchanged).
  double loss_scale = 0;
  bool skipped = false;
  bool non_finite = false; // the gradient norm was inf or NaN (the update was not applied)
};

// kNonFinite: a non-finite gradient norm under NanPolicy::kStop.
enum class StopReason { kCompleted, kTimeBudget, kSignal, kNonFinite };
const char* to_string(StopReason reason);

struct ReporterOptions {
  ProgressStyle progress = ProgressStyle::kAuto;
  int64_t log_every = 10; // a progress line every N steps in the kLines style
  // JSON Lines metrics file (empty: none), truncated at construction.
  std::string metrics_path;
  // Prometheus text-format file (empty: none), replaced atomically every log_every steps,
  // after each validation and at the end.
  std::string prometheus_path;
  int64_t total_steps = 0;     // for "step s/N"
  int64_t tokens_per_step = 0; // B*T
  int64_t val_batches = 0;     // shown with each validation
  bool loss_scaling = false;   // every metrics line gets loss_scale and skipped
};

class Reporter {
public:
  // Only `rank0` writes; it opens the metrics file now (metrics_open_failed() says whether
  // that worked, so the caller can make every rank agree before training).
  Reporter(ReporterOptions options, bool rank0);

  bool metrics_open_failed() const { return metrics_open_failed_; }

  // A finished step: a metrics line, the Prometheus file when due, the progress line.
  void step(const StepStats& stats, double eta_s, bool force_line);
  void validation(int64_t step, double val_loss, double seconds);
  // One line below an open progress line (unless progress is off).
  void log(const std::string& line);
  // "done: N steps (reason) in T, val_loss V" (val_loss NaN: none).
  void done(int64_t steps, StopReason reason, double seconds, double val_loss);
  void end_line();

private:
  void write_metrics(const std::string& line);
  void write_prometheus() const;

  ReporterOptions options_;
  bool rank0_ = false;
  bool progress_ = false;  // rank 0 prints progress at all
  bool redraw_ = false;    // rank 0 redraws one progress line
  bool line_open_ = false; // a \r progress line is on the terminal
  bool metrics_open_failed_ = false;
  std::ofstream metrics_;
  StepStats last_stats_; // for the Prometheus file
  double last_val_loss_ = 0;
  bool have_val_loss_ = false;
  // Progress window (since the last printed line).
  int64_t window_steps_ = 0;
  double window_seconds_ = 0;
};

// "1h02m", "3m05s", "42s" ("?" for a negative or non-finite time).
std::string format_duration(double seconds);

} // namespace meshtrain
