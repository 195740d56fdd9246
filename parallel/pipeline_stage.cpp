// defines: PipelineStage (see pipeline_stage.h).
#include "meshtrain/parallel/pipeline_stage.h"

#include "meshtrain/core/errors.h"
#include "meshtrain/core/trace.h"

#include <unordered_set>
#include <utility>

namespace meshtrain {
namespace {

using ImplSet = std::unordered_set<const void*>;

const void* impl(const torch::Tensor& t) {
  return t.unsafeGetTensorImpl();
}

// Unregisters every child of `module` none of whose parameters is kept, and recurses into the
// children that hold both kinds.
void prune(torch::nn::Module& module, const std::string& path, const ImplSet& keep) {
  const auto children = module.named_children(); // a copy: unregistering changes the module
  for (const auto& item : children) {
    const auto& child = item.value();
    const auto params = child->parameters();
    size_t kept = 0;
    for (const auto& p : params) {
      kept += keep.count(impl(p));
    }
    if (params.empty() || kept == params.size()) {
      continue;
    }
    const std::string name = path.empty() ? item.key() : path + "." + item.key();
    if (kept == 0) {
      torch::NoGradGuard no_grad;
      for (auto p : params) {
        p.set_data(torch::empty({0}, p.options())); // never run on this rank
      }
      module.unregister_module(item.key());
      continue;
    }
    for (const auto& own : child->named_parameters(/*recurse=*/false)) {
      MT_CHECK(keep.count(impl(own.value())) == 1, "pipeline split: module '", name,
               "' holds parameter '", own.key(),
               "' of another pipeline stage beside parameters of this one; a block's parameters "
               "must live inside the block's module");
    }
    prune(*child, name, keep);
  }
}

} // namespace

std::vector<std::string>
drop_other_stages(torch::nn::Module& model,
                  const std::vector<std::shared_ptr<torch::nn::Module>>& blocks,
                  const std::vector<bool>& keep_block, bool keep_outside_blocks) {
  MT_CHECK(keep_block.size() == blocks.size(), "drop_other_stages: ", keep_block.size(),
           " flags for ", blocks.size(), " blocks");
  ImplSet in_blocks;
  ImplSet keep;
  for (size_t i = 0; i < blocks.size(); ++i) {
    for (const auto& p : blocks[i]->parameters()) {
      in_blocks.insert(impl(p));
      if (keep_block[i]) {
        keep.insert(impl(p));
      }
    }
  }
  std::vector<std::string> shared;
  ImplSet seen;
  for (const auto& item : model.named_parameters()) {
    const auto* p = impl(item.value());
    if (in_blocks.count(p) == 0 && keep_outside_blocks && seen.insert(p).second) {
      keep.insert(p);
      shared.push_back(item.key());
    }
  }
  for (const auto& own : model.named_parameters(/*recurse=*/false)) {
    MT_CHECK(keep.count(impl(own.value())) == 1, "pipeline split: parameter '", own.key(),
             "' is registered on the model itself and this stage does not hold it; register "
             "it in a submodule (the embedding, a block or the head)");
  }
  prune(model, "", keep);
  return shared;
}

PipelineStage::PipelineStage(
    const PipelineScheduleSpec& spec, std::vector<int64_t> stage_layers, CommunicatorPtr pp,
    PipelineModelParts parts,
    std::function<std::vector<int64_t>(const torch::Tensor& inputs)> message_shape,
    torch::Dtype dtype, std::vector<torch::Tensor> shared)
    : spec_(spec), pp_(std::move(pp)), parts_(std::move(parts)),
      message_shape_(std::move(message_shape)), dtype_(dtype), shared_(std::move(shared)) {
  MT_CHECK(pp_ && pp_->size() == spec_.ranks, "PipelineStage: the pp group has ",
           pp_ ? pp_->size() : 0, " ranks, the schedule ", spec_.ranks);
  MT_CHECK(static_cast<int>(stage_layers.size()) == spec_.stages(),
           "PipelineStage: ", stage_layers.size(), " stage sizes for ", spec_.stages(), " stages");
  stage_begin_.push_back(0);
  for (const auto n : stage_layers) {
    stage_begin_.push_back(stage_begin_.back() + n);
  }
  MT_CHECK(stage_begin_.back() == static_cast<int64_t>(parts_.blocks.size()),
           "PipelineStage: the stages hold ", stage_begin_.back(), " blocks, the model has ",
           parts_.blocks.size());
  lists_ = make_pipeline_schedule(spec_);
  simulation_ = check_pipeline_schedule(spec_, lists_);

  // The first and last stage's ranks sum their shared gradients; the others get a group of
  // their own they never use (split is collective over pp).
  const int r = pp_->rank();
  const bool end = spec_.holds_ends(r);
  auto group = pp_->split(end ? 0 : 1, r, "pp_ends");
  if (end && spec_.ranks > 1) {
    ends_ = std::move(group);
  }
}

std::vector<int> PipelineStage::local_stages() const {
  std::vector<int> stages;
  for (int s = pp_->rank(); s < spec_.stages(); s += spec_.ranks) {
    stages.push_back(s);
  }
  return stages;
}

std::pair<int64_t, int64_t> PipelineStage::block_range(int stage) const {
  return {stage_begin_[stage], stage_begin_[stage + 1]};
}

torch::Tensor PipelineStage::forward(int mb, int stage, const torch::Tensor& input) {
  const TraceSpan span("pipeline forward", "compute");
  const bool training = share_ != nullptr;
  torch::Tensor x;
  Saved saved;
  if (stage == 0) {
    x = parts_.embed((*inputs_)[mb]);
  } else {
    // A leaf of this stage's graph: backward stops here and leaves the gradient to send back.
    x = input;
    if (training) {
      x.requires_grad_(true);
    }
    saved.input = x;
  }
  for (int64_t i = stage_begin_[stage]; i < stage_begin_[stage + 1]; ++i) {
    x = parts_.blocks[i](x);
  }
  if (stage < spec_.stages() - 1) {
    if (training) {
      saved.output = x;
      saved_[{mb, stage}] = std::move(saved);
      peak_in_flight_ = std::max(peak_in_flight_, ++in_flight_);
    }
    return x.detach();
  }
  const auto loss_sum = parts_.head_loss(x, (*targets_)[mb]);
  if (!training) {
    loss_ += loss_sum.detach().to(torch::kDouble);
    return {};
  }
  saved.output = (*share_)(loss_sum);
  loss_ += saved.output.detach().to(torch::kDouble);
  saved_[{mb, stage}] = std::move(saved);
  peak_in_flight_ = std::max(peak_in_flight_, ++in_flight_);
  return {};
}

torch::Tensor PipelineStage::backward(int mb, int stage, const torch::Tensor& output_grad,
                                      bool weights) {
  const TraceSpan span("pipeline backward", "compute");
  const auto found = saved_.find({mb, stage});
  MT_ASSERT(found != saved_.end(), "pipeline backward of micro-batch ", mb, " on stage ", stage,
            " without its forward");
  auto& saved = found->second;
  // The last stage seeds its loss share with the scale (the loss scaler's, else 1).
  saved.seed = stage == spec_.stages() - 1 ? torch::full_like(saved.output, scale_) : output_grad;
  if (weights) {
    torch::autograd::backward({saved.output}, {saved.seed});
    auto input_grad = stage > 0 ? saved.input.grad() : torch::Tensor();
    saved_.erase(found);
    --in_flight_;
    return input_grad;
  }
  // ZB-H1's I: only the input's gradient, now, so it travels on; the graph stays for W.
  if (stage == 0) {
    return {}; // nothing to send back; W runs the whole backward
  }
  return torch::autograd::grad({saved.output}, {saved.input}, {saved.seed},
                               /*retain_graph=*/true)[0];
}

void PipelineStage::backward_weight(int mb, int stage) {
  const TraceSpan span("pipeline weight gradient", "compute");
  const auto found = saved_.find({mb, stage});
  MT_ASSERT(found != saved_.end() && found->second.seed.defined(),
            "pipeline weight gradient of micro-batch ", mb, " on stage ", stage,
            " without its input gradient");
  // The weights' gradients (the path to the input is traversed again: the split is per
  // stage, not per layer).
  torch::autograd::backward({found->second.output}, {found->second.seed});
  saved_.erase(found);
  --in_flight_;
}

PipelineStageFunctions PipelineStage::functions(bool training) {
  PipelineStageFunctions f;
  f.forward = [this](int mb, int s, const torch::Tensor& input) { return forward(mb, s, input); };
  if (training) {
    f.backward = [this](int mb, int s, const torch::Tensor& grad, bool weights) {
      return backward(mb, s, grad, weights);
    };
    f.backward_weight = [this](int mb, int s) { backward_weight(mb, s); };
  }
  f.message_buffer = [this](int mb, int) {
    return torch::empty(message_shape_((*inputs_)[mb]), torch::TensorOptions().dtype(dtype_));
  };
  return f;
}

torch::Tensor PipelineStage::train(const std::vector<torch::Tensor>& inputs,
                                   const std::vector<torch::Tensor>& targets,
                                   const LossShareFn& share, double scale) {
  MT_CHECK(static_cast<int>(inputs.size()) == spec_.micro_batches &&
               targets.size() == inputs.size(),
           "PipelineStage::train: ", inputs.size(), " micro-batches of inputs and ", targets.size(),
           " of targets; the schedule runs ", spec_.micro_batches);
  saved_.clear(); // a step that threw left its graphs here
  inputs_ = &inputs;
  targets_ = &targets;
  share_ = &share;
  scale_ = scale;
  loss_ = torch::zeros({}, torch::kDouble);
  in_flight_ = 0;
  peak_in_flight_ = 0;
  last_record_ = run_pipeline_actions(spec_, lists_[pp_->rank()], *pp_, functions(true));
  MT_ASSERT(saved_.empty(), "the pipeline step left ", saved_.size(), " micro-batches unfinished");
  share_ = nullptr;
  return loss_;
}

torch::Tensor PipelineStage::evaluate(const std::vector<torch::Tensor>& inputs,
                                      const std::vector<torch::Tensor>& targets) {
  MT_CHECK(targets.size() == inputs.size(), "PipelineStage::evaluate: ", inputs.size(),
           " micro-batches of inputs and ", targets.size(), " of targets");
  PipelineScheduleSpec spec = spec_;
  spec.micro_batches = static_cast<int>(inputs.size());
  const PipelineActions list = forward_only_schedule(spec)[pp_->rank()];
  inputs_ = &inputs;
  targets_ = &targets;
  share_ = nullptr;
  loss_ = torch::zeros({}, torch::kDouble);
  run_pipeline_actions(spec, list, *pp_, functions(false));
  return loss_;
}

void PipelineStage::sum_shared_gradients(DataParallelReducer& reducer) {
  if (!ends_ || shared_.empty()) {
    return;
  }
  std::vector<torch::Tensor> grads;
  for (const auto& p : shared_) {
    grads.push_back(reducer.accumulated_grad(p));
  }
  // One message: [sum of numels] in the reduce dtype.
  auto flat = torch::cat(grads);
  ends_->all_reduce(flat, ReduceOp::kSum);
  int64_t at = 0;
  for (auto& g : grads) {
    g.copy_(flat.narrow(0, at, g.numel()));
    at += g.numel();
  }
}

} // namespace meshtrain
