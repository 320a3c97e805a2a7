"""torch.compile(fullgraph=True) of the fronts: StepPOLoss (from logits and from hidden states),
policy_loss and compute_advantages over a prebuilt StepLayout trace as one graph, forward and
backward, and give eager's numbers.

``fullgraph=True`` turns any graph break into an error. The CPU runs use the ``aot_eager``
backend: Dynamo and AOTAutograd trace every op through its fake kernel and its registered
autograd formula, as Inductor would, without Inductor's C++ code generation (tens of seconds
per graph on a small CPU). On a GPU one test also runs Inductor end to end.
"""

import pytest
import torch

import steppo_fast as sf
from steppo_fast.testing import assert_close

DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                    reason="needs a CUDA device"))]


def _batch(device, B=6, T=7, V=37, H=16, seed=0):
    """Step rows of three trajectories (rows shuffled), some tokens masked out, and the
    tensors a loss takes; old log-probs near the current ones so that some steps clip."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.35
    mask[:, 0] = True
    traj = torch.tensor([2, 0, 1, 0, 2, 1])[:B]
    step = torch.tensor([1, 0, 1, 1, 0, 0])[:B]
    lay = sf.StepLayout.from_step_rows(mask, traj, step, torch.tensor([0, 0, 0, 0, 0, 0])[:B]).to(device)
    logits = torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    lp = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    t = {
        "lay": lay, "logits": logits, "labels": labels,
        "old": lp + 0.3 * torch.randn(B, T, generator=g), "adv": torch.randn(B, T, generator=g),
        "hidden": torch.randn(B, T, H, generator=g), "weight": torch.randn(V, H, generator=g) / H ** 0.5,
        "logp": lp - 0.1 * torch.rand(B, T, generator=g), "entropy": torch.rand(B, T, generator=g) * 3,
        "ref": lp + 0.2 * torch.randn(B, T, generator=g), "w": torch.rand(B, T, generator=g) + 0.5,
        "rewards": torch.randn(B, T, generator=g) * mask, "values": torch.randn(B, T, generator=g),
        "anchors": torch.randint(0, 3, (lay.num_steps,), generator=g),
    }
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}


def _compile(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def _check_loss_and_grads(fn, inputs):
    """fn(*leaves) -> 0-dim loss; compiled and eager give the same loss and gradients."""
    eager_in, comp_in = _leaves(*inputs), _leaves(*inputs)
    loss_e = fn(*eager_in)
    grads_e = torch.autograd.grad(loss_e, eager_in)
    loss_c = _compile(fn)(*comp_in)
    grads_c = torch.autograd.grad(loss_c, comp_in)
    assert loss_c.requires_grad and loss_c.dim() == 0
    assert_close(loss_c, loss_e, msg="loss")
    for i, (gc, ge) in enumerate(zip(grads_c, grads_e)):
        assert gc.abs().sum() > 0, f"input {i}: zero gradient"
        assert_close(gc, ge, msg=f"gradient of input {i}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("level", ["step", "token"])
def test_steppo_loss_from_logits_compiles_in_one_graph(device, level):
    t = _batch(device)
    loss_fn = sf.StepPOLoss({"ratio_level": level, "entropy_coef": 0.01, "dual_clip": 3.0}, temperature=0.8,
                            validate=False)

    def fn(logits):
        loss, metrics = loss_fn(logits, t["labels"], t["lay"], t["old"], t["adv"])
        return loss + 0.0 * metrics["ratio_max"]  # the metrics are part of the graph too

    _check_loss_and_grads(fn, [t["logits"]])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [None, 5])
def test_steppo_loss_from_hidden_states_compiles_in_one_graph(device, chunk):
    # chunk=5 < the agent tokens of the batch and shorter than some steps: eager plans chunks of
    # whole steps from the host offsets, the trace plans the batch as one long step.
    t = _batch(device)
    assert t["lay"].num_active_tokens > 3 * 5
    loss_fn = sf.StepPOLoss({"clip_high": 0.28, "entropy_coef": 0.01}, chunk=chunk, validate=False)

    def fn(hidden, weight):
        loss, _ = loss_fn(hidden, t["labels"], t["lay"], t["old"], t["adv"], weight=weight)
        return loss

    _check_loss_and_grads(fn, [t["hidden"], t["weight"]])


@pytest.mark.parametrize("device", DEVICES)
def test_policy_loss_compiles_in_one_graph(device):
    t = _batch(device)

    def fn(logp, entropy):
        loss, metrics = sf.policy_loss(logp, t["old"], t["adv"], t["lay"], ratio_level="step", clip_high=0.28,
                                       weights=t["w"], entropy=entropy, entropy_coef=0.01, ref_logp=t["ref"],
                                       kl_coef=0.05)
        return loss + 0.0 * metrics["pg_clipfrac"]

    _check_loss_and_grads(fn, [t["logp"], t["entropy"]])


@pytest.mark.parametrize("device", DEVICES)
def test_compute_advantages_compiles_in_one_graph(device):
    """Every estimator in one traced function."""
    t = _batch(device)
    lay = t["lay"]

    def fn(rewards, values):
        out = []
        for est in sf.advantages.ESTIMATORS:
            a = sf.compute_advantages(est, lay, token_rewards=rewards, values=values, anchor_keys=t["anchors"],
                                      gamma=0.9, lam=0.95)
            out += [a.token_advantages, a.token_returns]
        return tuple(out)

    eager = fn(t["rewards"], t["values"])
    compiled = _compile(fn)(t["rewards"], t["values"])
    assert len(compiled) == 2 * len(sf.advantages.ESTIMATORS)
    for i, (c, e) in enumerate(zip(compiled, eager)):
        assert c.abs().sum() > 0, sf.advantages.ESTIMATORS[i // 2]
        assert_close(c, e, msg=sf.advantages.ESTIMATORS[i // 2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor end to end on a GPU only (minutes on a CPU)")
def test_steppo_loss_from_logits_under_inductor_cuda():
    t = _batch("cuda")
    loss_fn = sf.StepPOLoss(validate=False)

    def fn(logits):
        return loss_fn(logits, t["labels"], t["lay"], t["old"], t["adv"])[0]

    eager_in, comp_in = _leaves(t["logits"]), _leaves(t["logits"])
    loss_e = fn(*eager_in)
    (g_e,) = torch.autograd.grad(loss_e, eager_in)
    torch._dynamo.reset()
    loss_c = torch.compile(fn, fullgraph=True)(*comp_in)
    (g_c,) = torch.autograd.grad(loss_c, comp_in)
    assert_close(loss_c, loss_e)
    assert_close(g_c, g_e)


def test_steppo_loss_validate_flag():
    """validate=True (the default) names a bad label; validate=False, the setting for compiled or
    captured losses, skips the host check and the bad label's row gives NaN."""
    t = _batch("cpu")
    labels = t["labels"].clone()
    row, col = (t["lay"].token_mask.reshape(labels.shape)).nonzero()[0].tolist()
    labels[row, col] = t["logits"].shape[-1]
    with pytest.raises(ValueError, match="labels out of range"):
        sf.StepPOLoss()(t["logits"], labels, t["lay"], t["old"], t["adv"])
    loss, _ = sf.StepPOLoss(validate=False)(t["logits"], labels, t["lay"], t["old"], t["adv"])
    assert torch.isnan(loss)
