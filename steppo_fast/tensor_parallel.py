"""Vocabulary-parallel log-probs, entropy and the fused policy loss: the lm_head (or the logits)
split over the vocabulary across the ranks of a tensor-parallel group (SPEC sections 2 and 7).

Each rank r holds the rows ``[start_r, start_r + V_r)`` of the weight (V_r, H) (Megatron's
column-parallel output layer, torch's ``ColwiseParallel``), or the same columns of the logits,
and the whole batch of hidden states. Reference, with u = z / tau over the whole vocabulary::

    lse = log sum_v exp(u_v),  logp = u_y - lse,  H = lse - sum_v p_v u_v

Each rank reduces its shard to three numbers per token with the backend's ``token_logprobs``
kernel (C++ on the CPU, Triton on a GPU): its shard's log-sum-exp ``lse_r``, its shard's own
entropy ``H_r`` (of the softmax restricted to the shard) and ``u_y - lse_r`` when the label
falls in the shard. One all-gather of these float64 triples per chunk of tokens (24 bytes per
token and rank, never a logit) gives every rank all of them; every rank combines them in rank
order, so every rank holds the same bits::

    lse   = M + log sum_r exp(lse_r - M),             M = max_r lse_r
    w_r   = exp(lse_r - lse)                           (the shard's share of the probability)
    logp  = (u_y - lse_owner) + log w_owner            (the rank whose shard holds the label)
    H     = sum_r w_r (H_r - log w_r)                  (the mixture's entropy; no cancellation)

This is the running max / sum of exponentials / entropy accumulator of the unsharded kernel,
written in the shard-level form: with m_r, s_r = sum exp(u - m_r) and t_r = sum exp(u - m_r) u,
lse_r = m_r + log s_r and H_r = lse_r - t_r / s_r.

Backward: with the global (logp, H, lse) of each token every rank writes its own columns of
dL/dz = (g_logp (1[v = y] - p_v) - g_H p_v (log p_v + H)) / tau with the same kernel (the label
column only on the rank that holds it), then its grad_W shard G_r^T h and its partial grad_h
G_r W_r. No logits and no gradient of logits cross ranks. grad_h = sum_r G_r W_r is summed by
one all-reduce at the end when asked (``reduce_grad_hidden``; see ``steppo_fast.vocab_parallel``
for how that composes with Megatron's and torch's conventions).

The chunked sweeps are ``steppo_fast.linear_head``'s, unchanged: :class:`ShardEpilogue` has the
interface of a backend's ``(token_logprobs, token_logprobs_backward)`` pair, so the forward's
epilogue returns the combined statistics of its chunk (the collective happens there, one per
chunk) and the fused loss computes the per-token loss gradients, which are the same on every
rank, straight from them. Every rank must make the same calls with the same chunking; the
fronts check that with one small collective before the first chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import reference as ref

# Floats per token each rank contributes: its shard's lse_r, H_r and u_y - lse_r.
STATS = 3


@dataclass(frozen=True)
class VocabShards:
    """How the vocabulary is split over a process group.

    starts[i], sizes[i]: the first vocabulary id and the number of ids held by the rank of group
    rank i (shards may be uneven, and empty); ``rank``: this process's group rank.
    """

    group: "dist.ProcessGroup"
    rank: int
    starts: Tuple[int, ...]
    sizes: Tuple[int, ...]

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def start(self) -> int:
        return self.starts[self.rank]

    @property
    def size(self) -> int:
        return self.sizes[self.rank]

    @property
    def vocab(self) -> int:
        return sum(self.sizes)

    @classmethod
    def from_op_args(cls, group_name: str, starts: Sequence[int], sizes: Sequence[int]) -> "VocabShards":
        """The shards of a registry call: the group by name (``ProcessGroup.group_name``)."""
        from torch.distributed.distributed_c10d import _resolve_process_group

        group = _resolve_process_group(group_name)
        return cls(group, dist.get_rank(group), tuple(int(s) for s in starts), tuple(int(s) for s in sizes))


def local_labels(labels: Tensor, shards: VocabShards) -> Tuple[Tensor, Tensor, Tensor]:
    """(y_fwd, y_bwd, owner), each like labels (int64).

    y_fwd: the label's column in this rank's shard, or 0 where another rank holds it (any column
    in range: the forward kernel's label output is then unused); y_bwd: the column, or -1 (no
    column of this shard gets the label term); owner: the group rank whose shard holds the label,
    or -1 for a label outside [0, V) (its log-prob is NaN; nothing is read out of bounds).
    """
    y = labels.long()
    mine = (y >= shards.start) & (y < shards.start + shards.size)
    col = y - shards.start
    y_fwd = torch.where(mine, col, torch.zeros_like(col))
    y_bwd = torch.where(mine, col, torch.full_like(col, -1))
    owner = torch.full_like(y, -1)
    for r, (s, n) in enumerate(zip(shards.starts, shards.sizes)):
        owner = torch.where((y >= s) & (y < s + n), torch.full_like(y, r), owner)
    return y_fwd, y_bwd, owner


def all_gather_flat(out: Tensor, inp: Tensor, group) -> None:
    """``out`` (world * n,) <- every rank's contiguous ``inp`` (n,), in group-rank order."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # newer torch deprecates the latter
    gather(out, inp, group=group)


