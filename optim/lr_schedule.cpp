// defines: WarmupCosineSchedule (see lr_schedule.h).
#include "meshtrain/optim/lr_schedule.h"

#include "meshtrain/core/errors.h"

#include <cmath>

namespace meshtrain {

WarmupCosineSchedule::WarmupCosineSchedule(WarmupCosineOptions options) : options_(options) {
  const auto& o = options_;
  MT_CHECK(o.lr() >= 0, "WarmupCosineSchedule: lr must be >= 0, got ", o.lr());
  MT_CHECK(o.min_lr() >= 0 && o.min_lr() <= o.lr(), "WarmupCosineSchedule: min_lr (", o.min_lr(),
           ") must be in [0, lr (", o.lr(), ")]");
  MT_CHECK(o.total_steps() >= 1, "WarmupCosineSchedule: total_steps must be >= 1, got ",
           o.total_steps());
  MT_CHECK(o.warmup_steps() >= 0 && o.warmup_steps() <= o.total_steps(),
           "WarmupCosineSchedule: warmup_steps (", o.warmup_steps(),
           ") must be in [0, total_steps (", o.total_steps(), ")]");
}

double WarmupCosineSchedule::lr(int64_t step) const {
  const auto& o = options_;
  MT_CHECK(step >= 0, "WarmupCosineSchedule::lr: step must be >= 0, got ", step);
  if (step < o.warmup_steps()) {
    return o.lr() * static_cast<double>(step + 1) / static_cast<double>(o.warmup_steps());
  }
  if (step >= o.total_steps()) {
    return o.min_lr();
  }
  const double q = static_cast<double>(step - o.warmup_steps()) /
                   static_cast<double>(o.total_steps() - o.warmup_steps());
  return o.min_lr() + (o.lr() - o.min_lr()) * 0.5 * (1.0 + std::cos(M_PI * q));
}

} // namespace meshtrain
