#pragma once
#include <cstdint>

namespace steppo {

// Same contract as step_rewards_cpu; `stream` is a cudaStream_t as an integer and
// `device` the CUDA device index that holds the tensors.
void step_rewards_cuda(uintptr_t rewards, int rewards_dtype, uintptr_t step_tokens, uintptr_t step_token_offsets,
                       int64_t num_steps, uintptr_t out, int out_dtype, uintptr_t stream, int device);

}  // namespace steppo
