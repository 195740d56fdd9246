// defines: main of meshtrain-plan — per-rank memory of a GPT in a layout (memory/planner.h),
// or, given a world size and a budget, the layouts that fit, fastest first.
//
//   meshtrain-plan --dp 2 --zero 1                       one layout: the table of bytes
//   meshtrain-plan --world 4 --budget 64MiB              every layout of 4 ranks that fits
//   meshtrain-plan --n-layer 12 --n-embd 768 --n-head 12 --vocab-size 50257 --block-size 1024 \
//                  --batch-size 32 --world 8 --budget 40GiB --precision bf16
//
// Model flags have train_gpt's names and defaults. No MPI, no tensors: it runs anywhere.
// Exit codes: 0 done, 1 no layout fits the budget, 2 bad command line.
#include "memory/planner.h"

#include <c10/util/Exception.h>
#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <iostream>
#include <string>

namespace {

using meshtrain::MemoryEstimate;
using meshtrain::PlanLayout;
using meshtrain::PlanModel;

struct BadFlag : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// "64MiB", "1.5GiB", "500MB", "1048576" -> bytes.
int64_t parse_bytes(const std::string& text) {
  size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  const std::string unit = text.substr(used);
  double scale = 0;
  if (unit.empty() || unit == "B") {
    scale = 1;
  } else if (unit == "KiB" || unit == "MiB" || unit == "GiB" || unit == "TiB") {
    scale = std::pow(1024.0, 1 + std::string("KMGT").find(unit[0]));
  } else if (unit == "KB" || unit == "MB" || unit == "GB" || unit == "TB") {
    scale = std::pow(1000.0, 1 + std::string("KMGT").find(unit[0]));
  }
  if (used == 0 || scale == 0 || !std::isfinite(value) || value <= 0) {
    throw BadFlag("--budget " + text +
                  ": expected a positive size such as 512MiB, 2GiB, 800MB or a byte count");
  }
  return static_cast<int64_t>(value * scale);
}

std::string mib(int64_t bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.2f", static_cast<double>(bytes) / (1024.0 * 1024.0));
  return text;
}

std::string describe(const PlanLayout& l) {
  std::string s = "dp " + std::to_string(l.dp) + " x tp " + std::to_string(l.tp) + ", ZeRO " +
                  std::to_string(l.zero) + (l.sequence_parallel ? ", sequence parallel" : "") +
                  ", recompute " + meshtrain::to_string(l.recompute) + ", " +
                  meshtrain::to_string(l.precision) + ", batch " + std::to_string(l.global_batch) +
                  " (micro-batch " +
                  std::to_string(l.micro_batch > 0 ? l.micro_batch : l.global_batch / l.dp) + ")";
  return s;
}

nlohmann::json to_json(const MemoryEstimate& m) {
  return {{"parameters", m.parameters},
          {"gradients", m.gradients},
          {"optimizer", m.optimizer},
          {"data", m.data},
          {"state", m.state},
          {"saved_layers", m.saved_layers},
          {"saved_head", m.saved_head},
          {"transient", m.transient},
          {"activation_peak", m.activation_peak},
          {"optimizer_transient", m.optimizer_transient},
          {"peak", m.peak},
          {"parameters_per_rank", m.parameters_per_rank}};
}

void print_estimate(const PlanModel& model, const PlanLayout& layout) {
  const auto m = meshtrain::estimate_memory(model, layout);
  const auto cost = meshtrain::estimate_cost(model, layout);
  std::cout << "GPT L=" << model.n_layer << " C=" << model.n_embd << " heads=" << model.n_head
            << " T=" << model.block_size << " V=" << model.vocab_size << "; " << describe(layout)
            << "\n\n"
            << "per rank                      MiB\n"
            << "  parameters           " << mib(m.parameters) << "   (" << m.parameters_per_rank
            << " elements)\n"
            << "  gradients            " << mib(m.gradients) << "   (fp32 reducer buckets)\n"
            << "  optimizer state      " << mib(m.optimizer) << "   (fp32 master + AdamW moments)\n"
            << "  token batches        " << mib(m.data) << "\n"
            << "  = between steps      " << mib(m.state) << "\n"
            << "  activations, peak    " << mib(m.activation_peak) << "   (blocks "
            << mib(m.saved_layers) << ", head " << mib(m.saved_head) << ", transient "
            << mib(m.transient) << ")\n"
            << "  optimizer step       " << mib(m.optimizer_transient) << "   (AdamW temporaries)\n"
            << "  = peak               " << mib(m.peak) << "   (state + the larger of the two)\n\n"
            << "estimated step: " << cost.step_s * 1e3 << " ms (compute " << cost.compute_s * 1e3
            << " ms, communication " << cost.comm_s * 1e3 << " ms, " << mib(cost.comm_bytes)
            << " MiB per rank)\n";
}

int print_fitting(const PlanModel& model, int64_t world, const PlanLayout& fixed, int64_t budget,
                  int64_t top) {
  const auto ranked = meshtrain::plan_layouts(model, world, fixed, budget);
  if (ranked.empty()) {
    std::cout << "meshtrain-plan: no layout of " << world << " ranks fits " << mib(budget)
              << " MiB per rank (try recompute, ZeRO, more ranks or a smaller micro-batch)\n";
    return 1;
  }
  std::cout << ranked.size() << " layouts of " << world << " ranks fit " << mib(budget)
            << " MiB per rank; the " << std::min<int64_t>(top, ranked.size())
            << " fastest by the cost model:\n\n"
            << "| # | dp | tp | ZeRO | seq par | recompute | micro-batch | peak MiB | state MiB "
               "| activations MiB | est. step ms | comm MiB |\n"
            << "|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  for (int64_t i = 0; i < static_cast<int64_t>(ranked.size()) && i < top; ++i) {
    const auto& r = ranked[i];
    const auto& l = r.layout;
    char ms[32];
    std::snprintf(ms, sizeof ms, "%.1f", r.cost.step_s * 1e3);
    std::cout << "| " << i + 1 << " | " << l.dp << " | " << l.tp << " | " << l.zero << " | "
              << (l.sequence_parallel ? "yes" : "no") << " | " << meshtrain::to_string(l.recompute)
              << " | " << l.micro_batch << " | " << mib(r.memory.peak) << " | "
              << mib(r.memory.state) << " | " << mib(r.memory.activation_peak) << " | " << ms
              << " | " << mib(r.cost.comm_bytes) << " |\n";
  }
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  cxxopts::Options options("meshtrain-plan", "Per-rank memory of a GPT layout, and the layouts "
                                             "that fit a memory budget (docs/memory.md)");
  // clang-format off
  options.add_options("model")
    ("block-size", "sequence length T", cxxopts::value<int64_t>()->default_value("64"))
    ("n-layer", "transformer blocks", cxxopts::value<int64_t>()->default_value("4"))
    ("n-head", "attention heads", cxxopts::value<int64_t>()->default_value("4"))
    ("n-embd", "embedding width C", cxxopts::value<int64_t>()->default_value("128"))
    ("vocab-size", "vocabulary V", cxxopts::value<int64_t>()->default_value("256"))
    ("dropout", "dropout probability", cxxopts::value<double>()->default_value("0"));
  options.add_options("layout")
    ("dp", "data-parallel ranks", cxxopts::value<int64_t>()->default_value("1"))
    ("tp", "tensor-parallel ranks", cxxopts::value<int64_t>()->default_value("1"))
    ("zero", "ZeRO stage 0, 1, 2", cxxopts::value<int>()->default_value("0"))
    ("sequence-parallel", "sequence parallelism (tp > 1)")
    ("recompute", "none, selective or full", cxxopts::value<std::string>()->default_value("none"))
    ("precision", "fp32, bf16 or fp16", cxxopts::value<std::string>()->default_value("fp32"))
    ("batch-size", "global batch B in sequences", cxxopts::value<int64_t>()->default_value("16"))
    ("micro-batch-size", "sequences per forward on one dp rank; 0: B / dp",
     cxxopts::value<int64_t>()->default_value("0"));
  options.add_options("search")
    ("world", "plan for this many ranks: list the layouts that fit --budget",
     cxxopts::value<int64_t>()->default_value("0"))
    ("budget", "memory per rank, e.g. 512MiB, 2GiB, 800MB",
     cxxopts::value<std::string>()->default_value(""))
    ("top", "layouts listed", cxxopts::value<int64_t>()->default_value("15"))
    ("json", "print the one layout's estimate as JSON (bytes)")
    ("h,help", "print this help");
  // clang-format on
  try {
    const auto r = options.parse(argc, argv);
    if (r.count("help") > 0) {
      std::cout << options.help() << "\n";
      return 0;
    }
    if (!r.unmatched().empty()) {
      throw BadFlag("unexpected argument '" + r.unmatched().front() + "' (see --help)");
    }
    PlanModel model;
    model.block_size = r["block-size"].as<int64_t>();
    model.n_layer = r["n-layer"].as<int64_t>();
    model.n_head = r["n-head"].as<int64_t>();
    model.n_embd = r["n-embd"].as<int64_t>();
    model.vocab_size = r["vocab-size"].as<int64_t>();
    model.dropout = r["dropout"].as<double>();
    PlanLayout layout;
    layout.dp = r["dp"].as<int64_t>();
    layout.tp = r["tp"].as<int64_t>();
    layout.zero = r["zero"].as<int>();
    layout.sequence_parallel = r.count("sequence-parallel") > 0;
    layout.recompute = meshtrain::parse_recompute_mode(r["recompute"].as<std::string>());
    layout.precision = meshtrain::parse_precision(r["precision"].as<std::string>());
    layout.global_batch = r["batch-size"].as<int64_t>();
    layout.micro_batch = r["micro-batch-size"].as<int64_t>();

    const int64_t world = r["world"].as<int64_t>();
    const std::string budget = r["budget"].as<std::string>();
    if (world != 0 || !budget.empty()) {
      if (world < 1 || budget.empty()) {
        throw BadFlag("--world N and --budget SIZE go together (world " + std::to_string(world) +
                      ", budget '" + budget + "')");
      }
      const int64_t top = r["top"].as<int64_t>();
      if (top < 1) {
        throw BadFlag("--top " + std::to_string(top) + ": must be >= 1");
      }
      return print_fitting(model, world, layout, parse_bytes(budget), top);
    }
    if (r.count("json") > 0) {
      std::cout << to_json(meshtrain::estimate_memory(model, layout)).dump() << "\n";
    } else {
      print_estimate(model, layout);
    }
    return 0;
  } catch (const cxxopts::exceptions::exception& e) {
    std::cerr << "meshtrain-plan: " << e.what() << " (see --help)\n";
  } catch (const BadFlag& e) {
    std::cerr << "meshtrain-plan: " << e.what() << "\n";
  } catch (const c10::Error& e) {
    std::cerr << "meshtrain-plan: " << e.what_without_backtrace() << "\n";
  }
  return 2;
}
