"""Vocabulary-parallel fronts: log-probs, entropy and the fused StepPO loss with the lm_head (or
the logits) split over the vocabulary across a tensor-parallel group (SPEC sections 2 and 7).

Each rank of the group passes the same hidden states (N, H), labels and layout, and its own
shard of the weight (V_r, H) (+ bias (V_r,)) or of the logits (N, V_r); every rank gets the
log-probs, entropies, loss and metrics of the whole vocabulary, the same bits on every rank, and
the gradients of its own shard. No logits cross ranks: per chunk of tokens, one all-gather of
three float64 per token (``steppo_fast.tensor_parallel`` has the math).

Where the shards come from:

* ``process_group=`` a ``ProcessGroup`` (Megatron's tensor-parallel group), a 1-D ``DeviceMesh``,
  or a ``DeviceMesh`` with ``mesh_dim=``: rank r of the group holds the r-th slice of the
  vocabulary (for a mesh: the r-th along that dimension). Shards may be uneven (V not divisible
  by the group size) or empty; their sizes are read from the ranks' tensors.
* A ``DTensor`` weight (or logits):

  - ``Shard(0)`` on one mesh dimension (``Shard(-1)`` for logits), ``Replicate()`` on the others:
    torch's ``ColwiseParallel`` lm_head. The vocabulary-parallel path over that dimension.
  - ``Replicate()`` everywhere: the local ops on the local copy.
  - A weight that FSDP2's ``fully_shard`` sharded: also ``Shard(0)``, but over data-parallel
    ranks, which hold different tokens. The up-front check (below) sees that the ranks' tokens
    differ and then, on a 1-D mesh, gathers the weight for the call (one all-gather of the weight,
    as FSDP2 does before a forward) and runs the local ops; the weight's gradient is averaged over
    the ranks and each rank keeps its shard, which is FSDP2's default reduction. A warning says so
    once per process. (The vocabulary split over ranks that do hold the same tokens gives the same
    numbers, so either route is exact.)
  - Anything else (``Partial``, a shard of another dimension, the vocabulary sharded over two
    mesh dimensions as FSDP2 over a tensor-parallel head does, mismatched bias or hidden meshes):
    a clear error. Gather such a weight first (``weight.full_tensor()``, or run inside the FSDP
    module's forward).

  Hidden states or labels given as DTensors are made whole (``full_tensor()``) first.

grad_hidden. The weight shard's gradient is local. The hidden states' gradient is a sum over
ranks, sum_r G_r W_r, and someone must reduce it. With ``reduce_grad_hidden=True`` (the default)
the backward all-reduces it (the fused loss does so in its forward, where its gradients are
computed), so the gradient of ``hidden`` is complete and the same on every rank: right for plain
PyTorch and for torch tensor parallelism, where the hidden states reaching the head are a
replicated tensor. Pass ``False`` where the framework reduces it itself: Megatron's
``copy_to_tensor_model_parallel_region`` (all-reduce in its backward) or, with sequence
parallelism, ``gather_from_sequence_parallel_region`` (reduce-scatter in its backward), which is
what verl's Megatron backend puts before its fused head (``linear_cross_entropy`` here defaults to
``False`` for that reason, like verl's).

The up-front check: before the first chunk, one all-gather of a few numbers per rank (sizes,
dtype, shard sizes, chunk, temperature, and fingerprints of the labels, layout, hidden states and
per-token inputs) lets every rank see the same table and raise the same ValueError when the ranks
disagree (different H, a masked-in label outside [0, V), a group that does not match the
weight's mesh, different tokens), instead of hanging in a later collective. It costs one host
synchronisation per call; ``validate=False`` skips the fingerprints and the label range (errors
in sizes are still caught) but not the collective, which also reads the shard sizes.

Every rank must make the same calls in the same order, with the same options; the loss, log-probs
and their gradients with respect to anything but the shards are identical on every rank.

Reproducibility: the per-token statistics are all-gathered and every rank combines them in rank
order in float64, so the log-probs, entropies, loss and metrics are the same bits on every rank,
and they and the weight-shard gradients the same bits in every run. grad_hidden's sum is the
backend's all-reduce: with two ranks any order gives the same bits; with more it is as
reproducible as the backend's all-reduce. In bf16/fp16 that sum is taken in the hidden states'
dtype, as Megatron's is (one more rounding than the unsharded op's).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import tensor_parallel as tp
from .layout import StepLayout
from .ops import vocab_parallel as vp_ops  # registers the steppo_fast::vocab_parallel_* ops

__all__ = ["linear_cross_entropy", "linear_steppo_loss", "linear_token_logprobs", "token_logprobs"]


# ------------------------------------------------------------------ DTensors
@functools.lru_cache(maxsize=None)
def _dtensor_api():
    """(DTensor, Shard, Replicate) or None where torch has no DTensor."""
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # torch 2.4
        try:
            from torch.distributed._tensor import DTensor, Replicate, Shard
        except ImportError:
            return None
    return DTensor, Shard, Replicate


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    api = _dtensor_api() if isinstance(t, Tensor) else None
    return api is not None and isinstance(t, api[0])


def _whole(t: Optional[Tensor]) -> Optional[Tensor]:
    """A DTensor made whole on every rank (differentiable); anything else as it is."""
    return t.full_tensor() if is_dtensor(t) else t


def _is_device_mesh(x) -> bool:
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:
        return False
    return isinstance(x, DeviceMesh)


def resolve_group(process_group, mesh_dim=None) -> Tuple[Optional["dist.ProcessGroup"], int]:
    """(group, shard index of this rank) from a ProcessGroup, a DeviceMesh (+ mesh_dim), or None."""
    if process_group is None:
        if mesh_dim is not None:
            raise ValueError("mesh_dim is given without a DeviceMesh as process_group")
        return None, 0
    if _is_device_mesh(process_group):
        mesh = process_group
        if mesh_dim is None:
            if mesh.ndim != 1:
                raise ValueError(f"process_group is a {mesh.ndim}-D DeviceMesh: give mesh_dim, the dimension the "
                                 "vocabulary is split over")
            mesh_dim = 0
        return mesh.get_group(mesh_dim), mesh.get_local_rank(mesh_dim)
    if mesh_dim is not None:
        raise ValueError("mesh_dim is only used with a DeviceMesh as process_group")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup, a DeviceMesh or None, got "
                        f"{type(process_group).__name__}")
    return process_group, dist.get_rank(process_group)


def _same_group(a, b) -> bool:
    return a is b or dist.get_process_group_ranks(a) == dist.get_process_group_ranks(b)


@dataclass
class _Shard:
    """This rank's part of a head (weight and bias) or of the logits."""

    tensor: Tensor                     # the local shard, a plain tensor
    bias: Optional[Tensor]
    group: Optional["dist.ProcessGroup"]
    index: int                         # the shard's position in the vocabulary order
    source: Optional[Tensor] = None    # the DTensor it came from (a sharded one: may be gathered instead)
    source_bias: Optional[Tensor] = None
    error: int = 0                     # a local problem, raised on every rank after the up-front check


