"""SPEC 2 and 7 from hidden states: log-probs, entropy and the fused StepPO loss through the lm_head.

``steppo_fast::linear_token_logprobs`` (+ backward) and ``steppo_fast::linear_policy_loss``. The
compiled backends run the chunked algorithm of ``steppo_fast.linear_head`` with the same
backend's ``token_logprobs`` kernels as the epilogue; the products are ``torch.mm``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .. import reference as ref
from . import _guards as guard
from ._registry import _IMPLS, _acc, _run, register_backend
from .losses import POLICY_METRICS, _policy_loss, policy_options


# From hidden states (N, H) and the lm_head weight (V, H): ``rows`` (M,) int64 lists the tokens to
# compute (None: all N); the others cost nothing and get 0. The compiled backends run the chunked
# algorithm of ``linear_head`` with the same backend's token_logprobs kernels as the epilogue.
def _epilogue(backend: str):
    return _IMPLS["token_logprobs"][backend], _IMPLS["token_logprobs_backward"][backend]


def _chunk_for(chunk: int, weight: Tensor, hidden: Tensor) -> int:
    from .. import linear_head

    return chunk if chunk > 0 else linear_head.auto_chunk(weight.shape[0], hidden.dtype, hidden.device)


def _rows_mask(rows: Optional[Tensor], n: int, device) -> Optional[Tensor]:
    if rows is None:
        return None
    return torch.zeros(n, dtype=torch.bool, device=device).index_fill_(0, rows, True)


def _check_head(op: str, hidden, weight, bias, labels, rows) -> None:
    """hidden (N, H) and weight (V, H) float of one dtype with V >= 1, bias (V,) or None, labels (N,)
    int32/int64, rows (M,) integer or None: all on hidden's device."""
    guard.tensor(op, "hidden", hidden, "float", dim=2)
    guard.tensor(op, "weight", weight, "float", dim=2, device=hidden.device)
    if weight.shape[1] != hidden.shape[1] or weight.shape[0] < 1:
        raise ValueError(f"{op}: weight must have shape (V, H) = (V >= 1, {hidden.shape[1]}) to match hidden, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{op}: weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    guard.optional(op, "bias", bias, kind="float", dim=1, numel=weight.shape[0], device=hidden.device)
    guard.tensor(op, "labels", labels, "int", dim=1, numel=hidden.shape[0], device=hidden.device)
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: labels must be int32 or int64, got {labels.dtype}")
    guard.optional(op, "rows", rows, kind="int", dim=1, device=hidden.device)


def _check_temperature_chunk(op: str, temperature: float, chunk: int) -> None:
    if not (0 < temperature < float("inf")):
        raise ValueError(f"{op}: temperature must be finite and > 0, got {temperature}")
    if chunk < 0:
        raise ValueError(f"{op}: chunk must be >= 0 (0: automatic), got {chunk}")


@torch.library.custom_op("steppo_fast::linear_token_logprobs", mutates_args=())
def _linear_token_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                           rows: Optional[Tensor], temperature: float, with_entropy: bool, chunk: int,
                           fp32_weight_grad: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    # fp32_weight_grad is used by the backward only (grad_W accumulated across chunks in fp32).
    _check_head("linear_token_logprobs", hidden, weight, bias, labels, rows)
    _check_temperature_chunk("linear_token_logprobs", temperature, chunk)
    return _run("linear_token_logprobs", hidden.device, backend, hidden, weight, bias, labels, rows, temperature,
                with_entropy, chunk)


@_linear_token_logprobs.register_fake
def _(hidden, weight, bias, labels, rows, temperature, with_entropy, chunk, fp32_weight_grad, backend):
    dt = _acc(hidden, weight, bias)
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=dt), hidden.new_empty(n, dtype=dt), hidden.new_empty(n, dtype=torch.float64)


@register_backend("linear_token_logprobs", "reference")
def _linear_token_logprobs_ref(hidden, weight, bias, labels, rows, temperature, with_entropy, chunk):
    z = ref.linear_logits(hidden, weight, bias)
    logp, ent, lse = ref.token_logprob_stats(z, labels, _rows_mask(rows, hidden.shape[0], hidden.device),
                                             temperature)
    return logp, (ent if with_entropy else torch.zeros_like(ent)), lse.double()


