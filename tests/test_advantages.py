"""advantages.compute against the fp64 reference composed by hand, on random layouts."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from episodes import make_episodes, packed, step_rows
from steppo_fast import StepLayout, advantages, ops
from steppo_fast import reference as ref
from steppo_fast.testing import assert_close

D = torch.float64


def _batch(seed, n_traj, layout_kind):
    ep = make_episodes(seed, n_traj, max_steps=5, max_tokens=4, group_size=3)
    if layout_kind == "rows":
        mask, traj, step, grp, rew = step_rows(ep, seed)
        lay = StepLayout.from_step_rows(mask, traj, step, grp)
    else:
        sid, grp, k, rew = packed(ep)
        lay = StepLayout.from_packed(sid, grp, num_steps=k)
    vals = torch.randn(lay.token_shape, dtype=D, generator=torch.Generator().manual_seed(seed + 1))
    return lay, rew, vals


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels need a GPU")
BACKENDS = ["reference", "cpp", pytest.param("cuda", marks=GPU)]


def _dev(backend):
    """The device a backend's inputs live on."""
    return torch.device("cuda") if backend == "cuda" else torch.device("cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n_traj=st.integers(1, 20), kind=st.sampled_from(["rows", "packed"]),
       gamma=st.sampled_from([1.0, 0.99, 0.0]), lam=st.sampled_from([1.0, 0.95, 0.0]))
def test_estimators_match_reference(backend, seed, n_traj, kind, gamma, lam):
    lay, rew, vals = _batch(seed, n_traj, kind)
    dev = _dev(backend)
    lay_d, rew_d, vals_d = lay.to(dev), rew.to(dev), vals.to(dev)

    def compute(estimator, _lay, **kw):
        kw = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        return advantages.compute(estimator, lay_d, backend=backend, **kw)

    flat_r, flat_v = rew.reshape(-1), vals.reshape(-1)
    r_s = ref.step_rewards(flat_r, lay.token_step, lay.num_steps)
    v_s = lay.step_values_from_tokens(vals)
    ts = lay.token_step

    out = compute("step_gae", lay, token_rewards=rew, values=vals, gamma=gamma, lam=lam)
    a, r = ref.step_gae(r_s, v_s, lay.traj_step_offsets, gamma, lam)
    assert_close(out.step_advantages, ref.whiten_steps(a))
    assert_close(out.token_advantages.reshape(-1), ref.broadcast_to_tokens(ref.whiten_steps(a), ts))
    assert_close(out.token_returns.reshape(-1), ref.broadcast_to_tokens(r, ts))

    out = compute("token_gae", lay, token_rewards=rew, values=vals, gamma=gamma, lam=lam)
    a, r = ref.token_gae(flat_r, flat_v, lay.step_tokens, lay.step_token_offsets, lay.traj_step_offsets, gamma, lam)
    assert_close(out.token_advantages.reshape(-1), ref.whiten_tokens(a, lay.token_mask), dtype=torch.float32)
    assert_close(out.token_returns.reshape(-1), r)

    scores = ref.trajectory_scores(r_s, lay.step_traj, lay.num_trajectories)
    for est, exp in (("grpo", ref.grpo(scores, lay.traj_group)), ("rloo", ref.rloo(scores, lay.traj_group))):
        out = compute(est, lay, token_rewards=rew)
        assert_close(out.step_advantages, exp[lay.step_traj])
        assert_close(out.token_advantages.reshape(-1), ref.broadcast_to_tokens(exp[lay.step_traj], ts))

    # Token whitening divides by sqrt(var + 1e-8): when all tokens are equal (one trajectory) it
    # amplifies fp64 rounding of the mean up to 1e4 times, so whitened outputs use the fp32 entry.
    out = compute("reinforce_pp_baseline", lay, token_rewards=rew)
    assert_close(out.token_advantages.reshape(-1),
                 ref.reinforce_pp_baseline(scores, lay.traj_group, lay.step_traj, ts), dtype=torch.float32)
    out = compute("reinforce_pp", lay, token_rewards=rew, gamma=gamma)
    assert_close(out.token_advantages.reshape(-1),
                 ref.reinforce_pp(flat_r, lay.step_tokens, lay.step_token_offsets, lay.traj_step_offsets, ts, gamma),
                 dtype=torch.float32)

    keys = torch.randint(0, 3, (lay.num_steps,), generator=torch.Generator().manual_seed(seed))
    for mode in ref.GIGPO_MODES:
        out = compute("gigpo", lay, token_rewards=rew, anchor_keys=keys, gamma=gamma, step_weight=0.5,
                                 gigpo_mode=mode)
        exp = ref.gigpo(r_s, lay.step_traj, lay.traj_step_offsets, lay.traj_group, keys, gamma, 0.5, mode)
        assert_close(out.step_advantages, exp)


