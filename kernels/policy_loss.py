"""The clipped policy loss (SPEC section 7) in Triton: value, metrics and closed-form gradients.

Reference: ``steppo_fast.reference.policy_loss`` / ``policy_loss_grads``. The reference is some
twenty tensor ops over the N tokens, each reading and writing an (N,) temporary, plus index_add
sums whose float atomics make the result vary between runs on a GPU. Here:

1. The per-step log-ratio sums come from a stable sort of the tokens by step and a float64 prefix
   sum read at the steps' boundaries (no atomics; counts are integer bincounts).
2. One kernel reads each token's inputs once and writes its gradients once; each program also
   writes its partial sums (loss terms and metric counts) to its own row of a buffer, which is
   reduced in a fixed order afterwards. So the same inputs give the same bits on every run.
"""

import torch
import triton
import triton.language as tl

from steppo_fast.ops import AGG_CODES, KL_CODES

BLOCK = 1024  # tokens per program: 8 per thread over 4 warps
N_PARTIALS = 11  # pg, entropy term, kl term, clipped, lower, -diff, ratio, entropy, kl, ratio min, ratio max



@triton.jit
def _policy_loss_kernel(
    lp_ptr, old_ptr, adv_ptr, ts_ptr, w_ptr, ent_ptr, ref_ptr, step_l_ptr, step_n_ptr, scal_ptr,  # inputs
    g_lp_ptr, g_ent_ptr, part_ptr,  # outputs
    n,  # sizes
    clip_low, clip_high, dual_clip, entropy_coef, kl_coef,
    STEP: tl.constexpr, AGG: tl.constexpr, KL: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_W: tl.constexpr,
    HAS_ENT: tl.constexpr, HAS_REF: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    s = tl.load(ts_ptr + offs, mask=inb, other=-1).to(tl.int64)
    agent = inb & (s >= 0)
    sc = tl.where(agent, s, 0)
    x = tl.load(lp_ptr + offs, mask=agent, other=0.0).to(tl.float64)
    a = tl.load(adv_ptr + offs, mask=agent, other=0.0).to(tl.float64)
    diff = x - tl.load(old_ptr + offs, mask=agent, other=0.0).to(tl.float64)
    n_s = tl.load(step_n_ptr + sc, mask=agent, other=1.0)
    # scal: [1 / token divisor, 1 / step divisor, 1 / norm constant]
    inv_tok = tl.load(scal_ptr)
    inv_step = tl.load(scal_ptr + 1)
    inv_norm = tl.load(scal_ptr + 2)
    if STEP:
        lr = tl.load(step_l_ptr + sc, mask=agent, other=0.0)
        ratio = tl.exp(tl.minimum(lr, 10.0))
        dratio = tl.where(lr <= 10.0, ratio, 0.0)
    else:
        ratio = tl.exp(tl.minimum(tl.maximum(diff, -20.0), 20.0))
        dratio = tl.where((diff >= -20.0) & (diff <= 20.0), ratio, 0.0)
    pg1 = -a * ratio
    pg2 = -a * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    l_tok = tl.maximum(pg1, pg2)
    clipped = pg2 > pg1
    dl = tl.where(clipped, 0.0, -a)
    lower = offs < 0  # all False
    if HAS_DUAL:
        pg3 = -a * dual_clip
        neg = a < 0
        lower = neg & (l_tok > pg3)
        tie = tl.where(l_tok < pg3, 1.0, tl.where(l_tok == pg3, 0.5, 0.0))
        dl = tl.where(neg, dl * tie, dl)
        l_tok = tl.where(neg, tl.minimum(l_tok, pg3), l_tok)
    if HAS_W:
        wt = tl.load(w_ptr + offs, mask=agent, other=0.0).to(tl.float64)
        l_tok = l_tok * wt
        dl = dl * wt
    if AGG == 0:
        c = tl.full([BLOCK], 1.0, tl.float64) * inv_tok
    elif AGG == 1:
        c = tl.full([BLOCK], 1.0, tl.float64)
    elif AGG == 2:
        c = inv_step / (n_s + 1e-8)
    elif AGG == 3:
        c = tl.full([BLOCK], 1.0, tl.float64) * inv_step
    else:
        c = tl.full([BLOCK], 1.0, tl.float64) * (inv_step * inv_norm)
    c = tl.where(agent, c, 0.0)
    g = c * dl * dratio
    kl = tl.zeros([BLOCK], dtype=tl.float64)
    if HAS_REF:
        r = tl.load(ref_ptr + offs, mask=agent, other=0.0).to(tl.float64)
        d = x - r
        if KL == 0:
            kl = d
            dkl = tl.full([BLOCK], 1.0, tl.float64)
        elif KL == 1:
            kl = tl.abs(d)
            dkl = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        elif KL == 2:
            kl = 0.5 * d * d
            dkl = d
        else:
            xr = r - x
            xc = tl.minimum(tl.maximum(xr, -20.0), 20.0)
            raw = tl.exp(xc) - xc - 1.0
            kl = tl.minimum(tl.maximum(raw, -10.0), 10.0)
            inside = (xr >= -20.0) & (xr <= 20.0) & (raw >= -10.0) & (raw <= 10.0)
            dkl = tl.where(inside, -(tl.exp(xc) - 1.0), 0.0)
        g = g + kl_coef * c * dkl
        kl = tl.where(agent, kl, 0.0)
    h = tl.zeros([BLOCK], dtype=tl.float64)
    if HAS_ENT:
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
    tl.store(base + 9, tl.min(tl.where(agent, ratio, float("inf")), 0))
    tl.store(base + 10, tl.max(tl.where(agent, ratio, float("-inf")), 0))


def _step_stats(logp, old, token_step, num_steps):
    """(mean log-ratio (S,), token count (S,)) in float64, without atomics on floats."""
    ts = token_step.long()
    counts = torch.bincount(ts.clamp(min=-1) + 1, minlength=num_steps + 1)[1:].double()
    order = torch.argsort(ts, stable=True)
    diff = torch.where(ts >= 0, logp.double() - old.double(), torch.zeros((), dtype=torch.float64,
                                                                           device=logp.device))[order]
    prefix = torch.zeros(diff.numel() + 1, dtype=torch.float64, device=logp.device)
    torch.cumsum(diff, 0, out=prefix[1:])
    # Steps are sorted after the off-step tokens: step s spans [off + start_s, off + start_s + n_s).
    n_off = (ts < 0).sum()
    ends = torch.cumsum(counts, 0).long() + n_off
    starts = ends - counts.long()
    sums = prefix[ends] - prefix[starts]
    return sums / counts.clamp(min=1.0), counts


def policy_loss(logp, old_logp, advantages, token_step, weights, entropy, ref_logp, num_steps, ratio_level, clip_low,
                clip_high, dual_clip, agg_mode, entropy_coef, kl_coef, kl_type, global_num_tokens, global_num_steps,
                norm_constant):
    """(loss, metrics (9,), grad_logp, grad_entropy) as the registry's policy_loss op returns them."""
    dev = logp.device
    n = logp.shape[0]
    dt = torch.float64 if torch.float64 in (logp.dtype, old_logp.dtype, advantages.dtype) else torch.float32
    step_l, step_n = _step_stats(logp, old_logp, token_step, num_steps)
    n_tok = (token_step >= 0).sum().double()
    s_prime = (step_n > 0).sum().double()
    tok_div = (n_tok if global_num_tokens is None else torch.tensor(float(global_num_tokens), device=dev,
                                                                    dtype=torch.float64)).clamp(min=1.0)
    step_div = (s_prime if global_num_steps is None else torch.tensor(float(global_num_steps), device=dev,
                                                                     dtype=torch.float64)).clamp(min=1.0)
    norm = torch.tensor(1.0 / float(norm_constant) if norm_constant is not None else 1.0, device=dev,
                        dtype=torch.float64)
    scal = torch.stack([1.0 / tok_div, 1.0 / step_div, norm]).contiguous()
    g_lp = torch.empty(n, dtype=logp.dtype, device=dev)
    g_ent = torch.empty(n, dtype=entropy.dtype, device=dev) if entropy is not None else logp.new_empty(0)
    blocks = max(1, triton.cdiv(n, BLOCK))
    parts = torch.empty(blocks, N_PARTIALS, dtype=torch.float64, device=dev)
    dummy = logp
    if n:
        _policy_loss_kernel[(blocks,)](
            logp.contiguous(), old_logp.contiguous(), advantages.contiguous(), token_step.contiguous(),
            weights.contiguous() if weights is not None else dummy,
            entropy.contiguous() if entropy is not None else dummy,
            ref_logp.contiguous() if ref_logp is not None else dummy,
            step_l.contiguous(), step_n.contiguous(), scal, g_lp, g_ent if entropy is not None else g_lp, parts,
            n, float(clip_low), float(clip_high), float(dual_clip) if dual_clip is not None else 0.0,
            float(entropy_coef), float(kl_coef),
            STEP=ratio_level == "step", AGG=AGG_CODES[agg_mode], KL=KL_CODES[kl_type], HAS_DUAL=dual_clip is not None,
            HAS_W=weights is not None, HAS_ENT=entropy is not None, HAS_REF=ref_logp is not None, BLOCK=BLOCK,
            num_warps=4,
        )
    else:
        parts.zero_()
        parts[:, 9] = float("inf")
        parts[:, 10] = float("-inf")
    tot = parts[:, :9].sum(0)
    r_min, r_max = parts[:, 9].min(), parts[:, 10].max()
    pg, ent_term, kl_term = tot[0], tot[1], tot[2]
    loss = pg
    if entropy is not None and entropy_coef != 0.0:
        loss = loss - entropy_coef * ent_term
    if ref_logp is not None and kl_coef != 0.0:
        loss = loss + kl_coef * kl_term
    cnt = n_tok.clamp(min=1.0)
    has = n_tok > 0
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    metrics = torch.stack([
        pg, tot[3] / cnt, tot[4] / cnt, tot[5] / cnt, tot[6] / cnt, torch.where(has, r_min, zero),
        torch.where(has, r_max, zero), tot[7] / cnt if entropy is not None else zero,
        tot[8] / cnt if ref_logp is not None else zero])
    return loss.to(dt), metrics.to(dt), g_lp, g_ent
