"""The user-facing encoder: ``finetune.load_encoder(path)``.

Wraps the encoder exported by ``pretrain.models.export.save_encoder`` (``encoder.safetensors`` +
``model_args.json``; no DeepSpeed, no pickle) so that callers pass sensor and level *names*::

    enc = finetune.load_encoder("runs/demo/export/stage3")
    tokens = enc(pixels, wavelengths, fwhm, sensor="emit", level="L2")   # [B, N, D]
    enc.freeze()      # linear probing; enc.unfreeze() for full fine-tuning

``pixels`` is ``[B, C, H, W]`` (any C; H and W multiples of ``enc.patch_size``), ``wavelengths`` and
``fwhm`` are ``[B, C]`` or ``[C]`` in nm. ``sensor`` / ``level`` are a name, a list of B names, or
None; None or a name the export's vocabulary does not hold means "unknown" (index 0, warned once per name).
Names are mapped by the export's own vocabulary (:class:`pretrain.models.vocab.Vocabulary`, the map
pretraining used): sensors case-insensitively ("EMIT" is "emit"), levels by their product-level family
("l2", "L2A", "L2B" are "L2"; "L1B", "L1C" are "L1"). Loading is ``pretrain.models.export``'s, with its
:class:`ExportError`.

TorchGeo samples work as they come: ``enc(sample)`` with ``sample["image"]`` ``[C, H, W]`` / ``[B, C, H, W]`` and
``sample["wavelength"]`` (TorchGeo gives micrometres: centres all below 100 are taken as um and converted); FWHM
from ``sample["fwhm"]`` or the spacing of the centres. The same unit rule applies to tensors passed directly.

Inputs should be prepared as pretraining prepared them (:func:`data_prep.spectral.normalise`): bad
bands (the registry's water-vapour and edge ranges) dropped, each band clipped to its 1st/99th percentile and
standardised, nodata pixels set to 0 after standardisation; :func:`finetune.datasets.normalise` does this
per image. Optional ``valid`` ``[B, H, W]`` (bool) and ``gsd`` ``[B]`` (m) are passed to the encoder as
pretraining passed them (nodata pixels ignored by the content encoder; GSD-scaled positions where the
export was trained with ``gsd_pos``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from pretrain.models.export import EXPORT_FILES, ExportError, export_dir, read_meta
from pretrain.models.vocab import Vocabulary

__all__ = ["EXPORT_FILES", "Encoder", "ExportError", "check_export", "load_encoder", "wrap_encoder"]

Names = str | Sequence[str | None] | None

_WARNED: set[tuple[str, str]] = set()


class Encoder(nn.Module):
    """A pretrained encoder taking sensor/level names. See the module docstring."""

    def __init__(self, inner: nn.Module, args: dict | None = None, source: str = "") -> None:
        super().__init__()
        self.inner = inner
        self.args = dict(args or {})
        self.source = source
        vocab = getattr(inner, "vocab", None)
        if not isinstance(vocab, Vocabulary):
            raise TypeError(f"the encoder API needs an encoder with a .vocab (pretrain.models.vocab.Vocabulary), "
                            f"got {type(inner).__name__}")
        self.vocab = vocab

    @property
    def sensor_vocab(self) -> tuple[str, ...]:
        return self.vocab.sensors

    @property
    def levels(self) -> tuple[str, ...]:
        return self.vocab.levels

    @property
    def embed_dim(self) -> int:
        return int(self.inner.embed_dim)

    @property
    def patch_size(self) -> int:
        return int(self.inner.patch_size)

    @property
    def depth(self) -> int:
        """Number of transformer blocks (for choosing ``features`` layers)."""
        for name in ("depth", "n_layers", "num_layers"):
            if hasattr(self.inner, name):
                return int(getattr(self.inner, name))
        blocks = getattr(self.inner, "blocks", None)
        if blocks is not None:
            return len(blocks)
        raise AttributeError("the encoder exposes no depth/blocks")

    def freeze(self) -> Encoder:
        """Stop gradients into every encoder parameter and put it in eval mode (linear probing)."""
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        self._frozen = True
        return self

    def unfreeze(self) -> Encoder:
        """Make every encoder parameter trainable again (full fine-tuning)."""
        for p in self.parameters():
            p.requires_grad_(True)
        self._frozen = False
        return self

    @property
    def frozen(self) -> bool:
        return bool(getattr(self, "_frozen", False))

    def train(self, mode: bool = True) -> Encoder:
        # A frozen encoder stays in eval mode even when the head around it trains.
        return super().train(mode and not self.frozen)

    def _indices(self, names: Names, kind: str, batch: int, device: torch.device) -> torch.Tensor | None:
        if names is None:
            return None
        if isinstance(names, str):
            names = [names] * batch
        names = list(names)
        if len(names) != batch:
            raise ValueError(f"got {len(names)} names for a batch of {batch}")
        vocab = self.vocab.sensors if kind == "sensor" else self.vocab.levels
        idx = []
        for n in names:
            i = self.vocab.lookup(n, kind)
            if n is not None and i is None and (n, vocab[-1]) not in _WARNED:
                _WARNED.add((n, vocab[-1]))
                warnings.warn(f"{n!r} is not in the encoder's vocabulary {list(vocab)}; using 'unknown' (index 0)",
                              stacklevel=4)
            idx.append(i or 0)
        return torch.tensor(idx, dtype=torch.int64, device=device)

    def _prepare(self, pixels, wavelengths, fwhm, sensor, level):
        if isinstance(pixels, dict):  # a TorchGeo-style sample: image + wavelength
            pixels, wavelengths, fwhm = from_sample(pixels, wavelengths, fwhm)
        if pixels.ndim == 3:
            pixels = pixels[None]
        if pixels.ndim != 4:
            raise ValueError(f"pixels must be [B, C, H, W], got shape {tuple(pixels.shape)}")
        b, c, h, w = pixels.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"pixels are {h}x{w}; expected multiples of the encoder's patch size {p}")
        wl = to_nm(torch.as_tensor(wavelengths, dtype=torch.float32, device=pixels.device))
        fw = spacing_fwhm(wl) if fwhm is None else torch.as_tensor(fwhm, dtype=torch.float32, device=pixels.device)
        if fwhm is not None and float(wl.max()) > 100 and float(fw.max()) < 1:  # micrometres like the centres
            fw = fw * 1000
        if wl.ndim == 1:
            wl = wl.expand(b, -1)
        if fw.ndim == 1:
            fw = fw.expand(b, -1)
        if wl.shape != (b, c) or fw.shape != (b, c):
            raise ValueError(f"wavelengths {tuple(wl.shape)} and fwhm {tuple(fw.shape)} must be [B, C] = [{b}, {c}]")
        s = self._indices(sensor, "sensor", b, pixels.device)
        lv = self._indices(level, "level", b, pixels.device)
        return pixels.float(), wl.contiguous(), fw.contiguous(), s, lv

    def forward(self, pixels: torch.Tensor | dict, wavelengths: torch.Tensor | None = None,
                fwhm: torch.Tensor | None = None, sensor: Names = None, level: Names = None, valid: torch.Tensor | None = None,
                gsd: torch.Tensor | float | None = None) -> torch.Tensor:
        """Patch tokens ``[B, N, D]``, N = (H / patch) * (W / patch)."""
        x, wl, fw, s, lv = self._prepare(pixels, wavelengths, fwhm, sensor, level)
        return self.inner(x, wl, fw, sensor=s, level=lv, **self._extra(x, valid, gsd))

    def features(self, pixels: torch.Tensor | dict | None = None, wavelengths: torch.Tensor | None = None,
                 fwhm: torch.Tensor | None = None, sensor: Names = None, level: Names = None, layers: Sequence[int] = (0, 1, 2, 3),
                 valid: torch.Tensor | None = None, gsd: torch.Tensor | float | None = None,
                 views: Sequence[dict] | None = None) -> list[torch.Tensor]:
        """Tokens ``[B, N, D]`` after each of the given transformer blocks (for UperNet).

        ``views``: co-located views of the same places (one dict per sensor: ``pixels``, ``wavelengths``, ``fwhm``,
        ``ground`` [B, 2, 3] pixel -> metres, optionally ``sensor``/``level`` names or indices, ``valid``, ``gsd``,
        ``band_mask``; a co-located loader's views as they come, see ``/work/coord/COLOCATED.md``): each level is
        fused by the encoder's cross-sensor module on the first view's token grid (exports with ``fusion_depth``
        >= 1)."""
        if views is not None:
            return list(self.inner.features(layers=tuple(layers), views=[self._view(v) for v in views]))
        x, wl, fw, s, lv = self._prepare(pixels, wavelengths, fwhm, sensor, level)
        return list(self.inner.features(x, wl, fw, sensor=s, level=lv, layers=tuple(layers),
                                        **self._extra(x, valid, gsd)))

    def _view(self, v: dict) -> dict:
        """One co-located view in the inner encoder's terms (names -> indices, units, shapes checked)."""
        if "ground" not in v:
            raise ValueError("a co-located view needs 'ground' [B, 2, 3] (crop pixel -> metres on the common grid)")
        sensor, level = v.get("sensor"), v.get("level")
        x, wl, fw, s, lv = self._prepare(v["pixels"], v["wavelengths"], v.get("fwhm"),
                                         None if isinstance(sensor, torch.Tensor) else sensor,
                                         None if isinstance(level, torch.Tensor) else level)
        out = {"pixels": x, "wavelengths": wl, "fwhm": fw, "ground": torch.as_tensor(v["ground"], device=x.device),
               "sensor": sensor if isinstance(sensor, torch.Tensor) else s,
               "level": level if isinstance(level, torch.Tensor) else lv,
               **self._extra(x, v.get("valid"), v.get("gsd"))}
        if v.get("band_mask") is not None:
            out["band_mask"] = torch.as_tensor(v["band_mask"], device=x.device).bool()
        return out

    @staticmethod
    def _extra(x: torch.Tensor, valid, gsd) -> dict:
        out = {}
        b, _, h, w = x.shape
        if valid is not None:
            v = torch.as_tensor(valid, device=x.device).bool()
            if v.shape != (b, h, w):
                raise ValueError(f"valid {tuple(v.shape)} must be [B, H, W] = [{b}, {h}, {w}]")
            out["valid"] = v
        if gsd is not None:
            out["gsd"] = torch.as_tensor(gsd, dtype=torch.float32, device=x.device).reshape(-1).expand(b)
        return out

    def grid(self, h: int, w: int) -> tuple[int, int]:
        """Token grid (rows, cols) of an h x w input."""
        return h // self.patch_size, w // self.patch_size

    def default_layers(self) -> tuple[int, ...]:
        """Four block indices spread over the depth (e.g. 3, 5, 7, 11 of 12)."""
        d = self.depth
        if d >= 4:
            return tuple(sorted({max(0, round(d * f) - 1) for f in (0.25, 0.5, 0.75, 1.0)}))
        return tuple(min(i, d - 1) for i in range(4))


def to_nm(wavelengths: torch.Tensor) -> torch.Tensor:
    """Band centres in nm: values all below 100 are micrometres (TorchGeo's unit; no sensor has centres under
    100 nm) and are multiplied by 1000."""
    return wavelengths * 1000 if wavelengths.numel() and float(wavelengths.max()) < 100 else wavelengths


def spacing_fwhm(wl_nm: torch.Tensor) -> torch.Tensor:
    """FWHM taken as the spacing of the centres (nm) when a sample carries none."""
    if wl_nm.shape[-1] < 2:
        return torch.full_like(wl_nm, 10.0)
    return torch.gradient(wl_nm, dim=-1)[0].abs()


def from_sample(sample: dict, wavelengths=None, fwhm=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(pixels, wavelengths, fwhm) of a TorchGeo-style sample: ``image`` ``[C, H, W]`` or ``[B, C, H, W]`` and
    ``wavelength`` (or ``wavelengths``) in micrometres or nm; ``fwhm`` optional (else from the spacing)."""
    if "image" not in sample:
        raise ValueError(f"a sample dict needs an 'image' entry; it has {sorted(sample)}")
    wl = sample.get("wavelength", sample.get("wavelengths", wavelengths))
    if wl is None:
        raise ValueError("a sample dict needs 'wavelength' (band centres, um or nm) or wavelengths= given")
    img = torch.as_tensor(sample["image"])
    return (img if img.ndim == 4 else img[None]), torch.as_tensor(wl, dtype=torch.float32), \
        sample.get("fwhm", fwhm)


def check_export(path: str | Path) -> Path:
    """The export directory, or an :class:`ExportError` naming what is missing or malformed."""
    p = export_dir(path)
    read_meta(p)
    return p


def load_encoder(path: str | Path, map_location: str = "cpu", download: bool = False) -> Encoder:
    """Load an exported encoder as an :class:`Encoder`: an export folder (encoder.safetensors +
    model_args.json), a release folder (config.json + model.safetensors, ``pretrain/release.py``), or a
    Hugging Face hub id (``owner/name``; needs ``huggingface_hub``; from its local cache unless ``download``)."""
    from pretrain.models.export import load_encoder as _load
    from pretrain.release import resolve

    p = check_export(resolve(path, download=download))
    return Encoder(_load(p, map_location=map_location), read_meta(p), source=str(p)).eval()


def wrap_encoder(inner: nn.Module, args: dict | None = None) -> Encoder:
    """Wrap an in-memory ``pretrain.models`` encoder (e.g. ``model.encoder``) in the name-taking API."""
    return inner if isinstance(inner, Encoder) else Encoder(inner, args)
