// Tests of the Llama example (examples/llama/llama_model.h, compiled in as the GPT's is):
// Hugging Face's parameter names and shapes, the draw order, the forward against a plain
// LibTorch Llama written from the named parameters, init invariance (every tp holds the
// shards of the serial model), per-step loss parity of the Trainer over 20 fp32 steps in
// every layout of the issue (dp, tp, tp + sequence parallelism, dp x tp ZeRO-2, accumulation,
// full and selective recomputation) against a serial run on a group of one, and every
// parameter gradient of tp 2 against the serial one.
#include <catch2/catch.hpp>

#include "meshtrain/core/mesh.h"
#include "meshtrain/launch/parallelize.h"
#include "meshtrain/launch/trainer.h"
#include "meshtrain/parallel/shard_tensor.h"
#include "meshtrain/parallel/sharding.h"
#include "meshtrain/parallel/tensor_parallel_layer.h"
#include "tests/gpt_fixtures.h"
#include "tests/harness.h"

#include "examples/llama/llama_model.h"

#include <cmath>

using namespace meshtrain;
using namespace meshtrain::testing;
namespace F = torch::nn::functional;

namespace {

// n_head 4, n_kv_head 2 (the issue's small Llama), T 16, vocab 256.
llama::LlamaConfig tiny_llama() {
  return llama::LlamaConfig()
      .vocab_size(256)
      .block_size(kBlock)
      .n_layer(2)
      .n_head(4)
      .n_kv_head(2)
      .n_embd(32)
      .ffn_dim(64);
}

// Hugging Face's LlamaForCausalLM forward in plain LibTorch from the named parameters of a
// tp = 1 Llama: logits [B, T, V] (padding dropped).
torch::Tensor reference_logits(llama::LlamaImpl& model, const torch::Tensor& idx) {
  const auto& c = model.config();
  const int64_t B = idx.size(0), T = idx.size(1), C = c.n_embd(), H = c.n_head(),
                Hkv = c.n_kv_head(), D = C / H;
  const auto p = model.named_parameters();
  const auto get = [&](const std::string& name) { return p[name]; };
  const auto rms = [&](const torch::Tensor& x, const std::string& name) {
    return get(name) * (x * torch::rsqrt(x.square().mean(-1, true) + c.rms_norm_eps()));
  };
  const auto lin = [&](const torch::Tensor& x, const std::string& name) {
    return F::linear(x, get(name));
  };
  // RoPE as complex multiplication of the pairs (j, j + D/2).
  const auto rope = [&](const torch::Tensor& x) { // [B, h, T, D]
    const auto j = torch::arange(D / 2, torch::kDouble);
    const auto angles =
        torch::outer(torch::arange(T, torch::kDouble), torch::pow(c.rope_theta(), -2.0 * j / D));
    const auto rot =
        torch::polar(torch::ones_like(angles), angles).to(torch::kComplexFloat); // [T, D/2]
    const auto z = torch::complex(x.narrow(-1, 0, D / 2), x.narrow(-1, D / 2, D / 2)) * rot;
    return torch::cat({torch::real(z), torch::imag(z)}, -1);
  };
  const auto emb = get("model.embed_tokens.weight").narrow(0, 0, c.vocab_size());
  auto x = F::embedding(idx, emb);
  for (int64_t i = 0; i < c.n_layer(); ++i) {
    const std::string l = "model.layers." + std::to_string(i) + ".";
    const auto h = rms(x, l + "input_layernorm.weight");
    const auto q = rope(lin(h, l + "self_attn.q_proj.weight").view({B, T, H, D}).transpose(1, 2));
    const auto k = rope(lin(h, l + "self_attn.k_proj.weight").view({B, T, Hkv, D}).transpose(1, 2))
                       .repeat_interleave(H / Hkv, 1);
    const auto v = lin(h, l + "self_attn.v_proj.weight")
                       .view({B, T, Hkv, D})
                       .transpose(1, 2)
                       .repeat_interleave(H / Hkv, 1);
    auto att = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(double(D));
    att = att.masked_fill(torch::ones({T, T}, torch::kBool).triu(1), -INFINITY).softmax(-1);
    x = x + lin(torch::matmul(att, v).transpose(1, 2).reshape({B, T, C}),
                l + "self_attn.o_proj.weight");
    const auto m = rms(x, l + "post_attention_layernorm.weight");
    x = x + lin(F::silu(lin(m, l + "mlp.gate_proj.weight")) * lin(m, l + "mlp.up_proj.weight"),
                l + "mlp.down_proj.weight");
  }
  const auto head = c.tie_embeddings() ? emb : get("lm_head.weight").narrow(0, 0, c.vocab_size());
  return F::linear(rms(x, "model.norm.weight"), head);
}

Parallelized tiny_llama_run(const Mesh& mesh, const ParallelPlan& plan,
                            const llama::LlamaConfig& config = tiny_llama(), bool training = true) {
  torch::manual_seed(kSeed);
  auto options = test_optimizer();
  return parallelize(std::make_shared<llama::LlamaImpl>(config), mesh, plan,
                     options.training(training));
}

using Run = TrainedRun;

Run train_run(const Mesh& mesh, const TokenFiles& files, const ParallelPlan& plan) {
  Trainer trainer(tiny_llama_run(mesh, plan), files.train, files.val, quiet_options());
  return train_steps(trainer);
}

} // namespace

