"""Credit assignment: step rewards, step GAE and GRPO over random agent batches.

Layouts: steps of 64-256 agent tokens (quick: 16-64), 4-8 steps per trajectory,
groups of 8. Variants: every steppo_fast backend available on the device, the
PyTorch reference ("eager") and torch.compile of it.
"""

from __future__ import annotations

from typing import List

import torch

from steppo_fast import StepLayout, advantages, ops
from steppo_fast import reference as ref

from .harness import Case, Variant


def make_layout(num_steps: int, tokens: tuple, steps_per_traj: tuple, group: int, device: str, seed: int = 0):
    """A step-rows batch of about num_steps steps, rows shuffled; returns (layout, token_rewards, values)."""
    g = torch.Generator().manual_seed(seed)
    ks = []
    while sum(ks) < num_steps:
        ks.append(int(torch.randint(steps_per_traj[0], steps_per_traj[1] + 1, (1,), generator=g)))
    R = len(ks)
    traj = torch.repeat_interleave(torch.arange(R), torch.tensor(ks))
    step = torch.cat([torch.arange(k) for k in ks])
    B = traj.numel()
    T = tokens[1]
    n_tok = torch.randint(tokens[0], tokens[1] + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < n_tok[:, None]
    perm = torch.randperm(B, generator=g)
    mask, traj, step = mask[perm], traj[perm], step[perm]
    grp = traj // group
    lay = StepLayout.from_step_rows(mask.to(device), traj.to(device), step.to(device), grp.to(device))
    rew = (torch.randn(B, T, generator=g) * mask).to(device)
    vals = torch.randn(B, T, generator=g).to(device)
    return lay, rew, vals


def _compiled(fn):
    c = torch.compile(fn, dynamic=False)
    return c


def cases(device: str, quick: bool) -> List[Case]:
    sizes = [1024] if quick else [1024, 65536]
    tok = (16, 64) if quick else (64, 256)
    out = []
    for S in sizes:
        lay, rew, vals = make_layout(S, tok, (4, 8), 8, device)
        flat = rew.reshape(-1)
        st = {"lay": lay, "rew": flat}
        size = {"steps": lay.num_steps, "tokens": lay.num_active_tokens}

        # step_rewards: read each agent token's reward and index once, write S values.
        sr_bytes = lay.num_active_tokens * (flat.element_size() + 8) + lay.num_steps * 4
        vs = [Variant("eager", lambda s: ref.step_rewards(s["rew"], s["lay"].token_step, s["lay"].num_steps), "peer")]
        vs.append(Variant("torch.compile", lambda s, f=_compiled(ref.step_rewards): f(s["rew"], s["lay"].token_step,
                                                                                          s["lay"].num_steps), "peer"))
        for b in ops.available_backends("step_rewards", device):
            if b != "reference":
                vs.append(Variant(f"steppo_fast[{b}]", lambda s, b=b: ops.step_rewards(
                    s["rew"], s["lay"].token_step, s["lay"].step_tokens, s["lay"].step_token_offsets, backend=b)))
        out.append(Case("step_rewards", size, st,
                        lambda s: ref.step_rewards(s["rew"].double(), s["lay"].token_step, s["lay"].num_steps),
                        bytes_moved=sr_bytes, variants=vs))

        r_s = ref.step_rewards(flat, lay.token_step, lay.num_steps)
        v_s = lay.step_values_from_tokens(vals)
        st2 = {"lay": lay, "r": r_s, "v": v_s}
        gae_bytes = lay.num_steps * 4 * 4
        vs = [Variant("eager", lambda s: ref.step_gae(s["r"], s["v"], s["lay"].traj_step_offsets, 0.99, 0.95), "peer"),
              Variant(f"steppo_fast[{ops.resolve_backend('step_gae', torch.device(device))}]", lambda s: ops.step_gae(s["r"], s["v"], s["lay"].traj_step_offsets, 0.99, 0.95))]
        out.append(Case("step_gae", size, st2,
                        lambda s: ref.step_gae(s["r"].double(), s["v"].double(), s["lay"].traj_step_offsets, 0.99,
                                               0.95), bytes_moved=gae_bytes, variants=vs))
        out += _outcome_cases(S, tok, device)
    return out


def _verl(name):
    def fn(s):
        import numpy as np
        from verl.trainer.ppo import core_algos

        f = getattr(core_algos, name)
        adv, _ = f(s["rew2d"], s["mask2d"].float(), np.asarray(s["uid"]))
        return adv
    return fn


def _outcome_cases(num_rows: int, tok: tuple, device: str) -> List[Case]:
    """GRPO and RLOO on one-step-per-row batches (verl's layout), token broadcast included.

    Peers: the reference, verl's loop implementations and its vectorised GRPO (CPU, pip verl).
    Traffic: read the (B, T) rewards and mask, write the (B, T) advantages.
    """
    g = torch.Generator().manual_seed(1)
    T = tok[1]
    n_tok = torch.randint(tok[0], T + 1, (num_rows,), generator=g)
    mask2d = torch.arange(T)[None, :] < n_tok[:, None]
    rew2d = torch.zeros(num_rows, T)
    rew2d[torch.arange(num_rows), n_tok - 1] = torch.randn(num_rows, generator=g)  # outcome reward on the last token
    grp = torch.arange(num_rows) // 8
    lay = StepLayout.from_step_rows(mask2d.to(device), torch.arange(num_rows, device=device),
                                    torch.zeros(num_rows, dtype=torch.long, device=device), grp.to(device))
    st = {"lay": lay, "rew2d": rew2d.to(device), "mask2d": mask2d.to(device), "uid": [str(int(i)) for i in grp]}
    size = {"steps": num_rows, "tokens": int(mask2d.sum())}
    moved = num_rows * T * (4 + 1 + 4)
    out = []
    for est, peers in (("grpo", ["compute_grpo_outcome_advantage", "compute_grpo_vectorized_outcome_advantage"]),
                       ("rloo", ["compute_rloo_outcome_advantage"])):
        def ours(s, est=est, backend="auto"):
            return advantages.compute(est, s["lay"], token_rewards=s["rew2d"], backend=backend).token_advantages

        def oracle(s, est=est):
            return advantages.compute(est, s["lay"], token_rewards=s["rew2d"].double(),
                                      backend="reference").token_advantages

        vs = [Variant("eager", lambda s, f=ours: f(s, backend="reference"), "peer")]
        vs += [Variant(f"verl {p.replace('compute_', '').replace('_outcome_advantage', '')}", _verl(p), "peer")
               for p in peers]
        vs.append(Variant(f"steppo_fast[{ops.resolve_backend('group_advantage', torch.device(device))}]", ours))
        out.append(Case(f"{est} (+ broadcast)", size, st, oracle, bytes_moved=moved, variants=vs))
    return out