def _register_linear(kind: str):
    def fwd(hidden, weight, bias, labels, rows, temperature, with_entropy, chunk):
        from .. import linear_head

        return linear_head.forward_stats(_epilogue(kind), hidden, weight, bias, labels, rows, temperature,
                                         with_entropy, _chunk_for(chunk, weight, hidden))

    def bwd(hidden, weight, bias, labels, rows, logp, entropy, lse, grad_logp, grad_entropy, temperature,
            with_entropy, chunk, need_hidden, need_weight, need_bias, fp32_weight_grad):
        from .. import linear_head

        return linear_head.backward_grads(_epilogue(kind), hidden, weight, bias, labels, rows, logp, entropy, lse,
                                          grad_logp, grad_entropy, temperature, with_entropy,
                                          _chunk_for(chunk, weight, hidden), need_hidden, need_weight, need_bias,
                                          fp32_weight_grad)

    register_backend("linear_token_logprobs", kind)(fwd)
    register_backend("linear_token_logprobs_backward", kind)(bwd)


_register_linear("cpp")
_register_linear("triton")


@torch.library.custom_op("steppo_fast::linear_token_logprobs_backward", mutates_args=())
def _linear_token_logprobs_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                                    rows: Optional[Tensor], logp: Tensor, entropy: Tensor, lse: Tensor,
                                    grad_logp: Tensor, grad_entropy: Tensor, temperature: float, with_entropy: bool,
                                    chunk: int, need_hidden: bool, need_weight: bool, need_bias: bool,
                                    fp32_weight_grad: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    op = "linear_token_logprobs_backward"
    _check_head(op, hidden, weight, bias, labels, rows)
    _check_temperature_chunk(op, temperature, chunk)
    for name, t in (("logp", logp), ("entropy", entropy), ("lse", lse), ("grad_logp", grad_logp),
                    ("grad_entropy", grad_entropy)):
        guard.tensor(op, name, t, "float", dim=1, numel=hidden.shape[0], device=hidden.device)
    return _run("linear_token_logprobs_backward", hidden.device, backend, hidden, weight, bias, labels, rows, logp,
                entropy, lse, grad_logp, grad_entropy, temperature, with_entropy, chunk, need_hidden, need_weight,
                need_bias, fp32_weight_grad)


def _linear_grads_fake(hidden, weight, bias, need_hidden, need_weight, need_bias):
    gh = torch.empty_like(hidden) if need_hidden else weight.new_empty(0)
    gw = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    gb = (weight.new_empty(weight.shape[0], dtype=(bias if bias is not None else weight).dtype) if need_bias
          else weight.new_empty(0))
    return gh, gw, gb


@_linear_token_logprobs_backward.register_fake
def _(hidden, weight, bias, labels, rows, logp, entropy, lse, grad_logp, grad_entropy, temperature, with_entropy,
      chunk, need_hidden, need_weight, need_bias, fp32_weight_grad, backend):
    return _linear_grads_fake(hidden, weight, bias, need_hidden, need_weight, need_bias)


@register_backend("linear_token_logprobs_backward", "reference")
def _linear_token_logprobs_backward_ref(hidden, weight, bias, labels, rows, logp, entropy, lse, grad_logp,
                                        grad_entropy, temperature, with_entropy, chunk, need_hidden, need_weight,
                                        need_bias, fp32_weight_grad):
    mask = _rows_mask(rows, hidden.shape[0], hidden.device)
    gh, gw, gb = ref.linear_token_logprobs_backward(hidden, weight, labels, mask, grad_logp,
                                                    grad_entropy if with_entropy else None, temperature, bias)
    return (gh.to(hidden.dtype) if need_hidden else weight.new_empty(0),
            gw.to(weight.dtype) if need_weight else weight.new_empty(0),
            gb.to(bias.dtype) if need_bias and bias is not None else weight.new_empty(0))


def _ltlp_setup(ctx, inputs, output):
    hidden, weight, bias, labels, rows, temperature, with_entropy, chunk, fp32_weight_grad, backend = inputs
    logp, ent, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, rows, logp, ent, lse)
    ctx.opts = (temperature, with_entropy, chunk)
    ctx.fp32_weight_grad, ctx.backend = fp32_weight_grad, backend


