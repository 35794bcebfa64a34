"""Fusion decoder: low-resolution hyperspectral + high-resolution multispectral -> high-resolution
hyperspectral, at any set of target wavelengths.

Both inputs go through the same encoder (each with its own wavelengths); the LR-HS is first
upsampled bilinearly to the MS grid. The two token sets are fused, unpatchified to per-pixel
features by a pixel shuffle, refined with the MS image's detail, and a HyperLinear output layer
(weights generated from each target band's wavelength and FWHM, as SpecAware's decoder) gives a
residual added to the bilinear upsample.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def fourier_features(wavelengths_nm: torch.Tensor, n_freq: int = 16) -> torch.Tensor:
    """sin/cos of the wavelength (um) at log-spaced frequencies over 0.35-2.55 um: ``[..., 2 n_freq]``."""
    x = wavelengths_nm / 1000.0
    freqs = torch.logspace(math.log10(1 / 2.55), math.log10(1 / 0.01), n_freq, device=x.device)
    ang = 2 * math.pi * x[..., None] * freqs
    return torch.cat([ang.sin(), ang.cos()], -1)


class HyperLinear(nn.Module):
    """Per-band linear map whose weights come from a hypernetwork of (wavelength, FWHM).

    ``forward(feat [B, F, H, W], wavelengths [B, C], fwhm [B, C]) -> [B, C, H, W]``.
    """

    def __init__(self, in_features: int, hidden: int = 64, n_freq: int = 16) -> None:
        super().__init__()
        self.n_freq = n_freq
        self.in_features = in_features
        self.hyper = nn.Sequential(nn.Linear(2 * n_freq + 1, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                   nn.Linear(hidden, in_features + 1))
        nn.init.zeros_(self.hyper[-1].weight)  # the decoder starts as the bilinear upsample
        nn.init.zeros_(self.hyper[-1].bias)

    def forward(self, feat: torch.Tensor, wavelengths: torch.Tensor, fwhm: torch.Tensor) -> torch.Tensor:
        cond = torch.cat([fourier_features(wavelengths, self.n_freq), (fwhm / 100.0)[..., None]], -1)
        wb = self.hyper(cond)  # [B, C, F+1]
        w, b = wb[..., :-1] / math.sqrt(self.in_features), wb[..., -1]
        return torch.einsum("bfhw,bcf->bchw", feat, w) + b[..., None, None]


class HyperIn(nn.Module):
    """Per-band input projection whose weights come from (wavelength, FWHM): ``[B, C, H, W] -> [B, F, H, W]``
    for any band count (the spectral counterpart of HyperLinear, used for the images' pixel detail)."""

    def __init__(self, out_features: int, hidden: int = 64, n_freq: int = 16) -> None:
        super().__init__()
        self.n_freq = n_freq
        self.hyper = nn.Sequential(nn.Linear(2 * n_freq + 1, hidden), nn.GELU(), nn.Linear(hidden, out_features))

    def forward(self, x: torch.Tensor, wavelengths: torch.Tensor, fwhm: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        wl = torch.as_tensor(wavelengths, dtype=torch.float32, device=x.device).expand(b, -1)
        fw = torch.as_tensor(fwhm, dtype=torch.float32, device=x.device).expand(b, -1)
        w = self.hyper(torch.cat([fourier_features(wl, self.n_freq), (fw / 100.0)[..., None]], -1))
        return torch.einsum("bchw,bcf->bfhw", x, w) / math.sqrt(x.shape[1])


class FusionDecoder(nn.Module):
    def __init__(self, encoder: nn.Module, features: int = 32, ms_bands: int | None = None, hidden: int = 64) -> None:
        super().__init__()
        self.encoder = encoder
        d, p = encoder.embed_dim, encoder.patch_size
        self.fuse = nn.Sequential(nn.Linear(2 * d, d), nn.GELU())
        self.unpatch = nn.Sequential(nn.Conv2d(d, features * p * p, 1), nn.PixelShuffle(p))
        # Pixel detail of both images through wavelength-conditioned input projections (any band count).
        self.ms_in = HyperIn(features, hidden)
        self.hs_in = HyperIn(features, hidden)
        self.detail = nn.Sequential(nn.Conv2d(3 * features, features, 3, padding=1), nn.GELU(),
                                    nn.Conv2d(features, features, 3, padding=1), nn.GELU())
        self.out = HyperLinear(features, hidden)

    def forward(self, hs_lr: torch.Tensor, ms: torch.Tensor, hs_wl: torch.Tensor, hs_fwhm: torch.Tensor,
                ms_wl: torch.Tensor, ms_fwhm: torch.Tensor, hs_sensor=None, ms_sensor=None, level=None) -> torch.Tensor:
        """``hs_lr [B, Ch, h, w]`` and ``ms [B, Cm, H, W]`` (normalised) -> HR-HS ``[B, Ch, H, W]``."""
        b, _, H, W = ms.shape
        up = F.interpolate(hs_lr, size=(H, W), mode="bilinear", align_corners=False)
        frozen = getattr(self.encoder, "frozen", False)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            th = self.encoder(up, hs_wl, hs_fwhm, sensor=hs_sensor, level=level)
            tm = self.encoder(ms, ms_wl, ms_fwhm, sensor=ms_sensor, level=level)
        gh, gw = self.encoder.grid(H, W)
        t = self.fuse(torch.cat([th, tm], -1)).transpose(1, 2).reshape(b, -1, gh, gw)
        feat = self.unpatch(t)
        feat = self.detail(torch.cat([feat, self.ms_in(ms, ms_wl, ms_fwhm), self.hs_in(up, hs_wl, hs_fwhm)], 1))
        hs_wl = torch.as_tensor(hs_wl, dtype=torch.float32, device=ms.device).expand(b, -1)
        hs_fwhm = torch.as_tensor(hs_fwhm, dtype=torch.float32, device=ms.device).expand(b, -1)
        return up + self.out(feat, hs_wl, hs_fwhm)


# ------------------------------------------------------------------ Wald's protocol and baselines

def degrade(x: torch.Tensor, ratio: int) -> torch.Tensor:
    """Box-filter and decimate ``[B, C, H, W]`` by ``ratio`` (H, W cropped to multiples of it)."""
    h, w = (x.shape[-2] // ratio) * ratio, (x.shape[-1] // ratio) * ratio
    return F.avg_pool2d(x[..., :h, :w], ratio)


def _gauss_blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    r = max(1, int(round(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def baseline(hs_lr: torch.Tensor, size: tuple[int, int], kind: str) -> torch.Tensor:
    """Upsample ``[B, C, h, w]`` to ``size``: ``bilinear``, ``bicubic`` or ``unsharp`` (bilinear + unsharp mask)."""
    if kind == "bicubic":
        return F.interpolate(hs_lr, size=size, mode="bicubic", align_corners=False)
    up = F.interpolate(hs_lr, size=size, mode="bilinear", align_corners=False)
    if kind == "bilinear":
        return up
    if kind == "unsharp":
        return up + 1.0 * (up - _gauss_blur(up, 1.0))
    raise ValueError(f"unknown baseline {kind!r}; expected bilinear, bicubic or unsharp")
