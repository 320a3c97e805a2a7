"""Does step-level credit matter? StepPO against every method of its paper, with error bars.

Every method trains the same tiny Qwen2 (built in code, seeded by the run's seed) on the same
task with the same budget: updates, tasks and episodes per update, PPO epochs, minibatches,
learning rates, clipping, gamma and lambda. Only what defines the method changes: the
estimator and the level of the policy ratio (``steppo_fast.trainer.METHODS``):

================================  ===============  =============
method                            advantages       policy ratio
================================  ===============  =============
StepPO                            step GAE         step
token PPO                         token GAE        token
GRPO / RLOO / REINFORCE++ / GiGPO (no critic)      token
GSPO                              GRPO             step
step GAE + token ratio (ablation) step GAE         token
token GAE + step ratio (ablation) token GAE        step
================================  ===============  =============

Per task it writes, under ``benchmarks/results/``, ``learning_<task>.json`` (settings, every
run's curves and timings; rewritten after each finished run, so an interrupted grid keeps what
finished and a rerun skips it), ``learning_<task>.md`` (tables), ``learning_<task>.png``
(curves with bands) and ``learning_<task>_bars.png`` (final success and area under the curve
with intervals). Statistics (see :func:`summarise`): per method the mean over seeds with a
percentile-bootstrap 95% interval; StepPO against each other method paired by seed (same
initial model, same tasks): the mean difference with a bootstrap interval and the two-sided
p-value of an exact sign-flip permutation test.

    python -m steppo_fast.benchmarks.learning                  # relay: 9 methods x 5 seeds (30 min, 2 cores)
    python -m steppo_fast.benchmarks.learning --lam 0.95 --methods StepPO "token PPO" \
        "step GAE + token ratio" "token GAE + step ratio"    # lambda < 1: learning_relay_lam0.95.*
    python -m steppo_fast.benchmarks.learning --quick          # smoke run (2 seeds, 2 tiny updates)
    python -m steppo_fast.benchmarks.learning --tasks lights hotpot --seeds 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

# Display name -> trainer method (steppo_fast.trainer.METHODS). StepPO first: the reference.
METHODS = {
    "StepPO": "steppo",
    "token PPO": "ppo",
    "GRPO": "grpo",
    "RLOO": "rloo",
    "REINFORCE++": "reinforce_pp",
    "GiGPO": "gigpo",
    "GSPO": "gspo",
    "step GAE + token ratio": "step_gae_token_ratio",
    "token GAE + step ratio": "token_gae_step_ratio",
}
REFERENCE = "StepPO"
ABLATIONS = ("StepPO", "step GAE + token ratio", "token GAE + step ratio", "token PPO")
UPDATES = {"relay": 30, "lights": 40, "hotpot": 150}
# Settings every method shares (the trainer's defaults, written out so the table can say them).
SHARED = {"groups": 16, "group_size": 4, "ppo_epochs": 2, "minibatches": 2, "lr": 2e-3, "critic_lr": 2e-3,
          "gamma": 1.0, "lam": 1.0, "temperature": 1.0,
          "attn_implementation": "eager"}  # the same math as SDPA, faster for one-token decoding on a CPU
QUICK = {"groups": 4, "group_size": 2}
EVAL_EPISODES = 128
WINDOW = 5  # updates in the moving average of the curves and of "updates to target"
BOOT = 10_000  # bootstrap resamples


# ---------------------------------------------------------------------- statistics
def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def bootstrap_ci(xs: Sequence[float], level: float = 0.95, resamples: int = BOOT, seed: int = 0) -> Tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``xs`` (resampling with replacement)."""
    import numpy as np

    x = np.asarray(xs, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    a = (1 - level) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return float(lo), float(hi)


def paired_permutation_p(diffs: Sequence[float]) -> float:
    """Two-sided p-value of the sign-flip permutation test of mean(diffs) = 0.

    Under the null each paired difference is as likely positive as negative; p is the share of
    the 2^n sign assignments whose |mean| is at least the observed one (exact up to n = 16,
    then 65,536 random assignments). With n pairs the smallest possible p is 2 / 2^n.
    """
    d = [float(x) for x in diffs]
    n = len(d)
    if n == 0:
        raise ValueError("paired_permutation_p needs at least one difference")
    obs = abs(sum(d)) - 1e-12
    if n <= 16:
        signs = itertools.product((1.0, -1.0), repeat=n)
        total = 2 ** n
    else:
        rng = random.Random(0)
        total = 65_536
        signs = ([rng.choice((1.0, -1.0)) for _ in range(n)] for _ in range(total))
    hits = sum(abs(sum(s * x for s, x in zip(sg, d))) >= obs for sg in signs)
    return hits / total


def auc(curve: Sequence[float]) -> float:
    """Area under the success-per-update curve divided by the number of updates (in [0, 1])."""
    return mean(curve)


def updates_to_reach(curve: Sequence[float], target: float, window: int = WINDOW) -> Optional[int]:
    """Updates until the moving average of ``curve`` first reaches ``target`` (None: never)."""
    from steppo_fast.trainer.plot import smooth

    for i, s in enumerate(smooth(curve, window)):
        if s >= target:
            return i + 1
    return None


def mean_curve(curves: Sequence[Sequence[float]], window: int = WINDOW) -> List[float]:
    from steppo_fast.trainer.plot import smooth

    sm = [smooth(c, window) for c in curves]
    return [mean([c[i] for c in sm]) for i in range(min(len(c) for c in sm))]


# ---------------------------------------------------------------------- one run
def run_one(task: str, method: str, seed: int, updates: int, settings: Dict, eval_episodes: int, threads: int,
            runs_dir: str) -> Dict:
    """Train one (task, method, seed); returns its curves, final success and timings."""
    import torch

    from steppo_fast.trainer import TrainConfig, Trainer, method_settings

    warnings.filterwarnings("ignore", message=r"steppo_fast::.*using the PyTorch reference")
    torch.set_num_threads(threads)
    try:  # no progress bar for the final model's save
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    cfg = TrainConfig(env=task, seed=seed, updates=updates, device="cpu", progress=False,
                      out_dir=os.path.join(runs_dir, task, f"{method}-{seed}"), save_every=updates,
                      eval_episodes=eval_episodes, log_every=updates + 1, **settings, **method_settings(method))
    tr = Trainer(cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    # A run folder left by an interrupted grid holds no finished result (those live in the json,
    # which a rerun skips), so it is replaced, not refused.
    hist = tr.train(overwrite=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    t1 = time.perf_counter()
    final = tr.evaluate()
    return {"task": task, "method": method, "seed": seed, "updates": updates,
            "curve": [m["success"] for m in hist], "tokens_per_step": [m["tokens_per_step"] for m in hist],
            "steps_per_episode": [m["steps_per_episode"] for m in hist],
            "rollout_s": [m["rollout_s"] for m in hist], "update_s": [m["update_s"] for m in hist],
            "final_success": final, "train_wall_s": wall, "train_cpu_s": cpu, "eval_wall_s": time.perf_counter() - t1,
            "threads": threads, "load_avg_1m": os.getloadavg()[0]}


def random_success(task: str) -> Optional[float]:
    """Success of a uniformly random valid answer on ``task``, computed by hand (None: unknown)."""
    from steppo_fast.trainer.envs import lights, relay

    return {"relay": relay.success_probability(0.5), "lights": lights.random_success_probability()}.get(task)


def _run_job(args):
    return run_one(*args)


# ---------------------------------------------------------------------- summaries
def _fmt_ci(m: float, ci: Tuple[float, float]) -> str:
    return f"{m:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _fmt_diff(m: float, ci: Tuple[float, float]) -> str:
    return f"{m:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def summarise(runs: List[Dict], methods: Dict[str, str] = METHODS) -> Dict:
    """Per-method rows and paired comparisons against StepPO for the runs of one task."""
    by = {name: sorted((r for r in runs if r["method"] == key), key=lambda r: r["seed"])
          for name, key in methods.items()}
    by = {k: v for k, v in by.items() if v}
    curves = {k: mean_curve([r["curve"] for r in v]) for k, v in by.items()}
    best = max(max(c) for c in curves.values())
    target = 0.9 * best
    rows = []
    for name, rs in by.items():
        finals = [r["final_success"] for r in rs]
        aucs = [auc(r["curve"]) for r in rs]
        reach = [updates_to_reach(r["curve"], target) for r in rs]
        hit = [x for x in reach if x is not None]
        mc = updates_to_reach(curves[name], target, window=1)
        from steppo_fast.trainer.config import METHODS as TM

        est, ratio = TM[rs[0]["method"]]
        rows.append({
            "method": name, "estimator": est, "ratio": ratio, "seeds": len(rs),
            "final_mean": mean(finals), "final_ci": bootstrap_ci(finals),
            "auc_mean": mean(aucs), "auc_ci": bootstrap_ci(aucs),
            "updates_to_target_mean_curve": mc,
            "updates_to_target_seeds": reach, "seeds_reaching_target": len(hit),
            "tokens_per_step": mean([mean(r["tokens_per_step"]) for r in rs]),
            "rollout_s_per_update": mean([mean(r["rollout_s"]) for r in rs]),
            "update_s_per_update": mean([mean(r["update_s"]) for r in rs]),
            "train_cpu_s_per_update": mean([r["train_cpu_s"] / len(r["curve"]) for r in rs]),
            "wall_s_per_run": mean([r["train_wall_s"] + r["eval_wall_s"] for r in rs]),
        })
    paired = []
    if REFERENCE in by:
        ref = {r["seed"]: r for r in by[REFERENCE]}
        for name, rs in by.items():
            if name == REFERENCE:
                continue
            pairs = [(ref[r["seed"]], r) for r in rs if r["seed"] in ref]
            if not pairs:
                continue
            d_final = [a["final_success"] - b["final_success"] for a, b in pairs]
            d_auc = [auc(a["curve"]) - auc(b["curve"]) for a, b in pairs]
            paired.append({
                "baseline": name, "pairs": len(pairs),
                "final_diff": mean(d_final), "final_diff_ci": bootstrap_ci(d_final),
                "final_p": paired_permutation_p(d_final), "final_wins": sum(x > 0 for x in d_final),
                "auc_diff": mean(d_auc), "auc_diff_ci": bootstrap_ci(d_auc),
                "auc_p": paired_permutation_p(d_auc), "auc_wins": sum(x > 0 for x in d_auc),
            })
    return {"target": target, "best_mean_curve": best, "rows": rows, "paired": paired, "curves": curves}


def markdown(task: str, summary: Dict, meta: Dict) -> str:
    from steppo_fast.benchmarks.harness import markdown_table

    rows = [{
        "method": r["method"], "advantages": r["estimator"], "ratio": r["ratio"], "seeds": r["seeds"],
        "final success, mean [95% CI]": _fmt_ci(r["final_mean"], r["final_ci"]),
        "AUC, mean [95% CI]": _fmt_ci(r["auc_mean"], r["auc_ci"]),
        f"updates to {summary['target']:.2f} (mean curve)": r["updates_to_target_mean_curve"] or "never",
        "seeds reaching it": f"{r['seeds_reaching_target']}/{r['seeds']}",
        "tokens per step": round(r["tokens_per_step"], 1),
        "rollout s / update": round(r["rollout_s_per_update"], 2),
        "update s / update": round(r["update_s_per_update"], 2),
        "CPU s / update": round(r["train_cpu_s_per_update"], 2),
    } for r in summary["rows"]]
    paired = [{
        "StepPO minus": p["baseline"], "pairs": p["pairs"],
        "final success diff [95% CI]": _fmt_diff(p["final_diff"], p["final_diff_ci"]),
        "p (final)": f"{p['final_p']:.3f}", "StepPO better (final)": f"{p['final_wins']}/{p['pairs']}",
        "AUC diff [95% CI]": _fmt_diff(p["auc_diff"], p["auc_diff_ci"]),
        "p (AUC)": f"{p['auc_p']:.3f}", "StepPO better (AUC)": f"{p['auc_wins']}/{p['pairs']}",
    } for p in summary["paired"]]
    s = meta["settings"]
    env = " · ".join(f"{k}: {v}" for k, v in meta["environment"].items())
    grid = meta["grid"]
    note = (f"Budget per run, the same for every method: {s['updates']} updates x {s['groups']} tasks x "
            f"{s['group_size']} episodes, {s['ppo_epochs']} PPO epochs x {s['minibatches']} minibatches, lr "
            f"{s['lr']:g} (critic {s['critic_lr']:g}), gamma {s['gamma']:g}, lambda {s['lam']:g}, temperature "
            f"{s['temperature']:g}, clip 0.2, tiny Qwen2 built in code (policy and, for the critic methods, a "
            f"separate critic backbone), seeds {s['seeds']}. Final success: {s['eval_episodes']} held-out episodes "
            f"after the last update. AUC: mean training success over all updates (area under the learning curve "
            f"/ updates). Target: 90% of the best method's peak mean curve ({WINDOW}-update moving average). "
            f"Intervals: percentile bootstrap ({BOOT} resamples) over seeds. p: exact two-sided sign-flip "
            f"permutation test of the paired (same seed: same initial model, same tasks) differences; with n "
            f"pairs it cannot go below 2/2^n ({2 / 2 ** s['seeds']:.3f} here).")
    if random_success(task) is not None:
        note += f" A uniformly random call succeeds {random_success(task):.3f} (by hand)."
    timing = (f"Grid: {grid['runs']} runs in {grid['wall_s'] / 60:.1f} min of wall time ({grid['jobs']} runs at a "
              f"time, {grid['threads']} thread(s) each; mean 1-minute load average at the end of a run "
              f"{grid['mean_load']:.1f} on {grid['cpus']} CPUs). {meta.get('machine_note') or ''}").strip()
    return (f"# Learning on `{task}`: StepPO against the paper's methods\n\n{env}\n\n{note}\n\n{timing}\n\n"
            f"{markdown_table(rows)}\n\nPaired by seed, StepPO minus each method (positive: StepPO higher):\n\n"
            f"{markdown_table(paired) if paired else '(no StepPO runs)'}\n\n"
            f"![curves](learning_{task}{meta['tag']}.png)\n\n![bars](learning_{task}{meta['tag']}_bars.png)\n")


# ---------------------------------------------------------------------- plots
def plot(task: str, runs: List[Dict], summary: Dict, path: str, bars_path: str) -> None:
    import numpy as np

    from steppo_fast.trainer.plot import pyplot, save, smooth

    plt = pyplot()
    names = [r["method"] for r in summary["rows"]]
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(METHODS)}
    panels = [("StepPO and the baselines", [n for n in names if n not in ABLATIONS[1:3]]),
              ("StepPO and its ablations", [n for n in names if n in ABLATIONS])]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), squeeze=False)
    for ax, (title, group) in zip(axes[0], panels):
        for name in group:
            key = METHODS[name]
            sm = np.array([smooth(r["curve"], WINDOW) for r in runs if r["method"] == key])
            xs = np.arange(1, sm.shape[1] + 1)
            lo, hi = zip(*(bootstrap_ci(sm[:, i], resamples=2000) for i in range(sm.shape[1])))
            ax.plot(xs, sm.mean(0), color=colors[name], label=name, lw=2.2 if name == REFERENCE else 1.4)
            ax.fill_between(xs, lo, hi, color=colors[name], alpha=0.12)
        ax.axhline(summary["target"], color="gray", ls=":", lw=1)
        if random_success(task) is not None:
            ax.axhline(random_success(task), color="k", ls="--", lw=0.8)
        ax.set(title=f"{task}: {title}", xlabel="update", ylim=(-0.02, 1.02),
               ylabel=f"training success ({WINDOW}-update mean)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    seeds = max(r["seeds"] for r in summary["rows"])
    extra = "; dashed: a random call" if random_success(task) is not None else ""
    fig.suptitle(f"mean over {seeds} seeds, band: bootstrap 95% CI of the mean; dotted: target{extra}", fontsize=9)
    save(fig, path)

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), squeeze=False)
    measures = (("final", "final success (held-out)"), ("auc", "AUC (mean training success)"))
    for ax, (key, label) in zip(axes[0], measures):
        m = [r[f"{key}_mean"] for r in summary["rows"]]
        lo = [r[f"{key}_mean"] - r[f"{key}_ci"][0] for r in summary["rows"]]
        hi = [r[f"{key}_ci"][1] - r[f"{key}_mean"] for r in summary["rows"]]
        xs = np.arange(len(names))
        ax.bar(xs, m, yerr=[lo, hi], capsize=4, color=[colors[n] for n in names], alpha=0.85)
        for i, name in enumerate(names):
            vals = [r["final_success"] if key == "final" else auc(r["curve"])
                    for r in runs if r["method"] == METHODS[name]]
            ax.scatter([i] * len(vals), vals, color="k", s=8, zorder=3)
        ax.set_xticks(xs)
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set(title=f"{task}: {label}", ylim=(0, 1.02))
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("bars: mean over seeds, whiskers: bootstrap 95% CI, dots: seeds", fontsize=9)
    save(fig, bars_path)


