"""The ``steppo_<mode>`` trainer modes of verl's V1 trainer: verl's own ``_compute_advantage`` (KL in
the reward, rollout correction, the fields written back to the transfer queue) with steppo_fast's
credit assignment in its advantage step.

The trainers are built without ``__init__`` (only the config and the KL controller the method reads)
and the transfer queue is an in-memory stand-in for ``tq.kv_batch_get`` / ``tq.kv_batch_put``, holding
rows as verl V1's agent loop writes them (``AgentLoopWorkerTQ._agent_loop_postprocess``): one row per
agent-loop output keyed ``{uid}_{session}_{i}``, 1-D fields of each row's own response length, the
score on the last response token copied onto every output of a session, the critic's ``values``."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("verl")
pytest.importorskip("transfer_queue")
pytest.importorskip("torchdata")

from omegaconf import OmegaConf  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from tensordict.tensorclass import NonTensorStack  # noqa: E402

from steppo_fast.integrations import verl as sv  # noqa: E402

v1 = pytest.importorskip("verl.trainer.ppo.v1")

import transfer_queue as tq  # noqa: E402
from transfer_queue import KVBatchMeta  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.trainer.ppo.v1 import trainer_base  # noqa: E402

from test_integrations_verl_layouts import (  # noqa: E402
    Batch, _adv, assert_same_per_turn, make_trajs, per_turn, step_rows)
from test_integrations_verl_plugin import OURS, ROOT, _entry_point_dist  # noqa: E402

VERL_MODES = ("sync", "colocate_async", "separate_async")


# ------------------------------------------------------------------ the transfer queue
class FakeQueue:
    """``tq.kv_batch_get`` / ``tq.kv_batch_put`` over a dict: tensor fields come back as jagged nested
    tensors (one row per key, its own length), other fields as a ``NonTensorStack``; a field that some
    key lacks is left out, as the real queue's field selection does."""

    def __init__(self):
        self.rows = {}
        self.puts = []

    def put_rows(self, partition_id, keys, rows):
        for key, row in zip(keys, rows):
            self.rows.setdefault((partition_id, key), {}).update(row)

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        rows = [self.rows[(partition_id, k)] for k in keys]
        names = [f for f in (select_fields or list(rows[0])) if all(f in r for r in rows)]
        out = {}
        for f in names:
            vals = [r[f] for r in rows]
            if isinstance(vals[0], torch.Tensor):
                out[f] = torch.nested.as_nested_tensor(vals, layout=torch.jagged)
            else:
                out[f] = NonTensorStack(*vals)
        return TensorDict(out, batch_size=[len(keys)])

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        self.puts.append(sorted(fields.keys()))
        for f in fields.keys():
            v = fields[f]
            parts = v.unbind(0)
            for key, part in zip(keys, parts):
                self.rows[(partition_id, key)][f] = part
        return KVBatchMeta(keys=list(keys), tags=[{} for _ in keys], partition_id=partition_id,
                           fields=sorted(self.rows[(partition_id, keys[0])]))

    def padded(self, keys, field, partition_id="train"):
        """(B, T) of a field, right padded with 0, as verl's ``to_padded_tensor`` pads it."""
        vals = [self.rows[(partition_id, k)][field] for k in keys]
        T = max(v.numel() for v in vals)
        out = torch.zeros(len(vals), T, dtype=vals[0].dtype)
        for i, v in enumerate(vals):
            out[i, :v.numel()] = v
        return out


