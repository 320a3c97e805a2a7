// Step rewards (SPEC section 3) on the GPU: one thread per step sums that step's
// tokens from the layout's CSR list in time order, in double precision, so the
// result is deterministic (no float atomics). Traffic: one read of each agent
// token's reward plus its index, one write per step.
//
// Every offset pair and token index is checked where it is read (cuda_common.cuh): a step whose
// offsets are out of order or outside [0, n_step_tokens], or that holds a token outside
// [0, n_rewards), gets NaN, and the first such step / step_tokens position lowers err[0] / err[1].
#include <cstdint>

#include "cuda_check.cuh"
#include "cuda_common.cuh"
#include "step_rewards_cuda.h"

namespace steppo {
namespace {

__global__ void step_rewards_kernel(DevIn rewards, int64_t n_rewards, const int64_t* __restrict__ step_tokens,
                                    int64_t n_step_tokens, const int64_t* __restrict__ offsets, int64_t num_steps,
                                    DevOut out, int64_t* __restrict__ err) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < num_steps; s += stride) {
    const int64_t begin = offsets[s], end = offsets[s + 1];
    if (!pair_ok_dev(begin, end, n_step_tokens)) {
      report_bad(err, s);
      out.set(s, nan_dev());
      continue;
    }
    double acc = 0.0;
    for (int64_t j = begin; j < end; ++j) {
      const int64_t t = step_tokens[j];
      if (!in_range_dev(t, n_rewards)) {
        report_bad(err + 1, j);
        acc = nan_dev();
        break;
      }
      acc += rewards[t];
    }
    out.set(s, acc);
  }
}

}  // namespace

void step_rewards_cuda(uintptr_t rewards, int rewards_dtype, int64_t n_rewards, uintptr_t step_tokens,
                       int64_t n_step_tokens, uintptr_t step_token_offsets, int64_t num_steps, uintptr_t out,
                       int out_dtype, uintptr_t err, uintptr_t stream, int device) {
  const DeviceGuard guard(device);
  check_in_dtype("token_rewards", rewards_dtype);
  check_out_dtype("out", out_dtype);
  require_error_words(err);
  if (num_steps < 0) throw std::invalid_argument("num_steps must be >= 0");
  if (num_steps == 0) return;
  const int threads = 256;
  step_rewards_kernel<<<grid_for(num_steps, threads), threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      DevIn{reinterpret_cast<const void*>(rewards), rewards_dtype}, n_rewards,
      reinterpret_cast<const int64_t*>(step_tokens), n_step_tokens,
      reinterpret_cast<const int64_t*>(step_token_offsets), num_steps, DevOut{reinterpret_cast<void*>(out), out_dtype},
      reinterpret_cast<int64_t*>(err));
  STEPPO_CUDA_CHECK_LAUNCH("step_rewards_kernel");
}

}  // namespace steppo
