"""Metrics of the downstream tasks, all computed from numpy arrays.

Classification-style metrics go through one confusion matrix (rows = truth, columns = prediction);
fusion metrics compare a reconstructed cube with its reference, both ``(bands, rows, cols)``.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, n_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """int64 ``(n_classes, n_classes)``: entry (i, j) counts samples of true class i predicted as j."""
    t = np.asarray(truth).reshape(-1).astype(np.int64)
    p = np.asarray(pred).reshape(-1).astype(np.int64)
    if t.shape != p.shape:
        raise ValueError(f"truth has {t.size} elements, prediction {p.size}; expected the same")
    keep = np.ones(t.shape, bool) if ignore_index is None else t != ignore_index
    t, p = t[keep], p[keep]
    for name, a in (("truth", t), ("prediction", p)):
        if a.size and (a.min() < 0 or a.max() >= n_classes):
            raise ValueError(f"{name} has labels outside 0..{n_classes - 1}: {sorted(set(a[(a < 0) | (a >= n_classes)].tolist()))[:5]}")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _div(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b != 0)


def overall_accuracy(cm: np.ndarray) -> float:
    return float(_div(np.trace(cm), cm.sum()))


def kappa(cm: np.ndarray) -> float:
    """Cohen's kappa: (p_o - p_e) / (1 - p_e)."""
    n = cm.sum()
    if n == 0:
        return 0.0
    po = np.trace(cm) / n
    pe = float((cm.sum(0) * cm.sum(1)).sum()) / float(n) ** 2
    return float((po - pe) / (1 - pe)) if pe != 1 else 0.0


def per_class_f1(cm: np.ndarray) -> np.ndarray:
    tp = np.diag(cm).astype(np.float64)
    return _div(2 * tp, cm.sum(0) + cm.sum(1))


def per_class_iou(cm: np.ndarray) -> np.ndarray:
    tp = np.diag(cm).astype(np.float64)
    return _div(tp, cm.sum(0) + cm.sum(1) - tp)


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    return _div(np.diag(cm), cm.sum(1))


def _present(cm: np.ndarray) -> np.ndarray:
    """Classes that occur in the truth or in the prediction (means are taken over these)."""
    return (cm.sum(0) + cm.sum(1)) > 0


def classification_metrics(truth: np.ndarray, pred: np.ndarray, class_names: list[str]) -> dict:
    """Scene classification: OA, Kappa, macro F1 (over classes present), per-class F1."""
    cm = confusion_matrix(truth, pred, len(class_names))
    f1 = per_class_f1(cm)
    present = _present(cm)
    return {
        "OA": overall_accuracy(cm),
        "Kappa": kappa(cm),
        "macro_F1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class_F1": {n: float(v) for n, v in zip(class_names, f1)},
        "confusion": cm.tolist(),
    }


def segmentation_metrics(truth: np.ndarray, pred: np.ndarray, class_names: list[str],
                         ignore_index: int | None = -1) -> dict:
    """Semantic segmentation: OA, AA (mean per-class recall), Kappa, mIoU, per-class IoU."""
    cm = confusion_matrix(truth, pred, len(class_names), ignore_index)
    iou = per_class_iou(cm)
    in_truth = cm.sum(1) > 0
    present = _present(cm)
    return {
        "OA": overall_accuracy(cm),
        "AA": float(per_class_recall(cm)[in_truth].mean()) if in_truth.any() else 0.0,
        "Kappa": kappa(cm),
        "mIoU": float(iou[present].mean()) if present.any() else 0.0,
        "per_class_IoU": {n: float(v) for n, v in zip(class_names, iou)},
        "confusion": cm.tolist(),
    }


def change_metrics(truth: np.ndarray, pred: np.ndarray) -> dict:
    """Binary change detection (1 = changed is the positive class): OA, Kappa, F1, precision, recall."""
    cm = confusion_matrix(truth, pred, 2)
    tp, fp, fn = cm[1, 1], cm[0, 1], cm[1, 0]
    precision = float(_div(tp, tp + fp))
    recall = float(_div(tp, tp + fn))
    return {
        "OA": overall_accuracy(cm),
        "Kappa": kappa(cm),
        "F1": float(_div(2 * precision * recall, precision + recall)),
        "precision": precision,
        "recall": recall,
        "confusion": cm.tolist(),
    }


# ----------------------------------------------------------------------------- fusion
# Every fusion metric takes an optional ``valid`` (rows, cols) mask: pixels without data in the reference are
# left out (a nodata pixel is a zero spectrum, whose angle to anything is 90 degrees).

