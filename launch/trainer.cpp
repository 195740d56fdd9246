// defines: Trainer, to_string(StopReason) (see trainer.h).
#include "launch/trainer.h"

#include "core/errors.h"
#include "core/file_io.h"
#include "core/trace.h"
#include "launch/fault_injection.h"
#include "memory/alloc_tracker.h"

#include <nlohmann/json.hpp>

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <sstream>

namespace meshtrain {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Wall time of one phase of a step (summed over its micro-steps) and the blocked
// communication inside it; time() returns a scope that also records the phase in the trace.
class PhaseClock {
public:
  class Scope {
  public:
    Scope(PhaseClock& clock, const char* name)
        : clock_(clock), span_(name, "compute"), begin_(Clock::now()),
          blocked_begin_(comm_blocked_ns()) {}
    ~Scope() {
      clock_.wall_ns_ +=
          std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - begin_).count();
      clock_.blocked_ns_ += comm_blocked_ns() - blocked_begin_;
    }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

  private:
    PhaseClock& clock_;
    const TraceSpan span_;
    const Clock::time_point begin_;
    const int64_t blocked_begin_;
  };

  Scope time(const char* name) { return Scope(*this, name); }
  double compute_ms() const { return static_cast<double>(wall_ns_ - blocked_ns_) / 1e6; }

private:
  int64_t wall_ns_ = 0;
  int64_t blocked_ns_ = 0;
};

// Peak resident set size of this process in bytes. getrusage's ru_maxrss (KiB on Linux)
// counts every allocation, torch's and ours; a memory tracker of the memory/ layer (allocator
// statistics, per-device peaks on CUDA) will replace it.
int64_t peak_rss_bytes() {
  struct rusage usage {};
  if (getrusage(RUSAGE_SELF, &usage) != 0) {
    return 0;
  }
  return static_cast<int64_t>(usage.ru_maxrss) * 1024;
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) {
    return "?";
  }
  const auto s = static_cast<int64_t>(seconds + 0.5);
  char buf[32];
  if (s >= 3600) {
    std::snprintf(buf, sizeof(buf), "%lldh%02lldm", static_cast<long long>(s / 3600),
                  static_cast<long long>(s / 60 % 60));
  } else if (s >= 60) {
    std::snprintf(buf, sizeof(buf), "%lldm%02llds", static_cast<long long>(s / 60),
                  static_cast<long long>(s % 60));
  } else {
    std::snprintf(buf, sizeof(buf), "%llds", static_cast<long long>(s));
  }
  return buf;
}

// Set by the SIGTERM/SIGINT handler of fit(); only a lock-free atomic store happens there.
std::atomic<int> g_stop_signal{0};
static_assert(std::atomic<int>::is_always_lock_free, "the signal flag must be lock-free");

extern "C" void on_stop_signal(int signal) {
  g_stop_signal.store(signal);
}

// Installs the stop handler for SIGTERM and SIGINT while alive. SA_RESETHAND: a second
// signal gets the default action (a user pressing Ctrl-C twice really stops the job).
class StopSignalScope {
public:
  explicit StopSignalScope(bool enabled) : enabled_(enabled) {
    if (!enabled_) {
      return;
    }
    g_stop_signal.store(0);
    struct sigaction action {};
    action.sa_handler = on_stop_signal;
    sigemptyset(&action.sa_mask);
    // SA_RESTART: system calls of MPI and file I/O resume instead of failing with EINTR.
    action.sa_flags = SA_RESETHAND | SA_RESTART;
    sigaction(SIGTERM, &action, &old_term_);
    sigaction(SIGINT, &action, &old_int_);
  }
  ~StopSignalScope() {
    if (enabled_) {
      sigaction(SIGTERM, &old_term_, nullptr);
      sigaction(SIGINT, &old_int_, nullptr);
    }
  }
  StopSignalScope(const StopSignalScope&) = delete;
  StopSignalScope& operator=(const StopSignalScope&) = delete;

private:
  bool enabled_;
  struct sigaction old_term_ {};
  struct sigaction old_int_ {};
};

ProgressStyle resolve_progress(ProgressStyle style) {
  if (style != ProgressStyle::kAuto) {
    return style;
  }
  if (const char* env = std::getenv("MESHTRAIN_PROGRESS")) {
    const std::string value = env;
    if (value == "redraw") {
      return ProgressStyle::kRedraw;
    }
    if (value == "lines") {
      return ProgressStyle::kLines;
    }
    if (value == "off") {
      return ProgressStyle::kOff;
    }
  }
  // OpenMPI's ranks write to a pseudo-terminal whatever mpirun's stdout is: isatty says
  // nothing there.
  if (std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr) {
    return ProgressStyle::kLines;
  }
  return isatty(STDOUT_FILENO) == 1 ? ProgressStyle::kRedraw : ProgressStyle::kLines;
}

} // namespace

