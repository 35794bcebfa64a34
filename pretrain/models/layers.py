"""Transformer building blocks (pre-norm, PyTorch scaled-dot-product attention) and 2-D sin-cos positions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (fused kernels where present)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, grad_ckpt: bool) -> torch.Tensor:
    """Apply blocks in order, with activation checkpointing per block when ``grad_ckpt`` and training."""
    for blk in blocks:
        if grad_ckpt and torch.is_grad_enabled() and x.requires_grad:
            x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
    return x


def sincos_2d(pos_y: torch.Tensor, pos_x: torch.Tensor, dim: int) -> torch.Tensor:
    """2-D sin-cos embedding of (possibly fractional) positions ``[..., N]`` -> ``[..., N, dim]``.

    Half the channels encode y, half x (MAE's ``get_2d_sincos_pos_embed``, continuous positions).
    """
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, device=pos_y.device, dtype=torch.float32) / quarter))
    out = []
    for p in (pos_y, pos_x):
        a = p.float().unsqueeze(-1) * omega
        out += [torch.sin(a), torch.cos(a)]
    return torch.cat(out, dim=-1)


def grid_positions(h: int, w: int, device: torch.device, offset: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, ...]:
    """Row/column indices (float) of an h x w token grid whose top-left token sits at ``offset``."""
    ys = torch.arange(h, device=device, dtype=torch.float32) + offset[0]
    xs = torch.arange(w, device=device, dtype=torch.float32) + offset[1]
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return gy.reshape(-1), gx.reshape(-1)


def pos_embed(h: int, w: int, dim: int, device: torch.device, offset: tuple[int, int] = (0, 0),
              scale: torch.Tensor | None = None) -> torch.Tensor:
    """``[1, N, dim]`` (or ``[B, N, dim]`` when ``scale`` [B] is given: positions x scale, e.g. GSD / ref)."""
    gy, gx = grid_positions(h, w, device, offset)
    if scale is None:
        return sincos_2d(gy, gx, dim).unsqueeze(0)
    s = scale.float().view(-1, 1)
    return sincos_2d(gy.unsqueeze(0) * s, gx.unsqueeze(0) * s, dim)


def init_weights(module: nn.Module) -> None:
    """Xavier-uniform linear layers with zero bias, unit LayerNorms (MAE's initialisation)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def to_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, C, N, p*p]`` (row-major token order)."""
    b, c, hh, ww = x.shape
    h, w = hh // p, ww // p
    return x.reshape(b, c, h, p, w, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h * w, p * p)


def from_patches(x: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """``[B, C, N, p*p]`` -> ``[B, C, h*p, w*p]``."""
    b, c = x.shape[:2]
    return x.reshape(b, c, h, w, p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h * p, w * p)


def log_spaced_periods(n: int, lo_um: float = 0.002, hi_um: float = 4.4) -> torch.Tensor:
    """``n`` periods (micrometres) log-spaced from ``lo_um`` to ``hi_um``."""
    return torch.exp(torch.linspace(math.log(lo_um), math.log(hi_um), n))
