"""The clipped policy loss (SPEC section 7) in Triton: value, metrics and closed-form gradients.

Reference: ``steppo_fast.reference.policy_loss`` / ``policy_loss_grads``. The reference is some
twenty tensor ops over the N tokens, each reading and writing an (N,) temporary, plus index_add
sums whose float atomics make the result vary between runs on a GPU. Here:

1. Steps: the tokens are sorted by step (stable) and each step's log-ratios are summed by one
   program in a fixed order, in float64 (no atomics; a NaN stays in its own step). Counts are
   differences of the sorted steps' boundaries.
2. One kernel reads each token's inputs once and writes its gradients once; each program also
   writes its partial sums (loss terms and metric counts) to its own row of a buffer, which is
   reduced in a fixed order afterwards. So the same inputs give the same bits on every run.

No host synchronisation: sizes come from the host (N, the number of steps S), the options and
global counts are kernel arguments, and the token and step counts stay on the device. The
options (ratio level, aggregation, KL estimator, dual clip, which optional inputs are given)
are run-time arguments, not compile-time ones: the kernels compile once per float dtype.
NaN propagates as in the reference: a NaN log-ratio gives a NaN loss, ratio metrics and
gradients of its token (token ratio) or its step's tokens (step ratio).
"""

import torch
import triton
import triton.language as tl

from steppo_fast.ops import AGG_CODES, KL_CODES

from .launch import launch

BLOCK = 1024  # tokens per program: 8 per thread over 4 warps
STEP_BLOCK = 128  # tokens of one step summed per iteration (steps hold 64-1024 tokens)
N_PARTIALS = 11  # pg, entropy term, kl term, clipped, lower, -diff, ratio, entropy, kl, ratio min, ratio max
_RUNTIME = ["n", "num_steps", "step_level", "agg", "kl_type", "has_dual", "has_w", "has_ent", "has_ref"]
_POINTERS = ["lp_ptr", "old_ptr", "adv_ptr", "ts_ptr", "w_ptr", "ent_ptr", "ref_ptr", "step_l_ptr", "cnt_ptr",
             "tot_ptr", "g_lp_ptr", "g_ent_ptr", "part_ptr"]


@triton.jit(do_not_specialize=["num_steps"], do_not_specialize_on_alignment=["lp_ptr", "old_ptr", "order_ptr",
                                                                              "edges_ptr", "mean_ptr"])
def _step_means_kernel(
    lp_ptr, old_ptr, order_ptr, edges_ptr, mean_ptr,  # pointers
    num_steps,  # sizes
    BLOCK: tl.constexpr,
):
    # mean_ptr[s] = mean of logp - old_logp over step s's tokens order[edges[s]:edges[s + 1]].
    s = tl.program_id(0).to(tl.int64)
    if s < num_steps:
        start = tl.load(edges_ptr + s)
        end = tl.load(edges_ptr + s + 1)
        lanes = tl.arange(0, BLOCK).to(tl.int64)
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        for j in range(start, end, BLOCK):
            idx = j + lanes
            valid = idx < end
            tok = tl.load(order_ptr + idx, mask=valid, other=0)
            x = tl.load(lp_ptr + tok, mask=valid, other=0.0).to(tl.float64)
            acc += x - tl.load(old_ptr + tok, mask=valid, other=0.0).to(tl.float64)
        tl.store(mean_ptr + s, tl.sum(acc, 0) / tl.maximum(end - start, 1).to(tl.float64))


@triton.jit
def _min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _clamp(x, lo, hi):
    return _min_nan(_max_nan(x, lo), hi)


@triton.jit(do_not_specialize=_RUNTIME, do_not_specialize_on_alignment=_POINTERS)
def _policy_loss_kernel(
    lp_ptr, old_ptr, adv_ptr, ts_ptr, w_ptr, ent_ptr, ref_ptr, step_l_ptr, cnt_ptr, tot_ptr,  # inputs
    g_lp_ptr, g_ent_ptr, part_ptr,  # outputs
    n, num_steps,  # sizes
    clip_low: tl.float64, clip_high: tl.float64, dual_clip: tl.float64, entropy_coef: tl.float64,
    kl_coef: tl.float64, glob_tok: tl.float64, glob_step: tl.float64, inv_norm: tl.float64,
    step_level, agg, kl_type, has_dual, has_w, has_ent, has_ref,  # options, as run-time integers
    BLOCK: tl.constexpr,
):
    # tot_ptr: [agent tokens, steps with tokens] (float64, on the device); glob_tok / glob_step:
    # the caller's global counts, NaN when not given. step_l_ptr / cnt_ptr: each step's mean
    # log-ratio and token count.
    nan = float("nan")
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    s = tl.load(ts_ptr + offs, mask=inb, other=-1)
    agent = inb & (s >= 0)
    # A step id past the step count (possible only without validation) reads nothing: NaN.
    in_steps = agent & (s < num_steps)
    sc = tl.where(in_steps, s, 0)
    x = tl.load(lp_ptr + offs, mask=agent, other=0.0).to(tl.float64)
    a = tl.load(adv_ptr + offs, mask=agent, other=0.0).to(tl.float64)
    diff = x - tl.load(old_ptr + offs, mask=agent, other=0.0).to(tl.float64)
    n_tok = tl.load(tot_ptr)
    s_prime = tl.load(tot_ptr + 1)
    tok_div = tl.maximum(tl.where(glob_tok == glob_tok, glob_tok, n_tok), 1.0)
    step_div = tl.maximum(tl.where(glob_step == glob_step, glob_step, s_prime), 1.0)
    if step_level != 0:
        lr = tl.load(step_l_ptr + sc, mask=in_steps, other=0.0)
        lr = tl.where(agent & (s >= num_steps), nan, lr)
        ratio = tl.exp(_min_nan(lr, 10.0))
        dratio = tl.where(lr > 10.0, 0.0, ratio)
    else:
        ratio = tl.exp(_clamp(diff, -20.0, 20.0))
        dratio = tl.where((diff < -20.0) | (diff > 20.0), 0.0, ratio)
    pg1 = -a * ratio
    pg2 = -a * _clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    l_tok = _max_nan(pg1, pg2)
    clipped = pg2 > pg1
    dl = tl.where(clipped, 0.0, -a)
    lower = offs < 0  # all False
    if has_dual != 0:
        pg3 = -a * dual_clip
        neg = a < 0
        lower = neg & (l_tok > pg3)
        tie = tl.where(l_tok < pg3, 1.0, tl.where(l_tok == pg3, 0.5, 0.0)).to(tl.float64)
        dl = tl.where(neg, dl * tie, dl)
        l_tok = tl.where(neg, _min_nan(l_tok, pg3), l_tok)
    if has_w != 0:
        wt = tl.load(w_ptr + offs, mask=agent, other=0.0).to(tl.float64)
        l_tok = l_tok * wt
        dl = dl * wt
    # The aggregation weight c_t of SPEC 7 (the gradient of the aggregation).
    if agg == 0:
        c_all = 1.0 / tok_div
    elif agg == 1:
        c_all = tl.full([], 1.0, tl.float64)
    elif agg == 4:
        c_all = inv_norm / step_div
    else:
        c_all = 1.0 / step_div
    if agg == 2:
        n_s = tl.load(cnt_ptr + sc, mask=in_steps, other=0).to(tl.float64)
        c = c_all / tl.where(in_steps, n_s + 1e-8, nan)
    else:
        c = tl.full([BLOCK], 1.0, tl.float64) * c_all
    c = tl.where(agent, c, 0.0)
    g = c * dl * dratio
    kl = tl.zeros([BLOCK], dtype=tl.float64)
    if has_ref != 0:
        r = tl.load(ref_ptr + offs, mask=agent, other=0.0).to(tl.float64)
        d = x - r
        if kl_type == 0:
            kl = d
            dkl = tl.full([BLOCK], 1.0, tl.float64)
        elif kl_type == 1:
            kl = tl.abs(d)
            dkl = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)).to(tl.float64)  # torch.sign: 0 at 0 and NaN
        elif kl_type == 2:
            kl = 0.5 * d * d
            dkl = d
        else:
            xr = r - x
            xc = _clamp(xr, -20.0, 20.0)
            raw = tl.exp(xc) - xc - 1.0
            kl = _clamp(raw, -10.0, 10.0)
            outside = (xr < -20.0) | (xr > 20.0) | (raw < -10.0) | (raw > 10.0)
            dkl = tl.where(outside, 0.0, -(tl.exp(xc) - 1.0))
        if kl_coef != 0.0:
            g = g + kl_coef * c * dkl
        kl = tl.where(agent, kl, 0.0)
    h = tl.zeros([BLOCK], dtype=tl.float64)
    if has_ent != 0:
        h = tl.load(ent_ptr + offs, mask=agent, other=0.0).to(tl.float64)
        tl.store(g_ent_ptr + offs, (-entropy_coef * c).to(g_ent_ptr.dtype.element_ty), mask=inb)
    tl.store(g_lp_ptr + offs, tl.where(agent, g, 0.0).to(g_lp_ptr.dtype.element_ty), mask=inb)
    zero = tl.zeros([BLOCK], dtype=tl.float64)
    base = part_ptr + pid * 11
    tl.store(base + 0, tl.sum(tl.where(agent, c * l_tok, zero), 0))
    tl.store(base + 1, tl.sum(c * h, 0))
    tl.store(base + 2, tl.sum(c * kl, 0))
    tl.store(base + 3, tl.sum(tl.where(agent & clipped, 1.0, zero), 0))
    tl.store(base + 4, tl.sum(tl.where(agent & lower, 1.0, zero), 0))
    tl.store(base + 5, tl.sum(tl.where(agent, -diff, zero), 0))
    tl.store(base + 6, tl.sum(tl.where(agent, ratio, zero), 0))
    tl.store(base + 7, tl.sum(h, 0))
    tl.store(base + 8, tl.sum(kl, 0))
    tl.store(base + 9, tl.reduce(tl.where(agent, ratio, float("inf")), 0, _min_nan))
    tl.store(base + 10, tl.reduce(tl.where(agent, ratio, float("-inf")), 0, _max_nan))


