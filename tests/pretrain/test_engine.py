"""Engine helpers that need no process group: AdamW groups, the generated DeepSpeed config, export loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pretrain.config import ConfigError, load_config
from pretrain.engine import deepspeed_config, import_object, load_export_into, param_groups

REPO = Path(__file__).resolve().parents[2]


class Net(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.embed = nn.Embedding(5, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, d))
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.encoder = nn.Sequential(nn.Linear(d, d))


def test_no_weight_decay_on_norms_biases_embeddings():
    net = Net()
    groups = {g["name"]: g for g in param_groups(net, 0.05)}
    names = {id(p): n for n, p in net.named_parameters()}
    decay = sorted(names[id(p)] for p in groups["decay"]["params"])
    assert decay == ["encoder.0.weight", "fc.weight"]
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    assert len(groups["decay"]["params"]) + len(groups["no_decay"]["params"]) == len(list(net.parameters()))


def test_deepspeed_config_follows_the_typed_config():
    cfg = load_config(REPO / "configs/pretrain/specaware_vitb.yaml", ["optim.grad_clip=0.5"])
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 256 and ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is True
    with pytest.raises(ConfigError, match="not divisible"):
        deepspeed_config(cfg, world_size=3)


def test_load_export_into_is_strict(tmp_path: Path):
    src, dst = Net(), Net()
    save_file({k: v.contiguous() for k, v in src.encoder.state_dict().items()}, str(tmp_path / "encoder.safetensors"))
    load_export_into(dst, tmp_path)
    assert torch.equal(dst.encoder[0].weight, src.encoder[0].weight)
    wide = Net(16)
    with pytest.raises(ConfigError, match=r"does not fit.*0.weight: export \[8, 8\] vs model \[16, 16\]"):
        load_export_into(wide, tmp_path)
    with pytest.raises(ConfigError, match="has no encoder.safetensors"):
        load_export_into(dst, tmp_path / "nothing")


def test_import_object_errors():
    assert import_object("pretrain.schedules:lr_at").__name__ == "lr_at"
    with pytest.raises(ConfigError, match="has no 'nope'"):
        import_object("pretrain.schedules:nope")
    with pytest.raises(ConfigError, match="cannot import module"):
        import_object("no_such_module_x:f")
