// defines: test_runtime() — the process's Runtime, started once by tests/main.cpp before
// Catch2 runs; world_size()-dependent helpers for multi-rank tests.
//
// Tagging: a test case tagged [mpi] is registered in CTest at -np 2 and -np 4 (and must hold
// for any world size); every other test case runs on one process.
#pragma once

#include "meshtrain/core/runtime.h"

#include <torch/torch.h>

#include <string>

namespace meshtrain::testing {

Runtime& test_runtime();

// Relative difference max|a-b| / max(max|b|, tiny), for "within 1e-5 relative" checks.
double relative_error(const torch::Tensor& actual, const torch::Tensor& expected);

// "rank R: " prefix for messages of multi-rank checks.
std::string rank_tag();

} // namespace meshtrain::testing
