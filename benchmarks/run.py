"""Entry point of ``steppo-fast bench``: runs the benchmark modules and writes results.

Grids: ``full`` (the sizes of the committed tables), ``quick`` (small sizes, short timing runs)
and ``tiny`` (smoke-test sizes that run in seconds on a CPU; peers that need a compilation, such
as torch.compile, are left out). The results folder is checked before anything runs, every table
is rewritten after each case, and each table is printed before it is written.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence, Union

from . import bench_advantages, bench_linear_head, bench_logprob, bench_losses
from .harness import environment, markdown_table, prepare_out_dir, run_cases, write_results

BENCHES = {
    "advantages": bench_advantages,
    "linear_head": bench_linear_head,
    "logprob": bench_logprob,
    "losses": bench_losses,
}
GRIDS = ("tiny", "quick", "full")
MIN_RUN_TIME = {"tiny": 0.01, "quick": 0.2, "full": 1.0}  # seconds of timed calls per variant (CPU)

NOTE = ("{grid} grid. median_ms: median time of one call; GB/s: the op's minimum traffic over that time; "
        "peak_MiB: peak memory allocated during one call; extra_MiB: peak beyond the outputs a variant must "
        "return (a gradient); max_abs_err: against the fp64 reference; kind 'ceiling': a bandwidth "
        "yardstick (a device copy), not an implementation; skipped: a peer whose package is not installed.")


def default_out_dir() -> str:
    """benchmarks/results of the source checkout when run from one, else ./benchmarks/results."""
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.basename(here) == "benchmarks" and os.path.exists(os.path.join(here, "..", "setup.py")):
        return os.path.join(here, "results")
    return os.path.join(os.getcwd(), "benchmarks", "results")


def grid_name(grid: Union[str, bool]) -> str:
    """A grid name from a name or the older ``quick`` flag (True: quick, False: full)."""
    if isinstance(grid, bool):
        return "quick" if grid else "full"
    if grid not in GRIDS:
        raise SystemExit(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")
    return grid


def main(op: Optional[str], device: str, grid: Union[str, bool] = "quick", out_dir: Optional[str] = None,
         progress: bool = True, without: Sequence[str] = ()) -> List[str]:
    """Runs the benchmark ``op`` (None: all) on ``device`` with the sizes of ``grid``; writes
    ``<op>_<grid>_<device>.md`` and ``.json`` under ``out_dir`` (None: :func:`default_out_dir`;
    an empty string is an error). ``without``: peer packages to leave out as if not installed.
    Returns the markdown paths."""
    import torch

    grid = grid_name(grid)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    names = list(BENCHES) if op is None else [op]
    for n in names:
        if n not in BENCHES:
            raise SystemExit(f"unknown --op {n!r}; choose one of {', '.join(BENCHES)}")
    try:
        out_dir = prepare_out_dir(default_out_dir() if out_dir is None else out_dir)
    except ValueError as e:
        raise SystemExit(f"--out: {e}") from None
    print(f"tables go to {out_dir} (rewritten after each case)")
    env = environment(device)
    note = NOTE.format(grid=grid)
    written = []
    for n in names:
        name = f"{n}_{grid}"

        def save(rows, name=name):
            write_results(name, device, rows, out_dir, note, env)

        rows = run_cases(BENCHES[n].cases(device, grid), device, MIN_RUN_TIME[grid], progress, on_case=save,
                         without=without)
        print(f"\n## {n} ({device}, {grid})\n")
        print(markdown_table(rows))
        sys.stdout.flush()
        save(rows)
        written.append(os.path.join(out_dir, f"{name}_{device}.md"))
    print(f"\nresults written under {out_dir}")
    return written
