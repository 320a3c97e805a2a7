"""The checks every raw op runs before it dispatches: O(1), no host synchronisation; and the
error words through which the GPU kernels report bad index values (at the end of this file).

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
import os
from typing import Callable, Dict, List, Optional, Sequence

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


# ---------------------------------------------------------------- index errors on a GPU
# The GPU kernels (CUDA, and Triton's step_rewards, also when interpreted) cannot raise without
# waiting for the device. Instead they check every index and offset where they read it, skip a
# bad entry, write NaN into the outputs it would have filled and lower an error word: an int64
# that holds the first bad position seen (NO_ERROR while there is none). The words live on the
# device, one per checked argument of each op, and collect every call until they are read:
# ``index_errors`` / ``check_index_errors`` read them (a synchronisation: call them where the
# training loop synchronises anyway). With STEPPO_FAST_SYNC_INDEX_CHECKS=1 every call gets words
# of its own and checks them at once, raising the ValueError the C++ kernels raise (slow: one
# synchronisation per call; for debugging).

NO_ERROR = 2 ** 63 - 1
SYNC_INDEX_CHECKS_ENV = "STEPPO_FAST_SYNC_INDEX_CHECKS"

# op -> the arguments whose first bad position its GPU kernels report, in the order of their words.
INDEX_ARGS = {
    "step_rewards": ("step_token_offsets", "step_tokens"),
    "broadcast_to_tokens": ("token_step",),
    "step_gae": ("traj_step_offsets",),
    "token_gae": ("traj_step_offsets", "step_token_offsets", "step_tokens"),
}
_FIRST_WORD, _NUM_WORDS = {}, 0  # op -> its first word in a device's words; their number
for _op, _args in INDEX_ARGS.items():
    _FIRST_WORD[_op] = _NUM_WORDS
    _NUM_WORDS += len(_args)
_records = {}  # device -> (_NUM_WORDS,) int64 words on that device
_views = {}  # (device, op) -> the op's slice of the device's words


def sync_index_checks() -> bool:
    """True when STEPPO_FAST_SYNC_INDEX_CHECKS=1: each GPU call checks its indices at once."""
    return os.environ.get(SYNC_INDEX_CHECKS_ENV, "0") == "1"


def _record(device: torch.device) -> Tensor:
    rec = _records.get(device)
    if rec is None:
        if device.type == "cuda":
            with torch.cuda.device(device):
                if torch.cuda.is_current_stream_capturing():
                    # Created inside a capture, the words would be set only when the graph replays.
                    raise RuntimeError(
                        f"steppo_fast: the first index-checked op on {device} runs inside a CUDA-graph capture; "
                        "run the captured function once before capturing it (the warm-up a capture needs anyway), "
                        "which creates the device's index error words")
        rec = torch.full((_NUM_WORDS,), NO_ERROR, dtype=torch.int64, device=device)
        _records[device] = rec
    return rec


def index_words(op: str, device: torch.device):
    """(words, sync): the error words ``op``'s GPU kernel lowers in this call, and whether the call
    must check them at once (see ``check_call``). Without STEPPO_FAST_SYNC_INDEX_CHECKS: the op's
    slice of the device's words, shared by every call until they are read; no allocation, no
    launch. With it: fresh words for this call alone."""
    if sync_index_checks():
        return torch.full((len(INDEX_ARGS[op]),), NO_ERROR, dtype=torch.int64, device=device), True
    view = _views.get((device, op))
    if view is None:
        first = _FIRST_WORD[op]
        view = _views[(device, op)] = _record(device)[first:first + len(INDEX_ARGS[op])]
    return view, False


def _bad(op: str, words) -> List[tuple]:
    return [(name, pos) for name, pos in zip(INDEX_ARGS[op], words) if pos != NO_ERROR]


def _describe(op: str, bad) -> str:
    return "; ".join(f"{op}: {name}[{pos}] is out of range" for name, pos in bad)


def check_call(op: str, words: Tensor, recheck: Optional[Callable[[], object]] = None) -> None:
    """For a call with words of its own (STEPPO_FAST_SYNC_INDEX_CHECKS=1): reads them (a
    synchronisation) and raises ValueError if any is set. ``recheck`` reruns the call on the CPU
    kernel, whose ValueError names the argument, position and value exactly; it is raised instead
    when it comes."""
    bad = _bad(op, words.tolist())
    if not bad:
        return
    if recheck is not None:
        recheck()  # raises the C++ kernel's ValueError
    raise ValueError(_describe(op, bad) + " (first bad position; the GPU kernel skipped it and wrote NaN)")


def index_errors(device=None, reset: bool = True) -> Dict[str, int]:
    """The bad indices the GPU kernels met since the words were last reset: ``{"op: argument":
    first bad position}`` (the smallest position over all those calls), empty when there were
    none. Reads the words of ``device`` (every device that has them when None): this waits for
    the device, so call it where you synchronise anyway. ``reset`` sets the words back to none."""
    if device is None:
        devices = list(_records)
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        devices = [dev]
    out = {}
    for dev in devices:
        rec = _records.get(dev)
        if rec is None:
            continue
        words = rec.tolist()
        if reset:
            rec.fill_(NO_ERROR)
        for op, first in _FIRST_WORD.items():
            for name, pos in _bad(op, words[first:first + len(INDEX_ARGS[op])]):
                out[f"{op}: {name}" if len(devices) == 1 else f"{op} on {dev}: {name}"] = pos
    return out


def check_index_errors(device=None) -> None:
    """Raises ValueError naming every op, argument and first bad position that ``index_errors``
    reports (and resets the words); returns quietly when the GPU kernels met no bad index."""
    bad = index_errors(device)
    if bad:
        raise ValueError("GPU kernels skipped out-of-range indices or offsets and wrote NaN in their place: "
                         + "; ".join(f"{k}[{v}]" for k, v in sorted(bad.items()))
                         + " (first bad position over the calls since the last check)")
