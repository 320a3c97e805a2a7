#pragma once
#include <cstdint>

#include "common.h"

namespace steppo {

// Credit assignment on the CPU (SPEC sections 4-6). Float inputs may be float32, float64,
// bfloat16 or float16 (dtype codes of common.h); arithmetic is in double; outputs are
// float32 or float64 (`out_dtype`). Index arrays are contiguous int64 unless named int32.

// Every index is checked against the sizes given (num_values, num_steps, n_tokens, ...); a bad one
// raises std::invalid_argument naming the argument, and nothing outside the arrays is touched.

// out[t] = step_values[token_step[t]] where token_step[t] >= 0, else 0. token_step: int32 (n,),
// each entry below num_values (the length of step_values).
void broadcast_to_tokens_cpu(uintptr_t step_values, int values_dtype, int64_t num_values, uintptr_t token_step,
                             int64_t n, uintptr_t out, int out_dtype);

// Step-level GAE per trajectory; steps of trajectory r are ids traj_step_offsets[r] .. [r+1] in
// time order. delta_k = r_k + gamma V_{k+1} - V_k (V_K = 0); A_k = delta_k + gamma lam A_{k+1};
// R_k = A_k + V_k. Parallel over trajectories. rewards, values, adv, ret: (num_steps,);
// traj_step_offsets: CSR offsets from 0 to num_steps.
void step_gae_cpu(uintptr_t rewards, int rewards_dtype, uintptr_t values, int values_dtype, int64_t num_steps,
                  uintptr_t traj_step_offsets, int64_t num_trajectories, double gamma, double lam, uintptr_t adv,
                  uintptr_t ret, int out_dtype);

// Token-level GAE over each trajectory's agent tokens in time order, across steps. Tokens of
// step s are step_tokens[step_token_offsets[s] .. [s+1]]. adv and ret (n_tokens,) are written
// everywhere: 0 on tokens of no step. step_tokens: (n_step_tokens,) entries in [0, n_tokens);
// step_token_offsets: CSR offsets (num_steps + 1,) from 0 to n_step_tokens; traj_step_offsets:
// CSR offsets (num_trajectories + 1,) from 0 to num_steps. A token listed twice gets one of its
// two results (unspecified which).
void token_gae_cpu(uintptr_t rewards, int rewards_dtype, uintptr_t values, int values_dtype, int64_t n_tokens,
                   uintptr_t step_tokens, int64_t n_step_tokens, uintptr_t step_token_offsets, int64_t num_steps,
                   uintptr_t traj_step_offsets, int64_t num_trajectories, double gamma, double lam, uintptr_t adv,
                   uintptr_t ret, int out_dtype);

// (count, sum, sum of squares) of x over mask (mask may be 0: all), in double, summed in fixed
// blocks so the result does not depend on the thread count. out: 3 doubles.
void whiten_moments_cpu(uintptr_t x, int x_dtype, uintptr_t mask, int64_t n, uintptr_t out);

// Whitening with given moments (unbiased variance, 0 below 2 elements). mode 0 (step):
// (x - mean) / (std + eps); mode 1 (token): (x - mean) * rsqrt(var + eps). 0 outside mask.
void whiten_apply_cpu(uintptr_t x, int x_dtype, uintptr_t mask, int64_t n, uintptr_t moments, int mode, double eps,
                      uintptr_t out, int out_dtype);

// Normalisation within groups of equal (group, subkey) (subkey may be 0). norm 0: mean_std
// (x - mean) / (std + eps); 1: mean, x - mean; 2: rloo, n (x - mean) / (n - 1). A group of one
// gives x / (1 + eps), x, x (singleton 0, "unit") or 0 (singleton 1, "zero").
void group_advantage_cpu(uintptr_t values, int values_dtype, uintptr_t group, uintptr_t subkey, int64_t n,
                         int norm, int singleton, double eps, uintptr_t out, int out_dtype);

}  // namespace steppo
