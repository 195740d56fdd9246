// The library pieces of the Llama family against their serial twins (plain torch::nn modules
// with Hugging Face's names and math, drawn after the same seed): ParallelRMSNorm,
// RotaryEmbedding, column_parallel_fanout, GroupedQueryAttention, ParallelSwiGLU and
// VocabParallelHead — outputs, input grads, gathered parameter grads, and the same after an
// AdamW step and a second forward (tests/test_tp_helpers.h's run_twin). tp = world size (2
// or 4); grouped-query attention also on tp 2 inside a world of 4 (dp 2 x tp 2). Every
// layer is built serially and laid out by apply_tensor_parallel, and also built directly on
// the group: both must hold the same shards.
#include <catch2/catch.hpp>

#include "meshtrain/core/comm_log.h"
#include "meshtrain/core/errors.h"
#include "meshtrain/parallel/column_parallel_fanout.h"
#include "meshtrain/parallel/grouped_query_attention.h"
#include "meshtrain/parallel/mappings.h"
#include "meshtrain/parallel/parallel_rms_norm.h"
#include "meshtrain/parallel/parallel_swiglu.h"
#include "meshtrain/parallel/rotary_embedding.h"
#include "meshtrain/parallel/tensor_parallel_layer.h"
#include "meshtrain/parallel/vocab_parallel_head.h"
#include "tests/test_tp_helpers.h"

#include <algorithm>
#include <cmath>

using namespace meshtrain;
using namespace meshtrain::testing;

