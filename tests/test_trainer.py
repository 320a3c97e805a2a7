"""The thin trainer: packing, log-probs on the restricted head, an end-to-end run, learning,
exact resume, NaN handling, model loading, errors and data parallel under torchrun."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from steppo_fast.testing import assert_close

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from steppo_fast import cli  # noqa: E402
from steppo_fast.trainer import METHODS, NonFiniteLoss, TrainConfig, Trainer, method_settings  # noqa: E402
from steppo_fast.trainer.models import build_policy, build_tokenizer  # noqa: E402
from steppo_fast.trainer.rollout import Batch, Episode, play  # noqa: E402


def _cfg(tmp_path, **kw):
    base = dict(updates=2, groups=4, group_size=2, out_dir=str(tmp_path / "run"), progress=False, eval_episodes=8,
                log_every=100, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_pack_aligns_tokens_steps_and_rewards():
    a = Episode(group=0, seed=1, tokens=[5, 6, 7, 1, 8, 9, 1], step_ids=[-1, -1, 0, 0, -1, 1, 1],
                rewards=[0.0, 1.0], anchors=[11, 12])
    b = Episode(group=3, seed=2, tokens=[5, 4, 1], step_ids=[-1, 0, 0], rewards=[0.5], anchors=[13])
    batch = Batch.pack([a, b], pad=0, device="cpu")
    assert batch.input_ids.tolist() == [[5, 6, 7, 1, 8, 9, 1], [5, 4, 1, 0, 0, 0, 0]]
    # Position j predicts token j + 1: labels and step ids are shifted by one.
    assert batch.labels.tolist() == [[6, 7, 1, 8, 9, 1], [4, 1, 0, 0, 0, 0]]
    assert batch.step_ids.tolist() == [[-1, 0, 0, -1, 1, 1], [0, 0, -1, -1, -1, -1]]
    lay = batch.layout
    assert lay.num_steps == 3 and lay.step_traj.tolist() == [0, 0, 1]
    assert batch.step_rewards.tolist() == [0.0, 1.0, 0.5] and batch.anchors.tolist() == [11, 12, 13]
    # A step's value is read at the position before its first token: the last observation token.
    values = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    assert lay.step_values_from_tokens(values).tolist() == [1.0, 4.0, 6.0]
    sub = batch.rows(torch.tensor([1]))
    assert sub.input_ids.tolist() == [[5, 4, 1]] and sub.labels.tolist() == [[4, 1]]
    assert sub.layout.num_steps == 1


def test_behaviour_logprobs_equal_the_restricted_softmax_in_fp64(tmp_path):
    tr = Trainer(_cfg(tmp_path, env="hotpot", temperature=0.7))
    tr.model.eval()
    eps = __import__("steppo_fast.trainer.rollout", fromlist=["play"]).play(
        tr.sampler, tr.env_factory, tr.tasks(0, 2), 2, tr.generator(0))
    allowed = set(tr.allowed.tolist())
    for e in eps:
        assert all(t in allowed for t, s in zip(e.tokens, e.step_ids) if s >= 0)
        assert 1 <= e.num_steps <= 5 and len(e.anchors) == e.num_steps
    batch = Batch.pack(eps, tr.sampler.pad, tr.device)
    with torch.no_grad():
        hidden, _ = tr.forward(batch)
        from steppo_fast import linear_token_logprobs

        w, _ = tr.head()
        logp, _ = linear_token_logprobs(hidden, w, tr.head_labels(batch.labels), batch.layout, 0.7)
        # Oracle: the HF model's own logits, restricted to the allowed columns, in fp64.
        logits = tr.model.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        sub = logits.double()[..., tr.allowed] / 0.7
        ref = torch.log_softmax(sub, -1).gather(-1, tr.head_labels(batch.labels)[..., None]).squeeze(-1)
    mask = batch.layout.token_mask.reshape(batch.labels.shape)
    assert mask.sum() > 0
    torch.testing.assert_close(logp[mask].double(), ref[mask], rtol=1e-5, atol=1e-5)
    assert bool((logp[~mask] == 0).all())


def test_cross_turn_kv_cache_gives_the_log_probs_of_a_full_re_read_in_fp64(tmp_path):
    """Episodes played on one cache kept across turns (padding columns where a row had nothing to
    add) sample each token from the distribution a full forward over the packed history gives."""
    tr = Trainer(_cfg(tmp_path, env="relay", estimator="grpo", temperature=0.8,
                      model_config={"hidden_size": 32, "intermediate_size": 64}))
    tr.model.double().eval()
    states = []
    respond = tr.sampler.respond

    def spy(state, *args, **kw):
        out = respond(state, *args, **kw)
        states.append((state.rows, int((state.mask == 0).sum()), state.mask.shape[1]))
        return out

    tr.sampler.respond = spy
    eps = play(tr.sampler, tr.env_factory, tr.tasks(0, 3), 2, tr.generator(0))
    assert len({e.num_steps for e in eps}) > 1 and len({len(e.tokens) for e in eps}) > 1  # ragged on purpose
    assert len(states) >= 3 and all(holes > 0 for _, holes, _ in states[1:])  # the cache holds padding
    assert states[-1][0] < states[0][0]  # finished episodes left the cache
    # No end-of-step in this task: every response runs to the budget its environment drew.
    assert tr.sampler.eos not in tr.allowed.tolist()
    for e in eps:
        env = tr.env_factory().unwrapped
        env.reset(e.seed)
        lengths = [e.step_ids.count(k) for k in range(e.num_steps)]
        assert lengths == env._budgets[:e.num_steps] and all(8 <= n <= 40 for n in lengths)
    batch = Batch.pack(eps, tr.sampler.pad, tr.device)
    with torch.no_grad():
        logits = tr.model.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        ref = torch.log_softmax(logits[..., tr.allowed] / 0.8, -1).gather(-1, tr.head_labels(batch.labels)[..., None])
    mask = batch.layout.token_mask.reshape(batch.labels.shape)
    got = torch.cat([torch.tensor(e.logprobs, dtype=torch.float64) for e in eps])
    assert got.numel() == int(mask.sum()) == sum(len(e.tokens) for e in eps) - sum(
        s < 0 for e in eps for s in e.step_ids)
    assert_close(got, ref.squeeze(-1)[mask])


def test_end_to_end_run_writes_metrics_curve_checkpoint_and_model(tmp_path):
    cfg = _cfg(tmp_path)
    tr = Trainer(cfg)
    before = _params(tr.model)
    hist = tr.train()
    after = tr.model.state_dict()
    assert len(hist) == 2
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("policy.") for k in changed) and any(k.startswith("critic_backbone.") for k in changed)
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["update"] for m in lines] == [0, 1]
    for m in lines:
        assert all(math.isfinite(m[k]) for k in ("pg_loss", "vf_loss", "grad_norm", "success"))
        assert m["episodes"] == 8
    assert (run / "learning_curve.png").stat().st_size > 1000
    assert torch.load(run / "checkpoint.pt", weights_only=False)["update"] == 2
    assert (run / "final" / "config.json").exists() and (run / "final" / "tokenizer.json").exists()


class CoinEnv:
    """A user-defined task: 2 or 3 turns, reward 1 for each "go" (rewards on every step)."""

    max_steps = 3
    action_words = ("go", "stop")
    max_action_words = 1

    def vocabulary(self):
        return ["turn", "go", "stop"]

    def reset(self, seed=None):
        self.k, self.t = 2 + (seed or 0) % 2, 0
        return "turn"

    def step(self, action):
        from steppo_fast.trainer.envs import StepResult

        self.t += 1
        return StepResult("turn", float(action == "go"), self.t == self.k)


@pytest.mark.parametrize("estimator", ["step_gae", "token_gae", "grpo", "rloo", "gigpo", "reinforce_pp"])
def test_every_estimator_trains_a_user_environment(tmp_path, monkeypatch, estimator):
    from steppo_fast.trainer import envs

    monkeypatch.setattr(envs, "ENVIRONMENTS", dict(envs.ENVIRONMENTS))
    envs.register("coin", CoinEnv)
    tr = Trainer(_cfg(tmp_path, estimator=estimator, env="coin", updates=1))
    before = _params(tr.model)
    m = tr.train()[0]
    assert math.isfinite(m["pg_loss"]) and m["episodes"] == 8
    assert any(not torch.equal(before[k], v) for k, v in tr.model.state_dict().items())
    assert (tr.model.value_head is not None) == (estimator in ("step_gae", "token_gae"))
    assert 2.0 <= m["steps_per_episode"] <= 3.0 and 0.0 < m["return"] < 3.0


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_of_the_paper_trains_the_long_step_task(tmp_path, method):
    """Each (estimator, ratio level) pair of the learning benchmark, end to end on ``relay``."""
    estimator, ratio = METHODS[method]
    cfg = _cfg(tmp_path, env="relay", updates=2, groups=2, group_size=2, eval_episodes=2,
               model_config={"hidden_size": 32, "intermediate_size": 64}, **method_settings(method))
    tr = Trainer(cfg)
    assert cfg.estimator == estimator and tr.loss_cfg.ratio_level == ratio
    assert (tr.model.value_head is not None) == (estimator in ("step_gae", "token_gae"))
    before = _params(tr.model)
    hist = tr.train()
    assert len(hist) == 2 and all(math.isfinite(m["pg_loss"]) for m in hist)
    assert all(m["tokens_per_step"] > 2 for m in hist)  # long steps (a step is several tokens)
    assert any(not torch.equal(before[k], v) for k, v in tr.model.state_dict().items() if k.startswith("policy."))
    with pytest.raises(ValueError, match="unknown method 'ppo2'; choose one of: steppo, ppo"):
        method_settings("ppo2")


def test_shared_critic_has_no_second_backbone(tmp_path):
    tr = Trainer(_cfg(tmp_path, critic="shared", updates=1))
    assert tr.model.critic_backbone is None and tr.model.value_head is not None
    assert math.isfinite(tr.train()[0]["vf_loss"])


def test_learning_on_the_quick_task(tmp_path):
    """Success on held-out episodes rises from <= 0.3 to >= 0.7 (about 10 s on 2 CPU threads)."""
    tr = Trainer(_cfg(tmp_path, updates=30, groups=16, group_size=4, eval_episodes=128, save_every=30))
    before = tr.evaluate()
    tr.train()
    after = tr.evaluate()
    assert before <= 0.3 and after >= 0.7, (before, after)


def test_learning_on_the_long_step_task(tmp_path):
    """StepPO on relay with 8-16 tokens a step: held-out success rises from <= 0.3 (a random call
    succeeds 14%) to >= 0.7 in 20 updates (about 30 s on 2 CPU threads)."""
    tr = Trainer(_cfg(tmp_path, env="relay", env_kwargs={"budgets": (8, 16)}, updates=20, groups=16, group_size=4,
                      eval_episodes=128, save_every=20, attn_implementation="eager"))
    before = tr.evaluate()
    hist = tr.train()
    after = tr.evaluate()
    assert before <= 0.3 and after >= 0.7, (before, after)
    assert all(8 <= m["tokens_per_step"] <= 16 for m in hist)


def test_resume_equals_uninterrupted(tmp_path):
    a = Trainer(_cfg(tmp_path / "a", updates=4, save_every=2))
    a.train()
    b = Trainer(_cfg(tmp_path / "b", updates=4, save_every=2))
    b.train(stop_after=2)
    c = Trainer(_cfg(tmp_path / "b", updates=4, save_every=2, seed=0))
    assert c.load() == 2
    c.train(resume=True)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, c.model.state_dict()[k]), k
    sa, sc = a.optim.state_dict()["state"], c.optim.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sc[i]["exp_avg"]) for i in sa)
    strip = lambda path: [{k: v for k, v in json.loads(x).items() if not k.endswith("_s")}  # noqa: E731
                          for x in open(path).read().splitlines()]
    assert strip(tmp_path / "a" / "run" / "metrics.jsonl") == strip(tmp_path / "b" / "run" / "metrics.jsonl")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    tr = Trainer(_cfg(tmp_path, updates=4, save_every=1))
    forward = tr.loss_fn.forward
    calls = {"n": 0}

    def poisoned(*args, **kw):
        loss, metrics = forward(*args, **kw)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 4 else loss), metrics  # 4 minibatches per update

    tr.loss_fn.forward = poisoned
    with pytest.raises(NonFiniteLoss, match=r"update 1: non-finite pg_loss.*Last good checkpoint: .*\(update 1\)"):
        tr.train()
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["update"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_loads_a_tiny_model_saved_to_a_temp_dir(tmp_path):
    from steppo_fast.trainer.envs import LightsEnv

    tok = build_tokenizer(LightsEnv.vocabulary())
    policy, _ = build_policy(None, tok, {"hidden_size": 32, "intermediate_size": 64}, "sdpa", seed=3)
    path = tmp_path / "tiny"
    policy.save_pretrained(path)
    tok.save_pretrained(path)
    tr = Trainer(_cfg(tmp_path, model=str(path), updates=1))
    for k, v in policy.state_dict().items():
        assert torch.equal(v, tr.model.policy.state_dict()[k]), k
    assert tr.tokenizer.encode("light red go", add_special_tokens=False) == tok.encode("light red go",
                                                                                      add_special_tokens=False)
    assert math.isfinite(tr.train()[0]["pg_loss"])


def test_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown estimator 'ppo2'; choose one of: step_gae, token_gae, grpo"):
        TrainConfig(estimator="ppo2")
    with pytest.raises(ValueError, match="unknown environment 'maze'; choose one of: hotpot, lights"):
        TrainConfig(env="maze")
    with pytest.raises(ValueError, match="model path .*nowhere.* does not exist"):
        Trainer(_cfg(tmp_path, model=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="unknown config key.*batch_size"):
        TrainConfig.from_dict({"batch_size": 3})
    with pytest.raises(ValueError, match="groups .* divisible|minibatches"):
        TrainConfig(groups=1, group_size=1, minibatches=2)
    with pytest.raises(ValueError, match="end_of_step = False.*needs action_words"):
        Trainer(_cfg(tmp_path, env="relay", full_vocab=True))
    with pytest.raises(ValueError, match="no checkpoint to resume from"):
        Trainer(_cfg(tmp_path / "empty")).train(resume=True)
    assert cli.main(["train", "--estimator", "ppo2"]) == 2
    assert "choose one of: step_gae" in capsys.readouterr().err


def test_cli_train_with_a_yaml_config(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("env: hotpot\nestimator: grpo\ngroups: 2\ngroup_size: 2\nupdates: 3\neval_episodes: 4\n")
    out = tmp_path / "cli"
    rc = cli.main(["train", "--config", str(cfg), "--updates", "1", "--out", str(out), "--no-progress",
                   "--set", "device=cpu", "--set", "loss={clip_high: 0.28}"])
    assert rc == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["episodes"] == 4
    saved = torch.load(out / "checkpoint.pt", weights_only=False)["config"]
    assert saved["env"] == "hotpot" and saved["updates"] == 1 and saved["loss"] == {"clip_high": 0.28}


def test_data_parallel_under_torchrun(tmp_path):
    """Two CPU processes (gloo) run the CLI's train; rank 0 logs the global batch."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "steppo_fast.cli", "train", "--updates", "2", "--groups", "4", "--group-size", "2",
           "--out", str(out), "--no-progress", "--device", "cpu", "--set", "eval_episodes=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Run outside the repository: `-m` puts the working directory first on the path, and the
    # source tree there (without its compiled modules when the package is installed) would
    # shadow the steppo_fast under test.
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "using the PyTorch reference" not in r.stderr  # the compiled kernels ran
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["update"] for m in lines] == [0, 1]
    assert all(m["episodes"] == 8 and m["world_size"] == 2 for m in lines)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["update"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values()
                                        if v.is_floating_point())


