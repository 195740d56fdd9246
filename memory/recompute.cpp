// defines: activation recomputation (see recompute.h).
#include "meshtrain/memory/recompute.h"

#include "meshtrain/core/errors.h"

#include <torch/csrc/autograd/custom_function.h>

#include <optional>
#include <utility>

namespace meshtrain {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// What backward needs besides the saved inputs; travels through the autograd context as a
// capsule (an IValue holding any CustomClassHolder).
struct RecomputeState : torch::CustomClassHolder {
  RecomputeFn fn;
  RngTracker* rng = nullptr;
  torch::Tensor cpu_rng;                      // the default generator before fn
  std::optional<RngTrackerState> tracker_rng; // the tracker's streams before fn
};

// The random state of the moment, and putting it back.
struct RngSnapshot {
  torch::Tensor cpu;
  std::optional<RngTrackerState> tracker;
  static RngSnapshot take(RngTracker* rng) {
    RngSnapshot s{default_cpu_generator_state(), std::nullopt};
    if (rng != nullptr) {
      s.tracker = rng->get_state();
    }
    return s;
  }
  void restore(RngTracker* rng) const {
    set_default_cpu_generator_state(cpu);
    if (rng != nullptr && tracker) {
      rng->set_state(*tracker);
    }
  }
};

class RecomputeFunction : public torch::autograd::Function<RecomputeFunction> {
public:
  // Grad mode is off here (Function::apply): fn records nothing.
  static variable_list forward(AutogradContext* ctx, at::TensorList inputs, c10::IValue capsule) {
    auto* state = static_cast<RecomputeState*>(capsule.toCapsule().get());
    const auto before = RngSnapshot::take(state->rng);
    state->cpu_rng = before.cpu;
    state->tracker_rng = before.tracker;
    ctx->saved_data["state"] = capsule;
    ctx->save_for_backward(inputs.vec());
    return state->fn(inputs.vec());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto* state = static_cast<RecomputeState*>(ctx->saved_data["state"].toCapsule().get());
    const auto saved = ctx->get_saved_variables();
    variable_list inputs;
    inputs.reserve(saved.size());
    for (const auto& t : saved) {
      inputs.push_back(t.detach().requires_grad_(t.requires_grad()));
    }
    // Replay fn from its starting random state; afterwards the generators continue where the
    // rest of backward expects them.
    const auto now = RngSnapshot::take(state->rng);
    RngSnapshot{state->cpu_rng, state->tracker_rng}.restore(state->rng);
    variable_list outputs;
    {
      torch::AutoGradMode enable(true);
      outputs = state->fn(inputs);
    }
    now.restore(state->rng);
    MT_ASSERT(outputs.size() == grad_outputs.size(), "recompute: fn returned ", outputs.size(),
              " outputs in backward, ", grad_outputs.size(), " in forward");
    variable_list roots, grads;
    for (size_t i = 0; i < outputs.size(); ++i) {
      if (outputs[i].requires_grad() && grad_outputs[i].defined()) {
        roots.push_back(outputs[i]);
        grads.push_back(grad_outputs[i]);
      }
    }
    if (!roots.empty()) {
      torch::autograd::backward(roots, grads);
    }
    variable_list result;
    for (const auto& input : inputs) {
      result.push_back(input.requires_grad() ? input.grad() : torch::Tensor());
    }
    result.emplace_back(); // the capsule
    return result;
  }
};

} // namespace

std::vector<torch::Tensor> recompute(const RecomputeFn& fn,
                                     const std::vector<torch::Tensor>& inputs, RngTracker* rng) {
  bool any_grad = false;
  for (const auto& t : inputs) {
    any_grad = any_grad || t.requires_grad();
  }
  if (!torch::GradMode::is_enabled() || !any_grad) {
    return fn(inputs);
  }
  auto state = c10::make_intrusive<RecomputeState>();
  state->fn = fn;
  state->rng = rng;
  return RecomputeFunction::apply(at::TensorList(inputs), c10::IValue::make_capsule(state));
}

} // namespace meshtrain