namespace {

constexpr int64_t kB = 2;
constexpr int64_t kT = 8;
constexpr int64_t kC = 64;
constexpr int64_t kH = 8;
constexpr int64_t kKV = 4;
constexpr int64_t kF = 96;
constexpr int64_t kLayers = 3;
constexpr double kTheta = 500.0; // small, so that the rotation angles differ a lot per dim
constexpr uint64_t kSeed = 77;

torch::Tensor input_activations() {
  torch::manual_seed(99); // the same input on every rank
  return torch::randn({kB, kT, kC});
}

TwinLayout sequence_layout(int r, int n) {
  TwinLayout layout;
  layout.cut_input = [=](const torch::Tensor& t) { return chunk_of(t, kSequenceDim, r, n); };
  layout.cut_output = layout.cut_input;
  return layout;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// DESIGN §4b's init of a serial twin, in named_parameters() order: matrices N(0, 0.02),
// o_proj and down_proj N(0, 0.02/sqrt(2L)), norm weights 1.
void init_llama_twin(torch::nn::Module& twin, int64_t n_layer) {
  torch::NoGradGuard no_grad;
  for (auto& p : twin.named_parameters()) {
    auto& t = p.value();
    if (t.dim() >= 2) {
      const bool scaled =
          ends_with(p.key(), "o_proj.weight") || ends_with(p.key(), "down_proj.weight");
      t.normal_(0.0, scaled ? 0.02 / std::sqrt(2.0 * static_cast<double>(n_layer)) : 0.02);
    } else {
      t.fill_(1.0);
    }
  }
}

// ---- serial twins (Hugging Face's math, written independently of the library) -------------

struct TwinRMSNormImpl : torch::nn::Module {
  explicit TwinRMSNormImpl(int64_t c) { weight = register_parameter("weight", torch::ones({c})); }
  torch::Tensor forward(const torch::Tensor& x) {
    const auto xf = x.to(torch::kFloat);
    const auto normed = xf / torch::sqrt(xf.square().mean(-1, true) + 1e-5);
    return weight * normed.to(x.scalar_type());
  }
  torch::Tensor weight;
};
TORCH_MODULE(TwinRMSNorm);

// RoPE by explicit pairs (j, j + D/2): [x1 cos - x2 sin | x2 cos + x1 sin], the frequencies in
// double precision.
torch::Tensor twin_rope(const torch::Tensor& x, double theta) {
  const int64_t t = x.size(-2), d = x.size(-1), half = d / 2;
  std::vector<double> angles;
  for (int64_t pos = 0; pos < t; ++pos) {
    for (int64_t j = 0; j < half; ++j) {
      angles.push_back(static_cast<double>(pos) * std::pow(theta, -2.0 * j / d));
    }
  }
  const auto a = torch::tensor(angles, torch::kDouble).view({t, half});
  const auto cos = a.cos().to(x.scalar_type()), sin = a.sin().to(x.scalar_type());
  const auto x1 = x.narrow(-1, 0, half), x2 = x.narrow(-1, half, half);
  return torch::cat({x1 * cos - x2 * sin, x2 * cos + x1 * sin}, -1);
}

struct TwinAttentionImpl : torch::nn::Module {
  TwinAttentionImpl(int64_t c, int64_t h, int64_t kv) : n_head(h), n_kv(kv), d(c / h) {
    q_proj = register_module("q_proj",
                             torch::nn::Linear(torch::nn::LinearOptions(c, h * d).bias(false)));
    k_proj = register_module("k_proj",
                             torch::nn::Linear(torch::nn::LinearOptions(c, kv * d).bias(false)));
    v_proj = register_module("v_proj",
                             torch::nn::Linear(torch::nn::LinearOptions(c, kv * d).bias(false)));
    o_proj = register_module("o_proj",
                             torch::nn::Linear(torch::nn::LinearOptions(h * d, c).bias(false)));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    const int64_t b = x.size(0), t = x.size(1);
    auto q = q_proj(x).view({b, t, n_head, d}).transpose(1, 2);
    auto k = k_proj(x).view({b, t, n_kv, d}).transpose(1, 2);
    auto v = v_proj(x).view({b, t, n_kv, d}).transpose(1, 2);
    q = twin_rope(q, kTheta);
    k = twin_rope(k, kTheta).repeat_interleave(n_head / n_kv, 1);
    v = v.repeat_interleave(n_head / n_kv, 1);
    auto att = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(d));
    att = att.masked_fill(torch::tril(torch::ones({t, t})) == 0, -INFINITY).softmax(-1);
    return o_proj(torch::matmul(att, v).transpose(1, 2).reshape({b, t, n_head * d}));
  }
  int64_t n_head, n_kv, d;
  torch::nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
};
TORCH_MODULE(TwinAttention);

struct TwinSwiGLUImpl : torch::nn::Module {
  TwinSwiGLUImpl(int64_t c, int64_t f) {
    gate_proj =
        register_module("gate_proj", torch::nn::Linear(torch::nn::LinearOptions(c, f).bias(false)));
    up_proj =
        register_module("up_proj", torch::nn::Linear(torch::nn::LinearOptions(c, f).bias(false)));
    down_proj =
        register_module("down_proj", torch::nn::Linear(torch::nn::LinearOptions(f, c).bias(false)));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    const auto g = gate_proj(x);
    return down_proj(g * torch::sigmoid(g) * up_proj(x));
  }
  torch::nn::Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
};
TORCH_MODULE(TwinSwiGLU);

// Three column-parallel projections of one input, as grouped-query attention holds them.
struct FanoutImpl : torch::nn::Module {
  FanoutImpl(const std::vector<int64_t>& widths, CommunicatorPtr group, bool sp) {
    const char* names[] = {"q_proj", "k_proj", "v_proj"};
    for (size_t i = 0; i < widths.size(); ++i) {
      layers.push_back(register_module(
          names[i], ColumnParallelLinear(ColumnParallelLinearOptions(kC, widths[i])
                                             .bias(i == 0) // one bias, to cover both cases
                                             .gather_output(false)
                                             .sequence_parallel(sp),
                                         group)));
    }
  }
  // [B, T, C] -> the outputs concatenated along the last dim.
  torch::Tensor forward(const torch::Tensor& x) {
    return torch::cat(column_parallel_fanout(layers, x), -1);
  }
  std::vector<ColumnParallelLinear> layers;
};
TORCH_MODULE(Fanout);

struct TwinFanoutImpl : torch::nn::Module {
  explicit TwinFanoutImpl(const std::vector<int64_t>& widths) {
    const char* names[] = {"q_proj", "k_proj", "v_proj"};
    for (size_t i = 0; i < widths.size(); ++i) {
      layers.push_back(register_module(
          names[i], torch::nn::Linear(torch::nn::LinearOptions(kC, widths[i]).bias(i == 0))));
    }
  }
  torch::Tensor forward(const torch::Tensor& x) {
    std::vector<torch::Tensor> out;
    for (auto& l : layers) {
      out.push_back(l(x));
    }
    return torch::cat(out, -1);
  }
  std::vector<torch::nn::Linear> layers;
};
TORCH_MODULE(TwinFanout);

// Serial init of a twin: biases 0 (init_llama_twin would set the 1-D q bias to 1).
void zero_biases(torch::nn::Module& m) {
  torch::NoGradGuard no_grad;
  for (auto& p : m.named_parameters()) {
    if (ends_with(p.key(), ".bias")) {
      p.value().zero_();
    }
  }
}

// Lays a serially built module out over `group` (what parallelize's step 2 does).
template <typename M> M laid_out(M module, const CommunicatorPtr& group, bool sp) {
  apply_tensor_parallel(*module, TensorParallelism{group, sp});
  return module;
}

// Two laid-out modules hold bit-identical local shards (and the same specs).
void check_same_shards(const std::string& what, torch::nn::Module& a, torch::nn::Module& b) {
  const auto pa = a.named_parameters(), pb = b.named_parameters();
  REQUIRE(pa.size() == pb.size());
  const auto sa = named_shard_specs(a), sb = named_shard_specs(b);
  for (size_t i = 0; i < sa.size(); ++i) {
    INFO(rank_tag() << what << ": " << sa[i].first);
    REQUIRE(sa[i].first == sb[i].first);
    CHECK(sa[i].second.dim == sb[i].second.dim);
    CHECK(sa[i].second.offset == sb[i].second.offset);
    CHECK(sa[i].second.global_size == sb[i].second.global_size);
    CHECK(sa[i].second.sequence_parallel == sb[i].second.sequence_parallel);
    check_equal(what + " " + sa[i].first, pa[sa[i].first], pb[sa[i].first]);
  }
}

// The tp group of a mesh with tp = `tp` over the world (dp inferred).
Mesh mesh_with_tp(int tp) {
  return Mesh(ParallelDims{-1, 1, tp, 1}, test_runtime().world());
}

} // namespace

