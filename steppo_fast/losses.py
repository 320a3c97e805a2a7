"""Policy and value losses over a StepLayout or a mask (SPEC sections 7-8).

The math lives once, in the registry's ``policy_loss`` / ``value_loss`` ops; these
fronts check arguments, map the layout (or a mask whose rows are steps) to per-token
step ids, and name the metrics. Nothing here synchronises with the host.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from . import ops
from . import reference as ref
from .layout import StepLayout

MaskOrLayout = Union[Tensor, StepLayout]


def token_steps(mask_or_layout: MaskOrLayout, shape) -> Tuple[Tensor, int, int]:
    """(token_step (N,), number of steps, T) for a layout or a mask.

    A 2-D mask (B, T) makes every row one step (verl's "sequence"); a 1-D mask (N,)
    is one step holding every masked-in token.
    """
    if isinstance(mask_or_layout, StepLayout):
        lay = mask_or_layout
        B, T = lay.token_shape
        if tuple(shape) not in ((B, T), (B * T,)):
            raise ValueError(f"logp must have the layout's token shape ({B}, {T}) or ({B * T},), got {tuple(shape)}")
        return lay.token_step, lay.num_steps, T
    if not isinstance(mask_or_layout, Tensor):
        raise TypeError(f"mask_or_layout must be a bool tensor or a StepLayout, got {type(mask_or_layout).__name__}")
    m = mask_or_layout
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"mask must have the shape of logp {tuple(shape)}, got {tuple(m.shape)}")
    m = m.bool() if m.dtype != torch.bool else m
    if m.dim() == 2:
        B, T = m.shape
        rows = torch.arange(B, device=m.device, dtype=torch.int32)[:, None].expand(B, T)
        return torch.where(m, rows, torch.full_like(rows, -1)).reshape(-1), B, T
    if m.dim() == 1:
        return torch.where(m, 0, -1).to(torch.int32), 1, m.shape[0]
    raise ValueError(f"mask must be 1-D or 2-D, got shape {tuple(m.shape)}")


def check_loss_args(ratio_level: str, clip_low: float, clip_high: float, dual_clip: Optional[float],
                    agg_mode: str, kl_type: str) -> None:
    """Raises ValueError naming the first bad loss option."""
    if ratio_level not in ref.RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {ref.RATIO_LEVELS}, got {ratio_level!r}")
    if agg_mode not in ref.AGG_MODES:
        raise ValueError(f"agg_mode must be one of {ref.AGG_MODES}, got {agg_mode!r}")
    if kl_type not in ref.KL_TYPES:
        raise ValueError(f"kl_type must be one of {ref.KL_TYPES}, got {kl_type!r}")
    if not clip_low > 0:
        raise ValueError(f"clip_low must be > 0, got {clip_low}")
    if not clip_high > 0:
        raise ValueError(f"clip_high must be > 0, got {clip_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")


def _check_tok(name: str, t: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    if t is None:
        return None
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a float tensor")
    if t.shape != like.shape:
        raise ValueError(f"{name} must have the shape of logp {tuple(like.shape)}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but logp is on {like.device}")
    return t.reshape(-1)


def _host_number(name: str, x):
    if isinstance(x, Tensor):
        if x.device.type != "cpu":
            raise TypeError(f"{name} must be a Python number or a CPU tensor (reading a GPU value would sync)")
        return float(x)
    return x


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask_or_layout: MaskOrLayout,
                ratio_level: str = "step", clip_low: float = 0.2, clip_high: float = 0.2,
                dual_clip: Optional[float] = None, agg_mode: str = "seq-mean-token-mean",
                weights: Optional[Tensor] = None, entropy: Optional[Tensor] = None, entropy_coef: float = 0.0,
                ref_logp: Optional[Tensor] = None, kl_coef: float = 0.0, kl_type: str = "k3",
                global_num_tokens=None, global_num_steps=None, norm_constant=None,
                backend: str = "auto") -> Tuple[Tensor, Dict[str, Tensor]]:
    """StepPO / PPO clipped policy loss (SPEC 7).

    Args:
        logp: (B, T) or (N,) current log-probs (differentiable), float32/float64.
        old_logp, advantages: same shape, behaviour-policy log-probs and advantages.
        mask_or_layout: a StepLayout, or a bool mask of logp's shape (a 2-D mask's rows are steps).
        ratio_level: "step" (StepPO / GSPO geometric mean inside each step) or "token" (PPO).
        clip_low, clip_high: epsilon of the clip range (> 0); dual_clip: c > 1 or None.
        agg_mode: one of ``reference.AGG_MODES``.
        weights: per-token importance weights; entropy (+ entropy_coef): entropy bonus;
        ref_logp (+ kl_coef, kl_type): KL penalty to a reference policy.
        global_num_tokens, global_num_steps: data-parallel counts (host numbers);
        norm_constant: divisor of "seq-mean-token-sum-norm" (default T).
    Returns:
        (loss, metrics): 0-dim loss and 0-dim metrics pg_loss, pg_clipfrac, pg_clipfrac_lower,
        ppo_kl, ratio_mean, ratio_min, ratio_max, entropy, kl.
    """
    check_loss_args(ratio_level, clip_low, clip_high, dual_clip, agg_mode, kl_type)
    if not isinstance(logp, Tensor) or not logp.is_floating_point():
        raise TypeError("logp must be a float tensor")
    token_step, num_steps, T = token_steps(mask_or_layout, logp.shape)
    if token_step.device != logp.device:
        raise ValueError(f"mask_or_layout is on {token_step.device} but logp is on {logp.device}")
    old = _check_tok("old_logp", old_logp, logp)
    adv = _check_tok("advantages", advantages, logp)
    w = _check_tok("weights", weights, logp)
    ent = _check_tok("entropy", entropy, logp)
    rl = _check_tok("ref_logp", ref_logp, logp)
    if norm_constant is None and agg_mode == "seq-mean-token-sum-norm":
        norm_constant = T
    return ops.policy_loss(logp.reshape(-1), old, adv, token_step, num_steps, ratio_level, clip_low, clip_high,
                           dual_clip, agg_mode, w, ent, entropy_coef, rl, kl_coef, kl_type,
                           _host_number("global_num_tokens", global_num_tokens),
                           _host_number("global_num_steps", global_num_steps),
                           _host_number("norm_constant", norm_constant), backend)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Optional[Tensor] = None,
               clip: float = 0.5, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Clipped value loss at step boundaries (SPEC 8): (loss, vf_clipfrac).

    Args:
        values: (S,) float, the critic's prediction at each step (differentiable).
        old_values, returns: (S,) float; mask: optional (S,) bool of the steps that count.
    """
    if not isinstance(values, Tensor) or not values.is_floating_point():
        raise TypeError("values must be a float tensor")
    for name, t in (("old_values", old_values), ("returns", returns)):
        _check_tok(name, t, values)
    if mask is not None and mask.shape != values.shape:
        raise ValueError(f"mask must have the shape of values {tuple(values.shape)}, got {tuple(mask.shape)}")
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    return ops.value_loss(values, old_values, returns, mask, clip, backend)
