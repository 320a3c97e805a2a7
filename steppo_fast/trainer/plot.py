"""Learning curves as PNG files (matplotlib, headless)."""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence


def smooth(xs: Sequence[float], window: int) -> List[float]:
    """Trailing moving average over ``window`` points (shorter at the start)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= window:
            acc -= xs[i - window]
        out.append(acc / min(i + 1, window))
    return out


def learning_curve(history: Sequence[Mapping[str, float]], path: str, title: str = "", window: int = 5) -> str:
    """Success per update (raw and smoothed) and the losses of one run, saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    u = [m["update"] for m in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    succ = [m["success"] for m in history]
    a.plot(u, succ, color="tab:blue", alpha=0.3, label="per update")
    a.plot(u, smooth(succ, window), color="tab:blue", label=f"mean of {window}")
    a.set(xlabel="update", ylabel="success rate", ylim=(-0.02, 1.02), title=title or "success")
    a.grid(alpha=0.3)
    a.legend(loc="lower right")
    b.plot(u, [m["pg_loss"] for m in history], label="policy loss")
    if any(m.get("vf_loss", 0.0) for m in history):
        b.plot(u, [m["vf_loss"] for m in history], label="value loss")
    b.plot(u, [m["entropy"] for m in history], label="entropy")
    b.set(xlabel="update", title="losses and entropy")
    b.grid(alpha=0.3)
    b.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare_curves(curves: Dict[str, List[Sequence[float]]], path: str, title: str, window: int = 5) -> str:
    """Mean (line) and min-max band (shade) over seeds of each method's success curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, runs in curves.items():
        runs = [smooth(r, window) for r in runs]
        n = min(len(r) for r in runs)
        xs = list(range(n))
        mean = [sum(r[i] for r in runs) / len(runs) for i in xs]
        lo = [min(r[i] for r in runs) for i in xs]
        hi = [max(r[i] for r in runs) for i in xs]
        (line,) = ax.plot(xs, mean, label=name)
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set(xlabel="update", ylabel=f"success (mean of {window} updates)", ylim=(-0.02, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
