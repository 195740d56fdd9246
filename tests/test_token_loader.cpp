// Tests of the DESIGN §3 data order: closed-form sample positions per (step, dp rank,
// micro-step), layout independence of the global batch, shuffling and prefetch.
#include <catch2/catch.hpp>

#include "meshtrain/launch/token_loader.h"

#include <filesystem>
#include <set>

using namespace meshtrain;

namespace {

// A token file whose token at position p is p (so a sample's first input names its start).
std::shared_ptr<const TokenFile> counting_file(int64_t n) {
  const auto path = (std::filesystem::temp_directory_path() /
                     ("meshtrain_loader_" + std::to_string(::getpid()) + "_" + std::to_string(n)))
                        .string();
  std::vector<uint16_t> tokens(n);
  for (int64_t i = 0; i < n; ++i) {
    tokens[i] = static_cast<uint16_t>(i);
  }
  write_token_file(path, tokens);
  auto file = std::make_shared<const TokenFile>(path);
  std::filesystem::remove(path); // the mapping stays valid
  return file;
}

// Start position (in samples) of every sequence a layout feeds in `step`, in global order i.
std::vector<int64_t> global_batch_positions(const std::shared_ptr<const TokenFile>& file,
                                            TokenLoaderOptions o, int64_t step) {
  std::vector<int64_t> by_i(o.global_batch, -1);
  for (int r = 0; r < o.dp_size; ++r) {
    o.dp_rank = r;
    TokenLoader loader(file, o);
    const auto batches = loader.step_batches(step);
    REQUIRE(static_cast<int64_t>(batches.size()) == o.global_batch / (o.micro_batch * o.dp_size));
    for (size_t m = 0; m < batches.size(); ++m) {
      for (int64_t j = 0; j < o.micro_batch; ++j) {
        const int64_t i =
            static_cast<int64_t>(m) * o.dp_size * o.micro_batch + r * o.micro_batch + j;
        by_i[i] = batches[m].inputs[j][0].item<int64_t>() / o.seq_len;
      }
    }
  }
  return by_i;
}

} // namespace

TEST_CASE("token loader: sample g starts at token (g mod S)*T, targets shifted by one", "[data]") {
  auto file = counting_file(1000); // S = floor(999 / 16) = 62
  TokenLoaderOptions o;
  o.seq_len = 16;
  o.global_batch = 8;
  o.micro_batch = 2;
  o.dp_size = 2;
  o.dp_rank = 1;
  o.prefetch = false;
  TokenLoader loader(file, o);
  CHECK(loader.num_samples() == 62);
  CHECK(loader.accumulation_steps() == 2);
  const int64_t step = 9; // g = 72..79 wraps: g mod 62 = 10..17
  const auto batches = loader.step_batches(step);
  for (int64_t m = 0; m < 2; ++m) {
    for (int64_t j = 0; j < 2; ++j) {
      const int64_t i = m * 2 * 2 + 1 * 2 + j;
      const int64_t expected_start = ((step * 8 + i) % 62) * 16;
      INFO("m=" << m << " j=" << j);
      CHECK(torch::equal(batches[m].inputs[j], torch::arange(expected_start, expected_start + 16)));
      CHECK(torch::equal(batches[m].targets[j],
                         torch::arange(expected_start + 1, expected_start + 17)));
    }
  }
}

TEST_CASE("token loader: the global batch is the same in every dp x micro-batch layout", "[data]") {
  auto file = counting_file(5000);
  for (const bool shuffle : {false, true}) {
    TokenLoaderOptions base;
    base.seq_len = 8;
    base.global_batch = 16;
    base.shuffle = shuffle;
    base.prefetch = false;
    base.micro_batch = 16;
    base.dp_size = 1;
    const auto reference = global_batch_positions(file, base, 3);
    for (const auto& [dp, mb] :
         {std::pair{2, 8}, std::pair{4, 1}, std::pair{2, 2}, std::pair{1, 4}}) {
      auto o = base;
      o.dp_size = dp;
      o.micro_batch = mb;
      INFO("shuffle=" << shuffle << " dp=" << dp << " micro_batch=" << mb);
      CHECK(global_batch_positions(file, o, 3) == reference);
    }
  }
}

TEST_CASE("token loader: shuffle permutes each epoch differently and deterministically", "[data]") {
  auto file = counting_file(801); // S = 100 with T = 8
  TokenLoaderOptions o;
  o.seq_len = 8;
  o.shuffle = true;
  o.seed = 7;
  TokenLoader a(file, o);
  TokenLoader b(file, o);
  std::set<int64_t> epoch0;
  std::vector<int64_t> order0;
  std::vector<int64_t> order1;
  for (int64_t g = 0; g < 100; ++g) {
    epoch0.insert(a.sample_position(g));
    order0.push_back(a.sample_position(g));
    order1.push_back(a.sample_position(g + 100));
    CHECK(a.sample_position(g) == b.sample_position(g));
  }
  CHECK(epoch0.size() == 100); // a permutation: every sample once per epoch
  CHECK(order0 != order1);
  o.seed = 8;
  TokenLoader c(file, o);
  std::vector<int64_t> other_seed;
  for (int64_t g = 0; g < 100; ++g) {
    other_seed.push_back(c.sample_position(g));
  }
  CHECK(other_seed != order0);
}

TEST_CASE("token loader: prefetched next() equals step_batches and seek restarts", "[data]") {
  auto file = counting_file(3000);
  TokenLoaderOptions o;
  o.seq_len = 32;
  o.global_batch = 4;
  o.micro_batch = 2;
  TokenLoader loader(file, o);
  for (int64_t s = 0; s < 5; ++s) {
    const auto got = loader.next();
    const auto expected = loader.step_batches(s);
    REQUIRE(got.size() == expected.size());
    for (size_t m = 0; m < got.size(); ++m) {
      CHECK(torch::equal(got[m].inputs, expected[m].inputs));
    }
  }
  loader.seek(2);
  CHECK(torch::equal(loader.next()[0].inputs, loader.step_batches(2)[0].inputs));
  CHECK(loader.next_step() == 3);
}

TEST_CASE("token loader: layouts that do not divide and tiny files are errors", "[data]") {
  auto file = counting_file(100);
  TokenLoaderOptions o;
  o.seq_len = 8;
  o.global_batch = 6;
  o.micro_batch = 2;
  o.dp_size = 2;
  CHECK_THROWS_WITH(
      TokenLoader(file, o),
      Catch::Contains("global batch 6 must be a multiple of micro-batch 2 x dp 2 = 4"));
  o.global_batch = 4;
  o.seq_len = 100;
  CHECK_THROWS_WITH(TokenLoader(file, o), Catch::Contains("too few for one sample"));
}
