// defines: main of train_gpt — trains the nanoGPT-architecture GPT (examples/gpt/gpt_model.h)
// on an llm.c token file in any layout of the MPI ranks: dp x tp (dp = world / --tp), ZeRO
// stage, sequence parallelism, micro-batches with gradient accumulation. See docs/gpt.md.
//
//   prepare_text --train data/fortunes_train.bin --val data/fortunes_val.bin
//   /usr/share/games/fortunes mpirun -np 2 train_gpt --metrics out/gpt.jsonl
//
// Exit codes: 0 done (also when stopped by --max-time or a signal), 1 runtime failure,
// 2 bad command line.
#include "core/errors.h"
#include "core/mesh.h"
#include "core/runtime.h"
#include "core/token_file.h"
#include "core/trace.h"
#include "examples/gpt/gpt_model.h"
#include "launch/checkpoint.h"
#include "launch/job_exit.h"
#include "launch/startup_check.h"
#include "launch/trainer.h"
#include "memory/alloc_tracker.h"
#include "parallel/rng_tracker.h"

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>

namespace {

using meshtrain::agree_on_exit;
using meshtrain::message_of;

using meshtrain::CommunicatorPtr;
namespace gpt = meshtrain::gpt;

constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;

// Where the set-up's prepare_text step writes the fortunes corpus (docs/gpt.md).
constexpr const char* kDefaultTrain = "data/fortunes_train.bin";
constexpr const char* kDefaultVal = "data/fortunes_val.bin";

// A bad command line: the message names the flag and the value; exit code 2.
class UsageError : public std::runtime_error {
public:
  using std::runtime_error::runtime_error;
};

struct Flags {
  bool help = false;
  std::string data;
  std::string val_data; // empty: no validation
  int64_t steps = 0;
  int64_t batch_size = 0;       // B, global, in sequences
  int64_t micro_batch_size = 0; // b per DP rank; 0: B / dp (no accumulation)
  int64_t block_size = 0;
  int64_t n_layer = 0;
  int64_t n_head = 0;
  int64_t n_embd = 0;
  int64_t vocab_size = 0;
  double dropout = 0;
  double lr = 0;
  double min_lr = 0;
  int64_t warmup = 0;
  double weight_decay = 0;
  double grad_clip = 0;
  uint64_t seed = 0;
  int tp = 1;
  int zero = 0;
  bool sequence_parallel = false;
  meshtrain::RecomputeMode recompute = meshtrain::RecomputeMode::kNone;
  bool bf16 = false; // --precision bf16: bf16 parameters and compute, fp32 master weights
  bool shuffle = false;
  std::string metrics;
  std::string prometheus;
  int64_t val_every = 0;
  int64_t val_batches = 0;
  int64_t log_every = 0;
  double max_time = 0;
  std::string checkpoint_dir; // empty: no checkpoints
  int64_t save_every = 0;
  int64_t keep_checkpoints = 0;
  bool save_at_start = false;
  bool allow_data_change = false;
  std::string resume; // empty: none; "latest" (--resume): the newest in checkpoint_dir;
                      // else --resume-from's path
  std::string init;   // a safetensors file of full weights (meshtrain-export's)
  int threads = 0;    // 0: the runtime's choice
  meshtrain::ProgressStyle progress = meshtrain::ProgressStyle::kAuto;
  double comm_timeout = 0; // seconds; 0: no collective deadline
  meshtrain::NanPolicy nan_policy = meshtrain::NanPolicy::kStop;
  std::string trace;       // directory of the per-rank Chrome traces; empty: no trace
  bool count_comm = false; // per-step collective bytes in the metrics
};

// meshrun exports its --tp to the ranks; programs take it as their default.
std::string default_tp() {
  const char* env = std::getenv("MESHTRAIN_TP");
  return env != nullptr && *env != '\0' ? env : "1";
}

cxxopts::Options make_options() {
  cxxopts::Options options(
      "train_gpt", "Trains a nanoGPT-architecture GPT on an llm.c token file over the MPI ranks "
                   "(dp = world size / tp). See docs/gpt.md.");
  const auto text = [](const char* value) {
    return cxxopts::value<std::string>()->default_value(value);
  };
  // Numbers are read as strings and converted by us, so that an error names the flag.
  // clang-format off
  options.add_options("data")
    ("data", "training token file (llm.c format)", text(kDefaultTrain))
    ("val-data", "validation token file; empty: no validation", text(kDefaultVal))
    ("shuffle", "seeded per-epoch permutation of the training samples: true or false",
     cxxopts::value<std::string>()->default_value("true")->implicit_value("true"));
  options.add_options("model")
    ("block-size", "sequence length T (also the rows of wpe)", text("64"))
    ("n-layer", "transformer blocks", text("4"))
    ("n-head", "attention heads", text("4"))
    ("n-embd", "embedding width C", text("128"))
    ("vocab-size", "vocabulary V (byte-level text: 256); every token must be < V", text("256"))
    ("dropout", "dropout probability (embeddings, attention, residuals)", text("0"));
  options.add_options("optimization")
    ("steps", "optimizer steps (the cosine schedule ends here)", text("4500"))
    ("batch-size", "global batch B in sequences, over all DP ranks", text("16"))
    ("micro-batch-size", "sequences per forward on one DP rank; 0: B / dp (no accumulation)",
     text("0"))
    ("lr", "peak learning rate (AdamW, betas 0.9/0.95)", text("3e-3"))
    ("min-lr", "learning rate at the end of the cosine", text("3e-4"))
    ("warmup", "linear warmup steps", text("50"))
    ("weight-decay", "decoupled weight decay of the matrices (dim >= 2)", text("0.1"))
    ("grad-clip", "clip the global gradient norm to this; 0: off", text("1.0"))
    ("seed", "seed of the initial weights (and of dropout and --shuffle)", text("1337"));
  options.add_options("parallelism")
    ("tp", "tensor-parallel ranks (must divide the world size and n-head); default: "
           "MESHTRAIN_TP (set by meshrun --tp) or 1", text(default_tp().c_str()))
    ("zero", "ZeRO stage: 0, 1 (optimizer state sharded over dp), 2 (+ gradients)", text("0"))
    ("sequence-parallel", "sequence parallelism between the TP regions (tp > 1)")
    ("recompute", "activation recomputation: none, selective (the attention core) or full "
                  "(every transformer block)", text("none"))
    ("precision", "fp32, or bf16 (bf16 parameters and compute; fp32 master weights, optimizer "
                  "state, gradient reduction and loss)", text("fp32"))
    ("threads", "torch threads per rank; 0: MESHTRAIN_THREADS or cores / ranks", text("0"));
  options.add_options("reporting")
    ("metrics", "JSON Lines metrics file (rank 0; one object per step and per validation)",
     cxxopts::value<std::string>())
    ("prometheus", "Prometheus text file (rank 0), rewritten every --log-every steps",
     text(""))
    ("val-every", "validate every N steps (0: only at the end)", text("250"))
    ("val-batches", "global batches of the validation file per validation", text("50"))
    ("progress", "rank-0 progress: auto, redraw (one line redrawn in place), lines (one "
                 "every --log-every steps) or off; auto: MESHTRAIN_PROGRESS, else redraw on a "
                 "terminal, lines under mpirun", text("auto"))
    ("log-every", "progress line every N steps in the lines style", text("50"))
    ("trace", "write a Chrome trace per rank (DIR/trace-rank<R>.json: forward, backward, "
              "optimizer, each collective) for ui.perfetto.dev or chrome://tracing", text(""))
    ("count-comm", "count the bytes of every collective; the metrics get comm_bytes per step")
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
    ("save-at-start", "also save before the first step (step 0)")
    ("keep-checkpoints", "keep only the newest N checkpoints up to this run's step (never the "
                         "one just saved; newer ones, of a run this one branched off, are "
                         "kept); 0: keep all", text("0"))
    ("resume", "continue from the latest checkpoint in --checkpoint-dir (a fresh start when "
               "there is none yet); a checkpoint of any layout reshards into this one")
    ("resume-from", "continue from this checkpoint: a step directory, or a checkpoint "
                    "directory (its latest)", text(""))
    ("init", "start from the full weights of a safetensors file (meshtrain-export's, nanoGPT "
             "names); ignored when --resume finds a checkpoint", text(""))
    ("allow-data-change", "resume even though --data, --shuffle or the shuffle's --seed differ "
                          "from the checkpoint's (another data order; refused without this)");
  // clang-format on
  return options;
}

// Whole-string integer in [lo, hi], else a UsageError naming the flag and the value.
int64_t parse_int(const std::string& flag, const std::string& text, int64_t lo, int64_t hi) {
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno == ERANGE) {
    throw UsageError("--" + flag + " " + text + ": not an integer");
  }
  if (v < lo || v > hi) {
    throw UsageError("--" + flag + " " + text + ": must be in [" + std::to_string(lo) + ", " +
                     std::to_string(hi) + "]");
  }
  return v;
}