def _check_cubes(ref: np.ndarray, est: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(bands, pixels) float64 arrays of the valid pixels."""
    ref = np.asarray(ref, dtype=np.float64)
    est = np.asarray(est, dtype=np.float64)
    if ref.shape != est.shape or ref.ndim != 3:
        raise ValueError(f"expected two (bands, rows, cols) cubes of one shape, got {ref.shape} and {est.shape}")
    if valid is None:
        return ref.reshape(ref.shape[0], -1), est.reshape(est.shape[0], -1)
    v = np.asarray(valid, bool)
    if v.shape != ref.shape[1:]:
        raise ValueError(f"valid mask {v.shape} does not match the cubes' {ref.shape[1:]}")
    if not v.any():
        raise ValueError("the valid mask selects no pixel")
    return ref[:, v], est[:, v]


def rmse(ref: np.ndarray, est: np.ndarray, valid: np.ndarray | None = None) -> float:
    ref, est = _check_cubes(ref, est, valid)
    return float(np.sqrt(np.mean((ref - est) ** 2)))


def psnr(ref: np.ndarray, est: np.ndarray, data_range: float | None = None, valid: np.ndarray | None = None) -> float:
    """Mean over bands of 10 log10(peak^2 / MSE_band); peak = ``data_range`` or the reference's max per band."""
    ref, est = _check_cubes(ref, est, valid)
    mse = ((ref - est) ** 2).mean(1)
    peak = np.full(ref.shape[0], data_range) if data_range is not None else ref.max(1)
    mse = np.maximum(mse, 1e-12)
    return float(np.mean(10 * np.log10(peak**2 / mse)))


def sam(ref: np.ndarray, est: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Mean spectral angle in degrees over pixels."""
    r, e = _check_cubes(ref, est, valid)
    cos = (r * e).sum(0) / np.maximum(np.linalg.norm(r, axis=0) * np.linalg.norm(e, axis=0), 1e-12)
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))).mean())


def ergas(ref: np.ndarray, est: np.ndarray, ratio: float, valid: np.ndarray | None = None) -> float:
    """100 / ratio * sqrt(mean_b (RMSE_b / mean_b)^2), ratio = high / low resolution pixel-size ratio."""
    ref, est = _check_cubes(ref, est, valid)
    rmse_b = np.sqrt(((ref - est) ** 2).mean(1))
    mean_b = np.abs(ref.mean(1))
    return float(100.0 / ratio * np.sqrt(np.mean((rmse_b / np.maximum(mean_b, 1e-12)) ** 2)))


def _gaussian_window(size: int = 7, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter2(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of a 2-D image."""
    from scipy.signal import convolve2d

    return convolve2d(convolve2d(img, g[None, :], mode="valid"), g[:, None], mode="valid")


def ssim(ref: np.ndarray, est: np.ndarray, data_range: float | None = None, win: int = 7,
         valid: np.ndarray | None = None) -> float:
    """Mean over bands of the Gaussian-window SSIM (Wang et al. 2004, K1=0.01, K2=0.03); with ``valid``, averaged
    over the windows that hold only valid pixels (all windows if none does)."""
    _check_cubes(ref, est, valid)
    ref = np.asarray(ref, dtype=np.float64)
    est = np.asarray(est, dtype=np.float64)
    win = min(win, ref.shape[1], ref.shape[2])
    g = _gaussian_window(win, 1.5 * win / 7)
    keep = None
    if valid is not None:
        v = np.asarray(valid, bool)
        est = np.where(v[None], est, ref)
        keep = _filter2(v.astype(np.float64), np.ones(win) / win) > 1 - 1e-9
        if not keep.any():
            keep = None
    out = []
    for r, e in zip(ref, est):
        r_valid = r if valid is None else r[np.asarray(valid, bool)]
        L = data_range if data_range is not None else max(float(r_valid.max() - r_valid.min()), 1e-12)
        c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
        mr, me = _filter2(r, g), _filter2(e, g)
        vr = _filter2(r * r, g) - mr**2
        ve = _filter2(e * e, g) - me**2
        cov = _filter2(r * e, g) - mr * me
        s = ((2 * mr * me + c1) * (2 * cov + c2)) / ((mr**2 + me**2 + c1) * (vr + ve + c2))
        out.append(s.mean() if keep is None else s[keep].mean())
    return float(np.mean(out))


def fusion_metrics(ref: np.ndarray, est: np.ndarray, ratio: float, valid: np.ndarray | None = None) -> dict:
    """PSNR, SSIM, SAM (degrees), ERGAS, RMSE of a reconstructed cube against the reference (over ``valid``)."""
    return {"PSNR": psnr(ref, est, valid=valid), "SSIM": ssim(ref, est, valid=valid), "SAM": sam(ref, est, valid),
            "ERGAS": ergas(ref, est, ratio, valid), "RMSE": rmse(ref, est, valid)}
