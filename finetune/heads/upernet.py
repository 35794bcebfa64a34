"""UperNet over four levels of ViT features (Xiao et al. 2018, as used for ViTs by BEiT/MAE).

Tokens from four transformer blocks are reshaped to the token grid and brought to four scales
(x4 by two transposed convolutions, x2 by one, identity, /2 by max pooling); a pyramid pooling
module on the coarsest level and an FPN top-down path fuse them; logits are upsampled to the input.
GroupNorm instead of BatchNorm keeps it usable with batches of one.

``pixel_skip`` (default on) adds a full-resolution spectral branch: each pixel's spectrum through a
band-conditioned projection (:class:`finetune.heads.spectral.HyperIn`) joins the upsampled pyramid features
before a last 3x3 layer and the classifier. Tokens cover ``patch x patch`` pixels, so without it the head
cannot draw a boundary inside a token: on the synthetic suite (materials in regions of a few pixels) UperNet
alone scored OA 0.23 +- 0.03 / mIoU 0.14 +- 0.02 (3 seeds) where a per-pixel linear classifier of the raw
spectra scores OA 0.99; with the branch OA 0.83 +- 0.01 / mIoU 0.49 +- 0.00 (2 seeds; 60 steps, random-init
debug encoder). Class weights and more steps were not the cause: without weights OA 0.35, with 300 steps the
training loss fell to 0.04 and OA stayed 0.30-0.34 (the head fitted the training half's layout). ``pixel_skip: false`` is the
plain UperNet of PANGAEA and the ViT papers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from data_prep.configtree import ConfigError
from finetune.heads.spectral import HyperIn


def _cnr(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
                         nn.GroupNorm(max(1, min(8, cout // 2)), cout), nn.ReLU(inplace=True))  # >= 2 channels a group


class PPM(nn.Module):
    """Pyramid pooling: adaptive average pools at several bins, projected, upsampled, concatenated."""

    def __init__(self, cin: int, ch: int, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.bins = tuple(bins)
        self.stages = nn.ModuleList(_cnr(cin, ch, 1) for _ in self.bins)
        self.bottleneck = _cnr(cin + ch * len(self.bins), ch, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        outs = [x] + [F.interpolate(s(F.adaptive_avg_pool2d(x, b)), size=(h, w), mode="bilinear",
                                    align_corners=False) for b, s in zip(self.bins, self.stages)]
        return self.bottleneck(torch.cat(outs, 1))


class UperNet(nn.Module):
    """Segmentation head; ``forward`` returns logits ``[B, n_classes, H, W]``.

    ``feature_multiplier`` widens the pyramid's input (2 for the Siamese "concat" merge); ``dropout`` is the
    ``Dropout2d`` before the classifier (PANGAEA: 0.1). :meth:`encode` (encoder tokens -> four maps) and
    :meth:`decode` (maps -> logits) are the two halves a Siamese head reuses."""

    def __init__(self, encoder: nn.Module, n_classes: int, layers: Sequence[int] | None = None,
                 channels: int = 64, pixel_skip: bool = True, feature_multiplier: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.layers = tuple(layers) if layers is not None else tuple(encoder.default_layers())
        if len(self.layers) != 4:
            raise ConfigError(f"UperNet needs four feature layers, got {self.layers}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"UperNet dropout must lie in [0, 1), got {dropout}")
        d = encoder.embed_dim * feature_multiplier
        self.rescale = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(d, d, 2, 2), nn.GroupNorm(min(8, d), d), nn.GELU(),
                          nn.ConvTranspose2d(d, d, 2, 2)),
            nn.ConvTranspose2d(d, d, 2, 2),
            nn.Identity(),
            nn.MaxPool2d(2, ceil_mode=True),
        ])
        self.ppm = PPM(d, channels)
        self.lateral = nn.ModuleList(_cnr(d, channels, 1) for _ in range(3))
        self.fpn = nn.ModuleList(_cnr(channels, channels, 3) for _ in range(3))
        self.fuse = _cnr(4 * channels, channels, 3)
        self.pixel_skip = pixel_skip
        if pixel_skip:
            self.pixel = HyperIn(channels)
            self.pixel_norm = nn.Sequential(nn.GroupNorm(max(1, min(8, channels // 2)), channels), nn.GELU())
            self.merge = _cnr(2 * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout else nn.Identity()
        self.classifier = nn.Conv2d(channels, n_classes, 1)

    def encode(self, pixels: torch.Tensor, wavelengths: torch.Tensor, fwhm: torch.Tensor, sensor=None,
               level=None) -> list[torch.Tensor]:
        """The encoder's tokens after each of ``layers`` as maps ``[B, D, H / patch, W / patch]`` (no gradient
        into a frozen encoder)."""
        b, _, h, w = pixels.shape
        gh, gw = self.encoder.grid(h, w)
        frozen = getattr(self.encoder, "frozen", False)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            feats = self.encoder.features(pixels, wavelengths, fwhm, sensor=sensor, level=level, layers=self.layers)
        return [f.transpose(1, 2).reshape(b, -1, gh, gw) for f in feats]

    def decode(self, maps: list[torch.Tensor], size: tuple[int, int], pixels: torch.Tensor | None = None,
               wavelengths: torch.Tensor | None = None, fwhm: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, n_classes, *size]`` from four maps (``pixels`` and its band table feed the pixel branch)."""
        maps = [m(x) for m, x in zip(self.rescale, maps)]
        top = self.ppm(maps[3])
        lat = [lt(x) for lt, x in zip(self.lateral, maps[:3])] + [top]
        for i in range(2, -1, -1):
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="bilinear", align_corners=False)
        outs = [self.fpn[i](lat[i]) for i in range(3)] + [top]
        fused = self.fuse(torch.cat([outs[0]] + [F.interpolate(o, size=outs[0].shape[-2:], mode="bilinear",
                                                               align_corners=False) for o in outs[1:]], 1))
        if not self.pixel_skip:
            return F.interpolate(self.classifier(self.dropout(fused)), size=size, mode="bilinear", align_corners=False)
        full = F.interpolate(fused, size=size, mode="bilinear", align_corners=False)
        px = self.pixel_norm(self.pixel(pixels, wavelengths, fwhm))
        return self.classifier(self.dropout(self.merge(torch.cat([full, px], 1))))

    def forward(self, pixels: torch.Tensor, wavelengths: torch.Tensor, fwhm: torch.Tensor,
                sensor=None, level=None) -> torch.Tensor:
        maps = self.encode(pixels, wavelengths, fwhm, sensor, level)
        return self.decode(maps, pixels.shape[-2:], pixels, wavelengths, fwhm)