// Whole-string finite number in [lo, hi] (hi_open: [lo, hi)).
double parse_double(const std::string& flag, const std::string& text, double lo, double hi,
                    bool hi_open = false) {
  errno = 0;
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || errno == ERANGE || !std::isfinite(v)) {
    throw UsageError("--" + flag + " " + text + ": not a finite number");
  }
  if (v < lo || v > hi || (hi_open && v == hi)) {
    std::ostringstream range;
    range << "[" << lo << ", " << hi << (hi_open ? ")" : "]");
    throw UsageError("--" + flag + " " + text + ": must be in " + range.str());
  }
  return v;
}

std::string format_int(int64_t v) {
  return std::to_string(v);
}

// Parses and validates everything that needs neither files nor communication. The same on
// every rank (same argv), so every rank reaches the same verdict.
Flags parse_flags(int argc, char** argv, int world_size) {
  auto options = make_options();
  cxxopts::ParseResult result;
  try {
    result = options.parse(argc, argv);
  } catch (const cxxopts::exceptions::exception& e) {
    throw UsageError(std::string(e.what()) + " (see --help)");
  }
  if (!result.unmatched().empty()) {
    throw UsageError("unexpected argument '" + result.unmatched().front() + "' (see --help)");
  }
  Flags f;
  f.help = result.count("help") > 0;
  if (f.help) {
    return f;
  }
  const auto str = [&](const char* name) { return result[name].as<std::string>(); };
  constexpr int64_t kBig = int64_t{1} << 40;
  f.data = str("data");
  if (f.data.empty()) {
    throw UsageError("--data: give a token file");
  }
  f.val_data = str("val-data");
  {
    const std::string v = str("shuffle");
    if (v != "true" && v != "false") {
      throw UsageError("--shuffle " + v + ": must be true or false (--shuffle=false)");
    }
    f.shuffle = v == "true";
  }
  f.block_size = parse_int("block-size", str("block-size"), 1, 1 << 20);
  f.n_layer = parse_int("n-layer", str("n-layer"), 1, 1 << 12);
  f.n_head = parse_int("n-head", str("n-head"), 1, 1 << 12);
  f.n_embd = parse_int("n-embd", str("n-embd"), 1, 1 << 20);
  f.vocab_size = parse_int("vocab-size", str("vocab-size"), 1, 65536);
  f.dropout = parse_double("dropout", str("dropout"), 0.0, 1.0, /*hi_open=*/true);
  f.steps = parse_int("steps", str("steps"), 1, kBig);
  f.batch_size = parse_int("batch-size", str("batch-size"), 1, kBig);
  f.micro_batch_size = parse_int("micro-batch-size", str("micro-batch-size"), 0, kBig);
  f.lr = parse_double("lr", str("lr"), 0.0, 1e3);
  f.min_lr = parse_double("min-lr", str("min-lr"), 0.0, 1e3);
  if (f.min_lr > f.lr) {
    throw UsageError("--min-lr " + str("min-lr") + ": must not exceed --lr " + str("lr"));
  }
  f.warmup = parse_int("warmup", str("warmup"), 0, kBig);
  if (f.warmup > f.steps) {
    throw UsageError("--warmup " + str("warmup") + ": must not exceed --steps " + str("steps"));
  }
  f.weight_decay = parse_double("weight-decay", str("weight-decay"), 0.0, 1e3);
  f.grad_clip = parse_double("grad-clip", str("grad-clip"), 0.0, 1e12);
  {
    const std::string text = str("seed");
    char* end = nullptr;
    errno = 0;
    f.seed = std::strtoull(text.c_str(), &end, 10);
    // strtoull accepts "-1" (wrapping it), so refuse a sign explicitly.
    if (text.empty() || *end != '\0' || errno == ERANGE || text[0] == '-' || text[0] == '+') {
      throw UsageError("--seed " + text + ": must be an integer in [0, 2^64)");
    }
  }
  f.tp = static_cast<int>(parse_int("tp", str("tp"), 1, 1 << 16));
  if (world_size % f.tp != 0) {
    throw UsageError("--tp " + str("tp") + ": must divide the world size " +
                     std::to_string(world_size) + " (dp = world size / tp)");
  }
  const int64_t dp = world_size / f.tp;
  f.zero = static_cast<int>(parse_int("zero", str("zero"), 0, 2));
  f.sequence_parallel = result.count("sequence-parallel") > 0;
  try {
    f.recompute = meshtrain::parse_recompute_mode(str("recompute"));
  } catch (const c10::Error&) {
    throw UsageError("--recompute " + str("recompute") + ": must be none, selective or full");
  }
  {
    const std::string p = str("precision");
    if (p == "fp16") {
      throw UsageError("--precision fp16: needs a CUDA build (LibTorch on CPU has no fp16 "
                       "matmul); use bf16 or fp32");
    }
    if (p != "fp32" && p != "bf16") {
      throw UsageError("--precision " + p + ": must be fp32 or bf16");
    }
    f.bf16 = p == "bf16";
  }
  f.threads = static_cast<int>(parse_int("threads", str("threads"), 0, 1 << 12));
  if (result.count("metrics") > 0) {
    f.metrics = str("metrics");
    if (f.metrics.empty()) {
      throw UsageError("--metrics: give a file path");
    }
  }
  f.prometheus = str("prometheus");
  f.trace = str("trace");
  f.count_comm = result.count("count-comm") > 0;
  f.val_every = parse_int("val-every", str("val-every"), 0, kBig);
  f.val_batches = parse_int("val-batches", str("val-batches"), 0, kBig);
  f.log_every = parse_int("log-every", str("log-every"), 0, kBig);
  f.max_time = parse_double("max-time", str("max-time"), 0.0, 1e9);
  f.comm_timeout = parse_double("comm-timeout", str("comm-timeout"), 0.0, 1e7);
  try {
    f.nan_policy = meshtrain::parse_nan_policy(str("nan-policy"));
  } catch (const c10::Error&) {
    throw UsageError("--nan-policy " + str("nan-policy") + ": must be stop or skip");
  }
  f.checkpoint_dir = str("checkpoint-dir");
  f.save_every = parse_int("save-every", str("save-every"), 0, kBig);
  f.keep_checkpoints = parse_int("keep-checkpoints", str("keep-checkpoints"), 0, kBig);
  f.save_at_start = result.count("save-at-start") > 0;
  f.allow_data_change = result.count("allow-data-change") > 0;
  if (result.count("resume") > 0) {
    if (f.checkpoint_dir.empty()) {
      throw UsageError("--resume needs --checkpoint-dir (where to look for the latest "
                       "checkpoint), or use --resume-from PATH");
    }
    f.resume = "latest";
  }
  if (!str("resume-from").empty()) {
    if (!f.resume.empty()) {
      throw UsageError("give --resume or --resume-from " + str("resume-from") + ", not both");
    }
    f.resume = str("resume-from");
  }
  f.init = str("init");
  if (f.save_at_start && f.checkpoint_dir.empty()) {
    throw UsageError("--save-at-start needs --checkpoint-dir");
  }
  {
    const std::string p = str("progress");
    if (p == "auto") {
      f.progress = meshtrain::ProgressStyle::kAuto;
    } else if (p == "redraw") {
      f.progress = meshtrain::ProgressStyle::kRedraw;
    } else if (p == "lines") {
      f.progress = meshtrain::ProgressStyle::kLines;
    } else if (p == "off") {
      f.progress = meshtrain::ProgressStyle::kOff;
    } else {
      throw UsageError("--progress " + p + ": must be auto, redraw, lines or off");
    }
  }

  // The global batch is split evenly over dp ranks and micro-steps (DESIGN §3).
  if (f.micro_batch_size == 0) {
    if (f.batch_size % dp != 0) {
      throw UsageError("--batch-size " + format_int(f.batch_size) +
                       " is not divisible by dp = " + std::to_string(dp) + " (world size " +
                       std::to_string(world_size) + " / tp " + std::to_string(f.tp) +
                       "): each DP rank takes B / dp sequences; use a multiple of " +
                       std::to_string(dp));
    }
    f.micro_batch_size = f.batch_size / dp;
  } else if (f.batch_size % (f.micro_batch_size * dp) != 0) {
    throw UsageError("--batch-size " + format_int(f.batch_size) +
                     " is not divisible by --micro-batch-size " + format_int(f.micro_batch_size) +
                     " x dp " + std::to_string(dp) + " = " + format_int(f.micro_batch_size * dp) +
                     ": accumulation = B / (dp x b) must be a whole number of micro-steps");
  }
  if (f.sequence_parallel && f.tp == 1) {
    throw UsageError("--sequence-parallel needs --tp > 1 (it splits the sequence over the TP "
                     "ranks)");
  }
  // The model's own constraints (n_head | n_embd, tp | n_head, tp | block_size under sequence
  // parallelism), with the model's messages.
  try {
    gpt::GPTConfig config;
    config.vocab_size(f.vocab_size)
        .block_size(f.block_size)
        .n_layer(f.n_layer)
        .n_head(f.n_head)
        .n_embd(f.n_embd)
        .dropout(f.dropout)
        .sequence_parallel(f.sequence_parallel);
    config.validate(f.tp);
  } catch (const c10::Error& e) {
    throw UsageError(std::string("model flags (--n-embd ") + format_int(f.n_embd) + " --n-head " +
                     format_int(f.n_head) + " --block-size " + format_int(f.block_size) + " --tp " +
                     std::to_string(f.tp) + "): " + e.what_without_backtrace());
  }
  return f;
}

