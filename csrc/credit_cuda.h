#pragma once
#include <cstdint>

namespace steppo {

// Credit assignment on the GPU (SPEC sections 4-6): same contracts as the *_cpu functions of
// credit.h, with device pointers. `stream` is a cudaStream_t as an integer, `device` the CUDA
// device that holds the tensors. No function synchronises with the host; results are
// deterministic (fixed reduction orders, no float atomics).
//
// Bad indices and offsets: where the *_cpu function raises, these skip the bad entry, write NaN
// into the outputs it would have filled and lower error words `err` (device int64s, one per
// checked argument, listed below) to the first bad position (see cuda_common.cuh). They never
// read or write outside the arrays whose sizes they are given.

// err[0]: first token whose step id is >= num_values (that token gets NaN).
void broadcast_to_tokens_cuda(uintptr_t step_values, int values_dtype, int64_t num_values, uintptr_t token_step,
                              int64_t n, uintptr_t out, int out_dtype, uintptr_t err, uintptr_t stream, int device);

// err[0]: first bad position of traj_step_offsets: 0 when it does not start at 0, R when it does
// not end at num_steps, else the first trajectory j whose pair (j, j + 1) is out of order or out
// of [0, num_steps]. Its steps, and steps of no trajectory, get NaN.
void step_gae_cuda(uintptr_t rewards, int rewards_dtype, uintptr_t values, int values_dtype, int64_t num_steps,
                   uintptr_t traj_step_offsets, int64_t num_trajectories, double gamma, double lam, uintptr_t adv,
                   uintptr_t ret, int out_dtype, uintptr_t err, uintptr_t stream, int device);

// err[0]: traj_step_offsets as in step_gae_cuda; err[1]: step_token_offsets the same way against
// n_step_tokens (a trajectory with a bad step pair is skipped); err[2]: first position of
// step_tokens outside [0, n_tokens). A skipped trajectory's tokens get NaN, as far as its offsets
// name them; a bad token index makes NaN of the trajectory's earlier tokens (which depend on it).
void token_gae_cuda(uintptr_t rewards, int rewards_dtype, uintptr_t values, int values_dtype, int64_t n_tokens,
                    uintptr_t step_tokens, int64_t n_step_tokens, uintptr_t step_token_offsets, int64_t num_steps,
                    uintptr_t traj_step_offsets, int64_t num_trajectories, double gamma, double lam, uintptr_t adv,
                    uintptr_t ret, int out_dtype, uintptr_t err, uintptr_t stream, int device);

// Doubles of workspace whiten_moments_cuda needs.
int64_t whiten_moments_cuda_workspace(int64_t n);

// `workspace`: whiten_moments_cuda_workspace(n) doubles on the device. out: 3 doubles.
void whiten_moments_cuda(uintptr_t x, int x_dtype, uintptr_t mask, int64_t n, uintptr_t out, uintptr_t workspace,
                         uintptr_t stream, int device);

// `moments` stays on the device: the scale is computed by the kernel, never on the host.
void whiten_apply_cuda(uintptr_t x, int x_dtype, uintptr_t mask, int64_t n, uintptr_t moments, int mode, double eps,
                       uintptr_t out, int out_dtype, uintptr_t stream, int device);

// Bytes of workspace group_advantage_cuda needs for n values (a pure host computation).
int64_t group_advantage_cuda_workspace(int64_t n, int device);

// Groups by a stable radix sort of (group, subkey) with CUB, then one thread per group walks its
// members in sorted order. The ids are only compared, never used as indices: nothing to check. `workspace`: group_advantage_cuda_workspace(...) bytes on the device.
void group_advantage_cuda(uintptr_t values, int values_dtype, uintptr_t group, uintptr_t subkey, int64_t n,
                          int norm, int singleton, double eps, uintptr_t out, int out_dtype, uintptr_t workspace,
                          int64_t workspace_bytes, uintptr_t stream, int device);

}  // namespace steppo
