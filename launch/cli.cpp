// defines: the command-line helper (see cli.h).
#include "meshtrain/launch/cli.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <set>
#include <sstream>

namespace meshtrain::cli {
namespace {

namespace fs = std::filesystem;

std::string range_text(double lo, double hi, bool hi_open) {
  std::ostringstream out;
  out << "[" << lo << ", " << hi << (hi_open ? ")" : "]");
  return out.str();
}

// The long names of the options declared with boolean() (implicit value "true").
std::set<std::string> boolean_flags(const cxxopts::Options& options) {
  std::set<std::string> names;
  for (const auto& group : options.groups()) {
    for (const auto& option : options.group_help(group).options) {
      if (option.has_implicit && option.implicit_value == "true") {
        for (const auto& name : option.l) {
          names.insert(name);
        }
      }
    }
  }
  return names;
}

bool is_boolean_word(const std::string& word) {
  static const std::set<std::string> words = {"true", "false", "1", "0", "yes", "no", "on", "off"};
  return words.count(word) > 0;
}

// meshrun exports its --tp and --cp to the ranks (MESHTRAIN_TP, MESHTRAIN_CP); programs take
// them as their defaults.
std::string default_from_env(const char* name) {
  const char* env = std::getenv(name);
  return env != nullptr && *env != '\0' ? env : "1";
}

} // namespace

std::string dashed(const std::string& name) {
  return (name.size() == 1 ? "-" : "--") + name;
}

int64_t parse_int(const std::string& flag, const std::string& value, int64_t lo, int64_t hi) {
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || errno == ERANGE) {
    throw UsageError(dashed(flag) + " " + value + ": not an integer");
  }
  if (v < lo || v > hi) {
    throw UsageError(dashed(flag) + " " + value + ": must be in [" + std::to_string(lo) + ", " +
                     std::to_string(hi) + "]");
  }
  return v;
}

double parse_double(const std::string& flag, const std::string& value, double lo, double hi,
                    bool hi_open) {
  errno = 0;
  char* end = nullptr;
  const double v = std::strtod(value.c_str(), &end);
  if (value.empty() || *end != '\0' || errno == ERANGE || !std::isfinite(v)) {
    throw UsageError(dashed(flag) + " " + value + ": not a finite number");
  }
  if (v < lo || v > hi || (hi_open && v == hi)) {
    throw UsageError(dashed(flag) + " " + value + ": must be in " + range_text(lo, hi, hi_open));
  }
  return v;
}

uint64_t parse_uint64(const std::string& flag, const std::string& value) {
  errno = 0;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(value.c_str(), &end, 10);
  // strtoull accepts "-1" (wrapping it), so a sign is refused explicitly.
  if (value.empty() || *end != '\0' || errno == ERANGE || value[0] == '-' || value[0] == '+') {
    throw UsageError(dashed(flag) + " " + value + ": must be an integer in [0, 2^64)");
  }
  return v;
}

bool parse_bool(const std::string& flag, const std::string& value) {
  if (value == "true" || value == "1" || value == "yes" || value == "on") {
    return true;
  }
  if (value == "false" || value == "0" || value == "no" || value == "off") {
    return false;
  }
  throw UsageError(dashed(flag) + " " + value + ": must be true or false");
}

