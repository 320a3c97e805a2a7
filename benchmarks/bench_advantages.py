"""Credit assignment: every estimator over random agent batches, against the published loops.

Layouts: steps of 64-256 agent tokens (quick: 16-64), 4-8 steps per trajectory,
groups of 8; 1k and 64k steps, and 1M on a GPU. Variants: the steppo_fast backend of
the device, the PyTorch reference ("eager"), torch.compile of it where it compiles, and
the published implementations: verl's GAE, REINFORCE++, GRPO and RLOO (pip ``verl``)
and a per-step Python loop with dictionaries for GiGPO, written the way verl-agent
computes it. Loop peers run up to 64k steps.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace
from typing import Iterator, List

import torch

from steppo_fast import StepLayout, advantages, ops
from steppo_fast import reference as ref

from .harness import Case, Variant, missing_packages


def make_layout(num_steps: int, tokens: tuple, steps_per_traj: tuple, group: int, device: str, seed: int = 0):
    """A step-rows batch of about num_steps steps, rows shuffled; returns (layout, token_rewards, values)."""
    g = torch.Generator().manual_seed(seed)
    ks = _steps_per_trajectory(num_steps, steps_per_traj, g)
    R = ks.numel()
    traj = torch.repeat_interleave(torch.arange(R), ks)
    step = torch.arange(traj.numel()) - torch.repeat_interleave(ks.cumsum(0) - ks, ks)
    B = traj.numel()
    T = tokens[1]
    n_tok = torch.randint(tokens[0], tokens[1] + 1, (B,), generator=g)
    perm = torch.randperm(B, generator=g)
    n_tok, traj, step = n_tok[perm].to(device), traj[perm].to(device), step[perm].to(device)
    # The (B, T) tensors are drawn on the device (1M steps: 2 x 1 GB of float32).
    mask = torch.arange(T, device=device)[None, :] < n_tok[:, None]
    lay = StepLayout.from_step_rows(mask, traj, step, traj // group)
    gd = torch.Generator(device=device).manual_seed(seed)
    rew = torch.randn(B, T, generator=gd, device=device) * mask
    vals = torch.randn(B, T, generator=gd, device=device)
    return lay, rew, vals


def _steps_per_trajectory(num_steps: int, steps_per_traj: tuple, g: torch.Generator) -> torch.Tensor:
    """Trajectory lengths drawn from steps_per_traj until they add up to at least num_steps."""
    ks = torch.randint(steps_per_traj[0], steps_per_traj[1] + 1, (num_steps // steps_per_traj[0] + 1,), generator=g)
    return ks[: int(torch.searchsorted(ks.cumsum(0), num_steps)) + 1]


def make_packed(num_steps: int, tokens: tuple, steps_per_traj: tuple, group: int, device: str, obs=(8, 32),
                seed: int = 2):
    """One row per trajectory (verl's multi-turn layout): each step's agent tokens follow an
    observation of ``obs`` tokens (mask 0). Returns (layout, token_rewards, values, mask)."""
    g = torch.Generator().manual_seed(seed)
    ks = _steps_per_trajectory(num_steps, steps_per_traj, g)
    R, S = ks.numel(), int(ks.sum())
    step_k = torch.arange(S) - torch.repeat_interleave(ks.cumsum(0) - ks, ks)
    n_tok = torch.randint(tokens[0], tokens[1] + 1, (S,), generator=g)
    n_obs = torch.randint(obs[0], obs[1] + 1, (S,), generator=g)
    # Segments (observation, then the step's tokens), laid out row after row; the per-token
    # tensors are built on the device.
    seg_val = torch.stack([torch.full((S,), -1), step_k], 1).reshape(-1).to(device)
    seg_len = torch.stack([n_obs, n_tok], 1).reshape(-1)
    seg_row = torch.repeat_interleave(torch.repeat_interleave(torch.arange(R), ks), 2)
    row_len = torch.zeros(R, dtype=torch.int64).index_add_(0, seg_row, seg_len)
    T = int(row_len.max())
    seg_row, seg_len, row_len = seg_row.to(device), seg_len.to(device), row_len.to(device)
    flat_row = torch.repeat_interleave(seg_row, seg_len)
    pos = torch.arange(flat_row.numel(), device=device) - torch.repeat_interleave(row_len.cumsum(0) - row_len, row_len)
    sid = torch.full((R, T), -1, dtype=torch.int64, device=device)
    sid[flat_row, pos] = torch.repeat_interleave(seg_val, seg_len)
    del flat_row, pos
    mask = sid >= 0
    lay = StepLayout.from_packed(sid, (torch.arange(R) // group).to(device), num_steps=ks.to(device))
    gd = torch.Generator(device=device).manual_seed(seed)
    rew = torch.randn(R, T, generator=gd, device=device) * mask
    vals = torch.randn(R, T, generator=gd, device=device)
    return lay, rew, vals, mask


def _compiled(fn):
    c = torch.compile(fn, dynamic=False)
    return c


def cases(device: str, grid: str) -> Iterator[Case]:
    """Every estimator per size, smallest first; each size's batch is built when its turn comes."""
    if grid == "tiny":
        sizes, tok = [64], (4, 16)
    elif grid == "quick":
        sizes, tok = [1024], (16, 64)
    else:
        sizes, tok = [1024, 65536] + ([1 << 20] if device == "cuda" else []), (64, 256)
    for S in sizes:
        yield from _cases_of_size(S, tok, device, compiled_peer=grid != "tiny")


def _cases_of_size(S: int, tok: tuple, device: str, compiled_peer: bool) -> List[Case]:
    out = []
    lay, rew, vals = make_layout(S, tok, (4, 8), 8, device)
    flat = rew.reshape(-1)
    st = {"lay": lay, "rew": flat}
    size = {"steps": lay.num_steps, "tokens": lay.num_active_tokens}

    # step_rewards: read each agent token's reward and index once, write S values.
    sr_bytes = lay.num_active_tokens * (flat.element_size() + 8) + lay.num_steps * 4
    vs = [Variant("eager", lambda s: ref.step_rewards(s["rew"], s["lay"].token_step, s["lay"].num_steps), "peer")]
    if compiled_peer:
        vs.append(Variant("torch.compile", lambda s, f=_compiled(ref.step_rewards): f(
            s["rew"], s["lay"].token_step, s["lay"].num_steps), "peer"))
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
          Variant(f"steppo_fast[{ops.resolve_backend('step_gae', torch.device(device))}]",
                  lambda s: ops.step_gae(s["r"], s["v"], s["lay"].traj_step_offsets, 0.99, 0.95))]
    out.append(Case("step_gae", size, st2,
                    lambda s: ref.step_gae(s["r"].double(), s["v"].double(), s["lay"].traj_step_offsets, 0.99,
                                           0.95), bytes_moved=gae_bytes, variants=vs))
    out.append(_gigpo_case(lay, rew, S, device))
    out += _token_level_cases(S, tok, device)
    out += _outcome_cases(S, tok, device)
    return out


