"""The cross-sensor task (train on one sensor's tiles, test on another sensor's tiles of the same places) and the
encoder API's co-located ``features(..., views=...)``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_prep import configtree
from finetune.config import TaskConfig
from finetune.datasets import load_dataset
from finetune.datasets.base import ClassificationData, DatasetError, Spectral
from finetune.datasets.colocated import CrossSensorData
from finetune.tasks import run_task


def _tiles(n_per: int, wl: np.ndarray, seed: int) -> ClassificationData:
    """Two classes whose spectra differ in a smooth way both band tables see (red edge vs flat)."""
    g = np.random.default_rng(seed)
    curves = [0.1 + 0.4 / (1 + np.exp(-(wl - 720) / 30)), np.full(wl.size, 0.3)]
    x, y = [], []
    for c, curve in enumerate(curves):
        for _ in range(n_per):
            x.append(curve[:, None, None] * (1 + 0.05 * g.standard_normal((wl.size, 8, 8))))
            y.append(c)
    return ClassificationData(np.asarray(x, np.float32), np.asarray(y), ["red-edge", "flat"],
                              Spectral(wl.astype(np.float32), np.full(wl.size, 10.0, np.float32), "x", "L2"))


def test_cross_sensor_task_trains_on_one_band_table_and_scores_another(encoder):
    a = _tiles(12, np.linspace(420, 2400, 40), 0)
    b = _tiles(12, np.array([443, 490, 560, 665, 705, 740, 783, 842, 865, 1610, 2190.0]), 1)
    a.spectral.sensor, b.spectral.sensor = "enmap", "sentinel-2"
    cfg = configtree.build(TaskConfig, {"name": "x", "kind": "cross_sensor", "data": {"loader": "synthetic_cross_sensor"},
                                        "train": {"mode": "linear_probe", "steps": 30, "batch_size": 8, "lr": 0.05}}, "t")
    res = run_task(encoder, CrossSensorData(a, b, "toy"), cfg)
    assert set(res.metrics) == {"OA", "Kappa", "macro_F1"}
    assert 0.0 <= res.metrics["OA"] <= 1.0
    d = res.details
    assert (d["train_sensor"], d["test_sensor"], d["n_train"], d["n_test"]) == ("enmap", "sentinel-2", 24, 24)
    assert d["train_sensor_OA"] > 0.9  # the probe separates the training sensor's two classes


def test_cross_sensor_tiles_are_the_same_places(colocated_root):
    ds = load_dataset({"loader": "synthetic_cross_sensor", "manifest": str(colocated_root["raw"]),
                       "train_sensor": "enmap", "test_sensor": "sentinel-2", "tile_m": 240, "band_stride": 8})
    a, b = ds.train, ds.test
    assert len(a.labels) == len(b.labels) >= 9 and a.class_names == b.class_names
    assert a.patches.shape[-2:] == (8, 8) and b.patches.shape[-2:] == (24, 24)  # 240 m at 30 m and 10 m
    assert (a.labels == b.labels).mean() > 0.7  # the same ground (up to a pixel of misregistration)
    # the two views of one tile see the same ground: the NIR band of EnMAP (848 nm at stride 8) vs Sentinel-2's B8A
    # (865 nm; at stride 8 it keeps 443 and 865 nm), tile means; tiles paired with other places correlate far less
    ka = int(np.argmin(np.abs(a.spectral.wavelengths - 850)))
    kb = int(np.argmin(np.abs(b.spectral.wavelengths - 850)))
    assert abs(a.spectral.wavelengths[ka] - b.spectral.wavelengths[kb]) < 30
    ma, mb = a.patches[:, ka].mean((1, 2)), b.patches[:, kb].mean((1, 2))
    same = np.corrcoef(ma, mb)[0, 1]
    g = np.random.default_rng(0)
    other = np.mean([np.corrcoef(ma, mb[g.permutation(len(mb))])[0, 1] for _ in range(50)])
    assert same > 0.9 and other < 0.5, (same, other)  # measured 0.98 vs 0.03
    with pytest.raises(DatasetError, match="co-located manifest"):
        load_dataset({"loader": "synthetic_cross_sensor", "manifest": str(colocated_root["stores"] / "x")})


def test_encoder_api_fuses_colocated_views(tmp_path):
    import finetune
    from pretrain.models import ModelError, build_model
    from pretrain.models.export import save_encoder

    torch.manual_seed(0)
    save_encoder(build_model("debug", fusion_depth=1), tmp_path / "fused")
    save_encoder(build_model("debug"), tmp_path / "plain")
    enc = finetune.load_encoder(tmp_path / "fused")

    def view(c: int, side: int, gsd: float, sensor: str) -> dict:
        return {"pixels": torch.randn(2, c, side, side), "wavelengths": torch.linspace(450, 2300, c),
                "fwhm": torch.full((c,), 10.0), "sensor": sensor, "level": "L2",
                "ground": torch.tensor([[gsd, 0.0, 0.0], [0.0, gsd, 0.0]]).expand(2, 2, 3)}

    views = [view(30, 16, 30.0, "enmap"), view(9, 48, 10.0, "sentinel-2")]
    f = enc.features(views=views, layers=(0, 1))
    assert [tuple(x.shape) for x in f] == [(2, 4, 64), (2, 4, 64)]  # EnMAP's 2 x 2 token grid
    # the Sentinel-2 view is fused in: changing only its pixels changes the fused tokens of every level
    other = [views[0], {**views[1], "pixels": torch.randn(2, 9, 48, 48)}]
    g = enc.features(views=other, layers=(0, 1))
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(f, g))
    with pytest.raises(ModelError, match="fusion_depth"):
        finetune.load_encoder(tmp_path / "plain").features(views=views, layers=(0, 1))
    with pytest.raises(ValueError, match="ground"):
        enc.features(views=[{k: v for k, v in views[0].items() if k != "ground"}])
