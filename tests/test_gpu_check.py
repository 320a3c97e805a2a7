"""The two-call device check (benchmarks/gpu_check.py): its dry run on the CPU runs every stage
of both calls and leaves what a device call would bring back; its stage runner stops a stage at
its time limit and goes on with the next."""

import json
import os
import re
import subprocess
import sys
import tarfile

import pytest

from steppo_fast.benchmarks import gpu_check

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_check.py")


def _returned_files(out):
    """What a device call brings back from $OUT: at most 8 files, 16 MiB each, no more
    than 2 folders down, names of letters, digits, '.', '_' and '-'."""
    files = []
    for root, _, names in os.walk(out):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), out)
            assert rel.count(os.sep) <= 2, rel
            assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.split(os.sep)), rel
            assert os.path.getsize(os.path.join(root, n)) <= 16 * 2 ** 20, rel
            files.append(rel)
    assert len(files) <= 8, files
    return sorted(files)


def _dry_run(call, out, cache):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the script puts the checkout on the path of its stages itself
    res = subprocess.run([sys.executable, SCRIPT, "--call", str(call), "--dry-run", "--out", str(out), "--cache",
                          str(cache)], capture_output=True, text=True, timeout=900, env=env)
    summary = json.loads((cache / "gpu_check" / f"call{call}" / "summary.json").read_text())
    bad = {s["name"]: (s.get("status"), s.get("missing")) for s in summary["stages"] if s.get("status") != "ok"}
    assert res.returncode == 0 and not bad, f"{bad}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return summary, res.stdout


def test_dry_run_of_both_calls_runs_every_stage_and_returns_its_outputs(tmp_path):
    cache, out1, out2 = tmp_path / "cache", tmp_path / "out1", tmp_path / "out2"
    s1, stdout1 = _dry_run(1, out1, cache)
    assert [s["name"] for s in s1["stages"]] == ["env", "build", "tests", "probe", "train"]
    assert _returned_files(out1) == ["cache.tar.gz", "call1.tar.gz", "call1_summary.md", "probe.md"]
    tests = next(s for s in s1["stages"] if s["name"] == "tests")
    n_selected = int(re.match(r"(\d+)", tests["pytest"]["result"]).group(1))
    assert n_selected > 50, tests["pytest"]  # the GPU selection is not empty
    probe = json.loads((cache / "gpu_check" / "call1" / "probe.json").read_text())["results"]
    assert set(probe) == {"copy", "logprob", "syncs", "fused_loss"}
    assert not [k for k, r in probe.items() if "error" in r], probe
    assert all(v == "n/a (cpu)" for k, v in probe["syncs"].items() if k != "seconds"), probe["syncs"]
    with tarfile.open(out1 / "call1.tar.gz") as tar:
        names = set(tar.getnames())
    for f in ("env.log", "build.log", "tests.log", "probe.json", "train.log", "train_lights/metrics.jsonl",
              "summary.json"):
        assert f"call1/{f}" in names, f
    assert not [n for n in names if n.endswith(".pt")]  # the trainer's checkpoint stays behind
    with tarfile.open(out1 / "cache.tar.gz") as tar:
        assert "build/manifest.json" in tar.getnames()
    assert "| train | ok |" in stdout1

    # Call 2 on the cache call 1 left (what carry brings), the modules restored, not rebuilt.
    s2, _ = _dry_run(2, out2, cache)
    assert [s["name"] for s in s2["stages"]] == ["env", "build"] + [f"bench_{op}" for op in gpu_check.BENCH_OPS]
    assert "restored" in (cache / "gpu_check" / "call2" / "build.log").read_text()
    tables = [f"{op}_tiny_cpu.md" for op in gpu_check.BENCH_OPS]
    assert _returned_files(out2) == sorted(["cache.tar.gz", "call2.tar.gz", "call2_summary.md"] + tables)
    for op in gpu_check.BENCH_OPS:
        rows = json.loads((cache / "gpu_check" / "call2" / "tables" / f"{op}_tiny_cpu.json").read_text())["rows"]
        ours = [r for r in rows if r["kind"] == "steppo_fast"]
        assert ours and all("median_ms" in r and "error" not in r for r in ours), op
        assert all(r.get("skipped", "").endswith("left out") for r in rows if r["variant"].startswith("verl")), op


