"""Scene classification: a linear probe (``train.mode: linear_probe``, encoder frozen) or full fine-tuning.

Protocol: a stratified split of the samples, ``eval.train_fraction`` of each class for training (at least one
per class, at least one left for testing); one set of band statistics over every patch's valid pixels; patches
resized to ``eval.size`` (default: the smallest multiple of the encoder's patch size that holds them). Metrics
on the held-out samples: OA, Kappa, macro F1 (per-class F1 and the confusion matrix in the details).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from finetune import metrics as M
from finetune.datasets.base import ClassificationData, DatasetError, normalise
from finetune.heads import SceneClassifier
from finetune.tasks.base import Task, raw_linear, spectral_tensors


def stratified_split(labels: np.ndarray, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: ``train_fraction`` of each class (rounded; >= 1, and >= 1 left for testing)."""
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = min(len(idx) - 1, max(1, round(train_fraction * len(idx)))) if len(idx) > 1 else 1
        tr.append(idx[:k])
        te.append(idx[k:])
    return np.concatenate(tr), np.concatenate(te)


class ClassificationTask(Task):
    kind = "classification"
    data_type = ClassificationData
    headline = "OA"

    def prepare(self, encoder, data: ClassificationData) -> None:
        cfg = self.cfg
        x = normalise(data.patches, data.valid)[0] if cfg.normalise else data.patches
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        p = encoder.patch_size
        size = cfg.eval.size or int(math.ceil(max(xt.shape[-2:]) / p) * p)
        if size % p:
            raise DatasetError(f"eval.size {size} is not a multiple of the encoder patch size {p}")
        if tuple(xt.shape[-2:]) != (size, size):
            xt = F.interpolate(xt, size=(size, size), mode="bilinear", align_corners=False)
        self.data, self.x, self.y = data, xt, torch.from_numpy(data.labels)
        self.args = (*spectral_tensors(data.spectral), data.spectral.sensor, data.spectral.level)
        self.train_idx, self.test_idx = stratified_split(data.labels, cfg.eval.train_fraction, cfg.train.seed)
        self.bs = min(cfg.train.batch_size, len(self.train_idx))

    def steps_per_epoch(self) -> int:
        """One pass over the training samples."""
        return max(1, math.ceil(len(self.train_idx) / self.bs))

    def build_head(self, encoder):
        return SceneClassifier(encoder, len(self.data.class_names), **self.cfg.head)

    def batch(self, rng):
        tr = self.train_idx
        i = rng.choice(tr, size=self.bs, replace=len(tr) < self.bs)
        return (self.x[i], *self.args), self.y[i]

    def loss(self, logits, target):
        return F.cross_entropy(logits, target)

    def evaluate(self, model, losses):
        te, data = self.test_idx, self.data
        with torch.no_grad():
            pred = torch.cat([model(self.x[te[i:i + 64]].to(self.device), *self.args).argmax(1).cpu()
                              for i in range(0, len(te), 64)]).numpy()
        m = M.classification_metrics(data.labels[te], pred, data.class_names)
        keys = ("OA", "Kappa", "macro_F1")
        raw = M.classification_metrics(data.labels[te], self.raw_baseline(), data.class_names)
        return self.result({k: m[k] for k in keys},
                           {"per_class_F1": m["per_class_F1"], "confusion": m["confusion"], "loss": losses[-1:],
                            "n_train": int(len(self.train_idx)), "n_test": int(len(te)),
                            "baselines": {"raw_spectrum": {k: raw[k] for k in keys}}},
                           {"confusion": np.asarray(m["confusion"]), "class_names": data.class_names,
                            "losses": losses}, data.name)

    def raw_baseline(self) -> np.ndarray:
        """Test predictions of a logistic regression on each sample's mean spectrum over its valid pixels (the raw
        input, no encoder), trained on the same training samples."""
        x, valid = self.x.numpy(), self.data.valid
        if valid is not None and valid.shape[-2:] == x.shape[-2:]:
            w = valid.reshape(len(x), 1, *x.shape[-2:]).astype(np.float64)
            mean = (x * w).sum((2, 3)) / np.maximum(w.sum((2, 3)), 1)
        else:  # resized to the encoder's grid (or no mask): the plain mean
            mean = x.mean((2, 3))
        return raw_linear(mean, self.data.labels, self.train_idx, self.test_idx, seed=self.cfg.train.seed)

    @classmethod
    def draw(cls, result):
        from finetune.figures import confusion_panel, plt

        fig, ax = plt.subplots(figsize=(6, 5))
        confusion_panel(ax, result.arrays["confusion"], result.arrays["class_names"], f"{result.name}: "
                        + ", ".join(f"{k} {v:.3f}" for k, v in result.metrics.items()))
        return fig
