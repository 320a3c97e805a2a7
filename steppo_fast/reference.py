"""Every formula of SPEC sections 2-8 in plain PyTorch: the oracle and the CPU fallback.

Conventions:

* Inputs are flat token tensors (N,) and the pieces of a :class:`~steppo_fast.layout.StepLayout`
  they need, so each kernel backend has the same signature as its reference here.
* Arithmetic runs in float32, or in float64 when any float input is float64: pass
  float64 inputs (see :func:`to_fp64`) to get the fp64 oracle. Sums over many tokens (step
  sums, aggregations, means, whitening moments) accumulate in float64 in either case, as the
  kernels do, so that the float32 results keep SPEC 9's bound on steps of any length.
* Non-agent tokens (``token_step == -1`` or ``mask == False``) get 0 in every token output.
* Readability wins over speed, but no function loops over rows or tokens in Python;
  the recurrences loop over the step (or token) position, vectorised over trajectories.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

Tensor = torch.Tensor

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "abs", "k2", "k3", "low_var_kl")
RATIO_LEVELS = ("token", "step")
GIGPO_MODES = ("mean_std_norm", "mean_norm")

WHITEN_STEP_EPS = 1e-8  # added to the std (SPEC 4)
WHITEN_TOKEN_EPS = 1e-8  # added to the variance under rsqrt (SPEC 5, verl's masked_whiten)
GROUP_EPS = 1e-6  # GRPO / GiGPO std epsilon (SPEC 6)


# --------------------------------------------------------------------- helpers
def acc_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float64 if any float input is float64, else float32."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def to_fp64(*tensors: Optional[Tensor]):
    """Float tensors as float64 (others unchanged): inputs for the fp64 oracle."""
    out = tuple(t.double() if t is not None and t.is_floating_point() else t for t in tensors)
    return out[0] if len(out) == 1 else out


def _index_sum64(values: Tensor, index: Tensor, size: int) -> Tensor:
    """out[i] = sum of values[j] with index[j] == i (index >= 0 only), accumulated and returned in
    float64 (float inputs; others in their own dtype)."""
    acc = torch.float64 if values.is_floating_point() else values.dtype
    out = torch.zeros(size, dtype=acc, device=values.device)
    if size == 0 or values.numel() == 0:
        return out
    # No boolean indexing (it would synchronise with the host): off-step entries add 0 to row 0.
    keep = index >= 0
    vals = torch.where(keep, values.to(acc), torch.zeros((), dtype=acc, device=values.device))
    return out.index_add_(0, index.clamp(min=0).long(), vals)


def _index_sum(values: Tensor, index: Tensor, size: int) -> Tensor:
    """:func:`_index_sum64` rounded to values' dtype."""
    return _index_sum64(values, index, size).to(values.dtype)


def _sum64(x: Tensor) -> Tensor:
    """Sum of all entries, accumulated in float64, in x's dtype."""
    return x.sum(dtype=torch.float64).to(x.dtype)


def _padded(offsets: Tensor) -> Tuple[Tensor, Tensor]:
    """For CSR offsets (R+1,): (R, Lmax) positions into the flat array and their validity."""
    counts = offsets[1:] - offsets[:-1]
    lmax = int(counts.max()) if counts.numel() else 0
    ar = torch.arange(lmax, device=offsets.device)
    pos = offsets[:-1, None] + ar[None, :]
    valid = ar[None, :] < counts[:, None]
    return torch.where(valid, pos, torch.zeros_like(pos)), valid


def _discounted_backward(delta: Tensor, valid: Tensor, discount: float) -> Tensor:
    """A[:, j] = delta[:, j] + discount * A[:, j+1] over valid positions, 0 after the last."""
    out = torch.zeros_like(delta)
    nxt = torch.zeros(delta.shape[0], dtype=delta.dtype, device=delta.device)
    for j in range(delta.shape[1] - 1, -1, -1):
        cur = delta[:, j] + discount * nxt
        cur = torch.where(valid[:, j], cur, torch.zeros_like(cur))
        out[:, j] = cur
        nxt = cur
    return out


