"""verl adapter: StepPO's policy loss and credit assignment on the layouts verl produces.

Three batch layouts, detected in this order (ids present -> step rows; keys given -> per-turn
outputs; otherwise one row per trajectory):

* **step rows** (the StepPO authors' trainer): one row per step, ``trajectory_uids`` and
  ``step_indices`` in ``non_tensor_batch``; every agent token of a row belongs to its step.
* **per-turn outputs** (verl's V1 agent loop returning one output per turn): rows keyed
  ``{uid}_{session}_{i}`` (``batch_keys``); the trajectory is ``{uid}_{session}``, its rows come in
  ``i`` order, and each run of agent tokens in a row is one step. verl copies the final reward
  onto every output of a session; by default it counts once, on the last output
  (``copied_reward="last"``).
* **agent-loop rows** (verl's agent loop, the default): one row per trajectory, ``responses`` =
  turn 1, tool/observation tokens, turn 2, ..., padding; ``response_mask`` is 1 on generated
  tokens only. Each maximal run of 1s in a row is one turn, so one step.

``uid`` is the group in every layout. A reward on a token outside every turn (verl puts the
score on the last valid response token, which is a tool token when an episode ends on a tool
reply) belongs to the turn before it; ``values`` are read at each turn's first agent token.

Policy losses, registered with verl's ``register_policy_loss`` and verl's signature
``(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
-> (loss, metrics)``:

* ``"steppo"``: the step ratio (SPEC 7), one ratio per turn = per run of ``response_mask``.
  On step rows (one run per row) it equals verl's ``gspo``; on agent-loop rows every turn gets
  its own ratio and ``seq-mean-token-mean`` is the mean over turns.
* ``"steppo_token"``: the token ratio with verl's dual clip (``clip_ratio_c``); its sequence
  aggregation is over turns too. Equals verl's ``vanilla`` on one run per row.
* ``"steppo_rows"``, ``"steppo_token_rows"``: the same with one step per row whatever the mask
  holds (exactly verl's ``gspo`` / ``vanilla``): the switch back to one ratio per row.

The clip range comes from ``config.clip_ratio`` / ``clip_ratio_low`` / ``clip_ratio_high``, the
data-parallel counts from ``config.global_batch_info`` (``batch_num_tokens``,
``global_batch_size``, ``loss_scale_factor``, ``dp_size``; the loss is multiplied by ``dp_size``
as verl's ``agg_loss`` does). ``rollout_is_weights`` are per-token weights. Metrics keep verl's
names and stay 0-dim tensors: no host synchronisation and no collective inside the loss.

The global turn count. verl fills ``global_batch_info`` once per mini-batch with the global
*row* count (``global_batch_size``, mini-batch size x rollout.n) and token count; its actor
passes a registered loss nothing else. The sequence modes of the turn losses therefore use
``S' = global_batch_size x turns / rows`` of the micro-batch at hand (both counted on the
device): exact when every micro-batch has the same turns per row (always on step rows, and on
one micro-batch on one rank), and otherwise a mean over micro-batches of their turn means,
weighted by their rows, exactly as verl weights micro-batches in its own sequence modes. A
caller that holds the mini-batch's global turn count (:func:`count_turns`, summed over ranks)
passes it as ``global_num_turns=`` and gets the exact mean over turns.

Credit assignment: :func:`compute_advantage` is a drop-in for verl's ``compute_advantage``
(same arguments, plus ``batch_keys`` for per-turn outputs) that computes ``step_gae``,
``token_gae``/``gae``, ``grpo``, ``rloo``, ``reinforce_plus_plus(_baseline)`` and ``gigpo`` on
steppo_fast's kernels in every layout; the same episodes give the same advantages in all three.
verl's trainers hand a registered estimator only the rewards, the mask, the config and ``uid``
(no critic values, no keys), so the registered ``"step_gae"`` can only say so.

V1 trainer modes: verl's default trainer (``trainer.use_v1=True``) is chosen by
``trainer.v1.trainer_mode`` from verl's registry. For every mode verl registers (``sync``,
``colocate_async``, ``separate_async``) this module registers ``steppo_<mode>``, a subclass of verl's
trainer whose ``_compute_advantage`` is verl's own code (KL in the reward, rollout correction, the
fields written back to the transfer queue) with its call to ``compute_advantage_for_multi_trajectories``
bound to :func:`compute_advantage_for_multi_trajectories` here, which hands :func:`compute_advantage`
the critic's ``values``, ``uid`` and the rows' keys; ``self.trainer_mode`` reads as verl's mode, so
the trainer is verl's mode everywhere else. verl's module and classes are left as they are.

Name clash: verl's ``gae`` is token-level GAE; the StepPO authors' trainer calls *step-level*
GAE ``gae``. Here ``step_gae`` is StepPO's step GAE (the authors' ``gae``), ``token_gae`` the
token-level GAE across turns (the authors' ``token_gae``), and ``gae`` keeps verl's meaning on
verl's layouts; on step rows, where the authors' meaning is the likely intent, ``gae`` is an
error that names both.

Fused head: :func:`forward_with_steppo_fast` is a causal-LM forward with the signature and the
output (``CausalLMOutputForPPO`` with ``log_probs`` and ``entropy``) of verl's
``use_fused_kernels`` forwards, computing them with ``linear_token_logprobs`` (no logits);
:func:`use_fused_head` binds it to one model instance. The lm_head may be split over the vocabulary
(a DTensor weight from torch tensor parallelism or FSDP2, or this rank's rows with the group given
to ``use_fused_head``): the log-probs then come from ``steppo_fast.vocab_parallel``. For verl's
Megatron backend, ``steppo_fast.vocab_parallel.linear_cross_entropy`` has the signature of verl's
``linear_cross_entropy`` with its ``dist_process_group`` (the tensor-parallel group).

Registration reaches verl's Ray workers through verl's own plugin mechanisms: the package
declares this module in the ``verl.plugins`` entry-point group, which ``import verl`` loads in
every process; a checkout used from ``PYTHONPATH`` sets
``VERL_USE_EXTERNAL_MODULES=steppo_fast.integrations.verl`` instead. The trainer modes are
registered when verl's V1 trainer package (``verl.trainer.ppo.v1``) is imported, by verl's TaskRunner
right before it looks the mode up; this module never imports that package itself (seconds, and it
needs TransferQueue), so processes that do not run the trainer do not pay for it.
"""

from __future__ import annotations

import dis
import importlib
import importlib.abc
import sys
import types
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..advantages import compute as compute_advantages
from ..layout import StepLayout, step_ids_from_turns
from ..losses import policy_loss
from ..vocab_parallel import linear_token_logprobs as vocab_parallel_linear_token_logprobs

__all__ = ["AUTHORS_ESTIMATOR_NAMES", "ESTIMATORS", "LOSS_MODES", "TRAINER_MODE_PREFIX", "compute_advantage",
           "compute_advantage_for_multi_trajectories", "compute_policy_loss_steppo",
           "compute_policy_loss_steppo_rows", "compute_policy_loss_steppo_token",
           "compute_policy_loss_steppo_token_rows", "compute_step_gae_advantage", "count_turns",
           "detect_layout", "forward_with_steppo_fast", "register", "use_fused_head"]

# loss_mode -> (ratio level, what a step is)
LOSS_MODES = {
    "steppo": ("step", "turns"),
    "steppo_token": ("token", "turns"),
    "steppo_rows": ("step", "rows"),
    "steppo_token_rows": ("token", "rows"),
}


