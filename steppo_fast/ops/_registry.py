"""The registry machinery every op family shares.

``register_backend`` records each backend's implementation of an op; ``resolve_backend``
picks one for a device (the table in ``steppo_fast.ops``) and falls back to the reference with
one warning per (op, device, request); ``_run`` calls the chosen implementation.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .. import _native
from .. import reference as ref

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



def _opt_float(x) -> Optional[float]:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"global counts and norm_constant must be scalars, got shape {tuple(x.shape)}")
        x = x.item()  # a host value: the caller passes global counts it already holds
    return float(x)




def registered_ops() -> Sequence[str]:
    """Names of every op in the registry (``steppo_fast::<name>``)."""
    return tuple(sorted(_IMPLS))
