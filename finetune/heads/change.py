"""Siamese change-detection heads: both dates through the same encoder.

- :class:`SiameseChange` (``protocol: finetune``) classifies one pixel from bitemporal patches centred on it: a
  ``patch`` x ``patch`` neighbourhood (default 15) is resampled so that every ``token_patch`` x ``token_patch``
  block of pixels (default 3) becomes one token of the encoder (whose own patch size is fixed by the export).
  Difference features (mean and mean-absolute token difference, the centre token's difference, and both dates'
  pooled tokens) go through an MLP to two logits (unchanged, changed).
- :class:`SiameseUperNet` (``protocol: pangaea``) maps a whole window: PANGAEA's Siamese UPerNet
  (``pangaea/decoders/upernet.py`` ``SiamConcUPerNet`` / ``SiamDiffUPerNet``; :mod:`finetune.tasks.pangaea`) --
  the four layers' features of both dates merged per level, ``cat(f1, f2)`` ("concat") or ``f2 - f1``
  ("diff"), then the UPerNet pyramid (:class:`finetune.heads.upernet.UperNet`) to a per-pixel change map.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_prep.configtree import ConfigError
from data_prep.errors import UserError
from finetune.heads.upernet import UperNet


class SiameseChange(nn.Module):
    def __init__(self, encoder: nn.Module, patch: int = 15, token_patch: int = 3, hidden: int = 128) -> None:
        super().__init__()
        if patch % token_patch:
            raise ConfigError(f"patch {patch} must be a multiple of token_patch {token_patch}")
        self.encoder = encoder
        self.patch = patch
        self.token_patch = token_patch
        self.grid = patch // token_patch
        d = encoder.embed_dim
        self.mlp = nn.Sequential(nn.Linear(5 * d, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, 2))

    def _encode(self, x: torch.Tensor, wavelengths, fwhm, sensor, level) -> torch.Tensor:
        size = self.grid * self.encoder.patch_size
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="nearest")
        return self.encoder(x, wavelengths, fwhm, sensor=sensor, level=level)

    def forward(self, t1: torch.Tensor, t2: torch.Tensor, wavelengths: torch.Tensor, fwhm: torch.Tensor,
                sensor=None, level=None) -> torch.Tensor:
        """``t1``, ``t2``: ``[B, C, patch, patch]``; logits ``[B, 2]``."""
        frozen = getattr(self.encoder, "frozen", False)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            a = self._encode(t1, wavelengths, fwhm, sensor, level)
            b = self._encode(t2, wavelengths, fwhm, sensor, level)
        d = a - b
        centre = (self.grid // 2) * self.grid + self.grid // 2
        feats = torch.cat([d.mean(1), d.abs().mean(1), d[:, centre], a.mean(1), b.mean(1)], 1)
        return self.mlp(feats)


class SiameseUperNet(UperNet):
    """Change map ``[B, n_classes, H, W]`` of two co-registered dates ``[B, C, H, W]`` (PANGAEA's Siamese UPerNet)."""

    def __init__(self, encoder: nn.Module, n_classes: int = 2, layers=None, channels: int = 512,
                 strategy: str = "concat", dropout: float = 0.1) -> None:
        if strategy not in ("concat", "diff"):
            raise ConfigError(f"head.strategy of the Siamese UPerNet is {strategy!r}; expected 'concat' (cat(f1, f2), "
                              "PANGAEA's seg_siamupernet_conc) or 'diff' (f2 - f1, seg_siamupernet_diff)")
        super().__init__(encoder, n_classes, layers=layers, channels=channels, pixel_skip=False,
                         feature_multiplier=2 if strategy == "concat" else 1, dropout=dropout)
        self.strategy = strategy

    def forward(self, t1: torch.Tensor, t2: torch.Tensor, wavelengths: torch.Tensor, fwhm: torch.Tensor,
                sensor=None, level=None) -> torch.Tensor:
        f1 = self.encode(t1, wavelengths, fwhm, sensor, level)
        f2 = self.encode(t2, wavelengths, fwhm, sensor, level)
        merged = ([torch.cat([a, b], 1) for a, b in zip(f1, f2)] if self.strategy == "concat"
                  else [b - a for a, b in zip(f1, f2)])
        return self.decode(merged, t1.shape[-2:])


def extract_patches(image: torch.Tensor, rows: np.ndarray, cols: np.ndarray, patch: int) -> torch.Tensor:
    """``[len(rows), C, patch, patch]`` neighbourhoods of ``image [C, H, W]`` (reflect-padded at edges)."""
    r = patch // 2
    padded = F.pad(image[None], (r, r, r, r), mode="reflect")[0]
    return torch.stack([padded[:, y:y + patch, x:x + patch] for y, x in zip(rows.tolist(), cols.tolist())])


def balanced_split(change: np.ndarray, n_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices: ``n_per_class`` changed and ``n_per_class`` unchanged pixels drawn at random for
    training (fewer if a class has fewer), and every other labelled pixel (change >= 0) for testing."""
    flat = np.asarray(change).reshape(-1)
    rng = np.random.default_rng(seed)
    train = []
    for cls in (1, 0):
        idx = np.flatnonzero(flat == cls)
        if idx.size == 0:
            raise UserError(f"the change map has no {'changed' if cls else 'unchanged'} pixels; need both")
        take = min(n_per_class, max(1, idx.size // 2))
        train.append(rng.choice(idx, size=take, replace=False))
    train_idx = np.concatenate(train)
    mask = np.zeros(flat.size, bool)
    mask[train_idx] = True
    test_idx = np.flatnonzero((flat >= 0) & ~mask)
    return rng.permutation(train_idx), test_idx
