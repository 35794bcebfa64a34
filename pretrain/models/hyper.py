"""HyperEmbedding (band-conditioned patch embedding) and HyperLinear (band-conditioned output layer).

For band c of sample b the hypernetworks produce ``V[b,c]`` (p*p x r) and ``U[b,c]`` (r x D); a token is
``sum_c U[b,c]^T (V[b,c]^T x[b,c,n]) / C + bias``. Parameter counts do not depend on the number of bands.

Compute path (the maths above, evaluated in the cheaper of two orders; outputs agree to fp32 rounding):

- pixels are projected first, ``y = x V / C`` (``[B,C,n,r]``, C*n*P*r MACs per sample);
- *materialised*: generate ``U`` (``[B,C*r,D]``, C*d*r*D MACs) and contract ``[n,C*r] x [C*r,D]``
  (n*C*r*D); or *re-associated*: since U is linear in the band condition h (``U = W_u h + b_u``),
  ``token = sum_{k,j} (sum_c h[c,k] y[c,n,j]) W_u[k,j,:] + (sum_c y[c,n,:]) b_u``: n*C*d*r + n*d*r*D MACs and the
  ``[B,C,r,D]`` tensor (157 MB at batch 8, rank 64, ViT-B) and its gradient are never formed.
  :meth:`HyperEmbedding.contraction` picks the order with fewer MACs: re-associated when few tokens are embedded
  (``keep``: an MAE embeds only its visible tokens), materialised when ``n`` is large against ``d``.
- ``keep`` ``[B,n]`` embeds only those tokens (the others are never computed).

HyperLinear generates ``A`` (r x Dd) and ``B`` (r x P) per band; its two contractions run as batched matmuls on
transposed views, so no ``[B,C,N,r]`` copy is made. ``[B,C,N,D]`` is never materialised anywhere.

A mixed batch's ``band_mask [B,C]`` (True = real band, :mod:`pretrain.data.mixed`) makes the sum run over each
sample's real bands only, divided by its own count ``C_b``, and the bias come from the mean condition of its real
bands: a padded band contributes nothing. HyperLinear is per band (outputs on padded bands are left to the loss
to ignore).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import Linear, gather_patches


class HyperEmbedding(nn.Module):
    """Patch embedding whose weights come from each band's condition vector."""

    def __init__(self, cond_dim: int, patch_size: int, rank: int, dim: int) -> None:
        super().__init__()
        self.P, self.r, self.dim = patch_size * patch_size, rank, dim
        self.norm = nn.LayerNorm(cond_dim)
        # the generated V and U are scaled at init (each layer's own gain) instead of at every call
        self.to_v = Linear(cond_dim, self.P * rank, gain=1.0 / math.sqrt(self.P))
        self.to_u = Linear(cond_dim, rank * dim, gain=1.0 / math.sqrt(rank))
        self.to_bias = nn.Linear(cond_dim, dim)

    def weights(self, cond: torch.Tensor, band_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """V ``[B,C,P,r]``, U ``[B,C,r,D]``, bias ``[B,1,D]`` from cond ``[B,C,d]`` (bias: mean over real bands)."""
        b, c, _ = cond.shape
        h = self.norm(cond)
        v = self.to_v(h).view(b, c, self.P, self.r)
        u = self.to_u(h).view(b, c, self.r, self.dim)
        bias = self.to_bias(band_mean(h, band_mask))
        return v, u, bias

    def contraction(self, n_bands: int, n_tokens: int) -> str:
        """``"reassociated"`` or ``"materialised"``: the order with fewer forward MACs for this shape."""
        d, r, dim = self.to_u.in_features, self.r, self.dim
        materialised = n_bands * d * r * dim + n_tokens * n_bands * r * dim
        reassociated = n_tokens * n_bands * d * r + n_tokens * d * r * dim
        return "reassociated" if reassociated < materialised else "materialised"

    def macs(self, n_bands: int, n_tokens: int) -> int:
        """Forward multiply-accumulates per sample: V and bias generation, pixel projection and the contraction
        (in the order :meth:`contraction` picks, U generation included when materialised)."""
        d, r, dim, P = self.to_u.in_features, self.r, self.dim, self.P
        m = n_bands * d * P * r + d * dim + n_bands * n_tokens * P * r
        if self.contraction(n_bands, n_tokens) == "materialised":
            return m + n_bands * d * r * dim + n_tokens * n_bands * r * dim
        return m + n_tokens * n_bands * d * r + n_tokens * d * r * dim + n_tokens * r * dim

    def forward(self, patches: torch.Tensor, cond: torch.Tensor, keep: torch.Tensor | None = None,
                band_mask: torch.Tensor | None = None) -> torch.Tensor:
        """patches ``[B,C,N,P]``, cond ``[B,C,d]`` -> tokens ``[B,N,D]``; with ``keep`` ``[B,n]`` (token indices)
        only those tokens, ``[B,n,D]``; ``band_mask [B,C]``: a mixed batch's real bands (padding weighs 0)."""
        b, c, n, P = patches.shape
        if keep is not None:
            n = keep.shape[1]
            patches = torch.gather(patches, 2, keep[:, None, :, None].expand(b, c, n, P))
        r, dim = self.r, self.dim
        h = self.norm(cond)
        v = self.to_v(h).view(b, c, P, r)
        # y^T = V^T x^T / C, [B,C,r,n] (1/C, or mask / C_b, on the smallest tensor); both orders read it without a copy
        yt = torch.matmul((v * band_scale(band_mask, c, v.dtype)).transpose(-1, -2),
                          patches.to(v.dtype).transpose(-1, -2))
        bias = self.to_bias(band_mean(h, band_mask))  # [B,1,D]
        # under ZeRO-3 (partitioned parameters) always through to_u's own forward, so every rank gathers the same
        # parameters in the same order whatever its batch's shape: the reassociated order reads to_u.weight, which
        # DeepSpeed gathers on access, and a per-rank choice (ranks holding other band or token counts: mixed and
        # co-located batches) mismatched the collectives. Checked on the parameters() iterator, which never gathers.
        partitioned = any(hasattr(q, "ds_id") for q in self.to_u.parameters(recurse=False))
        if partitioned or self.contraction(c, n) == "materialised":
            u = self.to_u(h).view(b, c * r, dim)
            return torch.baddbmm(bias.expand(b, n, dim), yt.view(b, c * r, n).transpose(1, 2), u)
        d = h.shape[-1]
        # [(k,j), D]: to_u.weight [(j,D), k] transposed as one 2-D matrix (PyTorch's blocked transpose copy, its
        # gradient the same way back), not a 3-D permute: at rank 64, batch 8 the copies cost 16 ms, not 34 ms
        w = self.to_u.weight.t().contiguous().view(d * r, dim)
        z = torch.bmm(h.transpose(1, 2), yt.view(b, c, r * n))  # [B,d,r*n]: the sum over bands first
        z = z.view(b, d, r, n).permute(0, 3, 1, 2).reshape(b, n, d * r)  # [B,n,(k,j)]
        tok = torch.matmul(z, w)  # [B,n,D]
        tok = tok + torch.matmul(yt.sum(1).transpose(1, 2), self.to_u.bias.view(r, dim))
        return tok + bias


def band_scale(band_mask: torch.Tensor | None, c: int, dtype: torch.dtype) -> torch.Tensor | float:
    """Per-band weight of the band sum: ``1/C``, or ``mask / C_b`` ``[B,C,1,1]`` for a mixed batch."""
    if band_mask is None:
        return 1.0 / c
    m = band_mask.to(dtype)
    return (m / m.sum(1, keepdim=True).clamp_min(1.0))[:, :, None, None]


def band_mean(h: torch.Tensor, band_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``h [B,C,d]`` over bands ``[B,1,d]``; over each sample's real bands for a mixed batch."""
    if band_mask is None:
        return h.mean(1, keepdim=True)
    m = band_mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)


class HyperLinear(nn.Module):
    """Output layer: decoded token ``z [B,N,Dd]`` -> every band's p*p pixels, weights from each band's
    condition: ``out[b,c,n] = B[b,c]^T (A[b,c] z[b,n]) + bias[b,c]`` with A (r x Dd), B (r x P)."""

    def __init__(self, cond_dim: int, patch_size: int, rank: int, dim: int) -> None:
        super().__init__()
        self.P, self.r, self.dim = patch_size * patch_size, rank, dim
        self.norm = nn.LayerNorm(cond_dim)
        self.to_a = Linear(cond_dim, rank * dim, gain=1.0 / math.sqrt(dim))
        self.to_b = Linear(cond_dim, rank * self.P, gain=1.0 / math.sqrt(rank))
        self.to_bias = nn.Linear(cond_dim, self.P)

    def forward(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """z ``[B,N,Dd]``, cond ``[B,C,d]`` -> ``[B,C,N,P]``."""
        b, n, _ = z.shape
        c = cond.shape[1]
        h = self.norm(cond)
        a = self.to_a(h).view(b, c * self.r, self.dim)
        bm = self.to_b(h).view(b * c, self.r, self.P)
        t = torch.bmm(a, z.to(a.dtype).transpose(1, 2))  # [B,C*r,N]
        bias = self.to_bias(h).view(b * c, 1, self.P).expand(b * c, n, self.P)
        # [B*C,N,P]: t read as a transposed view (no copy), the bias added inside the product (no extra pass)
        out = torch.baddbmm(bias, t.view(b * c, self.r, n).transpose(1, 2), bm)
        return out.view(b, c, n, self.P)


class FixedPatchEmbed(nn.Module):
    """Baseline: Conv2d patch embedding over exactly ``bands`` bands (same token count as HyperEmbedding)."""

    def __init__(self, bands: int, patch_size: int, dim: int) -> None:
        super().__init__()
        self.bands = bands
        self.proj = nn.Conv2d(bands, dim, patch_size, patch_size)

    def forward(self, pixels: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``[B,C,H,W]`` -> ``[B,N,D]``; with ``keep`` ``[B,n]`` only those tokens (the same weights as a matmul
        over the kept patches, as :class:`HyperEmbedding` does)."""
        if pixels.shape[1] != self.bands:
            raise ValueError(f"fixed patch embedding takes {self.bands} bands, got {pixels.shape[1]}")
        if keep is None:
            return self.proj(pixels).flatten(2).transpose(1, 2)
        b, c = pixels.shape[:2]
        x = gather_patches(pixels, keep, self.proj.kernel_size[0]).transpose(1, 2).reshape(b, keep.shape[1], -1)
        return torch.nn.functional.linear(x, self.proj.weight.flatten(1), self.proj.bias)  # x: [B,n,C*p*p]


class FixedLinear(nn.Module):
    """Baseline output: Linear(Dd -> bands * p*p)."""

    def __init__(self, bands: int, patch_size: int, dim: int) -> None:
        super().__init__()
        self.bands, self.P = bands, patch_size * patch_size
        self.proj = nn.Linear(dim, bands * self.P)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, n, _ = z.shape
        return self.proj(z).view(b, n, self.bands, self.P).transpose(1, 2)
