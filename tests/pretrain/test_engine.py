"""Engine helpers that need no process group: AdamW groups, the generated DeepSpeed config, export loading."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pretrain.config import ConfigError, load_config
from pretrain.engine import (
    bound_cpu_allocator,
    deepspeed_config,
    import_object,
    load_export_into,
    param_groups,
)
from pretrain.models.export import ExportError
from tests import watch

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
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is False  # bf16-autocast:
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}  # fp32 weights, bf16 matmuls
    with pytest.raises(ConfigError, match="not divisible"):
        deepspeed_config(cfg, world_size=3)


def test_load_export_into_is_strict(tmp_path: Path):
    src, dst = Net(), Net()
    save_file({k: v.contiguous() for k, v in src.encoder.state_dict().items()}, str(tmp_path / "encoder.safetensors"))
    load_export_into(dst, tmp_path)
    assert torch.equal(dst.encoder[0].weight, src.encoder[0].weight)
    wide = Net(16)
    with pytest.raises(ExportError, match=r"does not fit.*0.weight: export \[8, 8\] vs model \[16, 16\]"):
        load_export_into(wide, tmp_path)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ExportError, match="nothing lacks encoder.safetensors"):
        load_export_into(dst, tmp_path / "nothing")


def test_objective_parts_carry_only_to_the_same_objective_and_strictly(tmp_path: Path):
    from pretrain.engine import load_objective_into
    from pretrain.models.export import OBJECTIVE_WEIGHTS, read_objective, save_objective

    src, dst = Net(), Net()
    assert load_objective_into(dst, tmp_path, "mae") is False  # an export without the file: fresh parts
    save_objective(src, tmp_path, "mae")
    objective, own = read_objective(tmp_path)
    assert objective == "mae" and "fc.weight" in own and not any(k.startswith("encoder.") for k in own)
    before = dst.encoder[0].weight.clone()
    assert load_objective_into(dst, tmp_path, "jepa") is False  # another objective's parts: fresh
    assert not torch.equal(dst.fc.weight, src.fc.weight)
    assert load_objective_into(dst, tmp_path, "mae") is True
    assert torch.equal(dst.fc.weight, src.fc.weight) and torch.equal(dst.pos_embed, src.pos_embed)
    assert torch.equal(dst.encoder[0].weight, before)  # the encoder is load_export_into's, untouched here
    with pytest.raises(ExportError, match=rf"mae objective .*{OBJECTIVE_WEIGHTS} does not fit.*fc.weight"):
        load_objective_into(Net(16), tmp_path, "mae")


def test_import_object_errors():
    assert import_object("pretrain.schedules:lr_at").__name__ == "lr_at"
    with pytest.raises(ConfigError, match="has no 'nope'"):
        import_object("pretrain.schedules:nope")
    with pytest.raises(ConfigError, match="cannot import module"):
        import_object("no_such_module_x:f")


def test_zero3_config_bounds_the_working_set():
    cfg = load_config(REPO / "configs/pretrain/specaware_vitb.yaml",
                      ["parallel.zero_stage=3", "parallel.bucket_elements=1000000"])
    z = deepspeed_config(cfg, world_size=4)["zero_optimization"]
    assert z["stage"] == 3
    # DeepSpeed's defaults are 1e9 (whole partition stepped at once, every parameter live): bounded here
    assert z["sub_group_size"] == z["stage3_max_live_parameters"] == z["reduce_bucket_size"] == 1_000_000
    assert z["stage3_prefetch_bucket_size"] == 500_000 and z["stage3_param_persistence_threshold"] == 100_000


ALLOC_PROBE = """
import ctypes, sys
libc = ctypes.CDLL("libc.so.6")
class MI(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = MI
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "bound":
    from pretrain.engine import bound_cpu_allocator
    assert bound_cpu_allocator()
libc.free(libc.malloc(8 << 20))  # glibc: freeing an 8 MiB mmapped block raises its mmap threshold to 8 MiB
p = libc.malloc(4 << 20)
print(libc.mallinfo2().hblkhd >= 4 << 20)  # is the next 4 MiB block its own mapping (returned on free)?
libc.free(p)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_bound_cpu_allocator_keeps_large_blocks_mmapped():
    def probe(mode: str) -> str:
        # any MALLOC_*_ tunable (e.g. MALLOC_TRIM_THRESHOLD_, which Dask's nanny exports) turns glibc's dynamic
        # mmap threshold off: the probe measures glibc's default, so none may reach it
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
        r = watch.run([sys.executable, "-c", ALLOC_PROBE, mode], cwd=REPO, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.strip()

    assert probe("default") == "False"  # the dynamic threshold puts it on the (fragmenting) heap
    assert probe("bound") == "True"
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        assert bound_cpu_allocator() is False  # the user's own setting wins
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]


def test_a_lock_released_while_it_is_judged_is_not_stale(tmp_path, monkeypatch):
    """Another rank's JIT load takes the lock for a moment: released between the open-file scan and the folder's
    mtimes, only the op's old build files were left to judge by, and a healthy launch was refused as 'left by a
    killed build' (seen in the suite under load)."""
    import time

    import pretrain.engine as engine

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    op = tmp_path / "deepspeed_shm_comm"
    op.mkdir()
    old = time.time() - 3600
    for name in ("build.ninja", "deepspeed_shm_comm.so"):
        (op / name).write_text("")
        os.utime(op / name, (old, old))
    lock = op / "lock"
    lock.write_text("")

    def released_after_the_scan(path):  # the holder lets go just after its fds were looked at
        path.unlink(missing_ok=True)
        return False

    monkeypatch.setattr(engine, "_held_open", released_after_the_scan)
    engine.check_build_locks(quiet_s=120.0, poll_s=0.01)  # returns: nothing left to wait on
    assert not lock.exists()


def test_stale_extension_build_lock_is_reported_and_a_live_one_waited_for(tmp_path, monkeypatch, capsys):
    import threading
    import time

    from pretrain.engine import BuildLockError, check_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    check_build_locks()  # no locks: nothing to say
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # as torch's FileBaton does while it builds
    try:
        check_build_locks(quiet_s=0.0)  # held open by a live build (this process): not stale
    finally:
        os.close(fd)
    old = time.time() - 600
    os.utime(lock, (old, old))
    os.utime(lock.parent, (old, old))
    with pytest.raises(BuildLockError, match=f"extension build lock {lock} was left by a killed build.*rm {lock}"):
        check_build_locks(quiet_s=120.0)
    lock.touch()  # recent: maybe a build on another machine sharing the cache; wait while it is released
    threading.Timer(0.5, lock.unlink).start()
    check_build_locks(quiet_s=60.0, poll_s=0.05)
    assert "waiting on extension build lock" in capsys.readouterr().err
    lock.touch()
    with pytest.raises(BuildLockError):  # and give up once its folder stays unchanged for quiet_s
        check_build_locks(quiet_s=0.3, poll_s=0.05)
