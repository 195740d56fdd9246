// Sharded start-up (parallel/param_init.h): initial values are a pure function of (seed,
// name, element index), so any range or cut of a parameter equals that part of the whole; a
// model declared under DeferredInit holds no storage until laid out, and then every layout
// holds exactly the serial model's values; copies that differ are named at start-up.
#include "tests/gpt_fixtures.h"

#include "meshtrain/parallel/param_init.h"
#include "meshtrain/parallel/shard_tensor.h"

#include <cmath>
#include <string>
#include <vector>

using namespace meshtrain;
using namespace meshtrain::testing;

namespace {

torch::Tensor values(torch::IntArrayRef local, const std::string& name, const InitRule& rule,
                     const ShardSpec& spec, uint64_t seed, int64_t first = 0, int64_t n = -1) {
  int64_t numel = 1;
  for (const auto s : local) {
    numel *= s;
  }
  auto out = torch::empty({n < 0 ? numel - first : n});
  fill_initial_values(out, first, local, name, rule, spec, seed);
  return out;
}

// Parameters by name, their local values (ZeRO-3: gathered) made whole over tp and unpadded.
std::map<std::string, torch::Tensor> whole_parameters(const Parallelized& parallel) {
  GatheredParameters gathered(parallel.shards.get());
  std::map<std::string, torch::Tensor> out;
  const auto params = parallel.model->named_parameters();
  for (const auto& [name, spec] : named_shard_specs(*parallel.model)) {
    out[name] =
        gather_unsharded(params[name].detach().to(torch::kFloat), spec, parallel.mesh.group("tp"))
            .clone();
  }
  return out;
}

// A module of a model's own: one parameter declared with the one call, one registered plainly.
class GainImpl : public torch::nn::Module, public ShardedModule {
public:
  GainImpl() {
    gain = declare_parameter(*this, "gain", {8}, InitRule::ones());
    scale = declare_parameter(*this, "scale", {4, 8}, InitRule::normal(0.5));
  }
  torch::Tensor gain, scale;
};
TORCH_MODULE(Gain);

} // namespace

TEST_CASE("param init: any range or cut of a parameter equals that part of the whole", "[init]") {
  const auto normal = InitRule::normal(0.02);
  const ShardSpec whole = ShardSpec::replicated();
  const auto full = values({12, 5}, "h.0.attn.c_attn.weight", normal, whole, 7);
  // Ranges, odd starts and lengths included (the ZeRO-3 shards of a bucket).
  for (const auto& [first, n] :
       std::vector<std::pair<int64_t, int64_t>>{{0, 1}, {3, 38}, {1, 59}}) {
    REQUIRE(torch::equal(values({12, 5}, "h.0.attn.c_attn.weight", normal, whole, 7, first, n),
                         full.narrow(0, first, n)));
  }
  const auto matrix = full.view({12, 5});
  for (int r = 0; r < 2; ++r) {
    // Column-parallel with q|k|v blocks: rows of every block.
    REQUIRE(torch::equal(
        values({6, 5}, "h.0.attn.c_attn.weight", normal, partitioned_spec(0, 12, r, 2, -1, 3), 7)
            .view({6, 5}),
        cut_shard(matrix, 0, r, 2, 3)));
  }
  for (int r = 0; r < 5; ++r) {
    // Row-parallel: columns.
    REQUIRE(torch::equal(
        values({12, 1}, "h.0.attn.c_attn.weight", normal, partitioned_spec(1, 5, r, 5), 7)
            .view({12, 1}),
        cut_shard(matrix, 1, r, 5)));
  }
  // A vocabulary padded from 10 to 16 rows over 2 ranks: the padding rows are 0.
  const auto table = values({10, 4}, "wte.weight", normal, whole, 7).view({10, 4});
  for (int r = 0; r < 2; ++r) {
    REQUIRE(torch::equal(
        values({8, 4}, "wte.weight", normal, partitioned_spec(0, 16, r, 2, 10), 7).view({8, 4}),
        cut_shard(pad_dim(table, 0, 16), 0, r, 2)));
  }
  // Another name or seed, other values; bf16 output is the fp32 values rounded.
  REQUIRE_FALSE(torch::equal(values({12, 5}, "h.1.attn.c_attn.weight", normal, whole, 7), full));
  REQUIRE_FALSE(torch::equal(values({12, 5}, "h.0.attn.c_attn.weight", normal, whole, 8), full));
  auto bf16 = torch::empty({60}, torch::kBFloat16);
  fill_initial_values(bf16, 0, {12, 5}, "h.0.attn.c_attn.weight", normal, whole, 7);
  REQUIRE(torch::equal(bf16, full.to(torch::kBFloat16)));
  REQUIRE(initial_value(normal, 7, "h.0.attn.c_attn.weight", 13) == full[13].item<float>());
}

