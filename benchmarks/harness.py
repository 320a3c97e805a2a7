"""The shared benchmark harness: time every backend and peer of an op on a size grid.

For each (size, variant) it reports the median time, achieved GB/s (or TFLOP/s),
the peak memory allocated during one call, and the max error against the fp64
reference. GPU timings use ``triton.testing.do_bench`` (median); CPU timings use
``torch.utils.benchmark`` (median of ``blocked_autorange``). Results go to JSON and
markdown under ``benchmarks/results/`` with the device, versions, commit and date.

Cases are built one at a time (a bench module's ``cases`` is a generator), so only one case's
tensors are alive at once, and ``run_cases`` hands the rows to a callback after every case:
the tables are rewritten after each case, so a run stopped part-way keeps what finished. A
peer whose package is not installed is reported as skipped without being called.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

Outputs = Any  # a tensor or a tuple of tensors


@dataclass
class Variant:
    """One implementation to time: ``fn(state) -> outputs``."""

    name: str
    fn: Callable[[Dict[str, Any]], Outputs]
    kind: str = "steppo_fast"  # or "peer", or "ceiling" (a bandwidth yardstick such as a device copy)
    bytes_moved: Optional[float] = None  # overrides the case's count (a copy moves read + write bytes)
    required_bytes: Optional[float] = None  # outputs it must allocate (a gradient): extra_MiB = peak - this
    requires: Tuple[str, ...] = ()  # packages it imports (a peer's): skipped when one is not installed


def missing_packages(names: Iterable[str], without: Iterable[str] = ()) -> List[str]:
    """The names among ``names`` that cannot be imported (checked without importing them) or
    that ``without`` leaves out."""
    out = []
    for n in names:
        if n in without:
            out.append(n)
            continue
        try:
            found = importlib.util.find_spec(n) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(n)
    return out


@dataclass
class Case:
    """One op at one size: inputs, the fp64 oracle and the minimum traffic / work."""

    op: str
    size: Dict[str, Any]
    state: Dict[str, Any]
    reference64: Callable[[Dict[str, Any]], Outputs]
    bytes_moved: float = 0.0  # fewest bytes a pass must move (each input read once, outputs written once)
    flops: float = 0.0
    variants: List[Variant] = field(default_factory=list)


def _flat(out: Outputs) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [v for v in out.values() if isinstance(v, torch.Tensor)]
    res = []
    for o in out:
        res.extend(_flat(o))
    return res


def max_error(out: Outputs, ref: Outputs, chunk: int = 1 << 24) -> float:
    """Max abs difference over all output tensors, compared in float64 chunk by chunk (so a
    gradient of billions of entries needs no float64 copy of itself)."""
    err = 0.0
    for a, b in zip(_flat(out), _flat(ref)):
        a, b = a.detach().reshape(-1), b.detach().reshape(-1)
        for i in range(0, a.numel(), chunk):
            d = (a[i:i + chunk].double() - b[i:i + chunk].to(a.device).double()).abs().max().item()
            err = max(err, d) if d == d else float("nan")
            if err != err:
                return err
    return err


def time_median_ms(fn: Callable[[], Any], device: str, min_run_time: float = 0.5) -> float:
    """Median ms of one call: do_bench on CUDA (warm-up and repeats in ms: 25/100, shorter for
    min_run_time < 0.1), torch.utils.benchmark's blocked_autorange on the CPU."""
    if device == "cuda":
        import triton.testing

        warmup, rep = (25, 100) if min_run_time >= 0.1 else (5, 10)
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    import torch.utils.benchmark as tb

    fn()  # warm-up (compilation, caches)
    m = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return m.median * 1e3


@contextlib.contextmanager
def _quiet_stderr():
    """Silences the profiler's C++ start/stop log lines (written to fd 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory_bytes(fn: Callable[[], Any], device: str) -> int:
    """Peak bytes allocated during one call of fn, beyond what was live before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings(), _quiet_stderr():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    # Allocations made inside an op are charged to it: place each event's own
    # allocations at its start and its own frees at its end (an upper bound).
    points = []
    for e in prof.events():
        own = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if own > 0:
            points.append((e.time_range.start, own))
        elif own < 0:
            points.append((e.time_range.end, own))
    points.sort(key=lambda p: (p[0], -p[1]))
    cur = peak = 0
    for _, d in points:
        cur += d
        peak = max(peak, cur)
    return int(peak)


def environment(device: str) -> Dict[str, str]:
    env = {
        "device": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()),
        "cpu_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       timeout=10, cwd=os.path.dirname(__file__)).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["commit"] = ""
    # A copy of the sources without git history (a device machine) can name its commit.
    env["commit"] = env["commit"] or os.environ.get("STEPPO_FAST_COMMIT", "") or "unknown"
    if device == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        env["device"] = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return env


