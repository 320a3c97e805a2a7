"""Step rewards (SPEC section 3) in Triton: r_s = sum of step s's agent-token rewards.

One program per step reads the step's token indices from the layout's CSR list in
BLOCK chunks and sums them in fixed order (deterministic: no atomics), in float64 like the
C++ and CUDA kernels (the result is rounded once, to float32 for float32 rewards). Traffic: the
naive ``index_add`` reads each agent token's reward and step id and does a scattered
float atomic per token; this reads each reward and its int64 index once and writes
one value per step.
"""

import torch
import triton
import triton.language as tl

from .launch import launch

# Steps hold 64-1024 tokens in agentic RL; 128 lanes cover most in one or a few chunks.
BLOCK = 128


@triton.jit(do_not_specialize=["num_steps"])
def _step_rewards_kernel(
    rewards_ptr, step_tokens_ptr, offsets_ptr, out_ptr,  # pointers
    num_steps,  # sizes
    BLOCK: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    if s < num_steps:
        start = tl.load(offsets_ptr + s)
        end = tl.load(offsets_ptr + s + 1)
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        lanes = tl.arange(0, BLOCK).to(tl.int64)
        for j in range(start, end, BLOCK):
            idx = j + lanes
            valid = idx < end
            tok = tl.load(step_tokens_ptr + idx, mask=valid, other=0)
            r = tl.load(rewards_ptr + tok, mask=valid, other=0.0)
            acc += r.to(tl.float64)
        tl.store(out_ptr + s, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty))


def step_rewards(token_rewards: torch.Tensor, step_tokens: torch.Tensor, step_token_offsets: torch.Tensor) -> torch.Tensor:
    """(S,) step rewards; float64 for float64 rewards, float32 otherwise."""
    num_steps = step_token_offsets.numel() - 1
    out_dtype = torch.float64 if token_rewards.dtype == torch.float64 else torch.float32
    out = torch.empty(num_steps, dtype=out_dtype, device=token_rewards.device)
    if num_steps == 0:
        return out
    launch(_step_rewards_kernel, (num_steps,), token_rewards.device,
           token_rewards, step_tokens, step_token_offsets, out, num_steps, BLOCK=BLOCK, num_warps=4,
           enable_fp_fusion=False)
    return out
