"""Fused linear head: log-probs, entropies and the policy loss straight from hidden states
and the lm_head weight, without ever holding the N x V logits (SPEC sections 2 and 7).

Reference (``steppo_fast.reference.linear_token_logprobs`` and ``policy_loss``)::

    z = h W^T (+ b)                       (N, V): 5-20 GB in bf16 at RL shapes
    logp, H = token_logprobs(z, y)        SPEC 2
    loss = policy_loss(logp, old, A, ...) SPEC 7
    grad_h = G W, grad_W = G^T h, grad_b = sum_rows G,  G = dloss/dz

Here the agent tokens (the rows of a StepLayout or of a mask) are gathered chunk by chunk,
so masked-out tokens never enter a matrix product, and one (chunk, V) logits buffer is
reused for every chunk:

* **Primitive** (``forward_stats`` / ``backward_grads``): the forward multiplies each chunk
  once and keeps three floats per token (logp, H, lse) from the fused epilogue
  (``token_logprobs``: online log-sum-exp, label gather, entropy). The backward multiplies
  again, writes G into the same buffer in place (``token_logprobs_backward``) and
  accumulates grad_h, grad_W and grad_b. Four N x H x V products in all, like every chunked
  peer.
* **Fused loss** (``policy_loss_and_grads``): chunks are made of whole steps, so each chunk
  holds everything its step ratios need: after the epilogue gives the chunk's logp, the
  per-token loss gradients follow at once (the aggregation weights depend only on the
  layout and are computed once for the batch), G is written in place and both gradient
  products run before the next chunk. Three products in all (6 N H V flops): the loss and
  every gradient are ready when the forward returns, and the backward only scales them. A
  step longer than a chunk is split; its sub-chunks are multiplied twice (the first pass
  gives its mean log-ratio), which costs extra work only for such steps.

The epilogue is the registry's ``token_logprobs`` kernel pair of the chosen backend: C++ on
the CPU, Triton on the GPU (and on the CPU under ``TRITON_INTERPRET=1``). The products are
``torch.mm`` (MKL/oneDNN on the CPU, cuBLAS on the GPU), in the input dtype with fp32
accumulation inside the GEMM; the epilogue upcasts to fp32. grad_W may be accumulated
across chunks in fp32 (``fp32_weight_grad``) for bf16/fp16 weights: each chunk's product is
added into the float32 buffer by the GEMM itself where torch can (CUDA, torch >= 2.8), and is
never rounded to bf16 on the way (:func:`accumulate_fp32`).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import reference as ref

# Bytes of logits one chunk may hold. CPU: 32 MiB keeps the working set near the chunked
# peers' (Liger streams 2048 x 4096 fp32 blocks, 32 MiB). GPU: 1 GiB gives products of ~3500 x
# 4096 x 152k at Qwen's vocabulary in bf16, large enough to run the tensor cores at full rate,
# and keeps the extra memory below 2 GB.
CPU_CHUNK_BYTES = 32 << 20
GPU_CHUNK_BYTES = 1 << 30
# Fewest rows per chunk, whatever the vocabulary: every chunk reads and writes all of grad_W
# (V x H) once, so a chunk of C rows does 2 C flops per grad_W element moved; below ~256 rows
# that traffic, not the products, sets the time (N = 2048, H = 512, V = 151936 fp32 on 2 CPU
# threads: 8.6 s with 48-row chunks, 4.1 s with 256, 3.9 s with 512; one product takes 1.3 s).
CPU_MIN_ROWS = 256
GPU_MIN_ROWS = 1024
# Rows per chunk are a multiple of this (tensor-core tiles; AVX-512 panels on the CPU).
CHUNK_ALIGN = 16


def auto_chunk(vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk for a (rows, vocab) logits buffer of ``dtype`` on ``device``: the byte
    budget of the device, but never fewer than its minimum rows."""
    cuda = torch.device(device).type == "cuda"
    budget, least = (GPU_CHUNK_BYTES, GPU_MIN_ROWS) if cuda else (CPU_CHUNK_BYTES, CPU_MIN_ROWS)
    elem = torch.empty((), dtype=dtype).element_size()
    rows = budget // max(1, vocab * elem) // CHUNK_ALIGN * CHUNK_ALIGN
    return max(least, rows)