def _steps(logp, old, ts, num_steps: int):
    """(mean log-ratio (S,) float64, token count (S,) int64) of each step, without a host sync."""
    dev = logp.device
    sorted_ts, order = torch.sort(ts, stable=True)
    edges = torch.searchsorted(sorted_ts, torch.arange(num_steps + 1, dtype=ts.dtype, device=dev))
    counts = edges[1:] - edges[:-1]
    means = torch.empty(num_steps, dtype=torch.float64, device=dev)
    if num_steps:
        launch(_step_means_kernel, (num_steps,), dev, logp, old, order, edges, means, num_steps, BLOCK=STEP_BLOCK,
               num_warps=4, enable_fp_fusion=False)
    return means, counts


def _nan_if_none(x):
    return float("nan") if x is None else float(x)


def policy_loss(logp, old_logp, advantages, token_step, weights, entropy, ref_logp, num_steps, ratio_level, clip_low,
                clip_high, dual_clip, agg_mode, entropy_coef, kl_coef, kl_type, global_num_tokens, global_num_steps,
                norm_constant):
    """(loss, metrics (9,), grad_logp, grad_entropy) as the registry's policy_loss op returns them.

    Token tensors (N,): logp, old_logp, advantages (and weights, entropy, ref_logp when given) float;
    token_step int32/int64. Arithmetic in float64; loss and metrics in float64 if any of logp,
    old_logp, advantages is, else float32; grad_logp in logp's dtype, grad_entropy in entropy's
    (empty without entropy). Nothing here waits for the device.
    """
    dev = logp.device
    n = logp.shape[0]
    num_steps = int(num_steps)
    dt = torch.float64 if torch.float64 in (logp.dtype, old_logp.dtype, advantages.dtype) else torch.float32
    # One dtype for every float input: the kernels compile once per dtype, not per combination.
    x, old, adv = (t.to(dt).contiguous() for t in (logp, old_logp, advantages))
    w, ent, rl = (None if t is None else t.to(dt).contiguous() for t in (weights, entropy, ref_logp))
    ts = token_step.to(torch.int32).contiguous()
    step_l, step_n = _steps(x, old, ts, num_steps)
    n_tok = (ts >= 0).sum()
    tot = torch.stack([n_tok, (step_n > 0).sum()]).to(torch.float64)
    g_lp = torch.empty(n, dtype=dt, device=dev)
    g_ent = torch.empty(n, dtype=dt, device=dev) if ent is not None else None
    blocks = max(1, triton.cdiv(n, BLOCK))
    parts = torch.empty(blocks, N_PARTIALS, dtype=torch.float64, device=dev)
    if n:
        launch(_policy_loss_kernel, (blocks,), dev,
               x, old, adv, ts, w if w is not None else x, ent if ent is not None else x, rl if rl is not None else x,
               step_l, step_n, tot, g_lp, g_ent if g_ent is not None else g_lp, parts,
               n, num_steps, float(clip_low), float(clip_high), _nan_if_none(dual_clip), float(entropy_coef),
               float(kl_coef), _nan_if_none(global_num_tokens), _nan_if_none(global_num_steps),
               1.0 / float(norm_constant) if norm_constant is not None else 1.0,
               int(ratio_level == "step"), AGG_CODES[agg_mode], KL_CODES[kl_type], int(dual_clip is not None),
               int(w is not None), int(ent is not None), int(rl is not None),
               BLOCK=BLOCK, num_warps=4, enable_fp_fusion=False)
    else:
        parts.zero_()
        parts[:, 9].fill_(float("inf"))
        parts[:, 10].fill_(float("-inf"))
    sums = parts[:, :9].sum(0)
    r_min, r_max = parts[:, 9].min(), parts[:, 10].max()
    pg, ent_term, kl_term = sums[0], sums[1], sums[2]
    loss = pg
    if entropy is not None and entropy_coef != 0.0:
        loss = loss - entropy_coef * ent_term
    if ref_logp is not None and kl_coef != 0.0:
        loss = loss + kl_coef * kl_term
    cnt = tot[0].clamp(min=1.0)
    has = tot[0] > 0
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    metrics = torch.stack([
        pg, sums[3] / cnt, sums[4] / cnt, sums[5] / cnt, sums[6] / cnt, torch.where(has, r_min, zero),
        torch.where(has, r_max, zero), sums[7] / cnt if entropy is not None else zero,
        sums[8] / cnt if ref_logp is not None else zero])
    g_ent_out = g_ent.to(entropy.dtype) if entropy is not None else logp.new_empty(0)
    return loss.to(dt), metrics.to(dt), g_lp.to(logp.dtype), g_ent_out