def v1_outputs(trajs, seed, split="mixed"):
    """(keys, rows, where): the sessions of ``trajs`` as verl V1's agent loops put them in the queue.

    split: "turns" (one output per turn), "session" (one output per session: turn 1, tool reply,
    turn 2, ..., as the tool agent returns it) or "mixed" (random cuts between turns). A tool reply
    between two turns of one output sits in its response (mask 0); between two outputs it belongs to
    the next output's prompt; a reply that ends the episode closes the last output. ``where`` maps
    (trajectory, turn) to (row, columns)."""
    rng = np.random.default_rng(seed)
    keys, rows, where = [], [], {}
    for r, tr in enumerate(trajs):
        if split == "turns":
            cuts = list(range(1, tr.K))
        elif split == "session":
            cuts = []
        else:
            cuts = [c for c in range(1, tr.K) if rng.random() < 0.5]
        bounds = [0] + cuts + [tr.K]
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            mask, values, old = [], [], []
            for k in range(a, b):
                n = tr.turn_len[k]
                where[(r, k)] = (len(rows), np.arange(len(mask), len(mask) + n))
                mask += [1] * n
                values += list(tr.value[k])
                old += list(tr.old[k])
                if k < len(tr.obs_len) and (k < b - 1 or k == tr.K - 1):
                    o = tr.obs_len[k]
                    mask += [0] * o
                    values += list(rng.standard_normal(o))  # the critic's outputs there are never read
                    old += list(-rng.random(o))
            n = len(mask)
            score = torch.zeros(n)
            score[-1] = tr.outcome  # AgentLoopOutput.as_dict: rm_scores[-1], copied onto the session's outputs
            old = torch.tensor(old, dtype=torch.float32)
            rows.append({"uid": tr.uid, "response_mask": torch.tensor(mask, dtype=torch.int64), "rm_scores": score,
                         "values": torch.tensor(values, dtype=torch.float32), "old_log_probs": old,
                         "ref_log_prob": old + 0.2 * torch.as_tensor(rng.standard_normal(n), dtype=torch.float32),
                         "rollout_log_probs": old + 0.1 * torch.as_tensor(rng.standard_normal(n),
                                                                          dtype=torch.float32)})
            keys.append(f"{tr.uid}_{tr.session}_{i}")
    order = rng.permutation(len(rows))  # the queue hands a batch's keys in any order
    position = np.argsort(order)
    where = {rk: (int(position[row]), cols) for rk, (row, cols) in where.items()}
    return [keys[j] for j in order], [rows[j] for j in order], where


def _queue(trajs, seed, split="mixed", drop=()):
    keys, rows, where = v1_outputs(trajs, seed, split)
    for row in rows:
        for f in drop:
            row.pop(f)
    q = FakeQueue()
    q.put_rows("train", keys, rows)
    return q, keys, where


# ------------------------------------------------------------------ the trainer
def _config(estimator, gamma=0.9, lam=0.8, **algorithm):
    import verl

    path = os.path.join(os.path.dirname(verl.__file__), "trainer", "config", "_generated_ppo_trainer.yaml")
    cfg = OmegaConf.load(path)
    OmegaConf.set_struct(cfg, True)
    return OmegaConf.merge(cfg, {"algorithm": {"adv_estimator": estimator, "gamma": gamma, "lam": lam, **algorithm},
                                 "critic": {"enable": True}})


def _advantage_step(mode, cfg, queue, keys, monkeypatch):
    """Runs ``get_trainer_cls(mode)._compute_advantage`` on the queue; returns the metrics."""
    monkeypatch.setattr(tq, "kv_batch_get", queue.kv_batch_get)
    monkeypatch.setattr(tq, "kv_batch_put", queue.kv_batch_put)
    trainer = object.__new__(v1.get_trainer_cls(mode))
    trainer.config = cfg  # what PPOTrainer.__init__ sets and this method reads
    if cfg.algorithm.use_kl_in_reward:
        trainer.kl_ctrl_in_reward = core_algos.get_kl_controller(cfg.algorithm.kl_ctrl)
    metrics = {}
    meta = trainer._compute_advantage(KVBatchMeta(keys=list(keys), tags=[{} for _ in keys], partition_id="train"),
                                      metrics)
    assert meta.keys == list(keys)
    return metrics


def _drop_in_data(queue, keys, rewards=None):
    """The DataProto verl builds from the queue, for the drop-in: padded fields, uid."""
    scores = queue.padded(keys, "rm_scores")
    return DataProto.from_dict(
        tensors={"response_mask": queue.padded(keys, "response_mask"), "token_level_scores": scores,
                 "token_level_rewards": scores.clone() if rewards is None else rewards,
                 "values": queue.padded(keys, "values")},
        non_tensors={"uid": np.array([queue.rows[("train", k)]["uid"] for k in keys], dtype=object)})


STEPPO_ESTIMATORS = ["step_gae", "token_gae", "gae", "grpo", "rloo", "reinforce_plus_plus",
                     "reinforce_plus_plus_baseline"]


