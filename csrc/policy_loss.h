#pragma once
#include <cstdint>

#include "common.h"

namespace steppo {

// The clipped policy loss of SPEC section 7, its gradients and metrics, on the CPU.
//
// logp, old_logp, advantages and the optional weights, entropy and ref_logp are (n,) arrays of one
// float dtype (float_dtype: float32 or float64; a null pointer for an absent optional); token_step
// (n,) int32/int64 is each token's step id in [0, num_steps) or -1 off-step.
// ratio_level: 0 token, 1 step. agg_mode: 0 token-mean, 1 token-sum, 2 seq-mean-token-mean,
// 3 seq-mean-token-sum, 4 seq-mean-token-sum-norm. kl_type: 0 k1, 1 abs, 2 k2, 3 k3 / low_var_kl.
// dual_clip, global_num_tokens, global_num_steps, norm_constant: NaN when not given.
// Outputs: loss (1,) and metrics (9,) float64 (pg_loss, pg_clipfrac, pg_clipfrac_lower, ppo_kl,
// ratio_mean, ratio_min, ratio_max, entropy, kl); grad_logp (n,) and grad_entropy (n,) (or null) in
// float_dtype. Two passes over the tokens, in order and in float64: the results do not depend on
// the thread count.
void policy_loss_cpu(uintptr_t logp, uintptr_t old_logp, uintptr_t advantages, int float_dtype, uintptr_t token_step,
                     int step_dtype, int64_t n, int64_t num_steps, uintptr_t weights, uintptr_t entropy,
                     uintptr_t ref_logp, int ratio_level, double clip_low, double clip_high, double dual_clip,
                     int agg_mode, double entropy_coef, double kl_coef, int kl_type, double global_num_tokens,
                     double global_num_steps, double norm_constant, uintptr_t loss, uintptr_t metrics,
                     uintptr_t grad_logp, uintptr_t grad_entropy);

}  // namespace steppo
