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

Credit assignment: the advantage estimator ``"step_gae"`` is registered with verl's
``register_adv_est``. verl's ``compute_advantage`` passes estimators only the rewards, the
mask, the config and the group uids, while step-level GAE also needs the critic values and
which trajectory and step each row is; :func:`compute_advantage` is a drop-in for verl's that
reads ``values`` from ``data.batch`` and ``trajectory_uids`` / ``step_indices`` from
``data.non_tensor_batch`` (``uid`` is the group), and computes ``gae``, ``grpo`` and ``rloo`` with
steppo_fast's kernels too (every row its own one-step trajectory, as verl has it). Other
estimators go to verl's own ``compute_advantage``.

Fused head: :func:`forward_with_steppo_fast` is a causal-LM forward with the signature and the
output (``CausalLMOutputForPPO`` with ``log_probs`` and ``entropy``) of verl's
``use_fused_kernels`` forwards, computing them with ``linear_token_logprobs`` (no logits);
:func:`use_fused_head` binds it to one model instance.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

import types

import numpy as np

from ..advantages import compute as compute_advantages
from ..layout import StepLayout
from ..logprob import linear_token_logprobs
from ..losses import policy_loss

__all__ = ["compute_advantage", "compute_policy_loss_steppo", "compute_policy_loss_steppo_token",
           "compute_step_gae_advantage", "forward_with_steppo_fast", "register", "use_fused_head"]


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
    loss, m = policy_loss(log_prob, old_log_prob, advantages, response_mask, ratio_level=ratio_level, clip_low=clip_low,
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


# ------------------------------------------------------------------ credit assignment
def _row_ids(name: str, values, n: int, device) -> torch.Tensor:
    """Integer ids (n,) from verl's per-row ids (a numpy array of strings or ints, or a tensor)."""
    if isinstance(values, torch.Tensor):
        ids = values
    else:
        arr = np.asarray(values)
        if arr.shape != (n,):
            raise ValueError(f"{name} must have one entry per row ({n}), got shape {arr.shape}")
        if np.issubdtype(arr.dtype, np.integer):
            ids = torch.as_tensor(arr.astype(np.int64))
        else:
            _, inverse = np.unique(arr.astype(str), return_inverse=True)
            ids = torch.as_tensor(inverse.astype(np.int64))
    if tuple(ids.shape) != (n,):
        raise ValueError(f"{name} must have one entry per row ({n}), got shape {tuple(ids.shape)}")
    return ids.to(device=device, dtype=torch.int64)


def _step_gae(token_level_rewards: Tensor, response_mask: Tensor, values: Tensor, trajectory_uids, step_indices,
              index, gamma: float, lam: float):
    mask = response_mask if response_mask.dtype == torch.bool else response_mask != 0
    B, dev = mask.shape[0], mask.device
    layout = StepLayout.from_step_rows(
        mask, _row_ids("trajectory_uids", trajectory_uids, B, dev), _row_ids("step_indices", step_indices, B, dev),
        None if index is None else _row_ids("uid", index, B, dev))
    out = compute_advantages("step_gae", layout, token_rewards=token_level_rewards, values=values, gamma=gamma,
                             lam=lam)
    return out.token_advantages, out.token_returns


def compute_step_gae_advantage(token_level_rewards: Tensor, response_mask: Tensor, config=None, index=None,
                               values: Optional[Tensor] = None, trajectory_uids=None, step_indices=None,
                               gamma: Optional[float] = None, lam: Optional[float] = None, **unused):
    """StepPO's step-level GAE (SPEC 4) as verl's estimator ``"step_gae"``: (advantages, returns), (B, T).

    Each row is one step. gamma and lam come from the arguments, else from ``config``
    (``algorithm.gamma`` / ``algorithm.lam``). Needs ``values`` (B, T), ``trajectory_uids`` (B,) and
    ``step_indices`` (B,), which verl's ``compute_advantage`` does not pass: call this module's
    :func:`compute_advantage` instead.
    """
    missing = [n for n, v in (("values", values), ("trajectory_uids", trajectory_uids),
                              ("step_indices", step_indices)) if v is None]
    if missing:
        raise ValueError(f"step_gae needs {', '.join(missing)}; verl's compute_advantage does not pass them: use "
                         "steppo_fast.integrations.verl.compute_advantage(data, 'step_gae', ...), which reads "
                         "values from data.batch and trajectory_uids / step_indices from data.non_tensor_batch")
    gamma = float(_cfg(config, "gamma", 1.0) if gamma is None else gamma)
    lam = float(_cfg(config, "lam", 1.0) if lam is None else lam)
    return _step_gae(token_level_rewards, response_mask, values, trajectory_uids, step_indices, index, gamma, lam)


def compute_advantage(data, adv_estimator, gamma: float = 1.0, lam: float = 1.0, num_repeat: int = 1,
                      norm_adv_by_std_in_grpo: bool = True, config=None):
    """Drop-in for verl's ``ray_trainer.compute_advantage``: writes ``advantages`` and ``returns``
    into ``data.batch`` and returns ``data``.

    ``step_gae`` reads ``values``, ``trajectory_uids``, ``step_indices`` (and ``uid`` as the group);
    ``gae``, ``grpo`` and ``rloo`` treat every row as a one-step trajectory, as verl does, with
    ``uid`` as the group. Any other estimator is verl's own computation.
    """
    name = getattr(adv_estimator, "value", adv_estimator)
    if name not in ("step_gae", "gae", "grpo", "rloo"):
        from verl.trainer.ppo.ray_trainer import compute_advantage as verl_compute_advantage

        return verl_compute_advantage(data, adv_estimator, gamma, lam, num_repeat, norm_adv_by_std_in_grpo, config)
    batch, extra = data.batch, data.non_tensor_batch
    if "response_mask" not in batch.keys():
        from verl.trainer.ppo.ray_trainer import compute_response_mask

        batch["response_mask"] = compute_response_mask(data)
    mask = batch["response_mask"].bool()
    rewards = batch["token_level_rewards"]
    B, dev = mask.shape[0], mask.device
    group = _row_ids("uid", extra["uid"], B, dev) if "uid" in extra else None
    if name == "step_gae":
        for key, where in (("values", batch.keys()), ("trajectory_uids", extra), ("step_indices", extra)):
            if key not in where:
                raise ValueError(f"step_gae needs data.{'batch' if key == 'values' else 'non_tensor_batch'}"
                                 f"[{key!r}]")
        adv, ret = _step_gae(rewards, mask, batch["values"], extra["trajectory_uids"], extra["step_indices"],
                             extra.get("uid"), gamma, lam)
    else:
        rows = torch.arange(B, device=dev)
        layout = StepLayout.from_step_rows(mask, rows, torch.zeros_like(rows), group)
        if name == "gae":
            out = compute_advantages("token_gae", layout, token_rewards=rewards, values=batch["values"], gamma=gamma,
                                     lam=lam)
        else:
            out = compute_advantages(name, layout, token_rewards=rewards, norm_by_std=norm_adv_by_std_in_grpo)
        adv, ret = out.token_advantages, out.token_returns
    batch["advantages"] = adv
    batch["returns"] = ret
    return data


# ------------------------------------------------------------------ fused head
def forward_with_steppo_fast(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                             inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                             output_hidden_states=None, return_dict=None, cache_position=None, logits_to_keep=0,
                             temperature: float = 1.0, shift_labels=None, **loss_kwargs):
    """verl's fused-kernel forward (``use_fused_kernels``) with steppo_fast's linear head.

    Same arguments and output as verl's ``forward_with_torch_backend``: the decoder runs through
    verl's ``forward_base_model``; the label of position t is the token at t + 1 (``shift_labels``
    if given, else ``labels`` or ``input_ids`` rolled by one), and ``log_probs`` (fp32) and
    ``entropy`` (the hidden states' dtype) come from ``linear_token_logprobs`` on the lm_head.
    """
    from verl.models.transformers.dense_common import CausalLMOutputForPPO, forward_base_model

    if return_dict is False:
        raise ValueError("forward_with_steppo_fast returns a CausalLMOutputForPPO; return_dict=False is not supported")
    outputs = forward_base_model(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                 output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                 cache_position=cache_position)
    hidden = outputs[0]
    if shift_labels is not None:
        targets = shift_labels
    elif labels is not None:
        targets = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        targets = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise ValueError("forward_with_steppo_fast needs labels, shift_labels or input_ids")
    head = self.lm_head
    log_probs, entropy = linear_token_logprobs(hidden, head.weight, targets, None, temperature,
                                               getattr(head, "bias", None), validate=False)
    return CausalLMOutputForPPO(log_probs=log_probs, entropy=entropy.to(hidden.dtype),
                                past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states,
                                attentions=outputs.attentions)


def use_fused_head(model):
    """Binds :func:`forward_with_steppo_fast` as ``model.forward`` (this instance only; the class and
    other models are untouched) and returns the model."""
    if not hasattr(model, "lm_head") or not hasattr(model, "model"):
        raise TypeError(f"use_fused_head needs a causal LM with .model and .lm_head, got {type(model).__name__}")
    model.forward = types.MethodType(forward_with_steppo_fast, model)
    return model


def register() -> None:
    """Registers the losses ``"steppo"`` and ``"steppo_token"`` and the advantage estimator
    ``"step_gae"`` with verl (done on import; idempotent)."""
    from verl.trainer.ppo.core_algos import register_adv_est, register_policy_loss

    register_policy_loss("steppo")(compute_policy_loss_steppo)
    register_policy_loss("steppo_token")(compute_policy_loss_steppo_token)
    register_adv_est("step_gae")(compute_step_gae_advantage)


register()
