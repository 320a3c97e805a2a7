"""Policy / value loss fronts: mask and layout forms, gradients, empty batches, bad options."""

import pytest
import torch

from steppo_fast import StepLayout, losses
from steppo_fast import reference as ref
from steppo_fast.testing import assert_close

D = torch.float64


def _inputs(B=4, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(B, T, dtype=D, generator=g) * 0.2).requires_grad_()
    old = lp.detach() + torch.randn(B, T, dtype=D, generator=g) * 0.2
    adv = torch.randn(B, T, dtype=D, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    return lp, old, adv, mask


@pytest.mark.parametrize("ratio_level", ["step", "token"])
@pytest.mark.parametrize("agg_mode", ref.AGG_MODES)
def test_mask_rows_are_steps_like_a_layout(ratio_level, agg_mode):
    lp, old, adv, mask = _inputs()
    B = mask.shape[0]
    lay = StepLayout.from_step_rows(mask, torch.arange(B), torch.zeros(B, dtype=torch.long))
    l1, m1 = losses.policy_loss(lp, old, adv, mask, ratio_level=ratio_level, agg_mode=agg_mode)
    (g1,) = torch.autograd.grad(l1, [lp])
    l2, m2 = losses.policy_loss(lp, old, adv, lay, ratio_level=ratio_level, agg_mode=agg_mode)
    (g2,) = torch.autograd.grad(l2, [lp])
    assert_close(l1, l2)
    assert_close(g1, g2)
    # ... and the reference on the same inputs, with autograd.
    ts = torch.where(mask, torch.arange(B)[:, None], -1).reshape(-1)
    l3, _ = ref.policy_loss(lp.reshape(-1), old.reshape(-1), adv.reshape(-1), ts, B, ratio_level,
                            agg_mode=agg_mode, norm_constant=mask.shape[1])
    (g3,) = torch.autograd.grad(l3, [lp])
    assert_close(l1, l3)
    assert_close(g1, g3)


def test_all_masked_gives_zero_loss_and_gradients():
    lp, old, adv, mask = _inputs()
    mask = torch.zeros_like(mask)
    for rl in ("step", "token"):
        for agg in ref.AGG_MODES:
            loss, met = losses.policy_loss(lp, old, adv, mask, ratio_level=rl, agg_mode=agg)
            (g,) = torch.autograd.grad(loss, [lp])
            assert loss.item() == 0.0 and torch.count_nonzero(g) == 0
            assert all(torch.isfinite(v) for v in met.values())


def test_bad_options_raise_clear_errors():
    lp, old, adv, mask = _inputs()
    with pytest.raises(ValueError, match="clip_low must be > 0"):
        losses.policy_loss(lp, old, adv, mask, clip_low=0.0)
    with pytest.raises(ValueError, match="clip_high must be > 0"):
        losses.policy_loss(lp, old, adv, mask, clip_high=-0.1)
    with pytest.raises(ValueError, match="agg_mode must be one of"):
        losses.policy_loss(lp, old, adv, mask, agg_mode="mean")
    with pytest.raises(ValueError, match="kl_type must be one of"):
        losses.policy_loss(lp, old, adv, mask, kl_type="k4")
    with pytest.raises(ValueError, match="ratio_level must be one of"):
        losses.policy_loss(lp, old, adv, mask, ratio_level="sequence")
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        losses.policy_loss(lp, old, adv, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="old_logp must have the shape of logp"):
        losses.policy_loss(lp, old[:, :2], adv, mask)
    with pytest.raises(ValueError, match="mask must have the shape of logp"):
        losses.policy_loss(lp, old, adv, mask[:, :2])
    with pytest.raises(ValueError, match="clip must be > 0"):
        losses.value_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), clip=0)


def test_value_loss_front_gradient_matches_reference():
    v = torch.randn(9, dtype=D, requires_grad=True)
    vo, ret = v.detach() + torch.randn(9, dtype=D), torch.randn(9, dtype=D)
    m = torch.rand(9) > 0.3
    l1, c1 = losses.value_loss(v, vo, ret, m, clip=0.2)
    (g1,) = torch.autograd.grad(l1, [v])
    l2, c2 = ref.value_loss(v, vo, ret, 0.2, m)
    (g2,) = torch.autograd.grad(l2, [v])
    assert_close(l1, l2)
    assert_close(c1, c2)
    assert_close(g1, g2)
