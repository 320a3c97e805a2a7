"""Fused linear head (SPEC 2 from hidden states, SPEC 7 fused loss) against the fp64 reference
with materialised logits: values and every gradient, chunking, bad input.

The epilogue runs on the C++ kernels, and on the Triton kernels under TRITON_INTERPRET=1
(or on a GPU where there is one).
"""

import os

import numpy as np
import pytest
import torch

import steppo_fast as sf
from episodes import make_episodes, step_rows
from steppo_fast import StepLayout, linear_head, losses
from steppo_fast import reference as ref
from steppo_fast.testing import assert_close, assert_no_worse_than_torch

HAS_CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if HAS_CUDA else ("cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None)
BACKENDS = [pytest.param(("cpp", "cpu"), id="cpp")]
if TRITON_DEVICE is not None:
    BACKENDS.append(pytest.param(("triton", TRITON_DEVICE), id="triton"))


@pytest.fixture(autouse=True)
def _quiet_interpreter():
    # The interpreter evaluates both sides of tl.where in numpy; the discarded side may warn.
    with np.errstate(all="ignore"):
        yield


def _head(n, h, v, seed=0, bias=True, dtype=torch.float32, scale=0.4):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * scale).to(dtype)
    b = (torch.randn(v, generator=gen) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, b, labels


def _leaves(*ts, device="cpu"):
    return [None if t is None else t.detach().clone().to(device).requires_grad_(True) for t in ts]


def _ref_primitive(hidden, weight, bias, labels, mask, tau, gl, ge, fp64=True):
    """The reference with materialised logits, values and autograd gradients: in fp64 (the oracle)
    or in the inputs' dtype (PyTorch's own same-dtype error, the yardstick for gradients)."""
    h, w, b = _leaves(*(ref.to_fp64(hidden, weight, bias) if fp64 else (hidden, weight, bias)))
    logp, ent = ref.linear_token_logprobs(h, w, labels, mask, tau, b)
    params = [t for t in (h, w, b) if t is not None]
    grads = torch.autograd.grad((logp * gl.to(logp.dtype) + ent * ge.to(logp.dtype)).sum(), params)
    return logp, ent, grads


def _check_grads(got, want64, want_torch, names=("hidden", "weight", "bias")):
    """Gradients sum products over tokens: held to the fp64 reference within twice PyTorch's own
    fp32 error (SPEC 9, flash-attention's rule), and to the fp32 tolerance where that is wider."""
    for name, g, r, t in zip(names, got, want64, want_torch):
        assert g.dtype == t.dtype and g.shape == r.shape, name
        assert_no_worse_than_torch(g.cpu(), t, r, atol=1e-6, msg=f"grad {name}")


# ------------------------------------------------------------------ chunk planning
def test_plan_chunks_fixed_and_by_steps():
    assert linear_head.plan_chunks(10, 4) == ([0, 4, 8, 10], [0, 0, 0])
    assert linear_head.plan_chunks(0, 4) == ([0], [])
    # Steps of 2, 3, 1, 6 and 2 tokens with chunk 4: [2], [3 + 1], the 6 split 4 + 2, [2].
    offs = [0, 2, 5, 6, 12, 14]
    bounds, split = linear_head.plan_chunks(14, 4, offs)
    assert bounds == [0, 2, 6, 10, 12, 14]
    assert split == [0, 0, 4, 4, 0]
    # Empty steps are legal and fall inside chunks.
    assert linear_head.plan_chunks(3, 8, [0, 0, 2, 2, 3]) == ([0, 3], [0])
    with pytest.raises(ValueError, match="chunk"):
        linear_head.plan_chunks(3, 0)


def test_plan_chunks_never_splits_a_step_that_fits():
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        sizes = torch.randint(0, 9, (30,), generator=gen).tolist()
        offs = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        chunk = int(torch.randint(1, 12, (1,), generator=gen))
        bounds, split = linear_head.plan_chunks(offs[-1], chunk, offs)
        assert bounds[0] == 0 and bounds[-1] == offs[-1] and all(a < b for a, b in zip(bounds, bounds[1:]))
        for k, (b0, b1) in enumerate(zip(bounds, bounds[1:])):
            if split[k] == 0:
                assert b1 - b0 <= chunk
                assert b0 in offs and b1 in offs, "a one-pass chunk must hold whole steps"
            else:
                s = split[k] - 1
                assert offs[s] <= b0 < b1 <= offs[s + 1] and offs[s + 1] - offs[s] > chunk


# ------------------------------------------------------------------ the primitive
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["odd", "one_token", "all_masked", "no_bias_all_tokens", "temperature"])
def test_primitive_values_and_grads(backend, case):
    kind, device = backend
    n, v = {"odd": (29, 37), "one_token": (1, 37), "all_masked": (9, 37), "no_bias_all_tokens": (17, 50),
            "temperature": (23, 41)}[case]
    hidden, weight, bias, labels = _head(n, 48, v, seed=1, bias=case != "no_bias_all_tokens")
    gen = torch.Generator().manual_seed(2)
    mask = torch.rand(n, generator=gen) < 0.7
    if case == "all_masked":
        mask[:] = False
    if case in ("one_token", "no_bias_all_tokens"):
        mask[:] = True
    labels = torch.where(mask, labels, torch.full_like(labels, -100))
    tau = 0.7 if case == "temperature" else 1.0
    gl, ge = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    want_lp, want_ent, want_grads = _ref_primitive(hidden, weight, bias, labels, mask, tau, gl, ge)
    h, w, b = _leaves(hidden, weight, bias, device=device)
    arg = None if case == "no_bias_all_tokens" else mask.to(device)
    logp, ent = sf.linear_token_logprobs(h, w, labels.to(device), arg, tau, b, chunk=5, backend=kind)
    assert logp.dtype == torch.float32 and logp.shape == (n,)
    assert_close(logp, want_lp, torch.float32, "logp")
    assert_close(ent, want_ent, torch.float32, "entropy")
    params = [t for t in (h, w, b) if t is not None]
    grads = torch.autograd.grad((logp * gl.to(device) + ent * ge.to(device)).sum(), params)
    _, _, torch_grads = _ref_primitive(hidden, weight, bias, labels, mask, tau, gl, ge, fp64=False)
    _check_grads(grads, want_grads, torch_grads)
    if case == "all_masked":
        assert all(bool((g == 0).all()) for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_primitive_chunk_size_changes_nothing_beyond_rounding(backend):
    kind, device = backend
    hidden, weight, bias, labels = _head(40, 24, 33, seed=4)
    mask = torch.rand(40, generator=torch.Generator().manual_seed(5)) < 0.8
    outs = []
    for chunk in (1, 3, 16, 1000):
        h, w, b = _leaves(hidden, weight, bias, device=device)
        logp, ent = sf.linear_token_logprobs(h, w, labels.to(device), mask.to(device), 1.0, b, chunk=chunk,
                                             backend=kind)
        grads = torch.autograd.grad((logp - 0.3 * ent).sum(), [h, w, b])
        outs.append((logp, ent) + grads)
    for other in outs[1:]:
        for a, e in zip(other, outs[0]):
            assert_close(a, e, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_primitive_layout_mask_and_shapes_agree(backend):
    kind, device = backend
    ep = make_episodes(7, 5, max_steps=3, max_tokens=4, group_size=1)
    mask, traj, step, grp, _ = step_rows(ep, 7)
    lay = StepLayout.from_step_rows(mask, traj, step, grp).to(device)
    B, T = mask.shape
    hidden, weight, _, labels = _head(B * T, 16, 21, seed=8, bias=False)
    hidden3, labels2 = hidden.reshape(B, T, 16).to(device), labels.reshape(B, T).to(device)
    w = weight.to(device)
    a = sf.linear_token_logprobs(hidden3, w, labels2, lay, backend=kind)
    b = sf.linear_token_logprobs(hidden3, w, labels2, mask.to(device), backend=kind)
    want = ref.linear_token_logprobs(hidden.double(), weight.double(), labels, mask.reshape(-1))
    for got, alt, exp in zip(a, b, want):
        assert got.shape == (B, T)
        assert torch.equal(got, alt)
        assert_close(got.reshape(-1), exp, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_primitive_frozen_weight_gets_no_gradient(backend):
    kind, device = backend
    hidden, weight, _, labels = _head(12, 8, 19, seed=9, bias=False)
    h = hidden.clone().to(device).requires_grad_(True)
    logp, ent = sf.linear_token_logprobs(h, weight.to(device), labels.to(device), chunk=5, backend=kind)
    (gh,) = torch.autograd.grad(logp.sum(), [h])
    want = []
    for fp64 in (True, False):
        hr, wr = _leaves(*(ref.to_fp64(hidden, weight) if fp64 else (hidden, weight)))
        lr, _ = ref.linear_token_logprobs(hr, wr.detach(), labels)
        want.append(torch.autograd.grad(lr.sum(), [hr]))
    _check_grads((gh,), *want)


def test_primitive_bf16_no_worse_than_torch():
    hidden, weight, bias, labels = _head(24, 32, 45, seed=10, bias=True, dtype=torch.bfloat16, scale=0.3)
    gl = torch.randn(24, generator=torch.Generator().manual_seed(11))
    h, w, b = _leaves(hidden, weight, bias)
    logp, ent = sf.linear_token_logprobs(h, w, labels, None, 1.0, b, chunk=7)
    got = torch.autograd.grad((logp * gl).sum(), [h, w, b])
    # PyTorch in the same dtype: a bf16 product, then fp32 log-softmax.
    ht, wt, bt = _leaves(hidden, weight, bias)
    zt = torch.addmm(bt, ht, wt.t()).float()
    lt = torch.log_softmax(zt, -1).gather(1, labels[:, None]).squeeze(1)
    torch_grads = torch.autograd.grad((lt * gl).sum(), [ht, wt, bt])
    lr, _, ref_grads = _ref_primitive(hidden, weight, bias, labels, None, 1.0, gl, torch.zeros(24))
    assert_no_worse_than_torch(logp, lt, lr, atol=1e-6, msg="logp")
    for name, g, t, r in zip(("hidden", "weight", "bias"), got, torch_grads, ref_grads):
        assert g.dtype == torch.bfloat16
        assert_no_worse_than_torch(g.float(), t.float(), r, atol=1e-3, msg=f"grad {name}")


def test_linear_cross_entropy_matches_verls_signature():
    hidden, weight, _, labels = _head(10, 8, 15, seed=12, bias=False)
    logp, ent = sf.linear_cross_entropy(hidden, weight, labels, 0.8, "none")
    want_lp, want_ent = ref.linear_token_logprobs(hidden.double(), weight.double(), labels, None, 0.8)
    assert_close(logp, want_lp, torch.float32)
    assert_close(ent, want_ent, torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        sf.linear_cross_entropy(hidden, weight, labels, 1.0, "mean")


def test_linear_cross_entropy_equals_verls_fused_linear_for_ppo():
    verl_tf = pytest.importorskip("verl.utils.experimental.torch_functional")
    hidden, weight, _, labels = _head(16, 12, 29, seed=13, bias=False)
    h1, w1 = _leaves(hidden, weight)
    lp1, en1 = verl_tf.FusedLinearForPPO(chunk_size=5)(h1, w1, labels, 0.9)
    g1 = torch.autograd.grad((lp1 + 0.1 * en1).sum(), [h1, w1])
    h2, w2 = _leaves(hidden, weight)
    lp2, en2 = sf.linear_cross_entropy(h2, w2, labels, 0.9)
    g2 = torch.autograd.grad((lp2 + 0.1 * en2).sum(), [h2, w2])
    for a, b in zip((lp2, en2) + g2, (lp1, en1) + g1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the fused loss
def _loss_batch(seed=0, h=48, v=37, max_tokens=6):
    ep = make_episodes(seed, 6, max_steps=4, max_tokens=max_tokens, group_size=3)
    mask, traj, step, grp, _ = step_rows(ep, seed)
    lay = StepLayout.from_step_rows(mask, traj, step, grp)
    B, T = mask.shape
    gen = torch.Generator().manual_seed(seed + 100)
    hidden, weight, bias, labels = _head(B * T, h, v, seed=seed + 1)
    labels = labels.reshape(B, T)
    old = -3.0 + 0.3 * torch.randn(B, T, generator=gen)
    adv = torch.randn(B, T, generator=gen)
    extra = dict(weights=torch.rand(B, T, generator=gen) + 0.5, ref_logp=old + 0.2 * torch.randn(B, T, generator=gen))
    return lay, hidden.reshape(B, T, h), weight, bias, labels, old, adv, extra


def _ref_loss(lay, hidden, weight, bias, labels, old, adv, cfg, extra, tau, fp64=True):
    """The unfused composition: materialised logits, policy loss, autograd; in fp64 or fp32."""
    h, w, b = _leaves(*(ref.to_fp64(hidden, weight, bias) if fp64 else (hidden, weight, bias)))
    dt = h.dtype
    B, T, H = hidden.shape
    z = ref.linear_logits(h.reshape(-1, H), w, b)
    logp, ent = ref.token_logprobs(z, labels.reshape(-1), lay.token_mask, tau)
    loss, metrics = ref.policy_loss(
        logp, old.reshape(-1).to(dt), adv.reshape(-1).to(dt), lay.token_step, lay.num_steps, cfg.ratio_level,
        cfg.clip_low, cfg.clip_high, cfg.dual_clip, cfg.agg_mode,
        None if extra.get("weights") is None else extra["weights"].reshape(-1).to(dt), ent, cfg.entropy_coef,
        None if extra.get("ref_logp") is None else extra["ref_logp"].reshape(-1).to(dt), cfg.kl_coef, cfg.kl_type,
        norm_constant=float(T) if cfg.agg_mode == "seq-mean-token-sum-norm" else None)
    grads = torch.autograd.grad(loss, [t for t in (h, w, b) if t is not None])
    return loss, metrics, grads


LOSS_CASES = [pytest.param(dict(ratio_level=r, agg_mode=a), id=f"{r}-{a}") for r in ("step", "token")
              for a in ref.AGG_MODES]
LOSS_CASES += [
    pytest.param(dict(ratio_level="token", dual_clip=3.0, clip_high=0.28), id="dual-clip"),
    pytest.param(dict(ratio_level="step", entropy_coef=0.01, kl_coef=0.1, kl_type="low_var_kl"), id="step-ent-kl"),
    pytest.param(dict(ratio_level="token", entropy_coef=0.02, kl_coef=0.05, kl_type="k2",
                      agg_mode="token-mean"), id="token-ent-k2"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", LOSS_CASES)
def test_fused_loss_matches_reference(backend, options):
    kind, device = backend
    lay, hidden, weight, bias, labels, old, adv, extra = _loss_batch(seed=1)
    cfg = losses.LossConfig(**options)
    tau = 0.9
    want, want_metrics, want_grads = _ref_loss(lay, hidden, weight, bias, labels, old, adv, cfg, extra, tau)
    h, w, b = _leaves(hidden, weight, bias, device=device)
    dev = {k: v.to(device) for k, v in extra.items()}
    # chunk 5 makes some chunks of whole steps and splits every step longer than 5 tokens.
    loss, metrics = sf.linear_steppo_loss(h, w, labels.to(device), lay.to(device), old.to(device), adv.to(device),
                                          cfg, temperature=tau, bias=b, chunk=5, backend=kind, **dev)
    assert_close(loss, want, torch.float32, "loss")
    for name in ("pg_loss", "pg_clipfrac", "ppo_kl", "ratio_mean", "ratio_max", "entropy", "kl"):
        assert_close(metrics[name], want_metrics[name], torch.float32, name)
    grads = torch.autograd.grad(loss, [h, w, b])
    _, _, torch_grads = _ref_loss(lay, hidden, weight, bias, labels, old, adv, cfg, extra, tau, fp64=False)
    _check_grads(grads, want_grads, torch_grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_loss_chunking_and_backward_scaling(backend):
    kind, device = backend
    lay, hidden, weight, bias, labels, old, adv, _ = _loss_batch(seed=2, max_tokens=9)
    results = []
    for chunk in (1, 4, 9, 10_000):
        h, w, b = _leaves(hidden, weight, bias, device=device)
        loss, _ = sf.linear_steppo_loss(h, w, labels.to(device), lay.to(device), old.to(device), adv.to(device),
                                        bias=b, chunk=chunk, backend=kind)
        results.append((loss,) + torch.autograd.grad(loss * 3.0, [h, w, b]))
    for other in results[1:]:
        for a, e in zip(other, results[0]):
            assert_close(a, e, torch.float32)
    wants = [_ref_loss(lay, hidden, weight, bias, labels, old, adv, losses.LossConfig(), {}, 1.0, fp64)[2]
             for fp64 in (True, False)]
    _check_grads([g / 3.0 for g in results[0][1:]], *wants)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_loss_all_masked_and_deterministic(backend):
    kind, device = backend
    lay, hidden, weight, bias, labels, old, adv, _ = _loss_batch(seed=3)
    B = lay.token_shape[0]
    empty = StepLayout.from_step_rows(torch.zeros(lay.token_shape, dtype=torch.bool), torch.arange(B),
                                      torch.zeros(B, dtype=torch.long))
    h, w, b = _leaves(hidden, weight, bias, device=device)
    loss, metrics = sf.linear_steppo_loss(h, w, labels.to(device), empty.to(device), old.to(device), adv.to(device),
                                          bias=b, backend=kind)
    grads = torch.autograd.grad(loss, [h, w, b], allow_unused=False)
    assert float(loss) == 0.0 and all(not torch.isnan(m) for m in metrics.values())
    assert all(bool((g == 0).all()) for g in grads)
    runs = []
    for _ in range(2):
        h, w, b = _leaves(hidden, weight, bias, device=device)
        loss, _ = sf.linear_steppo_loss(h, w, labels.to(device), lay.to(device), old.to(device), adv.to(device),
                                        bias=b, chunk=4, backend=kind)
        runs.append((loss,) + torch.autograd.grad(loss, [h, w, b]))
    for a, e in zip(*runs):
        assert torch.equal(a, e)


def test_fused_loss_accepts_a_mask_of_step_rows():
    lay, hidden, weight, bias, labels, old, adv, _ = _loss_batch(seed=4)
    mask = lay.token_mask.reshape(lay.token_shape)
    a, _ = sf.linear_steppo_loss(hidden, weight, labels, lay, old, adv, bias=bias)
    b, _ = sf.linear_steppo_loss(hidden, weight, labels, mask, old, adv, bias=bias)
    # Each row is one step either way, so the step ratio and the aggregation are the same.
    assert_close(a, b.double(), torch.float32)


# ------------------------------------------------------------------ bad input
def test_bad_input_gets_clear_errors():
    hidden, weight, _, labels = _head(6, 8, 11, bias=False)
    with pytest.raises(ValueError, match="hidden size mismatch"):
        sf.linear_token_logprobs(hidden, weight[:, :7], labels)
    with pytest.raises(ValueError, match="weight is on meta"):
        sf.linear_token_logprobs(hidden, weight.to("meta"), labels)
    with pytest.raises(ValueError, match="labels out of range"):
        sf.linear_token_logprobs(hidden, weight, torch.full_like(labels, 11))
    with pytest.raises(TypeError, match="hidden must be a float tensor"):
        sf.linear_token_logprobs(hidden.long(), weight, labels)
    with pytest.raises(TypeError, match="weight dtype"):
        sf.linear_token_logprobs(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="chunk"):
        sf.linear_token_logprobs(hidden, weight, labels, chunk=0)
    with pytest.raises(ValueError, match="temperature"):
        sf.linear_token_logprobs(hidden, weight, labels, None, 0.0)
    lay, h3, w, b, y, old, adv, _ = _loss_batch(seed=5)
    with pytest.raises(ValueError, match="unknown options"):
        sf.linear_steppo_loss(h3, w, y, lay, old, adv, {"clip": 0.2})
    with pytest.raises(ValueError, match="clip_low"):
        sf.linear_steppo_loss(h3, w, y, lay, old, adv, {"clip_low": 0.0})
    with pytest.raises(ValueError, match="agg_mode"):
        sf.linear_steppo_loss(h3, w, y, lay, old, adv, losses.LossConfig.preset("ppo", agg_mode="mean"))
    with pytest.raises(ValueError, match="old_logp must have the shape"):
        sf.linear_steppo_loss(h3, w, y, lay, old[:, :-1], adv)
    with pytest.raises(ValueError, match="the layout describes"):
        sf.linear_steppo_loss(h3[:-1], w, y[:-1], lay, old[:-1], adv[:-1])


def test_fused_loss_backward_scales_in_place_once():
    lay, hidden, weight, bias, labels, old, adv, _ = _loss_batch(seed=6)
    h, w = _leaves(hidden, weight)
    loss, _ = sf.linear_steppo_loss(h, w, labels, lay, old, adv)
    (2.0 * loss).backward(retain_graph=True)
    _, _, want = _ref_loss(lay, hidden, weight, None, labels, old, adv, losses.LossConfig(), {}, 1.0)
    assert_close(w.grad / 2.0, want[1], torch.float32)
    # A second backward through the same graph would scale the stored gradients again: refused.
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_fp32_weight_grad_accumulation_for_bf16_weights():
    hidden, weight, _, labels = _head(64, 16, 23, seed=14, bias=False, dtype=torch.bfloat16)
    _, _, (_, want) = _ref_primitive(hidden, weight, None, labels, None, 1.0, torch.ones(64), torch.zeros(64))
    errs = {}
    for fp32 in (False, True):
        h, w = _leaves(hidden, weight)
        logp, _ = sf.linear_token_logprobs(h, w, labels, chunk=1, fp32_weight_grad=fp32)
        (gw,) = torch.autograd.grad(logp.sum(), [w])
        assert gw.dtype == torch.bfloat16
        errs[fp32] = (gw.double() - want).abs().max().item()
    # 64 one-token chunks: bf16 accumulation rounds 64 times, fp32 accumulation once at the end.
    assert errs[True] < 0.5 * errs[False], errs


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_weight_grad_adds_unrounded_products(device, dtype):
    # Each chunk's G^T h must reach the float32 grad_W without a rounding to bf16/fp16 on the way: the
    # accumulated sum then matches the exact sum of the same products to float32 precision, where
    # rounding each chunk's product to bf16 first is off by about 2^-9 of it.
    gen = torch.Generator().manual_seed(21)
    chunks, rows, vocab, hid = 12, 16, 37, 24
    g = (torch.randn(chunks * rows, vocab, generator=gen) * 0.1).to(dtype)
    h = torch.randn(chunks * rows, hid, generator=gen).to(dtype)
    weight = torch.zeros(vocab, hid, dtype=dtype)
    acc = linear_head._Grads(h.to(device), weight.to(device), None, need_hidden=False, need_weight=True,
                             need_bias=False, fp32_weight_grad=True)
    for c in range(chunks):
        c0, c1 = c * rows, (c + 1) * rows
        acc.add(g[c0:c1].to(device), h[c0:c1].to(device), None, c0, c1)
    assert acc.gw.dtype == torch.float32
    exact = g.double().t() @ h.double()
    err = (acc.gw.cpu().double() - exact).abs().max().item()
    assert err <= 1e-6 * exact.abs().max().item(), err
    # And the bf16 result of the fp32 path is the exact sum rounded once.
    gw = acc.outputs()[1].cpu()
    assert gw.dtype == dtype
    assert_close(gw.double(), exact, dtype)