LOOP_PEERS_MAX_STEPS = 65536  # the Python-loop peers take minutes beyond this


def _gigpo_python_loop(s):
    """GiGPO with the structure of verl-agent's implementation: one row per step, Python loops
    over rows that index tensors element by element, dictionaries keyed by group and by
    (group, anchor state), one small tensor reduction per group. SPEC 6 semantics: episode
    scores normalised in their group (a group of one: mean 0, std 1), discounted step returns
    normalised in their step group (a step group of one: 0), mean_norm mode."""
    r = s["r_s"].clone()
    traj = s["step_traj"].cpu().numpy()
    index = s["step_group"].cpu().numpy()
    anchors = s["anchor"].cpu().numpy()
    gamma, w = s["gamma"], s["w"]
    S = r.numel()
    # Episode part: each trajectory's score, gathered row by row, normalised in its group.
    traj_score = defaultdict(float)
    for i in range(S):
        traj_score[traj[i]] += r[i]
    id2scores = defaultdict(list)
    seen = set()
    for i in range(S):
        if traj[i] not in seen:
            seen.add(traj[i])
            id2scores[index[i]].append(traj_score[traj[i]])
    id2mean = {k: torch.mean(torch.tensor(v)) if len(v) > 1 else torch.tensor(0.0) for k, v in id2scores.items()}
    episode = torch.zeros(S)
    for i in range(S):
        episode[i] = traj_score[traj[i]] - id2mean[index[i]]
    # Step part: discounted returns per trajectory (a reverse loop over its rows), step groups
    # from a dictionary of (group, anchor state), mean-normalised per step group.
    rows_of = defaultdict(list)
    for i in range(S):
        rows_of[traj[i]].append(i)
    returns = torch.zeros(S)
    for rows in rows_of.values():
        run = 0.0
        for i in reversed(rows):
            run = r[i] + gamma * run
            returns[i] = run
    step_groups = defaultdict(list)
    for i in range(S):
        step_groups[(index[i], anchors[i])].append(i)
    step_adv = torch.zeros(S)
    for rows in step_groups.values():
        if len(rows) > 1:
            mean = torch.mean(torch.tensor([returns[i] for i in rows]))
            for i in rows:
                step_adv[i] = returns[i] - mean
    adv = episode + w * step_adv
    return adv[s["row_step"]][:, None] * s["mask"]


def _gigpo_case(lay, rew, S, device) -> Case:
    """GiGPO (episode groups + anchor-state step groups), token broadcast included."""
    g = torch.Generator().manual_seed(5)
    r_s = ref.step_rewards(rew.reshape(-1), lay.token_step, lay.num_steps)
    anchor = torch.randint(0, 4, (lay.num_steps,), generator=g).to(device)
    mask = lay.token_mask.reshape(lay.token_shape)
    st = {"lay": lay, "r_s": r_s, "anchor": anchor, "step_traj": lay.step_traj,
          "step_group": lay.traj_group[lay.step_traj], "row_step": lay.row_step, "mask": mask, "gamma": 0.95,
          "w": 1.0}

    def ours(s, backend="auto", dtype=None):
        r = s["r_s"] if dtype is None else s["r_s"].to(dtype)
        return advantages.compute("gigpo", s["lay"], step_rewards=r, anchor_keys=s["anchor"], gamma=s["gamma"],
                                  step_weight=s["w"], gigpo_mode="mean_norm", backend=backend).token_advantages

    vs = [Variant("eager", lambda s: ours(s, "reference"), "peer")]
    if S <= LOOP_PEERS_MAX_STEPS:
        vs.append(Variant("python loop (verl-agent style)", _gigpo_python_loop, "peer"))
    vs.append(Variant(f"steppo_fast[{ops.resolve_backend('group_advantage', torch.device(device))}]", ours))
    moved = mask.numel() * (1 + 4) + lay.num_steps * (4 + 8)
    return Case("gigpo (+ broadcast)", {"steps": lay.num_steps, "tokens": lay.num_active_tokens}, st,
                lambda s: ours(s, "reference", torch.float64), bytes_moved=moved, variants=vs)


