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


# ------------------------------------------------------------------ StepPOLoss
def _module_batch(B=5, T=7, V=29, H=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) < 0.7
    lay = StepLayout.from_step_rows(mask, torch.tensor([0, 0, 1, 1, 1])[:B], torch.tensor([0, 1, 0, 1, 2])[:B])
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.4
    labels = torch.randint(0, V, (B, T), generator=g)
    old = -3.0 + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    return lay, mask, hidden, weight, labels, old, adv


def _module_reference(lay, hidden, weight, labels, old, adv, cfg, tau):
    """fp64: materialised logits, reference log-probs and loss, autograd to the logits and hidden."""
    h = hidden.double().requires_grad_(True)
    w = weight.double().requires_grad_(True)
    z = (h @ w.t()).detach().requires_grad_(True)
    B, T, V = z.shape
    logp, ent = ref.token_logprobs(z.reshape(-1, V), labels.reshape(-1), lay.token_mask, tau)
    loss, _ = ref.policy_loss(logp, old.reshape(-1).double(), adv.reshape(-1).double(), lay.token_step,
                              lay.num_steps, cfg.ratio_level, cfg.clip_low, cfg.clip_high, cfg.dual_clip,
                              cfg.agg_mode, entropy=ent, entropy_coef=cfg.entropy_coef)
    (gz,) = torch.autograd.grad(loss, [z])
    gh, gw = torch.autograd.grad((h @ w.t() * gz).sum(), [h, w])
    return loss, gz, gh, gw


@pytest.mark.parametrize("config", [None, "ppo", {"ratio_level": "step", "entropy_coef": 0.01, "clip_high": 0.28}])
def test_steppo_loss_module_logits_and_hidden_match_reference(config):
    lay, mask, hidden, weight, labels, old, adv = _module_batch()
    module = losses.StepPOLoss(config, temperature=0.8)
    want, gz, gh, gw = _module_reference(lay, hidden, weight, labels, old, adv, module.config, 0.8)
    z = (hidden @ weight.t()).requires_grad_(True)
    loss, metrics = module(z, labels, lay, old, adv)
    (g,) = torch.autograd.grad(loss, [z])
    assert_close(loss, want, torch.float32)
    assert_close(g, gz, torch.float32)
    assert set(metrics) >= {"pg_clipfrac", "ppo_kl", "entropy", "ratio_mean"}
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss2, _ = module(h, labels, lay, old, adv, weight=w)
    g2 = torch.autograd.grad(loss2, [h, w])
    assert_close(loss2, want, torch.float32)
    for got, exp in zip(g2, (gh, gw)):
        torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-6)
    # A mask whose rows are steps is the same batch as this layout's (each row one step).
    rows = StepLayout.from_step_rows(mask, torch.arange(5), torch.zeros(5, dtype=torch.long))
    l_mask, _ = module(z, labels, mask, old, adv)
    l_rows, _ = module(z, labels, rows, old, adv)
    assert_close(l_mask, l_rows.double(), torch.float32)


def test_steppo_loss_module_all_masked_gives_zero():
    lay, mask, hidden, weight, labels, old, adv = _module_batch()
    empty = torch.zeros_like(mask)
    module = losses.StepPOLoss()
    z = (hidden @ weight.t()).requires_grad_(True)
    loss, metrics = module(z, labels, empty, old, adv)
    (g,) = torch.autograd.grad(loss, [z])
    assert float(loss) == 0.0 and bool((g == 0).all())
    assert all(not torch.isnan(v) for v in metrics.values())


def test_steppo_loss_module_bad_options():
    with pytest.raises(ValueError, match="clip_low"):
        losses.StepPOLoss({"clip_low": 0.0})
    with pytest.raises(ValueError, match="agg_mode"):
        losses.StepPOLoss({"agg_mode": "seq-mean"})
    with pytest.raises(ValueError, match="kl_type"):
        losses.StepPOLoss({"kl_type": "k4"})
    with pytest.raises(ValueError, match="preset"):
        losses.StepPOLoss("grpo")
    with pytest.raises(ValueError, match="temperature"):
        losses.StepPOLoss(temperature=0)