def _cfg(config, name: str, default=None):
    if config is None:
        return default
    if hasattr(config, "get"):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    return default if value is None else value


def _clip_range(config) -> Tuple[float, float]:
    if config is None:
        raise ValueError("config is required: the clip range comes from config.clip_ratio(_low/_high)")
    base = _cfg(config, "clip_ratio", 0.2)
    return float(_cfg(config, "clip_ratio_low", base)), float(_cfg(config, "clip_ratio_high", base))


def _steppo(ratio_level: str, steps: str, old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
            response_mask: Tensor, loss_agg_mode: str, config, rollout_is_weights: Optional[Tensor],
            global_num_turns=None) -> Tuple[Tensor, Dict[str, Any]]:
    clip_low, clip_high = _clip_range(config)
    info = _cfg(config, "global_batch_info", {}) or {}
    dp_size = info.get("dp_size", 1) or 1
    global_rows = info.get("global_batch_size")
    if steps == "rows":
        global_steps = global_rows
    else:
        global_steps = global_num_turns
    dual_clip = float(_cfg(config, "clip_ratio_c", 3.0)) if ratio_level == "token" else None
    loss, m = policy_loss(log_prob, old_log_prob, advantages, response_mask, ratio_level=ratio_level,
                          clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg_mode=loss_agg_mode,
                          weights=rollout_is_weights, global_num_tokens=info.get("batch_num_tokens"),
                          global_num_steps=global_steps, norm_constant=info.get("loss_scale_factor"),
                          mask_steps=steps)
    if steps == "turns" and global_num_turns is None and global_rows is not None and loss_agg_mode.startswith("seq"):
        # S' = global rows x (turns / rows) of this micro-batch; the op divided by the turns already.
        rows_here = (response_mask != 0).any(dim=-1).sum()
        loss = loss * (rows_here.to(loss.dtype) / float(global_rows))
    if dp_size != 1:
        loss = loss * dp_size
    metrics = {
        "actor/pg_clipfrac": m["pg_clipfrac"],
        "actor/ppo_kl": m["ppo_kl"],
        "actor/pg_clipfrac_lower": m["pg_clipfrac_lower"],
    }
    return loss, metrics


_LOSS_DOC = """{what}, verl's signature (registered as ``"{name}"``).

    Args:
        old_log_prob, log_prob, advantages: (B, T) float (log_prob differentiable).
        response_mask: (B, T) bool or 0/1, the agent tokens. {steps}
        loss_agg_mode: one of verl's five modes ("sequence" is a step here).
        config: verl's ActorConfig (or any object/dict with its clip and ``global_batch_info`` fields).
        rollout_is_weights: optional (B, T) rollout-correction weights.
        global_num_turns: the mini-batch's turn count over all ranks, when the caller has it
            (turn losses only; verl's actor does not pass it, see the module docstring).
    Returns:
        (loss, metrics): 0-dim loss and 0-dim tensors under verl's metric names.
    """
_TURNS = "Each maximal run of agent tokens in a row is one step (turn)."
_ROWS = "Each row is one step, whatever runs its mask holds."


def compute_policy_loss_steppo(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                               loss_agg_mode: str = "seq-mean-token-mean", config=None,
                               rollout_is_weights: Optional[Tensor] = None, *,
                               global_num_turns=None) -> Tuple[Tensor, Dict[str, Any]]:
    return _steppo("step", "turns", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                   rollout_is_weights, global_num_turns)


def compute_policy_loss_steppo_token(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
                                     response_mask: Tensor, loss_agg_mode: str = "token-mean", config=None,
                                     rollout_is_weights: Optional[Tensor] = None, *,
                                     global_num_turns=None) -> Tuple[Tensor, Dict[str, Any]]:
    return _steppo("token", "turns", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                   rollout_is_weights, global_num_turns)


def compute_policy_loss_steppo_rows(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
                                    response_mask: Tensor, loss_agg_mode: str = "seq-mean-token-mean", config=None,
                                    rollout_is_weights: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Any]]:
    return _steppo("step", "rows", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                   rollout_is_weights)


def compute_policy_loss_steppo_token_rows(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
                                          response_mask: Tensor, loss_agg_mode: str = "token-mean", config=None,
                                          rollout_is_weights: Optional[Tensor] = None
                                          ) -> Tuple[Tensor, Dict[str, Any]]:
    return _steppo("token", "rows", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                   rollout_is_weights)


compute_policy_loss_steppo.__doc__ = _LOSS_DOC.format(what="StepPO's loss with the step ratio", name="steppo",
                                                      steps=_TURNS)
compute_policy_loss_steppo_token.__doc__ = _LOSS_DOC.format(
    what="The token-ratio PPO loss with dual clip (``config.clip_ratio_c``)", name="steppo_token", steps=_TURNS)
compute_policy_loss_steppo_rows.__doc__ = _LOSS_DOC.format(
    what="StepPO's loss with the step ratio, one step per row (verl's ``gspo``)", name="steppo_rows", steps=_ROWS)
compute_policy_loss_steppo_token_rows.__doc__ = _LOSS_DOC.format(
    what="The token-ratio PPO loss, one step per row (verl's ``vanilla``)", name="steppo_token_rows", steps=_ROWS)


def count_turns(data) -> int:
    """The number of turns (maximal runs of agent tokens) in a batch, as a host int (one sync).

    Args:
        data: a verl ``DataProto`` or ``TensorDict`` with ``response_mask`` (rows marked
            ``is_pad`` in a DataProto's ``non_tensor_batch`` are left out), or a (B, T) mask.
    Returns:
        The turn count. Summed over data-parallel ranks for one mini-batch, it is the exact
        ``global_num_turns`` of the turn losses' sequence modes.
    """
    if isinstance(data, Tensor):
        mask = data
    else:
        batch = getattr(data, "batch", data)
        mask = batch["response_mask"]
        if getattr(mask, "is_nested", False):
            mask = mask.to_padded_tensor(0)
        extra = getattr(data, "non_tensor_batch", None) or {}
        if "is_pad" in extra:
            keep = torch.as_tensor(~np.asarray(extra["is_pad"], dtype=bool), device=mask.device)
            mask = mask[keep]
    if mask.dim() != 2:
        raise ValueError(f"response_mask must have shape (B, T), got {tuple(mask.shape)}")
    if mask.numel() == 0:
        return 0
    return int((step_ids_from_turns(mask).max(dim=1).values + 1).sum())


# ------------------------------------------------------------------ credit assignment
# verl's name (or ours) -> steppo_fast's estimator
ESTIMATORS = {
    "step_gae": "step_gae",
    "token_gae": "token_gae",
    "gae": "token_gae",
    "grpo": "grpo",
    "grpo_vectorized": "grpo",
    "rloo": "rloo",
    "rloo_vectorized": "rloo",
    "reinforce_plus_plus": "reinforce_pp",
    "reinforce_pp": "reinforce_pp",
    "reinforce_plus_plus_baseline": "reinforce_pp_baseline",
    "reinforce_pp_baseline": "reinforce_pp_baseline",
    "gigpo": "gigpo",
}
# The names the StepPO authors' trainer uses -> the names here (their "gae" is step-level GAE).
AUTHORS_ESTIMATOR_NAMES = {"gae": "step_gae", "token_gae": "token_gae", "grpo": "grpo", "rloo": "rloo",
                           "reinforce_plus_plus": "reinforce_plus_plus",
                           "reinforce_plus_plus_baseline": "reinforce_plus_plus_baseline", "gigpo": "gigpo"}
