"""Counts the Triton compiles a run would trigger on a GPU, from a run under the interpreter.

Under ``TRITON_INTERPRET=1`` the kernels run on the CPU. An observer of
``steppo_fast.kernels.launch`` computes, for every launch, the specialisation key Triton compiles
on a GPU (``triton_aot.specialisation_key``: argument dtypes, alignments, integer
specialisations, constexprs, options) and counts the distinct keys per kernel. One process
compiles each key once (later launches hit the in-memory cache), so the count is what the same
run would compile on a GPU with an empty Triton cache.

* The test suite, as a pytest plugin (counts printed at the end; ``STEPPO_FAST_COMPILE_COUNT=FILE``
  also writes them as JSON)::

      TRITON_INTERPRET=1 PYTHONPATH=$PWD:$PWD/tests python -m pytest -p compile_count tests/...

* A training run (the trainer's defaults, bf16 as on a GPU, on the Triton kernels)::

      TRITON_INTERPRET=1 PYTHONPATH=$PWD:$PWD/tests python tests/compile_count.py train --updates 2
"""

from __future__ import annotations

import collections
import json
import os
import sys
from typing import Dict, Set, Tuple

_KEYS: Dict[str, Set[str]] = collections.defaultdict(set)


def _observe(kernel, grid, args, kwargs) -> None:
    from triton_aot import specialisation_key

    name, key = specialisation_key(kernel, args, kwargs)
    _KEYS[name].add(key)


def install() -> None:
    from steppo_fast.kernels import launch

    if _observe not in launch.observers:
        launch.observers.append(_observe)


def counts() -> Tuple[Dict[str, int], int]:
    per_kernel = {name: len(keys) for name, keys in sorted(_KEYS.items())}
    return per_kernel, sum(per_kernel.values())


def report(title: str) -> str:
    per_kernel, total = counts()
    lines = [f"{title}: {total} Triton specialisations (compiles on a GPU)"]
    lines += [f"  {name}: {n}" for name, n in per_kernel.items()]
    path = os.environ.get("STEPPO_FAST_COMPILE_COUNT")
    if path:
        with open(path, "w") as f:
            json.dump({"title": title, "total": total, "per_kernel": per_kernel}, f, indent=1)
    return "\n".join(lines)


# ------------------------------------------------------------------ pytest plugin
def pytest_configure(config):
    install()


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(report("this test session"))


# ------------------------------------------------------------------ training run
def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="compiles of a short training run (trainer defaults)")
    ap.add_argument("command", choices=["train"])
    ap.add_argument("--updates", type=int, default=2)
    ap.add_argument("--precision", default="bf16", help="bf16 as the trainer uses on a GPU (default)")
    ap.add_argument("--set", nargs="*", default=[], help="key=value TrainConfig overrides")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the kernels run on the CPU, the keys are the GPU's)")
    import tempfile

    import yaml

    install()
    os.environ["STEPPO_FAST_BACKEND"] = "triton"  # "auto" inside the ops picks Triton, as on a GPU
    from steppo_fast.trainer import TrainConfig
    from steppo_fast.trainer.loop import run

    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig.from_dict(dict(dict(updates=args.updates, precision=args.precision, device="cpu",
                                              backend="triton", out_dir=out, progress=False, eval_episodes=8,
                                              save_every=args.updates), **overrides))
        run(cfg)
    print(report(f"training run ({args.updates} updates, {args.precision}, trainer defaults otherwise)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
