"""The Liger adapter against Liger-Kernel itself (pip ``liger-kernel``, CPU, its loss uncompiled):
StepPOFusedLinearGRPOLoss must give LigerFusedLinearGRPOLoss's loss, metrics and gradients of the
hidden states, the weight and the bias; with steps inside rows (which Liger cannot express) it is
checked against the fp64 reference on materialised logits."""

import pytest
import torch

liger_grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")

from steppo_fast import StepLayout, reference  # noqa: E402
from steppo_fast.integrations.liger import StepPOFusedLinearGRPOLoss  # noqa: E402
from steppo_fast.testing import assert_close  # noqa: E402

B, T, H, V = 4, 9, 16, 37


def _batch(seed=0, turns=False, empty_row=False, with_bias=True, temperature=1.0):
    """Hidden states, head, sampled tokens and a right-padded mask; ``turns`` masks tool tokens out
    inside the rows (two or three runs per row); ``empty_row`` gives row 2 no token at all. Old and
    reference log-probs lie near the current ones at ``temperature``."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = 0.5 * torch.randn(V, H, generator=g)
    bias = 0.1 * torch.randn(V, generator=g) if with_bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([9, 7, 8, 5])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    if turns:
        mask[0, 3:5] = 0
        mask[1, 2] = 0
        mask[1, 5] = 0
        mask[2, 4:6] = 0
    if empty_row:
        mask[2] = 0
    adv = torch.tensor([1.0, -0.7, 0.4, -1.2])
    with torch.no_grad():
        logp = torch.log_softmax((hidden @ weight.T + (0 if bias is None else bias)) / temperature, dim=-1)
        logp = logp.gather(-1, ids[..., None]).squeeze(-1)
    old = logp + 0.3 * torch.randn(B, T, generator=g)
    ref = logp + 0.2 * torch.randn(B, T, generator=g)
    ref_hidden = hidden + 0.1 * torch.randn(B, T, H, generator=g)
    ref_weight = weight + 0.05 * torch.randn(V, H, generator=g)
    return dict(hidden=hidden, weight=weight, bias=bias, ids=ids, mask=mask, adv=adv, old=old, ref=ref,
                ref_hidden=ref_hidden, ref_weight=ref_weight)


def _run(loss_fn, b, grads=True, **call):
    h = b["hidden"].clone().requires_grad_(True)
    w = b["weight"].clone().requires_grad_(True)
    bias = None if b["bias"] is None else b["bias"].clone().requires_grad_(True)
    kw = dict(bias=bias, old_per_token_logps=b["old"], ref_per_token_logps=b["ref"])
    kw.update(call)
    loss, metrics = loss_fn(h, w, b["ids"], b["mask"], b["adv"], **kw)
    if not grads:
        return loss.detach(), metrics, None
    wrt = [h, w] + ([bias] if bias is not None else [])
    g = torch.autograd.grad(loss, wrt)
    return loss.detach(), metrics, g


def _compare(ours, theirs):
    (l1, m1, g1), (l2, m2, g2) = ours, theirs
    assert_close(l1, l2, torch.float32, msg="loss")
    assert len(m1) == len(m2)
    for a, b in zip(m1, m2):
        assert_close(a, b, torch.float32, msg="metric")
    for name, a, b in zip(("hidden", "weight", "bias"), g1, g2):
        # Sums over tokens of both signs: compare at fp32 rounding of the largest entry.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()) + 1e-7,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert abs(float(l2)) > 1e-4, "the loss is 0: the test shows nothing"


def _pair(**kw):
    return (StepPOFusedLinearGRPOLoss(**kw),
            liger_grpo.LigerFusedLinearGRPOLoss(compiled=False, **kw))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_equals_liger(loss_type, level):
    b = _batch(seed=1)
    kw = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.0, use_ref_model=False,
              max_completion_length=T if loss_type == "dr_grpo" else None)
    ours, theirs = _pair(**kw)
    _compare(_run(ours, b), _run(theirs, b))


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("ref", ["logps", "input"])
def test_equals_liger_with_kl_bias_temperature_and_is_weights(level, ref):
    """beta != 0 (the kl metric comes first), reference from log-probs or from hidden states,
    temperature, vLLM importance weights, eps_low != eps_high, a chunked Liger."""
    b = _batch(seed=2, temperature=0.7)
    kw = dict(loss_type="grpo", importance_sampling_level=level, beta=0.05, epsilon_low=0.15, epsilon_high=0.28,
              temperature=0.7, chunk_size=2)
    ours, theirs = _pair(**kw)
    g = torch.Generator().manual_seed(3)
    shape = (B, T) if level == "token" else (B, 1)
    call = dict(vllm_is_ratio=0.5 + torch.rand(shape, generator=g))
    if ref == "input":
        call.update(ref_per_token_logps=None, ref_input=b["ref_hidden"], ref_weight=b["ref_weight"], ref_bias=None)
    o, t = _run(ours, b, **call), _run(theirs, b, **call)
    assert len(o[1]) == 2 and float(o[1][0]) > 1e-4
    _compare(o, t)


@pytest.mark.parametrize("is_shape", [(B,), (B, 1)])
def test_equals_liger_on_policy_and_row_weights(is_shape):
    """old_per_token_logps=None (ratio 1), (B,) / (B, 1) importance weights, no bias, the dapo
    normaliser from num_items_in_batch, and Liger's default loss type."""
    b = _batch(seed=4, with_bias=False)
    ours, theirs = _pair(beta=0.0, use_ref_model=False)
    w = torch.linspace(0.5, 1.5, B).reshape(is_shape)
    call = dict(old_per_token_logps=None, vllm_is_ratio=w, num_items_in_batch=torch.tensor(41.0))
    _compare(_run(ours, b, **call), _run(theirs, b, **call))