# Codes of the problems one rank may find alone; the up-front check raises them on every rank.
_ERRORS = {
    1: "process_group does not match the group of the mesh dimension the DTensor is sharded over",
    2: "the weight's dtype differs from the hidden states'",
    3: "the weight and the hidden states are on different devices",
    4: "the bias does not match the weight shard (shape, dtype or device)",
}


def _placements(t: Tensor, what: str, vocab_dim: int):
    """(mesh dim of the vocabulary split or None when replicated) of a DTensor, or a clear error."""
    _, Shard, Replicate = _dtensor_api()
    split = []
    for d, p in enumerate(t.placements):
        if type(p) is Shard and p.dim in (vocab_dim, vocab_dim - t.dim()):
            split.append(d)
        elif not isinstance(p, Replicate):
            raise ValueError(f"{what} is a DTensor with placements {tuple(t.placements)}: only Shard({vocab_dim}) "
                             f"(the vocabulary split over one mesh dimension) and Replicate() are supported; gather "
                             f"it first ({what}.full_tensor())")
    if len(split) > 1:
        raise ValueError(f"{what} is a DTensor sharded over the vocabulary on {len(split)} mesh dimensions "
                         f"{tuple(t.placements)} (FSDP2 over a tensor-parallel head, for example): only one is "
                         "supported; gather the data-parallel one first (call inside the FSDP module's forward, or "
                         f"{what}.redistribute(...))")
    return split[0] if split else None


def _resolve_head(weight: Tensor, bias: Optional[Tensor], process_group, mesh_dim) -> _Shard:
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise TypeError("weight must be a 2-D float tensor (V, H) or (V / tp, H)")
    if bias is not None and (not isinstance(bias, Tensor) or bias.dim() != 1):
        raise TypeError("bias must be a 1-D tensor or None")
    if not is_dtensor(weight):
        if is_dtensor(bias):
            raise TypeError("bias is a DTensor but weight is not: pass both as DTensors or both as local shards")
        group, index = resolve_group(process_group, mesh_dim)
        return _Shard(weight, bias, group, index)
    dim = _placements(weight, "weight", 0)
    mesh = weight.device_mesh
    if bias is not None:
        if not is_dtensor(bias) or bias.device_mesh != mesh or _placements(bias, "bias", 0) != dim:
            raise TypeError("bias must be a DTensor on the weight's mesh with the weight's placements (or None)")
    if dim is None:  # replicated: the local ops on the local copy
        if process_group is not None:
            raise ValueError("the weight is a replicated DTensor (the whole vocabulary on every rank) but "
                             "process_group is given: drop process_group, or shard the weight with Shard(0)")
        return _Shard(weight.to_local(), None if bias is None else bias.to_local(), None, 0)
    group = mesh.get_group(dim)
    error = 0
    if process_group is not None:
        given, _ = resolve_group(process_group, mesh_dim)
        error = 0 if _same_group(given, group) else 1
    return _Shard(weight.to_local(), None if bias is None else bias.to_local(), group, mesh.get_local_rank(dim),
                  source=weight, source_bias=bias, error=error)


