"""advantages.compute against the fp64 reference composed by hand, on random layouts."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from episodes import make_episodes, packed, step_rows
from steppo_fast import StepLayout, advantages
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


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n_traj=st.integers(1, 10), kind=st.sampled_from(["rows", "packed"]),
       gamma=st.sampled_from([1.0, 0.99, 0.0]), lam=st.sampled_from([1.0, 0.95, 0.0]))
def test_estimators_match_reference(seed, n_traj, kind, gamma, lam):
    lay, rew, vals = _batch(seed, n_traj, kind)
    flat_r, flat_v = rew.reshape(-1), vals.reshape(-1)
    r_s = ref.step_rewards(flat_r, lay.token_step, lay.num_steps)
    v_s = lay.step_values_from_tokens(vals)
    ts = lay.token_step

    out = advantages.compute("step_gae", lay, token_rewards=rew, values=vals, gamma=gamma, lam=lam)
    a, r = ref.step_gae(r_s, v_s, lay.traj_step_offsets, gamma, lam)
    assert_close(out.step_advantages, ref.whiten_steps(a))
    assert_close(out.token_advantages.reshape(-1), ref.broadcast_to_tokens(ref.whiten_steps(a), ts))
    assert_close(out.token_returns.reshape(-1), ref.broadcast_to_tokens(r, ts))

    out = advantages.compute("token_gae", lay, token_rewards=rew, values=vals, gamma=gamma, lam=lam)
    a, r = ref.token_gae(flat_r, flat_v, lay.step_tokens, lay.step_token_offsets, lay.traj_step_offsets, gamma, lam)
    assert_close(out.token_advantages.reshape(-1), ref.whiten_tokens(a, lay.token_mask), dtype=torch.float32)
    assert_close(out.token_returns.reshape(-1), r)

    scores = ref.trajectory_scores(r_s, lay.step_traj, lay.num_trajectories)
    for est, exp in (("grpo", ref.grpo(scores, lay.traj_group)), ("rloo", ref.rloo(scores, lay.traj_group))):
        out = advantages.compute(est, lay, token_rewards=rew)
        assert_close(out.step_advantages, exp[lay.step_traj])
        assert_close(out.token_advantages.reshape(-1), ref.broadcast_to_tokens(exp[lay.step_traj], ts))

    # Token whitening divides by sqrt(var + 1e-8): when all tokens are equal (one trajectory) it
    # amplifies fp64 rounding of the mean up to 1e4 times, so whitened outputs use the fp32 entry.
    out = advantages.compute("reinforce_pp_baseline", lay, token_rewards=rew)
    assert_close(out.token_advantages.reshape(-1),
                 ref.reinforce_pp_baseline(scores, lay.traj_group, lay.step_traj, ts), dtype=torch.float32)
    out = advantages.compute("reinforce_pp", lay, token_rewards=rew, gamma=gamma)
    assert_close(out.token_advantages.reshape(-1),
                 ref.reinforce_pp(flat_r, lay.step_tokens, lay.step_token_offsets, lay.traj_step_offsets, ts, gamma),
                 dtype=torch.float32)

    keys = torch.randint(0, 3, (lay.num_steps,), generator=torch.Generator().manual_seed(seed))
    for mode in ref.GIGPO_MODES:
        out = advantages.compute("gigpo", lay, token_rewards=rew, anchor_keys=keys, gamma=gamma, step_weight=0.5,
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
