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


def pyplot():
    """matplotlib.pyplot on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str) -> str:
    """Lay out, write and close ``fig``; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def learning_curve(history: Sequence[Mapping[str, float]], path: str, title: str = "", window: int = 5) -> str:
    """Success per update (raw and smoothed) and the losses of one run, saved to ``path``."""
    fig, (a, b) = pyplot().subplots(1, 2, figsize=(10, 3.6))
    u = [m["update"] for m in history]
    succ = [m["success"] for m in history]
    a.plot(u, succ, color="tab:blue", alpha=0.3, label="per update")
    a.plot(u, smooth(succ, window), color="tab:blue", label=f"mean of {window}")
    a.set(xlabel="update", ylabel="success rate", ylim=(-0.02, 1.02), title=title or "success")
    a.legend(loc="lower right")
    b.plot(u, [m["pg_loss"] for m in history], label="policy loss")
    if any(m.get("vf_loss", 0.0) for m in history):
        b.plot(u, [m["vf_loss"] for m in history], label="value loss")
    b.plot(u, [m["entropy"] for m in history], label="entropy")
    b.set(xlabel="update", title="losses and entropy")
    b.legend(loc="upper right")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    return save(fig, path)


def success_bands(ax, curves: Dict[str, List[Sequence[float]]], window: int = 5) -> None:
    """On ``ax``: per method, the mean (line) and min-max (band) over seeds of the smoothed success."""
    for name, runs in curves.items():
        runs = [smooth(r, window) for r in runs]
        xs = range(min(len(r) for r in runs))
        (line,) = ax.plot(xs, [sum(r[i] for r in runs) / len(runs) for i in xs], label=name)
        ax.fill_between(xs, [min(r[i] for r in runs) for i in xs], [max(r[i] for r in runs) for i in xs],
                        color=line.get_color(), alpha=0.15)
    ax.set(xlabel="update", ylabel=f"success (mean of {window} updates)", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
