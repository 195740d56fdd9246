// The communication pattern of a tensor-parallel transformer block (counting mode), the
// LayerNorm gradients under sequence parallelism (bit-identical on every TP rank and equal
// to the serial twin's) and the per-rank parameter bytes of a block.
#include <catch2/catch.hpp>

#include "meshtrain/parallel/mappings.h"
#include "meshtrain/parallel/parallel_transformer_block.h"
#include "tests/test_tp_helpers.h"

using namespace meshtrain;
using namespace meshtrain::testing;

namespace {

constexpr int64_t kB = 2;
constexpr int64_t kT = 8;
constexpr int64_t kC = 32;
constexpr int64_t kH = 8;

struct Counts {
  int64_t all_reduce, all_gather, reduce_scatter, all_reduce_bytes, all_gather_bytes,
      reduce_scatter_bytes;
};

Counts tp_counts(const Mesh& mesh) {
  const auto& log = mesh.comm_log();
  return Counts{log.count(CollectiveKind::kAllReduce, "tp"),
                log.count(CollectiveKind::kAllGather, "tp"),
                log.count(CollectiveKind::kReduceScatter, "tp"),
                log.bytes(CollectiveKind::kAllReduce, "tp"),
                log.bytes(CollectiveKind::kAllGather, "tp"),
                log.bytes(CollectiveKind::kReduceScatter, "tp")};
}

void check_counts(const std::string& what, const Counts& got, const Counts& want) {
  INFO(rank_tag() << what << ": all-reduce " << got.all_reduce << " (" << got.all_reduce_bytes
                  << " B), all-gather " << got.all_gather << " (" << got.all_gather_bytes
                  << " B), reduce-scatter " << got.reduce_scatter << " ("
                  << got.reduce_scatter_bytes << " B); expected " << want.all_reduce << " ("
                  << want.all_reduce_bytes << " B), " << want.all_gather << " ("
                  << want.all_gather_bytes << " B), " << want.reduce_scatter << " ("
                  << want.reduce_scatter_bytes << " B)");
  CHECK(got.all_reduce == want.all_reduce);
  CHECK(got.all_gather == want.all_gather);
  CHECK(got.reduce_scatter == want.reduce_scatter);
  CHECK(got.all_reduce_bytes == want.all_reduce_bytes);
  CHECK(got.all_gather_bytes == want.all_gather_bytes);
  CHECK(got.reduce_scatter_bytes == want.reduce_scatter_bytes);
}

} // namespace

TEST_CASE("TP block communication: Megatron's pattern with and without sequence parallelism",
          "[mpi][tp]") {
  const auto mesh = tp_mesh();
  const auto& tp = mesh.group("tp");
  const int r = tp_rank(mesh), n = tp_size(mesh);
  const int64_t act = kB * kT * kC * 4; // bytes of one full [B, T, C] fp32 activation
  for (const bool sp : {false, true}) {
    const std::string what = std::string("sequence_parallel=") + (sp ? "true" : "false");
    ParallelTransformerBlock block(ParallelTransformerBlockOptions(kC, kH).sequence_parallel(sp),
                                   tp);
    torch::manual_seed(5);
    auto x = torch::randn({kB, kT, kC});
    if (sp) {
      x = chunk_of(x, kSequenceDim, r, n);
    }
    x.requires_grad_();
    mesh.comm_log().clear();
    mesh.comm_log().enable();
    const auto y = block(x);
    const auto forward = tp_counts(mesh);
    mesh.comm_log().clear();
    y.sum().backward();
    const auto backward = tp_counts(mesh);
    mesh.comm_log().enable(false);
    mesh.comm_log().clear();
    if (!sp) {
      // Forward: the all-reduce after attn.c_proj and after mlp.c_proj.
      // Backward: the all-reduce of the input grads of attn.c_attn and mlp.c_fc.
      check_counts(what + " forward", forward, Counts{2, 0, 0, 2 * act, 0, 0});
      check_counts(what + " backward", backward, Counts{2, 0, 0, 2 * act, 0, 0});
    } else {
      // Forward: all-gather along T before c_attn and c_fc, reduce-scatter after each
      // c_proj; no all-reduce of activations. Byte counts are of the full [B, T, C].
      check_counts(what + " forward", forward, Counts{0, 2, 2, 0, 2 * act, 2 * act});
      // Backward: the conjugates (reduce-scatter for each gather, all-gather for each
      // reduce-scatter) plus 4 parameter-gradient all-reduces of replicated parameters used
      // on sequence shards: ln_1 (weight+bias, 2C), attn.c_proj.bias (C), ln_2 (2C),
      // mlp.c_proj.bias (C) = 6C floats. None is activation-sized.
      check_counts(what + " backward", backward, Counts{4, 2, 2, 6 * kC * 4, 2 * act, 2 * act});
    }
  }
}

