"""Tensor parallelism in the trainer: the lm_head split over the vocabulary.

With ``tensor_parallel = t`` under ``torchrun`` (world size W, a multiple of t), consecutive
ranks form the tensor-parallel groups (ranks 0..t-1, t..2t-1, ...) and the ranks at the same
position of their groups form the data-parallel groups (W / t ranks each, Megatron's order).

Inside a tensor-parallel group every rank holds the whole backbone (and the critic) but only
its slice of the lm_head: rank r of the group keeps rows [start_r, start_r + size_r) of the
(V, H) weight, the r-th of t contiguous slices of the vocabulary (``torch.tensor_split`` sizes:
the first V mod t slices one row longer). The ranks of a group play the same episodes (their
seeds and sampling generators are those of their data-parallel rank), so:

* sampling gathers the last position's logits over the group (B x V numbers per decoded token;
  every rank draws the same token with the same generator);
* the behaviour log-probs and the loss run on ``steppo_fast.vocab_parallel``: each rank reduces
  its slice to a few numbers per token and one all-gather per chunk of tokens combines them, so
  on this path no rank holds more than its slice of the weight or of the logits; the hidden
  states' gradient is summed over the group in the loss, so the backbones receive the same
  gradient, and after the backward the group's first rank broadcasts the gradients of every
  replicated parameter (one broadcast per dtype), so the backbones and critics stay the same
  bits on every rank even where a backward kernel is not deterministic (attention on a GPU);
* gradient clipping takes the norm of the whole head (its slices' squares summed over the group);
* gradients are averaged over the data-parallel group (DDP over that group).

Checkpoints and the final model hold the whole lm_head (and the whole Adam state of it): the
slices are gathered on the first tensor-parallel group when they are written and sliced again
when a run resumes, so a checkpoint resumes under any ``tensor_parallel`` and the final model
loads with ``from_pretrained`` as any other. Models whose lm_head is tied to the input
embeddings are refused: slicing the head would slice the embedding table the backbone reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass
class ParallelLayout:
    """Where this process sits: ``world`` ranks, ``tp`` per tensor-parallel group, ``dp`` groups.

    ``tp_group`` is None when ``tp == 1``; ``dp_group`` is None when it would be the whole world
    (``tp == 1``: the default group) or a single rank (``dp == 1``: nothing to reduce).
    """

    world: int = 1
    rank: int = 0
    tp: int = 1
    tp_rank: int = 0
    dp: int = 1
    dp_rank: int = 0
    tp_group: Optional["dist.ProcessGroup"] = None
    dp_group: Optional["dist.ProcessGroup"] = None

    @classmethod
    def create(cls, tensor_parallel: int) -> "ParallelLayout":
        """The groups for ``tensor_parallel`` ranks per group on the default process group (every
        rank must call this, in the same order as its other group creations)."""
        world, rank = 1, 0
        if dist.is_available() and dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
        tp = int(tensor_parallel)
        if tp < 1 or world % tp:
            hint = f" (start {tp} processes or a multiple: torchrun --nproc_per_node={tp})" if tp > world else ""
            raise ValueError(f"tensor_parallel ({tp}) must divide the number of processes ({world}){hint}")
        out = cls(world=world, rank=rank, tp=tp, tp_rank=rank % tp, dp=world // tp, dp_rank=rank // tp)
        if tp == 1:
            return out
        for d in range(out.dp):  # every rank creates every group, in the same order
            g = dist.new_group(list(range(d * tp, (d + 1) * tp)))
            if d == out.dp_rank:
                out.tp_group = g
        if out.dp > 1:
            for t in range(tp):
                g = dist.new_group(list(range(t, world, tp)))
                if t == out.tp_rank:
                    out.dp_group = g
        return out


def slice_sizes(rows: int, parts: int) -> List[int]:
    """Rows of each of ``parts`` contiguous slices of ``rows`` (the first ``rows % parts`` one longer)."""
    return [rows // parts + (1 if r < rows % parts else 0) for r in range(parts)]


def gather_last_dim(local: Tensor, sizes: Sequence[int], group) -> Tensor:
    """Concatenate every rank's ``local`` (..., sizes[r]) along the last dimension, in rank order.

    The slices are padded to the longest for one ``all_gather`` (gloo and nccl want equal sizes).
    """
    width = max(sizes)
    pad = local
    if local.shape[-1] < width:
        pad = torch.nn.functional.pad(local, (0, width - local.shape[-1]))
    pad = pad.contiguous()
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad, group=group)
    return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)


def gather_rows(local: Tensor, sizes: Sequence[int], group) -> Tensor:
    """Concatenate every rank's ``local`` (sizes[r], ...) along the first dimension, in rank order."""
    moved = local.movedim(0, -1)
    return gather_last_dim(moved, sizes, group).movedim(-1, 0).contiguous()