# ----------------------------------------------------- SPEC 2: log-probs, entropy
def token_logprob_stats(logits: Tensor, labels: Tensor, mask: Optional[Tensor] = None,
                        temperature: float = 1.0) -> Tuple[Tensor, Tensor, Tensor]:
    """(logp, entropy, lse) of every row of logits (N, V); 0 on masked-out rows.

    u = z / tau, lse = logsumexp(u), logp = u_y - lse, H = lse - sum_v softmax(u)_v u_v.
    """
    dt = acc_dtype(logits)
    u = logits.to(dt) / temperature
    n = u.shape[0]
    m = torch.ones(n, dtype=torch.bool, device=u.device) if mask is None else mask.bool()
    y = torch.where(m, labels.long(), torch.zeros_like(labels, dtype=torch.long))
    lse = torch.logsumexp(u, dim=-1)
    logp = u.gather(-1, y[:, None]).squeeze(-1) - lse
    p = torch.softmax(u, dim=-1)
    # p u is 0 where p is 0 (a -inf logit, as in a padded vocabulary), not 0 * -inf.
    ent = lse - torch.where(p > 0, p * u, torch.zeros_like(p)).sum(-1)
    zero = torch.zeros((), dtype=dt, device=u.device)
    return torch.where(m, logp, zero), torch.where(m, ent, zero), torch.where(m, lse, zero)


def token_logprobs(logits: Tensor, labels: Tensor, mask: Optional[Tensor] = None,
                   temperature: float = 1.0) -> Tuple[Tensor, Tensor]:
    """(logp, entropy), each (N,), of logits (N, V) at labels (N,) (SPEC 2)."""
    logp, ent, _ = token_logprob_stats(logits, labels, mask, temperature)
    return logp, ent


def token_logprobs_backward(logits: Tensor, labels: Tensor, mask: Optional[Tensor], grad_logp: Optional[Tensor],
                            grad_entropy: Optional[Tensor], temperature: float = 1.0) -> Tensor:
    """dL/dz (N, V) in the accumulation dtype (SPEC 2):

    dL/dz_v = (g_logp (1[v = y] - p_v) - g_H p_v (log p_v + H)) / tau, 0 on masked-out rows.
    """
    dt = acc_dtype(logits)
    u = logits.to(dt) / temperature
    n, v = u.shape
    m = torch.ones(n, dtype=torch.bool, device=u.device) if mask is None else mask.bool()
    y = torch.where(m, labels.long(), torch.zeros_like(labels, dtype=torch.long))
    logp_all = torch.log_softmax(u, dim=-1)
    p = logp_all.exp()
    grad = torch.zeros_like(u)
    if grad_logp is not None:
        onehot = torch.zeros_like(u).scatter_(1, y[:, None], 1.0)
        grad = grad + grad_logp.to(dt)[:, None] * (onehot - p)
    if grad_entropy is not None:
        # p log p is 0 where p underflows to 0 (log p = -inf): keep it finite.
        ent = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)
        term = torch.where(p > 0, p * (logp_all + ent[:, None]), torch.zeros_like(p))
        grad = grad - grad_entropy.to(dt)[:, None] * term
    grad = grad / temperature
    return torch.where(m[:, None], grad, torch.zeros_like(grad))


def linear_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """z = h W^T (+ b) in the accumulation dtype; h (N, H), W (V, H), b (V,)."""
    dt = acc_dtype(hidden, weight, bias)
    z = hidden.to(dt) @ weight.to(dt).T
    return z if bias is None else z + bias.to(dt)


def linear_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Optional[Tensor] = None,
                          temperature: float = 1.0, bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(logp, entropy) from hidden states and the lm_head weight (SPEC 2)."""
    return token_logprobs(linear_logits(hidden, weight, bias), labels, mask, temperature)


def linear_token_logprobs_backward(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Optional[Tensor],
                                   grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                                   temperature: float = 1.0, bias: Optional[Tensor] = None):
    """(grad_hidden, grad_weight, grad_bias or None): G W, G^T h, sum of G over rows."""
    z = linear_logits(hidden, weight, bias)
    g = token_logprobs_backward(z, labels, mask, grad_logp, grad_entropy, temperature)
    dt = g.dtype
    grad_h = g @ weight.to(dt)
    grad_w = g.T @ hidden.to(dt)
    grad_b = g.sum(0) if bias is not None else None
    return grad_h, grad_w, grad_b


# ------------------------------------------------------------ SPEC 3: rewards
def step_rewards(token_rewards: Tensor, token_step: Tensor, num_steps: int) -> Tensor:
    """r_s = sum of token rewards over step s's agent tokens; (S,)."""
    return _index_sum(token_rewards.to(acc_dtype(token_rewards)), token_step, num_steps)


