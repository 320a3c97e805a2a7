"""CUDA-graph capture of the loss and advantage paths (GPU only).

Each path is captured once, forward and backward (the gradients through
``torch.autograd.grad`` inside the graph), on static input buffers over a prebuilt StepLayout;
new inputs are then copied into those buffers, the graph is replayed, and its outputs must equal
an eager run on the new inputs. A host synchronisation anywhere on the path makes the capture
itself fail ("operation not permitted when stream is capturing").
"""

import pytest
import torch

import steppo_fast as sf
from steppo_fast.testing import assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _layout(B=8, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    traj = torch.arange(B) // 2
    step = torch.arange(B) % 2
    perm = torch.randperm(B, generator=g)
    return sf.StepLayout.from_step_rows(mask[perm], traj[perm], step[perm], traj[perm] // 2).to("cuda")


def _fresh(like: torch.Tensor, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(like.shape, generator=g, device="cuda", dtype=torch.float32) * scale).to(like.dtype)


def _capture(fn, static):
    """Warm up on a side stream (kernel compilation, library handles), then capture fn(*static)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    return graph, out


def _replay_matches_eager(fn, static, new_inputs, dtype_tol=None):
    graph, out = _capture(fn, static)
    for seed, new in enumerate(new_inputs):
        with torch.no_grad():
            for buf, x in zip(static, new):
                buf.copy_(x)
        graph.replay()
        eager = fn(*[x.detach().clone().requires_grad_(buf.requires_grad) for buf, x in zip(static, new)])
        torch.cuda.synchronize()
        for i, (o, e) in enumerate(zip(out, eager)):
            assert torch.isfinite(o).all(), f"replay {seed}, output {i}"
            assert_close(o, e, dtype=dtype_tol, msg=f"replay {seed}, output {i}")


def _loss_inputs(lay, V, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    B, T = lay.token_shape
    labels = torch.randint(0, V, (B, T), generator=g, device="cuda")
    old = torch.randn(B, T, generator=g, device="cuda") * 0.5 - 3.0
    adv = torch.randn(B, T, generator=g, device="cuda")
    return labels, old, adv


@pytest.mark.parametrize("level", ["step", "token"])
def test_steppo_loss_from_logits_replays(level):
    lay = _layout()
    B, T = lay.token_shape
    V = 1000
    labels, old, adv = _loss_inputs(lay, V, 1)
    loss_fn = sf.StepPOLoss({"ratio_level": level, "entropy_coef": 0.01}, validate=False)

    def fn(logits, old_logp, advantages):
        loss, metrics = loss_fn(logits, labels, lay, old_logp, advantages)
        (g,) = torch.autograd.grad(loss, [logits])
        return loss.detach(), metrics["pg_clipfrac"], g

    logits = torch.randn(B, T, V, device="cuda", requires_grad=True)
    static = [logits, old.clone(), adv.clone()]
    new = [[_fresh(logits, 10 + k, 2.0), _fresh(old, 20 + k, 0.5) - 3.0, _fresh(adv, 30 + k)] for k in range(2)]
    _replay_matches_eager(fn, static, new)


def test_steppo_loss_from_hidden_states_replays():
    lay = _layout()
    B, T = lay.token_shape
    V, H = 1000, 64
    labels, old, adv = _loss_inputs(lay, V, 2)
    # Chunks smaller than the batch: several products and whole-step chunks, planned on the host.
    loss_fn = sf.StepPOLoss({"entropy_coef": 0.01}, chunk=48, validate=False)

    def fn(hidden, weight, old_logp, advantages):
        loss, _ = loss_fn(hidden, labels, lay, old_logp, advantages, weight=weight)
        gh, gw = torch.autograd.grad(loss, [hidden, weight])
        return loss.detach(), gh, gw

    hidden = torch.randn(B, T, H, device="cuda", requires_grad=True)
    weight = (torch.randn(V, H, device="cuda") / H ** 0.5).requires_grad_(True)
    static = [hidden, weight, old.clone(), adv.clone()]
    new = [[_fresh(hidden, 40 + k), _fresh(weight, 50 + k, H ** -0.5), _fresh(old, 60 + k, 0.5) - 3.0,
            _fresh(adv, 70 + k)] for k in range(2)]
    _replay_matches_eager(fn, static, new)


def test_policy_loss_replays():
    lay = _layout()
    B, T = lay.token_shape
    _, old, adv = _loss_inputs(lay, 10, 3)

    def fn(logp, entropy, advantages):
        loss, metrics = sf.policy_loss(logp, old, advantages, lay, ratio_level="step", entropy=entropy,
                                       entropy_coef=0.01)
        g_lp, g_ent = torch.autograd.grad(loss, [logp, entropy])
        return loss.detach(), metrics["ratio_mean"], g_lp, g_ent

    logp = (old + 0.1 * torch.randn(B, T, device="cuda")).requires_grad_(True)
    ent = torch.rand(B, T, device="cuda", requires_grad=True)
    static = [logp, ent, adv.clone()]
    new = [[old + _fresh(old, 80 + k, 0.1), _fresh(ent, 90 + k).abs(), _fresh(adv, 100 + k)] for k in range(2)]
    _replay_matches_eager(fn, static, new)


@pytest.mark.parametrize("estimator", ["step_gae", "token_gae", "grpo", "rloo", "gigpo"])
def test_compute_advantages_replays(estimator):
    lay = _layout()
    B, T = lay.token_shape
    anchors = torch.arange(lay.num_steps, device="cuda") % 3

    def fn(rewards, values):
        a = sf.compute_advantages(estimator, lay, token_rewards=rewards, values=values, anchor_keys=anchors,
                                  gamma=0.9, lam=0.95)
        return a.token_advantages, a.token_returns

    mask = lay.token_mask.reshape(B, T)
    static = [torch.randn(B, T, device="cuda") * mask, torch.randn(B, T, device="cuda")]
    new = [[_fresh(static[0], 110 + k) * mask, _fresh(static[1], 120 + k)] for k in range(2)]
    _replay_matches_eager(fn, static, new)
