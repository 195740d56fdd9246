// defines: PipelineModelParts, PipelineStage — one pp rank's part of a model run by a
// pipeline schedule (DESIGN §3 "Pipeline"; parallel/pipeline_schedule.h for the schedules,
// parallel/pipeline_runner.h for how a rank runs its list).
//
// The model's blocks are cut into S = pp x v contiguous stages (ParallelPlan::stage_layers);
// stage s lives on pp rank s % pp. Stage 0 also embeds the tokens, stage S-1 also runs the
// head and the loss. launch/parallelize.cpp builds the stage: it drops every parameter this
// rank does not hold and gives the stage the library's block functions (recomputation and all).
// A step's micro-batches are DESIGN §3's micro-steps, so every schedule computes the same sum
// of gradients as the serial run; the shared parameters outside the blocks (the embedding,
// final norm and head, held by both the first and the last stage: Megatron's tied embedding)
// get the sum of both stages' gradients (sum_shared_gradients) before the dp reduction.
//
//   PipelineStage stage(spec, plan.stage_layers(L), mesh.group("pp"), parts, message_shape,
//                       dtype, shared_parameters);
//   {
//     auto guard = reducer.no_sync();
//     loss = stage.train(inputs, targets, share, scale);   // every micro-batch, F and B
//   }
//   stage.sum_shared_gradients(reducer);
//   grads = reducer.finish();
#pragma once

#include "meshtrain/core/communicator.h"
#include "meshtrain/parallel/data_parallel.h"
#include "meshtrain/parallel/pipeline_runner.h"
#include "meshtrain/parallel/pipeline_schedule.h"

#include <torch/torch.h>

#include <functional>
#include <map>
#include <vector>

namespace meshtrain {

// The model as the pipeline runs it (see ParallelModel, parallel/parallel_model.h).
struct PipelineModelParts {
  // inputs [b, T] int64 -> the stream entering block 0 (called on stage 0 only).
  std::function<torch::Tensor(const torch::Tensor& inputs)> embed;
  // Block i's forward as the library runs it (recomputation included), for every block of
  // the model by its index; only this rank's are called.
  std::vector<std::function<torch::Tensor(const torch::Tensor& x)>> blocks;
  // The stream after the last block and targets [b, T] -> the SUM of the token losses [].
  std::function<torch::Tensor(const torch::Tensor& x, const torch::Tensor& targets)> head_loss;
};

// The micro-batch's loss sum -> the share whose backward the step takes (the global mean's
// share, maybe altered by a hook).
using LossShareFn = std::function<torch::Tensor(const torch::Tensor& loss_sum)>;

class PipelineStage {
public:
  // spec: the schedule (ranks = pp, virtual stages, micro-batches per step); stage_layers:
  // the blocks of every stage; message_shape(inputs of a micro-batch) -> the [b, T', C]
  // shape of the activations between stages, of `dtype`; shared: this rank's parameters
  // that both the first and the last stage hold (empty on the others). Generates and checks
  // the schedule; collective over pp (the first and last stage's group).
  PipelineStage(const PipelineScheduleSpec& spec, std::vector<int64_t> stage_layers,
                CommunicatorPtr pp, PipelineModelParts parts,
                std::function<std::vector<int64_t>(const torch::Tensor& inputs)> message_shape,
                torch::Dtype dtype, std::vector<torch::Tensor> shared);

  // One step: every micro-batch forward and backward by the schedule, gradients accumulated
  // into the parameters (their reducer hooks). inputs/targets: the step's micro-batches
  // ([b, T] each, as many as spec.micro_batches), the same on every pp rank. The backward of
  // each share is seeded with `scale` (the loss scaler's; 1 without). Returns the sum of the
  // shares ([] double): the last stage's; 0 on the other ranks.
  torch::Tensor train(const std::vector<torch::Tensor>& inputs,
                      const std::vector<torch::Tensor>& targets, const LossShareFn& share,
                      double scale = 1.0);
  // Forward only (validation, under NoGradGuard): the sum of the micro-batches' loss sums
  // ([] double) on the last stage's rank, 0 elsewhere.
  torch::Tensor evaluate(const std::vector<torch::Tensor>& inputs,
                         const std::vector<torch::Tensor>& targets);
  // After train() and the no_sync scope, before reducer.finish(): the shared parameters'
  // gradients summed over the first and last stage. Collective over those two ranks.
  void sum_shared_gradients(DataParallelReducer& reducer);

  const PipelineScheduleSpec& spec() const { return spec_; }
  // The stages (model chunks) on this rank, and the blocks [begin, end) of stage s.
  std::vector<int> local_stages() const;
  std::pair<int64_t, int64_t> block_range(int stage) const;
  // The most micro-batches whose activations this rank held at once in the last train().
  int peak_in_flight() const { return peak_in_flight_; }
  // The simulation of the schedule (equal F, I, W costs): its timeline and bubble.
  const ScheduleSimulation& simulation() const { return simulation_; }
  // When each compute action of the last train() began and ended (bench_pipeline's bubble).
  const PipelineRunRecord& last_record() const { return last_record_; }

private:
  struct Saved {
    torch::Tensor input;  // the received activation (a leaf requiring grad); undefined on stage 0
    torch::Tensor output; // the activation sent on, or the loss share on the last stage
    torch::Tensor seed;   // the output's gradient, once known (kept for W under ZB-H1)
  };
  torch::Tensor forward(int mb, int stage, const torch::Tensor& input);
  torch::Tensor backward(int mb, int stage, const torch::Tensor& output_grad, bool weights);
  void backward_weight(int mb, int stage);
  PipelineStageFunctions functions(bool training);

  PipelineScheduleSpec spec_;
  std::vector<int64_t> stage_begin_; // first block of each stage; back() = n_layer
  CommunicatorPtr pp_;
  CommunicatorPtr ends_; // the first and the last stage's ranks (null elsewhere)
  PipelineModelParts parts_;
  std::function<std::vector<int64_t>(const torch::Tensor&)> message_shape_;
  torch::Dtype dtype_;
  std::vector<torch::Tensor> shared_;
  std::vector<PipelineActions> lists_;
  ScheduleSimulation simulation_;
  // Per step:
  const std::vector<torch::Tensor>* inputs_ = nullptr;
  const std::vector<torch::Tensor>* targets_ = nullptr;
  const LossShareFn* share_ = nullptr;
  double scale_ = 1.0;
  std::map<std::pair<int, int>, Saved> saved_; // (micro-batch, stage)
  torch::Tensor loss_;                         // [] double
  int in_flight_ = 0;
  int peak_in_flight_ = 0;
  PipelineRunRecord last_record_;
};

// The pipeline split of a model on one pp rank: unregisters from `model` every module whose
// parameters this rank does not hold — the blocks whose keep_block is false and, unless
// keep_outside_blocks (the first and the last stage), the modules outside the blocks — and
// frees their parameters' memory ([0] tensors; the modules are never run here). Returns the
// names of the parameters outside the blocks that are kept (each tensor once, registration
// order): the parameters the first and the last stage share. Throws naming a module that holds
// parameters of its own on both sides of the split.
std::vector<std::string>
drop_other_stages(torch::nn::Module& model,
                  const std::vector<std::shared_ptr<torch::nn::Module>>& blocks,
                  const std::vector<bool>& keep_block, bool keep_outside_blocks);

} // namespace meshtrain