def plan_chunks(num_rows: int, chunk: int, step_offsets: Optional[Sequence[int]] = None) -> Tuple[List[int], List[int]]:
    """Chunk boundaries over the gathered agent tokens.

    Without ``step_offsets``: fixed chunks of ``chunk`` rows. With them (CSR offsets of the
    steps over the gathered rows, host ints): chunks of whole consecutive steps holding at most
    ``chunk`` rows, except that a step longer than ``chunk`` is split into sub-chunks.

    Returns ``(bounds, split_step)``: chunk k covers rows ``[bounds[k], bounds[k+1])``;
    ``split_step[k]`` is s + 1 when chunk k is part of long step s, else 0.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    bounds, split = [0], []
    if step_offsets is None:
        for c0 in range(0, num_rows, chunk):
            bounds.append(min(c0 + chunk, num_rows))
            split.append(0)
        return bounds, split
    offs = list(step_offsets)
    start = 0  # first row of the chunk being built
    s = 0
    num_steps = len(offs) - 1
    while s < num_steps:
        n = offs[s + 1] - offs[s]
        if n > chunk:
            if offs[s] > start:  # close the chunk of whole steps before it
                bounds.append(offs[s])
                split.append(0)
            for c0 in range(offs[s], offs[s + 1], chunk):
                bounds.append(min(c0 + chunk, offs[s + 1]))
                split.append(s + 1)
            start = offs[s + 1]
        elif offs[s + 1] - start > chunk:
            bounds.append(offs[s])
            split.append(0)
            start = offs[s]
            continue  # step s starts the next chunk
        s += 1
    if num_rows > start:
        bounds.append(num_rows)
        split.append(0)
    return bounds, split


class _Buffers:
    """The reused (chunk, V) logits buffer and an all-True chunk mask."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.z = torch.empty(max(rows, 1), vocab, dtype=dtype, device=device)
        self.ones = torch.ones(max(rows, 1), dtype=torch.bool, device=device)

    def logits(self, h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        z = self.z[: h.shape[0]]
        if bias is None:
            return torch.mm(h, weight.t(), out=z)
        return torch.addmm(bias, h, weight.t(), out=z)


def _rows_of(hidden: Tensor, rows: Optional[Tensor], c0: int, c1: int) -> Tensor:
    return hidden[c0:c1] if rows is None else hidden.index_select(0, rows[c0:c1])


def _gather(t: Optional[Tensor], rows: Optional[Tensor]) -> Optional[Tensor]:
    if t is None:
        return None
    return t if rows is None else t.index_select(0, rows)


def _scatter(values: Tensor, rows: Optional[Tensor], n: int) -> Tensor:
    if rows is None:
        return values
    out = values.new_zeros(n)
    return out.index_copy_(0, rows, values)


_FP32_GEMM = {}  # (device type, index) -> how accumulate_fp32 multiplies there


def _fp32_gemm(device: torch.device) -> str:
    """How this torch multiplies bf16/fp16 matrices into a float32 result on ``device``, probed once:
    "addmm" (one GEMM that adds into the float32 buffer: cuBLAS with a float32 C, torch >= 2.8 on
    CUDA), "mm" (a float32 product, then an add: torch versions whose addmm(out_dtype=) wants the
    added matrix in the operands' dtype), or "upcast" (operands converted to float32 first: the CPU,
    and CUDA before torch 2.8)."""
    key = (device.type, device.index)
    if key not in _FP32_GEMM:
        a = torch.zeros(2, 2, dtype=torch.bfloat16, device=device)
        acc = torch.zeros(2, 2, dtype=torch.float32, device=device)
        mode = "upcast"
        for name, probe in (("addmm", lambda: torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)),
                            ("mm", lambda: torch.mm(a, a, out_dtype=torch.float32))):
            try:
                probe()
            except (TypeError, RuntimeError, NotImplementedError):
                continue
            mode = name
            break
        _FP32_GEMM[key] = mode
        if device.type == "cuda" and mode != "addmm":
            import warnings

            warnings.warn(f"steppo_fast: torch {torch.__version__} has no bf16/fp16 GEMM that adds into a float32 "
                          f"matrix on {device}; fp32_weight_grad uses "
                          + ("a float32 product and an add (a V x H float32 temporary per chunk)" if mode == "mm"
                             else "float32 products of upcast operands (slower, twice the chunk's memory)"),
                          RuntimeWarning, stacklevel=3)
    return _FP32_GEMM[key]