TEST_CASE("param init: normal values have the rule's mean and standard deviation", "[init]") {
  const int64_t n = 200000;
  const auto v =
      values({n}, "x", InitRule::normal(0.02), ShardSpec::replicated(), 3).to(torch::kDouble);
  INFO("mean " << v.mean().item<double>() << " std " << v.std().item<double>());
  // 5 standard errors: fails with a wrong scale, a bias or a broken pairing.
  REQUIRE(std::abs(v.mean().item<double>()) < 5 * 0.02 / std::sqrt(static_cast<double>(n)));
  REQUIRE(std::abs(v.std().item<double>() / 0.02 - 1.0) < 0.01);
  // Even and odd elements (the two halves of a Box-Muller pair) are uncorrelated.
  const auto even = v.view({n / 2, 2}).select(1, 0);
  const auto odd = v.view({n / 2, 2}).select(1, 1);
  const double corr = ((even * odd).mean() / (even.std() * odd.std())).item<double>();
  REQUIRE(std::abs(corr) < 0.02);
  const auto ones = values({3, 3}, "g", InitRule::ones(), ShardSpec::replicated(), 3);
  REQUIRE(torch::equal(ones, torch::ones({9})));
}

TEST_CASE("param init: a declared model has no storage until it is given values, then equals the "
          "eager model",
          "[init]") {
  std::shared_ptr<gpt::GPTImpl> declared;
  {
    DeferredInit deferred(21);
    declared = std::make_shared<gpt::GPTImpl>(tiny_config());
  }
  int64_t numel = 0;
  for (const auto& p : declared->parameters()) {
    REQUIRE(is_deferred_placeholder(p));
    REQUIRE(p.storage().nbytes() <= static_cast<size_t>(p.element_size()));
    numel += p.numel();
  }
  REQUIRE(numel > 10000);
  REQUIRE(deferred_parameters(*declared).size() == declared->parameters().size());
  // A model run before it is laid out computes NaN, not plausible numbers.
  const auto idx = torch::zeros({1, 4}, torch::kLong);
  REQUIRE(torch::isnan(declared->forward(idx).logits).all().item<bool>());

  materialize_all(*declared);
  REQUIRE(deferred_parameters(*declared).empty());
  torch::manual_seed(21);
  gpt::GPT eager(tiny_config());
  const auto want = eager->named_parameters();
  for (const auto& p : declared->named_parameters()) {
    INFO(p.key());
    REQUIRE(torch::equal(p.value(), want[p.key()]));
  }
  // A model's own module: declared parameters are deferred too, with their rules.
  Gain gain{nullptr};
  {
    DeferredInit deferred(5);
    gain = Gain();
  }
  REQUIRE(is_deferred_placeholder(gain->scale));
  materialize_all(*gain);
  REQUIRE(torch::equal(gain->gain, torch::ones({8})));
  REQUIRE(torch::equal(gain->scale.view({-1}),
                       values({4, 8}, "scale", InitRule::normal(0.5), ShardSpec::replicated(), 5)));
}

