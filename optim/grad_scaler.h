// defines: GradScalerOptions, GradScaler — the dynamic loss scaler of fp16 training
// (Micikevicius et al. 2018; DESIGN §3): the loss is multiplied by `scale` before backward so
// that small fp16 gradients do not flush to zero; before the update the gradients are divided
// by it again, and a step whose gradients hold an inf or NaN on ANY rank is skipped by EVERY
// rank (the verdict is all-reduced), with the scale halved. After growth_interval clean steps
// in a row the scale doubles.
//
//   loss * scaler.scale() -> backward -> grads = reducer.finish()
//   if (scaler.unscale_and_check(grads)) { skip the update }   // collective
//   else { clip; optimizer.step(grads) }
#pragma once

#include "meshtrain/core/communicator.h"

#include <torch/torch.h>

#include <cstdint>
#include <vector>

namespace meshtrain {

struct GradScalerOptions {
  TORCH_ARG(double, init_scale) = 65536.0; // 2^16
  TORCH_ARG(double, growth_factor) = 2.0;
  TORCH_ARG(double, backoff_factor) = 0.5;
  TORCH_ARG(int64_t, growth_interval) = 2000;
};

class GradScaler {
public:
  // `group`: the ranks that must agree on a skip (the whole mesh: every rank holds different
  // gradient pieces under dp x tp and ZeRO-2).
  GradScaler(GradScalerOptions options, CommunicatorPtr group);

  double scale() const { return scale_; }
  // Divides every gradient by scale() in place, then decides — the same on every rank of the
  // group — whether any rank saw an inf or NaN; updates the scale (backoff on a skip, growth
  // after growth_interval clean steps). Returns true when the step must be skipped.
  bool unscale_and_check(const std::vector<torch::Tensor>& grads);

  int64_t clean_steps() const { return clean_steps_; }
  int64_t skipped_steps() const { return skipped_; }
  // For checkpoints.
  void set_state(double scale, int64_t clean_steps);

private:
  GradScalerOptions options_;
  CommunicatorPtr group_;
  double scale_;
  int64_t clean_steps_ = 0;
  int64_t skipped_ = 0;
};

} // namespace meshtrain
