"""Figures people would rather see than read: training curves and adaptor spectra, as PNG files.

Uses matplotlib's file-only Agg backend (no display needed); MLflow logging of the same files
happens in the jobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write `fig` as a PNG at `path` (parents created) and close it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def plot_history(
    history: Sequence[dict], path: str | Path, keys: Sequence[str] = ("loss", "nll"), title=""
) -> Path:
    """Training curves of `history` (records with a `step` and the `keys` that are present)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in keys:
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points, strict=True), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("value")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_effective_ranks(report: dict, path: str | Path, title: str = "") -> Path:
    """Bars of each module's rank and the effective rank of its W_A and W_B (an
    `adaptor_io.adaptor_report`)."""
    plt = pyplot()
    modules = report["modules"]
    labels = [f"p{m['phase']}.{m['module']}" for m in modules]
    x = range(len(modules))
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(modules) + 2), 3.5))
    ax.bar([i - 0.25 for i in x], [m["rank"] for m in modules], 0.25, label="rank r")
    ax.bar(x, [m["effective_rank_up"] for m in modules], 0.25, label="eff. rank W_A")
    ax.bar(
        [i + 0.25 for i in x],
        [m["effective_rank_down"] for m in modules],
        0.25,
        label="eff. rank W_B",
    )
    ax.set_xticks(list(x), labels)
    ax.set_xlabel("phase.module (phase 0 = earliest, noisiest)")
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)
