#!/usr/bin/env python3
"""The device check of steppo_fast: two calls on one CUDA machine that fit a 15-minute lease
(each call's machine start included), every stage under its own time limit.

Call 1 (a 300 s budget): build, correctness, headline numbers.

  ========  =====  ========  ==================================================================
  stage     limit  expected  what
  ========  =====  ========  ==================================================================
  env        20 s     5 s    nvidia-smi, versions, which peers are installed
  build     120 s    45 s    ``_C`` and ``_C_cuda`` (nvcc, sm_90 only), both at once; or restored
                             from the cache when the sources are unchanged
  tests     150 s    90 s    the GPU tests (tests/test_gpu.py, ``-k "cuda or triton"``, CUDA graphs,
                             torch.compile), no ``-x``, ``--maxfail=25``, 4 workers
  probe      90 s    40 s    ``gpu_probe``: copy bandwidth, token_logprobs bf16 at 16384 x 151936,
                             host syncs per op, the fused loss in TFLOP/s (6NHV) and memory
  train      75 s    40 s    ``steppo-fast train`` on cuda, 6 updates of ``lights``
  ========  =====  ========  ==================================================================

Call 2 (a 360 s budget): the benchmark tables, most important first.

  ===================  =====  ========
  stage                limit  expected
  ===================  =====  ========
  env                   20 s     5 s
  build (restore)      120 s     5 s
  bench logprob        120 s    90 s
  bench linear_head    100 s    60 s
  bench losses          75 s    50 s
  bench advantages      90 s    70 s
  ===================  =====  ========

A stage gets its limit, or less when the call's budget, minus the time kept back for the
stages after it, is shorter; a stage that runs past its time is stopped (its process group
killed) and the next one starts. Every bench table is rewritten after each case, so a stopped
stage keeps the cases that finished. Triton's and Inductor's caches and the built modules live
under ``.cache/`` (ignored by git), which call 1 returns as ``cache.tar.gz`` for call 2 to carry.

What comes back under ``$OUT`` (at most 7 files, none in a subfolder):
``callN_summary.md`` (each stage's status and time, test counts, failures), ``callN.tar.gz``
(every log, table and JSON file of the call), ``cache.tar.gz`` (the caches, under 15.5 MiB),
and ``probe.md`` (call 1) or the four ``<op>_full_cuda.md`` tables (call 2). The summary and
the call's tarball are rewritten after every stage, so a call stopped by its timeout still
returns what finished. The cache keeps the built modules, then Triton's kernels newest first
(the probe's and the trainer's: the ops at the benchmarks' sizes), then Inductor's, up to
40 MiB unpacked (a call carries 64 MiB with the working tree).

On a lent machine that runs one command per call under a wall-clock limit, returns the files
written under ``$OUT`` and can send ignored folders of the checkout along:

    call 1:  python3 benchmarks/gpu_check.py --call 1 --out "$OUT"
             limit 330 s
    between: rm -rf .cache && mkdir .cache && tar -xzf <call 1's returned files>/cache.tar.gz -C .cache
    call 2:  python3 benchmarks/gpu_check.py --call 2 --out "$OUT"
             limit 390 s, sending .cache along

then hand the machine back. With less time left, give ``--budget N`` and a limit of N + 30 s: the
stages at the end of the call get less time first. Prefix a command with
``STEPPO_FAST_COMMIT=<hash>`` to stamp the tables with the commit (the machine receives no git
history).

``--dry-run`` runs the same stages on the CPU with tiny sizes and ``TRITON_INTERPRET=1``
(no nvcc build: the compiled modules are only checked; the tests are only collected), so a
test can check that every stage still runs and writes its outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.abspath(__file__)
BUDGET = {1: 300.0, 2: 360.0}
FINAL_RESERVE = 15.0  # seconds kept for the last packing and the summary
MIN_STAGE = 5.0  # a stage is skipped when less than this is left for it
DRY_LIMIT_FACTOR = 3.0  # the dry run's limits only guard against hangs on a slow CPU
CACHE_LIMIT = int(15.5 * 2 ** 20)  # one file under $OUT may hold 16 MiB
RAW_CACHE_LIMIT = 40 * 2 ** 20  # a call carries at most 64 MiB with the working tree
# tests/test_gpu.py first: the checks that only a GPU can make (no host sync, bf16 NaN rows,
# index guards, rows past 2^31 entries), then every test of the GPU backends.
GPU_TEST_FILES = ["tests/test_gpu.py", "tests/test_advantages.py", "tests/test_ops.py", "tests/test_logprob.py",
                  "tests/test_linear_head.py", "tests/test_losses.py", "tests/test_robustness.py",
                  "tests/test_cuda_graph.py", "tests/test_compile.py"]
GPU_TEST_SELECTION = "test_gpu or cuda or triton or Triton"
BENCH_OPS = ["logprob", "linear_head", "losses", "advantages"]  # most important first
NOT_PACKED = (".pt", ".safetensors", ".bin")  # model weights of the trainer run stay out of the tarball


@dataclass
class Stage:
    """One step of a call: a command, the most seconds it may take, the seconds expected on an
    H200, the seconds kept back for it while earlier stages run, and the files (under the work
    folder) it must leave."""

    name: str
    cmd: List[str]
    limit: float
    expect: float
    reserve: float = 0.0
    outputs: Tuple[str, ...] = ()
    pack_cache: bool = False
    result: Dict[str, object] = field(default_factory=dict)


def _has(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def plan(call: int, dry: bool, work: str, cache: str) -> List[Stage]:
    """The stages of a call (commands run from the repository root)."""
    py = sys.executable
    common = [Stage("env", [py, SCRIPT, "_env"], 20, 5, outputs=("env.log",)),
              Stage("build", [py, SCRIPT, "_build", "--cache", cache] + (["--dry-run"] if dry else []), 120,
                    5 if call == 2 else 45, reserve=0, outputs=("build.log",), pack_cache=True)]
    if call == 1:
        if dry:
            tests = [py, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q"]
        else:
            tests = [py, "-m", "pytest", "-p", "no:cacheprovider", "-v", "--tb=short", "-rfE", "--maxfail=25"]
            if _has("xdist"):
                tests += ["-n", "4"]
            if _has("pytest_timeout"):
                tests += ["--timeout=120"]
        tests += GPU_TEST_FILES + ["-k", GPU_TEST_SELECTION]
        probe = [py, "-m", "steppo_fast.benchmarks.gpu_probe", "--out", work]
        train = [py, "-m", "steppo_fast.cli", "train", "--env", "lights", "--device", "cuda", "--updates", "6",
                 "--no-progress", "--out", os.path.join(work, "train_lights"), "--set", "save_every=6"]
        if dry:
            probe += ["--device", "cpu", "--tiny"]
            train = [a if a != "cuda" else "cpu" for a in train]
            train[train.index("--updates") + 1] = "1"
            train += ["--groups", "2", "--group-size", "2", "--set", "save_every=1", "--set", "eval_episodes=4"]
        return common + [
            Stage("tests", tests, 150, 90, reserve=40, outputs=("tests.log",), pack_cache=True),
            Stage("probe", probe, 90, 40, reserve=45, outputs=("probe.log", "probe.json", "probe.md")),
            Stage("train", train, 75, 40, reserve=35,
                  outputs=("train.log", "train_lights/metrics.jsonl", "train_lights/learning_curve.png")),
        ]
    tables = os.path.join(work, "tables")
    grid, device = ("tiny", "cpu") if dry else ("full", "cuda")
    limits = {"logprob": (120, 90, 60), "linear_head": (100, 60, 50), "losses": (75, 50, 40),
              "advantages": (90, 70, 40)}
    out = list(common)
    for op in BENCH_OPS:
        cmd = [py, "-m", "steppo_fast.cli", "bench", "--op", op, "--device", device, "--grid", grid, "--out", tables,
               "--no-progress"]
        if dry:  # as on the device, where the peers' packages are not installed
            cmd += ["--without", "verl,liger_kernel,trl"]
        limit, expect, reserve = limits[op]
        out.append(Stage(f"bench_{op}", cmd, limit, expect, reserve=reserve,
                         outputs=(f"bench_{op}.log", f"tables/{op}_{grid}_{device}.md",
                                  f"tables/{op}_{grid}_{device}.json")))
    return out


# ----------------------------------------------------------------------------- running
def stage_env(dry: bool, cache: str) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(PYTHONUNBUFFERED="1", MPLBACKEND="Agg", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TRITON_CACHE_DIR=os.path.join(cache, "triton"), TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"))
    env.pop("STEPPO_FAST_BACKEND", None)
    if dry:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def run_stage(cmd: List[str], timeout: float, log_path: str, env: Dict[str, str]) -> Tuple[str, Optional[int], float]:
    """Runs cmd in its own process group with its output in log_path; stops the whole group at
    the timeout. Returns (status, return code or None, seconds)."""
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 0.1))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _stop(proc)
            rc, status = None, "timeout"
        seconds = time.monotonic() - t0
        log.write(f"\n[{status} after {seconds:.1f} s, limit {timeout:.0f} s]\n")
    return status, rc, seconds


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: str, n: int) -> List[str]:
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()[-n:]
    except OSError:
        return []


def _pytest_notes(log_path: str) -> Dict[str, object]:
    """The result line and the failures of a pytest log."""
    lines = _tail(log_path, 100000)
    counts = [ln.strip("= ").strip() for ln in lines
              if re.search(r"\b(passed|failed|error|errors|skipped|collected|deselected|no tests ran)\b", ln)
              and ln.startswith("=")]
    collected = [ln for ln in lines if re.match(r"^\d+/\d+ tests collected|^\d+ tests? collected", ln)]
    failures = [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    return {"result": (counts or collected or [""])[-1], "failures": failures[:40]}


# ----------------------------------------------------------------------------- outputs
def _tar(src_dir: str, arcname: str, dest: str, skip=lambda path: False) -> int:
    tmp = dest + ".part"

    def filt(info: tarfile.TarInfo):
        if info.name.endswith(NOT_PACKED) or skip(info.name):
            return None
        return info

    with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
        tar.add(src_dir, arcname=arcname, filter=filt)
    os.replace(tmp, dest)
    return os.path.getsize(dest)


def _tree_bytes(path: str) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                total += os.path.getsize(os.path.join(root, n))
            except OSError:
                pass
    return total


def pack_cache(cache: str, out: str, raw_limit: int = RAW_CACHE_LIMIT) -> str:
    """cache.tar.gz of the caches call 2 carries: the built modules, then Triton's kernels newest
    first (the probe's and the trainer's, the ops at the benchmarks' sizes), then Inductor's,
    while their size stays under ``raw_limit`` (what a carry may hold) and the file under
    CACHE_LIMIT (what may come back). Returns what it holds."""
    dest = os.path.join(out, "cache.tar.gz")
    entries = []  # (archive name, path) in the order of priority
    for sub in ("build", "triton", "inductor"):
        base = os.path.join(cache, sub)
        if not os.path.isdir(base):
            continue
        kids = [os.path.join(base, k) for k in os.listdir(base)]
        kids.sort(key=lambda k: os.path.getmtime(k), reverse=True)
        entries += [(f"{sub}/{os.path.basename(k)}", k) for k in kids]
    while True:
        chosen, used, left_out = [], 0, 0
        for arc, path in entries:
            size = _tree_bytes(path) if os.path.isdir(path) else os.path.getsize(path)
            if used + size <= raw_limit or arc.startswith("build/"):
                chosen.append((arc, path))
                used += size
            else:
                left_out += 1
        tmp = dest + ".part"
        with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
            for arc, path in chosen:
                tar.add(path, arcname=arc)
        size = os.path.getsize(tmp)
        if size <= CACHE_LIMIT or raw_limit < 2 ** 20:
            os.replace(tmp, dest)
            kinds = sorted({arc.split("/")[0] for arc, _ in chosen})
            note = f"{', '.join(kinds) or 'nothing'}: {used / 2 ** 20:.1f} MiB, {size / 2 ** 20:.1f} MiB packed"
            return note + (f", {left_out} entries left out" if left_out else "")
        raw_limit //= 2


def write_summary(call: int, dry: bool, stages: List[Stage], work: str, out: str, t_start: float,
                  budget: float, cache_note: str) -> str:
    rows = ["| stage | status | seconds | time given | limit | expected on an H200 |", "|---|---|---|---|---|---|"]
    for st in stages:
        r = st.result
        rows.append(f"| {st.name} | {r.get('status', 'not run')} | {r.get('seconds', '')} | "
                    f"{r.get('timeout', '')} | {st.limit:.0f} | {st.expect:.0f} |")
    lines = [f"# device check, call {call}{' (dry run)' if dry else ''}", "",
             f"elapsed {time.monotonic() - t_start:.0f} s of a {budget:.0f} s budget; cache: {cache_note}", ""] + rows
    for st in stages:
        r = st.result
        extra = []
        if r.get("missing"):
            extra.append(f"missing outputs: {', '.join(r['missing'])}")
        if "pytest" in r:
            extra.append(f"pytest: {r['pytest']['result']}")
            extra += [f"    {f}" for f in r["pytest"]["failures"]]
        if extra:
            lines += ["", f"## {st.name}", ""] + extra
    md = "\n".join(lines) + "\n"
    data = {"call": call, "dry_run": dry, "budget": budget, "elapsed": time.monotonic() - t_start,
            "cache": cache_note, "stages": [{"name": st.name, "limit": st.limit, "expect": st.expect,
                                             "cmd": shlex.join(st.cmd), **st.result} for st in stages]}
    with open(os.path.join(work, "summary.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(work, "summary.md"), "w") as f:
        f.write(md)
    shutil.copyfile(os.path.join(work, "summary.md"), os.path.join(out, f"call{call}_summary.md"))
    return md


def publish(call: int, work: str, out: str) -> None:
    """The call's tarball and the small files worth reading first, into $OUT."""
    _tar(work, f"call{call}", os.path.join(out, f"call{call}.tar.gz"))
    if call == 1:
        names = ["probe.md"]
    else:
        tables = os.path.join(work, "tables")
        names = [os.path.join("tables", f) for f in sorted(os.listdir(tables)) if f.endswith(".md")] \
            if os.path.isdir(tables) else []
    for name in names:
        src = os.path.join(work, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(out, os.path.basename(name)))


def run_call(call: int, out: str, cache: str, dry: bool, budget: float) -> int:
    t_start = time.monotonic()
    out = os.path.abspath(out)
    cache = os.path.abspath(cache)
    work = os.path.join(cache, "gpu_check", f"call{call}")
    shutil.rmtree(work, ignore_errors=True)
    for d in (out, work, os.path.join(cache, "triton"), os.path.join(cache, "inductor")):
        os.makedirs(d, exist_ok=True)
    stages = plan(call, dry, work, cache)
    env = stage_env(dry, cache)
    deadline = t_start + budget
    cache_note = "not packed yet"
    factor = DRY_LIMIT_FACTOR if dry else 1.0
    print(f"device check, call {call}{' (dry run)' if dry else ''}: {len(stages)} stages, budget {budget:.0f} s",
          flush=True)
    for i, st in enumerate(stages):
        later = sum(s.reserve for s in stages[i + 1:]) * factor
        timeout = min(st.limit * factor, deadline - time.monotonic() - later - FINAL_RESERVE)
        if timeout < MIN_STAGE:
            st.result = {"status": "skipped (no time left)", "seconds": 0, "timeout": round(timeout)}
            print(f"== {st.name}: skipped, {timeout:.0f} s left for it", flush=True)
            continue
        log = os.path.join(work, f"{st.name}.log")
        print(f"== {st.name} (up to {timeout:.0f} s, expected {st.expect:.0f} s on an H200)", flush=True)
        status, rc, seconds = run_stage(st.cmd, timeout, log, env)
        missing = [o for o in st.outputs if not os.path.exists(os.path.join(work, o))]
        if status == "ok" and missing:
            status = "failed (outputs missing)"
        st.result = {"status": status, "rc": rc, "seconds": round(seconds, 1), "timeout": round(timeout),
                     "missing": missing}
        if st.name == "tests":
            st.result["pytest"] = _pytest_notes(log)
        for line in _tail(log, 12 if st.name != "tests" else 4):
            print(f"   {line[:200]}")
        print(f"   -> {status} in {seconds:.0f} s", flush=True)
        if st.pack_cache:
            cache_note = pack_cache(cache, out)
        write_summary(call, dry, stages, work, out, t_start, budget, cache_note)
        publish(call, work, out)
    cache_note = pack_cache(cache, out)
    md = write_summary(call, dry, stages, work, out, t_start, budget, cache_note)
    publish(call, work, out)
    print("\n" + md)
    if call == 1 and os.path.exists(os.path.join(work, "probe.md")):
        with open(os.path.join(work, "probe.md")) as f:
            print(f.read())
    return 0 if all(st.result.get("status") == "ok" for st in stages) else 1


# ----------------------------------------------------------------------------- the env and build stages
def report_machine() -> int:
    """What the machine is: GPU, driver, versions, installed peers."""
    print(f"python {sys.version.split()[0]} at {sys.executable}; {os.cpu_count()} CPUs")
    for cmd in (["nvidia-smi", "--query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,driver_version",
                 "--format=csv"], ["nvcc", "--version"]):
        if shutil.which(cmd[0]):
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
                text = res.stdout.strip()
                print(" ".join(text.splitlines()[-2:]) if cmd[0] == "nvcc" else text)
            except (OSError, subprocess.SubprocessError) as exc:
                print(f"{cmd[0]}: {exc}")
        else:
            print(f"{cmd[0]}: not found")
    try:
        import torch

        print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            print(f"device {p.name}, {p.total_memory / 2 ** 30:.0f} GiB, {p.multi_processor_count} SMs, "
                  f"capability {p.major}.{p.minor}")
    except Exception as exc:  # the other lines still help
        print(f"torch: {type(exc).__name__}: {exc}")
    for mod in ("triton", "transformers", "verl", "liger_kernel", "trl", "xdist", "pytest_timeout", "hypothesis"):
        print(f"{mod}: {'installed' if _has(mod) else 'not installed'}")
    return 0


def sources_digest() -> str:
    """sha256 of setup.py and every source of the compiled modules."""
    h = hashlib.sha256()
    csrc = os.path.join(REPO, "csrc")
    for name in ["setup.py"] + sorted(os.path.join("csrc", f) for f in os.listdir(csrc)):
        path = os.path.join(REPO, name)
        if os.path.isfile(path):
            h.update(name.encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


CHECK_MODULES = """
import torch
from steppo_fast import _native
cpu = _native.cpu_module()
print("_C:", "loaded, %d threads" % cpu.max_threads() if cpu else "missing: %s" % _native.module_error("_C"))
if torch.cuda.is_available():
    mod = _native.cuda_module()
    assert mod is not None, _native.module_error("_C_cuda")
    assert cpu is not None, "_C is missing"
    print("_C_cuda: loaded, sees %d GPU(s);" % mod.device_count(), torch.cuda.get_device_name())
"""


def build_or_restore(cache: str, dry: bool) -> int:
    """Restores the compiled modules from the cache when the sources are unchanged, else builds
    them (nvcc for sm_90 only, the two modules at once) and stores them there; then imports them.
    The dry run builds nothing: it checks the modules in place and records a manifest."""
    build = os.path.join(cache, "build")
    os.makedirs(build, exist_ok=True)
    manifest_path = os.path.join(build, "manifest.json")
    digest, suffix = sources_digest(), sysconfig.get_config_var("EXT_SUFFIX")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        manifest = {}
    pkg = os.path.join(REPO, "steppo_fast")
    cached = [os.path.join(build, f) for f in manifest.get("files", [])]
    if manifest.get("digest") == digest and manifest.get("ext_suffix") == suffix and \
            manifest.get("dry_run", False) == dry and all(os.path.exists(p) for p in cached):
        if not dry:
            for p in cached:
                shutil.copy2(p, os.path.join(pkg, os.path.basename(p)))
        print(f"restored {len(cached)} module(s) from the cache (sources unchanged)")
    else:
        cmd = [sys.executable, "setup.py", "build_ext", "--inplace", "-j", "2"]
        env = dict(os.environ, STEPPO_FAST_CUDA="1", STEPPO_FAST_CUDA_ARCHS="90")
        if dry:
            print(f"dry run: would build with STEPPO_FAST_CUDA=1 STEPPO_FAST_CUDA_ARCHS=90 {shlex.join(cmd)}")
            files = []
        else:
            t0 = time.monotonic()
            sys.stdout.flush()
            rc = subprocess.call(cmd, cwd=REPO, env=env)
            print(f"build: exit {rc} after {time.monotonic() - t0:.0f} s")
            if rc != 0:
                return rc
            files = [f for f in os.listdir(pkg) if f.startswith(("_C.", "_C_cuda.")) and f.endswith(suffix)]
            for f in files:
                shutil.copy2(os.path.join(pkg, f), os.path.join(build, f))
        with open(manifest_path, "w") as f:
            json.dump({"digest": digest, "ext_suffix": suffix, "files": files, "dry_run": dry}, f, indent=1)
    sys.stdout.flush()
    return subprocess.call([sys.executable, "-c", CHECK_MODULES], cwd=REPO)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_env":
        return report_machine()
    if argv and argv[0] == "_build":
        p = argparse.ArgumentParser(prog="gpu_check.py _build")
        p.add_argument("--cache", required=True)
        p.add_argument("--dry-run", action="store_true")
        a = p.parse_args(argv[1:])
        return build_or_restore(a.cache, a.dry_run)
    p = argparse.ArgumentParser(description="The two-call device check of steppo_fast (see the module docstring).")
    p.add_argument("--call", type=int, choices=[1, 2], required=True)
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder whose files come back ($OUT)")
    p.add_argument("--cache", default=os.path.join(REPO, ".cache"),
                   help="build, Triton and Inductor caches and the work folders (default: .cache of the checkout)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole call (default: 300 / 360)")
    p.add_argument("--dry-run", action="store_true", help="on the CPU, tiny sizes, TRITON_INTERPRET=1")
    a = p.parse_args(argv)
    if not a.out:
        p.error("--out (or $OUT) is required")
    budget = a.budget if a.budget is not None else BUDGET[a.call] * (DRY_LIMIT_FACTOR if a.dry_run else 1.0)
    return run_call(a.call, a.out, a.cache, a.dry_run, budget)


if __name__ == "__main__":
    sys.exit(main())