def _token_level_cases(num_steps: int, tok: tuple, device: str) -> List[Case]:
    """Token GAE and REINFORCE++ across the steps of packed multi-turn rows, the layout verl's
    loops take (they carry the recursion across observation tokens), whitening included."""
    lay, rew, vals, mask = make_packed(num_steps, tok, (4, 8), 8, device)
    st = {"lay": lay, "rew": rew, "vals": vals, "mask": mask, "maskf": mask.float()}
    size = {"steps": lay.num_steps, "tokens": lay.num_active_tokens}
    gamma, lam = 0.99, 0.95

    def gae(s, backend="auto", dt=None):
        r, v = (s["rew"], s["vals"]) if dt is None else (s["rew"].to(dt), s["vals"].to(dt))
        out = advantages.compute("token_gae", s["lay"], token_rewards=r, values=v, gamma=gamma, lam=lam,
                                 backend=backend)
        return out.token_advantages, out.token_returns

    def verl_gae(s):
        from verl.trainer.ppo import core_algos

        adv, ret = core_algos.compute_gae_advantage_return(s["rew"], s["vals"], s["maskf"], gamma, lam)
        return adv * s["maskf"], ret * s["maskf"]  # verl leaves values on non-agent tokens

    def rpp(s, backend="auto", dt=None):
        r = s["rew"] if dt is None else s["rew"].to(dt)
        return advantages.compute("reinforce_pp", s["lay"], token_rewards=r, gamma=gamma,
                                  backend=backend).token_advantages

    def verl_rpp(s):
        from verl.trainer.ppo import core_algos

        adv, _ = core_algos.compute_reinforce_plus_plus_outcome_advantage(s["rew"], s["maskf"],
                                                                          SimpleNamespace(gamma=gamma))
        return adv

    loops = num_steps <= LOOP_PEERS_MAX_STEPS
    backend = ops.resolve_backend("token_gae", torch.device(device))
    cells = mask.numel()
    out = []
    vs = [Variant("eager", lambda s: gae(s, "reference"), "peer")]
    vs += [Variant("verl compute_gae_advantage_return", verl_gae, "peer", requires=("verl",))] if loops else []
    vs.append(Variant(f"steppo_fast[{backend}]", gae))
    out.append(Case("token_gae (+ whiten)", size, st, lambda s: gae(s, "reference", torch.float64),
                    bytes_moved=cells * (4 + 4 + 1 + 4 + 4), variants=vs))
    vs = [Variant("eager", lambda s: rpp(s, "reference"), "peer")]
    vs += [Variant("verl reinforce_plus_plus", verl_rpp, "peer", requires=("verl",))] if loops else []
    vs.append(Variant(f"steppo_fast[{backend}]", rpp))
    out.append(Case("reinforce_pp (+ whiten)", size, st, lambda s: rpp(s, "reference", torch.float64),
                    bytes_moved=cells * (4 + 1 + 4), variants=vs))
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
    n_tok = torch.randint(tok[0], T + 1, (num_rows,), generator=g).to(device)
    mask2d = torch.arange(T, device=device)[None, :] < n_tok[:, None]
    rew2d = torch.zeros(num_rows, T, device=device)
    # The outcome reward on each row's last token.
    rew2d[torch.arange(num_rows, device=device), n_tok - 1] = torch.randn(num_rows, generator=g).to(device)
    grp = torch.arange(num_rows) // 8
    lay = StepLayout.from_step_rows(mask2d, torch.arange(num_rows, device=device),
                                    torch.zeros(num_rows, dtype=torch.long, device=device), grp.to(device))
    # verl's group ids are strings, one per row (a second for 1M rows): built only for its rows.
    uid = [str(int(i)) for i in grp] if not missing_packages(["verl"]) else None
    st = {"lay": lay, "rew2d": rew2d, "mask2d": mask2d, "uid": uid}
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
        vs += [Variant(f"verl {p.replace('compute_', '').replace('_outcome_advantage', '')}", _verl(p), "peer",
                       requires=("verl",)) for p in peers]
        vs.append(Variant(f"steppo_fast[{ops.resolve_backend('group_advantage', torch.device(device))}]", ours))
        out.append(Case(f"{est} (+ broadcast)", size, st, oracle, bytes_moved=moved, variants=vs))
    return out
