"""Token log-probs and entropy from logits (SPEC 2): forward, and forward + backward.

Peers: torch eager (log_softmax + gather, softmax * log_softmax for the entropy),
torch.compile of it, verl's ``logprobs_from_logits`` + ``entropy_from_logits`` (CPU path:
log_softmax + gather) and, on CUDA, Liger's fused cross-entropy (log-prob only: it has no
entropy output, so it does less work than the others). Every fwd+bwd variant returns the
gradient through ``torch.autograd.grad`` (no leaf accumulation copy).

Traffic counted: the forward reads the logits once (N x V x itemsize); forward + backward
reads them twice and writes the gradient once. The "device copy" ceiling row copies the
logits (read + write) and is the bandwidth yardstick. ``extra_MiB`` is the peak memory
beyond the gradient a variant must return (the logits buffer itself for in-place).
"""

from __future__ import annotations

from typing import Iterator

import torch

from steppo_fast import ops
from steppo_fast import reference as ref

from .harness import Case, Variant


def _eager(z, y, m):
    logp_all = torch.log_softmax(z.float(), dim=-1)
    logp = logp_all.gather(-1, y.clamp(min=0)[:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp * m, ent * m


def _verl(z, y, m):
    from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

    zf = z.float()
    return logprobs_from_logits(zf, y.clamp(min=0)) * m, entropy_from_logits(zf) * m


def _liger_logp(z, y, m):
    from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction

    yy = torch.where(m > 0, y, torch.full_like(y, -100))
    loss = LigerCrossEntropyFunction.apply(z, yy, None, -100, 0.0, 0.0, "none")
    loss = loss[0] if isinstance(loss, tuple) else loss
    return -loss.float(), torch.zeros_like(loss, dtype=torch.float32)


def _steppo(inplace=False):
    def fn(z, y, m):
        return ops.token_logprobs(z, y, m > 0, inplace_backward=inplace)
    return fn


def _fwd(fn):
    def run(s):
        with torch.no_grad():
            return fn(s["z"], s["y"], s["mf"])
    return run


def _fwd_bwd(fn, key="z"):
    def run(s):
        z = s[key].detach().requires_grad_(True)
        logp, ent = fn(z, s["y"], s["mf"])
        (g,) = torch.autograd.grad(logp.sum() + ent.sum(), [z])
        return logp.detach(), ent.detach(), g
    return run


def _oracle(with_grad: bool, rows_per_chunk: int = 512):
    """fp64 reference, chunk by chunk over rows (the gradient is returned in float32 to bound memory)."""
    def run(s):
        z, y, m = s["z"], s["y"], s["m"]
        lps, ents, grads = [], [], []
        for i in range(0, z.shape[0], rows_per_chunk):
            zc = z[i:i + rows_per_chunk].double()
            yc, mc = y[i:i + rows_per_chunk], m[i:i + rows_per_chunk]
            lp, ent = ref.token_logprobs(zc, yc, mc)
            lps.append(lp)
            ents.append(ent)
            if with_grad:
                ones = torch.ones_like(lp)
                grads.append(ref.token_logprobs_backward(zc, yc, mc, ones, ones).float())
        out = [torch.cat(lps), torch.cat(ents)]
        return tuple(out + [torch.cat(grads)]) if with_grad else tuple(out)
    return run


def _shapes(device: str, grid: str):
    """(tokens, vocabulary, dtype), the headline size first."""
    if device == "cuda":
        if grid == "tiny":
            return [(256, 4096, torch.bfloat16)]
        if grid == "quick":
            return [(4096, 151936, torch.bfloat16)]
        return [(16384, 151936, torch.bfloat16), (4096, 32000, torch.bfloat16), (4096, 32000, torch.float32)]
    if grid == "tiny":
        return [(32, 500, torch.float32)]
    if grid == "quick":
        return [(256, 32000, torch.float32)]
    return [(4096, 32000, torch.float32), (4096, 32000, torch.bfloat16), (1024, 151936, torch.float32),
            (1024, 151936, torch.bfloat16)]


def _inputs(n: int, v: int, dt, device: str):
    """Logits drawn on the device in their own dtype (no float32 copy of N x V on the host)."""
    g = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(n, v, generator=g, device=device, dtype=dt).mul_(2)
    y = torch.randint(0, v, (n,), generator=g, device=device)
    m = torch.rand(n, generator=g, device=device) > 0.1
    return z, y, m


def cases(device: str, grid: str) -> Iterator[Case]:
    """One forward and one forward + backward case per size, built when their turn comes."""
    for n, v, dt in _shapes(device, grid):
        z, y, m = _inputs(n, v, dt, device)
        st = {"z": z, "y": y, "m": m, "mf": m.float(), "z_work": z.clone()}
        del z, y, m
        size = {"N": n, "V": v, "dtype": str(dt).replace("torch.", "")}
        logits_bytes = n * v * st["z"].element_size()
        backend = ops.resolve_backend("token_logprobs", torch.device(device))
        compiled = [] if grid == "tiny" else [torch.compile(_eager, dynamic=False)]

        fwd = [Variant("device copy", lambda s: s["z"].clone(), "ceiling", bytes_moved=2 * logits_bytes),
               Variant("eager", _fwd(_eager), "peer")]
        fwd += [Variant("torch.compile", _fwd(c), "peer") for c in compiled]
        fwd += [Variant("verl", _fwd(_verl), "peer", requires=("verl",)),
                Variant(f"steppo_fast[{backend}]", _fwd(_steppo()))]
        yield Case("token_logprobs fwd", size, st, _oracle(False), bytes_moved=logits_bytes, variants=fwd)

        both = [Variant("eager", _fwd_bwd(_eager), "peer", required_bytes=logits_bytes)]
        both += [Variant("torch.compile", _fwd_bwd(c), "peer", required_bytes=logits_bytes) for c in compiled]
        both += [Variant("verl", _fwd_bwd(_verl), "peer", required_bytes=logits_bytes, requires=("verl",))]
        if device == "cuda":
            both.append(Variant("liger (logp only)", _fwd_bwd(_liger_logp, "z_work"), "peer", required_bytes=0,
                                requires=("liger_kernel",)))
        both += [Variant(f"steppo_fast[{backend}]", _fwd_bwd(_steppo()), required_bytes=logits_bytes),
                 # Works on its own copy: the in-place backward turns the logits into the gradient.
                 Variant(f"steppo_fast[{backend}] in-place", _fwd_bwd(_steppo(True), "z_work"), required_bytes=0)]
        yield Case("token_logprobs fwd+bwd", size, st, _oracle(True), bytes_moved=3 * logits_bytes,
                   variants=both)
        del st
