// defines: main of mnist_compare_weights — compares two safetensors files written by
// train_mnist --save-weights, tensor by tensor, and fails when any tensor differs by more
// than a relative tolerance. The DP=1 vs DP=2 parity test (dp_parity.cmake) is built on it.
//
//   mnist_compare_weights A.safetensors B.safetensors [--tolerance 1e-5]
//   mnist_compare_weights FINAL.safetensors INITIAL.safetensors --min-change 1e-3
//
// Relative difference of a tensor: max|a - b| / max(max|b|, 1e-12), the measure of the
// layout-invariance rule (DESIGN §3). With --min-change the test is the other way round:
// every tensor must differ by more than that (the run moved every weight: a parity check of
// weights that never left their initial values would prove nothing). Exit codes: 0 the test
// holds, 1 not (or unreadable files, different names or shapes), 2 bad command line.
#include "meshtrain/core/safetensors.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

constexpr const char* kUsage =
    "usage: mnist_compare_weights A.safetensors B.safetensors [--tolerance 1e-5]\n"
    "       mnist_compare_weights FINAL.safetensors INITIAL.safetensors --min-change 1e-3\n";

std::string shape_of(const torch::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

// min_change < 0: every tensor within `tolerance`; else every tensor differs by more than
// min_change.
int compare(const std::string& path_a, const std::string& path_b, double tolerance,
            double min_change) {
  const auto a = meshtrain::load_safetensors(path_a);
  const auto b = meshtrain::load_safetensors(path_b);
  bool ok = true;
  if (a.tensors.size() != b.tensors.size()) {
    std::printf("%s has %zu tensors, %s has %zu\n", path_a.c_str(), a.tensors.size(),
                path_b.c_str(), b.tensors.size());
    ok = false;
  }
  double worst = 0;
  double least = 0;
  std::string worst_name;
  std::printf("%-20s %-12s %14s %14s\n", "tensor", "shape", "max |a-b|", "relative");
  for (const auto& [name, ta] : a.tensors) {
    if (!b.contains(name)) {
      std::printf("%-20s missing from %s\n", name.c_str(), path_b.c_str());
      ok = false;
      continue;
    }
    const auto& tb = b.at(name);
    if (!ta.sizes().equals(tb.sizes())) {
      std::printf("%-20s shape %s in %s but %s in %s\n", name.c_str(), shape_of(ta).c_str(),
                  path_a.c_str(), shape_of(tb).c_str(), path_b.c_str());
      ok = false;
      continue;
    }
    const auto da = ta.to(torch::kDouble);
    const auto db = tb.to(torch::kDouble);
    const double abs_diff = ta.numel() == 0 ? 0.0 : (da - db).abs().max().item<double>();
    const double scale = ta.numel() == 0 ? 1.0 : std::max(db.abs().max().item<double>(), 1e-12);
    const double rel = abs_diff / scale;
    std::printf("%-20s %-12s %14.3e %14.3e\n", name.c_str(), shape_of(ta).c_str(), abs_diff, rel);
    if (min_change >= 0) {
      // NaN never compares > min_change: a diverged run is no proof of training either.
      if (!(rel > min_change)) {
        std::printf("%-20s did not move: relative change %.3e, at most %.1e\n", name.c_str(), rel,
                    min_change);
        ok = false;
      }
      if (worst_name.empty() || !(rel >= least)) {
        least = rel;
        worst_name = name;
      }
      continue;
    }
    // NaN never compares <= tolerance, so a diverged run fails too.
    if (!(rel <= tolerance)) {
      ok = false;
    }
    if (!(rel <= worst)) {
      worst = rel;
      worst_name = name;
    }
  }
  if (min_change >= 0) {
    std::printf("smallest relative change %.3e (%s), required > %.1e: %s\n", least,
                worst_name.empty() ? "-" : worst_name.c_str(), min_change,
                ok ? "OK" : "FAIL (the weights did not move)");
    return ok ? 0 : 1;
  }
  std::printf("max relative difference %.3e (%s), tolerance %.1e: %s\n", worst,
              worst_name.empty() ? "-" : worst_name.c_str(), tolerance, ok ? "OK" : "FAIL");
  return ok ? 0 : 1;
}

} // namespace

int main(int argc, char** argv) {
  std::vector<std::string> files;
  double tolerance = 1e-5;
  double min_change = -1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      return 0;
    }
    if (arg == "--tolerance" || arg == "--min-change") {
      const std::string text = i + 1 < argc ? argv[++i] : "";
      char* end = nullptr;
      const double value = std::strtod(text.c_str(), &end);
      if (text.empty() || *end != '\0' || !std::isfinite(value) || value < 0) {
        std::cerr << "mnist_compare_weights: " << arg << " '" << text
                  << "': must be a finite number >= 0\n"
                  << kUsage;
        return 2;
      }
      (arg == "--tolerance" ? tolerance : min_change) = value;
    } else if (arg.rfind("--", 0) == 0) {
      std::cerr << "mnist_compare_weights: unknown flag " << arg << "\n" << kUsage;
      return 2;
    } else {
      files.push_back(arg);
    }
  }
  if (files.size() != 2) {
    std::cerr << "mnist_compare_weights: expected 2 files, got " << files.size() << "\n" << kUsage;
    return 2;
  }
  try {
    return compare(files[0], files[1], tolerance, min_change);
  } catch (const c10::Error& e) {
    std::cerr << "mnist_compare_weights: error: " << e.what_without_backtrace() << "\n";
    return 1;
  }
}