_GIGPO_KWARGS = ("gigpo_step_advantage_w", "gigpo_mode", "gigpo_enable_similarity", "gigpo_similarity_thresh")
_LAYOUTS = ("step_rows", "per_turn_outputs", "agent_loop_rows")
REWARD_SOURCES = ("token_level_rewards", "turn_scores", "both")
COPIED_REWARD = ("last", "each")


def _as_array(name: str, values, n: int) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have one entry per row ({n}), got shape {arr.shape}")
    return arr


def _object_rows(name: str, values, n: int) -> np.ndarray:
    """A (n,) object array holding one Python object (list, str, None, ...) per row."""
    items = list(values)
    if len(items) != n:
        raise ValueError(f"{name} must have one entry per row ({n}), got {len(items)}")
    out = np.empty(n, dtype=object)
    out[:] = [None] * n
    for i, v in enumerate(items):
        out[i] = v
    return out


def _codes(arr: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(unique labels as Python objects, inverse codes) of per-row ids: integers sort as integers,
    anything else as text."""
    if np.issubdtype(arr.dtype, np.integer):
        uniq, inv = np.unique(arr, return_inverse=True)
    else:
        uniq, inv = np.unique(arr.astype(str), return_inverse=True)
    names = np.empty(len(uniq), dtype=object)
    names[:] = uniq.tolist()
    return names, inv.astype(np.int64)


def _show(x) -> str:
    """A user's id as it reads in an error message ('abc' or 7, never numpy's wrapper)."""
    return repr(x.item() if isinstance(x, np.generic) else x)


@dataclass
class _Steps:
    """Where every step of a batch lives, whatever the input layout.

    token_step: (B, T) int64 global step of each agent token of a kept row, -1 elsewhere.
    reward_step: (B, T) int64 step a reward on that token counts for, -1 where none may sit.
    step_traj, step_pos, step_group: (S,) int64; steps are numbered by (trajectory, k).
    step_row: (S,) int64 row holding the step; traj_label / row_label name things for errors.
    """

    layout: str
    token_step: Tensor
    reward_step: Tensor
    step_traj: Tensor
    step_pos: Tensor
    step_group: Tensor
    step_row: Tensor
    kept: np.ndarray
    row_label: List[str]
    last_row: np.ndarray  # (B,) bool: the row holds the last segment of its trajectory


def detect_layout(non_tensor_batch: Optional[dict] = None, batch_keys: Optional[Sequence[str]] = None) -> str:
    """Which layout a batch is in: ``"step_rows"`` when ``non_tensor_batch`` holds
    ``trajectory_uids`` and ``step_indices``; else ``"per_turn_outputs"`` when ``batch_keys`` are
    given; else ``"agent_loop_rows"`` (one row per trajectory). One id without the other is an error."""
    extra = non_tensor_batch or {}
    has = [k in extra for k in ("trajectory_uids", "step_indices")]
    if any(has) and not all(has):
        missing = "step_indices" if has[0] else "trajectory_uids"
        raise ValueError(f"non_tensor_batch has {'trajectory_uids' if has[0] else 'step_indices'} but not {missing}: "
                         "step rows need both (one row per step), agent-loop rows neither")
    if all(has):
        if batch_keys is not None:
            raise ValueError("give either step ids (trajectory_uids, step_indices) or batch_keys, not both")
        return "step_rows"
    return "per_turn_outputs" if batch_keys is not None else "agent_loop_rows"


def _runs(mask: Tensor) -> Tuple[Tensor, Tensor]:
    """(k (B, T) run index of each agent token or -1, runs per row (B,))."""
    k = step_ids_from_turns(mask)
    n = (k.max(dim=1).values + 1) if k.shape[1] > 0 else torch.zeros(k.shape[0], dtype=torch.int64,
                                                                     device=k.device)
    return k, n


def _forward_fill(step: Tensor) -> Tensor:
    """Along each row, the last non-negative value at or before each position (-1 before the first)."""
    if step.shape[1] == 0:
        return step
    return torch.cummax(step, dim=1).values


def _check_no_empty(mask: Tensor, kept: np.ndarray, labels: List[str]) -> None:
    empty = (~mask.any(dim=1)).cpu().numpy() & kept
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise ValueError(f"{labels[i]}: response_mask has no agent token, so it holds no step; drop the row or "
                         "mark it is_pad")


def _steps_of_step_rows(mask: Tensor, extra: dict, kept: np.ndarray, uids: Optional[np.ndarray]) -> _Steps:
    B, dev = mask.shape[0], mask.device
    traj = _as_array("trajectory_uids", extra["trajectory_uids"], B)
    k = _as_array("step_indices", extra["step_indices"], B)
    if not np.issubdtype(k.dtype, np.integer):
        try:
            k = k.astype(np.int64)
        except (TypeError, ValueError):
            raise ValueError(f"step_indices must be integers, got {k[:4]!r}...") from None
    labels = [f"row {i} (trajectory {_show(traj[i])}, step {int(k[i])})" for i in range(B)]
    _check_no_empty(mask, kept, labels)
    rows = np.flatnonzero(kept)
    names, codes = _codes(traj[rows])
    # The group of each row: its uid, else its trajectory (a group of one).
    group_names, group_codes = _codes(uids) if uids is not None else (None, None)
    order = np.lexsort((k[rows], codes))
    rows_sorted, codes_sorted, k_sorted = rows[order], codes[order], k[rows][order]
    counts = np.bincount(codes_sorted, minlength=len(names))
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(len(rows_sorted)) - first[codes_sorted]
    bad = np.flatnonzero(k_sorted != pos)
    if bad.size:
        r = codes_sorted[bad[0]]
        ks = sorted(int(x) for x in k_sorted[codes_sorted == r])
        kind = "duplicate step index" if len(set(ks)) < len(ks) else "gap in step indices"
        raise ValueError(f"trajectory {_show(names[r])}: {kind}; step_indices of its rows must be exactly "
                         f"0..{len(ks) - 1} in some order, got {ks}")
    if group_codes is None:
        grp = codes_sorted
    else:
        grp = group_codes[rows_sorted]
    mixed = np.flatnonzero(grp != grp[first[codes_sorted]])
    if mixed.size:
        r = codes_sorted[mixed[0]]
        seen = sorted({str(group_names[g]) for g in grp[codes_sorted == r]})
        raise ValueError(f"trajectory {_show(names[r])}: its rows carry different uid values {seen}; all steps of a "
                         "trajectory must belong to one group")
    S = len(rows_sorted)
    step_of_row = np.full(B, -1, dtype=np.int64)
    step_of_row[rows_sorted] = np.arange(S)
    sor = torch.as_tensor(step_of_row, device=dev)[:, None].expand(mask.shape)
    token_step = torch.where(mask, sor, torch.full_like(sor, -1))
    last = np.zeros(B, dtype=bool)
    last[rows] = True
    return _Steps("step_rows", token_step, sor.clone(), torch.as_tensor(codes_sorted, device=dev),
                  torch.as_tensor(pos, device=dev), torch.as_tensor(grp, device=dev),
                  torch.as_tensor(rows_sorted, device=dev), kept, labels, last)


def _segments(traj_codes: np.ndarray, seg: np.ndarray, names: np.ndarray, label) -> np.ndarray:
    """Rows sorted by (trajectory, segment); checks each trajectory's segments are 0..n-1."""
    order = np.lexsort((seg, traj_codes))
    tc, sg = traj_codes[order], seg[order]
    counts = np.bincount(tc, minlength=len(names))
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(len(order)) - first[tc]
    bad = np.flatnonzero(sg != pos)
    if bad.size:
        r = tc[bad[0]]
        got = sorted(int(x) for x in sg[tc == r])
        kind = "appears twice" if len(set(got)) < len(got) else "is missing"
        raise ValueError(f"{label(r)}: its rows are split inconsistently, an output index {kind}; the indices "
                         f"must be exactly 0..{len(got) - 1}, got {got}")
    return order


