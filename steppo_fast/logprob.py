"""Token log-probs and entropy fronts (SPEC section 2).

Shapes (B, T, V) or (N, V), masks from a tensor or a StepLayout, argument checks and
the optional label-range validation live here; the math is the registry's
``token_logprobs`` / ``linear_token_logprobs`` ops.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import ops
from .layout import StepLayout

MaskOrLayout = Union[None, Tensor, StepLayout]


def _mask_for(mask_or_layout: MaskOrLayout, lead_shape, device) -> Tensor:
    """The (N,) bool mask of the tokens to compute. A layout must describe exactly the tokens'
    shape, (B, T) or (N,): a (T, B) tensor with a (B, T) layout is refused, not reinterpreted.
    A float mask is read as mask != 0 (NaN entries are refused by ``_check_labels`` when validating)."""
    n = 1
    for d in lead_shape:
        n *= d
    if mask_or_layout is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    if isinstance(mask_or_layout, StepLayout):
        lay = mask_or_layout
        if tuple(lead_shape) not in (tuple(lay.token_shape), (lay.num_tokens,)):
            raise ValueError(f"the layout describes {tuple(lay.token_shape)} tokens but the leading shape is "
                             f"{tuple(lead_shape)}; it must be {tuple(lay.token_shape)} or ({lay.num_tokens},)")
        if lay.device != device:
            raise ValueError(f"the layout is on {lay.device} but the logits are on {device}")
        return lay.token_mask
    m = mask_or_layout
    if not isinstance(m, Tensor):
        raise TypeError(f"mask_or_layout must be a tensor, a StepLayout or None, got {type(m).__name__}")
    if tuple(m.shape) != tuple(lead_shape) and tuple(m.shape) != (n,):
        raise ValueError(f"mask must have shape {tuple(lead_shape)}, got {tuple(m.shape)}")
    if m.device != device:
        raise ValueError(f"mask is on {m.device} but the logits are on {device}")
    if m.is_complex():
        raise TypeError(f"mask must be a bool, integer or float tensor, got {m.dtype}")
    return (m if m.dtype == torch.bool else m != 0).reshape(-1)


def _flat_labels(labels: Tensor, lead_shape, device, inputs: str = "logits") -> Tensor:
    """labels (lead_shape) int32/int64 on ``device``, flattened (no pass over the values);
    ``inputs`` names what they must match in the errors."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"labels must be int32 or int64, got {labels.dtype}")
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(f"labels must have shape {tuple(lead_shape)} to match the {inputs}, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the {inputs} are on {device}")
    return labels.reshape(-1)


def _check_labels(labels: Tensor, lead_shape, device, vocab: int, mask: Tensor, validate: bool,
                  raw_mask=None) -> Tensor:
    """labels (lead_shape) int32/int64 on ``device``, flattened. With ``validate``, one host sync
    checks that every masked-in label lies in [0, vocab) and that a float ``raw_mask`` holds no NaN."""
    y = _flat_labels(labels, lead_shape, device)
    nan_mask = isinstance(raw_mask, Tensor) and raw_mask.is_floating_point()
    if validate and (y.numel() or nan_mask):
        bad = mask & ((y < 0) | (y >= vocab))
        flags = torch.stack([bad.any(), torch.isnan(raw_mask).any() if nan_mask else bad.new_zeros(())])
        bad_label, bad_mask = flags.tolist()  # one sync; validate=False skips it
        if bad_mask:
            i = int(torch.nonzero(torch.isnan(raw_mask.reshape(-1)))[0, 0])
            raise ValueError(f"mask holds NaN at token {i}; a float mask must hold 0 and 1")
        if bad_label:
            i = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"labels out of range [0, {vocab}) at masked-in token {i}: {int(y[i])}")
    return y


def _is_dtensor(t) -> bool:
    from .vocab_parallel import is_dtensor

    return is_dtensor(t)


