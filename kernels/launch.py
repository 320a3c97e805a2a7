"""The one launch path of the package's Triton kernels.

Every launcher calls :func:`launch` instead of ``kernel[grid](...)``, so that

* the kernel runs on the device that holds its tensors, not on whatever device happens to be
  current (Triton launches on the current device and its current stream);
* tools can watch the specialisations the launchers produce: each callable in ``observers``
  gets ``(kernel, grid, args, kwargs)`` before the launch. The compile test and the
  compile counts use it; in normal use the list is empty.
"""

from __future__ import annotations

from typing import Callable, List

import torch

observers: List[Callable] = []


def interpreted(kernel) -> bool:
    """True when ``kernel`` runs in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when it was
    decorated). Kernels use it to pick code the interpreter evaluates exactly as the GPU does."""
    from triton.runtime.jit import JITFunction

    return not isinstance(kernel, JITFunction)


def launch(kernel, grid, device: torch.device, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` with ``device`` (the tensors' device) current."""
    for observe in observers:
        observe(kernel, grid, args, kwargs)
    if device.type == "cuda":
        with torch.cuda.device(device):
            return kernel[grid](*args, **kwargs)
    return kernel[grid](*args, **kwargs)