def test_the_shipped_example_config_is_valid():
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "hotpot_steppo.yaml")
    cfg = TrainConfig.load(path, updates=1)
    assert cfg.env == "hotpot" and cfg.estimator == "step_gae" and cfg.updates == 1


def test_config_values_are_read_as_written_and_wrong_types_name_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text('lr: 1e-3\ngamma: "0.99"\nupdates: 1e2\nwhiten: "false"\nenv_kwargs:\nloss: {clip_low: 1e-1}\n')
    cfg = TrainConfig.load(str(p))
    assert (cfg.lr, cfg.gamma, cfg.updates, cfg.whiten, cfg.env_kwargs) == (1e-3, 0.99, 100, False, {})
    assert type(cfg.lr) is float and type(cfg.updates) is int and cfg.loss == {"clip_low": 0.1}
    for kw, words in [({"temperature": None}, "temperature must be a number, got None"),
                      ({"lr": "fast"}, "lr must be a number, got 'fast'"),
                      ({"updates": 2.5}, "updates must be an integer, got 2.5"),
                      ({"updates": True}, "updates must be an integer, got True"),
                      ({"env": 3}, "env must be a string, got 3"),
                      ({"loss": "str"}, "loss must be a mapping"),
                      ({"loss": {"clip_low": "wide"}}, "loss.clip_low must be a number, got 'wide'"),
                      ({"loss": {"agg_mode": "mean"}}, "loss: LossConfig: agg_mode must be one of"),
                      ({"device": "foo"}, "device 'foo'"),
                      ({"model": "m", "model_config": {"hidden_size": 32}}, "model_config")]:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            TrainConfig(**kw)


