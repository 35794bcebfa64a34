"""finetune.tasks.fusion: Wald's protocol; the decoder beats bilinear upsampling after training."""

import numpy as np
import torch

from finetune.datasets.base import FusionData, Spectral
from finetune.heads import FusionDecoder
from finetune.tasks import run_task
from tests.finetune.conftest import band_table
from tests.finetune.tasks.helpers import C, cfg, spectral


def test_fusion_decoder_beats_bilinear_after_training(encoder):
    g = np.random.default_rng(0)
    r, h = 2, 32
    yy, xx = np.mgrid[0:h * r, 0:h * r]
    hr = np.stack([np.sin(xx / (2 + b)) * np.cos(yy / 3) + b for b in range(C)]).astype(np.float32)  # HR-HS truth
    hs = hr.reshape(C, h, r, h, r).mean((2, 4))
    ms = np.stack([hr[:3].mean(0), hr[3:].mean(0)]).astype(np.float32)
    ms += g.normal(0, 0.01, ms.shape).astype(np.float32)
    data = FusionData(hs, ms, spectral(), Spectral(np.array([600.0, 1500.0], np.float32),
                                                   np.array([100.0, 300.0], np.float32), "planetscope", "L2"), r)
    res = run_task(encoder, data, cfg("fusion", steps=60, head={"features": 16},
                                      eval={"tile": 16, "overlap": 8, "train_fraction": 0.5}))
    assert res.arrays["losses"][-1] < 0.9 * res.arrays["losses"][0]
    assert res.metrics["RMSE"] < res.details["baselines"]["bilinear"]["RMSE"], res.details


def test_decoder_outputs_any_band_count(encoder):
    dec = FusionDecoder(encoder, features=8)
    out = dec(torch.randn(1, 9, 8, 8), torch.randn(1, 2, 16, 16), *band_table(9), *band_table(2))
    assert out.shape == (1, 9, 16, 16)
