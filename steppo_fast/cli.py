"""The ``steppo-fast`` command line."""

from __future__ import annotations

import argparse
import sys
import warnings


def _cmd_bench(args) -> int:
    from .benchmarks import run

    if not args.verbose_fallbacks:
        warnings.filterwarnings("ignore", message=r"steppo_fast::.*using the PyTorch reference")
    run.main(args.op, args.device, args.quick, args.out, progress=not args.no_progress)
    return 0


def _cmd_info(args) -> int:
    import torch

    from . import _native, ops

    warnings.filterwarnings("ignore", message=r"steppo_fast\.")
    cpu = _native.cpu_module()
    cuda = _native.cuda_module()
    print(f"steppo_fast on torch {torch.__version__}")
    print(f"  _C (C++ CPU):  {'built, ' + str(cpu.max_threads()) + ' threads' if cpu else 'not built'}")
    print(f"  _C_cuda:       {'built, ' + str(cuda.device_count()) + ' device(s)' if cuda else 'not built'}")
    print("\n| op | backends |\n|---|---|")
    for op in ops.registered_ops():
        print(f"| {op} | {', '.join(sorted(ops._IMPLS[op]))} |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="steppo-fast", description="Fast, exact StepPO training math.")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="time every op's backends against PyTorch and peers")
    b.add_argument("--op", default=None,
                   help="one benchmark: advantages, linear_head, logprob or losses (default: all)")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--quick", action="store_true", help="small sizes, short timing runs")
    b.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--verbose-fallbacks", action="store_true", help="show reference-fallback warnings")
    b.set_defaults(fn=_cmd_bench)
    i = sub.add_parser("info", help="compiled modules and the backends of every op")
    i.set_defaults(fn=_cmd_info)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
