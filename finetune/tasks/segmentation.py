"""Semantic segmentation with the UperNet head over four encoder layers.

Protocol: the data's own train mask, else the leftmost ``eval.train_fraction`` of the columns; training on
random ``eval.window`` windows (horizontal flips) whose labels outside the training region are ignored; the
whole scene predicted by overlapping sliding windows (``eval.stride``; probabilities averaged), scored on the
test region: OA, AA, Kappa, mIoU (per-class IoU and the confusion matrix in the details).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from finetune import metrics as M
from finetune.datasets.base import DatasetError, SegmentationData, normalise
from finetune.heads import UperNet
from finetune.heads.upernet import class_weights, predict_scene
from finetune.tasks.base import Task, spectral_tensors


class SegmentationTask(Task):
    kind = "segmentation"
    data_type = SegmentationData
    headline = "mIoU"

    def prepare(self, encoder, data: SegmentationData) -> None:
        cfg = self.cfg
        img = normalise(data.image, data.valid)[0] if cfg.normalise else data.image
        c, h, w = img.shape
        win, p = cfg.eval.window, encoder.patch_size
        if win % p:
            raise DatasetError(f"eval.window {win} is not a multiple of the encoder patch size {p}")
        if data.train_mask is not None:
            train_mask = data.train_mask
        else:
            train_mask = np.zeros((h, w), bool)
            train_mask[:, : int(round(cfg.eval.train_fraction * w))] = True
        test_mask = ~train_mask if data.test_mask is None else data.test_mask & ~train_mask
        train_lab = np.where(train_mask, data.labels, -1)
        test_lab = np.where(test_mask, data.labels, -1)
        if (train_lab >= 0).sum() == 0 or (test_lab >= 0).sum() == 0:
            raise DatasetError(f"{data.name}: the split leaves no labelled training or test pixels")
        pad_h, pad_w = max(0, win - h), max(0, win - w)
        ti, tl = torch.from_numpy(img), torch.from_numpy(train_lab)
        if pad_h or pad_w:
            ti = F.pad(ti[None], (0, pad_w, 0, pad_h), mode="replicate")[0]
            tl = F.pad(tl, (0, pad_w, 0, pad_h), value=-1)
        H, W = ti.shape[-2:]
        step = max(1, win // 4)
        # windows whose training labels are non-empty
        self.windows = [(y, x) for y in range(0, H - win + 1, step) for x in range(0, W - win + 1, step)
                        if (tl[y:y + win, x:x + win] >= 0).any()]
        self.data, self.img, self.ti, self.tl = data, img, ti, tl
        self.train_mask, self.test_lab = train_mask, test_lab
        self.n_classes = len(data.class_names)
        self.weights = class_weights(tl, self.n_classes)
        self.args = (*spectral_tensors(data.spectral), data.spectral.sensor, data.spectral.level)

    def build_head(self, encoder):
        return UperNet(encoder, self.n_classes, **self.cfg.head)

    def batch(self, rng):
        win = self.cfg.eval.window
        xs, ys = [], []
        for i in rng.integers(0, len(self.windows), size=self.cfg.train.batch_size):
            y, x = self.windows[i]
            a, b = self.ti[:, y:y + win, x:x + win], self.tl[y:y + win, x:x + win]
            if rng.random() < 0.5:
                a, b = a.flip(-1), b.flip(-1)
            xs.append(a)
            ys.append(b)
        return (torch.stack(xs), *self.args), torch.stack(ys)

    def loss(self, logits, target):
        return F.cross_entropy(logits, target, weight=self.weights.to(logits.device), ignore_index=-1)

    def evaluate(self, model, losses):
        cfg, data = self.cfg, self.data
        wl, fw, s, lv = self.args
        prob = predict_scene(model, torch.from_numpy(self.img), wl, fw, self.n_classes, cfg.eval.window,
                             cfg.eval.stride, s, lv, cfg.train.batch_size)
        pred = prob.argmax(0).numpy()
        m = M.segmentation_metrics(self.test_lab, pred, data.class_names, ignore_index=-1)
        return self.result({k: m[k] for k in ("OA", "AA", "Kappa", "mIoU")},
                           {"per_class_IoU": m["per_class_IoU"], "confusion": m["confusion"], "loss": losses[-1:]},
                           {"pred": pred, "truth": data.labels, "train_mask": self.train_mask,
                            "class_names": data.class_names, "losses": losses}, data.name)

    @classmethod
    def draw(cls, result):
        from finetune.figures import labels_panel, plt, title

        a = result.arrays
        k = len(a["class_names"])
        fig, axs = plt.subplots(1, 3, figsize=(13, 4.5))
        labels_panel(axs[0], a["truth"], k, "truth")
        labels_panel(axs[1], np.where(a["truth"] >= 0, a["pred"], -1), k, "prediction (whole scene)")
        test = (~a["train_mask"]) & (a["truth"] >= 0)
        err = np.where(test, (a["pred"] != a["truth"]).astype(float), np.nan)
        axs[2].imshow(err, cmap="Reds", vmin=0, vmax=1, interpolation="nearest")
        axs[2].set_title("errors on the test region")
        axs[2].axis("off")
        fig.suptitle(title(result), fontsize=9)
        return fig
