// defines: Trainer, parse_nan_policy (see trainer.h).
#include "meshtrain/launch/trainer.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/core/trace.h"
#include "meshtrain/memory/alloc_tracker.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <sstream>
#include <stdexcept>

namespace meshtrain {
namespace {

// The micro-batches' inputs and targets as the pipeline takes them.
std::pair<std::vector<torch::Tensor>, std::vector<torch::Tensor>>
split_micro_batches(const std::vector<MicroBatch>& batches) {
  std::pair<std::vector<torch::Tensor>, std::vector<torch::Tensor>> out;
  for (const auto& mb : batches) {
    out.first.push_back(mb.inputs);
    out.second.push_back(mb.targets);
  }
  return out;
}

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

ReporterOptions reporter_options(const TrainerOptions& o, const ParallelPlan& plan) {
  ReporterOptions r;
  r.progress = o.progress();
  r.log_every = o.log_every();
  r.metrics_path = o.metrics_path();
  r.prometheus_path = o.prometheus_path();
  r.total_steps = o.steps();
  r.tokens_per_step = plan.global_batch * o.seq_len();
  r.val_batches = o.val_batches();
  r.loss_scaling = o.loss_scaling();
  return r;
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

} // namespace

NanPolicy parse_nan_policy(const std::string& text) {
  if (text == "skip") {
    return NanPolicy::kSkip;
  }
  if (text != "stop") {
    throw std::invalid_argument("nan policy '" + text + "': must be stop or skip");
  }
  return NanPolicy::kStop;
}

Trainer::Trainer(Parallelized parallel, std::shared_ptr<const TokenFile> train,
                 std::shared_ptr<const TokenFile> val, TrainerOptions options)
    : parallel_(std::move(parallel)), options_(std::move(options)),
      schedule_(WarmupCosineOptions(options_.lr())
                    .min_lr(options_.min_lr())
                    .warmup_steps(options_.warmup_steps())
                    .total_steps(std::max<int64_t>(options_.steps(), 1))),
      reporter_(reporter_options(options_, parallel_.plan), parallel_.mesh.rank() == 0) {
  const auto& o = options_;
  const auto& plan = parallel_.plan;
  MT_CHECK(parallel_.model != nullptr && parallel_.reducer != nullptr &&
               parallel_.optimizer != nullptr && parallel_.loss != nullptr,
           "Trainer: give it what parallelize() returns for training (model, reducer, optimizer "
           "and loss)");
  MT_CHECK(train != nullptr, "Trainer: the training token file is null");
  MT_CHECK(o.steps() >= 0, "Trainer: steps (", o.steps(), ") must be >= 0");
  MT_CHECK(o.seq_len() >= 1, "Trainer: sequence length (", o.seq_len(), ") must be >= 1");
  MT_CHECK(o.val_every() >= 0 && o.val_batches() >= 0, "Trainer: val_every (", o.val_every(),
           ") and val_batches (", o.val_batches(), ") must be >= 0");
  MT_CHECK(o.log_every() >= 0, "Trainer: log_every (", o.log_every(), ") must be >= 0");
  MT_CHECK(o.max_time() >= 0 && std::isfinite(o.max_time()), "Trainer: max_time (", o.max_time(),
           ") must be a finite number of seconds >= 0");
  MT_CHECK(std::isfinite(o.grad_clip()), "Trainer: grad_clip (", o.grad_clip(), ") must be finite");

  const Mesh& mesh = parallel_.mesh;
  TokenLoaderOptions lo;
  lo.seq_len = o.seq_len();
  lo.global_batch = plan.global_batch;
  lo.micro_batch = plan.micro_batch;
  lo.dp_rank = mesh.group("dp")->rank();
  lo.dp_size = mesh.group("dp")->size();
  lo.shuffle = o.shuffle();
  lo.seed = o.data_seed();
  loader_ = std::make_unique<TokenLoader>(std::move(train), lo);
  if (val != nullptr && o.val_batches() > 0) {
    TokenLoaderOptions vo = lo;
    vo.shuffle = false;
    vo.prefetch = false; // read with step_batches(), pure
    val_loader_ = std::make_unique<TokenLoader>(std::move(val), vo);
  }
  if (o.loss_scaling()) {
    scaler_ = std::make_unique<GradScaler>(o.scaler(), mesh.group("world"));
  }
  // Only rank 0 opens the metrics file, but every rank must learn whether that worked:
  // throwing on rank 0 alone would leave the others waiting in their first collective.
  auto flag = torch::tensor({reporter_.metrics_open_failed() ? 1 : 0}, torch::kInt);
  mesh.group("world")->all_reduce(flag, ReduceOp::kMax);
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
  if (hooks_.at_step_start) {
    hooks_.at_step_start(s + 1);
  }
  auto& model = *parallel_.model;
  auto& reducer = *parallel_.reducer;
  auto& optimizer = *parallel_.optimizer;
  const Mesh& mesh = parallel_.mesh;
  model.train();
  if (loader_->next_step() != s) {
    loader_->seek(s);
  }
  const auto batches = loader_->next();              // M micro-batches of b sequences
  const auto& comm_log = mesh.group("world")->log(); // shared by every group of the mesh
  const bool count_comm = comm_log && comm_log->enabled();
  if (count_comm) {
    comm_log->clear(); // what ran between steps (validation, the stop agreement) is not counted
  }
  const int64_t global_tokens = tokens_per_step();

  reducer.zero_grad();
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
  // ZeRO-3 reduce-scatters every micro-step into the gradient shards (its point is that no
  // rank holds a whole gradient; FSDP does the same); the other stages reduce once per step.
  ParameterShards* shards = parallel_.shards.get();
  if (shards != nullptr) {
    shards->reset_peak();
  }
  const auto share_of = [&](const torch::Tensor& loss_sum) {
    auto share = global_mean_loss(loss_sum, global_tokens);
    return hooks_.on_loss ? hooks_.on_loss(s + 1, share) : share;
  };
  if (parallel_.pipeline) {
    // Every micro-batch through the schedule, accumulating locally; then the shared
    // parameters' gradients summed over the first and last stage, and one reduction.
    const auto [inputs, targets] = split_micro_batches(batches);
    {
      const auto timed = forward_clock.time("pipeline");
      const NoSyncGuard guard = reducer.no_sync();
      loss +=
          parallel_.pipeline->train(inputs, targets, share_of, scaler_ ? scaler_->scale() : 1.0);
    }
    parallel_.pipeline->sum_shared_gradients(reducer);
  }
  for (int64_t m = 0; m < m_count && !parallel_.pipeline; ++m) {
    std::optional<NoSyncGuard> guard;
    if (m + 1 < m_count && shards == nullptr) {
      guard.emplace(reducer.no_sync()); // accumulate locally; the last micro-step reduces
    }
    torch::Tensor share;
    {
      const auto timed = forward_clock.time("forward");
      share = share_of(parallel_.loss(batches[m]));
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
    if (shards != nullptr && m + 1 < m_count) {
      const TraceSpan span("reduce gradients", "step");
      reducer.finish();
      shards->release_all(); // a unit with an unused parameter is still gathered: free it
    }
  }
  std::vector<torch::Tensor> grads;
  {
    const TraceSpan span("reduce gradients", "step");
    grads = reducer.finish();
  }
  if (shards != nullptr) {
    shards->release_all();
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
      norm = optimizer.clip_grad_norm(grads, o.grad_clip());
      // The norm spans every rank's gradients, so this verdict is the same everywhere.
      non_finite = !std::isfinite(norm);
      if (!non_finite) {
        optimizer.set_lr(lr);
        optimizer.step(grads);
      }
    }
  }
  // The shares of all micro-steps and dp x cp ranks add up to the global-batch mean (under
  // pipeline parallelism the last stage holds them: the others add 0).
  mesh.group("dp_cp")->all_reduce(loss, ReduceOp::kSum);
  mesh.group("pp")->all_reduce(loss, ReduceOp::kSum);
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
  if (tracker != nullptr && parallel_.pipeline) {
    // The stages hold different things, and rank 0 alone reports: every pp rank's figures,
    // [3, pp] (doubles: exact bytes below 2^53). The tracker is installed on every rank or on
    // none (train_gpt, the benchmarks), so the pp group calls this together.
    const auto& pp = mesh.group("pp");
    auto figures = torch::zeros({3, pp->size()}, torch::kDouble);
    figures[0][pp->rank()] = static_cast<double>(stats.tensor_peak_bytes);
    figures[1][pp->rank()] = static_cast<double>(stats.state_bytes);
    figures[2][pp->rank()] = static_cast<double>(stats.activation_peak_bytes);
    pp->all_reduce(figures, ReduceOp::kSum);
    for (int64_t r = 0; r < pp->size(); ++r) {
      stats.stage_tensor_peak_bytes.push_back(static_cast<int64_t>(figures[0][r].item<double>()));
      stats.stage_state_bytes.push_back(static_cast<int64_t>(figures[1][r].item<double>()));
      stats.stage_activation_peak_bytes.push_back(
          static_cast<int64_t>(figures[2][r].item<double>()));
    }
  }
  return stats;
}

double Trainer::validate() {
  if (val_loader_ == nullptr) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  torch::NoGradGuard no_grad;
  auto& model = *parallel_.model;
  model.eval();
  auto totals = torch::zeros({2}, torch::kDouble); // {loss sum, tokens}
  // Under context parallelism each cp rank's loss covers its 1/cp of every sequence's tokens.
  const int64_t cp = parallel_.mesh.group("cp")->size();
  for (int64_t k = 0; k < options_.val_batches(); ++k) {
    const auto batches = val_loader_->step_batches(k);
    if (parallel_.pipeline) {
      const auto [inputs, targets] = split_micro_batches(batches);
      totals[0] += parallel_.pipeline->evaluate(inputs, targets);
    }
    for (const auto& mb : batches) {
      if (!parallel_.pipeline) {
        totals[0] += parallel_.loss(mb).to(torch::kDouble);
      }
      totals[1] += static_cast<double>(mb.targets.numel() / cp);
    }
  }
  // Under pipeline parallelism only the last stage has losses (the token counts are every
  // rank's: divided by pp below).
  parallel_.mesh.group("dp_cp")->all_reduce(totals, ReduceOp::kSum);
  parallel_.mesh.group("pp")->all_reduce(totals, ReduceOp::kSum);
  totals[1] /= static_cast<double>(parallel_.mesh.group("pp")->size());
  model.train();
  return totals[0].item<double>() / totals[1].item<double>();
}

std::pair<bool, bool> Trainer::agree_on_stop(double elapsed_s, double next_step_s) const {
  const auto& o = options_;
  const bool over_time =
      o.max_time() > 0 && elapsed_s + next_step_s + last_val_seconds_ > o.max_time();
  const bool signalled = o.handle_signals() && g_stop_signal.load() != 0;
  // Ranks may see different clocks and signals: one that wants to stop stops everybody.
  auto flags = torch::tensor({over_time ? 1 : 0, signalled ? 1 : 0}, torch::kInt);
  parallel_.mesh.group("world")->all_reduce(flags, ReduceOp::kMax);
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
      reporter_.validation(step_, val, last_val_seconds_);
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
      reporter_.step(stats, 0, true);
      break;
    }
    const int64_t done = step_ - first;
    const double remaining_s =
        train_seconds / static_cast<double>(done) * static_cast<double>(o.steps() - step_);
    double eta = remaining_s;
    if (o.max_time() > 0) {
      eta = std::min(eta, std::max(0.0, o.max_time() - seconds_since(start)));
    }
    reporter_.step(stats, eta, step_ == o.steps() || done == 1);
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
  reporter_.end_line();
  if (hook_ && !failed) {
    hook_(*this,
          result.reason == StopReason::kSignal ? CheckpointEvent::kSignal : CheckpointEvent::kEnd);
  }
  result.steps = step_;
  result.seconds = seconds_since(start);
  reporter_.done(step_, result.reason, result.seconds,
                 result.val_losses.empty() ? std::nan("") : result.val_losses.back().second);
  return result;
}

void Trainer::log(const std::string& line) {
  reporter_.log(line);
}

} // namespace meshtrain
