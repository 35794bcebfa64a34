"""Semantic segmentation with the UperNet head over four encoder layers.

Protocol: the data's own train mask, else the leftmost ``eval.train_fraction`` of the columns
(:func:`finetune.tasks.scene.split_scene`); ``eval.label_fraction`` < 1 keeps that fraction of the labelled training
tiles (PANGAEA's stratified limited labels); training on random ``eval.window`` windows whose labels outside the
training region are ignored; the whole scene predicted by sliding windows, scored on the test region: OA, AA,
Kappa, mIoU (per-class IoU and the confusion matrix in the details).

``protocol: finetune`` (this project's): horizontal flips, median-frequency class weights, the UperNet with its
full-resolution pixel branch, warm-up + cosine, overlapping windows every ``eval.stride`` with probabilities
averaged, the encoder trained when ``train.mode: finetune``.

``protocol: pangaea`` (PANGAEA's, every setting cited in :mod:`finetune.tasks.pangaea`): the encoder frozen
whatever ``train.mode`` says, the plain UPerNet (no pixel branch, ``Dropout2d(0.1)``) over blocks [3, 5, 7, 11]
(the same fractions of other depths), 512 channels unless ``head.channels`` says otherwise, unweighted
cross-entropy, no flips, the multi-step schedule (x0.1 at ``int(0.6 T)`` and ``int(0.9 T)``), and PANGAEA's
sliding inference (``ceil(size / window)`` evenly spread windows, logits averaged). Its lr 1e-4, batch 8, weight
decay 0.05 and 80 epochs (``train.epochs``) are written in the suite YAML.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from finetune import metrics as M
from finetune.datasets.base import SegmentationData, normalise
from finetune.heads import UperNet
from finetune.heads.upernet import class_weights, predict_scene
from finetune.tasks import pangaea as P
from finetune.tasks.base import Task, raw_linear, spectral_tensors
from finetune.tasks.scene import Windows, split_scene
from finetune.windows import check_tiling


class SegmentationTask(Task):
    kind = "segmentation"
    data_type = SegmentationData
    headline = "mIoU"
    protocols = ("finetune", "pangaea")

    def steps_per_epoch(self) -> int:
        return self.windows.steps_per_epoch(self.cfg.train.batch_size)

    def prepare(self, encoder, data: SegmentationData) -> None:
        cfg = self.cfg
        img = normalise(data.image, data.valid)[0] if cfg.normalise else data.image
        self.n_classes = len(data.class_names)
        if not self.pangaea:  # PANGAEA's evenly spread grid is its own (no stride)
            check_tiling(cfg.eval.window, cfg.eval.stride, ("eval.window", "eval.stride"))
        train_lab, self.test_lab, self.train_mask = split_scene(data.labels, data.train_mask, data.test_mask,
                                                                cfg.eval, self.n_classes, cfg.train.seed, data.name)
        self.windows = Windows((img,), train_lab, cfg.eval.window, encoder.patch_size)
        self.data, self.img = data, img
        self.weights = (torch.ones(self.n_classes) if self.pangaea
                        else class_weights(self.windows.labels, self.n_classes))
        self.args = (*spectral_tensors(data.spectral), data.spectral.sensor, data.spectral.level)

    def build_head(self, encoder):
        if self.pangaea:
            head = {"channels": P.CHANNELS, "dropout": P.DROPOUT, **self.cfg.head, "pixel_skip": False}
            head.setdefault("layers", P.pangaea_layers(encoder.depth))
            return UperNet(encoder, self.n_classes, **head)
        return UperNet(encoder, self.n_classes, **self.cfg.head)

    def batch(self, rng):
        (x,), y = self.windows.batch(rng, self.cfg.train.batch_size, flip=not self.pangaea)
        return (x, *self.args), y

    def loss(self, logits, target):
        return F.cross_entropy(logits, target, weight=self.weights.to(logits.device), ignore_index=-1)

    def evaluate(self, model, losses):
        cfg, data = self.cfg, self.data
        wl, fw, s, lv = self.args
        prob = predict_scene(model, torch.from_numpy(self.img), wl, fw, self.n_classes, cfg.eval.window,
                             None if self.pangaea else cfg.eval.stride, s, lv, cfg.train.batch_size,
                             average="logits" if self.pangaea else "probabilities")
        pred = prob.argmax(0).numpy()
        m = M.segmentation_metrics(self.test_lab, pred, data.class_names, ignore_index=-1)
        keys = ("OA", "AA", "Kappa", "mIoU")
        raw = M.segmentation_metrics(self.test_lab, self.raw_baseline(), data.class_names, ignore_index=-1)
        return self.result({k: m[k] for k in keys},
                           {"per_class_IoU": m["per_class_IoU"], "confusion": m["confusion"], "loss": losses[-1:],
                            "baselines": {"raw_spectrum": {k: raw[k] for k in keys}}},
                           {"pred": pred, "truth": data.labels, "train_mask": self.train_mask,
                            "class_names": data.class_names, "losses": losses}, data.name)

    def raw_baseline(self) -> np.ndarray:
        """``[H, W]`` predictions of a logistic regression on each pixel's own spectrum (the raw input, no encoder,
        no spatial context), trained on the same labelled training pixels (class-balanced as the head's loss is
        under ``protocol: finetune``)."""
        c, h, w = self.img.shape
        px = self.img.reshape(c, -1).T
        lab = self.windows.labels[:h, :w].numpy().reshape(-1)  # the training labels (limited ones included)
        return raw_linear(px, lab, np.flatnonzero(lab >= 0), balanced=not self.pangaea,
                          seed=self.cfg.train.seed).reshape(h, w)

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
