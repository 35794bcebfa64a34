"""Hyperspectral-multispectral fusion (super-resolution of the hyperspectral image) with the fusion decoder.

Protocol (Wald's): both images degraded by the ratio (box filter + decimation), the original hyperspectral
image is the reference; training tiles from the leftmost ``eval.train_fraction`` of the columns; the whole
scene predicted by overlapping tiles (``eval.tile``, ``eval.overlap``; averaged), scored on the other columns
beside bilinear, bicubic and bilinear + unsharp-mask baselines: PSNR, SSIM, SAM, ERGAS, RMSE.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from finetune import metrics as M
from finetune.datasets.base import DatasetError, FusionData
from finetune.heads import FusionDecoder
from finetune.heads.fusion import baseline, degrade
from finetune.heads.upernet import window_starts
from finetune.tasks.base import Task, spectral_tensors


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
        ch, h, w = data.hs.shape
        h, w = (h // r) * r, (w // r) * r
        if h < tile or w < tile:
            raise DatasetError(f"{data.name}: HS image {h}x{w} is smaller than one fusion tile ({tile})")
        ref = torch.from_numpy(data.hs[:, :h, :w])                     # the reference (original HS)
        ms = torch.from_numpy(data.ms[:, :h * r, :w * r])
        hs_in = degrade(ref[None], r)[0]                                # Wald: HS degraded by the ratio
        ms_in = degrade(ms[None], r)[0]                                 # MS degraded to the HS grid
        hmean, hstd = hs_in.mean((1, 2), keepdim=True), hs_in.std((1, 2), keepdim=True).clamp(min=1e-6)
        mmean, mstd = ms_in.mean((1, 2), keepdim=True), ms_in.std((1, 2), keepdim=True).clamp(min=1e-6)
        self.hs_n, self.ms_n, self.ref_n = (hs_in - hmean) / hstd, (ms_in - mmean) / mstd, (ref - hmean) / hstd
        self.hmean, self.hstd, self.ref, self.hs_in = hmean, hstd, ref, hs_in
        hwl, hfw = spectral_tensors(data.hs_spectral)
        mwl, mfw = spectral_tensors(data.ms_spectral)
        self.args = (hwl, hfw, mwl, mfw, data.hs_spectral.sensor, data.ms_spectral.sensor, data.hs_spectral.level)
        self.w_train = max(tile, int(round(ev.train_fraction * w / r)) * r)
        self.ys, self.xs = list(range(0, h - tile + 1, r)), list(range(0, self.w_train - tile + 1, r))
        self.data, self.size, self.tile, self.stride = data, (h, w), tile, stride

    def build_head(self, encoder):
        return FusionDecoder(encoder, **self.cfg.head)

    def batch(self, rng):
        r, tile = self.data.ratio, self.tile
        hi, mi, ti = [], [], []
        for _ in range(self.cfg.train.batch_size):
            y, x = int(rng.choice(self.ys)), int(rng.choice(self.xs))
            hi.append(self.hs_n[:, y // r:(y + tile) // r, x // r:(x + tile) // r])
            mi.append(self.ms_n[:, y:y + tile, x:x + tile])
            ti.append(self.ref_n[:, y:y + tile, x:x + tile])
        return (torch.stack(hi), torch.stack(mi), *self.args), torch.stack(ti)

    def loss(self, output, target):
        return F.l1_loss(output, target)

    def predict(self, model) -> torch.Tensor:
        """The whole scene by overlapping tiles (averaged where they overlap), in the normalised units."""
        r, tile, stride = self.data.ratio, self.tile, self.stride
        c = self.hs_n.shape[0]
        H, W = self.ms_n.shape[-2:]
        acc, cnt = torch.zeros(c, H, W), torch.zeros(1, H, W)
        with torch.no_grad():
            for y in window_starts(H, tile, stride):
                for x in window_starts(W, tile, stride):
                    h_t = self.hs_n[None, :, y // r:(y + tile) // r, x // r:(x + tile) // r].to(self.device)
                    m_t = self.ms_n[None, :, y:y + tile, x:x + tile].to(self.device)
                    acc[:, y:y + tile, x:x + tile] += model(h_t, m_t, *self.args)[0].cpu()
                    cnt[:, y:y + tile, x:x + tile] += 1
        return acc / cnt

    def evaluate(self, model, losses):
        data, r = self.data, self.data.ratio
        h, w = self.size
        fused = self.predict(model) * self.hstd + self.hmean
        test = slice(self.w_train, w) if w - self.w_train >= 8 else slice(0, w)
        truth = self.ref[:, :, test].numpy()
        out = {"fused": fused[:, :, test].numpy()}
        for kind in ("bilinear", "bicubic", "unsharp"):
            out[kind] = baseline(self.hs_in[None], (h, w), kind)[0][:, :, test].numpy()
        table = {k: M.fusion_metrics(truth, v, r) for k, v in out.items()}
        return self.result(table["fused"],
                           {"baselines": {k: v for k, v in table.items() if k != "fused"}, "ratio": r,
                            "loss": losses[-1:], "test_columns": [test.start, test.stop]},
                           {"truth": truth, "fused": out["fused"], "bilinear": out["bilinear"],
                            "wavelengths": data.hs_spectral.wavelengths, "losses": losses}, data.name)

    @classmethod
    def draw(cls, result):
        from finetune.figures import plt, title

        a = result.arrays
        truth, fused, bil = a["truth"], a["fused"], a["bilinear"]
        wl = np.asarray(a["wavelengths"])
        fig, axs = plt.subplots(1, 3, figsize=(15, 4.5))
        h, w = truth.shape[1:]
        for (y, x), col in zip(((h // 4, w // 4), (h // 2, w // 2), (3 * h // 4, 3 * w // 4)), ("C0", "C1", "C2")):
            axs[0].plot(wl, truth[:, y, x], color=col, lw=1.5, label=f"truth ({y},{x})")
            axs[0].plot(wl, fused[:, y, x], color=col, ls="--", lw=1, label="fused")
            axs[0].plot(wl, bil[:, y, x], color=col, ls=":", lw=1, label="bilinear")
        axs[0].set_xlabel("wavelength (nm)")
        axs[0].legend(fontsize=6)
        axs[0].set_title("spectra")
        e_f = np.sqrt(((fused - truth) ** 2).mean(0))
        e_b = np.sqrt(((bil - truth) ** 2).mean(0))
        vmax = float(np.percentile(np.concatenate([e_f.ravel(), e_b.ravel()]), 99)) or 1.0
        for ax, e, t in ((axs[1], e_f, "RMSE per pixel: fused"), (axs[2], e_b, "RMSE per pixel: bilinear")):
            im = ax.imshow(e, cmap="magma", vmin=0, vmax=vmax)
            ax.set_title(t)
            ax.axis("off")
        fig.colorbar(im, ax=axs[1:], shrink=0.8)
        fig.suptitle(title(result), fontsize=9)
        return fig