def _check_temperature(temperature: float) -> float:
    """A finite number > 0 (not a bool)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a number > 0 (finite, not a bool), got {temperature!r}")
    return float(temperature)


def token_logprobs(logits: Tensor, labels: Tensor, mask_or_layout: MaskOrLayout = None, temperature: float = 1.0,
                   with_entropy: bool = True, inplace_backward: bool = False, validate: bool = True,
                   backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Log-prob of each label and the entropy of each token's distribution (SPEC 2).

    One pass over each masked-in row forward (online log-sum-exp), one fused pass backward;
    masked-out rows are skipped. On CUDA this runs the Triton kernels of
    ``steppo_fast.kernels.logprob``, on CPU the C++ kernels of ``steppo_fast._C``.

    Args:
        logits: (B, T, V) or (N, V), float32/bfloat16/float16 (float64 for the oracle). Rows may
            be strided (``logits[:, :-1]`` is read in place); the vocabulary should be contiguous.
        labels: (B, T) or (N,), int32/int64; ignored on masked-out tokens (-100 is fine).
        mask_or_layout: bool mask of labels' shape, a StepLayout (its agent tokens), or None (all).
        temperature: tau > 0; logits are divided by it.
        with_entropy: compute the entropy (else it is returned as zeros and gets no gradient).
        inplace_backward: write dL/dlogits into the logits buffer instead of a new N x V tensor.
            Only when nothing else needs the logits after this call (autograd raises if another
            op saved them).
        validate: check masked-in labels lie in [0, V) and a float mask holds no NaN (one host
            sync). Without it, a bad label gives NaN in its row; nothing outside the row is read.
    Returns:
        (logp, entropy) shaped like labels, float32 (float64 for float64 logits), 0 on
        masked-out tokens. Differentiable in logits.
    """
    if _is_dtensor(logits):  # vocabulary-split (or replicated) DTensor logits
        from . import vocab_parallel

        return vocab_parallel.token_logprobs(logits, labels, mask_or_layout, temperature, with_entropy=with_entropy,
                                             inplace_backward=inplace_backward, validate=validate, backend=backend)
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError("logits must be a float tensor")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must have shape (N, V) or (B, T, V), got {tuple(logits.shape)}")
    tau = _check_temperature(temperature)
    lead, vocab = tuple(logits.shape[:-1]), logits.shape[-1]
    mask = _mask_for(mask_or_layout, lead, logits.device)
    y = _check_labels(labels, lead, logits.device, vocab, mask, validate, mask_or_layout)
    if not y.is_contiguous():
        y = y.contiguous()
    logp, ent = ops.token_logprobs(logits, y, mask, tau, with_entropy, inplace_backward, backend)
    return logp.reshape(lead), ent.reshape(lead)


def _check_head(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    if not isinstance(hidden, Tensor) or not hidden.is_floating_point():
        raise TypeError(f"hidden must be a float tensor, got {getattr(hidden, 'dtype', type(hidden).__name__)}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must have shape (N, H) or (B, T, H), got {tuple(hidden.shape)}")
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise TypeError("weight must be a 2-D float tensor (V, H)")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden size mismatch: hidden has H = {hidden.shape[-1]}, weight (V, H) has "
                         f"H = {weight.shape[1]}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}; cast one of them")
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],) or bias.device != hidden.device:
            raise ValueError(f"bias must be a ({weight.shape[0]},) tensor on {hidden.device}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")


def _rows_for(mask_or_layout: MaskOrLayout, mask: Tensor) -> Optional[Tensor]:
    """Indices of the tokens to compute: a layout's step_tokens (steps contiguous), a mask's
    True positions (one host sync to learn their number), or None for every token."""
    if mask_or_layout is None:
        return None
    if isinstance(mask_or_layout, StepLayout):
        return mask_or_layout.step_tokens
    return torch.nonzero(mask).squeeze(1)


