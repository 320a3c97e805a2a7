#pragma once
#include <cstdint>

namespace steppo {

// Same contract as step_rewards_cpu, except how a bad offset or token index is reported: the
// step gets NaN and the first bad step lowers err[0], the first bad step_tokens position err[1]
// (two device int64 words, see cuda_common.cuh); nothing is raised and nothing synchronises.
// `stream` is a cudaStream_t as an integer and `device` the CUDA device index that holds the
// tensors.
void step_rewards_cuda(uintptr_t rewards, int rewards_dtype, int64_t n_rewards, uintptr_t step_tokens,
                       int64_t n_step_tokens, uintptr_t step_token_offsets, int64_t num_steps, uintptr_t out,
                       int out_dtype, uintptr_t err, uintptr_t stream, int device);

}  // namespace steppo
