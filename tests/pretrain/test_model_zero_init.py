"""The shipped debug MAE built partitioned under ``deepspeed.zero.Init`` (ZeRO-3, two CPU ranks, gloo).

The contract (``pretrain.models.contract``) says every module initialises only its own parameters, so the
partitioned build must give, bitwise, the whole model's weights from the same seed; an export must load into
it (gathered) and the first loss must equal the whole model's.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache/specfm/torch_extensions"), "WANDB_MODE": "disabled",
       "PYTHONPATH": str(REPO)}

WORKER = '''
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from pretrain import engine as eng
from pretrain.config import load_config
from pretrain.models import build_model
from pretrain.models.export import ExportError, save_encoder
from pretrain.plan import make_plan


def whole_state(model):
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def export(model, path):
    if dist.get_rank() == 0:
        save_encoder(model, path)
    dist.barrier()


def main(config, out):
    out = Path(out)
    rank, world, _ = eng.init_distributed()
    cfg = load_config(config, ["parallel.zero_stage=3"])
    plan = make_plan(cfg, world)
    torch.manual_seed(0)
    model = eng.construct_model(plan)
    # partitioned as built: no rank holds a whole parameter
    n = sum(1 for _ in model.parameters())
    assert eng.is_partitioned(model) and all(p.data.numel() == 0 for p in model.parameters()), n
    torch.manual_seed(0)
    ref = build_model("debug")  # the whole model from the same seed: what rank 0 drew and broadcast
    got = whole_state(model)
    assert set(got) == set(ref.state_dict())
    for k, v in ref.state_dict().items():  # encoder, decoder, head, buffers: bitwise
        assert torch.equal(got[k], v), k
    # init_weights() partitioned (Module.apply, gathered per module inside zero.Init) == whole, bitwise
    torch.manual_seed(4)
    with deepspeed.zero.Init(config_dict_or_path=plan.deepspeed):
        model.init_weights()
    torch.manual_seed(4)
    ref.init_weights()
    before, got = got, whole_state(model)
    assert not torch.equal(got["encoder.blocks.0.attn.qkv.weight"], before["encoder.blocks.0.attn.qkv.weight"])
    for k, v in ref.state_dict().items():
        assert torch.equal(got[k], v), k
    # a previous stage's export, loaded into the partitioned encoder
    torch.manual_seed(1)
    prev = build_model("debug")
    export(prev, out / "prev")
    eng.load_export_into(model, out / "prev")
    got = eng.encoder_state(model)
    for k, v in prev.encoder.state_dict().items():
        assert torch.equal(got[k], v), k
    export(build_model("debug", dim=32), out / "narrow")
    try:
        eng.load_export_into(model, out / "narrow")
        raise AssertionError("no error for an export of another width")
    except ExportError as e:
        assert "blocks.0.attn.qkv.weight: export [96, 32] vs model [192, 64]" in str(e), e
    # the first step's loss equals the whole model's on the same batch and mask; the step runs
    ref.encoder.load_state_dict(prev.encoder.state_dict())
    engine = eng.build_engine(model, plan)
    g = torch.Generator().manual_seed(2)
    batch = {"pixels": torch.randn(2, 9, 16, 16, generator=g),
             "wavelengths": torch.sort(torch.rand(2, 9, generator=g) * 2000 + 420, 1).values,
             "fwhm": torch.rand(2, 9, generator=g) * 8 + 3, "sensor": torch.tensor([0, 3]),
             "level": torch.tensor([1, 2])}
    torch.manual_seed(3)
    loss = engine(batch)["loss"]
    torch.manual_seed(3)
    want = ref(batch)["loss"].item()
    assert abs(float(loss) - want) < 1e-6, (float(loss), want)
    engine.backward(loss)
    engine.step()
    print(f"rank {rank}: zero.Init ok, {n} parameters partitioned, loss {float(loss):.6f} = {want:.6f}", flush=True)


main(sys.argv[1], sys.argv[2])
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shipped_debug_mae_is_built_partitioned_with_the_whole_models_weights(tmp_path):
    cfg = {"run_dir": str(tmp_path / "run"), "data": {"sources": [{"url": str(tmp_path / "none.zarr")}],
                                                        "crop": 16, "band_window": 9},
           "model": {"name": "debug"}, "parallel": {"zero_stage": 3, "micro_batch": 2, "grad_accum": 1},
           "logging": {"wandb": "disabled", "progress": False}, "stages": [{"name": "one", "steps": 1}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    script = tmp_path / "zero_init_worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(script), str(tmp_path / "c.yaml"), str(tmp_path / "out")]
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "rank 0: zero.Init ok" in r.stdout and "rank 1: zero.Init ok" in r.stdout
