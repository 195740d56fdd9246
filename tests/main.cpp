// defines: the Catch2 main shared by every test: MPI is initialised once per test binary,
// one torch thread per rank, and the exit code is agreed by all ranks (a failure on any
// rank fails the run everywhere).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include "tests/harness.h"

#include <iostream>
#include <memory>

namespace meshtrain::testing {
namespace {
std::unique_ptr<Runtime> g_runtime;
}

Runtime& test_runtime() {
  return *g_runtime;
}

double relative_error(const torch::Tensor& actual, const torch::Tensor& expected) {
  const auto a = actual.detach().to(torch::kDouble);
  const auto e = expected.detach().to(torch::kDouble);
  const double scale = std::max(e.abs().max().item<double>(), 1e-12);
  return (a - e).abs().max().item<double>() / scale;
}

std::string rank_tag() {
  return "rank " + std::to_string(g_runtime->rank()) + ": ";
}

} // namespace meshtrain::testing

int main(int argc, char** argv) {
  using meshtrain::testing::g_runtime;
  g_runtime =
      std::make_unique<meshtrain::Runtime>(&argc, &argv, meshtrain::RuntimeOptions{/*threads=*/1});
  Catch::Session session;
  int rc = session.applyCommandLine(argc, argv);
  if (rc == 0) {
    rc = session.run();
  }
  // A failure on one rank must fail every rank's exit code (mpirun reports the first).
  auto failed = torch::tensor({rc != 0 ? 1 : 0}, torch::kInt);
  g_runtime->world()->all_reduce(failed, meshtrain::ReduceOp::kMax);
  const int agreed = failed.item<int>() != 0 ? 1 : 0;
  g_runtime.reset();
  return agreed != 0 && rc == 0 ? 1 : rc;
}