def accumulate_fp32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b for bf16/fp16 a, b into the float32 acc, the product accumulated in float32 and
    never rounded to a's dtype on the way (see :func:`_fp32_gemm` for how, per device and torch)."""
    mode = _fp32_gemm(acc.device)
    if mode == "addmm":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif mode == "mm":
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        acc.addmm_(a.float(), b.float())


class _Grads:
    """Accumulators of grad_h (N, H), grad_W (V, H) and grad_b (V,), filled chunk by chunk."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], need_hidden: bool, need_weight: bool,
                 need_bias: bool, fp32_weight_grad: bool):
        self.hidden_dtype = hidden.dtype
        self.gh = torch.zeros_like(hidden) if need_hidden else None
        wdt = torch.float32 if fp32_weight_grad and weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
        self.gw = torch.zeros(weight.shape, dtype=wdt, device=weight.device) if need_weight else None
        self.gb = torch.zeros(weight.shape[0], dtype=torch.float32 if bias is None else ref.acc_dtype(bias),
                              device=weight.device) if need_bias else None
        self.weight, self.bias = weight, bias

    def add(self, g: Tensor, h: Tensor, rows: Optional[Tensor], c0: int, c1: int) -> None:
        """g: dloss/dz of rows c0..c1 (in the logits dtype), h: their hidden states."""
        if self.gh is not None:
            if rows is None:
                torch.mm(g, self.weight, out=self.gh[c0:c1])
            else:
                self.gh.index_copy_(0, rows[c0:c1], torch.mm(g, self.weight))
        if self.gw is not None:
            if self.gw.dtype == g.dtype:
                self.gw.addmm_(g.t(), h)
            else:
                accumulate_fp32(self.gw, g.t(), h)
        if self.gb is not None:
            self.gb.add_(g.sum(0, dtype=self.gb.dtype))

    def outputs(self) -> Tuple[Tensor, Tensor, Tensor]:
        def empty():  # a fresh empty tensor each time: a custom op's outputs may not alias
            return self.weight.new_empty(0)

        gh = self.gh if self.gh is not None else empty()
        gw = self.gw.to(self.weight.dtype) if self.gw is not None else empty()
        if self.gb is None:
            gb = empty()
        else:
            gb = self.gb.to(self.bias.dtype if self.bias is not None else self.weight.dtype)
        return gh, gw, gb


def _chunk_rows(num_rows: int, chunk: int) -> int:
    return max(1, min(chunk, num_rows))


# ------------------------------------------------------------------------------ primitive
def forward_stats(epilogue, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                  rows: Optional[Tensor], temperature: float, with_entropy: bool,
                  chunk: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(logp, entropy, lse), each (N,), 0 off ``rows``: float32 (float64 for float64 inputs), lse
    float64; one product per chunk.

    epilogue: ``(fwd, bwd)``, a backend's ``token_logprobs`` / ``token_logprobs_backward``.
    rows: (M,) int64 indices of the tokens to compute, or None for all N.
    """
    fwd, _ = epilogue
    n, vocab = hidden.shape[0], weight.shape[0]
    m = n if rows is None else rows.numel()
    y = _gather(labels, rows)
    dt = ref.acc_dtype(hidden, weight, bias)
    lp_a, en_a = (torch.empty(m, dtype=dt, device=hidden.device) for _ in range(2))
    ls_a = torch.empty(m, dtype=torch.float64, device=hidden.device)
    if m:
        buf = _Buffers(_chunk_rows(m, chunk), vocab, hidden.dtype, hidden.device)
        for c0 in range(0, m, chunk):
            c1 = min(c0 + chunk, m)
            z = buf.logits(_rows_of(hidden, rows, c0, c1), weight, bias)
            lp, en, ls = fwd(z, y[c0:c1], buf.ones[: c1 - c0], temperature, with_entropy)
            lp_a[c0:c1], en_a[c0:c1], ls_a[c0:c1] = lp, en, ls
    return _scatter(lp_a, rows, n), _scatter(en_a, rows, n), _scatter(ls_a, rows, n)