class VocabParallelHead(nn.Module):
    """This rank's rows of an lm_head split over the vocabulary (see the module docstring).

    Attributes: ``weight`` (V_r, H) and ``bias`` (V_r,) or None, the rows ``[start, start + size)``
    of the whole head; ``vocab_size`` V; ``sizes`` every rank's row count; ``group`` the
    tensor-parallel group. ``forward(hidden)`` (..., H) returns the whole vocabulary's logits
    (..., V), gathered over the group (for callers such as ``generate``; the trainer itself never
    forms them).
    """

    def __init__(self, head: nn.Module, group, rank: int, parts: int):
        super().__init__()
        weight = head.weight
        bias = getattr(head, "bias", None)
        self.vocab_size = weight.shape[0]
        self.sizes = slice_sizes(self.vocab_size, parts)
        self.start = sum(self.sizes[:rank])
        self.size = self.sizes[rank]
        self.group = group
        rows = slice(self.start, self.start + self.size)
        self.weight = nn.Parameter(weight.detach()[rows].clone(), requires_grad=weight.requires_grad)
        self.bias = None if bias is None else nn.Parameter(bias.detach()[rows].clone(),
                                                           requires_grad=bias.requires_grad)

    def extra_repr(self) -> str:
        return f"rows {self.start}..{self.start + self.size} of {self.vocab_size}, hidden {self.weight.shape[1]}"

    def forward(self, hidden: Tensor) -> Tensor:
        logits = torch.nn.functional.linear(hidden, self.weight, self.bias)
        return gather_last_dim(logits, self.sizes, self.group)

    def gathered(self, name: str, local: Tensor) -> Tensor:
        """The whole (V, ...) tensor of which ``local`` is this rank's rows (a collective)."""
        if local.shape[0] != self.size:
            raise ValueError(f"{name} has {local.shape[0]} rows, this rank's slice of the head has {self.size}")
        return gather_rows(local, self.sizes, self.group)

    def local_rows(self, full: Tensor) -> Tensor:
        """This rank's rows of a whole (V, ...) tensor."""
        return full[self.start:self.start + self.size]


def split_lm_head(policy: nn.Module, layout: ParallelLayout) -> VocabParallelHead:
    """Replace ``policy``'s lm_head by this rank's slice of it (returns the new module)."""
    head = policy.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), Tensor) or head.weight.dim() != 2:
        raise ValueError(f"tensor_parallel > 1 splits the lm_head, but {type(policy).__name__} has no "
                         "(V, H) output embedding weight")
    emb = policy.get_input_embeddings()
    tied = getattr(getattr(policy, "config", None), "tie_word_embeddings", False)
    if (emb is not None and getattr(emb, "weight", None) is head.weight) or tied:
        raise ValueError("tensor_parallel > 1 splits the lm_head over the vocabulary, and this model ties it to "
                         "its input embeddings (tie_word_embeddings): untie them (save the model with "
                         "tie_word_embeddings=False) or train with tensor_parallel 1")
    if layout.tp > head.weight.shape[0]:
        raise ValueError(f"tensor_parallel ({layout.tp}) exceeds the vocabulary ({head.weight.shape[0]} rows)")
    sliced = VocabParallelHead(head, layout.tp_group, layout.tp_rank, layout.tp)
    policy.set_output_embeddings(sliced)
    return sliced