def _ltlp_backward(ctx, g_logp, g_ent, g_lse):
    hidden, weight, bias, labels, rows, logp, ent, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    g_logp = g_logp if g_logp is not None else torch.zeros_like(logp)
    g_ent = g_ent if g_ent is not None else torch.zeros_like(ent)
    gh, gw, gb = _linear_token_logprobs_backward(hidden, weight, bias, labels, rows, logp, ent, lse, g_logp, g_ent,
                                                 *ctx.opts, need_h, need_w, need_b, ctx.fp32_weight_grad,
                                                 ctx.backend)
    return (gh if need_h else None, gw if need_w else None, gb if need_b else None) + (None,) * 7


_linear_token_logprobs.register_autograd(_ltlp_backward, setup_context=_ltlp_setup)


def linear_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, rows: Optional[Tensor] = None,
                          temperature: float = 1.0, bias: Optional[Tensor] = None, with_entropy: bool = True,
                          chunk: int = 0, fp32_weight_grad: bool = False,
                          backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """(logp, entropy) from hidden (N, H) and the lm_head weight (V, H) (+ bias (V,)); SPEC 2.

    rows: (M,) int64 indices of the tokens to compute (each once), or None for all N; the others
    get 0 and never enter a product. chunk: rows of logits per chunk (0: ``linear_head.auto_chunk``).
    fp32_weight_grad: accumulate grad_weight across chunks in fp32 (for bf16/fp16 weights).
    temperature: finite, > 0. A row index outside [0, N) raises (torch's own index check).
    Differentiable in hidden, weight and bias; returns two (N,) float32 tensors.
    """
    op = "linear_token_logprobs"
    logp, ent, _ = _linear_token_logprobs(hidden, weight, bias, labels, rows,
                                          guard.number(op, "temperature", temperature, 0.0, lo_open=True),
                                          guard.flag(op, "with_entropy", with_entropy),
                                          guard.number(op, "chunk", chunk, 0, integer=True),
                                          guard.flag(op, "fp32_weight_grad", fp32_weight_grad), backend)
    return logp, ent


# The fused loss: the policy loss of SPEC 7 over the agent tokens ``rows`` and all its gradients
# in one chunked sweep (``linear_head.policy_loss_and_grads``); the backward only scales.
@torch.library.custom_op("steppo_fast::linear_policy_loss", mutates_args=())
def _linear_policy_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, rows: Tensor,
                        token_step: Tensor, step_offsets: Tensor, num_steps: int, bounds: List[int],
                        split_step: List[int], old_logp: Tensor, advantages: Tensor, weights: Optional[Tensor],
                        ref_logp: Optional[Tensor], ratio_level: str, clip_low: float, clip_high: float,
                        dual_clip: Optional[float], agg_mode: str, entropy_coef: float, kl_coef: float, kl_type: str,
                        global_num_tokens: Optional[float], global_num_steps: Optional[float],
                        norm_constant: Optional[float], temperature: float, with_entropy: bool, need_hidden: bool,
                        need_weight: bool, need_bias: bool, fp32_weight_grad: bool,
                        backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    op = "linear_policy_loss"
    _check_head(op, hidden, weight, bias, labels, rows)
    _check_temperature_chunk(op, temperature, 0)
    m = rows.shape[0]  # (M,): every per-row tensor is gathered to the rows
    for name, t, kind, need in (("token_step", token_step, "int", True), ("old_logp", old_logp, "float", True),
                                ("advantages", advantages, "float", True), ("weights", weights, "float", False),
                                ("ref_logp", ref_logp, "float", False)):
        if need or t is not None:
            guard.tensor(op, name, t, kind, dim=1, numel=m, device=hidden.device)
    if num_steps < 0:
        raise ValueError(f"{op}: num_steps must be >= 0, got {num_steps}")
    guard.tensor(op, "step_offsets", step_offsets, "int", dim=1, numel=num_steps + 1, device=hidden.device)
    _check_plan(op, bounds, split_step, m, num_steps)
    if agg_mode == "seq-mean-token-sum-norm" and norm_constant is None:
        raise ValueError("agg_mode 'seq-mean-token-sum-norm' needs norm_constant (verl's default: T)")
    loss_args = dict(ratio_level=ratio_level, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                     agg_mode=agg_mode, entropy_coef=entropy_coef, kl_coef=kl_coef, kl_type=kl_type,
                     global_num_tokens=global_num_tokens, global_num_steps=global_num_steps,
                     norm_constant=norm_constant)
    lp, ent, gh, gw, gb = _run("linear_policy_loss", hidden.device, backend, hidden, weight, bias, labels, rows,
                               token_step, step_offsets, num_steps, bounds, split_step, old_logp, advantages, weights,
                               ref_logp, loss_args, temperature, with_entropy, need_hidden, need_weight, need_bias,
                               fp32_weight_grad)
    # The value and the metrics from the (M,) log-probs, by the registry's policy loss: the same
    # numbers as the unfused composition, whose gradients the sweep has already applied.
    loss, metrics, _, _ = _policy_loss(lp, old_logp, advantages, token_step, weights, ent if with_entropy else None,
                                       ref_logp, num_steps, ratio_level, clip_low, clip_high, dual_clip, agg_mode,
                                       entropy_coef, kl_coef, kl_type, global_num_tokens, global_num_steps,
                                       norm_constant, "auto")
    return loss, metrics, lp, ent, gh, gw, gb


