"""Model arguments: one dataclass, a dict of named sizes (``MODEL_SIZES``) from a tiny debug size to huge."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from data_prep import configtree
from data_prep.errors import UserError


class ModelError(UserError):
    """Bad model arguments, an unknown size name, or an export that does not fit."""


@dataclass(frozen=True)
class ModelArgs:
    """Every shape and objective setting of the encoder, the MAE decoder and the JEPA predictor."""

    name: str = "custom"
    """Size name this came from (provenance only)."""
    dim: int = 768
    """Token width of the ViT encoder."""
    depth: int = 12
    """ViT encoder blocks."""
    heads: int = 12
    """Attention heads of the encoder (dim must divide by it)."""
    mlp_ratio: float = 4.0
    """MLP hidden width / dim in every transformer block."""
    patch_size: int = 8
    """Side of a square patch in pixels; images must be multiples of it."""
    cond_dim: int = 128
    """Width of the per-band condition (meta + content encoders, spectral transformer)."""
    cond_heads: int = 4
    """Heads of the fusion cross-attention and the spectral transformer."""
    spectral_depth: int = 2
    """Transformer layers across bands in the meta encoder."""
    rank: int = 32
    """Rank r of the hypernetwork factorisation W_band = V (p*p x r) U (r x D)."""
    n_freq: int = 16
    """Fourier frequencies of the centre wavelength (log-spaced periods from 2 nm to 4.4 um)."""
    content_hidden: int = 32
    """Hidden width of the content encoder's per-cell MLP."""
    text_dim: int = 384
    """Width of the frozen text embeddings (MiniLM-L6: 384)."""
    decoder_dim: int = 512
    """MAE decoder token width."""
    decoder_depth: int = 8
    """MAE decoder blocks."""
    decoder_heads: int = 16
    """MAE decoder heads."""
    mask_ratio: float = 0.75
    """Fraction of patches masked per sample (exact count: round(ratio * N))."""
    charbonnier_weight: float = 1.0
    """Weight of the Charbonnier term of the MAE loss."""
    sam_weight: float = 1.0
    """Weight of the spectral-angle term of the MAE loss (radians)."""
    charbonnier_eps: float = 1e-3
    """Charbonnier epsilon."""
    gsd_pos: bool = False
    """Scale positions by GSD (metres / ref_gsd) when a batch gives ``gsd``."""
    ref_gsd: float = 30.0
    """Reference ground sampling distance in metres for ``gsd_pos``."""
    patch_embed: str = "hyper"
    """``hyper`` (any bands) or ``fixed`` (Conv2d over exactly ``fixed_bands`` bands; benchmark baseline)."""
    fixed_bands: int = 0
    """Band count of the ``fixed`` baseline."""
    pred_dim: int = 384
    """JEPA predictor width."""
    pred_depth: int = 4
    """JEPA predictor blocks."""
    pred_heads: int = 12
    """JEPA predictor heads."""
    jepa_band_frac: tuple[float, float] = (0.25, 0.75)
    """JEPA context: fraction of the batch's bands in the contiguous band window (uniform in range)."""
    jepa_crop_frac: tuple[float, float] = (0.5, 0.75)
    """JEPA context: fraction of the token grid side kept by the spatial crop (uniform in range)."""
    jepa_loss: str = "smooth_l1"
    """``smooth_l1`` or ``mse`` between predicted and layer-normed target tokens."""
    cond_decorrelation: float = 0.0
    """Weight of the band-condition decorrelation term (mean squared cosine similarity between the
    conditions of two bands of a sample, :func:`pretrain.losses.condition_decorrelation`); 0 = off."""
    band_mask_ratio: float = 0.0
    """MAE spectral masking: fraction of each sample's bands hidden from the encoder (exact count, at least
    one band kept); the loss also scores the hidden bands of the visible patches. 0 = off."""
    visible_loss_weight: float = 0.0
    """MAE: weight of the visible patches (every band) in the reconstruction loss, against 1 for the masked
    patches (and hidden bands): the encoder's own tokens must then keep what their patches' spectra hold
    (the MAE paper's "loss on all patches" ablation). 0 = the masked patches only. Measured (issue 11, debug
    MAE, 2,000 steps): weight 1 changed no bench/quality.py task beyond its noise."""
    head_condition: str = "content"
    """Conditions of the MAE output layer: ``content`` (the encoder's: meta + content) or ``meta``
    (wavelength, FWHM, sensor, level only, so per-band image statistics cannot reach the output)."""
    fusion_depth: int = 0
    """Cross-sensor fusion blocks of the encoder (:mod:`pretrain.models.fusion`; 0 = no fusion module). Needed for
    co-located group batches (JEPA) and ``encoder.features(..., views=...)``; part of the export."""

    def __post_init__(self) -> None:
        for k in ("dim", "depth", "heads", "patch_size", "cond_dim", "cond_heads", "rank", "n_freq",
                  "content_hidden", "text_dim", "decoder_dim", "decoder_depth", "decoder_heads",
                  "pred_dim", "pred_depth", "pred_heads"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise ModelError(f"model arg {k} must be a positive integer, got {v!r}")
        if not isinstance(self.fusion_depth, int) or self.fusion_depth < 0:
            raise ModelError(f"model arg fusion_depth must be an integer >= 0, got {self.fusion_depth!r}")
        if self.spectral_depth < 0:
            raise ModelError(f"model arg spectral_depth must be >= 0, got {self.spectral_depth}")
        for d, h, what in ((self.dim, self.heads, "dim/heads"), (self.cond_dim, self.cond_heads, "cond_dim/cond_heads"),
                           (self.decoder_dim, self.decoder_heads, "decoder_dim/decoder_heads"),
                           (self.pred_dim, self.pred_heads, "pred_dim/pred_heads")):
            if d % h:
                raise ModelError(f"model args {what}: {d} is not divisible by {h}")
        if self.dim % 4 or self.decoder_dim % 4 or self.pred_dim % 4:
            raise ModelError("dim, decoder_dim and pred_dim must be multiples of 4 (2-D sin-cos position embedding)")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ModelError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.patch_embed not in ("hyper", "fixed"):
            raise ModelError(f"patch_embed must be 'hyper' or 'fixed', got {self.patch_embed!r}")
        if self.patch_embed == "fixed" and self.fixed_bands < 1:
            raise ModelError("patch_embed='fixed' needs fixed_bands >= 1")
        if self.jepa_loss not in ("smooth_l1", "mse"):
            raise ModelError(f"jepa_loss must be 'smooth_l1' or 'mse', got {self.jepa_loss!r}")
        for k in ("jepa_band_frac", "jepa_crop_frac"):
            lo, hi = getattr(self, k)
            if not 0.0 < lo <= hi <= 1.0:
                raise ModelError(f"{k} must satisfy 0 < lo <= hi <= 1, got {(lo, hi)}")
        if self.cond_decorrelation < 0:
            raise ModelError(f"cond_decorrelation must be >= 0, got {self.cond_decorrelation}")
        if not 0.0 <= self.band_mask_ratio < 1.0:
            raise ModelError(f"band_mask_ratio must be in [0, 1), got {self.band_mask_ratio}")
        if self.visible_loss_weight < 0:
            raise ModelError(f"visible_loss_weight must be >= 0, got {self.visible_loss_weight}")
        if self.head_condition not in ("content", "meta"):
            raise ModelError(f"head_condition must be 'content' or 'meta', got {self.head_condition!r}")
        if self.band_mask_ratio > 0 and self.head_condition != "meta":
            raise ModelError("band_mask_ratio > 0 needs head_condition='meta' (the content of a hidden band "
                             "would give the output layer that band's values)")
        if self.charbonnier_weight < 0 or self.sam_weight < 0:
            raise ModelError("loss weights must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["jepa_band_frac"] = list(self.jepa_band_frac)
        d["jepa_crop_frac"] = list(self.jepa_crop_frac)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        """From a plain mapping (``model_args.json``): unknown keys and wrong types are a ModelError."""
        return configtree.build(cls, d, "model args", ModelError, what="model arg")

    def override(self, **overrides: Any) -> ModelArgs:
        """A copy with ``overrides`` applied (checked for unknown keys and field types)."""
        return configtree.replace(self, overrides, "overrides", ModelError, what="model override")


MODEL_SIZES: dict[str, ModelArgs] = {
    "debug": ModelArgs(name="debug", dim=64, depth=2, heads=2, cond_dim=32, cond_heads=2, spectral_depth=1,
                       rank=8, n_freq=8, content_hidden=16, decoder_dim=32, decoder_depth=1, decoder_heads=2,
                       pred_dim=32, pred_depth=1, pred_heads=2),
    "tiny": ModelArgs(name="tiny", dim=192, depth=12, heads=3, cond_dim=64, cond_heads=2, rank=16,
                      decoder_dim=128, decoder_depth=2, decoder_heads=4, pred_dim=96, pred_depth=2, pred_heads=3),
    "small": ModelArgs(name="small", dim=384, depth=12, heads=6, cond_dim=128, rank=32,
                       decoder_dim=256, decoder_depth=4, decoder_heads=8, pred_dim=192, pred_depth=4, pred_heads=6),
    "base": ModelArgs(name="base", dim=768, depth=12, heads=12),
    "large": ModelArgs(name="large", dim=1024, depth=24, heads=16, decoder_dim=512, decoder_depth=8,
                       decoder_heads=16, pred_dim=512, pred_depth=6, pred_heads=16),
    "huge": ModelArgs(name="huge", dim=1280, depth=32, heads=16, cond_dim=192, cond_heads=4, rank=48,
                      decoder_dim=512, decoder_depth=8, decoder_heads=16, pred_dim=640, pred_depth=8, pred_heads=16),
}


def get_args(name: str, **overrides: Any) -> ModelArgs:
    """The named size with ``overrides`` applied; a clear error for an unknown name or key."""
    if name not in MODEL_SIZES:
        raise ModelError(f"unknown model size {name!r}; known sizes: {sorted(MODEL_SIZES)}")
    return MODEL_SIZES[name].override(**overrides) if overrides else MODEL_SIZES[name]
