"""The PANGAEA benchmark's protocol, in one place: its published settings and the pieces both scene tasks use
(``protocol: pangaea`` of segmentation and change detection).

Every figure below is read from PANGAEA's configs (github.com/VMarsocci/pangaea-bench, commit f20f3d3 of
2025-07-09), not recalled:

- ``configs/task/segmentation.yaml`` and ``configs/task/change_detection.yaml``: ``n_epochs: 80``; evaluator
  ``inference_mode: sliding``, ``sliding_inference_batch: 8``; ``best_metric_key: mIoU``.
- ``configs/train.yaml``: ``batch_size: 8``, ``finetune: false`` (the encoder frozen), ``limited_label_train: 1``
  (full labels unless the run says otherwise), ``limited_label_strategy: stratified``, ``stratification_bins: 3``;
  defaults ``lr_scheduler: multi_step_lr``, ``optimizer: adamw``.
- ``configs/optimizer/adamw.yaml``: ``lr: 1e-4``, ``betas: [0.9, 0.999]``, ``weight_decay: 0.05``.
- ``configs/lr_scheduler/multi_step_lr.yaml``: ``lr_milestones: [0.6, 0.9]``; ``pangaea/utils/schedulers.py``
  builds ``torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(total_iters * r) for r in milestones],
  gamma=0.1)``, stepped once per iteration.
- ``configs/decoder/seg_upernet.yaml``, ``seg_siamupernet_conc.yaml``, ``seg_siamupernet_diff.yaml``:
  ``channels: 512``; ``pangaea/decoders/upernet.py``: the feature pyramid rescales the four levels by
  [4, 2, 1, 0.5], PPM pool scales (1, 2, 3, 6), ``Dropout2d(0.1)`` before the classifier; the Siamese variants
  encode both dates with the one encoder and take ``f2 - f1`` ("diff") or ``cat(f1, f2)`` ("concat") per level.
  The README's change-detection examples use ``seg_siamupernet_conc``, so "concat" is the default here.
- ``configs/encoder/*.yaml`` (e.g. ``prithvi.yaml``): ``output_layers: [3, 5, 7, 11]`` of 12 blocks.
- ``configs/preprocessing/seg_default.yaml``: training crops ``RandomCropToEncoder`` (the encoder's input size),
  no flips or other augmentation; ``configs/criterion/cross_entropy.yaml``: unweighted cross-entropy, ignore index
  -1 (the xView2 change-detection example uses it).
- ``pangaea/engine/evaluator.py`` ``sliding_inference``: with no stride, ``ceil(size / crop)`` windows per axis
  spread evenly (``linspace(0, size - crop, n).round()``), their *logits* averaged where they overlap.
- ``pangaea/utils/subset_sampler.py`` ``balance_seg_indices`` (``get_subset_indices`` uses it for segmentation and
  change detection alike): per training sample, the fraction of each class's pixels binned with
  ``ceil(ratio / (1 / bins)) - 1``; the samples grouped by the string of their bins; from each group
  ``int(max(1, n * fraction))`` drawn at random.

Where the data is one scene (the papers' hyperspectral datasets) a PANGAEA "sample" is one ``eval.window`` tile of
the training region (the grid of non-overlapping windows): the limited-label subset keeps whole tiles, and an
epoch is one pass over the training tiles (``train.epochs``; ``ceil(tiles / batch_size)`` steps). Departures from
PANGAEA, kept on purpose: GroupNorm instead of SyncBatchNorm in the heads (batches of one on one device), and the
encoder's own layers scaled to its depth (:func:`pangaea_layers`).
"""

from __future__ import annotations

import math

import numpy as np

#: epochs of PANGAEA's segmentation and change-detection tasks
EPOCHS = 80
#: training batch size (train.yaml)
BATCH_SIZE = 8
#: AdamW (optimizer/adamw.yaml)
LR, BETAS, WEIGHT_DECAY = 1e-4, (0.9, 0.999), 0.05
#: MultiStepLR milestones (fractions of the iterations) and decay
MILESTONES, GAMMA = (0.6, 0.9), 0.1
#: UPerNet width and the dropout before its classifier
CHANNELS, DROPOUT = 512, 0.1
#: encoder blocks the decoders read, of a 12-block ViT
LAYERS_OF_12 = (3, 5, 7, 11)
#: class-ratio bins of the stratified limited-label subset
STRATIFICATION_BINS = 3
#: Siamese UPerNet feature merges; the first is the default
STRATEGIES = ("concat", "diff")


def pangaea_layers(depth: int) -> tuple[int, ...]:
    """The encoder blocks PANGAEA's UPerNet reads: [3, 5, 7, 11] of 12, the same fractions of other depths."""
    return tuple(max(0, round(depth * (i + 1) / 12) - 1) for i in LAYERS_OF_12)


def multistep_factor(step: int, total: int) -> float:
    """PANGAEA's learning-rate factor at iteration ``step`` of ``total``: x0.1 from ``int(0.6 total)`` and again
    from ``int(0.9 total)`` (torch MultiStepLR with integer milestones, stepped per iteration)."""
    return GAMMA ** sum(step >= int(total * m) for m in MILESTONES)


def tile_origins(size: int, window: int) -> list[int]:
    """Origins of the non-overlapping ``window`` tiles that fit in ``size`` (the last partial tile is dropped)."""
    return list(range(0, size - window + 1, window)) if size >= window else [0]


def limited_label_tiles(labels: np.ndarray, fraction: float, window: int, n_classes: int, seed: int,
                        bins: int = STRATIFICATION_BINS) -> np.ndarray:
    """``labels`` (``-1`` unlabelled) with only a ``fraction`` of the labelled ``window`` tiles kept (the others set
    to -1), drawn as PANGAEA's ``stratified`` strategy draws training samples: tiles grouped by the binned share of
    each class among their labelled pixels, ``int(max(1, n * fraction))`` tiles drawn from each group."""
    if fraction >= 1:
        return labels
    h, w = labels.shape
    tiles, keys = [], []
    edge = 1.0 / bins
    for y in tile_origins(h, window):
        for x in tile_origins(w, window):
            t = labels[y:y + window, x:x + window]
            lab = t[t >= 0]
            if lab.size == 0:
                continue
            ratios = np.bincount(lab, minlength=n_classes)[:n_classes] / lab.size
            keys.append("".join(str(b) for b in (np.ceil(ratios / edge).astype(int) - 1)))
            tiles.append((y, x))
    if not tiles:
        return labels
    rng = np.random.default_rng(seed + 7)
    keep = np.zeros(labels.shape, bool)
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    for k in sorted(groups):
        idx = groups[k]
        for i in rng.choice(idx, size=int(max(1, len(idx) * fraction)), replace=False):
            y, x = tiles[i]
            keep[y:y + window, x:x + window] = True
    return np.where(keep, labels, -1)


def labelled_tiles(labels: np.ndarray, window: int) -> int:
    """How many non-overlapping ``window`` tiles hold a labelled pixel: PANGAEA's samples per epoch."""
    h, w = labels.shape
    return sum(bool((labels[y:y + window, x:x + window] >= 0).any())
               for y in tile_origins(h, window) for x in tile_origins(w, window))


def steps_per_epoch(n_samples: int, batch_size: int) -> int:
    return max(1, math.ceil(n_samples / batch_size))