const char* to_string(StopReason reason) {
  switch (reason) {
  case StopReason::kCompleted:
    return "completed";
  case StopReason::kTimeBudget:
    return "time budget";
  case StopReason::kSignal:
    return "signal";
  case StopReason::kNonFinite:
    return "non-finite gradient norm";
  }
  return "?";
}

NanPolicy parse_nan_policy(const std::string& text) {
  if (text == "skip") {
    return NanPolicy::kSkip;
  }
  MT_CHECK(text == "stop", "nan policy '", text, "': must be stop or skip");
  return NanPolicy::kStop;
}

Trainer::Trainer(std::shared_ptr<torch::nn::Module> model, LossFunction loss_fn, const Mesh& mesh,
                 std::shared_ptr<const TokenFile> train, std::shared_ptr<const TokenFile> val,
                 TrainerOptions options)
    : model_(std::move(model)), loss_fn_(std::move(loss_fn)), mesh_(mesh),
      options_(std::move(options)),
      schedule_(WarmupCosineOptions(options_.lr())
                    .min_lr(options_.min_lr())
                    .warmup_steps(options_.warmup_steps())
                    .total_steps(std::max<int64_t>(options_.steps(), 1))) {
  const auto& o = options_;
  MT_CHECK(model_ != nullptr, "Trainer: the model is null");
  MT_CHECK(loss_fn_ != nullptr, "Trainer: the loss function is empty");
  MT_CHECK(train != nullptr, "Trainer: the training token file is null");
  MT_CHECK(o.steps() >= 0, "Trainer: steps (", o.steps(), ") must be >= 0");
  MT_CHECK(o.seq_len() >= 1, "Trainer: sequence length (", o.seq_len(), ") must be >= 1");
  MT_CHECK(o.micro_batch() >= 1, "Trainer: micro-batch size (", o.micro_batch(), ") must be >= 1");
  const int64_t dp = mesh_.group("dp")->size();
  MT_CHECK(o.global_batch() >= 1 && o.global_batch() % (o.micro_batch() * dp) == 0,
           "Trainer: the global batch (", o.global_batch(),
           " sequences) must be a positive multiple of micro-batch (", o.micro_batch(), ") x dp (",
           dp, ") = ", o.micro_batch() * dp, " so that every DP rank runs the same number of ",
           "micro-steps; e.g. ",
           std::max<int64_t>(1, o.global_batch() / (o.micro_batch() * dp)) * o.micro_batch() * dp);
  MT_CHECK(o.zero_stage() >= 0 && o.zero_stage() <= 2, "Trainer: ZeRO stage (", o.zero_stage(),
           ") must be 0, 1 or 2");
  MT_CHECK(o.val_every() >= 0 && o.val_batches() >= 0, "Trainer: val_every (", o.val_every(),
           ") and val_batches (", o.val_batches(), ") must be >= 0");
  MT_CHECK(o.log_every() >= 0, "Trainer: log_every (", o.log_every(), ") must be >= 0");
  MT_CHECK(o.max_time() >= 0 && std::isfinite(o.max_time()), "Trainer: max_time (", o.max_time(),
           ") must be a finite number of seconds >= 0");
  MT_CHECK(std::isfinite(o.grad_clip()), "Trainer: grad_clip (", o.grad_clip(), ") must be finite");

  TokenLoaderOptions lo;
  lo.seq_len = o.seq_len();
  lo.global_batch = o.global_batch();
  lo.micro_batch = o.micro_batch();
  lo.dp_rank = mesh_.group("dp")->rank();
  lo.dp_size = static_cast<int>(dp);
  lo.shuffle = o.shuffle();
  lo.seed = o.data_seed();
  loader_ = std::make_unique<TokenLoader>(std::move(train), lo);
  if (val != nullptr && o.val_batches() > 0) {
    TokenLoaderOptions vo = lo;
    vo.shuffle = false;
    vo.prefetch = false; // read with step_batches(), pure
    val_loader_ = std::make_unique<TokenLoader>(std::move(val), vo);
  }

  // DESIGN §1 order: the TP-laid-out model, then the DP reducer, then optimizer sharding.
  reducer_ = std::make_unique<DataParallelReducer>(
      *model_, mesh_,
      DataParallelOptions().bucket_bytes(o.bucket_bytes()).shard_gradients(o.zero_stage() == 2));
  optimizer_ = std::make_unique<ZeroOptimizer>(
      *model_, mesh_,
      ZeroOptions(o.zero_stage())
          .adamw(AdamWOptions(o.lr()).beta1(o.beta1()).beta2(o.beta2()).weight_decay(
              o.weight_decay())),
      reducer_->bucket_names());
  if (o.loss_scaling()) {
    scaler_ = std::make_unique<GradScaler>(o.scaler(), mesh_.group("world"));
  }

  rank0_ = mesh_.rank() == 0;
  const ProgressStyle style = resolve_progress(o.progress());
  progress_ = rank0_ && style != ProgressStyle::kOff;
  redraw_ = progress_ && style == ProgressStyle::kRedraw;
  // Only rank 0 opens the metrics file, but every rank must learn whether that worked:
  // throwing on rank 0 alone would leave the others waiting in their first collective.
  int open_failed = 0;
  if (rank0_ && !o.metrics_path().empty()) {
    metrics_.open(o.metrics_path(), std::ios::out | std::ios::trunc);
    open_failed = metrics_.is_open() ? 0 : 1;
  }
  auto flag = torch::tensor({open_failed}, torch::kInt);
  mesh_.group("world")->all_reduce(flag, ReduceOp::kMax);
  MT_CHECK(flag.item<int>() == 0, "Trainer: cannot open the metrics file '", o.metrics_path(),
           "' for writing");
}

