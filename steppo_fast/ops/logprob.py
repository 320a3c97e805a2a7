"""SPEC 2: per-token log-probs and entropy from logits (``steppo_fast::token_logprobs`` and its backward).

logits are (N, V) or (B, T, V) with a contiguous vocabulary and rows at any stride (for example
``logits[:, :-1]``); labels and mask are flat (N,). The forward returns (logp, entropy, lse): the
backward needs only these three floats per row besides the logits. Backends: the reference,
C++ (``_C``) and Triton (``kernels/logprob.py``).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .. import _native
from .. import reference as ref
from . import _guards as guard
from ._registry import _acc, _run, register_backend


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


def _check_rows(op: str, logits, labels, mask) -> int:
    """logits (N, V) or (B, T, V) float with V >= 1; labels (N,) int32/int64; mask (N,) bool."""
    guard.tensor(op, "logits", logits, "float")
    if logits.dim() not in (2, 3) or logits.shape[-1] < 1:
        raise ValueError(f"{op}: logits must have shape (N, V) or (B, T, V) with V >= 1, got {tuple(logits.shape)}")
    n = logits.shape[0] if logits.dim() == 2 else logits.shape[0] * logits.shape[1]
    guard.tensor(op, "labels", labels, "int", dim=1, numel=n, device=logits.device)
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: labels must be int32 or int64, got {labels.dtype}")
    guard.tensor(op, "mask", mask, "mask", dim=1, numel=n, device=logits.device)
    if mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be a bool tensor, got {mask.dtype}")
    return n


@torch.library.custom_op("steppo_fast::token_logprobs", mutates_args=())
def _token_logprobs(logits: Tensor, labels: Tensor, mask: Tensor, temperature: float, with_entropy: bool,
                    inplace_backward: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    _check_rows("token_logprobs", logits, labels, mask)
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"token_logprobs: temperature must be finite and > 0, got {temperature}")
    if inplace_backward:  # refused before any work: the backward would write rows over each other
        guard.no_internal_overlap("token_logprobs", "logits", logits)
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
    from ..kernels import logprob as k

    return k.token_logprobs_fwd(_unit_vocab_stride(logits), labels.contiguous(), mask.contiguous(),
                                float(temperature), bool(with_entropy))


@torch.library.custom_op("steppo_fast::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward(logits: Tensor, labels: Tensor, mask: Tensor, logp: Tensor, entropy: Tensor,
                             lse: Tensor, grad_logp: Tensor, grad_entropy: Tensor, temperature: float,
                             with_entropy: bool, backend: str) -> Tensor:
    _check_backward("token_logprobs_backward", logits, labels, mask, logp, entropy, lse, grad_logp, grad_entropy)
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
    _check_backward("token_logprobs_backward_", logits, labels, mask, logp, entropy, lse, grad_logp, grad_entropy)
    guard.no_internal_overlap("token_logprobs_backward_", "logits", logits)
    _run("token_logprobs_backward", logits.device, backend, logits, labels, mask, logp, entropy, lse, grad_logp,
         grad_entropy, temperature, with_entropy, logits)


@_token_logprobs_backward_.register_fake
def _(logits, labels, mask, logp, entropy, lse, grad_logp, grad_entropy, temperature, with_entropy, backend):
    return None


def _check_backward(op, logits, labels, mask, logp, entropy, lse, grad_logp, grad_entropy) -> None:
    n = _check_rows(op, logits, labels, mask)
    for name, t in (("logp", logp), ("entropy", entropy), ("lse", lse), ("grad_logp", grad_logp),
                    ("grad_entropy", grad_entropy)):
        guard.tensor(op, name, t, "float", dim=1, numel=n, device=logits.device)


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
    from ..kernels import logprob as k

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
        temperature: finite, > 0.
        inplace_backward: write dL/dlogits into the logits buffer (no N x V allocation); the
            logits must not be needed by anything else afterwards, and no two of their elements
            may share memory (an expanded view is refused with a ValueError).
    Returns:
        (logp, entropy), each (N,) float32 (float64 for float64 logits), 0 where masked out.
    A masked-in label outside [0, V) gives NaN in its row; nothing outside the logits is read.
    """
    op = "token_logprobs"
    tau = guard.number(op, "temperature", temperature, 0.0, lo_open=True)
    logp, ent, _ = _token_logprobs(logits, labels, mask, tau, guard.flag(op, "with_entropy", with_entropy),
                                   guard.flag(op, "inplace_backward", inplace_backward), backend)
    return logp, ent

