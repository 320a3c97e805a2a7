"""Policy / value loss fronts: mask and layout forms, gradients, empty batches, bad options."""

import os

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


# ------------------------------------------------------------------ the C++ kernel
LOSS_OPTIONS = [dict(), dict(dual_clip=3.0), dict(weights=True), dict(entropy=True, entropy_coef=0.01),
                dict(entropy=True, entropy_coef=0.0), dict(ref=True, kl_coef=0.1, kl_type="k1"),
                dict(ref=True, kl_coef=0.1, kl_type="abs"), dict(ref=True, kl_coef=0.2, kl_type="k2"),
                dict(ref=True, kl_coef=0.1, kl_type="low_var_kl"), dict(ref=True, kl_coef=0.0),
                dict(global_num_tokens=50.0, global_num_steps=7.0),
                dict(dual_clip=2.0, weights=True, entropy=True, entropy_coef=0.02, ref=True, kl_coef=0.05)]


def _loss_inputs(dtype, seed=0, n=97, S=13):
    g = torch.Generator().manual_seed(seed)
    ts = torch.randint(-1, S, (n,), generator=g).to(torch.int32)
    ts[ts == 5] = -1  # a step without tokens
    lp = (torch.randn(n, generator=g) * 0.3 - 2).to(dtype)
    old = lp + (torch.randn(n, generator=g) * 0.3).to(dtype)  # ratios beyond the clip range too
    adv = torch.randn(n, generator=g).to(dtype)
    extra = dict(weights=(torch.rand(n, generator=g) + 0.5).to(dtype), entropy=torch.rand(n, generator=g).to(dtype),
                 ref=(lp + 0.4 * torch.randn(n, generator=g)).to(dtype))
    return lp, old, adv, ts, S, extra


