"""Conditioning of each band: meta encoder (wavelength, FWHM, sensor and level text) and content encoder.

The result is one vector per band per sample, ``cond [B, C, cond_dim]``, that the hypernetworks turn into
that band's patch-embedding weights. Nothing here depends on the number or the order of bands: every
band is encoded alike and the spectral transformer has no band positions, so permuting bands (with their
wavelengths and FWHM) permutes the conditions.

Mixed batches (``band_mask [B, C]``, True = a real band; see :mod:`pretrain.data.mixed`): every layer here is
per band except the spectral transformer, which attends only to real bands, so a real band's condition does not
depend on the padded bands next to it (nor on how many there are).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs, ModelError
from .layers import Block, gather_patches, log_spaced_periods
from .text import embed_texts, level_text, sensor_text
from .vocab import Vocabulary

FWHM_REF_NM = 10.0
FWHM_LOG_SCALE = 1.5  # log(2.5 nm / 10 nm) = -0.92 and log(180 nm / 10 nm) = 1.93 after scaling: well inside


class ContentEncoder(nn.Module):
    """Per-band image statistics: average and max pooling over each patch-sized cell, an MLP per cell, and
    the (weighted) mean over cells, so any image size works and no layer's width is the token count."""

    def __init__(self, patch_size: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.p = patch_size
        self.fc1 = nn.Linear(2, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, pixels: torch.Tensor, valid: torch.Tensor | None = None,
                cell_weight: torch.Tensor | None = None, cells: torch.Tensor | None = None,
                patches: torch.Tensor | None = None) -> torch.Tensor:
        """pixels ``[B,C,H,W]``, valid ``[B,H,W]`` bool, cell_weight ``[B,N]`` (e.g. MAE's visible cells).

        ``cells [B,n]`` (cell indices, row-major): only those cells are pooled and go through the MLP, with
        ``cell_weight`` read at them: the same result as weighting every other cell 0 (an MAE's masked cells),
        at n/N of the cost (measured, one thread, batch 8 x 100 bands x 128 px, 64 of 256 cells: forward+backward
        0.24 s -> 0.05 s, of a ~9.5 s ViT-B MAE step). ``patches``: those cells' pixels ``[B,C,n,p*p]``
        (:func:`~pretrain.models.layers.gather_patches`) when the caller has them already."""
        if cells is not None:
            return self._cells(pixels, valid, cell_weight, cells, patches)
        p = self.p
        b, c = pixels.shape[:2]
        if valid is None:
            avg = F.avg_pool2d(pixels, p)
            mx = F.max_pool2d(pixels, p)
            w = None
        else:
            v = valid.to(pixels.dtype).unsqueeze(1)
            frac = F.avg_pool2d(v, p)  # [B,1,h,w]
            avg = F.avg_pool2d(pixels * v, p) / frac.clamp_min(1e-6)
            mx = F.max_pool2d(pixels.masked_fill(v == 0, float("-inf")), p)
            mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
            w = frac.flatten(1)  # [B,N]
        if cell_weight is not None:
            w = cell_weight.to(pixels.dtype) if w is None else w * cell_weight.to(pixels.dtype)
        return self._mlp(avg.flatten(2), mx.flatten(2), w)

    def _cells(self, pixels: torch.Tensor, valid: torch.Tensor | None, cell_weight: torch.Tensor | None,
               cells: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        """The statistics of the cells ``cells [B,n]`` only (see :meth:`forward`)."""
        p = self.p
        x = gather_patches(pixels, cells, p) if patches is None else patches  # [B,C,n,P]
        w = None
        if valid is None:
            avg, mx = x.mean(-1), x.amax(-1)
        else:
            vf = gather_patches(valid.unsqueeze(1).to(pixels.dtype), cells, p)  # [B,1,n,P]
            frac = vf.mean(-1)  # [B,1,n]
            avg = (x * vf).mean(-1) / frac.clamp_min(1e-6)
            mx = x.masked_fill(vf == 0, float("-inf")).amax(-1)
            mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
            w = frac[:, 0]
        if cell_weight is not None:
            cw = torch.gather(cell_weight.to(pixels.dtype), 1, cells)
            w = cw if w is None else w * cw
        return self._mlp(avg, mx, w)

    def _mlp(self, avg: torch.Tensor, mx: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        """Per-cell statistics ``[B,C,n]`` (average, max) and cell weights ``[B,n]`` -> ``[B,C,out]``."""
        feats = torch.stack([avg, mx], dim=-1)  # [B,C,n,2]
        h = F.gelu(self.fc1(feats))  # [B,C,n,hidden]
        if w is None:
            h = h.mean(2)
        else:
            w = w / w.sum(1, keepdim=True).clamp_min(1e-6)
            h = torch.einsum("bcnk,bn->bck", h, w)
        return self.fc2(h)  # [B,C,out]


class CrossFusion(nn.Module):
    """Each band token attends to its own context tokens [sensor, level, content] (cross-modal fusion)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, band: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """band ``[B,C,d]``, ctx ``[B,C,K,d]`` -> ``[B,C,d]``."""
        b, c, d = band.shape
        k_ = ctx.shape[2]
        hd = d // self.heads
        q = self.q(self.norm_q(band)).view(b * c, 1, self.heads, hd).transpose(1, 2)
        kv = self.kv(self.norm_kv(ctx)).view(b * c, k_, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, kv[0], kv[1])  # [BC,h,1,hd]
        band = band + self.proj(y.transpose(1, 2).reshape(b, c, d))
        return band + self.mlp(self.norm2(band))


class MetaEncoder(nn.Module):
    """Band condition from wavelength (Fourier features), FWHM (MLP of normalised log FWHM), frozen MiniLM
    embeddings of the sensor name and processing level, and the content vector; fused by cross-attention,
    then a small transformer across bands.

    The text embeddings live in buffers (``sensor_text``, ``level_text``), one row per name of the
    vocabulary the encoder owns (:class:`~pretrain.models.vocab.Vocabulary`); index 0 of each is "unknown"
    and uses a learned embedding instead. :meth:`append_sensor` adds a row for a new name.
    """

    def __init__(self, args: ModelArgs, vocab: Vocabulary, compute_text: bool = True) -> None:
        super().__init__()
        d = args.cond_dim
        self.n_freq = args.n_freq
        self.wl_proj = nn.Linear(2 * args.n_freq + 1, d)
        self.fwhm_mlp = nn.Sequential(nn.Linear(1, d), nn.GELU(), nn.Linear(d, d))
        st = torch.zeros(len(vocab.sensors), args.text_dim)
        lt = torch.zeros(len(vocab.levels), args.text_dim)
        if compute_text:
            if len(vocab.sensors) > 1:
                st[1:] = embed_texts([sensor_text(n) for n in vocab.sensors[1:]])
            if len(vocab.levels) > 1:
                lt[1:] = embed_texts([level_text(n) for n in vocab.levels[1:]])
        self.register_buffer("sensor_text", st)
        self.register_buffer("level_text", lt)
        self.sensor_proj = nn.Linear(args.text_dim, d)
        self.level_proj = nn.Linear(args.text_dim, d)
        self.sensor_unknown = nn.Parameter(torch.zeros(d))
        self.level_unknown = nn.Parameter(torch.zeros(d))
        self.fusion = CrossFusion(d, args.cond_heads)
        self.spectral = nn.ModuleList(Block(d, args.cond_heads, 2.0) for _ in range(args.spectral_depth))
        self.norm = nn.LayerNorm(d)

    def reset_parameters(self) -> None:
        """This module's own parameters (the learned 'unknown' embeddings start at zero)."""
        nn.init.zeros_(self.sensor_unknown)
        nn.init.zeros_(self.level_unknown)

    def append_sensor(self, name: str, text: str | None = None) -> None:
        """Append the MiniLM embedding (cached) of ``text`` (default: the name's registry display name)."""
        emb = embed_texts([text or sensor_text(name)]).to(self.sensor_text)
        self.sensor_text = torch.cat([self.sensor_text, emb], 0)

    # forward ----------------------------------------------------------------------------------------------
    def _lookup(self, idx: torch.Tensor | None, table: torch.Tensor, proj: nn.Linear, unknown: torch.Tensor,
                b: int, what: str) -> torch.Tensor:
        if idx is None:
            return unknown.expand(b, -1)
        idx = torch.as_tensor(idx, device=table.device).long().reshape(-1)
        if idx.numel() != b:
            raise ModelError(f"{what} indices: expected {b} (one per sample), got {idx.numel()}")
        if not torch.compiler.is_compiling() and ((idx < 0) | (idx >= table.shape[0])).any():
            raise ModelError(f"{what} index out of range 0..{table.shape[0] - 1}: {idx.tolist()}")
        known = proj(table[idx])
        return torch.where((idx == 0).unsqueeze(-1), unknown.expand(b, -1), known)

    def forward(self, wavelengths: torch.Tensor, fwhm: torch.Tensor, sensor: torch.Tensor | None,
                level: torch.Tensor | None, content: torch.Tensor,
                band_mask: torch.Tensor | None = None) -> torch.Tensor:
        """wavelengths/fwhm ``[B,C]`` nm, sensor/level ``[B]`` int64 or None, content ``[B,C,d]`` -> ``[B,C,d]``;
        ``band_mask [B,C]`` (True = real band): the spectral transformer ignores padded bands."""
        b, c = wavelengths.shape
        wl_um = wavelengths.float() / 1000.0
        # periods made here in float32, never a buffer: a bf16 cast would move the 2 nm period's phase by cycles
        periods = log_spaced_periods(self.n_freq).to(wl_um.device)
        ang = 2 * math.pi * wl_um.unsqueeze(-1) / periods
        wl_feat = torch.cat([torch.sin(ang), torch.cos(ang), ((wl_um - 1.45) / 1.1).unsqueeze(-1)], -1)
        fw = ((torch.log(fwhm.float().clamp_min(1e-3)) - math.log(FWHM_REF_NM)) / FWHM_LOG_SCALE).unsqueeze(-1)
        dt = self.wl_proj.weight.dtype
        band = self.wl_proj(wl_feat.to(dt)) + self.fwhm_mlp(fw.to(dt))
        s = self._lookup(sensor, self.sensor_text, self.sensor_proj, self.sensor_unknown, b, "sensor")
        lv = self._lookup(level, self.level_text, self.level_proj, self.level_unknown, b, "level")
        ctx = torch.stack([s.unsqueeze(1).expand(b, c, -1), lv.unsqueeze(1).expand(b, c, -1), content.to(dt)], 2)
        x = self.fusion(band, ctx)
        for blk in self.spectral:
            x = blk(x, band_mask)
        return self.norm(x)