def run_cases(cases: Iterable[Case], device: str, min_run_time: float = 1.0, progress: bool = True,
              on_case: Optional[Callable[[List[Dict[str, Any]]], None]] = None,
              without: Iterable[str] = ()) -> List[Dict[str, Any]]:
    """Times every variant of every case; returns one row per (case, variant).

    ``cases`` may be a generator: each case is built when its turn comes and dropped after it.
    min_run_time: seconds of timed calls per variant on the CPU (under 0.1: short runs on CUDA too).
    ``on_case(rows)`` is called with all rows so far after every case (to rewrite the tables).
    ``without``: packages whose peers are skipped as if they were not installed.
    """
    without = tuple(without)
    from tqdm.auto import tqdm

    rows: List[Dict[str, Any]] = []
    bar = tqdm(desc="bench", unit="variant", disable=not progress, leave=False)
    for case in cases:
        try:
            ref_out, ref_error = case.reference64(case.state), None
        except Exception as exc:  # the timings still count; the error column says why it is empty
            ref_out, ref_error = None, _short(exc)
        eager_ms = None
        for v in case.variants:
            bar.set_postfix_str(f"{case.op} {v.name}")
            row = {"op": case.op, **{f"size.{k}": val for k, val in case.size.items()}, "variant": v.name,
                   "kind": v.kind}
            missing = missing_packages(v.requires, without)
            if missing:
                row["skipped"] = f"{', '.join(missing)} " + ("left out" if set(missing) <= set(without)
                                                             else "not installed")
                rows.append(row)
                bar.update(1)
                continue
            try:
                out = v.fn(case.state)
                if v.kind != "ceiling":
                    if ref_out is not None:
                        row["max_abs_err"] = max_error(out, ref_out)
                    else:
                        row["ref_error"] = ref_error
                del out
                ms = time_median_ms(lambda: v.fn(case.state), device, min_run_time)
                row["median_ms"] = ms
                moved = v.bytes_moved if v.bytes_moved is not None else case.bytes_moved
                if moved:
                    row["GB/s"] = moved / (ms * 1e-3) / 1e9
                if case.flops:
                    row["TFLOP/s"] = case.flops / (ms * 1e-3) / 1e12
                peak = peak_memory_bytes(lambda: v.fn(case.state), device)
                row["peak_MiB"] = peak / 2 ** 20
                if v.required_bytes is not None:
                    row["extra_MiB"] = (peak - v.required_bytes) / 2 ** 20
                if v.name == "eager":
                    eager_ms = ms
                row["speedup_vs_eager"] = (eager_ms / ms) if eager_ms else None
            except Exception as exc:  # a peer that cannot run this case is reported, not hidden
                row["error"] = _short(exc)
            rows.append(row)
            bar.update(1)
        ref_out = case = None  # free this case's tensors before the next one is built
        if device == "cuda":
            torch.cuda.empty_cache()
        if on_case is not None:
            on_case(rows)
    bar.close()
    return rows


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:120] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.1f}"
        if abs(v) >= 0.01:
            return f"{v:.3f}"
        return f"{v:.2e}"
    return str(v)


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    cols = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def prepare_out_dir(path: Optional[str]) -> str:
    """Checks that results can be written under ``path`` before any benchmark runs: creates the
    folder and writes (then removes) a probe file. Raises ValueError naming the problem."""
    if path is None or not str(path).strip():
        raise ValueError("the results folder is empty: give --out a folder name")
    path = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"the results folder {path} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise ValueError(f"cannot write results under {path}: {exc.strerror or exc}") from None
    return path


def _write_atomic(path: str, text: str) -> None:
    """Writes through a temporary file and a rename, so a reader never sees half a table."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_results(name: str, device: str, rows: List[Dict[str, Any]], out_dir: str, note: str = "",
                  env: Optional[Dict[str, str]] = None) -> str:
    """Writes ``<name>_<device>.json`` and ``.md`` under out_dir; returns the markdown.
    ``env``: the environment block (computed once per run; default: now)."""
    os.makedirs(out_dir, exist_ok=True)
    env = env if env is not None else environment(device)
    _write_atomic(os.path.join(out_dir, f"{name}_{device}.json"),
                  json.dumps({"environment": env, "rows": rows}, indent=1, default=str))
    header = " · ".join(f"{k}: {v}" for k, v in env.items())
    md = f"# {name} on {device}\n\n{header}\n\n{note}\n\n{markdown_table(rows)}\n"
    _write_atomic(os.path.join(out_dir, f"{name}_{device}.md"), md)
    return md
