#pragma once
#include <cstdint>

namespace steppo {

// Credit assignment on the GPU (SPEC sections 4-6): same contracts as the *_cpu functions of
// credit.h, with device pointers. `stream` is a cudaStream_t as an integer, `device` the CUDA
// device that holds the tensors. No function synchronises with the host; results are
// deterministic (fixed reduction orders, no float atomics).

void broadcast_to_tokens_cuda(uintptr_t step_values, int values_dtype, uintptr_t token_step, int64_t n,
                              uintptr_t out, int out_dtype, uintptr_t stream, int device);

void step_gae_cuda(uintptr_t rewards, int rewards_dtype, uintptr_t values, int values_dtype,
                   uintptr_t traj_step_offsets, int64_t num_trajectories, double gamma, double lam, uintptr_t adv,
                   uintptr_t ret, int out_dtype, uintptr_t stream, int device);

void token_gae_cuda(uintptr_t rewards, int rewards_dtype, uintptr_t values, int values_dtype, int64_t n_tokens,
                    uintptr_t step_tokens, uintptr_t step_token_offsets, uintptr_t traj_step_offsets,
                    int64_t num_trajectories, double gamma, double lam, uintptr_t adv, uintptr_t ret, int out_dtype,
                    uintptr_t stream, int device);

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
// members in sorted order. `workspace`: group_advantage_cuda_workspace(...) bytes on the device.
void group_advantage_cuda(uintptr_t values, int values_dtype, uintptr_t group, uintptr_t subkey, int64_t n,
                          int norm, int singleton, double eps, uintptr_t out, int out_dtype, uintptr_t workspace,
                          int64_t workspace_bytes, uintptr_t stream, int device);

}  // namespace steppo
