"""JEPA objective (after SpectralEarth-FM): a context encoder (the shared encoder) sees a local view, an EMA
target encoder sees the global view, and a predictor maps context tokens to the target's tokens.

Global view: all of the batch's bands, the full crop. Local view: a random contiguous band sub-window and
a smaller random crop aligned to the token grid (the same window and crop for the whole batch, so shapes
stay fixed; a new draw every step). The predictor gets the context tokens plus one query per global token
position and predicts every global token; the loss (smooth L1 or MSE) is against the target tokens after a
parameter-free LayerNorm. The target encoder has no gradients and moves only by :meth:`update_target`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import condition_decorrelation, latent_loss
from .args import ModelArgs, ModelError
from .contract import Objective
from .encoder import SpectralEncoder, _view_inputs, block_macs
from .fusion import ground_embed
from .layers import Block, Blocks, Linear, pos_embed, reset_parameters
from .vocab import Vocabulary

Storage = Callable[[nn.Parameter, nn.Parameter], Iterable[tuple[torch.Tensor, torch.Tensor]]]


class _Draws:
    """Torch's random state now (CPU, and the current CUDA device's), to draw the same values again later."""

    def __init__(self) -> None:
        self.cpu = torch.random.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from the saved state; afterwards the random state is as it was before the block."""
        devices = [torch.cuda.current_device()] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.random.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda)
            yield


def _randint(lo: int, hi: int, g: torch.Generator | None) -> int:
    return int(torch.randint(lo, hi + 1, (1,), generator=g).item())


def window_mask(band_mask: torch.Tensor, frac: float, start: float) -> torch.Tensor:
    """The context band window of a mixed batch: in each sample's ``C_b`` real bands, ``ceil(frac * C_b)``
    contiguous bands starting at ``floor(start * (C_b - k_b + 1))`` (``frac``/``start`` drawn once per batch, as the
    window of a single-store batch is), as a mask ``[B, C]``."""
    n = band_mask.sum(1, keepdim=True)  # [B,1] (real bands are the prefix, pretrain.data.mixed)
    k = torch.clamp(torch.ceil(frac * n), min=1).minimum(n)
    b0 = torch.floor(start * (n - k + 1)).clamp_max(n - k)
    idx = torch.arange(band_mask.shape[1], device=band_mask.device).unsqueeze(0)
    return band_mask & (idx >= b0) & (idx < b0 + k)