def linear_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, mask_or_layout: MaskOrLayout = None,
                          temperature: float = 1.0, bias: Optional[Tensor] = None, chunk: Optional[int] = None,
                          with_entropy: bool = True, fp32_weight_grad: bool = False, validate: bool = True,
                          backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """(logp, entropy) straight from hidden states and the lm_head weight (SPEC 2), without
    materialising the (N, V) logits.

    The forward multiplies chunks of agent tokens by the weight and keeps three floats per token;
    the backward multiplies them again and writes grad_hidden, grad_weight and grad_bias chunk by
    chunk (``steppo_fast.linear_head``). Masked-out tokens never enter a product.

    Args:
        hidden: (B, T, H) or (N, H), float32/bfloat16/float16 (float64 for the oracle).
        weight: (V, H), the lm_head weight, same dtype and device; bias: (V,) or None.
        labels: (B, T) or (N,) int32/int64; ignored on masked-out tokens (-100 is fine).
        mask_or_layout: a StepLayout (its agent tokens; no host sync), a bool mask of labels'
            shape (one host sync to count its tokens), or None (every token).
        temperature: tau > 0.
        chunk: tokens per chunk; None picks ``linear_head.auto_chunk`` (32 MiB of logits and at least
            256 tokens on the CPU, 1 GiB and at least 1024 tokens on a GPU). Results do not depend on
            it beyond rounding.
        with_entropy: compute the entropy (else zeros, and it gets no gradient).
        fp32_weight_grad: accumulate grad_weight across chunks in fp32 (bf16/fp16 weights; the
            result is rounded to the weight's dtype once, at the end).
        validate: check masked-in labels lie in [0, V) (one host sync).
    Returns:
        (logp, entropy) shaped like labels, float32, 0 on masked-out tokens. Differentiable in
        hidden, weight and bias; a weight that does not require grad costs no grad_W product.
    """
    if _is_dtensor(weight):  # a DTensor lm_head (vocabulary-split, replicated or FSDP2-sharded)
        from . import vocab_parallel

        return vocab_parallel.linear_token_logprobs(hidden, weight, labels, mask_or_layout, temperature, bias,
                                                    chunk=chunk, with_entropy=with_entropy,
                                                    fp32_weight_grad=fp32_weight_grad, validate=validate,
                                                    backend=backend)
    _check_head(hidden, weight, bias)
    tau = _check_temperature(temperature)
    chunk = _check_chunk(chunk)
    lead = tuple(hidden.shape[:-1])
    mask = _mask_for(mask_or_layout, lead, hidden.device)
    y = _check_labels(labels, lead, hidden.device, weight.shape[0], mask, validate, mask_or_layout)
    rows = _rows_for(mask_or_layout, mask)
    h = hidden.reshape(-1, hidden.shape[-1])
    logp, ent = ops.linear_token_logprobs(h, weight, y.contiguous(), rows, tau, bias, with_entropy, chunk,
                                          fp32_weight_grad, backend)
    return logp.reshape(lead), ent.reshape(lead)


def _check_chunk(chunk: Optional[int]) -> int:
    if chunk is None:
        return 0
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int (tokens per chunk) or None, got {chunk!r}")
    return chunk


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0,
                         reduction: str = "none", dist_process_group=None) -> Tuple[Tensor, Tensor]:
    """Drop-in for verl's ``linear_cross_entropy(hidden, weight, labels, temperature, reduction)``:
    (log_probs, entropy) of every token, float32, shaped like labels.

    Only ``reduction="none"`` (what verl's actor uses) is supported. With verl's tensor-parallel
    vocabulary split (``dist_process_group``, the weight this rank's rows) it is
    ``vocab_parallel.linear_cross_entropy``.
    """
    if reduction != "none":
        raise ValueError(f"reduction must be 'none' (per-token log-probs and entropy), got {reduction!r}")
    if dist_process_group is not None:
        from . import vocab_parallel

        return vocab_parallel.linear_cross_entropy(hidden, weight, labels, temperature, reduction, dist_process_group)
    return linear_token_logprobs(hidden, weight, labels, None, temperature)
