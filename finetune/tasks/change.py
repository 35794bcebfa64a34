"""Bitemporal change detection with the Siamese head: both dates through the same encoder.

Protocol: ``eval.n_per_class`` changed and as many unchanged pixels drawn at random for training (balanced),
every other labelled pixel for testing (at most ``eval.test_max``, drawn at random); both dates standardised
with the first date's statistics; each pixel classified from its ``eval.patch`` neighbourhood. Metrics on the
test pixels: OA, Kappa, F1, precision, recall (1 = changed is the positive class).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from finetune import metrics as M
from finetune.datasets.base import ChangeData, normalise
from finetune.heads import SiameseChange
from finetune.heads.change import balanced_split, extract_patches
from finetune.tasks.base import Task, spectral_tensors


class ChangeTask(Task):
    kind = "change"
    data_type = ChangeData
    headline = "F1"

    def prepare(self, encoder, data: ChangeData) -> None:
        cfg, ev = self.cfg, self.cfg.eval
        if cfg.normalise:
            a, scaling = normalise(data.t1, data.valid)
            b, _ = normalise(data.t2, data.valid, scaling)
        else:
            a, b = data.t1, data.t2
        tr, te = balanced_split(data.change, ev.n_per_class, cfg.train.seed)
        if ev.test_max is not None and len(te) > ev.test_max:
            te = np.sort(np.random.default_rng(cfg.train.seed + 1).choice(te, ev.test_max, replace=False))
        self.data, self.train_idx, self.test_idx = data, tr, te
        self.ta, self.tb = torch.from_numpy(a), torch.from_numpy(b)
        self.flat = data.change.reshape(-1)
        self.args = (*spectral_tensors(data.spectral), data.spectral.sensor, data.spectral.level)
        self.bs = min(cfg.train.batch_size, len(tr))

    def build_head(self, encoder):
        ev = self.cfg.eval
        return SiameseChange(encoder, patch=ev.patch, token_patch=ev.token_patch, **self.cfg.head)

    def _pairs(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        r, c = np.divmod(idx, self.data.change.shape[1])
        p = self.cfg.eval.patch
        return extract_patches(self.ta, r, c, p), extract_patches(self.tb, r, c, p)

    def batch(self, rng):
        i = rng.choice(self.train_idx, size=self.bs, replace=False)
        return (*self._pairs(i), *self.args), torch.from_numpy(self.flat[i])

    def loss(self, logits, target):
        return F.cross_entropy(logits, target)

    def evaluate(self, model, losses):
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
        return self.result({k: m[k] for k in ("OA", "Kappa", "F1", "precision", "recall")},
                           {"confusion": m["confusion"], "n_train": int(len(self.train_idx)), "n_test": int(len(te)),
                            "loss": losses[-1:]},
                           {"pred": pred_map.reshape(h, w), "truth": data.change, "losses": losses}, data.name)

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