def _steps_of_turn_rows(mask: Tensor, kept: np.ndarray, labels: List[str], traj_codes: np.ndarray,
                        seg: np.ndarray, group_codes: np.ndarray, traj_label, layout: str) -> _Steps:
    """Steps of rows whose runs are turns; a trajectory spans the rows of one code, in segment order."""
    B, dev = mask.shape[0], mask.device
    _check_no_empty(mask, kept, labels)
    rows = np.flatnonzero(kept)
    n_traj = int(traj_codes[rows].max()) + 1 if rows.size else 0
    order = rows[_segments(traj_codes[rows], seg[rows], np.arange(n_traj), traj_label)]
    k, n_runs = _runs(mask)
    n_np = n_runs.cpu().numpy()
    row_first = np.full(B, 0, dtype=np.int64)
    row_first[order] = np.concatenate([[0], np.cumsum(n_np[order])[:-1]]) if order.size else []
    S = int(n_np[order].sum())
    first_t = torch.as_tensor(row_first, device=dev)[:, None]
    kept_t = torch.as_tensor(kept, device=dev)[:, None]
    token_step = torch.where(mask & kept_t, k + first_t, torch.full_like(k, -1))
    reward_step = torch.where(kept_t, _forward_fill(token_step), torch.full_like(k, -1))
    step_row = torch.as_tensor(np.repeat(order, n_np[order]), device=dev, dtype=torch.int64)
    step_traj = torch.as_tensor(traj_codes, device=dev)[step_row]
    traj_first = torch.zeros(max(n_traj, 1), dtype=torch.int64, device=dev)
    traj_first.scatter_reduce_(0, step_traj, torch.arange(S, device=dev), "amin", include_self=False)
    step_pos = torch.arange(S, device=dev) - traj_first[step_traj]
    step_group = torch.as_tensor(group_codes, device=dev)[step_row]
    last = np.zeros(B, dtype=bool)
    if order.size:
        tc = traj_codes[order]
        is_last = np.append(tc[1:] != tc[:-1], True)
        last[order[is_last]] = True
    return _Steps(layout, token_step, reward_step, step_traj, step_pos, step_group, step_row, kept, labels, last)


def _parse_keys(batch_keys: Sequence[str], uids: Optional[np.ndarray], B: int):
    keys = list(batch_keys)
    if len(keys) != B:
        raise ValueError(f"batch_keys must have one key per row ({B}), got {len(keys)}")
    traj, seg, group = [], np.zeros(B, dtype=np.int64), []
    for i, key in enumerate(keys):
        parts = str(key).rsplit("_", 2)
        if len(parts) != 3 or not parts[1].lstrip("-").isdigit() or not parts[2].isdigit():
            raise ValueError(f"batch key {key!r} (row {i}) is not of verl's form '{{uid}}_{{session}}_{{index}}'")
        if uids is not None and str(uids[i]) != parts[0]:
            raise ValueError(f"batch key {key!r} (row {i}) names uid {parts[0]!r} but non_tensor_batch['uid'] holds "
                             f"{str(uids[i])!r}: the keys and the rows are not in the same order")
        traj.append(f"{parts[0]}_{parts[1]}")
        seg[i] = int(parts[2])
        group.append(parts[0])
    return keys, np.asarray(traj), seg, np.asarray(group)


def _build_steps(mask: Tensor, extra: dict, batch_keys, check_num_turns: bool = True) -> _Steps:
    B = mask.shape[0]
    layout = detect_layout(extra, batch_keys)
    kept = np.ones(B, dtype=bool)
    if "is_pad" in extra:
        kept = ~_as_array("is_pad", extra["is_pad"], B).astype(bool)
    uids = _as_array("uid", extra["uid"], B) if "uid" in extra else None
    if layout == "step_rows":
        return _steps_of_step_rows(mask, extra, kept, uids)
    if layout == "per_turn_outputs":
        keys, traj, seg, group = _parse_keys(batch_keys, uids, B)
        traj_names, traj_codes = _codes(traj)
        _, group_codes = _codes(group)
        labels = [f"batch key {key!r}" for key in keys]
        return _steps_of_turn_rows(mask, kept, labels, traj_codes, seg, group_codes,
                                   lambda r: f"trajectory {_show(traj_names[r])}", layout)
    labels = [f"row {i}" + ("" if uids is None else f" (uid {_show(uids[i])})") for i in range(B)]
    group_codes = _codes(uids)[1] if uids is not None else np.arange(B, dtype=np.int64)
    if check_num_turns and "__num_turns__" in extra:
        _check_num_turns(mask, _as_array("__num_turns__", extra["__num_turns__"], B), kept, labels)
    return _steps_of_turn_rows(mask, kept, labels, np.arange(B, dtype=np.int64), np.zeros(B, dtype=np.int64),
                               group_codes, lambda r: labels[r], layout)


def _check_num_turns(mask: Tensor, num_turns: np.ndarray, kept: np.ndarray, labels: List[str]) -> None:
    """A row cannot hold more runs of generated tokens than it has assistant turns. verl's agent loops
    count in ``__num_turns__`` the first user message, every assistant turn and every tool or user turn,
    and a tool or user turn separates two assistant turns, so there are at most ``__num_turns__ // 2``."""
    _, n = _runs(mask)
    n = n.cpu().numpy()
    most = num_turns.astype(np.int64) // 2
    over = kept & (most > 0) & (n > most)
    if over.any():
        i = int(np.flatnonzero(over)[0])
        raise ValueError(f"{labels[i]}: response_mask has {int(n[i])} runs of agent tokens but __num_turns__ = "
                         f"{int(num_turns[i])} allows at most {int(most[i])} assistant turns; a generated turn is "
                         "split by 0s in the mask (if the agent loop counts __num_turns__ otherwise, pass "
                         "check_num_turns=False)")


def _step_rewards_from_turn_scores(steps: _Steps, turn_scores, B: int, dev) -> Tensor:
    if steps.layout != "agent_loop_rows":
        raise ValueError("turn_scores (one list per trajectory row) are read on agent-loop rows only; this batch is "
                         f"in the {steps.layout} layout")
    scores = _object_rows("turn_scores", turn_scores, B)
    S = steps.step_traj.numel()
    rows = steps.step_row.cpu().numpy()
    pos = steps.step_pos.cpu().numpy()
    out = np.zeros(S, dtype=np.float64)
    n_of_row = np.bincount(rows, minlength=B)
    for b in np.flatnonzero(steps.kept):
        sc = scores[b]
        sc = [] if sc is None else list(sc)
        if len(sc) != n_of_row[b]:
            raise ValueError(f"{steps.row_label[b]}: turn_scores has {len(sc)} entries but the row holds "
                             f"{int(n_of_row[b])} turns (runs of response_mask); one score per turn is needed")
    for s in range(S):
        out[s] = float(list(scores[rows[s]])[pos[s]])
    return torch.as_tensor(out, device=dev)