def test_resume_steps_with_the_new_learning_rates(tmp_path, capsys):
    """Resumed with new lr / critic_lr / weight_decay, the run equals one whose optimiser was
    given them at that update."""
    a = Trainer(_cfg(tmp_path / "a", updates=2))
    a.train(stop_after=1)
    for g, lr in zip(a.optim.param_groups, (0.05, 0.02)):
        g["lr"], g["weight_decay"] = lr, 0.01
    a.update(1)
    Trainer(_cfg(tmp_path / "b", updates=2)).train(stop_after=1)
    capsys.readouterr()
    c = Trainer(_cfg(tmp_path / "b", updates=2, lr=0.05, critic_lr=0.02, weight_decay=0.01))
    c.train(resume=True)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, c.model.state_dict()[k]), k
    assert "changed settings: lr 0.002 -> 0.05, critic_lr 0.002 -> 0.02, weight_decay 0.0 -> 0.01" in \
        capsys.readouterr().out


def test_resume_checks_every_restored_tensor(tmp_path):
    Trainer(_cfg(tmp_path, updates=2)).train(stop_after=1)
    path = tmp_path / "run" / "checkpoint.pt"
    good = torch.load(path, weights_only=False)
    # A weight overwritten after the save (finite, so only the checksum saved with it can tell).
    state = torch.load(path, weights_only=False)
    state["model"]["critic_backbone.layers.1.self_attn.o_proj.weight"][3, 5] = 1e30
    torch.save(state, path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: weight critic_backbone.layers.1.self_attn.o_proj.weight "
                                                   "differs from the checksum saved with it")):
        Trainer(_cfg(tmp_path, updates=2)).train(resume=True)
    # Non-finite optimiser state in a checkpoint without checksums.
    state = torch.load(path, weights_only=False)
    state["model"] = good["model"]
    state.pop("checksums", None)
    state["optim"]["state"][0]["exp_avg_sq"].view(-1)[7] = float("inf")
    torch.save(state, path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: optimiser state exp_avg_sq of "
                                                   "policy.model.embed_tokens.weight is not finite")):
        Trainer(_cfg(tmp_path, updates=2)).train(resume=True)
    # A half-written checkpoint.pt.tmp (a save killed mid-write) is ignored.
    torch.save(good, path)
    (tmp_path / "run" / "checkpoint.pt.tmp").write_bytes(b"PK\x03\x04 half")
    tr = Trainer(_cfg(tmp_path, updates=2))
    assert len(tr.train(resume=True)) == 2


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    Trainer(_cfg(tmp_path, updates=2)).train(stop_after=1)
    with pytest.raises(ValueError, match=r"checkpoint\.pt.*critic: separate in the checkpoint, shared now"):
        Trainer(_cfg(tmp_path, updates=2, critic="shared")).train(resume=True)
    with pytest.raises(ValueError, match="already holds a run"):
        Trainer(_cfg(tmp_path, updates=2)).train()


class BadRewardEnv(CoinEnv):
    """CoinEnv whose second step returns a bad reward (or a bad done)."""

    bad = None

    def step(self, action):
        obs, reward, done = super().step(action)
        if self.t == 2:
            return type(self).bad
        return obs, reward, done


@pytest.mark.parametrize("bad, words", [(("turn", None, False), "reward None"),
                                        (("turn", float("nan"), False), "reward nan"),
                                        (("turn", "1", False), "reward '1'"),
                                        (("turn", 1.0, None), "done None"),
                                        (("turn", 1.0), "returned ('turn', 1.0)")])
def test_environment_results_are_checked(tmp_path, monkeypatch, bad, words):
    from steppo_fast.trainer import envs

    monkeypatch.setattr(envs, "ENVIRONMENTS", dict(envs.ENVIRONMENTS))
    monkeypatch.setattr(BadRewardEnv, "bad", bad)
    envs.register("badcoin", BadRewardEnv)
    tr = Trainer(_cfg(tmp_path, env="badcoin", updates=1))
    with pytest.raises(ValueError, match=r"environment 'badcoin', episode seed \d+, step 2: .*" + re.escape(words)):
        tr.train()
