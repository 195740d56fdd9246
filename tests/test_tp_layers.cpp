// Tensor-parallel layers against their serial twins (plain torch::nn modules holding the full
// weights, drawn after the same seed): outputs, input grads, gathered parameter grads, and
// the same after an AdamW step and a second forward. tp = world size.
#include <catch2/catch.hpp>

#include "meshtrain/parallel/column_parallel_linear.h"
#include "meshtrain/parallel/mappings.h"
#include "meshtrain/parallel/parallel_mlp.h"
#include "meshtrain/parallel/parallel_self_attention.h"
#include "meshtrain/parallel/parallel_transformer_block.h"
#include "meshtrain/parallel/row_parallel_linear.h"
#include "meshtrain/parallel/vocab_parallel_embedding.h"
#include "tests/test_tp_helpers.h"

using namespace meshtrain;
using namespace meshtrain::testing;

namespace {

constexpr int64_t kB = 2;
constexpr int64_t kT = 8;
constexpr int64_t kC = 32;
constexpr int64_t kH = 8;
constexpr int64_t kLayers = 2;
constexpr uint64_t kSeed = 1234;

torch::Tensor input_activations() {
  torch::manual_seed(99); // the same input on every rank
  return torch::randn({kB, kT, kC});
}

// A sequence-parallel layout: input and output are this rank's tokens.
TwinLayout sequence_layout(const Mesh& mesh) {
  const int r = tp_rank(mesh), n = tp_size(mesh);
  TwinLayout layout;
  layout.cut_input = [=](const torch::Tensor& t) { return chunk_of(t, kSequenceDim, r, n); };
  layout.cut_output = layout.cut_input;
  return layout;
}

} // namespace

TEST_CASE("TP ColumnParallelLinear matches nn::Linear (gathered and sharded output)", "[mpi][tp]") {
  const auto mesh = tp_mesh();
  const auto& tp = mesh.group("tp");
  for (const bool gather : {true, false}) {
    torch::manual_seed(kSeed);
    ColumnParallelLinear par(ColumnParallelLinearOptions(kC, 2 * kC).gather_output(gather), tp);
    torch::nn::Linear twin(kC, 2 * kC);
    torch::manual_seed(kSeed);
    init_serial(*twin, 1);
    TwinLayout layout;
    if (!gather) {
      layout.cut_output = [&](const torch::Tensor& t) {
        return chunk_of(t, -1, tp_rank(mesh), tp_size(mesh));
      };
    }
    run_twin(
        std::string("column gather_output=") + (gather ? "true" : "false"), *par, *twin, tp,
        input_activations(), layout, [&](const torch::Tensor& x) { return par(x); },
        [&](const torch::Tensor& x) { return twin(x); });
  }
}

TEST_CASE("TP ColumnParallelLinear with 3 blocks keeps q|k|v rows of each block", "[mpi][tp]") {
  const auto mesh = tp_mesh();
  const auto& tp = mesh.group("tp");
  const int r = tp_rank(mesh), n = tp_size(mesh);
  torch::manual_seed(kSeed);
  ColumnParallelLinear par(ColumnParallelLinearOptions(kC, 3 * kC).gather_output(false).blocks(3),
                           tp);
  torch::nn::Linear twin(kC, 3 * kC);
  torch::manual_seed(kSeed);
  init_serial(*twin, 1);
  // Local weight rows: [r*C/n, (r+1)*C/n) of q, then of k, then of v.
  const int64_t piece = kC / n;
  for (int64_t blk = 0; blk < 3; ++blk) {
    check_equal("c_attn block " + std::to_string(blk) + " rows",
                par->weight.narrow(0, blk * piece, piece),
                twin->weight.narrow(0, blk * kC + r * piece, piece));
  }
  const auto spec = par->shard_specs().at("weight");
  CHECK(spec.blocks == 3);
  CHECK(spec.offset == r * piece);
  CHECK(spec.global_size == 3 * kC);
  TwinLayout layout;
  layout.cut_output = [=](const torch::Tensor& t) { return cut_shard(t, 2, r, n, 3); };
  run_twin(
      "column blocks=3", *par, *twin, tp, input_activations(), layout,
      [&](const torch::Tensor& x) { return par(x); },
      [&](const torch::Tensor& x) { return twin(x); });
}