def _resolve_logits(logits: Tensor, process_group, mesh_dim) -> _Shard:
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError("logits must be a float tensor")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must have shape (N, V_r) or (B, T, V_r), got {tuple(logits.shape)}")
    if not is_dtensor(logits):
        group, index = resolve_group(process_group, mesh_dim)
        return _Shard(logits, None, group, index)
    dim = _placements(logits, "logits", logits.dim() - 1)
    mesh = logits.device_mesh
    if dim is None:
        if process_group is not None:
            raise ValueError("the logits are a replicated DTensor but process_group is given: drop process_group")
        return _Shard(logits.to_local(), None, None, 0)
    group = mesh.get_group(dim)
    error = 0
    if process_group is not None:
        given, _ = resolve_group(process_group, mesh_dim)
        error = 0 if _same_group(given, group) else 1
    return _Shard(logits.to_local(), None, group, mesh.get_local_rank(dim), source=logits, error=error)


# ------------------------------------------------------------------ the up-front check
_DTYPES = {torch.float32: 1, torch.float64: 2, torch.bfloat16: 3, torch.float16: 4}


def _weights(n: int, device) -> Tensor:
    # Fixed pseudo-random weights in [1, 2): a fingerprint that changes when values move between tokens.
    return torch.frac(torch.arange(n, dtype=torch.float64, device=device) * 0.6180339887498949) + 1.0


def _fingerprint(*tensors: Optional[Tensor]) -> Tensor:
    """A float64 number per group of tensors that is the same for the same values (0 for none)."""
    out = None
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        x = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(-1, 1)  # a row per token
        f = (x.sum(1, dtype=torch.float64) * _weights(x.shape[0], x.device)).sum()
        out = f if out is None else out * 1.000001 + f
    return out if out is not None else torch.zeros((), dtype=torch.float64)


def _gather_table(group, device, fields: Dict[str, Any]) -> List[Dict[str, float]]:
    """Every rank's ``fields`` (numbers or 0-dim tensors), in group-rank order: one all-gather."""
    vals = [torch.as_tensor(v, dtype=torch.float64).to(device).reshape(()) for v in fields.values()]
    row = torch.stack(vals)
    world = dist.get_world_size(group)
    out = torch.empty(world * row.numel(), dtype=torch.float64, device=device)
    tp.all_gather_flat(out, row, group)
    names = list(fields)
    return [dict(zip(names, r)) for r in out.view(world, len(names)).cpu().tolist()]


def _same(a: float, b: float) -> bool:
    return a == b or (a != a and b != b)


def _disagree(table, key: str) -> bool:
    return any(not _same(r[key], table[0][key]) for r in table)


def _ranks_str(group, table, key: str, fmt=lambda v: f"{v:g}") -> str:
    ranks = dist.get_process_group_ranks(group)
    return ", ".join(f"rank {g}: {fmt(r[key])}" for g, r in zip(ranks, table))


# Keys of the table whose disagreement means the ranks hold different tokens (split impossible).
_DATA_KEYS = {"tokens": "number of tokens", "rows": "number of agent tokens", "steps": "number of steps",
              "tokens_fp": "labels and token mask", "hidden_fp": "hidden states",
              "values_fp": "old log-probs, advantages, weights or reference log-probs"}
# Keys that must agree for the split to run (else every rank would compute something different).
_CONFIG_KEYS = {"chunk": "chunk", "temperature": "temperature", "with_entropy": "with_entropy",
                "need_hidden": "whether hidden requires grad", "need_weight": "whether the weight requires grad",
                "reduce": "reduce_grad_hidden"}


_OPS = {"token_logprobs": 1, "linear_token_logprobs": 2, "linear_steppo_loss": 3}


@dataclass
class _Plan:
    mode: str                         # "split" or "gather"
    shards: Optional[tp.VocabShards]  # the vocabulary layout (split and gather)


