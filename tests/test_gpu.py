"""What only a GPU can show: no host synchronisation on the GPU paths, kernels on their tensors'
device, the GPU backends against the fp64 reference at sizes the interpreter cannot run.

Skipped without CUDA. The other test files run their Triton and CUDA cases on the GPU too when
there is one (TRITON_DEVICE = "cuda"); these add what has no CPU counterpart.
"""

import contextlib

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
