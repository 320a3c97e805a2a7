"""Token log-probs and entropy from logits, forward + backward.

Peers: torch eager (log_softmax + gather + entropy) and torch.compile of it. The
traffic counted is one read of the logits and one write of their gradient.
"""

from __future__ import annotations

from typing import List

import torch

from steppo_fast import ops
from steppo_fast import reference as ref

from .harness import Case, Variant


def _eager(z, y, m):
    logp_all = torch.log_softmax(z.float(), dim=-1)
    logp = logp_all.gather(-1, y[:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp * m, ent * m


def _fwd_bwd(fn):
    def run(s):
        z = s["z"].detach().requires_grad_(True)
        logp, ent = fn(z, s["y"], s["m"])
        (logp.sum() + ent.sum()).backward()
        return logp.detach(), ent.detach(), z.grad
    return run


def cases(device: str, quick: bool) -> List[Case]:
    shapes = [(256, 32000)] if quick else [(1024, 32000), (256, 151936)]
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    out = []
    for n, v in shapes:
        for dt in dtypes:
            g = torch.Generator().manual_seed(0)
            z = (torch.randn(n, v, generator=g) * 2).to(dt).to(device)
            y = torch.randint(0, v, (n,), generator=g).to(device)
            m = (torch.rand(n, generator=g) > 0.1).to(device)
            st = {"z": z, "y": y, "m": m}
            compiled = torch.compile(_eager, dynamic=False)

            def oracle(s):
                z64 = s["z"].double().requires_grad_(True)
                logp, ent = ref.token_logprobs(z64, s["y"], s["m"])
                (logp.sum() + ent.sum()).backward()
                return logp.detach(), ent.detach(), z64.grad

            vs = [Variant("eager", _fwd_bwd(lambda z, y, mm: _eager(z, y, mm.float())), "peer"),
                  Variant("torch.compile", _fwd_bwd(lambda z, y, mm: compiled(z, y, mm.float())), "peer"),
                  Variant(f"steppo_fast[{ops.resolve_backend('token_logprobs', torch.device(device))}]", _fwd_bwd(lambda z, y, mm: ops.token_logprobs(z, y, mm)))]
            out.append(Case("token_logprobs fwd+bwd", {"N": n, "V": v, "dtype": str(dt).replace("torch.", "")}, st,
                            oracle, bytes_moved=2 * z.numel() * z.element_size(), variants=vs))
    return out
