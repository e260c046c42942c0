"""PNG figures (matplotlib, headless Agg backend)."""
from __future__ import annotations

import os
from typing import Any

from .files import atomic_write


def pyplot() -> Any:
    """matplotlib.pyplot on the headless Agg backend: imported only when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike) -> None:
    plt = pyplot()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"), suffix=".png")
    finally:
        plt.close(fig)


def reliability_diagram(curves: dict[str, dict[str, Any]], path: str | os.PathLike) -> None:
    """One panel per model: accuracy per confidence bin against the diagonal, ECE in the title.

    curves: label → metrics dict from classification_metrics (needs 'reliability' and 'ece').
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 4), squeeze=False)
    for ax, (label, metrics) in zip(axes[0], curves.items()):
        bins = metrics["reliability"]
        edges = bins["edges"]
        width = edges[1] - edges[0]
        ax.bar(edges[:-1], bins["accuracy"], width=width, align="edge", edgecolor="black", color="#4c72b0",
               label="accuracy")
        gaps = [c - a if n else 0 for a, c, n in zip(bins["accuracy"], bins["confidence"], bins["count"])]
        ax.bar(edges[:-1], gaps, bottom=bins["accuracy"], width=width, align="edge", color="#dd8452", alpha=0.5,
               label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
               title=f"{label}\nacc {metrics['accuracy']:.1%}, ECE {metrics['ece']:.3f}")
        ax.legend(loc="upper left", fontsize=8)
    save_figure(fig, path)