def _virtual_rows(steps: _Steps, S: int) -> Tuple[Tensor, Tensor, Tensor]:
    """One virtual row per step holding its agent tokens in time order.

    Returns (mask (S, L) bool, src (S, L) int64 flat token index or -1, last (S,) position of
    each step's last token)."""
    flat = steps.token_step.reshape(-1)
    dev = flat.device
    idx = torch.nonzero(flat >= 0).squeeze(1)
    st = flat[idx]
    n = torch.bincount(st, minlength=S)
    L = int(n.max()) if S > 0 else 0
    # A step's tokens are contiguous among the agent tokens (a step never leaves its row).
    is_start = torch.ones_like(st, dtype=torch.bool)
    is_start[1:] = st[1:] != st[:-1]
    ar = torch.arange(st.numel(), device=dev)
    start = torch.cummax(torch.where(is_start, ar, torch.zeros_like(ar)), dim=0).values
    pos = ar - start
    vmask = torch.zeros(S, L, dtype=torch.bool, device=dev)
    src = torch.full((S, L), -1, dtype=torch.int64, device=dev)
    vmask[st, pos] = True
    src[st, pos] = idx
    return vmask, src, (n - 1).clamp(min=0)


def _credit(estimator: str, mask: Tensor, rewards: Optional[Tensor], values: Optional[Tensor], extra: dict,
            batch_keys, gamma: float, lam: float, norm_by_std: bool, reward_source: str, copied_reward: str,
            scores: Optional[Tensor], gigpo: dict, check_num_turns: bool = True) -> Tuple[Tensor, Tensor]:
    """(advantages, returns) (B, T) in the rewards' dtype; 0 off the agent tokens and on is_pad rows."""
    if reward_source not in REWARD_SOURCES:
        raise ValueError(f"reward_source must be one of {REWARD_SOURCES}, got {reward_source!r}")
    if copied_reward not in COPIED_REWARD:
        raise ValueError(f"copied_reward must be one of {COPIED_REWARD}, got {copied_reward!r}")
    B, T = mask.shape
    dev = mask.device
    steps = _build_steps(mask, extra, batch_keys, check_num_turns)
    S = steps.step_traj.numel()
    if S == 0:
        raise ValueError("the batch holds no step: every row is marked is_pad")
    out_dtype = rewards.dtype if rewards is not None else torch.float32
    cdt = torch.float64 if out_dtype == torch.float64 else torch.float32  # the kernels' dtype
    vmask, src, last_pos = _virtual_rows(steps, S)
    L = vmask.shape[1]
    vsrc = src.clamp(min=0)

    # Token rewards: kept where they sit on agent tokens, else added to the last token of the step
    # they belong to (a reward nowhere near a turn is an error).
    vrew = torch.zeros(S, L, dtype=torch.float64, device=dev)
    if reward_source != "turn_scores":
        if rewards is None:
            raise ValueError("token_level_rewards are missing from data.batch")
        r = rewards.to(torch.float64)
        if steps.layout == "per_turn_outputs" and copied_reward == "last":
            # verl copies a session's final score onto every output: count it once, on the last.
            copies = scores.to(torch.float64) if scores is not None else r
            drop = torch.as_tensor(~steps.last_row, device=dev)[:, None]
            r = torch.where(drop, r - copies, r)
        kept_t = torch.as_tensor(steps.kept, device=dev)[:, None]
        stray = kept_t & (steps.reward_step < 0) & (r != 0)
        if bool(stray.any()):
            b = int(torch.nonzero(stray)[0, 0])
            t = int(torch.nonzero(stray[b])[0, 0])
            raise ValueError(f"{steps.row_label[b]}: a reward of {float(r[b, t]):g} sits at response position {t}, "
                             "before the row's first agent token, so it belongs to no turn")
        vrew = torch.where(vmask, r.reshape(-1)[vsrc], vrew)
        off = (steps.token_step < 0) & (steps.reward_step >= 0)
        moved = torch.zeros(S, dtype=torch.float64, device=dev)
        moved.index_add_(0, steps.reward_step[off], r[off])
        vrew[torch.arange(S, device=dev), last_pos] += moved
    if reward_source != "token_level_rewards":
        if "turn_scores" not in extra:
            raise ValueError(f"reward_source={reward_source!r} needs non_tensor_batch['turn_scores']")
        ts = _step_rewards_from_turn_scores(steps, extra["turn_scores"], B, dev)
        vrew[torch.arange(S, device=dev), last_pos] += ts

    kwargs: Dict[str, Any] = {}
    if estimator in ("step_gae", "token_gae"):
        if values is None:
            raise ValueError(f"{estimator} needs the critic's data.batch['values']; verl computes them only with a "
                             "critic: set critic.enable=True (verl enables it on its own only for adv_estimator=gae)")
        kwargs["values"] = torch.where(vmask, values.to(torch.float64).reshape(-1)[vsrc],
                                       torch.zeros((), dtype=torch.float64, device=dev))
    if estimator == "gigpo":
        kwargs.update(gigpo)
        kwargs["anchor_keys"] = _anchor_keys(steps, extra, B, dev)
    if "values" in kwargs:
        kwargs["values"] = kwargs["values"].to(cdt)
    lay = StepLayout.from_step_rows(vmask, steps.step_traj, steps.step_pos, steps.step_group, validate=False)
    out = compute_advantages(estimator, lay, token_rewards=vrew.to(cdt), gamma=gamma, lam=lam,
                             norm_by_std=norm_by_std, **kwargs)
    adv = torch.zeros(B * T, dtype=out_dtype, device=dev)
    ret = torch.zeros(B * T, dtype=out_dtype, device=dev)
    adv[src[vmask]] = out.token_advantages[vmask].to(out_dtype)
    ret[src[vmask]] = out.token_returns[vmask].to(out_dtype)
    return adv.reshape(B, T), ret.reshape(B, T)


def _anchor_keys(steps: _Steps, extra: dict, B: int, dev) -> Tensor:
    """GiGPO's anchor-state key of each step, from ``non_tensor_batch['anchor_obs']`` (one per row)."""
    if "anchor_obs" not in extra:
        raise ValueError("gigpo needs non_tensor_batch['anchor_obs'], the anchor state of each step row")
    if steps.layout == "agent_loop_rows":
        raise ValueError("gigpo needs one anchor state per turn, which agent-loop rows (one row per trajectory) do "
                         "not carry; use step rows or per-turn outputs with non_tensor_batch['anchor_obs']")
    rows = steps.step_row.cpu().numpy()
    if np.unique(rows).size != rows.size:
        raise ValueError("gigpo reads one anchor state per row, but some rows hold several turns")
    obs = _object_rows("anchor_obs", extra["anchor_obs"], B)
    _, codes = np.unique(np.asarray([repr(o) for o in obs]), return_inverse=True)
    return torch.as_tensor(codes[rows].astype(np.int64), device=dev)


def _gigpo_options(kwargs: dict) -> dict:
    unknown = sorted(k for k in kwargs if k not in _GIGPO_KWARGS)
    if unknown:
        raise TypeError(f"compute_advantage got unexpected keyword arguments {unknown}; besides verl's arguments it "
                        f"takes batch_keys, reward_source, copied_reward and the keywords {list(_GIGPO_KWARGS)}")
    if kwargs.get("gigpo_enable_similarity"):
        raise ValueError("gigpo_enable_similarity=True (text-similarity anchor groups) is not supported: anchor "
                         "states are grouped by equality of non_tensor_batch['anchor_obs']")
    out = {}
    if kwargs.get("gigpo_step_advantage_w") is not None:
        out["step_weight"] = float(kwargs["gigpo_step_advantage_w"])
    if kwargs.get("gigpo_mode") is not None:
        out["gigpo_mode"] = str(kwargs["gigpo_mode"])
    return out


