"""Policy and value losses over a StepLayout or a mask (SPEC sections 7-8).

The math lives once, in the registry's ``policy_loss`` / ``value_loss`` ops; these
fronts check arguments, map the layout (or a mask whose rows are steps) to per-token
step ids, and name the metrics. Nothing here synchronises with the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from . import ops
from .layout import StepLayout, step_ids_from_turns

MaskOrLayout = Union[Tensor, StepLayout]


MASK_STEPS = ("rows", "turns")


def token_steps(mask_or_layout: MaskOrLayout, shape,
                mask_steps: str = "rows") -> Tuple[Tensor, int, int, Optional[Tensor]]:
    """(token_step (N,), number of steps, T, poison) for a layout or a mask.

    A 2-D mask (B, T) makes every row one step (verl's "sequence", ``mask_steps="rows"``) or
    every maximal run of True in a row one step (``mask_steps="turns"``: one row per trajectory,
    turns separated by tool or observation tokens). A 1-D mask (N,) is one step holding every
    masked-in token. Turn ids are computed on the device with no host synchronisation: the turn
    k of row b gets id ``b * ceil(T / 2) + k`` and the step count is that upper bound; ids no
    token carries are steps without tokens, which no aggregation counts. ``poison`` is None, or
    for a float mask a 0-dim tensor that is NaN when the mask holds a NaN and 0 otherwise (see
    :func:`_as_mask`).
    """
    if mask_steps not in MASK_STEPS:
        raise ValueError(f"mask_steps must be one of {MASK_STEPS}, got {mask_steps!r}")
    if isinstance(mask_or_layout, StepLayout):
        lay = mask_or_layout
        B, T = lay.token_shape
        if tuple(shape) not in ((B, T), (B * T,)):
            raise ValueError(f"logp must have the layout's token shape ({B}, {T}) or ({B * T},), got {tuple(shape)}")
        return lay.token_step, lay.num_steps, T, None
    if not isinstance(mask_or_layout, Tensor):
        raise TypeError(f"mask_or_layout must be a bool tensor or a StepLayout, got {type(mask_or_layout).__name__}")
    m = mask_or_layout
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"mask must have the shape of logp {tuple(shape)}, got {tuple(m.shape)}")
    m, poison = _as_mask("mask", m)
    if mask_steps == "turns":
        if m.dim() != 2:
            raise ValueError(f"mask_steps='turns' needs a (B, T) mask, got shape {tuple(m.shape)}")
        B, T = m.shape
        per_row = (T + 1) // 2  # the most runs a row of T tokens can hold
        k = step_ids_from_turns(m)
        dt = torch.int32 if B * per_row < 2**31 else torch.int64
        base = torch.arange(B, device=m.device, dtype=torch.int64)[:, None] * per_row
        return (torch.where(k >= 0, k + base, torch.full_like(k, -1)).to(dt).reshape(-1), B * per_row, T,
                poison)
    if m.dim() == 2:
        B, T = m.shape
        rows = torch.arange(B, device=m.device, dtype=torch.int32)[:, None].expand(B, T)
        return torch.where(m, rows, torch.full_like(rows, -1)).reshape(-1), B, T, poison
    if m.dim() == 1:
        return torch.where(m, 0, -1).to(torch.int32), 1, m.shape[0], poison
    raise ValueError(f"mask must be 1-D or 2-D, got shape {tuple(m.shape)}")


def _as_mask(name: str, m) -> Tuple[Tensor, Optional[Tensor]]:
    """(bool mask, poison): a bool, integer or float mask read as ``m != 0``.

    The losses never synchronise with the host, so a NaN in a float mask cannot raise here;
    instead ``poison`` (NaN if any entry is NaN, else 0; no synchronisation) is added to the
    loss and its metrics, which all become NaN. Bool and integer masks give ``poison = None``.
    """
    if not isinstance(m, Tensor):
        raise TypeError(f"{name} must be a bool, integer or float tensor, got {type(m).__name__}")
    if m.dtype == torch.bool:
        return m, None
    if m.is_floating_point():
        return m != 0, torch.where(torch.isnan(m).any(), float("nan"), 0.0).to(m.dtype)
    if m.is_complex():
        raise TypeError(f"{name} must be a bool, integer or float tensor, got {m.dtype}")
    return m != 0, None


def _poisoned(loss: Tensor, metrics: Dict[str, Tensor], poison: Optional[Tensor]):
    if poison is None:
        return loss, metrics
    p = poison.to(loss.dtype)
    return loss + p, {k: v + p.to(v.dtype) for k, v in metrics.items()}


def check_loss_args(ratio_level: str, clip_low: float, clip_high: float, dual_clip: Optional[float],
                    agg_mode: str, kl_type: str, entropy_coef: float = 0.0, kl_coef: float = 0.0,
                    global_num_tokens=None, global_num_steps=None, norm_constant=None,
                    where: str = "policy_loss") -> Dict[str, Any]:
    """The loss options checked and converted (``ops.losses.policy_options``): raises TypeError /
    ValueError naming ``where`` and the first bad option. Counts given as CPU tensors are read."""
    return ops.losses.policy_options(where, ratio_level, clip_low, clip_high, dual_clip, agg_mode, entropy_coef,
                                     kl_coef, kl_type, global_num_tokens, global_num_steps, norm_constant)


def _check_tok(name: str, t: Optional[Tensor], like: Tensor, like_name: str = "logp",
               required: bool = False) -> Optional[Tensor]:
    if t is None:
        if required:
            raise TypeError(f"{name} must be a float tensor of the shape of {like_name} {tuple(like.shape)}, got None")
        return None
    if not isinstance(t, Tensor) or not t.is_floating_point():
        what = type(t).__name__ if not isinstance(t, Tensor) else t.dtype
        raise TypeError(f"{name} must be a float tensor, got {what}")
    if t.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")
    return t.reshape(-1)


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask_or_layout: MaskOrLayout,
                ratio_level: str = "step", clip_low: float = 0.2, clip_high: float = 0.2,
                dual_clip: Optional[float] = None, agg_mode: str = "seq-mean-token-mean",
                weights: Optional[Tensor] = None, entropy: Optional[Tensor] = None, entropy_coef: float = 0.0,
                ref_logp: Optional[Tensor] = None, kl_coef: float = 0.0, kl_type: str = "k3",
                global_num_tokens=None, global_num_steps=None, norm_constant=None,
                backend: str = "auto", mask_steps: str = "rows") -> Tuple[Tensor, Dict[str, Tensor]]:
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
        mask_steps: for a 2-D mask, "rows" (each row is one step) or "turns" (each maximal run of
            True in a row is one step, as in one row per multi-turn trajectory; see ``token_steps``).
        All options are checked: numbers finite and in range (clip_low, clip_high > 0,
        dual_clip > 1, counts and norm_constant > 0), strings among their choices.
    Returns:
        (loss, metrics): 0-dim loss and 0-dim metrics pg_loss, pg_clipfrac, pg_clipfrac_lower,
        ppo_kl, ratio_mean, ratio_min, ratio_max, entropy, kl. A NaN in a token input gives a NaN
        loss (and NaN in the gradient of the tokens it reaches); a NaN in a float mask makes the
        loss and every metric NaN (no host synchronisation to raise instead).
    """
    opts = check_loss_args(ratio_level, clip_low, clip_high, dual_clip, agg_mode, kl_type, entropy_coef, kl_coef,
                           global_num_tokens, global_num_steps, norm_constant)
    if not isinstance(logp, Tensor) or not logp.is_floating_point():
        raise TypeError(f"logp must be a float tensor, got {getattr(logp, 'dtype', type(logp).__name__)}")
    token_step, num_steps, T, poison = token_steps(mask_or_layout, logp.shape, mask_steps)
    if token_step.device != logp.device:
        raise ValueError(f"mask_or_layout is on {token_step.device} but logp is on {logp.device}")
    old = _check_tok("old_logp", old_logp, logp, required=True)
    adv = _check_tok("advantages", advantages, logp, required=True)
    w = _check_tok("weights", weights, logp)
    ent = _check_tok("entropy", entropy, logp)
    rl = _check_tok("ref_logp", ref_logp, logp)
    if opts["norm_constant"] is None and agg_mode == "seq-mean-token-sum-norm":
        opts["norm_constant"] = T
    loss, metrics = ops.policy_loss(logp.reshape(-1), old, adv, token_step, num_steps, weights=w, entropy=ent,
                                    ref_logp=rl, backend=backend, **opts)
    return _poisoned(loss, metrics, poison)


@dataclass(frozen=True)
class LossConfig:
    """The options of the policy loss (SPEC 7), checked on construction.

    ``LossConfig()`` is the ``steppo`` preset: step ratio, ``seq-mean-token-mean``, clip
    0.2/0.2, no dual clip, no entropy bonus, no KL. ``LossConfig.preset("ppo")`` is the same
    with the token ratio. global_num_tokens / global_num_steps are data-parallel counts (host
    numbers); norm_constant divides "seq-mean-token-sum-norm" (default: the layout's T).
    """

    ratio_level: str = "step"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: Optional[float] = None
    agg_mode: str = "seq-mean-token-mean"
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_type: str = "k3"
    global_num_tokens: Optional[float] = None
    global_num_steps: Optional[float] = None
    norm_constant: Optional[float] = None

    PRESETS = ("steppo", "ppo")

    def __post_init__(self):
        opts = check_loss_args(self.ratio_level, self.clip_low, self.clip_high, self.dual_clip, self.agg_mode,
                               self.kl_type, self.entropy_coef, self.kl_coef, self.global_num_tokens,
                               self.global_num_steps, self.norm_constant, where="LossConfig")
        for name, value in opts.items():  # host floats from here on (CPU tensors read once)
            object.__setattr__(self, name, value)

    @classmethod
    def preset(cls, name: str, **overrides) -> "LossConfig":
        """``steppo`` (step ratio) or ``ppo`` (token ratio), with any field overridden."""
        if name not in cls.PRESETS:
            raise ValueError(f"preset must be one of {cls.PRESETS}, got {name!r}")
        base = {"steppo": {}, "ppo": {"ratio_level": "token"}}[name]
        return cls(**{**base, **overrides})

    @classmethod
    def of(cls, config: Union[None, "LossConfig", Mapping[str, Any]]) -> "LossConfig":
        """A LossConfig from None (the steppo preset), a LossConfig or a dict of its fields."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, Mapping):
            unknown = sorted(set(config) - set(cls.__dataclass_fields__))
            if unknown:
                known = sorted(cls.__dataclass_fields__)
                raise ValueError(f"loss_config has unknown options {unknown}; known: {known}")
            return cls(**config)
        raise TypeError(f"loss_config must be a LossConfig, a dict or None, got {type(config).__name__}")


def linear_steppo_loss(hidden: Tensor, weight: Tensor, labels: Tensor, layout: Union[StepLayout, Tensor],
                       old_logp: Tensor, advantages: Tensor, loss_config=None, *, weights: Optional[Tensor] = None,
                       ref_logp: Optional[Tensor] = None, temperature: float = 1.0, bias: Optional[Tensor] = None,
                       chunk: Optional[int] = None, with_entropy: bool = True, fp32_weight_grad: bool = False,
                       validate: bool = True, backend: str = "auto") -> Tuple[Tensor, Dict[str, Tensor]]:
    """The policy loss (SPEC 7) straight from hidden states and the lm_head weight, with every
    gradient computed during the forward (``steppo_fast.linear_head``).

    The agent tokens are multiplied by the weight in chunks of whole steps, so step ratios are
    exact; each chunk's logits give its log-probs, the loss gradients, dL/dlogits in place and
    both gradient products before the next chunk. The backward only scales the stored gradients
    by grad_output. No ``.item()`` and no collective inside; memory does not grow with N x V.

    Args:
        hidden: (B, T, H) or (N, H) float; weight: (V, H) same dtype; bias: (V,) or None.
        labels: (B, T) or (N,) int32/int64, the sampled tokens (ignored off the agent tokens).
        layout: a StepLayout of the batch, or a (B, T) bool mask whose rows are steps (a layout
            is built from it, which synchronises with the host).
        old_logp, advantages: (B, T) or (N,) float, behaviour log-probs and advantages.
        loss_config: a :class:`LossConfig`, a dict of its fields, or None (the steppo preset).
        weights, ref_logp: optional per-token importance weights and reference log-probs.
        chunk: agent tokens per chunk (None: ``linear_head.auto_chunk``); a step longer than a
            chunk is split and costs one extra product for its tokens.
        with_entropy: compute entropies (the ``entropy`` metric and the entropy bonus).
        fp32_weight_grad: accumulate grad_weight across chunks in fp32 (bf16/fp16 weights).
        validate: check labels of agent tokens lie in [0, V) and a float mask holds no NaN (one
            host sync; pass False under ``torch.compile(fullgraph=True)`` or CUDA-graph capture).
    Returns:
        (loss, metrics): the same 0-dim loss and metrics as ``policy_loss`` on the log-probs of
        ``linear_token_logprobs``; differentiable in hidden, weight and bias.

    Under ``torch.compile`` (with a prebuilt StepLayout and ``validate=False``) the call traces
    without a graph break. The trace cannot read the steps' boundaries on the host, so a batch
    of more agent tokens than one chunk is then processed as one long step: the same loss and
    gradients, with one more product per chunk (8 N H V flops instead of 6).
    """
    from . import linear_head
    from .logprob import _check_chunk, _check_head, _check_labels, _check_temperature, _is_dtensor

    if _is_dtensor(weight):  # a DTensor lm_head (vocabulary-split, replicated or FSDP2-sharded)
        from . import vocab_parallel

        return vocab_parallel.linear_steppo_loss(hidden, weight, labels, layout, old_logp, advantages, loss_config,
                                                 weights=weights, ref_logp=ref_logp, temperature=temperature,
                                                 bias=bias, chunk=chunk, with_entropy=with_entropy,
                                                 fp32_weight_grad=fp32_weight_grad, validate=validate,
                                                 backend=backend)
    cfg = LossConfig.of(loss_config)
    _check_head(hidden, weight, bias)
    tau = _check_temperature(temperature)
    chunk = _check_chunk(chunk)
    lead = tuple(hidden.shape[:-1])
    raw_mask = layout if isinstance(layout, Tensor) else None  # checked for NaN with the labels
    if isinstance(layout, Tensor):
        if layout.dim() != 2 or tuple(layout.shape) != lead:
            raise ValueError(f"layout must be a StepLayout or a (B, T) mask of hidden's leading shape {lead}, "
                             f"got shape {tuple(layout.shape)}")
        B = layout.shape[0]
        rows_id = torch.arange(B, device=layout.device)
        layout = StepLayout.from_step_rows(layout, rows_id, torch.zeros_like(rows_id), validate=False)
    if not isinstance(layout, StepLayout):
        raise TypeError(f"layout must be a StepLayout or a (B, T) bool mask, got {type(layout).__name__}")
    if lead not in (tuple(layout.token_shape), (layout.num_tokens,)):
        raise ValueError(f"the layout describes {tuple(layout.token_shape)} tokens but hidden has leading shape "
                         f"{lead}; it must be {tuple(layout.token_shape)} or ({layout.num_tokens},)")
    if layout.device != hidden.device:
        raise ValueError(f"the layout is on {layout.device} but hidden is on {hidden.device}")
    mask = layout.token_mask
    y = _check_labels(labels, lead, hidden.device, weight.shape[0], mask, validate, raw_mask)
    flat_like = torch.empty(layout.num_tokens, device=hidden.device)
    per_token = {}
    for name, t in (("old_logp", old_logp), ("advantages", advantages), ("weights", weights), ("ref_logp", ref_logp)):
        if isinstance(t, Tensor) and tuple(t.shape) == lead:
            t = t.reshape(-1)
        per_token[name] = _check_tok(name, t, flat_like, "the tokens", required=name in ("old_logp", "advantages"))
    rows = layout.step_tokens
    gathered = {k: (None if v is None else v.index_select(0, rows)) for k, v in per_token.items()}
    token_step = layout.token_step.index_select(0, rows)
    if chunk == 0:
        chunk = linear_head.auto_chunk(weight.shape[0], hidden.dtype, hidden.device)
    step_level = cfg.ratio_level == "step"
    if step_level and _tracing():
        # A trace cannot read the steps' boundaries on the host, so the batch is planned as one
        # long step: fixed chunks whose statistics all come first (exact step ratios, one extra
        # product per chunk when the batch spans more than one chunk).
        bounds, _ = linear_head.plan_chunks(rows.numel(), chunk)
        split_step = [1 if len(bounds) > 2 else 0] * (len(bounds) - 1)
    else:
        offsets = layout.host_step_token_offsets().tolist() if step_level else None
        bounds, split_step = linear_head.plan_chunks(rows.numel(), chunk, offsets)
    norm = cfg.norm_constant
    if norm is None and cfg.agg_mode == "seq-mean-token-sum-norm":
        norm = float(layout.token_shape[1])
    h = hidden.reshape(-1, hidden.shape[-1])
    grad_on = torch.is_grad_enabled()
    return ops.linear_policy_loss(
        h, weight, bias, y.contiguous(), rows, token_step, layout.step_token_offsets, layout.num_steps, bounds,
        split_step, gathered["old_logp"], gathered["advantages"], gathered["weights"], gathered["ref_logp"],
        cfg.ratio_level, cfg.clip_low, cfg.clip_high, cfg.dual_clip, cfg.agg_mode, cfg.entropy_coef, cfg.kl_coef,
        cfg.kl_type, cfg.global_num_tokens, cfg.global_num_steps, norm, tau, with_entropy,
        grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad, fp32_weight_grad, backend)


def _tracing() -> bool:
    """True while torch.compile traces the caller (host values of tensors are unknown then)."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Optional[Tensor] = None,
               clip: float = 0.5, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Clipped value loss at step boundaries (SPEC 8): (loss, vf_clipfrac).

    Args:
        values: (S,) float, the critic's prediction at each step (differentiable).
        old_values, returns: (S,) float; mask: optional (S,) bool (or integer / float 0-1) of the
            steps that count; a NaN in a float mask makes both outputs NaN.
        clip: finite, > 0.
    """
    if not isinstance(values, Tensor) or not values.is_floating_point():
        raise TypeError(f"values must be a float tensor, got {getattr(values, 'dtype', type(values).__name__)}")
    for name, t in (("old_values", old_values), ("returns", returns)):
        _check_tok(name, t, values, "values", required=True)
    poison = None
    if mask is not None:
        mask, poison = _as_mask("mask", mask)
        if mask.shape != values.shape:
            raise ValueError(f"mask must have the shape of values {tuple(values.shape)}, got {tuple(mask.shape)}")
        if mask.device != values.device:
            raise ValueError(f"mask is on {mask.device} but values are on {values.device}")
    clip = ops._guards.number("value_loss", "clip", clip, 0.0, lo_open=True)
    loss, clipfrac = ops.value_loss(values, old_values, returns, mask, clip, backend)
    if poison is None:
        return loss, clipfrac
    return loss + poison.to(loss.dtype), clipfrac + poison.to(clipfrac.dtype)


class StepPOLoss(torch.nn.Module):
    """The StepPO policy loss as a module: logits, or hidden states and the lm_head weight, in;
    (loss, metrics) out (SPEC 2 and 7).

    With logits, it chains ``token_logprobs`` (fused log-prob + entropy kernels) and
    ``policy_loss``; with ``weight=`` (the lm_head), the fused ``linear_steppo_loss``, which never
    materialises the logits. Backward runs through ordinary autograd either way.

    Args:
        config: a :class:`LossConfig`, a dict of its fields, a preset name ("steppo", "ppo") or
            None (the ``steppo`` preset: step ratio, ``seq-mean-token-mean``, clip 0.2/0.2).
        temperature: the sampling temperature the log-probs are taken at.
        chunk: tokens per chunk of the fused head (None: automatic).
        backend: kernel backend ("auto", "reference", "cpp", "triton", ...).
        process_group: the tensor-parallel group (a ProcessGroup or DeviceMesh) the lm_head, or the
            logits, are split over along the vocabulary; each rank then passes its shard
            (``steppo_fast.vocab_parallel``). A DTensor weight or DTensor logits need no group.
        reduce_grad_hidden: with a vocabulary split, sum grad_hidden over the group (False where the
            framework does, as Megatron's sequence-parallel gather does).
        validate: check that the labels of agent tokens lie in [0, V) (one host sync). Pass False
            to compile the module with ``torch.compile(fullgraph=True)`` or capture it in a CUDA
            graph (with a prebuilt StepLayout); a bad label then gives NaN in its token's row.

    Example::

        loss_fn = StepPOLoss()
        loss, metrics = loss_fn(logits, labels, layout, old_logp, advantages)
        loss, metrics = loss_fn(hidden, labels, layout, old_logp, advantages, weight=lm_head.weight)
    """

    def __init__(self, config=None, temperature: float = 1.0, chunk: Optional[int] = None, backend: str = "auto",
                 process_group=None, reduce_grad_hidden: bool = True, validate: bool = True):
        super().__init__()
        self.process_group = process_group
        self.reduce_grad_hidden = bool(reduce_grad_hidden)
        if isinstance(config, str):
            config = LossConfig.preset(config)
        self.config = LossConfig.of(config)
        from .logprob import _check_temperature

        self.temperature = _check_temperature(temperature)
        self.chunk = chunk
        self.validate = bool(validate)
        self.backend = backend

    def extra_repr(self) -> str:
        return f"config={self.config}, temperature={self.temperature}"

    def forward(self, inputs: Tensor, labels: Tensor, layout: MaskOrLayout, old_logp: Tensor, advantages: Tensor,
                *, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                weights: Optional[Tensor] = None, ref_logp: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Args:
            inputs: logits (B, T, V) or (N, V); or, with ``weight``, hidden states (B, T, H) or (N, H).
            labels: (B, T) or (N,) int, the sampled tokens.
            layout: a StepLayout, or a bool mask of labels' shape whose rows are steps.
            old_logp, advantages: labels' shape, float; weights, ref_logp: optional, same shape.
            weight, bias: the lm_head (V, H) and its bias; given, ``inputs`` are hidden states.
        Returns:
            (loss, metrics): 0-dim loss and 0-dim metrics (see ``ops.POLICY_METRICS``).
        """
        from .logprob import _is_dtensor, token_logprobs

        if self.process_group is not None or _is_dtensor(weight) or _is_dtensor(inputs):
            from . import vocab_parallel

            return vocab_parallel.step_po_loss(self, inputs, labels, layout, old_logp, advantages, weight, bias,
                                               weights, ref_logp)
        cfg = self.config
        if weight is not None:
            return linear_steppo_loss(inputs, weight, labels, layout, old_logp, advantages, cfg, weights=weights,
                                      ref_logp=ref_logp, temperature=self.temperature, bias=bias, chunk=self.chunk,
                                      validate=self.validate, backend=self.backend)
        if bias is not None:
            raise ValueError("bias is only used with weight= (hidden states and the lm_head)")
        logp, ent = token_logprobs(inputs, labels, layout, self.temperature, validate=self.validate,
                                   backend=self.backend)
        return policy_loss(logp, old_logp, advantages, layout,
                           ratio_level=cfg.ratio_level, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                           dual_clip=cfg.dual_clip, agg_mode=cfg.agg_mode, weights=weights, entropy=ent,
                           entropy_coef=cfg.entropy_coef, ref_logp=ref_logp, kl_coef=cfg.kl_coef,
                           kl_type=cfg.kl_type, global_num_tokens=cfg.global_num_tokens,
                           global_num_steps=cfg.global_num_steps, norm_constant=cfg.norm_constant,
                           backend=self.backend)