TEST_CASE("TP RowParallelLinear matches nn::Linear (parallel and replicated input)", "[mpi][tp]") {
  const auto mesh = tp_mesh();
  const auto& tp = mesh.group("tp");
  for (const bool parallel_input : {true, false}) {
    torch::manual_seed(kSeed);
    RowParallelLinear par(RowParallelLinearOptions(2 * kC, kC).input_is_parallel(parallel_input),
                          tp);
    torch::nn::Linear twin(2 * kC, kC);
    torch::manual_seed(kSeed);
    init_serial(*twin, 1);
    TwinLayout layout;
    if (parallel_input) {
      layout.cut_input = [&](const torch::Tensor& t) {
        return chunk_of(t, -1, tp_rank(mesh), tp_size(mesh));
      };
    }
    torch::manual_seed(7);
    const auto x = torch::randn({kB, kT, 2 * kC});
    run_twin(
        std::string("row input_is_parallel=") + (parallel_input ? "true" : "false"), *par, *twin,
        tp, x, layout, [&](const torch::Tensor& in) { return par(in); },
        [&](const torch::Tensor& in) { return twin(in); });
  }
}

TEST_CASE("TP VocabParallelEmbedding matches nn::Embedding with a padded vocab", "[mpi][tp]") {
  const auto mesh = tp_mesh();
  const auto& tp = mesh.group("tp");
  const int r = tp_rank(mesh), n = tp_size(mesh);
  const int64_t vocab = 75; // not a multiple of tp: padded to 128
  torch::manual_seed(3);
  auto ids = torch::randint(0, vocab, {kB, kT}, torch::kLong);
  ids[0][0] = vocab - 1;
  ids[1][3] = 0;
  for (const bool sp : {false, true}) {
    const std::string what = std::string("embedding sequence_parallel=") + (sp ? "true" : "false");
    torch::manual_seed(kSeed);
    VocabParallelEmbedding par(VocabParallelEmbeddingOptions(vocab, kC).sequence_parallel(sp), tp);
    torch::nn::Embedding twin(vocab, kC);
    torch::manual_seed(kSeed);
    init_serial(*twin, 1);
    const int64_t padded = par->padded_num_embeddings();
    CHECK(padded == 128);
    CHECK(par->weight.size(0) == padded / n);
    const auto spec = par->shard_specs().at("weight");
    CHECK(spec.global_size == 128);
    CHECK(spec.unpadded_size == vocab);
    CHECK(spec.offset == r * padded / n);
    TwinLayout layout;
    if (sp) {
      layout.cut_output = [=](const torch::Tensor& t) { return chunk_of(t, kSequenceDim, r, n); };
    }
    run_twin(
        what, *par, *twin, tp, ids, layout, [&](const torch::Tensor& x) { return par(x); },
        [&](const torch::Tensor& x) { return twin(x); });
    // Padding rows never receive a gradient and stay 0 through AdamW (decay of 0 is 0).
    const int64_t first_pad = std::max<int64_t>(0, vocab - par->vocab_start());
    if (first_pad < par->weight.size(0)) {
      const auto pad_rows = par->weight.narrow(0, first_pad, par->weight.size(0) - first_pad);
      check_equal(what + " padding rows", pad_rows, torch::zeros_like(pad_rows));
      const auto pad_grad = par->weight.grad().narrow(0, first_pad, pad_rows.size(0));
      check_equal(what + " padding grad", pad_grad, torch::zeros_like(pad_grad));
    }
  }
}

TEST_CASE("TP VocabParallelEmbedding::logits is the tied lm_head, cut by vocab", "[mpi][tp]") {
  const auto mesh = tp_mesh();
  const auto& tp = mesh.group("tp");
  const int r = tp_rank(mesh), n = tp_size(mesh);
  const int64_t vocab = 75;
  for (const bool sp : {false, true}) {
    torch::manual_seed(kSeed);
    VocabParallelEmbedding par(VocabParallelEmbeddingOptions(vocab, kC).sequence_parallel(sp), tp);
    torch::nn::Embedding twin(vocab, kC);
    torch::manual_seed(kSeed);
    init_serial(*twin, 1);
    const int64_t padded = par->padded_num_embeddings();
    TwinLayout layout;
    // Logits of padded columns are 0 (zero rows): the twin's logits padded with zeros, cut.
    layout.cut_output = [=](const torch::Tensor& t) {
      return chunk_of(pad_dim(t, 2, padded), -1, r, n);
    };
    if (sp) {
      layout.cut_input = [=](const torch::Tensor& t) { return chunk_of(t, kSequenceDim, r, n); };
    }
    run_twin(
        std::string("logits sequence_parallel=") + (sp ? "true" : "false"), *par, *twin, tp,
        input_activations(), layout, [&](const torch::Tensor& x) { return par->logits(x); },
        [&](const torch::Tensor& x) { return torch::nn::functional::linear(x, twin->weight); });
  }
}

