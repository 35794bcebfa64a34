"""Bitemporal change detection with Siamese heads: both dates through the same encoder, both standardised with
the first date's statistics. Metrics on the test pixels: OA, Kappa, F1, precision, recall (1 = changed is the
positive class).

``protocol: finetune`` (this project's): ``eval.n_per_class`` changed and as many unchanged pixels drawn at random
for training (balanced), every other labelled pixel for testing (at most ``eval.test_max``, drawn at random); each
pixel classified from its ``eval.patch`` neighbourhood (:class:`finetune.heads.SiameseChange`).

``protocol: pangaea`` (PANGAEA's change detection, every setting cited in :mod:`finetune.tasks.pangaea`): change
detection as two-class segmentation of the change map. The scene split in space like segmentation
(:func:`finetune.tasks.scene.split_scene`: leftmost ``eval.train_fraction`` of the columns for training,
``eval.label_fraction`` of the labelled training tiles kept, stratified); the encoder frozen; PANGAEA's Siamese
UPerNet (:class:`finetune.heads.SiameseUperNet`, ``head.strategy`` "concat" by default, 512 channels, layers
[3, 5, 7, 11]) trained on random ``eval.window`` crops of both dates (no flips) with unweighted cross-entropy
(unknown pixels ignored) and the multi-step schedule; the whole change map predicted by PANGAEA's sliding
inference (logits averaged) and scored on the labelled test pixels, with the IoU of each class and their mean
(PANGAEA's ``best_metric_key``) beside the change metrics.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from finetune import metrics as M
from finetune.datasets.base import ChangeData, normalise
from finetune.heads import SiameseChange, SiameseUperNet
from finetune.heads.change import balanced_split, extract_patches
from finetune.heads.upernet import predict_scene
from finetune.tasks import pangaea as P
from finetune.tasks.base import Task, raw_linear, spectral_tensors
from finetune.tasks.scene import Windows, split_scene

CLASSES = ["unchanged", "changed"]


class ChangeTask(Task):
    kind = "change"
    data_type = ChangeData
    headline = "F1"
    protocols = ("finetune", "pangaea")

    def steps_per_epoch(self) -> int:
        if self.pangaea:
            return self.windows.steps_per_epoch(self.cfg.train.batch_size)
        return P.steps_per_epoch(len(self.train_idx), self.bs)

    def prepare(self, encoder, data: ChangeData) -> None:
        cfg, ev = self.cfg, self.cfg.eval
        if cfg.normalise:
            a, scaling = normalise(data.t1, data.valid)
            b, _ = normalise(data.t2, data.valid, scaling)
        else:
            a, b = data.t1, data.t2
        self.data = data
        self.args = (*spectral_tensors(data.spectral), data.spectral.sensor, data.spectral.level)
        if self.pangaea:
            train_lab, self.test_lab, self.train_mask = split_scene(data.change, None, None, ev, 2, cfg.train.seed,
                                                                    data.name)
            self.windows = Windows((a, b), train_lab, ev.window, encoder.patch_size)
            self.ta, self.tb = torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(np.ascontiguousarray(b))
            return
        tr, te = balanced_split(data.change, ev.n_per_class, cfg.train.seed)
        if ev.test_max is not None and len(te) > ev.test_max:
            te = np.sort(np.random.default_rng(cfg.train.seed + 1).choice(te, ev.test_max, replace=False))
        self.train_idx, self.test_idx = tr, te
        self.ta, self.tb = torch.from_numpy(a), torch.from_numpy(b)
        self.flat = data.change.reshape(-1)
        self.bs = min(cfg.train.batch_size, len(tr))

    def build_head(self, encoder):
        ev = self.cfg.eval
        if self.pangaea:
            head = {"channels": P.CHANNELS, "dropout": P.DROPOUT, **self.cfg.head}
            head.setdefault("layers", P.pangaea_layers(encoder.depth))
            return SiameseUperNet(encoder, 2, **head)
        return SiameseChange(encoder, patch=ev.patch, token_patch=ev.token_patch, **self.cfg.head)

    def _pairs(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        r, c = np.divmod(idx, self.data.change.shape[1])
        p = self.cfg.eval.patch
        return extract_patches(self.ta, r, c, p), extract_patches(self.tb, r, c, p)

    def batch(self, rng):
        if self.pangaea:
            (a, b), y = self.windows.batch(rng, self.cfg.train.batch_size, flip=False)
            return (a, b, *self.args), y
        i = rng.choice(self.train_idx, size=self.bs, replace=False)
        return (*self._pairs(i), *self.args), torch.from_numpy(self.flat[i])

    def loss(self, logits, target):
        return F.cross_entropy(logits, target, ignore_index=-1)

    def evaluate(self, model, losses):
        if self.pangaea:
            return self._evaluate_map(model, losses)
        te, data = self.test_idx, self.data
        h, w = data.change.shape
        preds = []
        with torch.no_grad():
            for i in range(0, len(te), 128):
                a, b = self._pairs(te[i:i + 128])
                preds.append(model(a.to(self.device), b.to(self.device), *self.args).argmax(1).cpu().numpy())
        pred = np.concatenate(preds) if preds else np.zeros(0, np.int64)
        m = M.change_metrics(self.flat[te], pred)
        pred_map = np.full(h * w, -1, np.int64)
        pred_map[te] = pred
        keys = ("OA", "Kappa", "F1", "precision", "recall")
        raw = M.change_metrics(self.flat[te], raw_linear(self.raw_pixels(), self.flat, self.train_idx, te,
                                                               seed=self.cfg.train.seed))
        return self.result({k: m[k] for k in keys},
                           {"confusion": m["confusion"], "n_train": int(len(self.train_idx)), "n_test": int(len(te)),
                            "loss": losses[-1:], "baselines": {"raw_spectrum": {k: raw[k] for k in keys}}},
                           {"pred": pred_map.reshape(h, w), "truth": data.change, "losses": losses}, data.name)

    def _evaluate_map(self, model, losses):
        """PANGAEA: the whole change map by sliding windows (logits averaged), scored on the labelled test pixels."""
        cfg, data = self.cfg, self.data
        wl, fw, s, lv = self.args
        logits = predict_scene(model, (self.ta, self.tb), wl, fw, 2, cfg.eval.window, None, s, lv,
                               cfg.train.batch_size, average="logits")
        pred = logits.argmax(0).numpy()
        test = self.test_lab >= 0
        m = M.change_metrics(self.test_lab[test], pred[test])
        seg = M.segmentation_metrics(self.test_lab, pred, CLASSES, ignore_index=-1)
        keys = ("OA", "Kappa", "F1", "precision", "recall")
        h, w = self.test_lab.shape
        lab = self.windows.labels[:h, :w].numpy().reshape(-1)
        raw_map = raw_linear(self.raw_pixels(), lab, np.flatnonzero(lab >= 0), seed=self.cfg.train.seed).reshape(h, w)
        raw = M.change_metrics(self.test_lab[test], raw_map[test])
        raw_seg = M.segmentation_metrics(self.test_lab, raw_map, CLASSES, ignore_index=-1)
        return self.result({**{k: m[k] for k in keys}, "mIoU": seg["mIoU"]},
                           {"confusion": m["confusion"], "per_class_IoU": seg["per_class_IoU"],
                            "n_train": int((self.windows.labels >= 0).sum()), "n_test": int(test.sum()),
                            "loss": losses[-1:],
                            "baselines": {"raw_spectrum": {**{k: raw[k] for k in keys}, "mIoU": raw_seg["mIoU"]}}},
                           {"pred": np.where(test, pred, -1), "truth": data.change, "losses": losses}, data.name)

    def raw_pixels(self) -> np.ndarray:
        """``[H * W, 3 C]``: each pixel's two spectra and their absolute difference (both dates standardised alike),
        the encoder-free baseline's features: a logistic regression on them, trained on the same pixels as the head."""
        a, b = self.ta.numpy(), self.tb.numpy()
        c = a.shape[0]
        return np.concatenate([a.reshape(c, -1), b.reshape(c, -1), np.abs(b - a).reshape(c, -1)]).T

    @classmethod
    def draw(cls, result):
        from finetune.figures import plt, title

        a = result.arrays
        fig, axs = plt.subplots(1, 2, figsize=(9, 4.5))
        for ax, m, t in ((axs[0], a["truth"], "truth (1 changed)"), (axs[1], a["pred"], "prediction (test pixels)")):
            ax.imshow(np.ma.masked_less(m, 0), cmap="coolwarm", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(t)
            ax.axis("off")
        fig.suptitle(title(result), fontsize=9)
        return fig
