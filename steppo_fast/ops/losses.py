"""SPEC 7-8: the clipped policy loss (``steppo_fast::policy_loss``) and the value loss.

Both return their gradients in closed form from the forward pass, so backward only scales them.
``policy_loss`` has the reference, C++ (``_C``) and Triton (``kernels/policy_loss.py``) backends.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .. import _native
from .. import reference as ref
from . import _guards as guard
from ._registry import _acc, _opt_float, _run, register_backend


POLICY_METRICS = ("pg_loss", "pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "ratio_mean", "ratio_min", "ratio_max",
                  "entropy", "kl")


def policy_options(op: str, ratio_level, clip_low, clip_high, dual_clip, agg_mode, entropy_coef, kl_coef, kl_type,
                   global_num_tokens=None, global_num_steps=None, norm_constant=None) -> dict:
    """The options of SPEC 7, checked and converted: strings among their choices; clip_low,
    clip_high > 0, dual_clip > 1 (or None), entropy_coef and kl_coef, all finite; the global counts
    and norm_constant finite and > 0 (or None). A host number each (a CPU scalar tensor is read).
    Raises TypeError / ValueError naming ``op`` and the option."""
    opt = guard.optional_number
    return dict(
        ratio_level=guard.choice(op, "ratio_level", ratio_level, ref.RATIO_LEVELS),
        clip_low=guard.number(op, "clip_low", clip_low, 0.0, lo_open=True),
        clip_high=guard.number(op, "clip_high", clip_high, 0.0, lo_open=True),
        dual_clip=opt(op, "dual_clip", dual_clip, lo=1.0, lo_open=True),
        agg_mode=guard.choice(op, "agg_mode", agg_mode, ref.AGG_MODES),
        entropy_coef=guard.number(op, "entropy_coef", entropy_coef),
        kl_coef=guard.number(op, "kl_coef", kl_coef),
        kl_type=guard.choice(op, "kl_type", kl_type, ref.KL_TYPES),
        global_num_tokens=opt(op, "global_num_tokens", _host(op, "global_num_tokens", global_num_tokens), lo=0.0,
                              lo_open=True),
        global_num_steps=opt(op, "global_num_steps", _host(op, "global_num_steps", global_num_steps), lo=0.0,
                             lo_open=True),
        norm_constant=opt(op, "norm_constant", _host(op, "norm_constant", norm_constant), lo=0.0, lo_open=True),
    )


def _host(op: str, name: str, x):
    """A count given as a tensor must be a one-element host value (reading a GPU value would sync)."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{op}: {name} must be a scalar, got shape {tuple(x.shape)}")
        if x.device.type != "cpu":
            raise TypeError(f"{op}: {name} must be a Python number or a CPU tensor (reading a GPU value would sync)")
        return _opt_float(x)
    return x


def _check_policy_tensors(op: str, logp, old_logp, advantages, token_step, weights, entropy, ref_logp) -> None:
    guard.tensor(op, "logp", logp, "float", dim=1)
    for name, t in (("old_logp", old_logp), ("advantages", advantages)):
        guard.tensor(op, name, t, "float", like=logp, like_name="logp")
    guard.tensor(op, "token_step", token_step, "int", like=logp, like_name="logp")
    for name, t in (("weights", weights), ("entropy", entropy), ("ref_logp", ref_logp)):
        guard.optional(op, name, t, kind="float", like=logp, like_name="logp")


@torch.library.custom_op("steppo_fast::policy_loss", mutates_args=())
def _policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, token_step: Tensor, weights: Optional[Tensor],
                 entropy: Optional[Tensor], ref_logp: Optional[Tensor], num_steps: int, ratio_level: str,
                 clip_low: float, clip_high: float, dual_clip: Optional[float], agg_mode: str, entropy_coef: float,
                 kl_coef: float, kl_type: str, global_num_tokens: Optional[float], global_num_steps: Optional[float],
                 norm_constant: Optional[float], backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if agg_mode == "seq-mean-token-sum-norm" and norm_constant is None:  # checked here for every backend
        raise ValueError("agg_mode 'seq-mean-token-sum-norm' needs norm_constant (verl's default: T)")
    _check_policy_tensors("policy_loss", logp, old_logp, advantages, token_step, weights, entropy, ref_logp)
    if num_steps < 0:
        raise ValueError(f"policy_loss: num_steps must be >= 0, got {num_steps}")
    return _run("policy_loss", logp.device, backend, logp, old_logp, advantages, token_step, weights, entropy,
                ref_logp, num_steps, ratio_level, clip_low, clip_high, dual_clip, agg_mode, entropy_coef, kl_coef,
                kl_type, global_num_tokens, global_num_steps, norm_constant)


