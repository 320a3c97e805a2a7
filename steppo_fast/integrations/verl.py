"""verl adapter: StepPO's policy loss in verl's policy-loss registry.

Importing this module registers two losses with ``verl.trainer.ppo.core_algos.register_policy_loss``
(verl's own extension point), both with verl's signature
``(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
-> (loss, metrics)``:

* ``"steppo"``: the step-level ratio (SPEC 7). In verl's layout every row of a batch is one
  step (one turn's response), so a row is a step here; this is GSPO's sequence ratio with the
  gradient flowing through the mean, and equals verl's ``gspo`` loss.
* ``"steppo_token"``: the token-level ratio with verl's dual clip (``clip_ratio_c``); equals
  verl's ``vanilla`` loss.

Select one with ``actor_rollout_ref.actor.policy_loss.loss_mode=steppo``. The clip range comes
from ``config.clip_ratio`` / ``clip_ratio_low`` / ``clip_ratio_high``, the data-parallel counts from
``config.global_batch_info`` (``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``
and ``dp_size``, which multiplies the loss as verl's ``agg_loss`` does, because data-parallel
training averages gradients over ranks). ``rollout_is_weights`` become the per-token weights.

The math is steppo_fast's ``policy_loss``; this module only translates arguments. Metrics use
verl's names and stay 0-dim tensors (no host synchronisation inside the loss).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..losses import policy_loss

__all__ = ["compute_policy_loss_steppo", "compute_policy_loss_steppo_token", "register"]


def _cfg(config, name: str, default=None):
    if config is None:
        return default
    if hasattr(config, "get"):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    return default if value is None else value


def _clip_range(config) -> Tuple[float, float]:
    if config is None:
        raise ValueError("config is required: the clip range comes from config.clip_ratio(_low/_high)")
    base = _cfg(config, "clip_ratio", 0.2)
    return float(_cfg(config, "clip_ratio_low", base)), float(_cfg(config, "clip_ratio_high", base))


def _global_counts(config) -> Dict[str, Any]:
    info = _cfg(config, "global_batch_info", {}) or {}
    return {
        "global_num_tokens": info.get("batch_num_tokens"),
        "global_num_steps": info.get("global_batch_size"),
        "norm_constant": info.get("loss_scale_factor"),
        "dp_size": info.get("dp_size", 1) or 1,
    }


def _steppo(ratio_level: str, old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
            loss_agg_mode: str, config, rollout_is_weights: Optional[Tensor]) -> Tuple[Tensor, Dict[str, Any]]:
    clip_low, clip_high = _clip_range(config)
    counts = _global_counts(config)
    dp_size = counts.pop("dp_size")
    dual_clip = float(_cfg(config, "clip_ratio_c", 3.0)) if ratio_level == "token" else None
    mask = response_mask if response_mask.dtype == torch.bool else response_mask != 0
    loss, m = policy_loss(log_prob, old_log_prob, advantages, mask, ratio_level=ratio_level, clip_low=clip_low,
                          clip_high=clip_high, dual_clip=dual_clip, agg_mode=loss_agg_mode,
                          weights=rollout_is_weights, **counts)
    if dp_size != 1:
        loss = loss * dp_size
    metrics = {
        "actor/pg_clipfrac": m["pg_clipfrac"],
        "actor/ppo_kl": m["ppo_kl"],
        "actor/pg_clipfrac_lower": m["pg_clipfrac_lower"],
    }
    return loss, metrics


def compute_policy_loss_steppo(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                               loss_agg_mode: str = "seq-mean-token-mean", config=None,
                               rollout_is_weights: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Any]]:
    """StepPO's loss with the step ratio, verl's signature (registered as ``"steppo"``).

    Args:
        old_log_prob, log_prob, advantages: (B, T) float, one row per step.
        response_mask: (B, T) bool or 0/1, the step's agent tokens.
        loss_agg_mode: one of verl's five modes ("sequence" is a step here).
        config: verl's ActorConfig (or any object/dict with its clip and batch fields).
        rollout_is_weights: optional (B, T) rollout-correction weights.
    Returns:
        (loss, metrics): 0-dim loss and 0-dim tensors under verl's metric names.
    """
    return _steppo("step", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                   rollout_is_weights)


def compute_policy_loss_steppo_token(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
                                     response_mask: Tensor, loss_agg_mode: str = "token-mean", config=None,
                                     rollout_is_weights: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Any]]:
    """The token-ratio PPO loss with dual clip (``config.clip_ratio_c``), registered as ``"steppo_token"``;
    arguments as :func:`compute_policy_loss_steppo`."""
    return _steppo("token", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                   rollout_is_weights)


def register() -> None:
    """Registers ``"steppo"`` and ``"steppo_token"`` with verl (done on import; idempotent)."""
    from verl.trainer.ppo.core_algos import register_policy_loss

    register_policy_loss("steppo")(compute_policy_loss_steppo)
    register_policy_loss("steppo_token")(compute_policy_loss_steppo_token)


register()
