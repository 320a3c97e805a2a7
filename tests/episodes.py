"""Random agent episodes rendered in both input layouts, for tests and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np
import torch


@dataclass
class Episodes:
    steps_per_traj: List[int]  # K of each trajectory
    tokens: List[List[int]]  # agent tokens of each step, per trajectory
    group: List[int]  # group of each trajectory
    rewards: List[List[np.ndarray]]  # token rewards of each step

    @property
    def num_trajectories(self) -> int:
        return len(self.steps_per_traj)


def make_episodes(seed: int, n_traj: int, max_steps: int = 5, max_tokens: int = 4, group_size: int = 2,
                  allow_empty_steps: bool = True) -> Episodes:
    rng = np.random.default_rng(seed)
    ks = [int(rng.integers(1, max_steps + 1)) for _ in range(n_traj)]
    lo = 0 if allow_empty_steps else 1
    toks = [[int(rng.integers(lo, max_tokens + 1)) for _ in range(k)] for k in ks]
    group = [r // group_size for r in range(n_traj)]
    rew = [[rng.standard_normal(n) for n in row] for row in toks]
    return Episodes(ks, toks, group, rew)


def step_rows(ep: Episodes, seed: int = 0, shuffle: bool = True):
    """(response_mask (B, T), trajectory_id, step_index, group_id, token_rewards (B, T)) in float64."""
    rows = [(r, k) for r in range(ep.num_trajectories) for k in range(ep.steps_per_traj[r])]
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(rows))
        rows = [rows[i] for i in order]
    T = max(1, max(max(t) if t else 0 for t in ep.tokens)) + 1  # one padding column at least
    B = len(rows)
    mask = torch.zeros(B, T, dtype=torch.bool)
    rew = torch.zeros(B, T, dtype=torch.float64)
    for i, (r, k) in enumerate(rows):
        n = ep.tokens[r][k]
        mask[i, :n] = True
        rew[i, :n] = torch.from_numpy(ep.rewards[r][k])
    traj = torch.tensor([r for r, _ in rows])
    step = torch.tensor([k for _, k in rows])
    grp = torch.tensor([ep.group[r] for r, _ in rows])
    return mask, traj, step, grp, rew


def packed(ep: Episodes, prompt: int = 2, obs: int = 1):
    """(step_ids (B, T), group_id (B,), num_steps (B,), token_rewards (B, T)) in float64."""
    lens = [prompt + sum(n + obs for n in row) for row in ep.tokens]
    T = max(lens) + 1
    B = ep.num_trajectories
    sid = torch.full((B, T), -1, dtype=torch.int64)
    rew = torch.zeros(B, T, dtype=torch.float64)
    for r, row in enumerate(ep.tokens):
        t = prompt
        for k, n in enumerate(row):
            sid[r, t:t + n] = k
            rew[r, t:t + n] = torch.from_numpy(ep.rewards[r][k])
            t += n + obs
    return sid, torch.tensor(ep.group), torch.tensor(ep.steps_per_traj), rew
