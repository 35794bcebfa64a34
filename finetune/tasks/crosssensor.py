"""Cross-sensor transfer: a classifier trained on one sensor's tiles, tested on another sensor's tiles of the same
places (SpectralEarth-FM's DESIS-CDL protocol, on :func:`finetune.datasets.colocated.synthetic_cross_sensor`).

Protocol: each sensor's tiles standardised with their own band statistics (over valid pixels, as pretraining
normalises each store), resized to ``eval.size`` (default: the smallest multiple of the encoder's patch size that
holds the larger tile), a :class:`~finetune.heads.SceneClassifier` (``train.mode: linear_probe`` freezes the encoder:
a true linear probe on mean-pooled tokens) trained on ALL of the train sensor's tiles, then scored on ALL of the
test sensor's tiles. Metrics: OA, Kappa, macro F1 on the test sensor; the details add the train sensor's own
(training-set) OA, so the gap between the two is the cost of changing sensor.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from finetune import metrics as M
from finetune.datasets.base import ClassificationData, DatasetError, normalise
from finetune.datasets.colocated import CrossSensorData
from finetune.heads import SceneClassifier
from finetune.tasks.base import Task, spectral_tensors


class CrossSensorTask(Task):
    kind = "cross_sensor"
    data_type = CrossSensorData
    headline = "OA"

    def _tensor(self, d: ClassificationData, size: int) -> torch.Tensor:
        x = normalise(d.patches, d.valid)[0] if self.cfg.normalise else d.patches
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if tuple(xt.shape[-2:]) != (size, size):
            xt = F.interpolate(xt, size=(size, size), mode="bilinear", align_corners=False)
        return xt

    def prepare(self, encoder, data: CrossSensorData) -> None:
        p = encoder.patch_size
        side = max(max(data.train.patches.shape[-2:]), max(data.test.patches.shape[-2:]))
        size = self.cfg.eval.size or int(math.ceil(side / p) * p)
        if size % p:
            raise DatasetError(f"eval.size {size} is not a multiple of the encoder patch size {p}")
        self.data = data
        self.x_train, self.x_test = self._tensor(data.train, size), self._tensor(data.test, size)
        self.y_train, self.y_test = torch.from_numpy(data.train.labels), torch.from_numpy(data.test.labels)
        s_tr, s_te = data.train.spectral, data.test.spectral
        self.args_train = (*spectral_tensors(s_tr), s_tr.sensor, s_tr.level)
        self.args_test = (*spectral_tensors(s_te), s_te.sensor, s_te.level)
        self.bs = min(self.cfg.train.batch_size, len(self.y_train))

    def build_head(self, encoder):
        return SceneClassifier(encoder, len(self.data.train.class_names), **self.cfg.head)

    def batch(self, rng):
        i = rng.choice(len(self.y_train), size=self.bs, replace=len(self.y_train) < self.bs)
        return (self.x_train[i], *self.args_train), self.y_train[i]

    def loss(self, logits, target):
        return F.cross_entropy(logits, target)

    def _predict(self, model, x: torch.Tensor, args: tuple) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([model(x[i:i + 64].to(self.device), *args).argmax(1).cpu()
                              for i in range(0, len(x), 64)]).numpy()

    def evaluate(self, model, losses):
        model.eval()
        names = self.data.train.class_names
        m = M.classification_metrics(self.data.test.labels, self._predict(model, self.x_test, self.args_test), names)
        own = M.classification_metrics(self.data.train.labels, self._predict(model, self.x_train, self.args_train),
                                       names)
        tr, te = self.data.train.spectral.sensor, self.data.test.spectral.sensor
        return self.result({k: m[k] for k in ("OA", "Kappa", "macro_F1")},
                           {"train_sensor": tr, "test_sensor": te, "train_sensor_OA": own["OA"],
                            "per_class_F1": m["per_class_F1"], "confusion": m["confusion"], "loss": losses[-1:],
                            "n_train": int(len(self.y_train)), "n_test": int(len(self.y_test))},
                           {"confusion": np.asarray(m["confusion"]), "class_names": names, "losses": losses},
                           self.data.name)

    @classmethod
    def draw(cls, result):
        from finetune.figures import confusion_panel, plt

        fig, ax = plt.subplots(figsize=(6, 5))
        d = result.details
        confusion_panel(ax, result.arrays["confusion"], result.arrays["class_names"],
                        f"{result.name}: trained on {d['train_sensor']}, tested on {d['test_sensor']}: "
                        + ", ".join(f"{k} {v:.3f}" for k, v in result.metrics.items()))
        return fig
