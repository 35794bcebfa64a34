"""Losses: Charbonnier + spectral angle for masked reconstruction (SpecAware), latent loss for JEPA.

Reconstruction tensors are laid out ``[B, C, N, P]`` (bands on dim 1); ``weight [B, N, P]`` selects the
pixels that count (masked patches x valid pixels), or ``[B, C, N, P]`` per band (spectral masking scores
hidden bands of visible patches too). The losses are computed in fp32 outside any autocast region
(a bf16-autocast run's predictions are upcast first; see :func:`fp32_loss`). :func:`condition_decorrelation`
keeps the band conditions apart. ``band_mask [B, C]`` (a mixed batch's real bands, :mod:`pretrain.data.mixed`):
the bands that count, with either weight layout: padded bands add nothing to either term.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def fp32_loss(fn):
    """Run ``fn`` with autocast off on its tensors' device (its inputs are upcast to fp32 inside)."""

    @functools.wraps(fn)
    def wrapper(pred: torch.Tensor, *args, **kwargs):
        with torch.autocast(device_type=pred.device.type, enabled=False):
            return fn(pred, *args, **kwargs)

    return wrapper


def charbonnier(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                eps: float = 1e-3, band_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``sqrt((pred - target)^2 + eps^2) - eps`` over bands and weighted pixels (0 when equal);
    ``weight`` ``[B, N, P]`` (every band alike) or ``[B, C, N, P]`` (per band); ``band_mask [B, C]`` the real bands."""
    e = torch.sqrt((pred.float() - target.float()) ** 2 + eps * eps) - eps
    if band_mask is not None:  # weight [B,C,N,P]: each sample's real bands x its weighted pixels
        w = band_mask.float()[:, :, None, None].expand_as(e)
        if weight is not None:  # [B, N, P] every band alike, or [B, C, N, P] per band (spectral masking)
            w = w * (weight.float().expand_as(e) if weight.dim() == pred.dim()
                     else weight.float().expand(pred.shape[0], *pred.shape[2:]).unsqueeze(1))
        return (e * w).sum() / w.sum().clamp_min(1.0)
    if weight is None:
        return e.mean()
    if weight.dim() == pred.dim():
        w = weight.float().expand_as(e)
        return (e * w).sum() / w.sum().clamp_min(1.0)
    w = weight.float().expand(pred.shape[0], *pred.shape[2:]).unsqueeze(1)
    return (e * w).sum() / (w.sum() * pred.shape[1]).clamp_min(1.0)


def spectral_angle(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Angle (radians) between the spectra along dim 1, per pixel: ``[B, C, ...] -> [B, ...]``.

    Computed as ``2 atan2(|u - v|, |u + v|)`` of the unit spectra (stable near 0 and pi, exactly 0 for equal
    spectra, independent of each spectrum's scale)."""
    p, t = pred.float(), target.float()
    u = p / torch.sqrt((p * p).sum(1, keepdim=True) + eps)
    v = t / torch.sqrt((t * t).sum(1, keepdim=True) + eps)
    diff = torch.sqrt(((u - v) ** 2).sum(1) + eps * eps) - eps
    summ = torch.sqrt(((u + v) ** 2).sum(1) + eps * eps) - eps
    return 2.0 * torch.atan2(diff.clamp_min(0.0), summ.clamp_min(0.0))


def sam_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean spectral angle over weighted pixels."""
    a = spectral_angle(pred, target)
    if weight is None:
        return a.mean()
    w = weight.float().expand_as(a)
    return (a * w).sum() / w.sum().clamp_min(1.0)


@fp32_loss
def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                        charbonnier_weight: float = 1.0, sam_weight: float = 1.0,
                        eps: float = 1e-3, band_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``{"loss", "charbonnier", "sam"}``: weighted sum of Charbonnier and spectral-angle terms. With a per-band
    ``weight [B, C, N, P]`` the angle counts every pixel that has any weighted band; with ``band_mask [B, C]`` both
    terms see only each sample's real bands."""
    if band_mask is not None:  # the spectral angle of the real bands: padded entries 0 in both spectra
        keep = band_mask.to(pred.dtype)[:, :, None, None]
        pred, target = pred * keep, target * keep.to(target.dtype)
    ch = charbonnier(pred, target, weight, eps, band_mask)
    sa = sam_loss(pred, target, weight.amax(1) if weight is not None and weight.dim() == pred.dim() else weight)
    return {"loss": charbonnier_weight * ch + sam_weight * sa, "charbonnier": ch.detach(), "sam": sa.detach()}


@fp32_loss
def latent_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "smooth_l1") -> torch.Tensor:
    """JEPA loss between predicted tokens and (already normalised, detached) target tokens."""
    if kind == "mse":
        return F.mse_loss(pred.float(), target.float())
    return F.smooth_l1_loss(pred.float(), target.float())


def condition_decorrelation(cond: torch.Tensor, band_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over samples of the mean squared cosine similarity between the conditions ``cond [B, C, d]`` of two
    different bands: 1 when every band has the same condition (the collapse of issue 11), 1/d or so for
    unrelated ones, 0 for orthogonal ones. A loss term that keeps the hypernetwork's band weights apart.
    ``band_mask [B, C]`` (a mixed batch): only pairs of a sample's real bands count (a sample with fewer than two
    real bands adds 0), so the value of a sample does not depend on its company."""
    c = cond.shape[1]
    if c < 2:
        return cond.new_zeros(())
    u = F.normalize(cond.float(), dim=-1)
    g = u @ u.transpose(1, 2)
    if band_mask is None:
        off = (g * g).sum((1, 2)) - (g.diagonal(dim1=1, dim2=2) ** 2).sum(1)
        return (off / (c * (c - 1))).mean()
    m = band_mask.float()
    pair = m[:, :, None] * m[:, None, :]
    off = (g * g * pair).sum((1, 2)) - (g.diagonal(dim1=1, dim2=2) ** 2 * m).sum(1)
    n = m.sum(1)
    return (off / (n * (n - 1)).clamp_min(1.0)).mean()