# ---------------------------------------------------------------------- the grid
def _load(path: str, settings: Dict, fresh: bool) -> Tuple[List[Dict], Dict]:
    if fresh or not os.path.exists(path):
        return [], {"wall_s": 0.0, "sessions": 0}
    with open(path) as f:
        old = json.load(f)
    if old.get("settings") != settings:
        diff = sorted(k for k in set(settings) | set(old.get("settings", {}))
                      if settings.get(k) != old.get("settings", {}).get(k))
        raise SystemExit(f"{path} holds runs with other settings ({', '.join(diff)}); "
                         "rerun with --fresh to start over, or with the same settings to resume")
    return old["runs"], {"wall_s": old["grid"]["wall_s"], "sessions": old["grid"]["sessions"]}


def write(out: str, task: str, tag: str, runs: List[Dict], settings: Dict, grid: Dict, machine_note: str,
          figures: bool = True) -> Optional[Dict]:
    """Rewrite the task's json (and, when every method has a run, its table and plots)."""
    from steppo_fast.benchmarks.harness import environment

    base = os.path.join(out, f"learning_{task}{tag}")
    meta = {"environment": environment("cpu"), "settings": settings, "grid": grid, "machine_note": machine_note,
            "tag": tag}
    tmp = base + ".json.tmp"
    with open(tmp, "w") as f:
        json.dump({**meta, "runs": runs}, f, indent=1)
    os.replace(tmp, base + ".json")  # never a half-written file
    if not runs or not figures:
        return None
    summary = summarise(runs)
    with open(base + ".md", "w") as f:
        f.write(markdown(task, summary, meta))
    plot(task, runs, summary, base + ".png", base + "_bars.png")
    return summary