TEST_CASE("Llama layers: RMSNorm normalises in fp32 and matches Hugging Face's", "[llama]") {
  torch::manual_seed(5);
  const auto x = torch::randn({3, 5, kC}) * 3.0 + 0.5;
  ParallelRMSNorm norm{ParallelRMSNormOptions(kC)};
  {
    torch::NoGradGuard no_grad;
    norm->weight.normal_(1.0, 0.3);
  }
  const auto w = norm->weight.detach();
  const auto xd = x.to(torch::kDouble);
  const auto want = (w.to(torch::kDouble) * xd / (xd.square().mean(-1, true) + 1e-5).sqrt());
  CHECK(all_close(norm(x), want.to(torch::kFloat), 1e-6, 1e-7));
  // bf16 activations: normalised in fp32, rounded once, then the (bf16) weight.
  norm->to(torch::kBFloat16);
  const auto xb = x.to(torch::kBFloat16);
  const auto yb = norm(xb);
  CHECK(yb.scalar_type() == torch::kBFloat16);
  const auto xf = xb.to(torch::kFloat);
  const auto expect =
      norm->weight * (xf * torch::rsqrt(xf.square().mean(-1, true) + 1e-5)).to(torch::kBFloat16);
  check_equal("bf16 RMSNorm", yb, expect);
  REQUIRE_THROWS_WITH(norm(torch::randn({2, 3})), Catch::Contains("its last dim must be 64"));
}

TEST_CASE("Llama layers: RoPE rotates pairs (j, j + D/2) by position x theta^(-2j/D)", "[llama]") {
  RotaryEmbedding rope{RotaryEmbeddingOptions(16).theta(kTheta)};
  torch::manual_seed(6);
  const auto x = torch::randn({2, 3, 10, 16}); // [B, h, T, D]
  check_rel("rope vs pairwise rotation", rope(x), twin_rope(x, kTheta), 1e-5);
  // Position 0 is the identity; a rotation keeps each pair's norm.
  check_rel("position 0", rope(x).select(2, 0), x.select(2, 0), 1e-7);
  const auto pair_norm = [](const torch::Tensor& t) {
    return t.narrow(-1, 0, 8).square() + t.narrow(-1, 8, 8).square();
  };
  check_rel("pair norms", pair_norm(rope(x)), pair_norm(x), 1e-5);
  // q.k after RoPE depends on the positions only through their difference.
  const auto q = torch::randn({16}), k = torch::randn({16});
  const auto at = [&](const torch::Tensor& v, int64_t pos) {
    return rope(v.view({1, 16}), torch::tensor({pos}, torch::kLong)).view({16});
  };
  CHECK(std::abs((at(q, 7) * at(k, 3)).sum().item<double>() -
                 (at(q, 24) * at(k, 20)).sum().item<double>()) < 1e-4);
  // Explicit positions: a part of a sequence gets that part's angles.
  const auto tail = rope(x.narrow(2, 6, 4), torch::arange(6, 10, torch::kLong));
  check_rel("positions 6..9", tail, rope(x).narrow(2, 6, 4), 1e-6);
  REQUIRE_THROWS_WITH(RotaryEmbedding(RotaryEmbeddingOptions(15)),
                      Catch::Contains("head_dim (15) must be positive and even"));
  REQUIRE_THROWS_WITH(rope(x, torch::arange(4, torch::kLong)),
                      Catch::Contains("4 positions for a sequence of 10"));
}