def broadcast_to_tokens(step_values: Tensor, token_step: Tensor) -> Tensor:
    """out[t] = step_values[token_step[t]] on agent tokens, 0 elsewhere; (N,)."""
    idx = token_step.long().clamp(min=0)
    if step_values.numel() == 0:
        return torch.zeros(token_step.shape, dtype=step_values.dtype, device=step_values.device)
    out = step_values[idx]
    return torch.where(token_step >= 0, out, torch.zeros_like(out))


# ----------------------------------------------------------- SPEC 4: step GAE
def step_gae(step_rewards: Tensor, step_values: Tensor, traj_step_offsets: Tensor, gamma: float = 1.0,
             lam: float = 1.0) -> Tuple[Tensor, Tensor]:
    """Step-level GAE per trajectory, unwhitened: (A, R), each (S,).

    delta_k = r_k + gamma V_{k+1} - V_k (V_K = 0); A_k = delta_k + gamma lam A_{k+1}; R_k = A_k + V_k.
    """
    dt = acc_dtype(step_rewards, step_values)
    r, v = step_rewards.to(dt), step_values.to(dt)
    pos, valid = _padded(traj_step_offsets)
    if pos.numel() == 0:
        return torch.zeros_like(r), v.clone()
    zero = torch.zeros((), dtype=dt, device=r.device)
    rp = torch.where(valid, r[pos], zero)
    vp = torch.where(valid, v[pos], zero)
    v_next = torch.cat([vp[:, 1:], torch.zeros_like(vp[:, :1])], dim=1)  # 0 past the last step
    delta = rp + gamma * v_next - vp
    adv_p = _discounted_backward(delta, valid, gamma * lam)
    adv = torch.zeros_like(r)
    adv[pos[valid]] = adv_p[valid]
    return adv, adv + v


def whiten_steps(x: Tensor) -> Tensor:
    """(x - mean) / (std + 1e-8) over all S entries, unbiased std; S < 2 takes std = 0."""
    dt = acc_dtype(x)
    x = x.to(dt)
    if x.numel() == 0:
        return x.clone()
    x64 = x.double()
    mean = x64.mean()
    std = x64.std(unbiased=True) if x.numel() >= 2 else torch.zeros((), dtype=torch.float64, device=x.device)
    return ((x64 - mean) / (std + WHITEN_STEP_EPS)).to(dt)


def whiten_tokens(x: Tensor, mask: Tensor) -> Tensor:
    """verl's masked_whiten over agent tokens: (x - mean) * rsqrt(var_unbiased + 1e-8).

    Fewer than 2 agent tokens take var = 0. Non-agent tokens are set to 0.
    """
    dt = acc_dtype(x)
    x = x.to(dt)
    m = mask.bool()
    n = int(m.sum())
    zero = torch.zeros((), dtype=dt, device=x.device)
    if n == 0:
        return torch.zeros_like(x)
    sel = x[m].double()
    mean = sel.mean()
    var = sel.var(unbiased=True) if n >= 2 else torch.zeros((), dtype=torch.float64, device=x.device)
    return torch.where(m, ((x.double() - mean) * torch.rsqrt(var + WHITEN_TOKEN_EPS)).to(dt), zero)


# ---------------------------------------------------------- SPEC 5: token GAE
def token_gae(token_rewards: Tensor, token_values: Tensor, step_tokens: Tensor, step_token_offsets: Tensor,
              traj_step_offsets: Tensor, gamma: float = 1.0, lam: float = 1.0) -> Tuple[Tensor, Tensor]:
    """Token-level GAE over each trajectory's agent tokens in time order, across steps.

    Returns unwhitened (A, R), each (N,), 0 on non-agent tokens.
    """
    dt = acc_dtype(token_rewards, token_values)
    r, v = token_rewards.to(dt), token_values.to(dt)
    traj_tok_offsets = step_token_offsets[traj_step_offsets]
    slot, valid = _padded(traj_tok_offsets)
    adv = torch.zeros_like(r)
    if slot.numel() == 0:
        return adv, adv.clone()
    zero = torch.zeros((), dtype=dt, device=r.device)
    tok = step_tokens[slot] if step_tokens.numel() else torch.zeros_like(slot)
    rp = torch.where(valid, r[tok], zero)
    vp = torch.where(valid, v[tok], zero)
    v_next = torch.cat([vp[:, 1:], torch.zeros_like(vp[:, :1])], dim=1)
    delta = rp + gamma * v_next - vp
    adv_p = _discounted_backward(delta, valid, gamma * lam)
    adv[tok[valid]] = adv_p[valid]
    ret = torch.zeros_like(r)
    ret[tok[valid]] = adv_p[valid] + vp[valid]
    return adv, ret