TEST_CASE("Llama: Hugging Face parameter names and shapes, init draws, loss at init", "[llama]") {
  for (const bool tied : {false, true}) {
    torch::manual_seed(kSeed);
    llama::Llama model(tiny_llama().tie_embeddings(tied));
    const int64_t C = 32, D = 8;
    std::vector<std::pair<std::string, std::vector<int64_t>>> expected = {
        {"model.embed_tokens.weight", {256, C}}};
    for (int i = 0; i < 2; ++i) {
      const std::string l = "model.layers." + std::to_string(i) + ".";
      const std::vector<std::pair<std::string, std::vector<int64_t>>> layer = {
          {l + "input_layernorm.weight", {C}},         {l + "self_attn.q_proj.weight", {4 * D, C}},
          {l + "self_attn.k_proj.weight", {2 * D, C}}, {l + "self_attn.v_proj.weight", {2 * D, C}},
          {l + "self_attn.o_proj.weight", {C, 4 * D}}, {l + "post_attention_layernorm.weight", {C}},
          {l + "mlp.gate_proj.weight", {64, C}},       {l + "mlp.up_proj.weight", {64, C}},
          {l + "mlp.down_proj.weight", {C, 64}}};
      expected.insert(expected.end(), layer.begin(), layer.end());
    }
    expected.push_back({"model.norm.weight", {C}});
    if (!tied) {
      expected.push_back({"lm_head.weight", {256, C}});
    }
    const auto params = model->named_parameters();
    REQUIRE(params.size() == expected.size());
    int64_t total = 0;
    for (size_t i = 0; i < expected.size(); ++i) {
      INFO("tied " << tied << ", parameter " << i << ": " << params[i].key() << " "
                   << params[i].value().sizes());
      CHECK(params[i].key() == expected[i].first);
      CHECK(params[i].value().sizes().vec() == expected[i].second);
      total += params[i].value().numel();
    }
    CHECK(model->num_parameters() == total);

    // DESIGN §4b's init: each value by (seed, name, index).
    for (const auto& [name, shape] : expected) {
      if (shape.size() == 1) {
        CHECK(torch::equal(params[name], torch::ones({C})));
        continue;
      }
      const bool scaled = ends_with(name, "o_proj.weight") || ends_with(name, "down_proj.weight");
      INFO("init of " << name);
      CHECK(torch::equal(params[name],
                         normal_init(name, shape, scaled ? 0.02 / std::sqrt(4.0) : 0.02)));
    }

    auto gen = at::detail::createCPUGenerator(7);
    const auto idx = at::randint(256, {4, 16}, gen, torch::kLong);
    const auto targets = at::randint(256, {4, 16}, gen, torch::kLong);
    const auto out = model->forward(idx, targets);
    CHECK(std::abs(out.loss.item<double>() - std::log(256.0)) < 0.05);
    CHECK(out.token_count.item<int64_t>() == 64);
  }
  // The default config is about the GPT default's size (docs/llama.md).
  CHECK(llama::default_ffn_dim(128) == 384);
  CHECK(llama::Llama(llama::LlamaConfig())->num_parameters() == 853120);
}

