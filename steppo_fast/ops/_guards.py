"""The checks every raw op runs before it dispatches: O(1), no host synchronisation.

They look at what a tensor *is* (type, dtype, device, number of dimensions, length), never at
what it holds, so they cost nothing on any device and keep the ops traceable. What they buy:
every array a kernel indexes has the length the kernel is told, so a kernel that checks each
index it reads against those lengths (the C++ kernels do) can never read or write outside its
arguments. The values of indices and offsets are checked by the kernels themselves, where
they are read anyway.

Scalars are checked the same way: a number of the right kind in its range, finite, never a
bool; a bad one raises naming the argument.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor

_INT = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_KIND_WORDS = {"float": "a float", "int": "an integer", "mask": "a bool (or integer 0/1)", "any": "a"}


def _kind_ok(t: Tensor, kind: str) -> bool:
    if kind == "float":
        return t.is_floating_point()
    if kind == "int":
        return t.dtype in _INT
    if kind == "mask":
        return t.dtype == torch.bool or t.dtype in _INT
    return True


def tensor(op: str, name: str, t, kind: str = "any", dim: Optional[int] = None, numel: Optional[int] = None,
           like: Optional[Tensor] = None, like_name: str = "", device: Optional[torch.device] = None) -> Tensor:
    """Checks that ``t`` is a tensor of ``kind`` ("float", "int", "mask" or "any") with ``dim``
    dimensions, ``numel`` elements, the shape of ``like`` and the device of ``device`` / ``like``.
    Raises TypeError (type, dtype) or ValueError (shape, device) that names ``op`` and ``name``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be {_KIND_WORDS[kind]} tensor, got {type(t).__name__}")
    if not _kind_ok(t, kind):
        raise TypeError(f"{op}: {name} must be {_KIND_WORDS[kind]} tensor, got dtype {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{op}: {name} must be {dim}-D, got shape {tuple(t.shape)}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{op}: {name} must have {numel} elements, got shape {tuple(t.shape)}")
    if like is not None:
        if t.shape != like.shape:
            raise ValueError(f"{op}: {name} must have the shape of {like_name} {tuple(like.shape)}, "
                             f"got {tuple(t.shape)}")
        device = like.device if device is None else device
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, the other arguments on {device}")
    return t


def optional(op: str, name: str, t, **kw) -> Optional[Tensor]:
    return None if t is None else tensor(op, name, t, **kw)


def number(op: str, name: str, x, lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
           hi_open: bool = False, integer: bool = False) -> float:
    """``x`` as a float (an int when ``integer``), after checking that it is a real number (not a
    bool, not None), finite and inside [lo, hi] (open ends where asked)."""
    ok_type = (numbers.Integral if integer else numbers.Real)
    if isinstance(x, Tensor) and x.numel() == 1 and not x.requires_grad and x.device.type == "cpu":
        x = x.item()  # a CPU scalar tensor is a host number (no synchronisation)
    if isinstance(x, bool) or not isinstance(x, ok_type):
        what = "an integer" if integer else "a number"
        raise TypeError(f"{op}: {name} must be {what}, got {x!r} ({type(x).__name__})")
    v = int(x) if integer else float(x)
    if not math.isfinite(v):
        raise ValueError(f"{op}: {name} must be finite, got {v}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{op}: {name} must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{op}: {name} must be {'<' if hi_open else '<='} {hi}, got {v}")
    return v


def optional_number(op: str, name: str, x, **kw) -> Optional[float]:
    return None if x is None else number(op, name, x, **kw)


def choice(op: str, name: str, x, options: Sequence[str]) -> str:
    if not isinstance(x, str) or x not in options:
        raise ValueError(f"{op}: {name} must be one of {tuple(options)}, got {x!r}")
    return x


def flag(op: str, name: str, x) -> bool:
    """A bool (or the ints 0 and 1)."""
    if isinstance(x, bool) or (isinstance(x, numbers.Integral) and x in (0, 1)):
        return bool(x)
    raise TypeError(f"{op}: {name} must be a bool, got {x!r}")


def no_internal_overlap(op: str, name: str, t: Tensor) -> None:
    """Raises ValueError when two elements of ``t`` may share memory (an expanded or otherwise
    self-overlapping view): an in-place write into it would mix the rows' results. Decided from
    the shape and strides alone: dimensions of size > 1 sorted by stride must each step past
    everything the inner ones span."""
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1)
    span = 1  # elements spanned by the inner dimensions, plus one
    for st, sz in dims:
        if st < span:
            raise ValueError(f"{op}: {name} has elements that share memory (an expanded or overlapping view, "
                             f"shape {tuple(t.shape)}, strides {tuple(t.stride())}); writing the gradient into it "
                             "in place would be wrong. Pass a contiguous copy or use inplace_backward=False")
        span = (sz - 1) * st + span