int64_t parse_size(const std::string& flag, const std::string& value) {
  size_t used = 0;
  double number = 0;
  try {
    number = std::stod(value, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  const std::string unit = value.substr(used);
  double scale = 0;
  if (unit.empty() || unit == "B") {
    scale = 1;
  } else if (unit == "KiB" || unit == "MiB" || unit == "GiB" || unit == "TiB") {
    scale = std::pow(1024.0, 1 + std::string("KMGT").find(unit[0]));
  } else if (unit == "KB" || unit == "MB" || unit == "GB" || unit == "TB") {
    scale = std::pow(1000.0, 1 + std::string("KMGT").find(unit[0]));
  } else if (unit == "K" || unit == "M" || unit == "G" || unit == "T") {
    scale = std::pow(1024.0, 1 + std::string("KMGT").find(unit[0])); // nccl-tests' spelling
  }
  if (used == 0 || scale == 0 || !std::isfinite(number) || number <= 0 || number * scale > 9.0e18) {
    throw UsageError(
        dashed(flag) + " " + value +
        ": expected a positive size such as 512MiB (or 512M), 2GiB, 800MB or a byte count");
  }
  return static_cast<int64_t>(number * scale);
}

std::shared_ptr<cxxopts::Value> text(const std::string& default_value) {
  return cxxopts::value<std::string>()->default_value(default_value);
}

std::shared_ptr<cxxopts::Value> boolean(bool default_value) {
  return cxxopts::value<std::string>()
      ->default_value(default_value ? "true" : "false")
      ->implicit_value("true");
}

ParsedFlags::ParsedFlags(cxxopts::Options& options, int argc, char** argv) {
  // "--flag false" becomes "--flag=false" for the boolean flags: cxxopts would otherwise
  // take "false" for a stray argument (an implicit value never consumes the next word).
  const auto booleans = boolean_flags(options);
  std::vector<std::string> args;
  for (int i = 0; i < argc; ++i) {
    std::string arg = argv[i];
    if (i > 0 && i + 1 < argc && arg.rfind("--", 0) == 0 && booleans.count(arg.substr(2)) > 0 &&
        is_boolean_word(argv[i + 1])) {
      arg += std::string("=") + argv[++i];
    }
    args.push_back(std::move(arg));
  }
  std::vector<const char*> pointers;
  for (const auto& arg : args) {
    pointers.push_back(arg.c_str());
  }
  try {
    result_ = options.parse(static_cast<int>(pointers.size()), pointers.data());
  } catch (const cxxopts::exceptions::exception& e) {
    throw UsageError(std::string(e.what()) + " (see --help)");
  }
  if (!result_.unmatched().empty()) {
    throw UsageError("unexpected argument '" + result_.unmatched().front() + "' (see --help)");
  }
}

std::string ParsedFlags::str(const std::string& name) const {
  return result_[name].as<std::string>();
}

int64_t ParsedFlags::integer(const std::string& name, int64_t lo, int64_t hi) const {
  return parse_int(name, str(name), lo, hi);
}

double ParsedFlags::number(const std::string& name, double lo, double hi, bool hi_open) const {
  return parse_double(name, str(name), lo, hi, hi_open);
}

bool ParsedFlags::flag(const std::string& name) const {
  return parse_bool(name, str(name));
}

void add_layout_flags(cxxopts::Options& options, int64_t default_batch) {
  // clang-format off
  options.add_options("parallelism")
    ("batch-size", "global batch B in sequences, over all DP ranks",
     text(std::to_string(default_batch)))
    ("micro-batch-size", "sequences per forward on one DP rank; 0: B / dp (no accumulation)",
     text("0"))
    ("tp", "tensor-parallel ranks (must divide the world size and n-head); default: "
           "MESHTRAIN_TP (set by meshrun --tp) or 1", text(default_from_env("MESHTRAIN_TP")))
    ("cp", "context-parallel ranks: each holds 2 of 2 cp chunks of every sequence, attention "
           "is ring attention (2 cp must divide --block-size); default: MESHTRAIN_CP (set by "
           "meshrun --cp) or 1", text(default_from_env("MESHTRAIN_CP")))
    ("pp", "pipeline stages (ranks; pp x tp x cp must divide the world size); default: "
           "MESHTRAIN_PP (set by meshrun --pp) or 1", text(default_from_env("MESHTRAIN_PP")))
    ("pp-schedule", "pipeline schedule: gpipe, 1f1b, interleaved (with --virtual-stages) or "
                    "zb-h1 (zero bubble, the backward split in input and weight gradients)",
     text("1f1b"))
    ("virtual-stages", "interleaved: model chunks per pipeline rank", text("1"))
    ("pp-layout", "blocks of each pipeline stage, comma-separated (pp x virtual stages "
                  "numbers); default: an even split", text(""))
    ("zero", "ZeRO stage: 0, 1 (optimizer state sharded over dp), 2 (+ gradients), 3 (+ "
             "parameters, gathered a block at a time)", text("0"))
    ("reshard-after-forward", "ZeRO-3: free a block's gathered parameters after its forward "
                              "and gather them again for backward (=false: keep them)",
     boolean(true))
    ("prefetch", "ZeRO-3: blocks gathered ahead of the running one", text("1"))
    ("sequence-parallel", "sequence parallelism between the TP regions (tp > 1)", boolean())
    ("recompute", "activation recomputation: none, selective (the attention core) or full "
                  "(every transformer block)", text("none"))
    ("precision", "fp32, or bf16: the mixed-precision policy (bf16 matrix products on weight "
                  "copies cast once per step; fp32 master weights, norms, softmax statistics, "
                  "loss, optimizer and gradient reduction)", text("fp32"));
  // clang-format on
}

ParallelPlan read_layout_flags(const ParsedFlags& flags) {
  ParallelPlan plan;
  plan.global_batch = flags.integer("batch-size", 1, kMaxCount);
  plan.micro_batch = flags.integer("micro-batch-size", 0, kMaxCount);
  plan.dims.tp = static_cast<int>(flags.integer("tp", 1, 1 << 16));
  plan.dims.cp = static_cast<int>(flags.integer("cp", 1, 1 << 16));
  plan.dims.pp = static_cast<int>(flags.integer("pp", 1, 1 << 16));
  plan.pp_schedule = parse_choice<PipelineSchedule>("pp-schedule", flags.str("pp-schedule"),
                                                    parse_pipeline_schedule);
  plan.virtual_stages = static_cast<int>(flags.integer("virtual-stages", 1, 1 << 10));
  const std::string layout = flags.str("pp-layout");
  for (size_t begin = 0; !layout.empty() && begin <= layout.size();) {
    const size_t end = std::min(layout.find(',', begin), layout.size());
    plan.pp_layout.push_back(parse_int("pp-layout", layout.substr(begin, end - begin), 1, 1 << 20));
    begin = end + 1;
  }
  plan.zero_stage = static_cast<int>(flags.integer("zero", 0, 1 << 16));
  plan.reshard_after_forward = flags.flag("reshard-after-forward");
  plan.prefetch = static_cast<int>(flags.integer("prefetch", 0, 1 << 16));
  plan.sequence_parallel = flags.flag("sequence-parallel");
  plan.recompute =
      parse_choice<RecomputeMode>("recompute", flags.str("recompute"), parse_recompute_mode);
  plan.precision = parse_choice<Precision>("precision", flags.str("precision"), parse_precision);
  return plan;
}

ParallelPlan validate_layout(const ParallelPlan& plan, int world_size, const ModelShape& model) {
  try {
    return plan.validate(world_size, model);
  } catch (const LayoutError& e) {
    throw UsageError("layout on " + std::to_string(world_size) +
                     (world_size == 1 ? " rank: " : " ranks: ") + e.what());
  }
}

void add_model_flags(cxxopts::Options& options) {
  // clang-format off
  options.add_options("model")
    ("block-size", "sequence length T (also the rows of wpe)", text("64"))
    ("n-layer", "transformer blocks", text("4"))
    ("n-head", "attention heads", text("4"))
    ("n-embd", "embedding width C", text("128"))
    ("vocab-size", "vocabulary V (byte-level text: 256); every token must be < V", text("256"))
    ("dropout", "dropout probability (embeddings, attention, residuals)", text("0"));
  // clang-format on
}

PlanModel read_model_flags(const ParsedFlags& flags) {
  PlanModel m;
  m.block_size = flags.integer("block-size", 1, 1 << 20);
  m.n_layer = flags.integer("n-layer", 1, 1 << 12);
  m.n_head = flags.integer("n-head", 1, 1 << 12);
  m.n_embd = flags.integer("n-embd", 1, 1 << 20);
  m.vocab_size = flags.integer("vocab-size", 1, 65536);
  m.dropout = flags.number("dropout", 0.0, 1.0, /*hi_open=*/true);
  if (m.n_embd % m.n_head != 0) {
    throw UsageError("--n-embd " + std::to_string(m.n_embd) + " must be divisible by --n-head " +
                     std::to_string(m.n_head) + " (heads of equal width)");
  }
  return m;
}

std::vector<std::pair<std::string, std::string>> model_fields(const PlanModel& m) {
  return {{"--block-size", std::to_string(m.block_size)}, {"--n-layer", std::to_string(m.n_layer)},
          {"--n-head", std::to_string(m.n_head)},         {"--n-embd", std::to_string(m.n_embd)},
          {"--vocab-size", std::to_string(m.vocab_size)}, {"--dropout", std::to_string(m.dropout)}};
}

} // namespace meshtrain::cli