def test_equals_liger_with_empty_row_and_multi_run_mask():
    """A row with no token counts in grpo's mean over rows; a mask with holes is still one step
    per row by default (step_boundaries="completion"), Liger's sequence ratio."""
    b = _batch(seed=5, turns=True, empty_row=True)
    ours, theirs = _pair(loss_type="grpo", importance_sampling_level="sequence", beta=0.0, use_ref_model=False)
    _compare(_run(ours, b), _run(theirs, b))


def _turn_step_ids(mask):
    """Steps = maximal runs of the mask, found by hand; a row without token holds one empty step."""
    sid = torch.full(mask.shape, -1)
    for r, row in enumerate(mask.tolist()):
        k, prev = -1, 0
        for j, v in enumerate(row):
            if v and not prev:
                k += 1
            if v:
                sid[r, j] = k
            prev = v
    return sid


def _reference_fp64(b, sid, loss_type, level, beta=0.0, temperature=1.0, max_completion_length=None,
                    num_items=None):
    """The fp64 oracle on materialised logits: (loss, (hidden, weight, bias) gradients)."""
    h = b["hidden"].double().requires_grad_(True)
    w = b["weight"].double().requires_grad_(True)
    bias = b["bias"].double().requires_grad_(True)
    logits = h @ w.T + bias
    lp, _ = reference.token_logprobs(logits.reshape(B * T, V), b["ids"].reshape(-1), None, temperature)
    lay = StepLayout.from_packed(sid, num_steps=(sid.max(1).values + 1).clamp(min=1))
    agg = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
           "dapo": "token-sum"}[loss_type]
    gns = {"grpo": lay.num_steps, "dr_grpo": B}.get(loss_type)
    loss, _ = reference.policy_loss(lp, b["old"].double().reshape(-1),
                                    b["adv"].double()[:, None].expand(B, T).reshape(-1), lay.token_step,
                                    lay.num_steps, "step" if level == "sequence" else "token", agg_mode=agg,
                                    ref_logp=b["ref"].double().reshape(-1) if beta else None, kl_coef=beta,
                                    global_num_steps=gns, norm_constant=max_completion_length)
    if loss_type == "dapo":
        loss = loss / (b["mask"].sum() if num_items is None else num_items)
    return loss.detach(), torch.autograd.grad(loss, [h, w, bias])


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("empty_row", [False, True])
def test_turns_against_reference_fp64(loss_type, empty_row):
    """step_boundaries="turns": one ratio per run of the mask, against the fp64 reference with
    materialised logits (loss and the three gradients)."""
    b = _batch(seed=6, turns=True, empty_row=empty_row, temperature=0.9)
    mcl = T if loss_type == "dr_grpo" else None
    ours = StepPOFusedLinearGRPOLoss(loss_type=loss_type, importance_sampling_level="sequence", beta=0.04,
                                     temperature=0.9, max_completion_length=mcl, step_boundaries="turns")
    loss, metrics, grads = _run(ours, b)
    ref_loss, ref_grads = _reference_fp64(b, _turn_step_ids(b["mask"]), loss_type, "sequence", beta=0.04,
                                          temperature=0.9, max_completion_length=mcl)
    assert_close(loss, ref_loss, torch.float32, msg="loss")
    for name, a, e in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert_close(a, e, torch.float32, msg=name)
    # Liger (one ratio per row) gives a different number on these rows.
    liger = liger_grpo.LigerFusedLinearGRPOLoss(compiled=False, loss_type=loss_type,
                                                importance_sampling_level="sequence", beta=0.04, temperature=0.9,
                                                max_completion_length=mcl)
    assert abs(float(_run(liger, b, grads=False)[0]) - float(loss)) > 1e-5