TEST_CASE("TP sequence parallelism: LayerNorm grads identical on TP ranks and serial",
          "[mpi][tp]") {
  const auto mesh = tp_mesh();
  const auto& tp = mesh.group("tp");
  const int r = tp_rank(mesh), n = tp_size(mesh);
  torch::manual_seed(21);
  ParallelTransformerBlock block(
      ParallelTransformerBlockOptions(kC, kH).n_layer(3).sequence_parallel(true), tp);
  SerialBlock twin(kC, kH);
  torch::manual_seed(21);
  init_serial(*twin, 3);
  torch::manual_seed(22);
  const auto x = torch::randn({kB, kT, kC});
  const auto w = torch::randn({kB, kT, kC});
  (block(chunk_of(x, kSequenceDim, r, n)) * chunk_of(w, kSequenceDim, r, n)).sum().backward();
  (twin(x) * w).sum().backward();
  const auto par = block->named_parameters();
  const auto ser = twin->named_parameters();
  for (const char* name : {"ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias",
                           "attn.c_proj.bias", "mlp.c_proj.bias"}) {
    const auto grad = par[name].grad().contiguous();
    auto all = torch::empty({n, grad.numel()});
    tp->all_gather(grad.view({1, -1}), all);
    for (int other = 0; other < n; ++other) {
      check_equal(std::string(name) + ".grad of tp rank " + std::to_string(other) + " vs this rank",
                  all[other], grad.view({-1}));
    }
    check_rel(std::string(name) + ".grad vs serial", grad, ser[name].grad());
  }
}

TEST_CASE("TP block parameter bytes per rank: sharded / tp + replicated", "[mpi][tp]") {
  const auto mesh = tp_mesh();
  const int64_t tp = tp_size(mesh);
  const int64_t c = kC;
  ParallelTransformerBlock block(ParallelTransformerBlockOptions(c, kH), mesh.group("tp"));
  SerialBlock twin(c, kH);
  // Sharded: c_attn 3C*C + 3C, attn.c_proj.weight C*C, c_fc 4C*C + 4C, mlp.c_proj.weight 4C*C
  //          = 12C^2 + 7C.
  // Replicated: ln_1 2C, attn.c_proj.bias C, ln_2 2C, mlp.c_proj.bias C = 6C.
  const int64_t sharded = 12 * c * c + 7 * c;
  const int64_t replicated = 6 * c;
  int64_t serial_bytes = 0;
  for (const auto& p : twin->parameters()) {
    serial_bytes += p.numel() * 4;
  }
  int64_t rank_bytes = 0;
  for (const auto& p : block->parameters()) {
    rank_bytes += p.numel() * 4;
  }
  INFO(rank_tag() << "tp " << tp << ": serial " << serial_bytes << " B, this rank " << rank_bytes
                  << " B, formula 4*((12C^2+7C)/tp + 6C) = " << 4 * (sharded / tp + replicated));
  CHECK(serial_bytes == 4 * (sharded + replicated));
  CHECK(rank_bytes == 4 * (sharded / tp + replicated));
  int64_t partitioned_bytes = 0;
  for (const auto& [name, spec] : named_shard_specs(*block)) {
    if (spec.is_partitioned()) {
      partitioned_bytes += block->named_parameters()[name].numel() * 4;
    }
  }
  CHECK(partitioned_bytes * tp == 4 * sharded);
}
