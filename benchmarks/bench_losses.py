"""The step-aligned policy loss, forward + backward, from log-probs.

Peer: the PyTorch reference composition with autograd ("eager"). Traffic counted:
the (N,) inputs logp, old_logp, advantages and the step ids read once, the
gradient written once.
"""

from __future__ import annotations

from typing import List

import torch

from steppo_fast import ops
from steppo_fast import reference as ref

from .harness import Case, Variant


def cases(device: str, quick: bool) -> List[Case]:
    n_tok = 4096 if quick else 16384
    out = []
    for per_step in ([16, 256] if quick else [4, 64, 1024]):
        g = torch.Generator().manual_seed(0)
        S = max(1, n_tok // per_step)
        ts = torch.arange(n_tok) // per_step
        ts = torch.where(torch.rand(n_tok, generator=g) > 0.05, ts, -1).to(torch.int32).to(device)
        lp = (torch.randn(n_tok, generator=g) * 0.1).to(device)
        old = lp + (torch.randn(n_tok, generator=g) * 0.1).to(device)
        adv = torch.randn(n_tok, generator=g).to(device)
        st = {"lp": lp, "old": old, "adv": adv, "ts": ts, "S": S}

        def run(fn):
            def go(s):
                x = s["lp"].detach().requires_grad_(True)
                loss, _ = fn(x, s["old"], s["adv"], s["ts"], s["S"])
                loss.backward()
                return loss.detach(), x.grad
            return go

        def oracle(s):
            x = s["lp"].double().requires_grad_(True)
            loss, _ = ref.policy_loss(x, s["old"].double(), s["adv"].double(), s["ts"], s["S"], "step")
            loss.backward()
            return loss.detach(), x.grad

        vs = [Variant("eager", run(lambda *a: ref.policy_loss(*a, "step")), "peer"),
              Variant(f"steppo_fast[{ops.resolve_backend('policy_loss', torch.device(device))}]", run(lambda *a: ops.policy_loss(*a, "step")))]
        out.append(Case("policy_loss(step) fwd+bwd", {"tokens": n_tok, "tokens_per_step": per_step}, st, oracle,
                        bytes_moved=n_tok * (4 * 4 + 4), variants=vs))
    return out
