"""What the scene tasks share (segmentation, and change detection under ``protocol: pangaea``): one labelled scene
split in space, limited labels, training windows drawn from it and the whole scene predicted by sliding windows.

- :func:`split_scene`: the data's own train/test masks, else the leftmost ``eval.train_fraction`` of the columns
  for training and the rest for testing; ``eval.label_fraction`` < 1 keeps that fraction of the labelled training
  tiles (:func:`finetune.tasks.pangaea.limited_label_tiles`, PANGAEA's stratified strategy).
- :class:`Windows`: the scene padded to at least one window, the origins (every ``window / 4`` pixels) of the
  windows holding a training label, and batches of random windows cut from every image of the scene at once
  (both dates of a change pair), optionally flipped.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from finetune.datasets.base import DatasetError
from finetune.tasks.pangaea import labelled_tiles, limited_label_tiles, steps_per_epoch


def split_scene(labels: np.ndarray, train_mask: np.ndarray | None, test_mask: np.ndarray | None, ev, n_classes: int,
                seed: int, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(training labels, test labels, training mask) of a scene's ``labels`` (-1 unlabelled); see the module."""
    h, w = labels.shape
    if train_mask is None:
        train_mask = np.zeros((h, w), bool)
        train_mask[:, : int(round(ev.train_fraction * w))] = True
    test = ~train_mask if test_mask is None else test_mask & ~train_mask
    train_lab = np.where(train_mask, labels, -1)
    if ev.label_fraction < 1:
        train_lab = limited_label_tiles(train_lab, ev.label_fraction, ev.window, n_classes, seed)
    test_lab = np.where(test, labels, -1)
    if (train_lab >= 0).sum() == 0 or (test_lab >= 0).sum() == 0:
        raise DatasetError(f"{name}: the split leaves no labelled training or test pixels")
    return train_lab, test_lab, train_mask


class Windows:
    """Random training windows of ``window`` pixels over co-registered ``images`` (``[C, H, W]`` each) and their
    training labels; the scene is padded (images replicate, labels -1) to at least one window."""

    def __init__(self, images: tuple[np.ndarray, ...], train_labels: np.ndarray, window: int, patch: int) -> None:
        if window % patch:
            raise DatasetError(f"eval.window {window} is not a multiple of the encoder patch size {patch}")
        h, w = train_labels.shape
        ph, pw = max(0, window - h), max(0, window - w)
        ims = [torch.from_numpy(np.ascontiguousarray(im)) for im in images]
        tl = torch.from_numpy(train_labels)
        if ph or pw:
            ims = [F.pad(im[None], (0, pw, 0, ph), mode="replicate")[0] for im in ims]
            tl = F.pad(tl, (0, pw, 0, ph), value=-1)
        H, W = tl.shape
        step = max(1, window // 4)
        self.origins = [(y, x) for y in range(0, H - window + 1, step) for x in range(0, W - window + 1, step)
                        if (tl[y:y + window, x:x + window] >= 0).any()]
        self.images, self.labels, self.window = ims, tl, window
        self.tiles = labelled_tiles(train_labels, window)

    def steps_per_epoch(self, batch_size: int) -> int:
        """One pass over the labelled non-overlapping tiles (PANGAEA's samples)."""
        return steps_per_epoch(self.tiles, batch_size)

    def batch(self, rng: np.random.Generator, size: int, flip: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``size`` random windows: one ``[size, C, window, window]`` stack per image, and the labels; each window
        mirrored left-right with probability 1/2 when ``flip``."""
        win = self.window
        outs: list[list[torch.Tensor]] = [[] for _ in self.images]
        labs = []
        for i in rng.integers(0, len(self.origins), size=size):
            y, x = self.origins[i]
            crops = [im[:, y:y + win, x:x + win] for im in self.images]
            lab = self.labels[y:y + win, x:x + win]
            if flip and rng.random() < 0.5:
                crops, lab = [c.flip(-1) for c in crops], lab.flip(-1)
            for o, c in zip(outs, crops):
                o.append(c)
            labs.append(lab)
        return [torch.stack(o) for o in outs], torch.stack(labs)