def _check_plan(op: str, bounds: List[int], split_step: List[int], m: int, num_steps: int) -> None:
    """A chunk plan of ``linear_head.plan_chunks`` over m rows: bounds from 0 to m, non-decreasing, and one
    split_step entry in [0, num_steps] per chunk (host lists: no synchronisation)."""
    if not bounds or bounds[0] != 0 or bounds[-1] != m or any(b1 < b0 for b0, b1 in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"{op}: bounds must be non-decreasing chunk boundaries from 0 to the {m} rows "
                         f"(linear_head.plan_chunks), got {list(bounds)[:8]}{'...' if len(bounds) > 8 else ''}")
    if len(split_step) != len(bounds) - 1 or any(not 0 <= s <= num_steps for s in split_step):
        raise ValueError(f"{op}: split_step must hold one entry in [0, {num_steps}] per chunk "
                         f"({len(bounds) - 1} chunks), got {len(split_step)} entries")


@_linear_policy_loss.register_fake
def _(hidden, weight, bias, labels, rows, token_step, step_offsets, num_steps, bounds, split_step, old_logp,
      advantages, weights, ref_logp, ratio_level, clip_low, clip_high, dual_clip, agg_mode, entropy_coef, kl_coef,
      kl_type, global_num_tokens, global_num_steps, norm_constant, temperature, with_entropy, need_hidden, need_weight,
      need_bias, fp32_weight_grad, backend):
    dt = _acc(hidden, weight, bias)
    m = rows.shape[0]
    gh, gw, gb = _linear_grads_fake(hidden, weight, bias, need_hidden, need_weight, need_bias)
    return (hidden.new_empty((), dtype=dt), hidden.new_empty(len(POLICY_METRICS), dtype=dt),
            hidden.new_empty(m, dtype=dt), hidden.new_empty(m, dtype=dt), gh, gw, gb)


@register_backend("linear_policy_loss", "reference")
def _linear_policy_loss_ref(hidden, weight, bias, labels, rows, token_step, step_offsets, num_steps, bounds,
                            split_step, old_logp, advantages, weights, ref_logp, loss_args, temperature, with_entropy,
                            need_hidden, need_weight, need_bias, fp32_weight_grad):
    """The oracle: materialised logits of the rows, closed-form loss gradients, then SPEC 2's backward."""
    h = hidden.index_select(0, rows)
    y = labels.index_select(0, rows)
    z = ref.linear_logits(h, weight, bias)
    lp, ent = ref.token_logprobs(z, y, None, temperature)
    g_lp, g_ent = ref.policy_loss_grads(lp, old_logp, advantages, token_step, num_steps, weights=weights,
                                        entropy=ent if with_entropy else None, ref_logp=ref_logp, **loss_args)
    gh_rows, gw, gb = ref.linear_token_logprobs_backward(h, weight, y, None, g_lp, g_ent, temperature, bias)
    gh = torch.zeros_like(hidden).index_copy_(0, rows, gh_rows.to(hidden.dtype)) if need_hidden else None
    return (lp, ent if with_entropy else torch.zeros_like(ent), gh if gh is not None else weight.new_empty(0),
            gw.to(weight.dtype) if need_weight else weight.new_empty(0),
            gb.to(bias.dtype) if need_bias and bias is not None else weight.new_empty(0))