def backward_grads(epilogue, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                   rows: Optional[Tensor], logp: Tensor, entropy: Tensor, lse: Tensor, grad_logp: Tensor,
                   grad_entropy: Tensor, temperature: float, with_entropy: bool, chunk: int, need_hidden: bool,
                   need_weight: bool, need_bias: bool, fp32_weight_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden, grad_weight, grad_bias) from the forward's per-token statistics; an empty
    tensor stands for a gradient that is not needed. Products: one to recompute each chunk's
    logits, one per needed gradient of hidden or weight."""
    _, bwd = epilogue
    vocab = weight.shape[0]
    m = hidden.shape[0] if rows is None else rows.numel()
    acc = _Grads(hidden, weight, bias, need_hidden, need_weight, need_bias, fp32_weight_grad)
    if m and (need_hidden or need_weight or need_bias):
        y, lp, en, ls = (_gather(t, rows) for t in (labels, logp, entropy, lse))
        gl, ge = (_gather(t.to(lp.dtype), rows) for t in (grad_logp, grad_entropy))
        buf = _Buffers(_chunk_rows(m, chunk), vocab, hidden.dtype, hidden.device)
        for c0 in range(0, m, chunk):
            c1 = min(c0 + chunk, m)
            h = _rows_of(hidden, rows, c0, c1)
            z = buf.logits(h, weight, bias)
            bwd(z, y[c0:c1], buf.ones[: c1 - c0], lp[c0:c1], en[c0:c1], ls[c0:c1], gl[c0:c1], ge[c0:c1],
                temperature, with_entropy, z)
            acc.add(z, h, rows, c0, c1)
    return acc.outputs()


# ----------------------------------------------------------------------------- fused loss
def policy_loss_and_grads(epilogue, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                          rows: Tensor, token_step: Tensor, num_steps: int, step_offsets: Tensor,
                          bounds: Sequence[int],
                          split_step: Sequence[int], old_logp: Tensor, advantages: Tensor, weights: Optional[Tensor],
                          ref_logp: Optional[Tensor], loss_args: dict, temperature: float, with_entropy: bool,
                          need_hidden: bool, need_weight: bool, need_bias: bool, fp32_weight_grad: bool):
    """The policy loss of SPEC 7 over the tokens ``rows`` and all its gradients, in one sweep.

    rows: (M,) int64 agent tokens with each step's tokens contiguous (``StepLayout.step_tokens``);
    token_step: (M,) their step ids; step_offsets: (S+1,) int64 CSR offsets of the steps over
    ``rows`` (``StepLayout.step_token_offsets``); old_logp, advantages, weights, ref_logp: (M,) gathered;
    bounds / split_step: the plan of :func:`plan_chunks`; loss_args: the keyword options of
    ``reference.policy_loss`` (ratio_level, clip_low, ..., norm_constant).

    Returns (logp, entropy, grad_hidden, grad_weight, grad_bias): logp and entropy (M,) for the
    loss value and metrics, and the gradients of the loss (empty where not needed).
    """
    fwd, bwd = epilogue
    vocab = weight.shape[0]
    m = rows.numel()
    dt = ref.acc_dtype(hidden, weight, bias)
    dev = hidden.device
    step_level = loss_args["ratio_level"] == "step"
    y = labels.index_select(0, rows)
    old, adv = old_logp.to(dt), advantages.to(dt)
    c = ref.aggregation_weights(token_step, num_steps, loss_args["agg_mode"], dt, loss_args["global_num_tokens"],
                                loss_args["global_num_steps"], loss_args["norm_constant"])
    entropy_coef = loss_args["entropy_coef"]
    g_ent_all = -entropy_coef * c if with_entropy else torch.zeros_like(c)
    lp_a, en_a = (torch.empty(m, dtype=dt, device=dev) for _ in range(2))
    ls_a = torch.empty(m, dtype=torch.float64, device=dev)
    acc = _Grads(hidden, weight, bias, need_hidden, need_weight, need_bias, fp32_weight_grad)
    if m == 0:
        return lp_a, en_a, *acc.outputs()
    widest = max(b1 - b0 for b0, b1 in zip(bounds[:-1], bounds[1:]))
    buf = _Buffers(widest, vocab, hidden.dtype, dev)
    opts = dict(ratio_level=loss_args["ratio_level"], clip_low=loss_args["clip_low"],
                clip_high=loss_args["clip_high"], dual_clip=loss_args["dual_clip"], kl_coef=loss_args["kl_coef"],
                kl_type=loss_args["kl_type"])

    def stats(c0, c1, z):
        lp, en, ls = fwd(z, y[c0:c1], buf.ones[: c1 - c0], temperature, with_entropy)
        lp_a[c0:c1], en_a[c0:c1], ls_a[c0:c1] = lp, en, ls

    def grads(c0, c1, h, z, l_tok):
        lp = lp_a[c0:c1]
        diff = lp - old[c0:c1]
        g = ref.policy_token_grads(lp, adv[c0:c1], diff, l_tok, c[c0:c1], weights=_slice(weights, c0, c1),
                                   ref_logp=_slice(ref_logp, c0, c1), **opts)
        bwd(z, y[c0:c1], buf.ones[: c1 - c0], lp, en_a[c0:c1], ls_a[c0:c1], g, g_ent_all[c0:c1], temperature,
            with_entropy, z)
        acc.add(z, h, rows, c0, c1)

    def step_log_ratio(c0, c1):
        """Each token's step mean of (logp - old), for steps wholly inside rows c0..c1: differences
        of an fp64 prefix sum at the steps' CSR offsets (no atomics, so the same bits every run)."""
        prefix = torch.zeros(c1 - c0 + 1, dtype=torch.float64, device=dev)
        torch.cumsum((lp_a[c0:c1] - old[c0:c1]).double(), 0, out=prefix[1:])
        steps = token_step[c0:c1].long()
        a, b = step_offsets[steps] - c0, step_offsets[steps + 1] - c0
        return ((prefix[b] - prefix[a]) / (b - a)).to(dt)

    k, n_chunks = 0, len(bounds) - 1
    while k < n_chunks:
        c0, c1 = bounds[k], bounds[k + 1]
        if split_step[k] == 0:  # whole steps (or token ratio): one product, then the gradients
            h = _rows_of(hidden, rows, c0, c1)
            z = buf.logits(h, weight, bias)
            stats(c0, c1, z)
            grads(c0, c1, h, z, step_log_ratio(c0, c1) if step_level else None)
            k += 1
            continue
        # A step longer than a chunk: statistics of every sub-chunk first, then the gradients.
        last = k
        while last + 1 < n_chunks and split_step[last + 1] == split_step[k]:
            last += 1
        for j in range(k, last + 1):
            b0, b1 = bounds[j], bounds[j + 1]
            stats(b0, b1, buf.logits(_rows_of(hidden, rows, b0, b1), weight, bias))
        s0, s1 = bounds[k], bounds[last + 1]
        l_tok = step_log_ratio(s0, s1) if step_level else None
        for j in range(k, last + 1):
            b0, b1 = bounds[j], bounds[j + 1]
            h = _rows_of(hidden, rows, b0, b1)
            grads(b0, b1, h, buf.logits(h, weight, bias), None if l_tok is None else l_tok[b0 - s0:b1 - s0])
        k = last + 1
    return lp_a, en_a, *acc.outputs()


def _slice(t: Optional[Tensor], c0: int, c1: int) -> Optional[Tensor]:
    return None if t is None else t[c0:c1]
