"""The verl section of docs/integrations.md works as written: its Python blocks (run by
tests/test_docs.py's convention) give what the text claims, and its YAML is a valid overlay of
verl's own trainer config whose names verl resolves to ours."""

from __future__ import annotations

import os
import re

import pytest

pytest.importorskip("verl")
OmegaConf = pytest.importorskip("omegaconf").OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BLOCK = re.compile(r"```(?P<lang>\w+)\n(?P<code>.*?)```", re.S)


def _section(title: str) -> str:
    with open(os.path.join(ROOT, "docs", "integrations.md"), encoding="utf-8") as f:
        text = f.read()
    parts = re.split(r"^## ", text, flags=re.M)
    (body,) = [p for p in parts if p.startswith(title + "\n")]
    return body


def _yaml_blocks():
    return [m.group("code") for m in _BLOCK.finditer(_section("verl")) if m.group("lang") == "yaml"]


def test_python_blocks_run_in_order(tmp_path, monkeypatch):
    from test_docs import SECTIONS, run_section

    pytest.importorskip("transfer_queue")  # the trainer-mode snippet imports verl's V1 trainer (test extra)

    (section,) = [s for s in SECTIONS if s.title == "verl"]
    assert len(section.blocks) >= 5
    monkeypatch.chdir(tmp_path)
    ns = run_section(section)
    # What the snippets claim.
    import torch

    adv = ns["data"].batch["advantages"]
    assert len(torch.unique(adv[1][ns["data"].batch["response_mask"][1].bool()])) == 3  # three turns
    torch.testing.assert_close(ns["outputs"].batch["returns"][:, 0], torch.ones(3))
    assert not bool(ns["steps"].batch["advantages"][3].any())
    assert ns["n"] == 8
    from steppo_fast.integrations import verl as sv

    assert ns["trainer_cls"].__module__ == sv.__name__ and ns["trainer_cls"].trainer_mode == "sync"


def _verl_config():
    import verl

    path = os.path.join(os.path.dirname(verl.__file__), "trainer", "config", "_generated_ppo_trainer.yaml")
    cfg = OmegaConf.load(path)
    OmegaConf.set_struct(cfg, True)  # an overlay may only set keys verl's config has
    return cfg


def _agent_loops():
    try:  # verl's registry of agent loops (its module needs the test extra's cachetools)
        from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
    except ImportError:
        return {"single_turn_agent", "tool_agent"}  # the names verl 0.9.1 registers
    return _agent_loop_registry


def test_yaml_is_a_valid_verl_overlay():
    from verl.trainer.ppo import core_algos
    from verl.utils.config import omega_conf_to_dataclass

    from steppo_fast.integrations import verl as sv

    blocks = _yaml_blocks()
    assert blocks
    modes = []
    for code in blocks:
        merged = OmegaConf.merge(_verl_config(), OmegaConf.create(code))
        actor = merged.actor_rollout_ref.actor
        assert core_algos.get_policy_loss_fn(actor.policy_loss.loss_mode).__module__ == sv.__name__
        policy_loss = omega_conf_to_dataclass(actor.policy_loss)  # verl builds its dataclass from it
        assert policy_loss.loss_mode in sv.LOSS_MODES
        assert actor.loss_agg_mode in ("seq-mean-token-mean", "token-mean")
        assert merged.algorithm.adv_estimator in sv.ESTIMATORS
        if merged.algorithm.adv_estimator in ("step_gae", "token_gae", "gae"):
            assert merged.critic.enable is True  # the values step_gae reads
        assert merged.actor_rollout_ref.rollout.multi_turn.enable is True
        assert merged.actor_rollout_ref.rollout.agent.default_agent_loop in _agent_loops()
        # The V1 trainer (verl's default entry) in a steppo mode over one of verl's modes, whose
        # settings section verl's config has.
        assert merged.trainer.use_v1 is True
        mode = merged.trainer.v1.trainer_mode
        assert mode.startswith(sv.TRAINER_MODE_PREFIX) and mode[len(sv.TRAINER_MODE_PREFIX):] in merged.trainer.v1
        modes.append(mode)
    with pytest.raises(Exception):  # the check above can fail: an unknown key is refused
        OmegaConf.merge(_verl_config(), OmegaConf.create("actor_rollout_ref: {actor: {policy_loss: {steps: rows}}}"))
    v1 = pytest.importorskip("verl.trainer.ppo.v1")  # needs the test extra's TransferQueue and torchdata
    for mode in modes:  # verl resolves the mode to ours
        cls = v1.get_trainer_cls(mode)
        assert cls.__module__ == sv.__name__ and cls._compute_advantage.__globals__[
            "compute_advantage_for_multi_trajectories"] is sv.compute_advantage_for_multi_trajectories