def test_step_rewards_given_directly_equal_token_rewards():
    lay, rew, vals = _batch(4, 6, "rows")
    r_s = advantages.step_rewards(lay, rew)
    a = advantages.compute("step_gae", lay, token_rewards=rew, values=vals, gamma=0.9, lam=0.9)
    b = advantages.compute("step_gae", lay, step_rewards=r_s, values=vals, gamma=0.9, lam=0.9)
    assert_close(a.step_advantages, b.step_advantages)


def test_compute_errors():
    lay, rew, vals = _batch(1, 3, "rows")
    with pytest.raises(ValueError, match="unknown estimator 'ppo'; choose one of step_gae, token_gae"):
        advantages.compute("ppo", lay, token_rewards=rew)
    with pytest.raises(ValueError, match="give exactly one of token_rewards"):
        advantages.compute("grpo", lay)
    with pytest.raises(ValueError, match="step_gae needs values"):
        advantages.compute("step_gae", lay, token_rewards=rew)
    with pytest.raises(ValueError, match="values must have shape"):
        advantages.compute("step_gae", lay, token_rewards=rew, values=vals[:, :1])
    with pytest.raises(ValueError, match="step_rewards must have shape"):
        advantages.compute("grpo", lay, step_rewards=torch.zeros(lay.num_steps + 1, dtype=D))
    with pytest.raises(TypeError, match="token_rewards must be a float tensor"):
        advantages.compute("grpo", lay, token_rewards=rew.long())
    with pytest.raises(ValueError, match="gigpo needs anchor_keys"):
        advantages.compute("gigpo", lay, token_rewards=rew)


# ------------------------------------------------------------------ hand-computed cases, every backend
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_gae_hand(backend):
    # One trajectory of 3 steps: r = (0, 0, 1), V = (0.5, 0.25, 0.75), gamma = 0.5, lam = 0.5.
    # delta = (0 + 0.125 - 0.5, 0 + 0.375 - 0.25, 1 - 0.75) = (-0.375, 0.125, 0.25)
    # A_2 = 0.25; A_1 = 0.125 + 0.25 * 0.25 = 0.1875; A_0 = -0.375 + 0.25 * 0.1875 = -0.328125
    dev = _dev(backend)
    r = torch.tensor([0.0, 0.0, 1.0], dtype=D, device=dev)
    v = torch.tensor([0.5, 0.25, 0.75], dtype=D, device=dev)
    off = torch.tensor([0, 3], device=dev)
    a, ret = ops.step_gae(r, v, off, 0.5, 0.5, backend=backend)
    assert_close(a, torch.tensor([-0.328125, 0.1875, 0.25], dtype=D))
    assert_close(ret, a + v)
    # gamma = 0: A_k = r_k - V_k. lam = 0: A_k = delta_k (one-step TD).
    a, _ = ops.step_gae(r, v, off, 0.0, 0.5, backend=backend)
    assert_close(a, r - v)
    a, _ = ops.step_gae(r, v, off, 0.5, 0.0, backend=backend)
    assert_close(a, torch.tensor([-0.375, 0.125, 0.25], dtype=D))
    # One step: A = r - V whatever gamma and lambda.
    a, _ = ops.step_gae(r[:1] + 2, v[:1], torch.tensor([0, 1], device=dev), 0.9, 0.9, backend=backend)
    assert_close(a, torch.tensor([1.5], dtype=D))


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_gae_crosses_steps_hand(backend):
    # Tokens 0, 1 (step 0) and 3 (step 1) of one trajectory; token 2 is not an agent token.
    # r = (0, 0, x, 1), V = 0, gamma = 0.5, lam = 1: A = (0.25, 0.5, 0, 1).
    dev = _dev(backend)
    r = torch.tensor([0.0, 0.0, 7.0, 1.0], dtype=D, device=dev)
    a, ret = ops.token_gae(r, torch.zeros(4, dtype=D, device=dev), torch.tensor([0, 1, 3], device=dev),
                           torch.tensor([0, 2, 3], device=dev), torch.tensor([0, 2], device=dev), 0.5, 1.0,
                           backend=backend)
    assert_close(a, torch.tensor([0.25, 0.5, 0.0, 1.0], dtype=D))
    assert_close(ret, a)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_estimators_hand(backend):
    # Group 0: scores (1, 2, 3): mean 2, unbiased std 1. Group 1: one trajectory (score 5).
    dev = _dev(backend)
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=D, device=dev)
    grp = torch.tensor([0, 0, 0, 1], device=dev)
    eps = 1e-6
    assert_close(ops.group_advantage(scores, grp, backend=backend),
                 torch.tensor([-1 / (1 + eps), 0.0, 1 / (1 + eps), 5 / (1 + eps)], dtype=D))
    # RLOO: (n G - sum) / (n - 1) = (3 - 6, 6 - 6, 9 - 6) / 2; a group of one keeps G.
    assert_close(ops.group_advantage(scores, grp, norm="rloo", backend=backend),
                 torch.tensor([-1.5, 0.0, 1.5, 5.0], dtype=D))
    # All scores equal: std 0, every advantage 0 (no division by zero).
    same = ops.group_advantage(torch.full((4,), 3.0, dtype=D, device=dev), torch.zeros(4, dtype=torch.long,
                                                                                       device=dev), backend=backend)
    assert_close(same, torch.zeros(4, dtype=D))
    # Step groups (GiGPO): same group and anchor key; a step group of one gives 0.
    keys = torch.tensor([7, 7, 9, 7], device=dev)
    got = ops.group_advantage(scores, grp, keys, norm="mean", singleton="zero", backend=backend)
    assert_close(got, torch.tensor([-0.5, 0.5, 0.0, 0.0], dtype=D))
    # Negative and interleaved ids: groups are sets of equal ids, wherever they sit.
    grp2 = torch.tensor([-3, 2**40, -3, 2**40], device=dev)
    got = ops.group_advantage(scores, grp2, norm="mean", backend=backend)
    assert_close(got, torch.tensor([-1.0, -1.5, 1.0, 1.5], dtype=D))


