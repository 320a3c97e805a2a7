"""The command line: settings read as people write them, mistakes reported in one line with exit
code 2, run folders never replaced silently, and resumes that check what they restore."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("yaml")

from steppo_fast import cli  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One update of 4 lights episodes: about a second on a CPU.
TINY = ["--updates", "1", "--groups", "2", "--group-size", "2", "--no-progress", "--device", "cpu",
        "--set", "eval_episodes=2"]


def _main(capsys, *argv):
    """(exit code, stdout, stderr) of ``steppo-fast *argv`` run in this process."""
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _train(capsys, out, *extra):
    return _main(capsys, "train", "--out", str(out), *TINY, *extra)


def _refused(rc, err, cmd="train"):
    """The mistake was reported as one `steppo-fast <cmd>: ...` line, exit code 2; returns the line."""
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith(f"steppo-fast {cmd}: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-update run (lights, StepPO, separate critic, the tiny model) to copy."""
    out = tmp_path_factory.mktemp("saved") / "run"
    assert cli.main(["train", "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


# ---------------------------------------------------------------------------- settings


def test_numbers_are_read_as_people_write_them(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text('critic_lr: 5E-4\ngamma: "0.99"\nloss: {clip_high: 2.8e-1}\n')
    rc, _, err = _train(capsys, tmp_path / "run", "--config", str(cfg), "--set", "lr=1e-3",
                        "--set", "weight_decay=1e-2")
    assert rc == 0, err
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    c = saved["config"]
    assert (c["lr"], c["critic_lr"], c["gamma"], c["weight_decay"]) == (1e-3, 5e-4, 0.99, 1e-2)
    assert c["loss"] == {"clip_high": 0.28} and all(type(c[k]) is float for k in ("lr", "critic_lr", "gamma"))
    assert [g["lr"] for g in saved["optim"]["param_groups"]] == [1e-3, 5e-4]


@pytest.mark.parametrize("flags, words", [
    (["--set", "temperature=null"], ["temperature", "None"]),
    (["--set", "lr=fast"], ["lr", "'fast'"]),
    (["--set", "updates=2.5"], ["updates", "2.5"]),
    (["--set", "whiten=maybe"], ["whiten", "'maybe'"]),
    (["--set", "lr"], ["--set", "key=value", "'lr'"]),
    (["--set", "loss={clip_high: "], ["--set", "loss={clip_high: "]),
    (["--set", "loss={clip_hi: 0.3}"], ["loss", "clip_hi", "clip_high"]),
    (["--set", "loss=str"], ["loss", "'str'"]),
    (["--set", "loss={clip_high: -1}"], ["loss", "clip_high", "-1"]),
    (["--set", "env_kwargs={bogus: 1}"], ["env_kwargs", "'lights'", "bogus"]),
    (["--set", "model_config={hidden_size: 30}"], ["model_config", "hidden_size", "30"]),
    (["--set", "model_config={hiden_size: 32}"], ["model_config", "hiden_size"]),
    (["--device", "foo"], ["device", "'foo'"]),
])
def test_configuration_mistakes_are_one_line_messages(tmp_path, capsys, flags, words):
    rc, _, err = _train(capsys, tmp_path / "run", *flags)
    line = _refused(rc, err)
    for w in words:
        assert w in line, line
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_config_file_mistakes_name_the_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    line = _refused(*_train(capsys, tmp_path / "run", "--config", str(missing))[::2])
    assert str(missing) in line
    bad = tmp_path / "bad.yaml"
    bad.write_text("env: [lights\nupdates: 3\n")
    line = _refused(*_train(capsys, tmp_path / "run", "--config", str(bad))[::2])
    assert str(bad) in line and "line" in line
    listed = tmp_path / "list.yaml"
    listed.write_text("- env\n- lights\n")
    assert str(listed) in _refused(*_train(capsys, tmp_path / "run", "--config", str(listed))[::2])


def test_an_out_folder_that_cannot_be_one_is_refused(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    for out in (f, f / "sub"):
        line = _refused(*_train(capsys, out)[::2])
        assert str(out) in line
    assert f.read_text() == "x"


def test_demo_mistakes_are_one_line_messages(tmp_path, capsys):
    rc, _, err = _main(capsys, "demo", "--updates", "0")
    assert "updates" in _refused(rc, err, "demo")
    f = tmp_path / "afile"
    f.write_text("x")
    rc, _, err = _main(capsys, "demo", "--updates", "1", "--out", str(f))
    assert str(f) in _refused(rc, err, "demo")


# ---------------------------------------------------------------------------- run folders


def test_a_new_run_never_replaces_a_run_silently(run_copy, capsys):
    kept = {p: p.read_bytes() for p in (run_copy / "metrics.jsonl", run_copy / "checkpoint.pt")}
    line = _refused(*_train(capsys, run_copy, "--seed", "1")[::2])
    assert str(run_copy) in line and "--resume" in line and "--overwrite" in line
    assert all(p.read_bytes() == b for p, b in kept.items())
    assert "--overwrite" in _refused(*_train(capsys, run_copy, "--resume", "--overwrite")[::2])
    (run_copy / "final" / "stale.bin").write_bytes(b"from the run before")
    rc, out, err = _train(capsys, run_copy, "--seed", "1", "--overwrite")
    assert rc == 0, err
    assert f"replacing the run in {run_copy}" in out
    assert torch.load(run_copy / "checkpoint.pt", weights_only=False)["config"]["seed"] == 1
    assert not (run_copy / "final" / "stale.bin").exists()
    assert len((run_copy / "metrics.jsonl").read_text().splitlines()) == 1


def test_demo_twice_in_one_folder_replaces_its_own_run_only(tmp_path, monkeypatch, capsys, run_copy):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        rc, out, err = _main(capsys, "demo", "--updates", "1", "--eval-episodes", "4", "--no-progress")
        assert rc == 0, err
        assert os.path.join("runs", "demo") in out and "replaced by every demo" in out
    assert len((tmp_path / "runs" / "demo" / "metrics.jsonl").read_text().splitlines()) == 1
    # A folder the user names is guarded like train's.
    kept = (run_copy / "checkpoint.pt").read_bytes()
    rc, _, err = _main(capsys, "demo", "--updates", "1", "--out", str(run_copy))
    assert "--overwrite" in _refused(rc, err, "demo")
    assert (run_copy / "checkpoint.pt").read_bytes() == kept


# ---------------------------------------------------------------------------- resume


def test_resume_applies_changed_optimiser_settings_and_names_them(run_copy, capsys):
    # Only the changes are given: every other setting comes from the checkpoint.
    rc, out, err = _main(capsys, "train", "--out", str(run_copy), "--resume", "--updates", "2", "--lr", "0.1",
                         "--set", "critic_lr=0.05", "--set", "weight_decay=0.01", "--no-progress")
    assert rc == 0, err
    line = next(x for x in out.splitlines() if x.startswith("resuming"))
    assert str(run_copy / "checkpoint.pt") in line and "update 1 of 2" in line
    for change in ("lr 0.002 -> 0.1", "critic_lr 0.002 -> 0.05", "weight_decay 0.0 -> 0.01", "updates 1 -> 2"):
        assert change in line, line
    assert "groups" not in line and "device" not in line
    state = torch.load(run_copy / "checkpoint.pt", weights_only=False)
    assert [g["lr"] for g in state["optim"]["param_groups"]] == [0.1, 0.05]
    assert [g["weight_decay"] for g in state["optim"]["param_groups"]] == [0.01, 0.01]
    assert state["config"]["groups"] == 2 and state["update"] == 2


@pytest.mark.parametrize("damage", ["empty", "truncated", "text", "other_object", "no_weights"])
def test_resume_names_an_unreadable_checkpoint(run_copy, capsys, damage):
    path = run_copy / "checkpoint.pt"
    good = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "text":
        path.write_bytes("update: 1 ÿ\n".encode("latin-1"))
    elif damage == "other_object":
        torch.save([1, 2, 3], path)
    else:
        state = torch.load(path, weights_only=False)
        del state["model"]
        torch.save(state, path)
    line = _refused(*_train(capsys, run_copy, "--resume", "--updates", "2")[::2])
    assert str(path) in line


@pytest.mark.parametrize("flags, setting", [
    (["--estimator", "grpo"], "estimator: step_gae in the checkpoint, grpo now"),
    (["--critic", "shared"], "critic: separate in the checkpoint, shared now"),
    (["--set", "model_config={hidden_size: 32, intermediate_size: 64}"], "model_config"),
    (["--env", "hotpot"], "env: lights in the checkpoint, hotpot now"),
])
def test_resume_refuses_other_model_or_task_settings(run_copy, capsys, flags, setting):
    line = _refused(*_train(capsys, run_copy, "--resume", "--updates", "2", *flags)[::2])
    assert str(run_copy / "checkpoint.pt") in line and setting in line, line


def test_resume_refuses_overwritten_weights(run_copy, capsys):
    path = run_copy / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    state["model"]["policy.model.norm.weight"].fill_(1e30)
    torch.save(state, path)
    line = _refused(*_train(capsys, run_copy, "--resume", "--updates", "2")[::2])
    assert str(path) in line and "policy.model.norm.weight" in line


# ---------------------------------------------------------------------------- exit codes of the real command


def _command(*argv, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "steppo_fast.cli", *argv], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_the_command_exits_2_with_one_line(tmp_path):
    r = _command("train", "--config", "missing.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("steppo-fast train: ")
    assert "missing.yaml" in r.stderr


def test_the_command_refuses_the_default_folder_when_it_holds_a_run(tmp_path):
    run = tmp_path / "runs" / "steppo"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"update": 0}) + "\n")
    r = _command("train", *TINY, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert os.path.join("runs", "steppo") in r.stderr and "--overwrite" in r.stderr
    assert (run / "metrics.jsonl").read_text() == json.dumps({"update": 0}) + "\n"