@_policy_loss.register_fake
def _(logp, old_logp, advantages, token_step, weights, entropy, ref_logp, *args):
    dt = _acc(logp, old_logp, advantages)
    ge = torch.empty_like(entropy) if entropy is not None else logp.new_empty(0)
    return (logp.new_empty((), dtype=dt), logp.new_empty(len(POLICY_METRICS), dtype=dt), torch.empty_like(logp), ge)


@register_backend("policy_loss", "reference")
def _policy_loss_ref(logp, old_logp, advantages, token_step, weights, entropy, ref_logp, num_steps, ratio_level,
                     clip_low, clip_high, dual_clip, agg_mode, entropy_coef, kl_coef, kl_type, global_num_tokens,
                     global_num_steps, norm_constant):
    # The loss and its gradients come together (closed-form gradients of the reference).
    args = (logp, old_logp, advantages, token_step, num_steps, ratio_level, clip_low, clip_high, dual_clip, agg_mode,
            weights, entropy, entropy_coef, ref_logp, kl_coef, kl_type, global_num_tokens, global_num_steps,
            norm_constant)
    loss, metrics = ref.policy_loss(*args)
    g_lp, g_ent = ref.policy_loss_grads(*args)
    g_ent = g_ent.to(entropy.dtype) if entropy is not None else logp.new_empty(0)
    m = torch.stack([metrics[k].to(loss.dtype) for k in POLICY_METRICS])
    return loss, m, g_lp.to(logp.dtype), g_ent


# The integer codes of the loss options the compiled kernels (C++ and Triton) take.
AGG_CODES = {"token-mean": 0, "token-sum": 1, "seq-mean-token-mean": 2, "seq-mean-token-sum": 3,
             "seq-mean-token-sum-norm": 4}
KL_CODES = {"k1": 0, "abs": 1, "k2": 2, "k3": 3, "low_var_kl": 3}


@register_backend("policy_loss", "cpp")
def _policy_loss_cpp(logp, old_logp, advantages, token_step, weights, entropy, ref_logp, num_steps, ratio_level,
                     clip_low, clip_high, dual_clip, agg_mode, entropy_coef, kl_coef, kl_type, global_num_tokens,
                     global_num_steps, norm_constant):
    mod = _native.cpu_module()
    dt = _acc(logp, old_logp, advantages)
    n = logp.shape[0]
    x, old, adv = (t.to(dt).contiguous() for t in (logp, old_logp, advantages))
    w, ent, rl = (None if t is None else t.to(dt).contiguous() for t in (weights, entropy, ref_logp))
    ts = token_step.contiguous()
    loss = torch.empty(1, dtype=torch.float64)
    metrics = torch.empty(len(POLICY_METRICS), dtype=torch.float64)
    g_lp = torch.empty(n, dtype=dt)
    g_ent = torch.empty(n, dtype=dt) if ent is not None else None
    nan = float("nan")

    def opt(t, name):
        return 0 if t is None else _native.ptr(name, t, dt)

    mod.policy_loss_cpu(
        _native.ptr("logp", x, dt), _native.ptr("old_logp", old, dt), _native.ptr("advantages", adv, dt),
        _native.dtype_code("logp", x), _native.ptr("token_step", ts), _native.dtype_code("token_step", ts), n,
        int(num_steps), opt(w, "weights"), opt(ent, "entropy"), opt(rl, "ref_logp"), int(ratio_level == "step"),
        float(clip_low), float(clip_high), nan if dual_clip is None else float(dual_clip), AGG_CODES[agg_mode],
        float(entropy_coef), float(kl_coef), KL_CODES[kl_type], nan if global_num_tokens is None else
        float(global_num_tokens), nan if global_num_steps is None else float(global_num_steps),
        nan if norm_constant is None else float(norm_constant), loss.data_ptr(), metrics.data_ptr(),
        g_lp.data_ptr(), 0 if g_ent is None else g_ent.data_ptr())
    g_ent_out = g_ent.to(entropy.dtype) if entropy is not None else logp.new_empty(0)
    return loss[0].to(dt), metrics.to(dt), g_lp.to(logp.dtype), g_ent_out


@register_backend("policy_loss", "triton")
def _policy_loss_triton(logp, old_logp, advantages, token_step, weights, entropy, ref_logp, num_steps, ratio_level,
                        clip_low, clip_high, dual_clip, agg_mode, entropy_coef, kl_coef, kl_type, global_num_tokens,
                        global_num_steps, norm_constant):
    from ..kernels import policy_loss as k

    return k.policy_loss(logp, old_logp, advantages, token_step, weights, entropy, ref_logp, num_steps, ratio_level,
                         clip_low, clip_high, dual_clip, agg_mode, entropy_coef, kl_coef, kl_type, global_num_tokens,
                         global_num_steps, norm_constant)


