// defines: WarmupCosineOptions, WarmupCosineSchedule — DESIGN §3's learning-rate schedule.
//
//   lr(s) = lr * (s + 1) / warmup                                   s < warmup
//   lr(s) = min_lr + (lr - min_lr) * (1 + cos(pi * q)) / 2,
//           q = (s - warmup) / (total - warmup)                     warmup <= s < total
//   lr(s) = min_lr                                                  s >= total
// s is the 0-based optimizer step. The first step after warmup runs at the full lr; the
// cosine reaches min_lr at s = total (nanoGPT's lr_decay_iters), and stays there.
#pragma once

#include <torch/torch.h>

#include <cstdint>

namespace meshtrain {

struct WarmupCosineOptions {
  /* implicit */ WarmupCosineOptions(double lr) : lr_(lr) {}
  TORCH_ARG(double, lr);
  TORCH_ARG(double, min_lr) = 0.0;
  TORCH_ARG(int64_t, warmup_steps) = 0;
  // Step at which the cosine reaches min_lr; must be >= warmup_steps.
  TORCH_ARG(int64_t, total_steps) = 1;
};

class WarmupCosineSchedule {
public:
  // Throws naming the bad value: 0 <= min_lr <= lr, 0 <= warmup <= total, total >= 1.
  explicit WarmupCosineSchedule(WarmupCosineOptions options);
  double lr(int64_t step) const;
  const WarmupCosineOptions& options() const { return options_; }

private:
  WarmupCosineOptions options_;
};

} // namespace meshtrain
