"""The policy loss, forward + backward, from log-probs (SPEC 7), step and token ratio.

Peers: the PyTorch reference composition with autograd ("eager") and verl's own loss
functions on the same batch laid out as verl has it (one row per step): ``gspo`` for the
step ratio, ``vanilla`` (dual clip 3.0) for the token ratio, both with
``seq-mean-token-mean``. Traffic counted: the (N,) inputs logp, old_logp, advantages and the
step ids read once, the gradient written once.
"""

from __future__ import annotations

from typing import List

import torch

from steppo_fast import ops
from steppo_fast import reference as ref

from .harness import Case, Variant

DUAL_CLIP = 3.0  # verl's default clip_ratio_c, applied by its vanilla loss


def _verl(ratio_level: str):
    cache = []  # verl imported on first use: without it only this row reports the import error

    def fn(x, old, adv, ts, S, per_step):
        if not cache:
            from verl.trainer.ppo import core_algos
            from verl.workers.config import ActorConfig

            cfg = ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, clip_ratio=0.2)
            cache.append((core_algos.get_policy_loss_fn("gspo" if ratio_level == "step" else "vanilla"), cfg))
        loss_fn, cfg = cache[0]
        rows = (S, per_step)
        loss, _ = loss_fn(old.reshape(rows), x.reshape(rows), adv.reshape(rows), (ts >= 0).reshape(rows),
                          "seq-mean-token-mean", cfg)
        return loss, None
    return fn


def cases(device: str, quick: bool) -> List[Case]:
    n_tok = 4096 if quick else 16384
    out = []
    for level in ("step", "token"):
        dual = DUAL_CLIP if level == "token" else None
        for per_step in ([16, 256] if quick else [4, 64, 1024]):
            g = torch.Generator().manual_seed(0)
            S = max(1, n_tok // per_step)
            ts = torch.arange(n_tok) // per_step
            ts = torch.where(torch.rand(n_tok, generator=g) > 0.05, ts, -1).to(torch.int32).to(device)
            lp = (torch.randn(n_tok, generator=g) * 0.1).to(device)
            old = lp + (torch.randn(n_tok, generator=g) * 0.1).to(device)
            adv = torch.randn(n_tok, generator=g).to(device)
            st = {"lp": lp, "old": old, "adv": adv, "ts": ts, "S": S, "per_step": per_step}

            def run(fn):
                def go(s):
                    x = s["lp"].detach().requires_grad_(True)
                    loss, _ = fn(x, s["old"], s["adv"], s["ts"], s["S"], s["per_step"])
                    loss.backward()
                    return loss.detach(), x.grad
                return go

            def oracle(s, level=level, dual=dual):
                x = s["lp"].double().requires_grad_(True)
                loss, _ = ref.policy_loss(x, s["old"].double(), s["adv"].double(), s["ts"], s["S"], level,
                                          dual_clip=dual)
                loss.backward()
                return loss.detach(), x.grad

            backend = ops.resolve_backend("policy_loss", torch.device(device))
            vs = [Variant("eager", run(lambda x, o, a, t, S, _p, lv=level, d=dual: ref.policy_loss(
                      x, o, a, t, S, lv, dual_clip=d)), "peer"),
                  Variant("verl " + ("gspo" if level == "step" else "vanilla"), run(_verl(level)), "peer"),
                  Variant(f"steppo_fast[{backend}]", run(lambda x, o, a, t, S, _p, lv=level, d=dual: ops.policy_loss(
                      x, o, a, t, S, lv, dual_clip=d)))]
            out.append(Case(f"policy_loss({level}) fwd+bwd", {"tokens": n_tok, "tokens_per_step": per_step}, st,
                            oracle, bytes_moved=n_tok * (4 * 4 + 4), variants=vs))
    return out