@pytest.mark.parametrize("backend", BACKENDS)
def test_whitening_hand(backend):
    dev = _dev(backend)
    x = torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=D, device=dev)
    mask = torch.tensor([True, True, True, False], device=dev)
    # Masked tokens (1, 2, 3): mean 2, unbiased var 1.
    got = ops.whiten(x, mask, "token", backend=backend)
    assert_close(got, torch.tensor([-1.0, 0.0, 1.0, 0.0], dtype=D) / math.sqrt(1 + 1e-8))
    # Steps (1, 2, 3, 10): mean 4, squared deviations 9 + 4 + 1 + 36 = 50, unbiased std sqrt(50 / 3).
    got = ops.whiten(x, None, "step", backend=backend)
    assert_close(got, (x.cpu() - 4) / (math.sqrt(50.0 / 3.0) + 1e-8))
    # One element: std taken as 0. No element: moments (0, 0, 0) and an empty result.
    assert_close(ops.whiten(x[:1], None, "step", backend=backend), torch.zeros(1, dtype=D))
    assert_close(ops.whiten(x[:0], None, "step", backend=backend), torch.zeros(0, dtype=D))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_reward_stays_in_its_trajectory(backend):
    """A NaN reward makes its trajectory's step_gae advantages NaN (the steps up to it; unwhitened)
    and, for group estimators, its group's; other trajectories and groups are unaffected."""
    lay, rew, vals = _batch(5, 9, "rows")
    dev = _dev(backend)
    lay, rew, vals = lay.to(dev), rew.to(dev), vals.to(dev)
    r_s = advantages.step_rewards(lay, rew).clone()
    j = 4  # a trajectory with at least one step
    last = int(lay.traj_step_offsets[j + 1]) - 1
    r_s[last] = float("nan")
    out = advantages.compute("step_gae", lay, step_rewards=r_s, values=vals, whiten=False, backend=backend)
    bad = lay.step_traj == j
    assert torch.isnan(out.step_advantages[bad]).all()
    assert torch.isfinite(out.step_advantages[~bad]).all()
    out = advantages.compute("grpo", lay, step_rewards=r_s, backend=backend)
    in_group = lay.traj_group[lay.step_traj] == lay.traj_group[j]
    assert torch.isnan(out.step_advantages[in_group]).all()
    assert torch.isfinite(out.step_advantages[~in_group]).all()


