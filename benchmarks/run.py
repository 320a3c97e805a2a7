"""Entry point of ``steppo-fast bench``: runs the benchmark modules and writes results."""

from __future__ import annotations

import os
import sys
from typing import List, Optional

from . import bench_advantages, bench_linear_head, bench_logprob, bench_losses
from .harness import markdown_table, run_cases, write_results

BENCHES = {
    "advantages": bench_advantages,
    "linear_head": bench_linear_head,
    "logprob": bench_logprob,
    "losses": bench_losses,
}


def default_out_dir() -> str:
    """benchmarks/results of the source checkout when run from one, else ./benchmarks/results."""
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.basename(here) == "benchmarks" and os.path.exists(os.path.join(here, "..", "setup.py")):
        return os.path.join(here, "results")
    return os.path.join(os.getcwd(), "benchmarks", "results")


def main(op: Optional[str], device: str, quick: bool, out_dir: Optional[str] = None,
         progress: bool = True) -> List[str]:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    names = list(BENCHES) if op is None else [op]
    for n in names:
        if n not in BENCHES:
            raise SystemExit(f"unknown --op {n!r}; choose one of {', '.join(BENCHES)}")
    out_dir = out_dir or default_out_dir()
    tag = "quick" if quick else "full"
    written = []
    for n in names:
        rows = run_cases(BENCHES[n].cases(device, quick), device, quick, progress)
        note = (f"{tag} grid. median_ms: median time of one call; GB/s: the op's minimum traffic over that time; "
                "peak_MiB: peak memory allocated during one call; extra_MiB: peak beyond the outputs a variant must "
                "return (a gradient); max_abs_err: against the fp64 reference; kind 'ceiling': a bandwidth "
                "yardstick (a device copy), not an implementation.")
        write_results(f"{n}_{tag}", device, rows, out_dir, note)
        print(f"\n## {n} ({device}, {tag})\n")
        print(markdown_table(rows))
        sys.stdout.flush()
        written.append(os.path.join(out_dir, f"{n}_{tag}_{device}.md"))
    print(f"\nresults written under {out_dir}")
    return written
