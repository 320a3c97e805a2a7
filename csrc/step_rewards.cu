// Step rewards (SPEC section 3) on the GPU: one thread per step sums that step's
// tokens from the layout's CSR list in time order, in double precision, so the
// result is deterministic (no float atomics). Traffic: one read of each agent
// token's reward plus its index, one write per step.
#include <cuda_fp16.h>

#include <cstdint>

#include "common.h"
#include "cuda_check.cuh"
#include "step_rewards_cuda.h"

namespace steppo {
namespace {

__device__ __forceinline__ double load_dev(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ double load_dev(const double* p, int64_t i) { return p[i]; }
struct BF16 { uint16_t bits; };
struct F16 { uint16_t bits; };
__device__ __forceinline__ double load_dev(const BF16* p, int64_t i) {
  return __uint_as_float(static_cast<uint32_t>(p[i].bits) << 16);
}
__device__ __forceinline__ double load_dev(const F16* p, int64_t i) {
  return __half2float(__ushort_as_half(p[i].bits));
}

template <typename In, typename Out>
__global__ void step_rewards_kernel(const In* __restrict__ rewards, const int64_t* __restrict__ step_tokens,
                                    const int64_t* __restrict__ offsets, int64_t num_steps, Out* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < num_steps; s += stride) {
    double acc = 0.0;
    for (int64_t j = offsets[s]; j < offsets[s + 1]; ++j) acc += load_dev(rewards, step_tokens[j]);
    out[s] = static_cast<Out>(acc);
  }
}

template <typename In, typename Out>
void launch(const void* rewards, const int64_t* toks, const int64_t* offs, int64_t num_steps, void* out,
            cudaStream_t stream) {
  const int threads = 256;
  int64_t blocks = (num_steps + threads - 1) / threads;
  if (blocks > 65535) blocks = 65535;  // grid-stride loop covers the rest
  if (blocks < 1) blocks = 1;
  step_rewards_kernel<In, Out><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      static_cast<const In*>(rewards), toks, offs, num_steps, static_cast<Out*>(out));
  STEPPO_CUDA_CHECK_LAUNCH("step_rewards_kernel");
}

template <typename Out>
void dispatch_in(const void* rewards, int rewards_dtype, const int64_t* toks, const int64_t* offs, int64_t num_steps,
                 void* out, cudaStream_t stream) {
  switch (rewards_dtype) {
    case kFloat32: launch<float, Out>(rewards, toks, offs, num_steps, out, stream); break;
    case kFloat64: launch<double, Out>(rewards, toks, offs, num_steps, out, stream); break;
    case kBFloat16: launch<BF16, Out>(rewards, toks, offs, num_steps, out, stream); break;
    case kFloat16: launch<F16, Out>(rewards, toks, offs, num_steps, out, stream); break;
    default: bad_dtype("token_rewards", rewards_dtype);
  }
}

}  // namespace

void step_rewards_cuda(uintptr_t rewards, int rewards_dtype, uintptr_t step_tokens, uintptr_t step_token_offsets,
                       int64_t num_steps, uintptr_t out, int out_dtype, uintptr_t stream, int device) {
  require_device();
  if (num_steps == 0) return;
  STEPPO_CUDA_CHECK(cudaSetDevice(device));
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const auto* toks = reinterpret_cast<const int64_t*>(step_tokens);
  const auto* offs = reinterpret_cast<const int64_t*>(step_token_offsets);
  const void* r = reinterpret_cast<const void*>(rewards);
  void* o = reinterpret_cast<void*>(out);
  if (out_dtype == kFloat32) {
    dispatch_in<float>(r, rewards_dtype, toks, offs, num_steps, o, s);
  } else if (out_dtype == kFloat64) {
    dispatch_in<double>(r, rewards_dtype, toks, offs, num_steps, o, s);
  } else {
    bad_dtype("out", out_dtype);
  }
}

}  // namespace steppo