TEST_CASE("Llama layers: ParallelRMSNorm on tp matches the serial twin", "[mpi][tp][llama]") {
  const auto mesh = tp_mesh();
  const auto& tp = mesh.group("tp");
  const int r = tp_rank(mesh), n = tp_size(mesh);
  for (const bool sp : {false, true}) {
    auto par = laid_out(ParallelRMSNorm(ParallelRMSNormOptions(kC)), tp, sp);
    TwinRMSNorm twin(kC);
    CHECK(par->shard_specs().at("weight").sequence_parallel == sp);
    run_twin(
        std::string("rmsnorm tp ") + std::to_string(n) + (sp ? " sequence parallel" : ""), *par,
        *twin, tp, input_activations(), sp ? sequence_layout(r, n) : TwinLayout{},
        [&](const torch::Tensor& x) { return par(x); },
        [&](const torch::Tensor& x) { return twin(x); });
  }
}

TEST_CASE("Llama layers: column_parallel_fanout of q, k, v widths enters the region once",
          "[mpi][tp][llama]") {
  const auto mesh = tp_mesh();
  const auto& tp = mesh.group("tp");
  const int r = tp_rank(mesh), n = tp_size(mesh);
  const std::vector<int64_t> widths = {kH * 8, kKV * 8, kKV * 8}; // 64, 32, 32
  // Full output [.., 128] = q | k | v -> this rank's rows of each, concatenated.
  const auto cut_widths = [&](const torch::Tensor& full) {
    std::vector<torch::Tensor> parts;
    int64_t at = 0;
    for (const int64_t w : widths) {
      parts.push_back(chunk_of(full.narrow(-1, at, w), -1, r, n));
      at += w;
    }
    return torch::cat(parts, -1);
  };
  for (const bool sp : {false, true}) {
    const std::string what =
        std::string("fanout tp ") + std::to_string(n) + (sp ? " sequence parallel" : "");
    torch::manual_seed(kSeed);
    auto par = laid_out(Fanout(widths, make_self_communicator(), false), tp, sp);
    torch::manual_seed(kSeed);
    Fanout direct(widths, tp, sp);
    check_same_shards(what + " serial-then-laid-out vs built on the group", *par, *direct);
    TwinFanout twin(widths);
    torch::manual_seed(kSeed);
    init_llama_twin(*twin, 1);
    zero_biases(*twin);
    TwinLayout layout;
    if (sp) {
      layout.cut_input = [=](const torch::Tensor& t) { return chunk_of(t, kSequenceDim, r, n); };
    }
    layout.cut_output = cut_widths;
    run_twin(
        what, *par, *twin, tp, input_activations(), layout,
        [&](const torch::Tensor& x) { return par(x); },
        [&](const torch::Tensor& x) { return twin(x); });

    // One collective each way, whatever the number of layers.
    auto x = layout.cut_input(input_activations()).requires_grad_(true);
    auto& log = mesh.comm_log();
    log.clear();
    log.enable();
    const auto y = par(x);
    const int64_t fwd_gather = log.count(CollectiveKind::kAllGather, "tp");
    const int64_t fwd_reduce = log.count(CollectiveKind::kAllReduce, "tp");
    log.clear();
    y.sum().backward();
    const int64_t bwd_reduce = log.count(CollectiveKind::kAllReduce, "tp");
    const int64_t bwd_scatter = log.count(CollectiveKind::kReduceScatter, "tp");
    log.enable(false);
    log.clear();
    INFO(rank_tag() << what << ": forward all-gather " << fwd_gather << ", all-reduce "
                    << fwd_reduce << "; backward all-reduce " << bwd_reduce << ", reduce-scatter "
                    << bwd_scatter);
    // A group of one (a world of 1) needs no collective at all.
    const bool comm = n > 1;
    CHECK(fwd_gather == (comm && sp ? 1 : 0));
    CHECK(fwd_reduce == 0);
    CHECK(bwd_reduce == (comm && !sp ? 1 : 0));
    CHECK(bwd_scatter == (comm && sp ? 1 : 0));
  }
  // Layers that cannot share one input are named.
  const auto self = make_self_communicator();
  ColumnParallelLinear a(ColumnParallelLinearOptions(kC, 16).gather_output(false), self);
  ColumnParallelLinear b(ColumnParallelLinearOptions(kC / 2, 16).gather_output(false), self);
  ColumnParallelLinear g(ColumnParallelLinearOptions(kC, 16), self);
  ColumnParallelLinear other(ColumnParallelLinearOptions(kC, 16).gather_output(false));
  REQUIRE_THROWS_WITH(column_parallel_fanout({a, b}, input_activations()),
                      Catch::Contains("layer 1 has in_features 32, layer 0 has 64"));
  REQUIRE_THROWS_WITH(column_parallel_fanout({a, g}, input_activations()),
                      Catch::Contains("layer 1 gathers its output"));
  REQUIRE_THROWS_WITH(column_parallel_fanout({a, other}, input_activations()),
                      Catch::Contains("layer 1 is laid out over another tp group than layer 0"));
}