TEST_CASE("Llama: tp=1 forward equals a plain LibTorch Hugging Face Llama", "[llama]") {
  for (const bool tied : {false, true}) {
    torch::manual_seed(kSeed);
    // Larger weights than the init so that every term matters; a padded vocab (200 -> 256).
    llama::Llama model(
        tiny_llama().vocab_size(200).init_std(0.3).rope_theta(100.0).tie_embeddings(tied));
    {
      torch::NoGradGuard no_grad;
      for (auto& p : model->parameters()) {
        if (p.dim() == 1) {
          p.normal_(1.0, 0.3);
        }
      }
    }
    REQUIRE(model->padded_vocab_size() == 256);
    auto gen = at::detail::createCPUGenerator(11);
    const auto idx = at::randint(200, {3, 12}, gen, torch::kLong);
    const auto targets = at::randint(200, {3, 12}, gen, torch::kLong);
    const auto out = model->forward(idx, targets);
    const auto expected = reference_logits(*model, idx);
    REQUIRE(out.logits.sizes() == torch::IntArrayRef({3, 12, 256}));
    INFO("tied " << tied);
    // Two fp32 computations in another order (rotary, GQA, SwiGLU): rounding of the O(max)
    // sums reaches ~1e-6 of the largest logit in an element near zero, so the absolute floor
    // is 1e-5 of the largest logit.
    const double largest = expected.abs().max().item<double>();
    CHECK(all_close(out.logits.narrow(-1, 0, 200), expected, 1e-5, 1e-5 * largest));
    const auto loss = F::cross_entropy(expected.reshape({-1, 200}), targets.reshape({-1}));
    CHECK(all_close(out.loss, loss, 1e-5, 0));
  }
  REQUIRE_THROWS_WITH(llama::Llama(tiny_llama().n_kv_head(3)),
                      Catch::Contains("n_kv_head (3) must divide n_head (4)"));
  REQUIRE_THROWS_WITH(llama::config_from_json(R"({"architecture": "nanoGPT"})", "x.safetensors"),
                      Catch::Contains("x.safetensors: the model is 'nanoGPT', not a Llama"));
  const auto round_trip =
      llama::config_from_json(llama::config_to_json(tiny_llama().tie_embeddings(true)), "json");
  CHECK(llama::config_to_json(round_trip) ==
        llama::config_to_json(tiny_llama().tie_embeddings(true)));
}

TEST_CASE("Llama: every tp holds the shards of the serial model", "[mpi][llama]") {
  auto& rt = test_runtime();
  // tp 2 (n_kv_head 2); in a world of 4 also tp 4 with n_kv_head 4.
  std::vector<std::pair<int, int64_t>> cases = {{2, 2}};
  if (rt.world_size() % 4 == 0) {
    cases.push_back({4, 4});
  }
  for (const auto& [tp, kv] : cases) {
    const Mesh mesh(ParallelDims{-1, 1, tp, 1}, rt.world());
    const auto config = tiny_llama().vocab_size(250).n_kv_head(kv);
    torch::manual_seed(kSeed);
    llama::Llama serial(config);
    torch::manual_seed(kSeed);
    llama::Llama model(config);
    apply_tensor_parallel(*model, TensorParallelism{mesh.group("tp"), true});
    const auto serial_params = serial->named_parameters();
    for (const auto& [name, spec] : named_shard_specs(*model)) {
      const auto local = model->named_parameters()[name];
      const auto full =
          spec.is_partitioned() ? gather_unsharded(local, spec, mesh.group(spec.group)) : local;
      auto want = serial_params[name];
      if (name == "model.embed_tokens.weight" || name == "lm_head.weight") {
        want = want.narrow(0, 0, 250); // the padding rows are not part of the model
      }
      INFO(rank_tag() << "tp " << tp << " " << name << ": " << full.sizes() << " vs serial "
                      << want.sizes());
      REQUIRE(full.sizes() == want.sizes());
      CHECK(torch::equal(full, want));
    }
  }
}

