"""Step rewards (SPEC section 3) in Triton: r_s = sum of step s's agent-token rewards.

One program per step reads the step's token indices from the layout's CSR list in
BLOCK chunks and sums them in fixed order (deterministic: no float atomics), in float64 like the
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
NO_ERROR = 2 ** 63 - 1  # an error word that holds no bad position
_NO_ERROR = tl.constexpr(NO_ERROR)  # the same, for the kernel


@triton.jit(do_not_specialize=["n_rewards", "n_step_tokens", "num_steps"], do_not_specialize_on_alignment=["err_ptr"])
def _step_rewards_kernel(
    rewards_ptr, step_tokens_ptr, offsets_ptr, out_ptr, err_ptr,  # pointers
    n_rewards, n_step_tokens, num_steps,  # sizes
    BLOCK: tl.constexpr,
):
    # Every offset pair and token index is checked where it is read: a step whose offsets are out
    # of order or outside [0, n_step_tokens], or that names a token outside [0, n_rewards), reads
    # nothing through them, gets NaN, and lowers err_ptr[0] (to the step) or err_ptr[1] (to the
    # step_tokens position).
    s = tl.program_id(0).to(tl.int64)
    if s < num_steps:
        start = tl.load(offsets_ptr + s)
        end = tl.load(offsets_ptr + s + 1)
        ok = (start >= 0) & (start <= end) & (end <= n_step_tokens)
        if ok == 0:
            tl.atomic_min(err_ptr, s)
        lo = tl.where(ok, start, 0)
        hi = tl.where(ok, end, 0)
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        lanes = tl.arange(0, BLOCK).to(tl.int64)
        bad = tl.full([BLOCK], _NO_ERROR, tl.int64)  # each lane's first bad position (reduced once, after)
        for j in range(lo, hi, BLOCK):
            idx = j + lanes
            valid = idx < hi
            tok = tl.load(step_tokens_ptr + idx, mask=valid, other=0)
            inside = (tok >= 0) & (tok < n_rewards)
            r = tl.load(rewards_ptr + tok, mask=valid & inside, other=0.0)
            acc += r.to(tl.float64)
            bad = tl.minimum(bad, tl.where(valid & ~inside, idx, _NO_ERROR))
        first_bad = tl.min(bad, axis=0)
        if first_bad != _NO_ERROR:
            tl.atomic_min(err_ptr + 1, first_bad)
        total = tl.where(ok & (first_bad == _NO_ERROR), tl.sum(acc, axis=0), float("nan"))
        tl.store(out_ptr + s, total.to(out_ptr.dtype.element_ty))


def step_rewards(token_rewards: torch.Tensor, step_tokens: torch.Tensor, step_token_offsets: torch.Tensor,
                 err: torch.Tensor = None) -> torch.Tensor:
    """(S,) step rewards; float64 for float64 rewards, float32 otherwise.

    token_rewards (N,) float; step_tokens (M,) int64 in [0, N); step_token_offsets (S+1,) int64,
    non-decreasing in [0, M]. A bad offset pair or token index gives its step NaN and lowers
    ``err`` (2 int64 words on the device, NO_ERROR where there is nothing to report): err[0] to the
    first bad step, err[1] to the first bad position of step_tokens. Without ``err`` the call gets
    words of its own, which nobody reads.
    """
    num_steps = step_token_offsets.numel() - 1
    out_dtype = torch.float64 if token_rewards.dtype == torch.float64 else torch.float32
    out = torch.empty(num_steps, dtype=out_dtype, device=token_rewards.device)
    if num_steps == 0:
        return out
    if err is None:
        err = torch.full((2,), NO_ERROR, dtype=torch.int64, device=token_rewards.device)
    launch(_step_rewards_kernel, (num_steps,), token_rewards.device,
           token_rewards, step_tokens, step_token_offsets, out, err, token_rewards.numel(), step_tokens.numel(),
           num_steps, BLOCK=BLOCK, num_warps=4, enable_fp_fusion=False)
    return out
