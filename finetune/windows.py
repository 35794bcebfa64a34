"""The one sliding-window grid of whole-scene prediction: where tiles go and how their outputs blend.

Along each axis of a scene, tiles of ``tile`` pixels start every ``stride = tile - overlap`` pixels
(:class:`Axis`); the last one ends at or beyond the scene's edge (the caller pads what sticks out). Each
tile's output is weighted by a separable ramp over the overlap (``(k + 0.5) / o`` on the side facing a
neighbour, 1 elsewhere and on the scene's borders), so the weights of the tiles covering a cell sum to
exactly 1 wherever ``overlap <= tile / 2`` (:func:`check_tiling`): a cell covered by one tile holds that
tile's output; in an overlap, the linear cross-fade of the two (four at corners). Nothing is renormalised.

Two users, one grid and one set of weights:

- :func:`blend` (in memory): the downstream tasks' whole-scene predictions, segmentation
  (:func:`finetune.heads.upernet.predict_scene`, softmax probabilities blended) and fusion.
- :mod:`finetune.inference` (streamed, bounded memory, to Zarr): ``embed`` / ``launch/embed.py`` over whole
  products; its tiles also lie on the encoder's token grid (``unit`` = patch size for per-token outputs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from data_prep.errors import UserError


class WindowError(UserError):
    """A tile / stride geometry the blend cannot serve (a config value)."""


@dataclass(frozen=True)
class Axis:
    """The tiles along one axis of a scene, in pixels (``size``) and output cells of ``unit`` pixels."""

    size: int
    tile: int
    stride: int
    unit: int = 1

    @property
    def overlap(self) -> int:
        return self.tile - self.stride

    @property
    def n(self) -> int:
        """Tiles along the axis: the last one ends at or beyond ``size``."""
        return 1 if self.size <= self.tile else math.ceil((self.size - self.tile) / self.stride) + 1

    @property
    def padded(self) -> int:
        """Pixels the tiles span (``>= size``): where the last tile ends."""
        return (self.n - 1) * self.stride + self.tile

    @property
    def cells(self) -> int:
        """Output cells along the axis (``ceil(size / unit)``)."""
        return -(-self.size // self.unit)

    @property
    def cell_chunk(self) -> int:
        return self.stride // self.unit

    def start(self, k: int) -> int:
        """First pixel of tile ``k``."""
        return k * self.stride

    def tile_span(self, k: int) -> tuple[int, int]:
        """Output cells [a, b) of tile ``k`` (not clipped to the scene)."""
        a = k * self.stride // self.unit
        return a, a + self.tile // self.unit

    def core(self, k: int) -> tuple[int, int]:
        """Output cells [a, b) that tile cell ``k`` owns: [k, k+1) strides; the last one runs to the end."""
        a = k * self.cell_chunk
        return a, (a + self.cell_chunk if k < self.n - 1 else self.cells)

    def weights(self, k: int) -> np.ndarray:
        """float32 blending weights of tile ``k`` over its ``tile / unit`` cells (see the module docstring)."""
        m, o = self.tile // self.unit, self.overlap // self.unit
        w = np.ones(m, dtype=np.float32)
        if o:
            ramp = (np.arange(o, dtype=np.float32) + 0.5) / o
            if k > 0:
                w[:o] = ramp
            if k < self.n - 1:
                w[m - o:] = ramp[::-1]
        return w


def check_tiling(tile: int, stride: int, fields: tuple[str, str] = ("tile", "stride")) -> None:
    """A :class:`WindowError` naming ``fields`` unless ``tile / 2 <= stride <= tile`` (overlap at most half a
    tile, no gaps): the geometry whose weights sum to 1."""
    if tile < 1 or not (tile - tile // 2) <= stride <= tile:
        raise WindowError(f"{fields[1]} {stride} must lie between {fields[0]} / 2 and {fields[0]} "
                          f"({tile - tile // 2}..{tile}): tiles overlap by at most half a tile and leave no gaps")


def blend(fn: Callable[[Sequence[tuple[int, int]]], torch.Tensor], size: tuple[int, int], tile: int, stride: int,
          batch_size: int = 8) -> torch.Tensor:
    """``[D, H, W]`` float32: the outputs ``fn(origins) -> [B, D, tile, tile]`` of the tiles at pixel origins
    ``(y, x)`` covering a scene of ``size = (H, W)``, blended by :class:`Axis` weights (the module docstring).

    Tiles start on the :class:`Axis` grid; the last ones reach past the scene (to ``Axis.padded``), so ``fn``
    crops from an input padded that far (its choice of padding). ``batch_size`` tiles per call."""
    check_tiling(tile, stride)
    if batch_size < 1:
        raise WindowError(f"batch_size must be >= 1, got {batch_size}")
    ay, ax = Axis(size[0], tile, stride), Axis(size[1], tile, stride)
    wy = [torch.from_numpy(ay.weights(i)) for i in range(ay.n)]
    wx = [torch.from_numpy(ax.weights(j)) for j in range(ax.n)]
    tiles = [(i, j) for i in range(ay.n) for j in range(ax.n)]
    acc: torch.Tensor | None = None
    for s in range(0, len(tiles), batch_size):
        chunk = tiles[s:s + batch_size]
        out = fn([(ay.start(i), ax.start(j)) for i, j in chunk]).detach().float().cpu()
        if acc is None:
            acc = torch.zeros(out.shape[1], ay.padded, ax.padded)
        for (i, j), y in zip(chunk, out):
            y0, x0 = ay.start(i), ax.start(j)
            acc[:, y0:y0 + tile, x0:x0 + tile] += y * (wy[i][:, None] * wx[j][None, :])
    return acc[:, :size[0], :size[1]]