class JEPA(Objective):
    """``model(batch) -> {"loss", "band_window" [2], "crop" [4]}``; ``model.encoder`` is the context encoder.

    Follows :mod:`pretrain.models.contract`, as an EMA model (:meth:`update_target`)."""

    objective = "jepa"

    def __init__(self, args: ModelArgs, vocab: Vocabulary | None = None, compute_text: bool = True) -> None:
        draws = _Draws()  # the random state the encoder is drawn from, replayed for the target
        super().__init__(args, vocab, compute_text)
        # the target is its own module (zero.Init partitions it like any other) drawn from the same random
        # state as the encoder: equal to it bitwise, partitioned or not, with nothing copied
        with draws.replay():
            self.target_encoder = SpectralEncoder(args, self.encoder.vocab, compute_text)
        for p in self.target_encoder.parameters():
            p.requires_grad_(False)
        pd = args.pred_dim
        self.pred_embed = Linear(args.dim, pd, init="xavier")
        self.pred_query = nn.Parameter(torch.empty(pd))
        self.pred_blocks = Blocks(Block(pd, args.pred_heads, args.mlp_ratio, init="xavier")
                                  for _ in range(args.pred_depth))
        self.pred_norm = nn.LayerNorm(pd)
        self.pred_out = Linear(pd, args.dim, init="xavier")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """This module's own parameter (children initialise themselves)."""
        nn.init.normal_(self.pred_query, std=0.02)

    def init_weights(self) -> None:
        """Fresh weights for everything; the target again equal to the encoder (same draws replayed)."""
        draws = _Draws()
        reset_parameters(self.encoder)
        with draws.replay():
            reset_parameters(self.target_encoder)
        for name, child in self.named_children():
            if name not in ("encoder", "target_encoder"):
                reset_parameters(child)
        self.reset_parameters()

    @torch.no_grad()
    def update_target(self, momentum: float, storage: Storage | None = None) -> None:
        """EMA: ``target = momentum * target + (1 - momentum) * context`` (parameters); buffers copied.

        ``storage(target_param, context_param)`` gives the pairs of tensors that hold the two parameters'
        values on this process (default: the parameters themselves); under ZeRO-3 the engine passes one that
        gives the local partitions (``pretrain.engine.update_target``), so the update is exact there too and
        needs no communication."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        tp, op = [], []
        for t, o in zip(self.target_encoder.parameters(), self.encoder.parameters(), strict=True):
            for tt, oo in (storage(t, o) if storage is not None else ((t, o),)):
                tp.append(tt)
                op.append(oo.detach())
        if tp:
            torch._foreach_mul_(tp, momentum)
            torch._foreach_add_(tp, op, alpha=1.0 - momentum)
        for bt, bo in zip(self.target_encoder.buffers(), self.encoder.buffers(), strict=True):
            bt.copy_(bo)

    def train(self, mode: bool = True) -> JEPA:
        super().train(mode)
        self.target_encoder.eval()
        return self

    def draw_view(self, c: int, h: int, w: int, g: torch.Generator | None = None) -> tuple[int, int, int, int, int, int]:
        """(band start, band count, row0, rows, col0, cols) of the local view, in bands and tokens."""
        a = self.args
        k = _randint(max(1, math.ceil(a.jepa_band_frac[0] * c)), max(1, math.ceil(a.jepa_band_frac[1] * c)), g)
        b0 = _randint(0, c - k, g)
        sh = _randint(max(1, round(a.jepa_crop_frac[0] * h)), max(1, round(a.jepa_crop_frac[1] * h)), g)
        sw = _randint(max(1, round(a.jepa_crop_frac[0] * w)), max(1, round(a.jepa_crop_frac[1] * w)), g)
        y0, x0 = _randint(0, h - sh, g), _randint(0, w - sw, g)
        return b0, k, y0, sh, x0, sw

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        if "views" in batch:  # a co-located group batch (pretrain.data.colocated)
            return self.forward_groups(batch)
        p = self.args.patch_size
        pixels, wl, fw = batch["pixels"], batch["wavelengths"], batch["fwhm"]
        sensor, level, valid, gsd = batch.get("sensor"), batch.get("level"), batch.get("valid"), batch.get("gsd")
        b, c, hh, ww = pixels.shape
        h, w = hh // p, ww // p
        with torch.no_grad():
            target = self.target_encoder(pixels, wl, fw, sensor, level, valid, gsd, batch.get("band_mask"))
            target = F.layer_norm(target.float(), (target.shape[-1],))
        band_mask = batch.get("band_mask")  # a mixed batch: each sample's window inside its own real bands
        b0, k, y0, sh, x0, sw = self.draw_view(c, h, w, generator)
        ys, xs = slice(y0 * p, (y0 + sh) * p), slice(x0 * p, (x0 + sw) * p)
        ctx_valid = valid[:, ys, xs] if valid is not None else None
        ctx_mask = None
        if band_mask is None:
            ctx, cond = self.encoder.embed(pixels[:, b0:b0 + k, ys, xs], wl[:, b0:b0 + k], fw[:, b0:b0 + k], sensor,
                                           level, ctx_valid, gsd, offset=(y0, x0))
        else:
            ctx_mask = window_mask(band_mask, k / c, b0 / max(1, c - k + 1) if c > k else 0.0)
            ctx, cond = self.encoder.embed(pixels[:, :, ys, xs], wl, fw, sensor, level, ctx_valid, gsd,
                                           offset=(y0, x0), band_mask=ctx_mask)
        ctx = self.encoder.blocks_forward(ctx)
        z = self.pred_embed(ctx)
        pd = z.shape[-1]
        z = z + pos_embed(sh, sw, pd, z.device, (y0, x0)).to(z.dtype)
        q = self.pred_query.to(z.dtype) + pos_embed(h, w, pd, z.device).to(z.dtype).expand(b, -1, -1)
        x = self.pred_blocks(torch.cat([z, q], 1))
        pred = self.pred_out(self.pred_norm(x[:, z.shape[1]:]))
        loss = latent_loss(pred, target, self.args.jepa_loss)
        out = {"band_window": torch.tensor([b0, k]), "crop": torch.tensor([y0, sh, x0, sw])}
        if self.args.cond_decorrelation > 0 and cond is not None:
            dec = condition_decorrelation(cond, ctx_mask)  # a mixed batch: the window's real bands only
            loss = loss + self.args.cond_decorrelation * dec
            out["cond_decorrelation"] = dec.detach()
        return {"loss": loss, **out}

    def forward_groups(self, batch: dict) -> dict[str, torch.Tensor]:
        """SpectralEarth-FM's objective on a group batch (``/work/coord/COLOCATED.md``).

        Target: the EMA encoder's tokens of every global view (each sensor at its own GSD), fused by the EMA
        cross-sensor fusion module on the common grid (the first global view's token centres), layer-normed.
        Context: each local view (one sensor, a crop of the square) through the encoder and the fusion module on
        its own token centres (so the fusion module is trained and its EMA is the target's). Predictor: the
        context tokens plus one query per target cell, each with its ground position (2-D sin-cos of metres in
        reference tokens), predicts every target token. Loss: mean over local views of the latent loss."""
        views, g = batch["views"], int(batch["n_global"])
        if g < 1 or len(views) <= g:
            raise ModelError(f"a group batch needs >= 1 global and >= 1 local view, got {g} of {len(views)}")
        with torch.no_grad():
            target, qpos = self.target_encoder.fuse(views[:g])
            target = F.layer_norm(target.float(), (target.shape[-1],))
        pd = self.args.pred_dim
        unit = self.args.ref_gsd * self.args.patch_size
        losses, decs = [], []
        for v in views[g:]:
            x, cond = self.encoder.embed(**_view_inputs(v))
            ctx, cpos = self.encoder.fuse([v], encoded=[self.encoder.blocks_forward(x)])
            if self.args.cond_decorrelation > 0 and cond is not None:
                decs.append(condition_decorrelation(cond, v.get("band_mask")))
            z = self.pred_embed(ctx)
            z = z + ground_embed(cpos, pd, unit).to(z.dtype)
            q = self.pred_query.to(z.dtype) + ground_embed(qpos, pd, unit).to(z.dtype)
            x = self.pred_blocks(torch.cat([z, q], 1))
            pred = self.pred_out(self.pred_norm(x[:, z.shape[1]:]))
            losses.append(latent_loss(pred, target, self.args.jepa_loss))
        loss = torch.stack(losses).mean()
        out = {"local_losses": torch.stack([x.detach() for x in losses])}
        if decs:  # the band-condition decorrelation term over the local views' conditions
            dec = torch.stack(decs).mean()
            loss = loss + self.args.cond_decorrelation * dec
            out["cond_decorrelation"] = dec.detach()
        return {"loss": loss, **out}

    def flops_per_sample(self, n_bands: int, image_size: int) -> float:
        """Training FLOPs per sample (context encoder + predictor forward and backward, target forward), at
        the mean local-view size."""
        a = self.args
        n = (image_size // a.patch_size) ** 2
        side = image_size // a.patch_size
        cf = sum(a.jepa_crop_frac) / 2
        nc = max(1, round(cf * side)) ** 2
        kc = max(1, round(sum(a.jepa_band_frac) / 2 * n_bands))
        enc = self.encoder
        target = enc.embed_flops(n_bands, image_size) + enc.blocks_flops(n)
        context = enc.embed_flops(kc, int(round(cf * side)) * a.patch_size) + enc.blocks_flops(nc)
        pred = 2.0 * (nc * a.dim * a.pred_dim + a.pred_depth * block_macs(nc + n, a.pred_dim, a.mlp_ratio)
                      + n * a.pred_dim * a.dim)
        return target + 3.0 * (context + pred)
