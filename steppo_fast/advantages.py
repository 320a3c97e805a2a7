"""Credit assignment over a StepLayout (SPEC sections 3-6).

:func:`compute` is the one front for every estimator; it composes the registry's ops
(``steppo_fast.ops``) and never re-implements a formula. No host synchronisation
happens here: the layout already holds its sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import ops
from . import reference as ref
from .ops import _guards
from .layout import StepLayout, _flat_tokens

ESTIMATORS = ("step_gae", "token_gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gigpo")


@dataclass
class Advantages:
    """Result of :func:`compute`.

    token_advantages, token_returns: shaped like the layout's token tensors (B, T),
        0 on non-agent tokens.
    step_advantages, step_returns: (S,), or None for token-level estimators
        (token_gae, reinforce_pp), whose advantages vary within a step.
    """

    token_advantages: Tensor
    token_returns: Tensor
    step_advantages: Optional[Tensor]
    step_returns: Optional[Tensor]


def _check_float(name: str, t: Tensor, shape, device) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the layout is on {device}")
    return t


def _check_layout(where: str, layout) -> StepLayout:
    if not isinstance(layout, StepLayout):
        raise TypeError(f"{where}: layout must be a StepLayout, got {type(layout).__name__}")
    return layout


def step_rewards(layout: StepLayout, token_rewards: Tensor, backend: str = "auto") -> Tensor:
    """(S,) step rewards: the sum of each step's agent-token rewards (SPEC 3).

    Args:
        token_rewards: (B, T) or (N,) float on the layout's device.
    """
    _check_layout("step_rewards", layout)
    r = _flat_tokens("token_rewards", token_rewards, layout)
    if not r.is_floating_point():
        raise TypeError(f"token_rewards must be a float tensor, got {r.dtype}")
    return ops.step_rewards(r, layout.token_step, layout.step_tokens, layout.step_token_offsets, backend)


def trajectory_scores(layout: StepLayout, step_rewards: Tensor, backend: str = "auto") -> Tensor:
    """(R,) trajectory scores G = sum_k r_k (a segment sum over each trajectory's steps)."""
    _check_layout("trajectory_scores", layout)
    _check_float("step_rewards", step_rewards, (layout.num_steps,), layout.device)
    steps = torch.arange(layout.num_steps, device=layout.device, dtype=torch.int64)
    step_traj32 = layout.step_traj.to(torch.int32)
    return ops.step_rewards(step_rewards, step_traj32, steps, layout.traj_step_offsets, backend)


def token_rewards_from_steps(layout: StepLayout, step_rewards: Tensor) -> Tensor:
    """(N,) token rewards with each step's reward on its last agent token (StepPO's convention).

    Steps without agent tokens have no token to carry their reward; token-level
    estimators therefore ignore those rewards.
    """
    _check_layout("token_rewards_from_steps", layout)
    _check_float("step_rewards", step_rewards, (layout.num_steps,), layout.device)
    out = torch.zeros(layout.num_tokens, dtype=step_rewards.dtype, device=step_rewards.device)
    if layout.num_active_tokens == 0:
        return out
    last = (layout.step_token_offsets[1:] - 1).clamp(min=0)
    has = layout.step_num_tokens > 0
    idx = layout.step_tokens[last]
    vals = torch.where(has, step_rewards, torch.zeros_like(step_rewards))
    # Token-less steps point at a token of another step: add 0 there (index_put with accumulate).
    return out.index_put_((idx,), vals, accumulate=True)


def compute(
    estimator: str,
    layout: StepLayout,
    token_rewards: Optional[Tensor] = None,
    step_rewards: Optional[Tensor] = None,
    values: Optional[Tensor] = None,
    step_values: Optional[Tensor] = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    whiten: bool = True,
    norm_by_std: bool = True,
    anchor_keys: Optional[Tensor] = None,
    step_weight: float = 1.0,
    gigpo_mode: str = "mean_norm",
    process_group=None,
    backend: str = "auto",
) -> Advantages:
    """Advantages and returns of one estimator (SPEC 4-6) for a batch described by ``layout``.

    Args:
        estimator: one of ``ESTIMATORS``.
        layout: the batch's StepLayout.
        token_rewards: (B, T) or (N,) float; or give ``step_rewards`` (S,) instead.
        values: (B, T) or (N,) token-aligned critic values (verl's convention); step
            estimators read V_k at each step's first agent token. ``step_values`` (S,)
            gives them directly. Needed by step_gae and token_gae (token values only).
        gamma, lam: discount and GAE lambda, finite, in [0, 1].
        whiten: whiten step_gae / token_gae advantages (SPEC 4, 5).
        norm_by_std: grpo divides by the group std (False: Dr. GRPO).
        anchor_keys: (S,) integer anchor-state key of each step (gigpo).
        step_weight, gigpo_mode: GiGPO's w (finite) and "mean_norm" / "mean_std_norm".
        process_group: whiten with statistics all-reduced over this group (True: default group).
    Returns:
        :class:`Advantages`; token tensors have the layout's (B, T) shape.
    """
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    where = "compute_advantages"
    _check_layout(where, layout)
    gamma = _guards.number(where, "gamma", gamma, 0.0, 1.0)
    lam = _guards.number(where, "lam", lam, 0.0, 1.0)
    step_weight = _guards.number(where, "step_weight", step_weight)
    whiten = _guards.flag(where, "whiten", whiten)
    norm_by_std = _guards.flag(where, "norm_by_std", norm_by_std)
    if (token_rewards is None) == (step_rewards is None):
        raise ValueError("give exactly one of token_rewards (B, T) and step_rewards (S,)")
    dev = layout.device
    N, S = layout.num_tokens, layout.num_steps
    if token_rewards is not None:
        tok_r = _flat_tokens("token_rewards", token_rewards, layout)
        _check_float("token_rewards", tok_r, (N,), dev)
        # Token-level estimators read the token rewards themselves; the others need step sums.
        st_r = None
        if estimator not in ("token_gae", "reinforce_pp"):
            st_r = ops.step_rewards(tok_r, layout.token_step, layout.step_tokens, layout.step_token_offsets, backend)
    else:
        st_r = _check_float("step_rewards", step_rewards, (S,), dev)
        tok_r = None
    mask = layout.token_mask
    shape = layout.token_shape

    def tokens(x: Tensor) -> Tensor:
        return x.reshape(shape)

    def bcast(x: Tensor) -> Tensor:
        return tokens(ops.broadcast_to_tokens(x, layout.token_step, backend))

    if estimator == "step_gae":
        if step_values is not None:
            v = _check_float("step_values", step_values, (S,), dev)
        elif values is not None:
            v = layout.step_values_from_tokens(_check_float("values", _flat_tokens("values", values, layout), (N,), dev))
        else:
            raise ValueError("step_gae needs values (B, T) or step_values (S,)")
        adv, ret = ops.step_gae(st_r, v, layout.traj_step_offsets, gamma, lam, backend)
        if whiten:
            adv = ops.whiten(adv, None, "step", process_group, backend)
        return Advantages(bcast(adv), bcast(ret), adv, ret)

    if estimator in ("token_gae", "reinforce_pp"):
        if tok_r is None:
            tok_r = token_rewards_from_steps(layout, st_r)
        if estimator == "token_gae":
            if values is None:
                raise ValueError("token_gae needs token-aligned values (B, T)")
            tv = _check_float("values", _flat_tokens("values", values, layout), (N,), dev)
            g, l = gamma, lam
        else:
            tv, g, l = torch.zeros_like(tok_r), gamma, 1.0
        adv, ret = ops.token_gae(tok_r, tv, layout.step_tokens, layout.step_token_offsets, layout.traj_step_offsets,
                                 g, l, backend)
        if whiten or estimator == "reinforce_pp":
            adv = ops.whiten(adv, mask, "token", process_group, backend)
        if estimator == "reinforce_pp":
            ret = adv
        return Advantages(tokens(adv), tokens(ret), None, None)

    scores = trajectory_scores(layout, st_r, backend)
    if estimator in ("grpo", "rloo", "reinforce_pp_baseline"):
        norm = {"grpo": "mean_std" if norm_by_std else "mean", "rloo": "rloo", "reinforce_pp_baseline": "mean"}[estimator]
        a_traj = ops.group_advantage(scores, layout.traj_group, None, norm, "unit", ref.GROUP_EPS, backend)
        a_step = a_traj[layout.step_traj]
        a_tok = bcast(a_step)
        if estimator == "reinforce_pp_baseline":
            a_tok = tokens(ops.whiten(a_tok.reshape(-1), mask, "token", process_group, backend))
            return Advantages(a_tok, a_tok, None, None)
        return Advantages(a_tok, a_tok, a_step, a_step)

    # gigpo
    if anchor_keys is None:
        raise ValueError("gigpo needs anchor_keys (S,): an integer key of each step's anchor state")
    if not isinstance(anchor_keys, Tensor) or anchor_keys.is_floating_point() or anchor_keys.shape != (S,):
        raise ValueError(f"anchor_keys must be an integer tensor of shape ({S},)")
    if anchor_keys.device != dev:
        raise ValueError(f"anchor_keys is on {anchor_keys.device} but the layout is on {dev}")
    if gigpo_mode not in ref.GIGPO_MODES:
        raise ValueError(f"gigpo_mode must be one of {ref.GIGPO_MODES}, got {gigpo_mode!r}")
    norm = "mean_std" if gigpo_mode == "mean_std_norm" else "mean"
    a_e = ops.group_advantage(scores, layout.traj_group, None, norm, "unit", ref.GROUP_EPS, backend)
    d, _ = ops.step_gae(st_r, torch.zeros_like(st_r), layout.traj_step_offsets, gamma, 1.0, backend)
    a_s = ops.group_advantage(d, layout.step_group, anchor_keys.to(torch.int64), norm, "zero", ref.GROUP_EPS, backend)
    a_step = a_e[layout.step_traj] + step_weight * a_s
    a_tok = bcast(a_step)
    return Advantages(a_tok, a_tok, a_step, a_step)
