"""The verl adapter against verl itself (pip ``verl``, CPU paths): with one step per row the
registered losses equal verl's ``gspo`` (step ratio) and ``vanilla`` (token ratio, dual clip) losses.
The multi-turn layouts are held to the step-row layout in ``test_integrations_verl_layouts.py``."""

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


def _batch(seed=0, B=7, T=11, one_run=False):
    g = torch.Generator().manual_seed(seed)
    if one_run:  # each row one run of agent tokens (a step row), at a random place
        start = torch.randint(0, T // 2, (B,), generator=g)
        length = torch.randint(1, T // 2, (B,), generator=g)
        t = torch.arange(T)
        mask = (t >= start[:, None]) & (t < (start + length)[:, None])
    else:  # several runs per row
        mask = torch.rand(B, T, generator=g) < 0.7
    mask[3] = False  # an empty row (a step without agent tokens)
    old = -2.0 + 0.5 * torch.randn(B, T, generator=g)
    logp = old + 0.3 * torch.randn(B, T, generator=g)  # ratios well outside the clip range too
    adv = torch.randn(B, T, generator=g)
    weights = 0.5 + torch.rand(B, T, generator=g)
    return old, logp, adv, mask, weights


# Within 1e-6 in fp32, relative for values above 1: token-sum losses reach ~20, where one float32
# unit in the last place is 1.9e-6 (steppo_fast sums in float64, verl in float32).
def _run(fn, old, logp, adv, mask, mode, cfg, weights):
    x = logp.clone().requires_grad_(True)
    loss, metrics = fn(old_log_prob=old, log_prob=x, advantages=adv, response_mask=mask, loss_agg_mode=mode,
                       config=cfg, rollout_is_weights=weights)
    (grad,) = torch.autograd.grad(loss, [x])
    return loss.detach(), grad, metrics


# (our loss, verl's, one run per row?): the turn losses on step rows, the row switch on any mask.
PAIRS = [pytest.param("steppo", "gspo", True, id="steppo=gspo"),
         pytest.param("steppo_token", "vanilla", True, id="token=vanilla"),
         pytest.param("steppo_rows", "gspo", False, id="rows=gspo"),
         pytest.param("steppo_token_rows", "vanilla", False, id="token_rows=vanilla")]


@pytest.mark.parametrize("ours,theirs,one_run", PAIRS)
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("with_weights", [False, True])
def test_registered_loss_equals_verls(ours, theirs, one_run, mode, with_weights):
    old, logp, adv, mask, weights = _batch(one_run=one_run)
    cfg = _config()
    w = weights if with_weights else None
    a = _run(core_algos.get_policy_loss_fn(ours), old, logp, adv, mask, mode, cfg, w)
    b = _run(core_algos.get_policy_loss_fn(theirs), old, logp, adv, mask, mode, cfg, w)
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-6)
    for name in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        assert isinstance(a[2][name], torch.Tensor) and a[2][name].dim() == 0
        assert abs(float(a[2][name]) - float(b[2][name])) <= 1e-6, name


@pytest.mark.parametrize("ours,theirs,one_run", PAIRS)
@pytest.mark.parametrize("mode", AGG_MODES)
def test_global_batch_info_is_honoured(ours, theirs, one_run, mode):
    old, logp, adv, mask, _ = _batch(seed=1, one_run=one_run)
    info = {"dp_size": 2, "batch_num_tokens": 123, "global_batch_size": 9, "loss_scale_factor": 16}
    cfg = _config(info)
    a = _run(core_algos.get_policy_loss_fn(ours), old, logp, adv, mask, mode, cfg, None)
    b = _run(core_algos.get_policy_loss_fn(theirs), old, logp, adv, mask, mode, cfg, None)
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-6)


def test_registry_returns_ours():
    assert core_algos.get_policy_loss_fn("steppo") is sv.compute_policy_loss_steppo
    assert core_algos.get_policy_loss_fn("steppo_token") is sv.compute_policy_loss_steppo_token
    assert core_algos.get_policy_loss_fn("steppo_rows") is sv.compute_policy_loss_steppo_rows
    assert core_algos.get_policy_loss_fn("steppo_token_rows") is sv.compute_policy_loss_steppo_token_rows
    assert core_algos.get_adv_estimator_fn("step_gae") is sv.compute_step_gae_advantage
    sv.register()  # idempotent
    assert set(sv.LOSS_MODES) == {"steppo", "steppo_token", "steppo_rows", "steppo_token_rows"}


def test_turn_losses_differ_from_verls_on_multi_turn_rows():
    # The bug the turn losses fix: on rows holding several turns verl's gspo takes one ratio per row.
    old, logp, adv, mask, _ = _batch(seed=2)
    cfg = _config()
    ours = _run(core_algos.get_policy_loss_fn("steppo"), old, logp, adv, mask, "seq-mean-token-mean", cfg, None)
    gspo = _run(core_algos.get_policy_loss_fn("gspo"), old, logp, adv, mask, "seq-mean-token-mean", cfg, None)
    assert not torch.allclose(ours[1], gspo[1], rtol=1e-3, atol=1e-6)


def test_missing_config_is_a_clear_error():
    old, logp, adv, mask, _ = _batch()
    with pytest.raises(ValueError, match="config is required"):
        sv.compute_policy_loss_steppo(old, logp, adv, mask, "token-mean", None)


