"""What only a GPU can show: no host synchronisation on the GPU paths, kernels on their tensors'
device, the GPU backends against the fp64 reference at sizes the interpreter cannot run.

Skipped without CUDA. The other test files run their Triton and CUDA cases on the GPU too when
there is one (TRITON_DEVICE = "cuda"); these add what has no CPU counterpart.
"""

import contextlib
import os
import re
import subprocess
import sys

import pytest
import torch

import steppo_fast as sf
from episodes import make_episodes, step_rows
from steppo_fast import StepLayout, ops
from steppo_fast import reference as ref
from steppo_fast.testing import assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@contextlib.contextmanager
def no_sync():
    """Any synchronising CUDA call PyTorch makes inside raises (item, cpu, nonzero, a host copy...)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _layout(device, seed=0, n_traj=24):
    ep = make_episodes(seed, n_traj, max_steps=5, max_tokens=40, group_size=4)
    mask, traj, step, grp, rew = step_rows(ep, seed)
    lay = StepLayout.from_step_rows(mask, traj, step, grp)
    return lay.to(device), rew.float().reshape(-1).to(device)


def _ops_calls(device):
    """(name, thunk) for every op on the GPU path; each thunk runs the op, and its backward where
    it has one, with the backend 'auto' picks on CUDA."""
    g = torch.Generator(device=device).manual_seed(0)
    lay, rew = _layout(device)
    N, S, R = lay.num_tokens, lay.num_steps, lay.num_trajectories
    ts = lay.token_step
    V, H = 5000, 64
    logits = torch.randn(N, V, device=device, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, V, (N,), device=device, generator=g)
    mask = lay.token_mask
    f = dict(device=device)
    lp, old, adv = (torch.randn(N, generator=g, **f) * 0.3 - 2 for _ in range(3))
    ent = torch.rand(N, generator=g, **f)
    hidden = torch.randn(N, H, generator=g, **f).to(torch.bfloat16)
    weight = (torch.randn(V, H, generator=g, **f) * 0.1).to(torch.bfloat16)
    rows = lay.step_tokens
    M = rows.numel()
    offs_host = lay.step_token_offsets.cpu()

    def token_logprobs(inplace):
        z = logits.clone().requires_grad_()
        zz = z * 1 if inplace else z
        a, b = ops.token_logprobs(zz, labels, mask, 0.8, True, inplace)
        (a.sum() + b.sum()).backward()

    def policy_loss(level, agg):
        x, e = lp.clone().requires_grad_(), ent.clone().requires_grad_()
        loss, metrics = ops.policy_loss(x, old, adv, ts, S, level, 0.2, 0.28, 3.0, agg, weights=ent, entropy=e,
                                        entropy_coef=0.01, ref_logp=old, kl_coef=0.1, kl_type="k3",
                                        norm_constant=7.0 if agg == "seq-mean-token-sum-norm" else None)
        loss.backward()

    def linear_token_logprobs(fp32_grad):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        a, b = ops.linear_token_logprobs(h, w, labels, rows, 0.9, None, True, 64, fp32_grad)
        (a.sum() + b.sum()).backward()

    def linear_policy_loss():
        from steppo_fast import linear_head

        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        bounds, split = linear_head.plan_chunks(M, 96, offs_host.tolist())
        loss, _ = ops.linear_policy_loss(h, w, None, labels, rows, ts[rows], lay.step_token_offsets, S, bounds, split,
                                         old[rows], adv[rows], None, None, "step", 0.2, 0.2, None,
                                         "seq-mean-token-mean", 0.01, 0.0, "k3", None, None, None, 1.0, True, True,
                                         True, False, True)
        loss.backward()

    sr = ops.step_rewards(rew, ts, lay.step_tokens, lay.step_token_offsets)
    sv = torch.randn(S, generator=g, **f)
    return [
        ("token_logprobs", lambda: token_logprobs(False)),
        ("token_logprobs inplace_backward", lambda: token_logprobs(True)),
        ("policy_loss step", lambda: policy_loss("step", "seq-mean-token-mean")),
        ("policy_loss token", lambda: policy_loss("token", "token-mean")),
        ("policy_loss norm", lambda: policy_loss("step", "seq-mean-token-sum-norm")),
        ("linear_token_logprobs", lambda: linear_token_logprobs(False)),
        ("linear_token_logprobs fp32_weight_grad", lambda: linear_token_logprobs(True)),
        ("linear_policy_loss", linear_policy_loss),
        ("step_rewards triton", lambda: ops.step_rewards(rew, ts, lay.step_tokens, lay.step_token_offsets, "triton")),
        ("step_rewards cuda", lambda: ops.step_rewards(rew, ts, lay.step_tokens, lay.step_token_offsets, "cuda")),
        ("broadcast_to_tokens", lambda: ops.broadcast_to_tokens(sr, ts)),
        ("step_gae", lambda: ops.step_gae(sr, sv, lay.traj_step_offsets, 0.99, 0.95)),
        ("token_gae", lambda: ops.token_gae(rew, torch.randn(N, **f), lay.step_tokens, lay.step_token_offsets,
                                            lay.traj_step_offsets, 0.99, 0.95)),
        ("whiten", lambda: ops.whiten(sr)),
        ("whiten masked", lambda: ops.whiten(rew, mask, "token")),
        ("group_advantage", lambda: ops.group_advantage(torch.randn(R, **f), lay.traj_group)),
    ]


def test_no_op_on_the_gpu_path_synchronises():
    calls = _ops_calls(torch.device("cuda"))
    for _, call in calls:  # first calls compile and load kernels and may allocate: outside the check
        call()
    failures = []
    for name, call in calls:
        try:
            with no_sync():
                call()
        except RuntimeError as exc:
            failures.append(f"{name}: {exc}")
    assert not failures, "\n".join(failures)


def test_fronts_do_not_synchronise_without_validation():
    dev = torch.device("cuda")
    lay, _ = _layout(dev, seed=1)
    B, T = lay.token_shape
    V, H = 4200, 32
    g = torch.Generator(device=dev).manual_seed(1)
    hidden = torch.randn(B, T, H, device=dev, generator=g).requires_grad_()
    weight = (torch.randn(V, H, device=dev, generator=g) * 0.1).requires_grad_()
    labels = torch.randint(0, V, (B, T), device=dev, generator=g)
    old, adv = torch.randn(B, T, device=dev, generator=g) - 2, torch.randn(B, T, device=dev, generator=g)

    def run():
        z = hidden @ weight.t()
        lp, ent = sf.token_logprobs(z, labels, lay, validate=False)
        loss, _ = sf.policy_loss(lp, old, adv, lay)
        loss2, _ = sf.linear_steppo_loss(hidden, weight, labels, lay, old, adv, validate=False)
        (loss + loss2 + ent.sum()).backward()

    run()
    with no_sync():
        run()


def test_step_rewards_gpu_backends_agree_with_the_reference():
    dev = torch.device("cuda")
    lay, rew = _layout(dev, seed=3, n_traj=200)
    want = ref.step_rewards(rew.double().cpu(), lay.token_step.cpu(), lay.num_steps)
    for backend in ("triton", "cuda"):
        for dt in (torch.float32, torch.float64, torch.bfloat16):
            got = ops.step_rewards(rew.to(dt), lay.token_step, lay.step_tokens, lay.step_token_offsets, backend)
            want_dt = ref.step_rewards(rew.to(dt).double().cpu(), lay.token_step.cpu(), lay.num_steps)
            assert_close(got, want_dt, msg=f"{backend} {dt}")
    a = ops.step_rewards(rew, lay.token_step, lay.step_tokens, lay.step_token_offsets, "triton")
    b = ops.step_rewards(rew, lay.token_step, lay.step_tokens, lay.step_token_offsets, "cuda")
    assert_close(a, want) and assert_close(b, want)


def test_token_logprobs_past_2_to_the_31_entries():
    # N x V > 2^31 in bf16: 64-bit offsets; the last rows against the fp64 reference, with padded -inf
    # entries and one near-certain label.
    dev = torch.device("cuda")
    n, v = 14200, 151936
    assert n * v > 2 ** 31
    g = torch.Generator(device=dev).manual_seed(4)
    z = (torch.randn(n, v, device=dev, generator=g) * 4).to(torch.bfloat16)
    z[:, -64:] = float("-inf")
    y = torch.randint(0, v - 64, (n,), device=dev, generator=g)
    z[-1, y[-1]] = 60.0
    zk = z.requires_grad_()
    logp, ent = ops.token_logprobs(zk, y, torch.ones(n, dtype=torch.bool, device=dev), 1.0, True, False)
    (logp.sum() + ent.sum()).backward()
    tail = slice(n - 4, n)
    z64 = z.detach()[tail].double().cpu()
    lp_r, ent_r = ref.token_logprobs(z64, y[tail].cpu())
    assert_close(logp[tail], lp_r, torch.float32, "logp")
    assert_close(ent[tail], ent_r, torch.float32, "entropy")
    g64 = ref.token_logprobs_backward(z64, y[tail].cpu(), None, torch.ones(4, dtype=torch.float64),
                                      torch.ones(4, dtype=torch.float64))
    assert_close(zk.grad[tail].cpu(), g64, torch.bfloat16, "grad")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_run_on_their_tensors_device_and_leave_the_current_device():
    torch.cuda.set_device(0)
    results = {}
    for index in (1, 0):
        dev = torch.device("cuda", index)
        lay, rew = _layout(dev, seed=5)
        N, S = lay.num_tokens, lay.num_steps
        g = torch.Generator(device=dev).manual_seed(5)
        z = torch.randn(N, 3000, device=dev, generator=g).to(torch.bfloat16).requires_grad_()
        y = torch.randint(0, 3000, (N,), device=dev, generator=g)
        lp, ent = ops.token_logprobs(z, y, lay.token_mask, 1.0, True, False)
        (lp.sum() + ent.sum()).backward()
        loss, _ = ops.policy_loss(lp.detach(), lp.detach() - 0.1, torch.randn(N, device=dev, generator=g),
                                  lay.token_step, S)
        out = [lp, ent, z.grad, loss]
        for backend in ("triton", "cuda"):
            out.append(ops.step_rewards(rew, lay.token_step, lay.step_tokens, lay.step_token_offsets, backend))
            assert torch.cuda.current_device() == 0, backend
        out.append(ops.group_advantage(torch.randn(lay.num_trajectories, device=dev, generator=g), lay.traj_group))
        out.append(ops.token_gae(rew, rew, lay.step_tokens, lay.step_token_offsets, lay.traj_step_offsets, 0.9, 0.9)[0])
        assert torch.cuda.current_device() == 0
        assert all(t.device == dev for t in out)
        results[index] = [t.detach().cpu() for t in out]
    for a, b in zip(results[1], results[0]):  # deterministic kernels: the same bits on either device
        assert torch.equal(a, b)


# ------------------------------------------------------------------ bad index values
# The CUDA kernels (and Triton's step_rewards) skip a bad index or offset, write NaN into the
# outputs it would have filled and report its first position in the device's error words; they
# never raise, synchronise or trap (README, "What validate=False promises").
NAN = float("nan")


def _same(got, want, msg=""):
    """Equal values, NaN at the same places (want: a tensor or a list, NaN where NaN is expected)."""
    assert_close(got, want if isinstance(want, torch.Tensor) else torch.tensor(want, dtype=torch.float64), msg=msg)


def _bad_calls(dev):
    """name -> (call, expected error words, check of the call's outputs). Each feeds one kind of bad
    index to one kernel; the cases of tests/test_robustness.py that the C++ kernels refuse."""
    f = dict(device=dev)
    i32 = dict(dtype=torch.int32, device=dev)
    i64 = dict(dtype=torch.int64, device=dev)
    r3 = torch.tensor([1.0, 2.0, 3.0], **f)
    sr_args = (torch.arange(6, dtype=torch.float64, device=dev), torch.zeros(6, **i32),
               torch.tensor([0, 1, 2, 9, 4, 5, -1], **i64), torch.tensor([0, 2, 4, 3, 7, 9], **i64))
    g, lam = 0.9, 0.8
    r4, v4 = torch.tensor([1.0, -2.0, 0.5, 3.0], **f), torch.tensor([0.2, 0.1, -0.3, 0.4], **f)

    def gae(r, v, off):  # the fp64 reference's advantages on the CPU
        return ref.step_gae(r.double().cpu(), v.double().cpu(), torch.tensor(off), g, lam)[0]

    def step_gae_order(out):
        adv = out[0]
        _same(adv[0], gae(r4[:3], v4[:3], [0, 3])[0])  # only trajectory 0 covers step 0
        _same(adv[3], gae(r4[1:], v4[1:], [0, 3])[2])  # only trajectory 2 covers step 3

    return {
        "broadcast id": (
            lambda: ops.broadcast_to_tokens(torch.tensor([1.0, 2.0], **f), torch.tensor([0, 10 ** 8, -1, 1, 2], **i32)),
            {"broadcast_to_tokens: token_step": 1}, lambda out: _same(out, [1.0, NAN, 0.0, 2.0, NAN])),
        "step_gae end": (
            lambda: ops.step_gae(r4[:2], v4[:2], torch.tensor([0, 10 ** 6], **i64), g, lam),
            {"step_gae: traj_step_offsets": 0}, lambda out: [_same(o, [NAN, NAN]) for o in out]),
        "step_gae no trajectory": (
            lambda: ops.step_gae(r4[:3], v4[:3], torch.tensor([0], **i64), g, lam),
            {"step_gae: traj_step_offsets": 0}, lambda out: [_same(o, [NAN] * 3) for o in out]),
        "step_gae order": (
            lambda: ops.step_gae(r4, v4, torch.tensor([0, 3, 1, 4], **i64), g, lam),
            {"step_gae: traj_step_offsets": 1}, step_gae_order),
        "token_gae token": (
            lambda: ops.token_gae(r3, r3, torch.tensor([0, 10 ** 6], **i64), torch.tensor([0, 2], **i64),
                                  torch.tensor([0, 1], **i64), g, lam),
            {"token_gae: step_tokens": 1}, lambda out: [_same(o, [NAN, 0.0, 0.0]) for o in out]),
        "token_gae step offsets": (
            lambda: ops.token_gae(r3, r3, torch.tensor([0, 1, 2], **i64), torch.tensor([0, 2, 5], **i64),
                                  torch.tensor([0, 2], **i64), g, lam),
            {"token_gae: step_token_offsets": 1}, lambda out: [_same(o, [NAN, NAN, 0.0]) for o in out]),
        "token_gae trajectory offsets": (
            lambda: ops.token_gae(r3, r3 * 0, torch.tensor([0, 1, 2], **i64), torch.tensor([0, 1, 3], **i64),
                                  torch.tensor([0, 1, 5], **i64), g, lam),
            {"token_gae: traj_step_offsets": 1},
            lambda out: (_same(out[0], [1.0, NAN, NAN]), _same(out[1], [1.0, NAN, NAN]))),
        "step_rewards cuda": (
            lambda: ops.step_rewards(*sr_args, backend="cuda"),
            {"step_rewards: step_token_offsets": 2, "step_rewards: step_tokens": 3},
            lambda out: _same(out, [1.0, NAN, NAN, NAN, NAN])),
        "step_rewards triton": (
            lambda: ops.step_rewards(*sr_args, backend="triton"),
            {"step_rewards: step_token_offsets": 2, "step_rewards: step_tokens": 3},
            lambda out: _same(out, [1.0, NAN, NAN, NAN, NAN])),
    }


_BAD_CASES = list(_bad_calls("cpu"))


@pytest.mark.parametrize("case", _BAD_CASES)
def test_gpu_kernels_skip_a_bad_index_write_nan_and_report_it(case):
    dev = torch.device("cuda")
    call, words, check = _bad_calls(dev)[case]
    ops.index_errors(dev)
    out = call()
    check(out)
    assert ops.index_errors(dev) == words
    assert ops.index_errors(dev) == {}
    call()
    with pytest.raises(ValueError, match=re.escape(next(iter(words))) + r"\[\d+\]"):
        ops.check_index_errors(dev)


def test_gpu_kernels_report_bad_indices_without_synchronising():
    dev = torch.device("cuda")
    calls = _bad_calls(dev)
    for call, _, _ in calls.values():  # first calls compile and load kernels
        call()
    ops.index_errors(dev)
    with no_sync():
        outs = [call() for call, _, _ in calls.values()]
    for (_, _, check), out in zip(calls.values(), outs):
        check(out)
    want = {}
    for _, words, _ in calls.values():
        for k, v in words.items():
            want[k] = min(want.get(k, v), v)
    assert ops.index_errors(dev) == want


def test_gpu_sync_index_checks_raise_the_cpp_kernels_error(monkeypatch):
    dev = torch.device("cuda")
    monkeypatch.setenv("STEPPO_FAST_SYNC_INDEX_CHECKS", "1")
    with pytest.raises(ValueError, match=r"token_step\[1\] = 100000000 is not below the number of step values \(2\)"):
        ops.broadcast_to_tokens(torch.ones(2, device=dev), torch.tensor([0, 10 ** 8], dtype=torch.int32, device=dev))
    with pytest.raises(ValueError, match=r"step_tokens\[1\] = 1000000 is outside \[0, 3\)"):
        ops.token_gae(torch.zeros(3, device=dev), torch.zeros(3, device=dev),
                      torch.tensor([0, 10 ** 6], device=dev), torch.tensor([0, 2], device=dev),
                      torch.tensor([0, 1], device=dev))
    for backend in ("cuda", "triton"):
        with pytest.raises(ValueError, match=r"step_token_offsets must be non-decreasing offsets in \[0, 7\]"):
            _bad_calls(dev)[f"step_rewards {backend}"][0]()
    ops.index_errors(dev)
    ops.broadcast_to_tokens(torch.ones(2, device=dev), torch.tensor([0, 1], dtype=torch.int32, device=dev))
    assert ops.index_errors(dev) == {}  # the calls had words of their own


def test_gpu_good_calls_report_nothing_and_keep_their_bits():
    dev = torch.device("cuda")
    lay, rew = _layout(dev, seed=7, n_traj=64)
    g = torch.Generator(device=dev).manual_seed(7)
    N, S = lay.num_tokens, lay.num_steps
    sv, tv = torch.randn(S, device=dev, generator=g), torch.randn(N, device=dev, generator=g)
    ts, tok, soff, toff = lay.token_step, lay.step_tokens, lay.step_token_offsets, lay.traj_step_offsets

    def run():
        sr = {b: ops.step_rewards(rew, ts, tok, soff, b) for b in ("cuda", "triton")}
        return [sr["cuda"], sr["triton"], ops.broadcast_to_tokens(sr["cuda"], ts),
                *ops.step_gae(sr["cuda"], sv, toff, 0.99, 0.95), *ops.token_gae(rew, tv, tok, soff, toff, 0.99, 0.95)]

    ops.index_errors(dev)
    first = run()
    assert ops.index_errors(dev) == {}
    for a, b in zip(first, run()):  # deterministic
        assert torch.equal(a, b)
    cpu = [rew.cpu(), ts.cpu(), tok.cpu(), soff.cpu(), toff.cpu()]
    # The CUDA step rewards sum each step in the C++ kernel's order; broadcasting is a copy.
    assert torch.equal(first[0].cpu(), ops.step_rewards(*cpu[:4], backend="cpp"))
    assert torch.equal(first[2].cpu(), ops.broadcast_to_tokens(first[0].cpu(), cpu[1], backend="cpp"))
    want = ref.step_rewards(rew.double().cpu(), cpu[1], S)
    assert_close(first[1], want)
    adv, ret = ref.step_gae(first[0].double().cpu(), sv.double().cpu(), cpu[4], 0.99, 0.95)
    assert_close(first[3], adv) and assert_close(first[4], ret)
    adv, ret = ref.token_gae(rew.double().cpu(), tv.double().cpu(), cpu[2], cpu[3], cpu[4], 0.99, 0.95)
    assert_close(first[5], adv) and assert_close(first[6], ret)
    # Words of their own for each call, checked at once: the same bits.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEPPO_FAST_SYNC_INDEX_CHECKS", "1")
        for a, b in zip(first, run()):
            assert torch.equal(a, b)


def test_gpu_kernels_agree_with_the_cpp_checks_on_random_indices():
    """tests/robustness_fuzz.py's GPU family: every index-checked CUDA and Triton kernel against the
    C++ kernel on random offsets and indices, in a child process (an illegal address would leave
    the CUDA context of this one unusable)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, os.path.join(root, "tests", "robustness_fuzz.py"), "300", "cuda"],
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0 and "GPU kernels agree with the C++ checks" in out.stdout, (
        f"exit code {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
