// Tests of the test harness itself (tests/harness.h): all_close compares elementwise, as
// torch.allclose, so an error in a small element is not hidden by a large element, and its
// message names the worst element with both values.
#include <catch2/catch.hpp>

#include "tests/harness.h"

#include <limits>

using namespace meshtrain::testing;

TEST_CASE("harness: all_close catches an error in a small element that a measure normalised by "
          "the largest element hides",
          "[harness]") {
  const auto expected = torch::tensor({1000.0, 2e-3}, torch::kDouble);
  const auto actual = torch::tensor({1000.0, 1e-3}, torch::kDouble);
  // max|a - e| / max|e| = 1e-3 / 1000 = 1e-6: within 1e-5, although the second element is
  // off by half of itself.
  const auto close = all_close(actual, expected, 1e-5, 1e-8);
  CHECK_FALSE(close.ok);
  CHECK_THAT(close.message, Catch::Contains("1 of 2 elements differ by more than atol 1e-08 + "
                                            "rtol 1e-05 x |expected|") &&
                                Catch::Contains("worst at flat index 1: actual 0.001, expected "
                                                "0.002, |difference| 0.001 > allowed"));
  // Within the tolerance: each element on its own.
  CHECK(all_close(actual, expected, 0.5, 0));
  CHECK(all_close(expected * (1 + 1e-7), expected, 1e-6, 0));
  CHECK_FALSE(all_close(expected * (1 + 1e-5), expected, 1e-6, 0));
}

TEST_CASE("harness: all_close names the worst element's index, and treats NaN, infinities and "
          "sizes as torch.allclose does",
          "[harness]") {
  auto expected = torch::zeros({2, 3});
  auto actual = expected.clone();
  actual[1][2] = 0.5f;
  actual[0][1] = 0.25f;
  const auto two = all_close(actual, expected, 1e-5, 1e-3);
  CHECK_FALSE(two.ok);
  CHECK_THAT(two.message, Catch::Contains("2 of 6 elements") &&
                              Catch::Contains("flat index 5 (index [1, 2] of sizes [2, 3])") &&
                              Catch::Contains("actual 0.5, expected 0"));
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  CHECK(all_close(torch::tensor({inf, -inf, 1.0}), torch::tensor({inf, -inf, 1.0}), 0, 0));
  CHECK_FALSE(all_close(torch::tensor({inf}), torch::tensor({-inf}), 1, 1));
  const auto with_nan = all_close(torch::tensor({1.0, nan}), torch::tensor({1.0, nan}), 1, 1);
  CHECK_FALSE(with_nan.ok);
  CHECK_THAT(with_nan.message, Catch::Contains("flat index 1"));
  const auto sizes = all_close(torch::zeros({3}), torch::zeros({1, 3}), 1, 1);
  CHECK_FALSE(sizes.ok);
  CHECK_THAT(sizes.message, Catch::Contains("sizes differ: actual [3], expected [1, 3]"));
  CHECK(relative_change(torch::tensor({1.0, 2.0}), torch::tensor({1.0, 4.0})) == 0.5);
}
