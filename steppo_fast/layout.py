"""StepLayout: where every step, trajectory and group of a batch lives (SPEC section 1).

Three input layouts map to one internal form:

* **step rows** (StepPO / verl): one row of the (B, T) token tensors per step, with
  per-row ``trajectory_id``, ``step_index`` and ``group_id``; rows may come in any order.
* **packed trajectories**: one row per trajectory; ``step_ids`` (B, T) is -1 on
  prompt/observation/padding tokens and k on step k's agent tokens.
* **turns** (verl's agent loop, TRL's tool calling): one row per trajectory with only a
  mask; each maximal run of agent tokens in a row is one step (``from_turns``).

Internally steps get global ids ``s = 0..S-1``, numbered contiguously per trajectory
in k order, trajectories ``r = 0..R-1`` (sorted by the caller's trajectory id for step
rows, row order for packed), groups ``g = 0..G-1`` (sorted by the caller's group id).

Building a layout needs its sizes (S, R, G, the number of agent tokens) on the host,
which costs one device synchronisation on CUDA. Build it once per batch, outside the
loss; every op that consumes it is free of host synchronisation. Validation
(``validate=True``) costs a few more and can be switched off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = ["StepLayout", "step_ids_from_turns"]

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_MAX_STEPS = 2 ** 31 - 1  # global step ids are stored in int32 token_step


def _check_int(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INT_DTYPES:
        raise ValueError(f"{name} must have an integer dtype (int32/int64), got {t.dtype}")


def _check_rows(name: str, t: Optional[torch.Tensor], B: int, device, against: str) -> None:
    """A per-row (B,) integer tensor on the right device, or None."""
    if t is None:
        return
    _check_int(name, t)
    if tuple(t.shape) != (B,):
        raise ValueError(f"{name} must have shape (B,) = ({B},) to match {against}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {against} is on {device}")


def _first_true(flags: torch.Tensor) -> int:
    """Index of the first True of a 1-D bool tensor (validation only: syncs)."""
    return int(torch.nonzero(flags)[0, 0])


@dataclass(frozen=True)
class StepLayout:
    """Internal step layout of one batch. All tensors live on one device.

    Attributes (N = B*T tokens, S steps, R trajectories, G groups):
        token_shape: (B, T) of the token tensors this layout describes.
        token_step: (N,) int32, global step id of each token, -1 for non-agent tokens.
        step_traj: (S,) int64, trajectory of each step.
        step_pos: (S,) int64, k, the position of each step in its trajectory.
        traj_step_offsets: (R+1,) int64, steps of trajectory r are ``[off[r], off[r+1])``.
        traj_group: (R,) int64, group of each trajectory.
        step_token_offsets: (S+1,) int64, CSR offsets into ``step_tokens``.
        step_tokens: (N_active,) int64, token indices of each step in time order,
            steps in id order (so a trajectory's tokens are contiguous and in time order).
        traj_ids: (R,) int64, the caller's trajectory id of each trajectory.
        group_ids: (G,) int64, the caller's group id of each group.
        row_step: (B,) int64 step id of each row for step rows; None for packed.
        num_steps, num_trajectories, num_groups, num_active_tokens: host ints.
        step_token_offsets_host: ``step_token_offsets`` on the CPU, fetched with the
            construction's one synchronisation; lets the fused linear head plan chunks of
            whole steps without touching the device.
    """

    token_shape: Tuple[int, int]
    token_step: torch.Tensor
    step_traj: torch.Tensor
    step_pos: torch.Tensor
    traj_step_offsets: torch.Tensor
    traj_group: torch.Tensor
    step_token_offsets: torch.Tensor
    step_tokens: torch.Tensor
    traj_ids: torch.Tensor
    group_ids: torch.Tensor
    row_step: Optional[torch.Tensor]
    num_steps: int
    num_trajectories: int
    num_groups: int
    num_active_tokens: int
    step_token_offsets_host: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ derived
    @property
    def device(self) -> torch.device:
        return self.token_step.device

    @property
    def num_tokens(self) -> int:
        return self.token_shape[0] * self.token_shape[1]

    @property
    def token_mask(self) -> torch.Tensor:
        """(N,) bool, True on agent tokens."""
        return self.token_step >= 0

    @property
    def step_num_tokens(self) -> torch.Tensor:
        """(S,) int64, number of agent tokens of each step."""
        return self.step_token_offsets[1:] - self.step_token_offsets[:-1]

    def host_step_token_offsets(self) -> torch.Tensor:
        """(S+1,) int64 CPU copy of ``step_token_offsets`` (kept from construction; copied,
        with one synchronisation, only for a layout built without it)."""
        if self.step_token_offsets_host is None:
            object.__setattr__(self, "step_token_offsets_host", self.step_token_offsets.cpu())
        return self.step_token_offsets_host

    @property
    def traj_num_steps(self) -> torch.Tensor:
        """(R,) int64, K of each trajectory."""
        return self.traj_step_offsets[1:] - self.traj_step_offsets[:-1]

    @property
    def step_group(self) -> torch.Tensor:
        """(S,) int64, group of each step."""
        return self.traj_group[self.step_traj]

    def to(self, device) -> "StepLayout":
        """A copy of the layout with every tensor on ``device``."""
        fields = {}
        for name in self.__dataclass_fields__:
            v = getattr(self, name)
            keep = name.endswith("_host") or not isinstance(v, torch.Tensor)
            fields[name] = v if keep else v.to(device)
        return StepLayout(**fields)

    def step_values_from_tokens(self, token_values: torch.Tensor) -> torch.Tensor:
        """V_k from token-aligned critic outputs (SPEC section 1, "Values").

        In verl's convention the value at token t is the value of the state before
        generating t, so a step's value is the value at its first agent token.
        Steps without agent tokens get 0 (pass step values directly for them).

        Args:
            token_values: (B, T) or (N,) float tensor on the layout's device.
        Returns:
            (S,) tensor of token_values' dtype.
        """
        v = _flat_tokens("token_values", token_values, self)
        first = self.step_token_offsets[:-1].clamp(max=max(self.num_active_tokens - 1, 0))
        if self.num_active_tokens == 0:
            return torch.zeros(self.num_steps, dtype=v.dtype, device=v.device)
        idx = self.step_tokens[first]
        has = self.step_num_tokens > 0
        return torch.where(has, v[idx], torch.zeros((), dtype=v.dtype, device=v.device))

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_step_rows(
        cls,
        response_mask: torch.Tensor,
        trajectory_id: torch.Tensor,
        step_index: torch.Tensor,
        group_id: Optional[torch.Tensor] = None,
        validate: bool = True,
    ) -> "StepLayout":
        """Layout of step rows: one row per step (StepPO / verl).

        Args:
            response_mask: (B, T) bool or 0/1 integer/float tensor, the step's agent tokens.
            trajectory_id: (B,) integer, the trajectory each row belongs to (>= 0).
            step_index: (B,) integer, k of the row's step within its trajectory.
            group_id: (B,) integer, the group (task) of each row; all rows of one
                trajectory must share it. None puts every trajectory in a group of its own.
            validate: check that each trajectory's step indices are exactly 0..K-1,
                ids are non-negative, groups are consistent and a float mask holds no NaN (a few
                syncs on CUDA). Without it the layout is still well-formed (every index in range):
                duplicate or missing step indices just order the rows, a trajectory with rows of
                several groups takes its first row's group, and NaN in a float mask counts as True.
        """
        if not isinstance(response_mask, torch.Tensor):
            raise TypeError(f"response_mask must be a torch.Tensor, got {type(response_mask).__name__}")
        if response_mask.dim() != 2:
            raise ValueError(f"response_mask must have shape (B, T), got {tuple(response_mask.shape)}")
        B, T = response_mask.shape
        if B == 0:
            raise ValueError("empty batch: response_mask has 0 rows")
        device = response_mask.device
        _check_int("trajectory_id", trajectory_id)
        _check_int("step_index", step_index)
        for name, t in (("trajectory_id", trajectory_id), ("step_index", step_index), ("group_id", group_id)):
            _check_rows(name, t, B, device, "response_mask")
        traj = trajectory_id.to(torch.int64)
        k = step_index.to(torch.int64)
        if validate:
            _check_no_nan("response_mask", response_mask)
            for name, t in (("trajectory_id", traj), ("step_index", k)):
                bad = t < 0
                if bool(bad.any()):
                    i = _first_true(bad)
                    raise ValueError(f"{name} must be non-negative: row {i} has {int(t[i])}")
            if group_id is not None and bool((group_id < 0).any()):
                i = _first_true(group_id < 0)
                raise ValueError(f"group_id must be non-negative: row {i} has {int(group_id[i])}")

        traj_ids, traj_of_row = torch.unique(traj, sorted=True, return_inverse=True)
        R = traj_ids.numel()
        # Sort rows by (trajectory, step index): two stable sorts.
        order = torch.argsort(k, stable=True)
        order = order[torch.argsort(traj_of_row[order], stable=True)]
        counts = torch.bincount(traj_of_row, minlength=R)
        traj_step_offsets = torch.zeros(R + 1, dtype=torch.int64, device=device)
        traj_step_offsets[1:] = torch.cumsum(counts, 0)
        step_traj = traj_of_row[order]
        step_pos = torch.arange(B, device=device, dtype=torch.int64) - traj_step_offsets[step_traj]
        if validate:
            wrong = k[order] != step_pos
            if bool(wrong.any()):
                s = _first_true(wrong)
                r = int(step_traj[s])
                ks = k[order][traj_step_offsets[r]:traj_step_offsets[r + 1]].tolist()
                kind = "duplicate step index" if len(set(ks)) < len(ks) else "gap in step indices"
                raise ValueError(
                    f"trajectory {int(traj_ids[r])}: {kind}; step_index of its rows must be exactly "
                    f"0..{len(ks) - 1} in some order, got {sorted(ks)}"
                )
        row_step = torch.empty(B, dtype=torch.int64, device=device)
        row_step[order] = torch.arange(B, device=device, dtype=torch.int64)

        if group_id is None:
            group_ids = traj_ids.clone()
            traj_group = torch.arange(R, device=device, dtype=torch.int64)
        else:
            g_sorted = group_id.to(torch.int64)[order]
            first_rows = g_sorted[traj_step_offsets[:-1]]
            if validate:
                mismatch = g_sorted != first_rows[step_traj]
                if bool(mismatch.any()):
                    s = _first_true(mismatch)
                    r = int(step_traj[s])
                    raise ValueError(
                        f"trajectory {int(traj_ids[r])}: its rows carry different group_id values "
                        f"({sorted(set(g_sorted[traj_step_offsets[r]:traj_step_offsets[r + 1]].tolist()))}); "
                        "all steps of a trajectory must belong to one group"
                    )
            group_ids, traj_group = torch.unique(first_rows, sorted=True, return_inverse=True)

        mask = _as_bool_mask("response_mask", response_mask)
        token_step = torch.where(mask, row_step[:, None], torch.full_like(row_step[:, None], -1))
        return cls._finish(
            (B, T), token_step.reshape(-1), step_traj, step_pos, traj_step_offsets, traj_group,
            traj_ids, group_ids, row_step,
        )

    @classmethod
    def from_packed(
        cls,
        step_ids: torch.Tensor,
        group_id: Optional[torch.Tensor] = None,
        num_steps: Optional[torch.Tensor] = None,
        validate: bool = True,
    ) -> "StepLayout":
        """Layout of packed trajectories: one row per trajectory.

        Args:
            step_ids: (B, T) integer, -1 on non-agent tokens and k on step k's tokens;
                along a row, step ids of agent tokens never decrease.
            group_id: (B,) integer group of each trajectory; None gives each its own.
            num_steps: optional (B,) integer K of each trajectory. Needed only for
                steps without agent tokens (which packed rows cannot show); when
                omitted, K = max step id + 1 and every step 0..K-1 must have a token.
            validate: check ordering, gaps and non-negative ids (a few syncs on CUDA; memory
                O(B T) whatever the id values). Whatever it says, the layout is well-formed: a negative
                num_steps, a step id not below its row's num_steps, or more than 2^31 - 1 steps raise
                ValueError. Without validation, ids below -1 count as -1, steps out of order along
                a row or missing in 0..K-1 give a well-formed layout of whatever the ids say.
        """
        _check_int("step_ids", step_ids)
        if step_ids.dim() != 2:
            raise ValueError(f"step_ids must have shape (B, T), got {tuple(step_ids.shape)}")
        B, T = step_ids.shape
        if B == 0:
            raise ValueError("empty batch: step_ids has 0 rows")
        device = step_ids.device
        sid = step_ids.to(torch.int64)
        _check_rows("group_id", group_id, B, device, "step_ids")
        _check_rows("num_steps", num_steps, B, device, "step_ids")
        row_max = sid.max(dim=1).values.clamp(min=-1) if T > 0 else torch.full((B,), -1, device=device)
        K = row_max + 1 if num_steps is None else num_steps.to(torch.int64)
        if validate:
            if bool((sid < -1).any()):
                r = _first_true((sid < -1).any(dim=1))
                raise ValueError(f"trajectory {r}: step_ids must be -1 (no step) or a step index >= 0, "
                                 f"got {int(sid[r].min())}")
            if group_id is not None and bool((group_id < 0).any()):
                r = _first_true(group_id < 0)
                raise ValueError(f"group_id must be non-negative: trajectory {r} has {int(group_id[r])}")
            if num_steps is not None:
                if bool((K < 0).any()):
                    r = _first_true(K < 0)
                    raise ValueError(f"num_steps must be non-negative: trajectory {r} has {int(K[r])}")
                over = row_max >= K
                if bool(over.any()):
                    r = _first_true(over)
                    raise ValueError(f"trajectory {r}: step id {int(row_max[r])} is not below num_steps = {int(K[r])}")
            if T > 0:
                # Memory and time O(B T), whatever the id values: the running max of the ids before
                # each token (-1 before the first agent token) is the step the token must equal or follow.
                prev_max = torch.cummax(sid, dim=1).values
                before = torch.cat([torch.full_like(sid[:, :1], -1), prev_max[:, :-1]], dim=1)
                back = (sid >= 0) & (sid < before)
                if bool(back.any()):
                    r = _first_true(back.any(dim=1))
                    raise ValueError(
                        f"trajectory {r}: step ids go backwards along the row (step "
                        f"{int(sid[r][back[r]][0])} after step {int(before[r][back[r]][0])}); each step's tokens "
                        "must come before the next step's"
                    )
                if num_steps is None:
                    gap = sid > before + 1  # ids never decrease along the row, so a jump skips a step
                    if bool(gap.any()):
                        r = _first_true(gap.any(dim=1))
                        t = _first_true(gap[r])
                        raise ValueError(
                            f"trajectory {r}: gap in step indices, step {int(before[r, t]) + 1} has no agent token "
                            f"but step {int(sid[r, t])} does (pass num_steps to declare steps without tokens)"
                        )

        traj_step_offsets = torch.zeros(B + 1, dtype=torch.int64, device=device)
        traj_step_offsets[1:] = torch.cumsum(K, 0)
        # What keeps the layout's indices in range is checked whatever `validate` says, in the one
        # host read that fetches S: counts >= 0, every step id below its trajectory's count, and
        # global step ids that fit token_step's int32.
        checks = [traj_step_offsets[-1], K.min()]
        if num_steps is not None and T > 0 and not validate:
            checks.append((sid >= K[:, None]).any().to(torch.int64))
        S, k_min, *over = torch.stack(checks).tolist()
        if k_min < 0:
            r = _first_true(K < 0)
            raise ValueError(f"num_steps must be non-negative: trajectory {r} has {int(K[r])}")
        if over and over[0]:
            r = _first_true((sid >= K[:, None]).any(dim=1))
            raise ValueError(f"trajectory {r}: step id {int(sid[r].max())} is not below num_steps = {int(K[r])}")
        if S > _MAX_STEPS:
            raise ValueError(f"the batch has {S} steps; a layout holds at most {_MAX_STEPS} (token_step is int32)"
                             + ("" if num_steps is not None else ": is a step id far too large?"))
        step_traj = torch.repeat_interleave(torch.arange(B, device=device), K, output_size=S)
        step_pos = torch.arange(S, device=device, dtype=torch.int64) - traj_step_offsets[step_traj]
        token_step = torch.where(sid >= 0, sid + traj_step_offsets[:-1, None], torch.full_like(sid, -1))
        traj_ids = torch.arange(B, device=device, dtype=torch.int64)
        if group_id is None:
            group_ids, traj_group = traj_ids.clone(), traj_ids.clone()
        else:
            group_ids, traj_group = torch.unique(group_id.to(torch.int64), sorted=True, return_inverse=True)
        return cls._finish((B, T), token_step.reshape(-1), step_traj, step_pos, traj_step_offsets,
                           traj_group, traj_ids, group_ids, None)

    @classmethod
    def from_turns(
        cls,
        response_mask: torch.Tensor,
        group_id: Optional[torch.Tensor] = None,
        step_starts: Optional[torch.Tensor] = None,
        validate: bool = True,
    ) -> "StepLayout":
        """Layout of one row per trajectory whose steps are the turns found in the mask.

        This is the layout multi-turn trainers produce (verl's agent loop, TRL's tool calling):
        a row holds turn 1's response, the tool or environment tokens, turn 2's response, and so
        on, and the mask is 1 only on the tokens the model generated. Each maximal run of agent
        tokens in a row is one step, so step k of row b is its (k+1)-th run. Rows are
        trajectories in row order (``traj_ids`` = 0..B-1).

        Args:
            response_mask: (B, T) bool or 0/1 integer/float tensor, True on agent tokens.
            group_id: (B,) integer group (task) of each trajectory; None gives each its own.
            step_starts: optional (B, T) bool/0-1 tensor, True on agent tokens that begin a new
                step even though the token before them is an agent token too (for turns that
                follow each other with no tool tokens in between). Ignored off the mask.
            validate: check that every row has at least one agent token (a trajectory with no
                step is almost always a mistake in the mask) and that group ids are
                non-negative; one synchronisation on CUDA (one more per float mask, for NaN).

        Built with tensor operations only (no loop over rows or steps); works on any device.
        :func:`step_ids_from_turns` gives the same steps as a (B, T) ``step_ids`` tensor.
        """
        step_ids = step_ids_from_turns(response_mask, step_starts)
        B = step_ids.shape[0]
        if B == 0:
            raise ValueError("empty batch: response_mask has 0 rows")
        _check_rows("group_id", group_id, B, step_ids.device, "response_mask")
        if validate:
            _check_no_nan("response_mask", response_mask)
            if step_starts is not None:
                _check_no_nan("step_starts", step_starts)
            empty = (step_ids < 0).all(dim=1)
            negative = group_id < 0 if group_id is not None else empty.new_zeros(1)
            any_empty, any_negative = torch.stack([empty.any(), negative.any()]).tolist()  # one sync for both
            if any_empty:
                r = _first_true(empty)
                raise ValueError(f"row {r}: response_mask has no agent token, so the trajectory has no step; "
                                 "drop the row or mark its generated tokens")
            if any_negative:
                r = _first_true(group_id < 0)
                raise ValueError(f"group_id must be non-negative: row {r} has {int(group_id[r])}")
        return cls.from_packed(step_ids, group_id, validate=False)

    @classmethod
    def _finish(cls, shape, token_step, step_traj, step_pos, traj_step_offsets, traj_group, traj_ids,
                group_ids, row_step) -> "StepLayout":
        S = step_traj.numel()
        active = torch.nonzero(token_step >= 0).squeeze(1)
        steps_of_active = token_step[active]
        order = torch.argsort(steps_of_active, stable=True)
        step_tokens = active[order]
        counts = torch.bincount(steps_of_active, minlength=S) if S > 0 else torch.zeros(0, dtype=torch.int64,
                                                                                          device=token_step.device)
        step_token_offsets = torch.zeros(S + 1, dtype=torch.int64, device=token_step.device)
        step_token_offsets[1:] = torch.cumsum(counts, 0)
        return cls(
            token_shape=(int(shape[0]), int(shape[1])),
            token_step=token_step.to(torch.int32),
            step_traj=step_traj.to(torch.int64),
            step_pos=step_pos.to(torch.int64),
            traj_step_offsets=traj_step_offsets,
            traj_group=traj_group.to(torch.int64),
            step_token_offsets=step_token_offsets,
            step_tokens=step_tokens.to(torch.int64),
            traj_ids=traj_ids.to(torch.int64),
            group_ids=group_ids.to(torch.int64),
            row_step=row_step,
            num_steps=int(S),
            num_trajectories=int(traj_ids.numel()),
            num_groups=int(group_ids.numel()),
            num_active_tokens=int(active.numel()),
            step_token_offsets_host=step_token_offsets.cpu(),
        )


def step_ids_from_turns(response_mask: torch.Tensor, step_starts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, T) int64 step ids from a multi-turn mask: -1 off the mask, k on the (k+1)-th run of agent tokens.

    Args:
        response_mask: (B, T) bool or 0/1 integer/float tensor, True on agent tokens.
        step_starts: optional (B, T) bool or 0/1 tensor; an agent token marked here starts a new step
            even when the token before it is an agent token.
    Returns:
        (B, T) int64 tensor on the mask's device, as :meth:`StepLayout.from_packed` takes it.
    """
    if not isinstance(response_mask, torch.Tensor):
        raise TypeError(f"response_mask must be a torch.Tensor, got {type(response_mask).__name__}")
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must have shape (B, T), got {tuple(response_mask.shape)}")
    mask = _as_bool_mask("response_mask", response_mask)
    prev = torch.zeros_like(mask)
    prev[:, 1:] = mask[:, :-1]
    start = mask & ~prev
    if step_starts is not None:
        if not isinstance(step_starts, torch.Tensor):
            raise TypeError(f"step_starts must be a torch.Tensor, got {type(step_starts).__name__}")
        if step_starts.shape != mask.shape:
            raise ValueError(f"step_starts must have the shape of response_mask {tuple(mask.shape)}, "
                             f"got {tuple(step_starts.shape)}")
        if step_starts.device != mask.device:
            raise ValueError(f"step_starts is on {step_starts.device} but response_mask is on {mask.device}")
        start = start | (mask & _as_bool_mask("step_starts", step_starts))
    k = torch.cumsum(start, dim=1, dtype=torch.int64) - 1
    return torch.where(mask, k, torch.full_like(k, -1))


def _check_no_nan(name: str, mask: torch.Tensor) -> None:
    """Validation only (one sync): a float mask must not hold NaN (it would count as True)."""
    if isinstance(mask, torch.Tensor) and mask.is_floating_point():
        nan = torch.isnan(mask)
        if bool(nan.any()):
            r = _first_true(nan.reshape(mask.shape[0], -1).any(dim=1))
            raise ValueError(f"{name} holds NaN in row {r}; a float mask must hold 0 and 1")


def _as_bool_mask(name: str, mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype.is_floating_point or mask.dtype in _INT_DTYPES:
        return mask != 0
    raise TypeError(f"{name} must be bool, integer or float, got {mask.dtype}")


def _flat_tokens(name: str, t: torch.Tensor, layout: StepLayout) -> torch.Tensor:
    """Checks a token tensor against the layout and returns it as (N,)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    B, T = layout.token_shape
    if tuple(t.shape) not in ((B, T), (B * T,)):
        raise ValueError(f"{name} must have shape (B, T) = ({B}, {T}) or (N,) = ({B * T},), got {tuple(t.shape)}")
    if t.device != layout.device:
        raise ValueError(f"{name} is on {t.device} but the layout is on {layout.device}")
    return t.reshape(-1)