// Checks of flags against the file system (every rank reads the data; rank 0 writes metrics).
void check_paths(const Flags& f, bool on_rank0) {
  namespace fs = std::filesystem;
  const std::string hint =
      std::string(" (prepare the fortunes corpus with: prepare_text --train ") + kDefaultTrain +
      " --val " + kDefaultVal + " /usr/share/games/fortunes; see docs/gpt.md)";
  if (!f.init.empty() && !fs::is_regular_file(f.init)) {
    throw UsageError("--init " + f.init +
                     ": no such file (give a safetensors file of full "
                     "weights, e.g. from meshtrain-export)");
  }
  if (!f.resume.empty() && f.resume != "latest") {
    try {
      meshtrain::resolve_checkpoint(f.resume);
    } catch (const c10::Error& e) {
      throw UsageError("--resume-from " + f.resume + ": " + e.what_without_backtrace());
    }
  }
  if (!fs::is_regular_file(f.data)) {
    throw UsageError("--data " + f.data + ": no such file" + hint);
  }
  if (!f.val_data.empty() && !fs::is_regular_file(f.val_data)) {
    throw UsageError("--val-data " + f.val_data +
                     ": no such file (give --val-data '' for no "
                     "validation)" +
                     hint);
  }
  // Made now, so that a path that cannot be a directory fails before any training.
  for (const auto& [flag, dir] :
       {std::pair{"--checkpoint-dir", f.checkpoint_dir}, {"--trace", f.trace}}) {
    if (!on_rank0 || dir.empty()) {
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
    if (!on_rank0 || path.empty()) {
      continue;
    }
    const fs::path parent = fs::absolute(path).parent_path();
    if (!fs::is_directory(parent)) {
      throw UsageError(std::string(flag) + " " + path + ": directory " + parent.string() +
                       " does not exist");
    }
  }
}

struct Data {
  std::shared_ptr<const meshtrain::TokenFile> train;
  std::shared_ptr<const meshtrain::TokenFile> val; // null: no validation
};

gpt::GPTConfig model_config(const Flags& f) {
  gpt::GPTConfig config;
  config.vocab_size(f.vocab_size)
      .block_size(f.block_size)
      .n_layer(f.n_layer)
      .n_head(f.n_head)
      .n_embd(f.n_embd)
      .dropout(f.dropout)
      .sequence_parallel(f.sequence_parallel)
      .recompute(f.recompute)
      .dropout_seed(f.seed);
  return config;
}

// What a checkpoint must agree on with the run that loads it (and what export and sampling
// rebuild the model from).
std::string model_json(const Flags& f) {
  return nlohmann::json{{"architecture", "nanoGPT"},  {"vocab_size", f.vocab_size},
                        {"block_size", f.block_size}, {"n_layer", f.n_layer},
                        {"n_head", f.n_head},         {"n_embd", f.n_embd}}
      .dump();
}

meshtrain::TrainerOptions trainer_options(const Flags& f) {
  return meshtrain::TrainerOptions()
      .steps(f.steps)
      .global_batch(f.batch_size)
      .micro_batch(f.micro_batch_size)
      .seq_len(f.block_size)
      .shuffle(f.shuffle)
      .data_seed(f.seed)
      .lr(f.lr)
      .min_lr(f.min_lr)
      .warmup_steps(f.warmup)
      .weight_decay(f.weight_decay)
      .grad_clip(f.grad_clip)
      .zero_stage(f.zero)
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

// What every rank must agree on before training (launch/startup_check.h): the library
// versions and every flag that shapes the collectives or the model. Not the rank-0-only
// reporting flags (progress, metrics files) or the threads.
std::vector<meshtrain::SetupField> config_fields(const Flags& f) {
  const nlohmann::json config = {
      {"data", f.data},
      {"val-data", f.val_data},
      {"shuffle", f.shuffle},
      {"block-size", f.block_size},
      {"n-layer", f.n_layer},
      {"n-head", f.n_head},
      {"n-embd", f.n_embd},
      {"vocab-size", f.vocab_size},
      {"dropout", f.dropout},
      {"steps", f.steps},
      {"batch-size", f.batch_size},
      {"micro-batch-size", f.micro_batch_size},
      {"lr", f.lr},
      {"min-lr", f.min_lr},
      {"warmup", f.warmup},
      {"weight-decay", f.weight_decay},
      {"grad-clip", f.grad_clip},
      {"seed", f.seed},
      {"tp", f.tp},
      {"zero", f.zero},
      {"sequence-parallel", f.sequence_parallel},
      {"recompute", meshtrain::to_string(f.recompute)},
      {"precision", f.bf16 ? "bf16" : "fp32"},
      {"val-every", f.val_every},
      {"val-batches", f.val_batches},
      {"max-time", f.max_time},
      {"checkpoint-dir", f.checkpoint_dir},
      {"save-every", f.save_every},
      {"keep-checkpoints", f.keep_checkpoints},
      {"save-at-start", f.save_at_start},
      {"allow-data-change", f.allow_data_change},
      {"resume", f.resume},
      {"init", f.init},
      {"comm-timeout", f.comm_timeout},
      {"nan-policy", f.nan_policy == meshtrain::NanPolicy::kStop ? "stop" : "skip"}};
  auto fields = meshtrain::library_version_fields();
  for (const auto& [name, value] : config.items()) {
    fields.emplace_back("--" + name, value.dump());
  }
  return fields;
}

// The job proper: the same steps and collectives on every rank; rank 0 reports. Returns the
// exit code.
int train(const Flags& f, const meshtrain::Runtime& runtime, const meshtrain::Mesh& mesh,
          const Data& data) {
  const bool rank0 = runtime.rank() == 0;
  const int dp = mesh.group("dp")->size();
  const int dp_rank = mesh.group("dp")->rank();
  const auto config = model_config(f);

  // Same seed on every rank: every rank draws the same master weights and keeps its shard,
  // so any layout starts from the serial model (DESIGN §3 init invariance).
  torch::manual_seed(f.seed);
  meshtrain::RngTrackerPtr rng;
  if (f.dropout > 0) {
    // Each DP replica draws its own masks; the tracker derives the per-TP-rank streams.
    rng = std::make_shared<meshtrain::RngTracker>(
        meshtrain::RngTrackerOptions(f.seed + 1 + 1000003ULL * static_cast<uint64_t>(dp_rank)),
        mesh.group("tp"));
  }
  gpt::GPT model(config, mesh.group("tp"), rng);

  // Where to start: the checkpoint --resume names (or finds), else --init's weights, else
  // the seeded init above.
  std::optional<std::string> resume_from;
  if (f.resume == "latest") {
    resume_from = meshtrain::latest_checkpoint(f.checkpoint_dir);
    if (!resume_from && rank0) {
      std::printf("train_gpt: --resume: no checkpoint in %s yet; starting fresh\n",
                  f.checkpoint_dir.c_str());
    }
  } else if (!f.resume.empty()) {
    resume_from = meshtrain::resolve_checkpoint(f.resume);
  }
  if (!f.init.empty() && !resume_from) {
    // Before the Trainer: its optimizer takes the master weights from the parameters.
    const auto weights = meshtrain::load_safetensors(f.init);
    meshtrain::load_full_weights(*model, weights.tensors, mesh.index("tp"), f.tp, f.init);
    if (rank0) {
      std::printf("train_gpt: initial weights from %s\n", f.init.c_str());
    }
  }
  if (f.bf16) {
    // After the fp32 init (or --init): every layout rounds the same weights. The optimizer
    // keeps fp32 master copies of these; the reducer sums gradients in fp32.
    model->to(torch::kBFloat16);
  }
  // Same flags but another build, or a model code change on some node: stop here.
  meshtrain::check_ranks_agree(mesh.group("world"), meshtrain::parameter_fields(*model),
                               "model's parameter shapes and dtypes");
  auto loss_fn = [model](const meshtrain::MicroBatch& mb) mutable {
    return model->forward(mb.inputs, mb.targets).loss_sum;
  };
  meshtrain::Trainer trainer(model.ptr(), loss_fn, mesh, data.train, data.val, trainer_options(f));

  if (rank0) {
    std::ostringstream out;
    out << "train_gpt: " << runtime.world_size() << " rank(s) ["
        << meshtrain::Runtime::backend_name() << "] = dp " << dp << " x tp " << f.tp << ", ZeRO "
        << f.zero << (f.sequence_parallel ? ", sequence parallel" : "") << ", recompute "
        << meshtrain::to_string(f.recompute) << (f.bf16 ? ", bf16" : ", fp32") << ", "
        << torch::get_num_threads() << " thread(s)/rank\n";
    out << "  model: " << model->num_parameters() << " parameters, vocab " << f.vocab_size
        << " (padded " << model->padded_vocab_size() << "), block " << f.block_size << ", "
        << f.n_layer << " layers, " << f.n_head << " heads, embd " << f.n_embd << ", dropout "
        << f.dropout << "\n";
    out << "  data: " << f.data << " (" << data.train->size() << " tokens"
        << (f.shuffle ? ", shuffled" : "") << "), validation ";
    if (data.val) {
      out << f.val_data << " (" << data.val->size() << " tokens, " << f.val_batches
          << " batches every " << f.val_every << " steps)\n";
    } else {
      out << "none\n";
    }
    out << "  batch " << f.batch_size << " sequences = " << f.batch_size * f.block_size
        << " tokens/step (micro-batch " << f.micro_batch_size << " x "
        << trainer.accumulation_steps() << " micro-steps x dp " << dp << "); " << f.steps
        << " steps, AdamW lr " << f.lr << " warmup " << f.warmup << " cosine to " << f.min_lr
        << ", wd " << f.weight_decay << ", clip " << f.grad_clip;
    if (f.max_time > 0) {
      out << ", time budget " << f.max_time << "s";
    }
    std::printf("%s\n", out.str().c_str());
    std::fflush(stdout);
  }
  std::optional<meshtrain::CheckpointManager> checkpoints;
  if (!f.checkpoint_dir.empty() || resume_from) {
    checkpoints.emplace(meshtrain::CheckpointOptions()
                            .dir(f.checkpoint_dir)
                            .save_every(f.save_every)
                            .keep_last(f.keep_checkpoints)
                            .model_json(model_json(f))
                            .rng_tracker(rng)
                            .allow_data_change(f.allow_data_change));
  }
  if (resume_from && f.resume == "latest") {
    checkpoints->load_latest(f.checkpoint_dir, trainer); // skips a damaged newest one
  } else if (resume_from) {
    checkpoints->load(*resume_from, trainer);
  }
  if (!f.checkpoint_dir.empty()) {
    if (f.save_at_start && trainer.step() == 0) {
      checkpoints->save(trainer);
    }
    trainer.set_checkpoint_hook(checkpoints->hook());
  }
  if (f.count_comm) {
    mesh.group("world")->log()->enable(); // every group of the mesh shares this log
  }
  if (!f.trace.empty()) {
    meshtrain::Tracer::start(runtime.rank()).name_thread("train");
  }
  const auto result = trainer.fit();
  if (!f.trace.empty()) {
    const std::string path = f.trace + "/trace-rank" + std::to_string(runtime.rank()) + ".json";
    meshtrain::Tracer::get()->write(path);
    if (rank0) {
      std::printf("trace: %s/trace-rank<R>.json, one per rank (open in ui.perfetto.dev)\n",
                  f.trace.c_str());
      std::fflush(stdout);
    }
  }
  if (result.reason == meshtrain::StopReason::kNonFinite) {
    if (rank0) {
      std::fprintf(stderr,
                   "train_gpt: error: step %lld: the gradient norm is not finite; stopped before "
                   "applying it (--nan-policy stop; the last checkpoint and the parameters are "
                   "the previous step's)\n",
                   static_cast<long long>(result.steps + 1));
    }
    return kExitFailure;
  }
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  // First: only tensors allocated after it are counted (progress and metrics report them).
  meshtrain::AllocationTracker::install();
  std::unique_ptr<meshtrain::Runtime> runtime;
  try {
    runtime = std::make_unique<meshtrain::Runtime>(&argc, &argv);
  } catch (const std::exception& e) {
    std::cerr << "train_gpt: error: " << message_of(e) << "\n";
    return kExitFailure;
  }
  const CommunicatorPtr& world = runtime->world();
  const bool rank0 = runtime->rank() == 0;

  // Set-up: every failure here is agreed on by all ranks, so all exit cleanly with one code.
  Flags flags;
  Data data;
  std::optional<meshtrain::Mesh> mesh;
  {
    int code = 0;
    std::string message;
    try {
      flags = parse_flags(argc, argv, runtime->world_size());
      if (!flags.help) {
        check_paths(flags, rank0);
        if (flags.threads > 0) {
          torch::set_num_threads(flags.threads);
        }
        // Maps the files and checks every token against the vocab.
        try {
          data.train = std::make_shared<const meshtrain::TokenFile>(flags.data, flags.vocab_size);
          if (!flags.val_data.empty()) {
            data.val =
                std::make_shared<const meshtrain::TokenFile>(flags.val_data, flags.vocab_size);
          }
        } catch (const c10::Error& e) {
          throw UsageError(std::string(e.what_without_backtrace()) + " (--vocab-size " +
                           std::to_string(flags.vocab_size) + ")");
        }
        if ((data.train->size() - 1) / flags.block_size < 1) {
          throw UsageError("--data " + flags.data + " has " + std::to_string(data.train->size()) +
                           " tokens: too few for one sequence of --block-size " +
                           std::to_string(flags.block_size));
        }
        if (data.val && (data.val->size() - 1) / flags.block_size < 1) {
          throw UsageError("--val-data " + flags.val_data + " has " +
                           std::to_string(data.val->size()) +
                           " tokens: too few for one sequence of --block-size " +
                           std::to_string(flags.block_size));
        }
      }
    } catch (const UsageError& e) {
      code = kExitUsage;
      message = e.what();
    } catch (const std::exception& e) {
      code = kExitFailure;
      message = message_of(e);
    }
    if ((code = agree_on_exit(world, code, message, "train_gpt")) != 0) {
      return code;
    }
    if (flags.help) {
      if (rank0) {
        std::cout << make_options().help() << "\n";
      }
      return 0;
    }
    // Every rank runs the same build with the same flags, or none trains.
    try {
      meshtrain::check_ranks_agree(world, config_fields(flags), "configuration");
      runtime->set_comm_timeout(flags.comm_timeout);
    } catch (const c10::Error& e) {
      if (rank0) {
        std::cerr << "train_gpt: error: " << message_of(e) << "\n";
      }
      return kExitUsage;
    }
    // Collective: only after every rank is known to be ready for it.
    mesh.emplace(meshtrain::ParallelDims{/*dp=*/-1, /*tp=*/flags.tp, /*pp=*/1}, world);
  }

  try {
    return train(flags, *runtime, *mesh, data);
  } catch (const std::exception& e) {
    return meshtrain::exit_after_failure("train_gpt", world, e, kExitFailure);
  }
}
