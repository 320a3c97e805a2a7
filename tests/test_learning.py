"""The learning benchmark: its statistics against hand-computed values, and a grid that keeps
each finished run, resumes by skipping them and refuses to mix settings."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from steppo_fast.benchmarks import learning  # noqa: E402


def test_paired_permutation_p_by_hand():
    # Five pairs all favouring one side: only the all-plus and all-minus flips are as extreme.
    assert learning.paired_permutation_p([0.1, 0.2, 0.05, 0.3, 0.1]) == 2 / 32
    # [3, 1, -1]: the 8 sign flips give sums 5, 3, 3, 1, -1, -3, -3, -5; |sum| >= 3 for 6 of them.
    assert learning.paired_permutation_p([3.0, 1.0, -1.0]) == 6 / 8
    assert learning.paired_permutation_p([1.0, -1.0]) == 1.0
    assert learning.paired_permutation_p([0.0, 0.0]) == 1.0
    with pytest.raises(ValueError, match="at least one"):
        learning.paired_permutation_p([])


def test_bootstrap_interval_by_hand():
    # Resampled means of [0, 1]: 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5% and
    # 97.5% quantiles are 0 and 1.
    assert learning.bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    assert learning.bootstrap_ci([0.4] * 5) == pytest.approx((0.4, 0.4), abs=1e-12)
    lo, hi = learning.bootstrap_ci([0.1, 0.5, 0.9, 0.3, 0.7])
    assert 0.1 < lo < 0.5 < hi < 0.9
    assert learning.bootstrap_ci([0.1, 0.5, 0.9]) == learning.bootstrap_ci([0.1, 0.5, 0.9])  # seeded


def test_curve_measures_by_hand():
    assert learning.auc([0.0, 0.5, 1.0, 0.5]) == 0.5
    assert learning.updates_to_reach([0.0, 0.0, 1.0, 1.0], 1.0, window=1) == 3
    assert learning.updates_to_reach([0.0, 0.0, 1.0, 1.0], 0.5, window=2) == 3  # moving average 0, 0, .5
    assert learning.updates_to_reach([0.0, 0.2], 0.9, window=1) is None


def _run(method, seed, curve, final):
    return {"method": method, "seed": seed, "curve": curve, "final_success": final, "tokens_per_step": [10.0],
            "rollout_s": [1.0], "update_s": [2.0], "train_cpu_s": 3.0 * len(curve), "train_wall_s": 3.0,
            "eval_wall_s": 1.0}


def test_summary_pairs_runs_by_seed():
    runs = [_run("steppo", 0, [0.0, 1.0], 0.9), _run("steppo", 1, [0.0, 0.5], 0.7),
            _run("grpo", 1, [0.0, 0.0], 0.2), _run("grpo", 0, [0.0, 0.5], 0.4)]
    s = learning.summarise(runs, {"StepPO": "steppo", "GRPO": "grpo"})
    rows = {r["method"]: r for r in s["rows"]}
    assert rows["StepPO"]["final_mean"] == pytest.approx(0.8) and rows["GRPO"]["auc_mean"] == pytest.approx(0.125)
    assert (rows["StepPO"]["estimator"], rows["StepPO"]["ratio"]) == ("step_gae", "step")
    # Mean curves (5-update moving average): StepPO 0, 0.375 -> best 0.375, target 0.3375.
    assert s["target"] == pytest.approx(0.9 * 0.375)
    assert rows["StepPO"]["updates_to_target_mean_curve"] == 2 and rows["GRPO"]["seeds_reaching_target"] == 0
    (p,) = s["paired"]
    # Seed 0: 0.9 - 0.4 = 0.5; seed 1: 0.7 - 0.2 = 0.5.
    assert p["baseline"] == "GRPO" and p["pairs"] == 2 and p["final_diff"] == pytest.approx(0.5)
    assert p["final_wins"] == 2 and p["final_p"] == 0.5
    assert p["auc_diff"] == pytest.approx(((0.5 - 0.25) + (0.25 - 0.0)) / 2)


def test_grid_writes_each_run_resumes_and_refuses_other_settings(tmp_path, monkeypatch):
    out, runs_dir = tmp_path / "results", tmp_path / "runs"
    argv = ["--quick", "--seeds", "1", "--methods", "StepPO", "GSPO", "--jobs", "1", "--updates", "1",
            "--out", str(out), "--runs-dir", str(runs_dir)]
    calls = []
    real = learning.run_one

    def interrupted(*args):
        calls.append(args[1:3])
        if len(calls) == 2:  # the grid is interrupted during its second run
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(learning, "run_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        learning.main(argv)
    data = json.loads((out / "learning_relay_quick.json").read_text())
    assert [(r["method"], r["seed"]) for r in data["runs"]] == [("steppo", 0)] and data["grid"]["runs"] == 1
    assert (out / "learning_relay_quick.md").exists()  # the table of what finished
    run = data["runs"][0]
    assert len(run["curve"]) == 1 and 0.0 <= run["final_success"] <= 1.0 and run["tokens_per_step"][0] > 2
    assert run["rollout_s"][0] > 0 and run["update_s"][0] > 0
    # A rerun skips what finished and runs the rest.
    calls.clear()
    monkeypatch.setattr(learning, "run_one", lambda *a: calls.append(a[1:3]) or real(*a))
    assert learning.main(argv) == 0
    assert calls == [("gspo", 0)]
    data = json.loads((out / "learning_relay_quick.json").read_text())
    assert sorted((r["method"], r["seed"]) for r in data["runs"]) == [("gspo", 0), ("steppo", 0)]
    assert data["grid"]["sessions"] == 2
    md = (out / "learning_relay_quick.md").read_text()
    assert "| StepPO | step_gae | step | 1 |" in md and "| GSPO | grpo | step | 1 |" in md and "StepPO minus" in md
    assert (out / "learning_relay_quick.png").stat().st_size > 1000
    assert (out / "learning_relay_quick_bars.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="other settings.*updates"):
        learning.main([*argv[:-4], "--updates", "2", "--out", str(out), "--runs-dir", str(runs_dir)])


def test_lambda_option_names_its_files_and_reaches_the_runs(tmp_path, monkeypatch):
    out = tmp_path / "results"
    seen = []
    real = learning.run_one
    monkeypatch.setattr(learning, "run_one", lambda *a: seen.append(a[4]["lam"]) or real(*a))
    argv = ["--quick", "--seeds", "1", "--methods", "StepPO", "--jobs", "1", "--updates", "1", "--lam", "0.9",
            "--out", str(out), "--runs-dir", str(tmp_path / "runs")]
    assert learning.main(argv) == 0
    assert seen == [0.9]
    data = json.loads((out / "learning_relay_quick_lam0.9.json").read_text())
    assert data["settings"]["lam"] == 0.9 and "lambda 0.9" in (out / "learning_relay_quick_lam0.9.md").read_text()
    with pytest.raises(SystemExit):
        learning.main([*argv[:-6], "--lam", "1.5", "--out", str(out)])
