"""TRL adapter: a ``GRPOTrainer`` whose policy loss is steppo_fast's (SPEC 7).

``StepPOGRPOTrainer`` keeps everything of TRL's ``GRPOTrainer`` (generation, rewards, group
advantages, the model forward that gives the per-token log-probs and entropies) and replaces
the loss in ``_compute_loss`` with ``steppo_fast.policy_loss``. TRL's options map to it:

========================================  ==========================================
TRL (``GRPOConfig``)                      steppo_fast
========================================  ==========================================
``importance_sampling_level="sequence"``  ``ratio_level="step"`` (a completion is a step)
``importance_sampling_level="token"``     ``ratio_level="token"``
``epsilon``, ``epsilon_high``             ``clip_low``, ``clip_high``
``loss_type="grpo"``                      ``seq-mean-token-mean`` over all B rows
``loss_type="bnpo"``                      ``token-mean``
``loss_type="dr_grpo"``                   ``seq-mean-token-sum-norm``, norm = max_completion_length
``loss_type="dapo"``                      ``token-sum`` / TRL's ``num_items_in_batch`` normaliser
``beta``                                  ``kl_coef`` with ``kl_type="k3"``
========================================  ==========================================

Per-step advantages: when the batch carries ``step_ids`` (B, T) over the completion tokens
(-1 off-step, k on step k's tokens, as ``StepLayout.from_packed`` takes them), each step gets
its own ratio, and ``advantages`` may be (B, T). TRL options with no counterpart here (the
other loss types, the entropy bonus and entropy masking, off-policy masking, two-sided
``delta`` clipping, vLLM importance-sampling correction, bias-corrected KL) are refused when
the trainer is built, never silently ignored.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from trl import GRPOTrainer

from ..layout import StepLayout
from ..losses import policy_loss

__all__ = ["StepPOGRPOTrainer"]

_SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _check_args(args) -> None:
    bad = []
    if args.loss_type not in _SUPPORTED_LOSS_TYPES:
        bad.append(f"loss_type={args.loss_type!r} (supported: {', '.join(_SUPPORTED_LOSS_TYPES)})")
    for name, ok in (("entropy_coef", lambda v: not v), ("top_entropy_quantile", lambda v: v is None or v >= 1.0),
                     ("off_policy_mask_threshold", lambda v: v is None), ("delta", lambda v: v is None),
                     ("use_adaptive_entropy", lambda v: not v)):
        if hasattr(args, name) and not ok(getattr(args, name)):
            bad.append(f"{name}={getattr(args, name)!r}")
    if args.beta != 0.0 and getattr(args, "use_bias_correction_kl", False):
        bad.append("use_bias_correction_kl=True with beta != 0")
    if getattr(args, "use_vllm", False) and getattr(args, "vllm_importance_sampling_correction", False):
        bad.append("vllm_importance_sampling_correction=True")
    if bad:
        raise ValueError("StepPOGRPOTrainer does not support " + "; ".join(bad))


class StepPOGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with steppo_fast's policy loss; the same constructor as TRL's.

    Raises ValueError at construction for TRL options the adapter does not carry over.
    The metrics ``steppo/pg_clipfrac``, ``steppo/ppo_kl`` and ``steppo/ratio_mean`` join TRL's logs.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _check_args(self.args)

    def _compute_loss(self, model, inputs: Dict[str, Any]):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        mask = mask.bool()
        # TRL's own forward for the per-token log-probs and entropies.
        logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, compute_entropy=True)
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old
        adv = inputs["advantages"]
        adv = adv[:, None].expand_as(logps) if adv.dim() == 1 else adv
        B, T = logps.shape
        if "step_ids" in inputs:
            steps = inputs["step_ids"].masked_fill(~mask, -1)
            where = StepLayout.from_packed(steps, validate=False)
        else:
            where = mask
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        kw = dict(ratio_level="step" if self.importance_sampling_level == "sequence" else "token",
                  clip_low=self.epsilon_low, clip_high=self.epsilon_high,
                  # The entropy bonus is refused at construction: entropies feed the metric only, and a
                  # zero gradient sent back through them would still run (and perturb) that backward.
                  entropy=entropies.detach(),
                  ref_logp=inputs.get("ref_per_token_logps"), kl_coef=self.beta, kl_type="k3")
        loss_type = self.loss_type
        if loss_type == "grpo":  # mean over all B completions of each one's token mean
            loss, metrics = policy_loss(logps, old, adv, where, agg_mode="seq-mean-token-mean",
                                        global_num_steps=B if "step_ids" not in inputs else None, **kw)
            loss = loss / accumulation
        elif loss_type == "bnpo":
            loss, metrics = policy_loss(logps, old, adv, where, agg_mode="token-mean", **kw)
            loss = loss / accumulation
        elif loss_type == "dr_grpo":
            loss, metrics = policy_loss(logps, old, adv, where, agg_mode="seq-mean-token-sum-norm",
                                        global_num_steps=B, norm_constant=self.max_completion_length, **kw)
            loss = loss / accumulation
        else:  # dapo: TRL's normaliser spans the generation batch
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            loss, metrics = policy_loss(logps, old, adv, where, agg_mode="token-sum", **kw)
            loss = loss / normalizer
        # Logging reads the metrics on the host, as TRL's own loss does: one transfer for all four.
        names = {"steppo/pg_clipfrac": "pg_clipfrac", "steppo/ppo_kl": "ppo_kl", "steppo/ratio_mean": "ratio_mean",
                 "entropy": "entropy"}
        values = torch.stack([metrics[k] for k in names.values()]).tolist()
        for key, value in zip(names, values):
            self._metrics[mode][key].append(value)
        return loss