# ------------------------------------------------------------------ credit assignment
def _data_proto(seed=0, n_groups=3, group_size=4, T=9, with_steps=False):
    import numpy as np
    from verl import DataProto

    g = torch.Generator().manual_seed(seed)
    B = n_groups * group_size
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[:, 0] = True
    lengths = mask.sum(1)
    last = torch.stack([torch.nonzero(mask[i])[-1, 0] for i in range(B)])
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), last] = torch.randn(B, generator=g)
    values = torch.randn(B, T, generator=g)
    uids = np.array([f"task-{i // group_size}" for i in range(B)], dtype=object)
    extra = {"uid": uids}
    if with_steps:  # trajectories of 2 steps (rows 2r, 2r + 1), listed in reverse step order
        extra["trajectory_uids"] = np.array([f"traj-{i // 2}" for i in range(B)], dtype=object)
        extra["step_indices"] = np.array([1 - i % 2 for i in range(B)], dtype=np.int64)
    assert bool((lengths > 0).all())
    return DataProto.from_dict(tensors={"response_mask": mask.float(), "token_level_rewards": rewards,
                                        "values": values}, non_tensors=extra)


@pytest.mark.parametrize("estimator", ["gae", "grpo", "rloo"])
def test_compute_advantage_equals_verl_on_rows_without_ids(estimator):
    # Rows without step ids are trajectories (several runs of agent tokens each, here): verl's own
    # estimators treat them the same way.
    data = _data_proto()
    b, uid = data.batch, data.non_tensor_batch["uid"]
    # What verl's ray_trainer.compute_advantage calls for each estimator.
    if estimator == "gae":
        want = core_algos.compute_gae_advantage_return(b["token_level_rewards"], b["values"], b["response_mask"],
                                                       gamma=0.9, lam=0.8)
    elif estimator == "grpo":
        want = core_algos.compute_grpo_outcome_advantage(b["token_level_rewards"], b["response_mask"], uid)
    else:
        want = core_algos.compute_rloo_outcome_advantage(b["token_level_rewards"], b["response_mask"], uid)
    ours = sv.compute_advantage(data, estimator, gamma=0.9, lam=0.8)
    m = ours.batch["response_mask"].bool()
    pairs = [("advantages", want[0])] + ([("returns", want[1])] if estimator == "gae" else [])
    for key, theirs in pairs:  # verl leaves values, not zeros, off the mask in gae's outputs: compare on it
        torch.testing.assert_close(ours.batch[key][m], theirs[m].float(), rtol=1e-5, atol=1e-6)


def test_step_gae_reads_steps_from_the_data_proto():
    from steppo_fast import StepLayout, compute_advantages

    data = _data_proto(with_steps=True)
    mask = data.batch["response_mask"].bool()
    out = sv.compute_advantage(data, "step_gae", gamma=0.99, lam=0.95)
    B = mask.shape[0]
    traj = torch.arange(B) // 2
    step = torch.tensor(data.non_tensor_batch["step_indices"])
    lay = StepLayout.from_step_rows(mask, traj, step, torch.arange(B) // 4)
    want = compute_advantages("step_gae", lay, token_rewards=data.batch["token_level_rewards"],
                              values=data.batch["values"], gamma=0.99, lam=0.95, backend="reference")
    torch.testing.assert_close(out.batch["advantages"], want.token_advantages.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.batch["returns"], want.token_returns.float(), rtol=1e-5, atol=1e-6)
    # The registered estimator computes the same when given what verl's registry cannot pass ...
    fn = core_algos.get_adv_estimator_fn("step_gae")
    assert fn is sv.compute_step_gae_advantage
    adv, _ = fn(data.batch["token_level_rewards"], data.batch["response_mask"], index=data.non_tensor_batch["uid"],
                values=data.batch["values"], trajectory_uids=data.non_tensor_batch["trajectory_uids"],
                step_indices=data.non_tensor_batch["step_indices"], gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv, out.batch["advantages"])
    # ... and says what is missing when called the way verl's compute_advantage calls it.
    with pytest.raises(ValueError, match="step_gae needs the critic's values"):
        fn(token_level_rewards=data.batch["token_level_rewards"], response_mask=data.batch["response_mask"],
           config=None, index=data.non_tensor_batch["uid"])


# ------------------------------------------------------------------ fused head
def test_fused_head_forward_equals_verls_torch_backend():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from verl.models.transformers.dense_common import forward_with_torch_backend

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    ids = torch.randint(0, 61, (3, 10))
    outs, grads = [], []
    for forward in (forward_with_torch_backend, sv.forward_with_steppo_fast):
        model.zero_grad()
        out = forward(model, input_ids=ids, attention_mask=torch.ones_like(ids), return_dict=True, temperature=0.7)
        (out.log_probs.sum() + 0.5 * out.entropy.sum()).backward()
        outs.append((out.log_probs.detach(), out.entropy.detach()))
        grads.append((model.lm_head.weight.grad.clone(), model.model.embed_tokens.weight.grad.clone()))
    for a, b in zip(outs[1] + grads[1], outs[0] + grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    bound = sv.use_fused_head(model)
    assert bound is model
    torch.testing.assert_close(model(input_ids=ids, temperature=0.7).log_probs, outs[0][0], rtol=1e-5, atol=1e-5)
    assert type(model).forward is Qwen2ForCausalLM.forward  # the class is untouched
