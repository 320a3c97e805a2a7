"""The one registry of steppo_fast ops.

Every public op is a ``torch.library.custom_op("steppo_fast::<op>")`` with a fake
kernel (so it traces under ``torch.compile`` and passes ``opcheck``) and, where it is
differentiable, a registered autograd formula. Its implementation picks a backend by
the tensors' device:

=======  ================================  ==========
device   first choice                      fallback
=======  ================================  ==========
CUDA     ``triton`` or ``cuda`` (per op)   reference
CPU      ``cpp``                           reference
=======  ================================  ==========

``backend=`` on the call, else the ``STEPPO_FAST_BACKEND`` environment variable,
overrides the choice. A backend that is not available for an op falls back to the
reference with one warning per (op, backend); an unknown name is an error.

The functions here take raw tensors. The layout-aware fronts live in
``advantages.py``, ``losses.py`` and ``logprob.py``.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _native
from . import reference as ref

BACKENDS = ("auto", "reference", "cpp", "cuda", "triton")
_GPU_BACKENDS = ("triton", "cuda")
_IMPLS: Dict[str, Dict[str, Callable]] = {}
_warned = set()


def register_backend(op: str, backend: str):
    """Decorator: registers ``fn`` as ``backend``'s implementation of ``op``."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")

    def deco(fn):
        _IMPLS.setdefault(op, {})[backend] = fn
        return fn

    return deco


def available_backends(op: str, device_type: str) -> List[str]:
    """Backends of ``op`` that can run on ``device_type`` ("cpu" or "cuda") right now."""
    out = []
    for name in _IMPLS.get(op, {}):
        if _backend_usable(name, device_type):
            out.append(name)
    return out


def _triton_usable(device_type: str) -> bool:
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _backend_usable(name: str, device_type: str) -> bool:
    if name == "reference":
        return True
    if name == "cpp":
        return device_type == "cpu" and _native.cpu_module() is not None
    if name == "cuda":
        return device_type == "cuda" and _native.cuda_module() is not None
    if name == "triton":
        return _triton_usable(device_type)
    return False


def resolve_backend(op: str, device: torch.device, backend: str = "auto") -> str:
    """The backend that runs ``op`` for tensors on ``device``, given a request."""
    requested = backend
    if requested == "auto":
        requested = os.environ.get("STEPPO_FAST_BACKEND", "auto") or "auto"
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    dev = torch.device(device).type
    impls = _IMPLS[op]
    if requested == "auto":
        order = list(_GPU_BACKENDS) if dev == "cuda" else ["cpp"]
        for name in order:
            if name in impls and _backend_usable(name, dev):
                return name
        key = (op, dev, "auto")
        if key not in _warned:
            _warned.add(key)
            wanted = " or ".join(order)
            warnings.warn(f"steppo_fast::{op}: no {wanted} kernel available on {dev}; using the PyTorch reference",
                          RuntimeWarning, stacklevel=4)
        return "reference"
    if requested in ("cpp",) and dev != "cpu":
        raise ValueError(f"backend {requested!r} runs on CPU tensors, but {op} got tensors on {dev}")
    if requested == "cuda" and dev != "cuda":
        raise ValueError(f"backend 'cuda' runs on CUDA tensors, but {op} got tensors on {dev}")
    if requested in impls and _backend_usable(requested, dev):
        return requested
    key = (op, dev, requested)
    if key not in _warned:
        _warned.add(key)
        why = "has no such kernel" if requested not in impls else "is not available here"
        warnings.warn(f"steppo_fast::{op}: backend {requested!r} {why} on {dev}; using the PyTorch reference",
                      RuntimeWarning, stacklevel=4)
    return "reference"


def _run(op: str, device: torch.device, backend: str, *args):
    return _IMPLS[op][resolve_backend(op, device, backend)](*args)


def _acc(*tensors: Optional[Tensor]) -> torch.dtype:
    return ref.acc_dtype(*tensors)


# =========================================================== SPEC 2: log-probs
# logits are (N, V) or (B, T, V) with a contiguous vocabulary and rows at any stride (for example
# logits[:, :-1]); labels and mask are flat (N,). The forward returns (logp, entropy, lse): the
# backward needs only these three floats per row besides the logits.
def _rows(logits: Tensor) -> Tensor:
    """logits as (N, V) for the reference (a view where the strides allow, else a copy)."""
    return logits.reshape(-1, logits.shape[-1])


def _unit_vocab_stride(logits: Tensor) -> Tensor:
    return logits if logits.stride(-1) == 1 or logits.shape[-1] == 1 else logits.contiguous()


