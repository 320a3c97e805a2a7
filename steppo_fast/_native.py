"""Loading the compiled modules and calling them with checked tensors.

``steppo_fast._C`` (C++ CPU) and ``steppo_fast._C_cuda`` (CUDA) are imported on first
use, never at ``import steppo_fast``. A module that is missing (not built, or built
for another Python) makes its backend unavailable; the registry then falls back to
the reference with one warning.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Optional

import torch

DTYPE_CODES = {
    torch.float32: 0,
    torch.float64: 1,
    torch.bfloat16: 2,
    torch.float16: 3,
    torch.int32: 4,
    torch.int64: 5,
}

_modules = {}
_errors = {}


def _load(name: str):
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"steppo_fast.{name}")
        except ImportError as exc:  # not built, or built for another interpreter
            _modules[name] = None
            _errors[name] = exc
            warnings.warn(
                f"steppo_fast.{name} could not be imported ({exc}); its kernels are unavailable and the "
                "affected ops use the PyTorch reference. Reinstall steppo_fast to build it.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _modules[name]


def cpu_module():
    """steppo_fast._C, or None (with one warning) if it is not built."""
    return _load("_C")


def cuda_module():
    """steppo_fast._C_cuda, or None (with one warning) if it is not built."""
    return _load("_C_cuda")


def module_error(name: str) -> Optional[BaseException]:
    return _errors.get(name)


def dtype_code(name: str, t: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported by the compiled kernels") from None


def ptr(name: str, t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> int:
    """Data pointer of a contiguous tensor, after checking its dtype."""
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous for the compiled kernels")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    return t.data_ptr()


def cuda_stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream
