// Step rewards (SPEC section 3) on the CPU: r_s = sum of the token rewards of
// step s's agent tokens, summed in time order in double precision.
//
// The layout gives each step's tokens as a CSR list (step_token_offsets,
// step_tokens), so every step is summed by exactly one thread in a fixed order:
// the result does not depend on the number of threads.
#include "step_rewards.h"

namespace steppo {

template <typename In, typename Out, typename Load>
static void step_rewards_impl(const In* rewards, const int64_t* step_tokens, const int64_t* offsets,
                              int64_t num_steps, Out* out, Load load) {
#pragma omp parallel for schedule(static)
  for (int64_t s = 0; s < num_steps; ++s) {
    double acc = 0.0;
    for (int64_t j = offsets[s]; j < offsets[s + 1]; ++j) acc += load(rewards, step_tokens[j]);
    out[s] = static_cast<Out>(acc);
  }
}

template <typename Out>
static void dispatch_in(const void* rewards, int rewards_dtype, const int64_t* step_tokens,
                        const int64_t* offsets, int64_t num_steps, Out* out) {
  switch (rewards_dtype) {
    case kFloat32:
      step_rewards_impl(static_cast<const float*>(rewards), step_tokens, offsets, num_steps, out,
                        [](const float* p, int64_t i) { return static_cast<double>(p[i]); });
      break;
    case kFloat64:
      step_rewards_impl(static_cast<const double*>(rewards), step_tokens, offsets, num_steps, out,
                        [](const double* p, int64_t i) { return p[i]; });
      break;
    case kBFloat16:
      step_rewards_impl(static_cast<const uint16_t*>(rewards), step_tokens, offsets, num_steps, out,
                        [](const uint16_t* p, int64_t i) { return static_cast<double>(bf16_to_float(p[i])); });
      break;
    case kFloat16:
      step_rewards_impl(static_cast<const uint16_t*>(rewards), step_tokens, offsets, num_steps, out,
                        [](const uint16_t* p, int64_t i) { return static_cast<double>(fp16_to_float(p[i])); });
      break;
    default:
      bad_dtype("token_rewards", rewards_dtype);
  }
}

void step_rewards_cpu(uintptr_t rewards, int rewards_dtype, uintptr_t step_tokens, uintptr_t step_token_offsets,
                      int64_t num_steps, uintptr_t out, int out_dtype) {
  const auto* toks = reinterpret_cast<const int64_t*>(step_tokens);
  const auto* offs = reinterpret_cast<const int64_t*>(step_token_offsets);
  const void* r = reinterpret_cast<const void*>(rewards);
  if (out_dtype == kFloat32) {
    dispatch_in(r, rewards_dtype, toks, offs, num_steps, reinterpret_cast<float*>(out));
  } else if (out_dtype == kFloat64) {
    dispatch_in(r, rewards_dtype, toks, offs, num_steps, reinterpret_cast<double*>(out));
  } else {
    bad_dtype("out", out_dtype);
  }
}

}  // namespace steppo
