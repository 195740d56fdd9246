// defines: Reporter, to_string(StopReason), format_duration (see reporting.h).
#include "meshtrain/launch/reporting.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/core/file_io.h"

#include <nlohmann/json.hpp>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>

namespace meshtrain {
namespace {

ProgressStyle resolve_progress(ProgressStyle style) {
  if (style != ProgressStyle::kAuto) {
    return style;
  }
  if (const char* env = std::getenv("MESHTRAIN_PROGRESS")) {
    try {
      const ProgressStyle chosen = parse_progress_style(env);
      if (chosen != ProgressStyle::kAuto) {
        return chosen;
      }
    } catch (const std::invalid_argument&) { // NOLINT(bugprone-empty-catch): ignored, as unset
    }
  }
  // OpenMPI's ranks write to a pseudo-terminal whatever mpirun's stdout is: isatty says
  // nothing there.
  if (std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr) {
    return ProgressStyle::kLines;
  }
  return isatty(STDOUT_FILENO) == 1 ? ProgressStyle::kRedraw : ProgressStyle::kLines;
}

double mib(int64_t bytes) {
  return static_cast<double>(bytes) / (1024.0 * 1024.0);
}

} // namespace

ProgressStyle parse_progress_style(const std::string& text) {
  if (text == "auto") {
    return ProgressStyle::kAuto;
  }
  if (text == "redraw") {
    return ProgressStyle::kRedraw;
  }
  if (text == "lines") {
    return ProgressStyle::kLines;
  }
  if (text == "off") {
    return ProgressStyle::kOff;
  }
  throw std::invalid_argument("progress style '" + text + "': must be auto, redraw, lines or off");
}

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

Reporter::Reporter(ReporterOptions options, bool rank0)
    : options_(std::move(options)), rank0_(rank0) {
  const ProgressStyle style = resolve_progress(options_.progress);
  progress_ = rank0_ && style != ProgressStyle::kOff;
  redraw_ = progress_ && style == ProgressStyle::kRedraw;
  if (rank0_ && !options_.metrics_path.empty()) {
    metrics_.open(options_.metrics_path, std::ios::out | std::ios::trunc);
    metrics_open_failed_ = !metrics_.is_open();
  }
}

void Reporter::step(const StepStats& stats, double eta_s, bool force_line) {
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
        {"tokens", stats.step * o.tokens_per_step},
        // Wall clock (Unix seconds) when the line is written: the time between two lines is
        // everything a step costs, data wait, metrics and stop agreement included.
        {"time", std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch())
                     .count()},
    };
    if (!stats.comm_bytes.empty()) {
      line["comm_bytes"] = stats.comm_bytes;
    }
    if (o.loss_scaling) {
      line["loss_scale"] = stats.loss_scale;
    }
    if (o.loss_scaling || stats.skipped) {
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
    if (!stats.stage_tensor_peak_bytes.empty()) {
      line["mem_stage_tensor_peak_bytes"] = stats.stage_tensor_peak_bytes;
      line["mem_stage_state_bytes"] = stats.stage_state_bytes;
      line["mem_stage_activation_peak_bytes"] = stats.stage_activation_peak_bytes;
    }
    write_metrics(line.dump());
  }
  last_stats_ = stats;
  const bool due_by_count = o.log_every > 0 && stats.step % o.log_every == 0;
  if (!o.prometheus_path.empty() && (force_line || due_by_count)) {
    write_prometheus();
  }
  if (!progress_) {
    return;
  }
  window_steps_ += 1;
  window_seconds_ += stats.step_ms / 1e3;
  if (!(redraw_ || force_line || due_by_count)) {
    return;
  }
  // Tokens/s over the steps since the last printed line (less noisy than one step).
  const double rate =
      static_cast<double>(window_steps_ * o.tokens_per_step) / std::max(window_seconds_, 1e-9);
  // Redrawn lines average over windows of 10 steps, printed lines over their interval.
  if (!redraw_ || window_steps_ >= 10) {
    window_steps_ = 0;
    window_seconds_ = 0;
  }
  char line[256];
  std::snprintf(line, sizeof(line),
                "step %lld/%lld  loss %.4f  lr %.3e  norm %.3f  %.0f tok/s  ETA %s  mem %.0f MiB",
                static_cast<long long>(stats.step), static_cast<long long>(o.total_steps),
                stats.loss, stats.lr, stats.grad_norm, rate, format_duration(eta_s).c_str(),
                mib(stats.mem_peak_bytes));
  std::string text = line;
  if (stats.tensor_peak_bytes > 0) {
    // Live-tensor peak of this step, and of it what forward + backward added.
    std::snprintf(line, sizeof(line), " (tensors %.0f, act %.0f)", mib(stats.tensor_peak_bytes),
                  mib(stats.activation_peak_bytes));
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

void Reporter::validation(int64_t step, double val_loss, double seconds) {
  if (!rank0_) {
    return;
  }
  if (metrics_.is_open()) {
    write_metrics(nlohmann::json{{"step", step}, {"val_loss", val_loss}}.dump());
  }
  last_val_loss_ = val_loss;
  have_val_loss_ = true;
  if (!options_.prometheus_path.empty()) {
    write_prometheus();
  }
  if (progress_) {
    end_line();
    std::printf("step %lld/%lld  val_loss %.4f  (%lld batches, %.1fs)\n",
                static_cast<long long>(step), static_cast<long long>(options_.total_steps),
                val_loss, static_cast<long long>(options_.val_batches), seconds);
    std::fflush(stdout);
  }
}

void Reporter::log(const std::string& line) {
  if (progress_) {
    end_line();
    std::printf("%s\n", line.c_str());
    std::fflush(stdout);
  }
}

void Reporter::done(int64_t steps, StopReason reason, double seconds, double val_loss) {
  end_line();
  if (!progress_) {
    return;
  }
  std::printf("done: %lld steps (%s) in %s", static_cast<long long>(steps), to_string(reason),
              format_duration(seconds).c_str());
  if (!std::isnan(val_loss)) {
    std::printf(", val_loss %.4f", val_loss);
  }
  std::printf("\n");
  std::fflush(stdout);
}

void Reporter::end_line() {
  if (line_open_) {
    std::printf("\n");
    std::fflush(stdout);
    line_open_ = false;
  }
}

void Reporter::write_metrics(const std::string& line) {
  // One write of a whole line, then flush: a reader never sees half an object.
  metrics_ << line + "\n" << std::flush;
  MT_CHECK(metrics_.good(), "writing the metrics file '", options_.metrics_path, "' failed");
}

void Reporter::write_prometheus() const {
  std::ostringstream out;
  out.precision(17);
  const auto metric = [&](const char* name, const char* type, const char* help, double value) {
    out << "# HELP " << name << " " << help << "\n# TYPE " << name << " " << type << "\n"
        << name << " " << value << "\n";
  };
  const auto& s = last_stats_;
  metric("meshtrain_step", "gauge", "Optimizer steps done.", static_cast<double>(s.step));
  metric("meshtrain_steps_total", "gauge", "Optimizer steps of the run.",
         static_cast<double>(options_.total_steps));
  metric("meshtrain_tokens_total", "counter", "Training tokens consumed.",
         static_cast<double>(s.step * options_.tokens_per_step));
  metric("meshtrain_loss", "gauge", "Mean token loss of the last step's global batch (nats).",
         s.loss);
  if (have_val_loss_) {
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
  write_file_atomic(options_.prometheus_path, out.str());
}

} // namespace meshtrain
