"""One PNG per task: confusion matrix, predicted map beside the truth, fusion spectra and error maps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _confusion(ax, cm: np.ndarray, names: list[str], title: str) -> None:
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
    ax.set_title(title)


def _labels_map(ax, lab: np.ndarray, k: int, title: str) -> None:
    m = np.ma.masked_less(lab, 0)
    ax.imshow(m, cmap="tab20", vmin=0, vmax=max(k - 1, 1), interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")


def task_figure(result, out: str | Path) -> Path:
    """Write the figure of a :class:`finetune.tasks.TaskResult` to ``out`` (PNG)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    a = result.arrays
    head = ", ".join(f"{k} {v:.3f}" for k, v in result.metrics.items())
    if result.kind == "classification":
        fig, ax = plt.subplots(figsize=(6, 5))
        _confusion(ax, a["confusion"], a["class_names"], f"{result.name}: {head}")
    elif result.kind == "segmentation":
        k = len(a["class_names"])
        fig, axs = plt.subplots(1, 3, figsize=(13, 4.5))
        _labels_map(axs[0], a["truth"], k, "truth")
        _labels_map(axs[1], np.where(a["truth"] >= 0, a["pred"], -1), k, "prediction (whole scene)")
        test = (~a["train_mask"]) & (a["truth"] >= 0)
        err = np.where(test, (a["pred"] != a["truth"]).astype(float), np.nan)
        axs[2].imshow(err, cmap="Reds", vmin=0, vmax=1, interpolation="nearest")
        axs[2].set_title("errors on the test region")
        axs[2].axis("off")
        fig.suptitle(f"{result.name}: {head}", fontsize=9)
    elif result.kind == "change":
        fig, axs = plt.subplots(1, 2, figsize=(9, 4.5))
        for ax, m, t in ((axs[0], a["truth"], "truth (1 changed)"), (axs[1], a["pred"], "prediction (test pixels)")):
            ax.imshow(np.ma.masked_less(m, 0), cmap="coolwarm", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(t)
            ax.axis("off")
        fig.suptitle(f"{result.name}: {head}", fontsize=9)
    elif result.kind == "fusion":
        truth, fused, bil = a["truth"], a["fused"], a["bilinear"]
        wl = np.asarray(a["wavelengths"])
        fig, axs = plt.subplots(1, 3, figsize=(15, 4.5))
        h, w = truth.shape[1:]
        for (y, x), col in zip(((h // 4, w // 4), (h // 2, w // 2), (3 * h // 4, 3 * w // 4)), ("C0", "C1", "C2")):
            axs[0].plot(wl, truth[:, y, x], color=col, lw=1.5, label=f"truth ({y},{x})")
            axs[0].plot(wl, fused[:, y, x], color=col, ls="--", lw=1, label="fused")
            axs[0].plot(wl, bil[:, y, x], color=col, ls=":", lw=1, label="bilinear")
        axs[0].set_xlabel("wavelength (nm)")
        axs[0].legend(fontsize=6)
        axs[0].set_title("spectra")
        e_f = np.sqrt(((fused - truth) ** 2).mean(0))
        e_b = np.sqrt(((bil - truth) ** 2).mean(0))
        vmax = float(np.percentile(np.concatenate([e_f.ravel(), e_b.ravel()]), 99)) or 1.0
        for ax, e, t in ((axs[1], e_f, "RMSE per pixel: fused"), (axs[2], e_b, "RMSE per pixel: bilinear")):
            im = ax.imshow(e, cmap="magma", vmin=0, vmax=vmax)
            ax.set_title(t)
            ax.axis("off")
        fig.colorbar(im, ax=axs[1:], shrink=0.8)
        fig.suptitle(f"{result.name}: {head}", fontsize=9)
    else:
        raise ValueError(f"no figure for task kind {result.kind!r}")
    fig.savefig(out, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return out
