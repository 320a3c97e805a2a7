"""The one tolerance table and the comparison helpers every test uses (SPEC section 9).

Outputs are compared with the fp64 reference on the same inputs:

* float32 outputs (log-probs, entropies, advantages, losses, including those from
  bfloat16/float16 inputs, which are upcast exactly): rtol 1e-5, atol 1e-6.
* float64 outputs (the reference against hand-computed values): rtol 1e-10, atol 1e-12.
* gradients written in bfloat16/float16: within one unit in the last place of that
  dtype, and never worse than twice PyTorch's own same-dtype error plus atol
  (:func:`assert_no_worse_than_torch`).
"""

from __future__ import annotations

from typing import Optional

import torch

# Keyed by the dtype of the output being checked: (rtol, atol).
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    # One unit in the last place relative to the value (eps of the dtype), and the
    # same as absolute slack near 0 at the scale of typical gradients.
    torch.bfloat16: (2.0 ** -7, 1e-5),
    torch.float16: (2.0 ** -10, 1e-6),
}


def tolerance(dtype: torch.dtype):
    """(rtol, atol) for outputs of ``dtype``."""
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no tolerance for dtype {dtype}; known: {list(TOLERANCES)}") from None


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: Optional[torch.dtype] = None,
                 msg: str = "") -> None:
    """Asserts ``actual`` matches ``expected`` (usually fp64) within the table's tolerance
    for ``dtype`` (default: actual's dtype). NaN matches NaN only at the same positions.
    The two may live on different devices (a CUDA result against a CPU reference)."""
    dtype = dtype or actual.dtype
    rtol, atol = tolerance(dtype)
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{msg} [{dtype}: rtol={rtol}, atol={atol}] {m}")


def assert_no_worse_than_torch(actual: torch.Tensor, torch_same_dtype: torch.Tensor, ref64: torch.Tensor,
                               atol: float = 1e-6, factor: float = 2.0, msg: str = "") -> None:
    """flash-attention's rule: max |kernel - ref| <= factor * max |torch - ref| + atol."""
    err = (actual.double() - ref64.double()).abs().max().item() if actual.numel() else 0.0
    base = (torch_same_dtype.double() - ref64.double()).abs().max().item() if actual.numel() else 0.0
    assert err <= factor * base + atol, f"{msg}: error {err:.3e} > {factor} x torch's {base:.3e} + {atol:.1e}"
