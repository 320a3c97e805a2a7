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


# ------------------------------------------------------------------ results folder, per-case tables, peers
def _fake_bench(calls):
    """A bench module of two cases; the second case's variant raises KeyboardInterrupt (as a
    stopped process would stop), after the first case's table was written."""
    from types import SimpleNamespace

    def ok(s):
        calls.append("ok")
        return torch.ones(3) * s["x"]

    def interrupted(s):
        raise KeyboardInterrupt

    def cases(device, grid):
        ref = lambda s: torch.ones(3, dtype=torch.float64) * s["x"]  # noqa: E731
        yield harness.Case("first", {"n": 3}, {"x": 1.0}, ref, bytes_moved=12, variants=[harness.Variant("a", ok)])
        yield harness.Case("second", {"n": 3}, {"x": 2.0}, ref, variants=[harness.Variant("b", interrupted)])

    return SimpleNamespace(cases=cases)


def test_each_case_rewrites_the_table_so_a_stopped_run_keeps_it(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(run.BENCHES, "fake", _fake_bench(calls))
    try:
        run.main("fake", "cpu", "tiny", str(tmp_path), progress=False)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the second case should have stopped the run")
    rows = json.loads((tmp_path / "fake_tiny_cpu.json").read_text())["rows"]
    assert [r["op"] for r in rows] == ["first"] and rows[0]["max_abs_err"] == 0.0
    assert "| first |" in (tmp_path / "fake_tiny_cpu.md").read_text()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_results_folder_is_checked_before_anything_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(run.BENCHES, "fake", _fake_bench(calls))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for bad, why in (("", "empty"), (str(a_file), "not a folder"), (str(a_file / "sub"), "cannot write")):
        try:
            run.main("fake", "cpu", "tiny", bad, progress=False)
        except SystemExit as e:
            assert why in str(e) and "--out" in str(e), str(e)
        else:
            raise AssertionError(f"no error for --out {bad!r}")
    assert calls == []  # nothing was benchmarked


def test_cli_bench_out_empty_is_an_error(capsys):
    try:
        main(["bench", "--op", "losses", "--grid", "tiny", "--out", "", "--no-progress"])
    except SystemExit as e:
        assert "empty" in str(e)
    else:
        raise AssertionError("--out '' accepted")
    assert main(["bench", "--quick", "--grid", "full", "--out", "x"]) == 2
    assert "disagree" in capsys.readouterr().err


def test_peer_without_its_package_is_skipped_not_called():
    called = []
    v = harness.Variant("peer", lambda s: called.append(1), "peer", requires=("steppo_fast_no_such_package",))
    w = harness.Variant("left out", lambda s: called.append(2), "peer", requires=("torch",))
    c = harness.Case("op", {"n": 1}, {}, lambda s: torch.zeros(1), variants=[v, w])
    rows = harness.run_cases([c], "cpu", 0.01, progress=False, without=["torch"])
    assert called == []
    assert rows[0]["skipped"] == "steppo_fast_no_such_package not installed"
    assert rows[1]["skipped"] == "torch left out"


def test_linear_head_batch_draws_old_logp_in_float32_chunks():
    """The behaviour log-probs of the linear-head benchmark: the fp64 reference's values, without
    an N x V float64 (or any N x V) buffer (once 49 bytes per logit: 122 GB at N = 16384)."""
    from steppo_fast import reference as ref
    from steppo_fast.benchmarks import bench_linear_head as blh
    from steppo_fast.testing import assert_close

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(300, 16, generator=g), torch.randn(2000, 16, generator=g) / 4
    y = torch.randint(0, 2000, (300,), generator=g)
    lp = blh._current_logp(h, w, y, logits_bytes=64 * 2000 * 4)  # 64 rows at a time: 5 chunks
    assert_close(lp, ref.linear_token_logprobs(h.double(), w.double(), y)[0])
    n, v = 512, 32000
    peak = harness.peak_memory_bytes(
        lambda: blh.make_batch(n, 16, v, torch.float32, "cpu", 1.0, 64, logits_bytes=1 << 20), "cpu")
    assert peak < n * v * 4 / 4, f"{peak / 2 ** 20:.1f} MiB: an N x V buffer was allocated"
