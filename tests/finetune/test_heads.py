"""Heads on a real debug encoder: the linear probe trains only the head; each head overfits a tiny task."""

import numpy as np
import torch

from finetune.config import TaskConfig
from finetune.datasets.base import ChangeData, ClassificationData, FusionData, SegmentationData, Spectral
from finetune.heads import FusionDecoder, SceneClassifier
from finetune.heads.upernet import predict_scene, window_starts
from finetune.tasks import run_task, train_loop
from tests.finetune.conftest import band_table

C = 6


def _spectral(c=C, sensor="emit"):
    wl, fw = band_table(c)
    return Spectral(wl.numpy(), fw.numpy(), sensor, "L2")


def _cfg(kind, mode="finetune", steps=40, **kw):
    return TaskConfig(name=f"t_{kind}", kind=kind, data={"loader": "x"}, normalise=False,
                      train={"mode": mode, "steps": steps, "batch_size": 8, "lr": 3e-3, "encoder_lr": 1e-3}, **kw)


def _two_class_patches(n=16, size=8):
    g = np.random.default_rng(0)
    labels = np.arange(n) % 2
    x = g.normal(0, 0.3, (n, C, size, size)).astype(np.float32)
    x[labels == 1, :3] += 1.5
    x[labels == 0, 3:] += 1.5
    return x, labels


def test_linear_probe_changes_only_head_parameters(encoder):
    x, y = _two_class_patches()
    model = SceneClassifier(encoder, 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    wl, fw = band_table(C)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    losses = train_loop(model, encoder, _cfg("classification", "linear_probe", steps=10), lambda r: ((xt, wl, fw), yt),
                        torch.nn.functional.cross_entropy)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"head.fc.weight", "head.fc.bias"}
    assert losses[-1] < losses[0]


def test_full_finetune_changes_encoder(encoder):
    x, y = _two_class_patches()
    model = SceneClassifier(encoder, 2)
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    wl, fw = band_table(C)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    train_loop(model, encoder, _cfg("classification", steps=2), lambda r: ((xt, wl, fw), yt),
               torch.nn.functional.cross_entropy)
    assert any(not torch.equal(p, before[n]) for n, p in encoder.named_parameters())


def test_classification_overfits(encoder):
    x, y = _two_class_patches(n=24)
    data = ClassificationData(x, y, ["a", "b"], _spectral())
    res = run_task(encoder, data, _cfg("classification", steps=30, eval={"train_fraction": 0.5}))
    assert res.metrics["OA"] >= 0.9


def test_segmentation_overfits_and_sliding_window_covers_scene(encoder):
    g = np.random.default_rng(0)
    h, w = 16, 32
    lab = np.zeros((h, w), np.int64)
    lab[:, 8:16] = 1
    lab[:, 24:] = 1
    img = g.normal(0, 0.2, (C, h, w)).astype(np.float32)
    img[:3] += 2 * lab
    data = SegmentationData(img, lab, ["bg", "fg"], _spectral())
    res = run_task(encoder, data, _cfg("segmentation", steps=40, head={"channels": 16},
                                       eval={"window": 16, "stride": 8, "train_fraction": 0.5}))
    assert res.metrics["OA"] >= 0.8 and res.metrics["mIoU"] >= 0.65, res.metrics  # held-out half of the scene
    assert window_starts(32, 16, 12) == [0, 12, 16]
    class Uniform(torch.nn.Module):
        def forward(self, x, *a, **k):
            return torch.zeros(x.shape[0], 2, *x.shape[-2:])

    prob = predict_scene(Uniform(), torch.zeros(C, 20, 20), None, None, 2, 16, 8)
    assert prob.shape == (2, 20, 20) and torch.allclose(prob, torch.full_like(prob, 0.5))


def test_change_overfits_with_balanced_sampling(encoder):
    g = np.random.default_rng(0)
    h, w = 24, 24
    t1 = g.normal(0, 0.2, (C, h, w)).astype(np.float32)
    t2 = t1 + g.normal(0, 0.05, t1.shape).astype(np.float32)
    change = np.zeros((h, w), np.int64)
    change[6:18, 6:18] = 1
    t2[:, change == 1] += 2.0
    data = ChangeData(t1, t2, change, _spectral())
    res = run_task(encoder, data, _cfg("change", steps=30, eval={"n_per_class": 40, "test_max": 200}))
    assert res.details["n_train"] == 80
    assert res.metrics["F1"] >= 0.85, res.metrics


def test_fusion_decoder_beats_bilinear_after_training(encoder):
    g = np.random.default_rng(0)
    r, h = 2, 32
    yy, xx = np.mgrid[0:h * r, 0:h * r]
    hr = np.stack([np.sin(xx / (2 + b)) * np.cos(yy / 3) + b for b in range(C)]).astype(np.float32)  # HR-HS truth
    hs = hr.reshape(C, h, r, h, r).mean((2, 4))
    ms = np.stack([hr[:3].mean(0), hr[3:].mean(0)]).astype(np.float32)
    ms += g.normal(0, 0.01, ms.shape).astype(np.float32)
    wl, fw = band_table(C)
    data = FusionData(hs, ms, _spectral(), Spectral(np.array([600.0, 1500.0], np.float32),
                                                    np.array([100.0, 300.0], np.float32), "planetscope", "L2"), r)
    res = run_task(encoder, data, _cfg("fusion", steps=60, head={"features": 16},
                                       eval={"tile": 16, "overlap": 8, "train_fraction": 0.5}))
    assert res.arrays["losses"][-1] < 0.9 * res.arrays["losses"][0]
    assert res.metrics["RMSE"] < res.details["baselines"]["bilinear"]["RMSE"], res.details
    # the decoder outputs any requested number of bands (HyperLinear from wavelengths)
    dec = FusionDecoder(encoder, features=8)
    out = dec(torch.randn(1, 9, 8, 8), torch.randn(1, 2, 16, 16), *band_table(9), *band_table(2))
    assert out.shape == (1, 9, 16, 16)
