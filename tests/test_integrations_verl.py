"""The verl adapter against verl itself (pip ``verl``, CPU paths): the registered losses equal
verl's ``gspo`` (step ratio) and ``vanilla`` (token ratio, dual clip) losses."""

import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
verl_config = pytest.importorskip("verl.workers.config")

from steppo_fast.integrations import verl as sv  # noqa: E402
from steppo_fast.reference import AGG_MODES  # noqa: E402


def _config(global_batch_info=None, **kw):
    cfg = verl_config.ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1,
                                  clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, **kw)
    if global_batch_info:
        cfg.global_batch_info.update(global_batch_info)
    return cfg


def _batch(seed=0, B=7, T=11):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[3] = False  # an empty row (a step without agent tokens)
    old = -2.0 + 0.5 * torch.randn(B, T, generator=g)
    logp = old + 0.3 * torch.randn(B, T, generator=g)  # ratios well outside the clip range too
    adv = torch.randn(B, T, generator=g)
    weights = 0.5 + torch.rand(B, T, generator=g)
    return old, logp, adv, mask, weights


def _run(fn, old, logp, adv, mask, mode, cfg, weights):
    x = logp.clone().requires_grad_(True)
    loss, metrics = fn(old_log_prob=old, log_prob=x, advantages=adv, response_mask=mask, loss_agg_mode=mode,
                       config=cfg, rollout_is_weights=weights)
    (grad,) = torch.autograd.grad(loss, [x])
    return loss.detach(), grad, metrics


PAIRS = [pytest.param("steppo", "gspo", id="steppo=gspo"), pytest.param("steppo_token", "vanilla", id="token=vanilla")]


@pytest.mark.parametrize("ours,theirs", PAIRS)
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("with_weights", [False, True])
def test_registered_loss_equals_verls(ours, theirs, mode, with_weights):
    old, logp, adv, mask, weights = _batch()
    cfg = _config()
    w = weights if with_weights else None
    a = _run(core_algos.get_policy_loss_fn(ours), old, logp, adv, mask, mode, cfg, w)
    b = _run(core_algos.get_policy_loss_fn(theirs), old, logp, adv, mask, mode, cfg, w)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-6)
    for name in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        assert isinstance(a[2][name], torch.Tensor) and a[2][name].dim() == 0
        assert abs(float(a[2][name]) - float(b[2][name])) <= 1e-6, name


@pytest.mark.parametrize("ours,theirs", PAIRS)
@pytest.mark.parametrize("mode", AGG_MODES)
def test_global_batch_info_is_honoured(ours, theirs, mode):
    old, logp, adv, mask, _ = _batch(seed=1)
    info = {"dp_size": 2, "batch_num_tokens": 123, "global_batch_size": 9, "loss_scale_factor": 16}
    cfg = _config(info)
    a = _run(core_algos.get_policy_loss_fn(ours), old, logp, adv, mask, mode, cfg, None)
    b = _run(core_algos.get_policy_loss_fn(theirs), old, logp, adv, mask, mode, cfg, None)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-6)


def test_registry_returns_ours():
    assert core_algos.get_policy_loss_fn("steppo") is sv.compute_policy_loss_steppo
    assert core_algos.get_policy_loss_fn("steppo_token") is sv.compute_policy_loss_steppo_token


def test_missing_config_is_a_clear_error():
    old, logp, adv, mask, _ = _batch()
    with pytest.raises(ValueError, match="config is required"):
        sv.compute_policy_loss_steppo(old, logp, adv, mask, "token-mean", None)