Trainer::~Trainer() = default;

void Trainer::set_step(int64_t step) {
  MT_CHECK(step >= 0, "Trainer::set_step: step (", step, ") must be >= 0");
  step_ = step;
  loader_->seek(step);
}

StepStats Trainer::train_step() {
  const TraceSpan step_span("step", "step");
  const auto start = Clock::now();
  const auto& o = options_;
  const int64_t s = step_;
  inject_step_start_faults(s + 1, mesh_.rank()); // test-only (launch/fault_injection.h)
  const bool inject_nan = fault_due(FaultKind::kNan, s + 1, mesh_.rank());
  model_->train();
  if (loader_->next_step() != s) {
    loader_->seek(s);
  }
  const auto batches = loader_->next();               // M micro-batches of b sequences
  const auto& comm_log = mesh_.group("world")->log(); // shared by every group of the mesh
  const bool count_comm = comm_log && comm_log->enabled();
  if (count_comm) {
    comm_log->clear(); // what ran between steps (validation, the stop agreement) is not counted
  }
  const int64_t global_tokens = tokens_per_step();

  reducer_->zero_grad();
  // With the counting allocator installed: peak tensor bytes of forward + backward above
  // what lived before them (activations, their gradients, temporaries).
  auto* tracker = AllocationTracker::get();
  const int64_t bytes_before = tracker != nullptr ? tracker->current_bytes() : 0;
  if (tracker != nullptr) {
    tracker->reset_peaks();
  }
  // Phase clocks: wall time of each phase and the blocked-communication time inside it, so
  // that the compute phases can be reported without the communication they waited on.
  PhaseClock forward_clock;
  PhaseClock backward_clock;
  PhaseClock optimizer_clock;
  const int64_t blocked_before = comm_blocked_ns();
  auto loss = torch::zeros({}, torch::kDouble); // this rank's share of the global mean
  const auto m_count = static_cast<int64_t>(batches.size());
  for (int64_t m = 0; m < m_count; ++m) {
    std::optional<NoSyncGuard> guard;
    if (m + 1 < m_count) {
      guard.emplace(reducer_->no_sync()); // accumulate locally; the last micro-step reduces
    }
    torch::Tensor share;
    {
      const auto timed = forward_clock.time("forward");
      share = global_mean_loss(loss_fn_(batches[m]), global_tokens);
    }
    if (inject_nan) {
      share = share * std::numeric_limits<double>::quiet_NaN();
    }
    {
      const auto timed = backward_clock.time("backward");
      if (scaler_) {
        (share * scaler_->scale()).backward();
      } else {
        share.backward();
      }
    }
    loss += share.detach().to(torch::kDouble);
  }
  std::vector<torch::Tensor> grads;
  {
    const TraceSpan span("reduce gradients", "step");
    grads = reducer_->finish();
  }
  const int64_t activation_peak = tracker != nullptr ? tracker->peak_bytes() - bytes_before : 0;
  const double scale = scaler_ ? scaler_->scale() : 0;
  const double lr = schedule_.lr(s);
  double norm = std::numeric_limits<double>::quiet_NaN();
  bool skipped = false;
  bool non_finite = false;
  {
    const auto timed = optimizer_clock.time("optimizer");
    // The skip verdict is the same on every rank (all-reduced), so all skip the update together.
    skipped = scaler_ && scaler_->unscale_and_check(grads);
    if (!skipped) {
      norm = optimizer_->clip_grad_norm(grads, o.grad_clip());
      // The norm spans every rank's gradients, so this verdict is the same everywhere.
      non_finite = !std::isfinite(norm);
      if (!non_finite) {
        optimizer_->set_lr(lr);
        optimizer_->step(grads);
      }
    }
  }
  // The shares of all micro-steps and DP ranks add up to the global-batch mean.
  mesh_.group("dp")->all_reduce(loss, ReduceOp::kSum);
  ++step_;

  StepStats stats;
  stats.step = step_;
  stats.loss = loss.item<double>();
  stats.lr = lr;
  stats.grad_norm = norm;
  const double seconds = seconds_since(start);
  stats.step_ms = seconds * 1e3;
  stats.tokens_per_s = static_cast<double>(global_tokens) / std::max(seconds, 1e-9);
  stats.forward_ms = forward_clock.compute_ms();
  stats.backward_ms = backward_clock.compute_ms();
  stats.optimizer_ms = optimizer_clock.compute_ms();
  stats.comm_ms = static_cast<double>(comm_blocked_ns() - blocked_before) / 1e6;
  if (count_comm) {
    for (const auto& record : comm_log->records()) {
      stats.comm_bytes[record.group + " " + to_string(record.kind)] += record.bytes;
    }
  }
  stats.mem_peak_bytes = peak_rss_bytes();
  stats.loss_scale = scale;
  stats.skipped = skipped || non_finite;
  stats.non_finite = non_finite;
  if (tracker != nullptr) {
    stats.activation_peak_bytes = activation_peak;
    stats.state_bytes = bytes_before;
    stats.tensor_peak_bytes = tracker->peak_bytes();
  }
  return stats;
}