def _estimator_name(adv_estimator) -> str:
    name = getattr(adv_estimator, "value", adv_estimator)
    if not isinstance(name, str):
        raise TypeError(f"adv_estimator must be a string or verl's AdvantageEstimator, got {type(name).__name__}")
    return name


def _verl_knows(name: str) -> bool:
    try:
        from verl.trainer.ppo.core_algos import get_adv_estimator_fn

        get_adv_estimator_fn(name)
        return True
    except (ImportError, ValueError):
        return False


def compute_advantage(data, adv_estimator, gamma: float = 1.0, lam: float = 1.0, num_repeat: int = 1,
                      norm_adv_by_std_in_grpo: bool = True, config=None, *, batch_keys: Optional[Sequence[str]] = None,
                      reward_source: str = "token_level_rewards", copied_reward: str = "last",
                      check_num_turns: bool = True, **kwargs):
    """Drop-in for verl's ``compute_advantage``: writes ``advantages`` and ``returns`` (B, T) into
    ``data.batch`` and returns ``data``.

    The layout is detected explicitly (:func:`detect_layout`): ``trajectory_uids`` and
    ``step_indices`` in ``non_tensor_batch`` -> step rows (one row per step); ``batch_keys`` given
    (verl V1's ``{uid}_{session}_{i}``, one per row) -> per-turn outputs; otherwise agent-loop rows
    (one row per trajectory, each run of ``response_mask`` one turn). ``uid`` is the group. The same
    episodes give the same advantages per turn in every layout.

    Estimators computed here, on steppo_fast's kernels (SPEC 4-6), with every turn a step:

    * ``step_gae``: StepPO's step-level GAE (the StepPO authors' ``gae``); reads ``values`` at
      each turn's first agent token, so the critic must be on (``critic.enable=True``).
    * ``token_gae``: token-level GAE over the agent tokens of a trajectory, across its turns.
    * ``gae``: verl's name for token-level GAE: ``token_gae`` on agent-loop rows and per-turn
      outputs (verl's own ``gae`` on one row per trajectory gives the same). On step rows it is
      an error: the authors' trainer means ``step_gae`` by it, verl means ``token_gae``.
    * ``grpo`` / ``rloo`` (and their ``_vectorized`` names), ``reinforce_plus_plus(_baseline)``:
      over trajectories (score = sum of its rewards), broadcast to their turns.
    * ``gigpo``: needs ``non_tensor_batch['anchor_obs']`` on step rows or per-turn outputs.

    Any other name verl knows runs verl's own ``compute_advantage``, on agent-loop rows only
    (there a row is a trajectory, as verl has it); on the other layouts it would treat every
    row as a trajectory, so it is an error, as is a name nobody knows.

    Args:
        data: verl ``DataProto`` with ``response_mask`` (else derived from the attention mask as
            verl does), ``token_level_rewards`` (B, T), ``values`` (B, T) for the GAEs, and
            ``uid`` in ``non_tensor_batch``. Rows with ``non_tensor_batch['is_pad']`` True (the
            authors' padding copies) take no part and get 0 advantages and returns.
        adv_estimator: a name above or verl's ``AdvantageEstimator``.
        gamma, lam, norm_adv_by_std_in_grpo: as verl's.
        num_repeat, config: accepted for verl's signature (unused by the estimators here).
        batch_keys: per-turn outputs' keys ``{uid}_{session}_{i}``, one per row.
        reward_source: ``"token_level_rewards"`` (default), ``"turn_scores"`` (one score per turn
            from ``non_tensor_batch['turn_scores']``, agent-loop rows) or ``"both"`` (their sum).
        copied_reward: per-turn outputs: ``"last"`` (default) counts the score verl copies onto
            every output of a session once, on its last output (rows before it keep only
            ``token_level_rewards - token_level_scores``, e.g. a KL penalty); ``"each"`` sums
            every row's rewards (for rows that carry rewards of their own).
        check_num_turns: on agent-loop rows, check that no row holds more runs of agent tokens than
            the assistant turns ``__num_turns__`` allows (a turn split by 0s in the mask).
        **kwargs: the authors' trainer's ``gigpo_step_advantage_w``, ``gigpo_mode``,
            ``gigpo_enable_similarity`` (must be False) and ``gigpo_similarity_thresh``; any other
            keyword is a TypeError.
    """
    gigpo = _gigpo_options(kwargs)
    name = _estimator_name(adv_estimator)
    batch, extra = data.batch, data.non_tensor_batch
    layout = detect_layout(extra, batch_keys)
    if name not in ESTIMATORS:
        if not _verl_knows(name):
            raise ValueError(f"unknown advantage estimator {name!r}; steppo_fast computes {sorted(ESTIMATORS)} "
                             "and hands other names verl registered to verl")
        if layout != "agent_loop_rows":
            raise ValueError(f"advantage estimator {name!r} is verl's own, which treats every row as a trajectory; "
                             f"this batch is in the {layout} layout, where a trajectory spans several rows; use one "
                             f"of {sorted(ESTIMATORS)}")
        from verl.trainer.ppo.ray_trainer import compute_advantage as verl_compute_advantage

        return verl_compute_advantage(data, adv_estimator, gamma, lam, num_repeat, norm_adv_by_std_in_grpo, config)
    if name == "gae" and layout == "step_rows":
        raise ValueError("adv_estimator 'gae' is ambiguous on step rows: verl's 'gae' is token-level GAE, the StepPO "
                         "authors' trainer calls step-level GAE 'gae'. Say 'step_gae' (StepPO's step GAE, the "
                         "authors' 'gae') or 'token_gae' (token-level GAE across the steps of each trajectory)")
    if "response_mask" not in batch.keys():  # as verl's compute_response_mask: the response part of attention_mask
        batch["response_mask"] = batch["attention_mask"][:, -batch["responses"].shape[1]:]
    mask = batch["response_mask"]
    if mask.dim() != 2:
        raise ValueError(f"response_mask must have shape (B, T), got {tuple(mask.shape)}")
    mask = mask.bool() if mask.dtype != torch.bool else mask
    keys = batch.keys()
    rewards = batch["token_level_rewards"] if "token_level_rewards" in keys else None
    values = batch["values"] if "values" in keys else None
    scores = batch["token_level_scores"] if "token_level_scores" in keys else None
    for tname, t in (("token_level_rewards", rewards), ("values", values), ("token_level_scores", scores)):
        if t is not None and tuple(t.shape) != tuple(mask.shape):
            raise ValueError(f"{tname} must have the shape of response_mask {tuple(mask.shape)}, got {tuple(t.shape)}")
    adv, ret = _credit(ESTIMATORS[name], mask, rewards, values, extra, batch_keys, float(gamma), float(lam),
                       bool(norm_adv_by_std_in_grpo), reward_source, copied_reward, scores, gigpo,
                       bool(check_num_turns))
    batch["advantages"] = adv
    batch["returns"] = ret
    return data