def _agree(what: str, shard: _Shard, device, fields: Dict[str, Any], can_gather: bool) -> _Plan:
    """Runs the up-front check; returns how to proceed or raises the same ValueError on every rank."""
    group = shard.group
    vocab_dim = -1 if what == "token_logprobs" else 0
    base = {"op": _OPS[what], "error": shard.error, "shard_size": shard.tensor.shape[vocab_dim],
            "shard_index": shard.index}
    table = _gather_table(group, device, {**base, **fields})
    ranks = dist.get_process_group_ranks(group)
    problems = []
    if _disagree(table, "op"):
        raise ValueError(f"vocab-parallel {what}: the ranks of the group called different ops at this point")
    for g, r in zip(ranks, table):
        if r["error"]:
            problems.append(f"rank {g}: {_ERRORS.get(int(r['error']), 'invalid arguments')}")
    for key, name in (("hidden_size", "hidden size H of the hidden states"), ("weight_hidden", "hidden size H of "
                      "the weight shard"), ("dtype", "dtype")):
        if key in table[0] and _disagree(table, key):
            problems.append(f"the {name} differs across the ranks ({_ranks_str(group, table, key)})")
    if "weight_hidden" in table[0]:
        for g, r in zip(ranks, table):
            if r["weight_hidden"] != r["hidden_size"]:
                problems.append(f"rank {g}: the weight shard has H = {r['weight_hidden']:g} but the hidden states "
                                f"have H = {r['hidden_size']:g}")
    index = sorted(int(r["shard_index"]) for r in table)
    if index != list(range(len(table))):
        problems.append(f"the shard positions are not 0..{len(table) - 1} ({_ranks_str(group, table, 'shard_index')})")
    if problems:
        raise ValueError(f"vocab-parallel {what}: " + "; ".join(problems))
    sizes = [int(r["shard_size"]) for r in table]
    pos = [int(r["shard_index"]) for r in table]
    starts = [sum(s for s, p in zip(sizes, pos) if p < pos[i]) for i in range(len(table))]
    shards = tp.VocabShards(group, dist.get_rank(group), tuple(starts), tuple(sizes))
    vocab = shards.vocab

    differ = [name for key, name in _DATA_KEYS.items() if key in table[0] and _disagree(table, key)]
    if differ:
        if can_gather:
            return _Plan("gather", shards)
        raise ValueError(f"vocab-parallel {what}: the ranks of the group hold different tokens ({', '.join(differ)} "
                         f"differ); every rank of a tensor-parallel group must pass the same batch")
    for key, name in _CONFIG_KEYS.items():
        if key in table[0] and _disagree(table, key):
            problems.append(f"{name} differs across the ranks ({_ranks_str(group, table, key)})")
    r0 = table[0]
    if "label_min" in r0 and r0["rows"] > 0 and (r0["label_min"] < 0 or r0["label_max"] >= vocab):
        bad = r0["label_min"] if r0["label_min"] < 0 else r0["label_max"]
        problems.append(f"a masked-in label is outside [0, {vocab}): {bad:g} (the vocabulary is split "
                        f"{sizes} over the ranks)")
    if problems:
        raise ValueError(f"vocab-parallel {what}: " + "; ".join(problems))
    return _Plan("split", shards)


def _label_range(y: Tensor, mask: Tensor) -> Dict[str, Tensor]:
    big = torch.iinfo(torch.int64).max
    yl = y.long()
    return {"label_min": torch.where(mask, yl, torch.full_like(yl, big)).min() if y.numel() else 0,
            "label_max": torch.where(mask, yl, torch.full_like(yl, -1)).max() if y.numel() else 0}


# ------------------------------------------------------------------ gathering an FSDP2-sharded weight
_warned_gather = set()


class _GatherShards(torch.autograd.Function):
    """The whole tensor of a DTensor sharded over data-parallel ranks; backward: its gradient
    averaged over those ranks, each rank keeping its shard (FSDP2's default reduction)."""

    @staticmethod
    def forward(ctx, dt, group, start, size):
        ctx.spec = (dt.device_mesh, dt.placements, dt.shape, dt.stride())
        ctx.group, ctx.rows = group, (start, size)
        return dt.full_tensor()

    @staticmethod
    def backward(ctx, grad):
        DTensor = _dtensor_api()[0]
        mesh, placements, shape, stride = ctx.spec
        world = dist.get_world_size(ctx.group)
        g = grad / world
        dist.all_reduce(g, group=ctx.group)
        start, size = ctx.rows
        local = g[start:start + size].contiguous()
        return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride), None, None, None


def _gathered(shard: _Shard, shards: tp.VocabShards, what: str) -> Tuple[Tensor, Optional[Tensor]]:
    if shard.source.device_mesh.ndim != 1:
        raise ValueError(f"vocab-parallel {what}: the weight is a DTensor sharded over ranks that hold different "
                         "tokens on a multi-dimensional mesh: gather it first (run inside the FSDP module's forward)")
    if what not in _warned_gather:
        _warned_gather.add(what)
        warnings.warn(f"vocab-parallel {what}: the weight is sharded over ranks that hold different tokens "
                      "(FSDP2's data-parallel sharding, not a tensor-parallel split): gathering it for the call; its "
                      "gradient is averaged over those ranks", RuntimeWarning, stacklevel=3)
    s, n = shards.start, shards.size
    w = _GatherShards.apply(shard.source, shards.group, s, n)
    b = None if shard.source_bias is None else _GatherShards.apply(shard.source_bias, shards.group, s, n)
    return w, b


