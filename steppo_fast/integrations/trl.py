"""TRL adapter: a ``GRPOTrainer`` whose policy loss is steppo_fast's (SPEC 7), one ratio per turn.

``StepPOGRPOTrainer`` keeps everything of TRL's ``GRPOTrainer`` (generation, the tool loop,
``environment_factory`` and ``rollout_func``, rewards, group advantages, the model forward that
gives the per-token log-probs and entropies) and replaces the loss in ``_compute_loss`` with
``steppo_fast.policy_loss`` over a :class:`~steppo_fast.StepLayout` of the batch.

Steps. TRL keeps one row per trajectory: turn 1's tokens, the tool result, turn 2's tokens, ...,
with ``tool_mask`` (B, T) 0 on tool/environment tokens (TRL's tool loop builds it; a
``rollout_func`` returns it as ``env_mask``, which TRL hands to the loss as ``tool_mask``). The
loss mask is ``completion_mask * tool_mask``, and by default every maximal run of 1s in it, one
stretch of tokens the model generated, is one step (``step_boundaries="turns"``). Without
``tool_mask`` a completion is one run, so single-turn training is unchanged.
``step_boundaries="completion"`` makes the whole completion one step (TRL's own behaviour), and a
callable ``step_boundaries(inputs)`` (or an override of :meth:`StepPOGRPOTrainer.get_step_ids`)
sets any other boundaries. A batch may also carry ``step_ids`` (B, T) itself.

TRL's options map to it:

========================================  ==============================================================
TRL (``GRPOConfig``)                      steppo_fast
========================================  ==============================================================
``importance_sampling_level="sequence"``  ``ratio_level="step"``: exp of the mean log-ratio of each turn
``importance_sampling_level="token"``     ``ratio_level="token"``
``epsilon``, ``epsilon_high``             ``clip_low``, ``clip_high``
``loss_type="grpo"``                      ``seq-mean-token-mean``: mean over all turns of the batch of
                                          each turn's token mean
``loss_type="bnpo"``                      ``token-mean``
``loss_type="dr_grpo"``                   token sum / (B * ``max_completion_length``), as TRL
``loss_type="dapo"``                      token sum / TRL's ``num_items_in_batch`` normaliser
``beta``                                  ``kl_coef`` with ``kl_type="k3"``
========================================  ==============================================================

``grpo`` with turns: TRL's ``grpo`` is "mean over completions of each completion's token mean".
With one step per turn it becomes "mean over turns of each turn's token mean" (StepPO's
aggregation), which is exactly what TRL's own ``grpo`` computes on the same episodes split into
one row per turn (the step-row layout). A short final answer after a long tool-calling turn
thus weighs as much as that turn. A completion with no generated token at all (TRL's
``mask_truncated_completions`` zeroes whole rows) counts as one empty turn: it adds 0 to the loss
and 1 to the number of turns, as it adds 1 to TRL's number of completions. With one turn per
completion every loss type equals TRL's own loss. ``bnpo``, ``dr_grpo`` and ``dapo`` normalise
by token or completion counts, which turns do not change; only the ratio is per turn.

Advantages may be (B,) or (B, T) as in TRL; at ``"sequence"`` level keep (B, T) advantages
constant within each turn: the step ratio's gradient hands each token its own advantage, where
TRL's sequence ratio would average them over the sequence.

Metrics: TRL's own names, computed as TRL computes them (``kl`` when ``beta != 0``, ``entropy``,
``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``,
``clip_ratio/low_min``, ``clip_ratio/high_max``; at ``"sequence"`` level one value per turn where
TRL has one per completion), plus ``steppo/pg_clipfrac``, ``steppo/ppo_kl`` and
``steppo/ratio_mean``, read from the device in one transfer.

TRL options with no counterpart here (the other loss types, the entropy bonus and entropy
masking, off-policy masking, two-sided ``delta`` clipping, vLLM importance-sampling correction,
bias-corrected KL) are refused when the trainer is built, never silently ignored.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Union

import torch
from trl import GRPOTrainer

from .. import reference as _ref
from ..layout import StepLayout, step_ids_from_turns
from ._steps import checked_step_ids, rows_layout
from ..losses import policy_loss

__all__ = ["StepPOGRPOTrainer", "check_importance_sampling_level"]

_SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
_IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
_BOUNDARY_MODES = ("turns", "completion")

StepBoundaries = Union[str, Callable[[Dict[str, Any]], torch.Tensor], None]


def check_importance_sampling_level(level) -> None:
    """Raises TRL's own ValueError for an ``importance_sampling_level`` other than "token"/"sequence"."""
    if level not in _IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"Unknown importance sampling level: {level}. Possible values are 'token' and 'sequence'.")