double Trainer::validate() {
  if (val_loader_ == nullptr) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  torch::NoGradGuard no_grad;
  model_->eval();
  auto totals = torch::zeros({2}, torch::kDouble); // {loss sum, tokens}
  for (int64_t k = 0; k < options_.val_batches(); ++k) {
    for (const auto& mb : val_loader_->step_batches(k)) {
      totals[0] += loss_fn_(mb).to(torch::kDouble);
      totals[1] += static_cast<double>(mb.targets.numel());
    }
  }
  mesh_.group("dp")->all_reduce(totals, ReduceOp::kSum);
  model_->train();
  return totals[0].item<double>() / totals[1].item<double>();
}

std::pair<bool, bool> Trainer::agree_on_stop(double elapsed_s, double next_step_s) const {
  const auto& o = options_;
  const bool over_time =
      o.max_time() > 0 && elapsed_s + next_step_s + last_val_seconds_ > o.max_time();
  const bool signalled = o.handle_signals() && g_stop_signal.load() != 0;
  // Ranks may see different clocks and signals: one that wants to stop stops everybody.
  auto flags = torch::tensor({over_time ? 1 : 0, signalled ? 1 : 0}, torch::kInt);
  mesh_.group("world")->all_reduce(flags, ReduceOp::kMax);
  return {flags[0].item<int>() != 0, flags[1].item<int>() != 0};
}

