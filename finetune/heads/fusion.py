"""Fusion decoder: low-resolution hyperspectral + high-resolution multispectral -> high-resolution hyperspectral,
at any band tables (all layers band-conditioned: ``finetune.heads.spectral``).

Guided mixing of the low-resolution neighbours. Each output spectrum is a weighted mix of the ``window x window``
low-resolution spectra around it, times one brightness gain per pixel:

    out(p) = (1 + g(p)) * sum_k (w0(p, k) + d(p, k) + b(p) (w_bilinear(p, k) - w0(p, k))) * hs_lr(k)

``w0`` (``head.start: unmix``, the default) is a training-free unmixing (:func:`unmix`): the neighbours' weights
whose mix, seen through the multispectral bands (each a Gaussian response over the hyperspectral bands, one gain
per band fitted on the low-resolution grid, of the whole scene in the fusion task; a band the fit does not explain
is left out), best matches the pixel's
multispectral spectrum, by ridge regression toward bilinear upsampling's weights. The correction ``d``, the share
``b`` of the way back to bilinear weights and the gain ``g`` come from a zero-initialised layer, so the untrained
decoder is that unmixing (:func:`unmix_fuse`, also
the fusion task's ``unmix`` baseline); training steers them with the multispectral image (its per-pixel features,
its detail relative to its own low-pass, HPM-style), the unmixing's multispectral residual, and both images'
encoder tokens pixel-shuffled to full resolution. The outputs stay mixes of observed spectra with a per-pixel
scale, which keeps the spectral angle; the unmixing's weights may leave [0, 1] (a material below the
low-resolution pixel is an extrapolation of its neighbours). ``head.start: bilinear`` is the earlier decoder: a
convex mix, ``softmax(log w_bilinear + d)``, starting as bilinear upsampling.

Measured (the synthetic suite's EMIT + PlanetScope pair, ratio 3, demo export, 150 steps, 5 seeds; nodata filled
with the nearest valid pixel; gains fitted on the whole scene): PSNR 44.08 +/- 0.09 dB, SAM 0.93 deg with the
pretrained encoder; the unmixing alone 44.39 / 0.95 (training keeps its PSNR within 0.3 dB and gains 0.02 deg of
SAM, at any learning rate, SAM weight or step count tried); bicubic 31.44 / 1.46, bilinear 29.82 / 1.63. With each
tile's own gains the unmixing scored 43.09 (42.79 without leaving out the unexplained bands). The share ``b`` is
for a misregistered multispectral image, which misleads the unmixing (the same pair with the multispectral image
shifted by 1/3 of a low-resolution pixel: unmixing 27.51 dB, below bicubic; trained, 3 seeds without the encoder:
30.97 with ``b``, 28.73 without (1 seed), the convex decoder 31.58; shifted by 2/3: 30.94, 24.09, 31.49; it costs
0.28 dB registered: 44.04 +/- 0.05 against 44.32 +/- 0.05). The convex start reached 30.54 dB / 1.30 deg (against
26.98 for bicubic with the nodata filled by band means, which cost every method near nodata: bicubic 31.9 vs 27.5
dB on the whole pair): its guide never learned from the multispectral pixels what the unmixing solves for in
closed form (the best mix of the 3 x 3 neighbours, by NNLS against the reference, scores ~47 dB). Before it, a free
per-band residual (PanNet-style) gained PSNR but lost SAM to bilinear, and so did a learned share of bicubic's
sharpening (SAM 14 deg).
What the encoder branch adds (``use_encoder: false`` drops it; the fusion task reports that decoder as its
``no_encoder`` baseline): on the synthetic suite nothing (44.08 +/- 0.09 pretrained, 43.93 +/- 0.10 random, 44.04
+/- 0.05 without; frozen encoders, 3 seeds, per-tile gains, no ``b``: 43.31 +/- 0.05, 43.36 +/- 0.08, 43.36 +/-
0.03). Its
tokens are one per patch (8 x 8 pixels of a 24-pixel tile with the debug encoder) while the decoder chooses per
pixel. Tried with the convex start and not kept (each level with either encoder):
zero-initialising the branch's projection; freezing the encoder; each pixel's spectrum as a one-token image
through the frozen encoder, its token feeding the guide and a dot-product attention between a high-resolution
pixel and its neighbours (31.12 +/- 0.05 dB pretrained, 31.15 +/- 0.08 random, 5x the time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from data_prep.configtree import ConfigError
from data_prep.simulate.srf import FWHM_TO_SIGMA
from finetune.heads.spectral import HyperIn

BASES = ("bicubic", "bilinear")
"""Plain upsampling baselines."""
STARTS = ("unmix", "bilinear")
"""What the untrained decoder is (``head.start``): :func:`unmix_fuse`, or bilinear upsampling."""
WINDOW = 3
"""Low-resolution neighbours mixed per high-resolution pixel: ``WINDOW x WINDOW`` (``head.window``)."""
RIDGE = 0.01
"""Ridge of :func:`unmix`, relative to the mean diagonal of ``A^T A`` (``head.ridge``)."""
FIT_MIN = 0.8
"""A multispectral band takes part in :func:`unmix` where the hyperspectral bands resampled to it explain this
share (R^2) of its variance over the low-resolution pixels of the image."""


class FusionDecoder(nn.Module):
    def __init__(self, encoder: nn.Module | None, features: int = 32, hidden: int = 64, window: int = WINDOW,
                 use_encoder: bool = True, start: str = "unmix", ridge: float = RIDGE) -> None:
        super().__init__()
        if window % 2 == 0 or window < 1:
            raise ConfigError(f"head.window of the fusion decoder must be odd and >= 1, got {window}")
        if start not in STARTS:
            raise ConfigError(f"head.start of the fusion decoder must be one of {', '.join(STARTS)}, got {start!r}")
        if not ridge > 0:
            raise ConfigError(f"head.ridge of the fusion decoder must be > 0, got {ridge}")
        if use_encoder and encoder is None:
            raise ConfigError("the fusion decoder needs an encoder unless head.use_encoder is false")
        # without the encoder branch the decoder holds no encoder (the task's no-encoder baseline)
        self.encoder = encoder if use_encoder else None
        self.window, self.use_encoder, self.start, self.ridge = window, use_encoder, start, float(ridge)
        n_in = 4 if start == "unmix" else 3
        if use_encoder:
            d, p = encoder.embed_dim, encoder.patch_size
            self.fuse = nn.Sequential(nn.Linear(2 * d, d), nn.GELU())
            self.unpatch = nn.Sequential(nn.Conv2d(d, features * p * p, 1), nn.PixelShuffle(p))
            n_in += 1
        self.ms_in, self.hs_in, self.rel_in = HyperIn(features, hidden), HyperIn(features, hidden), \
            HyperIn(features, hidden)
        if start == "unmix":
            self.res_in = HyperIn(features, hidden)  # where the unmixing misses the multispectral pixel
        self.guide = nn.Sequential(nn.Conv2d(n_in * features, features, 3, padding=1), nn.GELU(),
                                   nn.Conv2d(features, features, 3, padding=1), nn.GELU(),
                                   nn.Conv2d(features, window * window + (2 if start == "unmix" else 1), 1))
        nn.init.zeros_(self.guide[-1].weight)  # starts as its `start` (the unmixing, or bilinear upsampling)
        nn.init.zeros_(self.guide[-1].bias)

    def forward(self, hs_lr: torch.Tensor, ms: torch.Tensor, hs_wl: torch.Tensor, hs_fwhm: torch.Tensor,
                ms_wl: torch.Tensor, ms_fwhm: torch.Tensor, hs_sensor=None, ms_sensor=None, level=None,
                hs_norm: tuple[torch.Tensor, torch.Tensor] | None = None,
                ms_norm: tuple[torch.Tensor, torch.Tensor] | None = None, halo: int = 0,
                ms_gain: torch.Tensor | None = None) -> torch.Tensor:
        """``hs_lr [B, Ch, h, w]`` and ``ms [B, Cm, H, W]`` (H = r h) in their physical units -> HR-HS
        ``[B, Ch, H, W]`` in the same units. ``hs_norm`` / ``ms_norm``: per-band ``(mean, std)`` ``[C]`` that
        standardise each image for the encoder, as pretraining did (default: the batch's own). ``halo``: ``hs_lr``
        carries that many more low-resolution pixels on each side than ``ms`` covers (``[B, Ch, h + 2 halo, ...]``),
        the real neighbours of the tile's edge pixels (without, the edge is replicated). ``ms_gain``: per-band gain
        of the unmixing (:func:`band_gains` of the whole scene; default: fitted on each input)."""
        b, _, H, W = ms.shape
        full, hs_lr = hs_lr, _core(hs_lr, halo)
        r = H // hs_lr.shape[-2]
        hm, hsd = _norm(hs_lr, hs_norm)
        mm, msd = _norm(ms, ms_norm)
        up = upsample(hs_lr, (H, W), "bilinear")
        ms_low = F.interpolate(F.avg_pool2d(ms, r), size=(H, W), mode="bilinear", align_corners=False)
        rel = (ms - ms_low) / (ms_low.abs() + 0.1 * mm.abs().clamp(min=1e-6))  # relative MS detail
        zu, zm = (up - hm) / hsd, (ms - mm) / msd
        feats = [self.ms_in(zm, ms_wl, ms_fwhm), self.hs_in(zu, hs_wl, hs_fwhm), self.rel_in(rel, ms_wl, ms_fwhm)]
        if self.use_encoder:
            frozen = getattr(self.encoder, "frozen", False)
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                th = self.encoder(zu, hs_wl, hs_fwhm, sensor=hs_sensor, level=level)
                tm = self.encoder(zm, ms_wl, ms_fwhm, sensor=ms_sensor, level=level)
            gh, gw = self.encoder.grid(H, W)
            feats.append(self.unpatch(self.fuse(torch.cat([th, tm], -1)).transpose(1, 2).reshape(b, -1, gh, gw)))
        if self.start == "unmix":
            wts, res = unmix(full, ms, hs_wl, hs_fwhm, ms_wl, ms_fwhm, self.window, self.ridge, msd, halo, ms_gain)
            feats.append(self.res_in(res / msd, ms_wl, ms_fwhm))
            g = self.guide(torch.cat(feats, 1))
            k = self.window * self.window
            # d, then a per-pixel share of the way back to bilinear weights (0 at the start): where the
            # multispectral image misleads the unmixing (misregistration), training can fall back on upsampling
            w_bil = bilinear_log_weights(r, hs_lr.shape[-2:], self.window, ms.device, floor=0.0, clamp=not halo).exp()
            wts = wts + g[:, :k] + g[:, k:k + 1] * (w_bil - wts)
        else:
            g = self.guide(torch.cat(feats, 1))
            wts = (bilinear_log_weights(r, hs_lr.shape[-2:], self.window, ms.device, clamp=not halo)
                   + g[:, :-1]).softmax(1)
        out = (neighbours(full, r, self.window, halo) * wts[:, None]).sum(2)
        return out * (1 + g[:, -1:])  # one brightness gain per pixel: the spectral angle is kept


def synth_matrix(hs_wl: torch.Tensor, hs_fwhm: torch.Tensor, ms_wl: torch.Tensor, ms_fwhm: torch.Tensor) -> torch.Tensor:
    """``[Cm, Ch]``: each multispectral band as a row-normalised Gaussian mix of the hyperspectral bands (the width
    of both bands' responses); a row is zero where the band's centre lies outside the hyperspectral range (its
    first band's centre minus its FWHM to its last's plus its FWHM), so such a band plays no part in the unmixing."""
    sig = torch.sqrt(ms_fwhm[:, None] ** 2 + hs_fwhm[None] ** 2) * FWHM_TO_SIGMA
    w = torch.exp(-0.5 * ((hs_wl[None] - ms_wl[:, None]) / sig) ** 2)
    lo, hi = hs_wl.min() - hs_fwhm[hs_wl.argmin()], hs_wl.max() + hs_fwhm[hs_wl.argmax()]
    covered = (ms_wl >= lo) & (ms_wl <= hi)
    return torch.where(covered[:, None], w / w.sum(1, keepdim=True).clamp(min=1e-30), torch.zeros_like(w))


def unmix(hs_lr: torch.Tensor, ms: torch.Tensor, hs_wl, hs_fwhm, ms_wl, ms_fwhm, window: int = WINDOW,
          ridge: float = RIDGE, ms_scale: torch.Tensor | None = None, halo: int = 0,
          gain: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per high-resolution pixel, the weights of its ``window x window`` low-resolution neighbours (as
    :func:`neighbours` orders them) whose mix, seen through the multispectral bands, best matches its
    multispectral spectrum: ridge regression toward the bilinear weights,

        w(p) = w_bilinear(p) + (A^T A + ridge * tr(A^T A) / k I)^-1 A^T (m(p) - A w_bilinear(p)),

    ``A [Cm, k]`` the neighbours' spectra resampled to the multispectral bands (:func:`synth_matrix`) times one gain
    per band (``gain [Cm]``, e.g. :func:`band_gains` of the whole scene; default: fitted on each image's
    low-resolution grid, noisier on a small tile), ``m(p)`` the pixel's multispectral spectrum,
    both over ``ms_scale`` per band (default: the batch's std). Returns ``(weights [B, k, H, W], residual
    [B, Cm, H, W] = m - A w)``. Weights are not bound to [0, 1]: a mix may extrapolate beyond its neighbours
    (a material below the low-resolution pixel), which a convex mix cannot. A band outside the hyperspectral range
    (:func:`synth_matrix`) or explained by less than :data:`FIT_MIN` of its variance plays no part (its row of ``A``
    and ``m`` zero); without any the weights are bilinear upsampling's. ``halo``: as the decoder's."""
    b, cm, H, W = ms.shape
    core = _core(hs_lr, halo)
    r = H // core.shape[-2]
    S = synth_matrix(*(torch.as_tensor(t, dtype=ms.dtype, device=ms.device) for t in (hs_wl, hs_fwhm, ms_wl, ms_fwhm)))
    syn = torch.einsum("mc,bchw->bmhw", S, hs_lr)
    syn_core = _core(syn, halo)
    ms_lr = F.avg_pool2d(ms, r)
    if gain is None:
        gain = _gains(syn_core, ms_lr, (2, 3))
    else:
        gain = torch.as_tensor(gain, dtype=ms.dtype, device=ms.device).reshape(1, cm, 1, 1)
    # a band the hyperspectral bands do not explain on the low-resolution grid (R^2 of the fit under FIT_MIN: another
    # response, date or registration) plays no part: a wrong band steers the mix worse than none
    dev = ms_lr - ms_lr.mean((2, 3), keepdim=True)
    fit = 1 - ((ms_lr - gain * syn_core) ** 2).sum((2, 3), keepdim=True) / (dev * dev).sum((2, 3), keepdim=True).clamp(
        min=1e-30)
    gain = torch.where(fit >= FIT_MIN, gain, torch.zeros_like(gain))
    if ms_scale is None:
        ms_scale = ms.std((0, 2, 3), keepdim=True)
    s = ms_scale.reshape(1, cm, 1, 1).clamp(min=1e-12)
    A = neighbours(syn * gain / s, r, window, halo).permute(0, 3, 4, 1, 2)   # [B, H, W, Cm, k]
    m = (ms / s * (gain != 0)).permute(0, 2, 3, 1)[..., None]               # [B, H, W, Cm, 1]
    w0 = bilinear_log_weights(r, core.shape[-2:], window, ms.device, floor=0.0, clamp=not halo).exp()
    w0 = w0.permute(0, 2, 3, 1)[..., None].expand(b, H, W, -1, 1)            # [B, H, W, k, 1]
    k = window * window
    ata = A.transpose(-1, -2) @ A
    lam = ridge * ata.diagonal(dim1=-2, dim2=-1).sum(-1).clamp(min=1e-12)[..., None, None] / k
    res0 = m - A @ w0
    w = w0 + torch.linalg.solve(ata + lam * torch.eye(k, dtype=ms.dtype, device=ms.device), A.transpose(-1, -2) @ res0)
    res = (m - A @ w)[..., 0] * s.reshape(1, 1, 1, cm)
    return w[..., 0].permute(0, 3, 1, 2), res.permute(0, 3, 1, 2)


def unmix_fuse(hs_lr: torch.Tensor, ms: torch.Tensor, hs_wl, hs_fwhm, ms_wl, ms_fwhm, hs_sensor=None, ms_sensor=None,
               level=None, hs_norm=None, ms_norm=None, halo: int = 0, ms_gain=None, *, window: int = WINDOW,
               ridge: float = RIDGE) -> torch.Tensor:
    """The training-free baseline, called as the decoder is: the low-resolution neighbours mixed by :func:`unmix`'s
    weights (``ms_norm``: per-band ``(mean, std)``, the std scales the bands; ``ms_gain``: :func:`unmix`'s ``gain``;
    sensors and level unused)."""
    r = ms.shape[-2] // _core(hs_lr, halo).shape[-2]
    scale = None if ms_norm is None else _norm(ms, ms_norm)[1]
    w, _ = unmix(hs_lr, ms, hs_wl, hs_fwhm, ms_wl, ms_fwhm, window, ridge, scale, halo, ms_gain)
    return (neighbours(hs_lr, r, window, halo) * w[:, None]).sum(2)


def band_gains(hs_lr: torch.Tensor, ms: torch.Tensor, hs_wl, hs_fwhm, ms_wl, ms_fwhm,
               valid: torch.Tensor | None = None) -> torch.Tensor:
    """``[Cm]``: per multispectral band, the least-squares gain from the hyperspectral image resampled to it
    (:func:`synth_matrix`) to the multispectral image averaged to the hyperspectral grid, over the ``valid [h, w]``
    low-resolution pixels of ``hs_lr [Ch, h, w]`` and ``ms [Cm, r h, r w]`` (a whole scene: :func:`unmix`'s
    ``gain``)."""
    S = synth_matrix(*(torch.as_tensor(t, dtype=ms.dtype, device=ms.device) for t in (hs_wl, hs_fwhm, ms_wl, ms_fwhm)))
    syn = torch.einsum("mc,chw->mhw", S, hs_lr)
    ms_lr = F.avg_pool2d(ms[None], ms.shape[-2] // hs_lr.shape[-2])[0]
    if valid is not None:
        syn, ms_lr = syn[:, valid], ms_lr[:, valid]
    return _gains(syn.reshape(syn.shape[0], -1), ms_lr.reshape(ms_lr.shape[0], -1), (1,)).flatten()


def _gains(syn: torch.Tensor, ms_lr: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return (ms_lr * syn).sum(dims, keepdim=True) / (syn * syn).sum(dims, keepdim=True).clamp(min=1e-30)


def _core(x: torch.Tensor, halo: int) -> torch.Tensor:
    """``x [..., h, w]`` without ``halo`` pixels on each side."""
    if halo < 0:
        raise ValueError(f"halo must be >= 0, got {halo}")
    return x[..., halo:x.shape[-2] - halo, halo:x.shape[-1] - halo] if halo else x


def neighbours(x: torch.Tensor, r: int, window: int, halo: int = 0) -> torch.Tensor:
    """``[B, C, window^2, r h, r w]``: for each high-resolution pixel, the ``window x window`` low-resolution
    pixels around the one it lies in (index ``i window + j``: row offset ``i - window // 2``, column offset ``j -
    window // 2``). ``x`` carries ``halo`` pixels beyond the ``h x w`` it serves on each side; where that is less
    than ``window // 2`` the edge is replicated."""
    k = window // 2
    pad = _core(x, halo - k) if halo >= k else F.pad(x, (k - halo,) * 4, mode="replicate")
    h, w = pad.shape[-2] - 2 * k, pad.shape[-1] - 2 * k
    nb = torch.stack([pad[:, :, i:i + h, j:j + w] for i in range(window) for j in range(window)], 2)
    return nb.repeat_interleave(r, -2).repeat_interleave(r, -1)


def bilinear_log_weights(r: int, lr_size: tuple[int, int], window: int, device, floor: float = 1e-4,
                         clamp: bool = True) -> torch.Tensor:
    """``[1, window^2, r h, r w]``: log of the weights bilinear upsampling (half-pixel centres) gives each of
    :func:`neighbours`' low-resolution pixels, plus ``floor``; ``clamp``: at the edges as ``F.interpolate`` does
    (the image ends there), else as inside a larger image (a tile with a halo)."""
    k = window // 2

    def axis(n: int) -> torch.Tensor:  # [window, r n]
        pos = (torch.arange(r * n, dtype=torch.float32, device=device) + 0.5) / r - 0.5
        if clamp:
            pos = pos.clamp(0, n - 1)
        base = torch.div(torch.arange(r * n, device=device), r, rounding_mode="floor")
        off = pos - base  # in (-0.5, 0.5]
        taps = torch.arange(-k, k + 1, dtype=torch.float32, device=device)[:, None]
        wts = (1 - (off[None] - taps).abs()).clamp(min=0)
        return wts / wts.sum(0, keepdim=True)

    wy, wx = axis(lr_size[0]), axis(lr_size[1])
    w2 = (wy[:, None, :, None] * wx[None, :, None, :]).reshape(1, window * window, r * lr_size[0], r * lr_size[1])
    return torch.log(w2 + floor)


def _norm(x: torch.Tensor, norm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` as ``[1, C, 1, 1]``: the given ones, else the batch's own per band."""
    if norm is None:
        return x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True).clamp(min=1e-6)
    m, s = (torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1) for t in norm)
    return m, s.clamp(min=1e-6)


def upsample(x: torch.Tensor, size: tuple[int, int], kind: str = "bilinear") -> torch.Tensor:
    """``[B, C, h, w]`` to ``size`` by ``bilinear`` or ``bicubic`` interpolation (half-pixel centres)."""
    return F.interpolate(x, size=size, mode=kind, align_corners=False)


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
    if kind in BASES:
        return upsample(hs_lr, size, kind)
    up = upsample(hs_lr, size, "bilinear")
    if kind == "unsharp":
        return up + 1.0 * (up - _gauss_blur(up, 1.0))
    raise ValueError(f"unknown baseline {kind!r}; expected bilinear, bicubic or unsharp")
