// defines: main of mnist_compare_weights — compares two safetensors files written by
// train_mnist --save-weights, tensor by tensor, and fails when any tensor differs by more
// than a relative tolerance. The DP=1 vs DP=2 parity test (dp_parity.cmake) is built on it.
//
//   mnist_compare_weights A.safetensors B.safetensors [--tolerance 1e-5]
//
// Relative difference of a tensor: max|a - b| / max(max|b|, 1e-12), the measure of the
// layout-invariance rule (DESIGN §3). Exit codes: 0 within tolerance, 1 not (or unreadable
// files, different names or shapes), 2 bad command line.
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
    "usage: mnist_compare_weights A.safetensors B.safetensors [--tolerance 1e-5]\n";

std::string shape_of(const torch::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

int compare(const std::string& path_a, const std::string& path_b, double tolerance) {
  const auto a = meshtrain::load_safetensors(path_a);
  const auto b = meshtrain::load_safetensors(path_b);
  bool ok = true;
  if (a.tensors.size() != b.tensors.size()) {
    std::printf("%s has %zu tensors, %s has %zu\n", path_a.c_str(), a.tensors.size(),
                path_b.c_str(), b.tensors.size());
    ok = false;
  }
  double worst = 0;
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
    // NaN never compares <= tolerance, so a diverged run fails too.
    if (!(rel <= tolerance)) {
      ok = false;
    }
    if (!(rel <= worst)) {
      worst = rel;
      worst_name = name;
    }
  }
  std::printf("max relative difference %.3e (%s), tolerance %.1e: %s\n", worst,
              worst_name.empty() ? "-" : worst_name.c_str(), tolerance, ok ? "OK" : "FAIL");
  return ok ? 0 : 1;
}

} // namespace

int main(int argc, char** argv) {
  std::vector<std::string> files;
  double tolerance = 1e-5;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      return 0;
    }
    if (arg == "--tolerance") {
      const std::string text = i + 1 < argc ? argv[++i] : "";
      char* end = nullptr;
      tolerance = std::strtod(text.c_str(), &end);
      if (text.empty() || *end != '\0' || !std::isfinite(tolerance) || tolerance < 0) {
        std::cerr << "mnist_compare_weights: --tolerance '" << text
                  << "': must be a finite number >= 0\n"
                  << kUsage;
        return 2;
      }
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
    return compare(files[0], files[1], tolerance);
  } catch (const c10::Error& e) {
    std::cerr << "mnist_compare_weights: error: " << e.what_without_backtrace() << "\n";
    return 1;
  }
}
