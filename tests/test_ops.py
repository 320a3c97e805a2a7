"""The registry: opcheck on every op, backend dispatch, the compiled modules, lean import."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import steppo_fast
from episodes import make_episodes, step_rows
from steppo_fast import StepLayout, _native, ops
from steppo_fast import reference as ref
from steppo_fast.testing import assert_close


def _layout(seed=0, n_traj=6):
    ep = make_episodes(seed, n_traj, max_steps=4, max_tokens=3, group_size=3)
    mask, traj, step, grp, rew = step_rows(ep, seed)
    return StepLayout.from_step_rows(mask, traj, step, grp), rew.float().reshape(-1)


def _opcheck_samples():
    torch.manual_seed(0)
    lay, rew = _layout()
    N, S, R = lay.num_tokens, lay.num_steps, lay.num_trajectories
    f = torch.float32
    logits = torch.randn(N, 11, requires_grad=True)
    labels = torch.randint(0, 11, (N,))
    mask = lay.token_mask
    hidden = torch.randn(N, 5, requires_grad=True)
    weight = torch.randn(11, 5, requires_grad=True)
    bias = torch.randn(11, requires_grad=True)
    lse = torch.randn(N)
    lp = torch.randn(N, requires_grad=True)
    ent = torch.rand(N, requires_grad=True)
    sr = torch.randn(S)
    ts = lay.token_step
    rows = lay.step_tokens
    M = rows.numel()
    b = "reference"
    return {
        "token_logprobs": (logits, labels, mask, 0.9, True, False, b),
        "token_logprobs_backward": (logits.detach(), labels, mask, lp.detach(), ent.detach(), lse, torch.randn(N),
                                    torch.randn(N), 0.9, True, b),
        "linear_token_logprobs": (hidden, weight, bias, labels, rows, 1.1, True, 4, False, b),
        "linear_token_logprobs_backward": (hidden.detach(), weight.detach(), None, labels, rows, lp.detach(),
                                           ent.detach(), lse, torch.randn(N), torch.randn(N), 1.0, True, 4, True, True,
                                           False, False, b),
        "linear_policy_loss": (hidden, weight, bias, labels, rows, ts[rows], lay.step_token_offsets, S,
                               [0, M // 2, M], [0, 0], torch.randn(M), torch.randn(M), None, torch.randn(M), "token",
                               0.2, 0.2, None, "token-mean", 0.01, 0.1, "k3", None, None, None, 1.0, True, True,
                               True, True, False, b),
        "step_rewards": (rew, ts, lay.step_tokens, lay.step_token_offsets, b),
        "broadcast_to_tokens": (sr, ts, b),
        "step_gae": (sr, torch.randn(S), lay.traj_step_offsets, 0.99, 0.95, b),
        "token_gae": (rew, torch.randn(N), lay.step_tokens, lay.step_token_offsets, lay.traj_step_offsets, 0.9, 0.8, b),
        "whiten_moments": (sr, None, b),
        "whiten_apply": (rew, mask, torch.tensor([5.0, 1.0, 3.0], dtype=torch.float64), "token", b),
        "group_advantage": (torch.randn(R), lay.traj_group, None, "mean_std", "unit", 1e-6, b),
        "policy_loss": (lp, torch.randn(N), torch.randn(N), ts, torch.rand(N), ent, torch.randn(N), S, "step", 0.2,
                        0.28, 3.0, "seq-mean-token-mean", 0.01, 0.1, "k3", None, None, None, b),
        "value_loss": (torch.randn(S, requires_grad=True), torch.randn(S), torch.randn(S), None, 0.5, b),
    }


def test_every_registered_op_has_an_opcheck_sample():
    assert set(_opcheck_samples()) == set(ops.registered_ops())


@pytest.mark.parametrize("name", sorted(_opcheck_samples()))
def test_opcheck(name):
    args = _opcheck_samples()[name]
    op = getattr(torch.ops.steppo_fast, name).default
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", sorted(n for n in _opcheck_samples() if "cpp" in ops._IMPLS[n]))
def test_opcheck_cpp(name):
    args = list(_opcheck_samples()[name])
    assert args[-1] == "reference"
    args[-1] = "cpp"
    op = getattr(torch.ops.steppo_fast, name).default
    torch.library.opcheck(op, tuple(args))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels need a GPU")
@pytest.mark.parametrize("name", sorted(n for n in _opcheck_samples() if "cuda" in ops._IMPLS[n]))
def test_opcheck_cuda(name):
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _opcheck_samples()[name]]
    args[-1] = "cuda"
    op = getattr(torch.ops.steppo_fast, name).default
    torch.library.opcheck(op, tuple(args))


def test_cpp_step_rewards_matches_reference_fp64():
    lay, rew = _layout(3, 20)
    for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        r = rew.to(dt)
        got = ops.step_rewards(r, lay.token_step, lay.step_tokens, lay.step_token_offsets, backend="cpp")
        exp = ref.step_rewards(r.double(), lay.token_step, lay.num_steps)
        assert got.dtype == (torch.float64 if dt == torch.float64 else torch.float32)
        assert_close(got, exp)


def test_auto_backend_on_cpu_is_cpp_when_built():
    assert ops.resolve_backend("step_rewards", torch.device("cpu")) == "cpp"


def test_backend_env_override(monkeypatch):
    monkeypatch.setenv("STEPPO_FAST_BACKEND", "reference")
    assert ops.resolve_backend("step_rewards", torch.device("cpu")) == "reference"
    monkeypatch.setenv("STEPPO_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.resolve_backend("step_rewards", torch.device("cpu"))


def test_unknown_and_misplaced_backends():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.resolve_backend("step_rewards", torch.device("cpu"), "fast")
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        ops.resolve_backend("step_rewards", torch.device("cpu"), "cuda")


def test_missing_backend_falls_back_with_one_warning():
    ops._warned.clear()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            assert ops.resolve_backend("value_loss", torch.device("cpu"), "cpp") == "reference"
    msgs = [str(w.message) for w in rec if "value_loss" in str(w.message)]
    assert len(msgs) == 1 and "using the PyTorch reference" in msgs[0]


def test_cuda_module_imports_and_raises_without_gpu():
    mod = _native.cuda_module()
    if mod is None:
        pytest.skip(f"steppo_fast._C_cuda was not built: {_native.module_error('_C_cuda')}")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert mod.device_count() == 0
    # Every kernel entry point is bound and checks for a device before touching a pointer.
    calls = {
        "step_rewards_cuda": (0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0),
        "broadcast_to_tokens_cuda": (0, 0, 0, 0, 1, 0, 0, 0, 0, 0),
        "step_gae_cuda": (0, 0, 0, 0, 0, 0, 1, 1.0, 1.0, 0, 0, 0, 0, 0, 0),
        "token_gae_cuda": (0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1.0, 1.0, 0, 0, 0, 0, 0, 0),
        "whiten_moments_cuda": (0, 0, 0, 1, 0, 0, 0, 0),
        "whiten_apply_cuda": (0, 0, 0, 1, 0, 0, 1e-8, 0, 0, 0, 0),
        "group_advantage_cuda_workspace": (1, 0),
        "group_advantage_cuda": (0, 0, 0, 0, 1, 0, 0, 1e-6, 0, 0, 0, 0, 0, 0),
    }
    for name, args in calls.items():
        with pytest.raises(RuntimeError, match="no usable CUDA device"):
            getattr(mod, name)(*args)
    assert mod.whiten_moments_cuda_workspace(10**8) == 3 * 1024  # fixed blocks: a pure host computation


@pytest.mark.triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1")
def test_triton_step_rewards_matches_reference():
    lay, rew = _layout(5, 9)
    for dt in (torch.float32, torch.float64):
        got = ops.step_rewards(rew.to(dt), lay.token_step, lay.step_tokens, lay.step_token_offsets, backend="triton")
        assert_close(got, ref.step_rewards(rew.double(), lay.token_step, lay.num_steps))


_STEP_REWARD_BACKENDS = [pytest.param(("cpp", "cpu"), id="cpp")]
if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
    _STEP_REWARD_BACKENDS.append(pytest.param(("triton", "cuda" if torch.cuda.is_available() else "cpu"), id="triton"))
if torch.cuda.is_available():
    _STEP_REWARD_BACKENDS.append(pytest.param(("cuda", "cuda"), id="cuda"))


@pytest.mark.parametrize("backend", _STEP_REWARD_BACKENDS)
def test_step_rewards_accumulate_in_float64(backend):
    # float32 rewards summed in float64 and rounded once, by every backend: 1e8 + 1 - 1e8 is 1, which a
    # float32 running sum (one lane of the Triton kernel gets tokens 0, 128 and 256) rounds to 0.
    name, device = backend
    n = 257
    r = torch.zeros(n)
    r[0], r[128], r[256] = 1e8, 1.0, -1e8
    ts = torch.zeros(n, dtype=torch.int32)
    tokens, offsets = torch.arange(n), torch.tensor([0, n])
    got = ops.step_rewards(r.to(device), ts.to(device), tokens.to(device), offsets.to(device), backend=name)
    assert got.dtype == torch.float32 and got.cpu().tolist() == [1.0]


def test_step_rewards_deterministic():
    lay, rew = _layout(7, 30)
    a = ops.step_rewards(rew, lay.token_step, lay.step_tokens, lay.step_token_offsets, backend="cpp")
    b = ops.step_rewards(rew, lay.token_step, lay.step_tokens, lay.step_token_offsets, backend="cpp")
    assert torch.equal(a, b)


def test_whiten_op_matches_reference():
    lay, rew = _layout(2, 10)
    x = torch.randn(lay.num_steps, dtype=torch.float64)
    assert_close(ops.whiten(x, mode="step"), ref.whiten_steps(x))
    assert_close(ops.whiten(rew.double(), lay.token_mask, mode="token"), ref.whiten_tokens(rew.double(), lay.token_mask))
    with pytest.raises(ValueError, match="mode must be one of"):
        ops.whiten(x, mode="batch")


def test_group_advantage_op_matches_reference():
    scores = torch.randn(9, dtype=torch.float64)
    grp = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3])
    assert_close(ops.group_advantage(scores, grp, norm="mean_std"), ref.grpo(scores, grp))
    assert_close(ops.group_advantage(scores, grp, norm="mean"), ref.grpo(scores, grp, norm_by_std=False))
    assert_close(ops.group_advantage(scores, grp, norm="rloo"), ref.rloo(scores, grp))
    with pytest.raises(ValueError, match="norm must be one of"):
        ops.group_advantage(scores, grp, norm="median")


def test_differentiable_ops_match_reference_autograd():
    torch.manual_seed(0)
    z = torch.randn(7, 13, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 13, (7,))
    m = torch.tensor([1, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    gl, gh = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    logp, ent = ops.token_logprobs(z, y, m, 0.8)
    (g1,) = torch.autograd.grad((logp * gl + ent * gh).sum(), [z])
    logp_r, ent_r = ref.token_logprobs(z, y, m, 0.8)
    (g2,) = torch.autograd.grad((logp_r * gl + ent_r * gh).sum(), [z])
    assert_close(logp, logp_r)
    assert_close(g1, g2)
    h = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 4, dtype=torch.float64, requires_grad=True)
    logp, ent = ops.linear_token_logprobs(h, w, y, torch.nonzero(m).squeeze(1), 1.0)
    a = torch.autograd.grad((logp * gl + ent * gh).sum(), [h, w])
    logp_r, ent_r = ref.linear_token_logprobs(h, w, y, m, 1.0)
    b = torch.autograd.grad((logp_r * gl + ent_r * gh).sum(), [h, w])
    for x, e in zip(a, b):
        assert_close(x, e)


def test_import_is_lean():
    code = (
        "import sys, torch, steppo_fast\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
        "bad = [m for m in ('triton', 'steppo_fast._C', 'steppo_fast._C_cuda', 'steppo_fast.kernels.step_rewards') "
        "if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('lean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "lean" in out.stdout, out.stderr


def test_package_version():
    assert steppo_fast.__version__


def test_missing_compiled_module_warns_once_and_falls_back(monkeypatch):
    import importlib

    real_import = importlib.import_module

    def fake_import(name, *a, **k):
        if name == "steppo_fast._C":
            raise ImportError("simulated: not built")
        return real_import(name, *a, **k)

    monkeypatch.setattr(_native, "_modules", {})
    monkeypatch.setattr(_native, "_errors", {})
    monkeypatch.setattr(importlib, "import_module", fake_import)
    ops._warned.clear()
    lay, rew = _layout(1, 4)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(2):
            got = ops.step_rewards(rew, lay.token_step, lay.step_tokens, lay.step_token_offsets)
    assert_close(got, ref.step_rewards(rew.double(), lay.token_step, lay.num_steps))
    msgs = [str(w.message) for w in rec]
    assert sum("steppo_fast._C could not be imported" in m for m in msgs) == 1
    assert sum("step_rewards: no cpp kernel" in m for m in msgs) == 1
