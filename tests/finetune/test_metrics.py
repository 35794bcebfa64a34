"""Every metric against values worked out by hand on small cases."""

import math

import numpy as np
import pytest

from finetune import metrics as M


def test_confusion_matrix_and_classification_by_hand():
    truth = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, 2, 0]
    cm = M.confusion_matrix(truth, pred, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    r = M.classification_metrics(truth, pred, ["a", "b", "c"])
    assert r["OA"] == pytest.approx(4 / 6)
    # p_o = 4/6; row sums (2,2,2), column sums (2,3,1): p_e = (4 + 6 + 2) / 36 = 1/3
    assert r["Kappa"] == pytest.approx((4 / 6 - 1 / 3) / (1 - 1 / 3))
    # F1: a 2*1/(2+2)=0.5, b 2*2/(3+2)=0.8, c 2*1/(1+2)=2/3
    assert r["per_class_F1"] == pytest.approx({"a": 0.5, "b": 0.8, "c": 2 / 3})
    assert r["macro_F1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_segmentation_metrics_ignore_and_iou_by_hand():
    truth = np.array([[0, 0, 1], [1, -1, 2]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    r = M.segmentation_metrics(truth, pred, ["x", "y", "z"], ignore_index=-1)
    # kept pairs (0,0) (0,1) (1,1) (1,1) (2,0)
    assert r["OA"] == pytest.approx(3 / 5)
    # recall: x 1/2, y 2/2, z 0/1
    assert r["AA"] == pytest.approx((0.5 + 1 + 0) / 3)
    # IoU: x 1/(2+2-1)=1/3, y 2/(3+2-2)... column sums: x 2, y 3, z 0; row sums x 2, y 2, z 1
    assert r["per_class_IoU"] == pytest.approx({"x": 1 / 3, "y": 2 / 3, "z": 0.0})
    assert r["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    po, pe = 3 / 5, (2 * 2 + 2 * 3 + 1 * 0) / 25
    assert r["Kappa"] == pytest.approx((po - pe) / (1 - pe))


def test_labels_outside_class_list_are_an_error():
    with pytest.raises(ValueError, match="outside 0..1"):
        M.confusion_matrix([0, 2], [0, 1], 2)


def test_change_metrics_by_hand():
    truth = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    pred = np.array([1, 1, 0, 1, 0, 0, 0, 0])
    r = M.change_metrics(truth, pred)
    assert r["precision"] == pytest.approx(2 / 3)
    assert r["recall"] == pytest.approx(2 / 3)
    assert r["F1"] == pytest.approx(2 / 3)
    assert r["OA"] == pytest.approx(6 / 8)
    po, pe = 6 / 8, (3 * 3 + 5 * 5) / 64
    assert r["Kappa"] == pytest.approx((po - pe) / (1 - pe))


def test_fusion_metrics_by_hand():
    ref = np.ones((2, 2, 2))
    ref[1] = 2.0
    est = ref.copy()
    est[0, 0, 0] = 3.0  # one error of 2 in band 0
    # RMSE over all 8 values: sqrt(4/8)
    assert M.rmse(ref, est) == pytest.approx(math.sqrt(0.5))
    # PSNR per band with peak = band max: band0 mse 1, peak 1 -> 0 dB; band1 exact -> 10log10(4/1e-12)
    assert M.psnr(ref, est) == pytest.approx((0 + 10 * math.log10(4 / 1e-12)) / 2)
    assert M.psnr(ref, est, data_range=2.0) == pytest.approx((10 * math.log10(4) + 10 * math.log10(4 / 1e-12)) / 2)
    # ERGAS: band rmse (1, 0), means (1, 2), ratio 4 -> 100/4 * sqrt((1 + 0) / 2)
    assert M.ergas(ref, est, 4) == pytest.approx(25 * math.sqrt(0.5))
    # SAM: only pixel (0,0) differs: ref (1,2), est (3,2) -> angle between them, averaged over 4 pixels
    ang = math.degrees(math.acos((3 + 4) / (math.sqrt(5) * math.sqrt(13))))
    assert M.sam(ref, est) == pytest.approx(ang / 4)
    assert M.ssim(ref, ref) == pytest.approx(1.0)


def test_ssim_matches_closed_form_on_constant_window():
    # one 7x7 window, constant images a and b: SSIM = (2ab + c1) / (a^2 + b^2 + c1) with c1 = (0.01 L)^2
    a, b, L = 0.5, 0.3, 1.0
    ref = np.full((1, 7, 7), a)
    est = np.full((1, 7, 7), b)
    c1 = (0.01 * L) ** 2
    assert M.ssim(ref, est, data_range=L) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))
    assert M.ssim(ref, est, data_range=L) < 1


def test_fusion_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="one shape"):
        M.rmse(np.zeros((2, 3, 3)), np.zeros((2, 3, 4)))
