"""Train and evaluate one task of each kind on an encoder; each returns a :class:`TaskResult`.

Protocols:
- classification: stratified split of the samples (``eval.train_fraction`` of each class for training);
- segmentation: the data's own train mask, else the leftmost ``train_fraction`` of the columns; training on
  random windows whose labels outside the training region are ignored; the whole scene predicted by
  overlapping sliding windows, scored on the test region;
- change: ``n_per_class`` changed + ``n_per_class`` unchanged pixels for training, all other labelled
  pixels for testing;
- fusion: Wald's protocol (both images degraded by the ratio; the original HS is the reference), training
  tiles from the leftmost ``train_fraction`` of the columns, the whole scene by overlapping tiles stitched,
  scored on the rest beside bilinear, bicubic and bilinear + unsharp-mask baselines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from finetune import metrics as M
from finetune.config import TaskConfig
from finetune.datasets.base import (
    ChangeData,
    ClassificationData,
    DatasetError,
    FusionData,
    SegmentationData,
    normalise,
)
from finetune.encoder_api import Encoder
from finetune.heads import FusionDecoder, SceneClassifier, SiameseChange, UperNet
from finetune.heads.change import balanced_split, extract_patches
from finetune.heads.fusion import baseline, degrade
from finetune.heads.upernet import class_weights, predict_scene, window_starts


@dataclass
class TaskResult:
    name: str
    kind: str
    metrics: dict
    """Scalar metrics (the report's rows)."""
    details: dict = field(default_factory=dict)
    """Per-class values, confusion matrices, baselines."""
    arrays: dict = field(default_factory=dict)
    """What the figure needs (maps, spectra); not written to the JSON."""
    dataset: str = ""


def _optimizer(model: nn.Module, encoder: Encoder, cfg: TaskConfig) -> torch.optim.Optimizer:
    enc_ids = {id(p) for p in encoder.parameters()}
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in enc_ids]
    enc = [p for p in encoder.parameters() if p.requires_grad]
    groups = [{"params": head, "lr": cfg.train.lr}]
    if enc:
        groups.append({"params": enc, "lr": cfg.train.encoder_lr})
    return torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up over 5% then cosine to 0 — a pure function of the step."""
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def device_of(cfg: TaskConfig) -> torch.device:
    d = cfg.train.device
    if d == "auto":
        d = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(d)


def _to(x, dev: torch.device):
    return x.to(dev) if isinstance(x, torch.Tensor) else x


def train_loop(model: nn.Module, encoder: Encoder, cfg: TaskConfig, batch_fn, loss_fn) -> list[float]:
    """Generic loop: ``batch_fn(rng) -> (inputs tuple, target)``; returns the loss curve. The model is moved to
    the configured device; inputs and targets follow it."""
    torch.manual_seed(cfg.train.seed)
    dev = device_of(cfg)
    model.to(dev)
    rng = np.random.default_rng(cfg.train.seed)
    if cfg.train.mode == "linear_probe":
        encoder.freeze()
    else:
        encoder.unfreeze()
    opt = _optimizer(model, encoder, cfg)
    base = [g["lr"] for g in opt.param_groups]
    losses = []
    model.train()
    for step in range(cfg.train.steps):
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * _lr_factor(step, cfg.train.steps)
        inputs, target = batch_fn(rng)
        loss = loss_fn(model(*(_to(x, dev) for x in inputs)), target.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _spec(spectral) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(spectral.wavelengths, dtype=torch.float32), torch.as_tensor(spectral.fwhm, dtype=torch.float32)


# ----------------------------------------------------------------------------- classification

def stratified_split(labels: np.ndarray, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = min(len(idx) - 1, max(1, round(train_fraction * len(idx)))) if len(idx) > 1 else 1
        tr.append(idx[:k])
        te.append(idx[k:])
    return np.concatenate(tr), np.concatenate(te)


def run_classification(encoder: Encoder, data: ClassificationData, cfg: TaskConfig) -> TaskResult:
    x = data.patches
    if cfg.normalise:  # one set of band statistics over all patches' valid pixels
        x = normalise(x, valid=data.valid)[0]
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    p = encoder.patch_size
    size = cfg.eval.size or int(math.ceil(max(xt.shape[-2:]) / p) * p)
    if size % p:
        raise DatasetError(f"eval.size {size} is not a multiple of the encoder patch size {p}")
    if tuple(xt.shape[-2:]) != (size, size):
        xt = F.interpolate(xt, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.from_numpy(data.labels)
    wl, fw = _spec(data.spectral)
    s, lv = data.spectral.sensor, data.spectral.level
    tr, te = stratified_split(data.labels, cfg.eval.train_fraction, cfg.train.seed)
    model = SceneClassifier(encoder, len(data.class_names), **cfg.head)
    bs = min(cfg.train.batch_size, len(tr))

    def batch(rng):
        i = rng.choice(tr, size=bs, replace=len(tr) < bs)
        return (xt[i], wl, fw, s, lv), y[i]

    losses = train_loop(model, encoder, cfg, batch, F.cross_entropy)
    with torch.no_grad():
        dev = device_of(cfg)
        pred = torch.cat([model(xt[te[i:i + 64]].to(dev), wl, fw, s, lv).argmax(1).cpu()
                          for i in range(0, len(te), 64)]).numpy()
    m = M.classification_metrics(data.labels[te], pred, data.class_names)
    return TaskResult(cfg.name, "classification", {k: m[k] for k in ("OA", "Kappa", "macro_F1")},
                      {"per_class_F1": m["per_class_F1"], "confusion": m["confusion"], "loss": losses[-1:],
                       "n_train": int(len(tr)), "n_test": int(len(te))},
                      {"confusion": np.asarray(m["confusion"]), "class_names": data.class_names, "losses": losses},
                      data.name)


# ----------------------------------------------------------------------------- segmentation

def run_segmentation(encoder: Encoder, data: SegmentationData, cfg: TaskConfig) -> TaskResult:
    img = normalise(data.image, valid=data.valid)[0] if cfg.normalise else data.image
    c, h, w = img.shape
    win, p = cfg.eval.window, encoder.patch_size
    if win % p:
        raise DatasetError(f"eval.window {win} is not a multiple of the encoder patch size {p}")
    if data.train_mask is not None:
        train_mask = data.train_mask
    else:
        train_mask = np.zeros((h, w), bool)
        train_mask[:, : int(round(cfg.eval.train_fraction * w))] = True
    labels = data.labels
    train_lab = np.where(train_mask, labels, -1)
    test_lab = np.where(~train_mask, labels, -1)
    if (train_lab >= 0).sum() == 0 or (test_lab >= 0).sum() == 0:
        raise DatasetError(f"{data.name}: the split leaves no labelled training or test pixels")
    k = len(data.class_names)
    pad_h, pad_w = max(0, win - h), max(0, win - w)
    ti = torch.from_numpy(img)
    tl = torch.from_numpy(train_lab)
    if pad_h or pad_w:
        ti = F.pad(ti[None], (0, pad_w, 0, pad_h), mode="replicate")[0]
        tl = F.pad(tl, (0, pad_w, 0, pad_h), value=-1)
    H, W = ti.shape[-2:]
    weights = class_weights(tl, k)
    wl, fw = _spec(data.spectral)
    s, lv = data.spectral.sensor, data.spectral.level
    model = UperNet(encoder, k, **cfg.head)
    # windows whose training labels are non-empty
    cand = [(y, x) for y in range(0, H - win + 1, max(1, win // 4)) for x in range(0, W - win + 1, max(1, win // 4))
            if (tl[y:y + win, x:x + win] >= 0).any()]

    def batch(rng):
        idx = rng.integers(0, len(cand), size=cfg.train.batch_size)
        xs, ys = [], []
        for i in idx:
            y, x = cand[i]
            a, b = ti[:, y:y + win, x:x + win], tl[y:y + win, x:x + win]
            if rng.random() < 0.5:
                a, b = a.flip(-1), b.flip(-1)
            xs.append(a)
            ys.append(b)
        return (torch.stack(xs), wl, fw, s, lv), torch.stack(ys)

    def loss_fn(logits, target):
        return F.cross_entropy(logits, target, weight=weights.to(logits.device), ignore_index=-1)

    losses = train_loop(model, encoder, cfg, batch, loss_fn)
    prob = predict_scene(model, torch.from_numpy(img), wl, fw, k, win, cfg.eval.stride, s, lv, cfg.train.batch_size)
    pred = prob.argmax(0).numpy()
    m = M.segmentation_metrics(test_lab, pred, data.class_names, ignore_index=-1)
    return TaskResult(cfg.name, "segmentation", {k2: m[k2] for k2 in ("OA", "AA", "Kappa", "mIoU")},
                      {"per_class_IoU": m["per_class_IoU"], "confusion": m["confusion"], "loss": losses[-1:]},
                      {"pred": pred, "truth": labels, "train_mask": train_mask, "class_names": data.class_names,
                       "losses": losses}, data.name)


# ----------------------------------------------------------------------------- change detection

def run_change(encoder: Encoder, data: ChangeData, cfg: TaskConfig) -> TaskResult:
    if cfg.normalise:
        a, stats = normalise(data.t1, valid=data.valid)
        b, _ = normalise(data.t2, stats, valid=data.valid)
    else:
        a, b = data.t1, data.t2
    ev = cfg.eval
    tr, te = balanced_split(data.change, ev.n_per_class, cfg.train.seed)
    if ev.test_max is not None and len(te) > ev.test_max:
        te = np.sort(np.random.default_rng(cfg.train.seed + 1).choice(te, ev.test_max, replace=False))
    h, w = data.change.shape
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    flat = data.change.reshape(-1)
    wl, fw = _spec(data.spectral)
    s, lv = data.spectral.sensor, data.spectral.level
    model = SiameseChange(encoder, patch=ev.patch, token_patch=ev.token_patch, **cfg.head)
    bs = min(cfg.train.batch_size, len(tr))

    def batch(rng):
        i = rng.choice(tr, size=bs, replace=False)
        r, c = np.divmod(i, w)
        return ((extract_patches(ta, r, c, ev.patch), extract_patches(tb, r, c, ev.patch), wl, fw, s, lv),
                torch.from_numpy(flat[i]))

    losses = train_loop(model, encoder, cfg, batch, F.cross_entropy)
    preds = []
    with torch.no_grad():
        for i in range(0, len(te), 128):
            r, c = np.divmod(te[i:i + 128], w)
            dev = device_of(cfg)
            preds.append(model(extract_patches(ta, r, c, ev.patch).to(dev), extract_patches(tb, r, c, ev.patch).to(dev),
                               wl, fw, s, lv).argmax(1).cpu().numpy())
    pred = np.concatenate(preds) if preds else np.zeros(0, np.int64)
    m = M.change_metrics(flat[te], pred)
    pred_map = np.full(h * w, -1, np.int64)
    pred_map[te] = pred
    return TaskResult(cfg.name, "change", {k: m[k] for k in ("OA", "Kappa", "F1", "precision", "recall")},
                      {"confusion": m["confusion"], "n_train": int(len(tr)), "n_test": int(len(te)), "loss": losses[-1:]},
                      {"pred": pred_map.reshape(h, w), "truth": data.change, "losses": losses}, data.name)


# ----------------------------------------------------------------------------- fusion

def _tile_predict(model: FusionDecoder, hs_in: torch.Tensor, ms_in: torch.Tensor, r: int, tile: int, stride: int,
                  args: tuple) -> torch.Tensor:
    c = hs_in.shape[0]
    H, W = ms_in.shape[-2:]
    acc = torch.zeros(c, H, W)
    cnt = torch.zeros(1, H, W)
    dev = next(model.parameters()).device
    with torch.no_grad():
        for y in window_starts(H, tile, stride):
            for x in window_starts(W, tile, stride):
                h_t = hs_in[None, :, y // r:(y + tile) // r, x // r:(x + tile) // r].to(dev)
                m_t = ms_in[None, :, y:y + tile, x:x + tile].to(dev)
                acc[:, y:y + tile, x:x + tile] += model(h_t, m_t, *args)[0].cpu()
                cnt[:, y:y + tile, x:x + tile] += 1
    return acc / cnt


def run_fusion(encoder: Encoder, data: FusionData, cfg: TaskConfig) -> TaskResult:
    r, ev, p = data.ratio, cfg.eval, encoder.patch_size
    tile, stride = ev.tile, ev.tile - ev.overlap
    if tile % p or tile % r or stride % r:
        raise DatasetError(f"fusion tile {tile} must be a multiple of the patch size {p} and the ratio {r}, and "
                           f"tile - overlap ({stride}) a multiple of the ratio")
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
    hs_n, ms_n, ref_n = (hs_in - hmean) / hstd, (ms_in - mmean) / mstd, (ref - hmean) / hstd
    hwl, hfw = _spec(data.hs_spectral)
    mwl, mfw = _spec(data.ms_spectral)
    args = (hwl, hfw, mwl, mfw, data.hs_spectral.sensor, data.ms_spectral.sensor, data.hs_spectral.level)
    model = FusionDecoder(encoder, **cfg.head)
    w_train = max(tile, int(round(ev.train_fraction * w / r)) * r)
    ys = list(range(0, h - tile + 1, r))
    xs = list(range(0, w_train - tile + 1, r))

    def batch(rng):
        hi, mi, ti = [], [], []
        for _ in range(cfg.train.batch_size):
            y, x = int(rng.choice(ys)), int(rng.choice(xs))
            hi.append(hs_n[:, y // r:(y + tile) // r, x // r:(x + tile) // r])
            mi.append(ms_n[:, y:y + tile, x:x + tile])
            ti.append(ref_n[:, y:y + tile, x:x + tile])
        return (torch.stack(hi), torch.stack(mi), *args), torch.stack(ti)

    losses = train_loop(model, encoder, cfg, batch, F.l1_loss)
    fused = _tile_predict(model, hs_n, ms_n, r, tile, stride, args) * hstd + hmean
    test = slice(w_train, w) if w - w_train >= 8 else slice(0, w)
    truth = ref[:, :, test].numpy()
    out = {"fused": fused[:, :, test].numpy()}
    for kind in ("bilinear", "bicubic", "unsharp"):
        out[kind] = baseline(hs_in[None], (h, w), kind)[0][:, :, test].numpy()
    table = {k: M.fusion_metrics(truth, v, r) for k, v in out.items()}
    return TaskResult(cfg.name, "fusion", table["fused"],
                      {"baselines": {k: v for k, v in table.items() if k != "fused"}, "ratio": r,
                       "loss": losses[-1:], "test_columns": [test.start, test.stop]},
                      {"truth": truth, "fused": out["fused"], "bilinear": out["bilinear"],
                       "wavelengths": data.hs_spectral.wavelengths, "losses": losses}, data.name)


RUNNERS = {"classification": run_classification, "segmentation": run_segmentation, "change": run_change,
           "fusion": run_fusion}


def run_task(encoder: Encoder, data, cfg: TaskConfig) -> TaskResult:
    """Train and evaluate ``cfg.kind`` on ``data`` (a dataset container of that kind)."""
    expected = {"classification": ClassificationData, "segmentation": SegmentationData, "change": ChangeData,
                "fusion": FusionData}[cfg.kind]
    if not isinstance(data, expected):
        raise DatasetError(f"task {cfg.name!r} ({cfg.kind}) needs {expected.__name__}, got {type(data).__name__}")
    return RUNNERS[cfg.kind](encoder, data, cfg)