def _liger_on_step_rows(liger, b, sid):
    """Liger's own loss on the same episodes split into one row per step (hidden states gathered,
    so gradients flow back to the trajectory rows): (loss, metrics, gradients)."""
    k = (sid.max(1).values + 1).clamp(min=1)
    rows = torch.repeat_interleave(torch.arange(B), k)
    ks = torch.cat([torch.arange(int(n)) for n in k])
    masks = (sid[rows] == ks[:, None]).long()
    h = b["hidden"].clone().requires_grad_(True)
    w = b["weight"].clone().requires_grad_(True)
    bias = b["bias"].clone().requires_grad_(True)
    loss, metrics = liger(h[rows], w, b["ids"][rows], masks, b["adv"][rows], bias=bias,
                          old_per_token_logps=b["old"][rows], ref_per_token_logps=b["ref"][rows])
    return loss.detach(), metrics, torch.autograd.grad(loss, [h, w, bias])


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo"])
def test_turns_equal_liger_on_step_rows(loss_type):
    """One row per trajectory with step_boundaries="turns" equals Liger's own loss on the same
    episodes laid out one row per turn (loss, metrics and the three gradients)."""
    b = _batch(seed=8, turns=True, empty_row=True, temperature=0.8)
    kw = dict(loss_type=loss_type, importance_sampling_level="sequence", beta=0.04, temperature=0.8)
    ours = StepPOFusedLinearGRPOLoss(step_boundaries="turns", **kw)
    call = dict(num_items_in_batch=torch.tensor(30.0)) if loss_type == "dapo" else {}
    theirs = liger_grpo.LigerFusedLinearGRPOLoss(compiled=False, **kw)
    sid = _turn_step_ids(b["mask"])
    t_loss, t_metrics, t_grads = _liger_on_step_rows(lambda *a, **k: theirs(*a, **k, **call), b, sid)
    _compare(_run(ours, b, **call), (t_loss, t_metrics, t_grads))


def test_step_ids_and_step_starts_arguments():
    """Explicit step_ids, and step_starts splitting a row, against the fp64 reference."""
    b = _batch(seed=7)
    ours = StepPOFusedLinearGRPOLoss(loss_type="grpo", importance_sampling_level="sequence", beta=0.0,
                                     use_ref_model=False)
    mask = b["mask"].bool()
    sid = torch.where(mask, (torch.arange(T)[None, :] >= 3).long() + (torch.arange(T)[None, :] >= 6).long(), -1)
    loss, _, grads = _run(ours, b, step_ids=sid)
    ref_loss, ref_grads = _reference_fp64(b, sid, "grpo", "sequence")
    assert_close(loss, ref_loss, torch.float32)
    for a, e in zip(grads, ref_grads):
        assert_close(a, e, torch.float32)
    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[:, 3] = True
    starts[:, 6] = True
    loss2, _, grads2 = _run(ours, b, step_starts=starts)
    assert_close(loss2, ref_loss, torch.float32)
    for a, e in zip(grads2, ref_grads):
        assert_close(a, e, torch.float32)