TEST_CASE("TP ParallelSelfAttention matches nanoGPT attention", "[mpi][tp]") {
  const auto mesh = tp_mesh();
  const auto& tp = mesh.group("tp");
  for (const bool sp : {false, true}) {
    torch::manual_seed(kSeed);
    ParallelSelfAttention par(
        ParallelSelfAttentionOptions(kC, kH).n_layer(kLayers).sequence_parallel(sp), tp);
    SerialAttention twin(kC, kH);
    torch::manual_seed(kSeed);
    init_serial(*twin, kLayers);
    run_twin(
        std::string("attention sequence_parallel=") + (sp ? "true" : "false"), *par, *twin, tp,
        input_activations(), sp ? sequence_layout(mesh) : TwinLayout{},
        [&](const torch::Tensor& x) { return par(x); },
        [&](const torch::Tensor& x) { return twin(x); });
  }
}

TEST_CASE("TP ParallelMLP matches nanoGPT MLP", "[mpi][tp]") {
  const auto mesh = tp_mesh();
  const auto& tp = mesh.group("tp");
  for (const bool sp : {false, true}) {
    torch::manual_seed(kSeed);
    ParallelMLP par(ParallelMLPOptions(kC).n_layer(kLayers).sequence_parallel(sp), tp);
    SerialMLP twin(kC);
    torch::manual_seed(kSeed);
    init_serial(*twin, kLayers);
    run_twin(
        std::string("mlp sequence_parallel=") + (sp ? "true" : "false"), *par, *twin, tp,
        input_activations(), sp ? sequence_layout(mesh) : TwinLayout{},
        [&](const torch::Tensor& x) { return par(x); },
        [&](const torch::Tensor& x) { return twin(x); });
  }
}

TEST_CASE("TP ParallelTransformerBlock matches the serial pre-LN block", "[mpi][tp]") {
  const auto mesh = tp_mesh();
  const auto& tp = mesh.group("tp");
  for (const bool sp : {false, true}) {
    torch::manual_seed(kSeed);
    ParallelTransformerBlock par(
        ParallelTransformerBlockOptions(kC, kH).n_layer(kLayers).sequence_parallel(sp), tp);
    SerialBlock twin(kC, kH);
    torch::manual_seed(kSeed);
    init_serial(*twin, kLayers);
    run_twin(
        std::string("block sequence_parallel=") + (sp ? "true" : "false"), *par, *twin, tp,
        input_activations(), sp ? sequence_layout(mesh) : TwinLayout{},
        [&](const torch::Tensor& x) { return par(x); },
        [&](const torch::Tensor& x) { return twin(x); });
  }
}

TEST_CASE("TP block parameter names follow nanoGPT and shard specs describe them", "[mpi][tp]") {
  const auto mesh = tp_mesh();
  const auto& tp = mesh.group("tp");
  const int n = tp_size(mesh);
  ParallelTransformerBlock block(ParallelTransformerBlockOptions(kC, kH).sequence_parallel(true),
                                 tp);
  std::vector<std::string> names;
  for (const auto& [name, spec] : named_shard_specs(*block)) {
    names.push_back(name);
  }
  CHECK(names == std::vector<std::string>{
                     "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                     "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                     "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"});
  for (const auto& [name, spec] : named_shard_specs(*block)) {
    INFO(rank_tag() << name << ": dim " << spec.dim << ", blocks " << spec.blocks
                    << ", sequence_parallel " << spec.sequence_parallel);
    const bool ln = name.rfind("ln_", 0) == 0;
    const bool row_bias = name == "attn.c_proj.bias" || name == "mlp.c_proj.bias";
    if (ln || row_bias) {
      CHECK_FALSE(spec.is_partitioned());
      CHECK(spec.sequence_parallel); // reduced over TP under sequence parallelism
    } else if (name == "attn.c_proj.weight" || name == "mlp.c_proj.weight") {
      CHECK(spec.dim == 1);
      CHECK(spec.offset == tp_rank(mesh) * spec.global_size / n);
    } else {
      CHECK(spec.dim == 0);
      CHECK(spec.blocks == (name.rfind("attn.c_attn", 0) == 0 ? 3 : 1));
    }
  }
}

TEST_CASE("TP block init draws the same master weights at tp=1 and tp=world", "[mpi][tp]") {
  const auto mesh = tp_mesh();
  Mesh single(ParallelDims{-1, 1, 1, 1}, test_runtime().world());
  torch::manual_seed(kSeed);
  ParallelTransformerBlock wide(ParallelTransformerBlockOptions(kC, kH).n_layer(kLayers),
                                mesh.group("tp"));
  const auto after_wide = torch::randn({4}); // the generator advanced by the same draws
  torch::manual_seed(kSeed);
  ParallelTransformerBlock narrow(ParallelTransformerBlockOptions(kC, kH).n_layer(kLayers),
                                  single.group("tp"));
  const auto after_narrow = torch::randn({4});
  check_equal("generator after init", after_wide, after_narrow);
  compare_params("tp=1 vs tp=world", *wide, *narrow, mesh.group("tp"), false, true);
}
