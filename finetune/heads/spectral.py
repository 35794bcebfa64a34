"""Band-conditioned layers of the heads: weights generated from each band's wavelength and FWHM, so one head
takes any band count and any band table (the heads' counterpart of the encoder's HyperEmbedding).

- :class:`HyperIn` ``[B, C, H, W] -> [B, F, H, W]``: per-pixel spectra to features;
- :class:`HyperLinear` ``[B, F, H, W] -> [B, C, H, W]``: features to every target band (zero-initialised, so a
  residual head starts as its base).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def fourier_features(wavelengths_nm: torch.Tensor, n_freq: int = 16) -> torch.Tensor:
    """sin/cos of the wavelength (um) at log-spaced frequencies over 0.35-2.55 um: ``[..., 2 n_freq]``."""
    x = wavelengths_nm / 1000.0
    freqs = torch.logspace(math.log10(1 / 2.55), math.log10(1 / 0.01), n_freq, device=x.device)
    ang = 2 * math.pi * x[..., None] * freqs
    return torch.cat([ang.sin(), ang.cos()], -1)


def band_condition(wavelengths, fwhm, batch: int, device, n_freq: int) -> torch.Tensor:
    """``[B, C, 2 n_freq + 1]``: Fourier features of the centres and the width (per 100 nm)."""
    wl = torch.as_tensor(wavelengths, dtype=torch.float32, device=device)
    fw = torch.as_tensor(fwhm, dtype=torch.float32, device=device)
    wl, fw = wl.expand(batch, -1) if wl.ndim == 1 else wl, fw.expand(batch, -1) if fw.ndim == 1 else fw
    return torch.cat([fourier_features(wl, n_freq), (fw / 100.0)[..., None]], -1)


class HyperIn(nn.Module):
    """Per-pixel spectra to ``out_features`` features, for any band table."""

    def __init__(self, out_features: int, hidden: int = 64, n_freq: int = 16) -> None:
        super().__init__()
        self.n_freq = n_freq
        self.hyper = nn.Sequential(nn.Linear(2 * n_freq + 1, hidden), nn.GELU(), nn.Linear(hidden, out_features))

    def forward(self, x: torch.Tensor, wavelengths, fwhm) -> torch.Tensor:
        w = self.hyper(band_condition(wavelengths, fwhm, x.shape[0], x.device, self.n_freq))  # [B, C, F]
        return torch.einsum("bchw,bcf->bfhw", x, w) / math.sqrt(x.shape[1])


class HyperLinear(nn.Module):
    """Features to every target band: ``forward(feat [B, F, H, W], wavelengths, fwhm) -> [B, C, H, W]``."""

    def __init__(self, in_features: int, hidden: int = 64, n_freq: int = 16) -> None:
        super().__init__()
        self.n_freq = n_freq
        self.in_features = in_features
        self.hyper = nn.Sequential(nn.Linear(2 * n_freq + 1, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                   nn.Linear(hidden, in_features + 1))
        nn.init.zeros_(self.hyper[-1].weight)  # a residual head starts as its base
        nn.init.zeros_(self.hyper[-1].bias)

    def forward(self, feat: torch.Tensor, wavelengths, fwhm) -> torch.Tensor:
        wb = self.hyper(band_condition(wavelengths, fwhm, feat.shape[0], feat.device, self.n_freq))  # [B, C, F+1]
        w, b = wb[..., :-1] / math.sqrt(self.in_features), wb[..., -1]
        return torch.einsum("bfhw,bcf->bchw", feat, w) + b[..., None, None]