TEST_CASE("Llama layers: GroupedQueryAttention splits heads and kv heads like the serial twin",
          "[mpi][tp][llama]") {
  const int world = test_runtime().world_size();
  // tp = world (8 heads, 4 kv heads split over 2 or 4), and tp 2 with 2 kv heads (a world of
  // 4 is then dp 2 x tp 2).
  struct Case {
    int tp;
    int64_t kv;
  };
  std::vector<Case> cases = {{world, kKV}};
  if (world % 4 == 0) {
    cases.push_back({2, 2});
  }
  for (const auto& c : cases) {
    const auto mesh = mesh_with_tp(c.tp);
    const auto& tp = mesh.group("tp");
    const int r = tp_rank(mesh), n = tp_size(mesh);
    for (const bool sp : {false, true}) {
      for (const bool selective : {false, true}) {
        const std::string what = "attention H " + std::to_string(kH) + " Hkv " +
                                 std::to_string(c.kv) + " tp " + std::to_string(n) +
                                 (sp ? " sequence parallel" : "") +
                                 (selective ? " selective recompute" : "");
        const auto options =
            GroupedQueryAttentionOptions(kC, kH, c.kv).rope_theta(kTheta).n_layer(kLayers);
        torch::manual_seed(kSeed);
        auto par = laid_out(GroupedQueryAttention(options), tp, sp);
        torch::manual_seed(kSeed);
        GroupedQueryAttention direct(GroupedQueryAttentionOptions(options).sequence_parallel(sp),
                                     tp);
        check_same_shards(what + ": serial-then-laid-out vs built on the group", *par, *direct);
        CHECK(par->local_heads() == kH / n);
        CHECK(par->local_kv_heads() == c.kv / n);
        CHECK(par->q_proj->weight.size(0) == kH * 8 / n);
        CHECK(par->k_proj->weight.size(0) == c.kv * 8 / n);
        // Outlives run_twin below: the wrapper keeps counting there.
        int calls = 0;
        if (selective) {
          // What parallelize installs: the core through a wrapper (here: called twice, to
          // see the wrapper is used and the core is a pure function of q, k, v).
          par->set_core_wrapper([&calls](const AttentionCoreFn& core, const torch::Tensor& q,
                                         const torch::Tensor& k, const torch::Tensor& v) {
            ++calls;
            const auto first = core(q, k, v);
            MT_CHECK(torch::equal(first, core(q, k, v)), "the core is not deterministic");
            return first;
          });
          par(input_activations().narrow(kSequenceDim, 0, sp ? kT / n : kT));
          CHECK(calls == 1);
        }
        TwinAttention twin(kC, kH, c.kv);
        torch::manual_seed(kSeed);
        init_llama_twin(*twin, kLayers);
        run_twin(
            what, *par, *twin, tp, input_activations(), sp ? sequence_layout(r, n) : TwinLayout{},
            [&](const torch::Tensor& x) { return par(x); },
            [&](const torch::Tensor& x) { return twin(x); });
      }
    }
  }
  REQUIRE_THROWS_WITH(GroupedQueryAttention(GroupedQueryAttentionOptions(kC, kH, 3)),
                      Catch::Contains("n_kv_head (3) must divide n_head (8)"));
  if (world == 4) {
    const auto mesh = mesh_with_tp(4);
    REQUIRE_THROWS_WITH(
        GroupedQueryAttention(GroupedQueryAttentionOptions(kC, kH, 2), mesh.group("tp")),
        Catch::Contains("n_kv_head (2) must be divisible by tp (4)"));
  }
}