def compute_step_gae_advantage(token_level_rewards: Tensor, response_mask: Tensor, config=None, index=None,
                               values: Optional[Tensor] = None, trajectory_uids=None, step_indices=None,
                               gamma: Optional[float] = None, lam: Optional[float] = None, **unused):
    """StepPO's step-level GAE (SPEC 4) as verl's registered estimator ``"step_gae"``:
    (advantages, returns), (B, T).

    Rows are steps when ``trajectory_uids`` and ``step_indices`` are given, else trajectories whose
    turns are the runs of ``response_mask``; ``index`` (verl's ``uid``) is the group. gamma and
    lam come from the arguments, else from ``config`` (``algorithm.gamma`` / ``algorithm.lam``).
    verl 0.9.1's trainers call a registered estimator with the rewards, the mask, the config and
    the uids only, never the critic's ``values``: called that way it raises and names the
    ``steppo_*`` trainer modes and :func:`compute_advantage`, which read everything from the batch.
    """
    if values is None:
        raise ValueError("step_gae needs the critic's values, which verl's compute_advantage does not pass to a "
                         "registered estimator: run verl's V1 trainer in a steppo mode, trainer.v1.trainer_mode="
                         "steppo_sync (or steppo_colocate_async, steppo_separate_async), with critic.enable=True; "
                         "its advantage step hands values, batch keys and uid to "
                         "steppo_fast.integrations.verl.compute_advantage. In a trainer of your own, call that "
                         "function (data, 'step_gae', ...) in the advantage step")
    if (trajectory_uids is None) != (step_indices is None):
        raise ValueError("give both trajectory_uids and step_indices (step rows) or neither (one row per trajectory)")
    gamma = float(_cfg(config, "gamma", 1.0) if gamma is None else gamma)
    lam = float(_cfg(config, "lam", 1.0) if lam is None else lam)
    mask = response_mask.bool() if response_mask.dtype != torch.bool else response_mask
    B = mask.shape[0]
    extra = {}
    if index is not None:
        extra["uid"] = _as_array("uid", index, B)
    if trajectory_uids is not None:
        extra["trajectory_uids"] = _as_array("trajectory_uids", trajectory_uids, B)
        extra["step_indices"] = _as_array("step_indices", step_indices, B)
    return _credit("step_gae", mask, token_level_rewards, values, extra, None, gamma, lam, True,
                   "token_level_rewards", "last", None, {})


# ------------------------------------------------------------------ verl V1 trainer modes
TRAINER_MODE_PREFIX = "steppo_"
_V1_PACKAGE = "verl.trainer.ppo.v1"


def compute_advantage_for_multi_trajectories(data, batch_keys: Sequence[str], adv_estimator, gamma: float = 1.0,
                                             lam: float = 1.0, num_repeat: int = 1,
                                             norm_adv_by_std_in_grpo: bool = True, config=None):
    """verl V1's advantage step (``verl.trainer.ppo.v1.utils``, same arguments) with StepPO's credit
    assignment; the ``steppo_*`` trainer modes run it in place of verl's.

    Args:
        data: the ``DataProto`` verl's ``PPOTrainer._compute_advantage`` builds from the transfer
            queue: right-padded (B, T) ``response_mask``, ``token_level_scores`` (verl's
            ``rm_scores``), ``token_level_rewards`` (minus the KL penalty when it is in the reward),
            ``values`` when the critic is on; ``uid`` in ``non_tensor_batch``.
        batch_keys: the rows' keys ``{uid}_{session}_{i}``, one per row.
        adv_estimator, gamma, lam, num_repeat, norm_adv_by_std_in_grpo, config: as verl passes them.
    Returns:
        ``data`` with ``advantages`` and ``returns`` (B, T) in the rewards' dtype.

    For the estimators in :data:`ESTIMATORS` this is :func:`compute_advantage` with the keys (the
    per-turn-outputs layout): a session ``{uid}_{session}`` is one trajectory, its outputs in index
    order, each run of agent tokens in them one turn, and the score verl copies onto every output
    of a session counts once, on its last output. ``gigpo`` is an error here (verl's trainer reads no
    anchor states from the queue), as is rollout rejection sampling (``rollout_correction.rollout_rs``
    outside bypass mode), which verl applies to ``response_mask`` before this step and which would
    split or remove turns. Any other name runs verl's own function unchanged.
    """
    name = _estimator_name(adv_estimator)
    if name not in ESTIMATORS:
        from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories as verls

        return verls(data, batch_keys=batch_keys, adv_estimator=adv_estimator, gamma=gamma, lam=lam,
                     num_repeat=num_repeat, norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo, config=config)
    if ESTIMATORS[name] == "gigpo":
        raise ValueError("adv_estimator 'gigpo' is not available in the steppo trainer modes: it needs one anchor "
                         "state per turn, and verl's V1 trainer reads none from the transfer queue; call "
                         "compute_advantage with non_tensor_batch['anchor_obs'] from a trainer of your own")
    correction = _cfg(config, "rollout_correction")
    if (_cfg(correction, "rollout_rs") is not None and not _cfg(correction, "bypass_mode", False)
            and "rollout_log_probs" in data.batch.keys()):
        raise ValueError("algorithm.rollout_correction.rollout_rs (rejection sampling) is not supported with "
                         f"adv_estimator {name!r} in the steppo trainer modes: verl applies it to response_mask "
                         "before the advantage step, which would split or remove the turns credit is assigned to; "
                         "importance weights (rollout_is) are supported")
    return compute_advantage(data, name, gamma, lam, num_repeat, norm_adv_by_std_in_grpo, config,
                             batch_keys=list(batch_keys))


class _Namespace(dict):
    """A function's global namespace with some names bound otherwise: those live here, every other name
    is read from the module's own namespace at call time (``__missing__``), so the module stays as it is."""

    def __init__(self, module_namespace: dict, overrides: dict):
        super().__init__(overrides)
        self["__builtins__"] = module_namespace["__builtins__"]
        self._module_namespace = module_namespace

    def __missing__(self, key):
        return self._module_namespace[key]