def _pl_setup(ctx, inputs, output):
    ctx.has_entropy = inputs[5] is not None
    ctx.save_for_backward(output[2], output[3])


def _pl_backward(ctx, g_loss, g_metrics, g_gl, g_ge):
    g_lp, g_ent = ctx.saved_tensors
    grad_logp = (g_loss * g_lp).to(g_lp.dtype)
    grad_ent = (g_loss * g_ent).to(g_ent.dtype) if ctx.has_entropy else None
    return (grad_logp, None, None, None, None, grad_ent) + (None,) * 14


_policy_loss.register_autograd(_pl_backward, setup_context=_pl_setup)


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, token_step: Tensor, num_steps: int,
                ratio_level: str = "step", clip_low: float = 0.2, clip_high: float = 0.2,
                dual_clip: Optional[float] = None, agg_mode: str = "seq-mean-token-mean",
                weights: Optional[Tensor] = None, entropy: Optional[Tensor] = None, entropy_coef: float = 0.0,
                ref_logp: Optional[Tensor] = None, kl_coef: float = 0.0, kl_type: str = "k3",
                global_num_tokens: Optional[float] = None, global_num_steps: Optional[float] = None,
                norm_constant: Optional[float] = None, backend: str = "auto") -> Tuple[Tensor, Dict[str, Tensor]]:
    """The clipped policy loss (SPEC 7) over flat token tensors; differentiable in logp and entropy.

    Args:
        logp, old_logp, advantages: (N,) float; token_step: (N,) int32/int64 step id in
            [0, num_steps), negative off-step.
        num_steps: S, the number of steps ids in token_step index.
        weights, entropy, ref_logp: optional (N,) float.
        The options as in ``losses.policy_loss``: checked here (finite numbers in range).
    Returns:
        (loss, metrics): 0-dim loss and a dict of 0-dim metrics named in ``POLICY_METRICS``.
    No host synchronisation. A NaN in any token input gives NaN in the loss, the metrics it enters
    and the gradient of its step (step ratio) or token (token ratio), on every backend.
    """
    o = policy_options("policy_loss", ratio_level, clip_low, clip_high, dual_clip, agg_mode, entropy_coef, kl_coef,
                       kl_type, global_num_tokens, global_num_steps, norm_constant)
    num_steps = guard.number("policy_loss", "num_steps", num_steps, 0, integer=True)
    loss, m, _, _ = _policy_loss(logp, old_logp, advantages, token_step, weights, entropy, ref_logp, num_steps,
                                 o["ratio_level"], o["clip_low"], o["clip_high"], o["dual_clip"], o["agg_mode"],
                                 o["entropy_coef"], o["kl_coef"], o["kl_type"], o["global_num_tokens"],
                                 o["global_num_steps"], o["norm_constant"], backend)
    return loss, dict(zip(POLICY_METRICS, m.detach().unbind(0)))


@torch.library.custom_op("steppo_fast::value_loss", mutates_args=())
def _value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Optional[Tensor], clip: float,
                backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    op = "value_loss"
    guard.tensor(op, "values", values, "float")
    for name, t in (("old_values", old_values), ("returns", returns)):
        guard.tensor(op, name, t, "float", like=values, like_name="values")
    guard.optional(op, "mask", mask, kind="mask", like=values, like_name="values")
    return _run("value_loss", values.device, backend, values, old_values, returns, mask, clip)


@_value_loss.register_fake
def _(values, old_values, returns, mask, clip, backend):
    dt = _acc(values, old_values, returns)
    return values.new_empty((), dtype=dt), values.new_empty((), dtype=dt), torch.empty_like(values)


@register_backend("value_loss", "reference")
def _value_loss_ref(values, old_values, returns, mask, clip):
    loss, clipfrac = ref.value_loss(values, old_values, returns, clip, mask)
    g = ref.value_loss_grad(values, old_values, returns, clip, mask)
    return loss, clipfrac, g.to(values.dtype)


def _vl_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2])


def _vl_backward(ctx, g_loss, g_clipfrac, g_grad):
    (g,) = ctx.saved_tensors
    return (g_loss * g).to(g.dtype), None, None, None, None, None


_value_loss.register_autograd(_vl_backward, setup_context=_vl_setup)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Optional[Tensor] = None,
               clip: float = 0.5, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Clipped value loss at step boundaries (SPEC 8): (loss, vf_clipfrac), 0-dim.

    Args:
        values, old_values, returns: (S,) float; mask: (S,) bool/integer or None (all steps);
        clip: finite, > 0.
    Differentiable in ``values``.
    """
    clip = guard.number("value_loss", "clip", clip, 0.0, lo_open=True)
    loss, clipfrac, _ = _value_loss(values, old_values, returns, mask, clip, backend)
    return loss, clipfrac.detach()
