"""Token log-probs and entropy kernels (C++ and Triton) against the fp64 reference (SPEC 2).

On a machine without a GPU the Triton kernels run under TRITON_INTERPRET=1 on small shapes;
with a GPU they run on it. The C++ kernels run on the CPU.
"""

import os

import numpy as np
import pytest
import torch

from steppo_fast import StepLayout, ops
from steppo_fast import reference as ref
from steppo_fast.logprob import token_logprobs
from steppo_fast.testing import assert_close, assert_no_worse_than_torch

HAS_CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if HAS_CUDA else ("cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None)

BACKENDS = [pytest.param(("cpp", "cpu"), id="cpp")]
if TRITON_DEVICE is not None:
    try:
        import triton  # noqa: F401

        BACKENDS.append(pytest.param(("triton", TRITON_DEVICE), id="triton"))
    except ImportError:
        pass

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

_bf16_bits_kernel = None
if TRITON_DEVICE is not None:
    try:
        import triton
        import triton.language as tl

        from steppo_fast.kernels.logprob import _to_bf16_bits

        @triton.jit
        def _bf16_bits_kernel(src, dst, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            x = tl.load(src + offs, mask=offs < n).to(tl.float32, bitcast=True)
            tl.store(dst + offs, _to_bf16_bits(x), mask=offs < n)
    except ImportError:
        pass


@pytest.fixture(autouse=True)
def _quiet_interpreter():
    # The interpreter evaluates both sides of tl.where in numpy; the discarded side may warn.
    with np.errstate(all="ignore"):
        yield


def _mask(kind, shape, gen):
    if kind == "none_masked":
        return torch.ones(shape, dtype=torch.bool)
    if kind == "all_masked":
        return torch.zeros(shape, dtype=torch.bool)
    if kind == "random":
        return torch.rand(shape, generator=gen) < 0.6
    if kind == "rows_masked":  # whole sequences (first dim) masked out
        m = torch.rand(shape, generator=gen) < 0.8
        m[::2] = False
        return m
    raise ValueError(kind)


def _inputs(lead, vocab, dtype, mask_kind, seed=0, scale=3.0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(*lead, vocab, generator=gen) * scale).to(dtype)
    y = torch.randint(0, vocab, lead, generator=gen)
    m = _mask(mask_kind, lead, gen)
    y = torch.where(m, y, torch.full_like(y, -100))  # masked-out labels are ignored
    gl = torch.randn(lead, generator=gen)
    gh = torch.randn(lead, generator=gen)
    return [t.to(device) for t in (z, y, m, gl, gh)]


def _torch_same_dtype(z, y, m, gl, gh, tau):
    """dL/dz of PyTorch's own log_softmax + gather + entropy, in z's dtype."""
    z = z.detach().clone().requires_grad_()
    u = z / tau
    ls = torch.log_softmax(u, -1)
    lp = ls.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    ent = -(ls.exp() * ls).sum(-1)
    ((lp.float() * gl + ent.float() * gh) * m).sum().backward()
    return z.grad


def _check(backend, device, z, y, m, gl, gh, tau, with_entropy=True):
    zk = z.detach().clone().requires_grad_()
    logp, ent = token_logprobs(zk, y, m, tau, with_entropy=with_entropy, backend=backend)
    assert logp.dtype == torch.float32 and logp.shape == y.shape
    z64 = z.detach().double().cpu().reshape(-1, z.shape[-1])
    y64, m64 = y.cpu().reshape(-1), m.cpu().reshape(-1)
    lp_r, ent_r = ref.token_logprobs(z64, y64, m64, tau)
    assert_close(logp.cpu().reshape(-1), lp_r, torch.float32, "logp")
    if with_entropy:
        assert_close(ent.cpu().reshape(-1), ent_r, torch.float32, "entropy")
    else:
        assert torch.count_nonzero(ent) == 0
    ghe = gh if with_entropy else torch.zeros_like(gh)
    (logp * gl + ent * gh).sum().backward()
    # The oracle: the fp64 reference's closed-form gradient (held to its autograd in test_reference.py
    # and in test_gradient_paths below; autograd itself gives NaN for -inf logits).
    g64 = ref.token_logprobs_backward(z64.detach(), y64, m64, gl.cpu().double().reshape(-1),
                                      ghe.cpu().double().reshape(-1), tau)
    grad = zk.grad
    assert grad.dtype == z.dtype and grad.shape == z.shape
    g = grad.cpu().reshape(-1, z.shape[-1])
    if z.dtype == torch.float32:
        assert_close(g, g64, torch.float32, "grad")
    else:
        assert_close(g, g64, z.dtype, "grad")
        gt = _torch_same_dtype(z.cpu(), y.cpu(), m.cpu(), gl.cpu(), ghe.cpu(), tau).reshape(-1, z.shape[-1])
        assert_no_worse_than_torch(g, gt, g64, atol=float(torch.finfo(z.dtype).eps) * 1e-3, msg="grad")
    return logp, ent, grad


# ------------------------------------------------------------------ agreement with the oracle
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tau", [1.0, 0.7])
@pytest.mark.parametrize("mask_kind", ["none_masked", "all_masked", "random", "rows_masked"])
def test_matches_reference_small_vocab(backend, dtype, tau, mask_kind):
    name, device = backend
    z, y, m, gl, gh = _inputs((4, 5), 37, dtype, mask_kind, seed=1, device=device)
    _check(name, device, z, y, m, gl, gh, tau)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1, 50257, 151936])
