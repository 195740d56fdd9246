// defines: the training programs' shared flags (see training_flags.h).
#include "meshtrain/launch/training_flags.h"

#include "meshtrain/launch/checkpoint.h"

#include <torch/cuda.h>

#include <filesystem>
#include <utility>

namespace meshtrain::cli {
namespace fs = std::filesystem;

void add_training_flags(cxxopts::Options& options) {
  // clang-format off
  options.add_options("data")
    ("data", "training token file (llm.c format)", text("data/fortunes_train.bin"))
    ("val-data", "validation token file; empty: no validation", text("data/fortunes_val.bin"))
    ("shuffle", "seeded per-epoch permutation of the training samples: true or false",
     boolean(true));
  options.add_options("optimization")
    ("steps", "optimizer steps (the cosine schedule ends here)", text("4500"))
    ("lr", "peak learning rate (AdamW, betas 0.9/0.95)", text("3e-3"))
    ("min-lr", "learning rate at the end of the cosine", text("3e-4"))
    ("warmup", "linear warmup steps (at most --steps)", text("50"))
    ("weight-decay", "decoupled weight decay of the matrices (dim >= 2)", text("0.1"))
    ("grad-clip", "clip the global gradient norm to this; 0: off", text("1.0"))
    ("seed", "seed of the initial weights (and of dropout and --shuffle)", text("1337"));
  // clang-format on
  add_layout_flags(options);
  // clang-format off
  options.add_options("parallelism")
    ("threads", "torch threads per rank; 0: MESHTRAIN_THREADS or cores / ranks", text("0"));
  options.add_options("reporting")
    ("metrics", "JSON Lines metrics file (rank 0; one object per step and per validation)",
     text(""))
    ("prometheus", "Prometheus text file (rank 0), rewritten every --log-every steps", text(""))
    ("val-every", "validate every N steps (0: only at the end)", text("250"))
    ("val-batches", "global batches of the validation file per validation", text("50"))
    ("progress", "rank-0 progress: auto, redraw (one line redrawn in place), lines (one "
                 "every --log-every steps) or off; auto: MESHTRAIN_PROGRESS, else redraw on a "
                 "terminal, lines under mpirun", text("auto"))
    ("log-every", "progress line every N steps in the lines style", text("50"))
    ("trace", "write a Chrome trace per rank (DIR/trace-rank<R>.json: forward, backward, "
              "optimizer, each collective) for ui.perfetto.dev or chrome://tracing", text(""))
    ("count-comm", "count the bytes of every collective; the metrics get comm_bytes per step",
     boolean())
    ("comm-timeout", "seconds a collective may wait before the watchdog reports it and ends "
                     "the job; 0: no deadline", text("300"))
    ("nan-policy", "a step with an inf/NaN gradient norm: stop (before its update, exit 1) or "
                   "skip (drop its update, go on)", text("stop"))
    ("max-time", "stop before a step that would end past this many seconds; 0: no limit",
     text("600"))
    ("h,help", "print this help");
  options.add_options("checkpoints")
    ("checkpoint-dir", "directory of the checkpoints (step_<N>/ each); empty: no checkpoints",
     text(""))
    ("save-every", "save every N steps (and at the end, and on SIGTERM/SIGINT); 0: only those",
     text("500"))
    ("save-at-start", "also save before the first step (step 0)", boolean())
    ("keep-checkpoints", "keep only the newest N checkpoints up to this run's step (never the "
                         "one just saved; newer ones, of a run this one branched off, are "
                         "kept); 0: keep all", text("0"))
    ("resume", "continue from the latest checkpoint in --checkpoint-dir (a fresh start when "
               "there is none yet); a checkpoint of any layout reshards into this one",
     boolean())
    ("resume-from", "continue from this checkpoint: a step directory, or a checkpoint "
                    "directory (its latest)", text(""))
    ("init", "start from the full weights of a safetensors file (meshtrain-export's); "
             "ignored when --resume finds a checkpoint", text(""))
    ("allow-data-change", "resume even though --data, --shuffle or the shuffle's --seed differ "
                          "from the checkpoint's (another data order; refused without this)",
     boolean());
  // clang-format on
}

std::string bf16_notice(const CpuInfo& cpu) {
  if (cpu.native_bf16()) {
    return "";
  }
  return "--precision bf16 will be slower than fp32 on this machine: its CPU (" + cpu.model +
         ") has neither avx512_bf16 nor amx_bf16, so bf16 matrix products are emulated in "
         "software (about 12x slower than fp32 on such a CPU); use fp32 here";
}

TrainingFlags read_training_flags(const ParsedFlags& flags) {
  TrainingFlags f;
  f.data = flags.str("data");
  if (f.data.empty()) {
    throw UsageError("--data: give a token file");
  }
  f.val_data = flags.str("val-data");
  f.shuffle = flags.flag("shuffle");
  f.steps = flags.integer("steps", 1, kMaxCount);
  f.lr = flags.number("lr", 0.0, 1e3);
  f.min_lr = flags.number("min-lr", 0.0, 1e3);
  if (f.min_lr > f.lr) {
    throw UsageError("--min-lr " + flags.str("min-lr") + ": must not exceed --lr " +
                     flags.str("lr"));
  }
  f.warmup = flags.integer("warmup", 0, kMaxCount);
  if (f.warmup > f.steps) {
    f.notices.push_back("--warmup " + std::to_string(f.warmup) + " is more than --steps " +
                        std::to_string(f.steps) + ": warming up over all " +
                        std::to_string(f.steps) + " steps instead");
    f.warmup = f.steps;
  }
  f.weight_decay = flags.number("weight-decay", 0.0, 1e3);
  f.grad_clip = flags.number("grad-clip", 0.0, 1e12);
  f.seed = parse_uint64("seed", flags.str("seed"));
  f.plan = read_layout_flags(flags);
  const bool cuda = torch::cuda::is_available();
  if (f.plan.precision == Precision::kFp16 && !cuda) {
    throw UsageError("--precision fp16: needs a CUDA build and GPU (LibTorch's CPU backend has "
                     "no fp16 matrix product: addmm is not implemented for Half); use bf16, "
                     "fast on CPUs with avx512_bf16 or amx_bf16, or fp32");
  }
  if (f.plan.precision == Precision::kBf16 && !cuda) {
    if (auto notice = bf16_notice(cpu_info()); !notice.empty()) {
      f.notices.push_back(std::move(notice));
    }
  }
  f.threads = static_cast<int>(flags.integer("threads", 0, 1 << 12));
  if (flags.given("metrics") && flags.str("metrics").empty()) {
    throw UsageError("--metrics: give a file path");
  }
  f.metrics = flags.str("metrics");
  f.prometheus = flags.str("prometheus");
  f.trace = flags.str("trace");
  f.count_comm = flags.flag("count-comm");
  f.val_every = flags.integer("val-every", 0, kMaxCount);
  f.val_batches = flags.integer("val-batches", 0, kMaxCount);
  f.log_every = flags.integer("log-every", 0, kMaxCount);
  f.max_time = flags.number("max-time", 0.0, 1e9);
  f.comm_timeout = flags.number("comm-timeout", 0.0, 1e7);
  f.nan_policy = parse_choice<NanPolicy>("nan-policy", flags.str("nan-policy"), parse_nan_policy);
  f.progress = parse_choice<ProgressStyle>("progress", flags.str("progress"), parse_progress_style);
  f.checkpoint_dir = flags.str("checkpoint-dir");
  f.save_every = flags.integer("save-every", 0, kMaxCount);
  f.keep_checkpoints = flags.integer("keep-checkpoints", 0, kMaxCount);
  f.save_at_start = flags.flag("save-at-start");
  f.allow_data_change = flags.flag("allow-data-change");
  if (f.save_at_start && f.checkpoint_dir.empty()) {
    throw UsageError("--save-at-start needs --checkpoint-dir");
  }
  if (flags.flag("resume")) {
    if (f.checkpoint_dir.empty()) {
      throw UsageError("--resume needs --checkpoint-dir (where to look for the latest "
                       "checkpoint), or use --resume-from PATH");
    }
    f.resume = "latest";
  }
  if (!flags.str("resume-from").empty()) {
    if (!f.resume.empty()) {
      throw UsageError("give --resume or --resume-from " + flags.str("resume-from") + ", not both");
    }
    f.resume = flags.str("resume-from");
  }
  f.init = flags.str("init");
  return f;
}

void check_training_paths(const TrainingFlags& f, bool rank0, const std::string& hint) {
  const auto check_file = [&](const char* flag, const std::string& path, const std::string& more) {
    if (fs::is_directory(path)) {
      throw UsageError(std::string(flag) + " " + path + ": is a directory; give a token file" +
                       more);
    }
    if (!fs::is_regular_file(path)) {
      throw UsageError(std::string(flag) + " " + path + ": no such file" + more);
    }
  };
  if (!f.init.empty()) {
    check_file("--init", f.init,
               " (give a safetensors file of full weights, e.g. from "
               "meshtrain-export)");
  }
  if (!f.resume.empty() && f.resume != "latest") {
    try {
      resolve_checkpoint(f.resume);
    } catch (const c10::Error& e) {
      throw UsageError("--resume-from " + f.resume + ": " + e.what_without_backtrace());
    }
  }
  check_file("--data", f.data, hint);
  if (!f.val_data.empty()) {
    check_file("--val-data", f.val_data, " (give --val-data '' for no validation)" + hint);
  }
  if (!rank0) {
    return;
  }
  // Made now, so that a path that cannot be a directory fails before any training.
  for (const auto& [flag, dir] :
       {std::pair{"--checkpoint-dir", f.checkpoint_dir}, {"--trace", f.trace}}) {
    if (dir.empty()) {
      continue;
    }
    std::error_code error;
    fs::create_directories(dir, error);
    if (error || !fs::is_directory(dir)) {
      throw UsageError(std::string(flag) + " " + dir + ": cannot be made a directory (" +
                       (error ? error.message() : "a file of that name exists") + ")");
    }
  }
  for (const auto& [flag, path] :
       {std::pair{"--metrics", f.metrics}, {"--prometheus", f.prometheus}}) {
    if (path.empty()) {
      continue;
    }
    const fs::path parent = fs::absolute(path).parent_path();
    if (!fs::is_directory(parent)) {
      throw UsageError(std::string(flag) + " " + path + ": directory " + parent.string() +
                       " does not exist");
    }
  }
}

TrainerOptions trainer_options(const TrainingFlags& f, int64_t seq_len) {
  return TrainerOptions()
      .loss_scaling(f.plan.precision == Precision::kFp16) // fp16's range needs the scaler
      .steps(f.steps)
      .seq_len(seq_len)
      .shuffle(f.shuffle)
      .data_seed(f.seed)
      .lr(f.lr)
      .min_lr(f.min_lr)
      .warmup_steps(f.warmup)
      .grad_clip(f.grad_clip)
      .val_every(f.val_every)
      .val_batches(f.val_batches)
      .progress(f.progress)
      .log_every(f.log_every)
      .metrics_path(f.metrics)
      .prometheus_path(f.prometheus)
      .max_time(f.max_time)
      .nan_policy(f.nan_policy)
      .handle_signals(true);
}

ZeroOptions optimizer_options(const TrainingFlags& f) {
  return ZeroOptions().adamw(
      AdamWOptions(f.lr).beta1(0.9).beta2(0.95).weight_decay(f.weight_decay));
}

std::vector<std::pair<std::string, std::string>> training_fields(const TrainingFlags& f) {
  std::vector<std::pair<std::string, std::string>> fields = {
      {"--data", f.data},
      {"--val-data", f.val_data},
      {"--shuffle", f.shuffle ? "true" : "false"},
      {"--steps", std::to_string(f.steps)},
      {"--lr", std::to_string(f.lr)},
      {"--min-lr", std::to_string(f.min_lr)},
      {"--warmup", std::to_string(f.warmup)},
      {"--weight-decay", std::to_string(f.weight_decay)},
      {"--grad-clip", std::to_string(f.grad_clip)},
      {"--seed", std::to_string(f.seed)},
      {"--val-every", std::to_string(f.val_every)},
      {"--val-batches", std::to_string(f.val_batches)},
      {"--max-time", std::to_string(f.max_time)},
      {"--checkpoint-dir", f.checkpoint_dir},
      {"--save-every", std::to_string(f.save_every)},
      {"--keep-checkpoints", std::to_string(f.keep_checkpoints)},
      {"--save-at-start", f.save_at_start ? "true" : "false"},
      {"--allow-data-change", f.allow_data_change ? "true" : "false"},
      {"--resume", f.resume},
      {"--init", f.init},
      {"--comm-timeout", std::to_string(f.comm_timeout)},
      {"--nan-policy", f.nan_policy == NanPolicy::kStop ? "stop" : "skip"}};
  for (const auto& [name, value] : f.plan.fields()) {
    fields.emplace_back("layout " + name, value);
  }
  return fields;
}

} // namespace meshtrain::cli
