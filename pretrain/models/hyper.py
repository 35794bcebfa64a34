"""HyperEmbedding (band-conditioned patch embedding) and HyperLinear (band-conditioned output layer).

For band c of sample b the hypernetworks produce ``V[b,c]`` (p*p x r) and ``U[b,c]`` (r x D); a token is
``sum_c U[b,c]^T (V[b,c]^T x[b,c,n]) / C + bias``. Contraction order (per sample, N tokens, P = p*p):
project pixels first, ``[C,N,P] x [C,P,r] -> [N,C*r]`` (C*N*P*r MACs), then one matmul
``[N,C*r] x [C*r,D]`` (N*C*r*D MACs); the alternative of forming W = V U per band costs C*P*r*D + N*C*P*D,
and ``[B,C,N,D]`` is never materialised. Parameter counts do not depend on the number of bands.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import Linear


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

    def weights(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """V ``[B,C,P,r]``, U ``[B,C,r,D]``, bias ``[B,1,D]`` from cond ``[B,C,d]``."""
        b, c, _ = cond.shape
        h = self.norm(cond)
        v = self.to_v(h).view(b, c, self.P, self.r)
        u = self.to_u(h).view(b, c, self.r, self.dim)
        bias = self.to_bias(h.mean(1, keepdim=True))
        return v, u, bias

    def forward(self, patches: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """patches ``[B,C,N,P]``, cond ``[B,C,d]`` -> tokens ``[B,N,D]``."""
        b, c, n, _ = patches.shape
        v, u, bias = self.weights(cond)
        y = torch.matmul(patches.to(v.dtype), v * (1.0 / c))  # [B,C,N,r]; 1/C on the smallest tensor
        y = y.transpose(1, 2).reshape(b, n, c * self.r)  # [B,N,C*r]
        # bias + [B,N,C*r] @ [B,C*r,D] in one fused call
        return torch.baddbmm(bias.expand(b, n, self.dim), y, u.reshape(b, c * self.r, self.dim))


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
        bm = self.to_b(h).view(b, c, self.r, self.P)
        t = torch.bmm(z.to(a.dtype), a.transpose(1, 2))  # [B,N,C*r]
        t = t.view(b, n, c, self.r).transpose(1, 2)  # [B,C,N,r]
        return torch.matmul(t, bm) + self.to_bias(h).unsqueeze(2)


class FixedPatchEmbed(nn.Module):
    """Baseline: Conv2d patch embedding over exactly ``bands`` bands (same token count as HyperEmbedding)."""

    def __init__(self, bands: int, patch_size: int, dim: int) -> None:
        super().__init__()
        self.bands = bands
        self.proj = nn.Conv2d(bands, dim, patch_size, patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[1] != self.bands:
            raise ValueError(f"fixed patch embedding takes {self.bands} bands, got {pixels.shape[1]}")
        return self.proj(pixels).flatten(2).transpose(1, 2)


class FixedLinear(nn.Module):
    """Baseline output: Linear(Dd -> bands * p*p)."""

    def __init__(self, bands: int, patch_size: int, dim: int) -> None:
        super().__init__()
        self.bands, self.P = bands, patch_size * patch_size
        self.proj = nn.Linear(dim, bands * self.P)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, n, _ = z.shape
        return self.proj(z).view(b, n, self.bands, self.P).transpose(1, 2)