def test_invalid_importance_sampling_level_raises_ligers_error():
    b = _batch()
    liger = liger_grpo.LigerFusedLinearGRPOLoss(compiled=False, importance_sampling_level="step", beta=0.0,
                                                use_ref_model=False)
    with pytest.raises(ValueError) as theirs:
        _run(liger, b, grads=False)
    with pytest.raises(ValueError) as ours:
        StepPOFusedLinearGRPOLoss(importance_sampling_level="step")
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("kw,match", [
    (dict(loss_type="cispo"), "loss_type='cispo' has no counterpart"),
    (dict(loss_type="sapo"), "loss_type='sapo' has no counterpart"),
    (dict(loss_type="luspo"), "loss_type='luspo' has no counterpart"),
    (dict(loss_type="vespo"), "loss_type='vespo' has no counterpart"),
    (dict(loss_type="ppo"), "loss_type='ppo' is unknown"),
    (dict(delta=4.0), "delta=4.0"),
    (dict(use_bias_correction_kl=True), "use_bias_correction_kl=True"),
    (dict(loss_type="dr_grpo"), "max_completion_length must be provided"),
    (dict(sapo_temperature_neg=0.0), "sapo_temperature_neg must be positive"),
    (dict(epsilon_low=0.0), "clip_low must be > 0"),
    (dict(temperature=0.0), "temperature must be a number > 0"),
    (dict(step_boundaries="steps"), "step_boundaries must be"),
])
def test_options_without_counterpart_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        StepPOFusedLinearGRPOLoss(**kw)


def test_bad_call_arguments_are_refused():
    b = _batch()
    loss_fn = StepPOFusedLinearGRPOLoss(beta=0.0, use_ref_model=False)
    with pytest.raises(ValueError, match=r"advantages must have shape \(B,\)"):
        loss_fn(b["hidden"], b["weight"], b["ids"], b["mask"], b["adv"][:2])
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(B, T\)"):
        loss_fn(b["hidden"], b["weight"], b["ids"], b["mask"][:, :-1], b["adv"])
    with pytest.raises(ValueError, match=r"_input must be hidden states of shape \(B, T, H\)"):
        loss_fn(b["hidden"].reshape(B * T, H), b["weight"], b["ids"], b["mask"], b["adv"])
    with pytest.raises(ValueError, match="vllm_is_ratio must have shape"):
        loss_fn(b["hidden"], b["weight"], b["ids"], b["mask"], b["adv"], vllm_is_ratio=torch.ones(B, 2))
    seq = StepPOFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, importance_sampling_level="sequence")
    with pytest.raises(ValueError, match=r"vllm_is_ratio of shape \(B, T\) with importance_sampling_level='sequence'"):
        seq(b["hidden"], b["weight"], b["ids"], b["mask"], b["adv"], vllm_is_ratio=torch.ones(B, T))
    with pytest.raises(ValueError, match="use_ref_model=True needs ref_per_token_logps or ref_input"):
        StepPOFusedLinearGRPOLoss()(b["hidden"], b["weight"], b["ids"], b["mask"], b["adv"])
    mask = b["mask"].bool()
    holes = torch.where(mask, 0, -1)
    holes[1, 0] = -1
    with pytest.raises(ValueError, match="row 1: step ids leave tokens outside every step"):
        loss_fn(b["hidden"], b["weight"], b["ids"], b["mask"], b["adv"], step_ids=holes)
    with pytest.raises(ValueError, match="gap in step indices"):
        gap = torch.where(mask, 2 * (torch.arange(T)[None, :] >= 4).long(), -1)  # steps 0 and 2, no step 1
        loss_fn(b["hidden"], b["weight"], b["ids"], b["mask"], b["adv"], step_ids=gap)
    with pytest.raises(TypeError, match="step_ids must be an integer"):
        loss_fn(b["hidden"], b["weight"], b["ids"], b["mask"], b["adv"], step_ids=mask.float())
