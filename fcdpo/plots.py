"""PNG plots of a run: accuracy before/after per task with CI bars, DPO curves, pass@k curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fcdpo.evaluation import Metrics


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_bars(before: Metrics, after: Metrics, path: str | Path) -> Path:
    """Grouped bars: greedy pass@1 per task before and after training, with bootstrap CI error bars."""
    plt = _plt()
    tasks = list(before)
    fig, ax = plt.subplots(figsize=(1.8 + 1.4 * len(tasks), 3.6))
    width = 0.38
    for i, (label, m) in enumerate((("before", before), ("after", after))):
        xs = [j + (i - 0.5) * width for j in range(len(tasks))]
        acc = [m[t].accuracy for t in tasks]
        err = [
            [a - m[t].ci[0] for a, t in zip(acc, tasks, strict=True)],
            [m[t].ci[1] - a for a, t in zip(acc, tasks, strict=True)],
        ]
        ax.bar(xs, acc, width, yerr=err, capsize=4, label=label)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("greedy pass@1")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("accuracy before / after DPO (95% bootstrap CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def training_curves(history: Sequence[dict[str, float]], path: str | Path) -> Path:
    """DPO loss and reward margin per optimiser step."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key in zip(axes, ("loss", "rewards/margins"), strict=True):
        pts = [(h["step"], h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".")
        ax.set_xlabel("step")
        ax.set_title(key)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def pass_at_k_curves(before: Metrics, after: Metrics, path: str | Path) -> Path:
    """pass@j for j = 1..k per task, before (dashed) and after (solid)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for task in before:
        for label, m, style in (("before", before, "--"), ("after", after, "-")):
            pk = m[task].pass_at_k
            if pk:
                ks = sorted(int(j) for j in pk)
                ax.plot(ks, [pk[str(j)] for j in ks], style, marker="o", label=f"{task} {label}")
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def accuracy_by_arm(arms: dict[str, Metrics], path: str | Path) -> Path:
    """Grouped bars: each arm's final greedy pass@1 per task, with bootstrap CI error bars."""
    plt = _plt()
    tasks = sorted({t for m in arms.values() for t in m})
    fig, ax = plt.subplots(figsize=(2.0 + 1.2 * len(tasks) * max(1, len(arms)) / 2, 3.8))
    width = 0.8 / max(1, len(arms))
    for i, (arm, m) in enumerate(arms.items()):
        xs = [j + (i - (len(arms) - 1) / 2) * width for j in range(len(tasks))]
        acc = [m[t].accuracy if t in m else 0.0 for t in tasks]
        err = [
            [a - m[t].ci[0] if t in m else 0.0 for a, t in zip(acc, tasks, strict=True)],
            [m[t].ci[1] - a if t in m else 0.0 for a, t in zip(acc, tasks, strict=True)],
        ]
        ax.bar(xs, acc, width, yerr=err, capsize=3, label=arm)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("greedy pass@1")
    return _finish(plt, fig, ax, "accuracy by arm (95% bootstrap CI)", path)


def accuracy_by_round(arms: dict[str, list[dict[str, float]]], path: str | Path, task: str = "all") -> Path:
    """One line per arm: ``task`` accuracy after each training round."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for arm, rounds in arms.items():
        pts = [(k + 1, r[task]) for k, r in enumerate(rounds) if task in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=arm)
    ax.set_xlabel("round")
    ax.set_ylabel(f"greedy pass@1 ({task})")
    return _finish(plt, fig, ax, "accuracy by round", path)


def _finish(plt: Any, fig: Any, ax: Any, title: str, path: str | Path) -> Path:
    """An accuracy plot's common end: 0-1 axis, legend, title, saved as PNG."""
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