TEST_CASE("Llama + Trainer: 20 fp32 steps of every layout equal the serial run", "[mpi][llama]") {
  auto& rt = test_runtime();
  const int world = rt.world_size();
  const TokenFiles files;

  const Mesh serial_mesh(ParallelDims{1, 1, 1, 1}, self_group());
  const auto serial = train_run(serial_mesh, files, test_plan(serial_mesh));
  CHECK(serial.losses.back() < serial.losses.front() - 0.5); // it learns
  CHECK(serial.norms.front() > 0.5);                         // clipping is exercised

  struct Layout {
    std::string name;
    int cp;
    int tp;
    bool sp;
    int zero;
    int64_t accumulation;
    RecomputeMode recompute;
  };
  const auto none = RecomputeMode::kNone;
  std::vector<Layout> layouts = {
      {"dp", 1, 1, false, 0, 1, none},
      {"dp, ZeRO-2", 1, 1, false, 2, 1, none},
      {"tp2", 1, 2, false, 0, 1, none},
      {"tp2 + sequence parallel", 1, 2, true, 0, 1, none},
      {"dp, accumulation 4", 1, 1, false, 0, 4, none},
      {"tp2 + sequence parallel, full recompute", 1, 2, true, 0, 1, RecomputeMode::kFull},
      {"tp2, selective recompute", 1, 2, false, 1, 1, RecomputeMode::kSelective},
      {"cp2", 2, 1, false, 0, 1, none},
      {"cp2, selective recompute", 2, 1, false, 1, 1, RecomputeMode::kSelective},
  };
  if (world % 4 == 0) {
    layouts.push_back({"dp2 x tp2, ZeRO-2", 1, 2, false, 2, 1, none});
    layouts.push_back({"dp2 x tp2 + sequence parallel, ZeRO-2, accumulation 2, selective", 1, 2,
                       true, 2, 2, RecomputeMode::kSelective});
    // Context parallelism: the rotary angles of each rank's two chunks, ring attention with
    // grouped-query kv heads.
    layouts.push_back({"cp2 x tp2 + sequence parallel", 2, 2, true, 0, 1, none});
  }
  for (const auto& l : layouts) {
    const Mesh mesh(ParallelDims{-1, l.cp, l.tp, 1}, rt.world());
    const int64_t dp = mesh.group("dp")->size();
    auto plan = test_plan(mesh, l.zero, l.sp, kGlobalBatch / (dp * l.accumulation));
    plan.recompute = l.recompute;
    const auto run = train_run(mesh, files, plan);
    for (int s = 0; s < kSteps; ++s) {
      INFO(rank_tag() << l.name << " (dp " << dp << " x cp " << l.cp << " x tp " << l.tp
                      << "), step " << s + 1 << ": loss " << run.losses[s] << " vs serial "
                      << serial.losses[s] << ", grad norm " << run.norms[s] << " vs "
                      << serial.norms[s]);
      CHECK(std::abs(run.losses[s] - serial.losses[s]) <= 1e-5 * std::abs(serial.losses[s]));
      // The gradient norm (a sum of squares over every parameter, reduced in another order
      // by each layout) is checked less tightly than the losses: measured up to 1.1e-5
      // relative in dp2 x tp2 + SP, ZeRO-2, accumulation 2, selective at step 10.
      CHECK(std::abs(run.norms[s] - serial.norms[s]) <= 5e-5 * std::abs(serial.norms[s]));
    }
    INFO(rank_tag() << l.name << ": val_loss " << run.val_loss << " vs serial " << serial.val_loss);
    CHECK(std::abs(run.val_loss - serial.val_loss) <= 1e-5 * serial.val_loss);
  }
}

