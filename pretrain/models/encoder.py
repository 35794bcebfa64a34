"""The shared encoder: band conditions (meta + content) -> HyperEmbedding tokens -> ViT.

``encoder(pixels, wavelengths, fwhm, sensor=None, level=None, valid=None, gsd=None) -> [B, N, D]`` for any
number of bands (free between batches; wavelengths may differ per sample) and, with ``band_mask [B, C]``
(True = a real band; :mod:`pretrain.data.mixed`), a different number per sample inside one batch: a padded band
contributes nothing, so a sample's tokens do not depend on the company it is batched with.
``sensor`` / ``level`` are indices into ``encoder.vocab`` (:class:`~pretrain.models.vocab.Vocabulary`),
which the encoder owns and its export carries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .args import ModelArgs, ModelError
from .fusion import CrossSensorFusion, token_centres
from .hyper import FixedPatchEmbed, HyperEmbedding
from .layers import Block, Blocks, gather_patches, pos_embed, to_patches
from .meta import ContentEncoder, MetaEncoder
from .vocab import Vocabulary


class SpectralEncoder(nn.Module):
    """Any-sensor ViT encoder whose patch embedding is generated per band by hypernetworks.

    ``vocab`` defaults to the registry's (:meth:`Vocabulary.from_registry`): a fresh model. Every module
    initialises its own parameters (see :mod:`pretrain.models.layers`), so this is ``zero.Init``-safe."""

    def __init__(self, args: ModelArgs, vocab: Vocabulary | None = None, compute_text: bool = True) -> None:
        super().__init__()
        self.args = args
        self.embed_dim = args.dim
        self.patch_size = args.patch_size
        self.vocab = vocab if vocab is not None else Vocabulary.from_registry()
        if args.patch_embed == "hyper":
            self.content = ContentEncoder(args.patch_size, args.content_hidden, args.cond_dim)
            self.meta = MetaEncoder(args, self.vocab, compute_text=compute_text)
            self.hyper = HyperEmbedding(args.cond_dim, args.patch_size, args.rank, args.dim)
        else:
            self.fixed = FixedPatchEmbed(args.fixed_bands, args.patch_size, args.dim)
        self.blocks = Blocks(Block(args.dim, args.heads, args.mlp_ratio, init="xavier") for _ in range(args.depth))
        self.norm = nn.LayerNorm(args.dim)
        if args.fusion_depth > 0:  # co-located views on a common ground grid (pretrain.models.fusion)
            self.fusion = CrossSensorFusion(args.dim, args.heads, args.fusion_depth, args.mlp_ratio,
                                            unit_m=args.ref_gsd * args.patch_size)

    # ------------------------------------------------------------------------------------------------------
    @property
    def sensor_names(self) -> list[str]:
        return list(self.vocab.sensors)

    @property
    def level_names(self) -> list[str]:
        return list(self.vocab.levels)

    def add_sensor(self, name: str, text: str | None = None) -> int:
        """Embed a new sensor name (any string) with MiniLM, append it to the vocabulary and return its
        index (the existing index when the vocabulary already holds the name). Call before wrapping the
        model in an optimiser or engine (the text table, a buffer, grows)."""
        known = self.vocab.lookup(name)
        if known is not None:
            return known
        if hasattr(self, "meta"):
            self.meta.append_sensor(name, text)
        self.vocab = self.vocab.extended([name])
        return len(self.vocab.sensors) - 1

    # ------------------------------------------------------------------------------------------------------
    def check_inputs(self, pixels: torch.Tensor, wavelengths: torch.Tensor, fwhm: torch.Tensor) -> None:
        if pixels.dim() != 4:
            raise ModelError(f"pixels must be [B,C,H,W], got shape {tuple(pixels.shape)}")
        b, c, h, w = pixels.shape
        p = self.patch_size
        if h % p or w % p:
            raise ModelError(f"pixels H x W = {h} x {w} must be multiples of the patch size {p}")
        if tuple(wavelengths.shape) != (b, c) or tuple(fwhm.shape) != (b, c):
            raise ModelError(f"wavelengths {tuple(wavelengths.shape)} and fwhm {tuple(fwhm.shape)} must be "
                             f"[B, C] = {(b, c)} to match pixels")

    def condition(self, pixels: torch.Tensor, wavelengths: torch.Tensor, fwhm: torch.Tensor,
                  sensor: torch.Tensor | None = None, level: torch.Tensor | None = None,
                  valid: torch.Tensor | None = None, cell_weight: torch.Tensor | None = None,
                  band_mask: torch.Tensor | None = None, cells: torch.Tensor | None = None,
                  patches: torch.Tensor | None = None) -> torch.Tensor:
        """The fused per-band condition ``[B, C, cond_dim]`` (None for the fixed baseline); ``cells [B,n]``: the
        content statistics of those cells only (:class:`~pretrain.models.meta.ContentEncoder`), whose pixels
        ``patches [B,C,n,p*p]`` the caller may pass when it has them."""
        if not hasattr(self, "meta"):
            return None
        content = self.content(pixels, valid, cell_weight, cells, patches)
        return self.meta(wavelengths, fwhm, sensor, level, content, band_mask)

    def embed(self, pixels: torch.Tensor, wavelengths: torch.Tensor, fwhm: torch.Tensor,
              sensor: torch.Tensor | None = None, level: torch.Tensor | None = None,
              valid: torch.Tensor | None = None, gsd: torch.Tensor | None = None,
              offset: tuple[int, int] = (0, 0), cell_weight: torch.Tensor | None = None,
              keep: torch.Tensor | None = None, band_mask: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens with position embedding ``[B,N,D]`` and the band condition ``[B,C,d]``.

        ``offset`` (rows, cols in tokens) places a crop inside a larger grid (JEPA context views). ``keep``
        ``[B,n]`` (token indices): only those tokens are embedded, ``[B,n,D]`` (an MAE's visible tokens); given
        with ``cell_weight``, the content statistics come from the kept cells only, so ``cell_weight`` must be 0
        at every other cell (an MAE's: 1 visible, 0 masked), which makes the result that of weighting all cells.
        ``band_mask [B,C]`` (True = real band) marks a mixed batch's padding, which contributes nothing."""
        self.check_inputs(pixels, wavelengths, fwhm)
        if band_mask is not None:
            if tuple(band_mask.shape) != tuple(wavelengths.shape):
                raise ModelError(f"band_mask {tuple(band_mask.shape)} must be [B, C] = {tuple(wavelengths.shape)}")
            if not hasattr(self, "meta"):
                raise ModelError("band_mask (a mixed batch) needs patch_embed='hyper'; the fixed baseline takes "
                                 "exactly fixed_bands bands")
        p = self.patch_size
        h, w = pixels.shape[2] // p, pixels.shape[3] // p
        if valid is not None:
            pixels = pixels * valid.unsqueeze(1).to(pixels.dtype)
        if not hasattr(self, "meta"):
            tok, cond = self.fixed(pixels, keep), None
        else:
            # the kept cells' pixels, gathered once for the content statistics and the embedding
            patches = to_patches(pixels, p) if keep is None else gather_patches(pixels, keep, p)
            cells = keep if keep is not None and cell_weight is not None else None
            cond = self.condition(pixels, wavelengths, fwhm, sensor, level, valid, cell_weight, band_mask, cells,
                                  patches if cells is not None else None)
            tok = self.hyper(patches, cond, band_mask=band_mask)
        scale = None
        if self.args.gsd_pos and gsd is not None:
            scale = torch.as_tensor(gsd, device=tok.device).float().reshape(-1) / self.args.ref_gsd
        pe = pos_embed(h, w, self.embed_dim, tok.device, offset, scale).to(tok.dtype)
        if keep is not None:
            pe = torch.gather(pe.expand(tok.shape[0], -1, -1), 1, keep.unsqueeze(-1).expand(-1, -1, self.embed_dim))
        return tok + pe, cond

    def blocks_forward(self, x: torch.Tensor) -> torch.Tensor:
        """ViT blocks and the final norm on a token sequence ``[B,n,D]`` (any subset of tokens)."""
        return self.norm(self.blocks(x))

    def forward(self, pixels: torch.Tensor, wavelengths: torch.Tensor, fwhm: torch.Tensor,
                sensor: torch.Tensor | None = None, level: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, gsd: torch.Tensor | None = None,
                band_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens ``[B, N, D]`` (N = H/p * W/p, row-major), after the final LayerNorm."""
        x, _ = self.embed(pixels, wavelengths, fwhm, sensor, level, valid, gsd, band_mask=band_mask)
        return self.blocks_forward(x)

    def features(self, pixels: torch.Tensor | None = None, wavelengths: torch.Tensor | None = None,
                 fwhm: torch.Tensor | None = None, sensor: torch.Tensor | None = None,
                 level: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                 gsd: torch.Tensor | None = None, layers: Sequence[int] = (3, 5, 7, 11),
                 band_mask: torch.Tensor | None = None, views: Sequence[dict] | None = None,
                 grid: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Outputs ``[B,N,D]`` of the chosen blocks (0-based; negative counts from the end), for UperNet.

        Each is passed through the final LayerNorm so all levels share one scale. With ``views`` (co-located views
        of the same places, each a dict with ``pixels``, ``wavelengths``, ``fwhm``, ``ground`` and optionally
        ``sensor``, ``level``, ``valid``, ``gsd``, ``band_mask``; ``/work/coord/COLOCATED.md``) every view goes
        through the encoder and each chosen level is fused on the common grid (:meth:`fuse`): ``[B, N_grid, D]``,
        N_grid = the first view's tokens (or ``grid [B, m, 2]``, query positions in metres)."""
        depth = len(self.blocks)
        want = sorted({(i + depth) if i < 0 else i for i in layers})
        if not want or want[0] < 0 or want[-1] >= depth:
            raise ModelError(f"features layers {tuple(layers)} out of range for depth {depth}")
        if views is not None:
            per = [self.features(layers=layers, **_view_inputs(v)) for v in views]
            pos = [self.view_positions(v) for v in views]
            q = grid if grid is not None else pos[0]
            return [self._fusion()([f[k] for f in per], pos, q) for k in range(len(layers))]
        x, _ = self.embed(pixels, wavelengths, fwhm, sensor, level, valid, gsd, band_mask=band_mask)
        out: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.blocks[: want[-1] + 1]):
            x = self.blocks.step(blk, x)
            if i in want:
                out[i] = self.norm(x)
        return [out[(i + depth) if i < 0 else i] for i in layers]

    # co-located views ----------------------------------------------------------------------------------------
    def _fusion(self) -> CrossSensorFusion:
        f = getattr(self, "fusion", None)
        if f is None:
            raise ModelError("co-located views need the cross-sensor fusion module: build the model with "
                             "fusion_depth >= 1 (model.overrides: {fusion_depth: 1})")
        return f

    def view_positions(self, view: dict) -> torch.Tensor:
        """Metres ``[B, n, 2]`` (x east, y south from the square's NW corner) of a view's token centres."""
        p = self.patch_size
        hh, ww = view["pixels"].shape[-2:]
        if "ground" not in view:
            raise ModelError("a co-located view needs 'ground' [B, 2, 3] (crop pixel -> metres; pretrain.data.colocated)")
        return token_centres(view["ground"], hh // p, ww // p, p)

    def view_tokens(self, view: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A view's tokens through the encoder ``[B, n, D]`` and their ground positions ``[B, n, 2]`` (metres)."""
        return self(**_view_inputs(view)), self.view_positions(view)

    def fuse(self, views: Sequence[dict], grid: torch.Tensor | None = None,
             encoded: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The views of the same places fused on a common ground grid: ``([B, m, D], query positions [B, m, 2])``.

        Queries sit at ``grid [B, m, 2]`` (metres) or, by default, at the first view's token centres. ``encoded``:
        the views' tokens if already computed."""
        toks = list(encoded) if encoded is not None else [self(**_view_inputs(v)) for v in views]
        pos = [self.view_positions(v) for v in views]
        q = grid if grid is not None else pos[0]
        return self._fusion()(toks, pos, q), q

    # ------------------------------------------------------------------------------------------------------
    def embed_flops(self, n_bands: int, image_size: int, n_tokens: int | None = None) -> float:
        """Forward FLOPs (2 x MACs of matmuls) per sample of conditioning + patch embedding of ``n_tokens``
        tokens (default all of the image's)."""
        a = self.args
        n = (image_size // a.patch_size) ** 2
        n_emb = n if n_tokens is None else n_tokens
        P = a.patch_size ** 2
        if a.patch_embed == "fixed":
            return 2.0 * n_emb * n_bands * P * a.dim
        d, c = a.cond_dim, n_bands
        f = c * n * (2 * a.content_hidden) + c * a.content_hidden * d  # content
        f += c * ((2 * a.n_freq + 1) * d + d + d * d) + 2 * a.text_dim * d  # wavelength, fwhm, text
        f += c * (d * d + 3 * 2 * d * d + d * d + 2 * 2 * d * d)  # fusion
        f += a.spectral_depth * (c * (4 * d * d + 2 * 2 * d * d) + 2 * c * c * d)  # spectral transformer
        f += self.hyper.macs(c, n_emb)  # hypernetworks and the token contraction
        return 2.0 * f

    def blocks_flops(self, n_tokens: int) -> float:
        """Forward FLOPs per sample of the ViT blocks on ``n_tokens`` tokens."""
        a = self.args
        return 2.0 * a.depth * block_macs(n_tokens, a.dim, a.mlp_ratio)


def block_macs(n: int, d: int, mlp_ratio: float) -> float:
    """Multiply-accumulates of one transformer block on n tokens (qkv, attention, proj, MLP)."""
    return n * (3 * d * d + d * d + 2 * d * int(d * mlp_ratio)) + 2 * n * n * d


def _view_inputs(view: dict) -> dict:
    """The encoder's keyword inputs from a (co-located) view dict."""
    return {k: view.get(k) for k in ("pixels", "wavelengths", "fwhm", "sensor", "level", "valid", "gsd",
                                     "band_mask")}
