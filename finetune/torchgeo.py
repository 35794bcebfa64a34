"""TorchGeo / TerraTorch interop: a specfm encoder as a backbone that takes TorchGeo samples (the ``[torchgeo]`` extra).

TorchGeo's sample contract (``torchgeo.datasets``; e.g. ``HySpecNet11k`` and the ``SSL4EO`` sets): a dict with
``image`` ``[C, H, W]`` (``[B, C, H, W]`` after its DataLoader's ``stack_samples``), ``wavelength`` ``[C]`` (``[B, C]``
stacked) -- band centres in micrometres -- and ``res``, the pixel size in metres; other keys (``mask``, ``x``,
``y``, ``t``, ``bounds``, ``crs``) are carried along and ignored here. :class:`SpecFMBackbone` reads exactly these:

    from torch.utils.data import DataLoader
    from torchgeo.datasets import HySpecNet11k, stack_samples
    from finetune.torchgeo import SpecFMBackbone

    backbone = SpecFMBackbone("runs/demo/export/stage3_all", sensor="enmap", level="L2")
    loader = DataLoader(HySpecNet11k(root), batch_size=8, collate_fn=stack_samples)
    feats = backbone(next(iter(loader)))      # 4 x [8, D, H / patch, W / patch]; backbone.out_channels == [D] * 4

A plain tensor works too when the band table is given once (TerraTorch passes images): ``SpecFMBackbone(export,
wavelengths=..., fwhm=...)(x)``. Micrometres (all centres < 100) become nm, FWHM comes from ``fwhm`` or the centre
spacing (:mod:`finetune.encoder_api`); ``res`` goes to the encoder as its GSD. With ``normalise=True`` each image is
standardised as pretraining did (:func:`finetune.datasets.normalise`); otherwise the caller's transforms do it.

TerraTorch: when ``terratorch`` is importable, importing this module registers the builder ``specfm_encoder`` in
``terratorch.registry.TERRATORCH_BACKBONE_REGISTRY`` (a backbone with ``out_channels`` whose ``forward`` returns a
list of feature maps, as its EncoderDecoderFactory expects), so a TerraTorch config names ``backbone:
specfm_encoder`` with ``backbone_checkpoint: EXPORT`` (and ``backbone_wavelengths``...) once ``finetune.torchgeo``
is imported (``custom_modules_path`` or an import in the user's script). Neither library is needed to use the class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from finetune.encoder_api import Encoder, from_sample, load_encoder, wrap_encoder

__all__ = ["SpecFMBackbone", "register_terratorch", "specfm_encoder"]


class SpecFMBackbone(nn.Module):
    """Feature maps of a specfm encoder from TorchGeo samples (see the module docstring).

    ``checkpoint``: an export / release folder or hub id (:func:`finetune.load_encoder`), or an in-memory encoder.
    ``layers``: the blocks whose tokens are returned (default: four spread over the depth, as UperNet reads them);
    ``output``: ``"maps"`` (``[B, D, H / p, W / p]`` each) or ``"tokens"`` (``[B, N, D]``)."""

    def __init__(self, checkpoint: str | Path | nn.Module, layers: Sequence[int] | None = None, *, sensor: str | None = None,
                 level: str | None = None, wavelengths: Sequence[float] | torch.Tensor | None = None,
                 fwhm: Sequence[float] | torch.Tensor | None = None, normalise: bool = False, output: str = "maps",
                 freeze: bool = False) -> None:
        super().__init__()
        if output not in ("maps", "tokens"):
            raise ValueError(f"output must be 'maps' or 'tokens', got {output!r}")
        enc = checkpoint if isinstance(checkpoint, nn.Module) else load_encoder(checkpoint)
        self.encoder: Encoder = wrap_encoder(enc)
        self.layers = tuple(layers) if layers is not None else tuple(self.encoder.default_layers())
        self.sensor, self.level, self.normalise, self.output = sensor, level, normalise, output
        self.wavelengths = None if wavelengths is None else torch.as_tensor(wavelengths, dtype=torch.float32)
        self.fwhm = None if fwhm is None else torch.as_tensor(fwhm, dtype=torch.float32)
        self.out_channels = [self.encoder.embed_dim] * len(self.layers)
        if freeze:
            self.encoder.freeze()

    def forward(self, x: torch.Tensor | dict) -> list[torch.Tensor]:
        gsd = None
        if isinstance(x, dict):
            pixels, wl, fw = from_sample(x, self.wavelengths, self.fwhm)
            if "res" in x:
                gsd = torch.as_tensor(x["res"], dtype=torch.float32).reshape(-1)
        else:
            if self.wavelengths is None:
                raise ValueError("a tensor input needs the band table: SpecFMBackbone(..., wavelengths=[...]); or pass a "
                                 "TorchGeo sample with 'image' and 'wavelength'")
            pixels, wl, fw = (x if x.ndim == 4 else x[None]), self.wavelengths, self.fwhm
        pixels = pixels.float()
        if self.normalise:
            pixels = _standardise(pixels)
        # [C] or, stacked by TorchGeo's collate, [B, C] band tables; um -> nm and FWHM from the spacing: the encoder API
        feats = self.encoder.features(pixels, wl, fw, sensor=self.sensor, level=self.level, layers=self.layers, gsd=gsd)
        if self.output == "tokens":
            return feats
        b, _, h, w = pixels.shape
        gh, gw = self.encoder.grid(h, w)
        return [f.transpose(1, 2).reshape(b, -1, gh, gw) for f in feats]


def _standardise(pixels: torch.Tensor) -> torch.Tensor:
    """Each image standardised as pretraining does (:func:`finetune.datasets.normalise`: p01/p99 clip, z-score)."""
    from finetune.datasets import normalise

    out = [torch.from_numpy(normalise(np.ascontiguousarray(p.detach().cpu().numpy()))[0]) for p in pixels]
    return torch.stack(out).to(pixels.device)


def specfm_encoder(backbone_checkpoint: str | Path | None = None, checkpoint: str | Path | None = None,
                   **kwargs) -> SpecFMBackbone:
    """TerraTorch backbone builder: ``backbone_checkpoint`` (or ``checkpoint``) names the export; other keywords go to
    :class:`SpecFMBackbone` (``layers``, ``sensor``, ``level``, ``wavelengths``, ``fwhm``, ``normalise``...)."""
    path = backbone_checkpoint or checkpoint
    if path is None:
        raise ValueError("specfm_encoder needs backbone_checkpoint= (an export folder, release folder or hub id)")
    return SpecFMBackbone(path, **kwargs)


def register_terratorch() -> bool:
    """Register :func:`specfm_encoder` in TerraTorch's backbone registry; False when TerraTorch is not installed."""
    try:
        from terratorch.registry import TERRATORCH_BACKBONE_REGISTRY
    except ImportError:
        return False
    if "specfm_encoder" not in TERRATORCH_BACKBONE_REGISTRY:
        TERRATORCH_BACKBONE_REGISTRY.register(specfm_encoder)
    return True


register_terratorch()
