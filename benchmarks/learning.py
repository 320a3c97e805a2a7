"""StepPO against its baselines on the built-in tasks: the paper's claim in miniature.

Every method trains the same tiny Qwen2 (built in code) with the same budget: the same number
of updates, tasks and episodes per update, PPO epochs and minibatches, learning rate and seed
set. Only the estimator (and the ratio level that goes with it) changes:

* StepPO: ``step_gae`` (critic read at step boundaries) + step-level ratio;
* token PPO: ``token_gae`` (critic on every agent token) + token ratio;
* GRPO: group-normalised episode return + token ratio (no critic);
* GiGPO: GRPO's episode part + anchor-state step groups + token ratio (no critic).

Writes ``learning.md`` (table), ``learning.json`` (every curve) and ``learning.png`` (mean and
min-max over seeds of the smoothed success per update) under ``benchmarks/results/``.

    python -m steppo_fast.benchmarks.learning            # both tasks, 3 seeds (about 15 min on 2 cores)
    python -m steppo_fast.benchmarks.learning --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from typing import Dict, List

METHODS = {"StepPO": "step_gae", "token PPO": "token_gae", "GRPO": "grpo", "GiGPO": "gigpo"}
UPDATES = {"lights": 40, "hotpot": 150}
WINDOW = 5  # updates in the moving average the table and plot use


def run_one(env: str, estimator: str, seed: int, updates: int, out_dir: str, eval_episodes: int) -> Dict:
    from steppo_fast.trainer import TrainConfig, Trainer

    cfg = TrainConfig(env=env, estimator=estimator, seed=seed, updates=updates, device="cpu", progress=False,
                      out_dir=os.path.join(out_dir, f"{env}-{estimator}-{seed}"), save_every=updates,
                      eval_episodes=eval_episodes, log_every=updates + 1)
    tr = Trainer(cfg)
    t0 = time.perf_counter()
    hist = tr.train()
    wall = time.perf_counter() - t0
    final = tr.evaluate()
    return {"env": env, "estimator": estimator, "seed": seed, "curve": [m["success"] for m in hist],
            "final_success": final, "wall_s": wall}


def updates_to_reach(curve: List[float], target: float) -> int:
    """First update whose moving-average success reaches ``target`` (-1: never)."""
    from steppo_fast.trainer.plot import smooth

    for i, s in enumerate(smooth(curve, WINDOW)):
        if s >= target:
            return i
    return -1


def summarise(runs: List[Dict]) -> List[Dict]:
    from steppo_fast.trainer.plot import smooth

    rows = []
    for env in dict.fromkeys(r["env"] for r in runs):
        mine = [r for r in runs if r["env"] == env]
        best = max(max(smooth(r["curve"], WINDOW)) for r in mine)
        target = 0.9 * best
        for name, est in METHODS.items():
            rs = [r for r in mine if r["estimator"] == est]
            if not rs:
                continue
            reach = [updates_to_reach(r["curve"], target) for r in rs]
            hit = [x for x in reach if x >= 0]
            finals = [r["final_success"] for r in rs]
            rows.append({
                "task": env, "method": name, "estimator": est, "seeds": len(rs),
                "target (90% of best)": round(target, 3),
                "updates to target (mean of seeds that reach it)": (round(sum(hit) / len(hit), 1) if hit else "never"),
                "seeds reaching target": f"{len(hit)}/{len(rs)}",
                "final success mean": round(sum(finals) / len(finals), 3),
                "final success min-max": f"{min(finals):.3f}-{max(finals):.3f}",
                "wall s per run": round(sum(r["wall_s"] for r in rs) / len(rs), 1),
            })
    return rows


def plot(runs: List[Dict], path: str) -> None:
    from steppo_fast.trainer.plot import pyplot, save, success_bands

    envs = list(dict.fromkeys(r["env"] for r in runs))
    fig, axes = pyplot().subplots(1, len(envs), figsize=(6 * len(envs), 4), squeeze=False)
    for ax, env in zip(axes[0], envs):
        curves = {name: [r["curve"] for r in runs if r["env"] == env and r["estimator"] == est]
                  for name, est in METHODS.items()}
        curves = {k: v for k, v in curves.items() if v}
        success_bands(ax, curves, WINDOW)
        seeds = max(len(v) for v in curves.values())
        ax.set(title=f"{env} ({seeds} seeds, band: min-max)", ylabel=f"training success (mean of {WINDOW} updates)")
    save(fig, path)


def main(argv=None) -> int:
    import torch
    from tqdm.auto import tqdm

    from steppo_fast.benchmarks.harness import environment, markdown_table
    from steppo_fast.benchmarks.run import default_out_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(UPDATES), choices=list(UPDATES))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="3 updates per run, 1 seed (a smoke run)")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    p.add_argument("--runs-dir", default=os.path.join("runs", "learning"), help="per-run folders")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=r"steppo_fast::.*using the PyTorch reference")
    out = args.out or default_out_dir()
    os.makedirs(out, exist_ok=True)
    seeds = 1 if args.quick else args.seeds
    jobs = [(env, est, s) for env in args.tasks for est in METHODS.values() for s in range(seeds)]
    runs = []
    for env, est, s in tqdm(jobs, desc="learning runs", unit="run"):
        n = 3 if args.quick else UPDATES[env]
        runs.append(run_one(env, est, s, n, args.runs_dir, 32 if args.quick else 256))
    rows = summarise(runs)
    tag = "_quick" if args.quick else ""
    envinfo = environment("cpu")
    with open(os.path.join(out, f"learning{tag}.json"), "w") as f:
        json.dump({"environment": envinfo, "runs": runs}, f, indent=1)
    plot(runs, os.path.join(out, f"learning{tag}.png"))
    header = " · ".join(f"{k}: {v}" for k, v in envinfo.items())
    budget = ", ".join(f"{t}: {UPDATES[t] if not args.quick else 3} updates" for t in args.tasks)
    note = (f"Equal budgets per task ({budget}; 16 tasks x 4 episodes per update, 2 PPO epochs x 2 minibatches, "
            f"lr 2e-3, tiny Qwen2 built in code, {torch.get_num_threads()} CPU threads). Target: 90% of the best "
            f"moving-average ({WINDOW} updates) training success of any run on the task. Final success: "
            f"held-out episodes sampled at temperature 1 after the last update.")
    md = f"# Learning: StepPO vs baselines\n\n{header}\n\n{note}\n\n{markdown_table(rows)}\n\n![curves](learning{tag}.png)\n"
    with open(os.path.join(out, f"learning{tag}.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