def test_cpp_whiten_moments_do_not_depend_on_threads():
    x = torch.randn(100_003, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(torch.ops.steppo_fast.whiten_moments(x, None, "cpp"))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


# ------------------------------------------------------------------ kernel-sized cases
KERNELS = ["cpp", pytest.param("cuda", marks=GPU)]


def _trajectories(gen, n_traj, max_len):
    lens = torch.randint(1, max_len + 1, (n_traj,), generator=gen)
    lens[0] = max_len  # one trajectory of the longest length
    return torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_long_trajectories_and_large_groups(backend, dtype):
    """Trajectories of up to 512 steps and 1500 tokens (many 32-wide tiles of the CUDA scan),
    groups of up to 64 with anchor sub-keys, and every input dtype, against the fp64 reference."""
    gen = torch.Generator().manual_seed(11)
    dev = _dev(backend)
    out_dt = torch.float64 if dtype == torch.float64 else torch.float32

    toff = _trajectories(gen, 24, 512)
    S = int(toff[-1])
    r = torch.randn(S, generator=gen).to(dtype)
    v = torch.randn(S, generator=gen).to(dtype)
    a, ret = ops.step_gae(r.to(dev), v.to(dev), toff.to(dev), 0.99, 0.95, backend=backend)
    ea, er = ref.step_gae(r.double(), v.double(), toff, 0.99, 0.95)
    assert a.dtype == out_dt
    assert_close(a, ea)
    assert_close(ret, er)

    # Token GAE: 6 trajectories of up to 12 steps, up to 300 tokens a step, scattered over a
    # larger token tensor (the rest are not agent tokens and get 0).
    soff_steps = _trajectories(gen, 6, 12)
    n_steps = int(soff_steps[-1])
    per_step = torch.randint(0, 301, (n_steps,), generator=gen)
    soff = torch.cat([torch.zeros(1, dtype=torch.int64), per_step.cumsum(0)])
    n_active = int(soff[-1])
    N = n_active + 777
    tok = torch.randperm(N, generator=gen)[:n_active].sort().values
    tr = torch.randn(N, generator=gen).to(dtype)
    tv = torch.randn(N, generator=gen).to(dtype)
    a, ret = ops.token_gae(tr.to(dev), tv.to(dev), tok.to(dev), soff.to(dev), soff_steps.to(dev), 0.9, 0.8,
                           backend=backend)
    ea, er = ref.token_gae(tr.double(), tv.double(), tok, soff, soff_steps, 0.9, 0.8)
    assert_close(a, ea)
    assert_close(ret, er)

    # Groups of 1-64 trajectories, shuffled, with sub-keys; every norm and singleton rule.
    sizes = torch.randint(1, 65, (40,), generator=gen)
    grp = torch.repeat_interleave(torch.arange(40) * 7 - 100, sizes)
    perm = torch.randperm(grp.numel(), generator=gen)
    grp = grp[perm]
    keys = torch.randint(-2, 2, (grp.numel(),), generator=gen)
    x = (torch.randn(grp.numel(), generator=gen) * 3).to(dtype)
    for subkey in (None, keys):
        _, gid = torch.unique(grp if subkey is None else torch.stack([grp, subkey], 1), dim=0, return_inverse=True)
        for norm in ops.GROUP_NORMS:
            for singleton in ops.SINGLETONS:
                got = ops.group_advantage(x.to(dev), grp.to(dev), None if subkey is None else subkey.to(dev), norm,
                                          singleton, backend=backend)
                assert_close(got, ref.group_normalize(x.double(), gid, norm, singleton, ref.GROUP_EPS),
                             msg=f"{norm}/{singleton}/subkey={subkey is not None}")

    # Whitening over more elements than one block of the CUDA reduction holds.
    y = torch.randn(300_001, generator=gen).to(dtype) + 2
    m = torch.rand(300_001, generator=gen) < 0.7
    assert_close(ops.whiten(y.to(dev), m.to(dev), "token", backend=backend), ref.whiten_tokens(y.double(), m))
    assert_close(ops.whiten(y.to(dev), None, "step", backend=backend), ref.whiten_steps(y.double()))


@pytest.mark.parametrize("backend", KERNELS)
def test_kernels_are_deterministic(backend):
    """The same inputs give the same bits (fixed reduction orders, no float atomics)."""
    gen = torch.Generator().manual_seed(3)
    dev = _dev(backend)
    x = torch.randn(1_000_003, generator=gen).to(dev)
    grp = torch.randint(0, 5000, (x.numel(),), generator=gen).to(dev)
    toff = _trajectories(gen, 20_000, 40).to(dev)
    r = torch.randn(int(toff[-1]), generator=gen).to(dev)
    runs = [(ops.whiten(x, None, "step", backend=backend), ops.group_advantage(x, grp, backend=backend),
             ops.step_gae(r, r * 0.5, toff, 0.99, 0.95, backend=backend)[0]) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)
