"""Compiles the package's Triton kernels for NVIDIA GPUs without one, through the real launchers.

:func:`install` makes Triton's active driver a stand-in that reports an sm_<arch> target and
loads and launches nothing. A launcher's ``kernel[grid](...)`` on CPU tensors then compiles
exactly the specialisation a GPU would get from the same call (argument dtypes, alignments,
constexprs, warps), down to a cubin, and records it instead of running it. Run it in a
process without ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` makes nothing to
compile). Outputs of such a "launch" are never written: only the compile is real.

Uses:

* ``python tests/triton_aot.py``: every specialisation the launchers produce on the inputs of
  :func:`exercise`, for sm_80 and sm_90; one line per compiled kernel with its registers and
  spills; exits non-zero on a failure, a spill, or a bf16 log-prob loop over its instruction
  budget. ``tests/test_triton_compile.py`` runs it.
* ``python tests/triton_aot.py --sass FILE``: the instruction counts of the log-prob kernels'
  inner loops (cuobjdump's SASS), with registers and spills, written to FILE as a markdown
  section for the running Triton version.
* :func:`specialisation_key`: the key Triton compiles for a launch; ``tests/compile_count.py``
  counts the distinct keys of runs made under the interpreter.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import triton
from triton.backends.compiler import GPUTarget

ARCHS = (80, 90)
# Instructions per entry the bf16 log-prob loops may issue on sm_90 (see kernels/logprob.py).
LOOP_BUDGET = 12.0


# ------------------------------------------------------------------ the stand-in driver
@dataclass
class Compiled:
    """One specialisation compiled through a launcher."""
    name: str
    arch: int
    constants: Dict[str, object]
    signature: Dict[str, str]
    num_warps: int
    shared: int
    seconds: float = 0.0
    divisible: frozenset = frozenset()  # arguments specialised as multiples of 16
    cubin: Optional[bytes] = None
    launches: int = 0

    def describe(self) -> str:
        consts = ", ".join(f"{k}={_short(v)}" for k, v in sorted(self.constants.items()))
        ptrs = ",".join(v for v in self.signature.values() if v.startswith("*"))
        return f"{self.name} sm_{self.arch} warps={self.num_warps} [{consts}] ({ptrs})"


def _short(v) -> str:
    return str(v).replace("triton.language.", "")


class _Utils:
    def __init__(self, fake):
        self.fake = fake

    def load_binary(self, name, binary, shared, device):
        for rec in reversed(self.fake.compiled):
            if rec.name == name and rec.cubin is None:
                rec.cubin = bytes(binary)
                break
        return "stand-in module", None, 0, 0, 1024  # module, function, registers, spills, max threads

    def unload_module(self, module):
        pass

    def get_device_properties(self, device):
        arch = self.fake.arch
        return {"max_shared_mem": 232448 if arch >= 90 else 166912, "multiprocessor_count": 132,
                "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 3201000,
                "mem_bus_width": 6144}


class _Launcher:
    def __init__(self, fake, src, metadata):
        fn = src.fn
        names = list(getattr(fn, "arg_names", []))
        consts = {}
        for key, value in getattr(src, "constants", {}).items():
            idx = key[0] if isinstance(key, tuple) else key
            consts[names[idx] if isinstance(idx, int) and idx < len(names) else str(key)] = value
        sig = {k: str(v) for k, v in getattr(src, "signature", {}).items()}
        div = frozenset(names[k[0]] for k, v in getattr(src, "attrs", {}).items()
                        if isinstance(k, tuple) and "tt.divisibility" in str(v) and k[0] < len(names))
        self.record = Compiled(metadata.name, fake.arch, consts, sig, metadata.num_warps, metadata.shared,
                               time.time() - fake.t_last, div)
        fake.compiled.append(self.record)

    def __call__(self, *args):
        self.record.launches += 1


class StandInDriver:
    """Triton driver stand-in for one target; compiled specialisations go to ``compiled``."""

    def __init__(self, arch: int):
        self.arch = arch
        self.compiled: List[Compiled] = []
        self.utils = _Utils(self)
        self.launcher_cls = functools.partial(_Launcher, self)
        self.t_last = time.time()

    @staticmethod
    def is_active():
        return True

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.arch  # one device id per target keeps Triton's in-memory kernel caches apart

    def get_current_stream(self, device=None):
        self.t_last = time.time()  # run() asks for the stream just before it compiles
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_device_interface(self):
        import torch

        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("no GPU: nothing can be timed")


def install(arch: int) -> StandInDriver:
    """Makes a stand-in for sm_<arch> Triton's active driver (for the rest of the process)."""
    from triton.runtime.driver import driver

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter compiles nothing")
    fake = StandInDriver(arch)
    driver.set_active(fake)
    return fake


