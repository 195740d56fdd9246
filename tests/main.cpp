// defines: the Catch2 main shared by every test: MPI is initialised once per test binary,
// one torch thread per rank, a run on another world size than MESHTRAIN_TEST_WORLD_SIZE is
// refused, a listing exits 0, and the exit code is agreed by all ranks (a failure on any rank
// fails the run everywhere); all_close and relative_change (tests/harness.h).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include "tests/harness.h"

#include <cmath>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <sstream>
#include <vector>

namespace meshtrain::testing {
namespace {
std::unique_ptr<Runtime> g_runtime;
}

Runtime& test_runtime() {
  return *g_runtime;
}

Closeness all_close(const torch::Tensor& actual, const torch::Tensor& expected, double rtol,
                    double atol) {
  Closeness result;
  if (!actual.sizes().equals(expected.sizes())) {
    std::ostringstream s;
    s << "sizes differ: actual " << actual.sizes() << ", expected " << expected.sizes();
    return {false, s.str()};
  }
  const auto a = actual.detach().to(torch::kCPU, torch::kDouble).reshape({-1});
  const auto e = expected.detach().to(torch::kCPU, torch::kDouble).reshape({-1});
  const auto diff = (a - e).abs();
  const auto allowed = atol + rtol * e.abs();
  // Infinities are close only to themselves (a == e), as in torch.isclose; NaN to nothing.
  const auto close = (a == e) | (a.isfinite() & e.isfinite() & (diff <= allowed));
  const int64_t failing = (~close).sum().item<int64_t>();
  if (failing == 0) {
    return result;
  }
  // The worst element: the largest excess over what was allowed (NaN counts as infinite).
  const auto excess = torch::where(close, torch::full_like(diff, -1.0),
                                   torch::nan_to_num(diff - allowed, /*nan=*/INFINITY));
  const int64_t worst = excess.argmax().item<int64_t>();
  std::ostringstream s;
  s.precision(9);
  s << failing << " of " << a.numel() << " elements differ by more than atol " << atol << " + rtol "
    << rtol << " x |expected|; worst at flat index " << worst;
  if (actual.dim() > 1) {
    s << " (index [";
    int64_t rest = worst;
    std::vector<int64_t> index(actual.dim());
    for (int64_t d = actual.dim() - 1; d >= 0; --d) {
      index[d] = rest % actual.size(d);
      rest /= actual.size(d);
    }
    for (size_t d = 0; d < index.size(); ++d) {
      s << (d > 0 ? ", " : "") << index[d];
    }
    s << "] of sizes " << actual.sizes() << ")";
  }
  s << ": actual " << a[worst].item<double>() << ", expected " << e[worst].item<double>()
    << ", |difference| " << diff[worst].item<double>() << " > allowed "
    << allowed[worst].item<double>();
  return {false, s.str()};
}

double relative_change(const torch::Tensor& actual, const torch::Tensor& reference) {
  const auto a = actual.detach().to(torch::kDouble);
  const auto r = reference.detach().to(torch::kDouble);
  const double scale = std::max(r.abs().max().item<double>(), 1e-12);
  return (a - r).abs().max().item<double>() / scale;
}

std::string rank_tag() {
  return "rank " + std::to_string(g_runtime->rank()) + ": ";
}

} // namespace meshtrain::testing

// Under -DMESHTRAIN_SANITIZE=ON (scripts/sanitize.sh): a sanitizer report fails the test run,
// whatever the environment; leaks are not checked (OpenMPI and LibTorch keep allocations alive
// to exit by design).
#if defined(__SANITIZE_ADDRESS__)
extern "C" const char* __asan_default_options() {
  return "detect_leaks=0";
}
extern "C" const char* __ubsan_default_options() {
  return "halt_on_error=1:print_stacktrace=1";
}
#endif

namespace {

// A run that MESHTRAIN_TEST_WORLD_SIZE says needs another world size: "" when it is right (or
// not set), else the message. Without this, ranks that came up as separate single processes
// (or another -np) would take the tests' many world-size-1 paths and pass.
std::string world_size_error(int world_size) {
  const char* env = std::getenv("MESHTRAIN_TEST_WORLD_SIZE");
  if (env == nullptr || *env == '\0') {
    return "";
  }
  const std::string want = env;
  if (want == std::to_string(world_size)) {
    return "";
  }
  return "meshtrain_tests: this run has " + std::to_string(world_size) +
         " rank(s), but the test was registered for MESHTRAIN_TEST_WORLD_SIZE=" + want +
         " (start it with mpirun -np " + want +
         "; separate single processes or another -np would pass on the wrong thing)";
}

} // namespace

int main(int argc, char** argv) {
  using meshtrain::testing::g_runtime;
  g_runtime =
      std::make_unique<meshtrain::Runtime>(&argc, &argv, meshtrain::RuntimeOptions{/*threads=*/1});
  Catch::Session session;
  int rc = session.applyCommandLine(argc, argv);
  const auto& config = session.configData();
  const bool listing =
      config.listTests || config.listTestNamesOnly || config.listTags || config.listReporters;
  if (rc == 0 && !listing) {
    const std::string error = world_size_error(g_runtime->world_size());
    if (!error.empty()) {
      std::cerr << error << "\n";
      rc = 2;
    }
  }
  if (rc == 0) {
    rc = session.run();
    if (listing) {
      rc = 0; // Catch2 returns how many it listed; cmake/DiscoverTests.cmake wants 0 or a failure
    }
  }
  // A failure on one rank must fail every rank's exit code (mpirun reports the first).
  auto failed = torch::tensor({rc != 0 ? 1 : 0}, torch::kInt);
  g_runtime->world()->all_reduce(failed, meshtrain::ReduceOp::kMax);
  const int agreed = failed.item<int>() != 0 ? 1 : 0;
  g_runtime.reset();
  return agreed != 0 && rc == 0 ? 1 : rc;
}
