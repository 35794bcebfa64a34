"""Reconstruction figures: input, masked input and reconstruction as colour composites, plus pixel spectra."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

RGB_NM = (640.0, 550.0, 460.0)


def rgb_bands(wavelengths: np.ndarray) -> list[int]:
    """Indices of the bands nearest 640, 550 and 460 nm (the nearest available when a window misses them)."""
    return [int(np.argmin(np.abs(wavelengths - w))) for w in RGB_NM]


def _composite(img: np.ndarray, idx: list[int], lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    rgb = img[idx].transpose(1, 2, 0)
    out = np.clip((rgb - lo) / np.maximum(hi - lo, 1e-6), 0, 1)
    return np.where(np.isfinite(out), out, 0.5)


def save_reconstruction(batch: dict[str, Any], out: dict[str, Any], path: str | Path, patch_size: int,
                        title: str = "", n_spectra: int = 3) -> Path:
    """Save a PNG of sample 0: input, masked input (masked patches grey), reconstruction, and spectra of a few
    masked pixels (input vs reconstruction). ``out`` holds ``pred`` [B,C,H,W] and ``mask`` [B,h,w]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = batch["pixels"][0].detach().float().cpu().numpy()
    wl = batch["wavelengths"][0].detach().float().cpu().numpy()
    pred = out["pred"][0].detach().float().cpu().numpy()
    mask = out["mask"][0].detach().cpu().numpy().astype(bool)
    pix_mask = np.kron(mask, np.ones((patch_size, patch_size), bool))[: x.shape[1], : x.shape[2]]
    idx = rgb_bands(wl)
    rgb = x[idx].reshape(3, -1)
    lo = np.nanpercentile(rgb, 2, axis=1)
    hi = np.nanpercentile(rgb, 98, axis=1)
    masked = x.copy()
    masked[:, pix_mask] = np.nan
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    for ax, img, name in zip(axes[:3], (x, masked, pred), ("input", "masked input", "reconstruction")):
        ax.imshow(_composite(img, idx, lo, hi))
        ax.set_title(f"{name} ({', '.join(f'{wl[i]:.0f}' for i in idx)} nm)")
        ax.axis("off")
    ys, xs = np.nonzero(pix_mask) if pix_mask.any() else np.nonzero(np.ones_like(pix_mask))
    rng = np.random.default_rng(0)
    ax = axes[3]
    for k, j in enumerate(rng.choice(len(ys), size=min(n_spectra, len(ys)), replace=False)):
        (line,) = ax.plot(wl, x[:, ys[j], xs[j]], label=f"input ({ys[j]},{xs[j]})")
        ax.plot(wl, pred[:, ys[j], xs[j]], "--", color=line.get_color(), label="reconstruction" if k == 0 else None)
    ax.set_xlabel("wavelength (nm)")
    ax.set_ylabel("normalised value")
    ax.legend(fontsize=7)
    ax.set_title("masked pixels")
    fig.suptitle(title)
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | Path, dpi: int = 80) -> Path:
    """Lay out, write (parent folders made) and close a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def has_reconstruction(out: dict[str, Any]) -> bool:
    return isinstance(out.get("pred"), torch.Tensor) and isinstance(out.get("mask"), torch.Tensor)
