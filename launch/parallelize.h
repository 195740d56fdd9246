// defines: LossFunction, ParallelizeOptions, Parallelized, parallelize — the one place
// parallelism is applied (DESIGN §1; torchtitan's parallelize_*). Given a model built
// serially from parallel/ layers (a ParallelModel, parallel/parallel_model.h), a mesh and a
// plan, it applies in this order:
//
//   1. validate   plan.validate(world, model->shape()): the layout fits the ranks and model
//   1b. pipeline  pp > 1 (parallel/pipeline_stage.h): this rank keeps the blocks of its
//                 stages (and, on the first and last stage, the parameters outside the
//                 blocks); the rest is dropped from the model and freed. loss() is replaced
//                 by Parallelized::pipeline, which runs a step's micro-batches by the schedule
//   2. TP + SP    apply_tensor_parallel: each layer keeps its shard of the full weights and
//                 talks over mesh.group("tp"); sequence parallelism between the TP regions
//   2b. CP        cp > 1 (parallel/context_parallel.h): apply_context_parallel (positions of
//                 this rank's chunks), ring attention (parallel/ring_attention.h) as every
//                 AttentionCore's core, and loss() cuts each micro-batch to this rank's chunks
//   3. dropout    the model's RngTracker reseeded per dp x cp rank and tp rank
//   4. recompute  selective: every AttentionCore's core (the ring under cp) wrapped in
//                 memory/recompute; full: every block's forward recomputed in backward
//   5. precision  bf16: the parameters become the bf16 compute copies (the optimizer keeps the
//                 fp32 masters and rewrites them once per step); the layers compute norms,
//                 softmax statistics and the loss in fp32 (DESIGN §3 "Mixed precision")
//   6. reducer    one BucketLayout (bucket bytes, fp32 reduction, ZeRO stage; at stage 3 one
//                 bucket per block and one for the rest) and the DataParallelReducer over
//                 mesh.group("dp_cp") (the dp group when cp = 1; parameters broadcast from
//                 its rank 0)
//   6b. ZeRO-3    ParameterShards (parallel/parameter_shards.h): every parameter kept as a
//                 1/D shard, gathered per block around its forward and backward
//   7. optimizer  ZeroOptimizer on the same BucketLayout: AdamW/SGD state sharded per stage
//
// and returns what launch/trainer.h's Trainer needs.
//
//   torch::manual_seed(seed);                     // every rank draws the same full weights
//   auto model = std::make_shared<MyModelImpl>(config);
//   auto parallel = parallelize(model, mesh, plan);
//   Trainer trainer(parallel, train_tokens, val_tokens, TrainerOptions().steps(100));
#pragma once

#include "meshtrain/core/mesh.h"
#include "meshtrain/core/safetensors.h"
#include "meshtrain/launch/token_loader.h"
#include "meshtrain/optim/zero.h"
#include "meshtrain/parallel/bucket_layout.h"
#include "meshtrain/parallel/data_parallel.h"
#include "meshtrain/parallel/parallel_model.h"
#include "meshtrain/parallel/parallel_plan.h"
#include "meshtrain/parallel/parameter_shards.h"
#include "meshtrain/parallel/pipeline_stage.h"

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace meshtrain {

// The SUM of the token cross-entropies of one micro-batch ([] tensor, differentiable) over its
// b*T targets, identical on the ranks of a TP group. The micro-batch holds whole sequences
// ([b, T]); under context parallelism the sum is over this rank's b*T/cp tokens of them, and
// the cp ranks' sums add up to the micro-batch's.
using LossFunction = std::function<torch::Tensor(const MicroBatch&)>;

struct ParallelizeOptions {
  // The update rule and which parameters get weight decay (optim/zero.h); AdamW by default.
  TORCH_ARG(ZeroOptions, optimizer);
  // false: only steps 1-5 (sampling, evaluation); no reducer and no optimizer.
  TORCH_ARG(bool, training) = true;
  // Start from these weights instead of the init rules: whole, unpadded tensors by parameter
  // name (an export, a Hugging Face file). With map_safetensors each rank reads only the
  // elements it keeps. The model must be declared under DeferredInit; the file is checked
  // against it first (names and shapes), naming `initial_weights_source`.
  TORCH_ARG(std::shared_ptr<const SafetensorsFile>, initial_weights);
  TORCH_ARG(std::string, initial_weights_source) = "the initial weights";
};

// What parallelize returns: everything the Trainer (or a hand-written loop) needs.
struct Parallelized {
  std::shared_ptr<ParallelModel> model; // laid out for this rank
  Mesh mesh;
  ParallelPlan plan;       // validated (dims and micro-batch resolved)
  BucketLayoutPtr buckets; // null unless training
  std::shared_ptr<DataParallelReducer> reducer;
  std::shared_ptr<ZeroOptimizer> optimizer;
  // A micro-batch through the applied layout (recomputed blocks included).
  LossFunction loss;
  // ZeRO-3 only: the parameters' shards (the model's parameters are unset between uses;
  // GatheredParameters makes them whole, e.g. to read them).
  std::shared_ptr<ParameterShards> shards;
  // pp > 1 only: this rank's pipeline stages; `loss` then refuses (a micro-batch runs through
  // every stage: PipelineStage::train / evaluate).
  std::shared_ptr<PipelineStage> pipeline;
  // pp > 1 only: the names of the whole model's parameters in its order (every stage's; this
  // rank holds its stages' blocks and, on the first and the last stage, `shared_parameters`),
  // and the parameters outside the blocks that the first and the last stage both hold (empty
  // on the stages between). A checkpoint merges the stages' files by these names.
  std::vector<std::string> all_parameters;
  std::vector<std::string> shared_parameters;
};

// Applies `plan` to `model` on `mesh` (see above). `model` must be freshly built (serial, not
// yet laid out) and the same on every rank. Collective over the mesh when training (the
// reducer's parameter broadcast). Throws LayoutError when the plan does not fit the mesh or
// the model (ParallelPlan::validate's messages).
Parallelized parallelize(std::shared_ptr<ParallelModel> model, const Mesh& mesh,
                         const ParallelPlan& plan, const ParallelizeOptions& options = {});

// The compute dtype of a precision: kFloat, kBFloat16 or kHalf.
torch::Dtype compute_dtype(Precision precision);

} // namespace meshtrain