# ------------------------------------------- SPEC 6: trajectory-level estimators
def trajectory_scores(step_rewards: Tensor, step_traj: Tensor, num_trajectories: int) -> Tensor:
    """G_r = sum_k r_k; (R,)."""
    return _index_sum(step_rewards.to(acc_dtype(step_rewards)), step_traj, num_trajectories)


def _group_stats(x: Tensor, group: Tensor):
    """Per element: group size n, group mean, unbiased group std (0 when n < 2)."""
    ng = int(group.max()) + 1 if group.numel() else 0
    cnt = torch.zeros(ng, dtype=x.dtype, device=x.device).index_add_(0, group, torch.ones_like(x))
    tot = torch.zeros(ng, dtype=x.dtype, device=x.device).index_add_(0, group, x)
    mean = tot / cnt.clamp(min=1)
    dev2 = torch.zeros(ng, dtype=x.dtype, device=x.device).index_add_(0, group, (x - mean[group]) ** 2)
    std = torch.where(cnt > 1, (dev2 / (cnt - 1).clamp(min=1)).sqrt(), torch.zeros_like(cnt))
    return cnt[group], mean[group], std[group]


def group_normalize(x: Tensor, group: Tensor, norm: str = "mean_std", singleton: str = "unit",
                    eps: float = GROUP_EPS) -> Tensor:
    """Normalises x within groups of equal ``group`` id (SPEC 6).

    norm: "mean_std" (x - mean) / (std + eps), unbiased std; "mean" x - mean;
    "rloo" (n x - sum) / (n - 1). A group of one is read as mean 0, std 1
    (``singleton="unit"``: GRPO, RLOO) or gives 0 (``"zero"``: GiGPO step groups).
    """
    dt = acc_dtype(x)
    if x.numel() == 0:
        return x.to(dt).clone()
    x = x.double()  # group sums in float64, the result in dt
    n, mean, std = _group_stats(x, group)
    if norm == "mean_std":
        out, single_out = (x - mean) / (std + eps), x / (1.0 + eps)
    elif norm == "mean":
        out, single_out = x - mean, x
    elif norm == "rloo":
        out, single_out = n * (x - mean) / (n - 1).clamp(min=1), x
    else:
        raise ValueError(f"norm must be one of ('mean_std', 'mean', 'rloo'), got {norm!r}")
    if singleton == "zero":
        single_out = torch.zeros_like(x)
    return torch.where(n < 2, single_out, out).to(dt)


def grpo(scores: Tensor, traj_group: Tensor, norm_by_std: bool = True, eps: float = GROUP_EPS) -> Tensor:
    """GRPO per trajectory: (G - mean) / (std + eps), or G - mean (Dr. GRPO); groups of one: mean 0, std 1."""
    return group_normalize(scores, traj_group, "mean_std" if norm_by_std else "mean", "unit", eps)


def rloo(scores: Tensor, traj_group: Tensor) -> Tensor:
    """RLOO per trajectory: (n G - sum_group G) / (n - 1); groups of one: G."""
    return group_normalize(scores, traj_group, "rloo", "unit")


def reinforce_pp_baseline(scores: Tensor, traj_group: Tensor, step_traj: Tensor, token_step: Tensor) -> Tensor:
    """REINFORCE++ with baseline: A = G - group mean (groups of one: mean 0), broadcast to
    agent tokens, then token whitening. Returns (N,)."""
    a_traj = grpo(scores, traj_group, norm_by_std=False)
    a_tok = broadcast_to_tokens(a_traj[step_traj], token_step)
    return whiten_tokens(a_tok, token_step >= 0)


