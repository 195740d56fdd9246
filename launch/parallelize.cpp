// defines: parallelize, compute_dtype (see parallelize.h for the order of the steps).
#include "meshtrain/launch/parallelize.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/memory/recompute.h"
#include "meshtrain/parallel/context_parallel.h"
#include "meshtrain/parallel/param_init.h"
#include "meshtrain/parallel/parameter_shards.h"
#include "meshtrain/parallel/ring_attention.h"
#include "meshtrain/parallel/sharding.h"
#include "meshtrain/parallel/tensor_parallel_layer.h"

#include <map>
#include <set>
#include <utility>

namespace meshtrain {
namespace {

// Each data-parallel replica draws its own dropout masks (the tracker derives the per-tp-rank
// streams); the stride keeps the replicas' seeds apart for any reasonable base seed.
constexpr uint64_t kReplicaSeedStride = 1000003;
// And each pipeline stage its own (its blocks are other blocks than the other stages').
constexpr uint64_t kStageSeedStride = 7919 * kReplicaSeedStride;

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
// Block i's forward as the library runs it: under full recomputation it keeps only its input
// (and, under ZeRO-3, makes sure of its gather again in backward: its backward hook has done
// it already).
std::vector<ParameterShards::BlockFn> block_functions(ParallelModel& model, RecomputeMode mode,
                                                      std::shared_ptr<ParameterShards> shards) {
  std::vector<ParameterShards::BlockFn> runs;
  RngTracker* rng = model.rng_tracker().get();
  const auto blocks = parallel_blocks(model);
  for (size_t i = 0; i < blocks.size(); ++i) {
    ParallelBlock* block = blocks[i];
    const auto index = static_cast<int64_t>(i);
    if (mode != RecomputeMode::kFull) {
      runs.emplace_back([block](const torch::Tensor& in) { return block->forward(in); });
      continue;
    }
    runs.emplace_back([block, rng, shards, index](const torch::Tensor& in) {
      return recompute(
          [block, shards,
           index](const std::vector<torch::Tensor>& inputs) -> std::vector<torch::Tensor> {
            if (shards) {
              shards->ensure_gathered(index);
            }
            return {block->forward(inputs[0])};
          },
          {in}, rng)[0];
    });
  }
  return runs;
}

// The library's composition of the model's parts (parallel_model.h). Under context
// parallelism the model sees this rank's two chunks of every sequence (inputs and targets
// alike). Under ZeRO-3 each part runs with its parameters gathered
// (parallel/parameter_shards.h).
LossFunction make_loss(const std::shared_ptr<ParallelModel>& model,
                       std::vector<ParameterShards::BlockFn> blocks, const ContextParallelism& cp,
                       std::shared_ptr<ParameterShards> shards) {
  return [model, blocks = std::move(blocks), cp, shards](const MicroBatch& whole) {
    const MicroBatch mb =
        cp.size() == 1
            ? whole
            : MicroBatch{take_context_chunks(whole.inputs, 1, cp.size(), cp.rank(), cp.split),
                         take_context_chunks(whole.targets, 1, cp.size(), cp.rank(), cp.split)};
    const auto embed = [&] { return model->embed(mb.inputs); };
    // [b, T/cp, C] (sequence parallel: [b, T/(cp tp), C])
    auto x = shards ? shards->run_embedding(embed) : embed();
    for (size_t i = 0; i < blocks.size(); ++i) {
      x = shards ? shards->run_block(static_cast<int64_t>(i), blocks[i], x) : blocks[i](x);
    }
    const auto head = [&] { return model->head_loss(x, mb.targets); };
    return shards ? shards->run_head(head) : head();
  };
}

size_t unique_parameter_count(const torch::nn::Module& model) {
  std::set<const void*> seen;
  for (const auto& p : model.parameters()) {
    seen.insert(p.unsafeGetTensorImpl());
  }
  return seen.size();
}

// Step 2c: parameters no layer declared a ShardSpec for (a model's own, registered with
// register_parameter) are replicated; under sequence parallelism each tp rank's gradient of
// one covers only its own tokens, so it is summed over tp in backward, before the
// data-parallel reducer sees it (DESIGN §3 "Replicas agree").
void reduce_undeclared_over_tp(ParallelModel& model, const CommunicatorPtr& tp) {
  std::set<const void*> seen;
  for (const auto& item : model.named_modules()) {
    const auto* sharded = dynamic_cast<const ShardedModule*>(item.value().get());
    for (const auto& own : item.value()->named_parameters(/*recurse=*/false)) {
      auto p = own.value();
      const bool declared = sharded != nullptr && sharded->shard_specs().count(own.key()) > 0;
      if (declared || !p.requires_grad() || !seen.insert(p.unsafeGetTensorImpl()).second) {
        continue;
      }
      p.register_hook([tp](const torch::Tensor& grad) {
        auto sum = grad.clone();
        tp->all_reduce(sum, ReduceOp::kSum);
        return sum;
      });
    }
  }
}

// Step 5 without giving the deferred parameters storage: a placeholder becomes one of the
// compute dtype; the rest as torch::nn::Module::to(dtype) (parameters and buffers).
void cast_model(torch::nn::Module& model, torch::Dtype dtype) {
  torch::NoGradGuard no_grad;
  for (auto& p : model.parameters()) {
    p.set_data(is_deferred_placeholder(p) ? deferred_placeholder(p.sizes(), dtype) : p.to(dtype));
  }
  for (auto& b : model.buffers()) {
    b.set_data(b.to(dtype));
  }
}

// Step 1b: which blocks this pp rank keeps, and the model cut to them (see
// drop_other_stages). Returns the names of the parameters the first and last stage share.
std::vector<std::string> split_pipeline(ParallelModel& model, const ParallelPlan& plan,
                                        int pp_rank) {
  PipelineScheduleSpec spec{plan.pp_schedule, plan.dims.pp, 1, plan.virtual_stages};
  const auto layers = plan.stage_layers(model.shape().n_layer);
  std::vector<bool> keep;
  for (int s = 0; s < spec.stages(); ++s) {
    keep.insert(keep.end(), static_cast<size_t>(layers[s]), spec.rank_of(s) == pp_rank);
  }
  return drop_other_stages(model, model.blocks(), keep, spec.holds_ends(pp_rank));
}

// The stage object of this rank, on the model as laid out (after TP, precision).
std::shared_ptr<PipelineStage> make_pipeline(const std::shared_ptr<ParallelModel>& model,
                                             const Mesh& mesh, const ParallelPlan& plan,
                                             std::vector<ParameterShards::BlockFn> blocks,
                                             const std::vector<std::string>& shared_names) {
  PipelineScheduleSpec spec{plan.pp_schedule, plan.dims.pp,
                            static_cast<int>(plan.accumulation_steps()), plan.virtual_stages};
  PipelineModelParts parts;
  // The stage may outlive the Parallelized that holds the model: it holds it too.
  parts.embed = [model](const torch::Tensor& inputs) { return model->embed(inputs); };
  parts.blocks = std::move(blocks);
  parts.head_loss = [model](const torch::Tensor& x, const torch::Tensor& targets) {
    return model->head_loss(x, targets);
  };
  // Between stages the stream is [b, T, C] ([b, T/tp, C] under sequence parallelism).
  const int64_t seq_divisor = plan.sequence_parallel ? plan.dims.tp : 1;
  const int64_t width = model->shape().n_embd;
  auto message_shape = [seq_divisor, width](const torch::Tensor& inputs) {
    return std::vector<int64_t>{inputs.size(0), inputs.size(1) / seq_divisor, width};
  };
  std::vector<torch::Tensor> shared;
  const auto params = model->named_parameters();
  for (const auto& name : shared_names) {
    shared.push_back(params[name]);
  }
  return std::make_shared<PipelineStage>(
      spec, plan.stage_layers(model->shape().n_layer), mesh.group("pp"), std::move(parts),
      std::move(message_shape), compute_dtype(plan.precision), std::move(shared));
}

// A micro-batch's loss runs through every stage under pipeline parallelism.
LossFunction pipelined_loss() {
  return [](const MicroBatch&) -> torch::Tensor {
    MT_CHECK(false,
             "under pipeline parallelism a micro-batch runs through every stage: use "
             "Parallelized::pipeline (PipelineStage::train / evaluate), as the Trainer does");
    return {};
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
  const int pp = resolved.dims.pp;
  MT_CHECK(pp == 1 || resolved.global_batch > 0,
           "parallelize: pipeline parallelism needs the global batch in the plan (its "
           "micro-steps are the schedule's micro-batches)");
  // 1a. The seed of the deferred parameters' values: rank 0's, whatever each rank declared;
  //     or the initial weights, checked against the whole model before it is cut.
  const auto declared = deferred_parameters(*model);
  const uint64_t init_seed = agree_init_seed(declared, mesh.group("world"));
  const auto& weights = options.initial_weights();
  if (weights) {
    MT_CHECK(declared.size() == unique_parameter_count(*model),
             "parallelize: initial weights are read into a declared model: build it inside a "
             "DeferredInit scope (",
             declared.size(), " of its ", unique_parameter_count(*model),
             " parameters are deferred)");
    WholeShapes wanted;
    for (const auto& p : declared) {
      wanted.emplace_back(p.name, whole_sizes(p));
    }
    check_whole_weights(wanted, weights->tensors, options.initial_weights_source());
  }
  const auto whole_of = [&weights](const std::string& name) {
    return weights ? weights->at(name) : torch::Tensor();
  };
  // After a parameter's part is read: its pages leave this rank's memory again.
  const auto done_with = [&weights](const std::string& name) {
    if (weights) {
      release_pages(*weights, weights->at(name));
    }
  };

  // 1b. Pipeline stages: this rank keeps its stages' blocks (the first and the last stage
  //     also the parameters outside the blocks). Block functions are made first: they hold
  //     every block (by index) while the model forgets the others.
  auto blocks = block_functions(*model, resolved.recompute, nullptr);
  std::vector<std::string> all_parameters;
  std::vector<std::string> shared;
  if (pp > 1) {
    for (const auto& [name, spec] : named_shard_specs(*model)) {
      all_parameters.push_back(name);
    }
    shared = split_pipeline(*model, resolved, mesh.index("pp"));
  }

  // 2. Tensor (and sequence) parallelism: every layer keeps its shard.
  apply_tensor_parallel(*model, TensorParallelism{mesh.group("tp"), resolved.sequence_parallel});
  if (resolved.sequence_parallel && resolved.dims.tp > 1) {
    reduce_undeclared_over_tp(*model, mesh.group("tp"));
  }
  // 2b. Context parallelism: position-dependent layers learn their chunks; attention becomes
  //     ring attention (installed with step 4's wrapper).
  const ContextParallelism cp{mesh.group("cp")};
  AttentionCoreWrapper context_core;
  if (cp.size() > 1) {
    apply_context_parallel(*model, cp);
    context_core = ring_attention_core(cp.group, RingAttentionOptions().split(cp.split));
  }

  // 3. Dropout streams: one seed per data-parallel replica and cp rank (their tokens differ)
  //    and pipeline stage.
  const RngTrackerPtr rng = model->rng_tracker();
  if (rng) {
    rng->reseed(rng->options().seed() +
                    kReplicaSeedStride * static_cast<uint64_t>(mesh.index("dp_cp")) +
                    kStageSeedStride * static_cast<uint64_t>(mesh.index("pp")),
                mesh.group("tp"));
  }

  // 4. Recomputation (and the ring attention core of 2b).
  wrap_attention_cores(*model, std::move(context_core),
                       resolved.recompute == RecomputeMode::kSelective, rng.get());

  // 5. Precision: every layout rounds the same fp32 values (a deferred parameter's are made
  //    in fp32 and rounded in 5b); the optimizer keeps fp32 masters of them.
  if (resolved.precision != Precision::kFp32) {
    cast_model(*model, compute_dtype(resolved.precision));
  }

  // 5b. Values of the deferred parameters, for what this rank keeps (parallel/param_init.h):
  //     whole here, or under ZeRO-3 training only this rank's shard of each block, made as
  //     ParameterShards cuts them (step 6b). Then the copies of every parameter with values
  //     are compared across the ranks that hold them.
  const bool values_per_shard = options.training() && resolved.zero_stage == 3;
  std::map<std::string, DeferredParameter> per_shard;
  for (auto& p : deferred_parameters(*model)) {
    if (values_per_shard && p.param.requires_grad()) {
      per_shard.emplace(p.name, p);
    } else {
      materialize(p, init_seed, whole_of(p.name));
      done_with(p.name);
    }
  }
  check_replicas(*model, mesh, "at start-up");

  Parallelized out{model, mesh, resolved};
  out.all_parameters = std::move(all_parameters);
  out.shared_parameters = shared;
  if (pp > 1) {
    out.pipeline = make_pipeline(model, mesh, resolved, std::move(blocks), shared);
    out.loss = pipelined_loss();
  }
  if (!options.training()) {
    if (pp == 1) {
      out.loss = make_loss(model, std::move(blocks), cp, nullptr);
    }
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
  // No broadcast: the replicas start equal (the agreed seed, the check of step 5b).
  out.reducer = std::make_shared<DataParallelReducer>(
      *model, mesh, out.buckets, DataParallelOptions().broadcast_parameters(false));
  if (resolved.zero_stage == 3) {
    auto fill = [&per_shard, init_seed, &whole_of,
                 &done_with](const std::string& name, const torch::Tensor& shard, int64_t first) {
      auto it = per_shard.find(name);
      if (it == per_shard.end()) {
        return false;
      }
      auto& p = it->second;
      fill_deferred(p, shard, first, init_seed, whole_of(name));
      done_with(name);
      p.owner->mark_materialized(p.local_name);
      per_shard.erase(it);
      return true;
    };
    out.shards =
        std::make_shared<ParameterShards>(*model, model->blocks(), mesh, out.buckets,
                                          ParameterShardsOptions()
                                              .reshard_after_forward(resolved.reshard_after_forward)
                                              .prefetch(resolved.prefetch)
                                              .fill(fill));
    MT_ASSERT(per_shard.empty(), "parallelize: ", per_shard.size(),
              " deferred parameters in no ZeRO-3 unit, e.g. '", per_shard.begin()->first, "'");
  }
  out.optimizer =
      std::make_shared<ZeroOptimizer>(*model, mesh, out.buckets, options.optimizer(), out.shards);
  if (pp > 1) {
    // The gradient norm spans the stages; the last stage leaves the shared parameters to
    // the first (their gradients are equal after sum_shared_gradients), as a checkpoint does.
    const bool first = mesh.index("pp") == 0;
    out.optimizer->set_pipeline_norm(mesh.group("pp"), first ? std::vector<std::string>{} : shared);
    return out;
  }
  if (resolved.zero_stage == 3) {
    blocks = block_functions(*model, resolved.recompute, out.shards);
  }
  out.loss = make_loss(model, std::move(blocks), cp, out.shards);
  return out;
}

} // namespace meshtrain