def class_weights(labels: torch.Tensor, n_classes: int, ignore_index: int = -1) -> torch.Tensor:
    """Median-frequency balancing weights for weighted cross-entropy (0 for absent classes)."""
    lab = labels[labels != ignore_index].long()
    counts = torch.bincount(lab, minlength=n_classes).float()
    freq = counts / counts.sum().clamp(min=1)
    present = counts > 0
    w = torch.zeros(n_classes)
    if present.any():
        w[present] = freq[present].median() / freq[present]
    return w


def pangaea_window_starts(size: int, window: int) -> list[int]:
    """PANGAEA's sliding-inference grid along one axis: ``ceil(size / window)`` windows spread evenly
    (``linspace(0, size - window, n)``, rounded; :mod:`finetune.tasks.pangaea`); one window when it covers all."""
    if size <= window:
        return [0]
    n = -(-size // window)
    return [int(v) for v in torch.linspace(0, size - window, n).round().long().tolist()]


@torch.no_grad()
def predict_scene(model: nn.Module, image: torch.Tensor | tuple[torch.Tensor, ...], wavelengths: torch.Tensor,
                  fwhm: torch.Tensor, n_classes: int, window: int, stride: int | None, sensor=None, level=None,
                  batch_size: int = 8, average: str = "probabilities") -> torch.Tensor:
    """Class scores ``[n_classes, H, W]`` of a whole scene ``[C, H, W]`` (or a tuple of co-registered dates, each
    ``[C, H, W]``, for a Siamese model ``model(t1, t2, wavelengths, fwhm, ...)``) by sliding windows:
    ``average="probabilities"`` (softmax first) or ``"logits"`` (PANGAEA's evaluator).

    - ``stride`` given: windows every ``stride`` pixels, cross-faded over the overlaps by
      :func:`finetune.windows.blend` (the grid and weights whole-scene inference uses); windows reaching past
      the scene see it edge-replicated.
    - ``stride=None``: PANGAEA's grid (:func:`pangaea_window_starts`), plain mean where windows overlap; a scene
      smaller than the window is padded (replicate)."""
    from finetune.windows import Axis, blend

    if average not in ("probabilities", "logits"):
        raise ValueError(f"average must be 'probabilities' or 'logits', got {average!r}")
    images = image if isinstance(image, tuple) else (image,)
    c, h, w = images[0].shape
    model.eval()
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))

    def scores(origins, images):
        crops = [torch.stack([im[:, y:y + window, x0:x0 + window] for y, x0 in origins]).to(dev) for im in images]
        out = model(*crops, wavelengths, fwhm, sensor=sensor, level=level).float()
        return out.softmax(1) if average == "probabilities" else out

    def padded(ph: int, pw: int) -> tuple[torch.Tensor, ...]:
        return tuple(F.pad(im[None], (0, pw, 0, ph), mode="replicate")[0] for im in images) if ph or pw else images

    if stride is not None:
        ims = padded(Axis(h, window, stride).padded - h, Axis(w, window, stride).padded - w)
        out = blend(lambda origins: scores(origins, ims), (h, w), window, stride, batch_size)
        assert out.shape[0] == n_classes, (out.shape, n_classes)
        return out
    ims = padded(max(0, window - h), max(0, window - w))
    H, W = ims[0].shape[-2:]
    acc = torch.zeros(n_classes, H, W)
    cnt = torch.zeros(1, H, W)
    origins = [(y, x) for y in pangaea_window_starts(H, window) for x in pangaea_window_starts(W, window)]
    for i in range(0, len(origins), batch_size):
        chunk = origins[i:i + batch_size]
        for (y, x0), p in zip(chunk, scores(chunk, ims).cpu()):
            acc[:, y:y + window, x0:x0 + window] += p
            cnt[:, y:y + window, x0:x0 + window] += 1
    return (acc / cnt)[:, :h, :w]
