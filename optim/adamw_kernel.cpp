// defines: adamw_kernel (see adamw_kernel.h). Built with -ffp-contract=off and without the
// precompiled header (CMakeLists.txt): the compiler may not fuse a multiply and an add that
// torch rounds separately. GCC builds a copy per vector width (target_clones, chosen once at
// load time from the CPU), so the loop runs 16 floats wide where AVX-512 is present.
#include "meshtrain/optim/adamw_kernel.h"

#include <cmath>

namespace meshtrain::detail {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MESHTRAIN_VECTOR_CLONES                                                                    \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MESHTRAIN_VECTOR_CLONES
#endif

MESHTRAIN_VECTOR_CLONES
void adamw_kernel(float* __restrict param, const float* __restrict grad, float* __restrict exp_avg,
                  float* __restrict exp_avg_sq, int64_t n, const AdamWScalars& s) {
  const float decay = s.decay;
  const float beta1 = s.beta1;
  const float one_minus_beta1 = s.one_minus_beta1;
  const float beta2 = s.beta2;
  const float one_minus_beta2 = s.one_minus_beta2;
  const float sqrt_bias_correction2 = s.sqrt_bias_correction2;
  const float eps = s.eps;
  const float step_size = s.step_size;
  for (int64_t i = 0; i < n; ++i) {
    const float g = grad[i];
    const float p = param[i] * decay;                                 // p.mul_(1 - lr * wd)
    const float m = std::fma(g, one_minus_beta1, exp_avg[i] * beta1); // m.mul_(b1).add_(g, 1 - b1)
    // v.mul_(b2).addcmul_(g, g, 1 - b2): ATen's addcmul is self + value * t1 * t2, which its
    // build contracts to one FMA.
    const float v = std::fma(one_minus_beta2 * g, g, exp_avg_sq[i] * beta2);
    const float denom = std::sqrt(v) / sqrt_bias_correction2 + eps; // (v.sqrt() / c2).add_(eps)
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    param[i] = p + step_size * m / denom; // p.addcdiv_(m, denom, step_size)
  }
}

} // namespace meshtrain::detail