def _unit_vocab_stride_out(out: Tensor) -> Tensor:
    """Where the kernels write a gradient bound for ``out``: ``out`` itself, or a contiguous buffer
    (copied back by the caller) when its vocabulary is strided (an in-place backward on such logits)."""
    return out if out.stride(-1) == 1 or out.shape[-1] == 1 else torch.empty(out.shape, dtype=out.dtype,
                                                                              device=out.device)


def row_geometry(logits: Tensor):
    """(n_rows, vocab, rows_per_batch, stride_b, stride_t) in elements."""
    if logits.dim() == 2:
        n, v = logits.shape
        return n, v, max(n, 1), 0, logits.stride(0)
    b, t, v = logits.shape
    return b * t, v, max(t, 1), logits.stride(0), logits.stride(1)


@torch.library.custom_op("steppo_fast::token_logprobs", mutates_args=())
def _token_logprobs(logits: Tensor, labels: Tensor, mask: Tensor, temperature: float, with_entropy: bool,
                    inplace_backward: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return _run("token_logprobs", logits.device, backend, logits, labels, mask, temperature, with_entropy)


@_token_logprobs.register_fake
def _(logits, labels, mask, temperature, with_entropy, inplace_backward, backend):
    n = labels.shape[0]
    dt = _acc(logits)
    return logits.new_empty(n, dtype=dt), logits.new_empty(n, dtype=dt), logits.new_empty(n, dtype=torch.float64)


@register_backend("token_logprobs", "reference")
def _token_logprobs_ref(logits, labels, mask, temperature, with_entropy):
    logp, ent, lse = ref.token_logprob_stats(_rows(logits), labels, mask, temperature)
    return logp, (ent if with_entropy else torch.zeros_like(ent)), lse.double()


@register_backend("token_logprobs", "cpp")
def _token_logprobs_cpp(logits, labels, mask, temperature, with_entropy):
    mod = _native.cpu_module()
    z = _unit_vocab_stride(logits)
    n, vocab, rpb, sb, st = row_geometry(z)
    dt = _acc(z)
    logp, ent = (torch.empty(n, dtype=dt) for _ in range(2))
    lse = torch.empty(n, dtype=torch.float64)
    if n:
        y, m = labels.contiguous(), mask.contiguous()
        mod.token_logprobs_cpu(
            z.data_ptr(), _native.dtype_code("logits", z), n, vocab, rpb, sb, st,
            _native.ptr("labels", y), _native.dtype_code("labels", y), _native.ptr("mask", m, torch.bool),
            float(temperature), bool(with_entropy), logp.data_ptr(), ent.data_ptr(), lse.data_ptr(),
        )
    return logp, ent, lse


@register_backend("token_logprobs", "triton")
def _token_logprobs_triton(logits, labels, mask, temperature, with_entropy):
    from .kernels import logprob as k

    return k.token_logprobs_fwd(_unit_vocab_stride(logits), labels.contiguous(), mask.contiguous(),
                                float(temperature), bool(with_entropy))


@torch.library.custom_op("steppo_fast::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward(logits: Tensor, labels: Tensor, mask: Tensor, logp: Tensor, entropy: Tensor,
                             lse: Tensor, grad_logp: Tensor, grad_entropy: Tensor, temperature: float,
                             with_entropy: bool, backend: str) -> Tensor:
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _run("token_logprobs_backward", logits.device, backend, logits, labels, mask, logp, entropy, lse, grad_logp,
         grad_entropy, temperature, with_entropy, out)
    return out


@_token_logprobs_backward.register_fake
def _(logits, labels, mask, logp, entropy, lse, grad_logp, grad_entropy, temperature, with_entropy, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("steppo_fast::token_logprobs_backward_", mutates_args=("logits",))
def _token_logprobs_backward_(logits: Tensor, labels: Tensor, mask: Tensor, logp: Tensor, entropy: Tensor,
                              lse: Tensor, grad_logp: Tensor, grad_entropy: Tensor, temperature: float,
                              with_entropy: bool, backend: str) -> None:
    _run("token_logprobs_backward", logits.device, backend, logits, labels, mask, logp, entropy, lse, grad_logp,
         grad_entropy, temperature, with_entropy, logits)


@_token_logprobs_backward_.register_fake
def _(logits, labels, mask, logp, entropy, lse, grad_logp, grad_entropy, temperature, with_entropy, backend):
    return None


# Backward implementations write dL/dlogits into ``out`` (logits' shape and dtype), which may be
# ``logits`` itself.
@register_backend("token_logprobs_backward", "reference")
def _token_logprobs_backward_ref(logits, labels, mask, logp, entropy, lse, grad_logp, grad_entropy, temperature,
                                 with_entropy, out):
    g = ref.token_logprobs_backward(_rows(logits), labels, mask, grad_logp, grad_entropy if with_entropy else None,
                                    temperature)
    out.copy_(g.reshape(logits.shape))


@register_backend("token_logprobs_backward", "cpp")
def _token_logprobs_backward_cpp(logits, labels, mask, logp, entropy, lse, grad_logp, grad_entropy, temperature,
                                 with_entropy, out):
    mod = _native.cpu_module()
    z = _unit_vocab_stride(logits)
    dst = _unit_vocab_stride_out(out)
    n, vocab, rpb, sb, st = row_geometry(z)
    _, _, _, gsb, gst = row_geometry(dst)
    if n:
        dt = _acc(z)
        y, m = labels.contiguous(), mask.contiguous()
        gl = grad_logp.to(dt).contiguous()
        ge = grad_entropy.to(dt).contiguous()
        lse64 = lse.to(torch.float64).contiguous()
        mod.token_logprobs_backward_cpu(
            z.data_ptr(), _native.dtype_code("logits", z), n, vocab, rpb, sb, st,
            _native.ptr("labels", y), _native.dtype_code("labels", y), _native.ptr("mask", m, torch.bool),
            _native.ptr("logp", logp, dt), _native.ptr("entropy", entropy, dt),
            _native.ptr("lse", lse64, torch.float64),
            _native.ptr("grad_logp", gl), _native.ptr("grad_entropy", ge), float(temperature), bool(with_entropy),
            dst.data_ptr(), gsb, gst,
        )
    if dst is not out:
        out.copy_(dst)


@register_backend("token_logprobs_backward", "triton")
def _token_logprobs_backward_triton(logits, labels, mask, logp, entropy, lse, grad_logp, grad_entropy,
                                    temperature, with_entropy, out):
    from .kernels import logprob as k

    z = _unit_vocab_stride(logits)
    dst = _unit_vocab_stride_out(out)
    dt = _acc(z)
    k.token_logprobs_bwd(z, labels.contiguous(), mask.contiguous(), logp.contiguous(), entropy.contiguous(),
                         lse.to(torch.float64).contiguous(), grad_logp.to(dt).contiguous(),
                         grad_entropy.to(dt).contiguous(),
                         float(temperature), bool(with_entropy), dst)
    if dst is not out:
        out.copy_(dst)


def _tlp_setup(ctx, inputs, output):
    logits, labels, mask, temperature, with_entropy, inplace_backward, backend = inputs
    logp, ent, lse = output
    ctx.save_for_backward(logits, labels, mask, logp, ent, lse)
    ctx.temperature, ctx.with_entropy, ctx.inplace, ctx.backend = temperature, with_entropy, inplace_backward, backend


def _tlp_backward(ctx, g_logp, g_ent, g_lse):
    logits, labels, mask, logp, ent, lse = ctx.saved_tensors
    n = labels.shape[0]
    dt = logp.dtype
    g_logp = g_logp if g_logp is not None else logits.new_zeros(n, dtype=dt)
    g_ent = g_ent if g_ent is not None and ctx.with_entropy else logits.new_zeros(n, dtype=dt)
    args = (labels, mask, logp, ent, lse, g_logp, g_ent, ctx.temperature, ctx.with_entropy, ctx.backend)
    if ctx.inplace:
        _token_logprobs_backward_(logits, *args)
        grad = logits
    else:
        grad = _token_logprobs_backward(logits, *args)
    return grad, None, None, None, None, None, None


_token_logprobs.register_autograd(_tlp_backward, setup_context=_tlp_setup)


def token_logprobs(logits: Tensor, labels: Tensor, mask: Tensor, temperature: float = 1.0,
                   with_entropy: bool = True, inplace_backward: bool = False,
                   backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Per-token log-prob of the label and entropy (SPEC 2), differentiable in logits.

    Args:
        logits: (N, V) or (B, T, V) float32/bfloat16/float16 (float64 for the oracle); rows may be
            strided, the vocabulary should be contiguous (else it is copied).
        labels: (N,) int32/int64 with N = B * T; ignored where mask is False.
        mask: (N,) bool, the tokens to compute.
        inplace_backward: write dL/dlogits into the logits buffer (no N x V allocation); the
            logits must not be needed by anything else afterwards.
    Returns:
        (logp, entropy), each (N,) float32 (float64 for float64 logits), 0 where masked out.
    """
    logp, ent, _ = _token_logprobs(logits, labels, mask, float(temperature), bool(with_entropy),
                                   bool(inplace_backward), backend)
    return logp, ent


# From hidden states (N, H) and the lm_head weight (V, H): ``rows`` (M,) int64 lists the tokens to
# compute (None: all N); the others cost nothing and get 0. The compiled backends run the chunked
# algorithm of ``linear_head`` with the same backend's token_logprobs kernels as the epilogue.
def _epilogue(backend: str):
    return _IMPLS["token_logprobs"][backend], _IMPLS["token_logprobs_backward"][backend]


def _chunk_for(chunk: int, weight: Tensor, hidden: Tensor) -> int:
    from . import linear_head

    return chunk if chunk > 0 else linear_head.auto_chunk(weight.shape[0], hidden.dtype, hidden.device)


def _rows_mask(rows: Optional[Tensor], n: int, device) -> Optional[Tensor]:
    if rows is None:
        return None
    return torch.zeros(n, dtype=torch.bool, device=device).index_fill_(0, rows, True)


@torch.library.custom_op("steppo_fast::linear_token_logprobs", mutates_args=())
def _linear_token_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                           rows: Optional[Tensor], temperature: float, with_entropy: bool, chunk: int,
                           fp32_weight_grad: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    # fp32_weight_grad is used by the backward only (grad_W accumulated across chunks in fp32).
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
        from . import linear_head

        return linear_head.forward_stats(_epilogue(kind), hidden, weight, bias, labels, rows, temperature,
                                         with_entropy, _chunk_for(chunk, weight, hidden))

    def bwd(hidden, weight, bias, labels, rows, logp, entropy, lse, grad_logp, grad_entropy, temperature,
            with_entropy, chunk, need_hidden, need_weight, need_bias, fp32_weight_grad):
        from . import linear_head

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
    Differentiable in hidden, weight and bias; returns two (N,) float32 tensors.
    """
    logp, ent, _ = _linear_token_logprobs(hidden, weight, bias, labels, rows, float(temperature),
                                          bool(with_entropy), int(chunk), bool(fp32_weight_grad), backend)
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
        from . import linear_head

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
    """
    loss, m, _, _, _, _, _ = _linear_policy_loss(
        hidden, weight, bias, labels, rows, token_step, step_offsets, int(num_steps), [int(b) for b in bounds],
        [int(s) for s in split_step], old_logp, advantages, weights, ref_logp, ratio_level, float(clip_low),
        float(clip_high), None if dual_clip is None else float(dual_clip), agg_mode, float(entropy_coef),
        float(kl_coef), kl_type, _opt_float(global_num_tokens), _opt_float(global_num_steps),
        _opt_float(norm_constant), float(temperature), bool(with_entropy), bool(need_hidden), bool(need_weight),
        bool(need_bias), bool(fp32_weight_grad), backend)
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


# ====================================================== SPEC 3-6: credit assignment
@torch.library.custom_op("steppo_fast::step_rewards", mutates_args=())
def _step_rewards(token_rewards: Tensor, token_step: Tensor, step_tokens: Tensor, step_token_offsets: Tensor,
                  backend: str) -> Tensor:
    return _run("step_rewards", token_rewards.device, backend, token_rewards, token_step, step_tokens,
                step_token_offsets)


@_step_rewards.register_fake
def _(token_rewards, token_step, step_tokens, step_token_offsets, backend):
    return token_rewards.new_empty(step_token_offsets.shape[0] - 1, dtype=_acc(token_rewards))


@register_backend("step_rewards", "reference")
def _step_rewards_ref(token_rewards, token_step, step_tokens, step_token_offsets):
    return ref.step_rewards(token_rewards, token_step, step_token_offsets.numel() - 1)


@register_backend("step_rewards", "cpp")
def _step_rewards_cpp(token_rewards, token_step, step_tokens, step_token_offsets):
    mod = _native.cpu_module()
    out = torch.empty(step_token_offsets.numel() - 1, dtype=_acc(token_rewards))
    r = token_rewards.contiguous()
    mod.step_rewards_cpu(
        _native.ptr("token_rewards", r), _native.dtype_code("token_rewards", r),
        _native.ptr("step_tokens", step_tokens, torch.int64),
        _native.ptr("step_token_offsets", step_token_offsets, torch.int64),
        out.numel(), out.data_ptr(), _native.dtype_code("out", out),
    )
    return out


@register_backend("step_rewards", "cuda")
def _step_rewards_cuda(token_rewards, token_step, step_tokens, step_token_offsets):
    mod = _native.cuda_module()
    out = torch.empty(step_token_offsets.numel() - 1, dtype=_acc(token_rewards), device=token_rewards.device)
    r = token_rewards.contiguous()
    mod.step_rewards_cuda(
        _native.ptr("token_rewards", r), _native.dtype_code("token_rewards", r),
        _native.ptr("step_tokens", step_tokens, torch.int64),
        _native.ptr("step_token_offsets", step_token_offsets, torch.int64),
        out.numel(), out.data_ptr(), _native.dtype_code("out", out), _native.cuda_stream(r), r.device.index or 0,
    )
    return out


@register_backend("step_rewards", "triton")
def _step_rewards_triton(token_rewards, token_step, step_tokens, step_token_offsets):
    from .kernels import step_rewards as k

    return k.step_rewards(token_rewards.contiguous(), step_tokens.contiguous(), step_token_offsets.contiguous())


def step_rewards(token_rewards: Tensor, token_step: Tensor, step_tokens: Tensor, step_token_offsets: Tensor,
                 backend: str = "auto") -> Tensor:
    """r_s = sum of the token rewards of step s's agent tokens (SPEC 3).

    Args:
        token_rewards: (N,) float; token_step: (N,) int32 step id or -1;
        step_tokens, step_token_offsets: the layout's CSR token list (int64).
    Returns:
        (S,) float32 (float64 for float64 rewards).
    """
    return _step_rewards(token_rewards, token_step, step_tokens, step_token_offsets, backend)


@torch.library.custom_op("steppo_fast::broadcast_to_tokens", mutates_args=())
def _broadcast_to_tokens(step_values: Tensor, token_step: Tensor, backend: str) -> Tensor:
    return _run("broadcast_to_tokens", step_values.device, backend, step_values, token_step)


@_broadcast_to_tokens.register_fake
def _(step_values, token_step, backend):
    return step_values.new_empty(token_step.shape)


register_backend("broadcast_to_tokens", "reference")(ref.broadcast_to_tokens)


def _native_float(name: str, t: Tensor) -> Tensor:
    """A contiguous float tensor the C++ kernels read, with its dtype checked."""
    t = t.contiguous()
    _native.dtype_code(name, t)
    return t


def _native_index(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype).contiguous()


def _on_device(t: Tensor):
    """(stream, device index) arguments of a _C_cuda call for tensors on t's device."""
    return _native.cuda_stream(t), t.device.index or 0


def _launch(kind: str, name: str, like: Tensor, *args):
    """Calls kernel ``name`` of _C (kind "cpp": ``name_cpu``) or _C_cuda (kind "cuda":
    ``name_cuda``, with the stream and device of ``like`` appended)."""
    if kind == "cpp":
        return getattr(_native.cpu_module(), f"{name}_cpu")(*args)
    return getattr(_native.cuda_module(), f"{name}_cuda")(*args, *_on_device(like))


def _register_native(op: str):
    """Decorator for ``factory(kind) -> impl``: registers the impl of both compiled backends."""
    def deco(factory):
        for kind in ("cpp", "cuda"):
            register_backend(op, kind)(factory(kind))
        return factory
    return deco


@_register_native("broadcast_to_tokens")
def _broadcast_to_tokens_native(kind):
    def impl(step_values, token_step):
        v = _native_float("step_values", step_values)
        ts = _native_index(token_step, torch.int32)
        out = torch.empty(ts.shape, dtype=v.dtype if v.dtype in (torch.float32, torch.float64) else torch.float32,
                          device=v.device)
        # With no steps every token_step is -1: the kernel writes zeros and reads no value.
        _launch(kind, "broadcast_to_tokens", v, v.data_ptr(), _native.dtype_code("step_values", v), ts.data_ptr(),
                ts.numel(), out.data_ptr(), _native.dtype_code("out", out))
        return out.to(step_values.dtype)  # same dtype as the values (a copy is exact)
    return impl


def broadcast_to_tokens(step_values: Tensor, token_step: Tensor, backend: str = "auto") -> Tensor:
    """(N,) tensor: step_values[token_step[t]] on agent tokens, 0 elsewhere (SPEC 4)."""
    return _broadcast_to_tokens(step_values, token_step, backend)


@torch.library.custom_op("steppo_fast::step_gae", mutates_args=())
def _step_gae(step_rewards: Tensor, step_values: Tensor, traj_step_offsets: Tensor, gamma: float, lam: float,
              backend: str) -> Tuple[Tensor, Tensor]:
    return _run("step_gae", step_rewards.device, backend, step_rewards, step_values, traj_step_offsets, gamma, lam)


@_step_gae.register_fake
def _(step_rewards, step_values, traj_step_offsets, gamma, lam, backend):
    dt = _acc(step_rewards, step_values)
    return step_rewards.new_empty(step_rewards.shape, dtype=dt), step_rewards.new_empty(step_rewards.shape, dtype=dt)


register_backend("step_gae", "reference")(ref.step_gae)


@_register_native("step_gae")
def _step_gae_native(kind):
    def impl(step_rewards, step_values, traj_step_offsets, gamma, lam):
        r, v = _native_float("step_rewards", step_rewards), _native_float("step_values", step_values)
        off = _native_index(traj_step_offsets, torch.int64)
        dt = _acc(step_rewards, step_values)
        adv, ret = torch.empty(r.shape, dtype=dt, device=r.device), torch.empty(r.shape, dtype=dt, device=r.device)
        _launch(kind, "step_gae", r, r.data_ptr(), _native.dtype_code("step_rewards", r), v.data_ptr(),
                _native.dtype_code("step_values", v), off.data_ptr(), off.numel() - 1, float(gamma), float(lam),
                adv.data_ptr(), ret.data_ptr(), _native.dtype_code("adv", adv))
        return adv, ret
    return impl


def step_gae(step_rewards: Tensor, step_values: Tensor, traj_step_offsets: Tensor, gamma: float = 1.0,
             lam: float = 1.0, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Unwhitened step-level GAE (SPEC 4): (advantages, returns), each (S,)."""
    return _step_gae(step_rewards, step_values, traj_step_offsets, float(gamma), float(lam), backend)


@torch.library.custom_op("steppo_fast::token_gae", mutates_args=())
def _token_gae(token_rewards: Tensor, token_values: Tensor, step_tokens: Tensor, step_token_offsets: Tensor,
               traj_step_offsets: Tensor, gamma: float, lam: float, backend: str) -> Tuple[Tensor, Tensor]:
    return _run("token_gae", token_rewards.device, backend, token_rewards, token_values, step_tokens,
                step_token_offsets, traj_step_offsets, gamma, lam)


@_token_gae.register_fake
def _(token_rewards, token_values, step_tokens, step_token_offsets, traj_step_offsets, gamma, lam, backend):
    dt = _acc(token_rewards, token_values)
    return token_rewards.new_empty(token_rewards.shape, dtype=dt), token_rewards.new_empty(token_rewards.shape,
                                                                                            dtype=dt)


register_backend("token_gae", "reference")(ref.token_gae)


@_register_native("token_gae")
def _token_gae_native(kind):
    def impl(token_rewards, token_values, step_tokens, step_token_offsets, traj_step_offsets, gamma, lam):
        r, v = _native_float("token_rewards", token_rewards), _native_float("token_values", token_values)
        tok = _native_index(step_tokens, torch.int64)
        soff = _native_index(step_token_offsets, torch.int64)
        toff = _native_index(traj_step_offsets, torch.int64)
        dt = _acc(token_rewards, token_values)
        adv, ret = torch.empty(r.shape, dtype=dt, device=r.device), torch.empty(r.shape, dtype=dt, device=r.device)
        _launch(kind, "token_gae", r, r.data_ptr(), _native.dtype_code("token_rewards", r), v.data_ptr(),
                _native.dtype_code("token_values", v), r.numel(), tok.data_ptr(), soff.data_ptr(), toff.data_ptr(),
                toff.numel() - 1, float(gamma), float(lam), adv.data_ptr(), ret.data_ptr(),
                _native.dtype_code("adv", adv))
        return adv, ret
    return impl


def token_gae(token_rewards: Tensor, token_values: Tensor, step_tokens: Tensor, step_token_offsets: Tensor,
              traj_step_offsets: Tensor, gamma: float = 1.0, lam: float = 1.0,
              backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Unwhitened token-level GAE across steps (SPEC 5): (advantages, returns), each (N,)."""
    return _token_gae(token_rewards, token_values, step_tokens, step_token_offsets, traj_step_offsets,
                      float(gamma), float(lam), backend)


# Whitening is split in two so that data-parallel callers can all-reduce the
# moments in between: moments -> (all-reduce) -> apply.
WHITEN_MODES = ("step", "token")


@torch.library.custom_op("steppo_fast::whiten_moments", mutates_args=())
def _whiten_moments(x: Tensor, mask: Optional[Tensor], backend: str) -> Tensor:
    return _run("whiten_moments", x.device, backend, x, mask)


@_whiten_moments.register_fake
def _(x, mask, backend):
    return x.new_empty(3, dtype=torch.float64)


@register_backend("whiten_moments", "reference")
def _whiten_moments_ref(x, mask):
    xd = x.double()
    if mask is not None:
        m = mask.bool()
        xd = torch.where(m, xd, torch.zeros_like(xd))
        cnt = m.sum().double()
    else:
        cnt = torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)
    return torch.stack([cnt, xd.sum(), (xd * xd).sum()])


@_register_native("whiten_moments")
def _whiten_moments_native(kind):
    def impl(x, mask):
        xc = _native_float("x", x)
        m = mask.bool().contiguous() if mask is not None else None
        out = torch.empty(3, dtype=torch.float64, device=x.device)
        work, ws = (), None
        if kind == "cuda":  # per-block partial sums; ws stays referenced until the launch is queued
            ws = torch.empty(_native.cuda_module().whiten_moments_cuda_workspace(xc.numel()), dtype=torch.float64,
                             device=x.device)
            work = (ws.data_ptr(),)
        _launch(kind, "whiten_moments", xc, xc.data_ptr(), _native.dtype_code("x", xc),
                m.data_ptr() if m is not None else 0, xc.numel(), out.data_ptr(), *work)
        return out
    return impl


@torch.library.custom_op("steppo_fast::whiten_apply", mutates_args=())
def _whiten_apply(x: Tensor, mask: Optional[Tensor], moments: Tensor, mode: str, backend: str) -> Tensor:
    if mode not in WHITEN_MODES:
        raise ValueError(f"mode must be one of {WHITEN_MODES}, got {mode!r}")
    return _run("whiten_apply", x.device, backend, x, mask, moments, mode)


@_whiten_apply.register_fake
def _(x, mask, moments, mode, backend):
    return x.new_empty(x.shape, dtype=_acc(x))


@register_backend("whiten_apply", "reference")
def _whiten_apply_ref(x, mask, moments, mode):
    dt = _acc(x)
    n, s, ss = moments[0], moments[1], moments[2]
    mean = s / n.clamp(min=1)
    # Unbiased variance from the moments; fewer than 2 elements give 0.
    var = ((ss - s * mean) / (n - 1).clamp(min=1)).clamp(min=0)
    var = torch.where(n >= 2, var, torch.zeros_like(var))
    xd = x.double()
    if mode == "step":
        out = (xd - mean) / (var.sqrt() + ref.WHITEN_STEP_EPS)
    else:
        out = (xd - mean) * torch.rsqrt(var + ref.WHITEN_TOKEN_EPS)
    if mask is not None:
        out = torch.where(mask.bool(), out, torch.zeros_like(out))
    return out.to(dt)


@_register_native("whiten_apply")
def _whiten_apply_native(kind):
    def impl(x, mask, moments, mode):
        xc = _native_float("x", x)
        m = mask.bool().contiguous() if mask is not None else None
        mo = moments.to(torch.float64).contiguous()
        out = torch.empty(xc.shape, dtype=_acc(x), device=x.device)
        eps = ref.WHITEN_STEP_EPS if mode == "step" else ref.WHITEN_TOKEN_EPS
        _launch(kind, "whiten_apply", xc, xc.data_ptr(), _native.dtype_code("x", xc),
                m.data_ptr() if m is not None else 0, xc.numel(), mo.data_ptr(), 0 if mode == "step" else 1, eps,
                out.data_ptr(), _native.dtype_code("out", out))
        return out
    return impl


def whiten(x: Tensor, mask: Optional[Tensor] = None, mode: str = "step", process_group=None,
           backend: str = "auto") -> Tensor:
    """Whitening over all entries (or the masked ones), optionally across data-parallel ranks.

    ``mode="step"`` (SPEC 4): (x - mean) / (std + 1e-8). ``mode="token"`` (SPEC 5, verl's
    ``masked_whiten``): (x - mean) * rsqrt(var + 1e-8), 0 outside ``mask``. The std is
    unbiased and taken as 0 below 2 elements. With ``process_group``, one all-reduce of
    (count, sum, sum of squares) in float64 makes every rank use the global statistics.

    Args:
        x: (M,) float; mask: (M,) bool or None.
    Returns:
        (M,) float32 (float64 for float64 x).
    """
    if mode not in WHITEN_MODES:
        raise ValueError(f"mode must be one of {WHITEN_MODES}, got {mode!r}")
    moments = _whiten_moments(x, mask, backend)
    if process_group is not None:
        import torch.distributed as dist

        if process_group is True:
            process_group = None  # the default group
        dist.all_reduce(moments, op=dist.ReduceOp.SUM, group=process_group)
    return _whiten_apply(x, mask, moments, mode, backend)


GROUP_NORMS = ("mean_std", "mean", "rloo")
SINGLETONS = ("unit", "zero")


@torch.library.custom_op("steppo_fast::group_advantage", mutates_args=())
def _group_advantage(values: Tensor, group: Tensor, subkey: Optional[Tensor], norm: str, singleton: str,
                     eps: float, backend: str) -> Tensor:
    if norm not in GROUP_NORMS:
        raise ValueError(f"norm must be one of {GROUP_NORMS}, got {norm!r}")
    if singleton not in SINGLETONS:
        raise ValueError(f"singleton must be one of {SINGLETONS}, got {singleton!r}")
    return _run("group_advantage", values.device, backend, values, group, subkey, norm, singleton, eps)


@_group_advantage.register_fake
def _(values, group, subkey, norm, singleton, eps, backend):
    return values.new_empty(values.shape, dtype=_acc(values))


@register_backend("group_advantage", "reference")
def _group_advantage_ref(values, group, subkey, norm, singleton, eps):
    if values.numel() == 0:
        return values.to(_acc(values)).clone()
    keys = group.long() if subkey is None else torch.stack([group.long(), subkey.long()], 1)
    _, gid = torch.unique(keys, dim=0, return_inverse=True)
    return ref.group_normalize(values, gid, norm, singleton, eps)


@_register_native("group_advantage")
def _group_advantage_native(kind):
    def impl(values, group, subkey, norm, singleton, eps):
        v = _native_float("values", values)
        g = _native_index(group, torch.int64)
        k = _native_index(subkey, torch.int64) if subkey is not None else None
        out = torch.empty(v.shape, dtype=_acc(values), device=v.device)
        work, ws = (), None
        if kind == "cuda":  # radix-sort keys, indices and CUB temporary storage
            nbytes = _native.cuda_module().group_advantage_cuda_workspace(v.numel(), v.device.index or 0)
            ws = torch.empty(nbytes, dtype=torch.uint8, device=v.device)
            work = (ws.data_ptr(), nbytes)
        _launch(kind, "group_advantage", v, v.data_ptr(), _native.dtype_code("values", v), g.data_ptr(),
                k.data_ptr() if k is not None else 0, v.numel(), GROUP_NORMS.index(norm), SINGLETONS.index(singleton),
                float(eps), out.data_ptr(), _native.dtype_code("out", out), *work)
        return out
    return impl


def group_advantage(values: Tensor, group: Tensor, subkey: Optional[Tensor] = None, norm: str = "mean_std",
                    singleton: str = "unit", eps: float = ref.GROUP_EPS, backend: str = "auto") -> Tensor:
    """Normalises values within groups of equal ``group`` (and ``subkey``) ids (SPEC 6).

    ``norm``: "mean_std" (x - mean) / (std + eps) with unbiased std (GRPO); "mean"
    x - mean (Dr. GRPO, REINFORCE++ baseline); "rloo" n (x - mean) / (n - 1).
    ``singleton``: a group of one is treated as mean 0, std 1 ("unit": GRPO, RLOO) or
    gives 0 ("zero": GiGPO step groups).

    Args:
        values: (M,) float; group: (M,) int64; subkey: (M,) int64 or None.
    Returns:
        (M,) float32 (float64 for float64 values).
    """
    return _group_advantage(values, group, subkey, norm, singleton, float(eps), backend)


# ================================================================ SPEC 7-8: losses
POLICY_METRICS = ("pg_loss", "pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "ratio_mean", "ratio_min", "ratio_max",
                  "entropy", "kl")


@torch.library.custom_op("steppo_fast::policy_loss", mutates_args=())
def _policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, token_step: Tensor, weights: Optional[Tensor],
                 entropy: Optional[Tensor], ref_logp: Optional[Tensor], num_steps: int, ratio_level: str,
                 clip_low: float, clip_high: float, dual_clip: Optional[float], agg_mode: str, entropy_coef: float,
                 kl_coef: float, kl_type: str, global_num_tokens: Optional[float], global_num_steps: Optional[float],
                 norm_constant: Optional[float], backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if agg_mode == "seq-mean-token-sum-norm" and norm_constant is None:  # checked here for every backend
        raise ValueError("agg_mode 'seq-mean-token-sum-norm' needs norm_constant (verl's default: T)")
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
    from .kernels import policy_loss as k

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
        logp, old_logp, advantages: (N,) float; token_step: (N,) int32/int64 step id, -1 off-step.
        num_steps: S, the number of steps ids in token_step index.
        weights, entropy, ref_logp: optional (N,) float.
    Returns:
        (loss, metrics): 0-dim loss and a dict of 0-dim metrics named in ``POLICY_METRICS``.
    No host synchronisation; all arguments are checked in ``losses.check_loss_args``.
    """
    loss, m, _, _ = _policy_loss(logp, old_logp, advantages, token_step, weights, entropy, ref_logp, int(num_steps),
                                 ratio_level, float(clip_low), float(clip_high),
                                 None if dual_clip is None else float(dual_clip), agg_mode, float(entropy_coef),
                                 float(kl_coef), kl_type, _opt_float(global_num_tokens), _opt_float(global_num_steps),
                                 _opt_float(norm_constant), backend)
    return loss, dict(zip(POLICY_METRICS, m.detach().unbind(0)))


def _opt_float(x) -> Optional[float]:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"global counts and norm_constant must be scalars, got shape {tuple(x.shape)}")
        x = x.item()  # a host value: the caller passes global counts it already holds
    return float(x)


@torch.library.custom_op("steppo_fast::value_loss", mutates_args=())
def _value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Optional[Tensor], clip: float,
                backend: str) -> Tuple[Tensor, Tensor, Tensor]:
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
        values, old_values, returns: (S,) float; mask: (S,) bool or None (all steps).
    Differentiable in ``values``.
    """
    loss, clipfrac, _ = _value_loss(values, old_values, returns, mask, float(clip), backend)
    return loss, clipfrac.detach()


def registered_ops() -> Sequence[str]:
    """Names of every op in the registry (``steppo_fast::<name>``)."""
    return tuple(sorted(_IMPLS))
