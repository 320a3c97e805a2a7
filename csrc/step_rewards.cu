// Step rewards (SPEC section 3) on the GPU: one thread per step sums that step's
// tokens from the layout's CSR list in time order, in double precision, so the
// result is deterministic (no float atomics). Traffic: one read of each agent
// token's reward plus its index, one write per step.
#include <cstdint>

#include "cuda_check.cuh"
#include "cuda_common.cuh"
#include "step_rewards_cuda.h"

namespace steppo {
namespace {

__global__ void step_rewards_kernel(DevIn rewards, const int64_t* __restrict__ step_tokens,
                                    const int64_t* __restrict__ offsets, int64_t num_steps, DevOut out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < num_steps; s += stride) {
    double acc = 0.0;
    for (int64_t j = offsets[s]; j < offsets[s + 1]; ++j) acc += rewards[step_tokens[j]];
    out.set(s, acc);
  }
}

}  // namespace

void step_rewards_cuda(uintptr_t rewards, int rewards_dtype, uintptr_t step_tokens, uintptr_t step_token_offsets,
                       int64_t num_steps, uintptr_t out, int out_dtype, uintptr_t stream, int device) {
  const DeviceGuard guard(device);
  check_in_dtype("token_rewards", rewards_dtype);
  check_out_dtype("out", out_dtype);
  if (num_steps == 0) return;
  const int threads = 256;
  step_rewards_kernel<<<grid_for(num_steps, threads), threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      DevIn{reinterpret_cast<const void*>(rewards), rewards_dtype}, reinterpret_cast<const int64_t*>(step_tokens),
      reinterpret_cast<const int64_t*>(step_token_offsets), num_steps,
      DevOut{reinterpret_cast<void*>(out), out_dtype});
  STEPPO_CUDA_CHECK_LAUNCH("step_rewards_kernel");
}

}  // namespace steppo