_HAS_CUDA = torch.cuda.is_available()
_TRITON_DEVICE = "cuda" if _HAS_CUDA else ("cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None)
KERNELS = [pytest.param(("cpp", "cpu"), id="cpp")]
if _TRITON_DEVICE is not None:
    KERNELS.append(pytest.param(("triton", _TRITON_DEVICE), id="triton"))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("ratio_level", ["step", "token"])
@pytest.mark.parametrize("agg_mode", ref.AGG_MODES)
@pytest.mark.parametrize("opts", LOSS_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_policy_loss_kernels_match_reference(kernel, dtype, ratio_level, agg_mode, opts):
    from steppo_fast import ops

    backend, device = kernel
    lp, old, adv, ts, S, extra = _loss_inputs(dtype)
    opts = dict(opts)
    kw = dict(weights=extra["weights"] if opts.pop("weights", False) else None,
              entropy=extra["entropy"] if opts.pop("entropy", False) else None,
              ref_logp=extra["ref"] if opts.pop("ref", False) else None,
              norm_constant=11.0 if agg_mode == "seq-mean-token-sum-norm" else None, **opts)
    results = {}
    for name in (backend, "reference"):
        dev = device if name == backend else "cpu"
        x = lp.clone().to(dev).requires_grad_(True)
        e = kw["entropy"].clone().to(dev).requires_grad_(True) if kw["entropy"] is not None else None
        kw_dev = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        loss, metrics = ops.policy_loss(x, old.to(dev), adv.to(dev), ts.to(dev), S, ratio_level, agg_mode=agg_mode,
                                        backend=name, **{**kw_dev, "entropy": e})
        grads = torch.autograd.grad(loss, [x] + ([e] if e is not None else []))
        results[name] = (loss, metrics, grads)
    # The fp64 oracle: the reference on float64 inputs.
    x64 = lp.double().requires_grad_(True)
    e64 = kw["entropy"].double().requires_grad_(True) if kw["entropy"] is not None else None
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    loss64, metrics64 = ref.policy_loss(x64, old.double(), adv.double(), ts, S, ratio_level, agg_mode=agg_mode,
                                        **{**kw64, "entropy": e64})
    leaves64 = [x64] + ([e64] if e64 is not None else [])
    grads64 = torch.autograd.grad(loss64, leaves64, allow_unused=True)  # entropy is unused at coefficient 0
    grads64 = [torch.zeros_like(t) if g is None else g for g, t in zip(grads64, leaves64)]
    loss, metrics, grads = results[backend]
    assert loss.dtype == dtype and grads[0].dtype == dtype
    assert_close(loss, loss64, dtype)
    for name, value in metrics.items():
        assert_close(value, metrics64[name], dtype, name)
    for g, g64 in zip(grads, grads64):
        assert_close(g, g64, dtype)
    if dtype == torch.float64:  # and the reference on the same inputs, tightly
        assert_close(loss, results["reference"][0])


@pytest.mark.parametrize("kernel", KERNELS)
def test_policy_loss_kernel_edge_cases(kernel):
    from steppo_fast import ops

    backend, device = kernel
    lp = torch.randn(6, device=device, requires_grad=True)
    none = torch.full((6,), -1, dtype=torch.int32, device=device)
    ones = torch.ones(6, device=device)
    loss, metrics = ops.policy_loss(lp, lp.detach(), ones, none, 3, "step", backend=backend)
    (g,) = torch.autograd.grad(loss, [lp])
    assert float(loss) == 0.0 and bool((g == 0).all()) and all(float(v) == 0.0 for v in metrics.values())
    with pytest.raises(ValueError, match="norm_constant"):
        ops.policy_loss(lp, lp.detach(), ones, none, 3, "step", agg_mode="seq-mean-token-sum-norm", backend=backend)
    # The same bits on every run (no float atomics), over several programs' worth of tokens.
    lp, old, adv, ts, S, _ = _loss_inputs(torch.float32, seed=4, n=5000, S=300)
    runs = [ops.policy_loss(lp.to(device).requires_grad_(True), old.to(device), adv.to(device), ts.to(device), S,
                            "step", backend=backend)[0] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


NAN_KERNELS = [pytest.param("cpp", id="cpp")]
if _TRITON_DEVICE is not None:
    NAN_KERNELS.append(pytest.param("triton", id="triton"))


@pytest.mark.parametrize("kernel", NAN_KERNELS)
@pytest.mark.parametrize("ratio_level", ["step", "token"])
@pytest.mark.parametrize("agg_mode", ["seq-mean-token-mean", "token-mean"])
@pytest.mark.parametrize("where", ["old_logp", "advantages", "ref_logp"])
def test_policy_loss_nan_propagates_like_the_reference(kernel, ratio_level, agg_mode, where):
    """One NaN input gives NaN exactly where the reference has it: the loss, the metrics it enters
    (ratio_max / ratio_min included) and the gradient of its step (step ratio) or token."""
    from steppo_fast import ops

    device = "cpu" if kernel == "cpp" else _TRITON_DEVICE
    lp, old, adv, ts, S, extra = _loss_inputs(torch.float32, seed=3)
    rl = extra["ref"]
    t = int(torch.nonzero(ts >= 0)[3, 0])  # an agent token
    {"old_logp": old, "advantages": adv, "ref_logp": rl}[where][t] = float("nan")
    opts = dict(ref_logp=rl, kl_coef=0.1, kl_type="k3", agg_mode=agg_mode)
    out = {}
    for name, dev in ((kernel, device), ("reference", "cpu")):
        x = lp.clone().to(dev).requires_grad_(True)
        loss, metrics = ops.policy_loss(x, old.to(dev), adv.to(dev), ts.to(dev), S, ratio_level, backend=name,
                                        **{**opts, "ref_logp": rl.to(dev)})
        (g,) = torch.autograd.grad(loss, [x])
        out[name] = (loss.cpu(), {k: v.cpu() for k, v in metrics.items()}, g.cpu())
    loss, metrics, g = out[kernel]
    loss_r, metrics_r, g_r = out["reference"]
    assert torch.isnan(loss_r) and torch.isnan(loss)
    for k in metrics_r:
        assert bool(torch.isnan(metrics[k])) == bool(torch.isnan(metrics_r[k])), k
    assert torch.equal(torch.isnan(g), torch.isnan(g_r))
    assert bool(torch.isnan(g_r).any())
    if ratio_level == "step" and where == "old_logp":  # the whole step's gradient
        assert bool(torch.isnan(g[ts == ts[t]]).all())
    assert_close(torch.nan_to_num(g), torch.nan_to_num(g_r))


TRITON_KERNEL = [k for k in KERNELS if k.values[0][0] == "triton"]


@pytest.mark.skipif(not TRITON_KERNEL, reason="needs Triton (a GPU or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("ratio_level", ["step", "token"])
@pytest.mark.parametrize("where", ["old_logp", "logp", "ref_logp"])
def test_triton_policy_loss_propagates_nan_like_the_reference(ratio_level, where):
    # One NaN input: the loss, the ratio metrics and the gradients of the affected tokens are NaN as
    # in the reference, never a finite loss with the NaN clamped into ratio = exp(10).
    from steppo_fast import ops

    (_, device), = TRITON_KERNEL[0].values
    lp, old, adv, ts, S, extra = _loss_inputs(torch.float64, seed=5)
    t = int((ts >= 0).nonzero()[3])
    inputs = dict(logp=lp.clone(), old_logp=old.clone(), ref_logp=extra["ref"].clone())
    inputs[where][t] = float("nan")
    kw = dict(dual_clip=3.0, weights=extra["weights"], entropy=extra["entropy"], entropy_coef=0.01, kl_coef=0.1,
              kl_type="k3" if where != "ref_logp" else "abs")
    results = {}
    for name, dev in (("triton", device), ("reference", "cpu")):
        x = inputs["logp"].to(dev).requires_grad_(True)
        loss, metrics = ops.policy_loss(x, inputs["old_logp"].to(dev), adv.to(dev), ts.to(dev), S, ratio_level,
                                        ref_logp=inputs["ref_logp"].to(dev),
                                        **{k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()},
                                        backend=name)
        (g,) = torch.autograd.grad(loss, [x])
        results[name] = (loss, metrics, g)
    loss, metrics, g = results["triton"]
    want_loss, want_metrics, want_g = results["reference"]
    assert torch.isnan(want_loss) and torch.isnan(loss)
    for k in metrics:
        assert_close(metrics[k], want_metrics[k], torch.float64, k)
    assert_close(g, want_g, torch.float64, "grad")  # NaN exactly where the reference has NaN


@pytest.mark.skipif(not TRITON_KERNEL, reason="needs Triton (a GPU or TRITON_INTERPRET=1)")
def test_triton_policy_loss_step_ids_past_the_count_give_nan():
    # Unvalidated step ids >= num_steps read nothing out of bounds: the loss is NaN.
    from steppo_fast import ops

    (_, device), = TRITON_KERNEL[0].values
    lp, old, adv, ts, S, _ = _loss_inputs(torch.float32, seed=6)
    ts = ts.clone()
    ts[ts == S - 1] = S + 5
    loss, metrics = ops.policy_loss(lp.to(device), old.to(device), adv.to(device), ts.to(device), S, "step",
                                    backend="triton")
    assert torch.isnan(loss) and torch.isnan(metrics["ratio_max"])