TEST_CASE("param init: every layout starts from the serial model's values bit for bit",
          "[mpi][init]") {
  auto& rt = test_runtime();
  const int world = rt.world_size();
  torch::manual_seed(kSeed);
  gpt::GPT serial(tiny_config());
  std::map<std::string, torch::Tensor> want;
  for (const auto& [name, spec] : named_shard_specs(*serial)) {
    const auto p = serial->named_parameters()[name].detach();
    want[name] = spec.is_partitioned() ? p.narrow(spec.dim, 0, spec.unpadded_size) : p;
  }
  struct Layout {
    const char* name;
    ParallelDims dims;
    int zero;
    bool sp;
    Precision precision;
  };
  std::vector<Layout> layouts = {
      {"dp ZeRO-3", {-1, 1, 1, 1}, 3, false, Precision::kFp32},
      {"dp ZeRO-3 bf16", {-1, 1, 1, 1}, 3, false, Precision::kBf16},
      {"tp2 SP", {-1, 1, 2, 1}, 0, true, Precision::kFp32},
      {"cp2 ZeRO-1", {-1, 2, 1, 1}, 1, false, Precision::kFp32},
  };
  if (world == 4) {
    layouts.push_back({"dp2 x tp2 ZeRO-3", {2, 1, 2, 1}, 3, true, Precision::kFp32});
    layouts.push_back({"dp2 x tp2 ZeRO-1", {2, 1, 2, 1}, 1, false, Precision::kFp32});
  }
  for (const auto& l : layouts) {
    INFO(l.name << " " << rank_tag());
    const Mesh mesh(l.dims, rt.world());
    auto plan = test_plan(mesh, l.zero, l.sp, 1);
    plan.precision = l.precision;
    const auto parallel = tiny_gpt(mesh, plan);
    const auto got = whole_parameters(parallel);
    REQUIRE(got.size() == want.size());
    for (const auto& [name, value] : want) {
      INFO(name);
      const auto expected =
          l.precision == Precision::kFp32 ? value : value.to(torch::kBFloat16).to(torch::kFloat);
      REQUIRE(torch::equal(got.at(name), expected));
    }
  }
}

TEST_CASE("param init: copies that differ between ranks are named at start-up", "[mpi][init]") {
  auto& rt = test_runtime();
  // A per-rank seed in an eagerly built model: the data-parallel copies differ...
  const Mesh dp(ParallelDims{-1, 1, 1, 1}, rt.world());
  torch::manual_seed(kSeed + rt.rank());
  auto model = std::make_shared<gpt::GPTImpl>(tiny_config());
  REQUIRE_THROWS_WITH(parallelize(model, dp, test_plan(dp, 0, false, 1), test_optimizer()),
                      Catch::Contains("replica check at start-up: parameter "
                                      "'transformer.wte.weight' differs between ranks 0 and 1"));
  // ...and so do the tensor-parallel ones (wte is cut over tp; wpe is replicated). On 4 ranks
  // the dp copies are compared first.
  const Mesh tp(ParallelDims{-1, 1, 2, 1}, rt.world());
  torch::manual_seed(kSeed + rt.rank());
  model = std::make_shared<gpt::GPTImpl>(tiny_config());
  REQUIRE_THROWS_WITH(parallelize(model, tp, test_plan(tp, 0, true, 1), test_optimizer()),
                      Catch::Contains(rt.world_size() == 2
                                          ? "parameter 'transformer.wpe.weight' differs between "
                                            "ranks 0 and 1 (tp ranks 0 and 1"
                                          : "parameter 'transformer.wte.weight' differs between "
                                            "ranks 0 and 2 (dp_cp ranks 0 and 1"));
  // Every rank gets the same message (the lowest reporting rank's), also one whose own copies
  // agree: here only world rank 1's ln_f differs; on 4 ranks (dp2 x tp2) ranks 2 and 3 see
  // it in their dp group or not at all, and still throw rank 0's message.
  torch::manual_seed(kSeed);
  model = std::make_shared<gpt::GPTImpl>(tiny_config());
  if (rt.rank() == 1) {
    torch::NoGradGuard no_grad;
    model->ln_f->weight.add_(1e-3);
  }
  REQUIRE_THROWS_WITH(parallelize(model, tp, test_plan(tp, 0, true, 1), test_optimizer()),
                      Catch::Contains("parameter 'transformer.ln_f.weight' differs between "
                                      "ranks 0 and 1 (tp ranks 0 and 1"));
  // Declared under DeferredInit, a per-rank seed is overruled by rank 0's: no error.
  torch::manual_seed(kSeed + rt.rank());
  {
    DeferredInit deferred(kSeed + rt.rank());
    model = std::make_shared<gpt::GPTImpl>(tiny_config());
  }
  const auto parallel = parallelize(model, tp, test_plan(tp, 0, true, 1), test_optimizer());
  check_replicas(*parallel.model, tp, "after start-up");
}