TEST_CASE("Llama layers: ParallelSwiGLU splits the hidden dim like the serial twin",
          "[mpi][tp][llama]") {
  const auto mesh = tp_mesh();
  const auto& tp = mesh.group("tp");
  const int r = tp_rank(mesh), n = tp_size(mesh);
  for (const bool sp : {false, true}) {
    const std::string what = "swiglu tp " + std::to_string(n) + (sp ? " sequence parallel" : "");
    const auto options = ParallelSwiGLUOptions(kC, kF).n_layer(kLayers);
    torch::manual_seed(kSeed);
    auto par = laid_out(ParallelSwiGLU(options), tp, sp);
    torch::manual_seed(kSeed);
    ParallelSwiGLU direct(ParallelSwiGLUOptions(options).sequence_parallel(sp), tp);
    check_same_shards(what + ": serial-then-laid-out vs built on the group", *par, *direct);
    CHECK(par->gate_proj->weight.sizes() == torch::IntArrayRef({kF / n, kC}));
    CHECK(par->down_proj->weight.sizes() == torch::IntArrayRef({kC, kF / n}));
    TwinSwiGLU twin(kC, kF);
    torch::manual_seed(kSeed);
    init_llama_twin(*twin, kLayers);
    run_twin(
        what, *par, *twin, tp, input_activations(), sp ? sequence_layout(r, n) : TwinLayout{},
        [&](const torch::Tensor& x) { return par(x); },
        [&](const torch::Tensor& x) { return twin(x); });
  }
  if (n > 1) {
    REQUIRE_THROWS_WITH(
        ParallelSwiGLU(ParallelSwiGLUOptions(kC, 91), tp),
        Catch::Contains("ffn_dim (91) must be divisible by tp (" + std::to_string(n) + ")"));
  }
}

TEST_CASE("Llama layers: VocabParallelHead is an untied lm_head cut by padded vocab rows",
          "[mpi][tp][llama]") {
  const auto mesh = tp_mesh();
  const auto& tp = mesh.group("tp");
  const int r = tp_rank(mesh), n = tp_size(mesh);
  const int64_t vocab = 75; // padded to 128
  for (const bool sp : {false, true}) {
    const std::string what = "lm_head tp " + std::to_string(n) + (sp ? " sequence parallel" : "");
    torch::manual_seed(kSeed);
    auto par = laid_out(VocabParallelHead(VocabParallelHeadOptions(kC, vocab)), tp, sp);
    torch::manual_seed(kSeed);
    VocabParallelHead direct(VocabParallelHeadOptions(kC, vocab).sequence_parallel(sp), tp);
    check_same_shards(what + ": serial-then-laid-out vs built on the group", *par, *direct);
    CHECK(par->padded_vocab_size() == 128);
    const auto spec = par->shard_specs().at("weight");
    CHECK(spec.global_size == 128);
    CHECK(spec.unpadded_size == vocab);
    CHECK(spec.offset == r * 128 / n);
    torch::nn::Linear twin(torch::nn::LinearOptions(kC, vocab).bias(false));
    torch::manual_seed(kSeed);
    init_llama_twin(*twin, 1);
    TwinLayout layout;
    layout.cut_output = [=](const torch::Tensor& t) {
      return chunk_of(pad_dim(t, 2, 128), -1, r, n);
    };
    if (sp) {
      layout.cut_input = [=](const torch::Tensor& t) { return chunk_of(t, kSequenceDim, r, n); };
    }
    run_twin(
        what, *par, *twin, tp, input_activations(), layout,
        [&](const torch::Tensor& x) { return par(x); },
        [&](const torch::Tensor& x) { return twin(x); });
    // Padding rows: no gradient, still 0 after AdamW.
    const int64_t first_pad = std::max<int64_t>(0, vocab - r * 128 / n);
    if (first_pad < par->weight.size(0)) {
      const auto rows = par->weight.narrow(0, first_pad, par->weight.size(0) - first_pad);
      check_equal(what + " padding rows", rows, torch::zeros_like(rows));
    }
  }
}
