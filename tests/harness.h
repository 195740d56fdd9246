// defines: test_runtime() — the process's Runtime, started once by tests/main.cpp before
// Catch2 runs; all_close (elementwise closeness, as torch.allclose) and Closeness; rank_tag;
// world_size()-dependent helpers for multi-rank tests.
//
// Tagging: a test case tagged [mpi] is registered in CTest at -np 2 and -np 4 (and must hold
// for any world size); every other test case runs on one process. CTest passes the world size
// a test was registered for in MESHTRAIN_TEST_WORLD_SIZE, and the test main refuses to run on
// any other (cmake/DiscoverTests.cmake).
#pragma once

#include "meshtrain/core/runtime.h"

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <string>

namespace meshtrain::testing {

Runtime& test_runtime();

// The verdict of all_close: true when every element is close; otherwise `message` says how
// many elements are not and names the worst one (its index, both values, the error and what
// was allowed). CHECK(all_close(...)) prints the message when it fails.
struct Closeness {
  bool ok = true;
  std::string message;
  explicit operator bool() const { return ok; }
};

// Elementwise, as torch.allclose: |actual - expected| <= atol + rtol * |expected| for every
// element (equal infinities pass, NaN fails; the sizes must be equal). Unlike a measure
// normalised by the largest element, an error in a small element is not hidden by a large one.
Closeness all_close(const torch::Tensor& actual, const torch::Tensor& expected, double rtol,
                    double atol);

// max|a - b| / max|b|: how far a tensor moved from a reference, relative to the reference's
// largest element. Only for "it changed" checks; closeness is checked with all_close.
double relative_change(const torch::Tensor& actual, const torch::Tensor& reference);

// "rank R: " prefix for messages of multi-rank checks.
std::string rank_tag();

} // namespace meshtrain::testing

namespace Catch {
template <> struct StringMaker<meshtrain::testing::Closeness> {
  static std::string convert(const meshtrain::testing::Closeness& c) {
    return c.ok ? "all close" : c.message;
  }
};
} // namespace Catch