def test_matches_reference_vocab_sizes(backend, dtype, vocab):
    name, device = backend
    n = 3 if vocab > 1 else 9
    z, y, m, gl, gh = _inputs((n,), vocab, dtype, "random", seed=vocab, device=device)
    m[0] = True
    y[0] = vocab - 1  # the last entry of the last chunk
    _check(name, device, z, y, m, gl, gh, 0.7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["logp", "entropy", "both"])
def test_gradient_paths(backend, which):
    name, device = backend
    z, y, m, gl, gh = _inputs((6,), 300, torch.float32, "random", seed=2, device=device)
    if which == "logp":
        gh = torch.zeros_like(gh)
    if which == "entropy":
        gl = torch.zeros_like(gl)
    _check(name, device, z, y, m, gl, gh, 0.9)
    zk = z.clone().requires_grad_()
    logp, ent = token_logprobs(zk, y, m, 0.9, backend=name)
    (logp * gl + ent * gh).sum().backward()
    z64 = z.double().cpu().requires_grad_()
    lp_r, ent_r = ref.token_logprobs(z64, y.cpu(), m.cpu(), 0.9)
    (g64,) = torch.autograd.grad((lp_r * gl.cpu().double() + ent_r * gh.cpu().double()).sum(), [z64])
    assert_close(zk.grad.cpu(), g64, torch.float32)
    # Gradient through logp alone (entropy output unused) equals the g_H = 0 case.
    zk = z.clone().requires_grad_()
    logp, _ = token_logprobs(zk, y, m, 0.9, backend=name)
    (logp * gl).sum().backward()
    z64 = z.double().cpu().requires_grad_()
    lp_r, _ = ref.token_logprobs(z64, y.cpu(), m.cpu(), 0.9)
    (g64,) = torch.autograd.grad((lp_r * gl.cpu().double()).sum(), [z64])
    assert_close(zk.grad.cpu(), g64, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_entropy(backend):
    name, device = backend
    z, y, m, gl, gh = _inputs((7,), 200, torch.bfloat16, "random", seed=3, device=device)
    _check(name, device, z, y, m, gl, gh, 1.0, with_entropy=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_active_tokens(backend):
    name, device = backend
    z, y, m, gl, gh = _inputs((0,), 50, torch.float32, "random", device=device)
    logp, ent = token_logprobs(z, y, m, backend=name)
    assert logp.shape == (0,) and ent.shape == (0,)
    z, y, m, gl, gh = _inputs((2, 3), 50, torch.float32, "all_masked", device=device)
    zk = z.clone().requires_grad_()
    logp, ent = token_logprobs(zk, y, m, backend=name)
    (logp.sum() + ent.sum()).backward()
    assert torch.count_nonzero(logp) == 0 and torch.count_nonzero(zk.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_rows_are_read_in_place(backend, dtype):
    name, device = backend
    gen = torch.Generator().manual_seed(4)
    full = (torch.randn(3, 6, 41, generator=gen) * 2).to(dtype).to(device)
    z = full[:, :-1]  # (B, T, V) with a row stride that no reshape can flatten
    assert not z.is_contiguous()
    y = torch.randint(0, 41, (3, 5), generator=gen).to(device)
    m = (torch.rand(3, 5, generator=gen) < 0.7).to(device)
    gl, gh = torch.randn(3, 5, generator=gen).to(device), torch.randn(3, 5, generator=gen).to(device)
    logp, ent, grad = _check(name, device, z, y, m, gl, gh, 0.8)
    lp_c, ent_c = token_logprobs(z.contiguous(), y, m, 0.8, backend=name)
    assert torch.equal(logp, lp_c) and torch.equal(ent, ent_c)
    # A 2-D view with a row stride larger than V.
    z2 = full.reshape(18, 41)[::2]
    lp2, _ = token_logprobs(z2, y.reshape(-1)[:9], m.reshape(-1)[:9], backend=name)
    lp2_c, _ = token_logprobs(z2.contiguous(), y.reshape(-1)[:9], m.reshape(-1)[:9], backend=name)
    assert torch.equal(lp2, lp2_c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_backward_equals_out_of_place(backend, dtype):
    name, device = backend
    z, y, m, gl, gh = _inputs((3, 4), 300, dtype, "random", seed=5, device=device)
    grads = []
    for inplace in (False, True):
        base = z.clone().requires_grad_()
        logits = base * 1  # a non-leaf, as the output of an lm_head would be
        logp, ent = token_logprobs(logits, y, m, 0.7, inplace_backward=inplace, backend=name)
        (logp * gl + ent * gh).sum().backward()
        grads.append(base.grad)
        if inplace:
            assert torch.equal(logits.detach(), base.grad)  # the gradient was written into the logits buffer
    assert torch.equal(grads[0], grads[1])


def test_inplace_backward_refuses_logits_saved_elsewhere():
    z = torch.randn(4, 30, requires_grad=True)
    logits = z * 1
    side = (logits * logits).sum()  # saves logits for its own backward
    logp, _ = token_logprobs(logits, torch.randint(0, 30, (4,)), inplace_backward=True, backend="cpp")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (logp.sum() + side).backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    name, device = backend
    z, y, m, gl, gh = _inputs((5,), 5000, torch.bfloat16, "random", seed=6, device=device)
    outs = []
    for _ in range(2):
        zk = z.clone().requires_grad_()
        logp, ent = token_logprobs(zk, y, m, 0.7, backend=name)
        (logp * gl + ent * gh).sum().backward()
        outs.append((logp, ent, zk.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_probability_near_one_in_bf16(backend):
    name, device = backend
    v = 512
    z = torch.zeros(4, v)
    y = torch.tensor([3, 100, 511, 0])
    z[torch.arange(4), y] = torch.tensor([12.0, 16.0, 20.0, 9.0])  # 1 - p(label) from 3e-3 down to 1e-6
    z = z.to(torch.bfloat16).to(device)
    y, m = y.to(device), torch.ones(4, dtype=torch.bool, device=device)
    gl, gh = torch.ones(4, device=device), torch.zeros(4, device=device)
    logp, ent, grad = _check(name, device, z, y, m, gl, gh, 1.0)
    z64 = z.double().cpu()
    one_minus_p = 1 - torch.softmax(z64, -1)[torch.arange(4), y.cpu()]
    # logp = log(1 - (1 - p)) to fp32 relative precision, though it is within 1e-6 of 0.
    torch.testing.assert_close(logp.cpu().double(), torch.log1p(-one_minus_p), rtol=1e-5, atol=0)
    # The label's gradient 1 - p in bf16, to a unit in the last place.
    g_y = grad.cpu()[torch.arange(4), y.cpu()].double()
    torch.testing.assert_close(g_y, one_minus_p, rtol=2.0 ** -7, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_stays_in_its_row(backend, dtype):
    name, device = backend
    z, y, m, gl, gh = _inputs((4,), 64, dtype, "none_masked", seed=7, device=device)
    z[1, 10] = float("nan")
    zk = z.clone().requires_grad_()
    logp, ent = token_logprobs(zk, y, m, backend=name)
    (logp * gl + ent * gh).sum().backward()
    assert torch.isnan(logp[1]) and torch.isnan(ent[1])
    # The whole row's gradient is NaN, as the reference's: never zeros (a bf16 NaN written as -0.0).
    assert torch.isnan(zk.grad[1]).all()
    keep = torch.tensor([0, 2, 3], device=device)
    assert torch.isfinite(logp[keep]).all() and torch.isfinite(ent[keep]).all()
    assert torch.isfinite(zk.grad[keep]).all()
    lp_r, ent_r = ref.token_logprobs(z[keep].double().cpu(), y[keep].cpu())
    assert_close(logp[keep].cpu(), lp_r, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits_get_zero_probability(backend):
    name, device = backend
    z, y, m, gl, gh = _inputs((3,), 40, torch.float32, "none_masked", seed=8, device=device)
    z[:, 30:] = float("-inf")  # padded vocabulary entries
    y = y % 30
    _check(name, device, z, y, m, gl, gh, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_mask_and_int32_labels(backend):
    name, device = backend
    mask_rows = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    lay = StepLayout.from_step_rows(mask_rows, torch.tensor([0, 0]), torch.tensor([0, 1])).to(device)
    z, y, _, gl, gh = _inputs((2, 5), 23, torch.float32, "none_masked", seed=9, device=device)
    y32 = y.to(torch.int32)
    logp, ent = token_logprobs(z, y32, lay, backend=name)
    logp_m, ent_m = token_logprobs(z, y, mask_rows.to(device), backend=name)
    assert torch.equal(logp, logp_m) and torch.equal(ent, ent_m)
    assert torch.count_nonzero(logp[~mask_rows.to(device)]) == 0


@pytest.mark.skipif(_bf16_bits_kernel is None, reason="needs Triton (a GPU or TRITON_INTERPRET=1)")
def test_interpreter_bf16_rounding_matches_the_gpu_and_keeps_nan():
    # The interpreter truncates float32 -> bf16, so its gradients are rounded by hand; the result
    # must be the GPU's: nearest even, overflow to inf, NaN (any payload, the GPU's canonical
    # 0x7FFFFFFF included, whose rounding used to carry into the sign bit) stays NaN.
    special = [0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x7F800000, 0xFF800000, 0x7F7FFFFF,
               0xFF7FFFFF, 0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x80000000, 0x00008000, 0x00018000]
    gen = torch.Generator().manual_seed(11)
    rand = torch.randint(0, 2 ** 32, (4000,), generator=gen, dtype=torch.int64)
    bits = torch.cat([torch.tensor(special, dtype=torch.int64), rand]).to(torch.int64)
    src = (bits - (bits >= 2 ** 31).long() * 2 ** 32).to(torch.int32)
    dst = torch.empty(src.numel(), dtype=torch.int16)
    block = triton.next_power_of_2(src.numel())
    sd, dd = src.to(TRITON_DEVICE), dst.to(TRITON_DEVICE)
    _bf16_bits_kernel[(1,)](sd, dd, src.numel(), BLOCK=block)
    got = dd.cpu().view(torch.bfloat16)
    x = src.view(torch.float32)
    want = x.to(torch.bfloat16)  # round to nearest even
    nan = torch.isnan(x)
    assert torch.isnan(got[nan]).all(), got[nan].view(torch.int16)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


# ------------------------------------------------------------------ bad input
def test_label_out_of_range_is_an_error():
    z = torch.randn(3, 10)
    with pytest.raises(ValueError, match=r"labels out of range \[0, 10\) at masked-in token 1: 10"):
        token_logprobs(z, torch.tensor([1, 10, 2]))
    with pytest.raises(ValueError, match="at masked-in token 2: -1"):
        token_logprobs(z, torch.tensor([1, 2, -1]))
    # Masked-out labels may be anything.
    logp, _ = token_logprobs(z, torch.tensor([1, -100, 2]), torch.tensor([True, False, True]))
    assert logp[1] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_unvalidated_bad_label_gives_nan_in_its_row_only(backend):
    name, device = backend
    z = torch.randn(3, 10, device=device)
    y = torch.tensor([1, 10, -5], device=device)
    logp, _ = token_logprobs(z, y, validate=False, backend=name)
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1]) and torch.isnan(logp[2])


def test_bad_arguments_name_what_is_wrong():
    z = torch.randn(2, 3, 10)
    y = torch.randint(0, 10, (2, 3))
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 3\)"):
        token_logprobs(z, y[:, :2])
    with pytest.raises(ValueError, match="mask must have shape"):
        token_logprobs(z, y, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="labels must be int32 or int64"):
        token_logprobs(z, y.float())
    for tau in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be a number > 0"):
            token_logprobs(z, y, temperature=tau)
    with pytest.raises(ValueError, match="labels are on meta but the logits are on cpu"):
        token_logprobs(z, y.to("meta"))
    with pytest.raises(ValueError, match=r"logits must have shape \(N, V\) or \(B, T, V\)"):
        token_logprobs(z[0, 0], y[0, 0])
    with pytest.raises(TypeError, match="logits must be a float tensor"):
        token_logprobs(z.long(), y)


def test_opcheck_cpp_and_inplace_variant():
    torch.manual_seed(0)
    z = torch.randn(6, 17, requires_grad=True)
    y = torch.randint(0, 17, (6,))
    m = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    torch.library.opcheck(torch.ops.steppo_fast.token_logprobs.default, (z, y, m, 0.8, True, False, "cpp"))
    lp, ent, lse = torch.ops.steppo_fast.token_logprobs(z.detach(), y, m, 0.8, True, False, "cpp")
    args = (y, m, lp, ent, lse, torch.randn(6), torch.randn(6), 0.8, True, "cpp")
    torch.library.opcheck(torch.ops.steppo_fast.token_logprobs_backward.default, (z.detach(), *args))
    torch.library.opcheck(torch.ops.steppo_fast.token_logprobs_backward_.default, (z.detach().clone(), *args))


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param(("reference", "cpu"), id="reference")])
def test_inplace_backward_refuses_overlapping_logits(backend):
    """Rows that share memory (an expanded view) cannot take an in-place gradient: every backend
    refuses them with the same ValueError, before any work; a contiguous copy works."""
    name, device = backend
    leaf = torch.randn(1, 11, device=device, requires_grad=True)
    y = torch.randint(0, 11, (6,), device=device)
    with pytest.raises(ValueError, match="logits has elements that share memory"):
        token_logprobs((leaf * 1.0).expand(6, 11), y, inplace_backward=True, backend=name)
    with pytest.raises(ValueError, match="share memory"):
        token_logprobs((leaf * 1.0).expand(2, 3, 11), y.reshape(2, 3), inplace_backward=True, backend=name)
    lp, ent = token_logprobs((leaf * 1.0).expand(6, 11).contiguous(), y, inplace_backward=True, backend=name)
    (lp.sum() + ent.sum()).backward()
    x64 = leaf.detach().double().expand(6, 11).clone().requires_grad_(True)
    lp64, ent64 = ref.token_logprobs(x64, y.cpu())
    (g64,) = torch.autograd.grad(lp64.sum() + ent64.sum(), [x64])
    assert_close(leaf.grad, g64.sum(0, keepdim=True), torch.float32)
