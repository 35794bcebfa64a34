"""Masked autoencoder around the shared encoder: 0.75 random masking, a lighter decoder, and a HyperLinear
output that reconstructs every band present from each decoded token (SpecAware).

Learning-recipe options (:class:`~pretrain.models.args.ModelArgs`, issue 11): ``band_mask_ratio`` hides
that fraction of each sample's bands from the encoder (spectral masking: the hidden bands are then predicted
at every patch, so reconstruction needs inter-band structure); ``head_condition="meta"`` conditions the output
layer on the bands' metadata only; ``visible_loss_weight`` scores the visible patches too (every band);
``cond_decorrelation`` adds the band-condition decorrelation term.
"""

from __future__ import annotations

import torch
from torch import nn

from ..losses import condition_decorrelation, reconstruction_loss
from .args import ModelArgs
from .contract import Objective
from .encoder import block_macs
from .hyper import FixedLinear, HyperLinear
from .layers import Block, Blocks, Linear, from_patches, pos_embed, to_patches
from .vocab import Vocabulary


def random_mask(b: int, n: int, ratio: float, device: torch.device,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exactly ``round(ratio * n)`` masked tokens per sample (at least one kept).

    Returns ``mask [B,N]`` bool (True = masked), ``keep [B,n_keep]`` and ``restore [B,N]`` indices."""
    n_mask = min(max(int(round(ratio * n)), 0), n - 1)
    noise = torch.rand(b, n, device=device, generator=generator)
    shuffle = noise.argsort(1)
    restore = shuffle.argsort(1)
    keep = shuffle[:, : n - n_mask]
    mask = torch.ones(b, n, dtype=torch.bool, device=device)
    mask.scatter_(1, keep, False)
    return mask, keep, restore


def random_band_mask(b: int, c: int, ratio: float, device: torch.device,
                     generator: torch.Generator | None = None, band_mask: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly ``round(ratio * c)`` hidden bands per sample (at least one kept), drawn per sample.

    Returns ``hidden [B,C]`` bool (True = hidden from the encoder) and ``visible [B,c_vis]`` band indices in
    ascending order (the encoder sees the bands in their own order). With ``band_mask [B,C]`` (a mixed batch:
    sample b's ``C_b`` real bands are the prefix) each sample hides ``round(ratio * C_b)`` of its own real bands
    (at least one kept), padded bands are never hidden, and ``visible`` is padded to the largest count with the
    index ``c`` (past every band: ``visible < c`` is the mask of real entries). The same draws either way: an
    all-True ``band_mask`` gives exactly the bands of no mask."""
    order = torch.rand(b, c, device=device, generator=generator).argsort(1)
    if band_mask is None:
        n_hide = min(max(int(round(ratio * c)), 0), c - 1)
        visible = order[:, : c - n_hide].sort(1).values
        hidden = torch.ones(b, c, dtype=torch.bool, device=device)
        hidden.scatter_(1, visible, False)
        return hidden, visible
    real = band_mask.bool()
    n_real = real.sum(1)
    n_vis = n_real - torch.minimum(torch.round(ratio * n_real.double()).long().clamp_min(0), n_real - 1)
    # the real bands in the draw's order (a stable sort keeps the order among real and among padded bands)
    order = torch.gather(order, 1, torch.gather(~real, 1, order).to(torch.uint8).argsort(dim=1, stable=True))
    c_vis = int(n_vis.max())
    vmask = torch.arange(c_vis, device=device)[None] < n_vis[:, None]
    visible = torch.where(vmask, order[:, :c_vis], c).sort(1).values  # padded entries (= c) sort last
    seen = torch.zeros(b, c + 1, dtype=torch.bool, device=device)
    seen.scatter_(1, visible, True)
    return real & ~seen[:, :c], visible


class MAE(Objective):
    """``model(batch) -> {"loss", "pred" [B,C,H,W], "mask" [B,H/p,W/p], "charbonnier", "sam"}``.

    Follows :mod:`pretrain.models.contract`."""

    objective = "mae"

    def __init__(self, args: ModelArgs, vocab: Vocabulary | None = None, compute_text: bool = True) -> None:
        super().__init__(args, vocab, compute_text)
        dd = args.decoder_dim
        self.decoder_embed = Linear(args.dim, dd, init="xavier")
        self.mask_token = nn.Parameter(torch.empty(dd))
        self.decoder_blocks = Blocks(Block(dd, args.decoder_heads, args.mlp_ratio, init="xavier")
                                     for _ in range(args.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dd)
        if args.patch_embed == "hyper":
            self.head = HyperLinear(args.cond_dim, args.patch_size, args.rank, dd)
        else:
            self.head = FixedLinear(args.fixed_bands, args.patch_size, dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """This module's own parameter (children initialise themselves)."""
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        enc, a = self.encoder, self.args
        pixels = batch["pixels"]
        valid = batch.get("valid")
        wl, fw, sensor, level = batch["wavelengths"], batch["fwhm"], batch.get("sensor"), batch.get("level")
        b, c, hh, ww = pixels.shape
        p = a.patch_size
        h, w = hh // p, ww // p
        n = h * w
        mask, keep, restore = random_mask(b, n, a.mask_ratio, pixels.device, generator)
        band_mask = batch.get("band_mask")  # a mixed batch (pretrain.data.mixed): padded bands count nowhere
        hidden = None
        px_in, wl_in, fw_in, mask_in = pixels, wl, fw, band_mask
        if a.band_mask_ratio > 0 and c > 1:
            # spectral masking; in a mixed batch each sample hides its share of its own real bands (padding is
            # never drawn) and the encoder sees its visible ones as a prefix (mask_in)
            hidden, vis = random_band_mask(b, c, a.band_mask_ratio, pixels.device, generator, band_mask)
            if band_mask is not None:
                mask_in, vis = vis < c, vis.clamp_max(c - 1)
            px_in = torch.gather(pixels, 1, vis[:, :, None, None].expand(-1, -1, hh, ww))
            wl_in, fw_in = torch.gather(wl, 1, vis), torch.gather(fw, 1, vis)
            if mask_in is not None:
                px_in = px_in * mask_in[:, :, None, None].to(px_in.dtype)
                wl_in, fw_in = wl_in * mask_in, fw_in * mask_in
        # only the visible tokens are embedded (the same values as embedding all, then gathering them)
        x, cond = enc.embed(px_in, wl_in, fw_in, sensor, level, valid, batch.get("gsd"),
                            cell_weight=(~mask).float(), keep=keep, band_mask=mask_in)
        x = enc.blocks_forward(x)
        # decoder: visible tokens + mask tokens back in place
        x = self.decoder_embed(x)
        dd = x.shape[-1]
        full = torch.cat([x, self.mask_token.to(x.dtype).expand(b, n - x.shape[1], dd)], 1)
        full = torch.gather(full, 1, restore.unsqueeze(-1).expand(-1, -1, dd))
        full = full + pos_embed(h, w, dd, full.device).to(full.dtype)
        full = self.decoder_norm(self.decoder_blocks(full))
        if cond is None:
            out = self.head(full)  # [B,C,N,P]
        else:
            out = self.head(full, self.head_condition(batch, cond))
        target = to_patches(pixels, p)
        patch_w = mask.float()
        if a.visible_loss_weight > 0:  # the visible patches count too (autoencoding of what the encoder saw)
            patch_w = patch_w + a.visible_loss_weight * (~mask).float()
        weight = patch_w.unsqueeze(-1).expand(-1, -1, p * p)
        if hidden is not None:  # masked patches in every band, and the hidden bands of the visible patches
            weight = torch.maximum(weight.unsqueeze(1), hidden.float()[:, :, None, None])
        if valid is not None:
            vw = to_patches(valid.unsqueeze(1).float(), p)[:, 0]
            weight = weight * (vw.unsqueeze(1) if hidden is not None else vw)
        losses = reconstruction_loss(out, target, weight, a.charbonnier_weight, a.sam_weight, a.charbonnier_eps,
                                     band_mask)
        if a.cond_decorrelation > 0 and cond is not None:
            dec = condition_decorrelation(cond, mask_in)
            losses["loss"] = losses["loss"] + a.cond_decorrelation * dec
            losses["cond_decorrelation"] = dec.detach()
        losses["pred"] = from_patches(out.detach(), h, w, p)
        losses["mask"] = mask.view(b, h, w)
        if hidden is not None:
            losses["hidden_bands"] = hidden
        return losses

    def head_condition(self, batch: dict, cond: torch.Tensor) -> torch.Tensor:
        """The output layer's band conditions ``[B, C, d]`` for every band of the batch: the encoder's own
        (``head_condition="content"``, no spectral masking) or the meta encoder's without image content."""
        if self.args.head_condition == "content":
            return cond
        b, c = batch["wavelengths"].shape
        enc = self.encoder
        zero = cond.new_zeros(b, c, cond.shape[-1])
        return enc.meta(batch["wavelengths"], batch["fwhm"], batch.get("sensor"), batch.get("level"), zero,
                        batch.get("band_mask"))

    def flops_per_sample(self, n_bands: int, image_size: int) -> float:
        """Training FLOPs (forward + backward = 3 x forward matmul FLOPs) per sample at this band count and
        square image size, counting the visible tokens in the encoder and all tokens in the decoder."""
        a = self.args
        n = (image_size // a.patch_size) ** 2
        n_vis = n - min(max(int(round(a.mask_ratio * n)), 0), n - 1)
        P = a.patch_size ** 2
        dd = a.decoder_dim
        f = self.encoder.embed_flops(n_bands, image_size, n_vis) + self.encoder.blocks_flops(n_vis)
        f += 2.0 * (n_vis * a.dim * dd + a.decoder_depth * block_macs(n, dd, a.mlp_ratio))
        if a.patch_embed == "hyper":
            f += 2.0 * (n_bands * a.cond_dim * (a.rank * dd + a.rank * P + P)
                        + n * dd * n_bands * a.rank + n_bands * n * a.rank * P)
        else:
            f += 2.0 * n * dd * n_bands * P
        return 3.0 * f
