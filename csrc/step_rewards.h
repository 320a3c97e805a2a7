#pragma once
#include <cstdint>

#include "common.h"

namespace steppo {

// rewards: (N,) float of `rewards_dtype`; step_tokens: (N_active,) int64 token
// indices grouped by step in time order; step_token_offsets: (num_steps + 1,) int64;
// out: (num_steps,) float32 or float64.
void step_rewards_cpu(uintptr_t rewards, int rewards_dtype, uintptr_t step_tokens, uintptr_t step_token_offsets,
                      int64_t num_steps, uintptr_t out, int out_dtype);

}  // namespace steppo