FitResult Trainer::fit() {
  const auto& o = options_;
  StopSignalScope signals(o.handle_signals());
  const auto start = Clock::now();
  FitResult result;
  const int64_t first = step_;
  double train_seconds = 0; // steps only, for the ETA
  bool validated_last = false;

  auto run_validation = [&]() {
    const auto t0 = Clock::now();
    const double val = validate();
    last_val_seconds_ = seconds_since(t0);
    if (!std::isnan(val)) {
      result.val_losses.emplace_back(step_, val);
      report_validation(step_, val, last_val_seconds_);
    }
  };

  while (step_ < o.steps()) {
    if (step_ > first && (o.max_time() > 0 || o.handle_signals())) {
      // The next step costs about what the last did; the budget also keeps room for the
      // final validation (its cost as last measured).
      const double last_step_s = result.history.back().step_ms / 1e3;
      const auto [over_time, signalled] = agree_on_stop(seconds_since(start), last_step_s);
      if (signalled) {
        result.reason = StopReason::kSignal;
        break;
      }
      if (over_time) {
        result.reason = StopReason::kTimeBudget;
        break;
      }
    }
    const auto stats = train_step();
    train_seconds += stats.step_ms / 1e3;
    result.history.push_back(stats);
    if (stats.non_finite && o.nan_policy() == NanPolicy::kStop) {
      // The update was not applied; the step is undone so a checkpoint or a resume starts
      // from the last good one.
      --step_;
      result.reason = StopReason::kNonFinite;
      report_step(stats, 0, true);
      break;
    }
    const int64_t done = step_ - first;
    const double remaining_s =
        train_seconds / static_cast<double>(done) * static_cast<double>(o.steps() - step_);
    double eta = remaining_s;
    if (o.max_time() > 0) {
      eta = std::min(eta, std::max(0.0, o.max_time() - seconds_since(start)));
    }
    report_step(stats, eta, step_ == o.steps() || done == 1);
    validated_last = false;
    if (hook_) {
      hook_(*this, CheckpointEvent::kStep);
    }
    if (val_loader_ != nullptr && o.val_every() > 0 && step_ % o.val_every() == 0) {
      run_validation();
      validated_last = true;
    }
  }
  // On a signal the job may have seconds left (SLURM, then SIGKILL): leave at once.
  const bool failed = result.reason == StopReason::kNonFinite;
  if (val_loader_ != nullptr && !validated_last && result.reason != StopReason::kSignal &&
      !failed) {
    run_validation();
  }
  end_progress_line();
  if (hook_ && !failed) {
    hook_(*this,
          result.reason == StopReason::kSignal ? CheckpointEvent::kSignal : CheckpointEvent::kEnd);
  }
  result.steps = step_;
  result.seconds = seconds_since(start);
  if (progress_) {
    std::printf("done: %lld steps (%s) in %s", static_cast<long long>(step_),
                to_string(result.reason), format_duration(result.seconds).c_str());
    if (!result.val_losses.empty()) {
      std::printf(", val_loss %.4f", result.val_losses.back().second);
    }
    std::printf("\n");
    std::fflush(stdout);
  }
  return result;
}

void Trainer::report_step(const StepStats& stats, double eta_s, bool force_line) {
  if (!rank0_) {
    return;
  }
  const auto& o = options_;
  if (metrics_.is_open()) {
    nlohmann::json line = {
        {"step", stats.step},
        {"loss", stats.loss},
        {"lr", stats.lr},
        {"grad_norm", stats.grad_norm},
        {"tokens_per_s", stats.tokens_per_s},
        {"step_ms", stats.step_ms},
        {"forward_ms", stats.forward_ms},
        {"backward_ms", stats.backward_ms},
        {"optimizer_ms", stats.optimizer_ms},
        {"comm_ms", stats.comm_ms},
        {"mem_peak_bytes", stats.mem_peak_bytes},
        {"tokens", stats.step * tokens_per_step()},
        // Wall clock (Unix seconds) when the line is written: the time between two lines is
        // everything a step costs, data wait, metrics and stop agreement included.
        {"time", std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch())
                     .count()},
    };
    if (!stats.comm_bytes.empty()) {
      line["comm_bytes"] = stats.comm_bytes;
    }
    if (scaler_) {
      line["loss_scale"] = stats.loss_scale;
    }
    if (scaler_ || stats.skipped) {
      line["skipped"] = stats.skipped;
    }
    if (stats.non_finite) {
      line["non_finite"] = true;
    }
    if (stats.tensor_peak_bytes > 0) {
      line["mem_tensor_peak_bytes"] = stats.tensor_peak_bytes;
      line["mem_state_bytes"] = stats.state_bytes;
      line["mem_activation_peak_bytes"] = stats.activation_peak_bytes;
    }
    write_metrics(line.dump());
  }
  last_stats_ = stats;
  if (!o.prometheus_path().empty() &&
      (force_line || (o.log_every() > 0 && stats.step % o.log_every() == 0))) {
    write_prometheus();
  }
  if (!progress_) {
    return;
  }
  window_steps_ += 1;
  window_seconds_ += stats.step_ms / 1e3;
  const bool due = redraw_ || force_line || (o.log_every() > 0 && stats.step % o.log_every() == 0);
  if (!due) {
    return;
  }
  // Tokens/s over the steps since the last printed line (less noisy than one step).
  const double rate =
      static_cast<double>(window_steps_ * tokens_per_step()) / std::max(window_seconds_, 1e-9);
  // Redrawn lines average over windows of 10 steps, printed lines over their interval.
  if (!redraw_ || window_steps_ >= 10) {
    window_steps_ = 0;
    window_seconds_ = 0;
  }
  char line[256];
  std::snprintf(line, sizeof(line),
                "step %lld/%lld  loss %.4f  lr %.3e  norm %.3f  %.0f tok/s  ETA %s  mem %.0f MiB",
                static_cast<long long>(stats.step), static_cast<long long>(o.steps()), stats.loss,
                stats.lr, stats.grad_norm, rate, format_duration(eta_s).c_str(),
                static_cast<double>(stats.mem_peak_bytes) / (1024.0 * 1024.0));
  std::string text = line;
  if (stats.tensor_peak_bytes > 0) {
    // Live-tensor peak of this step, and of it what forward + backward added.
    std::snprintf(line, sizeof(line), " (tensors %.0f, act %.0f)",
                  static_cast<double>(stats.tensor_peak_bytes) / (1024.0 * 1024.0),
                  static_cast<double>(stats.activation_peak_bytes) / (1024.0 * 1024.0));
    text += line;
  }
  if (redraw_) {
    // \r and clear to the end of the line: the line is redrawn in place.
    std::printf("\r%s\033[K", text.c_str());
    line_open_ = true;
  } else {
    std::printf("%s\n", text.c_str());
  }
  std::fflush(stdout);
}

