// defines: parallelize, compute_dtype (see parallelize.h for the order of the steps).
#include "meshtrain/launch/parallelize.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/memory/recompute.h"
#include "meshtrain/parallel/context_parallel.h"
#include "meshtrain/parallel/parameter_shards.h"
#include "meshtrain/parallel/ring_attention.h"
#include "meshtrain/parallel/tensor_parallel_layer.h"

#include <utility>

namespace meshtrain {
namespace {

// Each data-parallel replica draws its own dropout masks (the tracker derives the per-tp-rank
// streams); the stride keeps the replicas' seeds apart for any reasonable base seed.
constexpr uint64_t kReplicaSeedStride = 1000003;

void check_mesh(const Mesh& mesh, const ParallelPlan& plan) {
  const auto have = mesh.grid().dims();
  const auto& want = plan.dims;
  if (have.dp != want.dp || have.cp != want.cp || have.tp != want.tp || have.pp != want.pp) {
    throw LayoutError("parallelize: the mesh is " + describe_dims(have) + " but the plan is " +
                      describe_dims(want) + "; build the mesh from the validated plan's dims");
  }
}

// Steps 2b and 4: the core every AttentionCore runs. Context parallelism replaces the layer's
// core by ring attention over the cp group; selective recomputation wraps whichever core runs
// (so its backward re-runs the ring: the forward's exchanges again, then the backward's).
void wrap_attention_cores(ParallelModel& model, AttentionCoreWrapper context_core, bool selective,
                          RngTracker* rng) {
  AttentionCoreWrapper wrapper = context_core;
  if (selective) {
    // Without context parallelism the [B, h, T, T] scores and probabilities are recomputed
    // in backward instead of kept.
    wrapper = [rng, inner = std::move(context_core)](const AttentionCoreFn& core,
                                                     const torch::Tensor& q, const torch::Tensor& k,
                                                     const torch::Tensor& v) {
      return recompute(
          [core, inner](const std::vector<torch::Tensor>& in) -> std::vector<torch::Tensor> {
            return {inner ? inner(core, in[0], in[1], in[2]) : core(in[0], in[1], in[2])};
          },
          {q, k, v}, rng)[0];
    };
  }
  if (!wrapper) {
    return;
  }
  for (const auto& module : model.modules(/*include_self=*/false)) {
    if (auto* attention = dynamic_cast<AttentionCore*>(module.get())) {
      attention->set_core_wrapper(wrapper);
    }
  }
}

// The library's composition of the model's parts (parallel_model.h); under full
// recomputation every block keeps only its input. Under context parallelism the model sees
// this rank's two chunks of every sequence (inputs and targets alike). Under ZeRO-3 each part
// runs with its parameters gathered (parallel/parameter_shards.h); a recomputed block makes
// sure of its gather again in backward (its backward hook has done it already).
LossFunction make_loss(const std::shared_ptr<ParallelModel>& model, RecomputeMode mode,
                       const ContextParallelism& cp, std::shared_ptr<ParameterShards> shards) {
  auto blocks = parallel_blocks(*model);
  const bool full = mode == RecomputeMode::kFull;
  return [model, blocks = std::move(blocks), full, cp, shards](const MicroBatch& whole) {
    const MicroBatch mb =
        cp.size() == 1
            ? whole
            : MicroBatch{take_context_chunks(whole.inputs, 1, cp.size(), cp.rank(), cp.split),
                         take_context_chunks(whole.targets, 1, cp.size(), cp.rank(), cp.split)};
    const auto embed = [&] { return model->embed(mb.inputs); };
    // [b, T/cp, C] (sequence parallel: [b, T/(cp tp), C])
    auto x = shards ? shards->run_embedding(embed) : embed();
    RngTracker* rng = model->rng_tracker().get();
    for (size_t i = 0; i < blocks.size(); ++i) {
      ParallelBlock* block = blocks[i];
      const auto index = static_cast<int64_t>(i);
      ParameterShards::BlockFn run = [block](const torch::Tensor& in) {
        return block->forward(in);
      };
      if (full) {
        run = [block, rng, shards, index](const torch::Tensor& in) {
          return recompute(
              [block, shards,
               index](const std::vector<torch::Tensor>& inputs) -> std::vector<torch::Tensor> {
                if (shards) {
                  shards->ensure_gathered(index);
                }
                return {block->forward(inputs[0])};
              },
              {in}, rng)[0];
        };
      }
      x = shards ? shards->run_block(index, run, x) : run(x);
    }
    const auto head = [&] { return model->head_loss(x, mb.targets); };
    return shards ? shards->run_head(head) : head();
  };
}

} // namespace

torch::Dtype compute_dtype(Precision precision) {
  switch (precision) {
  case Precision::kFp32:
    return torch::kFloat;
  case Precision::kBf16:
    return torch::kBFloat16;
  case Precision::kFp16:
    return torch::kHalf;
  }
  return torch::kFloat;
}

Parallelized parallelize(std::shared_ptr<ParallelModel> model, const Mesh& mesh,
                         const ParallelPlan& plan, const ParallelizeOptions& options) {
  MT_CHECK(model != nullptr, "parallelize: the model is null");
  // 1. The layout against the ranks and the model.
  const ParallelPlan resolved = plan.validate(mesh.grid().world_size(), model->shape());
  check_mesh(mesh, resolved);

  // 2. Tensor (and sequence) parallelism: every layer keeps its shard.
  apply_tensor_parallel(*model, TensorParallelism{mesh.group("tp"), resolved.sequence_parallel});
  // 2b. Context parallelism: position-dependent layers learn their chunks; attention becomes
  //     ring attention (installed with step 4's wrapper).
  const ContextParallelism cp{mesh.group("cp")};
  AttentionCoreWrapper context_core;
  if (cp.size() > 1) {
    apply_context_parallel(*model, cp);
    context_core = ring_attention_core(cp.group, RingAttentionOptions().split(cp.split));
  }

  // 3. Dropout streams: one seed per data-parallel replica and cp rank (their tokens differ).
  const RngTrackerPtr rng = model->rng_tracker();
  if (rng) {
    rng->reseed(rng->options().seed() +
                    kReplicaSeedStride * static_cast<uint64_t>(mesh.index("dp_cp")),
                mesh.group("tp"));
  }

  // 4. Recomputation (and the ring attention core of 2b).
  wrap_attention_cores(*model, std::move(context_core),
                       resolved.recompute == RecomputeMode::kSelective, rng.get());

  // 5. Precision: after the fp32 init (or loaded weights), so every layout rounds the same
  //    weights; the optimizer keeps fp32 masters of them.
  if (resolved.precision != Precision::kFp32) {
    model->to(compute_dtype(resolved.precision));
  }

  Parallelized out{model, mesh, resolved};
  if (!options.training()) {
    out.loss = make_loss(model, resolved.recompute, cp, nullptr);
    return out;
  }
  // 6. The data-parallel reducer (fp32 reduction) and 7. the optimizer, on one bucket layout,
  //    over the dp x cp ranks: every one of them computed gradients of its own tokens.
  //    ZeRO-3: one bucket per block (and one for the rest), the parameters cut into shards
  //    after the reducer's broadcast made them equal.
  auto bucket_options =
      BucketLayoutOptions().bucket_bytes(resolved.bucket_bytes).zero_stage(resolved.zero_stage);
  if (resolved.zero_stage == 3) {
    bucket_options.units(full_sharding_units(*model, model->blocks()));
  }
  out.buckets =
      std::make_shared<const BucketLayout>(*model, mesh.group("dp_cp")->size(), bucket_options);
  out.reducer = std::make_shared<DataParallelReducer>(*model, mesh, out.buckets);
  if (resolved.zero_stage == 3) {
    out.shards =
        std::make_shared<ParameterShards>(*model, model->blocks(), mesh, out.buckets,
                                          ParameterShardsOptions()
                                              .reshard_after_forward(resolved.reshard_after_forward)
                                              .prefetch(resolved.prefetch));
  }
  out.optimizer =
      std::make_shared<ZeroOptimizer>(*model, mesh, out.buckets, options.optimizer(), out.shards);
  out.loss = make_loss(model, resolved.recompute, cp, out.shards);
  return out;
}

} // namespace meshtrain
