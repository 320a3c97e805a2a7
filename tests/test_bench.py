"""The benchmark harness and the CLI on a tiny run."""

import json
import os

import torch

from steppo_fast.benchmarks import harness, run
from steppo_fast.cli import main


def test_peak_memory_counts_allocations_inside_a_call():
    x = torch.randn(256, 1024)  # 1 MiB

    def two_temporaries():
        a = x * 2
        b = a + 1  # a and b live together: 2 MiB
        return b.sum()

    peak = harness.peak_memory_bytes(two_temporaries, "cpu")
    assert 2 * 2 ** 20 <= peak < 3 * 2 ** 20


def test_max_error_compares_all_outputs():
    a = (torch.tensor([1.0, 2.0]), torch.tensor([3.0]))
    b = (torch.tensor([1.0, 2.5]), torch.tensor([2.0]))
    assert harness.max_error(a, b) == 1.0


def test_bench_cli_writes_json_and_markdown(tmp_path, capsys):
    assert main(["bench", "--op", "losses", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    md = (tmp_path / "losses_quick_cpu.md").read_text()
    data = json.loads((tmp_path / "losses_quick_cpu.json").read_text())
    assert "torch:" in md and "commit:" in md and "| median_ms |" in md.replace(" median_ms ", " median_ms ")
    rows = data["rows"]
    assert {r["variant"] for r in rows} >= {"eager"}
    for r in rows:
        assert "error" not in r, r
        assert r["median_ms"] > 0 and r["max_abs_err"] < 1e-5
    assert "policy_loss(step)" in capsys.readouterr().out


def test_bench_unknown_op_is_an_error(tmp_path):
    try:
        run.main("nope", "cpu", True, str(tmp_path), progress=False)
    except SystemExit as e:
        assert "unknown --op 'nope'" in str(e)
    else:
        raise AssertionError("no error for an unknown op")


def test_default_results_folder_is_in_the_checkout_or_cwd():
    assert run.default_out_dir().endswith(os.path.join("benchmarks", "results"))
