"""One PNG per task: each task kind draws its own figure (``Task.draw``); the panels they share are here."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["confusion_panel", "labels_panel", "plt", "task_figure", "title"]


def title(result) -> str:
    """``name: metric value, ...`` of a task result."""
    return f"{result.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.metrics.items())


def confusion_panel(ax, cm: np.ndarray, names: list[str], heading: str) -> None:
    """Row-normalised confusion matrix with the counts written in."""
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(heading)


def labels_panel(ax, lab: np.ndarray, k: int, heading: str) -> None:
    """A class map (negative = unlabelled, left blank)."""
    m = np.ma.masked_less(lab, 0)
    ax.imshow(m, cmap="tab20", vmin=0, vmax=max(k - 1, 1), interpolation="nearest")
    ax.set_title(heading)
    ax.axis("off")


def task_figure(result, out: str | Path) -> Path:
    """Write the figure of a :class:`finetune.tasks.TaskResult` (drawn by its kind's task) to ``out`` (PNG)."""
    from finetune.tasks import task_class

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = task_class(result.kind).draw(result)
    fig.savefig(out, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return out
