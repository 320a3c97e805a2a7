"""Liger adapter: ``LigerFusedLinearGRPOLoss``'s interface on steppo_fast's fused loss (SPEC 2, 7).

``StepPOFusedLinearGRPOLoss`` takes the constructor and call arguments of Liger-Kernel's
``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`` (0.8.x) and returns what it returns,
``(loss, metrics)`` with ``metrics = (kl_mean, clip_ratio)`` when ``beta != 0`` and
``(clip_ratio,)`` otherwise; the loss runs ``steppo_fast.linear_steppo_loss``, which multiplies
hidden states by the lm_head in chunks and never materialises the logits. Swapping the class
gives the same loss and gradients (of the hidden states, the weight and the bias).

What it adds: steps inside a row. Liger takes one row per completion and, at
``importance_sampling_level="sequence"``, one ratio per row. Here ``step_boundaries="turns"``
makes every maximal run of ``attention_mask`` (the tokens the model generated, with tool or
environment tokens masked out) one step with its own ratio, and ``step_ids=`` / ``step_starts=``
in the call set any boundaries. ``loss_type="grpo"`` then averages over steps (each step's token
mean), as TRL's adapter does; with one step per row it is Liger's mean over rows.

Options map one to one: ``importance_sampling_level`` -> ``ratio_level`` ("sequence" -> "step"),
``epsilon_low/high`` -> ``clip_low/high``, ``beta`` -> ``kl_coef`` with ``kl_type="k3"``,
``temperature``, ``loss_type`` grpo / bnpo / dr_grpo / dapo with Liger's normalisers,
``vllm_is_ratio`` -> per-token ``weights`` (applied before the KL term, as Liger does). The k3
KL is clamped to [-10, 10] per token (SPEC 7); Liger's is not, so the two differ only on tokens
whose KL estimate exceeds 10. ``compiled`` and ``chunk_size`` are Liger's speed settings and
change no number; steppo_fast picks its own chunks (``chunk=``). Options with no counterpart
(loss types cispo, sapo, luspo, vespo; ``delta``; ``use_bias_correction_kl`` with ``beta != 0``)
raise ValueError at construction.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..layout import StepLayout, step_ids_from_turns
from ._steps import checked_step_ids, rows_layout
from ..logprob import linear_token_logprobs
from ..losses import LossConfig, linear_steppo_loss

__all__ = ["StepPOFusedLinearGRPOLoss"]

_SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
_LIGER_ONLY_LOSS_TYPES = ("cispo", "sapo", "luspo", "vespo")
_BOUNDARY_MODES = ("completion", "turns")


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class StepPOFusedLinearGRPOLoss(torch.nn.Module):
    """Drop-in for ``LigerFusedLinearGRPOLoss``: the same constructor, call and return value.

    Args (Liger's, in Liger's order):
        beta: KL coefficient (k3 estimator against the reference log-probs).
        compiled, chunk_size: Liger's speed settings; accepted, no effect on the result.
        use_ref_model: take reference log-probs from ``ref_per_token_logps`` or ``ref_input``
            (required then, as in Liger); False makes the KL term 0, as in Liger.
        epsilon_low, epsilon_high: the clip range (1 - epsilon_low, 1 + epsilon_high).
        loss_type: "grpo", "bnpo", "dr_grpo" or "dapo" (Liger's default); others are refused.
        max_completion_length: the normaliser of "dr_grpo" (required for it).
        importance_sampling_level: "token" or "sequence" (one ratio per step).
        sapo_temperature_pos, sapo_temperature_neg, vespo_*: used only by loss types refused here;
            checked as Liger checks them.
        temperature: logits are divided by it.
        delta: must be None (two-sided clipping is refused).
        use_bias_correction_kl: must be False when ``beta != 0``.
    Keyword-only additions:
        step_boundaries: "completion" (default, Liger's behaviour: a row is one step) or "turns"
            (each maximal run of ``attention_mask`` in a row is one step).
        chunk: agent tokens per chunk of the fused head (None: automatic).
        backend: steppo_fast kernel backend ("auto", "reference", "cpp", "triton", ...).
    """

    def __init__(self, beta: float = 0.04, compiled: bool = True, use_ref_model: bool = True, chunk_size: int = 1,
                 epsilon_low: float = 0.2, epsilon_high: float = 0.2, loss_type: str = "dapo",
                 max_completion_length: Optional[int] = None, importance_sampling_level: str = "token",
                 sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05, temperature: float = 1.0,
                 delta: Optional[float] = None, use_bias_correction_kl: bool = False, vespo_k_pos: float = 2.0,
                 vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0, *,
                 step_boundaries: str = "completion", chunk: Optional[int] = None, backend: str = "auto"):
        super().__init__()
        if sapo_temperature_pos <= 0:
            raise ValueError(f"sapo_temperature_pos must be positive, got {sapo_temperature_pos}")
        if sapo_temperature_neg <= 0:
            raise ValueError(f"sapo_temperature_neg must be positive, got {sapo_temperature_neg}")
        if importance_sampling_level not in ("token", "sequence"):
            raise ValueError(f"Unknown importance sampling level: {importance_sampling_level}. Possible values are "
                             "'token' and 'sequence'.")
        if loss_type not in _SUPPORTED_LOSS_TYPES:
            kind = "has no counterpart in steppo_fast" if loss_type in _LIGER_ONLY_LOSS_TYPES else "is unknown"
            raise ValueError(f"loss_type={loss_type!r} {kind}; StepPOFusedLinearGRPOLoss supports "
                             f"{', '.join(_SUPPORTED_LOSS_TYPES)}")
        if loss_type == "dr_grpo" and max_completion_length is None:
            raise ValueError("max_completion_length must be provided for loss_type 'dr_grpo'")
        if delta is not None:
            raise ValueError(f"delta={delta!r} (two-sided clipping) has no counterpart in steppo_fast; pass delta=None")
        if use_bias_correction_kl and beta != 0.0:
            raise ValueError("use_bias_correction_kl=True (KL times the importance ratio) has no counterpart in "
                             "steppo_fast; pass use_bias_correction_kl=False")
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        if step_boundaries not in _BOUNDARY_MODES:
            raise ValueError(f"step_boundaries must be 'completion' or 'turns', got {step_boundaries!r}")
        self.beta = float(beta)
        self.compiled = compiled
        self.use_ref_model = bool(use_ref_model)
        self.chunk_size = chunk_size
        self.epsilon_low = float(epsilon_low)
        self.epsilon_high = float(epsilon_high)
        self.loss_type = loss_type
        self.max_completion_length = max_completion_length
        self.importance_sampling_level = importance_sampling_level
        self.sapo_temperature_pos, self.sapo_temperature_neg = sapo_temperature_pos, sapo_temperature_neg
        self.temperature = float(temperature)
        self.delta = delta
        self.use_bias_correction_kl = use_bias_correction_kl
        self.vespo_k_pos, self.vespo_lambda_pos = vespo_k_pos, vespo_lambda_pos
        self.vespo_k_neg, self.vespo_lambda_neg = vespo_k_neg, vespo_lambda_neg
        self.step_boundaries = step_boundaries
        self.chunk = chunk
        self.backend = backend
        # Checks epsilon_low / epsilon_high once, here.
        self._base_config = LossConfig(ratio_level="step" if importance_sampling_level == "sequence" else "token",
                                       clip_low=self.epsilon_low, clip_high=self.epsilon_high, kl_type="k3")

    def extra_repr(self) -> str:
        return (f"loss_type={self.loss_type!r}, importance_sampling_level={self.importance_sampling_level!r}, "
                f"beta={self.beta}, epsilon=({self.epsilon_low}, {self.epsilon_high}), "
                f"temperature={self.temperature}, step_boundaries={self.step_boundaries!r}")

    # ------------------------------------------------------------------ steps
    def _step_ids(self, mask: Tensor, step_ids: Optional[Tensor], step_starts: Optional[Tensor]) -> Tuple[Tensor, bool]:
        """(B, T) int64 step ids and whether they came from the caller (then they get checked)."""
        if step_ids is not None:
            if step_starts is not None:
                raise ValueError("pass step_ids or step_starts, not both")
            return checked_step_ids(step_ids, mask, "step_ids", "attention_mask"), True
        if self.step_boundaries == "turns":
            return step_ids_from_turns(mask, step_starts), False
        # "completion": the row is one step, split only where step_starts says so.
        first = mask & (torch.cumsum(mask, dim=1) == 1)
        if step_starts is not None:
            if not isinstance(step_starts, Tensor) or tuple(step_starts.shape) != tuple(mask.shape):
                raise ValueError(f"step_starts must be a tensor of the shape of attention_mask {tuple(mask.shape)}")
            if step_starts.device != mask.device:
                raise ValueError(f"step_starts is on {step_starts.device} but attention_mask is on {mask.device}")
            first = first | (mask & (step_starts != 0))
        k = torch.cumsum(first, dim=1, dtype=torch.int64) - 1
        return torch.where(mask, k, -1), False

    @staticmethod
    def _layout(sid: Tensor, mask: Tensor, check: bool) -> StepLayout:
        """StepLayout of the rows; a row with no token holds one empty step (it counts in grpo's mean,
        as Liger divides by the number of rows)."""
        return rows_layout(sid, mask, check, "row", "attention_mask")

    # ------------------------------------------------------------------- call
    def forward(self, _input: Tensor, lin_weight: Tensor, selected_token_ids: Tensor, attention_mask: Tensor,
                advantages: Tensor, bias: Optional[Tensor] = None, ref_per_token_logps: Optional[Tensor] = None,
                old_per_token_logps: Optional[Tensor] = None, ref_input: Optional[Tensor] = None,
                ref_weight: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
                vllm_is_ratio: Optional[Tensor] = None, num_items_in_batch=None, *,
                step_ids: Optional[Tensor] = None, step_starts: Optional[Tensor] = None):
        """Liger's call, plus optional steps inside rows.

        Args:
            _input: (B, T, H) hidden states (fp32/bf16/fp16); lin_weight: (V, H); bias: (V,) or None.
            selected_token_ids: (B, T) int, the sampled tokens.
            attention_mask: (B, T) 0/1, the tokens the loss counts (the generated ones).
            advantages: (B,) float, one per row (as Liger), or (B, T) per token (at "sequence" level
                constant within each step: the step ratio's gradient gives each token its own
                advantage, where a sequence ratio's gradient would average them).
            ref_per_token_logps, old_per_token_logps: (B, T) float or None (old None: on-policy,
                ratio 1; this costs one extra no-grad pass over the head).
            ref_input, ref_weight, ref_bias: the reference model's hidden states and head, used
                when ``ref_per_token_logps`` is None.
            vllm_is_ratio: (B, T), (B, 1) or (B,) weights of the policy term, or None; at "sequence"
                level one weight per row ((B,) or (B, 1)).
            num_items_in_batch: the "dapo" normaliser (tokens of the whole generation batch), or None
                (then the tokens of ``attention_mask``, summed over data-parallel ranks, as Liger).
            step_ids: (B, T) int, -1 off-step, k on step k's tokens (each row's steps in order, every
                token of ``attention_mask`` in a step); overrides ``step_boundaries``.
            step_starts: (B, T) bool, extra step starts inside a run (``"turns"``) or a row
                (``"completion"``).
        Returns:
            (loss, metrics): 0-dim float32 loss, differentiable in ``_input``, ``lin_weight`` and
            ``bias``; metrics a tuple of 0-dim tensors, ``(kl_mean, clip_ratio)`` when ``beta != 0``
            else ``(clip_ratio,)``, token means over ``attention_mask`` as Liger's.
        """
        if not isinstance(_input, Tensor) or _input.dim() != 3:
            raise ValueError(f"_input must be hidden states of shape (B, T, H), got {_shape(_input)}")
        B, T = _input.shape[:2]
        for name, t in (("selected_token_ids", selected_token_ids), ("attention_mask", attention_mask)):
            if not isinstance(t, Tensor) or tuple(t.shape) != (B, T):
                raise ValueError(f"{name} must have shape (B, T) = ({B}, {T}) to match _input, got {_shape(t)}")
        if not isinstance(advantages, Tensor) or tuple(advantages.shape) not in ((B,), (B, T)):
            raise ValueError(f"advantages must have shape (B,) = ({B},) or (B, T) = ({B}, {T}), got "
                             f"{_shape(advantages)}")
        for name, t in (("old_per_token_logps", old_per_token_logps), ("ref_per_token_logps", ref_per_token_logps)):
            if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != (B, T)):
                raise ValueError(f"{name} must have shape (B, T) = ({B}, {T}), got {_shape(t)}")
        mask = attention_mask.bool() if attention_mask.dtype != torch.bool else attention_mask
        sid, given = self._step_ids(mask, step_ids, step_starts)
        layout = self._layout(sid, mask, given)
        adv = advantages[:, None].expand(B, T) if advantages.dim() == 1 else advantages
        adv = adv.float() if not adv.is_floating_point() else adv

        ref = None
        if self.use_ref_model:
            if ref_per_token_logps is None and ref_input is None:
                raise ValueError("use_ref_model=True needs ref_per_token_logps or ref_input (with ref_weight)")
            if ref_per_token_logps is not None:
                if ref_input is not None:
                    warnings.warn("Both ref_per_token_logps and ref_input are provided. Using ref_per_token_logps.")
                ref = ref_per_token_logps.float()
            elif self.beta != 0.0:  # the reference log-probs feed the KL term only
                if ref_weight is None:
                    raise ValueError("ref_input needs ref_weight, the reference model's lm_head (V, H)")
                with torch.no_grad():
                    ref, _ = linear_token_logprobs(ref_input, ref_weight, selected_token_ids, layout,
                                                   self.temperature, bias=ref_bias, chunk=self.chunk,
                                                   with_entropy=False, backend=self.backend)
        kl_on = self.beta != 0.0 and ref is not None

        if old_per_token_logps is None:
            with torch.no_grad():
                old, _ = linear_token_logprobs(_input.detach(), lin_weight.detach(), selected_token_ids, layout,
                                               self.temperature, bias=None if bias is None else bias.detach(),
                                               chunk=self.chunk, with_entropy=False, backend=self.backend)
        else:
            old = old_per_token_logps.float()

        weights = None
        if vllm_is_ratio is not None:
            w = vllm_is_ratio
            if not isinstance(w, Tensor) or tuple(w.shape) not in ((B,), (B, 1), (B, T)):
                raise ValueError(f"vllm_is_ratio must have shape ({B},), ({B}, 1) or ({B}, {T}), got {_shape(w)}")
            if w.dim() == 2 and w.shape[1] == T and T > 1 and self.importance_sampling_level == "sequence":
                raise ValueError(
                    "vllm_is_ratio of shape (B, T) with importance_sampling_level='sequence' has no counterpart: "
                    "the step ratio gives each token's gradient its own weight, where Liger averages the weights "
                    "over the sequence; pass one weight per row, (B,) or (B, 1)")
            w = w.reshape(B, -1) if w.dim() == 1 else w
            weights = w.expand(B, T).float()

        agg = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
               "dapo": "token-sum"}[self.loss_type]
        base = self._base_config
        cfg = LossConfig(ratio_level=base.ratio_level, clip_low=base.clip_low, clip_high=base.clip_high,
                         agg_mode=agg, kl_coef=self.beta if kl_on else 0.0, kl_type="k3",
                         global_num_steps={"grpo": layout.num_steps, "dr_grpo": B}.get(self.loss_type),
                         norm_constant=self.max_completion_length if self.loss_type == "dr_grpo" else None)
        loss, metrics = linear_steppo_loss(_input, lin_weight, selected_token_ids, layout, old, adv, cfg,
                                           weights=weights, ref_logp=ref if kl_on else None,
                                           temperature=self.temperature, bias=bias, chunk=self.chunk,
                                           with_entropy=False, backend=self.backend)
        if self.loss_type == "dapo":
            loss = loss / self._dapo_normalizer(mask, num_items_in_batch)
        out = [metrics["pg_clipfrac"].float()]
        if self.beta != 0.0:
            out.insert(0, metrics["kl"].float() if kl_on else torch.zeros((), device=_input.device))
        return loss.float(), tuple(out)

    @staticmethod
    def _dapo_normalizer(mask: Tensor, num_items_in_batch) -> Tensor:
        """Liger's (and TRL's) per-process "dapo" normaliser, clamped to at least 1."""
        world = _world_size()
        if num_items_in_batch is not None:
            n = torch.as_tensor(num_items_in_batch, dtype=torch.float32).to(mask.device)
        else:
            n = mask.to(torch.float32).sum()
            if world > 1:  # Liger sums the token count over ranks here
                n = n.clone()
                torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.SUM)
        return (n / world).clamp(min=1.0)