def _rebound(fn, **overrides):
    """A new function running ``fn``'s code, in which the global names in ``overrides`` mean the values
    given; ``fn``, its class and its module are left untouched."""
    read = {ins.argval for ins in dis.get_instructions(fn.__code__) if ins.opname.startswith("LOAD_GLOBAL")}
    unknown = sorted(n for n in overrides if n not in read)
    if unknown:
        raise TypeError(f"{fn.__module__}.{fn.__qualname__} no longer calls {unknown} as a module global: this "
                        "verl version is not supported by the steppo trainer modes")
    new = types.FunctionType(fn.__code__, _Namespace(fn.__globals__, overrides), fn.__name__, fn.__defaults__,
                             fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__, new.__doc__, new.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    return new


class _VerlMode:
    """``trainer_mode`` of a steppo trainer. verl's base class keys its behaviour on ``self.trainer_mode``
    (which replay buffer, exact refill, parameter sync, the ``trainer.v1.<mode>`` settings), so a steppo
    mode reads as the verl mode it extends; the value verl's ``__init__`` assigns from
    ``trainer.v1.trainer_mode`` is checked, not stored."""

    def __init__(self, verl_mode: str):
        self.verl_mode = verl_mode
        self.steppo_mode = TRAINER_MODE_PREFIX + verl_mode

    def __get__(self, obj, owner=None) -> str:
        return self.verl_mode

    def __set__(self, obj, value) -> None:
        if value not in (self.steppo_mode, self.verl_mode):
            raise ValueError(f"trainer.v1.trainer_mode is {value!r}, but this trainer is {self.steppo_mode!r} "
                             f"(verl's {self.verl_mode!r} with StepPO's advantages)")


def _steppo_trainer(verl_mode: str, base: type) -> type:
    name = "StepPO" + (base.__name__[3:] if base.__name__.startswith("PPO") else base.__name__)
    advantage = _rebound(base._compute_advantage,
                         compute_advantage_for_multi_trajectories=compute_advantage_for_multi_trajectories)
    doc = (f"verl's ``{verl_mode}`` V1 trainer ({base.__module__}.{base.__name__}) whose advantage step is "
           ":func:`compute_advantage_for_multi_trajectories` (registered as "
           f"``trainer.v1.trainer_mode={TRAINER_MODE_PREFIX}{verl_mode}``). Everything else is verl's: "
           "``_compute_advantage`` runs verl's own code (KL in the reward, rollout correction, the fields "
           "written back) with that one call bound to steppo_fast's, and the trainer reads its settings "
           f"from ``trainer.v1.{verl_mode}``.")

    def body(ns):
        ns.update({"__module__": __name__, "__doc__": doc, "trainer_mode": _VerlMode(verl_mode),
                   "_compute_advantage": advantage})

    cls = types.new_class(name, (base,), exec_body=body)
    cls.__qualname__ = name
    return cls


def _register_trainers() -> None:
    """Registers ``steppo_<mode>`` for every trainer mode verl's V1 package registers itself (once
    that package is imported); idempotent."""
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY, register_trainer

    for verl_mode, base in list(TRAINER_REGISTRY.items()):
        if verl_mode.startswith(TRAINER_MODE_PREFIX) or not base.__module__.startswith("verl."):
            continue
        cls = TRAINER_REGISTRY.get(TRAINER_MODE_PREFIX + verl_mode)
        if cls is None or cls.__module__ != __name__ or cls.__bases__ != (base,):
            cls = register_trainer(TRAINER_MODE_PREFIX + verl_mode)(_steppo_trainer(verl_mode, base))
        globals()[cls.__name__] = cls


def _register_trainers_reporting(module=None) -> None:
    # Runs inside the import of verl's V1 package: a failure must not break that import for runs
    # that do not use the steppo modes, so it is reported as a warning (and get_trainer_cls then
    # lists the modes that exist).
    try:
        _register_trainers()
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"steppo_fast: the steppo trainer modes are not registered with verl's V1 trainer: {e!r}",
                      RuntimeWarning, stacklevel=2)


class _LoaderThenCall(importlib.abc.Loader):
    """A module's own loader, then ``callback(module)`` once the module has run."""

    def __init__(self, loader, callback):
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._callback(module)

    def __getattr__(self, name):  # get_source, get_filename, is_package, get_resource_reader, ...
        return getattr(self._loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``callback(module)`` right after the module ``name`` is imported (by anyone), then leaves
    ``sys.meta_path``: the module is found and run by the finders and loader that would run it anyway."""

    def __init__(self, name: str, callback):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _LoaderThenCall(spec.loader, self._done)
        return spec

    def _done(self, module) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        self.callback(module)


def _register_trainers_when_imported() -> None:
    """The steppo trainer modes exist in every process that imports verl's V1 trainer package, which
    is what ``get_trainer_cls`` reads (verl's TaskRunner imports it right before). Importing it costs
    seconds and needs TransferQueue, so this module never imports it: it registers the modes right
    after verl's own import of the package, or now if that already happened."""
    if _V1_PACKAGE in sys.modules:
        _register_trainers_reporting(sys.modules[_V1_PACKAGE])
    elif not any(isinstance(f, _AfterImport) and f.name == _V1_PACKAGE for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(_V1_PACKAGE, _register_trainers_reporting))


def __getattr__(name: str):
    # The trainer classes (StepPOTrainerSync, ...) exist once verl's V1 package is imported.
    if name.startswith("StepPOTrainer"):
        importlib.import_module(_V1_PACKAGE)
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------ fused head
def forward_with_steppo_fast(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                             inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                             output_hidden_states=None, return_dict=None, cache_position=None, logits_to_keep=0,
                             temperature: float = 1.0, shift_labels=None, **loss_kwargs):
    """verl's fused-kernel forward (``use_fused_kernels``) with steppo_fast's linear head.

    Same arguments and output as verl's ``forward_with_torch_backend``: the decoder runs through
    verl's ``forward_base_model``; the label of position t is the token at t + 1 (``shift_labels``
    if given, else ``labels`` or ``input_ids`` rolled by one), and ``log_probs`` (fp32) and
    ``entropy`` (the hidden states' dtype) come from ``linear_token_logprobs`` on the lm_head.
    """
    from verl.models.transformers.dense_common import CausalLMOutputForPPO, forward_base_model

    if return_dict is False:
        raise ValueError("forward_with_steppo_fast returns a CausalLMOutputForPPO; return_dict=False is not supported")
    outputs = forward_base_model(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                 output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                 cache_position=cache_position)
    hidden = outputs[0]
    if shift_labels is not None:
        targets = shift_labels
    elif labels is not None:
        targets = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        targets = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise ValueError("forward_with_steppo_fast needs labels, shift_labels or input_ids")
    head = self.lm_head
    # A vocabulary-split head (a DTensor weight, or this rank's rows with the group given to
    # use_fused_head) takes the vocabulary-parallel path; a whole one the local op.
    log_probs, entropy = vocab_parallel_linear_token_logprobs(
        hidden, head.weight, targets, None, temperature, getattr(head, "bias", None),
        process_group=getattr(self, "_steppo_fast_process_group", None), validate=False)
    return CausalLMOutputForPPO(log_probs=log_probs, entropy=entropy.to(hidden.dtype),
                                past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states,
                                attentions=outputs.attentions)


def use_fused_head(model, process_group=None):
    """Binds :func:`forward_with_steppo_fast` as ``model.forward`` (this instance only; the class and
    other models are untouched) and returns the model.

    process_group: the tensor-parallel group when ``model.lm_head.weight`` holds only this rank's
    rows of the vocabulary (``steppo_fast.vocab_parallel``); not needed for a DTensor weight
    (torch tensor parallelism, FSDP2), whose mesh says how it is split.
    """
    if not hasattr(model, "lm_head") or not hasattr(model, "model"):
        raise TypeError(f"use_fused_head needs a causal LM with .model and .lm_head, got {type(model).__name__}")
    model._steppo_fast_process_group = process_group
    model.forward = types.MethodType(forward_with_steppo_fast, model)
    return model


_LOSSES = {
    "steppo": compute_policy_loss_steppo,
    "steppo_token": compute_policy_loss_steppo_token,
    "steppo_rows": compute_policy_loss_steppo_rows,
    "steppo_token_rows": compute_policy_loss_steppo_token_rows,
}


def register() -> None:
    """Registers the losses ``steppo``, ``steppo_token``, ``steppo_rows``, ``steppo_token_rows`` and
    the advantage estimator ``step_gae`` with verl's registries, and the V1 trainer modes
    ``steppo_<mode>`` when verl's V1 trainer package is imported (done on import; idempotent)."""
    from verl.trainer.ppo.core_algos import register_adv_est, register_policy_loss

    for name, fn in _LOSSES.items():
        register_policy_loss(name)(fn)
    register_adv_est("step_gae")(compute_step_gae_advantage)
    _register_trainers_when_imported()


register()