def main(argv=None) -> int:
    import multiprocessing as mp

    from tqdm.auto import tqdm

    from steppo_fast.benchmarks.run import default_out_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=["relay"], choices=list(UPDATES))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                   help=f"default: all of {', '.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (default 5, --quick: 2)")
    p.add_argument("--updates", type=int, default=None, help="updates per run (default: per task)")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (default: one per 1 CPU thread, at most 2)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 2 updates of 8 episodes, 8 to evaluate")
    p.add_argument("--fresh", action="store_true", help="discard the runs already in the results file")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    p.add_argument("--runs-dir", default=os.path.join("runs", "learning"), help="per-run training folders")
    p.add_argument("--lam", type=float, default=None,
                   help="GAE lambda for every method (default 1); another value adds _lam<value> to the file names")
    p.add_argument("--machine-note", default="", help="a sentence about the machine for the table (e.g. shared)")
    args = p.parse_args(argv)
    out = args.out or default_out_dir()
    os.makedirs(out, exist_ok=True)
    cpus = os.cpu_count() or 1
    jobs = args.jobs or max(1, min(2, cpus))
    threads = max(1, cpus // jobs)
    seeds = args.seeds or (2 if args.quick else 5)
    tag = "_quick" if args.quick else ""
    if args.lam is not None and not 0.0 <= args.lam <= 1.0:
        p.error(f"--lam must lie in [0, 1], got {args.lam}")
    if args.lam is not None and args.lam != SHARED["lam"]:
        tag += f"_lam{args.lam:g}"
    for task in args.tasks:
        updates = args.updates or (2 if args.quick else UPDATES[task])
        shared = {**SHARED, **(QUICK if args.quick else {}), **({} if args.lam is None else {"lam": args.lam})}
        settings = {**shared, "updates": updates, "seeds": seeds,
                    "eval_episodes": 8 if args.quick else EVAL_EPISODES}
        path = os.path.join(out, f"learning_{task}{tag}.json")
        runs, grid = _load(path, settings, args.fresh)
        done = {(r["method"], r["seed"]) for r in runs}
        todo = [(task, METHODS[m], s, updates, shared, settings["eval_episodes"], threads, args.runs_dir)
                for s in range(seeds) for m in args.methods if (METHODS[m], s) not in done]
        if done:
            print(f"{task}: {len(done)} runs already in {path}; {len(todo)} to go")
        t0 = time.perf_counter()
        grid.update(jobs=jobs, threads=threads, cpus=cpus, sessions=grid["sessions"] + 1)
        past = grid["wall_s"]

        def record(figures: bool) -> None:
            grid.update(runs=len(runs), wall_s=past + time.perf_counter() - t0)
            if runs:
                grid["mean_load"] = mean([x["load_avg_1m"] for x in runs])
                write(out, task, tag, runs, settings, grid, args.machine_note, figures=figures)

        bar = tqdm(total=len(todo), desc=f"learning {task}", unit="run")
        try:
            if jobs == 1 or len(todo) <= 1:
                results = (run_one(*job) for job in todo)
            else:
                pool = mp.get_context("spawn").Pool(jobs)
                results = pool.imap_unordered(_run_job, todo)
            for r in results:
                runs.append(r)
                record(figures=False)  # every finished run is on disk before the next one ends
                bar.update()
        finally:
            bar.close()
            if jobs > 1 and len(todo) > 1:
                pool.terminate()
            record(figures=True)  # tables and plots of whatever finished, interrupted or not
        md = os.path.join(out, f"learning_{task}{tag}.md")
        if os.path.exists(md):
            print(open(md).read())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
