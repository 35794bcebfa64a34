"""Semantic segmentation with the UperNet head over four encoder layers.

Protocol: the data's own train mask, else the leftmost ``eval.train_fraction`` of the columns; training on
random ``eval.window`` windows (horizontal flips) whose labels outside the training region are ignored; the
whole scene predicted by overlapping sliding windows (``eval.stride``, at least half the window; softmax
probabilities cross-faded over the overlaps by :mod:`finetune.windows`, the grid whole-scene inference uses), scored on the
test region: OA, AA, Kappa, mIoU (per-class IoU and the confusion matrix in the details).
``eval.label_fraction`` keeps that fraction of each class's labelled training pixels (stratified, seeded).

``protocol: pangaea`` is the PANGAEA benchmark's segmentation protocol (facts from its configs,
github.com/VMarsocci/pangaea-bench and the sig-gis fork: task/segmentation.yaml 80 epochs, batch 8, sliding-window
inference available; decoder/seg_upernet.yaml UPerNet with 512 channels and ``finetune: false``; train.yaml
``limited_label_strategy: stratified``; the encoders' ``output_layers`` [3, 5, 7, 11]): the encoder frozen
whatever ``train.mode`` says, the plain UPerNet (no pixel branch) over blocks [3, 5, 7, 11] (the same fractions
of the depth for other depths), 512 channels unless ``head.channels`` says otherwise, unweighted cross-entropy,
and a multi-step schedule (x0.1 at 60% and 90% of the steps, as PANGAEA's ``multi_step_lr``; its milestone
fractions are recalled from the paper, not read in a config here). Epochs map to steps through the suite YAML
(``train.steps``), with PANGAEA's lr 1e-4 and batch 8 written there.
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
from finetune.windows import check_tiling


class SegmentationTask(Task):
    kind = "segmentation"
    data_type = SegmentationData
    headline = "mIoU"
    protocols = ("finetune", "pangaea")

    @property
    def pangaea(self) -> bool:
        return self.cfg.protocol == "pangaea"

    def trainable_encoder(self) -> bool:
        return False if self.pangaea else super().trainable_encoder()

    def lr_schedule(self, step: int, total: int) -> float:
        if not self.pangaea:
            return super().lr_schedule(step, total)
        return 0.1 ** sum(step >= m * total for m in PANGAEA_MILESTONES)

    def prepare(self, encoder, data: SegmentationData) -> None:
        cfg = self.cfg
        img = normalise(data.image, data.valid)[0] if cfg.normalise else data.image
        c, h, w = img.shape
        win, p = cfg.eval.window, encoder.patch_size
        if win % p:
            raise DatasetError(f"eval.window {win} is not a multiple of the encoder patch size {p}")
        check_tiling(win, cfg.eval.stride, ("eval.window", "eval.stride"))
        if data.train_mask is not None:
            train_mask = data.train_mask
        else:
            train_mask = np.zeros((h, w), bool)
            train_mask[:, : int(round(cfg.eval.train_fraction * w))] = True
        test_mask = ~train_mask if data.test_mask is None else data.test_mask & ~train_mask
        train_lab = np.where(train_mask, data.labels, -1)
        if cfg.eval.label_fraction < 1:
            train_lab = stratified_subset(train_lab, cfg.eval.label_fraction, cfg.train.seed)
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
        self.weights = torch.ones(self.n_classes) if self.pangaea else class_weights(tl, self.n_classes)
        self.args = (*spectral_tensors(data.spectral), data.spectral.sensor, data.spectral.level)

    def build_head(self, encoder):
        if self.pangaea:
            head = {"channels": 512, **self.cfg.head, "pixel_skip": False}
            head.setdefault("layers", pangaea_layers(encoder.depth))
            return UperNet(encoder, self.n_classes, **head)
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


#: PANGAEA's multi-step learning-rate milestones (fractions of training; x0.1 at each).
PANGAEA_MILESTONES = (0.6, 0.9)


def pangaea_layers(depth: int) -> tuple[int, ...]:
    """The encoder blocks PANGAEA's UPerNet reads: [3, 5, 7, 11] of 12, the same fractions of other depths."""
    return tuple(max(0, round(depth * f) - 1) for f in (4 / 12, 6 / 12, 8 / 12, 12 / 12))


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """``labels`` with only ``fraction`` of each class's labelled pixels kept (at least one each), others -1."""
    rng = np.random.default_rng(seed + 7)
    flat = labels.reshape(-1)
    out = np.full_like(flat, -1)
    for c in np.unique(flat[flat >= 0]):
        idx = np.flatnonzero(flat == c)
        keep = rng.choice(idx, size=max(1, int(round(fraction * idx.size))), replace=False)
        out[keep] = c
    return out.reshape(labels.shape)
