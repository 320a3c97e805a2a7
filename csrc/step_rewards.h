#pragma once
#include <cstdint>

#include "common.h"

namespace steppo {

// rewards: (n_rewards,) float of `rewards_dtype`; step_tokens: (n_step_tokens,) int64 token
// indices grouped by step in time order, each in [0, n_rewards); step_token_offsets: (num_steps + 1,)
// int64 non-decreasing offsets in [0, n_step_tokens]; out: (num_steps,) float32 or float64.
// A bad index or offset raises std::invalid_argument; nothing outside the arrays is read.
void step_rewards_cpu(uintptr_t rewards, int rewards_dtype, int64_t n_rewards, uintptr_t step_tokens,
                      int64_t n_step_tokens, uintptr_t step_token_offsets, int64_t num_steps, uintptr_t out,
                      int out_dtype);

}  // namespace steppo