def reinforce_pp(token_rewards: Tensor, step_tokens: Tensor, step_token_offsets: Tensor,
                 traj_step_offsets: Tensor, token_step: Tensor, gamma: float = 1.0) -> Tensor:
    """REINFORCE++: discounted reward-to-go over the trajectory's agent tokens
    (token GAE with V = 0, lambda = 1), then token whitening. Returns (N,)."""
    zeros = torch.zeros_like(token_rewards, dtype=acc_dtype(token_rewards))
    adv, _ = token_gae(token_rewards, zeros, step_tokens, step_token_offsets, traj_step_offsets, gamma, 1.0)
    return whiten_tokens(adv, token_step >= 0)


def discounted_step_returns(step_rewards: Tensor, traj_step_offsets: Tensor, gamma: float = 1.0) -> Tensor:
    """D_k = sum_{j >= k} gamma^(j-k) r_j within each trajectory; (S,)."""
    zeros = torch.zeros_like(step_rewards, dtype=acc_dtype(step_rewards))
    d, _ = step_gae(step_rewards, zeros, traj_step_offsets, gamma, 1.0)
    return d


def gigpo(step_rewards: Tensor, step_traj: Tensor, traj_step_offsets: Tensor, traj_group: Tensor,
          anchor_keys: Tensor, gamma: float = 1.0, step_weight: float = 1.0, mode: str = "mean_norm",
          eps: float = GROUP_EPS) -> Tensor:
    """GiGPO step advantages A_s = A_E + w A_S; (S,).

    A_E: episode score normalised within the group (groups of one: mean 0, std 1).
    A_S: discounted step return D normalised within step groups = steps sharing
    (group, anchor key); a step group of one gives 0. ``mode``: "mean_std_norm"
    divides by (std + eps), "mean_norm" only subtracts the mean.
    """
    if mode not in GIGPO_MODES:
        raise ValueError(f"mode must be one of {GIGPO_MODES}, got {mode!r}")
    use_std = mode == "mean_std_norm"
    R = traj_group.numel()
    scores = trajectory_scores(step_rewards, step_traj, R)
    a_e = grpo(scores, traj_group, norm_by_std=use_std, eps=eps)
    d = discounted_step_returns(step_rewards, traj_step_offsets, gamma)
    if d.numel() == 0:
        return d
    pairs = torch.stack([traj_group[step_traj], anchor_keys.to(torch.int64)], dim=1)
    _, step_group = torch.unique(pairs, dim=0, return_inverse=True)
    a_s = group_normalize(d, step_group, "mean_std" if use_std else "mean", "zero", eps)
    return a_e[step_traj] + step_weight * a_s


# ---------------------------------------------------------- SPEC 7: policy loss
def kl_penalty(logp: Tensor, ref_logp: Tensor, kl_type: str = "k3") -> Tensor:
    """Per-token KL estimate between the current and the reference policy."""
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type must be one of {KL_TYPES}, got {kl_type!r}")
    d = logp - ref_logp
    if kl_type == "k1":
        return d
    if kl_type == "abs":
        return d.abs()
    if kl_type == "k2":
        return 0.5 * d * d
    x = torch.clamp(ref_logp - logp, -20.0, 20.0)
    return torch.clamp(torch.exp(x) - x - 1.0, -10.0, 10.0)


def aggregate(values: Tensor, token_step: Tensor, num_steps: int, agg_mode: str,
              global_num_tokens: Optional[float] = None, global_num_steps: Optional[float] = None,
              norm_constant: Optional[float] = None) -> Tensor:
    """Aggregates per-token values over agent tokens (SPEC 7 table); "sequence" = step.

    Empty batches give 0, never NaN: counts are clamped to at least 1.
    """
    if agg_mode not in AGG_MODES:
        raise ValueError(f"agg_mode must be one of {AGG_MODES}, got {agg_mode!r}")
    if agg_mode == "seq-mean-token-sum-norm" and norm_constant is None:
        raise ValueError("agg_mode 'seq-mean-token-sum-norm' needs norm_constant (verl's default: T)")
    m = token_step >= 0
    dt = values.dtype
    x = torch.where(m, values, torch.zeros_like(values)).double()  # sums in float64, result in dt
    if agg_mode == "token-sum":
        return x.sum().to(dt)
    if agg_mode == "token-mean":
        n_tok = m.sum().double() if global_num_tokens is None else torch.as_tensor(global_num_tokens,
                                                                                   dtype=torch.float64)
        return (x.sum() / n_tok.clamp(min=1)).to(dt)
    per_step = _index_sum64(x, token_step, num_steps)
    n_s = _index_sum64(m.double(), token_step, num_steps)
    has = n_s > 0
    s_prime = has.sum().double() if global_num_steps is None else torch.as_tensor(global_num_steps,
                                                                                  dtype=torch.float64)
    if agg_mode == "seq-mean-token-mean":
        per_step = per_step / (n_s + 1e-8)
    out = torch.where(has, per_step, torch.zeros_like(per_step)).sum() / s_prime.clamp(min=1)
    if agg_mode == "seq-mean-token-sum-norm":
        out = out / norm_constant
    return out.to(dt)


