"""Data-parallel whitening: two processes on the gloo backend whiten with the global statistics.

Each rank holds its own part of the batch; with ``process_group`` one float64 all-reduce of
(count, sum, sum of squares) makes every rank's result equal to whitening the concatenated
batch (SPEC 4 step whitening, SPEC 5 token whitening), which is the fp64 oracle here.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from steppo_fast import advantages, ops
from steppo_fast import reference as ref
from steppo_fast.testing import assert_close

from episodes import make_episodes, step_rows

WORLD = 2


def _rank_batch(rank: int):
    """Rank r's step-rows batch: different sizes on the two ranks."""
    ep = make_episodes(seed=10 + rank, n_traj=4 + 3 * rank, max_steps=4, max_tokens=5, group_size=2)
    return step_rows(ep, seed=rank)


def _worker(rank: int, init_file: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(rank)
        x = torch.randn(17 + 6 * rank, dtype=torch.float64)
        mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(rank)) < 0.7
        res = {
            "x": x,
            "mask": mask,
            "step": ops.whiten(x, None, "step", process_group=True),
            "token": ops.whiten(x, mask, "token", process_group=True),
        }
        from steppo_fast import StepLayout

        m, traj, step, grp, rew = _rank_batch(rank)
        lay = StepLayout.from_step_rows(m, traj, step, grp)
        vals = torch.randn(m.shape, dtype=torch.float64)
        res["gae_local"] = advantages.compute("step_gae", lay, token_rewards=rew, values=vals, gamma=0.9, lam=0.8,
                                              whiten=False)
        res["gae_dp"] = advantages.compute("step_gae", lay, token_rewards=rew, values=vals, gamma=0.9, lam=0.8,
                                           whiten=True, process_group=dist.group.WORLD)
        torch.save({k: (v if isinstance(v, torch.Tensor) else (v.step_advantages, v.token_advantages))
                    for k, v in res.items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("dp")
    mp.spawn(_worker, args=(str(d / "init"), str(d)), nprocs=WORLD, join=True)
    return [torch.load(d / f"rank{r}.pt") for r in range(WORLD)]


def test_step_whitening_uses_global_statistics(results):
    x_all = torch.cat([r["x"] for r in results])
    expect = ref.whiten_steps(x_all)
    got = torch.cat([r["step"] for r in results])
    assert_close(got, expect)


def test_token_whitening_uses_global_statistics(results):
    x_all = torch.cat([r["x"] for r in results])
    m_all = torch.cat([r["mask"] for r in results])
    expect = ref.whiten_tokens(x_all, m_all)
    got = torch.cat([r["token"] for r in results])
    assert_close(got, expect)
    assert torch.count_nonzero(got[~m_all]) == 0


def test_step_gae_whitened_across_ranks(results):
    # Local unwhitened step advantages of both ranks, whitened together, equal each rank's DP result.
    local = torch.cat([r["gae_local"][0] for r in results])
    expect = ref.whiten_steps(local)
    got = torch.cat([r["gae_dp"][0] for r in results])
    assert_close(got, expect)
    # The two ranks really differ in size and the result differs from whitening each rank alone.
    sizes = [r["gae_local"][0].numel() for r in results]
    assert sizes[0] != sizes[1]
    alone = ref.whiten_steps(results[0]["gae_local"][0])
    assert not torch.allclose(alone, results[0]["gae_dp"][0])
