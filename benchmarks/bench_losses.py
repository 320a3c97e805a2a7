"""The policy loss, forward + backward (SPEC 7), step and token ratio: from log-probs, and from
logits (log-probs + entropy + loss, SPEC 2 and 7).

Peers: the PyTorch reference composition with autograd ("eager") and verl's own loss
functions on the same batch laid out as verl has it (one row per step): ``gspo`` for the
step ratio, ``vanilla`` (dual clip 3.0) for the token ratio, both with
``seq-mean-token-mean``. From logits, verl's ``logprobs_from_logits`` + ``entropy_from_logits``
feed its loss, eager uses log_softmax, and steppo_fast is ``StepPOLoss``. Traffic counted from
log-probs: the (N,) inputs logp, old_logp, advantages and the step ids read once, the gradient
written once; from logits: the logits read twice and their gradient written once.
"""

from __future__ import annotations

from typing import Iterator, List

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


def _from_logits(kind: str, level: str):
    """(loss, grad of the logits) of the loss from (S, per_step, V) logits."""
    dual = DUAL_CLIP if level == "token" else None
    verl_loss = _verl(level)
    module = []

    def go(s):
        z = s["z"].detach().requires_grad_(True)
        S, per_step = s["S"], s["per_step"]
        y, mask = s["y"], s["ts"].reshape(S, per_step) >= 0
        old, adv = s["old"].reshape(S, per_step), s["adv"].reshape(S, per_step)
        if kind == "steppo_fast":
            if not module:
                from steppo_fast.losses import StepPOLoss

                module.append(StepPOLoss({"ratio_level": level, "dual_clip": dual}))
            loss, _ = module[0](z, y, mask, old, adv)
        else:
            if kind == "verl":
                from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

                logp = logprobs_from_logits(z, y)
                entropy_from_logits(z)  # verl's actor computes it next to the log-probs
                loss, _ = verl_loss(logp.reshape(-1), s["old"], s["adv"], s["ts"], S, per_step)
            else:
                logp_all = torch.log_softmax(z, -1)
                logp = logp_all.gather(-1, y[..., None]).squeeze(-1)
                loss, _ = ref.policy_loss(logp.reshape(-1), s["old"], s["adv"], s["ts"], S, level, dual_clip=dual)
        (g,) = torch.autograd.grad(loss, [z])
        return loss.detach(), g
    return go


def _from_logits_oracle(level: str):
    def oracle(s):
        z = s["z"].double()
        V = z.shape[-1]
        logp = ref.token_logprobs(z.reshape(-1, V), s["y"].reshape(-1))[0].requires_grad_(True)
        loss, _ = ref.policy_loss(logp, s["old"].double(), s["adv"].double(), s["ts"], s["S"], level,
                                  dual_clip=DUAL_CLIP if level == "token" else None)
        (g_lp,) = torch.autograd.grad(loss, [logp])
        g = ref.token_logprobs_backward(z.reshape(-1, V), s["y"].reshape(-1), s["ts"] >= 0, g_lp, None)
        return loss.detach(), g.reshape(z.shape)
    return oracle


def _logit_cases(device: str, grid: str) -> Iterator[Case]:
    if grid == "tiny":
        n_tok, vocab, per_steps = 64, 500, [16]
    elif grid == "quick":
        n_tok, vocab, per_steps = 1024, 8000, [16]
    else:  # the sizes: 16k tokens on a GPU, 4k on the CPU
        n_tok, vocab = (16384, 32000) if device == "cuda" else (4096, 32000)
        per_steps = [4, 64, 1024]
    for level in ("step", "token"):
        for per_step in per_steps:
            g = torch.Generator(device=device).manual_seed(1)
            to = dict(device=device)
            S = n_tok // per_step
            ts = torch.arange(n_tok, **to) // per_step
            ts = torch.where(torch.rand(n_tok, generator=g, **to) > 0.05, ts, -1).to(torch.int32)
            z = torch.randn(S, per_step, vocab, generator=g, **to) * 2
            y = torch.randint(0, vocab, (S, per_step), generator=g, **to)
            with torch.no_grad():
                lp = torch.log_softmax(z, -1).gather(-1, y[..., None]).reshape(-1)
            old = lp + 0.1 * torch.randn(n_tok, generator=g, **to)
            adv = torch.randn(n_tok, generator=g, **to)
            st = {"z": z, "y": y, "ts": ts, "old": old, "adv": adv, "S": S, "per_step": per_step}
            del z, lp
            logits_bytes = st["z"].numel() * st["z"].element_size()
            vs = [Variant("eager", _from_logits("eager", level), "peer", required_bytes=logits_bytes),
                  Variant("verl " + ("gspo" if level == "step" else "vanilla"), _from_logits("verl", level), "peer",
                          required_bytes=logits_bytes, requires=("verl",)),
                  Variant("steppo_fast StepPOLoss", _from_logits("steppo_fast", level), required_bytes=logits_bytes)]
            yield Case(f"StepPOLoss({level}) from logits fwd+bwd",
                       {"tokens": n_tok, "tokens_per_step": per_step, "V": vocab}, st,
                       _from_logits_oracle(level), bytes_moved=3 * logits_bytes, variants=vs)
            del st


def cases(device: str, grid: str) -> Iterator[Case]:
    """From log-probs first (the op itself), then from logits; built when their turn comes."""
    yield from _logp_cases(device, grid)
    yield from _logit_cases(device, grid)


def _logp_cases(device: str, grid: str) -> List[Case]:
    n_tok = {"tiny": 256, "quick": 4096}.get(grid, 16384)
    per_steps = {"tiny": [16], "quick": [16, 256]}.get(grid, [4, 64, 1024])
    out = []
    for level in ("step", "token"):
        dual = DUAL_CLIP if level == "token" else None
        for per_step in per_steps:
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
                  Variant("verl " + ("gspo" if level == "step" else "vanilla"), run(_verl(level)), "peer",
                          requires=("verl",)),
                  Variant(f"steppo_fast[{backend}]", run(lambda x, o, a, t, S, _p, lv=level, d=dual: ops.policy_loss(
                      x, o, a, t, S, lv, dual_clip=d)))]
            out.append(Case(f"policy_loss({level}) fwd+bwd", {"tokens": n_tok, "tokens_per_step": per_step}, st,
                            oracle, bytes_moved=n_tok * (4 * 4 + 4), variants=vs))
    return out