# ------------------------------------------------------------------ specialisation keys
_BINDERS = {}


def _binder(kernel, arch):
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    key = (kernel.fn, arch)
    if key not in _BINDERS:
        # An interpreted kernel keeps its decorator's options (do_not_specialize...) in ``kwargs``.
        jf = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **getattr(kernel, "kwargs", {}))
        _BINDERS[key] = create_function_from_signature(jf.signature, jf.params, make_backend(GPUTarget("cuda", arch, 32)))
    return _BINDERS[key]


def specialisation_key(kernel, args, kwargs, arch: int = 90):
    """(kernel name, key) of the specialisation Triton compiles for ``kernel[grid](*args, **kwargs)``
    on sm_<arch>; ``kernel`` may be a JIT or an interpreted function."""
    _, spec, options = _binder(kernel, arch)(*args, **kwargs)
    return kernel.fn.__name__, repr((spec, sorted(options.items())))


# ------------------------------------------------------------------ the launchers' inputs
def exercise() -> None:
    """Calls every launcher with inputs that produce each specialisation they can: every logits
    dtype, with and without entropy, both chunk sizes, int32 and int64 labels, aligned and
    unaligned rows, one row; the policy loss in float32 and float64 (its options are run-time
    arguments); step rewards for every reward dtype."""
    import torch

    from steppo_fast.kernels import logprob, policy_loss, step_rewards

    def logits_case(dtype, vocab, with_entropy, label_dtype=torch.int64, rows=6, strided=False):
        z = torch.randn(2, rows // 2 + 1, vocab).to(dtype)[:, :-1]
        z = z if strided else torch.randn(rows, vocab).to(dtype)
        y = torch.randint(0, vocab, (rows,)).to(label_dtype)
        m = torch.ones(rows, dtype=torch.bool)
        lp, ent, lse = logprob.token_logprobs_fwd(z, y, m, 0.7, with_entropy)
        g = torch.randn(rows)
        logprob.token_logprobs_bwd(z, y, m, lp, ent, lse, g, g, 0.7, with_entropy, torch.empty_like(z))

    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for vocab in (1000, 5120):
            for ent in (True, False):
                logits_case(dtype, vocab, ent)
    logits_case(torch.bfloat16, 5120, True, label_dtype=torch.int32)
    logits_case(torch.bfloat16, 50257, True, strided=True)  # odd V: rows not 16-byte aligned
    logits_case(torch.float32, 5120, True, strided=True)

    n, steps = 300, 7
    for dt in (torch.float32, torch.float64):
        x = torch.randn(n, dtype=dt)
        ts = torch.randint(-1, steps, (n,), dtype=torch.int32)
        for level in ("step", "token"):
            policy_loss.policy_loss(x, x, x, ts, None, None, None, steps, level, 0.2, 0.2, None,
                                    "seq-mean-token-mean", 0.0, 0.0, "k3", None, None, None)
        policy_loss.policy_loss(x, x, x, ts.long(), x, x, x, steps, "step", 0.2, 0.28, 3.0, "token-mean", 0.01,
                                0.1, "k1", 100.0, 5.0, None)

    offsets = torch.tensor([0, 3, 3, 8], dtype=torch.int64)
    tokens = torch.arange(8, dtype=torch.int64)
    for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        step_rewards.step_rewards(torch.randn(8).to(dt), tokens, offsets)


# ------------------------------------------------------------------ cubin inspection
def _tool(name: str) -> Optional[str]:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else shutil.which(name)


def _run_on_cubin(tool: str, flag: str, cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        return subprocess.run([tool, flag, path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)


def resources(rec: Compiled) -> Optional[Dict[str, int]]:
    """{'REG', 'STACK', 'SHARED', 'LOCAL'} of the cubin (cuobjdump -res-usage), or None without cuobjdump."""
    tool = _tool("cuobjdump")
    if tool is None or rec.cubin is None:
        return None
    out = _run_on_cubin(tool, "-res-usage", rec.cubin)
    found = dict((k, int(v)) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return found or None


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LOAD_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def sass(rec: Compiled) -> List[tuple]:
    """[(address, instruction text)] of the cubin's machine code."""
    tool = _tool("cuobjdump")
    if tool is None or rec.cubin is None:
        return []
    return [(int(a, 16), text) for a, text in _SASS_LINE.findall(_run_on_cubin(tool, "-sass", rec.cubin))]


def inner_loop(code: List[tuple]) -> Optional[dict]:
    """The innermost loop (backward branch) that reads global memory: its instruction count,
    bytes loaded per thread per iteration, and any branch inside it."""
    branches = []
    for addr, text in code:
        m = re.search(r"\bBRA\s+(?:`?\(?)0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            branches.append((int(m.group(1), 16), addr))
    loops = [(a, b) for a, b in branches if not any(a <= c < d <= b and (c, d) != (a, b) for c, d in branches)]
    best = None
    for start, end in loops:
        body = [t for a, t in code if start <= a <= end]
        loaded = 0
        for t in body:
            m = re.search(r"\bLDG\.E(?:\.(\w+))?", t)
            if m:
                loaded += _LOAD_BYTES.get(m.group(1) or "", 4)
        if loaded and (best is None or len(body) > best["instructions"]):
            inner_branches = sum(1 for t in body[:-1] if re.search(r"\bBRA\b", t))
            best = dict(instructions=len(body), bytes=loaded, branches=inner_branches)
    return best


def loop_cost(rec: Compiled, elem_bytes: int) -> Optional[dict]:
    loop = inner_loop(sass(rec))
    if loop is None:
        return None
    per_thread = loop["bytes"] // elem_bytes
    return dict(loop, entries=per_thread, per_entry=loop["instructions"] / per_thread)


# ------------------------------------------------------------------ main
def _elem_bytes(rec: Compiled) -> int:
    first = rec.signature.get("logits_ptr", "*fp32")
    return {"*bf16": 2, "*fp16": 2, "*fp32": 4, "*fp64": 8}.get(first, 4)


def compile_all(archs=ARCHS) -> List[Compiled]:
    records = []
    for arch in archs:
        fake = install(arch)
        exercise()
        records += fake.compiled
    return records


def check(records: List[Compiled]) -> int:
    """Prints one line per specialisation; returns the number of failures."""
    failures = 0
    for rec in records:
        res = resources(rec)
        line = rec.describe()
        if rec.cubin is None:
            failures += 1
            print(f"FAIL no cubin: {line}")
            continue
        if res is not None:
            line += f" regs={res.get('REG')} spill={res.get('LOCAL', 0) + res.get('STACK', 0)}"
            if res.get("LOCAL", 0) or res.get("STACK", 0):
                failures += 1
                print(f"FAIL spills: {line}")
                continue
        budget = ""
        if rec.arch == 90 and rec.name.startswith("_token_logprobs") and rec.signature.get("logits_ptr") == "*bf16" \
                and rec.constants.get("BLOCK_V") == 4096 and "stride_t" in rec.divisible:
            cost = loop_cost(rec, 2)
            if cost is not None:
                budget = f" loop={cost['per_entry']:.2f}/entry"
                if cost["per_entry"] > LOOP_BUDGET or cost["branches"]:
                    failures += 1
                    print(f"FAIL loop over budget ({LOOP_BUDGET}/entry, no branch): {line}{budget} {cost}")
                    continue
        print(f"ok {line}{budget}")
    return failures


def sass_table(records: List[Compiled]) -> str:
    """Markdown rows: kernel, dtype, entropy, arch, loop instructions, entries, per entry, regs, spills."""
    rows = []
    for rec in records:
        if not rec.name.startswith("_token_logprobs") or rec.constants.get("BLOCK_V") != 4096:
            continue
        if rec.signature.get("labels_ptr") != "*i64" or "stride_t" not in rec.divisible:
            continue
        eb = _elem_bytes(rec)
        cost = loop_cost(rec, eb)
        res = resources(rec) or {}
        kind = "forward" if "fwd" in rec.name else "backward"
        dt = rec.signature.get("logits_ptr", "?").lstrip("*")
        if cost is None:
            continue
        rows.append((kind, dt, rec.constants.get("WITH_ENTROPY"), rec.arch, cost["instructions"], cost["entries"],
                     cost["per_entry"], res.get("REG"), res.get("LOCAL", 0) + res.get("STACK", 0)))
    seen, out = set(), []
    for row in sorted(rows, key=lambda r: (r[0] != "forward", r[1], not r[2], r[3])):
        if row[:4] in seen:
            continue
        seen.add(row[:4])
        out.append("| {} | {} | {} | sm_{} | {} | {} | {:.2f} | {} | {} |".format(*row))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sass", metavar="FILE", help="write the inner-loop instruction table (markdown) to FILE")
    ap.add_argument("--arch", type=int, action="append", help="targets (default: 80 and 90)")
    args = ap.parse_args(argv)
    records = compile_all(tuple(args.arch or ARCHS))
    if args.sass:
        head = (f"Triton {triton.__version__}: instructions in the inner (per-chunk) loop, per thread and "
                "iteration, over the logits entries one iteration reads per thread.\n\n"
                "| kernel | logits | entropy | arch | loop instructions | entries | per entry | registers | "
                "spilled bytes |\n|---|---|---|---|---|---|---|---|---|\n")
        with open(args.sass, "w") as f:
            f.write(head + sass_table(records) + "\n")
        print(open(args.sass).read())
        return 0
    failures = check(records)
    print(f"{len(records)} specialisations compiled, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
