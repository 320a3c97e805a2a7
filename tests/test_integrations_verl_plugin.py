"""verl finds steppo_fast's losses and estimator in processes that never import steppo_fast: Ray
workers run ``import verl`` and nothing of the user's entry script. Each check runs in a fresh
interpreter that imports only verl, through verl's own mechanisms for external modules."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("verl")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The worker's view: import verl, look the names up in its registries, never import steppo_fast.
PROBE = textwrap.dedent("""
    import sys
    import verl
    from verl.trainer.ppo import core_algos
    found = {}
    for name in ("steppo", "steppo_token", "steppo_rows", "steppo_token_rows"):
        try:
            found[name] = core_algos.get_policy_loss_fn(name).__module__
        except ValueError as e:
            found[name] = str(e)
    try:
        found["step_gae"] = core_algos.get_adv_estimator_fn("step_gae").__module__
    except ValueError as e:
        found["step_gae"] = str(e)
    print(repr(found))
    if len(sys.argv) > 1:  # verl's third way: model.external_lib, imported by HFModelConfig in the workers
        from verl.utils.import_utils import import_external_libs
        import_external_libs(sys.argv[1])
        print(repr(core_algos.get_policy_loss_fn("steppo").__module__))
""")
OURS = "steppo_fast.integrations.verl"


def _probe(env_extra: dict, pythonpath, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_USE_EXTERNAL")}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    out = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{") or ln.startswith("'")]
    return [eval(ln) for ln in lines]  # noqa: S307 (our own repr output)


def _entry_point_dist(tmp_path) -> str:
    """A dist-info declaring the package's ``verl.plugins`` entry point, as an install writes it:
    a checkout on PYTHONPATH has no metadata, so the test supplies it (pyproject declares the same)."""
    group, name, value = _declared_entry_point()
    dist = tmp_path / "steppo_fast_plugin_probe-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: steppo-fast-plugin-probe\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(f"[{group}]\n{name} = {value}\n")
    return str(tmp_path)


def _declared_entry_point():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        eps = tomllib.load(f)["project"]["entry-points"]
    assert "verl.plugins" in eps, "pyproject.toml must declare the verl.plugins entry point"
    (name, value), = eps["verl.plugins"].items()
    return "verl.plugins", name, value


def test_pyproject_declares_the_verl_plugin():
    assert _declared_entry_point() == ("verl.plugins", "steppo_fast", OURS)


def test_entry_point_registers_in_a_fresh_process(tmp_path):
    (found,) = _probe({}, [_entry_point_dist(tmp_path), ROOT])
    assert all(v == OURS for v in found.values()), found


def test_env_variable_registers_in_a_fresh_process():
    # For a checkout on PYTHONPATH (no metadata): verl imports the modules named in this variable.
    (found,) = _probe({"VERL_USE_EXTERNAL_MODULES": OURS, "VERL_USE_EXTERNAL_PLUGINS": "none"}, [ROOT])
    assert all(v == OURS for v in found.values()), found


def test_without_a_mechanism_verl_does_not_know_steppo():
    # The control: plugins off and no module named, so nothing registers ... until model.external_lib does.
    found, module = _probe({"VERL_USE_EXTERNAL_PLUGINS": "none"}, [ROOT], OURS)
    assert found["steppo"].startswith("Unsupported loss mode: steppo"), found
    assert module == OURS
