"""The GPU path: bf16 autocast with fp32 losses, the device loader, bench/gpu.py's smoke run (CPU here).

Tests marked ``gpu`` need CUDA (skipped without it; CI runs ``-m "not gpu"``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.data import DataConfig, SourceConfig, build_loader
from pretrain.losses import latent_loss, reconstruction_loss

from .data_fixtures import make_store

REPO = Path(__file__).resolve().parents[2]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_losses_are_fp32_outside_autocast():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 5, 4, 9, generator=g), torch.randn(2, 5, 4, 9, generator=g)
    weight = torch.rand(2, 4, 9, generator=g)
    ref = reconstruction_loss(pred, target, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = reconstruction_loss(pred.bfloat16(), target, weight)  # a bf16 prediction from an autocast model
        lat = latent_loss(pred.bfloat16(), target)
    assert got["loss"].dtype == torch.float32 and lat.dtype == torch.float32
    # the bf16 input is the only rounding: the loss itself is computed in fp32
    exact = reconstruction_loss(pred.bfloat16().float(), target, weight)
    torch.testing.assert_close(got["loss"], exact["loss"], rtol=0, atol=0)
    assert abs(float(got["loss"]) - float(ref["loss"])) < 1e-2


def test_deepspeed_config_for_autocast():
    from pretrain.config import ConfigError, ParallelConfig, load_config
    from pretrain.engine import deepspeed_config

    demo = REPO / "configs/pretrain/demo.yaml"
    ds = deepspeed_config(load_config(demo, ["parallel.precision=bf16-autocast"]), 1)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and ds["bf16"]["enabled"] is False
    ds = deepspeed_config(load_config(demo, ["parallel.precision=bf16"]), 1)
    assert ds["torch_autocast"]["enabled"] is False and ds["bf16"]["enabled"] is True
    with pytest.raises(ConfigError, match="bf16-autocast"):
        ParallelConfig(precision="fp16")


@pytest.mark.slow
def test_bench_gpu_smoke_runs_the_trainer_and_prints_the_figures(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    res = subprocess.run([sys.executable, str(REPO / "bench/gpu.py"), "--smoke", "--json", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=1800, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(out["variants"]) == {"eager-zero0", "eager-zero2"}
    for v in out["variants"].values():
        assert v["samples_per_s"] > 0 and v["mfu"] > 0 and 0.0 <= v["data_wait_fraction"] <= 1.0
        assert v["peak_rss_mb"] > 0 and np.isfinite(v["final_loss"])
    rec = [json.loads(x) for x in (tmp_path / "run_eager-zero0" / "metrics.jsonl").read_text().splitlines()]
    assert sum("data_wait_fraction" in r and "mfu" in r for r in rec) == 4  # every log step (every step here)


# ----------------------------------------------------------------------------------------------- CUDA only
@pytest.mark.gpu
@needs_cuda
def test_bf16_autocast_tracks_fp32_over_a_few_steps():
    from pretrain.models import build_model

    def run(autocast: bool) -> list[float]:
        torch.manual_seed(0)
        model = build_model("debug").cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        g = torch.Generator().manual_seed(1)
        losses = []
        for step in range(6):
            b = {"pixels": torch.randn(4, 24, 32, 32, generator=g).cuda(),
                 "wavelengths": torch.linspace(420, 2400, 24).expand(4, -1).cuda(),
                 "fwhm": torch.full((4, 24), 9.0).cuda(), "valid": torch.ones(4, 32, 32, dtype=torch.bool).cuda()}
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                out = model(b, generator=torch.Generator(device="cpu").manual_seed(step))
            assert out["loss"].dtype == torch.float32
            out["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out["loss"]))
        return losses

    fp32, bf16 = run(False), run(True)
    np.testing.assert_allclose(bf16, fp32, rtol=0.03)
    assert bf16[-1] < bf16[0]


@pytest.mark.gpu
@needs_cuda
def test_cuda_loader_matches_cpu_and_resumes_exactly(tmp_path):
    st = make_store(str(tmp_path / "emit_L2.zarr"), n=24, bands=40, patch=32)
    cfg = DataConfig(sources=[SourceConfig(st["url"])], batch_size=3, crop=16, band_window=24, band_stride=8,
                     num_workers=2, pin_memory=True, sensor_dropout=0.0)
    cpu = build_loader(cfg)
    gpu = build_loader(cfg, device="cuda")
    assert gpu.normalise_on == "device"
    it_c, it_g = iter(cpu), iter(gpu)
    for _ in range(3):
        a, b = next(it_c), next(it_g)
        assert b["pixels"].is_cuda and b["pixels"].dtype == torch.float32
        torch.testing.assert_close(b["pixels"].cpu(), a["pixels"], atol=1e-6, rtol=0)
    sd = gpu.state_dict()  # read one batch ahead: the state is still that of the 3 handed out
    assert json.dumps(sd) == json.dumps(cpu.state_dict())
    nxt = next(it_c)
    resumed = build_loader(cfg, device="cuda")
    resumed.load_state_dict(sd)
    torch.testing.assert_close(next(iter(resumed))["pixels"].cpu(), nxt["pixels"], atol=1e-6, rtol=0)