TEST_CASE("Llama: every parameter gradient of tp2 equals the serial one", "[mpi][llama]") {
  auto& rt = test_runtime();
  const TokenFiles files;
  TokenLoader loader(files.train, TokenLoaderOptions{kBlock, 8, 8, 0, 1, false, 1, false});
  const auto batch = loader.step_batches(0).at(0); // every rank: the same 8 sequences

  const Mesh serial_mesh(ParallelDims{1, 1, 1, 1}, self_group());
  auto serial = tiny_llama_run(serial_mesh, test_plan(serial_mesh), tiny_llama(), false);
  serial.loss(batch).backward();
  const auto serial_params = serial.model->named_parameters();

  for (const bool sp : {false, true}) {
    const Mesh mesh(ParallelDims{-1, 1, 2, 1}, rt.world());
    auto par = tiny_llama_run(mesh, test_plan(mesh, 0, sp), tiny_llama(), false);
    par.loss(batch).backward();
    const auto params = par.model->named_parameters();
    int checked = 0;
    for (const auto& [name, spec] : named_shard_specs(*par.model)) {
      const auto& local = params[name];
      REQUIRE(local.grad().defined());
      const auto full = gather_unsharded(local.grad(), spec, mesh.group(spec.group));
      auto want = serial_params[name].grad();
      if (spec.is_partitioned() && spec.unpadded_size < spec.global_size) {
        want = want.narrow(spec.dim, 0, spec.unpadded_size);
      }
      INFO(rank_tag() << "tp2" << (sp ? " + sequence parallel" : "") << ": " << name
                      << ".grad (max |serial| " << want.abs().max().item<double>() << ")");
      // 1e-5 relative per element; the absolute floor is 1e-5 of the largest serial element
      // (a gradient element near zero is a difference of O(max) terms).
      CHECK(all_close(full, want, 1e-5, 1e-5 * want.abs().max().item<double>()));
      ++checked;
    }
    CHECK(checked == static_cast<int>(serial_params.size()));
  }
}

TEST_CASE("Llama + Trainer: bf16 parameters and compute with fp32 RMSNorm follow the fp32 run",
          "[mpi][llama]") {
  auto& rt = test_runtime();
  const TokenFiles files;
  const Mesh mesh(ParallelDims{-1, 1, 2, 1}, rt.world()); // tp 2: the precision with sharding
  std::vector<double> fp32, bf16;
  for (const bool use_bf16 : {false, true}) {
    auto plan = test_plan(mesh, 1, true);
    plan.precision = use_bf16 ? Precision::kBf16 : Precision::kFp32;
    Trainer trainer(tiny_llama_run(mesh, plan), files.train, files.val, quiet_options());
    auto& losses = use_bf16 ? bf16 : fp32;
    for (int s = 0; s < kSteps; ++s) {
      losses.push_back(trainer.train_step().loss);
    }
    if (use_bf16) {
      const auto params = trainer.model().named_parameters();
      CHECK(params["model.layers.0.self_attn.q_proj.weight"].scalar_type() == torch::kBFloat16);
      CHECK(params["model.norm.weight"].scalar_type() == torch::kBFloat16);
      for (const auto& [key, t] : trainer.optimizer().state_dict().tensors) {
        INFO(key);
        CHECK(t.scalar_type() == torch::kFloat); // master and moments stay fp32
      }
    }
  }
  for (int s = 0; s < kSteps; ++s) {
    INFO(rank_tag() << "step " << s + 1 << ": bf16 " << bf16[s] << " vs fp32 " << fp32[s]);
    CHECK(std::isfinite(bf16[s]));
    CHECK(std::abs(bf16[s] - fp32[s]) <= 0.02 * fp32[s]);
  }
  CHECK(bf16.back() < bf16.front()); // it learns
}
