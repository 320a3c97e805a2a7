"""Token log-probs and entropy fronts (SPEC section 2).

Shapes (B, T, V) or (N, V), masks from a tensor or a StepLayout, argument checks and
the optional label-range validation live here; the math is the registry's
``token_logprobs`` / ``linear_token_logprobs`` ops.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import ops
from .layout import StepLayout

MaskOrLayout = Union[None, Tensor, StepLayout]


def _mask_for(mask_or_layout: MaskOrLayout, lead_shape, device) -> Tensor:
    n = 1
    for d in lead_shape:
        n *= d
    if mask_or_layout is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    if isinstance(mask_or_layout, StepLayout):
        lay = mask_or_layout
        if lay.num_tokens != n:
            raise ValueError(f"the layout describes {lay.token_shape} tokens but the logits have {tuple(lead_shape)}")
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
    return (m if m.dtype == torch.bool else m != 0).reshape(-1)


def _check_labels(labels: Tensor, lead_shape, device, vocab: int, mask: Tensor, validate: bool) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"labels must be int32 or int64, got {labels.dtype}")
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(f"labels must have shape {tuple(lead_shape)} to match the logits, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the logits are on {device}")
    y = labels.reshape(-1)
    if validate and y.numel():
        bad = mask & ((y < 0) | (y >= vocab))
        if bool(bad.any()):  # one sync; validate=False skips it
            i = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"labels out of range [0, {vocab}) at masked-in token {i}: {int(y[i])}")
    return y


def _check_temperature(temperature: float) -> float:
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
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
        validate: check masked-in labels lie in [0, V) (one host sync). Without it, a bad label
            gives NaN in its row; nothing outside the row is read.
    Returns:
        (logp, entropy) shaped like labels, float32 (float64 for float64 logits), 0 on
        masked-out tokens. Differentiable in logits.
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError("logits must be a float tensor")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must have shape (N, V) or (B, T, V), got {tuple(logits.shape)}")
    tau = _check_temperature(temperature)
    lead, vocab = tuple(logits.shape[:-1]), logits.shape[-1]
    mask = _mask_for(mask_or_layout, lead, logits.device)
    y = _check_labels(labels, lead, logits.device, vocab, mask, validate)
    if not y.is_contiguous():
        y = y.contiguous()
    logp, ent = ops.token_logprobs(logits, y, mask, tau, with_entropy, inplace_backward, backend)
    return logp.reshape(lead), ent.reshape(lead)


def linear_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, mask_or_layout: MaskOrLayout = None,
                          temperature: float = 1.0, bias: Optional[Tensor] = None, validate: bool = True,
                          backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """(logp, entropy) straight from hidden states and the lm_head weight (SPEC 2).

    Args:
        hidden: (B, T, H) or (N, H) float; weight: (V, H); bias: (V,) or None.
    Returns:
        (logp, entropy) shaped like labels, float32. Differentiable in hidden, weight, bias.
    """
    if not isinstance(hidden, Tensor) or not hidden.is_floating_point():
        raise TypeError("hidden must be a float tensor")
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise TypeError("weight must be a 2-D float tensor (V, H)")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden size mismatch: hidden has H = {hidden.shape[-1]}, weight has {weight.shape[1]}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.device != hidden.device):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) on {hidden.device}")
    tau = _check_temperature(temperature)
    lead = tuple(hidden.shape[:-1])
    mask = _mask_for(mask_or_layout, lead, hidden.device)
    y = _check_labels(labels, lead, hidden.device, weight.shape[0], mask, validate)
    logp, ent = ops.linear_token_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, y, mask, tau, bias, backend)
    return logp.reshape(lead), ent.reshape(lead)
