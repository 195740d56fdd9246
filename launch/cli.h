// defines: the command-line helper every program uses (meshrun, train_gpt, sample_gpt,
// meshtrain-plan, meshtrain-export, train_mnist, the benchmark programs): UsageError and the
// exit codes, the number / size / boolean parsers, ParsedFlags (cxxopts with typed getters
// that name the flag in every error), and the flag groups declared once:
//   layout     --tp --cp --zero --sequence-parallel --recompute --precision --batch-size
//              --micro-batch-size                       -> ParallelPlan (not yet validated)
//   model      the GPT's shape (--n-layer ...)          -> PlanModel (memory/planner.h)
// (launch/training_flags.h adds the training programs' data, optimization, reporting and
// checkpoint flags.) A layout is validated only by ParallelPlan::validate; validate_layout
// turns its LayoutError into a UsageError.
//
// Pure C++ without LibTorch (meshrun links it). Booleans take every spelling a user tries:
// --shuffle, --shuffle true, --shuffle=false. A flag name of one letter is shown as "-n".
#pragma once

#include "meshtrain/memory/planner.h"
#include "meshtrain/parallel/parallel_plan.h"

#include <cxxopts.hpp>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace meshtrain::cli {

constexpr int kExitFailure = 1; // the job failed at run time
constexpr int kExitUsage = 2;   // a bad command line, file or layout: nothing ran

// The largest count a flag takes where no smaller limit applies (steps, batch, ...).
constexpr int64_t kMaxCount = int64_t{1} << 40;

// A bad command line: the message names the flag, the value and what is allowed.
class UsageError : public std::runtime_error {
public:
  using std::runtime_error::runtime_error;
};

// "--name", or "-n" for a one-letter name: how messages show a flag.
std::string dashed(const std::string& name);

// The whole text as an integer in [lo, hi]; else UsageError "--<flag> <text>: ...". `flag` is
// the name without dashes.
int64_t parse_int(const std::string& flag, const std::string& text, int64_t lo, int64_t hi);
// The whole text as a finite number in [lo, hi] ([lo, hi) with hi_open).
double parse_double(const std::string& flag, const std::string& text, double lo, double hi,
                    bool hi_open = false);
// An unsigned 64-bit integer (seeds): no sign, no wrap-around.
uint64_t parse_uint64(const std::string& flag, const std::string& text);
// true/false (also 1/0, yes/no, on/off).
bool parse_bool(const std::string& flag, const std::string& text);
// A byte size: "64MiB" (or "64M"), "1.5GiB", "500MB", "1048576" (> 0).
int64_t parse_size(const std::string& flag, const std::string& text);

// parse(value) for an enum flag, its error (LayoutError, c10::Error, ...) as a UsageError
// "--<flag> <value>: <what the parser said>".
template <typename Enum, typename Parse>
Enum parse_choice(const std::string& flag, const std::string& value, Parse parse) {
  try {
    return parse(value);
  } catch (const std::exception& e) {
    throw UsageError(dashed(flag) + " " + value + ": " + e.what());
  }
}

// Flag values for cxxopts: a text with a default, and a boolean (--x alone means true).
std::shared_ptr<cxxopts::Value> text(const std::string& default_value);
std::shared_ptr<cxxopts::Value> boolean(bool default_value = false);

// cxxopts' result with getters that parse and name the flag. Every option must be declared
// with text() or boolean() (values are parsed here, not by cxxopts).
class ParsedFlags {
public:
  // Throws UsageError for an unknown flag, a missing value or a stray argument.
  ParsedFlags(cxxopts::Options& options, int argc, char** argv);

  bool help() const { return result_.count("help") > 0; }
  bool given(const std::string& name) const { return result_.count(name) > 0; }
  std::string str(const std::string& name) const;
  int64_t integer(const std::string& name, int64_t lo, int64_t hi) const;
  double number(const std::string& name, double lo, double hi, bool hi_open = false) const;
  bool flag(const std::string& name) const;

private:
  cxxopts::ParseResult result_;
};

// ---- the layout (ParallelPlan) ----------------------------------------------------------
// --tp and --cp default to MESHTRAIN_TP and MESHTRAIN_CP (meshrun --tp/--cp export them),
// else 1.
void add_layout_flags(cxxopts::Options& options, int64_t default_batch = 16);
// The plan the flags describe (dp inferred: -1); ParallelPlan::validate checks it.
ParallelPlan read_layout_flags(const ParsedFlags& flags);
// plan.validate(world, model), its LayoutError as a UsageError.
ParallelPlan validate_layout(const ParallelPlan& plan, int world_size, const ModelShape& model);

// ---- the GPT's shape ----------------------------------------------------------------------
void add_model_flags(cxxopts::Options& options);
PlanModel read_model_flags(const ParsedFlags& flags);
// The model flags as (flag, value): for the start-up agreement.
std::vector<std::pair<std::string, std::string>> model_fields(const PlanModel& model);

} // namespace meshtrain::cli