def _stage(name, code, **kw):
    return gpu_check.Stage(name, [sys.executable, "-c", code], **kw)


def test_a_stage_past_its_time_is_stopped_and_the_next_runs(tmp_path, monkeypatch):
    stages = [
        _stage("quick", "print('done')", limit=60, expect=1),
        # A child process in the stage's group must be stopped with it.
        _stage("hangs", "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                        "'import time; time.sleep(60)']); time.sleep(60)", limit=60, expect=1),
        _stage("after", "print('still runs')", limit=60, expect=1, reserve=8),
        _stage("no_output", "pass", limit=60, expect=1, outputs=("promised.txt",)),
    ]
    monkeypatch.setattr(gpu_check, "plan", lambda *a: stages)
    # Budget: the final reserve, 8 s kept for 'after', and 6 s for 'quick' and 'hangs'.
    budget = gpu_check.FINAL_RESERVE + 8 + 6
    rc = gpu_check.run_call(1, str(tmp_path / "out"), str(tmp_path / "cache"), False, budget)
    assert rc == 1
    got = {s.name: s.result for s in stages}
    assert got["quick"]["status"] == "ok"
    assert got["hangs"]["status"] == "timeout" and got["hangs"]["seconds"] < 20
    assert got["after"]["status"] == "ok"
    assert got["no_output"]["status"].startswith("skipped") or got["no_output"]["missing"] == ["promised.txt"]
    summary = (tmp_path / "out" / "call1_summary.md").read_text()
    assert "| hangs | timeout |" in summary
    assert "still runs" in (tmp_path / "cache" / "gpu_check" / "call1" / "after.log").read_text()


def test_missing_outputs_fail_a_stage(tmp_path, monkeypatch):
    stages = [_stage("no_output", "pass", limit=60, expect=1, outputs=("promised.txt",))]
    monkeypatch.setattr(gpu_check, "plan", lambda *a: stages)
    assert gpu_check.run_call(2, str(tmp_path / "out"), str(tmp_path / "cache"), False, 100) == 1
    assert stages[0].result["status"] == "failed (outputs missing)"
    assert stages[0].result["missing"] == ["promised.txt"]


def test_device_commands_fit_their_limits():
    """The command lines written in the script's header: each under 2,000 characters, and the
    limits of the calls above their budgets (so the script, not the limit, ends each call)."""
    doc = gpu_check.__doc__
    commands = re.findall(r"call \d:\s+(python3 .+)", doc)
    assert len(commands) == 2 and all(len(c) < 2000 for c in commands)
    limits = [int(t) for t in re.findall(r"limit (\d+) s", doc)]
    assert limits[0] > gpu_check.BUDGET[1] and limits[1] > gpu_check.BUDGET[2]
    assert limits[0] + limits[1] <= 15 * 60 - 120  # two machine starts of about a minute each
    assert "sending .cache along" in doc


@pytest.mark.parametrize("call", [1, 2])
def test_planned_limits_fit_the_budget(call, tmp_path):
    stages = gpu_check.plan(call, False, str(tmp_path), str(tmp_path))
    expected = sum(s.expect for s in stages) + gpu_check.FINAL_RESERVE
    assert expected <= gpu_check.BUDGET[call]
    for i, s in enumerate(stages):
        assert s.reserve <= s.limit and s.expect <= s.limit, s.name


def test_cache_keeps_the_build_then_the_newest_kernels_within_its_limit(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    for i, (rel, size) in enumerate([("build/manifest.json", 100), ("triton/old/k.cubin", 3000),
                                     ("triton/new/k.cubin", 3000), ("inductor/fxgraph/g", 3000)]):
        path = cache / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
        os.utime(path.parent if "/" in rel.split("/", 1)[1] else path, (1000 + i, 1000 + i))
    note = gpu_check.pack_cache(str(cache), str(out), raw_limit=5000)
    with tarfile.open(out / "cache.tar.gz") as tar:
        files = sorted(n for n in tar.getnames() if tar.getmember(n).isfile())
    assert files == ["build/manifest.json", "triton/new/k.cubin"], files
    assert "2 entries left out" in note
