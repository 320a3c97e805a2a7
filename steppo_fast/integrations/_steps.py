"""Step ids inside one row per completion, shared by the TRL and Liger adapters.

Both trainers keep one row per completion and count every row in their ``grpo`` mean, also a
row with no generated token. These helpers check step ids a caller hands in and build the
StepLayout in which such a row holds one empty step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..layout import StepLayout


def checked_step_ids(ids, mask: Tensor, what: str, mask_name: str) -> Tensor:
    """``ids`` as (B, T) int64 step ids, -1 wherever ``mask`` is False.

    Raises TypeError unless ``ids`` is an integer tensor, ValueError unless it has the shape and
    device of ``mask``; ``what`` and ``mask_name`` name both in the message.
    """
    if not isinstance(ids, Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"{what} must be an integer (B, T) tensor of step ids, got "
                        f"{getattr(ids, 'dtype', type(ids).__name__)}")
    if tuple(ids.shape) != tuple(mask.shape):
        raise ValueError(f"{what} must have the shape of {mask_name} {tuple(mask.shape)}, got {tuple(ids.shape)}")
    if ids.device != mask.device:
        raise ValueError(f"{what} is on {ids.device} but {mask_name} is on {mask.device}")
    return torch.where(mask, ids.to(torch.int64), -1)


def rows_layout(sid: Tensor, mask: Tensor, check: bool, row: str, mask_desc: str) -> StepLayout:
    """StepLayout of one row per completion from (B, T) step ids; a row with no token holds one empty step.

    With ``check`` (ids a caller supplied; a few host synchronisations), every token of ``mask``
    must carry a step and the ids of each row must be 0..K-1 in order; ``row`` names a row in the
    message ("completion", "row") and ``mask_desc`` says where the mask is 1.
    """
    if check:
        left_out = mask & (sid < 0)
        if bool(left_out.any()):
            r = int(torch.nonzero(left_out.any(dim=1))[0, 0])
            raise ValueError(f"{row} {r}: step ids leave tokens outside every step (step id -1 where {mask_desc} "
                             "is 1); give every generated token a step")
        if sid.shape[1] > 0:
            empty = (sid < 0).all(dim=1, keepdim=True)
            StepLayout.from_packed(torch.where(empty, 0, sid), validate=True)  # gaps, order, negative ids
    k = (sid.max(dim=1).values + 1 if sid.shape[1] > 0
         else torch.zeros(sid.shape[0], dtype=torch.int64, device=sid.device))
    return StepLayout.from_packed(sid, num_steps=k.clamp(min=1), validate=False)