# ------------------------------------------------------------------ fronts
def _local_checks(hidden: Tensor, shard: _Shard) -> None:
    """Problems one rank may have alone become codes for the up-front check (no raise before it)."""
    w, b = shard.tensor, shard.bias
    if shard.error:
        return
    if w.dtype != hidden.dtype:
        shard.error = 2
    elif w.device != hidden.device:
        shard.error = 3
    elif b is not None and (tuple(b.shape) != (w.shape[0],) or b.dtype != w.dtype or b.device != w.device):
        shard.error = 4


def _check_hidden(hidden) -> None:
    if not isinstance(hidden, Tensor) or not hidden.is_floating_point():
        raise TypeError(f"hidden must be a float tensor, got {getattr(hidden, 'dtype', type(hidden).__name__)}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must have shape (N, H) or (B, T, H), got {tuple(hidden.shape)}")


def _labels(labels, lead, device) -> Tensor:
    """Flattened labels; their range is checked with the ranks' table (``_agree``), not here."""
    from .logprob import _flat_labels

    return _flat_labels(labels, lead, device, inputs="inputs").contiguous()


def _requires_grad(t: Optional[Tensor]) -> bool:
    return t is not None and torch.is_grad_enabled() and t.requires_grad


def token_logprobs(logits: Tensor, labels: Tensor, mask_or_layout=None, temperature: float = 1.0, *,
                   process_group=None, mesh_dim=None, with_entropy: bool = True, inplace_backward: bool = False,
                   validate: bool = True, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Log-prob and entropy of each token over the whole vocabulary from this rank's columns of
    the logits (SPEC 2): ``steppo_fast.token_logprobs`` for vocabulary-parallel logits.

    Args:
        logits: (B, T, V_r) or (N, V_r), this rank's columns of the logits (rank r of the group:
            the r-th slice of the vocabulary), float32/bfloat16/float16/float64; or a DTensor with
            ``Shard(-1)`` (torch's loss-parallel logits) or ``Replicate()``.
        labels: (B, T) or (N,) int32/int64 global vocabulary ids, the same on every rank (-100 on
            masked-out tokens is fine).
        mask_or_layout: bool mask of labels' shape, a StepLayout, or None (every token).
        process_group: the group the vocabulary is split over (ProcessGroup, DeviceMesh), or None
            for a DTensor (its mesh) or unsharded logits (the local op).
        inplace_backward: write dL/dlogits into this rank's logits buffer.
        validate: check masked-in labels lie in [0, V) and that the ranks hold the same labels.
    Returns:
        (logp, entropy) shaped like labels, float32 (float64 for float64 logits), 0 on masked-out
        tokens, the same on every rank. Differentiable in the logits: the backward writes each
        rank's columns from the combined statistics, with no communication.
    """
    from .logprob import _check_temperature, _mask_for
    from .logprob import token_logprobs as local_token_logprobs

    shard = _resolve_logits(logits, process_group, mesh_dim)
    labels = _whole(labels)
    if shard.group is None:
        return local_token_logprobs(shard.tensor, labels, mask_or_layout, temperature, with_entropy,
                                    inplace_backward, validate, backend)
    z = shard.tensor
    tau = _check_temperature(temperature)
    lead = tuple(z.shape[:-1])
    mask = _mask_for(mask_or_layout, lead, z.device)
    y = _labels(labels, lead, z.device)
    fields = {"tokens": y.numel(), "rows": y.numel(), "dtype": _DTYPES.get(z.dtype, 0), "temperature": tau,
              "with_entropy": float(with_entropy)}
    if validate:
        fields.update(_label_range(y, mask))
        fields["tokens_fp"] = _fingerprint(torch.where(mask, y.long(), torch.full_like(y.long(), -1)))
    plan = _agree("token_logprobs", shard, z.device, fields, can_gather=False)
    logp, ent = vp_ops.token_logprobs(z, y, mask, tau, with_entropy, inplace_backward, plan.shards, backend)
    return logp.reshape(lead), ent.reshape(lead)


def _head_fields(hidden: Tensor, shard: _Shard, y: Tensor, mask: Tensor, rows: int, chunk: int, tau: float,
                 with_entropy: bool, reduce: bool, validate: bool, extra_fp=()) -> Dict[str, Any]:
    w = shard.tensor
    fields = {"tokens": y.numel(), "rows": rows, "hidden_size": hidden.shape[-1], "weight_hidden": w.shape[1],
              "dtype": _DTYPES.get(hidden.dtype, 0), "chunk": chunk, "temperature": tau,
              "with_entropy": float(with_entropy), "need_hidden": float(_requires_grad(hidden)),
              "need_weight": float(_requires_grad(shard.source if shard.source is not None else w)),
              "reduce": float(reduce)}
    if validate:
        fields.update(_label_range(y, mask))
    if validate or shard.source is not None:  # a DTensor weight: the fingerprints route it (split or gather)
        ym = torch.where(mask, y.long(), torch.full_like(y.long(), -1))
        fields["tokens_fp"] = _fingerprint(ym)
        fields["hidden_fp"] = _fingerprint(hidden.detach())
        if extra_fp:
            fields["values_fp"] = _fingerprint(*[None if t is None else t.detach() for t in extra_fp])
    return fields


def linear_token_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, mask_or_layout=None,
                          temperature: float = 1.0, bias: Optional[Tensor] = None, *, process_group=None,
                          mesh_dim=None, chunk: Optional[int] = None, with_entropy: bool = True,
                          fp32_weight_grad: bool = False, reduce_grad_hidden: bool = True, validate: bool = True,
                          backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """(logp, entropy) over the whole vocabulary from hidden states and this rank's rows of the
    lm_head (SPEC 2): ``steppo_fast.linear_token_logprobs`` for a vocabulary-parallel head.

    Args:
        hidden: (B, T, H) or (N, H), the same on every rank of the group (a DTensor is made whole).
        weight: (V_r, H), this rank's rows of the lm_head (rank r: the r-th slice; uneven or empty
            slices are fine), same dtype as hidden; or a DTensor (see the module docstring).
        labels: (B, T) or (N,) int32/int64 global vocabulary ids, the same on every rank.
        mask_or_layout: a StepLayout, a bool mask of labels' shape, or None (every token).
        bias: (V_r,) this rank's slice of the bias, or None.
        process_group: the tensor-parallel group (ProcessGroup, DeviceMesh + mesh_dim), or None
            for a DTensor weight (its mesh) or the whole weight (the local op).
        chunk: tokens per chunk, the same on every rank (None: ``linear_head.auto_chunk`` of the
            whole vocabulary, so each rank's logits buffer is 1 / tp of the unsharded op's).
        reduce_grad_hidden: all-reduce grad_hidden over the group in the backward (see the module
            docstring); False leaves each rank's part for the framework's own reduction.
        validate: check labels lie in [0, V) and that the ranks hold the same tokens.
    Returns:
        (logp, entropy) shaped like labels, float32 (float64 for float64 inputs), 0 on masked-out
        tokens, the same on every rank. Differentiable in hidden, weight and bias; the weight's and
        bias's gradients are this rank's slices.
    """
    from . import linear_head
    from .logprob import _check_chunk, _check_temperature, _mask_for, _rows_for
    from .logprob import linear_token_logprobs as local_linear

    shard = _resolve_head(weight, bias, process_group, mesh_dim)
    hidden, labels = _whole(hidden), _whole(labels)
    _check_hidden(hidden)
    if shard.group is None:
        return local_linear(hidden, shard.tensor, labels, mask_or_layout, temperature, shard.bias, chunk,
                            with_entropy, fp32_weight_grad, validate, backend)
    tau = _check_temperature(temperature)
    chunk_req = _check_chunk(chunk)
    lead = tuple(hidden.shape[:-1])
    mask = _mask_for(mask_or_layout, lead, hidden.device)
    y = _labels(labels, lead, hidden.device)
    rows = _rows_for(mask_or_layout, mask)
    m = y.numel() if rows is None else rows.numel()
    _local_checks(hidden, shard)
    fields = _head_fields(hidden, shard, y, mask, m, chunk_req, tau, with_entropy, reduce_grad_hidden, validate)
    plan = _agree("linear_token_logprobs", shard, hidden.device, fields, can_gather=shard.source is not None)
    if plan.mode == "gather":
        w, b = _gathered(shard, plan.shards, "linear_token_logprobs")
        return local_linear(hidden, w, labels, mask_or_layout, temperature, b, chunk, with_entropy,
                            fp32_weight_grad, validate, backend)
    if chunk_req == 0:
        chunk_req = linear_head.auto_chunk(plan.shards.vocab, hidden.dtype, hidden.device)
    h = hidden.reshape(-1, hidden.shape[-1])
    logp, ent = vp_ops.linear_token_logprobs(h, shard.tensor, y, rows, tau, shard.bias, with_entropy, chunk_req,
                                             fp32_weight_grad, reduce_grad_hidden, plan.shards, backend)
    return logp.reshape(lead), ent.reshape(lead)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0,
                         reduction: str = "none", dist_process_group=None,
                         reduce_grad_hidden: bool = False) -> Tuple[Tensor, Tensor]:
    """Drop-in for verl's ``linear_cross_entropy(hidden, weight, labels, temperature, reduction,
    dist_process_group)`` with its tensor-parallel split: (log_probs, entropy) of every token,
    float32, shaped like labels.

    With ``dist_process_group`` the weight is this rank's (V_r, H) rows of the output layer (verl's
    Megatron backend passes ``output_layer.weight`` and the tensor-parallel group). Like verl's,
    grad_hidden is each rank's part (``reduce_grad_hidden=False``): Megatron's sequence-parallel
    gather before the head reduce-scatters it. Pass ``reduce_grad_hidden=True`` where nothing
    reduces it (no sequence parallelism and no copy-to-tensor-parallel region before the call).
    """
    if reduction != "none":
        raise ValueError(f"reduction must be 'none' (per-token log-probs and entropy), got {reduction!r}")
    return linear_token_logprobs(hidden, weight, labels, None, temperature, process_group=dist_process_group,
                                 reduce_grad_hidden=reduce_grad_hidden)


def linear_steppo_loss(hidden: Tensor, weight: Tensor, labels: Tensor, layout, old_logp: Tensor, advantages: Tensor,
                       loss_config=None, *, process_group=None, mesh_dim=None, weights: Optional[Tensor] = None,
                       ref_logp: Optional[Tensor] = None, temperature: float = 1.0, bias: Optional[Tensor] = None,
                       chunk: Optional[int] = None, with_entropy: bool = True, fp32_weight_grad: bool = False,
                       reduce_grad_hidden: bool = True, validate: bool = True,
                       backend: str = "auto") -> Tuple[Tensor, Dict[str, Tensor]]:
    """The fused StepPO / PPO policy loss (SPEC 7) from hidden states and this rank's rows of the
    lm_head: ``steppo_fast.linear_steppo_loss`` for a vocabulary-parallel head.

    The agent tokens are multiplied by the weight shard in chunks of whole steps; after each
    chunk's shard statistics, one all-gather of three float64 per token gives every rank the
    chunk's log-probs and entropies over the whole vocabulary, so step ratios are exact and the
    per-token loss gradients are the same on every rank; each rank then writes its own columns of
    dL/dlogits and accumulates its grad_weight rows and its part of grad_hidden before the next
    chunk. With ``reduce_grad_hidden`` one all-reduce of grad_hidden follows the sweep. The backward
    only scales the stored gradients.

    Args:
        hidden, labels, layout, old_logp, advantages, loss_config, weights, ref_logp: as
            ``steppo_fast.linear_steppo_loss``, the same on every rank of the group.
        weight: (V_r, H) this rank's rows of the lm_head, or a DTensor (see the module docstring);
            bias: (V_r,) or None.
        process_group, mesh_dim, chunk, reduce_grad_hidden, validate: as
            :func:`linear_token_logprobs`.
    Returns:
        (loss, metrics): the same 0-dim loss and metrics on every rank, equal to the unsharded
        loss; differentiable in hidden, weight and bias.
    """
    from . import linear_head
    from .logprob import _check_chunk, _check_temperature
    from .losses import LossConfig, _check_tok
    from .losses import linear_steppo_loss as local_loss

    cfg = LossConfig.of(loss_config)
    shard = _resolve_head(weight, bias, process_group, mesh_dim)
    hidden, labels = _whole(hidden), _whole(labels)
    _check_hidden(hidden)
    local_kw = dict(weights=weights, ref_logp=ref_logp, temperature=temperature, chunk=chunk,
                    with_entropy=with_entropy, fp32_weight_grad=fp32_weight_grad, validate=validate, backend=backend)
    if shard.group is None:
        return local_loss(hidden, shard.tensor, labels, layout, old_logp, advantages, cfg, bias=shard.bias,
                          **local_kw)
    tau = _check_temperature(temperature)
    chunk_req = _check_chunk(chunk)
    lead = tuple(hidden.shape[:-1])
    if isinstance(layout, Tensor):
        if layout.dim() != 2 or tuple(layout.shape) != lead:
            raise ValueError(f"layout must be a StepLayout or a (B, T) mask of hidden's leading shape {lead}, "
                             f"got shape {tuple(layout.shape)}")
        row_ids = torch.arange(layout.shape[0], device=layout.device)
        layout = StepLayout.from_step_rows(layout, row_ids, torch.zeros_like(row_ids), validate=False)
    if not isinstance(layout, StepLayout):
        raise TypeError(f"layout must be a StepLayout or a (B, T) bool mask, got {type(layout).__name__}")
    if layout.num_tokens != math.prod(lead):
        raise ValueError(f"the layout describes {layout.token_shape} tokens but hidden has leading shape {lead}")
    if layout.device != hidden.device:
        raise ValueError(f"the layout is on {layout.device} but hidden is on {hidden.device}")
    mask = layout.token_mask
    y = _labels(labels, lead, hidden.device)
    flat_like = torch.empty(layout.num_tokens, device=hidden.device)
    per_token = {}
    for name, t in (("old_logp", old_logp), ("advantages", advantages), ("weights", weights), ("ref_logp", ref_logp)):
        t = _whole(t)
        if isinstance(t, Tensor) and tuple(t.shape) == lead:
            t = t.reshape(-1)
        per_token[name] = None if t is None else _check_tok(name, t, flat_like)
    rows = layout.step_tokens
    _local_checks(hidden, shard)
    fields = _head_fields(hidden, shard, y, mask, rows.numel(), chunk_req, tau, with_entropy, reduce_grad_hidden,
                          validate, extra_fp=tuple(per_token.values()))
    fields["steps"] = layout.num_steps
    if validate or shard.source is not None:
        fields["tokens_fp"] = fields["tokens_fp"] * 1.000001 + _fingerprint(layout.token_step)
    plan = _agree("linear_steppo_loss", shard, hidden.device, fields, can_gather=shard.source is not None)
    if plan.mode == "gather":
        w, b = _gathered(shard, plan.shards, "linear_steppo_loss")
        return local_loss(hidden, w, labels, layout, old_logp, advantages, cfg, bias=b, **local_kw)
    gathered = {k: (None if v is None else v.index_select(0, rows)) for k, v in per_token.items()}
    token_step = layout.token_step.index_select(0, rows)
    if chunk_req == 0:
        chunk_req = linear_head.auto_chunk(plan.shards.vocab, hidden.dtype, hidden.device)
    step_level = cfg.ratio_level == "step"
    offsets = layout.host_step_token_offsets().tolist() if step_level else None
    bounds, split_step = linear_head.plan_chunks(rows.numel(), chunk_req, offsets)
    norm = cfg.norm_constant
    if norm is None and cfg.agg_mode == "seq-mean-token-sum-norm":
        norm = float(layout.token_shape[1])
    loss_args = dict(ratio_level=cfg.ratio_level, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                     dual_clip=cfg.dual_clip, agg_mode=cfg.agg_mode, entropy_coef=cfg.entropy_coef,
                     kl_coef=cfg.kl_coef, kl_type=cfg.kl_type, global_num_tokens=cfg.global_num_tokens,
                     global_num_steps=cfg.global_num_steps, norm_constant=norm)
    h = hidden.reshape(-1, hidden.shape[-1])
    w = shard.tensor
    return vp_ops.linear_policy_loss(
        h, w, shard.bias, y, rows, token_step, layout.step_token_offsets, layout.num_steps, bounds, split_step,
        gathered["old_logp"], gathered["advantages"], gathered["weights"], gathered["ref_logp"], loss_args, tau,
        with_entropy, _requires_grad(hidden), _requires_grad(w), _requires_grad(shard.bias), fp32_weight_grad,
        reduce_grad_hidden, plan.shards, backend)


def step_po_loss(module, inputs: Tensor, labels: Tensor, layout, old_logp: Tensor, advantages: Tensor,
                 weight: Optional[Tensor], bias: Optional[Tensor], weights: Optional[Tensor],
                 ref_logp: Optional[Tensor]) -> Tuple[Tensor, Dict[str, Tensor]]:
    """``StepPOLoss.forward`` over a vocabulary split: hidden states and a weight shard (the fused
    loss), or logits shards (``token_logprobs`` then the policy loss)."""
    from .losses import policy_loss

    cfg = module.config
    group = module.process_group
    if weight is not None:
        return linear_steppo_loss(inputs, weight, labels, layout, old_logp, advantages, cfg, process_group=group,
                                  weights=weights, ref_logp=ref_logp, temperature=module.temperature, bias=bias,
                                  chunk=module.chunk, reduce_grad_hidden=module.reduce_grad_hidden,
                                  backend=module.backend)
    if bias is not None:
        raise ValueError("bias is only used with weight= (hidden states and the lm_head)")
    logp, ent = token_logprobs(inputs, labels, layout, module.temperature, process_group=group,
                               backend=module.backend)
    return policy_loss(logp, _whole(old_logp), _whole(advantages), layout, ratio_level=cfg.ratio_level,
                       clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, agg_mode=cfg.agg_mode,
                       weights=_whole(weights), entropy=ent, entropy_coef=cfg.entropy_coef, ref_logp=_whole(ref_logp),
                       kl_coef=cfg.kl_coef, kl_type=cfg.kl_type, global_num_tokens=cfg.global_num_tokens,
                       global_num_steps=cfg.global_num_steps, norm_constant=cfg.norm_constant, backend=module.backend)