def _masked_mean(x: Tensor, m: Tensor) -> Tensor:
    """Mean of x over m, summed in float64, in x's dtype."""
    s = torch.where(m, x, torch.zeros_like(x)).sum(dtype=torch.float64)
    return (s / m.sum().clamp(min=1).double()).to(x.dtype)


def _log_ratios(logp, old_logp, advantages, token_step, num_steps, ratio_level):
    """Shared prologue of the loss and its gradient: upcast inputs, the agent-token mask,
    the masked log-ratio d_t and, at step level, l_s broadcast to the step's tokens."""
    dt = acc_dtype(logp, old_logp, advantages)
    lp, old, adv = logp.to(dt), old_logp.to(dt), advantages.to(dt)
    m = token_step >= 0
    diff = torch.where(m, lp - old, torch.zeros((), dtype=dt, device=lp.device))
    l_tok = None
    if ratio_level == "step":  # the step mean in float64, then rounded once
        n_s = _index_sum64(m.double(), token_step, num_steps)
        l_s = (_index_sum64(diff, token_step, num_steps) / n_s.clamp(min=1)).to(dt)
        l_tok = broadcast_to_tokens(l_s, token_step)
    return dt, lp, adv, m, diff, l_tok


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, token_step: Tensor, num_steps: int,
                ratio_level: str = "step", clip_low: float = 0.2, clip_high: float = 0.2,
                dual_clip: Optional[float] = None, agg_mode: str = "seq-mean-token-mean",
                weights: Optional[Tensor] = None, entropy: Optional[Tensor] = None, entropy_coef: float = 0.0,
                ref_logp: Optional[Tensor] = None, kl_coef: float = 0.0, kl_type: str = "k3",
                global_num_tokens: Optional[float] = None, global_num_steps: Optional[float] = None,
                norm_constant: Optional[float] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The clipped policy loss with step or token ratio (SPEC 7); differentiable in logp and entropy.

    All token tensors are (N,); ``token_step`` (N,) is the step of each agent token, -1 elsewhere.
    Returns (loss, metrics) with 0-dim metrics: pg_loss, pg_clipfrac, pg_clipfrac_lower,
    ppo_kl, ratio_mean, ratio_min, ratio_max, entropy, kl.
    """
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    dt, lp, adv, m, diff, l_tok = _log_ratios(logp, old_logp, advantages, token_step, num_steps, ratio_level)
    zero = torch.zeros((), dtype=dt, device=lp.device)
    if ratio_level == "token":
        ratio = torch.exp(torch.clamp(diff, -20.0, 20.0))
    else:
        ratio = torch.exp(torch.clamp(lp - lp.detach() + l_tok.detach(), max=10.0))
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss_tok = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    lower = torch.zeros_like(m)
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        lower = (loss_tok > pg3) & (adv < 0)
        loss_tok = torch.where(adv < 0, torch.minimum(loss_tok, pg3), loss_tok)
    if weights is not None:
        loss_tok = loss_tok * weights.to(dt)
    agg = dict(token_step=token_step, num_steps=num_steps, agg_mode=agg_mode, global_num_tokens=global_num_tokens,
               global_num_steps=global_num_steps, norm_constant=norm_constant)
    pg_loss = aggregate(loss_tok, **agg)
    loss = pg_loss
    ent_metric = zero
    if entropy is not None:
        ent = entropy.to(dt)
        ent_metric = _masked_mean(ent.detach(), m)
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * aggregate(ent, **agg)
    kl_metric = zero
    if ref_logp is not None:
        kl = kl_penalty(lp, ref_logp.to(dt), kl_type)
        kl_metric = _masked_mean(kl.detach(), m)
        if kl_coef != 0.0:
            loss = loss + kl_coef * aggregate(kl, **agg)
    r = ratio.detach()
    has_any = m.any()
    big = torch.tensor(float("inf"), dtype=dt, device=lp.device)
    metrics = {
        "pg_loss": pg_loss.detach(),
        "pg_clipfrac": _masked_mean(clipped.to(dt), m),
        "pg_clipfrac_lower": _masked_mean(lower.to(dt), m),
        "ppo_kl": _masked_mean(-diff.detach(), m),
        "ratio_mean": _masked_mean(r, m),
        "ratio_min": torch.where(has_any, torch.where(m, r, big).min(), zero) if r.numel() else zero,
        "ratio_max": torch.where(has_any, torch.where(m, r, -big).max(), zero) if r.numel() else zero,
        "entropy": ent_metric,
        "kl": kl_metric,
    }
    return loss, metrics


def aggregation_weights(token_step: Tensor, num_steps: int, agg_mode: str, dtype: torch.dtype,
                        global_num_tokens: Optional[float] = None, global_num_steps: Optional[float] = None,
                        norm_constant: Optional[float] = None) -> Tensor:
    """c_t with aggregate(x) = sum_t c_t x_t for the given mode: the gradient of the aggregation."""
    m = token_step >= 0
    ones = m.to(dtype)
    if agg_mode == "token-sum":
        return ones
    if agg_mode == "token-mean":
        n_tok = ones.sum() if global_num_tokens is None else torch.as_tensor(global_num_tokens, dtype=dtype)
        return ones / n_tok.clamp(min=1)
    n_s = _index_sum(ones, token_step, num_steps)
    s_prime = (n_s > 0).sum().to(dtype) if global_num_steps is None else torch.as_tensor(global_num_steps, dtype=dtype)
    c = ones / s_prime.clamp(min=1)
    if agg_mode == "seq-mean-token-mean":
        c = c / (broadcast_to_tokens(n_s, token_step) + 1e-8)
    if agg_mode == "seq-mean-token-sum-norm":
        c = c / norm_constant
    return torch.where(m, c, torch.zeros_like(c))


def _tie_weight(a: Tensor, b: Tensor) -> Tensor:
    """d min(a, b) / da as torch.minimum defines it: 1 if a < b, 1/2 on ties, else 0."""
    return torch.where(a < b, 1.0, torch.where(a == b, 0.5, 0.0)).to(a.dtype)


def policy_loss_grads(logp: Tensor, old_logp: Tensor, advantages: Tensor, token_step: Tensor, num_steps: int,
                      ratio_level: str = "step", clip_low: float = 0.2, clip_high: float = 0.2,
                      dual_clip: Optional[float] = None, agg_mode: str = "seq-mean-token-mean",
                      weights: Optional[Tensor] = None, entropy: Optional[Tensor] = None, entropy_coef: float = 0.0,
                      ref_logp: Optional[Tensor] = None, kl_coef: float = 0.0, kl_type: str = "k3",
                      global_num_tokens: Optional[float] = None, global_num_steps: Optional[float] = None,
                      norm_constant: Optional[float] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """(dloss/dlogp, dloss/dentropy) of :func:`policy_loss` in closed form, (N,) each.

    With c_t the aggregation weight of token t (``aggregation_weights``):

        dloss/dlogp_t = c_t [ w_t dL_t/drho_t drho_t/dlogp_t + beta dkl_t/dlogp_t ]
        dloss/dH_t    = -c_H c_t

    dL/drho = -A unless the clipped term is strictly larger (then 0); the dual clip
    passes it where L < -A c (half on a tie, as torch.minimum); drho/dlogp = rho where
    the log-ratio is inside its clamp (token: [-20, 20]; step: l_s <= 10), else 0.
    """
    dt, lp, adv, m, diff, l_tok = _log_ratios(logp, old_logp, advantages, token_step, num_steps, ratio_level)
    c = aggregation_weights(token_step, num_steps, agg_mode, dt, global_num_tokens, global_num_steps, norm_constant)
    g = policy_token_grads(lp, adv, diff, l_tok, c, ratio_level, clip_low, clip_high, dual_clip, weights, ref_logp,
                           kl_coef, kl_type)
    g_ent = None
    if entropy is not None:
        g_ent = -entropy_coef * c
    g = torch.where(m, g, torch.zeros((), dtype=dt, device=lp.device))
    return g, g_ent


def policy_token_grads(lp: Tensor, adv: Tensor, diff: Tensor, l_tok: Optional[Tensor], c: Tensor, ratio_level: str,
                       clip_low: float, clip_high: float, dual_clip: Optional[float], weights: Optional[Tensor],
                       ref_logp: Optional[Tensor], kl_coef: float, kl_type: str) -> Tensor:
    """dloss/dlogp_t of one token from quantities that are known token by token.

    lp, adv: the token's log-prob and advantage (accumulation dtype); diff = lp - old_logp;
    l_tok: the step's mean log-ratio on each of its tokens (step level) or None; c: the
    aggregation weight (``aggregation_weights``). The fused linear head calls this on chunks
    of whole steps, with c computed once for the whole batch.
    """
    dt = lp.dtype
    zero = torch.zeros((), dtype=dt, device=lp.device)
    if ratio_level == "token":
        ratio = torch.exp(torch.clamp(diff, -20.0, 20.0))
        dratio = ratio * ((diff >= -20.0) & (diff <= 20.0)).to(dt)
    else:
        ratio = torch.exp(torch.clamp(l_tok, max=10.0))
        dratio = ratio * (l_tok <= 10.0).to(dt)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    dl = torch.where(pg2 > pg1, zero, -adv)
    if dual_clip is not None:
        loss_tok = torch.maximum(pg1, pg2)
        dl = torch.where(adv < 0, dl * _tie_weight(loss_tok, -adv * dual_clip), dl)
    if weights is not None:
        dl = dl * weights.to(dt)
    g = c * dl * dratio
    if ref_logp is not None and kl_coef != 0.0:
        rl = ref_logp.to(dt)
        d = lp - rl
        if kl_type == "k1":
            dkl = torch.ones_like(d)
        elif kl_type == "abs":
            dkl = torch.sign(d)
        elif kl_type == "k2":
            dkl = d
        else:
            x_raw = rl - lp
            x = torch.clamp(x_raw, -20.0, 20.0)
            kl_raw = torch.exp(x) - x - 1.0
            inside = ((x_raw >= -20.0) & (x_raw <= 20.0) & (kl_raw >= -10.0) & (kl_raw <= 10.0)).to(dt)
            dkl = -(torch.exp(x) - 1.0) * inside
        g = g + kl_coef * c * dkl
    return g


def value_loss_grad(values: Tensor, old_values: Tensor, returns: Tensor, clip: float = 0.5,
                    mask: Optional[Tensor] = None) -> Tensor:
    """d value_loss / d values in closed form (ties of the max split evenly, as torch.maximum)."""
    dt = acc_dtype(values, old_values, returns)
    v, vo, ret = values.to(dt), old_values.to(dt), returns.to(dt)
    v_clip = vo + torch.clamp(v - vo, -clip, clip)
    l1, l2 = (v - ret) ** 2, (v_clip - ret) ** 2
    inside = ((v - vo >= -clip) & (v - vo <= clip)).to(dt)
    w1 = _tie_weight(-l1, -l2)  # d max(l1, l2) / d l1
    g = 0.5 * (w1 * 2 * (v - ret) + (1 - w1) * 2 * (v_clip - ret) * inside)
    m = torch.ones_like(v, dtype=torch.bool) if mask is None else mask.bool()
    return torch.where(m, g, torch.zeros_like(g)) / m.sum().clamp(min=1).to(dt)


# ----------------------------------------------------------- SPEC 8: value loss
def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float = 0.5,
               mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Clipped value loss per step, mean over (masked) steps: (loss, vf_clipfrac)."""
    dt = acc_dtype(values, old_values, returns)
    v, vo, ret = values.to(dt), old_values.to(dt), returns.to(dt)
    v_clip = vo + torch.clamp(v - vo, -clip, clip)
    l1 = (v - ret) ** 2
    l2 = (v_clip - ret) ** 2
    per = 0.5 * torch.maximum(l1, l2)
    m = torch.ones_like(v, dtype=torch.bool) if mask is None else mask.bool()
    return _masked_mean(per, m), _masked_mean((l2 > l1).to(dt), m)