@pytest.mark.parametrize("estimator", STEPPO_ESTIMATORS)
@pytest.mark.parametrize("split", ["mixed", "turns", "session"])
def test_steppo_mode_writes_step_advantages(estimator, split, monkeypatch):
    trajs = make_trajs(11, intermediate=False, token_rewards=False)
    queue, keys, where = _queue(trajs, 11, split, drop=("rollout_log_probs",))  # no rollout correction
    metrics = _advantage_step("steppo_sync", _config(estimator), queue, keys, monkeypatch)
    assert queue.puts == [["advantages", "returns"]] and metrics == {}
    for f in ("advantages", "returns"):  # written back in each row's own length
        assert [queue.rows[("train", k)][f].numel() for k in keys] == \
               [queue.rows[("train", k)]["response_mask"].numel() for k in keys]
    adv, ret = queue.padded(keys, "advantages"), queue.padded(keys, "returns")
    assert adv.dtype == torch.float32
    # = the drop-in on the same data with the same keys ...
    want = sv.compute_advantage(_drop_in_data(queue, keys), estimator, gamma=0.9, lam=0.8, batch_keys=keys)
    torch.testing.assert_close(adv, want.batch["advantages"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ret, want.batch["returns"], rtol=1e-6, atol=1e-6)
    # ... = the StepPO authors' step rows turn by turn (verl's 'gae' is token_gae on these layouts) ...
    a = step_rows(trajs, 11)
    adv_a, ret_a = _adv(a, "token_gae" if estimator == "gae" else estimator, gamma=0.9, lam=0.8)
    here = Batch(None, None, where, keys)
    assert_same_per_turn(a, adv_a, here, adv, trajs, f"{estimator} advantages")
    assert_same_per_turn(a, ret_a, here, ret, trajs, f"{estimator} returns")
    # ... and nothing off the agent tokens.
    assert not bool(adv[queue.padded(keys, "response_mask") == 0].any())
    if estimator == "step_gae":  # one value per turn
        assert all(len(t.unique()) == 1 for t in per_turn(here, adv, trajs))


@pytest.mark.parametrize("split", ["mixed", "turns", "session"])
def test_grpo_equals_verls_own_mode(split, monkeypatch):
    trajs = make_trajs(12, intermediate=False, token_rewards=False)
    queue, keys, _ = _queue(trajs, 12, split)
    theirs, ours = copy.deepcopy(queue), copy.deepcopy(queue)
    assert _advantage_step("sync", _config("grpo"), theirs, keys, monkeypatch) == \
           _advantage_step("steppo_sync", _config("grpo"), ours, keys, monkeypatch)
    assert theirs.puts == ours.puts
    for f in ("advantages", "returns"):
        torch.testing.assert_close(ours.padded(keys, f), theirs.padded(keys, f), rtol=1e-6, atol=1e-6)


def test_kl_in_reward_and_rollout_correction_stay_verls(monkeypatch):
    trajs = make_trajs(13, intermediate=False, token_rewards=False)
    queue, keys, _ = _queue(trajs, 13)
    extra = dict(use_kl_in_reward=True, kl_ctrl={"kl_coef": 0.1}, rollout_correction={"rollout_is": "token"})
    runs = {}
    for mode, estimator in (("sync", "grpo"), ("steppo_sync", "grpo"), ("steppo_sync", "step_gae")):
        q = copy.deepcopy(queue)
        runs[mode, estimator] = (q, _advantage_step(mode, _config(estimator, **extra), q, keys, monkeypatch))
    (theirs, m_theirs), (ours, m_ours) = runs["sync", "grpo"], runs["steppo_sync", "grpo"]
    assert "actor/reward_kl_penalty" in m_theirs and any(k.startswith("rollout_corr/") for k in m_theirs)
    assert m_theirs.keys() == m_ours.keys()
    for k in m_theirs:
        torch.testing.assert_close(torch.as_tensor(m_ours[k]), torch.as_tensor(m_theirs[k]))
    fields = ["advantages", "response_mask", "returns", "rollout_is_weights", "token_level_rewards"]
    assert theirs.puts == ours.puts == [fields]
    for f in ("response_mask", "rollout_is_weights", "token_level_rewards"):
        torch.testing.assert_close(ours.padded(keys, f), theirs.padded(keys, f), rtol=1e-6, atol=1e-6)
    # The advantages read verl's rewards with the KL penalty in them. The copied score counts once and
    # the penalty of every output counts, so grpo's score is the session's whole reward (verl's own
    # mode takes its last output's only, which differs as soon as a session has several outputs).
    rewards = theirs.padded(keys, "token_level_rewards")
    assert not torch.equal(rewards, theirs.padded(keys, "rm_scores"))
    for estimator in ("grpo", "step_gae"):
        q, _ = runs["steppo_sync", estimator]
        want = sv.compute_advantage(_drop_in_data(queue, keys, rewards), estimator, gamma=0.9, lam=0.8,
                                    batch_keys=keys)
        torch.testing.assert_close(q.padded(keys, "advantages"), want.batch["advantages"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(q.padded(keys, "returns"), want.batch["returns"], rtol=1e-6, atol=1e-6)


def test_estimators_of_verls_own_run_verls_step(monkeypatch):
    # A name steppo_fast does not compute runs verl's compute_advantage_for_multi_trajectories.
    trajs = make_trajs(14, intermediate=False, token_rewards=False)
    queue, keys, _ = _queue(trajs, 14, "session")
    theirs, ours = copy.deepcopy(queue), copy.deepcopy(queue)
    _advantage_step("sync", _config("opo"), theirs, keys, monkeypatch)
    _advantage_step("steppo_sync", _config("opo"), ours, keys, monkeypatch)
    for f in ("advantages", "returns"):
        torch.testing.assert_close(ours.padded(keys, f), theirs.padded(keys, f))


def test_what_the_steppo_modes_refuse(monkeypatch):
    trajs = make_trajs(15, intermediate=False, token_rewards=False)
    queue, keys, _ = _queue(trajs, 15)
    with pytest.raises(ValueError, match="verl's V1 trainer reads none"):
        _advantage_step("steppo_sync", _config("gigpo"), copy.deepcopy(queue), keys, monkeypatch)
    with pytest.raises(ValueError, match="rollout_rs"):
        _advantage_step("steppo_sync", _config("step_gae", rollout_correction={"rollout_rs": "token_k2",
                                                                                "rollout_rs_threshold": 0.5}),
                        copy.deepcopy(queue), keys, monkeypatch)
    no_critic, same_keys, _ = _queue(trajs, 15, drop=("values",))
    with pytest.raises(ValueError, match="critic.enable=True"):
        _advantage_step("steppo_sync", _config("step_gae"), no_critic, same_keys, monkeypatch)
    # verl's own mode with step_gae: its registered estimator gets no values and names the steppo mode.
    with pytest.raises(ValueError, match="trainer.v1.trainer_mode=steppo_sync"):
        _advantage_step("sync", _config("step_gae"), copy.deepcopy(queue), keys, monkeypatch)


# ------------------------------------------------------------------ the modes
def _trainer_config(mode):
    cfg = _config("step_gae")
    return OmegaConf.merge(cfg, {"trainer": {"v1": {"trainer_mode": mode}},
                                 # what separate_async's __init__ asserts
                                 "data": {"train_batch_size": 4 * cfg.actor_rollout_ref.actor.ppo_mini_batch_size},
                                 "actor_rollout_ref": {"rollout": {"nnodes": 1, "n_gpus_per_node": 1,
                                                                   "checkpoint_engine": {"backend": "nccl"}}}})


@pytest.mark.parametrize("mode", VERL_MODES)
def test_a_steppo_mode_is_verls_mode(mode):
    theirs_cls, ours_cls = v1.get_trainer_cls(mode), v1.get_trainer_cls(sv.TRAINER_MODE_PREFIX + mode)
    assert ours_cls.__bases__ == (theirs_cls,) and ours_cls.__module__ == sv.__name__
    assert getattr(sv, ours_cls.__name__) is ours_cls
    # verl's own code runs the advantage step; verl's module and class are untouched.
    assert ours_cls._compute_advantage.__code__ is trainer_base.PPOTrainer._compute_advantage.__code__
    assert trainer_base.compute_advantage_for_multi_trajectories is v1.utils.compute_advantage_for_multi_trajectories
    assert theirs_cls._compute_advantage is trainer_base.PPOTrainer._compute_advantage
    # Built by verl's __init__, it behaves as verl's mode wherever verl asks for the mode.
    theirs = theirs_cls(_trainer_config(mode))
    ours = ours_cls(_trainer_config(sv.TRAINER_MODE_PREFIX + mode))
    assert ours.trainer_mode == theirs.trainer_mode == mode
    assert ours.parameter_sync_step == theirs.parameter_sync_step
    assert type(ours.replay_buffer) is type(theirs.replay_buffer)
    assert ours.replay_buffer.trainer_mode == mode
    assert ours.replay_buffer.trainer_config == theirs.replay_buffer.trainer_config
    other = next(m for m in VERL_MODES if m != mode)
    with pytest.raises(ValueError, match=f"trainer.v1.trainer_mode is '{other}'"):
        ours_cls(_trainer_config(other))


def test_registration_is_idempotent():
    before = dict(trainer_base.TRAINER_REGISTRY)
    sv._register_trainers()
    sv.register()
    assert trainer_base.TRAINER_REGISTRY == before
    assert {m for m in before if m.startswith(sv.TRAINER_MODE_PREFIX)} == {sv.TRAINER_MODE_PREFIX + m for m in
                                                                            VERL_MODES}


def test_verls_module_is_read_live_and_a_changed_verl_is_refused(monkeypatch):
    # The advantage step reads verl's module namespace at call time: what verl (or a test) changes
    # there reaches it; only the one call is bound otherwise.
    calls = []
    original = trainer_base.apply_kl_penalty

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    trajs = make_trajs(16, intermediate=False, token_rewards=False)
    queue, keys, _ = _queue(trajs, 16)
    monkeypatch.setattr(trainer_base, "apply_kl_penalty", counting)
    _advantage_step("steppo_sync", _config("step_gae", use_kl_in_reward=True), queue, keys, monkeypatch)
    assert calls == [1]

    def reads_it_as_an_attribute(self, batch, metrics):
        return v1.utils.compute_advantage_for_multi_trajectories

    with pytest.raises(TypeError, match="no longer calls"):
        sv._rebound(reads_it_as_an_attribute, compute_advantage_for_multi_trajectories=None)


def test_a_failed_registration_warns_and_leaves_verls_import_alone(monkeypatch):
    class Someone(v1.get_trainer_cls("sync")):
        pass

    monkeypatch.setitem(trainer_base.TRAINER_REGISTRY, "steppo_sync", Someone)
    with pytest.warns(RuntimeWarning, match="steppo trainer modes are not registered.*already registered"):
        sv._register_trainers_reporting()
    assert trainer_base.TRAINER_REGISTRY["steppo_sync"] is Someone


# A TaskRunner's view: import verl (the plugin loads), then what TaskRunnerV1.run imports.
PROBE = textwrap.dedent("""
    import sys
    import verl
    lazy = "verl.trainer.ppo.v1" not in sys.modules
    from verl.trainer.ppo.v1 import get_trainer_cls
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY
    modes = {m: (c.__module__, c.__bases__[0].__module__, c.trainer_mode) for m, c in TRAINER_REGISTRY.items()
             if m.startswith("steppo_")}
    print(repr((lazy, modes, get_trainer_cls("steppo_sync").__name__)))
""")


@pytest.mark.parametrize("mechanism", ["entry point", "environment"])
def test_modes_registered_in_a_fresh_process(mechanism, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_USE_EXTERNAL")}
    if mechanism == "entry point":
        env["PYTHONPATH"] = os.pathsep.join([_entry_point_dist(tmp_path), ROOT])
    else:
        env.update(VERL_USE_EXTERNAL_MODULES=OURS, VERL_USE_EXTERNAL_PLUGINS="none", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("(")]
    lazy, modes, name = eval(line)  # noqa: S307 (our own repr output)
    assert lazy, "the plugin imported verl's V1 trainer package itself"
    assert modes == {sv.TRAINER_MODE_PREFIX + m: (OURS, f"verl.trainer.ppo.v1.trainer_{m}", m) for m in VERL_MODES}
    assert name == "StepPOTrainerSync"