void Trainer::report_validation(int64_t step, double val_loss, double seconds) {
  if (!rank0_) {
    return;
  }
  if (metrics_.is_open()) {
    write_metrics(nlohmann::json{{"step", step}, {"val_loss", val_loss}}.dump());
  }
  last_val_loss_ = val_loss;
  if (!options_.prometheus_path().empty()) {
    write_prometheus();
  }
  if (progress_) {
    end_progress_line();
    std::printf("step %lld/%lld  val_loss %.4f  (%lld batches, %.1fs)\n",
                static_cast<long long>(step), static_cast<long long>(options_.steps()), val_loss,
                static_cast<long long>(options_.val_batches()), seconds);
    std::fflush(stdout);
  }
}

void Trainer::write_metrics(const std::string& line) {
  // One write of a whole line, then flush: a reader never sees half an object.
  metrics_ << line + "\n" << std::flush;
  MT_CHECK(metrics_.good(), "Trainer: writing the metrics file '", options_.metrics_path(),
           "' failed");
}

void Trainer::write_prometheus() const {
  std::ostringstream out;
  out.precision(17);
  const auto metric = [&](const char* name, const char* type, const char* help, double value) {
    out << "# HELP " << name << " " << help << "\n# TYPE " << name << " " << type << "\n"
        << name << " " << value << "\n";
  };
  const auto& s = last_stats_;
  metric("meshtrain_step", "gauge", "Optimizer steps done.", static_cast<double>(s.step));
  metric("meshtrain_steps_total", "gauge", "Optimizer steps of the run.",
         static_cast<double>(options_.steps()));
  metric("meshtrain_tokens_total", "counter", "Training tokens consumed.",
         static_cast<double>(s.step * tokens_per_step()));
  metric("meshtrain_loss", "gauge", "Mean token loss of the last step's global batch (nats).",
         s.loss);
  if (!std::isnan(last_val_loss_)) {
    metric("meshtrain_val_loss", "gauge", "Mean token loss of the last validation (nats).",
           last_val_loss_);
  }
  metric("meshtrain_learning_rate", "gauge", "Learning rate of the last step.", s.lr);
  metric("meshtrain_grad_norm", "gauge", "Global gradient norm before clipping.", s.grad_norm);
  metric("meshtrain_tokens_per_second", "gauge", "Global-batch tokens per second of the last step.",
         s.tokens_per_s);
  metric("meshtrain_step_seconds", "gauge", "Wall time of the last step.", s.step_ms / 1e3);
  metric("meshtrain_peak_memory_bytes", "gauge", "Peak resident memory of rank 0.",
         static_cast<double>(s.mem_peak_bytes));
  write_file_atomic(options_.prometheus_path(), out.str());
}

void Trainer::log(const std::string& line) {
  if (progress_) {
    end_progress_line();
    std::printf("%s\n", line.c_str());
    std::fflush(stdout);
  }
}

void Trainer::end_progress_line() {
  if (line_open_) {
    std::printf("\n");
    std::fflush(stdout);
    line_open_ = false;
  }
}

} // namespace meshtrain
