"""Transformer building blocks (pre-norm, PyTorch scaled-dot-product attention) and 2-D sin-cos positions.

Initialisation: every module initialises only its own parameters, in its own ``reset_parameters`` (called
by its ``__init__``, PyTorch's convention), never a child's from a parent. That is what makes the models
exact under ``deepspeed.zero.Init``, which partitions each module's parameters as its ``__init__``
returns: a parent writing into a child afterwards would write into an empty partition. :class:`Linear`
carries its own scheme (``init="xavier"`` for transformer layers, PyTorch's default otherwise, and a
``gain`` applied after it). :func:`reset_parameters` re-initialises a whole model module by module
(``Module.apply``, which ``zero.Init`` runs with each module's own parameters gathered).

Activation checkpointing: :class:`Blocks` (a ``ModuleList``, so parameter names do not change) recomputes
each block in the backward pass when its ``checkpointing`` flag is set; :func:`set_grad_checkpointing`
sets it for every stack in a model. It is the project's only checkpointing mechanism.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

INITS = ("torch", "xavier")


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and names) that carries its initialisation.

    ``init="torch"``: PyTorch's default (Kaiming-uniform weight, uniform bias); ``"xavier"``: Xavier-uniform
    weight, zero bias (MAE's transformer init). ``gain`` then scales the weight (e.g. the hypernetworks'
    1/sqrt(fan) so generated weights start at a sensible size)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, init: str = "torch",
                 gain: float = 1.0) -> None:
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.init, self.gain = init, float(gain)  # plain attributes: set before nn.Linear calls reset_parameters
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        if self.init == "xavier":
            nn.init.xavier_uniform_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)
        else:
            super().reset_parameters()
        if self.gain != 1.0:
            with torch.no_grad():
                self.weight.mul_(self.gain)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, init={self.init}" + (f", gain={self.gain:.4g}" if self.gain != 1.0 else "")


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (fused kernels where present)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, init: str = "torch") -> None:
        super().__init__()
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias, init=init)
        self.proj = Linear(dim, dim, init=init)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B,n,D]``; ``mask [B,n]`` bool (True = a real token): padded tokens are never attended to."""
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        am = None if mask is None else mask.to(torch.bool)[:, None, None, :]
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=am)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, init: str = "torch") -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden, init=init)
        self.fc2 = Linear(hidden, dim, init=init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (``init`` chooses its linear layers' scheme, see :class:`Linear`)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, init: str = "torch") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, init=init)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), init=init)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask [B,n]`` (True = real token): keys of padded tokens are ignored (see :class:`Attention`)."""
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class Blocks(nn.ModuleList):
    """A stack of transformer blocks applied in order; ``checkpointing`` recomputes each in backward.

    Recomputation calls the block module itself (its hooks run again: under ZeRO-3 that re-gathers its
    parameters), non-reentrant, and only where a gradient is being taken."""

    def __init__(self, blocks: Iterable[nn.Module]) -> None:
        super().__init__(blocks)
        self.checkpointing = False

    def step(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One block on ``x`` (checkpointed when enabled and a gradient is being taken)."""
        if self.checkpointing and torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self:
            x = self.step(blk, x)
        return x


def set_grad_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Turn activation checkpointing on or off in every :class:`Blocks` of ``model``; returns their count."""
    stacks = [m for m in model.modules() if isinstance(m, Blocks)]
    for m in stacks:
        m.checkpointing = bool(enabled)
    return len(stacks)


def reset_parameters(model: nn.Module) -> None:
    """Re-initialise every parameter of ``model``: each module's own ``reset_parameters`` (own parameters
    only), children first (``Module.apply`` order; under ``zero.Init`` each module is gathered in turn)."""
    model.apply(_reset_own)


def _reset_own(m: nn.Module) -> None:
    fn = getattr(m, "reset_parameters", None)
    if callable(fn):
        fn()


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


def to_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, C, N, p*p]`` (row-major token order)."""
    b, c, hh, ww = x.shape
    h, w = hh // p, ww // p
    return x.reshape(b, c, h, p, w, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h * w, p * p)


def gather_patches(x: torch.Tensor, cells: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, H, W]`` and cell indices ``cells [B, n]`` (row-major) -> ``[B, C, n, p*p]``: ``to_patches(x, p)``
    at those cells, read straight from ``x`` without forming every patch (one indexing pass over the n cells;
    measured, CPU time, one thread, min of 12, 8 x 100 bands x 128 px, 64 of 256 cells: 16 ms against 25 ms
    for forming all patches and gathering)."""
    b, c, hh, ww = x.shape
    gw = ww // p
    v = x.reshape(b, c, hh // p, p, gw, p).permute(0, 1, 2, 4, 3, 5)  # [B,C,h,w,p,p], a view
    bi = torch.arange(b, device=cells.device)[:, None, None]
    ci = torch.arange(c, device=cells.device)[None, :, None]
    # four adjacent advanced indices broadcast to [B,C,n]; the trailing p x p block is copied as it lies
    return v[bi, ci, (cells // gw)[:, None, :], (cells % gw)[:, None, :]].reshape(b, c, cells.shape[1], p * p)


def from_patches(x: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """``[B, C, N, p*p]`` -> ``[B, C, h*p, w*p]``."""
    b, c = x.shape[:2]
    return x.reshape(b, c, h, w, p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h * p, w * p)


def log_spaced_periods(n: int, lo_um: float = 0.002, hi_um: float = 4.4) -> torch.Tensor:
    """``n`` periods (micrometres) log-spaced from ``lo_um`` to ``hi_um``."""
    return torch.exp(torch.linspace(math.log(lo_um), math.log(hi_um), n))