def head_parameter_names(model: nn.Module, head: VocabParallelHead) -> Dict[str, str]:
    """{state-dict name in ``model``: "weight" or "bias"} of the split head's parameters."""
    mine = {id(p): n for n, p in head.named_parameters()}
    return {name: mine[id(p)] for name, p in model.named_parameters() if id(p) in mine}


def whole_state(model: nn.Module, head: VocabParallelHead, state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``state`` (``model.state_dict()``) with the split head's slices gathered whole (a collective)."""
    out = dict(state)
    for name in head_parameter_names(model, head):
        out[name] = head.gathered(name, state[name])
    return out


def local_state(model: nn.Module, head: VocabParallelHead, state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """A whole-head ``state`` cut to this rank's rows of the head."""
    out = dict(state)
    for name in head_parameter_names(model, head):
        if name in out:
            if out[name].shape[0] != head.vocab_size:
                raise ValueError(f"{name} has {out[name].shape[0]} rows, the model's vocabulary has {head.vocab_size}")
            out[name] = head.local_rows(out[name]).clone()
    return out


def _head_param_ids(optim: torch.optim.Optimizer, head: VocabParallelHead) -> List[int]:
    """Positions (the optimiser state dict's keys) of the head's parameters."""
    ids = {id(p) for p in head.parameters()}
    flat = [p for g in optim.param_groups for p in g["params"]]
    return [i for i, p in enumerate(flat) if id(p) in ids]


def whole_optim_state(optim: torch.optim.Optimizer, head: VocabParallelHead, state: dict) -> dict:
    """``optim.state_dict()`` with the head's per-row state (Adam's moments) gathered whole."""
    per_param = dict(state["state"])
    for i in _head_param_ids(optim, head):
        if i in per_param:
            s = dict(per_param[i])  # never write into the live optimiser's state
            for k, v in s.items():
                if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == head.size:
                    s[k] = head.gathered(f"optimiser state {k}", v)
            per_param[i] = s
    return {**state, "state": per_param}


def local_optim_state(optim: torch.optim.Optimizer, head: VocabParallelHead, state: dict) -> dict:
    """A whole-head optimiser state dict cut to this rank's rows of the head."""
    per_param = dict(state["state"])
    for i in _head_param_ids(optim, head):
        if i in per_param:
            s = dict(per_param[i])
            for k, v in s.items():
                if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == head.vocab_size:
                    s[k] = head.local_rows(v).clone()
            per_param[i] = s
    return {**state, "state": per_param}


def share_replicated_grads(params: Sequence[Tensor], head: VocabParallelHead, src: int) -> None:
    """Give every rank of the tensor-parallel group the gradients of global rank ``src`` (the
    group's first) for every parameter but the head's slices: one broadcast per dtype.

    The ranks of a group compute these gradients from the same parameters and tokens, and the
    loss sums grad_hidden over the group, so with deterministic kernels they are already the
    same bits; where a backward is not deterministic (flash or memory-efficient attention on a
    GPU), copying one rank's keeps the replicated parameters identical instead of drifting.
    """
    head_ids = {id(p) for p in head.parameters()}
    by_dtype: Dict[torch.dtype, List[Tensor]] = {}
    for p in params:
        if p.grad is not None and id(p) not in head_ids:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.broadcast(flat, src=src, group=head.group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def clip_grad_norm(params: Sequence[Tensor], max_norm: float, head: VocabParallelHead) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over parameters of which the head's are slices: the
    head's squared norm is summed over the tensor-parallel group, so every rank of the group
    gets the same total norm and the same scale (and its replicated parameters stay equal)."""
    head_ids = {id(p) for p in head.parameters()}
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    dev = grads[0].device
    own = [p.grad for p in params if p.grad is not None and id(p) not in head_ids]
    sliced = [p.grad for p in params if p.grad is not None and id(p) in head_ids]
    sq = lambda gs: (torch.stack([torch.linalg.vector_norm(g.float()) ** 2 for g in gs]).sum()  # noqa: E731
                     if gs else torch.zeros((), device=dev))
    head_sq = sq(sliced).to(torch.float64)
    dist.all_reduce(head_sq, group=head.group)
    total = (sq(own).to(torch.float64) + head_sq).sqrt().to(torch.float32)
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return total
