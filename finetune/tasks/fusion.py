"""Hyperspectral-multispectral fusion (super-resolution of the hyperspectral image) with the fusion decoder.

Protocol (Wald's): both images degraded by the ratio (box filter + decimation; a degraded pixel is valid when all
the pixels it averages are; nodata filled with the nearest valid pixel), the original hyperspectral image is the
reference; training tiles from the leftmost ``eval.train_fraction`` of the columns, each with a halo of the
low-resolution neighbours the decoder mixes; the whole scene predicted by overlapping tiles (``eval.tile``,
``eval.overlap`` at most half a tile; cross-faded by :mod:`finetune.windows`), scored on the other columns beside
``unmix`` (the training-free unmixing the decoder starts from, :func:`finetune.heads.fusion.unmix_fuse`), bilinear,
bicubic and bilinear + unsharp-mask upsampling, and ``no_encoder`` (the same decoder without its encoder branch,
trained the same way: what the encoder adds): PSNR, SSIM, SAM, ERGAS, RMSE over the reference's valid pixels (a
nodata pixel is a zero spectrum: 90 degrees of SAM to anything). Training: L1 on per-band z-scores over valid
pixels, tiles flipped and rotated (the 8 symmetries of the square).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt

from finetune import metrics as M
from finetune.datasets.base import DatasetError, FusionData
from finetune.heads import FusionDecoder
from finetune.heads.fusion import WINDOW, band_gains, baseline, degrade, unmix_fuse
from finetune.tasks.base import Task, seed_everything, spectral_tensors, train_loop
from finetune.windows import Axis, blend, check_tiling

#: Weight of the mean spectral angle (radians) beside the L1 of z-scores in the training loss (measured on the
#: synthetic suite, 60 steps: SAM 6.42 with it, 6.73 without, for 0.4 dB of PSNR).
SAM_WEIGHT = 1.0


class FusionTask(Task):
    kind = "fusion"
    data_type = FusionData
    headline = "PSNR"

    def prepare(self, encoder, data: FusionData) -> None:
        r, ev, p = data.ratio, self.cfg.eval, encoder.patch_size
        tile, stride = ev.tile, ev.tile - ev.overlap
        if tile % p or tile % r or stride % r:
            raise DatasetError(f"fusion tile {tile} must be a multiple of the patch size {p} and the ratio {r}, "
                               f"and tile - overlap ({stride}) a multiple of the ratio")
        check_tiling(tile, stride, ("eval.tile", "eval.tile - eval.overlap"))
        ch, h, w = data.hs.shape
        h, w = (h // r) * r, (w // r) * r
        if h < tile or w < tile:
            raise DatasetError(f"{data.name}: HS image {h}x{w} is smaller than one fusion tile ({tile})")
        ref = torch.from_numpy(data.hs[:, :h, :w])                     # the reference (original HS)
        ms = torch.from_numpy(data.ms[:, :h * r, :w * r])
        ref_valid = _mask(data.hs_valid, (h, w))
        ms_valid = _mask(data.ms_valid, (h * r, w * r))
        hs_in, hs_in_valid = _degrade_valid(ref, ref_valid, r)        # Wald: HS degraded by the ratio
        ms_in, ms_in_valid = _degrade_valid(ms, ms_valid, r)          # MS degraded to the HS grid
        # Nodata filled with the nearest valid pixel's spectrum (a pixel beside nodata then mixes real neighbours:
        # with the band means as filling, bicubic scored 27.5 dB on the synthetic pair, with the nearest 31.9, the
        # unmixing 41.1 and 43.6); the per-band (mean, std) over valid pixels go to the decoder and scale the loss.
        self.hmean, self.hstd = _moments(hs_in, hs_in_valid)
        mmean, mstd = _moments(ms_in, ms_in_valid)
        self.hs_lr = _fill_nearest(hs_in, hs_in_valid)
        self.ms_hr = _fill_nearest(ms_in, ms_in_valid)
        # tiles carry their neighbours' low-resolution pixels (the decoder's halo; the scene's own edge replicated)
        self.halo = int(self.cfg.head.get("window", WINDOW)) // 2
        self.hs_pad = F.pad(self.hs_lr[None], (self.halo,) * 4, mode="replicate")[0] if self.halo else self.hs_lr
        self.ref, self.ref_valid = ref, ref_valid
        self.norms = ((self.hmean.flatten(), self.hstd.flatten()), (mmean.flatten(), mstd.flatten()))
        hwl, hfw = spectral_tensors(data.hs_spectral)
        mwl, mfw = spectral_tensors(data.ms_spectral)
        # the unmixing's per-band gains, fitted once on the whole scene (a 24-pixel tile's own fit cost ~1 dB)
        lr_valid = hs_in_valid & (degrade(ms_in_valid[None, None].float(), r)[0, 0] > 1 - 1e-6)
        gain = band_gains(self.hs_lr, self.ms_hr, hwl, hfw, mwl, mfw, lr_valid if lr_valid.any() else None)
        self.args = (hwl, hfw, mwl, mfw, data.hs_spectral.sensor, data.ms_spectral.sensor, data.hs_spectral.level,
                     *self.norms, self.halo, gain)
        self.w_train = max(tile, int(round(ev.train_fraction * w / r)) * r)
        self.ys, self.xs = list(range(0, h - tile + 1, r)), list(range(0, self.w_train - tile + 1, r))
        self.data, self.size, self.tile, self.stride = data, (h, w), tile, stride

    def steps_per_epoch(self) -> int:
        """One pass over the non-overlapping tiles of the training columns."""
        h = self.size[0]
        n = max(1, (h // self.tile) * (self.w_train // self.tile))
        return max(1, -(-n // self.cfg.train.batch_size))

    def build_head(self, encoder):
        return FusionDecoder(encoder, **self.cfg.head)

    def batch(self, rng):
        """Tiles of the training columns, each flipped / rotated by one of the 8 symmetries of the square."""
        r, tile, e = self.data.ratio, self.tile, 2 * self.halo
        hi, mi, ti, vi = [], [], [], []
        for _ in range(self.cfg.train.batch_size):
            y, x = int(rng.choice(self.ys)), int(rng.choice(self.xs))
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            for out, a in ((hi, self.hs_pad[:, y // r:(y + tile) // r + e, x // r:(x + tile) // r + e]),
                           (mi, self.ms_hr[:, y:y + tile, x:x + tile]), (ti, self.ref[:, y:y + tile, x:x + tile]),
                           (vi, self.ref_valid[None, y:y + tile, x:x + tile])):
                a = torch.rot90(a, k, (-2, -1))
                out.append(a.flip(-1) if flip else a)
        return (torch.stack(hi), torch.stack(mi), *self.args), (torch.stack(ti), torch.stack(vi))

    def loss(self, output, target):
        """L1 of the per-band z-scores (errors over each band's std) plus :data:`SAM_WEIGHT` x the mean spectral
        angle, over the reference's valid pixels."""
        ref, valid = target
        v = valid.expand_as(ref).float()
        err = (output - ref).abs() / self.hstd.to(output.device)
        l1 = (err * v).sum() / v.sum().clamp(min=1)
        cos = (output * ref).sum(1) / (output.norm(dim=1) * ref.norm(dim=1)).clamp(min=1e-8)
        ang = torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6))
        pv = valid[:, 0].float()
        return l1 + SAM_WEIGHT * (ang * pv).sum() / pv.sum().clamp(min=1)

    def predict(self, model) -> torch.Tensor:
        """The whole scene by overlapping tiles, cross-faded over the overlaps (:func:`finetune.windows.blend`);
        tiles reaching past the scene see both inputs edge-replicated."""
        r, tile, stride, k = self.data.ratio, self.tile, self.stride, self.halo
        H, W = self.ref.shape[-2:]
        ph, pw = Axis(H, tile, stride).padded - H, Axis(W, tile, stride).padded - W
        hs, ms = self.hs_pad[None], self.ms_hr[None]  # hs_pad: the halo, the scene's edge replicated
        if ph or pw:
            hs = F.pad(hs, (0, pw // r, 0, ph // r), mode="replicate")
            ms = F.pad(ms, (0, pw, 0, ph), mode="replicate")

        def fn(origins):
            h_t = torch.cat([hs[:, :, y // r:(y + tile) // r + 2 * k, x // r:(x + tile) // r + 2 * k]
                             for y, x in origins])
            m_t = torch.cat([ms[:, :, y:y + tile, x:x + tile] for y, x in origins])
            return model(h_t.to(self.device), m_t.to(self.device), *self.args)

        with torch.no_grad():
            return blend(fn, (H, W), tile, stride, batch_size=1)

    def train_without_encoder(self, encoder) -> FusionDecoder:
        """The baseline that says what the encoder adds: the same decoder without its encoder branch
        (``use_encoder: false``), trained as the task's head was (seed, steps, learning rate, schedule, the same
        batches). The encoder is left as it was (its frozen state restored)."""
        frozen = getattr(encoder, "frozen", False)
        seed_everything(self.cfg.train.seed)
        head = FusionDecoder(None, **{**self.cfg.head, "use_encoder": False})
        train_loop(head, encoder, self.cfg, self.batch, self.loss, False, self.lr_schedule, steps=self.n_steps())
        if not frozen:
            encoder.unfreeze()
        return head

    def evaluate(self, model, losses):
        data, r = self.data, self.data.ratio
        h, w = self.size
        fused = self.predict(model)
        test = slice(self.w_train, w) if w - self.w_train >= 8 else slice(0, w)
        truth = self.ref[:, :, test].numpy()
        valid = self.ref_valid[:, test].numpy()
        out = {"fused": fused[:, :, test].numpy()}
        if model.use_encoder:
            out["no_encoder"] = self.predict(self.train_without_encoder(model.encoder))[:, :, test].numpy()
        out["unmix"] = self.predict(partial(unmix_fuse, window=model.window, ridge=model.ridge))[:, :, test].numpy()
        for kind in ("bilinear", "bicubic", "unsharp"):
            out[kind] = baseline(self.hs_lr[None], (h, w), kind)[0][:, :, test].numpy()
        table = {k: M.fusion_metrics(truth, v, r, valid) for k, v in out.items()}
        return self.result(table["fused"],
                           {"baselines": {k: v for k, v in table.items() if k != "fused"}, "ratio": r,
                            "loss": losses[-1:], "test_columns": [test.start, test.stop],
                            "valid_fraction": float(valid.mean())},
                           {"truth": np.where(valid[None], truth, np.nan), "fused": out["fused"],
                            "unmix": out["unmix"], "wavelengths": data.hs_spectral.wavelengths,
                            "losses": losses}, data.name)

    @classmethod
    def draw(cls, result):
        from finetune.figures import plt, title

        a = result.arrays
        base = "unmix" if "unmix" in a else "bilinear"  # the strongest baseline (results written before it: bilinear)
        truth, fused, bil = a["truth"], a["fused"], a[base]
        wl = np.asarray(a["wavelengths"])
        fig, axs = plt.subplots(1, 3, figsize=(15, 4.5))
        h, w = truth.shape[1:]
        for (y, x), col in zip(((h // 4, w // 4), (h // 2, w // 2), (3 * h // 4, 3 * w // 4)), ("C0", "C1", "C2")):
            axs[0].plot(wl, truth[:, y, x], color=col, lw=1.5, label=f"truth ({y},{x})")
            axs[0].plot(wl, fused[:, y, x], color=col, ls="--", lw=1, label="fused")
            axs[0].plot(wl, bil[:, y, x], color=col, ls=":", lw=1, label=base)
        axs[0].set_xlabel("wavelength (nm)")
        axs[0].legend(fontsize=6)
        axs[0].set_title("spectra")
        e_f = np.sqrt(((fused - truth) ** 2).mean(0))
        e_b = np.sqrt(((bil - truth) ** 2).mean(0))
        vmax = float(np.nanpercentile(np.concatenate([e_f.ravel(), e_b.ravel()]), 99)) or 1.0
        for ax, e, t in ((axs[1], e_f, "RMSE per pixel: fused"), (axs[2], e_b, f"RMSE per pixel: {base}")):
            im = ax.imshow(e, cmap="magma", vmin=0, vmax=vmax)
            ax.set_title(t)
            ax.axis("off")
        fig.colorbar(im, ax=axs[1:], shrink=0.8)
        fig.suptitle(title(result), fontsize=9)
        return fig


def _mask(valid: np.ndarray | None, shape: tuple[int, int]) -> torch.Tensor:
    if valid is None:
        return torch.ones(shape, dtype=torch.bool)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(valid, bool)[:shape[0], :shape[1]]))


def _degrade_valid(x: torch.Tensor, valid: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Wald degradation of ``x [C, H, W]``; a low-resolution pixel is valid when all its r x r pixels are."""
    return degrade(x[None], r)[0], degrade(valid[None, None].float(), r)[0, 0] > 1 - 1e-6


def _fill_nearest(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``x [C, H, W]`` with each invalid pixel replaced by the nearest valid one (all invalid: left as it is)."""
    if bool(valid.all()) or not bool(valid.any()):
        return x
    iy, ix = distance_transform_edt(~valid.numpy(), return_distances=False, return_indices=True)
    return x[:, torch.from_numpy(iy), torch.from_numpy(ix)]


def _moments(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-band mean and std ``[C, 1, 1]`` over the valid pixels of ``x [C, H, W]`` (std >= 1e-6)."""
    v = x[:, valid] if valid.any() else x.reshape(x.shape[0], -1)
    return v.mean(1)[:, None, None], v.std(1).clamp(min=1e-6)[:, None, None]
