// defines: AdamWScalars, adamw_kernel — AdamW's whole per-element update (decoupled decay,
// both moments, the bias-corrected step) in one pass over raw fp32 arrays. Internal to
// optim/: fused_adamw_ (adamw.h) is the tensor entry point.
//
// Each operation is rounded where torch's sequence of tensor ops rounds it (adamw.h's
// decoupled_weight_decay_ then adamw_update_), so the result is the same bit for bit: the
// file is compiled with -ffp-contract=off, and its two fused multiply-adds are where ATen's
// CPU kernels fuse (add_ with alpha is vec::fmadd; addcmul's multiply and add are contracted
// by ATen's build). A property of that build, checked by the [optim] test "fused_adamw_
// equals ..." on the machine it runs on.
#pragma once

#include <cstdint>

namespace meshtrain::detail {

// The update's scalars, each already rounded to fp32 as torch rounds a Scalar operand.
struct AdamWScalars {
  float decay = 1.0f;                 // 1 - lr * weight_decay (1: no decay)
  float beta1 = 0.0f;                 // m <- m * beta1 ...
  float one_minus_beta1 = 0.0f;       // ... + g * (1 - beta1)
  float beta2 = 0.0f;                 // v <- v * beta2 ...
  float one_minus_beta2 = 0.0f;       // ... + (1 - beta2) * g * g
  float sqrt_bias_correction2 = 1.0f; // denom = sqrt(v) / sqrt(1 - beta2^t) + eps
  float eps = 0.0f;
  float step_size = 0.0f; // p <- p + step_size * m / denom, step_size = -lr / (1 - beta1^t)
};

// param, exp_avg, exp_avg_sq updated in place from grad; n elements each, not overlapping.
void adamw_kernel(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, int64_t n,
                  const AdamWScalars& s);

} // namespace meshtrain::detail