def _check_args(args) -> None:
    check_importance_sampling_level(args.importance_sampling_level)
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


def _check_turn_masks(completion_ids, tool_mask) -> None:
    """Per completion, TRL's tool_mask / rollout_func's env_mask must hold one 0/1 per completion token.

    TRL pads the two lists independently, so a mask one entry short would silently shift every
    later turn (or fail later with a broadcasting error)."""
    if len(tool_mask) != len(completion_ids):
        raise ValueError(f"tool_mask (env_mask of a rollout_func) has {len(tool_mask)} rows but there are "
                         f"{len(completion_ids)} completions")
    for i, (ids, m) in enumerate(zip(completion_ids, tool_mask)):
        if len(m) != len(ids):
            raise ValueError(f"tool_mask (env_mask of a rollout_func) of completion {i} has {len(m)} entries but "
                             f"the completion has {len(ids)} tokens; it must hold one entry per completion token "
                             "(1 on tokens the model generated, 0 on tool or environment tokens)")
        bad = [v for v in m if v not in (0, 1)]
        if bad:
            raise ValueError(f"tool_mask (env_mask of a rollout_func) of completion {i} holds {bad[0]!r}; "
                             "entries must be 0 or 1")


class StepPOGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with steppo_fast's policy loss and one importance ratio per turn.

    Takes TRL's constructor and ``GRPOConfig``, plus:

    Args:
        step_boundaries: how a completion splits into steps.
            ``"turns"`` (default): each maximal run of generated tokens (``completion_mask *
            tool_mask``) is one step, so a tool-calling completion gets one ratio per turn.
            ``"completion"``: the whole completion is one step (TRL's sequence-level ratio).
            A callable ``f(inputs) -> Tensor`` of the batch dict: a (B, T) **bool** tensor marks
            extra step starts on top of the turns (``step_starts`` of ``StepLayout.from_turns``);
            an **integer** tensor gives the step ids themselves (-1 off-step, k on step k's
            tokens, nondecreasing along the row, every generated token in a step).

    Raises ValueError at construction for an ``importance_sampling_level`` other than "token" or
    "sequence" (TRL's own message) and for TRL options the adapter does not carry over.
    """

    def __init__(self, *args, step_boundaries: StepBoundaries = None, **kwargs):
        if step_boundaries is None:
            step_boundaries = "turns"
        if not callable(step_boundaries) and step_boundaries not in _BOUNDARY_MODES:
            raise ValueError(f"step_boundaries must be 'turns', 'completion' or a callable(inputs) -> (B, T) tensor, "
                             f"got {step_boundaries!r}")
        super().__init__(*args, **kwargs)
        _check_args(self.args)
        check_importance_sampling_level(self.importance_sampling_level)
        self.step_boundaries = step_boundaries

    # ------------------------------------------------------------------ steps
    @staticmethod
    def loss_mask(inputs: Dict[str, Any]) -> torch.Tensor:
        """(B, T) bool: the completion tokens the model generated (``completion_mask * tool_mask``)."""
        completion_mask = inputs["completion_mask"]
        tool_mask = inputs.get("tool_mask")
        if tool_mask is None:
            return completion_mask.bool()
        if not isinstance(tool_mask, torch.Tensor) or tuple(tool_mask.shape) != tuple(completion_mask.shape):
            shape = tuple(tool_mask.shape) if isinstance(tool_mask, torch.Tensor) else type(tool_mask).__name__
            raise ValueError(f"tool_mask must have the shape of completion_mask (B, T) = "
                             f"{tuple(completion_mask.shape)}, got {shape}; it is 1 on tokens the model generated "
                             "and 0 on tool or environment tokens (rollout_func's env_mask)")
        return (completion_mask * tool_mask).bool()

    def get_step_ids(self, inputs: Dict[str, Any]) -> torch.Tensor:
        """(B, T) int64 step ids over the completion tokens: -1 off-step, k on step k's tokens.

        Override this (or pass ``step_boundaries=``) for other boundaries than TRL's turns. A batch
        that carries ``step_ids`` itself uses them (tokens off the loss mask are set to -1).
        """
        mask = self.loss_mask(inputs)
        given = inputs.get("step_ids")
        if given is not None:
            return self._as_step_ids(given, mask, "inputs['step_ids']")
        if self.step_boundaries == "turns":
            return step_ids_from_turns(mask)
        if self.step_boundaries == "completion":
            return torch.where(mask, 0, -1).to(torch.int64)
        out = self.step_boundaries(inputs)
        if isinstance(out, torch.Tensor) and out.dtype == torch.bool:
            if tuple(out.shape) != tuple(mask.shape):
                raise ValueError(f"step_boundaries returned step starts of shape {tuple(out.shape)}; they must have "
                                 f"the shape of completion_mask {tuple(mask.shape)}")
            return step_ids_from_turns(mask, out)
        return self._as_step_ids(out, mask, "step_boundaries(inputs)")

    @staticmethod
    def _as_step_ids(ids, mask: torch.Tensor, what: str) -> torch.Tensor:
        return checked_step_ids(ids, mask, what, "completion_mask")

    def _layout(self, inputs: Dict[str, Any], mask: torch.Tensor) -> StepLayout:
        """The batch's StepLayout; a completion with no generated token holds one empty step."""
        sid = self.get_step_ids(inputs)
        derived = "step_ids" not in inputs and not callable(self.step_boundaries)
        derived = derived and type(self).get_step_ids is StepPOGRPOTrainer.get_step_ids
        # Caller-supplied ids get checked (a few host syncs, once per batch).
        return rows_layout(sid, mask, not derived, "completion", "completion_mask * tool_mask")

    # ------------------------------------------------------------------- loss
    def _compute_loss(self, model, inputs: Dict[str, Any]):
        check_importance_sampling_level(self.importance_sampling_level)
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = self.loss_mask(inputs)
        layout = self._layout(inputs, mask)
        # TRL's own forward for the per-token log-probs and entropies.
        logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, compute_entropy=True)
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old
        adv = inputs["advantages"]
        adv = adv[:, None].expand_as(logps) if adv.dim() == 1 else adv
        B, T = logps.shape
        step_level = self.importance_sampling_level == "sequence"
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        kw = dict(ratio_level="step" if step_level else "token",
                  clip_low=self.epsilon_low, clip_high=self.epsilon_high,
                  # The entropy bonus is refused at construction: entropies feed the metric only, and a
                  # zero gradient sent back through them would still run (and perturb) that backward.
                  entropy=entropies.detach(),
                  ref_logp=inputs.get("ref_per_token_logps"), kl_coef=self.beta, kl_type="k3")
        loss_type = self.loss_type
        if loss_type == "grpo":  # mean over all steps (turns; an empty completion is one empty step)
            loss, metrics = policy_loss(logps, old, adv, layout, agg_mode="seq-mean-token-mean",
                                        global_num_steps=layout.num_steps, **kw)
            loss = loss / accumulation
        elif loss_type == "bnpo":
            loss, metrics = policy_loss(logps, old, adv, layout, agg_mode="token-mean", **kw)
            loss = loss / accumulation
        elif loss_type == "dr_grpo":
            loss, metrics = policy_loss(logps, old, adv, layout, agg_mode="seq-mean-token-sum-norm",
                                        global_num_steps=B, norm_constant=self.max_completion_length, **kw)
            loss = loss / accumulation
        else:  # dapo: TRL's normaliser spans the generation batch
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            loss, metrics = policy_loss(logps, old, adv, layout, agg_mode="token-sum", **kw)
            loss = loss / normalizer
        self._log_metrics(mode, metrics, layout, logps, old, adv, mask, step_level)
        return loss

    # ---------------------------------------------------------------- metrics
    @torch.no_grad()
    def _log_metrics(self, mode: str, metrics: Dict[str, torch.Tensor], layout: StepLayout, logps, old, adv,
                     mask: torch.Tensor, step_level: bool) -> None:
        """TRL's metric names, computed as TRL's ``_compute_loss`` computes them (sums and counts
        reduced over processes, min/max gathered), next to steppo_fast's; one host transfer."""
        S = layout.num_steps
        token_step = layout.token_step
        dt, _, a, m, diff, l_tok = _ref._log_ratios(logps.detach().reshape(-1), old.detach().reshape(-1),
                                                    adv.detach().reshape(-1), token_step, S,
                                                    "step" if step_level else "token")
        coef = torch.exp(l_tok if step_level else diff)
        low = (coef < 1 - self.epsilon_low) & (a < 0) & m
        high = (coef > 1 + self.epsilon_high) & (a > 0) & m
        flags = torch.stack([low, high, low | high]).to(dt)  # (3, N)
        n_tok = m.sum().to(dt)
        if step_level:  # one value per step (TRL: one per completion); an empty step is never clipped
            n_s = _ref._index_sum(m.to(dt), token_step, S).clamp(min=1)
            per_step = torch.stack([_ref._index_sum(f, token_step, S) for f in flags]) / n_s  # (3, S)
            per_unit, sums = per_step[:2], per_step.sum(dim=1)
            count = torch.full((), float(S), dtype=dt, device=m.device)
        else:  # token-weighted means; min/max over completions of their token means (NaN when empty)
            B, T = layout.token_shape
            per_unit = flags[:2].reshape(2, B, T).sum(dim=2) / m.reshape(B, T).sum(dim=1).to(dt)
            sums, count = flags.sum(dim=1), n_tok
        inf = torch.full((), float("inf"), dtype=dt, device=m.device)
        local_extremes = torch.stack([torch.where(torch.isnan(per_unit[0]), inf, per_unit[0]).min(),
                                      torch.where(torch.isnan(per_unit[1]), -inf, per_unit[1]).max()])
        totals = torch.cat([sums, count[None], metrics["entropy"].to(dt)[None] * n_tok,
                            metrics["kl"].to(dt)[None] * n_tok, n_tok[None]])
        totals = self.accelerator.reduce(totals, reduction="sum")
        extremes = self.accelerator.gather(local_extremes).reshape(-1, 2)
        lo, hi = extremes[:, 0].min(), extremes[:, 1].max()
        nan = torch.full((), float("nan"), dtype=dt, device=m.device)
        clip = totals[:3] / totals[3].clamp(min=1)
        values = torch.cat([
            torch.stack([metrics[k].to(dt) for k in ("pg_clipfrac", "ppo_kl", "ratio_mean")]),
            totals[4:6] / totals[6].clamp(min=1),
            clip,
            torch.stack([torch.where(torch.isinf(lo), nan, lo), torch.where(torch.isinf(hi), nan, hi)]),
        ]).tolist()
        names = ["steppo/pg_clipfrac", "steppo/ppo_kl", "steppo/ratio_mean", "entropy", "kl",
                 "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                 "clip_ratio/low_min", "clip_ratio/high_max"]
        for name, value in zip(names, values):
            if name == "kl" and self.beta == 0.0:
                continue
            self._metrics[mode][name].append(value)

    # ------------------------------------------------------------ generation
    def _generate(self, prompts):
        out = super()._generate(prompts)
        completion_ids, tool_mask = out[1], out[2]
        if tool_mask is not None:
            _check_turn_masks(completion_ids, tool_mask)
        return out