def _register_linear_loss(kind: str):
    @register_backend("linear_policy_loss", kind)
    def impl(hidden, weight, bias, labels, rows, token_step, step_offsets, num_steps, bounds, split_step, old_logp,
             advantages, weights, ref_logp, loss_args, temperature, with_entropy, need_hidden, need_weight,
             need_bias, fp32_weight_grad):
        from .. import linear_head

        return linear_head.policy_loss_and_grads(
            _epilogue(kind), hidden, weight, bias, labels, rows, token_step, num_steps, step_offsets, bounds,
            split_step, old_logp, advantages, weights, ref_logp, loss_args, temperature, with_entropy, need_hidden,
            need_weight, need_bias, fp32_weight_grad)


_register_linear_loss("cpp")
_register_linear_loss("triton")


def linear_policy_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, rows: Tensor,
                       token_step: Tensor, step_offsets: Tensor, num_steps: int, bounds: List[int],
                       split_step: List[int], old_logp: Tensor, advantages: Tensor, weights: Optional[Tensor],
                       ref_logp: Optional[Tensor], ratio_level: str, clip_low: float, clip_high: float,
                       dual_clip: Optional[float], agg_mode: str, entropy_coef: float, kl_coef: float, kl_type: str,
                       global_num_tokens: Optional[float], global_num_steps: Optional[float],
                       norm_constant: Optional[float], temperature: float, with_entropy: bool, need_hidden: bool,
                       need_weight: bool, need_bias: bool, fp32_weight_grad: bool,
                       backend: str = "auto") -> Tuple[Tensor, Dict[str, Tensor]]:
    """The fused-loss op over flat tensors (``losses.linear_steppo_loss`` is the front).

    hidden (N, H), weight (V, H), bias (V,) or None, labels (N,); rows (M,) int64 agent tokens with
    each step's tokens contiguous, token_step (M,) their step ids, step_offsets (S+1,) the steps'
    CSR offsets over rows; bounds / split_step: ``linear_head.plan_chunks``; old_logp, advantages,
    weights, ref_logp: (M,) gathered. need_*: which gradients to compute.
    Returns (loss, metrics) as ``policy_loss`` does; differentiable in hidden, weight and bias.
    Sizes, the plan and the options are checked here; row indices outside [0, N) raise (torch's own
    index check), step ids outside [0, num_steps) raise in the CPU policy-loss kernel.
    """
    op = "linear_policy_loss"
    o = policy_options(op, ratio_level, clip_low, clip_high, dual_clip, agg_mode, entropy_coef, kl_coef, kl_type,
                       global_num_tokens, global_num_steps, norm_constant)
    loss, m, _, _, _, _, _ = _linear_policy_loss(
        hidden, weight, bias, labels, rows, token_step, step_offsets,
        guard.number(op, "num_steps", num_steps, 0, integer=True),
        [guard.number(op, "bounds", b, integer=True) for b in bounds],
        [guard.number(op, "split_step", s, integer=True) for s in split_step], old_logp, advantages, weights, ref_logp,
        o["ratio_level"], o["clip_low"], o["clip_high"], o["dual_clip"], o["agg_mode"], o["entropy_coef"],
        o["kl_coef"], o["kl_type"], o["global_num_tokens"], o["global_num_steps"], o["norm_constant"],
        guard.number(op, "temperature", temperature, 0.0, lo_open=True), guard.flag(op, "with_entropy", with_entropy),
        guard.flag(op, "need_hidden", need_hidden), guard.flag(op, "need_weight", need_weight),
        guard.flag(op, "need_bias", need_bias), guard.flag(op, "fp32_weight_grad", fp32_weight_grad), backend)
    return loss, dict(zip(POLICY_METRICS, m.detach().unbind(0)))


def _lpl_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[4:])
    ctx.n_inputs = len(inputs)


def _lpl_backward(ctx, g_loss, g_metrics, g_lp, g_ent, g_gh, g_gw, g_gb):
    # The gradients were computed in the forward. In eager mode they are scaled in place (a copy would
    # double the memory of grad_weight at the peak); running this backward twice (retain_graph) is then
    # refused by autograd's version check on the saved tensors, never silently double-scaled. Under
    # tracing (torch.compile, opcheck: tensor subclasses) the scaling stays functional.
    gh, gw, gb = ctx.saved_tensors
    grads = [None] * ctx.n_inputs
    for i, g in ((0, gh), (1, gw), (2, gb)):
        if g.numel():
            s = g_loss.to(g.dtype)
            grads[i] = g.mul_(s) if type(g) is torch.Tensor and type(s) is torch.Tensor else g * s
    return tuple(grads)


_linear_policy_loss.register_autograd(_lpl_backward, setup_context=_lpl_setup)

