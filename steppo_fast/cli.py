"""The ``steppo-fast`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import warnings


def _cmd_bench(args) -> int:
    from .benchmarks import run

    if not args.verbose_fallbacks:
        warnings.filterwarnings("ignore", message=r"steppo_fast::.*using the PyTorch reference")
    if args.quick and args.grid not in (None, "quick"):
        print(f"steppo-fast bench: --quick and --grid {args.grid} disagree; give one of them", file=sys.stderr)
        return 2
    grid = args.grid or ("quick" if args.quick else "full")
    without = [w.strip() for w in (args.without or "").split(",") if w.strip()]
    run.main(args.op, args.device, grid, args.out, progress=not args.no_progress, without=without)
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


# Flags of `train` that map onto TrainConfig fields (flag name -> field name).
_TRAIN_FLAGS = {"env": "env", "estimator": "estimator", "model": "model", "critic": "critic", "updates": "updates",
                "groups": "groups", "group_size": "group_size", "seed": "seed", "lr": "lr", "device": "device",
                "out": "out_dir", "save_every": "save_every", "temperature": "temperature",
                "tensor_parallel": "tensor_parallel"}


def _fail(cmd: str, e: Exception, code: int = 2) -> int:
    """Report ``e`` as the one line ``steppo-fast <cmd>: <message>``; returns the exit code."""
    print(f"steppo-fast {cmd}: {' '.join(str(e).split())}", file=sys.stderr)
    return code


def _parse_sets(items):
    """``key=value`` pairs, values parsed as YAML (numbers, ``1e-3`` included, booleans, lists, dicts)."""
    from .trainer.config import parse_yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_yaml(v, f"--set {item}")
    return out


def _train_config(args):
    """The run's TrainConfig: the YAML file's keys, then flags, then --set. On --resume these
    go over the settings saved in the run folder's checkpoint, not over the defaults."""
    from .trainer import TrainConfig
    from .trainer.checks import INVOCATION, saved_settings
    from .trainer.config import read_config_file

    given = read_config_file(args.config) if args.config else {}
    given.update({field: getattr(args, flag) for flag, field in _TRAIN_FLAGS.items()
                  if getattr(args, flag) is not None})
    given.update(_parse_sets(args.set))
    if args.no_progress:
        given["progress"] = False
    if not args.resume:
        return TrainConfig.from_dict(given)
    out = given.get("out_dir", TrainConfig.out_dir)
    if not isinstance(out, str):
        raise ValueError(f"out_dir must be a string, got {out!r}")
    saved = saved_settings(os.path.join(out, "checkpoint.pt"))
    return TrainConfig.from_dict({**{k: v for k, v in saved.items() if k not in INVOCATION}, **given, "out_dir": out})


def _cmd_train(args) -> int:
    from .trainer.loop import NonFiniteLoss, run

    try:
        cfg = _train_config(args)
        history = run(cfg, resume=args.resume, overwrite=args.overwrite)
    except NonFiniteLoss as e:
        return _fail("train", e, 1)
    except ValueError as e:
        return _fail("train", e)
    if history and int(os.environ.get("RANK", "0")) == 0:
        print(f"final success {history[-1]['success']:.3f}; metrics, checkpoint and learning curve in {cfg.out_dir}")
    return 0


DEMO_OUT = os.path.join("runs", "demo")


