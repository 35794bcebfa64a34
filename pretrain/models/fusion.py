"""Cross-sensor fusion: the tokens of several co-located views placed on a common ground grid.

Inputs are views of one location as the co-located loader gives them (:mod:`pretrain.data.colocated`; contract in
``/work/coord/COLOCATED.md``): each view's tokens ``[B, n_v, D]`` (from the shared encoder, each at its sensor's
native GSD, so ``n_v`` differs) and its ``ground`` affine ``[B, 2, 3]`` (crop pixel -> metres from the square's
NW corner). Every token's centre is mapped to metres on the ground, and positions are encoded as 2-D sin-cos of
metres / (``ref_gsd`` x patch size), i.e. in tokens of a reference 30 m sensor: GSD-aware (a 10 m token sits a
third of a 30 m token away from its neighbour) and exact under misregistration and rotation (the affine says
where each crop lies). Queries sit on the common grid (default: the first view's token centres) and attend, by
cross-attention, to the tokens of all views; ``fusion_depth`` blocks of [cross-attention, MLP], pre-norm, then a
LayerNorm. Everything is per sample: a sample's fused tokens depend only on its own views.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Linear, Mlp, sincos_2d


def token_centres(ground: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """Metres (x east, y south) ``[B, h*w, 2]`` of the centres of an ``h x w`` token grid of patch ``p`` whose crop
    maps to the ground by ``ground [B, 2, 3]`` (row-major token order)."""
    dev = ground.device
    ys = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) * p
    xs = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) * p
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pix = torch.stack([gx.reshape(-1), gy.reshape(-1), torch.ones(h * w, device=dev)], 0)  # [3, N]
    return torch.einsum("bij,jn->bni", ground.float(), pix)


def ground_embed(pos_m: torch.Tensor, dim: int, unit_m: float) -> torch.Tensor:
    """2-D sin-cos ``[B, N, dim]`` of positions ``[B, N, 2]`` (metres), in units of ``unit_m``."""
    q = pos_m.float() / unit_m
    return sincos_2d(q[..., 1], q[..., 0], dim)


class CrossAttention(nn.Module):
    """Queries ``[B, m, D]`` attend to keys/values ``[B, n, D]`` (``key_mask [B, n]``: True = attend)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = Linear(dim, dim, init="xavier")
        self.kv = Linear(dim, 2 * dim, init="xavier")
        self.proj = Linear(dim, dim, init="xavier")

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, m, d = x.shape
        n = ctx.shape[1]
        hd = d // self.heads
        q = self.q(x).view(b, m, self.heads, hd).transpose(1, 2)
        kv = self.kv(ctx).view(b, n, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        am = None if key_mask is None else key_mask.to(torch.bool)[:, None, None, :]
        y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=am)
        return self.proj(y.transpose(1, 2).reshape(b, m, d))


class FusionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), init="xavier")

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm_q(x), self.norm_kv(ctx), key_mask)
        return x + self.mlp(self.norm2(x))


class CrossSensorFusion(nn.Module):
    """``fusion(tokens, positions, query_positions) -> [B, m, D]`` (see the module docstring)."""

    def __init__(self, dim: int, heads: int, depth: int, mlp_ratio: float, unit_m: float) -> None:
        super().__init__()
        self.dim, self.unit_m = dim, unit_m
        self.query = nn.Parameter(torch.empty(dim))
        self.blocks = nn.ModuleList(FusionBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """This module's own parameter (children initialise themselves)."""
        nn.init.normal_(self.query, std=0.02)

    def forward(self, tokens: list[torch.Tensor], positions: list[torch.Tensor], query_pos: torch.Tensor,
                key_masks: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """``tokens``/``positions``: per view ``[B, n_v, D]`` / ``[B, n_v, 2]`` metres; ``query_pos [B, m, 2]``;
        ``key_masks``: per view ``[B, n_v]`` (True = a real token) or None."""
        dt = tokens[0].dtype
        ctx = torch.cat([t + ground_embed(p, self.dim, self.unit_m).to(dt) for t, p in zip(tokens, positions)], 1)
        mask = None
        if key_masks is not None and any(m is not None for m in key_masks):
            mask = torch.cat([m if m is not None else torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)
                              for t, m in zip(tokens, key_masks)], 1)
        x = self.query.to(dt) + ground_embed(query_pos, self.dim, self.unit_m).to(dt)
        for blk in self.blocks:
            x = blk(x, ctx, mask)
        return self.norm(x)
