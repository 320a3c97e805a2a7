// Step rewards (SPEC section 3) on the CPU: r_s = sum of the token rewards of
// step s's agent tokens, summed in time order in double precision.
//
// The layout gives each step's tokens as a CSR list (step_token_offsets,
// step_tokens), so every step is summed by exactly one thread in a fixed order:
// the result does not depend on the number of threads.
#include "step_rewards.h"

#include <algorithm>

namespace steppo {

// Returns -1, or the first step whose offsets are out of order or out of [0, n_step_tokens] (bad_step),
// or the first position of step_tokens outside [0, n_rewards) (bad_tok); bad steps are skipped.
struct Bad {
  int64_t step, tok;
};

template <typename In, typename Out, typename Load>
static Bad step_rewards_impl(const In* rewards, int64_t n_rewards, const int64_t* step_tokens, int64_t n_step_tokens,
                             const int64_t* offsets, int64_t num_steps, Out* out, Load load) {
  int64_t bad_step = num_steps, bad_tok = n_step_tokens;
#pragma omp parallel for schedule(static) reduction(min : bad_step, bad_tok)
  for (int64_t s = 0; s < num_steps; ++s) {
    double acc = 0.0;
    if (!pair_ok(offsets[s], offsets[s + 1], n_step_tokens)) {
      bad_step = std::min(bad_step, s);
      out[s] = static_cast<Out>(0.0);
      continue;
    }
    for (int64_t j = offsets[s]; j < offsets[s + 1]; ++j) {
      const int64_t t = step_tokens[j];
      if (!in_range(t, n_rewards)) {
        bad_tok = std::min(bad_tok, j);
        break;
      }
      acc += load(rewards, t);
    }
    out[s] = static_cast<Out>(acc);
  }
  return {bad_step < num_steps ? bad_step : -1, bad_tok < n_step_tokens ? bad_tok : -1};
}

template <typename Out>
static Bad dispatch_in(const void* rewards, int rewards_dtype, int64_t n_rewards, const int64_t* step_tokens,
                       int64_t n_step_tokens, const int64_t* offsets, int64_t num_steps, Out* out) {
  switch (rewards_dtype) {
    case kFloat32:
      return step_rewards_impl(static_cast<const float*>(rewards), n_rewards, step_tokens, n_step_tokens, offsets,
                               num_steps, out, [](const float* p, int64_t i) { return static_cast<double>(p[i]); });
    case kFloat64:
      return step_rewards_impl(static_cast<const double*>(rewards), n_rewards, step_tokens, n_step_tokens, offsets,
                               num_steps, out, [](const double* p, int64_t i) { return p[i]; });
    case kBFloat16:
      return step_rewards_impl(static_cast<const uint16_t*>(rewards), n_rewards, step_tokens, n_step_tokens,
                               offsets, num_steps, out, [](const uint16_t* p, int64_t i) {
                                 return static_cast<double>(bf16_to_float(p[i]));
                               });
    case kFloat16:
      return step_rewards_impl(static_cast<const uint16_t*>(rewards), n_rewards, step_tokens, n_step_tokens,
                               offsets, num_steps, out, [](const uint16_t* p, int64_t i) {
                                 return static_cast<double>(fp16_to_float(p[i]));
                               });
    default:
      bad_dtype("token_rewards", rewards_dtype);
  }
}

void step_rewards_cpu(uintptr_t rewards, int rewards_dtype, int64_t n_rewards, uintptr_t step_tokens,
                      int64_t n_step_tokens, uintptr_t step_token_offsets, int64_t num_steps, uintptr_t out,
                      int out_dtype) {
  const auto* toks = reinterpret_cast<const int64_t*>(step_tokens);
  const auto* offs = reinterpret_cast<const int64_t*>(step_token_offsets);
  const void* r = reinterpret_cast<const void*>(rewards);
  if (num_steps < 0) throw std::invalid_argument("num_steps must be >= 0");
  Bad bad;
  if (out_dtype == kFloat32) {
    bad = dispatch_in(r, rewards_dtype, n_rewards, toks, n_step_tokens, offs, num_steps, reinterpret_cast<float*>(out));
  } else if (out_dtype == kFloat64) {
    bad = dispatch_in(r, rewards_dtype, n_rewards, toks, n_step_tokens, offs, num_steps,
                      reinterpret_cast<double*>(out));
  } else {
    bad_dtype("out", out_dtype);
  }
  if (bad.step >= 0) bad_pair("step_token_offsets", bad.step, offs, n_step_tokens);
  if (bad.tok >= 0)
    bad_index("step_tokens", bad.tok, toks[bad.tok],
              "is outside [0, " + std::to_string(n_rewards) + "), the token rewards' range");
}

}  // namespace steppo