def _cmd_demo(args) -> int:
    import time

    import torch

    from .trainer import TrainConfig, Trainer
    from .trainer.checks import check_run_folder
    from .trainer.envs import lights
    from .trainer.loop import NonFiniteLoss, backends_used

    # The default folder is the demo's own: every demo replaces the one before. A folder given
    # with --out is guarded like train's.
    out = args.out or DEMO_OUT
    overwrite = args.overwrite or args.out is None
    try:
        if args.eval_episodes < 1:
            raise ValueError(f"eval-episodes must be >= 1, got {args.eval_episodes}")
        cfg = TrainConfig(env="lights", estimator="step_gae", updates=args.updates, seed=args.seed, out_dir=out,
                          device="cpu", eval_episodes=args.eval_episodes, progress=not args.no_progress,
                          save_every=args.updates, log_every=5)
        check_run_folder(out, False, overwrite)
        trainer = Trainer(cfg)
    except ValueError as e:
        return _fail("demo", e)
    print(f"steppo_fast demo: the 'lights' task (3-8 turns, reward 1 only if every answer is right; "
          f"a random go/stop policy succeeds {lights.random_success_probability():.1%}),")
    print(f"StepPO (step GAE + step-ratio loss) on a tiny Qwen2 built in code "
          f"({sum(p.numel() for p in trainer.model.parameters()) / 1e3:.0f}k parameters with the critic), "
          f"{torch.get_num_threads()} CPU threads, {cfg.groups * cfg.group_size} episodes per update.")
    print(f"run folder: {out}" + (" (the demo's own, replaced by every demo)" if args.out is None else ""))
    before = trainer.evaluate()
    print(f"success before training: {before:.3f} ({cfg.eval_episodes} held-out episodes)")
    t0 = time.perf_counter()
    try:
        history = trainer.train(overwrite=overwrite)
    except NonFiniteLoss as e:
        return _fail("demo", e, 1)
    except ValueError as e:
        return _fail("demo", e)
    wall = time.perf_counter() - t0
    after = trainer.evaluate()
    per = [m["rollout_s"] + m["update_s"] for m in history]
    print(f"success after {len(history)} updates: {after:.3f} ({cfg.eval_episodes} held-out episodes)")
    n = len(history)
    rollout, update = (sum(m[k] for m in history) / n for k in ("rollout_s", "update_s"))
    print(f"time per update: {sum(per) / n:.3f} s mean (rollout {rollout:.3f} s, update {update:.3f} s); "
          f"training took {wall:.1f} s")
    print("kernel backends used:")
    for op, b in backends_used(trainer).items():
        print(f"  {op:24s} {b}")
    print(f"metrics: {cfg.out_dir}/metrics.jsonl, curve: {cfg.out_dir}/learning_curve.png, "
          f"model: {cfg.out_dir}/final")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="steppo-fast", description="Fast, exact StepPO training math.")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="time every op's backends against PyTorch and peers")
    b.add_argument("--op", default=None,
                   help="one benchmark: advantages, linear_head, logprob or losses (default: all)")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--quick", action="store_true", help="small sizes, short timing runs (--grid quick)")
    b.add_argument("--grid", default=None, choices=["tiny", "quick", "full"],
                   help="sizes: full (default), quick, or tiny (smoke-test sizes, no compiled peers)")
    b.add_argument("--out", default=None,
                   help="results folder, checked before anything runs (default: benchmarks/results of the "
                        "source checkout, or ./benchmarks/results)")
    b.add_argument("--without", default=None, metavar="PKG[,PKG]",
                   help="peer packages to leave out as if not installed (e.g. verl,liger_kernel)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--verbose-fallbacks", action="store_true", help="show reference-fallback warnings")
    b.set_defaults(fn=_cmd_bench)
    i = sub.add_parser("info", help="compiled modules and the backends of every op")
    i.set_defaults(fn=_cmd_info)
    t = sub.add_parser("train", help="train an agent with StepPO or a baseline in a built-in environment",
                       description="Flags override the YAML config; --set key=value sets any other TrainConfig "
                                   "field. Under torchrun the same command trains data-parallel.")
    t.add_argument("--env", default=None,
                   help="environment: lights (default), hotpot, relay, or one added with envs.register")
    t.add_argument("--estimator", default=None,
                   help="step_gae (StepPO, default), token_gae, grpo, rloo, gigpo or reinforce_pp")
    t.add_argument("--config", default=None, help="YAML file of TrainConfig fields")
    t.add_argument("--model", default=None, help="local HF causal LM folder (default: a tiny Qwen2 built in code)")
    t.add_argument("--critic", default=None, choices=["separate", "shared"], help="critic backbone")
    t.add_argument("--updates", type=int, default=None)
    t.add_argument("--groups", type=int, default=None, help="tasks per update")
    t.add_argument("--group-size", dest="group_size", type=int, default=None, help="episodes per task")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--temperature", type=float, default=None)
    t.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    t.add_argument("--tensor-parallel", dest="tensor_parallel", type=int, default=None, metavar="T",
                   help="under torchrun: split the lm_head over the vocabulary across groups of T ranks")
    t.add_argument("--out", default=None, help="run folder: metrics.jsonl, checkpoint.pt, learning_curve.png")
    t.add_argument("--save-every", dest="save_every", type=int, default=None)
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="any TrainConfig field (repeatable)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in the run folder: its saved settings, with the flags given on top")
    t.add_argument("--overwrite", action="store_true", help="replace the run in the run folder, if there is one")
    t.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    t.set_defaults(fn=_cmd_train)
    d = sub.add_parser("demo", help="train the quick task with StepPO on the CPU and show before/after")
    d.add_argument("--updates", type=int, default=30)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default=None,
                   help=f"run folder (default {DEMO_OUT}, the demo's own, which every demo replaces)")
    d.add_argument("--overwrite", action="store_true", help="replace the run in the folder given with --out")
    d.add_argument("--eval-episodes", dest="eval_episodes", type=int, default=256,
                   help="held-out episodes of the before/after success rates")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=_cmd_demo)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