def exchange(local: Tensor, shards: VocabShards) -> Tensor:
    """All-gather of each rank's (STATS, m) float64 statistics: (world, STATS, m), group-rank order."""
    local = local.contiguous()
    out = torch.empty((shards.world,) + tuple(local.shape), dtype=local.dtype, device=local.device)
    if local.numel():  # no tokens: nothing to send (every rank has none: the fronts check the counts agree)
        all_gather_flat(out.view(-1), local.view(-1), shards.group)
    return out


def combine(gathered: Tensor, owner: Tensor, with_entropy: bool, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """(logp, entropy, lse) of the whole vocabulary from every shard's (lse_r, H_r, u_y - lse_r).

    gathered: (world, STATS, m) float64; owner: (m,) int64 (-1: no shard holds the label, NaN).
    Sums run over the ranks in group-rank order, in float64; logp and entropy are returned in
    ``dtype`` (the accumulation dtype of the inputs), lse in float64.
    """
    lse_r, ent_r, lp_r = gathered[:, 0], gathered[:, 1], gathered[:, 2]
    world = gathered.shape[0]
    top = lse_r.max(0).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # every shard -inf: lse = -inf below
    total = torch.zeros_like(top)
    for r in range(world):
        total = total + torch.exp(lse_r[r] - top)
    log_total = torch.log(total)
    lse = top + log_total
    log_w = (lse_r - top) - log_total  # (world, m): log of each shard's share
    who = owner.clamp(min=0)[None]
    logp = lp_r.gather(0, who)[0] + log_w.gather(0, who)[0]
    logp = torch.where(owner >= 0, logp, torch.full_like(logp, float("nan")))
    ent = torch.zeros_like(top)
    if with_entropy:
        for r in range(world):
            w = torch.exp(log_w[r])
            # A shard whose share underflows (or is empty) adds nothing, not 0 * NaN.
            ent = ent + torch.where(w > 0, w * (ent_r[r] - log_w[r]), torch.zeros_like(w))
    return logp.to(dtype), ent.to(dtype), lse


# ------------------------------------------------------------------ the reference epilogue
def _reference_forward(z, y, mask, temperature, with_entropy):
    logp, ent, lse = ref.token_logprob_stats(z.reshape(-1, z.shape[-1]), y, mask, temperature)
    return logp, (ent if with_entropy else torch.zeros_like(ent)), lse.double()


def _reference_backward(z, y, mask, logp, entropy, lse, grad_logp, grad_entropy, temperature, with_entropy, out):
    """dL/dz of one shard from the global statistics (the registry's reference backward
    recomputes a softmax over the logits it is given, which here is a single shard)."""
    dt = ref.acc_dtype(z)
    u = z.reshape(-1, z.shape[-1]).to(dt) / temperature
    lp_all = (u.double() - lse.double()[:, None]).to(dt)
    p = torch.exp(lp_all)
    gl = grad_logp.to(dt)[:, None]
    g = -gl * p
    if with_entropy:
        g = g - grad_entropy.to(dt)[:, None] * torch.where(p > 0, p * (lp_all + entropy.to(dt)[:, None]),
                                                           torch.zeros_like(p))
    y = y.long()
    has = y >= 0
    g.scatter_add_(1, y.clamp(min=0)[:, None], torch.where(has[:, None], gl, torch.zeros_like(gl)))
    g = torch.where(mask[:, None], g / temperature, torch.zeros_like(g))
    out.copy_(g.reshape(out.shape))


def kernels(kind: str):
    """(forward, backward) shard kernels of a backend: the registry's ``token_logprobs`` pair for
    the compiled backends (their backward takes an out-of-range label as "no label column"), the
    shard-aware PyTorch epilogue above for ``reference``."""
    if kind == "reference":
        return _reference_forward, _reference_backward
    from .ops._registry import _IMPLS

    return _IMPLS["token_logprobs"][kind], _IMPLS["token_logprobs_backward"][kind]


class ShardEpilogue:
    """A ``(token_logprobs, token_logprobs_backward)`` pair over this rank's vocabulary shard,
    in the interface ``steppo_fast.linear_head`` takes for its epilogue.

    ``forward(z, labels, mask, tau, with_entropy)`` reduces the shard logits z (m, V_r) to the
    shard statistics, all-gathers them over the group (the one collective of each chunk) and
    returns the whole vocabulary's (logp, entropy, lse) of the m tokens, the same on every rank;
    labels are global vocabulary ids. ``backward(...)`` writes this shard's columns of dL/dz from
    those global statistics, with no communication.
    """

    def __init__(self, kind: str, shards: VocabShards):
        self.fwd_kernel, self.bwd_kernel = kernels(kind)
        self.shards = shards

    def __iter__(self):
        return iter((self.forward, self.backward))

    def forward(self, z: Tensor, labels: Tensor, mask: Tensor, temperature: float, with_entropy: bool):
        m = labels.shape[0]
        dev = labels.device
        y_fwd, _, owner = local_labels(labels, self.shards)
        local = torch.empty(STATS, m, dtype=torch.float64, device=dev)
        if z.shape[-1] == 0:  # an empty shard (V < world size): no probability, no label
            local[0].fill_(float("-inf"))
            local[1:].zero_()
        else:
            lp, ent, lse = self.fwd_kernel(z, y_fwd, mask, temperature, with_entropy)
            local[0].copy_(lse)
            local[1].copy_(ent)
            local[2].copy_(lp)
        dt = ref.acc_dtype(z)
        logp, ent, lse = combine(exchange(local, self.shards), owner, with_entropy, dt)
        # Masked-out tokens (the logits path) are 0, as in the unsharded op.
        zero = torch.zeros((), dtype=dt, device=dev)
        logp, ent = torch.where(mask, logp, zero), torch.where(mask, ent, zero)
        lse = torch.where(mask, lse, torch.zeros((), dtype=torch.float64, device=dev))
        return logp, ent, lse

    def backward(self, z, labels, mask, logp, entropy, lse, grad_logp, grad_entropy, temperature, with_entropy, out):
        if z.shape[-1] == 0:
            return
        _, y_bwd, _ = local_labels(labels, self.shards)
        self.bwd_kernel(z, y_bwd, mask, logp, entropy, lse, grad_logp, grad_entropy, temperature, with_entropy, out)


def reduce_grad_hidden(grad_hidden: Tensor, shards: VocabShards) -> Tensor:
    """Sums the partial grad_hidden of the ranks (in place): the one collective of the backward."""
    if grad_hidden.numel() and shards.world > 1:
        dist.all_reduce(grad_hidden, group=shards.group)
    return grad_hidden

